/* status.c — `jetfleet-publisher status [JOB_ID]`: the fleet's queues per
 * service and priority from JetStream consumer info (and the ledger when
 * [postgres] dsn is set), or one job's ledger row; and the wait of
 * `batch --wait` (ops.h jf_wait_set), which reads the same sources.
 *
 * The publisher may block, so libpq is used synchronously here. */
#include <getopt.h>
#include <inttypes.h>
#include <jansson.h>
#include <libpq-fe.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "duration.h"
#include "envelope.h"
#include "ops.h"
#include "provision.h"
#include "rfc3339.h"

#define WAIT_POLL_MS 500
#define BAR_WIDTH    30

static const char *const LEDGER_STATUSES[] = {"running", "succeeded", "dead"};

static void usage(FILE *out)
{
    fprintf(out,
            "Usage: %s [GLOBAL OPTIONS] status [--json] [--interval D]\n"
            "       %s [GLOBAL OPTIONS] status JOB_ID\n"
            "\n"
            "Without JOB_ID: for every service of the configuration and every priority,\n"
            "from the durable <service>-<priority> of the jobs stream:\n"
            "  pending      jobs not yet delivered (num_pending)\n"
            "  in flight    delivered, not yet acknowledged (num_ack_pending)\n"
            "  redelivered  in flight and delivered more than once (num_redelivered)\n"
            "  waiting      open pull requests of the consumers (num_waiting)\n"
            "  dead         dead letters in JOBS_DLQ on dlq.<service>.<priority>.>\n"
            "  acked/s      how fast the ack floor moved, from two samples --interval apart\n"
            "and, with [postgres] dsn, the ledger's rows per service and status.\n"
            "A table by default; --json prints one JSON object instead.\n"
            "\n"
            "With JOB_ID: the job's ledger row as one JSON object; exit status 1 when\n"
            "there is no ledger ([postgres] dsn) or no such job.\n"
            "\n"
            "Options:\n"
            "      --json          one JSON object instead of a table\n"
            "      --interval D    time between the two samples for acked/s (default 1s;\n"
            "                      0 skips the rates)\n"
            "  -h, --help          show this help and exit\n",
            JF_PUBLISHER_PROG, JF_PUBLISHER_PROG);
}

/* ========================================================================= */
/* The ledger, read with blocking libpq                                      */

static void one_line(char *dst, size_t cap, const char *src)
{
    size_t n = 0;
    for (const char *s = src ? src : ""; *s && n + 1 < cap; s++)
        dst[n++] = (*s == '\n' || *s == '\r' || *s == '\t') ? ' ' : *s;
    while (n > 0 && dst[n - 1] == ' ')
        n--;
    dst[n] = '\0';
}

static bool has_ledger(const jf_config *cfg)
{
    return cfg->postgres_dsn != NULL && cfg->postgres_dsn[0] != '\0';
}

static jf_status ledger_connect(PGconn **out, const jf_config *cfg, jf_error *err)
{
    const char *keys[] = {"dbname", "fallback_application_name", "connect_timeout",
                          "client_encoding", NULL};
    const char *vals[] = {cfg->postgres_dsn, JF_PUBLISHER_PROG, "10", "UTF8", NULL};
    PGconn *pg = PQconnectdbParams(keys, vals, 1);
    if (pg == NULL || PQstatus(pg) != CONNECTION_OK) {
        char line[400];
        one_line(line, sizeof line, pg ? PQerrorMessage(pg) : "out of memory");
        /* The DSN may hold a password: only libpq's message is shown. */
        jf_error_set(err, "ledger: cannot connect to PostgreSQL ([postgres] dsn): %s", line);
        PQfinish(pg);
        return JF_ERR_IO;
    }
    *out = pg;
    return JF_OK;
}

/* A query's result, or NULL with err set; *undefined tells an absent table
 * or column (the ledger not created or migrated yet). */
static PGresult *ledger_query(PGconn *pg, const char *sql, int n, const char *const *params,
                              bool *undefined, jf_error *err)
{
    PGresult *res = PQexecParams(pg, sql, n, NULL, params, NULL, NULL, 0);
    ExecStatusType st = PQresultStatus(res);
    if (st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK)
        return res;
    const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    if (undefined != NULL)
        *undefined = state != NULL && (strcmp(state, "42P01") == 0 || strcmp(state, "42703") == 0);
    char line[400];
    one_line(line, sizeof line, res ? PQresultErrorMessage(res) : PQerrorMessage(pg));
    jf_error_set(err, "ledger: %s", line);
    PQclear(res);
    return NULL;
}

/* ---- status JOB_ID ------------------------------------------------------- */

