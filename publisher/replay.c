/* replay.c — `jetfleet-publisher replay`: republishes a window of JOBS so the
 * fleet reprocesses it; and what the operating commands share (ops.h): the
 * window reader, the asynchronous republisher, pacing, progress.
 *
 * A replayed message keeps its body (the envelope, byte for byte) and its
 * subject, and gets a new Nats-Msg-Id, replay-<orig seq>-<ms of this run>, so
 * the duplicate window does not swallow it while a second run still can be
 * told apart from the first. Jetfleet-Replay-Of-Seq and -Of-Id say what it
 * replays; the consumer's ledger resets the job's row once for it.
 *
 * The window ends at the stream's last sequence when the run starts, so what
 * the run itself publishes is never read back. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "duration.h"
#include "envelope.h"
#include "ops.h"
#include "rfc3339.h"

#define WINDOW_BATCH_MAX      256
#define WINDOW_EXPIRES_MS     1000 /* a pull that finds nothing ends the window */
#define WINDOW_IDLE_NS        (30LL * 1000 * 1000 * 1000) /* server drops a forgotten consumer */
#define REPUB_FAILURES_LOGGED 10
#define SKIPS_LOGGED          10

/* ========================================================================= */
/* Window reader                                                             */

struct jf_window {
    natsConnection *nc;
    jsCtx *js;
    char *stream;
    char *name; /* the ephemeral consumer's, given by the server */
    natsInbox *inbox;
    natsSubscription *sub;
    char next_subject[512];
    int batch;
    int64_t wait_ms;
    uint64_t end_seq;
    uint64_t last_seq; /* of the latest message read (start - 1 at first) */
    uint64_t pending;  /* matching messages after it, as the server last said */
    int outstanding;   /* messages the open pull still owes; 0: none open */
    bool done;
};

static const char *js_error_text(natsStatus s, jsErrCode code, char *buf, size_t cap)
{
    const char *t = jf_pub_nats_error(s);
    if (code != 0)
        snprintf(buf, cap, "%s (err_code %d)", t, (int)code);
    else
        snprintf(buf, cap, "%s", t);
    return buf;
}

jf_status jf_window_open(jf_window **out, natsConnection *nc, jsCtx *js, const jf_window_opts *o,
                         jf_error *err)
{
    jsConsumerConfig cc;
    jsConsumerInfo *ci = NULL;
    jsErrCode code = 0;
    char why[300];
    jf_status st = JF_ERR_NOMEM;

    jf_window *w = calloc(1, sizeof *w);
    if (w == NULL) {
        jf_error_set(err, "out of memory");
        return JF_ERR_NOMEM;
    }
    w->nc = nc;
    w->js = js;
    w->batch = o->batch < 1 ? 1 : o->batch > WINDOW_BATCH_MAX ? WINDOW_BATCH_MAX : o->batch;
    w->wait_ms = o->wait_ms > 0 ? o->wait_ms : 5000;
    w->end_seq = o->end_seq;
    if ((w->stream = strdup(o->stream)) == NULL)
        goto fail;

    jsConsumerConfig_Init(&cc);
    cc.Description = "jetfleet-publisher: reading a window";
    if (o->start_seq > 0) {
        cc.DeliverPolicy = js_DeliverByStartSequence;
        cc.OptStartSeq = o->start_seq;
    } else if (o->start_time_ms > 0) {
        cc.DeliverPolicy = js_DeliverByStartTime;
        cc.OptStartTime = o->start_time_ms * 1000000;
    } else {
        cc.DeliverPolicy = js_DeliverAll;
    }
    /* Nothing to acknowledge: the window is read once, and a consumer
     * without acks never holds messages back. */
    cc.AckPolicy = js_AckNone;
    cc.FilterSubject = o->filter;
    cc.InactiveThreshold = WINDOW_IDLE_NS;
    cc.MemoryStorage = true;
    cc.Replicas = 1;
    natsStatus s = js_AddConsumer(&ci, js, o->stream, &cc, NULL, &code);
    if (s != NATS_OK) {
        jf_error_set(err, "stream %s: cannot create a consumer for %s: %s", o->stream,
                     o->filter ? o->filter : "all subjects",
                     js_error_text(s, code, why, sizeof why));
        st = s == NATS_TIMEOUT ? JF_ERR_TIMEOUT : JF_ERR_NATS;
        goto fail;
    }
    w->name = strdup(ci->Name);
    w->pending = ci->NumPending;
    w->done = ci->NumPending == 0;
    w->last_seq = o->start_seq > 0 ? o->start_seq - 1 : 0;
    jsConsumerInfo_Destroy(ci);
    if (w->name == NULL)
        goto fail;
    if ((size_t)snprintf(w->next_subject, sizeof w->next_subject, "$JS.API.CONSUMER.MSG.NEXT.%s.%s",
                         w->stream, w->name) >= sizeof w->next_subject) {
        jf_error_set(err, "stream %s: consumer name too long", o->stream);
        st = JF_ERR_INVALID;
        goto fail;
    }
    if ((s = natsInbox_Create(&w->inbox)) == NATS_OK)
        s = natsConnection_SubscribeSync(&w->sub, nc, w->inbox);
    /* A pull brings at most batch messages of at most max_payload each:
     * nats.c's default limits could drop some of them silently. */
    if (s == NATS_OK)
        s = natsSubscription_SetPendingLimits(w->sub, -1, -1);
    if (s != NATS_OK) {
        jf_error_set(err, "stream %s: cannot subscribe for the window: %s", o->stream,
                     jf_pub_nats_error(s));
        st = JF_ERR_NATS;
        goto fail;
    }
    *out = w;
    return JF_OK;

fail:
    if (st == JF_ERR_NOMEM)
        jf_error_set(err, "out of memory");
    jf_window_close(w);
    return st;
}

