/* fleet.c — the consumer's event loop.
 *
 * Threads: nats.c's delivery thread only pushes messages onto a queue and
 * wakes the loop (uv_async); everything else — pull accounting, handlers,
 * acks, dead letters, timers, signals — runs on the loop thread, so no state
 * here is shared across threads except that queue.
 *
 * Pulls: each pull request ($JS.API.CONSUMER.MSG.NEXT) gets its own reply
 * subject and a short-lived subscription, so every message and every status
 * (100 heartbeat, 408 expired, 409 …) is attributed to the exact pull it
 * answers. That keeps the count of requested-but-undelivered messages exact,
 * and with it the bound in_flight + requested <= max_in_flight.
 *
 * Priorities: a durable with a backlog is "busy" (every delivery's metadata
 * says how many messages are still pending for it); an idle durable keeps
 * one probe pull of size 1 open. The process's capacity is shared between
 * busy durables by priority weight (default high 6 : normal 3 : low 1), so
 * high is served first and most, and low is never starved. Pulls are sized
 * to the known backlog, because a pull cannot be taken back: an oversized
 * one would hold capacity other priorities could use until it expires.
 * Capacity moves between durables as jobs finish, never by taking jobs back.
 *
 * Attempts: a job's attempt number is the server's delivery count. The
 * server's own MaxDeliver is unlimited (a job the server gives up on would be
 * parked silently); jetfleet dead-letters after max_deliver attempts. */
#include "fleet.h"

#include <inttypes.h>
#include <jansson.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "backoff.h"
#include "deadletter.h"
#include "handler.h"
#include "log.h"
#include "nats_conn.h"
#include "provision.h"
#include "rfc3339.h"

#define MAX_PULLS 16
#define STATUS_HOLD_MS 250 /* pause a durable's pulls after an odd status */

typedef struct pull {
    uint64_t id;
    int batch;
    int remaining;
    int64_t last_ms; /* sent, or last message/heartbeat */
    natsSubscription *sub;
} pull;

typedef struct pull_closure {
    jf_fleet *f;
    int didx;
    uint64_t id;
} pull_closure;

typedef struct service_rt {
    const jf_service_config *cfg;
    const jf_handler_ops *ops;
    void *impl;
} service_rt;

typedef struct durable {
    jf_fleet *f;
    int idx;
    service_rt *svc;
    jf_priority prio;
    char name[JF_NAME_MAX + 16];
    char next_subject[256];
    int weight;
    int in_flight; /* jobs of this durable held by this process */
    int requested; /* asked for in open pulls, not yet delivered */
    int64_t backlog; /* pending after the latest delivery (server's view) */
    bool busy;
    int64_t hold_until_ms;
    pull pulls[MAX_PULLS];
    int npulls;
    int silent; /* pulls in a row that got no answer at all */
    bool reprovisioning;
    uv_work_t work;
    jf_status work_status;
    jf_error work_err;
} durable;

struct jf_job {
    jf_job *prev, *next;
    jf_fleet *f;
    durable *d;
    natsMsg *msg;
    jf_envelope *env;
    const char *reply;
    char stream[64];
    uint64_t seq;
    uint64_t delivered;
    int64_t progress_ms; /* last time the server heard of this job */
    void *slot;
    bool running;
    /* dead-letter state while its PubAck is awaited */
    bool settling;
    jf_dl_reason dl_reason;
    uint64_t dl_id;
    int64_t dl_sent_ms;
    natsMsg *dl_msg;
    char error[512];
};

typedef enum ev_kind { EV_PULL, EV_DLACK, EV_RECONNECTED } ev_kind;

typedef struct event {
    ev_kind kind;
    int didx;
    uint64_t id;
    natsMsg *msg;
} event;

typedef struct evqueue {
    event *v;
    size_t len, cap;
} evqueue;

struct jf_fleet {
    const jf_config *cfg;
    bool provision;
    natsConnection *nc;
    jsCtx *js;
    int64_t max_payload;

    uv_loop_t loop;
    uv_async_t async;
    uv_prepare_t prepare;
    uv_timer_t tick, stats, grace;
    uv_signal_t sigterm, sigint;
    int64_t tick_ms;

    pthread_mutex_t mu;
    evqueue q;     /* filled by NATS threads under mu */
    evqueue batch; /* swapped with q, drained on the loop */

    service_rt services[JF_MAX_SERVICES];
    int nservices;
    durable *durables;
    int ndurables;

    char inbox[128];
    natsSubscription *dl_sub;
    uint64_t next_pull_id, next_dl_id;

    jf_job jobs; /* sentinel of the in-flight list */
    int in_flight, requested, peak;
    unsigned long long acked, dead, retried, nacked_on_stop, stray;
    bool dirty, ready, stopping, grace_over, done;
    jf_rng rng;
};

static int64_t now_ms(void)
{
    return jf_now_ms();
}

/* ---- NATS threads: hand everything to the loop ---------------------- */

