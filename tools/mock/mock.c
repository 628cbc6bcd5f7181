/* mock.c — jetfleet-mock: the downstream HTTP service of the tests, the
 * benchmarks and scripts/run-local. It answers every POST like an LLM API
 * would when it is slow, flaky and rate-limited on demand: latency drawn from
 * a distribution, injected 503s, 429s with Retry-After, calls held until the
 * client gives up, 200s whose body is not JSON, and per-job directives in the
 * envelope's payload.mock. It counts what it saw (GET /_mock/stats) and can
 * log every call as a JSON line (--log).
 *
 * Threads. libmicrohttpd runs one internal epoll thread that calls every
 * handler, so the configuration, the random generator and the log file are
 * touched by that thread alone. A delayed answer must not cost a thread: the
 * handler builds the answer, suspends the connection and pushes it on a
 * min-heap of deadlines owned by the timer thread, which resumes it when its
 * latency has passed; MHD then calls the handler again, which queues the
 * answer. A suspended connection is invisible to MHD's poll, so a client that
 * gives up would go unnoticed until the deadline (for a held call: forever,
 * one file descriptor and one in_flight lost per timeout). The timer thread
 * therefore also watches every suspended socket for EPOLLRDHUP and resumes a
 * call whose client left, which MHD then closes. That is why it sleeps in
 * epoll_wait (with an eventfd to be woken for an earlier deadline) rather
 * than on a condition variable.
 *
 * Counters (requests, in_flight, by_status, per_second, by_key) live under
 * their own mutex so that the stats stay consistent should MHD ever run a
 * thread pool; today the lock is never contended. */
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>
#include <microhttpd.h>

#include "listen.h"
#include "duration.h"
#include "log.h"
#include "status.h"

#define PROG "jetfleet-mock"

enum {
    EXIT_USAGE = 2,
};

/* Every buffer filled from a client has a hard maximum. */
#define MAX_BODY          ((size_t)8 * 1024 * 1024) /* a larger request gets 413 */
#define MAX_KEY           256                       /* longer Idempotency-Keys are not tracked */
#define MAX_KEYS          1000000                   /* by_key stops growing here */
#define MAX_RETRY_AFTER   64
#define MAX_LATENCY_MS    (24LL * 3600 * 1000) /* an exp: tail is cut here */
#define PER_SECOND_WINDOW 3600                 /* per_second keeps the last hour */
#define CONNECTION_LIMIT  20000
#define LISTEN_BACKLOG    4096
#define CONNECTION_MEMORY (16 * 1024)
#define NEVER             INT64_MAX /* the deadline of a held call */
#define NO_INDEX          SIZE_MAX

/* ---------------------------------------------------------------------------
 * Latency distributions and the global options */

typedef enum lat_kind {
    LAT_FIXED,   /* a_ms */
    LAT_UNIFORM, /* between a_ms and b_ms */
    LAT_EXP,     /* exponential with mean a_ms */
} lat_kind;

typedef struct latency_spec {
    lat_kind kind;
    int64_t a_ms, b_ms;
    char text[64]; /* as given, for GET /_mock/config */
} latency_spec;

typedef struct mock_options {
    latency_spec latency;
    double error_rate, timeout_rate, rate_limit_rate, invalid_json_rate;
    char retry_after[MAX_RETRY_AFTER + 1];
    int status; /* 0: no forced status */
} mock_options;

/* Parses "0", "150ms", "50ms-2s" or "exp:500ms". */
static bool latency_parse(latency_spec *out, const char *s, char *why, size_t cap)
{
    latency_spec l = {0};
    jf_error err = {{0}};
    if (strlen(s) >= sizeof l.text) {
        snprintf(why, cap, "\"%.20s...\" is too long", s);
        return false;
    }
    if (strncmp(s, "exp:", 4) == 0) {
        l.kind = LAT_EXP;
        if (jf_duration_parse(&l.a_ms, s + 4, &err) != JF_OK) {
            snprintf(why, cap, "%.300s", err.msg);
            return false;
        }
    } else if (strchr(s, '-') != NULL) {
        /* Durations have no sign, so the first '-' is the range's. */
        const char *dash = strchr(s, '-');
        char lo[64];
        size_t n = (size_t)(dash - s);
        memcpy(lo, s, n);
        lo[n] = '\0';
        l.kind = LAT_UNIFORM;
        if (jf_duration_parse(&l.a_ms, lo, &err) != JF_OK ||
            jf_duration_parse(&l.b_ms, dash + 1, &err) != JF_OK) {
            snprintf(why, cap, "range \"%s\": %.300s", s, err.msg);
            return false;
        }
        if (l.b_ms < l.a_ms) {
            snprintf(why, cap, "range \"%s\" ends before it starts", s);
            return false;
        }
    } else {
        l.kind = LAT_FIXED;
        if (jf_duration_parse(&l.a_ms, s, &err) != JF_OK) {
            snprintf(why, cap, "%.300s", err.msg);
            return false;
        }
    }
    if (l.a_ms > MAX_LATENCY_MS || l.b_ms > MAX_LATENCY_MS) {
        snprintf(why, cap, "\"%s\" is longer than a day", s);
        return false;
    }
    snprintf(l.text, sizeof l.text, "%s", s);
    *out = l;
    return true;
}

/* Parses a probability: a decimal number from 0 to 1. */
static bool rate_parse(double *out, const char *s)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || *end != '\0' || errno != 0 || !(v >= 0.0 && v <= 1.0))
        return false;
    *out = v;
    return true;
}

/* A Retry-After value goes into a header as it is: printable ASCII only, so
 * nothing from a test can split the header. */
static bool retry_after_ok(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > MAX_RETRY_AFTER)
        return false;
    for (size_t i = 0; i < n; i++)
        if (s[i] < 0x20 || s[i] > 0x7e)
            return false;
    return true;
}

static bool status_ok(long long v)
{
    return v == 0 || (v >= 100 && v <= 599);
}

/* The outcome probabilities split one draw between them, so each rate holds
 * exactly as given; that needs them to fit in 1. */
static bool rates_ok(const mock_options *o, char *why, size_t cap)
{
    double sum = o->timeout_rate + o->rate_limit_rate + o->error_rate + o->invalid_json_rate;
    if (sum > 1.0 + 1e-9) {
        snprintf(why, cap,
                 "timeout_rate + rate_limit_rate + error_rate + invalid_json_rate is %g, more "
                 "than 1",
                 sum);
        return false;
    }
    return true;
}

/* ---------------------------------------------------------------------------
 * Random numbers: splitmix64, reproducible with --seed. Used by the MHD
 * thread only. */

