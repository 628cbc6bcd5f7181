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
#include "fleet_int.h"

#include <inttypes.h>
#include <jansson.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

#include "jsmsg.h"
#include "log.h"
#include "nats_conn.h"
#include "provision.h"
#include "rfc3339.h"

#define STATUS_HOLD_MS 250 /* pause a durable's pulls after an odd status */

typedef struct pull_closure {
    jf_fleet *f;
    int didx;
    uint64_t id;
} pull_closure;

static int64_t now_ms(void)
{
    return jf_now_ms();
}

/* ---- NATS threads: hand everything to the loop ---------------------- */

static void push_event(jf_fleet *f, event ev)
{
    pthread_mutex_lock(&f->mu);
    if (f->closing) {
        /* The fleet is being torn down (its async handle may be closed):
         * the message is destroyed here, on the library's thread, while the
         * library still runs; the server redelivers it. */
        pthread_mutex_unlock(&f->mu);
        natsMsg_Destroy(ev.msg);
        return;
    }
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
    p->expires_ms = p->last_ms + expires_ms;
    p->sub = sub;
    d->requested += batch;
    f->requested += batch;
    return true;
}

int64_t jf_fleet_handback_delay(jf_fleet *f)
{
    if (!f->stopping)
        return 0;
    int64_t last = 0, now = now_ms();
    for (int i = 0; i < f->ndurables; i++)
        for (int k = 0; k < f->durables[i].npulls; k++)
            if (f->durables[i].pulls[k].expires_ms > last)
                last = f->durables[i].pulls[k].expires_ms;
    return last > now ? last - now + 100 : 0;
}

/* A service whose breaker is open is not pulled for: its jobs would only
 * wait, and the capacity serves the other services meanwhile. */
static bool paused(const durable *d, int64_t now)
{
    return jf_breaker_state_at(d->svc->breaker, now) == JF_BREAKER_OPEN;
}

/* Shares capacity as the file comment says, then opens pulls where a
 * durable is below its share. Called once per loop iteration when
 * something changed. */
