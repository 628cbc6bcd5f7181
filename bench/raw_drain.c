/* raw_drain.c — baseline of the "noop drain" and "latency" rows: the least a
 * program has to do to drain a JetStream durable with nats.c 3.4.1.
 *
 * It keeps `--pulls` pull requests of `--batch` messages open on the durable
 * ($JS.API.CONSUMER.MSG.NEXT with a reply subject, as jetfleet-consumer
 * does) and acknowledges each message by publishing "+ACK" to its reply
 * subject from the delivery callback itself: no queue, no parsing, no event
 * loop. natsSubscription_Fetch is not used (heap overflow in 3.4.1 when
 * more than half a batch is queued) nor natsMsg_Ack (it crashes on messages
 * of a core subscription).
 *
 * One wildcard subscription receives every pull's messages; the last token
 * of the reply subject says which pull slot a message or status belongs to.
 * nats.c calls one subscription's callback from one thread, in order, so
 * the slot table needs no lock.
 *
 *   jf-bench-raw-drain --url URL --stream S --durable D [--filter SUBJ]
 *                      [--max-ack-pending N] [--ack-wait-ms MS]
 *                      [--batch B] [--pulls P] [--count N]
 *
 * With --filter the durable is created when missing (explicit ack, deliver
 * all, the given MaxAckPending and AckWait: what jetfleet provisions).
 * Runs until SIGTERM/SIGINT, or until --count messages are acknowledged;
 * then flushes and prints {"acked":N,"seconds":S} on stdout. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <nats/nats.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define PULL_EXPIRES_NS 5000000000LL
#define MAX_PULLS_OPEN  64

typedef struct drain {
    natsConnection *nc;
    char next_subject[256];
    char inbox[160];
    char request[128];
    int batch;
    int npulls;
    int remaining[MAX_PULLS_OPEN]; /* delivery thread only */
    unsigned long long count;      /* stop after this many; 0 = never */
    atomic_ullong acked;
    atomic_ullong statuses;
    atomic_bool done;
} drain;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void pull(drain *d, int slot)
{
    char reply[192];
    snprintf(reply, sizeof reply, "%s.%d", d->inbox, slot);
    d->remaining[slot] = d->batch;
    natsStatus s = natsConnection_PublishRequestString(d->nc, d->next_subject, reply, d->request);
    if (s != NATS_OK)
        fprintf(stderr, "raw-drain: pull request failed: %s\n", natsStatus_GetText(s));
}

static void on_msg(natsConnection *nc, natsSubscription *sub, natsMsg *m, void *closure)
{
    drain *d = closure;
    const char *subj = natsMsg_GetSubject(m);
    const char *dot = strrchr(subj, '.');
    int slot = dot ? atoi(dot + 1) : -1;
    const char *reply = natsMsg_GetReply(m);

    if (slot < 0 || slot >= d->npulls) {
        natsMsg_Destroy(m);
        return;
    }
    if (reply == NULL) {
        /* A status: 100 is a heartbeat; 408/404/409 end the pull. */
        const char *status = NULL;
        if (natsMsgHeader_Get(m, "Status", &status) == NATS_OK && status != NULL &&
            strcmp(status, "100") != 0) {
            atomic_fetch_add(&d->statuses, 1);
            if (!atomic_load(&d->done))
                pull(d, slot);
        }
        natsMsg_Destroy(m);
        return;
    }
    natsConnection_Publish(nc, reply, "+ACK", 4);
    natsMsg_Destroy(m);
    unsigned long long n = atomic_fetch_add(&d->acked, 1) + 1;
    if (d->count > 0 && n >= d->count)
        atomic_store(&d->done, true);
    if (--d->remaining[slot] == 0 && !atomic_load(&d->done))
        pull(d, slot);
}

static void usage(FILE *out)
{
    fprintf(out, "usage: jf-bench-raw-drain --url URL --stream S --durable D [--filter SUBJ]\n"
                 "         [--max-ack-pending N] [--ack-wait-ms MS] [--batch B] [--pulls P]\n"
                 "         [--count N]\n");
}

