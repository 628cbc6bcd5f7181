/* ledger.h — the PostgreSQL ledger: one row per job in jetfleet_jobs
 * (schemas/postgres/), written without blocking the event loop (libpq
 * non-blocking, pipelined, prepared statements, a small connection set).
 *
 * Everything runs on the loop thread; callbacks are called from the loop,
 * never from inside the call that queued the request. A callback is called
 * exactly once per request, also when the ledger is destroyed (with
 * JF_ERR_IO), so a caller's state is always released. */
#ifndef JF_LEDGER_H
#define JF_LEDGER_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#include "breaker.h"
#include "config.h"
#include "status.h"

typedef struct jf_ledger jf_ledger;

typedef enum jf_ledger_status {
    JF_LEDGER_NONE = 0,  /* no row yet */
    JF_LEDGER_RUNNING,   /* a row, no final outcome */
    JF_LEDGER_SUCCEEDED,
    JF_LEDGER_DEAD,
} jf_ledger_status;

const char *jf_ledger_status_name(jf_ledger_status s);

typedef struct jf_ledger_job {
    const char *job_id;
    const char *service;
    const char *priority;
    const char *type;
    const char *tenant;  /* may be NULL */
    uint64_t stream_seq;
    /* The delivery is a reprocessing the operator asked for (a message with
     * Jetfleet-Replay-Of-Seq or Jetfleet-Redrive-Of): read by begin only. */
    bool replay;
} jf_ledger_job;

/* Connects (blocking, at start-up only), applies the migrations of
 * schemas/postgres/ that are missing (recorded in jetfleet_migrations),
 * prepares the statements. dsn: cfg->postgres_dsn. */
jf_status jf_ledger_create(jf_ledger **out, uv_loop_t *loop, const jf_config *cfg, jf_error *err);
void jf_ledger_destroy(jf_ledger *l);

/* The ledger's own breaker (connection errors and timeouts trip it): while
 * it is open the fleet pulls nothing. */
bool jf_ledger_available(jf_ledger *l, int64_t now_ms);

/* Before a real call: insert the row as running with attempts = 1, or on
 * conflict increment attempts — unless the row is already succeeded or dead,
 * which is left as it is. With job->replay, a row whose stream_seq differs
 * from job->stream_seq (the first delivery of this replayed or re-driven
 * message) is reset instead, whatever its status: running, attempts = 1,
 * replays + 1, replayed_at = now(), error and finished_at cleared; a
 * redelivery of the same message then counts as an attempt, never as a
 * second replay. prior is the status before this call (RUNNING after a
 * reset, so the job is run), attempts the real attempts now recorded (this
 * one included when counted). */
typedef void (*jf_ledger_begin_cb)(void *arg, jf_status st, jf_ledger_status prior, int attempts,
                                   const char *error);
void jf_ledger_begin(jf_ledger *l, const jf_ledger_job *job, jf_ledger_begin_cb cb, void *arg);

/* After the outcome: status succeeded (with result), dead (with error), or
 * running (a failed attempt, with error, to be retried). A row that is
 * already succeeded or dead is never changed (only begin's replay reset
 * reopens one). The row is committed when cb sees
 * JF_OK — only then may the job be acknowledged. For a job with no row yet
 * (dead-lettered before any call) the row is inserted. */
typedef void (*jf_ledger_done_cb)(void *arg, jf_status st, const char *error);
void jf_ledger_finish(jf_ledger *l, const jf_ledger_job *job, jf_ledger_status status,
                      const json_t *result, const char *error, jf_ledger_done_cb cb, void *arg);

#endif
