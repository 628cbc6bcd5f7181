/* pgconn.c — libpq in non-blocking pipeline mode on the libuv loop (see
 * pgconn.h for the contract).
 *
 * States: WAITING (no connection; a backoff timer will start the next
 * attempt), CONNECTING (PQconnectPoll steps driven by a uv_poll on the
 * socket), READY (pipeline mode, reading always, writing while libpq has
 * output it could not send), CLOSED (destroyed; memory goes with the last
 * handle close).
 *
 * Queues: `unsent` holds requests made while CONNECTING, `sent` the ones in
 * the pipeline in order, `done` the ones failed without an answer (broken
 * connection, no connection, no memory), whose callbacks run from a zero
 * timer so that none runs inside jf_pgconn_exec(). */
#include "pgconn.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"

#define CONNECT_TIMEOUT_MS 10000
#define TICK_MS            1000
#define BACKOFF_MIN_MS     200
#define BACKOFF_MAX_MS     5000
#define ANSWER_GRACE_MS    10000 /* beyond statement_timeout, before a silent server is given up */
#define ERROR_MAX          400

typedef enum conn_state { ST_WAITING, ST_CONNECTING, ST_READY, ST_CLOSED } conn_state;

typedef enum req_kind { REQ_USER, REQ_SET, REQ_PREPARE } req_kind;

typedef struct request {
    struct request *next;
    req_kind kind;
    jf_pg_cb cb;
    void *arg;
    const char *stmt; /* REQ_USER prepared / REQ_PREPARE: a name in the conn's copy */
    const char *sql;  /* unnamed statement or REQ_PREPARE/REQ_SET text */
    int nparams;
    const char *params[JF_PG_MAX_PARAMS];
    char *blob; /* owns sql (when copied) and the parameter values */
    PGresult *res;
    bool ended; /* the NULL that closes this statement's results was read */
    uint64_t since_ns;
    /* failed without an answer */
    jf_pg_outcome outcome;
    char error[ERROR_MAX];
} request;

typedef struct queue {
    request *head, *tail;
    size_t n;
} queue;

typedef struct poll_handle {
    uv_poll_t h;
} poll_handle;

struct jf_pgconn {
    uv_loop_t *loop;
    char *dsn;
    char *name;
    int64_t statement_timeout_ms;
    jf_pg_statement *stmts;
    size_t nstmts;

    conn_state state;
    PGconn *pg;
    poll_handle *poll;
    int poll_fd;
    int poll_events;
    bool want_write;
    uint64_t connect_start_ns;
    int64_t backoff_ms;
    unsigned failed_attempts;   /* connect attempts failed in a row */
    bool was_ready;             /* for "connection restored" */
    char last_error[ERROR_MAX]; /* why there is no connection, for requests meanwhile */

    uv_timer_t tick;  /* connect timeout and unanswered-request watchdog */
    uv_timer_t retry; /* backoff before the next connect attempt */
    uv_timer_t defer; /* runs the callbacks of `done` */
    int open_handles;

    queue unsent, sent, done;
};

struct jf_pgpool {
    jf_pgconn **conns;
    int n;
    int next;
};

/* ---- small helpers --------------------------------------------------- */

static void q_push(queue *q, request *r)
{
    r->next = NULL;
    if (q->tail != NULL)
        q->tail->next = r;
    else
        q->head = r;
    q->tail = r;
    q->n++;
}

static request *q_pop(queue *q)
{
    request *r = q->head;
    if (r == NULL)
        return NULL;
    q->head = r->next;
    if (q->head == NULL)
        q->tail = NULL;
    q->n--;
    r->next = NULL;
    return r;
}

static uint64_t now_ns(void)
{
    return uv_hrtime();
}

/* libpq messages run over several lines (and end with one); logs and
 * callers want one. */
static void one_line(char *dst, size_t cap, const char *src)
{
    size_t n = 0;
    bool space = false;
    if (cap == 0)
        return;
    for (const char *s = src ? src : ""; *s != '\0' && n + 1 < cap; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch < 0x20 || ch == 0x7f) {
            space = n > 0;
            continue;
        }
        if (space && n + 2 < cap)
            dst[n++] = ' ';
        space = false;
        dst[n++] = (char)ch;
    }
    dst[n] = '\0';
}

static void free_request(request *r)
{
    if (r == NULL)
        return;
    PQclear(r->res);
    free(r->blob);
    free(r);
}

static request *new_request(void)
{
    request *r = calloc(1, sizeof *r);
    if (r == NULL) {
        /* See pgconn.h: a lost callback would strand a job for good. */
        jf_log(JF_LOG_ERROR, "out of memory for a PostgreSQL request; aborting",
               JF_S("error", "calloc failed"));
        abort();
    }
    return r;
}

static char *dupstr(const char *s)
{
    return s ? strdup(s) : NULL;
}

/* ---- notices ----------------------------------------------------------- */