static int job_status(const jf_pub_globals *g, const char *job_id)
{
    jf_pub_session sess = {0};
    jf_error err = {{0}};
    PGconn *pg = NULL;
    int rc = jf_pub_session_load(&sess, g);
    if (rc != JF_EXIT_OK)
        return rc;
    if (!has_ledger(sess.cfg)) {
        fprintf(stderr,
                "%s status: no ledger configured ([postgres] dsn is empty), so there is no "
                "per-job status\n",
                JF_PUBLISHER_PROG);
        rc = JF_EXIT_FAIL;
        goto out;
    }
    if (ledger_connect(&pg, sess.cfg, &err) != JF_OK) {
        fprintf(stderr, "%s status: %s\n", JF_PUBLISHER_PROG, err.msg);
        rc = JF_EXIT_FAIL;
        goto out;
    }
    bool undefined = false;
    const char *params[] = {job_id};
    PGresult *res =
        ledger_query(pg, "SELECT row_to_json(j)::text FROM jetfleet_jobs j WHERE job_id = $1", 1,
                     params, &undefined, &err);
    if (res == NULL) {
        if (undefined)
            fprintf(stderr,
                    "%s status: the ledger has no jetfleet_jobs table yet (it is created when a "
                    "consumer with this [postgres] dsn starts)\n",
                    JF_PUBLISHER_PROG);
        else
            fprintf(stderr, "%s status: %s\n", JF_PUBLISHER_PROG, err.msg);
        rc = JF_EXIT_FAIL;
        goto out;
    }
    if (PQntuples(res) == 0) {
        char shown[JF_ID_MAX * 6 + 1] = "";
        jf_json_escape(shown, 0, sizeof shown, job_id);
        fprintf(stderr, "%s status: no job \"%s\" in the ledger\n", JF_PUBLISHER_PROG, shown);
        PQclear(res);
        rc = JF_EXIT_FAIL;
        goto out;
    }
    const char *row = PQgetvalue(res, 0, 0);
    json_error_t jerr;
    json_t *o = json_loads(row, 0, &jerr);
    char *text =
        o ? json_dumps(o, isatty(STDOUT_FILENO) == 1 ? JSON_INDENT(2) : JSON_COMPACT) : NULL;
    puts(text ? text : row);
    free(text);
    json_decref(o);
    PQclear(res);
    rc = JF_EXIT_OK;
out:
    PQfinish(pg);
    jf_pub_session_close(&sess);
    return rc;
}

/* ========================================================================= */
/* status                                                                    */

typedef struct row {
    const char *service;
    jf_priority prio;
    char durable[JF_NAME_MAX + 16];
    bool found;
    uint64_t pending;
    int64_t in_flight, redelivered, waiting;
    uint64_t floor0, floor1; /* ack floor (consumer sequence) of the two samples */
    bool has_floor0;
    uint64_t ack_floor_stream;
    uint64_t dead;
} row;

typedef struct ledger_counts {
    long long by_status[3];
    long long replayed;
} ledger_counts;

static void sample(jsCtx *js, const char *stream, row *rows, size_t n, bool first)
{
    for (size_t i = 0; i < n; i++) {
        jsConsumerInfo *ci = NULL;
        jsErrCode code = 0;
        row *r = &rows[i];
        if (js_GetConsumerInfo(&ci, js, stream, r->durable, NULL, &code) != NATS_OK) {
            r->found = false;
            continue;
        }
        r->found = true;
        r->pending = ci->NumPending;
        r->in_flight = ci->NumAckPending;
        r->redelivered = ci->NumRedelivered;
        r->waiting = ci->NumWaiting;
        r->ack_floor_stream = ci->AckFloor.Stream;
        if (first) {
            r->floor0 = ci->AckFloor.Consumer;
            r->has_floor0 = true;
        }
        r->floor1 = ci->AckFloor.Consumer;
        jsConsumerInfo_Destroy(ci);
    }
}

/* Dead letters per service and priority, from the DLQ's per-subject counts. */
static jf_status count_dead(jsCtx *js, const char *dlq, row *rows, size_t n, uint64_t *total,
                            jf_error *err)
{
    jsOptions o;
    jsOptions_Init(&o);
    o.Stream.Info.SubjectsFilter = "dlq.>";
    jsStreamInfo *si = NULL;
    jsErrCode code = 0;
    natsStatus s = js_GetStreamInfo(&si, js, dlq, &o, &code);
    if (s != NATS_OK) {
        jf_error_set(err, "stream %s: %s", dlq, jf_pub_nats_error(s));
        return JF_ERR_NATS;
    }
    *total = si->State.Msgs;
    jsStreamStateSubjects *subs = si->State.Subjects;
    for (int k = 0; subs != NULL && k < subs->Count; k++) {
        const char *subj = subs->List[k].Subject;
        for (size_t i = 0; i < n; i++) {
            char prefix[JF_NAME_MAX + 32];
            int len = snprintf(prefix, sizeof prefix, "dlq.%s.%s.", rows[i].service,
                               jf_priority_name(rows[i].prio));
            if (len > 0 && strncmp(subj, prefix, (size_t)len) == 0)
                rows[i].dead += subs->List[k].Msgs;
        }
    }
    jsStreamInfo_Destroy(si);
    return JF_OK;
}

static int service_index(const jf_config *cfg, const char *name)
{
    for (size_t i = 0; i < cfg->nservices; i++)
        if (strcmp(cfg->services[i].name, name) == 0)
            return (int)i;
    return -1;
}