/* A pull never asks for more than the server said it has, nor for more
 * sequences than the window has left: it is filled at once, and ends
 * without a status reply, so at the end of the window no message of it is
 * still on its way (see jf_window_close). */
static natsStatus send_pull(jf_window *w)
{
    char body[128];
    uint64_t n = (uint64_t)w->batch;
    if (w->pending > 0 && w->pending < n)
        n = w->pending;
    if (w->end_seq > w->last_seq && w->last_seq > 0 && w->end_seq - w->last_seq < n)
        n = w->end_seq - w->last_seq;
    snprintf(body, sizeof body, "{\"batch\":%d,\"expires\":%lld}", (int)n,
             (long long)WINDOW_EXPIRES_MS * 1000000);
    w->outstanding = (int)n;
    return natsConnection_PublishRequestString(w->nc, w->next_subject, w->inbox, body);
}

jf_status jf_window_next(jf_window *w, natsMsg **out, uint64_t *seq, int64_t *time_ns,
                         jf_error *err)
{
    for (;;) {
        if (w->done)
            return JF_ERR_NOTFOUND;
        natsStatus s;
        if (w->outstanding == 0 && (s = send_pull(w)) != NATS_OK) {
            jf_error_set(err, "stream %s: pull request failed: %s", w->stream,
                         jf_pub_nats_error(s));
            return JF_ERR_NATS;
        }
        natsMsg *m = NULL;
        s = natsSubscription_NextMsg(&m, w->sub, w->wait_ms + WINDOW_EXPIRES_MS);
        if (s == NATS_TIMEOUT) {
            jf_error_set(err, "stream %s: no answer to a pull within %lld ms", w->stream,
                         (long long)(w->wait_ms + WINDOW_EXPIRES_MS));
            return JF_ERR_TIMEOUT;
        }
        if (s != NATS_OK) {
            jf_error_set(err, "stream %s: reading the window failed: %s", w->stream,
                         jf_pub_nats_error(s));
            return JF_ERR_NATS;
        }
        const char *status = NULL;
        if (natsMsg_GetDataLength(m) == 0 && natsMsgHeader_Get(m, "Status", &status) == NATS_OK &&
            status != NULL) {
            if (strcmp(status, "100") == 0) {
                natsMsg_Destroy(m);
                continue;
            }
            if (strcmp(status, "404") == 0 || strcmp(status, "408") == 0) {
                /* The pull expired before it was filled: every message that
                 * existed when it started has been delivered. */
                natsMsg_Destroy(m);
                w->outstanding = 0;
                w->done = true;
                return JF_ERR_NOTFOUND;
            }
            const char *desc = NULL;
            if (natsMsgHeader_Get(m, "Description", &desc) != NATS_OK)
                desc = NULL;
            jf_error_set(err, "stream %s: pull answered %s %s", w->stream, status,
                         desc ? desc : "");
            natsMsg_Destroy(m);
            return JF_ERR_NATS;
        }
        jsMsgMetaData *meta = NULL;
        if (natsMsg_GetMetaData(&meta, m) != NATS_OK) {
            jf_error_set(err, "stream %s: a delivered message has no JetStream metadata",
                         w->stream);
            natsMsg_Destroy(m);
            return JF_ERR_NATS;
        }
        uint64_t sseq = meta->Sequence.Stream;
        uint64_t pending = meta->NumPending;
        int64_t ts = meta->Timestamp;
        jsMsgMetaData_Destroy(meta);
        if (w->outstanding > 0)
            w->outstanding--;
        w->last_seq = sseq;
        w->pending = pending;
        if (w->end_seq > 0 && sseq > w->end_seq) {
            natsMsg_Destroy(m);
            w->done = true;
            return JF_ERR_NOTFOUND;
        }
        if (pending == 0 || (w->end_seq > 0 && sseq == w->end_seq))
            w->done = true;
        *out = m;
        *seq = sseq;
        *time_ns = ts;
        return JF_OK;
    }
}

