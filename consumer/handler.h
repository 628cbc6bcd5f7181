/* handler.h — the small interface a handler kind implements (noop now; http
 * and postgres slot in beside it without touching the pull loop).
 *
 * Everything here runs on the consumer's one event-loop thread. A handler
 * receives a job through start() and reports its outcome exactly once with
 * jf_job_done() — synchronously inside start() or later from a loop
 * callback. The fleet owns the job; a handler may keep per-job state in
 * jf_job_slot() and must release it before (or while) calling jf_job_done().
 * After cancel() the handler must release its state and never call
 * jf_job_done() for that job: the fleet NAKs it. */
#ifndef JF_HANDLER_H
#define JF_HANDLER_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "config.h"
#include "envelope.h"
#include "status.h"

typedef struct jf_job jf_job;

typedef enum jf_outcome {
    JF_OUTCOME_OK = 0,   /* done: acknowledge */
    JF_OUTCOME_RETRY,    /* failed, may succeed later: NAK with backoff or dead-letter */
    JF_OUTCOME_PERMANENT /* failed for good: dead-letter "permanent" */
} jf_outcome;

typedef struct jf_handler_ops {
    const char *kind;
    jf_status (*create)(void **impl, uv_loop_t *loop, const jf_service_config *svc,
                        jf_error *err);
    void (*start)(void *impl, jf_job *job);
    void (*cancel)(void *impl, jf_job *job);
    void (*destroy)(void *impl);
} jf_handler_ops;

extern const jf_handler_ops jf_handler_noop;
extern const jf_handler_ops jf_handler_http;     /* handler_http.c */
extern const jf_handler_ops jf_handler_postgres; /* handler_postgres.c */

/* The handler kind for cfg's kind, or NULL when this build has none. */
const jf_handler_ops *jf_handler_for_kind(jf_handler_kind kind);

/* Accessors for handlers. The pointers stay valid until jf_job_done(). */
const jf_envelope *jf_job_envelope(const jf_job *job);
const void *jf_job_body(const jf_job *job, size_t *len);
unsigned jf_job_attempt(const jf_job *job); /* 1 on the first delivery */
void **jf_job_slot(jf_job *job);

/* The outcome of one call. */
typedef struct jf_job_result {
    jf_outcome outcome;
    const char *error;      /* one line for logs, ledger and dead letter (copied); NULL on success */
    int64_t retry_after_ms; /* the least delay the downstream asked for (Retry-After); 0 = none */
    bool service_fault;     /* counts against the service's breaker: 5xx, timeout, connection
                               error, a lying 2xx; not 4xx, 429 or the job's own fault */
    json_t *result;         /* success: the job's result for the ledger (reference stolen); may be NULL */
} jf_job_result;

/* Reports the outcome; the job must not be touched afterwards. */
void jf_job_finish(jf_job *job, const jf_job_result *r);

/* Shorthand: service_fault = (outcome == RETRY), no result. */
void jf_job_done(jf_job *job, jf_outcome outcome, const char *error, int64_t retry_after_ms);

#endif
