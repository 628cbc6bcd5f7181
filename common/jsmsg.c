/* jsmsg.c — JetStream ack subjects and pull status replies.
 *
 * The ack subject is the server's only record, on the message itself, of
 * which stream sequence a delivery is and how often it was delivered; the
 * consumer dead-letters by those numbers. So a subject that is not exactly
 * what nats-server writes is refused rather than half-read. */
#include "jsmsg.h"

#include <stdbool.h>
#include <string.h>
#include <strings.h>

#define ACK_PREFIX     "$JS.ACK."
#define ACK_PREFIX_LEN 8
#define QUOTE_MAX      64 /* bytes of the subject quoted in a message */

/* Token roles, in v2 order; v1 starts at R_STREAM. */
enum {
    R_DOMAIN,
    R_HASH,
    R_STREAM,
    R_CONSUMER,
    R_DELIVERED,
    R_SSEQ,
    R_CSEQ,
    R_TS,
    R_PENDING,
    R_RANDOM,
    R_COUNT
};

static const char *const role_names[R_COUNT] = {
    "domain",          "account hash",      "stream",    "consumer", "delivered",
    "stream sequence", "consumer sequence", "timestamp", "pending",  "random token"};

typedef struct span {
    const char *p;
    size_t n;
} span;

/* Quotes at most QUOTE_MAX bytes of s, control and non-ASCII bytes as '?',
 * so an error about a hostile subject stays one short line of valid UTF-8
 * (subjects are bytes; ours are ASCII). */
static const char *quote(char buf[QUOTE_MAX + 4], const char *s, size_t n)
{
    size_t take = n > QUOTE_MAX ? QUOTE_MAX : n;
    for (size_t i = 0; i < take; i++) {
        const unsigned char c = (unsigned char)s[i];
        buf[i] = (c < 0x20 || c >= 0x7f) ? '?' : (char)c;
    }
    if (take < n)
        memcpy(buf + take, "...", 4);
    else
        buf[take] = '\0';
    return buf;
}

/* No subject can carry these: NATS splits protocol lines on whitespace, and
 * a reply subject with a wildcard cannot be published to. */
static bool name_byte_ok(unsigned char c)
{
    return c > 0x20 && c != 0x7f && c != '*' && c != '>';
}

/* Digits only, no sign, at most INT64_MAX: what nats.c's int64 reading
 * accepts, without its wrap-around. */
static bool parse_number(span t, uint64_t *out)
{
    uint64_t v = 0;
    for (size_t i = 0; i < t.n; i++) {
        const char c = t.p[i];
        if (c < '0' || c > '9')
            return false;
        const uint64_t d = (uint64_t)(c - '0');
        /* v * 10 + d <= INT64_MAX, without a division per digit (this
         * runs for every job's ack subject). */
        if (v > (uint64_t)INT64_MAX / 10 || (v == (uint64_t)INT64_MAX / 10 && d > 7))
            return false;
        v = v * 10 + d;
    }
    *out = v;
    return true;
}

