/* limits.c — fleet-wide rate and in-flight limits in the KV bucket
 * jetfleet_limits (see limits.h).
 *
 * Keys, one pair per service:
 *   rate.<service>      the GCRA theoretical arrival time, decimal µs since
 *                       the epoch (gcra.h). A process takes a lease of k
 *                       slots with one compare-and-set and hands them to its
 *                       waiters in FIFO order; k is 1 up to 10 calls/s, and
 *                       about 50 ms worth of calls above. A process holds at
 *                       most about one lease of future slots (the lookahead),
 *                       so a crash wastes little of the rate. The spacing is
 *                       widened by a guard (1% of the period, at least 40 ms,
 *                       at most 1 s: 4% of a per-second rate, 1% of a
 *                       per-minute one), so calls that reach the service a
 *                       little late cannot crowd a window (measured here: a
 *                       first call on a new connection or a busy loop arrives
 *                       up to ~30 ms late relative to its neighbours); slots
 *                       start a little ahead of "now" (twice
 *                       the recent KV round trip) so they reach their callers
 *                       on time, and a slot that still arrives later than
 *                       half the guard is dropped (its waiter keeps its place).
 *   inflight.<service>  {"<process id>":{"n":held,"w":waiting,"t":ms},...}.
 *                       A process writes its own entry (n = slots it holds,
 *                       w = 1 while it waits for room, t = now; removed when
 *                       both are 0), counts the others' fresh entries (t
 *                       within 3 heartbeats of 2 s), and drops stale ones (a
 *                       crashed process) when it writes. A released slot goes
 *                       straight to a local waiter when there is one (n does
 *                       not change, so no KV write) — unless another process
 *                       waits and this one holds more than an even share
 *                       (ceil(limit / processes that hold or wait)): then it
 *                       goes back to the bucket, so no process starves.
 *
 * Threads: the bucket is only touched from libuv's thread pool; each key has
 * at most one worker at a time, whose inputs are copied into the work item,
 * so the loop thread owns all other state. Grants come back in after_work on
 * the loop thread. Callbacks are never made from inside acquire or release
 * (a job finishing must not start the next job inside its own stack): they
 * go through a zero timer.
 *
 * Failure: any KV error keeps waiters waiting (fail closed), retries every
 * 500 ms and logs at most once a minute. A bucket deleted under a running
 * fleet is created again. */
#include "limits.h"

#include <inttypes.h>
#include <jansson.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "gcra.h"
#include "log.h"

#define BUCKET           "jetfleet_limits"
#define HEARTBEAT_MS     2000
#define STALE_MS         (3 * HEARTBEAT_MS)
#define POLL_MS          100 /* no room fleet-wide: look again this often */
#define RETRY_MS         500 /* after a KV error */
#define ERROR_LOG_MS     60000
#define CAS_TRIES        16 /* conflicts in a row before backing off */
#define VALUE_MAX        (1 << 20)
#define LEASE_WINDOW_MS  50 /* a lease holds about this much of a high rate */
#define LEASE_MAX        1000
#define GUARD_MIN_US     40000   /* widening of each rate period: 1% of it, */
#define GUARD_MAX_US     1000000 /* within these bounds */
#define LEAD_MAX_US      50000   /* cap of the lead of the earliest slot over "now" */
#define RESTORE_CHECK_MS 10000
#define MAX_WORKERS      3 /* leave libuv's 4th pool thread to others */
#define PID_MAX          128
#define KEY_MAX          (JF_NAME_MAX + 16)
#define SLOT_NOW         INT64_MIN /* in a ready entry: "now", read at dispatch */
#define N_MAX            1000000000

typedef struct waiter {
    jf_limits_cb cb;
    void *arg;
    int64_t slot_ms;
} waiter;

typedef struct fifo {
    waiter *v;
    size_t head, len, cap;
} fifo;

typedef struct lim_key {
    jf_limits *lim;
    const jf_service_config *svc;
    bool on;
    bool is_rate;
    char key[KEY_MAX];
    fifo q;           /* waiting for a slot, FIFO */
    bool busy;        /* a worker for this key is queued or running */
    bool timer_armed; /* a poll, retry or lookahead wait is pending */
    uv_timer_t *timer;
    /* rate */
    int64_t interval_us, tau_us, lookahead_us;
    int lease_max;
    int64_t horizon_us;    /* latest slot handed out */
    int64_t latency_us;    /* moving average of a lease's KV round trips */
    int64_t late_us;       /* a slot this late on arrival is dropped */
    uint64_t late_dropped; /* slots dropped as late */
    uint64_t waits;
    /* in-flight */
    int limit;
    int held;             /* granted here, not yet released */
    int written;          /* this process's n as the bucket last had it */
    bool written_waiting; /* … and whether it says this process waits */
    int share;            /* last seen: an even share, and whether others wait */
    bool others_waiting;
    bool heartbeat_due;
} lim_key;

typedef struct svc_keys {
    const jf_service_config *cfg;
    lim_key rate, inf;
} svc_keys;

enum { RES_OK = 0, RES_ERROR, RES_BUSY, RES_ABORTED };