static uint64_t rng_next(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* Uniform in [0, 1). */
static double rng_unit(uint64_t *state)
{
    return (double)(rng_next(state) >> 11) * 0x1.0p-53;
}

static int64_t latency_draw(const latency_spec *l, uint64_t *rng)
{
    double ms;
    switch (l->kind) {
    case LAT_UNIFORM:
        ms = (double)l->a_ms + rng_unit(rng) * (double)(l->b_ms - l->a_ms);
        break;
    case LAT_EXP:
        ms = -(double)l->a_ms * log1p(-rng_unit(rng));
        break;
    default:
        return l->a_ms;
    }
    if (ms > (double)MAX_LATENCY_MS)
        return MAX_LATENCY_MS;
    return (int64_t)(ms + 0.5);
}

/* ---------------------------------------------------------------------------
 * Time */

static int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---------------------------------------------------------------------------
 * Calls per key: open addressing with linear probing. */

typedef struct key_entry {
    char *key; /* NULL: free slot */
    uint64_t hash;
    uint64_t calls;
} key_entry;

typedef struct key_table {
    key_entry *slots;
    size_t cap; /* a power of two, or 0 */
    size_t len;
    uint64_t untracked; /* calls not in the table: no key, key too long, table full */
} key_table;

static uint64_t hash_key(const char *s)
{
    uint64_t h = 0xcbf29ce484222325ULL; /* FNV-1a */
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 0x100000001b3ULL;
    return h;
}

static void key_table_clear(key_table *t)
{
    for (size_t i = 0; i < t->cap; i++)
        free(t->slots[i].key);
    free(t->slots);
    memset(t, 0, sizeof *t);
}

static bool key_table_grow(key_table *t)
{
    size_t ncap = t->cap ? t->cap * 2 : 1024;
    key_entry *ns = calloc(ncap, sizeof *ns);
    if (ns == NULL)
        return false;
    for (size_t i = 0; i < t->cap; i++) {
        key_entry *e = &t->slots[i];
        if (e->key == NULL)
            continue;
        size_t j = (size_t)e->hash & (ncap - 1);
        while (ns[j].key != NULL)
            j = (j + 1) & (ncap - 1);
        ns[j] = *e;
    }
    free(t->slots);
    t->slots = ns;
    t->cap = ncap;
    return true;
}

/* Counts one call for key; returns the calls so far including this one, or
 * 0 when the key cannot be tracked (memory, or MAX_KEYS reached). */
static uint64_t key_table_hit(key_table *t, const char *key)
{
    uint64_t h = hash_key(key);
    if (t->cap > 0) {
        size_t j = (size_t)h & (t->cap - 1);
        while (t->slots[j].key != NULL) {
            if (t->slots[j].hash == h && strcmp(t->slots[j].key, key) == 0)
                return ++t->slots[j].calls;
            j = (j + 1) & (t->cap - 1);
        }
    }
    if (t->len >= MAX_KEYS)
        goto untracked;
    /* Kept below 70% full so probes stay short. */
    if ((t->len + 1) * 10 > t->cap * 7 && !key_table_grow(t))
        goto untracked;
    char *copy = strdup(key);
    if (copy == NULL)
        goto untracked;
    size_t j = (size_t)h & (t->cap - 1);
    while (t->slots[j].key != NULL)
        j = (j + 1) & (t->cap - 1);
    t->slots[j] = (key_entry){copy, h, 1};
    t->len++;
    return 1;
untracked:
    t->untracked++;
    return 0;
}

/* ---------------------------------------------------------------------------
 * State */

typedef enum req_kind {
    REQ_CALL,  /* a POST outside /_mock/ */
    REQ_ADMIN, /* under /_mock/ */
    REQ_OTHER, /* anything else: 405 */
} req_kind;

typedef enum req_state {
    REQ_RECEIVING, /* headers seen, body arriving */
    REQ_SUSPENDED, /* answer decided, waiting for its latency (or forever) */
    REQ_ANSWERED,
} req_state;

typedef struct request {
    req_kind kind;
    req_state state;
    struct MHD_Connection *conn;
    char *body;
    size_t len, cap;
    bool too_large;

    /* A call, once the whole request is in. */
    bool counted;   /* still in in_flight */
    bool abandoned; /* the client left, or the mock stops: close, do not answer */
    int64_t t0_ns;  /* when the request was complete */
    int64_t ts_ms;
    char key[MAX_KEY + 1];
    bool has_key;
    long long attempt;
    bool has_attempt;
    unsigned status;               /* of the decided answer; 0 for a held call */
    struct MHD_Response *response; /* NULL for a held call */

    /* Timer thread: heap position and deadline, the socket it watches. */
    int64_t deadline_ns;
    size_t heap_index;
    int fd;
    struct request *due_next;
} request;

typedef struct stats {
    uint64_t requests;
    uint64_t in_flight, peak_in_flight;
    uint64_t unanswered;     /* calls that ended without an answer: the client left */
    uint64_t by_status[500]; /* index status - 100 */
    struct {
        int64_t second;
        uint64_t calls;
    } per_second[PER_SECOND_WINDOW];
    key_table by_key;
} stats;

typedef struct mock {
    struct MHD_Daemon *daemon;
    mock_options opt; /* MHD thread only */
    uint64_t rng;     /* MHD thread only */
    FILE *log;        /* MHD thread only */
    bool log_failed;

    pthread_mutex_t stats_lock;
    stats st;

    /* The timer thread's heap and watch set. */
    pthread_mutex_t timer_lock;
    request **heap;
    size_t heap_len, heap_cap;
    bool timer_stop; /* the timer thread ends */
    bool stopping;   /* no new suspensions: the daemon is about to stop */
    int epfd;
    int wakefd;
    pthread_t timer;
} mock;

/* ---------------------------------------------------------------------------
 * Deadline heap, under timer_lock. */

static void heap_set(mock *m, size_t i, request *r)
{
    m->heap[i] = r;
    r->heap_index = i;
}

static void heap_up(mock *m, size_t i)
{
    request *r = m->heap[i];
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (m->heap[p]->deadline_ns <= r->deadline_ns)
            break;
        heap_set(m, i, m->heap[p]);
        i = p;
    }
    heap_set(m, i, r);
}

static void heap_down(mock *m, size_t i)
{
    request *r = m->heap[i];
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= m->heap_len)
            break;
        if (c + 1 < m->heap_len && m->heap[c + 1]->deadline_ns < m->heap[c]->deadline_ns)
            c++;
        if (r->deadline_ns <= m->heap[c]->deadline_ns)
            break;
        heap_set(m, i, m->heap[c]);
        i = c;
    }
    heap_set(m, i, r);
}

static bool heap_push(mock *m, request *r)
{
    if (m->heap_len == m->heap_cap) {
        size_t ncap = m->heap_cap ? m->heap_cap * 2 : 1024;
        request **nh = realloc(m->heap, ncap * sizeof *nh);
        if (nh == NULL)
            return false;
        m->heap = nh;
        m->heap_cap = ncap;
    }
    heap_set(m, m->heap_len++, r);
    heap_up(m, r->heap_index);
    return true;
}

static void heap_remove(mock *m, request *r)
{
    size_t i = r->heap_index;
    r->heap_index = NO_INDEX;
    request *last = m->heap[--m->heap_len];
    if (i == m->heap_len)
        return;
    heap_set(m, i, last);
    heap_up(m, i);
    heap_down(m, last->heap_index);
}

/* ---------------------------------------------------------------------------
 * Timer thread */