static void push_event(jf_fleet *f, event ev)
{
    pthread_mutex_lock(&f->mu);
    if (f->q.len == f->q.cap) {
        size_t cap = f->q.cap ? f->q.cap * 2 : 256;
        event *v = realloc(f->q.v, cap * sizeof *v);
        if (v == NULL) {
            /* Dropping is safe: the server redelivers after ack_wait. */
            pthread_mutex_unlock(&f->mu);
            natsMsg_Destroy(ev.msg);
            jf_log0(JF_LOG_ERROR, "out of memory queueing a message; it will be redelivered");
            return;
        }
        f->q.v = v;
        f->q.cap = cap;
    }
    f->q.v[f->q.len++] = ev;
    pthread_mutex_unlock(&f->mu);
    uv_async_send(&f->async);
}

static void on_pull_msg(natsConnection *nc, natsSubscription *sub, natsMsg *msg, void *closure)
{
    pull_closure *c = closure;
    push_event(c->f, (event){EV_PULL, c->didx, c->id, msg});
}

static void free_closure(void *closure)
{
    free(closure);
}

static void on_dl_ack(natsConnection *nc, natsSubscription *sub, natsMsg *msg, void *closure)
{
    jf_fleet *f = closure;
    const char *subj = natsMsg_GetSubject(msg);
    const char *dot = strrchr(subj, '.');
    uint64_t id = dot ? strtoull(dot + 1, NULL, 10) : 0;
    push_event(f, (event){EV_DLACK, -1, id, msg});
}

static void on_reconnected(natsConnection *nc, void *closure)
{
    push_event(closure, (event){EV_RECONNECTED, -1, 0, NULL});
}

/* ---- acks ------------------------------------------------------------ */

static void publish_ack(jf_fleet *f, const char *reply, const char *body)
{
    natsStatus s = natsConnection_PublishString(f->nc, reply, body);
    if (s != NATS_OK)
        jf_log(JF_LOG_WARN, "ack not sent; the server will redeliver", JF_S("ack", body),
               JF_S("error", natsStatus_GetText(s)));
}

static void nak_msg(jf_fleet *f, const char *reply, int64_t delay_ms)
{
    if (reply == NULL)
        return;
    if (delay_ms <= 0) {
        publish_ack(f, reply, "-NAK");
        return;
    }
    char body[64];
    snprintf(body, sizeof body, "-NAK {\"delay\":%" PRId64 "}", delay_ms * 1000000);
    publish_ack(f, reply, body);
}

/* ---- jobs ------------------------------------------------------------ */

static void finish_job(jf_job *job)
{
    jf_fleet *f = job->f;
    job->prev->next = job->next;
    job->next->prev = job->prev;
    job->d->in_flight--;
    f->in_flight--;
    jf_envelope_destroy(job->env);
    natsMsg_Destroy(job->dl_msg);
    natsMsg_Destroy(job->msg);
    free(job);
    f->dirty = true;
}

static void log_job(jf_log_level lvl, const char *msg, const jf_job *job, const char *key,
                    const char *val)
{
    jf_log(lvl, msg, JF_S("job_id", job->env ? job->env->id : NULL),
           JF_S("service", job->d->svc->cfg->name), JF_S("subject", natsMsg_GetSubject(job->msg)),
           JF_I("seq", job->seq), JF_I("attempt", job->delivered), JF_S(key, val));
}

static void send_dead_letter(jf_fleet *f, jf_job *job)
{
    natsStatus s = natsConnection_PublishMsg(f->nc, job->dl_msg);
    job->dl_sent_ms = now_ms();
    if (s != NATS_OK)
        log_job(JF_LOG_WARN, "dead-letter publish failed; will retry", job, "error",
                natsStatus_GetText(s));
}

static void dead_letter(jf_fleet *f, jf_job *job, jf_dl_reason reason, const char *error)
{
    char reply[192];
    jf_error err;
    const char *data = natsMsg_GetData(job->msg);
    int len = natsMsg_GetDataLength(job->msg);

    snprintf(job->error, sizeof job->error, "%s", error ? error : "");
    job->running = false;
    job->settling = true;
    job->dl_reason = reason;
    job->dl_id = ++f->next_dl_id;
    snprintf(reply, sizeof reply, "%s.d.%" PRIu64, f->inbox, job->dl_id);
    jf_dl_info info = {
        .reason = reason,
        .error = job->error,
        .deliveries = job->delivered,
        .stream = job->stream,
        .stream_seq = job->seq,
        .subject = natsMsg_GetSubject(job->msg),
        .failed_at_ms = now_ms(),
    };
    if (jf_dl_message(&job->dl_msg, &info, data, len, reply, &err) != JF_OK) {
        /* Cannot build it (absurd subject): leave the job to redelivery
         * rather than lose it, and say so loudly. */
        log_job(JF_LOG_ERROR, "cannot dead-letter job; leaving it for redelivery", job, "error",
                err.msg);
        nak_msg(f, job->reply, 30000);
        finish_job(job);
        return;
    }
    send_dead_letter(f, job);
}

