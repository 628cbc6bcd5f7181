/* jsmsg.h — what a raw JetStream pull loop reads off a delivered message
 * besides its body: the ack subject (where the message sits in its stream,
 * how often it was delivered) and the status of a pull's empty replies
 * (heartbeat, expiry, conflict). Pure functions over caller-owned strings:
 * no allocation, no NATS call, safe from any thread. */
#ifndef JF_JSMSG_H
#define JF_JSMSG_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

/* The metadata of a JetStream delivery, read from its reply subject:
 *   v1 (9 tokens)      $JS.ACK.<stream>.<consumer>.<delivered>.<stream_seq>
 *                             .<consumer_seq>.<timestamp_ns>.<pending>
 *   v2 (11, 12 tokens) $JS.ACK.<domain>.<account_hash>.<stream>.<consumer>
 *                             .<delivered>.<stream_seq>.<consumer_seq>
 *                             .<timestamp_ns>.<pending>[.<random>]
 * The spans point into the subject the caller parsed (not NUL-terminated)
 * and live as long as it does. */
typedef struct jf_ack_meta {
    const char *domain; /* NULL: none (absent in v1, "_" in v2) */
    size_t domain_len;
    const char *stream;
    size_t stream_len;
    const char *consumer;
    size_t consumer_len;
    uint64_t delivered;    /* 1 on the first delivery */
    uint64_t stream_seq;
    uint64_t consumer_seq;
    int64_t timestamp_ns;  /* when the server stored the message, ns since the epoch */
    uint64_t pending;      /* messages left for the consumer after this one */
} jf_ack_meta;

/* Parses subject[0..len) (need not be NUL-terminated). Accepts the subjects
 * nats.c 3.4.1's natsMsg_GetMetaData accepts, more strictly: exactly 9, 11
 * or 12 tokens; no empty token; no control byte, space, '*' or '>' in any
 * token; every numeric token all digits and at most INT64_MAX (nats.c reads
 * them as int64). On error *out is untouched and err names the token and
 * what is wrong with it ("ack subject "…": token 8 (stream sequence) "1x"
 * is not a number"). */
jf_status jf_ack_meta_parse(jf_ack_meta *out, const char *subject, size_t len, jf_error *err);

/* What an empty reply to a pull request (no body, no reply subject, a
 * "Status" header) means for the pull that receives it. */
typedef enum jf_pull_status {
    JF_PULL_HEARTBEAT = 0,    /* 100: the pull is alive; nothing else changes */
    JF_PULL_EXPIRED,          /* 408 (expires reached), 404 (no messages): pull over */
    JF_PULL_CONFLICT,         /* 409 (MaxWaiting, MaxRequestBatch…): pull over, back off */
    JF_PULL_CONSUMER_DELETED, /* 409 "Consumer Deleted": re-provision the durable */
    JF_PULL_OTHER,            /* anything else, NULL included: pull over, back off */
} jf_pull_status;

/* status is the "Status" header ("408"), description the "Description"
 * header ("Request Timeout") or NULL. Never fails. */
jf_pull_status jf_pull_status_classify(const char *status, const char *description);

/* "heartbeat", "expired", "conflict", "consumer_deleted", "other"; never NULL. */
const char *jf_pull_status_name(jf_pull_status s);

#endif
