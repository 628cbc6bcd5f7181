/* ledger.c — the PostgreSQL ledger (see ledger.h) on a pool of pgconn
 * connections.
 *
 * Start-up (blocking, before the loop runs): one connection applies the
 * missing migrations under an advisory lock, then the pool connects and
 * prepares the two statements below on every connection.
 *
 * begin tells the status the row had before it, exactly, without a read
 * that could race with another process: an upsert's row has xmax = 0 only
 * when it was inserted, and when it was updated its status after the update
 * equals its status before (a final status is kept; anything else was, and
 * stays, 'running'). A final row is left exactly as it was — except by the
 * first delivery of a replayed or re-driven message ($7, keyed on the
 * message's stream_seq so that its redeliveries are plain attempts), which
 * resets the row to running and reports running: the job is run again.
 *
 * finish never touches a succeeded or dead row (the WHERE of DO UPDATE): a
 * late outcome of a delivery that outlived ack_wait (a paused process) must
 * not turn a dead-lettered job back to running or succeeded; it inserts
 * the row of a job dead-lettered before any call (attempts 0). */
#include "ledger.h"

#include <dirent.h>
#include <inttypes.h>
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "log.h"
#include "pgconn.h"
#include "rfc3339.h"

#define MIGRATION_MAX_BYTES (1024 * 1024)
#define MIGRATIONS_MAX      1000
#define LEDGER_ERROR_MAX    1000 /* bytes of an error stored in a row */
/* pg_advisory_lock key of the migration step (an arbitrary constant of ours). */
#define MIGRATION_LOCK_KEY "7658147961013605"

#define STMT_BEGIN  "jf_ledger_begin"
#define STMT_FINISH "jf_ledger_finish"

/* R below is "$7 AND j.stream_seq IS DISTINCT FROM EXCLUDED.stream_seq":
 * this delivery is the first of a replayed or re-driven message. SET's
 * right-hand sides all read the row as it was before the update. */
#define SQL_REPLAY_RESET "($7::boolean AND j.stream_seq IS DISTINCT FROM EXCLUDED.stream_seq)"

/* What begin does to an existing row; R says whether this delivery resets
 * it (a replay's first delivery). */
#define SQL_BEGIN_CONFLICT(R)                                                                      \
    " ON CONFLICT (job_id) DO UPDATE SET"                                                          \
    "  attempts = CASE WHEN " R " THEN 1"                                                          \
    "                  WHEN j.status IN ('succeeded', 'dead') THEN j.attempts"                     \
    "                  ELSE j.attempts + 1 END,"                                                   \
    "  replays = CASE WHEN " R " THEN j.replays + 1 ELSE j.replays END,"                          \
    "  replayed_at = CASE WHEN " R " THEN now() ELSE j.replayed_at END,"                          \
    "  error = CASE WHEN " R " THEN NULL ELSE j.error END,"                                        \
    "  finished_at = CASE WHEN " R " THEN NULL ELSE j.finished_at END,"                           \
    "  status = CASE WHEN " R " THEN 'running'"                                                    \
    "                WHEN j.status IN ('succeeded', 'dead') THEN j.status ELSE 'running' END,"    \
    "  stream_seq = CASE WHEN " R " THEN EXCLUDED.stream_seq"                                      \
    "                    WHEN j.status IN ('succeeded', 'dead') THEN j.stream_seq"                 \
    "                    ELSE EXCLUDED.stream_seq END,"                                            \
    "  updated_at = CASE WHEN " R " OR j.status NOT IN ('succeeded', 'dead')"                     \
    "                    THEN now() ELSE j.updated_at END"

/* What finish does to an existing row: never touch a final one. */
#define SQL_FINISH_CONFLICT                                                                        \
    " ON CONFLICT (job_id) DO UPDATE SET"                                                          \
    "  status = EXCLUDED.status,"                                                                  \
    "  result = EXCLUDED.result,"                                                                  \
    "  error = EXCLUDED.error,"                                                                    \
    "  stream_seq = EXCLUDED.stream_seq,"                                                          \
    "  finished_at = EXCLUDED.finished_at,"                                                        \
    "  updated_at = now()"                                                                         \
    " WHERE j.status NOT IN ('succeeded', 'dead')"

static const char SQL_BEGIN[] =
    "INSERT INTO jetfleet_jobs AS j (job_id, service, priority, type, tenant, status, attempts,"
    " stream_seq, replays, replayed_at)"
    " VALUES ($1::text, $2::text, coalesce($3::text, 'normal'), $4::text, $5::text, 'running', 1,"
    " $6::bigint, CASE WHEN $7::boolean THEN 1 ELSE 0 END, CASE WHEN $7::boolean THEN now() END)"
    SQL_BEGIN_CONFLICT(SQL_REPLAY_RESET)
    " RETURNING (j.xmax = 0) AS inserted, j.status, j.attempts";