static jf_status read_ledger(const jf_config *cfg, ledger_counts *lc, jf_error *err)
{
    PGconn *pg = NULL;
    jf_status st = ledger_connect(&pg, cfg, err);
    if (st != JF_OK)
        return st;
    bool undefined = false;
    PGresult *res = ledger_query(pg,
                                 "SELECT service, status, count(*) FROM jetfleet_jobs"
                                 " GROUP BY service, status",
                                 0, NULL, &undefined, err);
    if (res == NULL) {
        PQfinish(pg);
        if (undefined) {
            /* No consumer has created the table yet: nothing recorded. */
            return JF_OK;
        }
        return JF_ERR_IO;
    }
    for (int i = 0; i < PQntuples(res); i++) {
        int si = service_index(cfg, PQgetvalue(res, i, 0));
        if (si < 0)
            continue;
        for (int k = 0; k < 3; k++)
            if (strcmp(PQgetvalue(res, i, 1), LEDGER_STATUSES[k]) == 0)
                lc[si].by_status[k] += atoll(PQgetvalue(res, i, 2));
    }
    PQclear(res);
    /* replays comes with migration 002; an older ledger just has no count. */
    res = ledger_query(pg,
                       "SELECT service, count(*) FROM jetfleet_jobs WHERE replays > 0"
                       " GROUP BY service",
                       0, NULL, NULL, err);
    for (int i = 0; res != NULL && i < PQntuples(res); i++) {
        int si = service_index(cfg, PQgetvalue(res, i, 0));
        if (si >= 0)
            lc[si].replayed = atoll(PQgetvalue(res, i, 1));
    }
    PQclear(res);
    PQfinish(pg);
    return JF_OK;
}

static double rate_of(const row *r, double secs)
{
    if (!r->found || !r->has_floor0 || secs <= 0 || r->floor1 < r->floor0)
        return 0.0;
    return (double)(r->floor1 - r->floor0) / secs;
}

static void print_table(const jf_config *cfg, const row *rows, size_t n, double secs,
                        uint64_t jobs_msgs, uint64_t jobs_last, uint64_t dlq_msgs,
                        const ledger_counts *lc, const char *ledger_error)
{
    int w = 7;
    for (size_t i = 0; i < cfg->nservices; i++)
        if ((int)strlen(cfg->services[i].name) > w)
            w = (int)strlen(cfg->services[i].name);
    printf("%s: %" PRIu64 " messages, last seq %" PRIu64 "    %s: %" PRIu64 " dead letters\n\n",
           cfg->stream.name, jobs_msgs, jobs_last, cfg->stream.dlq, dlq_msgs);
    printf("%-*s  %-8s  %8s  %9s  %11s  %7s  %6s  %7s\n", w, "SERVICE", "PRIORITY", "PENDING",
           "IN FLIGHT", "REDELIVERED", "WAITING", "DEAD", "ACKED/S");
    for (size_t i = 0; i < n; i++) {
        const row *r = &rows[i];
        char rate[32];
        if (secs > 0 && r->found)
            snprintf(rate, sizeof rate, "%.1f", rate_of(r, secs));
        else
            snprintf(rate, sizeof rate, "-");
        if (!r->found) {
            printf("%-*s  %-8s  %8s  %9s  %11s  %7s  %6" PRIu64 "  %7s   (no durable %s yet)\n", w,
                   r->service, jf_priority_name(r->prio), "-", "-", "-", "-", r->dead, rate,
                   r->durable);
            continue;
        }
        printf("%-*s  %-8s  %8" PRIu64 "  %9" PRId64 "  %11" PRId64 "  %7" PRId64 "  %6" PRIu64
               "  %7s\n",
               w, r->service, jf_priority_name(r->prio), r->pending, r->in_flight, r->redelivered,
               r->waiting, r->dead, rate);
    }
    if (lc == NULL && ledger_error == NULL)
        return;
    printf("\n");
    if (ledger_error != NULL) {
        /* The table says the ledger could not be read (the counts above
         * still stand); the error already names the ledger. */
        printf("%s%s\n", strncmp(ledger_error, "ledger: ", 8) == 0 ? "" : "ledger: ",
               ledger_error);
        return;
    }
    printf("%-*s  %8s  %9s  %6s  %8s\n", w, "LEDGER", "RUNNING", "SUCCEEDED", "DEAD", "REPLAYED");
    for (size_t i = 0; i < cfg->nservices; i++)
        printf("%-*s  %8lld  %9lld  %6lld  %8lld\n", w, cfg->services[i].name, lc[i].by_status[0],
               lc[i].by_status[1], lc[i].by_status[2], lc[i].replayed);
}