static void on_dl_ack_event(jf_fleet *f, uint64_t id, natsMsg *msg)
{
    jf_job *job = NULL;
    for (jf_job *j = f->jobs.next; j != &f->jobs; j = j->next) {
        if (j->settling && j->dl_id == id) {
            job = j;
            break;
        }
    }
    if (job == NULL)
        return; /* a late answer to a publish already settled or resent */

    const char *status = NULL;
    if (natsMsgHeader_Get(msg, "Status", &status) == NATS_OK && status != NULL) {
        /* 503: no stream listens on dlq.> — it was deleted under us. */
        log_job(JF_LOG_ERROR, "dead-letter stream did not answer; will retry", job, "status",
                status);
        return; /* the tick resends after request_timeout */
    }
    json_error_t jerr;
    json_t *pa = json_loadb(natsMsg_GetData(msg), (size_t)natsMsg_GetDataLength(msg), 0, &jerr);
    json_t *e = pa ? json_object_get(pa, "error") : NULL;
    if (pa == NULL || e != NULL || json_object_get(pa, "seq") == NULL) {
        const char *desc = e ? json_string_value(json_object_get(e, "description")) : NULL;
        log_job(JF_LOG_ERROR, "dead-letter publish refused; will retry", job, "error",
                desc ? desc : "malformed PubAck");
        json_decref(pa);
        return;
    }
    json_decref(pa);

    /* The dead letter is stored: only now may the original go. */
    publish_ack(f, job->reply, "+ACK");
    f->dead++;
    jf_log(JF_LOG_WARN, "dead-lettered", JF_S("reason", jf_dl_reason_name(job->dl_reason)),
           JF_S("job_id", job->env ? job->env->id : NULL), JF_S("service", job->d->svc->cfg->name),
           JF_S("subject", natsMsg_GetSubject(job->msg)), JF_I("seq", job->seq),
           JF_I("deliveries", job->delivered), JF_S("error", job->error));
    finish_job(job);
}

void jf_job_done(jf_job *job, jf_outcome outcome, const char *error, int64_t retry_after_ms)
{
    jf_fleet *f = job->f;
    const jf_service_config *svc = job->d->svc->cfg;

    if (!job->running)
        return; /* cancelled or already settled: the handler broke its contract */
    job->running = false;
    switch (outcome) {
    case JF_OUTCOME_OK:
        publish_ack(f, job->reply, "+ACK");
        f->acked++;
        if (jf_log_enabled(JF_LOG_DEBUG))
            log_job(JF_LOG_DEBUG, "job done", job, "outcome", "ok");
        finish_job(job);
        return;
    case JF_OUTCOME_PERMANENT:
        dead_letter(f, job, JF_DL_PERMANENT, error);
        return;
    case JF_OUTCOME_RETRY:
        if (job->delivered >= (uint64_t)svc->max_deliver) {
            dead_letter(f, job, JF_DL_MAX_DELIVERIES, error);
            return;
        }
        int64_t delay = jf_backoff_delay(svc->backoff_ms, svc->backoff_n, (unsigned)job->delivered,
                                         retry_after_ms, &f->rng);
        nak_msg(f, job->reply, delay);
        f->retried++;
        jf_log(JF_LOG_INFO, "job failed; retrying", JF_S("job_id", job->env->id),
               JF_S("service", svc->name), JF_S("subject", natsMsg_GetSubject(job->msg)),
               JF_I("seq", job->seq), JF_I("attempt", job->delivered), JF_I("delay_ms", delay),
               JF_S("error", error));
        finish_job(job);
        return;
    }
}

const jf_envelope *jf_job_envelope(const jf_job *job)
{
    return job->env;
}

const void *jf_job_body(const jf_job *job, size_t *len)
{
    *len = (size_t)natsMsg_GetDataLength(job->msg);
    return natsMsg_GetData(job->msg);
}

unsigned jf_job_attempt(const jf_job *job)
{
    return (unsigned)job->delivered;
}

void **jf_job_slot(jf_job *job)
{
    return &job->slot;
}

static void start_job(jf_fleet *f, durable *d, natsMsg *m)
{
    jsMsgMetaData *meta = NULL;
    jf_error err;

    if (natsMsg_GetMetaData(&meta, m) != NATS_OK) {
        /* Not a JetStream delivery (no ack subject): nothing to settle. */
        jf_log(JF_LOG_ERROR, "message without JetStream metadata dropped",
               JF_S("subject", natsMsg_GetSubject(m)), JF_S("durable", d->name));
        natsMsg_Destroy(m);
        return;
    }
    jf_job *job = calloc(1, sizeof *job);
    if (job == NULL) {
        jsMsgMetaData_Destroy(meta);
        nak_msg(f, natsMsg_GetReply(m), 1000);
        natsMsg_Destroy(m);
        return;
    }
    job->f = f;
    job->d = d;
    job->msg = m;
    job->reply = natsMsg_GetReply(m);
    job->seq = meta->Sequence.Stream;
    job->delivered = meta->NumDelivered;
    d->backlog = (int64_t)meta->NumPending;
    d->busy = d->backlog > 0;
    snprintf(job->stream, sizeof job->stream, "%s", meta->Stream ? meta->Stream : "");
    jsMsgMetaData_Destroy(meta);
    job->progress_ms = now_ms();
    job->next = &f->jobs;
    job->prev = f->jobs.prev;
    f->jobs.prev->next = job;
    f->jobs.prev = job;
    d->in_flight++;
    if (++f->in_flight > f->peak)
        f->peak = f->in_flight;

    const service_rt *svc = d->svc;
    if (jf_envelope_parse(&job->env, natsMsg_GetData(m), (size_t)natsMsg_GetDataLength(m),
                          natsMsg_GetSubject(m), (size_t)f->max_payload, &err) != JF_OK) {
        dead_letter(f, job, JF_DL_INVALID, err.msg);
        return;
    }
    if (job->env->has_deadline && job->env->deadline_ms <= job->progress_ms) {
        char when[40], msg[96];
        jf_rfc3339_format(when, sizeof when, job->env->deadline_ms);
        snprintf(msg, sizeof msg, "deadline %s has passed", when);
        dead_letter(f, job, JF_DL_EXPIRED, msg);
        return;
    }
    if (job->delivered > (uint64_t)svc->cfg->max_deliver) {
        /* Earlier deliveries ended without an outcome (a consumer died
         * mid-job): they were attempts all the same. */
        char msg[128];
        snprintf(msg, sizeof msg, "delivered %" PRIu64 " times, max_deliver is %d", job->delivered,
                 svc->cfg->max_deliver);
        dead_letter(f, job, JF_DL_MAX_DELIVERIES, msg);
        return;
    }
    job->running = true;
    svc->ops->start(svc->impl, job);
}