typedef struct work {
    uv_work_t req;
    struct work *prev, *next; /* lim->active */
    jf_limits *lim;           /* NULL once destroy has orphaned it */
    lim_key *k;
    bool done; /* work_cb over (under lim->mu) */
    /* inputs */
    int64_t want;
    int64_t lead_us;
    int held;
    bool heartbeat;
    /* outputs */
    int result;
    char error[256];
    bool corrupt;
    jf_gcra_lease lease;
    int granted;
    int written;
    int dropped;
    int64_t elapsed_us;
    int share;           /* an even share of the limit among contenders */
    bool others_waiting; /* another process waits for a slot */
    bool waiting;        /* this process's entry says it waits */
} work;

/* Timers live apart from jf_limits: they are freed by the last close
 * callback, which may run after jf_limits_destroy() returns. */
typedef struct handles {
    int open;
    int n;
    uv_timer_t t[];
} handles;

struct jf_limits {
    uv_loop_t *loop;
    jsCtx *js;
    int replicas;
    kvStore *kv;
    char process_id[PID_MAX];
    svc_keys *svcs;
    int nsvcs;
    fifo ready; /* granted (or refused on destroy), callback due */
    bool flushing;
    handles *h;
    uv_timer_t *dispatch, *heartbeat;
    int workers;
    work active; /* sentinel */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    atomic_bool closing;
    _Atomic int64_t restore_checked_ms; /* last look for a deleted bucket */
    bool in_error;
    int64_t error_logged_ms;
    unsigned long long errors_unlogged;
};

/* ---- small helpers --------------------------------------------------- */

static int64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static int64_t now_ms(void)
{
    return now_us() / 1000;
}

static bool fifo_push(fifo *q, waiter w)
{
    if (q->len == q->cap) {
        size_t cap = q->cap ? q->cap * 2 : 64;
        waiter *v = malloc(cap * sizeof *v);
        if (v == NULL)
            return false;
        for (size_t i = 0; i < q->len; i++)
            v[i] = q->v[(q->head + i) % q->cap];
        free(q->v);
        q->v = v;
        q->cap = cap;
        q->head = 0;
    }
    q->v[(q->head + q->len) % q->cap] = w;
    q->len++;
    return true;
}

static waiter fifo_pop(fifo *q)
{
    waiter w = q->v[q->head];
    q->head = (q->head + 1) % q->cap;
    q->len--;
    return w;
}

static void kv_error_text(work *w, const char *op, natsStatus s)
{
    const char *detail = nats_GetLastError(NULL);
    if (detail != NULL && detail[0] == '\0')
        detail = NULL;
    snprintf(w->error, sizeof w->error, "%s %s: %s%s%s", op, w->k->key, natsStatus_GetText(s),
             detail ? ": " : "", detail ? detail : "");
    w->result = RES_ERROR;
}

/* A compare-and-set that lost: the server says "wrong last sequence" (and
 * kvStore_Create on an existing key says the same). */
static bool is_conflict(natsStatus s)
{
    if (s != NATS_ERR)
        return false;
    const char *e = nats_GetLastError(NULL);
    return e != NULL && strstr(e, "wrong last sequence") != NULL;
}

static natsStatus kv_write(kvStore *kv, const char *key, const char *data, int len, uint64_t rev)
{
    return rev ? kvStore_Update(NULL, kv, key, data, len, rev)
               : kvStore_Create(NULL, kv, key, data, len);
}

static void bucket_config(kvConfig *kc, int replicas)
{
    kvConfig_Init(kc);
    kc->Bucket = BUCKET;
    kc->Description = "jetfleet fleet-wide rate and in-flight limits";
    kc->History = 1;
    kc->StorageType = js_FileStorage;
    kc->Replicas = replicas;
}

/* After a KV error: was the bucket deleted under us (nats kv rm, a wiped
 * server)? Then put it back (empty: the rate starts afresh, processes
 * rewrite their in-flight entries). A Get on a deleted bucket times out
 * (a direct get has nobody to answer), hence the explicit look. */
static bool restore_bucket(jf_limits *lim, bool *tried)
{
    if (*tried)
        return false;
    *tried = true;
    /* While the server is away each look costs a request timeout: look
     * once in a while only. */
    int64_t now = now_ms(), last = atomic_load(&lim->restore_checked_ms);
    if (now - last < RESTORE_CHECK_MS ||
        !atomic_compare_exchange_strong(&lim->restore_checked_ms, &last, now))
        return false;
    jsStreamInfo *si = NULL;
    jsErrCode jerr = 0;
    natsStatus s = js_GetStreamInfo(&si, lim->js, "KV_" BUCKET, NULL, &jerr);
    jsStreamInfo_Destroy(si);
    if (s == NATS_OK || (s != NATS_NOT_FOUND && jerr != JSStreamNotFoundErr))
        return false;
    kvConfig kc;
    kvStore *kv = NULL;
    bucket_config(&kc, lim->replicas);
    s = js_CreateKeyValue(&kv, lim->js, &kc);
    kvStore_Destroy(kv);
    if (s == NATS_OK)
        jf_log(JF_LOG_WARN, "fleet-wide limits: bucket was missing; created it again",
               JF_S("bucket", BUCKET));
    return s == NATS_OK;
}

/* ---- workers (libuv thread pool) -------------------------------------- */