static json_t *status_json(const jf_config *cfg, const row *rows, size_t n, double secs,
                           uint64_t jobs_msgs, uint64_t jobs_first, uint64_t jobs_last,
                           uint64_t dlq_msgs, const ledger_counts *lc, const char *ledger_error)
{
    json_t *o = json_object();
    json_object_set_new(o, "stream",
                        json_pack("{s:s,s:I,s:I,s:I}", "name", cfg->stream.name, "messages",
                                  (json_int_t)jobs_msgs, "first_seq", (json_int_t)jobs_first,
                                  "last_seq", (json_int_t)jobs_last));
    json_object_set_new(
        o, "dlq",
        json_pack("{s:s,s:I}", "name", cfg->stream.dlq, "messages", (json_int_t)dlq_msgs));
    json_object_set_new(o, "interval", secs > 0 ? jf_json_seconds(secs) : json_null());
    json_t *arr = json_array();
    for (size_t i = 0; i < n; i++) {
        const row *r = &rows[i];
        json_t *c = json_object();
        json_object_set_new(c, "service", json_string(r->service));
        json_object_set_new(c, "priority", json_string(jf_priority_name(r->prio)));
        json_object_set_new(c, "durable", json_string(r->durable));
        json_object_set_new(c, "found", json_boolean(r->found));
        json_object_set_new(c, "pending",
                            r->found ? json_integer((json_int_t)r->pending) : json_null());
        json_object_set_new(c, "in_flight", r->found ? json_integer(r->in_flight) : json_null());
        json_object_set_new(c, "redelivered",
                            r->found ? json_integer(r->redelivered) : json_null());
        json_object_set_new(c, "waiting", r->found ? json_integer(r->waiting) : json_null());
        json_object_set_new(c, "dead", json_integer((json_int_t)r->dead));
        json_object_set_new(c, "ack_floor",
                            r->found ? json_integer((json_int_t)r->ack_floor_stream) : json_null());
        json_object_set_new(c, "acked_per_sec",
                            r->found && secs > 0 ? json_real(round(rate_of(r, secs) * 10) / 10)
                                                 : json_null());
        json_array_append_new(arr, c);
    }
    json_object_set_new(o, "consumers", arr);
    if (ledger_error != NULL) {
        json_object_set_new(o, "ledger", json_pack("{s:s}", "error", ledger_error));
    } else if (lc != NULL) {
        json_t *l = json_object();
        for (size_t i = 0; i < cfg->nservices; i++)
            json_object_set_new(
                l, cfg->services[i].name,
                json_pack("{s:I,s:I,s:I,s:I}", "running", (json_int_t)lc[i].by_status[0],
                          "succeeded", (json_int_t)lc[i].by_status[1], "dead",
                          (json_int_t)lc[i].by_status[2], "replayed", (json_int_t)lc[i].replayed));
        json_object_set_new(o, "ledger", l);
    } else {
        json_object_set_new(o, "ledger", json_null());
    }
    return o;
}

static void sleep_ms(int64_t ms)
{
    int64_t end = jf_pub_mono_ms() + ms;
    for (;;) {
        int64_t left = end - jf_pub_mono_ms();
        if (left <= 0 || jf_pub_interrupted())
            return;
        struct timespec ts = {.tv_sec = left / 1000, .tv_nsec = (left % 1000) * 1000000};
        nanosleep(&ts, NULL);
    }
}

static int fleet_status(const jf_pub_globals *g, bool as_json, int64_t interval_ms)
{
    jf_pub_session sess = {0};
    jf_error err = {{0}};
    row *rows = NULL;
    ledger_counts *lc = NULL;
    int rc = jf_pub_session_load(&sess, g);
    if (rc != JF_EXIT_OK)
        return rc;
    if ((rc = jf_pub_session_connect(&sess, g, NULL)) != JF_EXIT_OK)
        goto out;
    const jf_config *cfg = sess.cfg;
    size_t n = cfg->nservices * JF_PRIO_COUNT;
    rows = calloc(n ? n : 1, sizeof *rows);
    lc = calloc(cfg->nservices ? cfg->nservices : 1, sizeof *lc);
    if (rows == NULL || lc == NULL) {
        jf_log(JF_LOG_ERROR, "out of memory", JF_I("services", cfg->nservices));
        rc = JF_EXIT_FAIL;
        goto out;
    }
    for (size_t i = 0; i < cfg->nservices; i++) {
        for (int p = 0; p < JF_PRIO_COUNT; p++) {
            row *r = &rows[i * JF_PRIO_COUNT + (size_t)p];
            r->service = cfg->services[i].name;
            r->prio = (jf_priority)p;
            jf_durable_name(r->durable, sizeof r->durable, r->service, r->prio);
        }
    }
    jf_pub_catch_signals();
    int64_t t0 = jf_pub_mono_ms();
    sample(sess.js, cfg->stream.name, rows, n, true);
    double secs = 0;
    if (interval_ms > 0) {
        sleep_ms(interval_ms - (jf_pub_mono_ms() - t0));
        if (jf_pub_interrupted()) {
            rc = JF_EXIT_FAIL;
            goto out;
        }
        secs = (double)(jf_pub_mono_ms() - t0) / 1000.0;
        sample(sess.js, cfg->stream.name, rows, n, false);
    }

    jsStreamInfo *si = NULL;
    natsStatus s = js_GetStreamInfo(&si, sess.js, cfg->stream.name, NULL, NULL);
    if (s != NATS_OK) {
        jf_log(JF_LOG_ERROR, "cannot read the stream", JF_S("stream", cfg->stream.name),
               JF_S("error", jf_pub_nats_error(s)));
        rc = JF_EXIT_FAIL;
        goto out;
    }
    uint64_t jobs_msgs = si->State.Msgs, jobs_first = si->State.FirstSeq,
             jobs_last = si->State.LastSeq;
    jsStreamInfo_Destroy(si);
    uint64_t dlq_msgs = 0;
    if (count_dead(sess.js, cfg->stream.dlq, rows, n, &dlq_msgs, &err) != JF_OK) {
        jf_log(JF_LOG_ERROR, "cannot count the dead letters", JF_S("error", err.msg));
        rc = JF_EXIT_FAIL;
        goto out;
    }
    const char *ledger_error = NULL;
    bool ledger = has_ledger(cfg);
    if (ledger && read_ledger(cfg, lc, &err) != JF_OK)
        ledger_error = err.msg;

    if (as_json)
        jf_print_json(status_json(cfg, rows, n, secs, jobs_msgs, jobs_first, jobs_last, dlq_msgs,
                                  ledger ? lc : NULL, ledger_error));
    else
        print_table(cfg, rows, n, secs, jobs_msgs, jobs_last, dlq_msgs, ledger ? lc : NULL,
                    ledger_error);
    rc = ledger_error != NULL ? JF_EXIT_FAIL : JF_EXIT_OK;
out:
    free(rows);
    free(lc);
    jf_pub_session_close(&sess);
    return rc;
}