/* Reads what the open pull still owes. nats.c 3.4.1 can crash when a
 * subscription is destroyed while its reader thread is handing it a
 * message (seen here: a use-after-free in natsConn_processMsg), so the
 * subscription goes only once nothing more is on its way. */
static void drain_outstanding(jf_window *w)
{
    int64_t deadline = jf_pub_mono_ms() + w->wait_ms + WINDOW_EXPIRES_MS;
    while (w->outstanding > 0) {
        int64_t left = deadline - jf_pub_mono_ms();
        natsMsg *m = NULL;
        if (left <= 0 || natsSubscription_NextMsg(&m, w->sub, left) != NATS_OK)
            break;
        const char *status = NULL;
        bool is_status = natsMsg_GetDataLength(m) == 0 &&
                         natsMsgHeader_Get(m, "Status", &status) == NATS_OK && status != NULL;
        bool heartbeat = is_status && strcmp(status, "100") == 0;
        natsMsg_Destroy(m);
        if (is_status && !heartbeat)
            break; /* the pull ended */
        if (!is_status)
            w->outstanding--;
    }
    w->outstanding = 0;
}

void jf_window_close(jf_window *w)
{
    if (w == NULL)
        return;
    if (w->sub != NULL) {
        drain_outstanding(w);
        natsSubscription_Unsubscribe(w->sub);
        natsSubscription_Destroy(w->sub);
    }
    if (w->name != NULL) {
        jsErrCode code = 0;
        natsStatus s = js_DeleteConsumer(w->js, w->stream, w->name, NULL, &code);
        if (s != NATS_OK && code != JSConsumerNotFoundErr)
            jf_log(JF_LOG_WARN,
                   "cannot delete the window's consumer; the server drops it when idle",
                   JF_S("stream", w->stream), JF_S("consumer", w->name),
                   JF_S("error", jf_pub_nats_error(s)));
    }
    natsInbox_Destroy(w->inbox);
    free(w->name);
    free(w->stream);
    free(w);
}

/* ========================================================================= */
/* Republisher                                                               */

static void repub_log_failure(jf_repub *r, natsMsg *msg, const char *why)
{
    /* Called with r->mu held; one write(2) per line. */
    if (r->logged < REPUB_FAILURES_LOGGED) {
        const char *id = NULL;
        if (natsMsgHeader_Get(msg, "Nats-Msg-Id", &id) != NATS_OK)
            id = NULL;
        jf_log(JF_LOG_WARN, "publish failed", JF_S("msg_id", id),
               JF_S("subject", natsMsg_GetSubject(msg)), JF_S("error", why));
    } else if (r->logged == REPUB_FAILURES_LOGGED) {
        jf_log(JF_LOG_WARN, "more publishes failed; only the count is reported from now on",
               JF_I("logged", REPUB_FAILURES_LOGGED));
    }
    r->logged++;
}

bool jf_parse_u64(const char *s, uint64_t *out)
{
    if (s == NULL || *s < '0' || *s > '9')
        return false;
    errno = 0;
    char *end = NULL;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno != 0 || *end != '\0')
        return false;
    *out = (uint64_t)v;
    return true;
}

static void repub_on_ack(jsCtx *js, natsMsg *msg, jsPubAck *pa, jsPubAckErr *pae, void *closure)
{
    jf_repub *r = closure;
    (void)js;
    bool ok = pa != NULL && pa->Stream != NULL && strcmp(pa->Stream, r->stream) == 0;

    pthread_mutex_lock(&r->mu);
    if (ok) {
        if (pa->Duplicate)
            r->duplicates++;
        else
            r->stored++;
    } else {
        r->failed++;
        if (pa != NULL)
            repub_log_failure(r, msg, "stored by another stream than the one expected");
        else if (pae != NULL && pae->Err == NATS_TIMEOUT)
            repub_log_failure(r, msg, "no acknowledgement within [publisher] timeout");
        else
            repub_log_failure(r, msg,
                              pae && pae->ErrText && *pae->ErrText ? pae->ErrText
                              : pae                                ? natsStatus_GetText(pae->Err)
                                                                   : "no acknowledgement");
    }
    const char *tag = NULL;
    uint64_t v = 0;
    if (r->tag_header != NULL && natsMsgHeader_Get(msg, r->tag_header, &tag) == NATS_OK &&
        jf_parse_u64(tag, &v)) {
        if (r->done_len == r->done_cap) {
            /* The command takes what is settled before each send, so this
             * holds at most [publisher] max_pending entries in practice. */
            size_t ncap = r->done_cap ? r->done_cap * 2 : 64;
            jf_repub_done *nd = realloc(r->done, ncap * sizeof *nd);
            if (nd != NULL) {
                r->done = nd;
                r->done_cap = ncap;
            }
        }
        if (r->done_len < r->done_cap)
            r->done[r->done_len++] =
                (jf_repub_done){.tag = v, .ok = ok, .duplicate = ok && pa->Duplicate};
        else
            r->lost_tags++;
    }
    pthread_mutex_unlock(&r->mu);
    natsMsg_Destroy(msg); /* with an AckHandler the message is ours (nats.c 3.4.1) */
}