static const char SQL_FINISH[] =
    "INSERT INTO jetfleet_jobs AS j (job_id, service, priority, type, tenant, status, attempts,"
    " result, error, stream_seq, finished_at)"
    " VALUES ($1::text, $2::text, coalesce($3::text, 'normal'), $4::text, $5::text, $6::text, 0,"
    " $7::jsonb, $8::text, $9::bigint,"
    " CASE WHEN $6::text IN ('succeeded', 'dead') THEN now() END)"
    SQL_FINISH_CONFLICT;

/* The same two statements for many jobs at once (see "batches" below):
 * arrays of the single-row parameters, unnested into rows. A replay is told
 * by the row proposed for insertion (replays = 1 only for a replay). */
#define STMT_BEGIN_MANY  "jf_ledger_begin_many"
#define STMT_FINISH_MANY "jf_ledger_finish_many"
#define SQL_REPLAY_RESET_MANY                                                                      \
    "(EXCLUDED.replays = 1 AND j.stream_seq IS DISTINCT FROM EXCLUDED.stream_seq)"

static const char SQL_BEGIN_MANY[] =
    "INSERT INTO jetfleet_jobs AS j (job_id, service, priority, type, tenant, status, attempts,"
    " stream_seq, replays, replayed_at)"
    " SELECT u.job_id, u.service, coalesce(u.priority, 'normal'), u.type, u.tenant, 'running', 1,"
    " u.stream_seq, CASE WHEN u.replay THEN 1 ELSE 0 END, CASE WHEN u.replay THEN now() END"
    " FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[],"
    " $7::boolean[]) AS u(job_id, service, priority, type, tenant, stream_seq, replay)"
    SQL_BEGIN_CONFLICT(SQL_REPLAY_RESET_MANY)
    " RETURNING j.job_id, (j.xmax = 0) AS inserted, j.status, j.attempts";

static const char SQL_FINISH_MANY[] =
    "INSERT INTO jetfleet_jobs AS j (job_id, service, priority, type, tenant, status, attempts,"
    " result, error, stream_seq, finished_at)"
    " SELECT u.job_id, u.service, coalesce(u.priority, 'normal'), u.type, u.tenant, u.status, 0,"
    " u.result::jsonb, u.error, u.stream_seq,"
    " CASE WHEN u.status IN ('succeeded', 'dead') THEN now() END"
    " FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],"
    " $7::text[], $8::text[], $9::bigint[])"
    " AS u(job_id, service, priority, type, tenant, status, result, error, stream_seq)"
    SQL_FINISH_CONFLICT;

static const jf_pg_statement STATEMENTS[] = {
    {STMT_BEGIN, SQL_BEGIN},
    {STMT_FINISH, SQL_FINISH},
    {STMT_BEGIN_MANY, SQL_BEGIN_MANY},
    {STMT_FINISH_MANY, SQL_FINISH_MANY},
};

/* Batches: the requests made during one turn of the loop go out together,
 * one statement (one transaction, one commit) per kind, when the turn ends
 * (a check handle, with an idle handle so the loop does not block in
 * between). At 64 jobs in flight that is a few statements per turn instead
 * of two per job, and PostgreSQL's cost per statement and per commit is
 * most of the ledger path's. A batch never holds the same job twice (ON
 * CONFLICT cannot touch a row twice in one statement: the first batch is
 * sent, a new one starts) and stays under BATCH_MAX jobs and BATCH_BYTES.
 * A batch the server refuses for its content (an SQL error that is not a
 * fault of the server) is re-sent job by job, so one bad row fails only
 * its own job. A batch of one uses the single-row statement. */
#define BATCH_MAX   128
#define BATCH_BYTES (1024 * 1024)
#define MAX_COLS    9

enum { KIND_BEGIN, KIND_FINISH, KIND_COUNT };

typedef struct lreq lreq;

typedef struct bentry {
    lreq *q;
    char *blk;                   /* one allocation holding the copies below */
    const char *param[MAX_COLS]; /* the single-row statement's parameters */
} bentry;

typedef struct batch {
    bentry e[BATCH_MAX];
    int n;
    size_t bytes;
} batch;

/* What a sent batch needs to hand each job its answer. */
typedef struct sent {
    struct jf_ledger *l;
    int kind, n;
    bentry e[];
} sent;

struct jf_ledger {
    uv_loop_t *loop;
    jf_pgpool *pool;
    jf_breaker *breaker;
    uv_check_t check; /* sends the batches at the end of a loop turn */
    uv_idle_t idle;   /* keeps the loop from blocking while a batch waits */
    int handles_open;
    bool closing;
    batch batches[KIND_COUNT];
};

struct lreq {
    jf_ledger *l;
    jf_ledger_begin_cb begin_cb; /* one of the two */
    jf_ledger_done_cb done_cb;
    void *arg;
    bool counted; /* the breaker let it through: its outcome is recorded */
    uint64_t t0_ns;
};

