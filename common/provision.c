/* provision.c — the streams and durables of DESIGN.md: created when missing,
 * verified when present. A difference is reported, never repaired: changing
 * a stream's retention or a durable's filter under a running fleet loses or
 * duplicates jobs, so that decision stays with a person. */
#include "provision.h"
#include "nats_conn.h"

#include <stdio.h>
#include <string.h>

#include "duration.h"

#define NS_PER_MS   INT64_C(1000000)
#define FIX_STREAM  "(fix the stream or the [stream] config; nothing was changed)"
#define FIX_DURABLE "(fix or delete the durable, or the [service.%s] config; nothing was changed)"
#define MAX_WAITING 512 /* open pulls per durable across the fleet (DESIGN.md) */

static const char *retention_name(jsRetentionPolicy r)
{
    switch (r) {
    case js_LimitsPolicy:
        return "limits";
    case js_InterestPolicy:
        return "interest";
    case js_WorkQueuePolicy:
        return "workqueue";
    }
    return "unknown";
}

static const char *ack_name(jsAckPolicy a)
{
    switch (a) {
    case js_AckExplicit:
        return "explicit";
    case js_AckNone:
        return "none";
    case js_AckAll:
        return "all";
    }
    return "unknown";
}

/* "7d" for a whole number of ms, the raw ns otherwise. */
static void fmt_ns(char *buf, size_t cap, int64_t ns)
{
    if (ns >= 0 && ns % NS_PER_MS == 0)
        jf_duration_format(buf, cap, ns / NS_PER_MS);
    else
        snprintf(buf, cap, "%lldns", (long long)ns);
}

static const char *nats_err_text(natsStatus s)
{
    if (s == NATS_NO_RESPONDERS)
        return "JetStream is not enabled on the server (no responders)";
    return jf_nats_error_text(s);
}

/* What one stream must be. */
typedef struct stream_want {
    const char *name;
    const char *subject; /* "jobs.>" or "dlq.>" */
    const char *age_key; /* config key of max_age, for messages */
    int64_t max_age_ns;
    int64_t dup_ns;
    int64_t replicas;
    int64_t max_bytes;
} stream_want;

static void want_streams(stream_want w[2], const jf_config *cfg)
{
    const jf_stream_config *s = &cfg->stream;
    int64_t max_bytes = s->max_bytes > 0 ? s->max_bytes : -1;
    int64_t replicas = s->replicas > 0 ? s->replicas : 1;
    w[0] = (stream_want){s->name,
                         "jobs.>",
                         "max_age",
                         s->max_age_ms * NS_PER_MS,
                         s->duplicate_window_ms * NS_PER_MS,
                         replicas,
                         max_bytes};
    /* The dead-letter stream has no byte limit of its own: dropping dead jobs
     * to make room would lose exactly the ones someone has to look at. */
    w[1] = (stream_want){s->dlq,
                         "dlq.>",
                         "dlq_max_age",
                         s->dlq_max_age_ms * NS_PER_MS,
                         s->duplicate_window_ms * NS_PER_MS,
                         replicas,
                         -1};
}