/* ---- pulls ----------------------------------------------------------- */

static pull *find_pull(durable *d, uint64_t id)
{
    for (int i = 0; i < d->npulls; i++)
        if (d->pulls[i].id == id)
            return &d->pulls[i];
    return NULL;
}

static void close_pull(jf_fleet *f, durable *d, pull *p)
{
    d->requested -= p->remaining;
    f->requested -= p->remaining;
    natsSubscription_Unsubscribe(p->sub);
    natsSubscription_Destroy(p->sub);
    *p = d->pulls[--d->npulls];
    f->dirty = true;
}

static void close_all_pulls(jf_fleet *f)
{
    for (int i = 0; i < f->ndurables; i++)
        while (f->durables[i].npulls > 0)
            close_pull(f, &f->durables[i], &f->durables[i].pulls[0]);
}

static bool send_pull(jf_fleet *f, durable *d, int batch)
{
    char subj[192], req[160];
    natsSubscription *sub = NULL;
    int64_t expires_ms = f->cfg->consumer.pull_expires_ms;
    pull_closure *c = malloc(sizeof *c);
    if (c == NULL)
        return false;
    c->f = f;
    c->didx = d->idx;
    c->id = ++f->next_pull_id;
    snprintf(subj, sizeof subj, "%s.p.%" PRIu64, f->inbox, c->id);

    natsStatus s = natsConnection_Subscribe(&sub, f->nc, subj, on_pull_msg, c);
    if (s != NATS_OK) {
        free(c);
        jf_log(JF_LOG_WARN, "cannot open a pull", JF_S("durable", d->name),
               JF_S("error", natsStatus_GetText(s)));
        d->hold_until_ms = now_ms() + 1000;
        return false;
    }
    natsSubscription_SetOnCompleteCB(sub, free_closure, c);
    /* Heartbeats tell a quiet pull from a lost one (missing durable,
     * restarted server): the server wants them under half of expires. */
    int64_t hb_ms = expires_ms >= 2000 ? expires_ms / 4 : 0;
    if (hb_ms > 0)
        snprintf(req, sizeof req, "{\"batch\":%d,\"expires\":%" PRId64 ",\"idle_heartbeat\":%" PRId64 "}",
                 batch, expires_ms * 1000000, hb_ms * 1000000);
    else
        snprintf(req, sizeof req, "{\"batch\":%d,\"expires\":%" PRId64 "}", batch,
                 expires_ms * 1000000);
    s = natsConnection_PublishRequestString(f->nc, d->next_subject, subj, req);
    if (s != NATS_OK) {
        natsSubscription_Unsubscribe(sub);
        natsSubscription_Destroy(sub);
        d->hold_until_ms = now_ms() + 1000;
        return false;
    }
    pull *p = &d->pulls[d->npulls++];
    p->id = c->id;
    p->batch = batch;
    p->remaining = batch;
    p->last_ms = now_ms();
    p->sub = sub;
    d->requested += batch;
    f->requested += batch;
    return true;
}

/* Shares capacity as the file comment says, then opens pulls where a
 * durable is below its share. Called once per loop iteration when
 * something changed. */