const char *jf_ledger_status_name(jf_ledger_status s)
{
    switch (s) {
    case JF_LEDGER_NONE:
        return "none";
    case JF_LEDGER_RUNNING:
        return "running";
    case JF_LEDGER_SUCCEEDED:
        return "succeeded";
    case JF_LEDGER_DEAD:
        return "dead";
    }
    return "none";
}

/* ---- migrations (blocking, at start) ---------------------------------- */

static void quiet_notice(void *arg, const PGresult *res)
{
    (void)arg;
    (void)res; /* "relation … already exists, skipping" and the like */
}

static void first_line(char *dst, size_t cap, const char *src)
{
    size_t n = 0;
    for (const char *s = src ? src : ""; *s && n + 1 < cap; s++)
        dst[n++] = (*s == '\n' || *s == '\r' || *s == '\t') ? ' ' : *s;
    while (n > 0 && dst[n - 1] == ' ')
        n--;
    dst[n] = '\0';
}

static jf_status run_sql(PGconn *pg, const char *sql, const char *what, jf_error *err)
{
    PGresult *res = PQexec(pg, sql);
    ExecStatusType s = PQresultStatus(res);
    if (s == PGRES_COMMAND_OK || s == PGRES_TUPLES_OK) {
        PQclear(res);
        return JF_OK;
    }
    char line[400];
    first_line(line, sizeof line, res ? PQresultErrorMessage(res) : PQerrorMessage(pg));
    const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    const char *primary = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : NULL;
    /* insufficient_privilege: a least-privilege role met a schema that is
     * not (fully) migrated; say who must migrate instead of only "denied". */
    if (state != NULL && strcmp(state, "42501") == 0 && primary != NULL) {
        first_line(line, sizeof line, primary);
        jf_error_set(err, "ledger: %s: %s: migrations must be applied by a role that may create "
                     "tables (start one consumer with the schema owner's dsn first)", what, line);
        PQclear(res);
        return JF_ERR_IO;
    }
    PQclear(res);
    jf_error_set(err, "ledger: %s: %s", what, line);
    return JF_ERR_IO;
}

static int cmp_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static bool is_dir(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISDIR(sb.st_mode);
}

/* The *.sql names of dir, sorted; the caller frees them. */
static jf_status list_migrations(const char *dir, char ***out, size_t *n_out, jf_error *err)
{
    DIR *d = opendir(dir);
    if (d == NULL) {
        jf_error_set(err, "ledger: cannot open migrations directory %s", dir);
        return JF_ERR_NOTFOUND;
    }
    char **names = NULL;
    size_t n = 0, cap = 0;
    jf_status st = JF_OK;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        size_t len = strlen(e->d_name);
        if (len <= 4 || e->d_name[0] == '.' || strcmp(e->d_name + len - 4, ".sql") != 0)
            continue;
        if (n == MIGRATIONS_MAX) {
            jf_error_set(err, "ledger: more than %d migrations in %s", MIGRATIONS_MAX, dir);
            st = JF_ERR_INVALID;
            break;
        }
        if (n == cap) {
            size_t ncap = cap ? cap * 2 : 16;
            char **nn = realloc(names, ncap * sizeof *nn);
            if (nn == NULL) {
                st = JF_ERR_NOMEM;
                break;
            }
            names = nn;
            cap = ncap;
        }
        if ((names[n] = strdup(e->d_name)) == NULL) {
            st = JF_ERR_NOMEM;
            break;
        }
        n++;
    }
    closedir(d);
    if (st == JF_OK && n == 0) {
        jf_error_set(err, "ledger: no *.sql migrations in %s", dir);
        st = JF_ERR_NOTFOUND;
    }
    if (st != JF_OK) {
        if (st == JF_ERR_NOMEM)
            jf_error_set(err, "ledger: out of memory listing %s", dir);
        for (size_t i = 0; i < n; i++)
            free(names[i]);
        free(names);
        return st;
    }
    qsort(names, n, sizeof *names, cmp_names);
    *out = names;
    *n_out = n;
    return JF_OK;
}

static jf_status read_file(const char *path, char **out, jf_error *err)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        jf_error_set(err, "ledger: cannot read migration %s", path);
        return JF_ERR_IO;
    }
    char *buf = malloc(MIGRATION_MAX_BYTES + 1);
    if (buf == NULL) {
        fclose(f);
        jf_error_set(err, "ledger: out of memory reading %s", path);
        return JF_ERR_NOMEM;
    }
    size_t n = fread(buf, 1, MIGRATION_MAX_BYTES + 1, f);
    bool bad = ferror(f) != 0;
    fclose(f);
    if (bad || n > MIGRATION_MAX_BYTES || memchr(buf, '\0', n) != NULL) {
        free(buf);
        jf_error_set(err, "ledger: migration %s is unreadable, has NUL bytes or exceeds %d bytes",
                     path, MIGRATION_MAX_BYTES);
        return JF_ERR_INVALID;
    }
    buf[n] = '\0';
    *out = buf;
    return JF_OK;
}