static bool parse_tat(const char *v, int len, int64_t *out)
{
    if (v == NULL || len < 1 || len > 19)
        return false;
    int64_t x = 0;
    for (int i = 0; i < len; i++) {
        if (v[i] < '0' || v[i] > '9')
            return false;
        x = x * 10 + (v[i] - '0');
    }
    *out = x;
    return true;
}

static void rate_work(work *w, bool honor_closing)
{
    lim_key *k = w->k;
    kvStore *kv = k->lim->kv;
    int64_t began = now_us();
    bool restored = false;
    for (int tries = 0; tries < CAS_TRIES; tries++) {
        if (honor_closing && atomic_load(&k->lim->closing)) {
            w->result = RES_ABORTED;
            return;
        }
        kvEntry *e = NULL;
        uint64_t rev = 0;
        int64_t tat = 0;
        natsStatus s = kvStore_Get(&e, kv, k->key);
        if (s == NATS_OK) {
            rev = kvEntry_Revision(e);
            if (!parse_tat(kvEntry_Value(e), kvEntry_ValueLen(e), &tat))
                w->corrupt = true; /* start afresh: tat 0 is "no backlog" */
            kvEntry_Destroy(e);
        } else if (s != NATS_NOT_FOUND) {
            kv_error_text(w, "get", s);
            if (restore_bucket(k->lim, &restored))
                continue;
            return;
        }
        /* A slot due "now" would reach its caller only after the write
         * below and the hop to the loop: late, and a late call can crowd
         * the next window. So the earliest slot is a little ahead. */
        int64_t now = now_us() + w->lead_us;
        jf_gcra_lease lease;
        if (!jf_gcra_take(&tat, now, k->interval_us, k->tau_us, w->want, &lease)) {
            /* Only an absurd stored TAT overflows; treat it as corrupt. */
            w->corrupt = true;
            tat = 0;
            if (!jf_gcra_take(&tat, now, k->interval_us, k->tau_us, w->want, &lease)) {
                snprintf(w->error, sizeof w->error, "%s: lease of %" PRId64 " slots overflows",
                         k->key, w->want);
                w->result = RES_ERROR;
                return;
            }
        }
        char buf[32];
        int len = snprintf(buf, sizeof buf, "%" PRId64, tat);
        s = kv_write(kv, k->key, buf, len, rev);
        if (s == NATS_OK) {
            w->lease = lease;
            w->elapsed_us = now_us() - began;
            w->result = RES_OK;
            return;
        }
        if (!is_conflict(s)) {
            kv_error_text(w, rev ? "update" : "create", s);
            if (restore_bucket(k->lim, &restored))
                continue;
            return;
        }
    }
    w->result = RES_BUSY;
}

static int64_t json_int(json_t *o, const char *key, bool *ok)
{
    json_t *v = json_object_get(o, key);
    if (!json_is_integer(v)) {
        *ok = false;
        return 0;
    }
    return json_integer_value(v);
}

