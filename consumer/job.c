/* job.c — one job's way through the consumer, from delivery to settlement.
 *
 *   delivery ─ invalid envelope ──────────────────────────► dead letter "invalid"
 *            ─ deadline passed ────────────────────────────► dead letter "expired"
 *            ─ breaker open ─► held (or NAKed with a delay when the ledger counts
 *                              attempts) until it half-opens
 *            ─ fleet-wide in-flight slot ─► breaker permit ─► ledger row claimed
 *              (already succeeded/dead: ack, no call) ─► rate slot (waits for its
 *              time; taken last so nothing slow sits between slot and call)
 *              ─► handler ─► outcome
 *   outcome OK ─────────► ledger "succeeded" ─► +ACK
 *           RETRY ──────► ledger "running" ───► -NAK with backoff, or, on the last
 *                                               attempt, dead letter "max_deliveries"
 *           PERMANENT ──► dead letter "permanent"
 *   dead letter ─► PubAck from JOBS_DLQ ─► ledger "dead" ─► +ACK
 *
 * Nothing is acknowledged before what it depends on is durable (the dead
 * letter, the ledger row). Waiting for breaker, limits or ledger is not an
 * attempt: the attempt count is the ledger's when there is one, else the
 * server's delivery count (and jobs are then held, not NAKed, while they
 * wait, so the count does not grow). Async callbacks hold a reference on
 * the job (refs), so a job settled or handed back while one is due stays
 * allocated until it arrives. */
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fleet_int.h"
#include "jsmsg.h"
#include "log.h"
#include "rfc3339.h"

#define LEDGER_RETRY_MS 1000

static int64_t now_ms(void)
{
    return jf_now_ms();
}

/* jetfleet_jobs_total for the durable's service and priority (known even
 * when the envelope is not). */
static void count(const jf_job *job, jf_metrics_outcome o)
{
    jf_metrics_job(job->f->metrics, job->d->idx / JF_PRIO_COUNT, job->d->prio, o);
}

/* snprintf(dst, cap, "%s", src) without the formatting machinery (this
 * runs a few times per job); NULL copies as "". */
static void copy_text(char *dst, size_t cap, const char *src)
{
    size_t n = src != NULL ? strnlen(src, cap - 1) : 0;
    memcpy(dst, src != NULL ? src : "", n);
    dst[n] = '\0';
}

static void advance(jf_job *job);
static void ask_rate(jf_job *job);
static void dead_letter(jf_job *job, jf_dl_reason reason, const char *error);

/* ---- acks ------------------------------------------------------------ */

/* The stream sequence in an ack subject; 0 when it is not one. */
static uint64_t ack_seq(const char *reply)
{
    jf_ack_meta meta;
    jf_error err;
    return jf_ack_meta_parse(&meta, reply, strlen(reply), &err) == JF_OK ? meta.stream_seq : 0;
}

static void publish_ack(jf_fleet *f, const char *reply, const char *body)
{
    natsStatus s = natsConnection_PublishString(f->nc, reply, body);
    /* Only the ack subject is known here (jf_job_nak serves stray messages
     * too): its stream sequence names the job's message. */
    if (s != NATS_OK)
        jf_log(JF_LOG_WARN, "ack not sent; the server will redeliver", JF_S("ack", body),
               JF_I("seq", ack_seq(reply)), JF_S("error", natsStatus_GetText(s)));
}

void jf_job_nak(jf_fleet *f, const char *reply, int64_t delay_ms)
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

/* ---- life cycle -------------------------------------------------------- */

static void free_timer_cb(uv_handle_t *h)
{
    free(h);
}

static void stop_timer(jf_job *job)
{
    if (job->timer != NULL) {
        uv_timer_stop(job->timer);
        uv_close((uv_handle_t *)job->timer, free_timer_cb);
        job->timer = NULL;
    }
}

static void free_job(jf_job *job)
{
    jf_envelope_destroy(job->env);
    natsMsg_Destroy(job->dl_msg);
    jf_fleet_bury(job->f, job->msg);
    json_decref(job->result);
    free(job);
}

static void unref(jf_job *job)
{
    if (--job->refs == 0 && job->finished)
        free_job(job);
}

