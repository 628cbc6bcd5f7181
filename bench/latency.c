/* latency.c — the probe of the "latency" row: publishes jobs at a fixed
 * rate and measures, per job, the time from its publish to its +ACK.
 *
 * How the ack is seen: a consumer acknowledges a JetStream delivery by
 * publishing "+ACK" on the delivery's reply subject
 * ($JS.ACK.<stream>.<durable>.<delivered>.<stream seq>.…), which is an
 * ordinary NATS message: a core subscription on $JS.ACK.<stream>.<durable>.>
 * receives a copy of every ack as the server receives it. The PubAck of
 * each publish gives the job's stream sequence, which joins the two.
 * Publish and ack times are taken by this one process on one monotonic
 * clock, so the figure is publish → stored → delivered → handled → ack
 * back at the server (plus one hop to this probe), whatever the consumer
 * is: jetfleet-consumer or the raw loop.
 *
 *   jf-bench-latency --url URL --durable D [--stream JOBS] [--service S]
 *                    [--rate PER_S] [--seconds S] [--tag T] [--settle-ms MS]
 *
 * Jobs are valid envelopes of service S (default bench), priority normal,
 * type t, published on jobs.S.normal.t with Nats-Msg-Id = id. Prints one
 * JSON line: sent, acked, missing, p50/p90/p99/p999/max/mean in ms. */
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <nats/nats.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct ack_seen {
    uint64_t seq;
    int64_t t_ns;
} ack_seen;

typedef struct probe {
    size_t n;
    int64_t *pub_ns;  /* by job index; main thread */
    uint64_t *seq_of; /* by job index; PubAck thread */
    pthread_mutex_t mu;
    ack_seen *acks;   /* observer thread appends under mu */
    size_t nacks, cap;
    unsigned long long pubacks, pub_failed, other_acks;
} probe;

static int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void on_puback(jsCtx *js, natsMsg *msg, jsPubAck *pa, jsPubAckErr *pae, void *closure)
{
    probe *p = closure;
    const char *id = NULL;
    pthread_mutex_lock(&p->mu);
    if (pa != NULL && natsMsgHeader_Get(msg, "Nats-Msg-Id", &id) == NATS_OK && id != NULL) {
        const char *dash = strrchr(id, '-');
        size_t i = dash ? strtoull(dash + 1, NULL, 10) : (size_t)-1;
        if (i < p->n)
            p->seq_of[i] = pa->Sequence;
        p->pubacks++;
    } else {
        p->pub_failed++;
    }
    pthread_mutex_unlock(&p->mu);
    natsMsg_Destroy(msg);
}

/* $JS.ACK.<stream>.<durable>.<delivered>.<sseq>.<dseq>.<ts>.<pending> (9
 * tokens), or with domain and account hash in front of the stream (11, or
 * 12 with a trailing random token). */
static uint64_t ack_stream_seq(const char *subj)
{
    const char *tok[12];
    int n = 0;
    tok[n++] = subj;
    for (const char *c = subj; *c && n < 12; c++)
        if (*c == '.')
            tok[n++] = c + 1;
    if (n == 9)
        return strtoull(tok[5], NULL, 10);
    if (n >= 11)
        return strtoull(tok[7], NULL, 10);
    return 0;
}

static void on_ack_seen(natsConnection *nc, natsSubscription *sub, natsMsg *m, void *closure)
{
    probe *p = closure;
    int64_t t = mono_ns();
    const char *data = natsMsg_GetData(m);
    int len = natsMsg_GetDataLength(m);
    uint64_t seq = ack_stream_seq(natsMsg_GetSubject(m));
    pthread_mutex_lock(&p->mu);
    if (len >= 4 && memcmp(data, "+ACK", 4) == 0 && seq > 0 && p->nacks < p->cap)
        p->acks[p->nacks++] = (ack_seen){seq, t};
    else
        p->other_acks++;
    pthread_mutex_unlock(&p->mu);
    natsMsg_Destroy(m);
}