static jf_status verify_stream(const jsStreamConfig *have, const stream_want *w, jf_error *err)
{
    char a[64], b[64];
    bool subject_ok = false;

    for (int i = 0; i < have->SubjectsLen; i++)
        if (have->Subjects[i] != NULL && strcmp(have->Subjects[i], w->subject) == 0)
            subject_ok = true;
    if (!subject_ok) {
        char list[256] = "";
        size_t len = 0;
        for (int i = 0; i < have->SubjectsLen && len < sizeof list; i++) {
            int n = snprintf(list + len, sizeof list - len, "%s%s", i ? ", " : "",
                             have->Subjects[i] ? have->Subjects[i] : "");
            if (n < 0)
                break;
            len += (size_t)n;
        }
        jf_error_set(err, "stream %s: subjects are [%s], jetfleet needs %s " FIX_STREAM, w->name,
                     list, w->subject);
        return JF_ERR_MISMATCH;
    }
    if (have->Retention != js_LimitsPolicy) {
        jf_error_set(err, "stream %s: retention is %s, jetfleet needs limits " FIX_STREAM, w->name,
                     retention_name(have->Retention));
        return JF_ERR_MISMATCH;
    }
    if (have->Storage != js_FileStorage) {
        jf_error_set(err, "stream %s: storage is memory, jetfleet needs file " FIX_STREAM, w->name);
        return JF_ERR_MISMATCH;
    }
    if (have->MaxAge != w->max_age_ns) {
        fmt_ns(a, sizeof a, have->MaxAge);
        fmt_ns(b, sizeof b, w->max_age_ns);
        jf_error_set(err, "stream %s: max_age is %s, the config says %s ([stream] %s) " FIX_STREAM,
                     w->name, have->MaxAge == 0 ? "unlimited" : a, b, w->age_key);
        return JF_ERR_MISMATCH;
    }
    if (have->Duplicates != w->dup_ns) {
        fmt_ns(a, sizeof a, have->Duplicates);
        fmt_ns(b, sizeof b, w->dup_ns);
        jf_error_set(err,
                     "stream %s: duplicate_window is %s, the config says %s ([stream] "
                     "duplicate_window) " FIX_STREAM,
                     w->name, a, b);
        return JF_ERR_MISMATCH;
    }
    if (have->Replicas != w->replicas) {
        jf_error_set(
            err,
            "stream %s: num_replicas is %lld, the config says %lld ([stream] replicas) " FIX_STREAM,
            w->name, (long long)have->Replicas, (long long)w->replicas);
        return JF_ERR_MISMATCH;
    }
    /* The server reports "no limit" as -1; 0 from an old client means the same. */
    int64_t have_bytes = have->MaxBytes > 0 ? have->MaxBytes : -1;
    if (have_bytes != w->max_bytes) {
        jf_error_set(err, "stream %s: max_bytes is %lld, the config says %lld%s " FIX_STREAM,
                     w->name, (long long)have_bytes, (long long)w->max_bytes,
                     w->subject[0] == 'j' ? " ([stream] max_bytes)"
                                          : " (no limit for dead letters)");
        return JF_ERR_MISMATCH;
    }
    return JF_OK;
}

/* Right after a cluster forms, or while its JetStream meta leader changes,
 * API requests can time out for a few seconds although nothing is wrong: a
 * timed-out read is tried twice more, a second apart, before it is an error
 * (programs started together with their servers would exit otherwise). */
#define INFO_TRIES 3

/* Reads the stream: JF_OK and verified, JF_ERR_NOTFOUND, or another error. */
static jf_status check_stream(jsCtx *js, const stream_want *w, jf_error *err)
{
    jsStreamInfo *si = NULL;
    jsErrCode code = 0;
    natsStatus s = js_GetStreamInfo(&si, js, w->name, NULL, &code);
    for (int i = 1; s == NATS_TIMEOUT && i < INFO_TRIES; i++) {
        nats_Sleep(1000);
        code = 0;
        s = js_GetStreamInfo(&si, js, w->name, NULL, &code);
    }
    if (s == NATS_NOT_FOUND || code == JSStreamNotFoundErr) {
        jsStreamInfo_Destroy(si);
        jf_error_set(err, "stream %s does not exist", w->name);
        return JF_ERR_NOTFOUND;
    }
    if (s != NATS_OK) {
        jf_error_set(err, "stream %s: cannot read its info: %s", w->name, nats_err_text(s));
        return s == NATS_TIMEOUT ? JF_ERR_TIMEOUT : JF_ERR_NATS;
    }
    jf_status st = verify_stream(si->Config, w, err);
    jsStreamInfo_Destroy(si);
    return st;
}

static jf_status create_stream(jsCtx *js, const stream_want *w, jf_error *err)
{
    jsStreamConfig sc;
    jsStreamInfo *si = NULL;
    jsErrCode code = 0;
    const char *subjects[1] = {w->subject};

    jsStreamConfig_Init(&sc);
    sc.Name = w->name;
    sc.Subjects = subjects;
    sc.SubjectsLen = 1;
    sc.Retention = js_LimitsPolicy;
    sc.Storage = js_FileStorage;
    sc.Discard = js_DiscardOld;
    sc.MaxConsumers = -1;
    sc.MaxMsgs = -1;
    sc.MaxBytes = w->max_bytes;
    sc.MaxMsgSize = -1;
    sc.MaxMsgsPerSubject = -1;
    sc.MaxAge = w->max_age_ns;
    sc.Duplicates = w->dup_ns;
    sc.Replicas = w->replicas;

    natsStatus s = js_AddStream(&si, js, &sc, NULL, &code);
    char why[256];
    snprintf(why, sizeof why, "%s", nats_err_text(s)); /* before the next call overwrites it */
    if (s == NATS_OK) {
        jsStreamInfo_Destroy(si);
        jf_log(JF_LOG_INFO, "stream created", JF_S("stream", w->name), JF_S("subject", w->subject));
        return JF_OK;
    }
    /* Another process may have created it between our lookup and our create;
     * what is there now is judged like any existing stream. */
    jf_error inner;
    jf_status st = check_stream(js, w, &inner);
    if (st != JF_ERR_NOTFOUND) {
        if (st != JF_OK && err != NULL)
            *err = inner;
        return st;
    }
    jf_error_set(err, "stream %s: cannot create it: %s", w->name, why);
    return s == NATS_TIMEOUT ? JF_ERR_TIMEOUT : JF_ERR_NATS;
}