static void inflight_work(work *w, bool honor_closing)
{
    lim_key *k = w->k;
    jf_limits *lim = k->lim;
    bool restored = false;
    for (int tries = 0; tries < CAS_TRIES; tries++) {
        if (honor_closing && atomic_load(&lim->closing)) {
            w->result = RES_ABORTED;
            return;
        }
        kvEntry *e = NULL;
        uint64_t rev = 0;
        json_t *obj = NULL;
        natsStatus s = kvStore_Get(&e, lim->kv, k->key);
        if (s == NATS_OK) {
            rev = kvEntry_Revision(e);
            int len = kvEntry_ValueLen(e);
            if (len > 0 && len <= VALUE_MAX)
                obj = json_loadb(kvEntry_Value(e), (size_t)len, 0, NULL);
            if (!json_is_object(obj)) {
                w->corrupt = true;
                json_decref(obj);
                obj = NULL;
            }
            kvEntry_Destroy(e);
        } else if (s != NATS_NOT_FOUND) {
            kv_error_text(w, "get", s);
            if (restore_bucket(lim, &restored))
                continue;
            return;
        }
        if (obj == NULL && (obj = json_object()) == NULL) {
            snprintf(w->error, sizeof w->error, "%s: out of memory", k->key);
            w->result = RES_ERROR;
            return;
        }

        int64_t now = now_ms();
        int64_t others = 0, own_n = 0, own_w = 0, own_t = 0;
        int contenders = 0, dropped = 0;
        bool others_waiting = false;
        const char *pid;
        json_t *ent;
        void *tmp;
        json_object_foreach_safe(obj, tmp, pid, ent)
        {
            bool ok = json_is_object(ent);
            int64_t n = ok ? json_int(ent, "n", &ok) : 0;
            int64_t t = ok ? json_int(ent, "t", &ok) : 0;
            bool wok = true;
            int64_t waiting = ok ? json_int(ent, "w", &wok) : 0; /* absent: 0 */
            ok = ok && n >= 0 && n <= N_MAX;
            if (strcmp(pid, lim->process_id) == 0) {
                own_n = ok ? n : -1;
                own_w = waiting != 0;
                own_t = t;
                continue;
            }
            if (!ok || now - t > STALE_MS) {
                json_object_del(obj, pid);
                dropped++;
                continue;
            }
            others += n;
            contenders += n > 0 || waiting != 0;
            others_waiting = others_waiting || waiting != 0;
        }
        contenders += w->held > 0 || w->want > 0;

        int64_t room = (int64_t)k->limit - others - w->held;
        /* While another process waits, nobody takes more than an even
         * share: otherwise the processes that hold slots would hand them
         * among their own jobs for ever and starve it. */
        int share = contenders > 0 ? (k->limit + contenders - 1) / contenders : k->limit;
        if (others_waiting && share - w->held < room)
            room = share - w->held;
        int64_t g = w->want < room ? w->want : room;
        if (g < 0)
            g = 0;
        int64_t mine = w->held + g;
        bool still_waiting = w->want > g;
        w->share = share;
        w->others_waiting = others_waiting;
        w->waiting = still_waiting;
        /* Read-only when nothing changed: a process polling for room does
         * not write, and its own entry is refreshed by the heartbeat. */
        bool write = g > 0 || own_n != mine || own_w != still_waiting || w->heartbeat ||
                     ((mine > 0 || still_waiting) && now - own_t > HEARTBEAT_MS);
        if (!write) {
            json_decref(obj);
            w->granted = 0;
            w->written = (int)mine;
            w->result = RES_OK;
            return;
        }
        int rc = 0;
        if (mine > 0 || still_waiting) {
            json_t *me = json_pack("{sIsIsI}", "n", (json_int_t)mine, "t", (json_int_t)now, "w",
                                   (json_int_t)still_waiting);
            rc = me ? json_object_set_new(obj, lim->process_id, me) : -1;
        } else {
            json_object_del(obj, lim->process_id);
        }
        char *text = rc == 0 ? json_dumps(obj, JSON_COMPACT) : NULL;
        json_decref(obj);
        if (text == NULL) {
            snprintf(w->error, sizeof w->error, "%s: out of memory", k->key);
            w->result = RES_ERROR;
            return;
        }
        s = kv_write(lim->kv, k->key, text, (int)strlen(text), rev);
        free(text);
        if (s == NATS_OK) {
            w->granted = (int)g;
            w->written = (int)mine;
            w->dropped = dropped;
            w->result = RES_OK;
            return;
        }
        if (!is_conflict(s)) {
            kv_error_text(w, rev ? "update" : "create", s);
            if (restore_bucket(lim, &restored))
                continue;
            return;
        }
    }
    w->result = RES_BUSY;
}

static void work_cb(uv_work_t *req)
{
    work *w = req->data;
    jf_limits *lim = w->k->lim;
    if (w->k->is_rate)
        rate_work(w, true);
    else
        inflight_work(w, true);
    /* A libuv pool thread is not one of nats.c's: the error state a failed
     * KV call left in its thread-local storage must be released here (see
     * nats_ReleaseThreadMemory), as the pool outlives nats_Close and the
     * key's destructor never runs for it. Before done: after it, the fleet
     * may already be closing the library. */
    nats_ReleaseThreadMemory();
    /* Last touch of lim: destroy may free it as soon as it sees done. */
    pthread_mutex_lock(&lim->mu);
    w->done = true;
    pthread_cond_broadcast(&lim->cv);
    pthread_mutex_unlock(&lim->mu);
}

/* ---- the loop side ---------------------------------------------------- */

static void kick(lim_key *k);

static void kick_all(jf_limits *lim)
{
    for (int i = 0; i < lim->nsvcs; i++) {
        kick(&lim->svcs[i].rate);
        kick(&lim->svcs[i].inf);
    }
}

static void flush_ready(jf_limits *lim)
{
    if (lim->flushing)
        return;
    lim->flushing = true;
    /* A callback may acquire or release: new entries land in the same
     * queue and are served by this loop. */
    while (lim->ready.len > 0) {
        waiter w = fifo_pop(&lim->ready);
        w.cb(w.arg, w.slot_ms == SLOT_NOW ? now_ms() : w.slot_ms);
    }
    lim->flushing = false;
}

static void on_dispatch(uv_timer_t *t)
{
    flush_ready(t->data);
}

/* Queues a callback for the next loop turn. */
static void answer_later(jf_limits *lim, jf_limits_cb cb, void *arg, int64_t slot_ms)
{
    if (!fifo_push(&lim->ready, (waiter){cb, arg, slot_ms})) {
        /* Nothing to do but say no: the job stays held until shutdown. */
        jf_log(JF_LOG_ERROR, "fleet-wide limits: out of memory; a job waits until shutdown",
               JF_S("error", "out of memory"));
        return;
    }
    if (!lim->flushing)
        uv_timer_start(lim->dispatch, on_dispatch, 0, 0);
}

static void note_error(jf_limits *lim, lim_key *k, const char *error)
{
    int64_t now = now_ms();
    if (!lim->in_error || now - lim->error_logged_ms >= ERROR_LOG_MS) {
        jf_log(JF_LOG_WARN, "fleet-wide limits unavailable; calls wait (fail closed)",
               JF_S("service", k->svc->name), JF_S("bucket", BUCKET), JF_S("error", error),
               JF_I("errors_since_last_log", lim->errors_unlogged));
        lim->error_logged_ms = now;
        lim->errors_unlogged = 0;
    } else {
        lim->errors_unlogged++;
    }
    lim->in_error = true;
}

