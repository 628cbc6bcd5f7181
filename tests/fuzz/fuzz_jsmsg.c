/* fuzz_jsmsg — JetStream ack subjects and pull status replies
 * (common/jsmsg.h).
 *
 * Input: the whole input is an ack subject (exact length, not
 * NUL-terminated). It is also split at its first newline into a Status and
 * a Description header for jf_pull_status_classify.
 *
 * The ack parser is checked against a model of nats.c 3.4.1's
 * natsMsg_GetMetaData (written from its documented behaviour): after
 * "$JS.ACK.", 7 tokens (v1) or 9 and more (v2, the rest ignored), numeric
 * tokens non-negative int64. Ours must accept exactly the subjects the
 * model accepts that also have 9, 11 or 12 tokens, no empty token and no
 * byte a subject cannot carry, and read the same numbers and names. */
#include "fuzz.h"

#include <strings.h>

#include "jsmsg.h"

#define PREFIX "$JS.ACK."
#define NUM_FIELDS 5

typedef struct model {
    size_t total;               /* tokens, "$JS" and "ACK" included */
    const char *stream, *consumer, *domain;
    size_t stream_len, consumer_len, domain_len;
    uint64_t num[NUM_FIELDS];   /* delivered, stream seq, consumer seq, timestamp, pending */
    bool strict_ok;             /* no empty token, no forbidden byte anywhere */
} model;

/* Digits only and at most INT64_MAX, decided on the text: past leading
 * zeros, fewer than 19 digits always fit, 19 fit up to INT64_MAX's own. */
static bool model_number(const char *p, size_t n, uint64_t *out)
{
    static const char int64_max[] = "9223372036854775807";
    if (n == 0)
        return false;
    for (size_t i = 0; i < n; i++)
        if (p[i] < '0' || p[i] > '9')
            return false;
    size_t z = 0;
    while (z < n - 1 && p[z] == '0')
        z++;
    const size_t sig = n - z;
    if (sig > 19 || (sig == 19 && memcmp(p + z, int64_max, 19) > 0))
        return false;
    uint64_t v = 0;
    for (size_t i = z; i < n; i++)
        v = v * 10 + (uint64_t)(p[i] - '0');
    *out = v;
    return true;
}

/* What nats.c accepts; fills m when it does. */
static bool model_parse(const char *s, size_t len, model *m)
{
    memset(m, 0, sizeof *m);
    if (len < 8 || memcmp(s, PREFIX, 8) != 0)
        return false;
    const char *tp[64];
    size_t tn[64], n = 0;
    m->strict_ok = true;
    const char *p = s + 8, *end = s + len;
    for (;;) {
        const char *e = p;
        while (e < end && *e != '.')
            e++;
        if (n < 64) {
            tp[n] = p;
            tn[n] = (size_t)(e - p);
        }
        n++;
        if (e == p)
            m->strict_ok = false;
        for (const char *q = p; q < e; q++) {
            unsigned char c = (unsigned char)*q;
            if (c <= 0x20 || c == 0x7f || c == '*' || c == '>')
                m->strict_ok = false;
        }
        if (e == end)
            break;
        p = e + 1;
    }
    m->total = n + 2;
    if (n != 7 && n < 9)
        return false;
    if (n > 64)
        n = 64;
    const size_t base = n == 7 ? 0 : 2; /* index of the stream token */
    if (base == 2 && !(tn[0] == 1 && tp[0][0] == '_')) {
        m->domain = tp[0];
        m->domain_len = tn[0];
    }
    m->stream = tp[base];
    m->stream_len = tn[base];
    m->consumer = tp[base + 1];
    m->consumer_len = tn[base + 1];
    for (size_t i = 0; i < NUM_FIELDS; i++)
        if (!model_number(tp[base + 2 + i], tn[base + 2 + i], &m->num[i]))
            return false;
    return true;
}

static bool same_span(const char *a, size_t an, const char *b, size_t bn)
{
    return an == bn && (an == 0 ? a == NULL && b == NULL : a == b);
}