static void on_notice(void *arg, const PGresult *res)
{
    const jf_pgconn *c = arg;
    const char *sev = PQresultErrorField(res, PG_DIAG_SEVERITY_NONLOCALIZED);
    bool warn = sev != NULL && strcmp(sev, "WARNING") == 0;
    jf_log_level level = warn ? JF_LOG_WARN : JF_LOG_DEBUG;
    if (!jf_log_enabled(level))
        return;
    char msg[ERROR_MAX];
    one_line(msg, sizeof msg, PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY));
    jf_log(level, "postgres notice", JF_S("db", c->name), JF_S("severity", sev),
           JF_S("notice", msg));
}

/* ---- poll handle ------------------------------------------------------- */

static void free_poll(uv_handle_t *h)
{
    free(h);
}

static void drop_poll(jf_pgconn *c)
{
    if (c->poll == NULL)
        return;
    /* uv_close stops watching the fd at once, so libpq may close it next. */
    uv_close((uv_handle_t *)&c->poll->h, free_poll);
    c->poll = NULL;
    c->poll_fd = -1;
    c->poll_events = 0;
}

static void on_poll(uv_poll_t *h, int status, int events);

/* During connect libpq may close its socket and open another one (next
 * address or host) that reuses the same number, which libuv's epoll
 * registration cannot tell apart; `fresh` starts over with a new handle. */
static bool watch(jf_pgconn *c, int fd, int events, bool fresh)
{
    if (fd < 0)
        return false;
    if (c->poll != NULL && (fresh || c->poll_fd != fd))
        drop_poll(c);
    if (c->poll == NULL) {
        poll_handle *p = calloc(1, sizeof *p);
        if (p == NULL)
            return false;
        if (uv_poll_init(c->loop, &p->h, fd) != 0) {
            free(p);
            return false;
        }
        p->h.data = c;
        c->poll = p;
        c->poll_fd = fd;
        c->poll_events = 0;
    }
    if (events != c->poll_events) {
        if (uv_poll_start(&c->poll->h, events, on_poll) != 0)
            return false;
        c->poll_events = events;
    }
    return true;
}

/* ---- completion -------------------------------------------------------- */

static void on_defer(uv_timer_t *t);

static void kick_defer(jf_pgconn *c)
{
    if (c->state != ST_CLOSED && c->done.head != NULL && !uv_is_active((uv_handle_t *)&c->defer))
        uv_timer_start(&c->defer, on_defer, 0, 0);
}

/* Queues r to fail from the loop (internal setup requests just go). */
static void fail_later(jf_pgconn *c, request *r, jf_pg_outcome outcome, const char *error)
{
    if (r->kind != REQ_USER) {
        free_request(r);
        return;
    }
    PQclear(r->res);
    r->res = NULL;
    r->outcome = outcome;
    one_line(r->error, sizeof r->error, error);
    q_push(&c->done, r);
}

static void call_failed(request *r, jf_pg_outcome outcome)
{
    jf_pg_reply rep = {.outcome = outcome, .error = r->error[0] ? r->error : "request failed"};
    r->cb(r->arg, &rep);
    free_request(r);
}

static void on_defer(uv_timer_t *t)
{
    jf_pgconn *c = t->data;
    /* One at a time: a callback may queue more (they wait for the next
     * round) or destroy c (which calls the rest itself). */
    size_t n = c->done.n;
    while (n-- > 0 && c->state != ST_CLOSED) {
        request *r = q_pop(&c->done);
        if (r == NULL)
            break;
        call_failed(r, r->outcome);
    }
    kick_defer(c);
}

/* ---- connection life --------------------------------------------------- */

static void start_connect(jf_pgconn *c);
static bool send_request(jf_pgconn *c, request *r);
static void on_retry(uv_timer_t *t);

/* Returns the delay chosen. */
static int64_t schedule_retry(jf_pgconn *c)
{
    int64_t base = c->backoff_ms;
    /* Jitter over the upper half keeps a fleet of processes from
     * reconnecting in step after a restart. */
    int64_t half = base / 2;
    int64_t delay = half + (half > 0 ? (int64_t)(now_ns() % (uint64_t)(half + 1)) : 0);
    c->backoff_ms = base <= 0 ? BACKOFF_MIN_MS : base * 2;
    if (c->backoff_ms > BACKOFF_MAX_MS)
        c->backoff_ms = BACKOFF_MAX_MS;
    uv_timer_start(&c->retry, on_retry, (uint64_t)delay, 0);
    return delay;
}

static void close_pg(jf_pgconn *c)
{
    drop_poll(c);
    if (c->pg != NULL) {
        PQfinish(c->pg);
        c->pg = NULL;
    }
    c->want_write = false;
}

/* The connection is gone (or never came): every request waiting on it
 * fails retryably, and the next attempt is scheduled. */