static void timer_wake(mock *m)
{
    uint64_t one = 1;
    /* A full counter already means a pending wake-up. */
    if (write(m->wakefd, &one, sizeof one) < 0 && errno != EAGAIN)
        jf_log(JF_LOG_ERROR, "cannot wake the timer thread", JF_S("error", strerror(errno)));
}

/* Hands a suspended call back to MHD, which calls on_request again. The
 * socket leaves the watch set first: once resumed, MHD may close it and the
 * number may be reused. */
static void release(mock *m, request *r)
{
    epoll_ctl(m->epfd, EPOLL_CTL_DEL, r->fd, NULL);
    MHD_resume_connection(r->conn);
}

static int timeout_ms(int64_t deadline_ns, int64_t now_ns)
{
    int64_t left = deadline_ns - now_ns;
    if (left <= 0)
        return 0;
    int64_t ms = (left + 999999) / 1000000; /* never wake before the deadline */
    return ms > INT_MAX ? INT_MAX : (int)ms;
}

static void *timer_main(void *arg)
{
    mock *m = arg;
    struct epoll_event ev[256];

    pthread_mutex_lock(&m->timer_lock);
    while (!m->timer_stop) {
        int64_t now = mono_ns();
        request *due = NULL;
        while (m->heap_len > 0 && m->heap[0]->deadline_ns <= now) {
            request *r = m->heap[0];
            heap_remove(m, r);
            r->due_next = due;
            due = r;
        }
        int wait = -1;
        if (m->heap_len > 0 && m->heap[0]->deadline_ns != NEVER)
            wait = timeout_ms(m->heap[0]->deadline_ns, now);
        pthread_mutex_unlock(&m->timer_lock);

        /* Popped calls belong to this thread until resumed. */
        while (due != NULL) {
            request *next = due->due_next;
            release(m, due);
            due = next;
        }

        int n = epoll_wait(m->epfd, ev, (int)(sizeof ev / sizeof ev[0]), wait);
        if (n < 0 && errno != EINTR) {
            jf_log(JF_LOG_ERROR, "epoll_wait failed in the timer thread",
                   JF_S("error", strerror(errno)));
            n = 0;
        }
        for (int i = 0; i < n; i++) {
            request *r = ev[i].data.ptr;
            if (r == NULL) {
                uint64_t v;
                if (read(m->wakefd, &v, sizeof v) < 0 && errno != EAGAIN)
                    jf_log(JF_LOG_ERROR, "cannot read the timer's eventfd",
                           JF_S("error", strerror(errno)));
                continue;
            }
            /* The client closed its side: it gave up waiting. */
            pthread_mutex_lock(&m->timer_lock);
            bool mine = r->heap_index != NO_INDEX;
            if (mine) {
                heap_remove(m, r);
                r->abandoned = true;
            }
            pthread_mutex_unlock(&m->timer_lock);
            if (mine)
                release(m, r);
        }
        pthread_mutex_lock(&m->timer_lock);
    }
    pthread_mutex_unlock(&m->timer_lock);
    return NULL;
}

/* Suspends r until deadline_ns (NEVER: until the client leaves). Called by
 * the MHD thread from on_request. Returns false when the mock is stopping or
 * out of memory; then the caller answers at once. */
static bool suspend_until(mock *m, request *r, int64_t deadline_ns)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(r->conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (ci == NULL)
        return false;
    r->fd = ci->connect_fd;
    r->deadline_ns = deadline_ns;

    pthread_mutex_lock(&m->timer_lock);
    if (m->stopping)
        goto refuse;
    /* Suspended before it is visible to the timer thread, which could
     * otherwise resume a connection that is not suspended yet. */
    MHD_suspend_connection(r->conn);
    r->state = REQ_SUSPENDED;
    if (!heap_push(m, r))
        goto unsuspend;
    /* EPOLLRDHUP alone: a client that pipelines its next request must not
     * wake us, one that closes must. Added under the lock so that the timer
     * thread, which pops under it, deletes only after this add. */
    struct epoll_event ev = {.events = EPOLLRDHUP, .data.ptr = r};
    if (epoll_ctl(m->epfd, EPOLL_CTL_ADD, r->fd, &ev) != 0) {
        heap_remove(m, r);
        goto unsuspend;
    }
    bool earliest = r->heap_index == 0 && deadline_ns != NEVER;
    pthread_mutex_unlock(&m->timer_lock);
    if (earliest)
        timer_wake(m);
    return true;

unsuspend:
    /* MHD processes the resume on its next turn and calls on_request, which
     * finds REQ_SUSPENDED and answers what r holds. */
    MHD_resume_connection(r->conn);
    pthread_mutex_unlock(&m->timer_lock);
    return true;
refuse:
    pthread_mutex_unlock(&m->timer_lock);
    return false;
}

/* ---------------------------------------------------------------------------
 * Counters */

static void stats_clear(stats *s)
{
    key_table_clear(&s->by_key);
    uint64_t in_flight = s->in_flight;
    memset(s, 0, sizeof *s);
    /* in_flight is a gauge, not a counter: the calls still held are real. */
    s->in_flight = in_flight;
    s->peak_in_flight = in_flight;
}

/* Counts a call that has fully arrived; returns its number for its key
 * (1 for the first), or 0 when it has no key or the key is not tracked. */
static uint64_t count_arrival(mock *m, request *r)
{
    int64_t sec = r->ts_ms / 1000;
    uint64_t nth = 0;
    pthread_mutex_lock(&m->stats_lock);
    stats *s = &m->st;
    s->requests++;
    if (++s->in_flight > s->peak_in_flight)
        s->peak_in_flight = s->in_flight;
    size_t slot = (size_t)(sec % PER_SECOND_WINDOW);
    if (s->per_second[slot].second != sec) {
        s->per_second[slot].second = sec;
        s->per_second[slot].calls = 0;
    }
    s->per_second[slot].calls++;
    if (r->has_key)
        nth = key_table_hit(&s->by_key, r->key);
    else
        s->by_key.untracked++;
    pthread_mutex_unlock(&m->stats_lock);
    r->counted = true;
    return nth;
}

static void log_call(mock *m, const request *r, unsigned status)
{
    if (m->log == NULL)
        return;
    char line[MAX_KEY * 6 + 256];
    size_t n = (size_t)snprintf(line, sizeof line, "{\"ts_ms\":%" PRId64 ",\"key\":", r->ts_ms);
    if (r->has_key) {
        line[n++] = '"';
        n = jf_json_escape(line, n, sizeof line - 128, r->key);
        line[n++] = '"';
    } else {
        n += (size_t)snprintf(line + n, sizeof line - n, "null");
    }
    if (r->has_attempt)
        n += (size_t)snprintf(line + n, sizeof line - n, ",\"attempt\":%lld", r->attempt);
    else
        n += (size_t)snprintf(line + n, sizeof line - n, ",\"attempt\":null");
    n += (size_t)snprintf(line + n, sizeof line - n, ",\"status\":%u,\"latency_ms\":%" PRId64 "}\n",
                          status, (mono_ns() - r->t0_ns) / 1000000);
    /* Flushed per line: tests read the log while the mock runs. */
    if ((fwrite(line, 1, n, m->log) != n || fflush(m->log) != 0) && !m->log_failed) {
        m->log_failed = true;
        jf_log(JF_LOG_ERROR, "cannot write the call log", JF_S("error", strerror(errno)));
    }
}

