/* handler_postgres.c — kind = postgres: each job runs the service's `sql`
 * (e.g. SELECT enrich_tender($1::jsonb)) with $1 = the envelope, its exact
 * bytes as text, on a small pool of pipelined libpq connections (pgconn.h),
 * each statement in a transaction of its own.
 *
 * The job's result is the first column of the first row: json/jsonb values
 * parsed as JSON, any other type as a JSON string of its text form, SQL NULL
 * or no row as JSON null.
 *
 * The SQLSTATE decides what a failure is (jf_pg_sqlstate_retryable): the
 * server's trouble (connection, serialization, deadlock, resources, lock
 * not available, statement timeout, shutdown, system) is retried and counts
 * against the service's breaker; the job's own (data, constraints, syntax,
 * access, RAISE EXCEPTION and everything else) dead-letters it as
 * permanent. A connection lost before the answer is retried: the statement
 * may or may not have committed, so the function should be idempotent (the
 * job id is in the envelope).
 *
 * Settings: dsn, sql, timeout (statement_timeout of the connections, default
 * 30s) and max_connections (connections per process; 0 = 4). A statement
 * runs on one connection at a time, so max_connections is also how many
 * jobs of the service run in the database at once from this process. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "handler.h"
#include "pgconn.h"

#define DEFAULT_CONNECTIONS 4
#define OID_JSON            114
#define OID_JSONB           3802

typedef struct pg_call pg_call;

typedef struct pg_handler {
    const jf_service_config *svc;
    jf_pgpool *pool;
    pg_call *calls; /* in the database now (cancelled ones too, job NULL) */
} pg_handler;

struct pg_call {
    pg_call *prev, *next;
    pg_handler *h;
    jf_job *job; /* NULL once cancelled: the answer is dropped */
};

static void unlink_call(pg_handler *h, pg_call *pc)
{
    if (pc->prev != NULL)
        pc->prev->next = pc->next;
    else
        h->calls = pc->next;
    if (pc->next != NULL)
        pc->next->prev = pc->prev;
    pc->prev = pc->next = NULL;
}

static jf_status handler_create(void **impl, uv_loop_t *loop, const jf_service_config *svc,
                                jf_error *err)
{
    if (svc->sql == NULL || svc->sql[0] == '\0') {
        jf_error_set(err, "service %s: kind = postgres needs sql = SELECT your_function($1::jsonb)",
                     svc->name);
        return JF_ERR_INVALID;
    }
    if (svc->dsn == NULL || svc->dsn[0] == '\0') {
        jf_error_set(err, "service %s: kind = postgres needs a dsn", svc->name);
        return JF_ERR_INVALID;
    }
    pg_handler *h = calloc(1, sizeof *h);
    if (h == NULL) {
        jf_error_set(err, "service %s: out of memory", svc->name);
        return JF_ERR_NOMEM;
    }
    h->svc = svc;
    char name[JF_NAME_MAX + 16];
    snprintf(name, sizeof name, "service %s", svc->name);
    /* Not connected yet: a database that is down at start-up must not keep
     * the consumer (and its other services) from starting; its jobs are
     * retried and its breaker opens instead. */
    jf_pgconn_options opts = {
        .dsn = svc->dsn,
        .name = name,
        .statement_timeout_ms = svc->timeout_ms,
        .connect_now = false,
    };
    int n = svc->max_connections > 0 ? svc->max_connections : DEFAULT_CONNECTIONS;
    jf_error perr;
    jf_status st = jf_pgpool_create(&h->pool, loop, &opts, n, &perr);
    if (st != JF_OK) {
        /* pgconn's message names "service X" already. */
        jf_error_set(err, "%s", perr.msg);
        free(h);
        return st;
    }
    *impl = h;
    return JF_OK;
}

