/* pgconn.h — PostgreSQL connections on the consumer's libuv loop.
 *
 * A jf_pgconn is one libpq connection in non-blocking pipeline mode: every
 * request is sent at once as one statement followed by its own Sync, so it
 * is its own implicit transaction (committed when its callback sees
 * JF_PG_OK) and a failing request never aborts the ones behind it. Answers
 * come back in order and are matched to a FIFO of pending requests.
 *
 * On every (re)connect the session is set up before any request runs:
 * statement_timeout, then the prepared statements of the options. A broken
 * connection fails every pending request with JF_PG_CONN (retryable: the
 * statement may or may not have been committed) and reconnects with a
 * backoff (200 ms doubling to 5 s). A request made while it waits starts an
 * attempt at once (at most one per 200 ms; otherwise it fails at once with
 * JF_PG_CONN and the last connect error); requests made while an attempt is
 * under way wait for it (10 s at most). A request left unanswered for
 * statement_timeout + 10 s resets the connection and fails with
 * JF_PG_TIMEOUT (TCP keepalives catch a dead peer when statement_timeout
 * is 0).
 *
 * A jf_pgpool is a small set of such connections; each request goes to the
 * ready connection with the fewest pending requests (round-robin on ties).
 *
 * Threads: everything on the loop thread. Callbacks: exactly once per
 * request, from the loop, never from inside jf_pgconn_exec() /
 * jf_pgpool_exec(); on destroy every pending request's callback is called
 * from inside destroy with JF_PG_CLOSED. A callback may queue new requests;
 * it may destroy the connection or pool (no further callbacks then run
 * except the JF_PG_CLOSED ones).
 *
 * Memory: the tiny per-request record is allocated with malloc; if even that
 * fails the process logs and aborts (a request whose callback can never run
 * would strand a job; a crash gets it redelivered). A failure to copy the
 * parameters is reported through the callback as JF_PG_INVALID. */
#ifndef JF_PGCONN_H
#define JF_PGCONN_H

#include <libpq-fe.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "status.h"

#define JF_PG_MAX_PARAMS 16

typedef struct jf_pgconn jf_pgconn;
typedef struct jf_pgpool jf_pgpool;

/* A statement prepared on every connection. Parameter types come from the
 * casts in sql ($1::text …). */
typedef struct jf_pg_statement {
    const char *name;
    const char *sql;
} jf_pg_statement;

typedef struct jf_pgconn_options {
    const char *dsn;              /* libpq key=value string or URI; secret: never logged */
    const char *name;             /* what this connection is for, in logs ("ledger", …) */
    int64_t statement_timeout_ms; /* SET on every connection; 0 = the server's setting */
    const jf_pg_statement *statements;
    size_t nstatements;
    bool connect_now; /* create() connects and prepares before it returns (blocking), and
                         fails when it cannot; otherwise the first attempt runs on the loop */
} jf_pgconn_options;

typedef enum jf_pg_outcome {
    JF_PG_OK = 0,    /* the statement ran and its transaction committed: res */
    JF_PG_SQL_ERROR, /* the server answered with an error: res, sqlstate, error */
    JF_PG_CONN,      /* no usable connection, or it broke before the answer */
    JF_PG_TIMEOUT,   /* no answer in time; the connection was reset */
    JF_PG_CLOSED,    /* the connection or pool is being destroyed */
    JF_PG_INVALID,   /* not sent: a bad request, or no memory for its parameters */
} jf_pg_outcome;

typedef struct jf_pg_reply {
    jf_pg_outcome outcome;
    const PGresult *res;  /* JF_PG_OK and JF_PG_SQL_ERROR; valid during the callback only */
    const char *sqlstate; /* JF_PG_SQL_ERROR: five characters; otherwise NULL */
    const char *error;    /* one line, no secrets; NULL on JF_PG_OK */
} jf_pg_reply;

typedef void (*jf_pg_cb)(void *arg, const jf_pg_reply *reply);

/* opts and its strings are copied. With connect_now, fails (JF_ERR_IO) when
 * the server cannot be reached or a statement cannot be prepared; without
 * it, only a dsn libpq cannot parse fails (JF_ERR_INVALID). */
jf_status jf_pgconn_create(jf_pgconn **out, uv_loop_t *loop, const jf_pgconn_options *opts,
                           jf_error *err);

/* Calls every pending callback with JF_PG_CLOSED, closes the connection;
 * the memory goes once the loop has run the handles' close callbacks. */
void jf_pgconn_destroy(jf_pgconn *c);

/* Runs one statement: the prepared statement named stmt (one of the
 * options' statements), or, when stmt is NULL, sql as an unnamed statement.
 * params: nparams (<= JF_PG_MAX_PARAMS) text values, NULL for SQL NULL;
 * lengths may be NULL (strlen) or give each value's byte count. Everything
 * is copied before this returns. */
void jf_pgconn_exec(jf_pgconn *c, const char *stmt, const char *sql, int nparams,
                    const char *const *params, const size_t *lengths, jf_pg_cb cb, void *arg);

bool jf_pgconn_ready(const jf_pgconn *c); /* connected and set up (or being set up) */
size_t jf_pgconn_pending(const jf_pgconn *c);

/* n connections with the same options; with connect_now all must connect. */
jf_status jf_pgpool_create(jf_pgpool **out, uv_loop_t *loop, const jf_pgconn_options *opts, int n,
                           jf_error *err);
void jf_pgpool_destroy(jf_pgpool *p);
void jf_pgpool_exec(jf_pgpool *p, const char *stmt, const char *sql, int nparams,
                    const char *const *params, const size_t *lengths, jf_pg_cb cb, void *arg);
size_t jf_pgpool_ready_count(const jf_pgpool *p);

/* Calls cb from the loop with JF_PG_INVALID and error: for a caller that
 * finds a request bad before sending it but owes a callback. */
void jf_pgpool_fail(jf_pgpool *p, const char *error, jf_pg_cb cb, void *arg);

/* "22012" -> true when the class says the service, not the request, is at
 * fault and a later attempt may succeed: 08 connection, 40001/40P01
 * serialization/deadlock, 53 resources, 55P03 lock not available, 57014
 * statement timeout, 57P0x shutdown/crash/cannot connect now, 58 system. */
bool jf_pg_sqlstate_retryable(const char *sqlstate);

#endif