/* The call leaves in_flight: answered with status, or (status 0) ended
 * without an answer. */
static void count_done(mock *m, request *r, unsigned status)
{
    if (!r->counted)
        return;
    r->counted = false;
    pthread_mutex_lock(&m->stats_lock);
    m->st.in_flight--;
    if (status >= 100 && status <= 599)
        m->st.by_status[status - 100]++;
    else
        m->st.unanswered++;
    pthread_mutex_unlock(&m->stats_lock);
    log_call(m, r, status);
}

/* ---------------------------------------------------------------------------
 * Answers */

static struct MHD_Response *response_take(char *text, size_t len, const char *content_type)
{
    struct MHD_Response *resp = MHD_create_response_from_buffer(len, text, MHD_RESPMEM_MUST_FREE);
    if (resp == NULL) {
        free(text);
        return NULL;
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, content_type);
    return resp;
}

/* A JSON answer; takes a reference of j. */
static struct MHD_Response *response_json(json_t *j)
{
    if (j == NULL)
        return NULL;
    char *text = json_dumps(j, JSON_COMPACT | JSON_ENCODE_ANY);
    json_decref(j);
    if (text == NULL)
        return NULL;
    return response_take(text, strlen(text), "application/json");
}

static struct MHD_Response *response_error(const char *fmt, ...)
    __attribute__((format(printf, 1, 2)));

static struct MHD_Response *response_error(const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return response_json(json_pack("{s:b,s:s}", "ok", 0, "error", msg));
}

static enum MHD_Result queue(struct MHD_Connection *conn, unsigned status,
                             struct MHD_Response *resp)
{
    if (resp == NULL)
        return MHD_NO;
    enum MHD_Result ret = MHD_queue_response(conn, status, resp);
    MHD_destroy_response(resp);
    return ret;
}

/* Queues r's decided answer and counts it. */
static enum MHD_Result answer_call(mock *m, request *r)
{
    struct MHD_Response *resp = r->response;
    r->response = NULL;
    r->state = REQ_ANSWERED;
    if (resp == NULL)
        return MHD_NO;
    count_done(m, r, r->status);
    return queue(r->conn, r->status, resp);
}

/* ---------------------------------------------------------------------------
 * Calls */

/* payload.mock of one job. */
typedef struct directives {
    bool outcome; /* any of status, fail_first, body, invalid_json, timeout */
    int status;
    int64_t fail_first;
    char retry_after[MAX_RETRY_AFTER + 1];
    bool invalid_json, timeout, has_latency;
    latency_spec latency;
    json_t *body; /* borrowed from the envelope */
} directives;

static bool string_or_int(char *out, size_t cap, json_t *v)
{
    if (json_is_string(v)) {
        snprintf(out, cap, "%s", json_string_value(v));
        return strlen(json_string_value(v)) < cap;
    }
    if (json_is_integer(v) && json_integer_value(v) >= 0) {
        snprintf(out, cap, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
        return true;
    }
    return false;
}

/* Strict: a typo in a test's directive answers 400 naming it, instead of a
 * test that passes for the wrong reason. */
static bool directives_parse(directives *d, json_t *mock_obj, char *why, size_t cap)
{
    memset(d, 0, sizeof *d);
    if (mock_obj == NULL)
        return true;
    if (!json_is_object(mock_obj)) {
        snprintf(why, cap, "payload.mock must be an object");
        return false;
    }
    const char *k;
    json_t *v;
    json_object_foreach(mock_obj, k, v)
    {
        if (strcmp(k, "status") == 0) {
            if (!json_is_integer(v) || json_integer_value(v) < 100 || json_integer_value(v) > 599)
                goto bad;
            d->status = (int)json_integer_value(v);
            d->outcome = true;
        } else if (strcmp(k, "fail_first") == 0) {
            if (!json_is_integer(v) || json_integer_value(v) < 0)
                goto bad;
            d->fail_first = json_integer_value(v);
            d->outcome = true;
        } else if (strcmp(k, "retry_after") == 0) {
            if (!string_or_int(d->retry_after, sizeof d->retry_after, v) ||
                !retry_after_ok(d->retry_after))
                goto bad;
        } else if (strcmp(k, "latency") == 0) {
            char lwhy[400];
            if (json_is_integer(v) && json_integer_value(v) >= 0 &&
                json_integer_value(v) <= MAX_LATENCY_MS) {
                d->latency = (latency_spec){LAT_FIXED, json_integer_value(v), 0, ""};
            } else if (!json_is_string(v)) {
                goto bad;
            } else if (!latency_parse(&d->latency, json_string_value(v), lwhy, sizeof lwhy)) {
                snprintf(why, cap, "payload.mock.latency: %s", lwhy);
                return false;
            }
            d->has_latency = true;
        } else if (strcmp(k, "invalid_json") == 0) {
            if (!json_is_boolean(v))
                goto bad;
            d->invalid_json = json_is_true(v);
            d->outcome |= d->invalid_json;
        } else if (strcmp(k, "timeout") == 0) {
            if (!json_is_boolean(v))
                goto bad;
            d->timeout = json_is_true(v);
            d->outcome |= d->timeout;
        } else if (strcmp(k, "body") == 0) {
            d->body = v;
            d->outcome = true;
        } else {
            snprintf(why, cap,
                     "payload.mock.%.64s: unknown directive (status, fail_first, retry_after, "
                     "latency, invalid_json, timeout, body)",
                     k);
            return false;
        }
    }
    return true;
bad:
    snprintf(why, cap, "payload.mock.%.64s: invalid value", k);
    return false;
}

static const char NOT_JSON[] = "{\"ok\": true, \"result\": this is not JSON";

/* The answer of a call that succeeds: the normal one, or what a directive
 * asked for. */
static struct MHD_Response *success_body(const directives *d, json_t *id, const request *r,
                                         json_t *payload)
{
    if (d->invalid_json) {
        char *text = strdup(NOT_JSON);
        return text ? response_take(text, strlen(text), "application/json") : NULL;
    }
    if (d->body != NULL)
        return response_json(json_incref(d->body));
    return response_json(json_pack("{s:b,s:O,s:o,s:O}", "ok", 1, "id", id ? id : json_null(),
                                   "attempt",
                                   r->has_attempt ? json_integer(r->attempt) : json_null(), "echo",
                                   payload ? payload : json_null()));
}

static struct MHD_Response *failure_body(unsigned status, const char *retry_after, const char *what)
{
    struct MHD_Response *resp = response_error("mock: %s (%u)", what, status);
    if (resp != NULL && retry_after != NULL && retry_after[0] != '\0')
        MHD_add_response_header(resp, MHD_HTTP_HEADER_RETRY_AFTER, retry_after);
    return resp;
}

static void read_call_headers(request *r, json_t *id)
{
    const char *key = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, "Idempotency-Key");
    /* Without the header the envelope's id stands in, so fail_first works
     * for a client that does not send one. */
    if (key == NULL && json_is_string(id))
        key = json_string_value(id);
    if (key != NULL && strlen(key) <= MAX_KEY) {
        memcpy(r->key, key, strlen(key) + 1);
        r->has_key = true;
    }
    const char *att = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, "Jetfleet-Attempt");
    if (att != NULL) {
        char *end;
        errno = 0;
        long long v = strtoll(att, &end, 10);
        if (end != att && *end == '\0' && errno == 0) {
            r->attempt = v;
            r->has_attempt = true;
        }
    }
}