jf_status jf_repub_init(jf_repub *r, const jf_config *cfg, jsOptions *jo, const char *tag_header,
                        jf_error *err)
{
    (void)err;
    memset(r, 0, sizeof *r);
    pthread_mutex_init(&r->mu, NULL);
    r->stream = cfg->stream.name;
    r->tag_header = tag_header;
    r->timeout_ms = cfg->publisher.timeout_ms > 0 ? cfg->publisher.timeout_ms : 5000;
    jo->PublishAsync.MaxPending =
        cfg->publisher.max_pending > 0 ? cfg->publisher.max_pending : 1024;
    jo->PublishAsync.AckHandler = repub_on_ack;
    jo->PublishAsync.AckHandlerClosure = r;
    /* Past the per-message timeout every pending publish has been settled,
     * so a longer stall means the connection itself is stuck. */
    jo->PublishAsync.StallWait = r->timeout_ms + 1000;
    jsPubOptions_Init(&r->po);
    r->po.MaxWait = r->timeout_ms;
    return JF_OK;
}

void jf_repub_destroy(jf_repub *r)
{
    if (r == NULL)
        return;
    free(r->done);
    r->done = NULL;
    r->done_len = r->done_cap = 0;
    pthread_mutex_destroy(&r->mu);
}

jf_status jf_repub_send(jf_repub *r, jsCtx *js, natsMsg **msg, jf_error *err)
{
    natsStatus s = NATS_TIMEOUT;
    /* A stall (max_pending PubAcks outstanding for longer than StallWait)
     * clears as soon as the oldest publish is settled; the message is still
     * ours after one, so it can be tried again. */
    for (int tries = 0; tries < 3 && s == NATS_TIMEOUT; tries++)
        s = js_PublishMsgAsync(js, msg, &r->po);
    if (s != NATS_OK) {
        jf_error_set(err, "%s: %s", natsMsg_GetSubject(*msg), jf_pub_nats_error(s));
        return s == NATS_TIMEOUT ? JF_ERR_TIMEOUT : JF_ERR_NATS;
    }
    return JF_OK;
}

size_t jf_repub_take(jf_repub *r, jf_repub_done *out, size_t cap)
{
    pthread_mutex_lock(&r->mu);
    size_t n = r->done_len < cap ? r->done_len : cap;
    if (n > 0) {
        memcpy(out, r->done, n * sizeof *out);
        memmove(r->done, r->done + n, (r->done_len - n) * sizeof *out);
        r->done_len -= n;
    }
    pthread_mutex_unlock(&r->mu);
    return n;
}

unsigned long long jf_repub_finish(jf_repub *r, jsCtx *js)
{
    jsPubOptions done;
    jsPubOptions_Init(&done);
    /* Each pending publish ends by its own MaxWait; the margin covers the
     * reply thread's latency. */
    done.MaxWait = r->timeout_ms + 2000;
    unsigned long long stuck = 0;
    if (js_PublishAsyncComplete(js, &done) == NATS_TIMEOUT) {
        natsMsgList pending = {0};
        if (js_PublishAsyncGetPendingList(&pending, js) == NATS_OK) {
            stuck = (unsigned long long)pending.Count;
            natsMsgList_Destroy(&pending);
        }
        jf_log(JF_LOG_ERROR, "publishes still unacknowledged at the end", JF_I("count", stuck));
    }
    return stuck;
}

void jf_repub_counts(jf_repub *r, unsigned long long out[3])
{
    pthread_mutex_lock(&r->mu);
    out[0] = r->stored;
    out[1] = r->duplicates;
    out[2] = r->failed;
    pthread_mutex_unlock(&r->mu);
}

/* ========================================================================= */
/* Pacing, progress, command-line values                                     */

jf_status jf_pacer_parse(double *per_sec, const char *s, jf_error *err)
{
    char *end = NULL;
    errno = 0;
    double n = strtod(s, &end);
    if (errno != 0 || end == s || !(n > 0) || n > 1e9) {
        jf_error_set(err, "'%s' is not a rate (N, N/s, N/m or N/h with N > 0)", s);
        return JF_ERR_INVALID;
    }
    double per = 1.0;
    if (*end == '/') {
        if (strcmp(end, "/s") == 0)
            per = 1.0;
        else if (strcmp(end, "/m") == 0)
            per = 60.0;
        else if (strcmp(end, "/h") == 0)
            per = 3600.0;
        else
            end = NULL;
    } else if (*end != '\0') {
        end = NULL;
    }
    if (end == NULL) {
        jf_error_set(err, "'%s' is not a rate (N, N/s, N/m or N/h with N > 0)", s);
        return JF_ERR_INVALID;
    }
    *per_sec = n / per;
    return JF_OK;
}

void jf_pacer_start(jf_pacer *p, double per_sec)
{
    p->per_sec = per_sec;
    p->start_ms = jf_pub_mono_ms();
    p->sent = 0;
}