static void schedule(jf_fleet *f)
{
    const jf_consumer_config *cc = &f->cfg->consumer;
    if (f->stopping)
        return;
    int idle = 0, wsum = 0;
    for (int i = 0; i < f->ndurables; i++) {
        if (f->durables[i].busy)
            wsum += f->durables[i].weight;
        else
            idle++;
    }
    int cap_busy = cc->max_in_flight - idle;
    int64_t now = now_ms();

    /* Priority-major order: when room is short, high pulls first. */
    for (int k = 0; k < f->ndurables; k++) {
        durable *d = &f->durables[(k % f->nservices) * JF_PRIO_COUNT + k / f->nservices];
        if (d->hold_until_ms > now)
            continue;
        int target = 1;
        if (d->busy && wsum > 0) {
            target = (int)((int64_t)cap_busy * d->weight / wsum);
            if (target < 1)
                target = 1;
        }
        for (;;) {
            int want = d->npulls == 0 ? 1 : 0; /* an idle durable's probe */
            if (d->busy) {
                /* Its share, but no more than the backlog still
                 * unrequested. */
                int share = target - d->in_flight - d->requested;
                int64_t unrequested = d->backlog - d->requested;
                if (share > unrequested)
                    share = unrequested > 0 ? (int)unrequested : 0;
                if (share > want)
                    want = share;
            }
            int room = cc->max_in_flight - f->in_flight - f->requested;
            if (want > room)
                want = room;
            if (want > cc->pull_batch)
                want = cc->pull_batch;
            if (want <= 0 || d->npulls >= cc->pulls || d->npulls >= MAX_PULLS)
                break;
            /* Avoid a stream of tiny pulls while a busy durable still has
             * some open: wait until a quarter of the share is free. */
            int min_batch = target / 4 > cc->pull_batch ? cc->pull_batch : target / 4;
            if (d->npulls > 0 && want < min_batch)
                break;
            if (!send_pull(f, d, want))
                break;
        }
    }
}

/* Runs on libuv's thread pool: the JetStream API calls block, and the
 * loop must keep acking and heartbeating meanwhile. Touches only the
 * thread-safe jsCtx, the read-only config and this durable's work fields. */
static void reprovision_work(uv_work_t *w)
{
    durable *d = w->data;
    jf_fleet *f = d->f;
    d->work_status = JF_OK;
    if (f->provision)
        d->work_status = jf_provision_streams(f->js, f->cfg, true, &d->work_err);
    if (d->work_status == JF_OK)
        d->work_status =
            jf_provision_durable(f->js, f->cfg, d->svc->cfg, d->prio, f->provision, &d->work_err);
}

static void reprovision_done(uv_work_t *w, int status)
{
    durable *d = w->data;
    d->reprovisioning = false;
    d->silent = 0;
    d->f->dirty = true;
    if (d->work_status == JF_OK)
        jf_log(JF_LOG_INFO, "durable checked after silent pulls", JF_S("durable", d->name));
    else
        jf_log(JF_LOG_ERROR, "durable unavailable", JF_S("durable", d->name),
               JF_S("error", d->work_err.msg));
}

static void handle_status(jf_fleet *f, durable *d, pull *p, const char *status, natsMsg *m)
{
    const char *desc = NULL;
    natsMsgHeader_Get(m, "Description", &desc);
    if (strcmp(status, "100") == 0) {
        if (p != NULL)
            p->last_ms = now_ms();
        d->silent = 0;
        return;
    }
    d->silent = 0;
    if (p == NULL)
        return;
    if (strcmp(status, "408") == 0 || strcmp(status, "404") == 0) {
        /* Expired: whatever it did not bring is no longer coming. */
        if (p->remaining == p->batch) {
            d->busy = false;
            d->backlog = 0;
        }
        close_pull(f, d, p);
        return;
    }
    /* 409 and anything else closes the pull; pause this durable briefly so
     * a persistent refusal does not become a busy loop. */
    jf_log(strcmp(status, "409") == 0 ? JF_LOG_DEBUG : JF_LOG_WARN, "pull ended by the server",
           JF_S("durable", d->name), JF_S("status", status), JF_S("description", desc));
    if (desc != NULL && strstr(desc, "Consumer Deleted") != NULL)
        d->silent = 2; /* triggers re-provisioning on the next tick */
    d->hold_until_ms = now_ms() + STATUS_HOLD_MS;
    close_pull(f, d, p);
}

static void handle_pull_event(jf_fleet *f, event *ev)
{
    durable *d = &f->durables[ev->didx];
    natsMsg *m = ev->msg;
    pull *p = find_pull(d, ev->id);
    const char *status = NULL;

    f->dirty = true;
    if (natsMsg_GetDataLength(m) == 0 && natsMsg_GetReply(m) == NULL &&
        natsMsgHeader_Get(m, "Status", &status) == NATS_OK && status != NULL) {
        handle_status(f, d, p, status, m);
        natsMsg_Destroy(m);
        return;
    }
    if (p != NULL) {
        p->remaining--;
        d->requested--;
        f->requested--;
        p->last_ms = now_ms();
        d->silent = 0;
        if (p->remaining == 0)
            close_pull(f, d, p);
    } else {
        /* A pull we had given up on (silent, or cut by a reconnect) still
         * delivered. Take the job when there is room; otherwise hand it
         * back at once rather than let it wait for ack_wait. */
        f->stray++;
        if (f->stopping || f->in_flight + f->requested >= f->cfg->consumer.max_in_flight) {
            nak_msg(f, natsMsg_GetReply(m), 0);
            natsMsg_Destroy(m);
            return;
        }
    }
    if (f->stopping) {
        nak_msg(f, natsMsg_GetReply(m), 0);
        f->nacked_on_stop++;
        natsMsg_Destroy(m);
        return;
    }
    start_job(f, d, m);
}