static void check_ack(const char *s, size_t len)
{
    jf_ack_meta meta;
    memset(&meta, 0x5A, sizeof meta);
    const jf_ack_meta before = meta;
    jf_error err;
    const jf_status st = jf_ack_meta_parse(&meta, s, len, &err);
    model m;
    const bool nats_ok = model_parse(s, len, &m);
    const bool want_ok =
        nats_ok && m.strict_ok && (m.total == 9 || m.total == 11 || m.total == 12);

    if (st != JF_OK) {
        FUZZ_CHECK(st == JF_ERR_INVALID, "status %d", (int)st);
        FUZZ_CHECK(memcmp(&meta, &before, sizeof meta) == 0, "output written on error");
        bool ascii = true;
        for (const char *p = err.msg; *p != '\0'; p++)
            ascii = ascii && (unsigned char)*p < 0x80;
        FUZZ_CHECK(fuzz_one_line(err.msg) && ascii && strncmp(err.msg, "ack subject", 11) == 0 &&
                       strlen(err.msg) < 300,
                   "error \"%s\"", err.msg);
        FUZZ_CHECK(!want_ok, "refused a subject nats.c reads: %s", err.msg);
        return;
    }
    FUZZ_CHECK(want_ok, "accepted \"%.*s\" (nats.c %s, strict %d, %zu tokens)", (int)len, s,
               nats_ok ? "accepts" : "refuses", m.strict_ok, m.total);
    FUZZ_CHECK(same_span(meta.stream, meta.stream_len, m.stream, m.stream_len) &&
                   same_span(meta.consumer, meta.consumer_len, m.consumer, m.consumer_len) &&
                   same_span(meta.domain, meta.domain_len, m.domain, m.domain_len),
               "names differ from nats.c's");
    const uint64_t got[NUM_FIELDS] = {meta.delivered, meta.stream_seq, meta.consumer_seq,
                                      (uint64_t)meta.timestamp_ns, meta.pending};
    for (int i = 0; i < NUM_FIELDS; i++)
        FUZZ_CHECK(got[i] == m.num[i], "number %d: %llu, nats.c %llu", i,
                   (unsigned long long)got[i], (unsigned long long)m.num[i]);
    FUZZ_CHECK(meta.timestamp_ns >= 0, "timestamp %lld", (long long)meta.timestamp_ns);
}

static bool contains_nocase(const char *hay, const char *needle)
{
    const size_t n = strlen(needle);
    for (; hay != NULL && *hay != '\0'; hay++)
        if (strncasecmp(hay, needle, n) == 0)
            return true;
    return false;
}

static void check_status(const uint8_t *data, size_t size)
{
    const uint8_t *nl = memchr(data, '\n', size);
    size_t sn = nl != NULL ? (size_t)(nl - data) : size;
    char *status = fuzz_cstr(data, sn);
    char *desc = nl != NULL ? fuzz_cstr(nl + 1, size - sn - 1) : NULL;
    if (status == NULL || (nl != NULL && desc == NULL)) {
        free(status);
        free(desc);
        return;
    }
    const jf_pull_status c = jf_pull_status_classify(status, desc);
    jf_pull_status want = JF_PULL_OTHER;
    if (strcmp(status, "100") == 0)
        want = JF_PULL_HEARTBEAT;
    else if (strcmp(status, "404") == 0 || strcmp(status, "408") == 0)
        want = JF_PULL_EXPIRED;
    else if (strcmp(status, "409") == 0)
        want = contains_nocase(desc, "consumer deleted") ? JF_PULL_CONSUMER_DELETED
                                                         : JF_PULL_CONFLICT;
    FUZZ_CHECK(c == want, "\"%s\" / \"%s\": %s, want %s", status, desc ? desc : "(none)",
               jf_pull_status_name(c), jf_pull_status_name(want));
    FUZZ_CHECK(jf_pull_status_classify(status, NULL) != JF_PULL_CONSUMER_DELETED,
               "deleted without a description");
    free(status);
    free(desc);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    check_ack((const char *)data, size);
    check_status(data, size);
    return 0;
}
