/* metrics.h — the consumer's observability endpoint ([consumer]
 * metrics_listen): /metrics in Prometheus text format, /healthz (alive) and
 * /readyz (NATS connected, every durable answering its pulls, the ledger
 * reachable when there is one).
 *
 * Threads: the event loop writes, the HTTP server (libmicrohttpd's own
 * thread) reads. Every counter, gauge and readiness flag is a C11 atomic
 * kept here, so the server never touches the loop's state and the loop
 * never waits for the server. A scrape reads each number atomically, not
 * all of them at one instant; each histogram is rendered from one read of
 * its buckets, so its buckets are monotone and +Inf equals _count.
 *
 * Every function may be called with m == NULL (metrics_listen unset) and
 * then does nothing. svc is a service's index in the fleet (0..nservices-1),
 * didx a durable's (svc * 3 + priority). */
#ifndef JF_METRICS_H
#define JF_METRICS_H

#include <stdbool.h>
#include <stdint.h>

#include "breaker.h"
#include "deadletter.h"
#include "envelope.h"
#include "status.h"

typedef struct jf_metrics jf_metrics;

/* The outcome label of jetfleet_jobs_total. */
typedef enum jf_metrics_outcome {
    JF_MO_SUCCEEDED = 0,
    JF_MO_RETRIED, /* a failed attempt handed back with backoff */
    JF_MO_DEAD_INVALID,
    JF_MO_DEAD_EXPIRED,
    JF_MO_DEAD_PERMANENT,
    JF_MO_DEAD_MAX_DELIVERIES,
    JF_MO_SKIPPED,  /* already settled in the ledger: acked without a call */
    JF_MO_DEFERRED, /* handed back without a call (breaker open, ledger down) */
    JF_MO_COUNT,
} jf_metrics_outcome;

/* Allocates the counters of nservices services (names are copied) and
 * starts serving on listen ("HOST:PORT", IPv4; port 0 picks one, see
 * jf_metrics_port). in_flight_limit is reported as jetfleet_in_flight_limit;
 * with_ledger makes the ledger part of readiness. Not ready until the loop
 * says so (jf_metrics_set_running). */
jf_status jf_metrics_create(jf_metrics **out, const char *listen, const char *const *services,
                            int nservices, int in_flight_limit, bool with_ledger, jf_error *err);

/* Stops the server (waiting for a scrape in progress), then frees. */
void jf_metrics_destroy(jf_metrics *m);

/* The port actually listened on. */
unsigned jf_metrics_port(const jf_metrics *m);

/* ---- loop side: counters ---------------------------------------------- */

void jf_metrics_job(jf_metrics *m, int svc, jf_priority prio, jf_metrics_outcome outcome);

/* A dead letter stored: jetfleet_dead_letters_total{reason} and the
 * matching dead_* outcome of jetfleet_jobs_total. */
void jf_metrics_dead_letter(jf_metrics *m, int svc, jf_priority prio, jf_dl_reason reason);

/* A delivery whose count is above 1. */
void jf_metrics_redelivery(jf_metrics *m, int svc, jf_priority prio);

/* A handler call that ended, start to outcome. */
void jf_metrics_handler_time(jf_metrics *m, int svc, int64_t ms);

/* A job that had to wait for its fleet-wide rate slot. */
void jf_metrics_rate_wait(jf_metrics *m, int svc);

/* The breaker's state now and its trips since start. */
void jf_metrics_breaker(jf_metrics *m, int svc, jf_breaker_state state, uint64_t trips);

void jf_metrics_in_flight(jf_metrics *m, int in_flight);

/* ---- loop side: readiness ---------------------------------------------- */

/* The loop runs and is not shutting down. */
void jf_metrics_set_running(jf_metrics *m, bool running);
void jf_metrics_set_nats(jf_metrics *m, bool connected);
/* A pull of this durable was answered (true), or its pulls went silent. */
void jf_metrics_set_durable(jf_metrics *m, int didx, bool bound);
void jf_metrics_set_ledger(jf_metrics *m, bool reachable);

#endif