static enum MHD_Result handle_call(mock *m, request *r)
{
    char why[512];
    json_t *env = NULL, *id = NULL, *payload = NULL, *mock_obj = NULL;
    directives d;

    r->t0_ns = mono_ns();
    r->ts_ms = wall_ms();
    /* Lenient about the body: any POST is a call; what is not an envelope
     * just has no id and no payload to echo. */
    if (r->len > 0)
        env = json_loadb(r->body, r->len, 0, NULL);
    if (json_is_object(env)) {
        id = json_object_get(env, "id");
        payload = json_object_get(env, "payload");
        if (json_is_object(payload))
            mock_obj = json_object_get(payload, "mock");
    }
    read_call_headers(r, id);
    uint64_t nth = count_arrival(m, r);

    if (r->too_large) {
        r->status = MHD_HTTP_CONTENT_TOO_LARGE;
        r->response = response_error("mock: request body larger than %zu bytes", MAX_BODY);
        goto now;
    }
    if (!directives_parse(&d, mock_obj, why, sizeof why)) {
        r->status = MHD_HTTP_BAD_REQUEST;
        r->response = response_error("mock: %s", why);
        goto now;
    }

    const mock_options *o = &m->opt;
    bool hold = false;
    unsigned status = 200;
    const char *retry_after = NULL;
    const char *what = NULL;
    if (d.outcome) {
        if (d.timeout) {
            hold = true;
        } else if (d.fail_first > 0 && (nth == 0 || (int64_t)nth <= d.fail_first)) {
            /* An untracked key (nth 0) fails every time: better a visible
             * failure than a success the test did not ask for. */
            status = d.status ? (unsigned)d.status : 503;
            what = "fail_first";
        } else if (d.fail_first == 0 && d.status != 0) {
            status = (unsigned)d.status;
            what = "status directive";
        }
        if (d.retry_after[0] != '\0')
            retry_after = d.retry_after;
        else if (status == 429)
            retry_after = o->retry_after;
    } else if (o->status != 0) {
        status = (unsigned)o->status;
        what = "forced status";
        if (status == 429)
            retry_after = o->retry_after;
    } else {
        double u = rng_unit(&m->rng);
        double t = o->timeout_rate, rl = t + o->rate_limit_rate, e = rl + o->error_rate,
               ij = e + o->invalid_json_rate;
        if (u < t) {
            hold = true;
        } else if (u < rl) {
            status = 429;
            retry_after = o->retry_after;
            what = "rate limited";
        } else if (u < e) {
            status = 503;
            what = "injected error";
        } else if (u < ij) {
            d.invalid_json = true;
        }
    }

    int64_t latency_ms = latency_draw(d.has_latency ? &d.latency : &o->latency, &m->rng);
    if (hold) {
        r->status = 0;
        if (suspend_until(m, r, NEVER))
            goto out;
        r->status = 503;
        r->response = failure_body(503, NULL, "shutting down");
        goto now;
    }
    r->status = status;
    if (status >= 200 && status < 300)
        r->response = success_body(&d, id, r, payload);
    else
        r->response = failure_body(status, retry_after, what ? what : "status");
    if (r->response != NULL && latency_ms > 0 &&
        suspend_until(m, r, r->t0_ns + latency_ms * 1000000))
        goto out;
now:
    json_decref(env);
    return answer_call(m, r);
out:
    json_decref(env);
    return MHD_YES;
}

/* ---------------------------------------------------------------------------
 * Admin: /_mock/stats, /_mock/config, /_mock/reset */

static json_t *stats_json(mock *m)
{
    json_t *by_status = json_object(), *per_second = json_object(), *by_key = json_object();
    json_t *out = NULL;
    char num[32];

    pthread_mutex_lock(&m->stats_lock);
    stats *s = &m->st;
    if (by_status == NULL || per_second == NULL || by_key == NULL)
        goto unlock;
    for (unsigned i = 0; i < 500; i++) {
        if (s->by_status[i] == 0)
            continue;
        snprintf(num, sizeof num, "%u", i + 100);
        json_object_set_new(by_status, num, json_integer((json_int_t)s->by_status[i]));
    }
    for (size_t i = 0; i < PER_SECOND_WINDOW; i++) {
        if (s->per_second[i].calls == 0)
            continue;
        snprintf(num, sizeof num, "%" PRId64, s->per_second[i].second);
        json_object_set_new(per_second, num, json_integer((json_int_t)s->per_second[i].calls));
    }
    for (size_t i = 0; i < s->by_key.cap; i++) {
        const key_entry *e = &s->by_key.slots[i];
        if (e->key != NULL)
            json_object_set_new(by_key, e->key, json_integer((json_int_t)e->calls));
    }
    out = json_pack("{s:I,s:I,s:I,s:I,s:I,s:O,s:O,s:O}", "requests", (json_int_t)s->requests,
                    "in_flight", (json_int_t)s->in_flight, "peak_in_flight",
                    (json_int_t)s->peak_in_flight, "unanswered", (json_int_t)s->unanswered,
                    "untracked_calls", (json_int_t)s->by_key.untracked, "by_status", by_status,
                    "per_second", per_second, "by_key", by_key);
unlock:
    pthread_mutex_unlock(&m->stats_lock);
    json_decref(by_status);
    json_decref(per_second);
    json_decref(by_key);
    return out;
}

static json_t *options_json(const mock_options *o)
{
    return json_pack("{s:s,s:f,s:f,s:f,s:f,s:s,s:i}", "latency", o->latency.text, "error_rate",
                     o->error_rate, "timeout_rate", o->timeout_rate, "rate_limit_rate",
                     o->rate_limit_rate, "invalid_json_rate", o->invalid_json_rate, "retry_after",
                     o->retry_after, "status", o->status);
}