static jf_status streams(jsCtx *js, const jf_config *cfg, bool with_dlq, bool create, jf_error *err)
{
    stream_want w[2];
    want_streams(w, cfg);
    for (int i = 0; i < (with_dlq ? 2 : 1); i++) {
        jf_status st = check_stream(js, &w[i], err);
        if (st == JF_ERR_NOTFOUND && create)
            st = create_stream(js, &w[i], err);
        else if (st == JF_ERR_NOTFOUND)
            jf_error_set(err,
                         "stream %s does not exist (run once without --no-provision to create it)",
                         w[i].name);
        if (st != JF_OK)
            return st;
    }
    return JF_OK;
}

jf_status jf_provision_streams(jsCtx *js, const jf_config *cfg, bool with_dlq, jf_error *err)
{
    return streams(js, cfg, with_dlq, true, err);
}

jf_status jf_verify_streams(jsCtx *js, const jf_config *cfg, bool with_dlq, jf_error *err)
{
    return streams(js, cfg, with_dlq, false, err);
}

void jf_durable_name(char *buf, size_t cap, const char *service, jf_priority p)
{
    snprintf(buf, cap, "%s-%s", service, jf_priority_name(p));
}

/* What one durable must be. */
typedef struct durable_want {
    const char *stream;
    const char *service;
    char name[JF_NAME_MAX + 16];
    char filter[JF_NAME_MAX + 32];
    int64_t ack_wait_ns;
    int64_t max_ack_pending;
} durable_want;

static jf_status verify_durable(const jsConsumerConfig *have, const durable_want *w, jf_error *err)
{
    char a[64], b[64];
    const char *svc = w->service;

    if (have->DeliverSubject != NULL && have->DeliverSubject[0] != '\0') {
        jf_error_set(err, "durable %s on %s: is a push consumer, jetfleet needs pull " FIX_DURABLE,
                     w->name, w->stream, svc);
        return JF_ERR_MISMATCH;
    }
    if (have->FilterSubject == NULL || strcmp(have->FilterSubject, w->filter) != 0) {
        jf_error_set(err, "durable %s on %s: filter_subject is %s, jetfleet needs %s " FIX_DURABLE,
                     w->name, w->stream, have->FilterSubject ? have->FilterSubject : "(none)",
                     w->filter, svc);
        return JF_ERR_MISMATCH;
    }
    if (have->AckPolicy != js_AckExplicit) {
        jf_error_set(err,
                     "durable %s on %s: ack_policy is %s, jetfleet needs explicit " FIX_DURABLE,
                     w->name, w->stream, ack_name(have->AckPolicy), svc);
        return JF_ERR_MISMATCH;
    }
    if (have->AckWait != w->ack_wait_ns) {
        fmt_ns(a, sizeof a, have->AckWait);
        fmt_ns(b, sizeof b, w->ack_wait_ns);
        jf_error_set(err,
                     "durable %s on %s: ack_wait is %s, the config says %s ([service.%s] "
                     "ack_wait) " FIX_DURABLE,
                     w->name, w->stream, a, b, svc, svc);
        return JF_ERR_MISMATCH;
    }
    if (have->MaxAckPending != w->max_ack_pending) {
        jf_error_set(err,
                     "durable %s on %s: max_ack_pending is %lld, the config says %lld "
                     "([service.%s] fleet_in_flight) " FIX_DURABLE,
                     w->name, w->stream, (long long)have->MaxAckPending,
                     (long long)w->max_ack_pending, svc, svc);
        return JF_ERR_MISMATCH;
    }
    /* jetfleet counts real attempts itself; a server-side limit would park
     * jobs silently, with no dead letter. */
    if (have->MaxDeliver > 0) {
        jf_error_set(
            err,
            "durable %s on %s: max_deliver is %lld, jetfleet needs unlimited (-1) " FIX_DURABLE,
            w->name, w->stream, (long long)have->MaxDeliver, svc);
        return JF_ERR_MISMATCH;
    }
    return JF_OK;
}