static bool applied(PGconn *pg, const char *version, bool *out, jf_error *err)
{
    const char *params[] = {version};
    PGresult *res = PQexecParams(pg, "SELECT 1 FROM jetfleet_migrations WHERE version = $1", 1,
                                 NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        char line[400];
        first_line(line, sizeof line, PQresultErrorMessage(res));
        PQclear(res);
        jf_error_set(err, "ledger: reading jetfleet_migrations: %s", line);
        return false;
    }
    *out = PQntuples(res) > 0;
    PQclear(res);
    return true;
}

static jf_status apply_one(PGconn *pg, const char *dir, const char *file, jf_error *err)
{
    char version[256];
    size_t len = strlen(file) - 4;
    if (len >= sizeof version) {
        jf_error_set(err, "ledger: migration name too long: %s", file);
        return JF_ERR_INVALID;
    }
    memcpy(version, file, len);
    version[len] = '\0';

    bool done = false;
    if (!applied(pg, version, &done, err))
        return JF_ERR_IO;
    if (done)
        return JF_OK;

    char path[4096];
    if ((size_t)snprintf(path, sizeof path, "%s/%s", dir, file) >= sizeof path) {
        jf_error_set(err, "ledger: migration path too long: %s", file);
        return JF_ERR_INVALID;
    }
    char *sql = NULL;
    jf_status st = read_file(path, &sql, err);
    if (st != JF_OK)
        return st;

    char what[320];
    snprintf(what, sizeof what, "migration %s", file);
    st = run_sql(pg, "BEGIN", what, err);
    if (st == JF_OK)
        st = run_sql(pg, sql, what, err);
    if (st == JF_OK) {
        const char *params[] = {version};
        PGresult *res = PQexecParams(pg, "INSERT INTO jetfleet_migrations (version) VALUES ($1)", 1,
                                     NULL, params, NULL, NULL, 0);
        if (PQresultStatus(res) != PGRES_COMMAND_OK) {
            char line[400];
            first_line(line, sizeof line, PQresultErrorMessage(res));
            jf_error_set(err, "ledger: recording migration %s: %s", file, line);
            st = JF_ERR_IO;
        }
        PQclear(res);
    }
    if (st == JF_OK)
        st = run_sql(pg, "COMMIT", what, err);
    if (st != JF_OK)
        PQclear(PQexec(pg, "ROLLBACK"));
    free(sql);
    if (st == JF_OK)
        jf_log(JF_LOG_INFO, "ledger migration applied", JF_S("version", version),
               JF_S("path", path));
    return st;
}

static jf_status migrate(const char *dsn, jf_error *err)
{
    const char *dir = is_dir(JF_MIGRATIONS_DIR) ? JF_MIGRATIONS_DIR : JF_SOURCE_MIGRATIONS_DIR;
    char **files = NULL;
    size_t nfiles = 0;
    jf_status st = list_migrations(dir, &files, &nfiles, err);
    if (st != JF_OK)
        return st;

    const char *keys[] = {"fallback_application_name", "connect_timeout", "dbname",
                          "client_encoding", NULL};
    const char *vals[] = {"jetfleet-consumer", "10", dsn, "UTF8", NULL};
    PGconn *pg = PQconnectdbParams(keys, vals, 1);
    if (pg == NULL || PQstatus(pg) != CONNECTION_OK) {
        char line[400];
        first_line(line, sizeof line, pg ? PQerrorMessage(pg) : "out of memory");
        jf_error_set(err, "ledger: cannot connect to PostgreSQL: %s", line);
        st = JF_ERR_IO;
        goto out;
    }
    PQsetNoticeReceiver(pg, quiet_notice, NULL);
    /* Consumers starting together: one migrates, the others wait and then
     * find everything applied. The lock goes with the session. */
    st = run_sql(pg, "SELECT pg_advisory_lock(" MIGRATION_LOCK_KEY ")", "migration lock", err);
    if (st == JF_OK)
        st = run_sql(pg,
                     /* CREATE … IF NOT EXISTS needs CREATE on the schema even when
                      * the table exists; a role without DDL rights runs a current
                      * schema, so create only what is missing. */
                     "DO $$ BEGIN IF to_regclass('jetfleet_migrations') IS NULL THEN"
                     " CREATE TABLE jetfleet_migrations ("
                     " version text PRIMARY KEY,"
                     " applied_at timestamptz NOT NULL DEFAULT now()); END IF; END $$",
                     "creating jetfleet_migrations", err);
    for (size_t i = 0; st == JF_OK && i < nfiles; i++)
        st = apply_one(pg, dir, files[i], err);

out:
    PQfinish(pg);
    for (size_t i = 0; i < nfiles; i++)
        free(files[i]);
    free(files);
    return st;
}