static void drain_events(jf_fleet *f)
{
    pthread_mutex_lock(&f->mu);
    evqueue t = f->q;
    f->q = f->batch;
    f->batch = t;
    pthread_mutex_unlock(&f->mu);

    for (size_t i = 0; i < f->batch.len; i++) {
        event *ev = &f->batch.v[i];
        switch (ev->kind) {
        case EV_PULL:
            handle_pull_event(f, ev);
            break;
        case EV_DLACK:
            on_dl_ack_event(f, ev->id, ev->msg);
            natsMsg_Destroy(ev->msg);
            break;
        case EV_RECONNECTED:
            /* Pull requests may have died with the old connection; start
             * afresh (late deliveries on old pulls are handled as strays). */
            close_all_pulls(f);
            break;
        }
    }
    f->batch.len = 0;
}

static void on_async(uv_async_t *a)
{
    drain_events(a->data);
}

/* ---- timers, signals, shutdown -------------------------------------- */

static void stop_loop(jf_fleet *f);

static void cancel_all_jobs(jf_fleet *f)
{
    jf_job *j = f->jobs.next;
    while (j != &f->jobs) {
        jf_job *next = j->next;
        if (j->running) {
            j->running = false;
            j->d->svc->ops->cancel(j->d->svc->impl, j);
        }
        /* Running or still awaiting its dead-letter PubAck: hand it back
         * now (a repeated dead letter is stored once, by its Nats-Msg-Id). */
        nak_msg(f, j->reply, 0);
        f->nacked_on_stop++;
        finish_job(j);
        j = next;
    }
}

static void maybe_finish_stop(jf_fleet *f)
{
    if (!f->stopping || f->done)
        return;
    int open = 0;
    for (int i = 0; i < f->ndurables; i++)
        open += f->durables[i].npulls;
    if (f->grace_over) {
        cancel_all_jobs(f);
        close_all_pulls(f);
        open = 0;
    }
    if (f->in_flight == 0 && open == 0)
        stop_loop(f);
}

static void on_prepare(uv_prepare_t *h)
{
    jf_fleet *f = h->data;
    if (f->dirty) {
        f->dirty = false;
        schedule(f);
    }
    maybe_finish_stop(f);
}

static void on_tick(uv_timer_t *t)
{
    jf_fleet *f = t->data;
    int64_t now = now_ms();
    int64_t resend_after = f->cfg->nats.request_timeout_ms;

    for (jf_job *j = f->jobs.next; j != &f->jobs; j = j->next) {
        if (j->settling && now - j->dl_sent_ms >= resend_after) {
            log_job(JF_LOG_WARN, "no PubAck for dead letter; publishing again", j, "error",
                    j->error);
            send_dead_letter(f, j);
        }
        /* In-progress heartbeats keep the server from redelivering a job
         * that is still being worked on. */
        int64_t ack_wait = j->d->svc->cfg->ack_wait_ms;
        if (now - j->progress_ms >= ack_wait / 2) {
            publish_ack(f, j->reply, "+WPI");
            j->progress_ms = now;
        }
    }

    int64_t silence = f->cfg->consumer.pull_expires_ms + 3000;
    for (int i = 0; i < f->ndurables; i++) {
        durable *d = &f->durables[i];
        for (int k = 0; k < d->npulls;) {
            if (now - d->pulls[k].last_ms > silence) {
                d->silent++;
                close_pull(f, d, &d->pulls[k]);
                continue;
            }
            k++;
        }
        if (d->silent >= 2 && !d->reprovisioning && !f->stopping) {
            /* No answer at all, not even a timeout: the durable or the
             * stream is likely gone. Check (and re-create) it. */
            jf_log(JF_LOG_WARN, "pulls get no answer; checking the durable",
                   JF_S("durable", d->name), JF_I("silent_pulls", d->silent));
            d->reprovisioning = true;
            d->work.data = d;
            uv_queue_work(&f->loop, &d->work, reprovision_work, reprovision_done);
        }
    }
    f->dirty = true;
}

static void log_stats(jf_fleet *f, const char *msg)
{
    int open = 0;
    for (int i = 0; i < f->ndurables; i++)
        open += f->durables[i].npulls;
    jf_log(JF_LOG_INFO, msg, JF_I("in_flight", f->in_flight), JF_I("peak_in_flight", f->peak),
           JF_I("max_in_flight", f->cfg->consumer.max_in_flight), JF_I("requested", f->requested),
           JF_I("open_pulls", open), JF_I("acked", f->acked), JF_I("dead", f->dead),
           JF_I("retried", f->retried), JF_I("nacked_on_stop", f->nacked_on_stop),
           JF_I("stray", f->stray));
}

static void on_stats(uv_timer_t *t)
{
    log_stats(t->data, "stats");
}

static void on_grace(uv_timer_t *t)
{
    jf_fleet *f = t->data;
    if (f->in_flight > 0)
        jf_log(JF_LOG_WARN, "shutdown grace over; handing back unfinished jobs",
               JF_I("in_flight", f->in_flight));
    f->grace_over = true;
    maybe_finish_stop(f);
}

static void on_signal(uv_signal_t *h, int signum)
{
    jf_fleet *f = h->data;
    if (f->stopping) {
        /* A second signal: do not wait any longer. */
        f->grace_over = true;
        maybe_finish_stop(f);
        return;
    }
    f->stopping = true;
    jf_log(JF_LOG_INFO, "shutting down", JF_S("signal", signum == SIGTERM ? "SIGTERM" : "SIGINT"),
           JF_I("in_flight", f->in_flight), JF_I("grace_ms", f->cfg->consumer.shutdown_grace_ms));
    uv_timer_start(&f->grace, on_grace, (uint64_t)f->cfg->consumer.shutdown_grace_ms, 0);
    maybe_finish_stop(f);
}