static jf_status check_durable(jsCtx *js, const durable_want *w, jf_error *err)
{
    jsConsumerInfo *ci = NULL;
    jsErrCode code = 0;
    natsStatus s = js_GetConsumerInfo(&ci, js, w->stream, w->name, NULL, &code);
    for (int i = 1; s == NATS_TIMEOUT && i < INFO_TRIES; i++) {
        nats_Sleep(1000);
        code = 0;
        s = js_GetConsumerInfo(&ci, js, w->stream, w->name, NULL, &code);
    }
    if (code == JSStreamNotFoundErr) {
        jsConsumerInfo_Destroy(ci);
        jf_error_set(err, "durable %s: stream %s does not exist", w->name, w->stream);
        return JF_ERR_NOTFOUND;
    }
    if (s == NATS_NOT_FOUND || code == JSConsumerNotFoundErr) {
        jsConsumerInfo_Destroy(ci);
        jf_error_set(err, "durable %s on %s does not exist", w->name, w->stream);
        return JF_ERR_NOTFOUND;
    }
    if (s != NATS_OK) {
        jf_error_set(err, "durable %s on %s: cannot read its info: %s", w->name, w->stream,
                     nats_err_text(s));
        return s == NATS_TIMEOUT ? JF_ERR_TIMEOUT : JF_ERR_NATS;
    }
    jf_status st = verify_durable(ci->Config, w, err);
    jsConsumerInfo_Destroy(ci);
    return st;
}

jf_status jf_provision_durable(jsCtx *js, const jf_config *cfg, const jf_service_config *svc,
                               jf_priority p, bool create, jf_error *err)
{
    durable_want w;
    w.stream = cfg->stream.name;
    w.service = svc->name;
    jf_durable_name(w.name, sizeof w.name, svc->name, p);
    snprintf(w.filter, sizeof w.filter, "jobs.%s.%s.>", svc->name, jf_priority_name(p));
    w.ack_wait_ns = svc->ack_wait_ms * NS_PER_MS;
    w.max_ack_pending = svc->fleet_in_flight;

    jf_status st = check_durable(js, &w, err);
    if (st != JF_ERR_NOTFOUND || !create)
        return st;

    jsConsumerConfig cc;
    jsConsumerInfo *ci = NULL;
    jsErrCode code = 0;
    jsConsumerConfig_Init(&cc);
    cc.Durable = w.name;
    cc.DeliverPolicy = js_DeliverAll;
    cc.AckPolicy = js_AckExplicit;
    cc.ReplayPolicy = js_ReplayInstant;
    cc.FilterSubject = w.filter;
    cc.AckWait = w.ack_wait_ns;
    cc.MaxAckPending = w.max_ack_pending;
    cc.MaxDeliver = -1;
    cc.MaxWaiting = MAX_WAITING;

    natsStatus s = js_AddConsumer(&ci, js, w.stream, &cc, NULL, &code);
    char why[256];
    snprintf(why, sizeof why, "%s", nats_err_text(s)); /* before the next call overwrites it */
    if (s == NATS_OK) {
        jsConsumerInfo_Destroy(ci);
        jf_log(JF_LOG_INFO, "durable created", JF_S("stream", w.stream), JF_S("durable", w.name),
               JF_S("subject", w.filter));
        return JF_OK;
    }
    /* Several consumer processes starting together all try to create the
     * same durable; the losers ("already in use") judge what the winner made. */
    jf_error inner;
    st = check_durable(js, &w, &inner);
    if (st != JF_ERR_NOTFOUND) {
        if (st != JF_OK && err != NULL)
            *err = inner;
        return st;
    }
    jf_error_set(err, "durable %s on %s: cannot create it: %s", w.name, w.stream, why);
    return s == NATS_TIMEOUT ? JF_ERR_TIMEOUT : JF_ERR_NATS;
}