void jf_pacer_wait(jf_pacer *p)
{
    if (p->per_sec <= 0)
        return;
    int64_t due = p->start_ms + (int64_t)((double)p->sent * 1000.0 / p->per_sec);
    p->sent++;
    for (;;) {
        int64_t left = due - jf_pub_mono_ms();
        if (left <= 0 || jf_pub_interrupted())
            return;
        struct timespec ts = {.tv_sec = left / 1000, .tv_nsec = (left % 1000) * 1000000};
        nanosleep(&ts, NULL); /* EINTR: the loop checks the flag */
    }
}

void jf_progress_start(jf_progress *pg)
{
    memset(pg, 0, sizeof *pg);
    pg->tty = isatty(STDERR_FILENO) == 1;
    pg->start_ms = pg->last_ms = jf_pub_mono_ms();
}

bool jf_progress_due(jf_progress *pg)
{
    if (!pg->tty)
        return false;
    int64_t now = jf_pub_mono_ms();
    if (now - pg->start_ms < 1000 || now - pg->last_ms < 200)
        return false;
    pg->last_ms = now;
    return true;
}

void jf_progress_print(jf_progress *pg, const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    pg->shown = true;
    fprintf(stderr, "\r\033[K%s", line);
}

void jf_progress_clear(jf_progress *pg)
{
    if (pg->shown) {
        fputs("\r\033[K", stderr);
        pg->shown = false;
    }
}

jf_status jf_parse_past_time(int64_t *out_ms, const char *s, jf_error *err)
{
    int64_t ms = 0;
    if (jf_rfc3339_parse(&ms, s, strlen(s)) == JF_OK) {
        *out_ms = ms;
        return JF_OK;
    }
    jf_error derr;
    if (jf_duration_parse(&ms, s, &derr) == JF_OK) {
        *out_ms = jf_now_ms() - ms;
        return JF_OK;
    }
    jf_error_set(err, "'%s' is neither an RFC 3339 date-time nor a duration (e.g. 10m)", s);
    return JF_ERR_INVALID;
}

bool jf_filter_valid(const char *s, const char *prefix)
{
    size_t plen = strlen(prefix);
    if (strncmp(s, prefix, plen) != 0 || s[plen] != '.' || strlen(s) > 1024)
        return false;
    const char *p = s;
    for (;;) {
        const char *dot = strchr(p, '.');
        size_t n = dot ? (size_t)(dot - p) : strlen(p);
        if (n == 0)
            return false;
        if (n == 1 && p[0] == '>')
            return dot == NULL;
        if (!(n == 1 && p[0] == '*')) {
            for (size_t i = 0; i < n; i++) {
                char c = p[i];
                if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                      c == '_' || c == '-'))
                    return false;
            }
        }
        if (dot == NULL)
            return true;
        p = dot + 1;
    }
}

/* ========================================================================= */
/* The replay command                                                        */

static void usage(FILE *out)
{
    fprintf(
        out,
        "Usage: %s [GLOBAL OPTIONS] replay (--from-seq N | --since TIME) [OPTIONS]\n"
        "\n"
        "Republishes a window of the jobs stream (JOBS) so the fleet processes those\n"
        "jobs again: each message goes back to its own subject with its body unchanged,\n"
        "a new Nats-Msg-Id (replay-<seq>-<unix ms of this run>) and the headers\n"
        "Jetfleet-Replay-Of-Seq (its sequence) and Jetfleet-Replay-Of-Id (the job id).\n"
        "With a ledger, the job's row is reset once (attempts 1, replays + 1).\n"
        "The window ends at the stream's last message when the run starts, so what\n"
        "the run publishes is never replayed again. Invalid envelopes and jobs whose\n"
        "deadline has passed are skipped: the fleet would only dead-letter them again.\n"
        "\n"
        "One JSON line on stdout at the end:\n"
        "  {\"replayed\":N,\"skipped\":N,\"failed\":N,\"from_seq\":N,\"to_seq\":N,\"seconds\":S}\n"
        "(from_seq and to_seq: the first and last message of the window, null when it\n"
        "is empty). Exit status 1 when any publish failed.\n"
        "\n"
        "Options:\n"
        "      --from-seq N      start at stream sequence N\n"
        "      --since TIME      start at the first message stored at or after TIME:\n"
        "                        RFC 3339, or a duration meaning that long ago (e.g. 2h)\n"
        "      --until SEQ|TIME  last sequence, or latest time, of the window (inclusive)\n"
        "      --subject FILTER  only subjects matching this filter (default jobs.>),\n"
        "                        e.g. jobs.llm.> or jobs.*.high.>\n"
        "      --rate R          at most R messages a second (N, N/s, N/m, N/h)\n"
        "      --dry-run         publish nothing; list what would be replayed, one JSON\n"
        "                        line per message: {\"seq\":N,\"subject\":S,\"id\":ID}\n"
        "  -h, --help            show this help and exit\n",
        JF_PUBLISHER_PROG);
}

