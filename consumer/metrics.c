/* metrics.c — counters the event loop bumps (relaxed C11 atomics) and the
 * small HTTP server that renders them: /metrics, /healthz, /readyz.
 *
 * The server is libmicrohttpd with one internal thread (epoll where there
 * is one): a scrape only reads atomics and formats text, so nothing ever
 * blocks it, and one thread is all it needs. */
#include "listen.h"
#include "metrics.h"

#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "config.h"
#include "log.h"
#include "provision.h"

#define CONNECTION_LIMIT     64
#define CONNECTION_TIMEOUT_S 10
#define LISTEN_BACKLOG       64
#define NREASONS             4 /* jf_dl_reason */

/* Upper bounds of jetfleet_handler_duration_seconds, in milliseconds. */
static const int64_t bucket_ms[] = {5,    10,   25,   50,    100,   250,  500,
                                    1000, 2500, 5000, 10000, 30000, 60000};
static const char *const bucket_le[] = {"0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5",
                                        "1",     "2.5",  "5",     "10",   "30",  "60"};
#define NBUCKETS ((int)(sizeof bucket_ms / sizeof bucket_ms[0]))
_Static_assert(sizeof bucket_ms / sizeof bucket_ms[0] == sizeof bucket_le / sizeof bucket_le[0],
               "one label per bucket");

static const char *const outcome_names[JF_MO_COUNT] = {
    "succeeded",           "retried", "dead_invalid", "dead_expired", "dead_permanent",
    "dead_max_deliveries", "skipped", "deferred",
};

typedef struct svc_metrics {
    char name[JF_NAME_MAX + 1];
    atomic_ullong jobs[JF_PRIO_COUNT][JF_MO_COUNT];
    atomic_ullong redeliveries[JF_PRIO_COUNT];
    atomic_ullong dead[NREASONS];
    atomic_ullong buckets[NBUCKETS + 1]; /* per bucket, not cumulative; the last is +Inf only */
    atomic_ullong sum_ms;
    atomic_ullong rate_waits;
    atomic_ullong trips;
    atomic_int breaker;
} svc_metrics;

typedef struct durable_ready {
    char name[JF_NAME_MAX + 16];
    atomic_bool bound;
} durable_ready;

struct jf_metrics {
    int nservices;
    svc_metrics *svc;
    durable_ready *durables; /* nservices * JF_PRIO_COUNT */
    int in_flight_limit;
    bool with_ledger;
    atomic_int in_flight;
    atomic_bool running, nats, ledger;
    struct MHD_Daemon *daemon;
    unsigned port;
};

/* ---- loop side --------------------------------------------------------- */

static void add(atomic_ullong *c, unsigned long long n)
{
    atomic_fetch_add_explicit(c, n, memory_order_relaxed);
}

static unsigned long long get(atomic_ullong *c)
{
    return atomic_load_explicit(c, memory_order_relaxed);
}

static bool svc_ok(const jf_metrics *m, int svc)
{
    return m != NULL && svc >= 0 && svc < m->nservices;
}

static bool prio_ok(jf_priority p)
{
    return (int)p >= 0 && (int)p < JF_PRIO_COUNT;
}

void jf_metrics_job(jf_metrics *m, int svc, jf_priority prio, jf_metrics_outcome outcome)
{
    if (svc_ok(m, svc) && prio_ok(prio) && (int)outcome >= 0 && outcome < JF_MO_COUNT)
        add(&m->svc[svc].jobs[prio][outcome], 1);
}

void jf_metrics_dead_letter(jf_metrics *m, int svc, jf_priority prio, jf_dl_reason reason)
{
    static const jf_metrics_outcome as_outcome[NREASONS] = {
        [JF_DL_INVALID] = JF_MO_DEAD_INVALID,
        [JF_DL_PERMANENT] = JF_MO_DEAD_PERMANENT,
        [JF_DL_MAX_DELIVERIES] = JF_MO_DEAD_MAX_DELIVERIES,
        [JF_DL_EXPIRED] = JF_MO_DEAD_EXPIRED,
    };
    if (!svc_ok(m, svc) || (int)reason < 0 || (int)reason >= NREASONS)
        return;
    add(&m->svc[svc].dead[reason], 1);
    jf_metrics_job(m, svc, prio, as_outcome[reason]);
}