int jf_cmd_status(int argc, char **argv, const jf_pub_globals *g)
{
    enum { O_JSON = 256, O_INTERVAL };
    static const struct option longopts[] = {
        {"json", no_argument, NULL, O_JSON},
        {"interval", required_argument, NULL, O_INTERVAL},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    bool as_json = false;
    int64_t interval_ms = 1000;
    jf_error err = {{0}};
    int c;
    opterr = 0;
    while ((c = getopt_long(argc, argv, ":h", longopts, NULL)) != -1) {
        switch (c) {
        case O_JSON:
            as_json = true;
            break;
        case O_INTERVAL:
            if (jf_duration_parse(&interval_ms, optarg, &err) != JF_OK)
                return jf_pub_usage_error("status", "--interval: %s", err.msg);
            if (interval_ms > 60000)
                return jf_pub_usage_error("status", "--interval: at most 1m");
            break;
        case 'h':
            usage(stdout);
            return JF_EXIT_OK;
        case ':':
            return jf_pub_usage_error("status", "option %s needs a value", argv[optind - 1]);
        default:
            return jf_pub_usage_error("status", "unknown option %s", jf_pub_bad_option(argc, argv));
        }
    }
    if (argc - optind > 1)
        return jf_pub_usage_error("status", "one JOB_ID at most");
    if (optind < argc) {
        if (as_json)
            return jf_pub_usage_error("status",
                                      "--json is for the overview (a job is always JSON)");
        const char *id = argv[optind];
        if (id[0] == '\0' || strlen(id) > JF_ID_MAX)
            return jf_pub_usage_error("status", "JOB_ID must have 1 to %d bytes", JF_ID_MAX);
        return job_status(g, id);
    }
    return fleet_status(g, as_json, interval_ms);
}

/* ========================================================================= */
/* batch --wait                                                              */

typedef struct wait_job {
    char *id;
    uint64_t seq;
    size_t durable; /* index into ws->durables */
} wait_job;

typedef struct wait_durable {
    char name[JF_NAME_MAX + 16];
    char prefix[JF_NAME_MAX + 32]; /* jobs.<service>.<priority>. */
    uint64_t *seqs;                /* sorted, unique, after prepare */
    size_t nseqs;
    uint64_t max_seq;
    uint64_t floor; /* latest ack floor (stream sequence) seen */
} wait_durable;

struct jf_wait_set {
    wait_job *jobs;
    size_t n, cap;
    wait_durable *durables;
    size_t ndurables;
    bool failed;        /* an add ran out of memory: the wait cannot be exact */
    int64_t created_ms; /* wall clock: dead letters of the batch come after */
};

jf_status jf_wait_set_create(jf_wait_set **out, jf_error *err)
{
    jf_wait_set *ws = calloc(1, sizeof *ws);
    if (ws == NULL) {
        jf_error_set(err, "out of memory");
        return JF_ERR_NOMEM;
    }
    ws->created_ms = jf_now_ms();
    *out = ws;
    return JF_OK;
}

void jf_wait_set_destroy(jf_wait_set *ws)
{
    if (ws == NULL)
        return;
    for (size_t i = 0; i < ws->n; i++)
        free(ws->jobs[i].id);
    free(ws->jobs);
    for (size_t i = 0; i < ws->ndurables; i++)
        free(ws->durables[i].seqs);
    free(ws->durables);
    free(ws);
}

/* "jobs.<service>.<priority>.<type>" -> index of its durable, added when new. */
static int durable_of(jf_wait_set *ws, const char *subject, size_t *out)
{
    const char *svc = subject + 5;
    const char *dot = strncmp(subject, "jobs.", 5) == 0 ? strchr(svc, '.') : NULL;
    const char *prio = dot ? dot + 1 : NULL;
    const char *dot2 = prio ? strchr(prio, '.') : NULL;
    if (dot2 == NULL || (size_t)(dot - svc) > JF_NAME_MAX || dot2 - prio > 6)
        return -1;
    char prefix[JF_NAME_MAX + 32];
    snprintf(prefix, sizeof prefix, "%.*s", (int)(dot2 - subject + 1), subject);
    for (size_t i = 0; i < ws->ndurables; i++) {
        if (strcmp(ws->durables[i].prefix, prefix) == 0) {
            *out = i;
            return 0;
        }
    }
    wait_durable *nd = realloc(ws->durables, (ws->ndurables + 1) * sizeof *nd);
    if (nd == NULL)
        return -1;
    ws->durables = nd;
    wait_durable *d = &nd[ws->ndurables];
    memset(d, 0, sizeof *d);
    snprintf(d->prefix, sizeof d->prefix, "%s", prefix);
    snprintf(d->name, sizeof d->name, "%.*s-%.*s", (int)(dot - svc), svc, (int)(dot2 - prio), prio);
    *out = ws->ndurables++;
    return 0;
}

jf_status jf_wait_set_add(jf_wait_set *ws, const char *id, const char *subject, uint64_t seq)
{
    size_t d = 0;
    if (id == NULL || subject == NULL || durable_of(ws, subject, &d) != 0) {
        ws->failed = true;
        return JF_ERR_INVALID;
    }
    if (ws->n == ws->cap) {
        size_t ncap = ws->cap ? ws->cap * 2 : 256;
        wait_job *nj = realloc(ws->jobs, ncap * sizeof *nj);
        if (nj == NULL) {
            ws->failed = true;
            return JF_ERR_NOMEM;
        }
        ws->jobs = nj;
        ws->cap = ncap;
    }
    char *copy = strdup(id);
    if (copy == NULL) {
        ws->failed = true;
        return JF_ERR_NOMEM;
    }
    ws->jobs[ws->n++] = (wait_job){.id = copy, .seq = seq, .durable = d};
    return JF_OK;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static int cmp_id(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Per durable: the batch's sequences, sorted and unique. */
static jf_status prepare_seqs(jf_wait_set *ws, size_t *total)
{
    *total = 0;
    for (size_t i = 0; i < ws->ndurables; i++) {
        wait_durable *d = &ws->durables[i];
        size_t k = 0;
        for (size_t j = 0; j < ws->n; j++)
            k += ws->jobs[j].durable == i;
        d->seqs = malloc((k ? k : 1) * sizeof *d->seqs);
        if (d->seqs == NULL)
            return JF_ERR_NOMEM;
        for (size_t j = 0; j < ws->n; j++)
            if (ws->jobs[j].durable == i)
                d->seqs[d->nseqs++] = ws->jobs[j].seq;
        qsort(d->seqs, d->nseqs, sizeof *d->seqs, cmp_u64);
        size_t u = 0;
        for (size_t j = 0; j < d->nseqs; j++)
            if (u == 0 || d->seqs[u - 1] != d->seqs[j])
                d->seqs[u++] = d->seqs[j];
        d->nseqs = u;
        d->max_seq = u ? d->seqs[u - 1] : 0;
        *total += u;
    }
    return JF_OK;
}

/* How many of d's sequences are at or below floor. */
static size_t count_upto(const wait_durable *d, uint64_t floor)
{
    size_t lo = 0, hi = d->nseqs;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (d->seqs[mid] <= floor)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* ---- with the ledger ----------------------------------------------------- */

/* COPY text format: backslash escapes (ids have no control characters). */
static jf_status copy_ids(PGconn *pg, char **ids, size_t n, jf_error *err)
{
    PGresult *res = PQexec(pg, "COPY pg_temp.jf_batch_ids (job_id) FROM STDIN");
    if (PQresultStatus(res) != PGRES_COPY_IN) {
        char line[400];
        one_line(line, sizeof line, PQresultErrorMessage(res));
        jf_error_set(err, "ledger: %s", line);
        PQclear(res);
        return JF_ERR_IO;
    }
    PQclear(res);
    char buf[2 * JF_ID_MAX + 2];
    bool ok = true;
    for (size_t i = 0; ok && i < n; i++) {
        size_t k = 0;
        for (const char *p = ids[i]; *p && k + 3 < sizeof buf; p++) {
            if (*p == '\\')
                buf[k++] = '\\';
            buf[k++] = *p;
        }
        buf[k++] = '\n';
        ok = PQputCopyData(pg, buf, (int)k) == 1;
    }
    if (PQputCopyEnd(pg, ok ? NULL : "aborted") != 1)
        ok = false;
    res = PQgetResult(pg);
    if (PQresultStatus(res) != PGRES_COMMAND_OK)
        ok = false;
    if (!ok) {
        char line[400];
        one_line(line, sizeof line, res ? PQresultErrorMessage(res) : PQerrorMessage(pg));
        jf_error_set(err, "ledger: copying the batch's ids: %s", line);
    }
    PQclear(res);
    while ((res = PQgetResult(pg)) != NULL)
        PQclear(res);
    return ok ? JF_OK : JF_ERR_IO;
}

typedef struct wait_counts {
    size_t total, succeeded, dead;
} wait_counts;

static jf_status ledger_setup(PGconn *pg, jf_wait_set *ws, size_t *total, jf_error *err)
{
    char **ids = malloc((ws->n ? ws->n : 1) * sizeof *ids);
    if (ids == NULL) {
        jf_error_set(err, "out of memory");
        return JF_ERR_NOMEM;
    }
    for (size_t i = 0; i < ws->n; i++)
        ids[i] = ws->jobs[i].id;
    qsort(ids, ws->n, sizeof *ids, cmp_id);
    size_t u = 0;
    for (size_t i = 0; i < ws->n; i++)
        if (u == 0 || strcmp(ids[u - 1], ids[i]) != 0)
            ids[u++] = ids[i];
    *total = u;
    PGresult *res = ledger_query(pg, "CREATE TEMP TABLE jf_batch_ids (job_id text PRIMARY KEY)", 0,
                                 NULL, NULL, err);
    jf_status st = res != NULL ? JF_OK : JF_ERR_IO;
    PQclear(res);
    if (st == JF_OK)
        st = copy_ids(pg, ids, u, err);
    free(ids);
    return st;
}

/* JF_OK with the counts; a missing table (no consumer started yet) counts
 * as nothing finished. */
static jf_status ledger_poll(PGconn *pg, wait_counts *c, jf_error *err)
{
    bool undefined = false;
    PGresult *res = ledger_query(pg,
                                 "SELECT count(*) FILTER (WHERE j.status = 'succeeded'),"
                                 " count(*) FILTER (WHERE j.status = 'dead')"
                                 " FROM pg_temp.jf_batch_ids b JOIN jetfleet_jobs j USING (job_id)",
                                 0, NULL, &undefined, err);
    if (res == NULL) {
        if (undefined) {
            c->succeeded = c->dead = 0;
            return JF_OK;
        }
        return JF_ERR_IO;
    }
    c->succeeded = (size_t)atoll(PQgetvalue(res, 0, 0));
    c->dead = (size_t)atoll(PQgetvalue(res, 0, 1));
    PQclear(res);
    return JF_OK;
}

/* ---- without the ledger ---------------------------------------------------- */

/* Finished jobs: per durable, the batch's sequences at or below its ack
 * floor. JF_OK also when a durable does not exist yet (nothing finished). */
static jf_status floors_poll(jf_pub_session *s, jf_wait_set *ws, size_t *finished, jf_error *err)
{
    size_t done = 0;
    for (size_t i = 0; i < ws->ndurables; i++) {
        wait_durable *d = &ws->durables[i];
        jsConsumerInfo *ci = NULL;
        jsErrCode code = 0;
        natsStatus st = js_GetConsumerInfo(&ci, s->js, s->cfg->stream.name, d->name, NULL, &code);
        if (st == NATS_OK) {
            /* All deliveries acknowledged: the floor is the last delivered. */
            if (ci->AckFloor.Stream > d->floor)
                d->floor = ci->AckFloor.Stream;
            if (ci->NumAckPending == 0 && ci->NumPending == 0 && ci->Delivered.Stream > d->floor)
                d->floor = ci->Delivered.Stream;
            jsConsumerInfo_Destroy(ci);
        } else if (st != NATS_NOT_FOUND && code != JSConsumerNotFoundErr) {
            jf_error_set(err, "durable %s: %s", d->name, jf_pub_nats_error(st));
            return JF_ERR_NATS;
        }
        done += count_upto(d, d->floor);
    }
    *finished = done;
    return JF_OK;
}

static bool seq_in_batch(jf_wait_set *ws, const char *subject, uint64_t seq)
{
    for (size_t i = 0; i < ws->ndurables; i++) {
        wait_durable *d = &ws->durables[i];
        size_t plen = strlen(d->prefix);
        if (subject == NULL || strncmp(subject, d->prefix, plen) != 0)
            continue;
        size_t k = count_upto(d, seq);
        return k > 0 && d->seqs[k - 1] == seq;
    }
    return false;
}

/* Dead letters of the batch: those stored since it began whose original is
 * one of its messages. Only exact once every durable's floor passed the
 * batch (each job is acknowledged after its dead letter is stored). */
static jf_status count_batch_dead(jf_pub_session *s, jf_wait_set *ws, size_t *dead, jf_error *err)
{
    jf_window *w = NULL;
    jsStreamInfo *si = NULL;
    natsStatus ns = js_GetStreamInfo(&si, s->js, s->cfg->stream.dlq, NULL, NULL);
    if (ns != NATS_OK) {
        jf_error_set(err, "stream %s: %s", s->cfg->stream.dlq, jf_pub_nats_error(ns));
        return JF_ERR_NATS;
    }
    uint64_t last = si->State.LastSeq;
    bool empty = si->State.Msgs == 0;
    jsStreamInfo_Destroy(si);
    *dead = 0;
    if (empty)
        return JF_OK;
    jf_window_opts wo = {
        .stream = s->cfg->stream.dlq,
        .filter = "dlq.>",
        /* A second of margin for clocks: the time is the server's. */
        .start_time_ms = ws->created_ms - 1000,
        .end_seq = last,
        .batch = 256,
        .wait_ms = s->cfg->nats.request_timeout_ms,
    };
    jf_status st = jf_window_open(&w, s->nc, s->js, &wo, err);
    if (st != JF_OK)
        return st;
    size_t n = 0;
    for (;;) {
        natsMsg *m = NULL;
        uint64_t seq = 0;
        int64_t ts = 0;
        st = jf_window_next(w, &m, &seq, &ts, err);
        if (st != JF_OK)
            break;
        const char *stream = NULL, *sseq = NULL, *subj = NULL;
        uint64_t orig = 0;
        if (natsMsgHeader_Get(m, "Jetfleet-Stream", &stream) == NATS_OK &&
            strcmp(stream, s->cfg->stream.name) == 0 &&
            natsMsgHeader_Get(m, "Jetfleet-Stream-Seq", &sseq) == NATS_OK &&
            jf_parse_u64(sseq, &orig) &&
            natsMsgHeader_Get(m, "Jetfleet-Subject", &subj) == NATS_OK &&
            seq_in_batch(ws, subj, orig))
            n++;
        natsMsg_Destroy(m);
    }
    jf_window_close(w);
    if (st != JF_ERR_NOTFOUND)
        return st;
    *dead = n;
    return JF_OK;
}

/* ---- the wait ------------------------------------------------------------ */

static void draw_bar(jf_progress *pg, const wait_counts *c, size_t finished, bool ledger,
                     int64_t start_ms)
{
    size_t total = c->total ? c->total : 1;
    int fill = (int)((double)finished / (double)total * BAR_WIDTH);
    char bar[BAR_WIDTH + 1];
    for (int i = 0; i < BAR_WIDTH; i++)
        bar[i] = i < fill ? '#' : '-';
    bar[BAR_WIDTH] = '\0';
    double secs = (double)(jf_pub_mono_ms() - start_ms) / 1000.0;
    double rate = secs > 0 ? (double)finished / secs : 0;
    if (ledger)
        jf_progress_print(pg, "[%s] %zu/%zu finished (%zu succeeded, %zu dead) %.1f/s", bar,
                          finished, c->total, c->succeeded, c->dead, rate);
    else
        jf_progress_print(pg, "[%s] %zu/%zu finished %.1f/s", bar, finished, c->total, rate);
}

int jf_batch_wait(jf_pub_session *s, jf_wait_set *ws, int64_t timeout_ms, int64_t start_ms)
{
    jf_error err = {{0}};
    PGconn *pg = NULL;
    wait_counts c = {0};
    size_t finished = 0;
    bool ledger = has_ledger(s->cfg);
    bool timed_out = false, failed = false;
    jf_progress pg_line;
    int64_t wait_start = jf_pub_mono_ms();

    if (ws->failed) {
        jf_log(JF_LOG_ERROR, "cannot wait: the batch's jobs could not all be recorded",
               JF_S("error", "out of memory"));
        return JF_EXIT_FAIL;
    }
    if (prepare_seqs(ws, &c.total) != JF_OK) {
        jf_log(JF_LOG_ERROR, "cannot wait", JF_S("error", "out of memory"));
        return JF_EXIT_FAIL;
    }
    if (ledger) {
        if (ledger_connect(&pg, s->cfg, &err) != JF_OK ||
            ledger_setup(pg, ws, &c.total, &err) != JF_OK) {
            jf_log(JF_LOG_ERROR, "cannot wait for the batch", JF_S("error", err.msg));
            PQfinish(pg);
            return JF_EXIT_FAIL;
        }
    }
    jf_progress_start(&pg_line);
    pg_line.start_ms = start_ms; /* the bar appears once the batch took a second */

    for (;;) {
        jf_status st = ledger ? ledger_poll(pg, &c, &err) : floors_poll(s, ws, &finished, &err);
        if (st != JF_OK) {
            jf_progress_clear(&pg_line);
            jf_log(JF_LOG_ERROR, "cannot read the batch's progress", JF_S("error", err.msg));
            failed = true;
            break;
        }
        if (ledger)
            finished = c.succeeded + c.dead;
        if (jf_progress_due(&pg_line))
            draw_bar(&pg_line, &c, finished, ledger, start_ms);
        if (finished >= c.total)
            break;
        if (jf_pub_interrupted()) {
            jf_progress_clear(&pg_line);
            jf_log(JF_LOG_WARN, "interrupted; the jobs keep running",
                   JF_I("unfinished", c.total - finished));
            failed = true;
            break;
        }
        if (timeout_ms > 0 && jf_pub_mono_ms() - wait_start >= timeout_ms) {
            jf_progress_clear(&pg_line);
            jf_log(JF_LOG_ERROR, "timed out waiting for the batch; the jobs keep running",
                   JF_I("unfinished", c.total - finished), JF_I("timeout_ms", timeout_ms));
            timed_out = true;
            break;
        }
        sleep_ms(WAIT_POLL_MS);
    }
    jf_progress_clear(&pg_line);
    if (!ledger && !failed) {
        size_t dead = 0;
        if (count_batch_dead(s, ws, &dead, &err) != JF_OK) {
            jf_log(JF_LOG_ERROR, "cannot count the batch's dead letters", JF_S("error", err.msg));
            failed = true;
        }
        c.dead = dead < finished ? dead : finished;
        c.succeeded = finished - c.dead;
    }
    PQfinish(pg);

    double secs = (double)(jf_pub_mono_ms() - start_ms) / 1000.0;
    json_t *o = json_object();
    json_object_set_new(o, "succeeded", json_integer((json_int_t)c.succeeded));
    json_object_set_new(o, "dead", json_integer((json_int_t)c.dead));
    json_object_set_new(o, "unfinished",
                        json_integer((json_int_t)(c.total > finished ? c.total - finished : 0)));
    json_object_set_new(o, "seconds", jf_json_seconds(secs));
    json_object_set_new(o, "rate",
                        json_real(secs > 0 ? round((double)finished / secs * 10) / 10 : 0));
    jf_print_json(o);
    return failed || timed_out ? JF_EXIT_FAIL : JF_EXIT_OK;
}