static void note_ok(jf_limits *lim, lim_key *k)
{
    if (lim->in_error) {
        lim->in_error = false;
        jf_log(JF_LOG_INFO, "fleet-wide limits available again", JF_S("service", k->svc->name),
               JF_S("bucket", BUCKET));
    }
}

static void on_key_timer(uv_timer_t *t)
{
    lim_key *k = t->data;
    k->timer_armed = false;
    kick(k);
}

static void arm(lim_key *k, int64_t ms)
{
    k->timer_armed = true;
    uv_timer_start(k->timer, on_key_timer, (uint64_t)(ms > 0 ? ms : 0), 0);
}

static void rate_done(lim_key *k, work *w)
{
    jf_limits *lim = k->lim;
    int64_t now = now_ms(), t_us = now_us();
    k->latency_us = k->latency_us == 0 ? w->elapsed_us : (3 * k->latency_us + w->elapsed_us) / 4;
    for (int64_t i = 0; i < w->lease.n; i++) {
        int64_t slot_us = jf_gcra_lease_slot(&w->lease, i);
        if (slot_us > k->horizon_us)
            k->horizon_us = slot_us;
        if (k->q.len == 0)
            continue; /* cannot happen (waiters never leave early): wasted */
        if (slot_us < t_us - k->late_us) {
            /* The lease came back late (a stall): a call started now could
             * crowd the next window beyond the guard. The waiter keeps its
             * place for the next lease; the slot is lost. */
            k->late_dropped++;
            jf_log(JF_LOG_DEBUG, "rate slot arrived late; dropped", JF_S("service", k->svc->name),
                   JF_I("late_us", t_us - slot_us), JF_I("dropped", k->late_dropped));
            continue;
        }
        waiter wt = fifo_pop(&k->q);
        /* Rounded up: a call started at slot_ms is never before its slot. */
        wt.slot_ms = slot_us / 1000 + (slot_us % 1000 > 0);
        if (wt.slot_ms > now)
            k->waits++;
        if (!fifo_push(&lim->ready, wt))
            jf_log(JF_LOG_ERROR, "fleet-wide limits: out of memory; a job waits until shutdown",
                   JF_S("service", k->svc->name));
    }
}

static void inflight_done(lim_key *k, work *w)
{
    jf_limits *lim = k->lim;
    k->written = w->written;
    k->written_waiting = w->waiting;
    k->share = w->share;
    k->others_waiting = w->others_waiting;
    k->held += w->granted;
    for (int i = 0; i < w->granted; i++) {
        if (k->q.len == 0) {
            /* A release handed the slot over meanwhile: give it back. */
            k->held--;
            continue;
        }
        waiter wt = fifo_pop(&k->q);
        wt.slot_ms = SLOT_NOW;
        if (!fifo_push(&lim->ready, wt)) {
            k->held--;
            jf_log(JF_LOG_ERROR, "fleet-wide limits: out of memory; a job waits until shutdown",
                   JF_S("service", k->svc->name));
        }
    }
    if (w->dropped > 0)
        jf_log(JF_LOG_INFO, "fleet-wide in-flight: reclaimed slots of stopped processes",
               JF_S("service", k->svc->name), JF_I("entries", w->dropped));
    /* Still waiters and no room fleet-wide: look again shortly. */
    if (k->q.len > 0 && w->granted < w->want)
        arm(k, POLL_MS);
}

static void after_work_cb(uv_work_t *req, int status)
{
    work *w = req->data;
    jf_limits *lim = w->lim;
    (void)status;
    if (lim == NULL) {
        free(w); /* orphaned by destroy */
        return;
    }
    w->prev->next = w->next;
    w->next->prev = w->prev;
    lim->workers--;
    lim_key *k = w->k;
    k->busy = false;

    if (w->corrupt)
        jf_log(JF_LOG_WARN, "fleet-wide limits: unreadable value replaced", JF_S("key", k->key),
               JF_S("bucket", BUCKET));
    switch (w->result) {
    case RES_OK:
        note_ok(lim, k);
        if (k->is_rate)
            rate_done(k, w);
        else
            inflight_done(k, w);
        break;
    case RES_ERROR:
        if (w->heartbeat)
            k->heartbeat_due = true;
        note_error(lim, k, w->error);
        arm(k, RETRY_MS);
        break;
    case RES_BUSY:
        /* Lost the compare-and-set CAS_TRIES times in a row: others are
         * busy on this key; step aside a little, at random. */
        if (w->heartbeat)
            k->heartbeat_due = true;
        arm(k, 5 + (int64_t)(now_us() % 45));
        break;
    default:
        break;
    }
    free(w);
    flush_ready(lim);
    kick_all(lim);
}