static void conn_lost(jf_pgconn *c, jf_pg_outcome outcome, const char *why)
{
    char line[ERROR_MAX];
    one_line(line, sizeof line, why);
    bool connecting = c->state == ST_CONNECTING;
    size_t pending = c->sent.n + c->unsent.n;

    close_pg(c);
    char msg[2 * ERROR_MAX];
    snprintf(msg, sizeof msg, "%s: %s%s", c->name,
             connecting ? "cannot connect to PostgreSQL: " : "PostgreSQL connection lost: ", line);
    one_line(c->last_error, sizeof c->last_error, msg);
    request *r;
    while ((r = q_pop(&c->sent)) != NULL)
        fail_later(c, r, outcome, msg);
    while ((r = q_pop(&c->unsent)) != NULL)
        fail_later(c, r, outcome, msg);
    c->state = ST_WAITING;

    if (connecting) {
        c->failed_attempts++;
        if (c->backoff_ms < BACKOFF_MIN_MS)
            c->backoff_ms = BACKOFF_MIN_MS;
        int64_t delay = schedule_retry(c);
        /* The first failures of an outage say it all; later ones are
         * repeated at a lower level so the log does not fill up. */
        jf_log_level level =
            c->failed_attempts <= 3 || c->failed_attempts % 20 == 0 ? JF_LOG_WARN : JF_LOG_DEBUG;
        jf_log(level, "postgres connect failed", JF_S("db", c->name), JF_S("error", line),
               JF_I("attempt", c->failed_attempts), JF_I("retry_in_ms", delay),
               JF_I("failed_requests", pending));
    } else {
        c->backoff_ms = 0; /* it was working: try again at once */
        schedule_retry(c);
        jf_log(JF_LOG_WARN, "postgres connection lost", JF_S("db", c->name), JF_S("error", line),
               JF_I("failed_requests", pending));
    }
    kick_defer(c);
}

static void queue_setup(jf_pgconn *c, queue *q)
{
    if (c->statement_timeout_ms > 0) {
        request *r = new_request();
        r->kind = REQ_SET;
        char sql[96];
        snprintf(sql, sizeof sql, "SET statement_timeout = %" PRId64, c->statement_timeout_ms);
        r->blob = strdup(sql);
        r->sql = r->blob;
        if (r->sql == NULL) {
            free_request(r);
        } else {
            q_push(q, r);
        }
    }
    for (size_t i = 0; i < c->nstmts; i++) {
        request *r = new_request();
        r->kind = REQ_PREPARE;
        r->stmt = c->stmts[i].name;
        r->sql = c->stmts[i].sql;
        q_push(q, r);
    }
}

static bool flush_out(jf_pgconn *c)
{
    int f = PQflush(c->pg);
    if (f < 0) {
        conn_lost(c, JF_PG_CONN, PQerrorMessage(c->pg));
        return false;
    }
    c->want_write = f == 1;
    int events = UV_READABLE | (c->want_write ? UV_WRITABLE : 0);
    if (!watch(c, PQsocket(c->pg), events, false)) {
        conn_lost(c, JF_PG_CONN, "cannot watch the socket");
        return false;
    }
    return true;
}

/* Connected: pipeline mode, the session setup first, then what waited. */
static void on_connected(jf_pgconn *c)
{
    if (PQsetnonblocking(c->pg, 1) != 0 || PQenterPipelineMode(c->pg) != 1) {
        conn_lost(c, JF_PG_CONN, PQerrorMessage(c->pg));
        return;
    }
    c->state = ST_READY;
    if (!watch(c, PQsocket(c->pg), UV_READABLE, true)) {
        conn_lost(c, JF_PG_CONN, "cannot watch the socket");
        return;
    }
    jf_log(c->was_ready || c->failed_attempts > 0 ? JF_LOG_INFO : JF_LOG_DEBUG,
           c->was_ready ? "postgres connection restored" : "postgres connected",
           JF_S("db", c->name), JF_I("attempts", c->failed_attempts + 1));
    c->was_ready = true;
    c->failed_attempts = 0;
    c->backoff_ms = 0;

    queue todo = {0};
    queue_setup(c, &todo);
    request *r;
    while ((r = q_pop(&c->unsent)) != NULL)
        q_push(&todo, r);
    while ((r = q_pop(&todo)) != NULL) {
        if (!send_request(c, r)) {
            /* conn_lost() failed what was in the queues; the rest too. */
            fail_later(c, r, JF_PG_CONN, "PostgreSQL connection lost while sending");
            while ((r = q_pop(&todo)) != NULL)
                fail_later(c, r, JF_PG_CONN, "PostgreSQL connection lost while sending");
            kick_defer(c);
            return;
        }
    }
    flush_out(c);
}

