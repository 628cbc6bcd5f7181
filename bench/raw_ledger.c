/* raw_ledger.c — baseline of the "ledger path" row: the rows jetfleet's
 * ledger writes for N noop jobs, written with raw libpq in pipeline mode.
 *
 * Per job, as the consumer does: the "begin" upsert (row running, attempts
 * counted), and once its answer is back the "finish" upsert (row
 * succeeded) — the same SQL text as consumer/ledger.c, prepared once per
 * connection, each statement followed by its own Sync so each is its own
 * transaction (a job is saved on its own). --statements 1 writes only the
 * final upsert per job (what a queue without attempt counting would do).
 *
 * --connections C connections, each non-blocking in pipeline mode with at
 * most --depth statements outstanding; one thread drives them all with
 * poll(2).
 *
 *   jf-bench-raw-ledger --dsn DSN --jobs N [--prefix P] [--connections C]
 *                       [--depth D] [--statements 1|2]
 *
 * Job ids are P%07d (default prefix "bench-"), service "led", priority
 * normal, type t. Prints {"jobs":N,"statements":S,"seconds":T,"errors":E}. */
#include <getopt.h>
#include <libpq-fe.h>
#include <poll.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_CONNS 32

static const char SQL_BEGIN[] =
    "INSERT INTO jetfleet_jobs AS j (job_id, service, priority, type, tenant, status, attempts,"
    " stream_seq)"
    " VALUES ($1::text, $2::text, coalesce($3::text, 'normal'), $4::text, $5::text, 'running', 1,"
    " $6::bigint)"
    " ON CONFLICT (job_id) DO UPDATE SET"
    "  attempts = CASE WHEN j.status IN ('succeeded', 'dead') THEN j.attempts"
    "                  ELSE j.attempts + 1 END,"
    "  status = CASE WHEN j.status IN ('succeeded', 'dead') THEN j.status ELSE 'running' END,"
    "  stream_seq = CASE WHEN j.status IN ('succeeded', 'dead') THEN j.stream_seq"
    "                    ELSE EXCLUDED.stream_seq END,"
    "  updated_at = CASE WHEN j.status IN ('succeeded', 'dead') THEN j.updated_at ELSE now() END"
    " RETURNING (j.xmax = 0) AS inserted, j.status, j.attempts";

static const char SQL_FINISH[] =
    "INSERT INTO jetfleet_jobs AS j (job_id, service, priority, type, tenant, status, attempts,"
    " result, error, stream_seq, finished_at)"
    " VALUES ($1::text, $2::text, coalesce($3::text, 'normal'), $4::text, $5::text, $6::text, 0,"
    " $7::jsonb, $8::text, $9::bigint,"
    " CASE WHEN $6::text IN ('succeeded', 'dead') THEN now() END)"
    " ON CONFLICT (job_id) DO UPDATE SET"
    "  status = EXCLUDED.status,"
    "  result = EXCLUDED.result,"
    "  error = EXCLUDED.error,"
    "  stream_seq = EXCLUDED.stream_seq,"
    "  finished_at = EXCLUDED.finished_at,"
    "  updated_at = now()"
    " WHERE j.status NOT IN ('succeeded', 'dead')";

/* One statement awaiting its answer: which job, which step. */
typedef struct req {
    int job;
    bool finish;
} req;

typedef struct conn {
    PGconn *pg;
    req *fifo; /* ring of outstanding statements, oldest first */
    int head, len;
    bool got_result; /* the oldest statement's result was read; its NULL and Sync follow */
    bool got_null;
} conn;

typedef struct run {
    const char *prefix;
    int jobs, depth, statements;
    int next_job, finished, errors;
} run;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static bool send_stmt(run *r, conn *c, int job, bool finish)
{
    char id[64], seq[24];
    snprintf(id, sizeof id, "%s%07d", r->prefix, job);
    snprintf(seq, sizeof seq, "%d", job + 1);
    int ok;
    if (!finish) {
        const char *v[6] = {id, "led", "normal", "t", NULL, seq};
        ok = PQsendQueryPrepared(c->pg, "b", 6, v, NULL, NULL, 0);
    } else {
        const char *v[9] = {id, "led", "normal", "t", NULL, "succeeded", NULL, NULL, seq};
        ok = PQsendQueryPrepared(c->pg, "f", 9, v, NULL, NULL, 0);
    }
    if (!ok || !PQpipelineSync(c->pg)) {
        fprintf(stderr, "raw-ledger: send failed: %s", PQerrorMessage(c->pg));
        return false;
    }
    c->fifo[(c->head + c->len) % r->depth] = (req){job, finish};
    c->len++;
    return true;
}