/* ---- life cycle ------------------------------------------------------- */

jf_status jf_ledger_create(jf_ledger **out, uv_loop_t *loop, const jf_config *cfg, jf_error *err)
{
    if (cfg->postgres_dsn == NULL || cfg->postgres_dsn[0] == '\0') {
        jf_error_set(err, "ledger: [postgres] dsn is empty");
        return JF_ERR_INVALID;
    }
    jf_status st;
    jf_ledger *l = calloc(1, sizeof *l);
    if (l == NULL) {
        jf_error_set(err, "ledger: out of memory");
        return JF_ERR_NOMEM;
    }
    l->loop = loop;
    st = jf_breaker_create(&l->breaker, &cfg->ledger_breaker, err);
    if (st != JF_OK)
        goto fail;
    st = migrate(cfg->postgres_dsn, err);
    if (st != JF_OK)
        goto fail;
    jf_pgconn_options opts = {
        .dsn = cfg->postgres_dsn,
        .name = "ledger",
        .statement_timeout_ms = cfg->postgres_statement_timeout_ms,
        .statements = STATEMENTS,
        .nstatements = sizeof STATEMENTS / sizeof STATEMENTS[0],
        .connect_now = true,
    };
    st = jf_pgpool_create(&l->pool, loop, &opts,
                          cfg->postgres_connections > 0 ? cfg->postgres_connections : 1, err);
    if (st != JF_OK)
        goto fail;
    uv_check_init(loop, &l->check);
    uv_idle_init(loop, &l->idle);
    l->check.data = l;
    l->idle.data = l;
    l->handles_open = 2;
    jf_log(JF_LOG_INFO, "ledger ready", JF_I("connections", cfg->postgres_connections));
    *out = l;
    return JF_OK;

fail:
    jf_breaker_destroy(l->breaker);
    free(l);
    return st;
}

static void fail_entries(int kind, const bentry *e, int n, const jf_pg_reply *r);

static void on_handle_closed(uv_handle_t *h)
{
    jf_ledger *l = h->data;
    if (--l->handles_open == 0)
        free(l);
}

void jf_ledger_destroy(jf_ledger *l)
{
    if (l == NULL)
        return;
    /* Pending callbacks run now with JF_ERR_IO; they may still use l (and
     * what they ask for now goes straight to the pool, which fails it). */
    l->closing = true;
    jf_pg_reply closed = {.outcome = JF_PG_CLOSED, .error = "ledger: closed"};
    for (int k = 0; k < KIND_COUNT; k++) {
        batch *b = &l->batches[k];
        int n = b->n;
        b->n = 0;
        fail_entries(k, b->e, n, &closed);
        for (int i = 0; i < n; i++)
            free(b->e[i].blk);
    }
    jf_pgpool_destroy(l->pool);
    l->pool = NULL;
    jf_breaker_destroy(l->breaker);
    l->breaker = NULL;
    if (l->handles_open == 0) {
        free(l);
        return;
    }
    /* The memory goes when the loop has closed the two handles. */
    uv_close((uv_handle_t *)&l->check, on_handle_closed);
    uv_close((uv_handle_t *)&l->idle, on_handle_closed);
}

bool jf_ledger_available(jf_ledger *l, int64_t now_ms)
{
    return jf_breaker_state_at(l->breaker, now_ms) != JF_BREAKER_OPEN;
}

/* ---- requests --------------------------------------------------------- */

static lreq *new_lreq(jf_ledger *l, void *arg)
{
    lreq *q = calloc(1, sizeof *q);
    if (q == NULL) {
        /* As in pgconn.h: a callback that can never run would strand the
         * job; a crash gets it redelivered. */
        jf_log(JF_LOG_ERROR, "out of memory for a ledger request; aborting",
               JF_S("error", "calloc failed"));
        abort();
    }
    q->l = l;
    q->arg = arg;
    q->counted = jf_breaker_allow(l->breaker, jf_now_ms());
    q->t0_ns = uv_hrtime();
    return q;
}

static bool db_fault(const jf_pg_reply *r)
{
    switch (r->outcome) {
    case JF_PG_CONN:
    case JF_PG_TIMEOUT:
        return true;
    case JF_PG_SQL_ERROR:
        /* The server answered, but it is the server that is in trouble. */
        return r->sqlstate != NULL &&
               (strncmp(r->sqlstate, "08", 2) == 0 || strncmp(r->sqlstate, "53", 2) == 0 ||
                strncmp(r->sqlstate, "57", 2) == 0 || strncmp(r->sqlstate, "58", 2) == 0);
    default:
        return false;
    }
}

/* Records the outcome in the breaker; returns the status for the caller and
 * fills msg. */