static void submit(lim_key *k, int64_t want, bool heartbeat)
{
    jf_limits *lim = k->lim;
    work *w = calloc(1, sizeof *w);
    if (w == NULL) {
        note_error(lim, k, "out of memory");
        arm(k, RETRY_MS);
        return;
    }
    w->req.data = w;
    w->lim = lim;
    w->k = k;
    w->want = want;
    w->held = k->held;
    if (k->is_rate) {
        int64_t lead = 2 * k->latency_us + 1000;
        w->lead_us = lead < LEAD_MAX_US ? lead : LEAD_MAX_US;
    }
    w->heartbeat = heartbeat;
    if (uv_queue_work(lim->loop, &w->req, work_cb, after_work_cb) != 0) {
        free(w);
        note_error(lim, k, "cannot queue work on the thread pool");
        arm(k, RETRY_MS);
        return;
    }
    if (heartbeat)
        k->heartbeat_due = false;
    w->next = &lim->active;
    w->prev = lim->active.prev;
    lim->active.prev->next = w;
    lim->active.prev = w;
    lim->workers++;
    k->busy = true;
}

static void kick(lim_key *k)
{
    jf_limits *lim = k->lim;
    if (!k->on || k->busy || k->timer_armed || atomic_load(&lim->closing) ||
        lim->workers >= MAX_WORKERS)
        return;
    if (k->is_rate) {
        if (k->q.len == 0)
            return;
        /* Hold about one lease of future slots at most: more would only
         * be lost if this process died, and starve the others. */
        int64_t ahead = k->horizon_us - now_us();
        if (ahead > k->lookahead_us) {
            int64_t wait_us = ahead - k->lookahead_us;
            arm(k, wait_us / 1000 + 1);
            return;
        }
        int64_t n = (int64_t)k->q.len < k->lease_max ? (int64_t)k->q.len : k->lease_max;
        submit(k, n, false);
        return;
    }
    bool dirty = k->held != k->written || k->heartbeat_due || (k->written_waiting && k->q.len == 0);
    if (k->q.len == 0 && !dirty)
        return;
    submit(k, (int64_t)k->q.len, k->heartbeat_due);
}

static void on_heartbeat(uv_timer_t *t)
{
    jf_limits *lim = t->data;
    for (int i = 0; i < lim->nsvcs; i++) {
        lim_key *k = &lim->svcs[i].inf;
        if (k->on && (k->held > 0 || k->written > 0 || k->written_waiting)) {
            k->heartbeat_due = true;
            kick(k);
        }
    }
}

/* ---- public API ------------------------------------------------------- */

static svc_keys *find(const jf_limits *lim, const jf_service_config *svc)
{
    if (lim == NULL || svc == NULL)
        return NULL;
    for (int i = 0; i < lim->nsvcs; i++)
        if (lim->svcs[i].cfg == svc)
            return &lim->svcs[i];
    for (int i = 0; i < lim->nsvcs; i++)
        if (strcmp(lim->svcs[i].cfg->name, svc->name) == 0)
            return &lim->svcs[i];
    return NULL;
}

bool jf_limits_rate_limited(const jf_limits *lim, const jf_service_config *svc)
{
    (void)lim;
    return svc->rate.period_ms > 0;
}

bool jf_limits_inflight_limited(const jf_limits *lim, const jf_service_config *svc)
{
    (void)lim;
    /* noop services are bounded by the durables' MaxAckPending alone, so
     * benchmarks of the fleet itself pay no KV round trip per job. */
    return svc->kind == JF_KIND_HTTP || svc->kind == JF_KIND_POSTGRES;
}

static void acquire(jf_limits *lim, lim_key *k, jf_limits_cb cb, void *arg)
{
    if (atomic_load(&lim->closing)) {
        answer_later(lim, cb, arg, -1);
        return;
    }
    if (k == NULL || !k->on) {
        answer_later(lim, cb, arg, SLOT_NOW);
        return;
    }
    if (!fifo_push(&k->q, (waiter){cb, arg, 0})) {
        jf_log(JF_LOG_ERROR, "fleet-wide limits: out of memory; a job waits until shutdown",
               JF_S("service", k->svc->name));
        answer_later(lim, cb, arg, -1);
        return;
    }
    kick(k);
}

void jf_limits_acquire_rate(jf_limits *lim, const jf_service_config *svc, jf_limits_cb cb,
                            void *arg)
{
    svc_keys *s = find(lim, svc);
    acquire(lim, s ? &s->rate : NULL, cb, arg);
}

void jf_limits_acquire_inflight(jf_limits *lim, const jf_service_config *svc, jf_limits_cb cb,
                                void *arg)
{
    svc_keys *s = find(lim, svc);
    acquire(lim, s ? &s->inf : NULL, cb, arg);
}

void jf_limits_release_inflight(jf_limits *lim, const jf_service_config *svc)
{
    svc_keys *s = find(lim, svc);
    if (s == NULL || !s->inf.on)
        return;
    lim_key *k = &s->inf;
    if (k->held <= 0) {
        jf_log(JF_LOG_WARN, "fleet-wide in-flight: release without a slot held",
               JF_S("service", k->svc->name));
        return;
    }
    if (k->q.len > 0 && !atomic_load(&lim->closing) && !(k->others_waiting && k->held > k->share)) {
        /* Hand the slot to the next local waiter: this process still holds
         * as many, so the bucket need not hear of it. Not above an even
         * share while another process waits: that one gets it through the
         * bucket. */
        waiter w = fifo_pop(&k->q);
        answer_later(lim, w.cb, w.arg, SLOT_NOW);
        return;
    }
    k->held--;
    kick(k);
}