/* Reads every complete answer; a begin's answer queues its finish. */
static bool read_answers(run *r, conn *c)
{
    if (!PQconsumeInput(c->pg)) {
        fprintf(stderr, "raw-ledger: %s", PQerrorMessage(c->pg));
        return false;
    }
    while (c->len > 0 && !PQisBusy(c->pg)) {
        PGresult *res = PQgetResult(c->pg);
        req *q = &c->fifo[c->head];
        if (!c->got_result) {
            ExecStatusType st = PQresultStatus(res);
            if (st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK) {
                r->errors++;
                if (r->errors <= 3)
                    fprintf(stderr, "raw-ledger: %s", PQresultErrorMessage(res));
            }
            c->got_result = true;
            PQclear(res);
            continue;
        }
        if (!c->got_null) {
            /* the end of this statement's results */
            c->got_null = true;
            PQclear(res);
            continue;
        }
        if (PQresultStatus(res) != PGRES_PIPELINE_SYNC) {
            fprintf(stderr, "raw-ledger: expected a pipeline sync, got %s\n",
                    PQresStatus(PQresultStatus(res)));
            PQclear(res);
            return false;
        }
        PQclear(res);
        req done = *q;
        c->head = (c->head + 1) % r->depth;
        c->len--;
        c->got_result = c->got_null = false;
        if (done.finish || r->statements == 1)
            r->finished++;
        else if (!send_stmt(r, c, done.job, true))
            return false;
    }
    return true;
}

static bool fill(run *r, conn *c)
{
    while (c->len < r->depth && r->next_job < r->jobs) {
        int job = r->next_job++;
        if (!send_stmt(r, c, job, r->statements == 1))
            return false;
    }
    return true;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"dsn", required_argument, NULL, 'd'},         {"jobs", required_argument, NULL, 'n'},
        {"prefix", required_argument, NULL, 'p'},      {"connections", required_argument, NULL, 'c'},
        {"depth", required_argument, NULL, 'D'},       {"statements", required_argument, NULL, 's'},
        {"help", no_argument, NULL, 'h'},              {NULL, 0, NULL, 0},
    };
    const char *dsn = NULL;
    run r = {.prefix = "bench-", .jobs = 10000, .depth = 256, .statements = 2};
    int nconns = 2, c;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 'd': dsn = optarg; break;
        case 'n': r.jobs = atoi(optarg); break;
        case 'p': r.prefix = optarg; break;
        case 'c': nconns = atoi(optarg); break;
        case 'D': r.depth = atoi(optarg); break;
        case 's': r.statements = atoi(optarg); break;
        default:
            fprintf(c == 'h' ? stdout : stderr,
                    "usage: jf-bench-raw-ledger --dsn DSN --jobs N [--prefix P] "
                    "[--connections C] [--depth D] [--statements 1|2]\n");
            return c == 'h' ? 0 : 2;
        }
    }
    if (dsn == NULL || r.jobs < 1 || nconns < 1 || nconns > MAX_CONNS || r.depth < 1 ||
        (r.statements != 1 && r.statements != 2)) {
        fprintf(stderr, "raw-ledger: bad arguments (see --help)\n");
        return 2;
    }

    double t0 = now_s();
    conn conns[MAX_CONNS] = {{0}};
    for (int i = 0; i < nconns; i++) {
        conn *k = &conns[i];
        k->pg = PQconnectdb(dsn);
        if (PQstatus(k->pg) != CONNECTION_OK) {
            fprintf(stderr, "raw-ledger: cannot connect: %s", PQerrorMessage(k->pg));
            return 1;
        }
        PGresult *p1 = PQprepare(k->pg, "b", SQL_BEGIN, 0, NULL);
        PGresult *p2 = PQprepare(k->pg, "f", SQL_FINISH, 0, NULL);
        bool ok = PQresultStatus(p1) == PGRES_COMMAND_OK && PQresultStatus(p2) == PGRES_COMMAND_OK;
        PQclear(p1);
        PQclear(p2);
        if (!ok || !PQenterPipelineMode(k->pg) || PQsetnonblocking(k->pg, 1) != 0) {
            fprintf(stderr, "raw-ledger: cannot prepare: %s", PQerrorMessage(k->pg));
            return 1;
        }
        k->fifo = calloc((size_t)r.depth, sizeof *k->fifo);
        if (k->fifo == NULL)
            return 1;
    }

    struct pollfd pfd[MAX_CONNS];
    while (r.finished < r.jobs) {
        for (int i = 0; i < nconns; i++) {
            if (!fill(&r, &conns[i]))
                return 1;
            int fl = PQflush(conns[i].pg);
            if (fl < 0) {
                fprintf(stderr, "raw-ledger: flush: %s", PQerrorMessage(conns[i].pg));
                return 1;
            }
            pfd[i].fd = PQsocket(conns[i].pg);
            pfd[i].events = POLLIN | (fl == 1 ? POLLOUT : 0);
            pfd[i].revents = 0;
        }
        if (poll(pfd, (nfds_t)nconns, 10000) < 0)
            continue;
        for (int i = 0; i < nconns; i++) {
            if (pfd[i].revents & (POLLIN | POLLERR | POLLHUP))
                if (!read_answers(&r, &conns[i]))
                    return 1;
        }
    }
    double t1 = now_s();
    printf("{\"jobs\":%d,\"statements\":%d,\"seconds\":%.3f,\"errors\":%d}\n", r.jobs,
           r.statements, t1 - t0, r.errors);
    for (int i = 0; i < nconns; i++) {
        PQfinish(conns[i].pg);
        free(conns[i].fifo);
    }
    return r.errors == 0 ? 0 : 1;
}