/* The first column of the first row as the job's result. */
static json_t *first_value(const PGresult *res)
{
    if (res == NULL || PQntuples(res) < 1 || PQnfields(res) < 1 || PQgetisnull(res, 0, 0))
        return json_null();
    const char *v = PQgetvalue(res, 0, 0);
    size_t len = (size_t)PQgetlength(res, 0, 0);
    Oid type = PQftype(res, 0);
    if (type == OID_JSON || type == OID_JSONB) {
        json_error_t jerr;
        json_t *j = json_loadb(v, len, JSON_DECODE_ANY, &jerr);
        if (j != NULL)
            return j;
        /* json text jansson refuses (e.g. \u0000): keep it as a string. */
    }
    json_t *s = json_stringn(v, len);
    return s != NULL ? s : json_null();
}

static void on_reply(void *arg, const jf_pg_reply *r)
{
    pg_call *pc = arg;
    pg_handler *h = pc->h;
    jf_job *job = pc->job;
    unlink_call(h, pc);
    free(pc);
    if (job == NULL)
        return; /* cancelled: the fleet has settled the job already */
    *jf_job_slot(job) = NULL;

    char msg[600];
    jf_job_result res = {0};
    switch (r->outcome) {
    case JF_PG_OK:
        res.outcome = JF_OUTCOME_OK;
        res.result = first_value(r->res);
        break;
    case JF_PG_SQL_ERROR:
        snprintf(msg, sizeof msg, "postgres: %s", r->error ? r->error : "error");
        res.error = msg;
        res.service_fault = jf_pg_sqlstate_retryable(r->sqlstate);
        res.outcome = res.service_fault ? JF_OUTCOME_RETRY : JF_OUTCOME_PERMANENT;
        break;
    case JF_PG_INVALID:
        /* Only a lack of memory here (the request itself is well formed). */
        snprintf(msg, sizeof msg, "postgres: %s", r->error ? r->error : "not sent");
        res.error = msg;
        res.outcome = JF_OUTCOME_RETRY;
        break;
    case JF_PG_CONN:
    case JF_PG_TIMEOUT:
    case JF_PG_CLOSED:
    default:
        snprintf(msg, sizeof msg, "%s", r->error ? r->error : "postgres: connection error");
        res.error = msg;
        res.outcome = JF_OUTCOME_RETRY;
        res.service_fault = true;
        break;
    }
    jf_job_finish(job, &res);
}

static void handler_start(void *impl, jf_job *job)
{
    pg_handler *h = impl;
    pg_call *pc = calloc(1, sizeof *pc);
    if (pc == NULL) {
        jf_job_result res = {.outcome = JF_OUTCOME_RETRY, .error = "postgres: out of memory"};
        jf_job_finish(job, &res);
        return;
    }
    pc->h = h;
    pc->job = job;
    pc->next = h->calls;
    if (h->calls != NULL)
        h->calls->prev = pc;
    h->calls = pc;
    *jf_job_slot(job) = pc;

    size_t len = 0;
    const char *body = jf_job_body(job, &len);
    const char *params[] = {body};
    const size_t lens[] = {len};
    jf_pgpool_exec(h->pool, NULL, h->svc->sql, 1, params, lens, on_reply, pc);
}

static void handler_cancel(void *impl, jf_job *job)
{
    (void)impl;
    pg_call *pc = *jf_job_slot(job);
    if (pc == NULL)
        return;
    *jf_job_slot(job) = NULL;
    /* A statement in the pipeline cannot be taken back; it runs on and its
     * answer is dropped. */
    pc->job = NULL;
}

static void handler_destroy(void *impl)
{
    pg_handler *h = impl;
    if (h == NULL)
        return;
    for (pg_call *pc = h->calls; pc != NULL; pc = pc->next)
        pc->job = NULL;
    jf_pgpool_destroy(h->pool); /* each call's on_reply runs now and frees it */
    free(h);
}

const jf_handler_ops jf_handler_postgres = {
    .kind = "postgres",
    .create = handler_create,
    .start = handler_start,
    .cancel = handler_cancel,
    .destroy = handler_destroy,
};
