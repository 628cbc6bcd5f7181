/* deadletter.h — builds the dead-letter message of DESIGN.md: the original
 * bytes unchanged on dlq.<service>.<priority>.<type>, Jetfleet-* headers,
 * and Nats-Msg-Id dlq-<stream>-<seq> so a repeated publish is stored once. */
#ifndef JF_DEADLETTER_H
#define JF_DEADLETTER_H

#include <nats/nats.h>
#include <stdint.h>

#include "status.h"

typedef enum jf_dl_reason {
    JF_DL_INVALID = 0,
    JF_DL_PERMANENT,
    JF_DL_MAX_DELIVERIES,
    JF_DL_EXPIRED,
} jf_dl_reason;

const char *jf_dl_reason_name(jf_dl_reason r);

typedef struct jf_dl_info {
    jf_dl_reason reason;
    const char *error;        /* last error; folded to one line, bounded */
    uint64_t deliveries;
    const char *stream;       /* the original's stream, e.g. JOBS */
    uint64_t stream_seq;
    const char *subject;      /* the original subject, jobs.… */
    int64_t failed_at_ms;
} jf_dl_info;

/* Creates the message (reply may be NULL). The caller owns *out. */
jf_status jf_dl_message(natsMsg **out, const jf_dl_info *info, const void *body, int len,
                        const char *reply, jf_error *err);

#endif