/* Applies a JSON object of options all at once, or none of them. */
static bool options_update(mock_options *o, const char *body, size_t len, char *why, size_t cap)
{
    json_error_t jerr;
    json_t *j = json_loadb(body ? body : "", len, 0, &jerr);
    mock_options n = *o;
    bool ok = false;
    const char *k;
    json_t *v;

    if (!json_is_object(j)) {
        snprintf(why, cap, "the body must be a JSON object of options");
        goto out;
    }
    json_object_foreach(j, k, v)
    {
        double *rate = NULL;
        if (strcmp(k, "error_rate") == 0)
            rate = &n.error_rate;
        else if (strcmp(k, "timeout_rate") == 0)
            rate = &n.timeout_rate;
        else if (strcmp(k, "rate_limit_rate") == 0)
            rate = &n.rate_limit_rate;
        else if (strcmp(k, "invalid_json_rate") == 0)
            rate = &n.invalid_json_rate;
        if (rate != NULL) {
            double x = json_number_value(v);
            if (!json_is_number(v) || !(x >= 0.0 && x <= 1.0)) {
                snprintf(why, cap, "%s: must be a number from 0 to 1", k);
                goto out;
            }
            *rate = x;
        } else if (strcmp(k, "latency") == 0) {
            char text[32];
            const char *s = text;
            if (json_is_integer(v) && json_integer_value(v) >= 0)
                snprintf(text, sizeof text, "%" JSON_INTEGER_FORMAT "ms", json_integer_value(v));
            else if (json_is_string(v))
                s = json_string_value(v);
            else
                s = NULL;
            char lwhy[400];
            if (s == NULL) {
                snprintf(why, cap,
                         "latency: must be a string such as \"150ms\" or a number of "
                         "milliseconds");
                goto out;
            }
            if (!latency_parse(&n.latency, s, lwhy, sizeof lwhy)) {
                snprintf(why, cap, "latency: %s", lwhy);
                goto out;
            }
        } else if (strcmp(k, "retry_after") == 0) {
            if (!string_or_int(n.retry_after, sizeof n.retry_after, v) ||
                !retry_after_ok(n.retry_after)) {
                snprintf(why, cap,
                         "retry_after: must be seconds or an HTTP date, at most %d "
                         "printable characters",
                         MAX_RETRY_AFTER);
                goto out;
            }
        } else if (strcmp(k, "status") == 0) {
            if (json_is_null(v)) {
                n.status = 0;
            } else if (json_is_integer(v) && status_ok(json_integer_value(v))) {
                n.status = (int)json_integer_value(v);
            } else {
                snprintf(why, cap, "status: must be 0 or null (off) or an HTTP status 100-599");
                goto out;
            }
        } else {
            snprintf(why, cap,
                     "unknown option \"%.64s\" (error_rate, latency, timeout_rate, "
                     "rate_limit_rate, retry_after, invalid_json_rate, status)",
                     k);
            goto out;
        }
    }
    if (!rates_ok(&n, why, cap))
        goto out;
    *o = n;
    ok = true;
out:
    json_decref(j);
    return ok;
}

static enum MHD_Result handle_admin(mock *m, request *r, const char *url, const char *method)
{
    char why[512];
    bool get = strcmp(method, MHD_HTTP_METHOD_GET) == 0;
    bool post = strcmp(method, MHD_HTTP_METHOD_POST) == 0;
    const char *allow = NULL;

    r->state = REQ_ANSWERED;
    if (r->too_large)
        return queue(r->conn, MHD_HTTP_CONTENT_TOO_LARGE,
                     response_error("mock: request body larger than %zu bytes", MAX_BODY));
    if (strcmp(url, "/_mock/stats") == 0) {
        if (get)
            return queue(r->conn, MHD_HTTP_OK, response_json(stats_json(m)));
        allow = "GET";
    } else if (strcmp(url, "/_mock/config") == 0) {
        if (get)
            return queue(r->conn, MHD_HTTP_OK, response_json(options_json(&m->opt)));
        if (post) {
            if (!options_update(&m->opt, r->body, r->len, why, sizeof why))
                return queue(r->conn, MHD_HTTP_BAD_REQUEST, response_error("mock: %s", why));
            return queue(r->conn, MHD_HTTP_OK, response_json(options_json(&m->opt)));
        }
        allow = "GET, POST";
    } else if (strcmp(url, "/_mock/reset") == 0) {
        if (post) {
            pthread_mutex_lock(&m->stats_lock);
            stats_clear(&m->st);
            pthread_mutex_unlock(&m->stats_lock);
            return queue(r->conn, MHD_HTTP_OK, response_json(json_pack("{s:b}", "ok", 1)));
        }
        allow = "POST";
    } else {
        return queue(r->conn, MHD_HTTP_NOT_FOUND,
                     response_error("mock: no such admin path (/_mock/stats, /_mock/config, "
                                    "/_mock/reset)"));
    }
    struct MHD_Response *resp = response_error("mock: %s takes %s", url, allow);
    if (resp != NULL)
        MHD_add_response_header(resp, MHD_HTTP_HEADER_ALLOW, allow);
    return queue(r->conn, MHD_HTTP_METHOD_NOT_ALLOWED, resp);
}

/* ---------------------------------------------------------------------------
 * MHD callbacks */

static bool body_append(request *r, const char *data, size_t n)
{
    if (r->too_large || n > MAX_BODY - r->len) {
        /* The rest is read and dropped so that the 413 can be sent. */
        r->too_large = true;
        return true;
    }
    if (r->len + n > r->cap) {
        size_t ncap = r->cap ? r->cap : 4096;
        while (ncap < r->len + n)
            ncap *= 2;
        if (ncap > MAX_BODY)
            ncap = MAX_BODY;
        char *nb = realloc(r->body, ncap);
        if (nb == NULL)
            return false;
        r->body = nb;
        r->cap = ncap;
    }
    memcpy(r->body + r->len, data, n);
    r->len += n;
    return true;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version, const char *upload_data,
                                  size_t *upload_data_size, void **con_cls)
{
    mock *m = cls;
    request *r = *con_cls;

    if (r == NULL) {
        r = calloc(1, sizeof *r);
        if (r == NULL)
            return MHD_NO;
        r->conn = conn;
        r->heap_index = NO_INDEX;
        r->fd = -1;
        if (strncmp(url, "/_mock/", 7) == 0)
            r->kind = REQ_ADMIN;
        else if (strcmp(method, MHD_HTTP_METHOD_POST) == 0)
            r->kind = REQ_CALL;
        else
            r->kind = REQ_OTHER;
        *con_cls = r;
        return MHD_YES;
    }

    switch (r->state) {
    case REQ_SUSPENDED:
        /* Resumed by the timer thread: the latency has passed, or the client
         * left (or the mock stops), and then MHD_NO closes the connection. */
        if (r->abandoned)
            return MHD_NO;
        return answer_call(m, r);
    case REQ_ANSWERED:
        *upload_data_size = 0;
        return MHD_YES;
    case REQ_RECEIVING:
        break;
    }

    if (*upload_data_size > 0) {
        /* Out of memory for a body answers 413 as well; a request that is
         * not a call has its body dropped. */
        if (r->kind != REQ_OTHER && !body_append(r, upload_data, *upload_data_size))
            r->too_large = true;
        *upload_data_size = 0;
        return MHD_YES;
    }

    switch (r->kind) {
    case REQ_CALL:
        return handle_call(m, r);
    case REQ_ADMIN:
        return handle_admin(m, r, url, method);
    case REQ_OTHER:
        break;
    }
    r->state = REQ_ANSWERED;
    struct MHD_Response *resp = response_error("mock: calls are POST requests");
    if (resp != NULL)
        MHD_add_response_header(resp, MHD_HTTP_HEADER_ALLOW, "POST");
    return queue(conn, MHD_HTTP_METHOD_NOT_ALLOWED, resp);
}