void jf_metrics_redelivery(jf_metrics *m, int svc, jf_priority prio)
{
    if (svc_ok(m, svc) && prio_ok(prio))
        add(&m->svc[svc].redeliveries[prio], 1);
}

void jf_metrics_handler_time(jf_metrics *m, int svc, int64_t ms)
{
    if (!svc_ok(m, svc))
        return;
    if (ms < 0)
        ms = 0;
    int b = 0;
    while (b < NBUCKETS && ms > bucket_ms[b])
        b++;
    add(&m->svc[svc].buckets[b], 1);
    add(&m->svc[svc].sum_ms, (unsigned long long)ms);
}

void jf_metrics_rate_wait(jf_metrics *m, int svc)
{
    if (svc_ok(m, svc))
        add(&m->svc[svc].rate_waits, 1);
}

void jf_metrics_breaker(jf_metrics *m, int svc, jf_breaker_state state, uint64_t trips)
{
    if (!svc_ok(m, svc))
        return;
    atomic_store_explicit(&m->svc[svc].breaker, (int)state, memory_order_relaxed);
    atomic_store_explicit(&m->svc[svc].trips, trips, memory_order_relaxed);
}

void jf_metrics_in_flight(jf_metrics *m, int in_flight)
{
    if (m != NULL)
        atomic_store_explicit(&m->in_flight, in_flight, memory_order_relaxed);
}

void jf_metrics_set_running(jf_metrics *m, bool running)
{
    if (m != NULL)
        atomic_store(&m->running, running);
}

void jf_metrics_set_nats(jf_metrics *m, bool connected)
{
    if (m != NULL)
        atomic_store(&m->nats, connected);
}

void jf_metrics_set_durable(jf_metrics *m, int didx, bool bound)
{
    if (m != NULL && didx >= 0 && didx < m->nservices * JF_PRIO_COUNT)
        atomic_store(&m->durables[didx].bound, bound);
}

void jf_metrics_set_ledger(jf_metrics *m, bool reachable)
{
    if (m != NULL)
        atomic_store(&m->ledger, reachable);
}

unsigned jf_metrics_port(const jf_metrics *m)
{
    return m != NULL ? m->port : 0;
}

/* ---- rendering ----------------------------------------------------------- */