uint64_t jf_limits_rate_waits(const jf_limits *lim, const jf_service_config *svc)
{
    const svc_keys *s = find(lim, svc);
    return s ? s->rate.waits : 0;
}

/* ---- life cycle ------------------------------------------------------- */

static jf_status setup_keys(jf_limits *lim, svc_keys *s, const jf_service_config *svc,
                            jf_error *err)
{
    s->cfg = svc;
    lim_key *r = &s->rate, *f = &s->inf;
    r->lim = f->lim = lim;
    r->svc = f->svc = svc;
    r->is_rate = true;
    snprintf(r->key, sizeof r->key, "rate.%s", svc->name);
    snprintf(f->key, sizeof f->key, "inflight.%s", svc->name);

    if (jf_limits_rate_limited(lim, svc)) {
        int64_t period_us = svc->rate.period_ms * 1000;
        int64_t guard = period_us / 100;
        guard = guard < GUARD_MIN_US ? GUARD_MIN_US : guard > GUARD_MAX_US ? GUARD_MAX_US : guard;
        r->interval_us = jf_gcra_interval_us(svc->rate.count, period_us, guard);
        r->tau_us = jf_gcra_tau_us(r->interval_us, svc->burst);
        if (r->interval_us < 1 || r->tau_us < 0) {
            jf_error_set(err,
                         "service %s: rate %" PRId64 " per %" PRId64 " ms with burst %d "
                         "cannot be enforced",
                         svc->name, svc->rate.count, svc->rate.period_ms, svc->burst);
            return JF_ERR_INVALID;
        }
        /* One slot per lease up to 10 calls/s; above, ~50 ms worth. */
        int64_t k = 1;
        if (svc->rate.count * 1000 > 10 * svc->rate.period_ms)
            k = svc->rate.count * LEASE_WINDOW_MS / svc->rate.period_ms;
        r->lease_max = (int)(k < 1 ? 1 : k > LEASE_MAX ? LEASE_MAX : k);
        r->lookahead_us = (int64_t)r->lease_max * r->interval_us;
        r->late_us = guard / 2;
        r->on = true;
    }
    if (jf_limits_inflight_limited(lim, svc)) {
        f->limit = svc->fleet_in_flight;
        f->on = true;
    }
    return JF_OK;
}

static jf_status open_bucket(jf_limits *lim, jsCtx *js, const jf_config *cfg, jf_error *err)
{
    lim->js = js;
    lim->replicas = cfg->stream.replicas;
    natsStatus s = js_KeyValue(&lim->kv, js, BUCKET);
    char create_err[256] = "";
    /* Consumers started together all find no bucket and all create it;
     * nats-server 2.9 may refuse the creates that race with the first
     * ("subjects overlap with an existing stream") although the configs
     * are the same. A refused create looks again before giving up. */
    for (int attempt = 0; s == NATS_NOT_FOUND && attempt < 3; attempt++) {
        kvConfig kc;
        bucket_config(&kc, lim->replicas);
        s = js_CreateKeyValue(&lim->kv, js, &kc);
        if (s == NATS_OK)
            break;
        const char *d = nats_GetLastError(NULL);
        snprintf(create_err, sizeof create_err, "%s", d != NULL ? d : "");
        nats_Sleep(100 * (attempt + 1));
        s = js_KeyValue(&lim->kv, js, BUCKET);
    }
    if (s != NATS_OK) {
        const char *detail = create_err[0] != '\0' ? create_err : nats_GetLastError(NULL);
        if (detail != NULL && detail[0] == '\0')
            detail = NULL;
        jf_error_set(err, "KV bucket %s: cannot open or create it: %s%s%s", BUCKET,
                     natsStatus_GetText(s), detail ? ": " : "", detail ? detail : "");
        lim->kv = NULL;
        return JF_ERR_NATS;
    }
    return JF_OK;
}

static void handle_closed(uv_handle_t *hd)
{
    handles *h = hd->data;
    if (--h->open == 0)
        free(h);
}

static void close_handles(handles *h)
{
    if (h == NULL)
        return;
    for (int i = 0; i < h->n; i++) {
        h->t[i].data = h;
        uv_close((uv_handle_t *)&h->t[i], handle_closed);
    }
}