static void release_inflight(jf_job *job)
{
    if (job->has_inflight) {
        job->has_inflight = false;
        jf_limits_release_inflight(job->f->limits, job->d->svc->cfg);
    }
}

static void drop_permit(jf_job *job)
{
    if (job->has_permit) {
        job->has_permit = false;
        jf_breaker_cancel(job->d->svc->breaker);
    }
}

/* Unlinks a settled job; its memory goes once no callback is due. */
static void finish(jf_job *job)
{
    jf_fleet *f = job->f;
    stop_timer(job);
    release_inflight(job);
    drop_permit(job);
    job->state = JS_DONE;
    job->finished = true;
    job->prev->next = job->next;
    job->next->prev = job->prev;
    job->d->in_flight--;
    f->in_flight--;
    f->dirty = true;
    if (job->refs == 0)
        free_job(job);
}

static void ack(jf_job *job)
{
    publish_ack(job->f, job->reply, "+ACK");
    finish(job);
}

static void log_job(jf_log_level lvl, const char *msg, const jf_job *job, const char *key,
                    const char *val)
{
    jf_log(lvl, msg, JF_S("job_id", job->env ? job->env->id : NULL),
           JF_S("service", job->d->svc->cfg->name), JF_S("subject", natsMsg_GetSubject(job->msg)),
           JF_I("seq", job->seq), JF_I("attempt", job->attempt), JF_S(key, val));
}

static void ledger_job(const jf_job *job, jf_ledger_job *lj)
{
    lj->job_id = job->env->id;
    lj->service = job->env->service;
    lj->priority = jf_priority_name(job->env->priority);
    lj->type = job->env->type;
    lj->tenant = job->env->tenant;
    lj->stream_seq = job->seq;
}

static void start_timer(jf_job *job, int64_t ms, uv_timer_cb cb)
{
    stop_timer(job);
    job->timer = malloc(sizeof *job->timer);
    if (job->timer == NULL) {
        /* Without a timer the job cannot wait: hand it back. */
        jf_job_nak(job->f, job->reply, 1000);
        finish(job);
        return;
    }
    uv_timer_init(&job->f->loop, job->timer);
    job->timer->data = job;
    /* The loop's cached time may be behind the wall clock the delay came
     * from: refresh it so a rate slot is never started early. */
    uv_update_time(&job->f->loop);
    uv_timer_start(job->timer, cb, (uint64_t)(ms > 0 ? ms : 0), 0);
}

/* ---- dead letters -------------------------------------------------------- */

/* Builds job->dl_msg. Without the body when the original, which fitted
 * max_payload alone, no longer fits with the dead-letter headers: a dead
 * letter that can never be stored would hold the job (and its in-flight
 * slot) forever. The original stays in the stream at the seq the headers
 * name, and the error says so. */
static jf_status build_dead_letter(jf_job *job, bool with_body, jf_error *err)
{
    jf_fleet *f = job->f;
    char reply[192], note[sizeof job->error + 192];
    const int len = natsMsg_GetDataLength(job->msg);
    const char *error = job->error;
    natsMsg *m = NULL;

    snprintf(reply, sizeof reply, "%s.d.%" PRIu64, f->inbox, job->dl_id);
    if (!with_body) {
        snprintf(note, sizeof note,
                 "%s [body of %d bytes left out: with the dead-letter headers it exceeds "
                 "max_payload; the original is %s seq %" PRIu64 "]",
                 job->error, len, job->stream, job->seq);
        error = note;
    }
    jf_dl_info info = {
        .reason = job->dl_reason,
        .error = error,
        .deliveries = job->attempt ? job->attempt : job->delivered,
        .stream = job->stream,
        .stream_seq = job->seq,
        .subject = natsMsg_GetSubject(job->msg),
        .failed_at_ms = now_ms(),
    };
    jf_status st = jf_dl_message(&m, &info, with_body ? natsMsg_GetData(job->msg) : NULL,
                                 with_body ? len : 0, reply, err);
    if (st == JF_OK && !with_body) {
        /* Tells tools (dlq redrive) that this body is not the job's. */
        char num[24];
        snprintf(num, sizeof num, "%d", len);
        if (natsMsgHeader_Set(m, "Jetfleet-Body-Omitted", num) != NATS_OK) {
            natsMsg_Destroy(m);
            jf_error_set(err, "dead letter for seq %" PRIu64 ": out of memory", job->seq);
            st = JF_ERR_NOMEM;
        }
    }
    if (st == JF_OK) {
        natsMsg_Destroy(job->dl_msg);
        job->dl_msg = m;
    }
    return st;
}