static void connect_step(jf_pgconn *c)
{
    switch (PQconnectPoll(c->pg)) {
    case PGRES_POLLING_READING:
        if (!watch(c, PQsocket(c->pg), UV_READABLE, true))
            conn_lost(c, JF_PG_CONN, "cannot watch the socket");
        return;
    case PGRES_POLLING_WRITING:
        if (!watch(c, PQsocket(c->pg), UV_WRITABLE, true))
            conn_lost(c, JF_PG_CONN, "cannot watch the socket");
        return;
    case PGRES_POLLING_OK:
        on_connected(c);
        return;
    default:
        conn_lost(c, JF_PG_CONN, PQerrorMessage(c->pg));
        return;
    }
}

/* Keywords before dbname are defaults the dsn may override; the ones after
 * it are needed by this code (JSON text must be UTF-8). */
static PGconn *pg_start(const char *dsn, bool blocking)
{
    const char *keys[] = {"fallback_application_name",
                          "connect_timeout",
                          "keepalives",
                          "keepalives_idle",
                          "keepalives_interval",
                          "keepalives_count",
                          "dbname",
                          "client_encoding",
                          NULL};
    const char *vals[] = {"jetfleet-consumer", "10", "1", "10", "5", "3", dsn, "UTF8", NULL};
    return blocking ? PQconnectdbParams(keys, vals, 1) : PQconnectStartParams(keys, vals, 1);
}

static void start_connect(jf_pgconn *c)
{
    c->state = ST_CONNECTING;
    c->connect_start_ns = now_ns();
    c->pg = pg_start(c->dsn, false);
    if (c->pg == NULL) {
        conn_lost(c, JF_PG_CONN, "out of memory");
        return;
    }
    if (PQstatus(c->pg) == CONNECTION_BAD) {
        conn_lost(c, JF_PG_CONN, PQerrorMessage(c->pg));
        return;
    }
    PQsetNoticeReceiver(c->pg, on_notice, c);
    /* libpq: before the first PQconnectPoll, act as if it asked to write. */
    if (!watch(c, PQsocket(c->pg), UV_WRITABLE, true))
        conn_lost(c, JF_PG_CONN, "cannot watch the socket");
}

static void on_retry(uv_timer_t *t)
{
    jf_pgconn *c = t->data;
    if (c->state == ST_WAITING)
        start_connect(c);
}

static void on_tick(uv_timer_t *t)
{
    jf_pgconn *c = t->data;
    uint64_t now = now_ns();
    if (c->state == ST_CONNECTING) {
        /* libpq's connect_timeout does not apply to PQconnectPoll. */
        if (now - c->connect_start_ns > (uint64_t)CONNECT_TIMEOUT_MS * 1000000u)
            conn_lost(c, JF_PG_TIMEOUT, "connect timed out");
        return;
    }
    if (c->state != ST_READY || c->sent.head == NULL || c->statement_timeout_ms <= 0)
        return;
    /* The head has been the statement the server works on since `since`;
     * the server itself cancels it at statement_timeout. */
    uint64_t limit = (uint64_t)(c->statement_timeout_ms + ANSWER_GRACE_MS) * 1000000u;
    if (now - c->sent.head->since_ns > limit) {
        char why[128];
        snprintf(why, sizeof why, "no answer from PostgreSQL in %" PRId64 " ms",
                 c->statement_timeout_ms + ANSWER_GRACE_MS);
        conn_lost(c, JF_PG_TIMEOUT, why);
    }
}

/* ---- requests in the pipeline ----------------------------------------- */

static bool send_request(jf_pgconn *c, request *r)
{
    int ok;
    switch (r->kind) {
    case REQ_PREPARE:
        ok = PQsendPrepare(c->pg, r->stmt, r->sql, 0, NULL);
        break;
    case REQ_SET:
        ok = PQsendQueryParams(c->pg, r->sql, 0, NULL, NULL, NULL, NULL, 0);
        break;
    case REQ_USER:
    default:
        ok = r->stmt != NULL
                 ? PQsendQueryPrepared(c->pg, r->stmt, r->nparams, r->params, NULL, NULL, 0)
                 : PQsendQueryParams(c->pg, r->sql, r->nparams, NULL, r->params, NULL, NULL, 0);
        break;
    }
    if (ok != 1 || PQpipelineSync(c->pg) != 1) {
        char why[ERROR_MAX];
        one_line(why, sizeof why, PQerrorMessage(c->pg));
        conn_lost(c, JF_PG_CONN, why);
        return false;
    }
    if (c->sent.head == NULL)
        r->since_ns = now_ns();
    q_push(&c->sent, r);
    return true;
}

static bool is_error_status(ExecStatusType s)
{
    return s == PGRES_FATAL_ERROR || s == PGRES_NONFATAL_ERROR || s == PGRES_BAD_RESPONSE ||
           s == PGRES_PIPELINE_ABORTED;
}