jf_status jf_limits_create(jf_limits **out, uv_loop_t *loop, jsCtx *js, const jf_config *cfg,
                           const char *process_id, jf_error *err)
{
    jf_status st = JF_OK;
    size_t plen = process_id ? strlen(process_id) : 0;
    if (plen == 0 || plen >= PID_MAX) {
        jf_error_set(err, "fleet-wide limits: process id must be 1..%d bytes", PID_MAX - 1);
        return JF_ERR_INVALID;
    }
    jf_limits *lim = calloc(1, sizeof *lim);
    if (lim == NULL)
        goto fail_nomem;
    lim->loop = loop;
    memcpy(lim->process_id, process_id, plen + 1);
    lim->active.next = lim->active.prev = &lim->active;
    atomic_init(&lim->closing, false);
    atomic_init(&lim->restore_checked_ms, 0);
    lim->nsvcs = (int)cfg->nservices;
    lim->svcs = calloc(cfg->nservices ? cfg->nservices : 1, sizeof *lim->svcs);
    if (lim->svcs == NULL)
        goto fail_svcs;
    for (int i = 0; i < lim->nsvcs; i++) {
        st = setup_keys(lim, &lim->svcs[i], &cfg->services[i], err);
        if (st != JF_OK)
            goto fail_keys;
    }
    st = open_bucket(lim, js, cfg, err);
    if (st != JF_OK)
        goto fail_keys;

    /* dispatch, heartbeat, then one per key */
    int ntimers = 2 + 2 * lim->nsvcs;
    lim->h = calloc(1, sizeof *lim->h + (size_t)ntimers * sizeof(uv_timer_t));
    if (lim->h == NULL)
        goto fail_handles;
    lim->h->n = lim->h->open = ntimers;
    for (int i = 0; i < ntimers; i++)
        uv_timer_init(loop, &lim->h->t[i]);
    lim->dispatch = &lim->h->t[0];
    lim->dispatch->data = lim;
    lim->heartbeat = &lim->h->t[1];
    lim->heartbeat->data = lim;
    for (int i = 0; i < lim->nsvcs; i++) {
        lim->svcs[i].rate.timer = &lim->h->t[2 + 2 * i];
        lim->svcs[i].rate.timer->data = &lim->svcs[i].rate;
        lim->svcs[i].inf.timer = &lim->h->t[3 + 2 * i];
        lim->svcs[i].inf.timer->data = &lim->svcs[i].inf;
    }
    /* The heartbeat alone must not keep a loop alive. */
    uv_timer_start(lim->heartbeat, on_heartbeat, HEARTBEAT_MS, HEARTBEAT_MS);
    uv_unref((uv_handle_t *)lim->heartbeat);
    pthread_mutex_init(&lim->mu, NULL);
    pthread_cond_init(&lim->cv, NULL);
    jf_log(JF_LOG_DEBUG, "fleet-wide limits ready", JF_S("bucket", BUCKET),
           JF_S("process_id", lim->process_id));
    *out = lim;
    return JF_OK;

fail_handles:
    kvStore_Destroy(lim->kv);
    st = JF_ERR_NOMEM;
    jf_error_set(err, "fleet-wide limits: out of memory");
fail_keys:
    free(lim->svcs);
    free(lim);
    return st;
fail_svcs:
    free(lim);
fail_nomem:
    jf_error_set(err, "fleet-wide limits: out of memory");
    return JF_ERR_NOMEM;
}

/* Gives this process's in-flight slots back at once rather than letting
 * them go stale (6 s): a graceful stop frees its share for the others. */
static void remove_own_entries(jf_limits *lim)
{
    for (int i = 0; i < lim->nsvcs; i++) {
        lim_key *k = &lim->svcs[i].inf;
        if (!k->on || (k->written == 0 && k->held == 0 && !k->written_waiting))
            continue;
        work w = {.k = k, .want = 0, .held = 0, .heartbeat = false};
        inflight_work(&w, false);
        if (w.result != RES_OK)
            jf_log(JF_LOG_WARN,
                   "fleet-wide in-flight: could not remove this process's entry; "
                   "it expires in 6 s",
                   JF_S("service", k->svc->name),
                   JF_S("error", w.result == RES_BUSY ? "compare-and-set kept failing" : w.error));
    }
}

void jf_limits_destroy(jf_limits *lim)
{
    if (lim == NULL)
        return;
    atomic_store(&lim->closing, true);

    /* Workers: cancel what has not started, wait for what has. Their
     * after_work runs later on the loop and only frees the item. */
    for (work *w = lim->active.next; w != &lim->active;) {
        work *next = w->next;
        if (uv_cancel((uv_req_t *)&w->req) != 0) {
            pthread_mutex_lock(&lim->mu);
            while (!w->done)
                pthread_cond_wait(&lim->cv, &lim->mu);
            pthread_mutex_unlock(&lim->mu);
        }
        w->lim = NULL;
        w = next;
    }

    /* Everyone still waiting hears "no"; grants not yet delivered too
     * (their slots go back with the entry below). */
    for (int i = 0; i < lim->nsvcs; i++) {
        lim_key *ks[2] = {&lim->svcs[i].rate, &lim->svcs[i].inf};
        for (int j = 0; j < 2; j++)
            while (ks[j]->q.len > 0) {
                waiter w = fifo_pop(&ks[j]->q);
                if (!fifo_push(&lim->ready, (waiter){w.cb, w.arg, -1}))
                    w.cb(w.arg, -1);
            }
    }
    for (size_t i = 0; i < lim->ready.len; i++)
        lim->ready.v[(lim->ready.head + i) % lim->ready.cap].slot_ms = -1;
    lim->flushing = false;
    flush_ready(lim);

    remove_own_entries(lim);
    close_handles(lim->h);
    kvStore_Destroy(lim->kv);
    for (int i = 0; i < lim->nsvcs; i++) {
        free(lim->svcs[i].rate.q.v);
        free(lim->svcs[i].inf.q.v);
    }
    free(lim->ready.v);
    free(lim->svcs);
    pthread_mutex_destroy(&lim->mu);
    pthread_cond_destroy(&lim->cv);
    free(lim);
}