static void header(FILE *f, const char *name, const char *type, const char *help)
{
    fprintf(f, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void render_metrics(jf_metrics *m, FILE *f)
{
    static const char *const prio[JF_PRIO_COUNT] = {"high", "normal", "low"};

    header(f, "jetfleet_jobs_total", "counter",
           "Jobs settled or handed back by this process, by outcome.");
    for (int s = 0; s < m->nservices; s++)
        for (int p = 0; p < JF_PRIO_COUNT; p++)
            for (int o = 0; o < JF_MO_COUNT; o++)
                fprintf(f,
                        "jetfleet_jobs_total{service=\"%s\",priority=\"%s\",outcome=\"%s\"} %llu\n",
                        m->svc[s].name, prio[p], outcome_names[o], get(&m->svc[s].jobs[p][o]));

    header(f, "jetfleet_in_flight", "gauge", "Jobs held by this process now.");
    fprintf(f, "jetfleet_in_flight %d\n",
            atomic_load_explicit(&m->in_flight, memory_order_relaxed));
    header(f, "jetfleet_in_flight_limit", "gauge", "[consumer] max_in_flight of this process.");
    fprintf(f, "jetfleet_in_flight_limit %d\n", m->in_flight_limit);

    header(f, "jetfleet_handler_duration_seconds", "histogram",
           "Handler calls, from start to outcome.");
    for (int s = 0; s < m->nservices; s++) {
        /* One read of every bucket, summed as they are written out: the
         * cumulative counts cannot decrease and +Inf is _count. */
        unsigned long long cum = 0;
        for (int b = 0; b <= NBUCKETS; b++) {
            cum += get(&m->svc[s].buckets[b]);
            fprintf(f, "jetfleet_handler_duration_seconds_bucket{service=\"%s\",le=\"%s\"} %llu\n",
                    m->svc[s].name, b < NBUCKETS ? bucket_le[b] : "+Inf", cum);
        }
        unsigned long long sum = get(&m->svc[s].sum_ms);
        fprintf(f, "jetfleet_handler_duration_seconds_sum{service=\"%s\"} %llu.%03llu\n",
                m->svc[s].name, sum / 1000, sum % 1000);
        fprintf(f, "jetfleet_handler_duration_seconds_count{service=\"%s\"} %llu\n", m->svc[s].name,
                cum);
    }

    header(f, "jetfleet_breaker_state", "gauge",
           "Circuit breaker of the service: 0 closed, 1 open, 2 half-open.");
    for (int s = 0; s < m->nservices; s++)
        fprintf(f, "jetfleet_breaker_state{service=\"%s\"} %d\n", m->svc[s].name,
                atomic_load_explicit(&m->svc[s].breaker, memory_order_relaxed));
    header(f, "jetfleet_breaker_trips_total", "counter", "Times the breaker opened.");
    for (int s = 0; s < m->nservices; s++)
        fprintf(f, "jetfleet_breaker_trips_total{service=\"%s\"} %llu\n", m->svc[s].name,
                get(&m->svc[s].trips));

    header(f, "jetfleet_rate_limit_waits_total", "counter",
           "Jobs that waited for a fleet-wide rate slot before their call.");
    for (int s = 0; s < m->nservices; s++)
        fprintf(f, "jetfleet_rate_limit_waits_total{service=\"%s\"} %llu\n", m->svc[s].name,
                get(&m->svc[s].rate_waits));

    header(f, "jetfleet_redeliveries_total", "counter",
           "Deliveries of a job that had been delivered before.");
    for (int s = 0; s < m->nservices; s++)
        for (int p = 0; p < JF_PRIO_COUNT; p++)
            fprintf(f, "jetfleet_redeliveries_total{service=\"%s\",priority=\"%s\"} %llu\n",
                    m->svc[s].name, prio[p], get(&m->svc[s].redeliveries[p]));

    header(f, "jetfleet_dead_letters_total", "counter",
           "Jobs dead-lettered to the DLQ stream, by reason.");
    for (int s = 0; s < m->nservices; s++)
        for (int r = 0; r < NREASONS; r++)
            fprintf(f, "jetfleet_dead_letters_total{service=\"%s\",reason=\"%s\"} %llu\n",
                    m->svc[s].name, jf_dl_reason_name((jf_dl_reason)r), get(&m->svc[s].dead[r]));
}

/* The JSON body of /readyz; returns whether everything is ready. Each flag
 * is read once, so the verdict and the list agree. */
static bool render_ready(jf_metrics *m, FILE *f)
{
    bool bound[JF_MAX_SERVICES * JF_PRIO_COUNT];
    int nd = m->nservices * JF_PRIO_COUNT;
    bool running = atomic_load(&m->running);
    bool nats = atomic_load(&m->nats);
    bool ledger = !m->with_ledger || atomic_load(&m->ledger);
    bool ready = running && nats && ledger;
    for (int d = 0; d < nd; d++) {
        bound[d] = atomic_load(&m->durables[d].bound);
        ready = ready && bound[d];
    }
    if (ready) {
        fputs("{\"status\":\"ready\"}\n", f);
        return true;
    }
    const char *sep = "";
    fputs("{\"status\":\"not ready\",\"failing\":[", f);
    if (!running) {
        fprintf(f, "%s\"consumer: starting or stopping\"", sep);
        sep = ",";
    }
    if (!nats) {
        fprintf(f, "%s\"nats: not connected\"", sep);
        sep = ",";
    }
    for (int d = 0; d < nd; d++) {
        if (!bound[d]) {
            fprintf(f, "%s\"durable %s: no answer to its pulls\"", sep, m->durables[d].name);
            sep = ",";
        }
    }
    if (!ledger)
        fprintf(f, "%s\"ledger: unreachable\"", sep);
    fputs("]}\n", f);
    return false;
}

/* ---- HTTP ------------------------------------------------------------------- */

static enum MHD_Result answer(struct MHD_Connection *conn, unsigned status, char *text, size_t len,
                              const char *type, const char *allow)
{
    struct MHD_Response *resp = MHD_create_response_from_buffer(len, text, MHD_RESPMEM_MUST_FREE);
    if (resp == NULL) {
        free(text);
        return MHD_NO;
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, type);
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
    if (allow != NULL)
        MHD_add_response_header(resp, MHD_HTTP_HEADER_ALLOW, allow);
    enum MHD_Result ret = MHD_queue_response(conn, status, resp);
    MHD_destroy_response(resp);
    return ret;
}

static enum MHD_Result answer_const(struct MHD_Connection *conn, unsigned status, const char *s,
                                    const char *allow)
{
    char *t = strdup(s);
    if (t == NULL)
        return MHD_NO;
    return answer(conn, status, t, strlen(t), "application/json", allow);
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version, const char *upload_data,
                                  size_t *upload_data_size, void **con_cls)
{
    jf_metrics *m = cls;
    static int first_call_marker;

    /* Answer once the whole request is in (a body, if any, is dropped). */
    if (*con_cls == NULL) {
        *con_cls = &first_call_marker;
        return MHD_YES;
    }
    if (*upload_data_size > 0) {
        *upload_data_size = 0;
        return MHD_YES;
    }
    bool known =
        strcmp(url, "/metrics") == 0 || strcmp(url, "/healthz") == 0 || strcmp(url, "/readyz") == 0;
    if (!known)
        return answer_const(conn, MHD_HTTP_NOT_FOUND,
                            "{\"error\":\"no such endpoint (/metrics, /healthz, /readyz)\"}\n",
                            NULL);
    if (strcmp(method, MHD_HTTP_METHOD_GET) != 0 && strcmp(method, MHD_HTTP_METHOD_HEAD) != 0)
        return answer_const(conn, MHD_HTTP_METHOD_NOT_ALLOWED, "{\"error\":\"GET only\"}\n",
                            "GET, HEAD");
    if (strcmp(url, "/healthz") == 0)
        return answer_const(conn, MHD_HTTP_OK, "{\"status\":\"alive\"}\n", NULL);

    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (f == NULL)
        return MHD_NO;
    bool ready = true;
    if (strcmp(url, "/metrics") == 0)
        render_metrics(m, f);
    else
        ready = render_ready(m, f);
    if (fclose(f) != 0) {
        free(text);
        return MHD_NO;
    }
    if (strcmp(url, "/metrics") == 0)
        return answer(conn, MHD_HTTP_OK, text, len, "text/plain; version=0.0.4; charset=utf-8",
                      NULL);
    return answer(conn, ready ? MHD_HTTP_OK : MHD_HTTP_SERVICE_UNAVAILABLE, text, len,
                  "application/json", NULL);
}

__attribute__((format(printf, 2, 0))) static void on_mhd_log(void *cls, const char *fmt, va_list ap)
{
    char msg[512];
    vsnprintf(msg, sizeof msg, fmt, ap);
    msg[strcspn(msg, "\n")] = '\0';
    jf_log(JF_LOG_WARN, "metrics server", JF_S("error", msg));
}

/* ---- life cycle ------------------------------------------------------------ */

jf_status jf_metrics_create(jf_metrics **out, const char *listen_addr, const char *const *services,
                            int nservices, int in_flight_limit, bool with_ledger, jf_error *err)
{
    struct sockaddr_in addr;
    int fd = -1;
    jf_status st = JF_ERR_NOMEM;

    if (!jf_listen_parse(&addr, listen_addr)) {
        jf_error_set(err, "[consumer] metrics_listen: '%s' is not an IPv4 HOST:PORT", listen_addr);
        return JF_ERR_INVALID;
    }
    jf_metrics *m = calloc(1, sizeof *m);
    if (m == NULL)
        goto nomem;
    if (nservices > JF_MAX_SERVICES)
        nservices = JF_MAX_SERVICES;
    m->nservices = nservices;
    m->in_flight_limit = in_flight_limit;
    m->with_ledger = with_ledger;
    m->svc = calloc((size_t)(nservices > 0 ? nservices : 1), sizeof *m->svc);
    m->durables =
        calloc((size_t)(nservices > 0 ? nservices : 1) * JF_PRIO_COUNT, sizeof *m->durables);
    if (m->svc == NULL || m->durables == NULL)
        goto nomem;
    for (int s = 0; s < nservices; s++) {
        svc_metrics *sm = &m->svc[s];
        snprintf(sm->name, sizeof sm->name, "%s", services[s]);
        for (int p = 0; p < JF_PRIO_COUNT; p++) {
            for (int o = 0; o < JF_MO_COUNT; o++)
                atomic_init(&sm->jobs[p][o], 0);
            atomic_init(&sm->redeliveries[p], 0);
            durable_ready *d = &m->durables[s * JF_PRIO_COUNT + p];
            jf_durable_name(d->name, sizeof d->name, services[s], (jf_priority)p);
            atomic_init(&d->bound, false);
        }
        for (int r = 0; r < NREASONS; r++)
            atomic_init(&sm->dead[r], 0);
        for (int b = 0; b <= NBUCKETS; b++)
            atomic_init(&sm->buckets[b], 0);
        atomic_init(&sm->sum_ms, 0);
        atomic_init(&sm->rate_waits, 0);
        atomic_init(&sm->trips, 0);
        atomic_init(&sm->breaker, (int)JF_BREAKER_CLOSED);
    }
    atomic_init(&m->in_flight, 0);
    atomic_init(&m->running, false);
    atomic_init(&m->nats, false);
    atomic_init(&m->ledger, false);

    /* Our own socket: a port in use is reported as such, port 0 resolved. */
    struct sockaddr_in bound;
    socklen_t blen = sizeof bound;
    int one = 1;
    fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
        bind(fd, (const struct sockaddr *)&addr, sizeof addr) != 0 ||
        listen(fd, LISTEN_BACKLOG) != 0 || getsockname(fd, (struct sockaddr *)&bound, &blen) != 0) {
        jf_error_set(err, "[consumer] metrics_listen: cannot listen on %s: %s", listen_addr,
                     strerror(errno));
        st = JF_ERR_IO;
        goto fail;
    }
    m->port = ntohs(bound.sin_port);

    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_AUTO | MHD_USE_ERROR_LOG;
    m->daemon = MHD_start_daemon(flags, 0, NULL, NULL, on_request, m, MHD_OPTION_EXTERNAL_LOGGER,
                                 on_mhd_log, NULL, MHD_OPTION_LISTEN_SOCKET, (MHD_socket)fd,
                                 MHD_OPTION_CONNECTION_LIMIT, (unsigned)CONNECTION_LIMIT,
                                 MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)CONNECTION_TIMEOUT_S,
                                 MHD_OPTION_END);
    if (m->daemon == NULL) {
        jf_error_set(err, "[consumer] metrics_listen: cannot start the HTTP server on %s",
                     listen_addr);
        st = JF_ERR_IO;
        goto fail;
    }
    char host[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &addr.sin_addr, host, sizeof host);
    jf_log(JF_LOG_INFO, "metrics listening", JF_S("host", host), JF_I("port", m->port),
           JF_S("paths", "/metrics /healthz /readyz"));
    *out = m;
    return JF_OK;

nomem:
    jf_error_set(err, "out of memory for the metrics");
fail:
    if (fd >= 0)
        close(fd);
    jf_metrics_destroy(m);
    return st;
}

void jf_metrics_destroy(jf_metrics *m)
{
    if (m == NULL)
        return;
    if (m->daemon != NULL)
        MHD_stop_daemon(m->daemon);
    free(m->svc);
    free(m->durables);
    free(m);
}