/* The Sync of the head arrived: its transaction is over. */
static void complete_head(jf_pgconn *c)
{
    request *r = q_pop(&c->sent);
    if (c->sent.head != NULL)
        c->sent.head->since_ns = now_ns();

    jf_pg_reply rep = {0};
    char err[ERROR_MAX];
    err[0] = '\0';
    if (r->res == NULL) {
        rep.outcome = JF_PG_SQL_ERROR;
        snprintf(err, sizeof err, "%s: no result from PostgreSQL", c->name);
    } else if (is_error_status(PQresultStatus(r->res))) {
        rep.outcome = JF_PG_SQL_ERROR;
        rep.res = r->res;
        rep.sqlstate = PQresultErrorField(r->res, PG_DIAG_SQLSTATE);
        const char *primary = PQresultErrorField(r->res, PG_DIAG_MESSAGE_PRIMARY);
        char line[ERROR_MAX - 16];
        one_line(line, sizeof line, primary ? primary : PQresultErrorMessage(r->res));
        if (rep.sqlstate != NULL)
            snprintf(err, sizeof err, "%s (SQLSTATE %s)", line, rep.sqlstate);
        else
            snprintf(err, sizeof err, "%s", line);
    } else {
        rep.outcome = JF_PG_OK;
        rep.res = r->res;
    }
    rep.error = rep.outcome == JF_PG_OK ? NULL : err;

    if (r->kind != REQ_USER) {
        if (rep.outcome != JF_PG_OK) {
            /* The session is not what the requests behind expect. */
            char why[ERROR_MAX + 64];
            snprintf(why, sizeof why, "session setup failed (%s): %s",
                     r->kind == REQ_SET ? "statement_timeout" : r->stmt, err);
            jf_log(JF_LOG_ERROR, "postgres session setup failed", JF_S("db", c->name),
                   JF_S("statement", r->kind == REQ_SET ? "statement_timeout" : r->stmt),
                   JF_S("error", err));
            free_request(r);
            conn_lost(c, JF_PG_CONN, why);
            return;
        }
        free_request(r);
        return;
    }
    r->cb(r->arg, &rep);
    free_request(r);
}

static void read_results(jf_pgconn *c)
{
    while (c->state == ST_READY && !PQisBusy(c->pg)) {
        PGresult *res = PQgetResult(c->pg);
        request *h = c->sent.head;
        if (res == NULL) {
            /* In pipeline mode a NULL ends one statement's results; with
             * nothing further it means libpq has nothing more for now. */
            if (h != NULL && h->res != NULL && !h->ended) {
                h->ended = true;
                continue;
            }
            break;
        }
        ExecStatusType s = PQresultStatus(res);
        if (h == NULL) {
            PQclear(res); /* nothing asked: not ours to report */
            continue;
        }
        if (s == PGRES_PIPELINE_SYNC) {
            PQclear(res);
            complete_head(c);
            continue;
        }
        /* Keep the first result, unless an error (e.g. at commit) follows. */
        if (h->res == NULL) {
            h->res = res;
        } else if (is_error_status(s) && !is_error_status(PQresultStatus(h->res))) {
            PQclear(h->res);
            h->res = res;
        } else {
            PQclear(res);
        }
    }
    if (c->state == ST_READY && PQstatus(c->pg) == CONNECTION_BAD)
        conn_lost(c, JF_PG_CONN, PQerrorMessage(c->pg));
}

static void on_poll(uv_poll_t *h, int status, int events)
{
    jf_pgconn *c = h->data;
    if (c->poll == NULL || &c->poll->h != h)
        return; /* a stale handle being closed */
    if (c->state == ST_CONNECTING) {
        connect_step(c); /* PQconnectPoll finds any socket error itself */
        return;
    }
    if (c->state != ST_READY)
        return;
    if (status < 0) {
        /* libuv says EBADF for any POLLERR/POLLHUP; libpq can tell what
         * happened (server closed the connection, admin shutdown…). */
        bool lp = PQconsumeInput(c->pg) != 1 && PQerrorMessage(c->pg)[0] != '\0';
        conn_lost(c, JF_PG_CONN, lp ? PQerrorMessage(c->pg) : "socket error");
        return;
    }
    if (events & UV_READABLE) {
        if (PQconsumeInput(c->pg) != 1) {
            conn_lost(c, JF_PG_CONN, PQerrorMessage(c->pg));
            return;
        }
        PGnotify *n;
        while ((n = PQnotifies(c->pg)) != NULL)
            PQfreemem(n);
        read_results(c);
        if (c->state != ST_READY)
            return;
    }
    if (c->want_write || (events & UV_WRITABLE))
        flush_out(c);
}

/* ---- public: one connection ------------------------------------------- */

/* Creation runs in two phases so that a failed blocking connect (of any
 * connection of a pool) leaves no libuv handle behind: conn_new() allocates
 * and, with connect_now, connects and sets up; conn_attach() puts the
 * connection on the loop. Until attached, conn_free() undoes conn_new(). */