static jf_status settle(lreq *q, const jf_pg_reply *r, char *msg, size_t cap)
{
    jf_ledger *l = q->l;
    if (q->counted) {
        if (r->outcome == JF_PG_CLOSED) {
            jf_breaker_cancel(l->breaker);
        } else {
            int64_t dur = (int64_t)((uv_hrtime() - q->t0_ns) / 1000000u);
            jf_breaker_record(l->breaker, jf_now_ms(), db_fault(r), dur);
        }
    }
    msg[0] = '\0';
    if (r->outcome == JF_PG_OK)
        return JF_OK;
    if (r->outcome == JF_PG_SQL_ERROR || r->outcome == JF_PG_INVALID)
        snprintf(msg, cap, "ledger: %s", r->error ? r->error : "error");
    else
        snprintf(msg, cap, "%s", r->error ? r->error : "ledger: error");
    bool timeout =
        r->outcome == JF_PG_TIMEOUT || (r->sqlstate != NULL && strcmp(r->sqlstate, "57014") == 0);
    return timeout ? JF_ERR_TIMEOUT : JF_ERR_IO;
}

/* Hands a begin its answer: row `row` of res, columns col0.. (inserted,
 * status, attempts), when st is JF_OK. */
static void answer_begin(lreq *q, jf_status st, const char *msg, const PGresult *res, int row,
                         int col0)
{
    jf_ledger_status prior = JF_LEDGER_NONE;
    int attempts = 0;
    if (st == JF_OK) {
        bool inserted = strcmp(PQgetvalue(res, row, col0), "t") == 0;
        const char *status = PQgetvalue(res, row, col0 + 1);
        attempts = atoi(PQgetvalue(res, row, col0 + 2));
        if (inserted)
            prior = JF_LEDGER_NONE;
        else if (strcmp(status, "succeeded") == 0)
            prior = JF_LEDGER_SUCCEEDED;
        else if (strcmp(status, "dead") == 0)
            prior = JF_LEDGER_DEAD;
        else
            prior = JF_LEDGER_RUNNING;
    }
    q->begin_cb(q->arg, st, prior, attempts, st == JF_OK ? NULL : msg);
    free(q);
}

static void on_begin(void *arg, const jf_pg_reply *r)
{
    lreq *q = arg;
    char msg[600];
    jf_status st = settle(q, r, msg, sizeof msg);
    if (st == JF_OK && (PQntuples(r->res) != 1 || PQnfields(r->res) != 3)) {
        st = JF_ERR_IO;
        snprintf(msg, sizeof msg, "ledger: begin returned %d rows", PQntuples(r->res));
    }
    answer_begin(q, st, msg, r->res, 0, 0);
}

static void on_finish(void *arg, const jf_pg_reply *r)
{
    lreq *q = arg;
    char msg[600];
    jf_status st = settle(q, r, msg, sizeof msg);
    q->done_cb(q->arg, st, st == JF_OK ? NULL : msg);
    free(q);
}

/* ---- batches ---------------------------------------------------------- */

static const struct {
    const char *one, *many;
    int nparams;
    jf_pg_cb on_one;
} KINDS[KIND_COUNT] = {
    [KIND_BEGIN] = {STMT_BEGIN, STMT_BEGIN_MANY, 7, on_begin},
    [KIND_FINISH] = {STMT_FINISH, STMT_FINISH_MANY, 9, on_finish},
};

static void send_one(jf_ledger *l, int kind, const char *const *param, lreq *q)
{
    jf_pgpool_exec(l->pool, KINDS[kind].one, NULL, KINDS[kind].nparams, param, NULL,
                   KINDS[kind].on_one, q);
}

/* One text array literal of column c of the batch: every element quoted
 * (backslash and quote escaped), NULL unquoted. NULL when out of memory. */
static char *array_literal(const bentry *e, int n, int c)
{
    size_t cap = 3;
    for (int i = 0; i < n; i++)
        cap += e[i].param[c] == NULL ? 5 : 2 * strlen(e[i].param[c]) + 3;
    char *out = malloc(cap), *w = out;
    if (out == NULL)
        return NULL;
    *w++ = '{';
    for (int i = 0; i < n; i++) {
        if (i > 0)
            *w++ = ',';
        const char *v = e[i].param[c];
        if (v == NULL) {
            memcpy(w, "NULL", 4);
            w += 4;
            continue;
        }
        *w++ = '"';
        for (; *v != '\0'; v++) {
            if (*v == '"' || *v == '\\')
                *w++ = '\\';
            *w++ = *v;
        }
        *w++ = '"';
    }
    *w++ = '}';
    *w = '\0';
    return out;
}

/* Gives every job of a batch the same failure. */
static void fail_entries(int kind, const bentry *e, int n, const jf_pg_reply *r)
{
    for (int i = 0; i < n; i++) {
        lreq *q = e[i].q;
        char msg[600];
        jf_status st = settle(q, r, msg, sizeof msg);
        if (st == JF_OK) { /* not reached: only failures come here */
            st = JF_ERR_IO;
            snprintf(msg, sizeof msg, "ledger: batch failed");
        }
        if (kind == KIND_BEGIN)
            answer_begin(q, st, msg, NULL, 0, 0);
        else {
            q->done_cb(q->arg, st, msg);
            free(q);
        }
    }
}