static void stop_loop(jf_fleet *f)
{
    f->done = true;
    uv_stop(&f->loop);
}

/* ---- life cycle ------------------------------------------------------ */

jf_status jf_fleet_create(jf_fleet **out, const jf_fleet_options *opts, jf_error *err)
{
    const jf_config *cfg = opts->cfg;
    jf_status st = JF_OK;
    jf_fleet *f = calloc(1, sizeof *f);
    if (f == NULL) {
        jf_error_set(err, "out of memory");
        return JF_ERR_NOMEM;
    }
    f->cfg = cfg;
    f->provision = opts->provision;
    f->jobs.next = f->jobs.prev = &f->jobs;
    pthread_mutex_init(&f->mu, NULL);
    jf_rng_seed(&f->rng);

    /* Which services: all, or those named with --service. */
    for (size_t i = 0; i < cfg->nservices; i++) {
        bool wanted = opts->services == NULL;
        for (const char *const *n = opts->services; n && *n; n++)
            wanted = wanted || strcmp(*n, cfg->services[i].name) == 0;
        if (!wanted)
            continue;
        service_rt *s = &f->services[f->nservices];
        s->cfg = &cfg->services[i];
        s->ops = jf_handler_for_kind(s->cfg->kind);
        if (s->ops == NULL) {
            jf_error_set(err, "service %s: this build has no handler for its kind", s->cfg->name);
            st = JF_ERR_INVALID;
            goto fail;
        }
        f->nservices++;
    }
    for (const char *const *n = opts->services; n && *n; n++) {
        if (jf_config_service(cfg, *n) == NULL) {
            jf_error_set(err, "--service %s: no [service.%s] section in the config", *n, *n);
            st = JF_ERR_INVALID;
            goto fail;
        }
    }
    if (f->nservices == 0) {
        jf_error_set(err, "no services to serve: add a [service.NAME] section to the config");
        st = JF_ERR_INVALID;
        goto fail;
    }

    if (uv_loop_init(&f->loop) != 0) {
        jf_error_set(err, "cannot create the event loop");
        st = JF_ERR_IO;
        goto fail;
    }
    f->loop.data = f;
    for (int i = 0; i < f->nservices; i++) {
        service_rt *s = &f->services[i];
        st = s->ops->create(&s->impl, &f->loop, s->cfg, err);
        if (st != JF_OK)
            goto fail;
    }

    jf_nats_callbacks cbs = {.on_reconnected = on_reconnected, .closure = f, .global_delivery = true};
    st = jf_nats_connect(&f->nc, cfg, "jetfleet-consumer", &cbs, err);
    if (st != JF_OK)
        goto fail;
    f->max_payload = natsConnection_GetMaxPayload(f->nc);
    jsOptions jo;
    jsOptions_Init(&jo);
    jo.Wait = cfg->nats.request_timeout_ms;
    if (natsConnection_JetStream(&f->js, f->nc, &jo) != NATS_OK) {
        jf_error_set(err, "cannot create a JetStream context");
        st = JF_ERR_NATS;
        goto fail;
    }
    st = opts->provision ? jf_provision_streams(f->js, cfg, true, err)
                         : jf_verify_streams(f->js, cfg, true, err);
    if (st != JF_OK)
        goto fail;

    f->ndurables = f->nservices * JF_PRIO_COUNT;
    f->durables = calloc((size_t)f->ndurables, sizeof *f->durables);
    if (f->durables == NULL) {
        jf_error_set(err, "out of memory");
        st = JF_ERR_NOMEM;
        goto fail;
    }
    for (int i = 0; i < f->nservices; i++) {
        for (int p = 0; p < JF_PRIO_COUNT; p++) {
            durable *d = &f->durables[i * JF_PRIO_COUNT + p];
            d->f = f;
            d->idx = i * JF_PRIO_COUNT + p;
            d->svc = &f->services[i];
            d->prio = (jf_priority)p;
            d->weight = cfg->consumer.priority_weights[p];
            d->busy = false; /* its probe finds out */
            d->backlog = 0;
            jf_durable_name(d->name, sizeof d->name, d->svc->cfg->name, d->prio);
            snprintf(d->next_subject, sizeof d->next_subject, "$JS.API.CONSUMER.MSG.NEXT.%s.%s",
                     cfg->stream.name, d->name);
            st = jf_provision_durable(f->js, cfg, d->svc->cfg, d->prio, opts->provision, err);
            if (st != JF_OK)
                goto fail;
        }
    }

    natsInbox *inbox = NULL;
    if (natsInbox_Create(&inbox) != NATS_OK) {
        jf_error_set(err, "cannot create an inbox");
        st = JF_ERR_NATS;
        goto fail;
    }
    snprintf(f->inbox, sizeof f->inbox, "%s", (const char *)inbox);
    natsInbox_Destroy(inbox);
    char dlsubj[192];
    snprintf(dlsubj, sizeof dlsubj, "%s.d.*", f->inbox);
    if (natsConnection_Subscribe(&f->dl_sub, f->nc, dlsubj, on_dl_ack, f) != NATS_OK) {
        jf_error_set(err, "cannot subscribe to %s", dlsubj);
        st = JF_ERR_NATS;
        goto fail;
    }
    *out = f;
    return JF_OK;

fail:
    jf_fleet_destroy(f);
    return st;
}