static void conn_free(jf_pgconn *c)
{
    if (c == NULL)
        return;
    if (c->pg != NULL)
        PQfinish(c->pg);
    free(c->dsn);
    free(c->name);
    for (size_t i = 0; i < c->nstmts; i++) {
        free((char *)c->stmts[i].name);
        free((char *)c->stmts[i].sql);
    }
    free(c->stmts);
    free(c);
}

static void handle_closed(uv_handle_t *h)
{
    jf_pgconn *c = h->data;
    if (--c->open_handles == 0)
        conn_free(c);
}

static jf_status exec_sync(jf_pgconn *c, PGresult *res, const char *what, jf_error *err)
{
    bool ok = PQresultStatus(res) == PGRES_COMMAND_OK;
    if (!ok) {
        char line[ERROR_MAX];
        one_line(line, sizeof line, res ? PQresultErrorMessage(res) : PQerrorMessage(c->pg));
        jf_error_set(err, "%s: %s: %s", c->name, what, line);
    }
    PQclear(res);
    return ok ? JF_OK : JF_ERR_IO;
}

/* connect_now: connect, set up, then non-blocking pipeline mode. */
static jf_status connect_blocking(jf_pgconn *c, jf_error *err)
{
    char line[ERROR_MAX];
    jf_status st;
    c->pg = pg_start(c->dsn, true);
    if (c->pg == NULL) {
        jf_error_set(err, "%s: out of memory connecting to PostgreSQL", c->name);
        return JF_ERR_NOMEM;
    }
    if (PQstatus(c->pg) != CONNECTION_OK) {
        one_line(line, sizeof line, PQerrorMessage(c->pg));
        jf_error_set(err, "%s: cannot connect to PostgreSQL: %s", c->name, line);
        return JF_ERR_IO;
    }
    PQsetNoticeReceiver(c->pg, on_notice, c);
    if (c->statement_timeout_ms > 0) {
        char sql[96];
        snprintf(sql, sizeof sql, "SET statement_timeout = %" PRId64, c->statement_timeout_ms);
        st = exec_sync(c, PQexec(c->pg, sql), "cannot set statement_timeout", err);
        if (st != JF_OK)
            return st;
    }
    for (size_t i = 0; i < c->nstmts; i++) {
        char what[128];
        snprintf(what, sizeof what, "cannot prepare statement %s", c->stmts[i].name);
        st = exec_sync(c, PQprepare(c->pg, c->stmts[i].name, c->stmts[i].sql, 0, NULL), what, err);
        if (st != JF_OK)
            return st;
    }
    if (PQsetnonblocking(c->pg, 1) != 0 || PQenterPipelineMode(c->pg) != 1) {
        one_line(line, sizeof line, PQerrorMessage(c->pg));
        jf_error_set(err, "%s: cannot enter pipeline mode: %s", c->name, line);
        return JF_ERR_IO;
    }
    return JF_OK;
}

static jf_status conn_new(jf_pgconn **out, uv_loop_t *loop, const jf_pgconn_options *opts,
                          jf_error *err)
{
    const char *name = opts->name ? opts->name : "postgres";
    if (opts->dsn == NULL || opts->dsn[0] == '\0') {
        jf_error_set(err, "%s: no PostgreSQL dsn", name);
        return JF_ERR_INVALID;
    }
    /* Refuse a dsn libpq cannot parse now rather than at every attempt.
     * libpq's message may quote part of it, a password perhaps: not shown. */
    char *perr = NULL;
    PQconninfoOption *parsed = PQconninfoParse(opts->dsn, &perr);
    if (parsed == NULL) {
        PQfreemem(perr);
        jf_error_set(err, "%s: dsn is not a valid PostgreSQL connection string or URI", name);
        return JF_ERR_INVALID;
    }
    PQconninfoFree(parsed);
    if (opts->nstatements > 64) {
        jf_error_set(err, "%s: too many prepared statements", name);
        return JF_ERR_INVALID;
    }

    jf_pgconn *c = calloc(1, sizeof *c);
    if (c == NULL)
        goto nomem;
    c->loop = loop;
    c->poll_fd = -1;
    c->state = ST_WAITING;
    c->statement_timeout_ms = opts->statement_timeout_ms;
    c->dsn = strdup(opts->dsn);
    c->name = strdup(name);
    if (c->dsn == NULL || c->name == NULL)
        goto nomem;
    if (opts->nstatements > 0) {
        c->stmts = calloc(opts->nstatements, sizeof *c->stmts);
        if (c->stmts == NULL)
            goto nomem;
        for (size_t i = 0; i < opts->nstatements; i++) {
            c->stmts[i].name = dupstr(opts->statements[i].name);
            c->stmts[i].sql = dupstr(opts->statements[i].sql);
            c->nstmts++;
            if (c->stmts[i].name == NULL || c->stmts[i].sql == NULL)
                goto nomem;
        }
    }
    if (opts->connect_now) {
        jf_status st = connect_blocking(c, err);
        if (st != JF_OK) {
            conn_free(c);
            return st;
        }
    }
    *out = c;
    return JF_OK;

nomem:
    conn_free(c);
    jf_error_set(err, "%s: out of memory", name);
    return JF_ERR_NOMEM;
}

