/* fleet_int.h — the consumer's internal state, shared by fleet.c (the loop:
 * pulls, scheduling, timers, signals, life cycle) and job.c (one job's way
 * from delivery to ack, NAK or dead letter). Loop thread only, except the
 * event queue (mu). */
#ifndef JF_FLEET_INT_H
#define JF_FLEET_INT_H

#include <nats/nats.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#include "backoff.h"
#include "breaker.h"
#include "config.h"
#include "deadletter.h"
#include "envelope.h"
#include "fleet.h"
#include "handler.h"
#include "ledger.h"
#include "limits.h"
#include "metrics.h"

#define MAX_PULLS 16

typedef struct pull {
    uint64_t id;
    int batch;
    int remaining;
    int64_t last_ms;    /* sent, or last message/heartbeat */
    int64_t expires_ms; /* when the server lets it go */
    natsSubscription *sub;
} pull;

typedef struct service_rt {
    const jf_service_config *cfg;
    const jf_handler_ops *ops;
    void *impl;
    jf_breaker *breaker;
    jf_job *waiting;       /* jobs held while the breaker is open (FIFO, via wnext) */
    jf_job *waiting_tail;
    const char *last_state; /* breaker state last logged */
} service_rt;

typedef struct durable {
    jf_fleet *f;
    int idx;
    service_rt *svc;
    jf_priority prio;
    char name[JF_NAME_MAX + 16];
    char next_subject[256];
    int weight;
    int in_flight;   /* jobs of this durable held by this process */
    int requested;   /* asked for in open pulls, not yet delivered */
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

typedef enum job_state {
    JS_NEW = 0,
    JS_WAIT_BREAKER, /* held: the service's breaker is open */
    JS_WAIT_LIMITS,  /* asked for a fleet-wide in-flight slot or rate slot */
    JS_WAIT_SLOT,    /* has a rate slot in the future */
    JS_BEGIN,        /* ledger row being claimed */
    JS_RUNNING,      /* the handler has it */
    JS_FINISHING,    /* ledger row being finished */
    JS_SETTLING,     /* dead letter awaiting its PubAck (then the ledger) */
    JS_DONE,
} job_state;

struct jf_job {
    jf_job *prev, *next; /* the fleet's list of jobs held */
    jf_job *wnext;       /* a service's breaker queue */
    jf_fleet *f;
    durable *d;
    natsMsg *msg;
    jf_envelope *env;
    const char *reply;
    char stream[64];
    uint64_t seq;
    uint64_t delivered; /* the server's delivery count */
    unsigned attempt;   /* real attempts, this one included */
    int64_t progress_ms; /* last time the server heard of this job */
    bool lease_lost;     /* once went ack_wait without a heartbeat (job.c lease_lost) */
    job_state state;
    int refs;            /* async callbacks still due (ledger, limits) */
    bool finished;       /* settled and unlinked; freed when refs == 0 */
    void *slot;          /* the handler's */
    bool has_inflight;   /* holds a fleet-wide in-flight slot */
    bool has_permit;     /* holds a breaker permit (half-open probe or closed) */
    int64_t call_started_ms;
    uv_timer_t *timer;   /* rate slot wait / ledger retry; NULL when none */
    /* the outcome, kept while the ledger records it */
    jf_outcome outcome;
    int64_t retry_after_ms;
    json_t *result;
    /* dead letter */
    jf_dl_reason dl_reason;
    uint64_t dl_id;
    int64_t dl_sent_ms;
    natsMsg *dl_msg;
    bool dl_stored;
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
    volatile sig_atomic_t *stop_requested;
    natsConnection *nc;
    jsCtx *js;
    int64_t max_payload;
    jf_ledger *ledger; /* NULL: no ledger configured */
    jf_limits *limits; /* NULL: no fleet-wide limits configured */
    jf_metrics *metrics; /* NULL: [consumer] metrics_listen unset */
    char process_id[128];

    uv_loop_t loop;
    uv_async_t async;
    uv_prepare_t prepare;
    uv_timer_t tick, stats, grace;
    uv_signal_t sigterm, sigint;
    int64_t tick_ms;

    pthread_mutex_t mu;
    bool closing; /* under mu: destroy has begun, NATS threads queue nothing more */
    evqueue q;     /* filled by NATS threads under mu */
    evqueue batch; /* swapped with q, drained on the loop */

    service_rt services[JF_MAX_SERVICES];
    int nservices;
    durable *durables;
    int ndurables;

    char inbox[128];
    natsSubscription *dl_sub;
    uint64_t next_pull_id, next_dl_id;

    natsMsg **grave; /* settled jobs' messages, destroyed together (jf_fleet_bury) */
    size_t ngrave, capgrave;

    jf_job jobs; /* sentinel of the list of jobs held */
    int in_flight, requested, peak;
    unsigned long long acked, dead, retried, deferred, skipped, nacked_on_stop, stray, trips;
    bool dirty, ready, stopping, grace_over, done;
    jf_rng rng;
};

/* job.c */
void jf_job_start(jf_fleet *f, durable *d, natsMsg *m);
void jf_job_on_dl_ack(jf_fleet *f, uint64_t id, natsMsg *msg);
void jf_job_tick(jf_fleet *f, int64_t now);              /* heartbeats, dead-letter resends */
void jf_job_release_waiting(jf_fleet *f, service_rt *s); /* breaker no longer open */
void jf_job_hand_back(jf_job *job);                      /* shutdown: cancel and NAK */
void jf_job_nak(jf_fleet *f, const char *reply, int64_t delay_ms);
void jf_job_free_all(jf_fleet *f);                       /* destroy: jobs left on error paths */

/* fleet.c: the delay for a job handed back: 0 normally; while stopping,
 * until this process's last open pull expires, so the server does not hand
 * the job straight back to a pull of a process on its way out. */
int64_t jf_fleet_handback_delay(jf_fleet *f);

/* Destroys m at the end of this loop iteration, together with the others
 * (see fleet.c). */
void jf_fleet_bury(jf_fleet *f, natsMsg *m);

#endif