static void send_dead_letter(jf_job *job)
{
    jf_error err;
    natsStatus s = natsConnection_PublishMsg(job->f->nc, job->dl_msg);
    if (s == NATS_MAX_PAYLOAD && natsMsg_GetDataLength(job->dl_msg) > 0 &&
        build_dead_letter(job, false, &err) == JF_OK)
        s = natsConnection_PublishMsg(job->f->nc, job->dl_msg);
    job->dl_sent_ms = now_ms();
    if (s != NATS_OK)
        log_job(JF_LOG_WARN, "dead-letter publish failed; will retry", job, "error",
                natsStatus_GetText(s));
}

/* No heartbeat for (nearly) ack_wait: the process was paused or starved,
 * and the server may have given the job to another process. Our clock
 * starts after the server's, hence the margin. */
static bool lease_lost(jf_job *job, int64_t now)
{
    int64_t ack_wait = job->d->svc->cfg->ack_wait_ms;
    if (now - job->progress_ms >= ack_wait - ack_wait / 8)
        job->lease_lost = true;
    return job->lease_lost;
}

static void dead_letter(jf_job *job, jf_dl_reason reason, const char *error)
{
    jf_fleet *f = job->f;
    jf_error err;

    if (error != job->error)
        copy_text(job->error, sizeof job->error, error);
    if (lease_lost(job, now_ms())) {
        /* Another process may have dead-lettered it meanwhile, and once the
         * duplicate window has passed the server would store ours as a
         * second dead letter. Hand it back: its next delivery decides
         * again (the ledger, or the delivery count, knows the attempts). */
        log_job(JF_LOG_WARN, "held past ack_wait; handing the job back instead of dead-lettering",
                job, "error", job->error);
        jf_job_nak(f, job->reply, 0);
        finish(job);
        return;
    }
    job->state = JS_SETTLING;
    job->dl_reason = reason;
    job->dl_id = ++f->next_dl_id;
    if (build_dead_letter(job, true, &err) != JF_OK) {
        /* Cannot build it (out of memory): leave the job to redelivery
         * rather than lose it, and say so loudly. */
        log_job(JF_LOG_ERROR, "cannot dead-letter job; leaving it for redelivery", job, "error",
                err.msg);
        jf_job_nak(f, job->reply, 30000);
        finish(job);
        return;
    }
    send_dead_letter(job);
}

static void dead_done(jf_job *job)
{
    jf_fleet *f = job->f;
    f->dead++;
    jf_metrics_dead_letter(f->metrics, job->d->idx / JF_PRIO_COUNT, job->d->prio, job->dl_reason);
    jf_log(JF_LOG_WARN, "dead-lettered", JF_S("reason", jf_dl_reason_name(job->dl_reason)),
           JF_S("job_id", job->env ? job->env->id : NULL), JF_S("service", job->d->svc->cfg->name),
           JF_S("subject", natsMsg_GetSubject(job->msg)), JF_I("seq", job->seq),
           JF_I("deliveries", job->attempt ? job->attempt : job->delivered),
           JF_S("error", job->error));
    ack(job);
}

static void record_dead(jf_job *job);

static void record_dead_timer(uv_timer_t *t)
{
    jf_job *job = t->data;
    stop_timer(job);
    record_dead(job);
}

static void on_dead_recorded(void *arg, jf_status st, const char *error)
{
    jf_job *job = arg;
    if (!job->finished) {
        if (st == JF_OK) {
            dead_done(job);
        } else {
            log_job(JF_LOG_WARN, "ledger write failed; retrying before the ack", job, "error",
                    error);
            start_timer(job, LEDGER_RETRY_MS, record_dead_timer);
        }
    }
    unref(job);
}