static void conn_attach(jf_pgconn *c)
{
    uv_timer_init(c->loop, &c->tick);
    uv_timer_init(c->loop, &c->retry);
    uv_timer_init(c->loop, &c->defer);
    c->tick.data = c->retry.data = c->defer.data = c;
    c->open_handles = 3;
    uv_timer_start(&c->tick, on_tick, TICK_MS, TICK_MS);
    if (c->pg == NULL) {
        start_connect(c);
        return;
    }
    c->state = ST_READY;
    c->was_ready = true;
    if (!watch(c, PQsocket(c->pg), UV_READABLE, true)) {
        conn_lost(c, JF_PG_CONN, "cannot watch the socket");
        return;
    }
    jf_log(JF_LOG_DEBUG, "postgres connected", JF_S("db", c->name), JF_I("attempts", 1));
}

jf_status jf_pgconn_create(jf_pgconn **out, uv_loop_t *loop, const jf_pgconn_options *opts,
                           jf_error *err)
{
    jf_pgconn *c = NULL;
    jf_status st = conn_new(&c, loop, opts, err);
    if (st != JF_OK)
        return st;
    conn_attach(c);
    *out = c;
    return JF_OK;
}

void jf_pgconn_destroy(jf_pgconn *c)
{
    if (c == NULL || c->state == ST_CLOSED)
        return;
    c->state = ST_CLOSED;
    close_pg(c);
    uv_close((uv_handle_t *)&c->tick, handle_closed);
    uv_close((uv_handle_t *)&c->retry, handle_closed);
    uv_close((uv_handle_t *)&c->defer, handle_closed);
    /* Callbacks may queue more requests meanwhile (they land in `done`
     * failed as closed): drain until nothing is left. */
    for (;;) {
        request *r = q_pop(&c->sent);
        if (r == NULL)
            r = q_pop(&c->unsent);
        if (r == NULL)
            r = q_pop(&c->done);
        if (r == NULL)
            break;
        if (r->kind != REQ_USER) {
            free_request(r);
            continue;
        }
        snprintf(r->error, sizeof r->error, "%s: closed", c->name);
        call_failed(r, JF_PG_CLOSED);
    }
}

void jf_pgconn_exec(jf_pgconn *c, const char *stmt, const char *sql, int nparams,
                    const char *const *params, const size_t *lengths, jf_pg_cb cb, void *arg)
{
    request *r = new_request();
    r->kind = REQ_USER;
    r->cb = cb;
    r->arg = arg;

    const char *why = NULL;
    if (nparams < 0 || nparams > JF_PG_MAX_PARAMS || (stmt == NULL) == (sql == NULL)) {
        why = "bad request (statement or parameters)";
    } else if (stmt != NULL) {
        for (size_t i = 0; i < c->nstmts && r->stmt == NULL; i++)
            if (strcmp(c->stmts[i].name, stmt) == 0)
                r->stmt = c->stmts[i].name;
        if (r->stmt == NULL)
            why = "unknown prepared statement";
    }
    /* One block for the sql text and the values, each NUL-terminated as
     * libpq wants text parameters. */
    size_t lens[JF_PG_MAX_PARAMS];
    size_t total = sql ? strlen(sql) + 1 : 0;
    for (int i = 0; why == NULL && i < nparams; i++) {
        lens[i] = params[i] == NULL ? 0 : lengths ? lengths[i] : strlen(params[i]);
        if (params[i] != NULL)
            total += lens[i] + 1;
    }
    if (why == NULL && total > 0) {
        r->blob = malloc(total);
        if (r->blob == NULL)
            why = "out of memory";
    }
    r->nparams = why == NULL ? nparams : 0;
    if (why == NULL && r->blob != NULL) {
        char *p = r->blob;
        if (sql != NULL) {
            memcpy(p, sql, strlen(sql) + 1);
            r->sql = p;
            p += strlen(sql) + 1;
        }
        for (int i = 0; i < nparams; i++) {
            if (params[i] == NULL) {
                r->params[i] = NULL;
                continue;
            }
            memcpy(p, params[i], lens[i]);
            p[lens[i]] = '\0';
            r->params[i] = p;
            p += lens[i] + 1;
        }
    }

    if (why != NULL) {
        char msg[ERROR_MAX];
        snprintf(msg, sizeof msg, "%s: %s", c->name, why);
        fail_later(c, r, JF_PG_INVALID, msg);
        kick_defer(c);
        return;
    }
    switch (c->state) {
    case ST_READY:
        if (send_request(c, r))
            flush_out(c);
        else
            fail_later(c, r, JF_PG_CONN, "PostgreSQL connection lost while sending");
        kick_defer(c);
        return;
    case ST_CONNECTING:
        q_push(&c->unsent, r);
        return;
    case ST_WAITING:
        /* Someone wants the database (a breaker's probe, say): try now
         * rather than at the end of the backoff, but not more often than
         * BACKOFF_MIN_MS, so a burst of requests does not become a burst of
         * connects to a server that is down. */
        if (now_ns() - c->connect_start_ns >= (uint64_t)BACKOFF_MIN_MS * 1000000u) {
            uv_timer_stop(&c->retry);
            start_connect(c);
        }
        if (c->state == ST_CONNECTING) {
            q_push(&c->unsent, r);
            return;
        }
        fail_later(c, r, JF_PG_CONN, c->last_error[0] ? c->last_error : "no PostgreSQL connection");
        kick_defer(c);
        return;
    case ST_CLOSED:
    default:
        snprintf(r->error, sizeof r->error, "%s: closed", c->name);
        r->outcome = JF_PG_CLOSED;
        q_push(&c->done, r); /* destroy() is draining `done` right now */
        return;
    }
}

