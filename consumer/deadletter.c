#include "deadletter.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rfc3339.h"

#define DL_ERROR_MAX 1024 /* a header line, not a log: keep it short */

const char *jf_dl_reason_name(jf_dl_reason r)
{
    switch (r) {
    case JF_DL_INVALID:
        return "invalid";
    case JF_DL_PERMANENT:
        return "permanent";
    case JF_DL_MAX_DELIVERIES:
        return "max_deliveries";
    case JF_DL_EXPIRED:
        return "expired";
    }
    return "invalid";
}

/* Header values are one line of printable bytes: control characters (CR and
 * LF would break the header block) become spaces. */
static void one_line(char *dst, size_t cap, const char *src)
{
    size_t i = 0;
    for (; src != NULL && *src && i + 1 < cap; src++)
        dst[i++] = ((unsigned char)*src < 0x20 || *src == 0x7f) ? ' ' : *src;
    dst[i] = '\0';
    if (i == 0 && cap > 1)
        snprintf(dst, cap, "-");
}

jf_status jf_dl_message(natsMsg **out, const jf_dl_info *info, const void *body, int len,
                        const char *reply, jf_error *err)
{
    char error[DL_ERROR_MAX], num[32], seq[32], when[40], msgid[256];
    natsMsg *m = NULL;
    natsStatus s;

    /* jobs.<service>.<priority>.<type…> -> dlq.<service>.<priority>.<type…>;
     * the durable's filter guarantees the "jobs." prefix. As long as the
     * original's subject, which the server has bounded already: a dead
     * letter refused for its length would be redelivered forever. */
    const char *rest = strncmp(info->subject, "jobs.", 5) == 0 ? info->subject + 5 : info->subject;
    const size_t subject_cap = strlen(rest) + sizeof "dlq.";
    char *subject = malloc(subject_cap);
    if (subject == NULL) {
        jf_error_set(err, "dead letter for %s: out of memory", info->subject);
        return JF_ERR_NOMEM;
    }
    snprintf(subject, subject_cap, "dlq.%s", rest);
    one_line(error, sizeof error, info->error);
    snprintf(num, sizeof num, "%llu", (unsigned long long)info->deliveries);
    snprintf(seq, sizeof seq, "%llu", (unsigned long long)info->stream_seq);
    jf_rfc3339_format(when, sizeof when, info->failed_at_ms);
    snprintf(msgid, sizeof msgid, "dlq-%s-%llu", info->stream,
             (unsigned long long)info->stream_seq);

    s = natsMsg_Create(&m, subject, reply, body, len);
    free(subject);
    if (s == NATS_OK)
        s = natsMsgHeader_Set(m, "Jetfleet-Reason", jf_dl_reason_name(info->reason));
    if (s == NATS_OK)
        s = natsMsgHeader_Set(m, "Jetfleet-Error", error);
    if (s == NATS_OK)
        s = natsMsgHeader_Set(m, "Jetfleet-Deliveries", num);
    if (s == NATS_OK)
        s = natsMsgHeader_Set(m, "Jetfleet-Stream", info->stream);
    if (s == NATS_OK)
        s = natsMsgHeader_Set(m, "Jetfleet-Stream-Seq", seq);
    if (s == NATS_OK)
        s = natsMsgHeader_Set(m, "Jetfleet-Subject", info->subject);
    if (s == NATS_OK)
        s = natsMsgHeader_Set(m, "Jetfleet-Failed-At", when);
    if (s == NATS_OK)
        s = natsMsgHeader_Set(m, "Nats-Msg-Id", msgid);
    if (s != NATS_OK) {
        natsMsg_Destroy(m);
        jf_error_set(err, "dead letter for %s seq %s: %s", info->subject, seq,
                     natsStatus_GetText(s));
        return JF_ERR_NATS;
    }
    *out = m;
    return JF_OK;
}