/* Every request ends here, answered or not: the single place r is freed,
 * and where a call that was never answered leaves in_flight. */
static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    mock *m = cls;
    request *r = *con_cls;
    if (r == NULL)
        return;
    count_done(m, r, 0);
    if (r->response != NULL)
        MHD_destroy_response(r->response);
    free(r->body);
    free(r);
    *con_cls = NULL;
}

/* ---------------------------------------------------------------------------
 * Command line */

typedef struct cli {
    struct sockaddr_in addr;
    bool has_listen;
    const char *log_path;
    uint64_t seed;
    bool has_seed;
} cli;

static void usage(FILE *out)
{
    fprintf(out,
            "Usage: %s --listen 127.0.0.1:PORT [OPTIONS]\n"
            "\n"
            "A downstream HTTP service for tests and local runs: every POST (any path\n"
            "outside /_mock/) answers 200 {\"ok\":true,\"id\":...,\"attempt\":...,\"echo\":...}\n"
            "after a latency, unless an injected failure or a per-job directive in the\n"
            "envelope's payload.mock says otherwise.\n"
            "\n"
            "Options:\n"
            "  --listen ADDR:PORT        IPv4 address and port to listen on (port 0: any free\n"
            "                            one; the line 'listening on ADDR:PORT' tells which)\n"
            "  --latency SPEC            0 | 150ms (fixed) | 50ms-2s (uniform) | exp:500ms\n"
            "                            (exponential with that mean); default 0\n"
            "  --error-rate P            probability of a 503\n"
            "  --timeout-rate P          probability that a call is never answered\n"
            "  --rate-limit-rate P       probability of a 429 with Retry-After\n"
            "  --retry-after VALUE       Retry-After of 429s: seconds or an HTTP date (default 1)\n"
            "  --invalid-json-rate P     probability of a 200 whose body is not JSON\n"
            "  --status CODE             answer every call with this status (0: off)\n"
            "  --log FILE                append one JSON line per call to FILE\n"
            "  --seed N                  seed of the random draws (default: from the clock)\n"
            "  -h, --help                show this help and exit\n"
            "  -V, --version             show the version and exit\n"
            "P is a probability from 0 to 1; the four together may not exceed 1.\n"
            "\n"
            "Per-job directives (payload.mock of the envelope) override the options:\n"
            "  {\"status\": 400}                              always this status\n"
            "  {\"fail_first\": 2}                            the first 2 calls per\n"
            "                                               Idempotency-Key answer 503\n"
            "  {\"fail_first\": 2, \"status\": 429, \"retry_after\": \"2\"}\n"
            "  {\"latency\": \"2s\"}                            this call's latency (any SPEC)\n"
            "  {\"invalid_json\": true}                       a 200 whose body is not JSON\n"
            "  {\"body\": {...}}                              a 200 with this JSON body\n"
            "  {\"timeout\": true}                            never answered\n"
            "\n"
            "Admin: GET /_mock/stats; GET or POST /_mock/config (a JSON object of\n"
            "error_rate, latency, timeout_rate, rate_limit_rate, retry_after,\n"
            "invalid_json_rate, status); POST /_mock/reset.\n"
            "Runs until SIGTERM or SIGINT. Exit status: 0 stopped, 1 runtime failure, 2 usage.\n",
            PROG);
}

static int usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static int usage_error(const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "%s: %s\nTry '%s --help'.\n", PROG, msg, PROG);
    return EXIT_USAGE;
}

/* Returns -1 to go on, or the exit code. */
static int parse_args(int argc, char **argv, cli *c, mock_options *o)
{
    enum {
        OPT_LISTEN = 256,
        OPT_LATENCY,
        OPT_ERROR_RATE,
        OPT_TIMEOUT_RATE,
        OPT_RATE_LIMIT_RATE,
        OPT_RETRY_AFTER,
        OPT_INVALID_JSON_RATE,
        OPT_STATUS,
        OPT_LOG,
        OPT_SEED,
    };
    static const struct option longopts[] = {
        {"listen", required_argument, NULL, OPT_LISTEN},
        {"latency", required_argument, NULL, OPT_LATENCY},
        {"error-rate", required_argument, NULL, OPT_ERROR_RATE},
        {"timeout-rate", required_argument, NULL, OPT_TIMEOUT_RATE},
        {"rate-limit-rate", required_argument, NULL, OPT_RATE_LIMIT_RATE},
        {"retry-after", required_argument, NULL, OPT_RETRY_AFTER},
        {"invalid-json-rate", required_argument, NULL, OPT_INVALID_JSON_RATE},
        {"status", required_argument, NULL, OPT_STATUS},
        {"log", required_argument, NULL, OPT_LOG},
        {"seed", required_argument, NULL, OPT_SEED},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        {NULL, 0, NULL, 0},
    };
    char why[512];
    int ch;

    opterr = 0;
    while ((ch = getopt_long(argc, argv, ":hV", longopts, NULL)) != -1) {
        double *rate = NULL;
        const char *name = argv[optind - 1];
        switch (ch) {
        case OPT_LISTEN:
            if (!jf_listen_parse(&c->addr, optarg))
                return usage_error("--listen: '%s' is not ADDR:PORT with an IPv4 address and a "
                                   "port from 0 to 65535",
                                   optarg);
            c->has_listen = true;
            break;
        case OPT_LATENCY:
            if (!latency_parse(&o->latency, optarg, why, sizeof why))
                return usage_error("--latency: %s (0, 150ms, 50ms-2s or exp:500ms)", why);
            break;
        case OPT_ERROR_RATE:
            rate = &o->error_rate;
            name = "--error-rate";
            break;
        case OPT_TIMEOUT_RATE:
            rate = &o->timeout_rate;
            name = "--timeout-rate";
            break;
        case OPT_RATE_LIMIT_RATE:
            rate = &o->rate_limit_rate;
            name = "--rate-limit-rate";
            break;
        case OPT_INVALID_JSON_RATE:
            rate = &o->invalid_json_rate;
            name = "--invalid-json-rate";
            break;
        case OPT_RETRY_AFTER:
            if (!retry_after_ok(optarg))
                return usage_error("--retry-after: '%s' is not seconds or an HTTP date of at "
                                   "most %d printable characters",
                                   optarg, MAX_RETRY_AFTER);
            snprintf(o->retry_after, sizeof o->retry_after, "%s", optarg);
            break;
        case OPT_STATUS: {
            char *end;
            errno = 0;
            long v = strtol(optarg, &end, 10);
            if (end == optarg || *end != '\0' || errno != 0 || !status_ok(v))
                return usage_error("--status: '%s' is not 0 or an HTTP status from 100 to 599",
                                   optarg);
            o->status = (int)v;
            break;
        }
        case OPT_LOG:
            c->log_path = optarg;
            break;
        case OPT_SEED: {
            char *end;
            errno = 0;
            unsigned long long v = strtoull(optarg, &end, 10);
            if (end == optarg || *end != '\0' || errno != 0 || optarg[0] == '-')
                return usage_error("--seed: '%s' is not an unsigned integer", optarg);
            c->seed = v;
            c->has_seed = true;
            break;
        }
        case 'h':
            usage(stdout);
            return 0;
        case 'V':
            printf("%s %s\n", PROG, JETFLEET_VERSION);
            return 0;
        case ':':
            return usage_error("option %s needs a value", argv[optind - 1]);
        default:
            return usage_error("unknown option %s", argv[optind - 1]);
        }
        if (rate != NULL && !rate_parse(rate, optarg))
            return usage_error("%s: '%s' is not a probability from 0 to 1", name, optarg);
    }
    if (optind < argc)
        return usage_error("unexpected argument '%s'", argv[optind]);
    if (!c->has_listen)
        return usage_error("--listen ADDR:PORT is required");
    if (!rates_ok(o, why, sizeof why))
        return usage_error("%s", why);
    return -1;
}