bool jf_pgconn_ready(const jf_pgconn *c)
{
    return c != NULL && c->state == ST_READY;
}

size_t jf_pgconn_pending(const jf_pgconn *c)
{
    return c->sent.n + c->unsent.n;
}

/* ---- pool -------------------------------------------------------------- */

jf_status jf_pgpool_create(jf_pgpool **out, uv_loop_t *loop, const jf_pgconn_options *opts, int n,
                           jf_error *err)
{
    const char *name = opts->name ? opts->name : "postgres";
    if (n < 1 || n > 1024) {
        jf_error_set(err, "%s: connections must be 1..1024, not %d", name, n);
        return JF_ERR_INVALID;
    }
    jf_pgpool *p = calloc(1, sizeof *p);
    if (p == NULL || (p->conns = calloc((size_t)n, sizeof *p->conns)) == NULL) {
        free(p);
        jf_error_set(err, "%s: out of memory", name);
        return JF_ERR_NOMEM;
    }
    for (int i = 0; i < n; i++) {
        jf_status st = conn_new(&p->conns[i], loop, opts, err);
        if (st != JF_OK) {
            for (int k = 0; k < i; k++)
                conn_free(p->conns[k]);
            free(p->conns);
            free(p);
            return st;
        }
    }
    for (int i = 0; i < n; i++)
        conn_attach(p->conns[i]);
    p->n = n;
    *out = p;
    return JF_OK;
}

void jf_pgpool_destroy(jf_pgpool *p)
{
    if (p == NULL)
        return;
    for (int i = 0; i < p->n; i++)
        jf_pgconn_destroy(p->conns[i]);
    free(p->conns);
    free(p);
}

static int rank(const jf_pgconn *c)
{
    switch (c->state) {
    case ST_READY:
        return 0;
    case ST_CONNECTING:
        return 1;
    default:
        return 2;
    }
}

void jf_pgpool_exec(jf_pgpool *p, const char *stmt, const char *sql, int nparams,
                    const char *const *params, const size_t *lengths, jf_pg_cb cb, void *arg)
{
    /* A slow statement holds its connection's whole pipeline, so the least
     * loaded ready connection goes first; the rotation spreads ties. */
    int best = p->next % p->n;
    for (int k = 0; k < p->n; k++) {
        int i = (p->next + k) % p->n;
        const jf_pgconn *c = p->conns[i], *b = p->conns[best];
        if (rank(c) < rank(b) ||
            (rank(c) == rank(b) && jf_pgconn_pending(c) < jf_pgconn_pending(b)))
            best = i;
    }
    p->next = (best + 1) % p->n;
    jf_pgconn_exec(p->conns[best], stmt, sql, nparams, params, lengths, cb, arg);
}

void jf_pgpool_fail(jf_pgpool *p, const char *error, jf_pg_cb cb, void *arg)
{
    jf_pgconn *c = p->conns[0];
    request *r = new_request();
    r->kind = REQ_USER;
    r->cb = cb;
    r->arg = arg;
    fail_later(c, r, JF_PG_INVALID, error);
    kick_defer(c);
}

size_t jf_pgpool_ready_count(const jf_pgpool *p)
{
    size_t n = 0;
    for (int i = 0; i < p->n; i++)
        n += jf_pgconn_ready(p->conns[i]);
    return n;
}

/* ---- SQLSTATE ---------------------------------------------------------- */

bool jf_pg_sqlstate_retryable(const char *s)
{
    if (s == NULL || strlen(s) != 5)
        return false;
    if (strncmp(s, "08", 2) == 0 || strncmp(s, "53", 2) == 0 || strncmp(s, "58", 2) == 0)
        return true;
    if (strncmp(s, "57P0", 4) == 0)
        return true;
    return strcmp(s, "40001") == 0 || strcmp(s, "40P01") == 0 || strcmp(s, "55P03") == 0 ||
           strcmp(s, "57014") == 0;
}