static void schedule(jf_fleet *f)
{
    const jf_consumer_config *cc = &f->cfg->consumer;
    int64_t now = now_ms();
    if (f->stopping)
        return;
    /* While the ledger is unreachable nothing is pulled: no outcome could
     * be made durable. */
    if (f->ledger != NULL && !jf_ledger_available(f->ledger, now))
        return;
    int idle = 0, wsum = 0;
    for (int i = 0; i < f->ndurables; i++) {
        if (f->durables[i].busy && !paused(&f->durables[i], now))
            wsum += f->durables[i].weight;
        else
            idle++;
    }
    /* An idle durable's probe: a pull of 1 is used up by the first job
     * that arrives, and the next one waits for a new pull's round trip
     * (measured at 2,000 jobs/s: p50 publish->ack 3.9 ms vs 2.1 ms with
     * probes of 16, and a pull request per 2.6 jobs). A few slots per
     * idle durable, an eighth of the process's capacity in all at most. */
    int probe = cc->max_in_flight / (8 * f->ndurables);
    probe = probe < 1 ? 1 : probe > 16 ? 16 : probe;
    int cap_busy = cc->max_in_flight - idle * probe;

    /* Priority-major order: when room is short, high pulls first. */
    for (int k = 0; k < f->ndurables; k++) {
        durable *d = &f->durables[(k % f->nservices) * JF_PRIO_COUNT + k / f->nservices];
        if (d->hold_until_ms > now || paused(d, now))
            continue;
        int target = 1;
        if (d->busy && wsum > 0) {
            target = (int)((int64_t)cap_busy * d->weight / wsum);
            if (target < 1)
                target = 1;
        }
        for (;;) {
            int want = d->npulls == 0 ? probe : 0; /* an idle durable's probe */
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
    /* nats.c's thread-local error state of this libuv pool thread: the pool
     * outlives nats_Close, so only this call frees it (as in limits.c). */
    nats_ReleaseThreadMemory();
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
    jf_pull_status ps = jf_pull_status_classify(status, desc);
    if (ps == JF_PULL_HEARTBEAT) {
        if (p != NULL)
            p->last_ms = now_ms();
        d->silent = 0;
        return;
    }
    d->silent = 0;
    if (p == NULL)
        return;
    if (ps == JF_PULL_EXPIRED) {
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
    jf_log(ps == JF_PULL_OTHER ? JF_LOG_WARN : JF_LOG_DEBUG, "pull ended by the server",
           JF_S("durable", d->name), JF_S("status", status), JF_S("description", desc),
           JF_S("kind", jf_pull_status_name(ps)));
    if (ps == JF_PULL_CONSUMER_DELETED)
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
    /* Any answer to a pull (a job, a heartbeat, a timeout) shows the
     * durable is there and bound. */
    jf_metrics_set_durable(f->metrics, ev->didx, true);
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
            jf_job_nak(f, natsMsg_GetReply(m), jf_fleet_handback_delay(f));
            natsMsg_Destroy(m);
            return;
        }
    }
    if (f->stopping) {
        jf_job_nak(f, natsMsg_GetReply(m), jf_fleet_handback_delay(f));
        f->nacked_on_stop++;
        natsMsg_Destroy(m);
        return;
    }
    jf_job_start(f, d, m);
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
            jf_job_on_dl_ack(f, ev->id, ev->msg);
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

/* natsMsg_Destroy hands each message to nats.c's GC thread and wakes the
 * thread when it sleeps: destroyed one at a time between other work, every
 * job costs the process a futex wake-up and two context switches (measured:
 * the largest single cost of the noop path after envelope parsing).
 * Destroyed together once per loop iteration, a batch costs one. */
void jf_fleet_bury(jf_fleet *f, natsMsg *m)
{
    if (m == NULL)
        return;
    if (f->ngrave == f->capgrave) {
        size_t cap = f->capgrave ? f->capgrave * 2 : 256;
        natsMsg **v = realloc(f->grave, cap * sizeof *v);
        if (v == NULL) {
            natsMsg_Destroy(m);
            return;
        }
        f->grave = v;
        f->capgrave = cap;
    }
    f->grave[f->ngrave++] = m;
}

static void empty_grave(jf_fleet *f)
{
    for (size_t i = 0; i < f->ngrave; i++)
        natsMsg_Destroy(f->grave[i]);
    f->ngrave = 0;
}

static void on_async(uv_async_t *a)
{
    drain_events(a->data);
    empty_grave(a->data);
}

/* ---- timers, signals, shutdown -------------------------------------- */

static void stop_loop(jf_fleet *f);

static void cancel_all_jobs(jf_fleet *f)
{
    jf_job *j = f->jobs.next;
    while (j != &f->jobs) {
        jf_job *next = j->next;
        jf_job_hand_back(j);
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
    jf_metrics_in_flight(f->metrics, f->in_flight);
    empty_grave(f); /* jobs settled by timers, curl, libpq callbacks */
}

/* Breakers change state with time alone (open -> half-open): look at each
 * service, log transitions, and let held jobs go once calls may flow. */
static void watch_breakers(jf_fleet *f, int64_t now)
{
    for (int i = 0; i < f->nservices; i++) {
        service_rt *s = &f->services[i];
        jf_breaker_state st = jf_breaker_state_at(s->breaker, now);
        const char *name = jf_breaker_state_name(st);
        if (s->last_state != name) {
            if (st == JF_BREAKER_OPEN)
                f->trips++;
            jf_log(st == JF_BREAKER_OPEN ? JF_LOG_WARN : JF_LOG_INFO, "breaker state",
                   JF_S("service", s->cfg->name), JF_S("state", name),
                   JF_I("trips", jf_breaker_trips(s->breaker)));
            s->last_state = name;
            f->dirty = true;
        }
        if (st != JF_BREAKER_OPEN && s->waiting != NULL)
            jf_job_release_waiting(f, s);
        jf_metrics_breaker(f->metrics, i, st, jf_breaker_trips(s->breaker));
    }
}

static void on_tick(uv_timer_t *t)
{
    jf_fleet *f = t->data;
    int64_t now = now_ms();

    jf_job_tick(f, now);
    watch_breakers(f, now);
    jf_metrics_set_nats(f->metrics, natsConnection_Status(f->nc) == NATS_CONN_STATUS_CONNECTED);
    if (f->ledger != NULL)
        jf_metrics_set_ledger(f->metrics, jf_ledger_available(f->ledger, now));

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
        if (d->silent >= 2)
            jf_metrics_set_durable(f->metrics, d->idx, false);
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
           JF_I("retried", f->retried), JF_I("deferred", f->deferred),
           JF_I("skipped", f->skipped), JF_I("breaker_trips", f->trips),
           JF_I("nacked_on_stop", f->nacked_on_stop), JF_I("stray", f->stray));
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
    jf_metrics_set_running(f->metrics, false);
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
    f->stop_requested = opts->stop_requested;
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
    /* Listening first: /healthz answers (and /readyz says "starting") while
     * the connection and provisioning below may take a while. */
    if (cfg->consumer.metrics_listen != NULL) {
        const char *names[JF_MAX_SERVICES];
        for (int i = 0; i < f->nservices; i++)
            names[i] = f->services[i].cfg->name;
        st = jf_metrics_create(&f->metrics, cfg->consumer.metrics_listen, names, f->nservices,
                               cfg->consumer.max_in_flight,
                               cfg->postgres_dsn != NULL && cfg->postgres_dsn[0] != '\0', err);
        if (st != JF_OK)
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
        if (st == JF_OK)
            st = jf_breaker_create(&s->breaker, &s->cfg->breaker, err);
        if (st != JF_OK)
            goto fail;
        s->last_state = jf_breaker_state_name(JF_BREAKER_CLOSED);
    }
    if (cfg->postgres_dsn != NULL && cfg->postgres_dsn[0] != '\0') {
        st = jf_ledger_create(&f->ledger, &f->loop, cfg, err);
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

    /* Fleet-wide limits live in a KV bucket; only services that have them
     * pay for it. */
    bool limited = false;
    for (int i = 0; i < f->nservices; i++) {
        const jf_service_config *sc = f->services[i].cfg;
        limited = limited || sc->rate.period_ms > 0 || sc->kind != JF_KIND_NOOP;
    }
    if (limited) {
        char host[64] = "host";
        gethostname(host, sizeof host - 1);
        snprintf(f->process_id, sizeof f->process_id, "%s-%d-%08x", host, (int)getpid(),
                 (unsigned)jf_rng_next(&f->rng));
        st = jf_limits_create(&f->limits, &f->loop, f->js, cfg, f->process_id, err);
        if (st != JF_OK)
            goto fail;
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
    jf_metrics_set_nats(f->metrics, natsConnection_Status(f->nc) == NATS_CONN_STATUS_CONNECTED);
    if (f->ledger != NULL)
        jf_metrics_set_ledger(f->metrics, jf_ledger_available(f->ledger, now_ms()));
    jf_metrics_set_running(f->metrics, true);

    if (f->stop_requested != NULL && *f->stop_requested) {
        /* SIGTERM came while starting: nothing is in flight, just stop. */
        jf_log0(JF_LOG_INFO, "stop requested during start-up");
        stop_loop(f);
    }
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
    /* The metrics server reads only its own atomics; stop it first all the
     * same, so nothing answers for a fleet being torn down. */
    jf_metrics_destroy(f->metrics);
    f->metrics = NULL;
    pthread_mutex_lock(&f->mu);
    f->closing = true;
    pthread_mutex_unlock(&f->mu);
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
    if (f->nc != NULL)
        jf_job_free_all(f);
    /* The ledger and the limits answer what is still pending (jobs already
     * handed back only wait for those answers to be freed); the limits give
     * this process's fleet-wide slots back while NATS is still there. */
    jf_ledger_destroy(f->ledger);
    jf_limits_destroy(f->limits);
    natsSubscription_Destroy(f->dl_sub);
    if (f->nc != NULL) {
        natsConnection_Close(f->nc);
        natsConnection_Destroy(f->nc);
    }
    jsCtx_Destroy(f->js);
    for (int i = 0; i < f->nservices; i++) {
        if (f->services[i].impl != NULL)
            f->services[i].ops->destroy(f->services[i].impl);
        jf_breaker_destroy(f->services[i].breaker);
    }
    /* Let closing handles (timers of cancelled jobs too) finish; nats.c's
     * threads no longer touch the loop (f->closing). */
    if (f->loop.data == f) {
        uv_run(&f->loop, UV_RUN_NOWAIT);
        while (uv_loop_close(&f->loop) == UV_EBUSY)
            uv_run(&f->loop, UV_RUN_ONCE);
    }
    /* Messages queued and never handled, and settled ones not yet
     * destroyed, go while nats.c still runs: natsMsg_Destroy hands them to
     * its garbage collector thread, which nats_CloseAndWait ends (after it
     * they would leak). */
    pthread_mutex_lock(&f->mu);
    for (size_t i = 0; i < f->q.len; i++)
        natsMsg_Destroy(f->q.v[i].msg);
    f->q.len = 0;
    pthread_mutex_unlock(&f->mu);
    empty_grave(f);
    /* Wait for nats.c's threads to end (this process has one fleet, and
     * the library is not used after it). */
    nats_CloseAndWait(2000);
    free(f->grave);
    free(f->q.v);
    free(f->batch.v);
    free(f->durables);
    pthread_mutex_destroy(&f->mu);
    free(f);
}