/* Copies the original's own headers, leaving out the server's (Nats-*) and
 * those a replay sets itself. */
static natsStatus copy_headers(natsMsg *dst, natsMsg *src)
{
    const char **keys = NULL;
    int n = 0;
    natsStatus s = natsMsgHeader_Keys(src, &keys, &n);
    if (s == NATS_NOT_FOUND)
        return NATS_OK;
    for (int i = 0; s == NATS_OK && i < n; i++) {
        const char *k = keys[i];
        if (strncasecmp(k, "Nats-", 5) == 0 || strncasecmp(k, "Jetfleet-Replay-", 16) == 0 ||
            strcasecmp(k, "Jetfleet-Redrive-Of") == 0)
            continue;
        const char **vals = NULL;
        int nv = 0;
        s = natsMsgHeader_Values(src, k, &vals, &nv);
        for (int j = 0; s == NATS_OK && j < nv; j++)
            s = natsMsgHeader_Add(dst, k, vals[j]);
        free((void *)vals);
    }
    free((void *)keys);
    return s;
}

void jf_print_json(json_t *o)
{
    if (o == NULL)
        return;
    char *text = json_dumps(o, JSON_COMPACT | JSON_REAL_PRECISION(12));
    if (text != NULL) {
        puts(text);
        free(text);
    }
    json_decref(o);
}

json_t *jf_json_seconds(double secs)
{
    return json_real(round(secs * 1000.0) / 1000.0);
}

typedef struct replay_args {
    uint64_t from_seq;
    bool has_since;
    int64_t since_ms;
    uint64_t until_seq;
    bool has_until_time;
    int64_t until_ms;
    const char *filter;
    double rate;
    bool dry_run;
} replay_args;