static void on_many(void *arg, const jf_pg_reply *r)
{
    sent *s = arg;
    jf_ledger *l = s->l;
    if (r->outcome == JF_PG_SQL_ERROR && !db_fault(r) && !l->closing) {
        /* The content, not the server: each job on its own. */
        for (int i = 0; i < s->n; i++)
            send_one(l, s->kind, s->e[i].param, s->e[i].q);
    } else if (r->outcome != JF_PG_OK) {
        fail_entries(s->kind, s->e, s->n, r);
    } else if (s->kind == KIND_FINISH) {
        for (int i = 0; i < s->n; i++)
            on_finish(s->e[i].q, r);
    } else {
        const PGresult *res = r->res;
        int rows = PQnfields(res) == 4 ? PQntuples(res) : 0;
        for (int i = 0; i < s->n; i++) {
            lreq *q = s->e[i].q;
            const char *id = s->e[i].param[0];
            /* Rows come back in the order of the arrays in practice; the
             * id decides. */
            int row = i < rows && strcmp(PQgetvalue(res, i, 0), id) == 0 ? i : -1;
            for (int k = 0; row < 0 && k < rows; k++)
                if (strcmp(PQgetvalue(res, k, 0), id) == 0)
                    row = k;
            char msg[600];
            jf_status st = settle(q, r, msg, sizeof msg);
            if (row < 0) {
                st = JF_ERR_IO;
                snprintf(msg, sizeof msg, "ledger: begin returned no row for the job");
            }
            answer_begin(q, st, msg, res, row, 1);
        }
    }
    for (int i = 0; i < s->n; i++)
        free(s->e[i].blk);
    free(s);
}

static void send_batch(jf_ledger *l, int kind)
{
    batch *b = &l->batches[kind];
    int n = b->n;
    b->n = 0;
    b->bytes = 0;
    if (n == 0)
        return;
    if (n == 1) {
        send_one(l, kind, b->e[0].param, b->e[0].q);
        free(b->e[0].blk);
        return;
    }
    sent *s = malloc(sizeof *s + (size_t)n * sizeof s->e[0]);
    char *arrays[MAX_COLS] = {0};
    bool ok = s != NULL;
    for (int c = 0; ok && c < KINDS[kind].nparams; c++)
        ok = (arrays[c] = array_literal(b->e, n, c)) != NULL;
    if (!ok) {
        /* No memory for the batch: the jobs go one by one. */
        for (int i = 0; i < n; i++) {
            send_one(l, kind, b->e[i].param, b->e[i].q);
            free(b->e[i].blk);
        }
        free(s);
    } else {
        s->l = l;
        s->kind = kind;
        s->n = n;
        memcpy(s->e, b->e, (size_t)n * sizeof s->e[0]);
        jf_pgpool_exec(l->pool, KINDS[kind].many, NULL, KINDS[kind].nparams,
                       (const char *const *)arrays, NULL, on_many, s);
    }
    for (int c = 0; c < MAX_COLS; c++)
        free(arrays[c]);
}

static void on_check(uv_check_t *h)
{
    jf_ledger *l = h->data;
    for (int k = 0; k < KIND_COUNT; k++)
        send_batch(l, k);
    uv_check_stop(&l->check);
    uv_idle_stop(&l->idle);
}

static void on_idle(uv_idle_t *h)
{
    (void)h; /* only there so that the loop polls without blocking */
}

/* Queues a request for the end of this loop turn (see "Batches"). The
 * parameters are copied. */
static void enqueue(jf_ledger *l, int kind, const char *const *param, lreq *q)
{
    int np = KINDS[kind].nparams;
    if (l->closing || l->handles_open == 0) {
        send_one(l, kind, param, q);
        return;
    }
    size_t size = 0;
    for (int c = 0; c < np; c++)
        size += param[c] != NULL ? strlen(param[c]) + 1 : 0;
    batch *b = &l->batches[kind];
    bool dup = false;
    for (int i = 0; i < b->n && !dup; i++)
        dup = strcmp(b->e[i].param[0], param[0]) == 0;
    if (b->n > 0 && (dup || b->n == BATCH_MAX || b->bytes + size > BATCH_BYTES))
        send_batch(l, kind);
    bentry *e = &b->e[b->n];
    e->q = q;
    e->blk = malloc(size > 0 ? size : 1);
    if (e->blk == NULL) {
        send_one(l, kind, param, q); /* jf_pgpool_exec copies or fails it itself */
        return;
    }
    char *w = e->blk;
    for (int c = 0; c < MAX_COLS; c++) {
        e->param[c] = NULL;
        if (c < np && param[c] != NULL) {
            size_t len = strlen(param[c]) + 1;
            memcpy(w, param[c], len);
            e->param[c] = w;
            w += len;
        }
    }
    b->n++;
    b->bytes += size;
    if (!uv_is_active((uv_handle_t *)&l->check)) {
        uv_check_start(&l->check, on_check);
        uv_idle_start(&l->idle, on_idle);
    }
}