static int cmp_ack(const void *a, const void *b)
{
    const ack_seen *x = a, *y = b;
    return x->seq < y->seq ? -1 : x->seq > y->seq ? 1 : (x->t_ns < y->t_ns ? -1 : x->t_ns > y->t_ns);
}

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

static const ack_seen *find_ack(const ack_seen *v, size_t n, uint64_t seq)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (v[mid].seq < seq)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < n && v[lo].seq == seq ? &v[lo] : NULL;
}

static double pct(const int64_t *v, size_t n, double q)
{
    if (n == 0)
        return -1;
    size_t k = (size_t)ceil(q * (double)n);
    k = k == 0 ? 0 : k - 1;
    return (double)v[k < n ? k : n - 1] / 1e6;
}

static size_t acked_count(probe *p)
{
    pthread_mutex_lock(&p->mu);
    size_t n = p->nacks;
    pthread_mutex_unlock(&p->mu);
    return n;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"url", required_argument, NULL, 'u'},      {"stream", required_argument, NULL, 's'},
        {"durable", required_argument, NULL, 'd'},  {"service", required_argument, NULL, 'v'},
        {"rate", required_argument, NULL, 'r'},     {"seconds", required_argument, NULL, 'n'},
        {"tag", required_argument, NULL, 't'},      {"settle-ms", required_argument, NULL, 'w'},
        {"help", no_argument, NULL, 'h'},           {NULL, 0, NULL, 0},
    };
    const char *url = "nats://127.0.0.1:4222", *stream = "JOBS", *durable = NULL,
               *service = "bench", *tag = "x";
    double rate = 2000, seconds = 10;
    int64_t settle_ms = 5000;
    int c;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 'u': url = optarg; break;
        case 's': stream = optarg; break;
        case 'd': durable = optarg; break;
        case 'v': service = optarg; break;
        case 'r': rate = atof(optarg); break;
        case 'n': seconds = atof(optarg); break;
        case 't': tag = optarg; break;
        case 'w': settle_ms = strtoll(optarg, NULL, 10); break;
        default:
            fprintf(c == 'h' ? stdout : stderr,
                    "usage: jf-bench-latency --url URL --durable D [--stream JOBS] [--service S]\n"
                    "         [--rate PER_S] [--seconds S] [--tag T] [--settle-ms MS]\n");
            return c == 'h' ? 0 : 2;
        }
    }
    if (durable == NULL || rate <= 0 || seconds <= 0) {
        fprintf(stderr, "latency: --durable is required; rate and seconds must be > 0\n");
        return 2;
    }

    static probe p = {.mu = PTHREAD_MUTEX_INITIALIZER};
    p.n = (size_t)(rate * seconds);
    p.cap = p.n * 2 + 16;
    p.pub_ns = calloc(p.n, sizeof *p.pub_ns);
    p.seq_of = calloc(p.n, sizeof *p.seq_of);
    p.acks = calloc(p.cap, sizeof *p.acks);
    if (p.pub_ns == NULL || p.seq_of == NULL || p.acks == NULL) {
        fprintf(stderr, "latency: out of memory\n");
        return 1;
    }

    natsOptions *o = NULL;
    natsConnection *nc = NULL;
    natsSubscription *sub = NULL;
    jsCtx *js = NULL;
    natsStatus s = natsOptions_Create(&o);
    if (s == NATS_OK)
        s = natsOptions_SetURL(o, url);
    if (s == NATS_OK)
        s = natsConnection_Connect(&nc, o);
    char ack_subj[300];
    snprintf(ack_subj, sizeof ack_subj, "$JS.ACK.%s.%s.>", stream, durable);
    if (s == NATS_OK)
        s = natsConnection_Subscribe(&sub, nc, ack_subj, on_ack_seen, &p);
    if (s == NATS_OK)
        s = natsSubscription_SetPendingLimits(sub, -1, -1);
    if (s == NATS_OK)
        s = natsConnection_Flush(nc); /* the subscription is in place before the first job */
    jsOptions jo;
    jsOptions_Init(&jo);
    jo.PublishAsync.MaxPending = 4096;
    jo.PublishAsync.AckHandler = on_puback;
    jo.PublishAsync.AckHandlerClosure = &p;
    if (s == NATS_OK)
        s = natsConnection_JetStream(&js, nc, &jo);
    if (s != NATS_OK) {
        fprintf(stderr, "latency: cannot set up on %s: %s\n", url, natsStatus_GetText(s));
        return 1;
    }

    char subject[256];
    snprintf(subject, sizeof subject, "jobs.%s.normal.t", service);
    int64_t period_ns = (int64_t)(1e9 / rate);
    int64_t t0 = mono_ns();
    unsigned long long send_failed = 0;
    for (size_t i = 0; i < p.n; i++) {
        int64_t due = t0 + (int64_t)i * period_ns;
        struct timespec ts = {(time_t)(due / 1000000000), (long)(due % 1000000000)};
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) != 0)
            ;
        char id[96], body[256];
        snprintf(id, sizeof id, "lat-%s-%07zu", tag, i);
        int len = snprintf(body, sizeof body,
                           "{\"id\":\"%s\",\"service\":\"%s\",\"priority\":\"normal\","
                           "\"type\":\"t\",\"payload\":{\"n\":%zu}}",
                           id, service, i);
        natsMsg *m = NULL;
        s = natsMsg_Create(&m, subject, NULL, body, len);
        if (s == NATS_OK)
            s = natsMsgHeader_Set(m, "Nats-Msg-Id", id);
        p.pub_ns[i] = mono_ns();
        if (s == NATS_OK)
            s = js_PublishMsgAsync(js, &m, NULL);
        natsMsg_Destroy(m);
        if (s != NATS_OK)
            send_failed++;
    }
    double sent_s = (double)(mono_ns() - t0) / 1e9;
    jsPubOptions done;
    jsPubOptions_Init(&done);
    done.MaxWait = 10000;
    js_PublishAsyncComplete(js, &done);

    int64_t deadline = mono_ns() + settle_ms * 1000000;
    while (acked_count(&p) < p.n && mono_ns() < deadline) {
        struct timespec nap = {0, 10 * 1000 * 1000};
        nanosleep(&nap, NULL);
    }
    natsSubscription_Unsubscribe(sub);

    pthread_mutex_lock(&p.mu);
    qsort(p.acks, p.nacks, sizeof *p.acks, cmp_ack);
    int64_t *lat = malloc((p.n + 1) * sizeof *lat);
    size_t nl = 0, missing = 0;
    double sum = 0;
    for (size_t i = 0; i < p.n && lat != NULL; i++) {
        const ack_seen *a = p.seq_of[i] ? find_ack(p.acks, p.nacks, p.seq_of[i]) : NULL;
        if (a == NULL) {
            missing++;
            continue;
        }
        lat[nl] = a->t_ns - p.pub_ns[i];
        sum += (double)lat[nl];
        nl++;
    }
    if (lat != NULL)
        qsort(lat, nl, sizeof *lat, cmp_i64);
    printf("{\"sent\":%zu,\"send_failed\":%llu,\"pubacks\":%llu,\"acked\":%zu,\"missing\":%zu,"
           "\"other_acks\":%llu,\"rate\":%.1f,\"p50_ms\":%.3f,\"p90_ms\":%.3f,\"p99_ms\":%.3f,"
           "\"p999_ms\":%.3f,\"max_ms\":%.3f,\"mean_ms\":%.3f}\n",
           p.n, send_failed, p.pubacks, nl, missing, p.other_acks, (double)p.n / sent_s,
           pct(lat, nl, 0.50), pct(lat, nl, 0.90), pct(lat, nl, 0.99), pct(lat, nl, 0.999),
           nl ? (double)lat[nl - 1] / 1e6 : -1, nl ? sum / (double)nl / 1e6 : -1);
    pthread_mutex_unlock(&p.mu);
    fflush(stdout);
    free(lat);
    natsSubscription_Destroy(sub);
    jsCtx_Destroy(js);
    natsConnection_Destroy(nc);
    natsOptions_Destroy(o);
    nats_Close();
    return missing == 0 ? 0 : 1;
}