static int parse_args(replay_args *a, int argc, char **argv)
{
    enum { O_FROM = 256, O_SINCE, O_UNTIL, O_SUBJECT, O_RATE, O_DRY };
    static const struct option longopts[] = {
        {"from-seq", required_argument, NULL, O_FROM},
        {"since", required_argument, NULL, O_SINCE},
        {"until", required_argument, NULL, O_UNTIL},
        {"subject", required_argument, NULL, O_SUBJECT},
        {"rate", required_argument, NULL, O_RATE},
        {"dry-run", no_argument, NULL, O_DRY},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    jf_error err = {{0}};
    int c;
    bool has_from = false;

    a->filter = "jobs.>";
    opterr = 0;
    while ((c = getopt_long(argc, argv, ":h", longopts, NULL)) != -1) {
        switch (c) {
        case O_FROM:
            if (!jf_parse_u64(optarg, &a->from_seq) || a->from_seq == 0)
                return jf_pub_usage_error("replay",
                                          "--from-seq: '%s' is not a sequence (1 or more)", optarg);
            has_from = true;
            break;
        case O_SINCE:
            if (jf_parse_past_time(&a->since_ms, optarg, &err) != JF_OK)
                return jf_pub_usage_error("replay", "--since: %s", err.msg);
            a->has_since = true;
            break;
        case O_UNTIL:
            if (optarg[0] >= '0' && optarg[0] <= '9' &&
                strspn(optarg, "0123456789") == strlen(optarg)) {
                if (!jf_parse_u64(optarg, &a->until_seq) || a->until_seq == 0)
                    return jf_pub_usage_error("replay", "--until: '%s' is not a sequence", optarg);
            } else if (jf_parse_past_time(&a->until_ms, optarg, &err) == JF_OK) {
                a->has_until_time = true;
            } else {
                return jf_pub_usage_error("replay", "--until: %s", err.msg);
            }
            break;
        case O_SUBJECT:
            if (!jf_filter_valid(optarg, "jobs"))
                return jf_pub_usage_error("replay",
                                          "--subject: '%s' is not a subject filter within jobs.> "
                                          "(e.g. jobs.llm.>)",
                                          optarg);
            a->filter = optarg;
            break;
        case O_RATE:
            if (jf_pacer_parse(&a->rate, optarg, &err) != JF_OK)
                return jf_pub_usage_error("replay", "--rate: %s", err.msg);
            break;
        case O_DRY:
            a->dry_run = true;
            break;
        case 'h':
            usage(stdout);
            return -1;
        case ':':
            return jf_pub_usage_error("replay", "option %s needs a value", argv[optind - 1]);
        default:
            return jf_pub_usage_error("replay", "unknown option %s", jf_pub_bad_option(argc, argv));
        }
    }
    if (optind < argc)
        return jf_pub_usage_error("replay", "unexpected argument '%s'", argv[optind]);
    if (has_from == a->has_since)
        return jf_pub_usage_error("replay", "give exactly one of --from-seq N and --since TIME");
    if (has_from && a->until_seq > 0 && a->until_seq < a->from_seq)
        return jf_pub_usage_error("replay", "--until %" PRIu64 " is before --from-seq %" PRIu64,
                                  a->until_seq, a->from_seq);
    if (a->has_since && a->has_until_time && a->until_ms < a->since_ms)
        return jf_pub_usage_error("replay", "--until is before --since");
    return JF_EXIT_OK;
}

typedef struct replay_run {
    jf_pub_session *sess;
    jf_repub *rp;
    const replay_args *a;
    int64_t run_ms; /* wall-clock ms of this run, in every Nats-Msg-Id */
    unsigned long long read, listed, skipped, send_failed, logged_skips;
} replay_run;

static void skip(replay_run *r, uint64_t seq, natsMsg *m, const char *why)
{
    r->skipped++;
    if (r->logged_skips++ < SKIPS_LOGGED)
        jf_log(JF_LOG_INFO, "skipped", JF_I("seq", seq), JF_S("subject", natsMsg_GetSubject(m)),
               JF_S("reason", why));
}

/* One message of the window: skipped, listed (dry run) or republished. */
static void replay_one(replay_run *r, natsMsg *m, uint64_t seq)
{
    jf_envelope *env = NULL;
    jf_error err = {{0}};
    const char *subject = natsMsg_GetSubject(m);
    if (jf_envelope_parse(&env, natsMsg_GetData(m), (size_t)natsMsg_GetDataLength(m), subject,
                          r->sess->max_payload, &err) != JF_OK) {
        skip(r, seq, m, err.msg);
        return;
    }
    if (env->has_deadline && env->deadline_ms <= jf_now_ms()) {
        skip(r, seq, m, "deadline has passed");
        jf_envelope_destroy(env);
        return;
    }
    if (r->a->dry_run) {
        jf_print_json(
            json_pack("{s:I,s:s,s:s}", "seq", (json_int_t)seq, "subject", subject, "id", env->id));
        r->listed++;
        jf_envelope_destroy(env);
        return;
    }

    char msgid[96], seqtxt[24];
    snprintf(msgid, sizeof msgid, "replay-%" PRIu64 "-%" PRId64, seq, r->run_ms);
    snprintf(seqtxt, sizeof seqtxt, "%" PRIu64, seq);
    natsMsg *out = NULL;
    natsStatus s =
        natsMsg_Create(&out, subject, NULL, natsMsg_GetData(m), natsMsg_GetDataLength(m));
    if (s == NATS_OK)
        s = copy_headers(out, m);
    if (s == NATS_OK)
        s = natsMsgHeader_Set(out, "Nats-Msg-Id", msgid);
    if (s == NATS_OK)
        s = natsMsgHeader_Set(out, "Jetfleet-Replay-Of-Seq", seqtxt);
    if (s == NATS_OK)
        s = natsMsgHeader_Set(out, "Jetfleet-Replay-Of-Id", env->id);
    if (s == NATS_OK) {
        if (jf_repub_send(r->rp, r->sess->js, &out, &err) != JF_OK) {
            jf_log(JF_LOG_WARN, "publish failed", JF_I("seq", seq), JF_S("job_id", env->id),
                   JF_S("error", err.msg));
            r->send_failed++;
        }
    } else {
        jf_log(JF_LOG_WARN, "cannot build the replayed message", JF_I("seq", seq),
               JF_S("job_id", env->id), JF_S("error", natsStatus_GetText(s)));
        r->send_failed++;
    }
    natsMsg_Destroy(out); /* NULL when nats.c took it */
    jf_envelope_destroy(env);
}

int jf_cmd_replay(int argc, char **argv, const jf_pub_globals *g)
{
    replay_args a = {0};
    jf_pub_session sess = {0};
    jf_repub rp;
    jf_window *w = NULL;
    jf_progress pg;
    jf_pacer pacer;
    jf_error err = {{0}};
    int rc = parse_args(&a, argc, argv);
    if (rc != JF_EXIT_OK)
        return rc < 0 ? JF_EXIT_OK : rc;

    if ((rc = jf_pub_session_load(&sess, g)) != JF_EXIT_OK)
        return rc;
    jsOptions jo;
    jsOptions_Init(&jo);
    jf_repub_init(&rp, sess.cfg, &jo, NULL, &err);
    if ((rc = jf_pub_session_connect(&sess, g, &jo)) != JF_EXIT_OK)
        goto out;

    /* The end of the window is fixed now: what this run publishes comes
     * after it. */
    jsStreamInfo *si = NULL;
    jsErrCode code = 0;
    natsStatus s = js_GetStreamInfo(&si, sess.js, sess.cfg->stream.name, NULL, &code);
    if (s != NATS_OK) {
        char why[300];
        jf_log(JF_LOG_ERROR, "cannot read the stream", JF_S("stream", sess.cfg->stream.name),
               JF_S("error", js_error_text(s, code, why, sizeof why)));
        rc = JF_EXIT_FAIL;
        goto out;
    }
    uint64_t last_seq = si->State.LastSeq;
    uint64_t first_seq = si->State.FirstSeq;
    jsStreamInfo_Destroy(si);
    uint64_t end_seq = a.until_seq > 0 && a.until_seq < last_seq ? a.until_seq : last_seq;

    replay_run run = {.sess = &sess, .rp = &rp, .a = &a, .run_ms = jf_now_ms()};
    uint64_t from = 0, to = 0;
    bool empty = last_seq == 0 || (a.from_seq > 0 && a.from_seq > end_seq);
    jf_pub_catch_signals();
    jf_progress_start(&pg);
    jf_pacer_start(&pacer, a.rate);
    bool aborted = false;

    if (!empty) {
        int batch = WINDOW_BATCH_MAX;
        if (a.rate > 0 && a.rate * 2 < batch)
            batch = a.rate * 2 < 1 ? 1 : (int)(a.rate * 2);
        jf_window_opts wo = {
            .stream = sess.cfg->stream.name,
            .filter = a.filter,
            .start_seq = a.from_seq,
            .start_time_ms = a.has_since ? a.since_ms : 0,
            .end_seq = end_seq,
            .batch = batch,
            .wait_ms = sess.cfg->nats.request_timeout_ms,
        };
        /* DeliverByStartTime needs a time after the epoch; a start before
         * the stream's first message is the same as the first message. */
        if (a.has_since && a.since_ms <= 0) {
            wo.start_time_ms = 0;
            wo.start_seq = first_seq > 0 ? first_seq : 1;
        }
        if (jf_window_open(&w, sess.nc, sess.js, &wo, &err) != JF_OK) {
            jf_log(JF_LOG_ERROR, "cannot read the window", JF_S("error", err.msg));
            rc = JF_EXIT_FAIL;
            goto out;
        }
    }

    while (w != NULL && !jf_pub_interrupted()) {
        natsMsg *m = NULL;
        uint64_t seq = 0;
        int64_t ts = 0;
        jf_status st = jf_window_next(w, &m, &seq, &ts, &err);
        if (st == JF_ERR_NOTFOUND)
            break;
        if (st != JF_OK) {
            jf_log(JF_LOG_ERROR, "reading the window failed", JF_S("error", err.msg));
            aborted = true;
            break;
        }
        if (a.has_until_time && ts / 1000000 > a.until_ms) {
            natsMsg_Destroy(m);
            break;
        }
        if (run.read++ == 0)
            from = seq;
        to = seq;
        if (!a.dry_run)
            jf_pacer_wait(&pacer);
        replay_one(&run, m, seq);
        natsMsg_Destroy(m);
        if (jf_progress_due(&pg)) {
            unsigned long long c[3];
            jf_repub_counts(&rp, c);
            double secs = (double)(jf_pub_mono_ms() - pg.start_ms) / 1000.0;
            jf_progress_print(&pg,
                              "replay: seq %" PRIu64 " of %" PRIu64 ", %llu read, %llu replayed, "
                              "%llu skipped, %llu failed (%.0f/s)",
                              seq, end_seq, run.read, c[0] + c[1], run.skipped,
                              c[2] + run.send_failed, secs > 0 ? (double)run.read / secs : 0.0);
        }
        if (natsConnection_IsClosed(sess.nc)) {
            jf_log(JF_LOG_ERROR, "connection closed; stopping", JF_I("seq", seq));
            aborted = true;
            break;
        }
    }
    if (jf_pub_interrupted())
        jf_log(JF_LOG_WARN, "interrupted; waiting for the acknowledgements of what was sent",
               JF_I("read", run.read));
    unsigned long long stuck = a.dry_run ? 0 : jf_repub_finish(&rp, sess.js);
    jf_progress_clear(&pg);

    unsigned long long c[3];
    jf_repub_counts(&rp, c);
    unsigned long long failed = c[2] + run.send_failed + stuck;
    json_t *sum = json_object();
    json_object_set_new(sum, "replayed",
                        json_integer((json_int_t)(a.dry_run ? run.listed : c[0] + c[1])));
    json_object_set_new(sum, "skipped", json_integer((json_int_t)run.skipped));
    json_object_set_new(sum, "failed", json_integer((json_int_t)failed));
    json_object_set_new(sum, "from_seq", run.read ? json_integer((json_int_t)from) : json_null());
    json_object_set_new(sum, "to_seq", run.read ? json_integer((json_int_t)to) : json_null());
    json_object_set_new(sum, "seconds",
                        jf_json_seconds((double)(jf_pub_mono_ms() - pg.start_ms) / 1000.0));
    if (a.dry_run)
        json_object_set_new(sum, "dry_run", json_true());
    jf_print_json(sum);
    rc = failed > 0 || aborted || jf_pub_interrupted() ? JF_EXIT_FAIL : JF_EXIT_OK;

out:
    jf_window_close(w);
    /* Closing the connection ends nats.c's reply thread before rp goes away. */
    jf_pub_session_close(&sess);
    jf_repub_destroy(&rp);
    return rc;
}