void jf_ledger_begin(jf_ledger *l, const jf_ledger_job *job, jf_ledger_begin_cb cb, void *arg)
{
    lreq *q = new_lreq(l, arg);
    q->begin_cb = cb;
    char seq[24];
    snprintf(seq, sizeof seq, "%" PRIu64, job->stream_seq);
    const char *params[] = {job->job_id,
                            job->service,
                            job->priority,
                            job->type,
                            job->tenant,
                            seq,
                            job->replay ? "true" : "false"};
    enqueue(l, KIND_BEGIN, params, q);
}

/* An error as the ledger stores it: valid UTF-8 (a byte that is not becomes
 * '?'), no control characters, at most LEDGER_ERROR_MAX bytes. Returns a
 * malloc'd copy or NULL. */
static char *clean_error(const char *s)
{
    if (s == NULL)
        return NULL;
    size_t len = strlen(s);
    if (len > LEDGER_ERROR_MAX)
        len = LEDGER_ERROR_MAX;
    char *out = malloc(len + 1);
    if (out == NULL)
        return NULL;
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0, n = 0;
    while (i < len) {
        unsigned char c = p[i];
        size_t need = c < 0x80           ? 1
                      : (c >> 5) == 0x6  ? 2
                      : (c >> 4) == 0xe  ? 3
                      : (c >> 3) == 0x1e ? 4
                                         : 0;
        bool ok = need > 0 && i + need <= len;
        for (size_t k = 1; ok && k < need; k++)
            ok = (p[i + k] & 0xc0) == 0x80;
        if (ok && need == 2)
            ok = c >= 0xc2;
        if (ok && need == 3) {
            unsigned cp = ((c & 0x0fu) << 12) | ((p[i + 1] & 0x3fu) << 6) | (p[i + 2] & 0x3fu);
            ok = cp >= 0x800 && (cp < 0xd800 || cp > 0xdfff);
        }
        if (ok && need == 4) {
            unsigned cp = ((c & 0x07u) << 18) | ((p[i + 1] & 0x3fu) << 12) |
                          ((p[i + 2] & 0x3fu) << 6) | (p[i + 3] & 0x3fu);
            ok = cp >= 0x10000 && cp <= 0x10ffff;
        }
        if (!ok) {
            out[n++] = '?';
            i++;
            continue;
        }
        if (need == 1 && (c < 0x20 || c == 0x7f)) {
            out[n++] = ' ';
            i++;
            continue;
        }
        memcpy(out + n, p + i, need);
        n += need;
        i += need;
    }
    out[n] = '\0';
    return out;
}

/* jsonb refuses \u0000 in strings, which JSON and jansson allow: stored as
 * U+FFFD rather than losing the whole result. */
static void replace_nul_escapes(char *s)
{
    for (char *p = s; *p != '\0'; p++) {
        if (*p != '\\')
            continue;
        if (p[1] == 'u' && strncmp(p + 2, "0000", 4) == 0)
            memcpy(p + 2, "fffd", 4);
        if (p[1] != '\0')
            p++; /* skip the escaped character, so "\\u0000" stays */
    }
}

void jf_ledger_finish(jf_ledger *l, const jf_ledger_job *job, jf_ledger_status status,
                      const json_t *result, const char *error, jf_ledger_done_cb cb, void *arg)
{
    lreq *q = new_lreq(l, arg);
    q->done_cb = cb;
    if (status == JF_LEDGER_NONE) {
        jf_pgpool_fail(l->pool, "finish with status none", on_finish, q);
        return;
    }
    char *res_text = NULL;
    if (result != NULL) {
        res_text = json_dumps(result, JSON_COMPACT | JSON_ENCODE_ANY);
        if (res_text == NULL) {
            jf_pgpool_fail(l->pool, "cannot encode the result as JSON", on_finish, q);
            return;
        }
        replace_nul_escapes(res_text);
    }
    char *err_text = clean_error(error);
    if (error != NULL && err_text == NULL) {
        free(res_text);
        jf_pgpool_fail(l->pool, "out of memory", on_finish, q);
        return;
    }
    char seq[24];
    snprintf(seq, sizeof seq, "%" PRIu64, job->stream_seq);
    const char *params[] = {job->job_id,
                            job->service,
                            job->priority,
                            job->type,
                            job->tenant,
                            jf_ledger_status_name(status),
                            res_text,
                            status == JF_LEDGER_SUCCEEDED ? NULL : err_text,
                            seq};
    enqueue(l, KIND_FINISH, params, q);
    free(res_text);
    free(err_text);
}