jf_status jf_ack_meta_parse(jf_ack_meta *out, const char *subject, size_t len, jf_error *err)
{
    char q[QUOTE_MAX + 4], tq[QUOTE_MAX + 4];
    if (subject == NULL) {
        jf_error_set(err, "ack subject: missing (not a JetStream delivery)");
        return JF_ERR_INVALID;
    }
    if (len < ACK_PREFIX_LEN || memcmp(subject, ACK_PREFIX, ACK_PREFIX_LEN) != 0) {
        jf_error_set(err, "ack subject \"%s\": does not start with " ACK_PREFIX,
                     quote(q, subject, len));
        return JF_ERR_INVALID;
    }

    /* Split after the prefix, keeping at most R_COUNT spans but counting
     * every token, so "too many" is told apart from a wrong token. */
    span tok[R_COUNT];
    size_t n = 0;
    const char *p = subject + ACK_PREFIX_LEN, *end = subject + len;
    for (;;) {
        const char *dot = memchr(p, '.', (size_t)(end - p));
        const char *e = dot != NULL ? dot : end;
        if (n < R_COUNT)
            tok[n] = (span){p, (size_t)(e - p)};
        n++;
        if (dot == NULL)
            break;
        p = dot + 1;
    }
    const size_t total = n + 2;
    if (total != 9 && total != 11 && total != 12) {
        jf_error_set(err,
                     "ack subject \"%s\": %zu tokens, expected 9 (v1) or 11-12 (v2 with domain "
                     "and account)",
                     quote(q, subject, len), total);
        return JF_ERR_INVALID;
    }
    const int first_role = total == 9 ? R_STREAM : R_DOMAIN;

    jf_ack_meta m;
    memset(&m, 0, sizeof m);
    for (size_t i = 0; i < n; i++) {
        const int role = first_role + (int)i;
        const span t = tok[i];
        const size_t pos = i + 3; /* 1-based, counting "$JS" and "ACK" */
        if (t.n == 0) {
            jf_error_set(err, "ack subject \"%s\": token %zu (%s) is empty",
                         quote(q, subject, len), pos, role_names[role]);
            return JF_ERR_INVALID;
        }
        if (role >= R_DELIVERED && role <= R_PENDING) {
            uint64_t v;
            if (!parse_number(t, &v)) {
                bool digits = true;
                for (size_t k = 0; k < t.n && digits; k++)
                    digits = t.p[k] >= '0' && t.p[k] <= '9';
                jf_error_set(err, "ack subject \"%s\": token %zu (%s) \"%s\" is %s",
                             quote(q, subject, len), pos, role_names[role], quote(tq, t.p, t.n),
                             digits ? "out of range" : "not a number");
                return JF_ERR_INVALID;
            }
            switch (role) {
            case R_DELIVERED:
                m.delivered = v;
                break;
            case R_SSEQ:
                m.stream_seq = v;
                break;
            case R_CSEQ:
                m.consumer_seq = v;
                break;
            case R_TS:
                m.timestamp_ns = (int64_t)v; /* at most INT64_MAX: checked above */
                break;
            default:
                m.pending = v;
                break;
            }
            continue;
        }
        for (size_t k = 0; k < t.n; k++) {
            if (!name_byte_ok((unsigned char)t.p[k])) {
                jf_error_set(err, "ack subject \"%s\": token %zu (%s) has byte 0x%02x at offset %zu",
                             quote(q, subject, len), pos, role_names[role],
                             (unsigned)(unsigned char)t.p[k], k);
                return JF_ERR_INVALID;
            }
        }
        switch (role) {
        case R_DOMAIN:
            /* Servers since 2.2 send "_" for "no domain" to keep the count fixed. */
            if (!(t.n == 1 && t.p[0] == '_')) {
                m.domain = t.p;
                m.domain_len = t.n;
            }
            break;
        case R_STREAM:
            m.stream = t.p;
            m.stream_len = t.n;
            break;
        case R_CONSUMER:
            m.consumer = t.p;
            m.consumer_len = t.n;
            break;
        default: /* account hash, random token: checked, not kept */
            break;
        }
    }
    *out = m;
    return JF_OK;
}

jf_pull_status jf_pull_status_classify(const char *status, const char *description)
{
    if (status == NULL)
        return JF_PULL_OTHER;
    if (strcmp(status, "100") == 0)
        return JF_PULL_HEARTBEAT;
    if (strcmp(status, "408") == 0 || strcmp(status, "404") == 0)
        return JF_PULL_EXPIRED;
    if (strcmp(status, "409") == 0) {
        /* The server words it "Consumer Deleted"; match its case loosely
         * so a re-worded release still triggers re-provisioning. */
        static const char deleted[] = "consumer deleted";
        const size_t dn = sizeof deleted - 1;
        for (const char *d = description; d != NULL && *d != '\0'; d++)
            if (strncasecmp(d, deleted, dn) == 0)
                return JF_PULL_CONSUMER_DELETED;
        return JF_PULL_CONFLICT;
    }
    return JF_PULL_OTHER;
}

const char *jf_pull_status_name(jf_pull_status s)
{
    switch (s) {
    case JF_PULL_HEARTBEAT:
        return "heartbeat";
    case JF_PULL_EXPIRED:
        return "expired";
    case JF_PULL_CONFLICT:
        return "conflict";
    case JF_PULL_CONSUMER_DELETED:
        return "consumer_deleted";
    case JF_PULL_OTHER:
        break;
    }
    return "other";
}