static natsStatus ensure_durable(natsConnection *nc, const char *stream, const char *durable,
                                 const char *filter, int64_t max_ack_pending, int64_t ack_wait_ms)
{
    jsCtx *js = NULL;
    jsConsumerInfo *ci = NULL;
    jsErrCode jerr = 0;
    jsConsumerConfig cc;
    natsStatus s = natsConnection_JetStream(&js, nc, NULL);
    if (s != NATS_OK)
        return s;
    jsConsumerConfig_Init(&cc);
    cc.Durable = durable;
    cc.DeliverPolicy = js_DeliverAll;
    cc.AckPolicy = js_AckExplicit;
    cc.ReplayPolicy = js_ReplayInstant;
    cc.FilterSubject = filter;
    cc.AckWait = ack_wait_ms * 1000000;
    cc.MaxAckPending = max_ack_pending;
    cc.MaxDeliver = -1;
    cc.MaxWaiting = 512;
    s = js_AddConsumer(&ci, js, stream, &cc, NULL, &jerr);
    if (s != NATS_OK)
        fprintf(stderr, "raw-drain: cannot create durable %s: %s (err_code %d)\n", durable,
                natsStatus_GetText(s), (int)jerr);
    jsConsumerInfo_Destroy(ci);
    jsCtx_Destroy(js);
    return s;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"url", required_argument, NULL, 'u'},     {"stream", required_argument, NULL, 's'},
        {"durable", required_argument, NULL, 'd'}, {"filter", required_argument, NULL, 'f'},
        {"batch", required_argument, NULL, 'b'},   {"pulls", required_argument, NULL, 'p'},
        {"count", required_argument, NULL, 'c'},   {"max-ack-pending", required_argument, NULL, 'm'},
        {"ack-wait-ms", required_argument, NULL, 'w'}, {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *url = "nats://127.0.0.1:4222", *stream = "JOBS", *durable = NULL, *filter = NULL;
    int64_t max_ack_pending = 1000, ack_wait_ms = 30000;
    static drain d;
    d.batch = 256;
    d.npulls = 4;
    int c;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 'u': url = optarg; break;
        case 's': stream = optarg; break;
        case 'd': durable = optarg; break;
        case 'f': filter = optarg; break;
        case 'b': d.batch = atoi(optarg); break;
        case 'p': d.npulls = atoi(optarg); break;
        case 'c': d.count = strtoull(optarg, NULL, 10); break;
        case 'm': max_ack_pending = strtoll(optarg, NULL, 10); break;
        case 'w': ack_wait_ms = strtoll(optarg, NULL, 10); break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (durable == NULL || d.batch < 1 || d.npulls < 1 || d.npulls > MAX_PULLS_OPEN) {
        usage(stderr);
        return 2;
    }

    /* Signals go to sigtimedwait below, never to nats.c's threads (which
     * inherit this mask). */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);

    double t0 = now_s();
    natsOptions *o = NULL;
    natsSubscription *sub = NULL;
    natsInbox *inbox = NULL;
    natsStatus s = natsOptions_Create(&o);
    if (s == NATS_OK)
        s = natsOptions_SetURL(o, url);
    if (s == NATS_OK)
        s = natsConnection_Connect(&d.nc, o);
    if (s != NATS_OK) {
        fprintf(stderr, "raw-drain: cannot connect to %s: %s\n", url, natsStatus_GetText(s));
        return 1;
    }
    if (filter != NULL &&
        ensure_durable(d.nc, stream, durable, filter, max_ack_pending, ack_wait_ms) != NATS_OK)
        return 1;

    snprintf(d.next_subject, sizeof d.next_subject, "$JS.API.CONSUMER.MSG.NEXT.%s.%s", stream,
             durable);
    snprintf(d.request, sizeof d.request, "{\"batch\":%d,\"expires\":%lld}", d.batch,
             (long long)PULL_EXPIRES_NS);
    natsInbox_Create(&inbox);
    snprintf(d.inbox, sizeof d.inbox, "%s", (const char *)inbox);
    natsInbox_Destroy(inbox);
    char wildcard[192];
    snprintf(wildcard, sizeof wildcard, "%s.*", d.inbox);
    s = natsConnection_Subscribe(&sub, d.nc, wildcard, on_msg, &d);
    if (s == NATS_OK)
        s = natsSubscription_SetPendingLimits(sub, -1, -1);
    if (s != NATS_OK) {
        fprintf(stderr, "raw-drain: cannot subscribe: %s\n", natsStatus_GetText(s));
        return 1;
    }
    for (int i = 0; i < d.npulls; i++)
        pull(&d, i);
    natsConnection_Flush(d.nc);

    struct timespec tick = {0, 5 * 1000 * 1000};
    while (!atomic_load(&d.done)) {
        int sig = sigtimedwait(&sigs, NULL, &tick);
        if (sig == SIGTERM || sig == SIGINT)
            atomic_store(&d.done, true);
        else if (sig < 0 && errno != EAGAIN && errno != EINTR)
            break;
    }
    double t1 = now_s();
    natsConnection_FlushTimeout(d.nc, 5000);
    natsSubscription_Unsubscribe(sub);
    printf("{\"acked\":%llu,\"statuses\":%llu,\"seconds\":%.3f}\n",
           (unsigned long long)atomic_load(&d.acked), (unsigned long long)atomic_load(&d.statuses),
           t1 - t0);
    fflush(stdout);
    natsSubscription_Destroy(sub);
    natsConnection_Destroy(d.nc);
    natsOptions_Destroy(o);
    nats_Close();
    return 0;
}