jf_status jf_fleet_run(jf_fleet *f, jf_error *err)
{
    const jf_config *cfg = f->cfg;
    int64_t min_ack_wait = INT64_MAX;
    for (int i = 0; i < f->nservices; i++)
        if (f->services[i].cfg->ack_wait_ms < min_ack_wait)
            min_ack_wait = f->services[i].cfg->ack_wait_ms;
    /* Often enough to heartbeat at half of the shortest ack_wait. */
    f->tick_ms = min_ack_wait / 4 < 250 ? min_ack_wait / 4 : 250;
    if (f->tick_ms < 10)
        f->tick_ms = 10;

    uv_async_init(&f->loop, &f->async, on_async);
    f->async.data = f;
    uv_prepare_init(&f->loop, &f->prepare);
    f->prepare.data = f;
    uv_prepare_start(&f->prepare, on_prepare);
    uv_timer_init(&f->loop, &f->tick);
    f->tick.data = f;
    uv_timer_start(&f->tick, on_tick, (uint64_t)f->tick_ms, (uint64_t)f->tick_ms);
    uv_timer_init(&f->loop, &f->stats);
    f->stats.data = f;
    if (cfg->consumer.stats_interval_ms > 0)
        uv_timer_start(&f->stats, on_stats, (uint64_t)cfg->consumer.stats_interval_ms,
                       (uint64_t)cfg->consumer.stats_interval_ms);
    uv_timer_init(&f->loop, &f->grace);
    f->grace.data = f;
    uv_signal_init(&f->loop, &f->sigterm);
    f->sigterm.data = f;
    uv_signal_start(&f->sigterm, on_signal, SIGTERM);
    uv_signal_init(&f->loop, &f->sigint);
    f->sigint.data = f;
    uv_signal_start(&f->sigint, on_signal, SIGINT);
    f->ready = true;

    schedule(f);
    jf_log(JF_LOG_INFO, "consumer ready", JF_I("services", f->nservices),
           JF_I("durables", f->ndurables), JF_I("max_in_flight", cfg->consumer.max_in_flight),
           JF_S("stream", cfg->stream.name));

    uv_run(&f->loop, UV_RUN_DEFAULT);

    /* Every job is settled or handed back. Make sure the acks are on the
     * wire before the connection goes. */
    close_all_pulls(f);
    natsStatus s = natsConnection_FlushTimeout(f->nc, cfg->nats.request_timeout_ms);
    log_stats(f, "consumer stopped");
    if (s != NATS_OK) {
        jf_error_set(err, "final flush to NATS failed: %s (unflushed acks are redelivered)",
                     natsStatus_GetText(s));
        return JF_ERR_NATS;
    }
    return JF_OK;
}

static void close_cb(uv_handle_t *h)
{
    (void)h;
}

void jf_fleet_destroy(jf_fleet *f)
{
    if (f == NULL)
        return;
    if (f->ready) {
        uv_handle_t *hs[] = {(uv_handle_t *)&f->async, (uv_handle_t *)&f->prepare,
                             (uv_handle_t *)&f->tick,  (uv_handle_t *)&f->stats,
                             (uv_handle_t *)&f->grace, (uv_handle_t *)&f->sigterm,
                             (uv_handle_t *)&f->sigint};
        for (size_t i = 0; i < sizeof hs / sizeof hs[0]; i++)
            if (!uv_is_closing(hs[i]))
                uv_close(hs[i], close_cb);
    }
    if (f->durables != NULL)
        close_all_pulls(f);
    /* Jobs still here (an error path) go back to the server. */
    while (f->jobs.next != &f->jobs) {
        jf_job *j = f->jobs.next;
        if (j->running)
            j->d->svc->ops->cancel(j->d->svc->impl, j);
        if (f->nc != NULL)
            nak_msg(f, j->reply, 0);
        finish_job(j);
    }
    natsSubscription_Destroy(f->dl_sub);
    if (f->nc != NULL) {
        natsConnection_Close(f->nc);
        natsConnection_Destroy(f->nc);
    }
    jsCtx_Destroy(f->js);
    for (int i = 0; i < f->nservices; i++)
        if (f->services[i].impl != NULL)
            f->services[i].ops->destroy(f->services[i].impl);
    if (f->loop.data == f) {
        /* Let closing handles (timers of cancelled jobs too) finish. */
        uv_run(&f->loop, UV_RUN_NOWAIT);
        while (uv_loop_close(&f->loop) == UV_EBUSY)
            uv_run(&f->loop, UV_RUN_ONCE);
    }
    /* Messages queued by NATS threads and never handled. */
    for (size_t i = 0; i < f->q.len; i++)
        natsMsg_Destroy(f->q.v[i].msg);
    free(f->q.v);
    free(f->batch.v);
    free(f->durables);
    pthread_mutex_destroy(&f->mu);
    free(f);
}
