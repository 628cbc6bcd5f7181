/* raw_publish.c — baseline of the "publish" row: the NDJSON lines of a file
 * published with nats.c's js_PublishMsgAsync in a loop, at most
 * --max-pending PubAcks outstanding, each line's bytes unchanged and its
 * "id" as Nats-Msg-Id (so the server does the same duplicate tracking as
 * for jetfleet-publisher batch). No JSON parsing: the id is found by a
 * plain scan for "id":"…", and every line goes to one --subject.
 *
 *   jf-bench-raw-publish --url URL --subject SUBJ --file F [--max-pending N]
 *
 * Prints {"published":N,"duplicates":N,"failed":N,"seconds":S} on stdout
 * (seconds from connect to the last PubAck). */
#include <getopt.h>
#include <nats/nats.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define ID_MAX 256

typedef struct counts {
    pthread_mutex_t mu;
    unsigned long long published, duplicates, failed;
} counts;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void on_ack(jsCtx *js, natsMsg *msg, jsPubAck *pa, jsPubAckErr *pae, void *closure)
{
    counts *c = closure;
    pthread_mutex_lock(&c->mu);
    if (pa != NULL && pa->Duplicate)
        c->duplicates++;
    else if (pa != NULL)
        c->published++;
    else
        c->failed++;
    pthread_mutex_unlock(&c->mu);
    natsMsg_Destroy(msg);
}

/* The value of the first "id":"…" of the line, without unescaping (the
 * benchmark's ids are plain). */
static bool find_id(const char *line, size_t len, char *out, size_t cap)
{
    static const char key[] = "\"id\":\"";
    const char *end = line + len;
    for (const char *p = line; p + sizeof key - 1 < end; p++) {
        if (memcmp(p, key, sizeof key - 1) != 0)
            continue;
        const char *v = p + sizeof key - 1;
        const char *q = memchr(v, '"', (size_t)(end - v));
        if (q == NULL || (size_t)(q - v) >= cap)
            return false;
        memcpy(out, v, (size_t)(q - v));
        out[q - v] = '\0';
        return true;
    }
    return false;
}

static char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        return NULL;
    size_t cap = 1 << 20, n = 0;
    char *buf = malloc(cap);
    while (buf != NULL) {
        if (n == cap) {
            char *nb = realloc(buf, cap * 2);
            if (nb == NULL) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = nb;
            cap *= 2;
        }
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (got == 0)
            break;
    }
    fclose(f);
    *len = n;
    return buf;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"url", required_argument, NULL, 'u'},     {"subject", required_argument, NULL, 's'},
        {"file", required_argument, NULL, 'f'},    {"max-pending", required_argument, NULL, 'm'},
        {"help", no_argument, NULL, 'h'},          {NULL, 0, NULL, 0},
    };
    const char *url = "nats://127.0.0.1:4222", *subject = NULL, *path = NULL;
    int64_t max_pending = 1024;
    int c;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 'u': url = optarg; break;
        case 's': subject = optarg; break;
        case 'f': path = optarg; break;
        case 'm': max_pending = strtoll(optarg, NULL, 10); break;
        default:
            fprintf(c == 'h' ? stdout : stderr,
                    "usage: jf-bench-raw-publish --url URL --subject SUBJ --file F "
                    "[--max-pending N]\n");
            return c == 'h' ? 0 : 2;
        }
    }
    if (subject == NULL || path == NULL) {
        fprintf(stderr, "raw-publish: --subject and --file are required\n");
        return 2;
    }
    size_t len = 0;
    char *data = slurp(path, &len);
    if (data == NULL) {
        fprintf(stderr, "raw-publish: cannot read %s\n", path);
        return 1;
    }

    counts cnt = {.mu = PTHREAD_MUTEX_INITIALIZER};
    double t0 = now_s();
    natsOptions *o = NULL;
    natsConnection *nc = NULL;
    jsCtx *js = NULL;
    natsStatus s = natsOptions_Create(&o);
    if (s == NATS_OK)
        s = natsOptions_SetURL(o, url);
    if (s == NATS_OK)
        s = natsConnection_Connect(&nc, o);
    jsOptions jo;
    jsOptions_Init(&jo);
    jo.PublishAsync.MaxPending = max_pending;
    jo.PublishAsync.AckHandler = on_ack;
    jo.PublishAsync.AckHandlerClosure = &cnt;
    if (s == NATS_OK)
        s = natsConnection_JetStream(&js, nc, &jo);
    if (s != NATS_OK) {
        fprintf(stderr, "raw-publish: cannot connect to %s: %s\n", url, natsStatus_GetText(s));
        return 1;
    }

    unsigned long long send_failed = 0;
    const char *p = data, *end = data + len;
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *le = nl ? nl : end;
        size_t n = (size_t)(le - p);
        char id[ID_MAX];
        if (n > 0 && find_id(p, n, id, sizeof id)) {
            natsMsg *m = NULL;
            s = natsMsg_Create(&m, subject, NULL, p, (int)n);
            if (s == NATS_OK)
                s = natsMsgHeader_Set(m, "Nats-Msg-Id", id);
            if (s == NATS_OK)
                s = js_PublishMsgAsync(js, &m, NULL);
            natsMsg_Destroy(m);
            if (s != NATS_OK)
                send_failed++;
        }
        p = le + 1;
    }
    jsPubOptions done;
    jsPubOptions_Init(&done);
    done.MaxWait = 30000;
    s = js_PublishAsyncComplete(js, &done);
    double t1 = now_s();
    pthread_mutex_lock(&cnt.mu);
    printf("{\"published\":%llu,\"duplicates\":%llu,\"failed\":%llu,\"seconds\":%.3f}\n",
           cnt.published, cnt.duplicates, cnt.failed + send_failed, t1 - t0);
    pthread_mutex_unlock(&cnt.mu);
    fflush(stdout);
    jsCtx_Destroy(js);
    natsConnection_Destroy(nc);
    natsOptions_Destroy(o);
    nats_Close();
    free(data);
    return s == NATS_OK && send_failed == 0 ? 0 : 1;
}