/* ---------------------------------------------------------------------------
 * Start and stop */

/* Our own listening socket, so a port in use is reported as such, and port
 * 0 can be resolved to the port the kernel chose. */
static int open_listener(const struct sockaddr_in *addr, uint16_t *port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    int one = 1;
    struct sockaddr_in bound;
    socklen_t blen = sizeof bound;
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
        bind(fd, (const struct sockaddr *)addr, sizeof *addr) != 0 ||
        listen(fd, LISTEN_BACKLOG) != 0 || getsockname(fd, (struct sockaddr *)&bound, &blen) != 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    *port = ntohs(bound.sin_port);
    return fd;
}

/* Stops the timer thread, then hands every suspended connection back to MHD
 * marked abandoned: MHD_stop_daemon must not find one still suspended. */
static void release_all(mock *m)
{
    pthread_mutex_lock(&m->timer_lock);
    m->timer_stop = true;
    pthread_mutex_unlock(&m->timer_lock);
    timer_wake(m);
    pthread_join(m->timer, NULL);

    pthread_mutex_lock(&m->timer_lock);
    m->stopping = true;
    request *list = NULL;
    while (m->heap_len > 0) {
        request *r = m->heap[0];
        heap_remove(m, r);
        r->abandoned = true;
        r->due_next = list;
        list = r;
    }
    pthread_mutex_unlock(&m->timer_lock);
    while (list != NULL) {
        request *next = list->due_next;
        release(m, list);
        list = next;
    }
}

int main(int argc, char **argv)
{
    static mock m; /* large (per_second); static keeps it off the stack */
    cli c = {0};
    int rc = 1, lfd = -1;
    bool timer_started = false, locks = false;
    uint16_t port = 0;
    sigset_t sigs;

    m.opt.latency = (latency_spec){LAT_FIXED, 0, 0, "0"};
    snprintf(m.opt.retry_after, sizeof m.opt.retry_after, "1");
    m.epfd = m.wakefd = -1;
    int a = parse_args(argc, argv, &c, &m.opt);
    if (a >= 0)
        return a;
    m.rng = c.has_seed ? c.seed : (uint64_t)mono_ns() ^ ((uint64_t)getpid() << 32);

    /* Signals are taken by sigwait in this thread; every thread created
     * below inherits the mask. */
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);

    if (c.log_path != NULL && (m.log = fopen(c.log_path, "ae")) == NULL) {
        fprintf(stderr, "%s: --log: cannot open '%s': %s\n", PROG, c.log_path, strerror(errno));
        return EXIT_USAGE;
    }
    if (pthread_mutex_init(&m.stats_lock, NULL) != 0 ||
        pthread_mutex_init(&m.timer_lock, NULL) != 0) {
        jf_log(JF_LOG_ERROR, "cannot create the locks", JF_S("error", strerror(errno)));
        goto out;
    }
    locks = true;
    m.epfd = epoll_create1(EPOLL_CLOEXEC);
    m.wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (m.epfd < 0 || m.wakefd < 0) {
        jf_log(JF_LOG_ERROR, "cannot create the timer's epoll set", JF_S("error", strerror(errno)));
        goto out;
    }
    struct epoll_event wev = {.events = EPOLLIN, .data.ptr = NULL};
    if (epoll_ctl(m.epfd, EPOLL_CTL_ADD, m.wakefd, &wev) != 0) {
        jf_log(JF_LOG_ERROR, "cannot watch the timer's eventfd", JF_S("error", strerror(errno)));
        goto out;
    }
    if (pthread_create(&m.timer, NULL, timer_main, &m) != 0) {
        jf_log(JF_LOG_ERROR, "cannot start the timer thread", JF_S("error", strerror(errno)));
        goto out;
    }
    timer_started = true;

    char host[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &c.addr.sin_addr, host, sizeof host);
    if ((lfd = open_listener(&c.addr, &port)) < 0) {
        char where[64];
        snprintf(where, sizeof where, "%s:%u", host, (unsigned)ntohs(c.addr.sin_port));
        jf_log(JF_LOG_ERROR, "cannot listen", JF_S("address", where),
               JF_S("error", strerror(errno)));
        goto out;
    }

    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_ALLOW_SUSPEND_RESUME;
    flags |= MHD_is_feature_supported(MHD_FEATURE_EPOLL) == MHD_YES ? MHD_USE_EPOLL : MHD_USE_AUTO;
    m.daemon =
        MHD_start_daemon(flags, 0, NULL, NULL, on_request, &m, MHD_OPTION_LISTEN_SOCKET,
                         (MHD_socket)lfd, MHD_OPTION_CONNECTION_LIMIT, (unsigned)CONNECTION_LIMIT,
                         /* Half MHD's default per-connection pool: thousands of held calls
                          * stay cheap, and an envelope's headers fit many times over. */
                         MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)CONNECTION_MEMORY,
                         /* A held call waits for its client, never for a server timeout. */
                         MHD_OPTION_CONNECTION_TIMEOUT, 0u, MHD_OPTION_NOTIFY_COMPLETED,
                         on_completed, &m, MHD_OPTION_END);
    if (m.daemon == NULL) {
        jf_log(JF_LOG_ERROR, "cannot start the HTTP server", JF_S("error", "MHD_start_daemon"));
        goto out;
    }
    lfd = -1; /* MHD's now */

    printf("listening on %s:%u\n", host, (unsigned)port);
    fflush(stdout);

    int sig = 0;
    while (sigwait(&sigs, &sig) != 0)
        ;
    rc = 0;

out:
    if (timer_started)
        release_all(&m);
    if (m.daemon != NULL)
        MHD_stop_daemon(m.daemon);
    if (lfd >= 0)
        close(lfd);
    if (m.epfd >= 0)
        close(m.epfd);
    if (m.wakefd >= 0)
        close(m.wakefd);
    free(m.heap);
    key_table_clear(&m.st.by_key);
    if (locks) {
        pthread_mutex_destroy(&m.stats_lock);
        pthread_mutex_destroy(&m.timer_lock);
    }
    if (m.log != NULL && fclose(m.log) != 0 && rc == 0) {
        fprintf(stderr, "%s: --log: cannot write '%s': %s\n", PROG, c.log_path, strerror(errno));
        rc = 1;
    }
    return rc;
}