/* The dead letter is stored; the ledger row says so before the ack. */
static void record_dead(jf_job *job)
{
    if (job->f->ledger == NULL || job->env == NULL) {
        dead_done(job);
        return;
    }
    jf_ledger_job lj;
    ledger_job(job, &lj);
    job->refs++;
    jf_ledger_finish(job->f->ledger, &lj, JF_LEDGER_DEAD, NULL, job->error, on_dead_recorded, job);
}

void jf_job_on_dl_ack(jf_fleet *f, uint64_t id, natsMsg *msg)
{
    jf_job *job = NULL;
    for (jf_job *j = f->jobs.next; j != &f->jobs; j = j->next) {
        if (j->state == JS_SETTLING && !j->dl_stored && j->dl_id == id) {
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
    job->dl_stored = true;
    record_dead(job);
}

/* ---- outcomes -------------------------------------------------------- */

static void retry_now(jf_job *job)
{
    jf_fleet *f = job->f;
    const jf_service_config *svc = job->d->svc->cfg;
    int64_t delay = jf_backoff_delay(svc->backoff_ms, svc->backoff_n, job->attempt,
                                     job->retry_after_ms, &f->rng);
    jf_job_nak(f, job->reply, delay);
    f->retried++;
    count(job, JF_MO_RETRIED);
    jf_log(JF_LOG_INFO, "job failed; retrying", JF_S("job_id", job->env->id),
           JF_S("service", svc->name), JF_S("subject", natsMsg_GetSubject(job->msg)),
           JF_I("seq", job->seq), JF_I("attempt", job->attempt), JF_I("delay_ms", delay),
           JF_S("error", job->error));
    finish(job);
}

static void record_outcome(jf_job *job);

static void record_outcome_timer(uv_timer_t *t)
{
    jf_job *job = t->data;
    stop_timer(job);
    record_outcome(job);
}

static void on_outcome_recorded(void *arg, jf_status st, const char *error)
{
    jf_job *job = arg;
    if (!job->finished) {
        if (job->outcome == JF_OUTCOME_OK) {
            if (st == JF_OK) {
                job->f->acked++;
                count(job, JF_MO_SUCCEEDED);
                ack(job);
            } else {
                /* Not durable yet: no ack. Try again while holding it. */
                log_job(JF_LOG_WARN, "ledger write failed; retrying before the ack", job, "error",
                        error);
                start_timer(job, LEDGER_RETRY_MS, record_outcome_timer);
            }
        } else {
            /* A failed attempt: the NAK does not wait for the ledger (the
             * attempt was counted when it began). */
            retry_now(job);
        }
    }
    unref(job);
}

static void record_outcome(jf_job *job)
{
    jf_ledger_job lj;
    ledger_job(job, &lj);
    job->state = JS_FINISHING;
    job->refs++;
    jf_ledger_finish(job->f->ledger, &lj,
                     job->outcome == JF_OUTCOME_OK ? JF_LEDGER_SUCCEEDED : JF_LEDGER_RUNNING,
                     job->result, job->outcome == JF_OUTCOME_OK ? NULL : job->error,
                     on_outcome_recorded, job);
}

void jf_job_finish(jf_job *job, const jf_job_result *r)
{
    jf_fleet *f = job->f;
    service_rt *s = job->d->svc;
    const jf_service_config *svc = s->cfg;

    if (job->state != JS_RUNNING) {
        json_decref(r->result);
        return; /* cancelled or already settled: the handler broke its contract */
    }
    int64_t now = now_ms();
    jf_metrics_handler_time(f->metrics, job->d->idx / JF_PRIO_COUNT, now - job->call_started_ms);
    if (job->has_permit) {
        job->has_permit = false;
        jf_breaker_record(s->breaker, now, r->service_fault, now - job->call_started_ms);
    }
    release_inflight(job);
    job->outcome = r->outcome;
    job->retry_after_ms = r->retry_after_ms;
    job->result = r->result;
    copy_text(job->error, sizeof job->error, r->error);

    switch (r->outcome) {
    case JF_OUTCOME_OK:
        if (f->ledger != NULL) {
            record_outcome(job);
            return;
        }
        f->acked++;
        count(job, JF_MO_SUCCEEDED);
        if (jf_log_enabled(JF_LOG_DEBUG))
            log_job(JF_LOG_DEBUG, "job done", job, "outcome", "ok");
        ack(job);
        return;
    case JF_OUTCOME_PERMANENT:
        dead_letter(job, JF_DL_PERMANENT, job->error);
        return;
    case JF_OUTCOME_RETRY:
        if (job->attempt >= (unsigned)svc->max_deliver) {
            dead_letter(job, JF_DL_MAX_DELIVERIES, job->error);
            return;
        }
        if (f->ledger != NULL) {
            record_outcome(job);
            return;
        }
        retry_now(job);
        return;
    }
}

void jf_job_done(jf_job *job, jf_outcome outcome, const char *error, int64_t retry_after_ms)
{
    jf_job_result r = {
        .outcome = outcome,
        .error = error,
        .retry_after_ms = retry_after_ms,
        .service_fault = outcome == JF_OUTCOME_RETRY,
        .result = NULL,
    };
    jf_job_finish(job, &r);
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
    return job->attempt;
}

void **jf_job_slot(jf_job *job)
{
    return &job->slot;
}

/* ---- the way to a call --------------------------------------------------- */

static void call(jf_job *job)
{
    service_rt *s = job->d->svc;
    job->state = JS_RUNNING;
    job->call_started_ms = now_ms();
    s->ops->start(s->impl, job);
}

static void too_many_attempts(jf_job *job, unsigned attempts)
{
    char msg[128];
    snprintf(msg, sizeof msg, "attempted %u times, max_deliver is %d", attempts,
             job->d->svc->cfg->max_deliver);
    drop_permit(job);
    release_inflight(job);
    dead_letter(job, JF_DL_MAX_DELIVERIES, msg);
}

static void on_begun(void *arg, jf_status st, jf_ledger_status prior, int attempts,
                     const char *error)
{
    jf_job *job = arg;
    if (job->finished) {
        unref(job);
        return;
    }
    unref(job);
    if (st != JF_OK) {
        /* The ledger is down: the breaker of the ledger stops pulls; this
         * job goes back without a call, and that was no attempt. */
        log_job(JF_LOG_WARN, "ledger unavailable; handing the job back", job, "error", error);
        drop_permit(job);
        release_inflight(job);
        jf_job_nak(job->f, job->reply, 1000 + jf_rng_between0(&job->f->rng, 1000));
        job->f->deferred++;
        count(job, JF_MO_DEFERRED);
        finish(job);
        return;
    }
    if (prior == JF_LEDGER_SUCCEEDED || prior == JF_LEDGER_DEAD) {
        /* Settled before (a crash came between ledger and ack): no second
         * call, no second dead letter. */
        job->f->skipped++;
        count(job, JF_MO_SKIPPED);
        log_job(JF_LOG_INFO, "already settled in the ledger; acknowledging without a call", job,
                "status", jf_ledger_status_name(prior));
        drop_permit(job);
        release_inflight(job);
        ack(job);
        return;
    }
    job->attempt = (unsigned)attempts;
    if (job->attempt > (unsigned)job->d->svc->cfg->max_deliver) {
        /* Earlier attempts ended without an outcome (a consumer died
         * mid-call): they were attempts all the same. */
        too_many_attempts(job, job->attempt - 1);
        return;
    }
    ask_rate(job);
}

static void hold_for_breaker(jf_job *job)
{
    jf_fleet *f = job->f;
    service_rt *s = job->d->svc;
    drop_permit(job);
    release_inflight(job);
    if (f->ledger != NULL) {
        /* The ledger counts attempts, so a NAK is free: hand the job back
         * until the breaker half-opens and let the capacity work elsewhere. */
        int64_t until = jf_breaker_open_until(s->breaker) - now_ms();
        jf_job_nak(f, job->reply, (until > 0 ? until : 0) + jf_rng_between0(&f->rng, 1000));
        f->deferred++;
        count(job, JF_MO_DEFERRED);
        finish(job);
        return;
    }
    /* Without a ledger a NAK would count as a delivery: hold the job
     * (heartbeats keep it) until the breaker lets calls through. */
    job->state = JS_WAIT_BREAKER;
    job->wnext = NULL;
    if (s->waiting_tail != NULL)
        s->waiting_tail->wnext = job;
    else
        s->waiting = job;
    s->waiting_tail = job;
}

/* Breaker permit, then the ledger row (which counts the attempt). */
static void claim(jf_job *job)
{
    jf_fleet *f = job->f;
    service_rt *s = job->d->svc;
    if (!jf_breaker_allow(s->breaker, now_ms())) {
        hold_for_breaker(job);
        return;
    }
    job->has_permit = true;
    if (f->ledger != NULL) {
        jf_ledger_job lj;
        ledger_job(job, &lj);
        /* A replayed or re-driven message: the ledger resets a settled row
         * once for it instead of acknowledging it without a call. */
        const char *hv = NULL;
        lj.replay = natsMsgHeader_Get(job->msg, "Jetfleet-Replay-Of-Seq", &hv) == NATS_OK ||
                    natsMsgHeader_Get(job->msg, "Jetfleet-Redrive-Of", &hv) == NATS_OK;
        job->state = JS_BEGIN;
        job->refs++;
        jf_ledger_begin(f->ledger, &lj, on_begun, job);
        return;
    }
    job->attempt = (unsigned)job->delivered;
    if (job->attempt > (unsigned)s->cfg->max_deliver) {
        too_many_attempts(job, job->attempt - 1);
        return;
    }
    ask_rate(job);
}

static void on_slot_time(uv_timer_t *t)
{
    jf_job *job = t->data;
    stop_timer(job);
    call(job);
}

static void on_rate_slot(void *arg, int64_t slot_ms)
{
    jf_job *job = arg;
    if (job->finished || slot_ms < 0) {
        unref(job);
        return;
    }
    unref(job);
    int64_t wait = slot_ms - now_ms();
    if (wait > 0) {
        jf_metrics_rate_wait(job->f->metrics, job->d->idx / JF_PRIO_COUNT);
        job->state = JS_WAIT_SLOT;
        start_timer(job, wait, on_slot_time);
        return;
    }
    call(job);
}

static void ask_rate(jf_job *job)
{
    jf_fleet *f = job->f;
    const jf_service_config *svc = job->d->svc->cfg;
    if (f->limits != NULL && jf_limits_rate_limited(f->limits, svc)) {
        job->state = JS_WAIT_LIMITS;
        job->refs++;
        jf_limits_acquire_rate(f->limits, svc, on_rate_slot, job);
        return;
    }
    call(job);
}

static void on_inflight_slot(void *arg, int64_t slot_ms)
{
    jf_job *job = arg;
    if (job->finished || slot_ms < 0) {
        if (slot_ms >= 0) /* granted after the job went: give it back */
            jf_limits_release_inflight(job->f->limits, job->d->svc->cfg);
        unref(job);
        return;
    }
    unref(job);
    job->has_inflight = true;
    claim(job);
}

/* From NEW (or a breaker wait) on towards a call. */
static void advance(jf_job *job)
{
    jf_fleet *f = job->f;
    service_rt *s = job->d->svc;
    if (jf_breaker_state_at(s->breaker, now_ms()) == JF_BREAKER_OPEN) {
        hold_for_breaker(job);
        return;
    }
    if (f->limits != NULL && jf_limits_inflight_limited(f->limits, s->cfg)) {
        job->state = JS_WAIT_LIMITS;
        job->refs++;
        jf_limits_acquire_inflight(f->limits, s->cfg, on_inflight_slot, job);
        return;
    }
    claim(job);
}

void jf_job_release_waiting(jf_fleet *f, service_rt *s)
{
    /* Take the whole queue; jobs the breaker still refuses queue again. */
    jf_job *j = s->waiting;
    s->waiting = s->waiting_tail = NULL;
    while (j != NULL) {
        jf_job *next = j->wnext;
        j->wnext = NULL;
        advance(j);
        j = next;
    }
    (void)f;
}

void jf_job_start(jf_fleet *f, durable *d, natsMsg *m)
{
    jf_ack_meta meta;
    jf_error err;
    const char *reply = natsMsg_GetReply(m);

    if (reply == NULL || jf_ack_meta_parse(&meta, reply, strlen(reply), &err) != JF_OK) {
        /* Not a JetStream delivery (no ack subject): nothing to settle. */
        jf_log(JF_LOG_ERROR, "message without JetStream metadata dropped",
               JF_S("subject", natsMsg_GetSubject(m)), JF_S("durable", d->name),
               JF_S("error", reply == NULL ? "no reply subject" : err.msg));
        jf_fleet_bury(f, m);
        return;
    }
    jf_job *job = calloc(1, sizeof *job);
    if (job == NULL) {
        jf_job_nak(f, reply, 1000);
        jf_fleet_bury(f, m);
        return;
    }
    job->f = f;
    job->d = d;
    job->msg = m;
    job->reply = reply;
    job->seq = meta.stream_seq;
    job->delivered = meta.delivered;
    if (job->delivered > 1)
        jf_metrics_redelivery(f->metrics, d->idx / JF_PRIO_COUNT, d->prio);
    d->backlog = meta.pending > INT64_MAX ? INT64_MAX : (int64_t)meta.pending;
    d->busy = d->backlog > 0;
    size_t sn = meta.stream_len < sizeof job->stream ? meta.stream_len : sizeof job->stream - 1;
    memcpy(job->stream, meta.stream, sn);
    job->stream[sn] = '\0';
    job->progress_ms = now_ms();
    job->next = &f->jobs;
    job->prev = f->jobs.prev;
    f->jobs.prev->next = job;
    f->jobs.prev = job;
    d->in_flight++;
    if (++f->in_flight > f->peak)
        f->peak = f->in_flight;

    if (jf_envelope_scan(&job->env, natsMsg_GetData(m), (size_t)natsMsg_GetDataLength(m),
                          natsMsg_GetSubject(m), (size_t)f->max_payload, &err) != JF_OK) {
        job->attempt = (unsigned)job->delivered;
        dead_letter(job, JF_DL_INVALID, err.msg);
        return;
    }
    if (job->env->has_deadline && job->env->deadline_ms <= job->progress_ms) {
        char when[40], msg[96];
        jf_rfc3339_format(when, sizeof when, job->env->deadline_ms);
        snprintf(msg, sizeof msg, "deadline %s has passed", when);
        job->attempt = (unsigned)job->delivered;
        dead_letter(job, JF_DL_EXPIRED, msg);
        return;
    }
    advance(job);
}

/* ---- timers and shutdown ---------------------------------------------------- */

void jf_job_tick(jf_fleet *f, int64_t now)
{
    int64_t resend_after = f->cfg->nats.request_timeout_ms;
    for (jf_job *j = f->jobs.next; j != &f->jobs; j = j->next) {
        if (j->state == JS_SETTLING && !j->dl_stored && now - j->dl_sent_ms >= resend_after) {
            log_job(JF_LOG_WARN, "no PubAck for dead letter; publishing again", j, "error",
                    j->error);
            send_dead_letter(j);
        }
        /* In-progress heartbeats keep the server from redelivering a job
         * that is still being worked on (or waiting its turn). */
        int64_t ack_wait = j->d->svc->cfg->ack_wait_ms;
        (void)lease_lost(j, now); /* noted before the heartbeat hides the gap */
        if (now - j->progress_ms >= ack_wait / 2) {
            publish_ack(f, j->reply, "+WPI");
            j->progress_ms = now;
        }
    }
}

void jf_job_hand_back(jf_job *job)
{
    jf_fleet *f = job->f;
    service_rt *s = job->d->svc;
    if (job->state == JS_RUNNING) {
        s->ops->cancel(s->impl, job);
        drop_permit(job);
    }
    if (job->state == JS_WAIT_BREAKER) {
        /* unlink from the breaker queue */
        jf_job **pp = &s->waiting;
        s->waiting_tail = NULL;
        while (*pp != NULL) {
            if (*pp == job)
                *pp = job->wnext;
            else {
                s->waiting_tail = *pp;
                pp = &(*pp)->wnext;
            }
        }
    }
    /* Whatever it was waiting for: give it back now (a repeated dead letter
     * is stored once, by its Nats-Msg-Id; the ledger keeps one row). */
    jf_job_nak(f, job->reply, jf_fleet_handback_delay(f));
    f->nacked_on_stop++;
    finish(job);
}

void jf_job_free_all(jf_fleet *f)
{
    while (f->jobs.next != &f->jobs)
        jf_job_hand_back(f->jobs.next);
}
