#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <ini.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* How the loader works, and why:
 *
 * Debian's libinih 55 is built without INI_HANDLER_LINENO, truncates section
 * names at 49 bytes and never reports a section without keys. So inih reads
 * through our own line reader (read_line), which counts lines, bounds their
 * length, and handles "[section]" headers itself; inih then only splits
 * "key = value" lines and calls on_key, which uses the section and line the
 * reader recorded. The first error stops the parse: the reader returns NULL
 * once one is recorded. */

#define DEFAULT_FILE  "jetfleet.ini"
#define ENV_PREFIX    "JETFLEET_"
#define ENV_VALUE_MAX 4096 /* a value from the environment is refused beyond this */
#define QUOTE_MAX     64   /* bytes of a bad value quoted in a message */
#define MS_MAX        (INT64_C(36500) * 86400000) /* 100 years: ms -> ns stays in int64 */

#define SEC_MS  INT64_C(1000)
#define MIN_MS  (60 * SEC_MS)
#define HOUR_MS (60 * MIN_MS)
#define DAY_MS  (24 * HOUR_MS)

typedef enum key_type {
    T_STR,       /* optional string; empty means unset (NULL) */
    T_STR_REQ,   /* string that must not be empty */
    T_NAME,      /* stream name: [A-Za-z0-9_-]+ */
    T_URL,       /* http:// or https:// URL, or empty */
    T_INT,       /* int in [min, max] */
    T_BYTES,     /* int64: -1 (unlimited) or [min, max] */
    T_DURATION,  /* int64 ms in [min, max] */
    T_DURATIONS, /* int64 ms list in [min, max] each, count at off2 */
    T_RATE,
    T_LEVEL,
    T_KIND,
    T_WEIGHTS, /* three ints in [min, max] */
    T_BOOL,    /* true/false, yes/no, on/off, 1/0 */
} key_type;

typedef struct key_def {
    const char *name;
    key_type type;
    size_t off;  /* in jf_config (fixed sections) or jf_service_config */
    size_t off2; /* T_DURATIONS: the count */
    int64_t min, max;
    int secret; /* never quote the value (it may hold a password) */
} key_def;

#define CFG(f) offsetof(jf_config, f)
#define SVC(f) offsetof(jf_service_config, f)

static const key_def nats_keys[] = {
    {"url", T_STR_REQ, CFG(nats.url), 0, 0, 0, 1},
    {"name", T_STR, CFG(nats.name), 0, 0, 0, 0},
    {"user", T_STR, CFG(nats.user), 0, 0, 0, 0},
    {"password", T_STR, CFG(nats.password), 0, 0, 0, 1},
    {"token", T_STR, CFG(nats.token), 0, 0, 0, 1},
    {"creds", T_STR, CFG(nats.creds), 0, 0, 0, 0},
    {"nkey_seed", T_STR, CFG(nats.nkey_seed), 0, 0, 0, 0},
    {"tls_ca", T_STR, CFG(nats.tls_ca), 0, 0, 0, 0},
    {"tls_cert", T_STR, CFG(nats.tls_cert), 0, 0, 0, 0},
    {"tls_key", T_STR, CFG(nats.tls_key), 0, 0, 0, 0},
    {"connect_timeout", T_DURATION, CFG(nats.connect_timeout_ms), 0, 1, HOUR_MS, 0},
    {"reconnect_wait", T_DURATION, CFG(nats.reconnect_wait_ms), 0, 0, HOUR_MS, 0},
    {"request_timeout", T_DURATION, CFG(nats.request_timeout_ms), 0, 1, HOUR_MS, 0},
};

static const key_def stream_keys[] = {
    {"name", T_NAME, CFG(stream.name), 0, 0, 0, 0},
    {"dlq", T_NAME, CFG(stream.dlq), 0, 0, 0, 0},
    {"max_age", T_DURATION, CFG(stream.max_age_ms), 0, 0, MS_MAX, 0},
    {"dlq_max_age", T_DURATION, CFG(stream.dlq_max_age_ms), 0, 0, MS_MAX, 0},
    {"duplicate_window", T_DURATION, CFG(stream.duplicate_window_ms), 0, 1, MS_MAX, 0},
    {"replicas", T_INT, CFG(stream.replicas), 0, 1, 5, 0},
    {"max_bytes", T_BYTES, CFG(stream.max_bytes), 0, 1, INT64_MAX, 0},
};

#define BREAKER_KEYS(F)                                                                            \
    {"breaker_window", T_INT, F(window), 0, 1, 1000, 0},                                           \
        {"breaker_min_calls", T_INT, F(min_calls), 0, 1, 1000, 0},                                 \
        {"breaker_failure_rate", T_INT, F(failure_rate), 0, 1, 100, 0},                            \
        {"breaker_slow_call", T_DURATION, F(slow_call_ms), 0, 0, DAY_MS, 0},                       \
        {"breaker_slow_rate", T_INT, F(slow_rate), 0, 1, 100, 0},                                  \
        {"breaker_open", T_DURATION, F(open_ms), 0, 10, DAY_MS, 0},                                \
        {"breaker_open_max", T_DURATION, F(open_max_ms), 0, 10, DAY_MS, 0},                        \
        {"breaker_probes", T_INT, F(probes), 0, 1, 1000, 0}

#define LEDGER_BREAKER(f) CFG(ledger_breaker.f)
#define SVC_BREAKER(f)    SVC(breaker.f)

static const key_def postgres_keys[] = {
    {"dsn", T_STR, CFG(postgres_dsn), 0, 0, 0, 1},
    {"connections", T_INT, CFG(postgres_connections), 0, 1, 64, 0},
    {"statement_timeout", T_DURATION, CFG(postgres_statement_timeout_ms), 0, 0, DAY_MS, 0},
    BREAKER_KEYS(LEDGER_BREAKER),
};

static const key_def consumer_keys[] = {
    {"max_in_flight", T_INT, CFG(consumer.max_in_flight), 0, 1, 100000, 0},
    {"pull_batch", T_INT, CFG(consumer.pull_batch), 0, 1, 10000, 0},
    {"pulls", T_INT, CFG(consumer.pulls), 0, 1, 64, 0},
    {"pull_expires", T_DURATION, CFG(consumer.pull_expires_ms), 0, 100, HOUR_MS, 0},
    {"priority_weights", T_WEIGHTS, CFG(consumer.priority_weights), 0, 1, 1000, 0},
    {"shutdown_grace", T_DURATION, CFG(consumer.shutdown_grace_ms), 0, 0, HOUR_MS, 0},
    {"stats_interval", T_DURATION, CFG(consumer.stats_interval_ms), 0, 0, DAY_MS, 0},
    {"metrics_listen", T_STR, CFG(consumer.metrics_listen), 0, 0, 0, 0},
};

static const key_def publisher_keys[] = {
    {"max_pending", T_INT, CFG(publisher.max_pending), 0, 1, 1000000, 0},
    {"timeout", T_DURATION, CFG(publisher.timeout_ms), 0, 1, HOUR_MS, 0},
};

static const key_def intake_keys[] = {
    {"listen", T_STR_REQ, CFG(intake.listen), 0, 0, 0, 0},
    {"token", T_STR, CFG(intake.token), 0, 0, 0, 1},
    {"token_file", T_STR, CFG(intake.token_file), 0, 0, 0, 0},
    {"max_body", T_INT, CFG(intake.max_body), 0, 1, 1 << 30, 0},
    {"max_jobs", T_INT, CFG(intake.max_jobs), 0, 1, 1000000, 0},
};

static const key_def log_keys[] = {
    {"level", T_LEVEL, CFG(log_level), 0, 0, 0, 0},
};

static const key_def service_keys[] = {
    {"kind", T_KIND, SVC(kind), 0, 0, 0, 0},
    {"url", T_URL, SVC(url), 0, 0, 0, 1},
    {"timeout", T_DURATION, SVC(timeout_ms), 0, 1, DAY_MS, 0},
    {"max_deliver", T_INT, SVC(max_deliver), 0, 1, 1000, 0},
    {"backoff", T_DURATIONS, SVC(backoff_ms), SVC(backoff_n), 0, DAY_MS, 0},
    {"fleet_in_flight", T_INT, SVC(fleet_in_flight), 0, 1, 1000000, 0},
    {"ack_wait", T_DURATION, SVC(ack_wait_ms), 0, 100, DAY_MS, 0},
    {"rate", T_RATE, SVC(rate), 0, 0, 0, 0},
    {"burst", T_INT, SVC(burst), 0, 1, 1000000, 0},
    {"delay", T_DURATION, SVC(delay_ms), 0, 0, HOUR_MS, 0},
    {"fail_attempts", T_INT, SVC(fail_attempts), 0, 0, 1000, 0},
    {"tls_ca", T_STR, SVC(tls_ca), 0, 0, 0, 0},
    {"tls_verify", T_BOOL, SVC(tls_verify), 0, 0, 0, 0},
    {"auth_header", T_STR, SVC(auth_header), 0, 0, 0, 1},
    {"auth_header_file", T_STR, SVC(auth_header_file), 0, 0, 0, 0},
    {"auth_header_env", T_STR, SVC(auth_header_env), 0, 0, 0, 0},
    {"max_response", T_BYTES, SVC(max_response), 0, 1, INT64_C(1) << 40, 0},
    {"retry_after_max", T_DURATION, SVC(retry_after_max_ms), 0, 0, DAY_MS, 0},
    {"result_required", T_STR, SVC(result_required), 0, 0, 0, 0},
    {"max_connections", T_INT, SVC(max_connections), 0, 0, 100000, 0},
    {"sql", T_STR, SVC(sql), 0, 0, 0, 0},
    {"dsn", T_STR, SVC(dsn), 0, 0, 0, 1},
    BREAKER_KEYS(SVC_BREAKER),
};

#define NKEYS(a) (sizeof(a) / sizeof((a)[0]))
#define KEYS_MAX 40 /* most keys of any section */
_Static_assert(NKEYS(nats_keys) <= KEYS_MAX, "raise KEYS_MAX");
_Static_assert(NKEYS(stream_keys) <= KEYS_MAX, "raise KEYS_MAX");
_Static_assert(NKEYS(consumer_keys) <= KEYS_MAX, "raise KEYS_MAX");
_Static_assert(NKEYS(service_keys) <= KEYS_MAX, "raise KEYS_MAX");

typedef struct section_def {
    const char *name;
    const key_def *keys;
    size_t nkeys;
} section_def;

enum { S_NATS, S_STREAM, S_POSTGRES, S_CONSUMER, S_PUBLISHER, S_LOG, S_INTAKE, NFIXED };

static const section_def fixed_sections[NFIXED] = {
    {"nats", nats_keys, NKEYS(nats_keys)},
    {"stream", stream_keys, NKEYS(stream_keys)},
    {"postgres", postgres_keys, NKEYS(postgres_keys)},
    {"consumer", consumer_keys, NKEYS(consumer_keys)},
    {"publisher", publisher_keys, NKEYS(publisher_keys)},
    {"log", log_keys, NKEYS(log_keys)},
    {"intake", intake_keys, NKEYS(intake_keys)},
};

#define SERVICE_PREFIX "service."
#define S_NONE         (-1)
#define S_SERVICE      NFIXED

/* Where a key's value came from, for messages about the whole config:
 * 0 = default, > 0 = line in the file, FROM_ENV = environment. */
#define FROM_ENV (-1)

typedef struct parse_ctx {
    jf_config *cfg;
    const char *name; /* file name in messages */
    FILE *fp;         /* source: a file … */
    const char *text; /* … or a string */
    size_t left;
    int line;
    int sect;        /* S_NONE, a fixed section, or S_SERVICE */
    size_t svc;      /* index of the current service when sect == S_SERVICE */
    char label[128]; /* the current section as written, e.g. "service.llm" */
    int key_seen;    /* a key since the header: inih would take an indented line as its value */
    int sect_line[NFIXED];
    int fixed_src[NFIXED][KEYS_MAX];
    int svc_src[JF_MAX_SERVICES][KEYS_MAX];
    int failed;
    jf_status st;
    jf_error *err;
} parse_ctx;

/* --- small helpers ------------------------------------------------------ */

/* Bytes of the well-formed UTF-8 character at s (no overlong form, no
 * surrogate, nothing past U+10FFFF), or 0. */
static size_t utf8_len(const unsigned char *s, size_t left)
{
    size_t n = 0;
    if (s[0] >= 0xC2 && s[0] <= 0xDF)
        n = 2;
    else if (s[0] >= 0xE0 && s[0] <= 0xEF)
        n = 3;
    else if (s[0] >= 0xF0 && s[0] <= 0xF4)
        n = 4;
    if (n == 0 || n > left)
        return 0;
    for (size_t i = 1; i < n; i++)
        if ((s[i] & 0xC0) != 0x80)
            return 0;
    if ((s[0] == 0xE0 && s[1] < 0xA0) || (s[0] == 0xED && s[1] > 0x9F) ||
        (s[0] == 0xF0 && s[1] < 0x90) || (s[0] == 0xF4 && s[1] > 0x8F))
        return 0;
    return n;
}

/* Messages end up in JSON log lines: bytes that are not UTF-8 are escaped
 * like control characters, and a character is never cut in two. */
static void quote(char *buf, size_t cap, const char *s)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t o = 0, i = 0, len = strlen(s);
    while (i < len && o + 5 < cap) {
        const unsigned char ch = u[i];
        const size_t n = ch < 0x80 ? 1 : utf8_len(u + i, len - i);
        if (i + (n > 0 ? n : 1) > QUOTE_MAX)
            break;
        if (n > 1) {
            memcpy(buf + o, s + i, n);
            o += n;
            i += n;
            continue;
        }
        if (n == 0 || ch < 0x20 || ch == 0x7f || ch == '"' || ch == '\\')
            o += (size_t)snprintf(buf + o, cap - o, "\\x%02x", ch);
        else
            buf[o++] = (char)ch;
        i++;
    }
    if (i < len && o + 4 < cap) {
        memcpy(buf + o, "...", 3);
        o += 3;
    }
    buf[o] = '\0';
}

static int is_token_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
           c == '-';
}

static int is_token(const char *s, size_t len, size_t max)
{
    if (len == 0 || len > max)
        return 0;
    for (size_t i = 0; i < len; i++)
        if (!is_token_char(s[i]))
            return 0;
    return 1;
}

/* noinline: once inlined into callers with constant names, GCC 12 at -O3
 * mistakes the key table for fixed-size arrays and warns (-Wstring-compare). */
__attribute__((noinline)) static const key_def *find_key(const key_def *keys, size_t n,
                                                         const char *name, size_t *idx)
{
    for (size_t i = 0; i < n; i++) {
        if (strcmp(keys[i].name, name) == 0) {
            *idx = i;
            return &keys[i];
        }
    }
    return NULL;
}

/* Whole names only: a list cut inside a name would show a key that does
 * not exist. */
static void key_list(char *buf, size_t cap, const key_def *keys, size_t n)
{
    size_t o = 0;
    buf[0] = '\0';
    for (size_t i = 0; i < n; i++) {
        const size_t need = (i ? 2 : 0) + strlen(keys[i].name);
        const size_t tail = i + 1 < n ? sizeof ", ..." - 1 : 0;
        if (o + need + tail >= cap) {
            snprintf(buf + o, cap - o, "%s...", i ? ", " : "");
            return;
        }
        o += (size_t)snprintf(buf + o, cap - o, "%s%s", i ? ", " : "", keys[i].name);
    }
}

static char *dup_str(const char *s)
{
    size_t n = strlen(s) + 1;
    char *p = malloc(n);
    if (p != NULL)
        memcpy(p, s, n);
    return p;
}

/* Strict decimal integer: optional '-', digits, nothing else. */
static int parse_int64(const char *s, int64_t *out)
{
    int neg = 0;
    int64_t v = 0;
    if (*s == '-') {
        neg = 1;
        s++;
    }
    if (*s == '\0')
        return 0;
    for (; *s; s++) {
        if (*s < '0' || *s > '9')
            return 0;
        int d = *s - '0';
        if (v > (INT64_MAX - d) / 10)
            return 0;
        v = v * 10 + d;
    }
    *out = neg ? -v : v;
    return 1;
}

/* --- applying one value --------------------------------------------------
 *
 * set_value writes into base (a jf_config or a jf_service_config) and, on
 * failure, writes what is wrong with the value (no location) into why. */

static jf_status set_string(char **slot, const char *value, int allow_empty, char *why, size_t cap)
{
    for (const char *p = value; *p; p++) {
        unsigned char ch = (unsigned char)*p;
        if (ch < 0x20 || ch == 0x7f) {
            snprintf(why, cap, "must not contain control characters");
            return JF_ERR_INVALID;
        }
    }
    if (*value == '\0' && !allow_empty) {
        snprintf(why, cap, "must not be empty");
        return JF_ERR_INVALID;
    }
    char *copy = NULL;
    if (*value != '\0') {
        copy = dup_str(value);
        if (copy == NULL) {
            snprintf(why, cap, "out of memory");
            return JF_ERR_NOMEM;
        }
    }
    free(*slot);
    *slot = copy;
    return JF_OK;
}

static jf_status set_value(void *base, const key_def *k, const char *value, char *why, size_t cap)
{
    char *field = (char *)base + k->off;
    char q[QUOTE_MAX * 4 + 8];
    char got[QUOTE_MAX * 4 + 16] = "";
    char lo[32], hi[32];
    jf_error e;
    int64_t v;

    /* A secret's value never reaches a message, not even a mistyped one. */
    if (!k->secret) {
        quote(q, sizeof q, value);
        snprintf(got, sizeof got, ", got \"%s\"", q);
    }
    switch (k->type) {
    case T_STR:
        return set_string((char **)(void *)field, value, 1, why, cap);
    case T_STR_REQ:
        return set_string((char **)(void *)field, value, 0, why, cap);
    case T_NAME:
        if (!is_token(value, strlen(value), JF_NAME_MAX)) {
            snprintf(why, cap, "expected 1-%d characters of A-Z a-z 0-9 _ -%s", JF_NAME_MAX, got);
            return JF_ERR_INVALID;
        }
        return set_string((char **)(void *)field, value, 0, why, cap);
    case T_URL:
        if (*value != '\0' && strncmp(value, "http://", 7) != 0 &&
            strncmp(value, "https://", 8) != 0) {
            snprintf(why, cap, "expected a URL starting with http:// or https://%s", got);
            return JF_ERR_INVALID;
        }
        return set_string((char **)(void *)field, value, 1, why, cap);
    case T_INT:
        if (!parse_int64(value, &v) || v < k->min || v > k->max) {
            snprintf(why, cap, "expected an integer from %lld to %lld%s", (long long)k->min,
                     (long long)k->max, got);
            return JF_ERR_INVALID;
        }
        *(int *)(void *)field = (int)v;
        return JF_OK;
    case T_BYTES:
        if (!parse_int64(value, &v) || (v != -1 && (v < k->min || v > k->max))) {
            snprintf(why, cap, "expected a number of bytes, or -1 for no limit%s", got);
            return JF_ERR_INVALID;
        }
        *(int64_t *)(void *)field = v;
        return JF_OK;
    case T_DURATION:
        if (jf_duration_parse(&v, value, &e) != JF_OK) {
            snprintf(why, cap, "%s", k->secret ? "invalid value" : e.msg);
            return JF_ERR_INVALID;
        }
        if (v < k->min || v > k->max) {
            jf_duration_format(lo, sizeof lo, k->min);
            jf_duration_format(hi, sizeof hi, k->max);
            snprintf(why, cap, "expected a duration from %s to %s%s", lo, hi, got);
            return JF_ERR_INVALID;
        }
        *(int64_t *)(void *)field = v;
        return JF_OK;
    case T_DURATIONS: {
        int64_t list[JF_MAX_BACKOFF];
        size_t n;
        if (jf_duration_list_parse(list, JF_MAX_BACKOFF, &n, value, &e) != JF_OK) {
            snprintf(why, cap, "%s", k->secret ? "invalid value" : e.msg);
            return JF_ERR_INVALID;
        }
        for (size_t i = 0; i < n; i++) {
            if (list[i] < k->min || list[i] > k->max) {
                jf_duration_format(lo, sizeof lo, k->min);
                jf_duration_format(hi, sizeof hi, k->max);
                snprintf(why, cap, "expected durations from %s to %s%s", lo, hi, got);
                return JF_ERR_INVALID;
            }
        }
        memcpy(field, list, n * sizeof list[0]);
        *(size_t *)(void *)((char *)base + k->off2) = n;
        return JF_OK;
    }
    case T_RATE: {
        jf_rate r;
        if (jf_rate_parse(&r, value, &e) != JF_OK) {
            snprintf(why, cap, "%s", k->secret ? "invalid value" : e.msg);
            return JF_ERR_INVALID;
        }
        *(jf_rate *)(void *)field = r;
        return JF_OK;
    }
    case T_LEVEL: {
        jf_log_level lvl;
        if (jf_log_level_parse(&lvl, value) != JF_OK) {
            snprintf(why, cap, "expected debug, info, warn, error or off%s", got);
            return JF_ERR_INVALID;
        }
        *(jf_log_level *)(void *)field = lvl;
        return JF_OK;
    }
    case T_KIND:
        if (strcmp(value, "noop") == 0) {
            *(jf_handler_kind *)(void *)field = JF_KIND_NOOP;
        } else if (strcmp(value, "http") == 0) {
            *(jf_handler_kind *)(void *)field = JF_KIND_HTTP;
        } else if (strcmp(value, "postgres") == 0) {
            *(jf_handler_kind *)(void *)field = JF_KIND_POSTGRES;
        } else {
            snprintf(why, cap, "expected http, postgres or noop%s", got);
            return JF_ERR_INVALID;
        }
        return JF_OK;
    case T_BOOL:
        if (strcmp(value, "true") == 0 || strcmp(value, "yes") == 0 ||
            strcmp(value, "on") == 0 || strcmp(value, "1") == 0) {
            *(bool *)(void *)field = true;
        } else if (strcmp(value, "false") == 0 || strcmp(value, "no") == 0 ||
                   strcmp(value, "off") == 0 || strcmp(value, "0") == 0) {
            *(bool *)(void *)field = false;
        } else {
            snprintf(why, cap, "expected true or false%s", got);
            return JF_ERR_INVALID;
        }
        return JF_OK;
    case T_WEIGHTS: {
        int w[3];
        const char *p = value;
        size_t n = 0;
        int ok = 1;
        for (;;) {
            while (*p == ' ' || *p == '\t')
                p++;
            char num[24];
            size_t len = 0;
            while (*p && *p != ',' && *p != ' ' && *p != '\t' && len + 1 < sizeof num)
                num[len++] = *p++;
            num[len] = '\0';
            while (*p == ' ' || *p == '\t')
                p++;
            if (n == 3 || !parse_int64(num, &v) || v < k->min || v > k->max ||
                (*p != ',' && *p != '\0')) {
                ok = 0;
                break;
            }
            w[n++] = (int)v;
            if (*p == '\0')
                break;
            p++;
        }
        if (!ok || n != 3) {
            snprintf(why, cap,
                     "expected three integers from %lld to %lld for high, normal and low "
                     "(like 6,3,1)%s",
                     (long long)k->min, (long long)k->max, got);
            return JF_ERR_INVALID;
        }
        memcpy(field, w, sizeof w);
        return JF_OK;
    }
    }
    snprintf(why, cap, "internal error: unknown key type");
    return JF_ERR_INVALID;
}

/* --- defaults ------------------------------------------------------------ */

static void breaker_defaults(jf_breaker_config *b)
{
    b->window = 20;
    b->min_calls = 10;
    b->failure_rate = 50;
    b->slow_call_ms = 0;
    b->slow_rate = 100;
    b->open_ms = 5 * SEC_MS;
    b->open_max_ms = 5 * MIN_MS;
    b->probes = 3;
}

static void service_defaults(jf_service_config *s)
{
    memset(s, 0, sizeof *s);
    s->kind = JF_KIND_NOOP; /* kind is required in the file; see check_whole() */
    s->timeout_ms = 30 * SEC_MS;
    s->max_deliver = 5;
    s->backoff_ms[0] = 1 * SEC_MS;
    s->backoff_ms[1] = 5 * SEC_MS;
    s->backoff_ms[2] = 30 * SEC_MS;
    s->backoff_n = 3;
    s->fleet_in_flight = 1000;
    s->ack_wait_ms = 30 * SEC_MS;
    s->burst = 1;
    s->tls_verify = true;
    s->max_response = INT64_C(1) << 20;
    s->retry_after_max_ms = 10 * MIN_MS;
    breaker_defaults(&s->breaker);
}

static jf_status config_defaults(jf_config *c)
{
    c->log_level = JF_LOG_INFO;
    c->nats.connect_timeout_ms = 5 * SEC_MS;
    c->nats.reconnect_wait_ms = 2 * SEC_MS;
    c->nats.request_timeout_ms = 5 * SEC_MS;
    c->stream.max_age_ms = 7 * DAY_MS;
    c->stream.dlq_max_age_ms = 30 * DAY_MS;
    c->stream.duplicate_window_ms = 2 * MIN_MS;
    c->stream.replicas = 1;
    c->stream.max_bytes = -1;
    c->consumer.max_in_flight = 256;
    c->consumer.pull_batch = 128;
    c->consumer.pulls = 4;
    c->consumer.pull_expires_ms = 5 * SEC_MS;
    c->consumer.priority_weights[0] = 6;
    c->consumer.priority_weights[1] = 3;
    c->consumer.priority_weights[2] = 1;
    c->consumer.shutdown_grace_ms = 30 * SEC_MS;
    c->consumer.stats_interval_ms = 0;
    c->postgres_connections = 2;
    c->postgres_statement_timeout_ms = 30 * SEC_MS;
    breaker_defaults(&c->ledger_breaker);
    c->publisher.max_pending = 1024;
    c->publisher.timeout_ms = 5 * SEC_MS;
    c->intake.max_body = 1 << 20;
    c->intake.max_jobs = 1000;
    c->nats.url = dup_str("nats://127.0.0.1:4222");
    c->stream.name = dup_str("JOBS");
    c->stream.dlq = dup_str("JOBS_DLQ");
    c->intake.listen = dup_str("127.0.0.1:8080");
    if (c->nats.url == NULL || c->stream.name == NULL || c->stream.dlq == NULL ||
        c->intake.listen == NULL)
        return JF_ERR_NOMEM;
    return JF_OK;
}

/* --- the file ------------------------------------------------------------ */

static void fail_at(parse_ctx *c, jf_status st, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void fail_at(parse_ctx *c, jf_status st, const char *fmt, ...)
{
    char msg[JF_ERROR_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    jf_error_set(c->err, "%s:%d: %s", c->name, c->line, msg);
    c->failed = c->line > 0 ? c->line : 1;
    c->st = st;
}

static int next_char(parse_ctx *c)
{
    if (c->fp != NULL)
        return getc(c->fp);
    if (c->left == 0)
        return EOF;
    c->left--;
    return (unsigned char)*c->text++;
}

static int enter_section(parse_ctx *c, const char *name, size_t len)
{
    size_t plen = strlen(SERVICE_PREFIX);
    jf_config *cfg = c->cfg;

    if (len >= sizeof c->label) {
        fail_at(c, JF_ERR_INVALID, "section name longer than %zu bytes", sizeof c->label - 1);
        return 0;
    }
    memcpy(c->label, name, len);
    c->label[len] = '\0';
    c->key_seen = 0;

    for (int i = 0; i < NFIXED; i++) {
        if (strcmp(c->label, fixed_sections[i].name) == 0) {
            if (c->sect_line[i] != 0) {
                fail_at(c, JF_ERR_INVALID, "[%s] appears twice (first at line %d); merge them",
                        c->label, c->sect_line[i]);
                return 0;
            }
            c->sect_line[i] = c->line;
            c->sect = i;
            return 1;
        }
    }
    if (len <= plen || strncmp(c->label, SERVICE_PREFIX, plen) != 0) {
        char q[QUOTE_MAX * 4 + 8];
        quote(q, sizeof q, c->label);
        fail_at(c, JF_ERR_INVALID,
                "unknown section [%s] (known: nats, stream, postgres, consumer, publisher, intake, "
                "log, service.NAME)",
                q);
        return 0;
    }
    const char *svc = c->label + plen;
    if (!is_token(svc, len - plen, JF_NAME_MAX)) {
        char q[QUOTE_MAX * 4 + 8];
        quote(q, sizeof q, svc);
        fail_at(c, JF_ERR_INVALID,
                "[service.%s]: a service name must be 1-%d characters of A-Z a-z 0-9 _ - "
                "(it is a subject token)",
                q, JF_NAME_MAX);
        return 0;
    }
    for (size_t i = 0; i < cfg->nservices; i++) {
        if (strcmp(cfg->services[i].name, svc) == 0) {
            fail_at(c, JF_ERR_INVALID, "[service.%s] appears twice (first at line %d)", svc,
                    cfg->services[i].line);
            return 0;
        }
    }
    if (cfg->nservices == JF_MAX_SERVICES) {
        fail_at(c, JF_ERR_INVALID, "[service.%s]: more than %d services", svc, JF_MAX_SERVICES);
        return 0;
    }
    jf_service_config *s = &cfg->services[cfg->nservices];
    service_defaults(s);
    memcpy(s->name, svc, len - plen);
    s->name[len - plen] = '\0';
    s->line = c->line;
    c->svc = cfg->nservices++;
    c->sect = S_SERVICE;
    return 1;
}

/* Handles a "[section]" line starting at p; inih would take the same line
 * as a header, so both agree on where sections begin. */
static int section_line(parse_ctx *c, const char *p)
{
    const char *close = strchr(p + 1, ']');
    if (close == NULL) {
        fail_at(c, JF_ERR_INVALID, "section header without a closing ']'");
        return 0;
    }
    const char *rest = close + 1;
    while (isspace((unsigned char)*rest))
        rest++;
    if (*rest != '\0' && *rest != ';' && *rest != '#') {
        fail_at(c, JF_ERR_INVALID, "unexpected text after the section header");
        return 0;
    }
    const char *a = p + 1, *b = close;
    while (a < b && isspace((unsigned char)*a))
        a++;
    while (b > a && isspace((unsigned char)b[-1]))
        b--;
    return enter_section(c, a, (size_t)(b - a));
}

/* inih's reader: one whole line per call, or NULL at the end or on error. */
static char *read_line(char *buf, int num, void *stream)
{
    parse_ctx *c = stream;
    if (c->failed || num < 3)
        return NULL;
    int ch = next_char(c);
    if (ch == EOF) {
        if (c->fp != NULL && ferror(c->fp)) {
            jf_error_set(c->err, "cannot read %s: %s", c->name, strerror(errno));
            c->failed = c->line + 1;
            c->st = JF_ERR_IO;
        }
        return NULL;
    }
    c->line++;
    size_t len = 0, max = (size_t)num - 2; /* room for '\n' and '\0' */
    for (; ch != EOF && ch != '\n'; ch = next_char(c)) {
        if (ch == '\0') {
            fail_at(c, JF_ERR_INVALID, "NUL byte in the line");
            return NULL;
        }
        if (len == max) {
            fail_at(c, JF_ERR_INVALID, "line longer than %zu bytes", max);
            return NULL;
        }
        buf[len++] = (char)ch;
    }
    if (ch == EOF && c->fp != NULL && ferror(c->fp)) {
        jf_error_set(c->err, "cannot read %s: %s", c->name, strerror(errno));
        c->failed = c->line;
        c->st = JF_ERR_IO;
        return NULL;
    }
    if (ch == '\n')
        buf[len++] = '\n';
    buf[len] = '\0';

    const char *p = buf;
    if (c->line == 1 && len >= 3 && memcmp(p, "\xEF\xBB\xBF", 3) == 0)
        p += 3;
    const char *q = p;
    while (isspace((unsigned char)*q))
        q++;
    if (*q == '\0' || *q == ';' || *q == '#')
        return buf;
    if (q > buf && c->key_seen) {
        /* inih would append this line to the previous key's value. */
        fail_at(c, JF_ERR_INVALID,
                "indented line (a value continued on a second line is not supported; remove "
                "the indentation)");
        return NULL;
    }
    if (*q == '[')
        return section_line(c, q) ? buf : NULL;
    return buf;
}

static int on_key(void *user, const char *section, const char *name, const char *value)
{
    parse_ctx *c = user;
    const key_def *keys;
    size_t nkeys, idx;
    int *src;
    void *base;
    char why[JF_ERROR_MAX];
    char label[160];

    (void)section; /* inih truncates it; c->label is the section as written */
    c->key_seen = 1;
    if (c->failed)
        return 0;
    if (c->sect == S_NONE) {
        char q[QUOTE_MAX * 4 + 8];
        quote(q, sizeof q, name);
        fail_at(c, JF_ERR_INVALID, "key \"%s\" before any [section]", q);
        return 0;
    }
    if (c->sect == S_SERVICE) {
        keys = service_keys;
        nkeys = NKEYS(service_keys);
        src = c->svc_src[c->svc];
        base = &c->cfg->services[c->svc];
    } else {
        keys = fixed_sections[c->sect].keys;
        nkeys = fixed_sections[c->sect].nkeys;
        src = c->fixed_src[c->sect];
        base = c->cfg;
    }
    snprintf(label, sizeof label, "[%s]", c->label);
    const key_def *k = find_key(keys, nkeys, name, &idx);
    if (k == NULL) {
        char q[QUOTE_MAX * 4 + 8], known[256];
        quote(q, sizeof q, name);
        key_list(known, sizeof known, keys, nkeys);
        fail_at(c, JF_ERR_INVALID, "%s %s: unknown key (known: %s)", label, q, known);
        return 0;
    }
    if (src[idx] > 0) {
        fail_at(c, JF_ERR_INVALID, "%s %s: given twice (first at line %d)", label, k->name,
                src[idx]);
        return 0;
    }
    jf_status st = set_value(base, k, value, why, sizeof why);
    if (st != JF_OK) {
        fail_at(c, st, "%s %s: %s", label, k->name, why);
        return 0;
    }
    src[idx] = c->line;
    return 1;
}

static jf_status parse_source(parse_ctx *c)
{
    int rc = ini_parse_stream(read_line, c, on_key, c);
    /* inih keeps going after a malformed line; report whichever error came
     * first in the file. */
    if (rc > 0 && (!c->failed || rc < c->failed)) {
        jf_error_set(c->err, "%s:%d: expected \"key = value\", \"[section]\" or a comment", c->name,
                     rc);
        return JF_ERR_INVALID;
    }
    if (c->failed)
        return c->st;
    if (rc == -2) {
        jf_error_set(c->err, "%s: out of memory", c->name);
        return JF_ERR_NOMEM;
    }
    return JF_OK;
}

/* --- the environment ----------------------------------------------------- */

/* JETFLEET_<SECTION>_<KEY>: upper case, '.' and '-' as '_'. */
static void env_name(char *buf, size_t cap, const char *section, const char *key)
{
    size_t o = (size_t)snprintf(buf, cap, "%s", ENV_PREFIX);
    for (const char *p = section; *p && o + 1 < cap; p++)
        buf[o++] = (char)((*p == '.' || *p == '-') ? '_' : toupper((unsigned char)*p));
    if (o + 1 < cap)
        buf[o++] = '_';
    for (const char *p = key; *p && o + 1 < cap; p++)
        buf[o++] = (char)toupper((unsigned char)*p);
    buf[o < cap ? o : cap - 1] = '\0';
}

static jf_status apply_env_section(const char *section, const key_def *keys, size_t n, void *base,
                                   int *src, jf_error *err)
{
    for (size_t i = 0; i < n; i++) {
        char var[160], why[JF_ERROR_MAX];
        env_name(var, sizeof var, section, keys[i].name);
        const char *v = getenv(var);
        if (v == NULL)
            continue;
        if (strlen(v) > ENV_VALUE_MAX) {
            jf_error_set(err, "environment %s: longer than %d bytes", var, ENV_VALUE_MAX);
            return JF_ERR_INVALID;
        }
        jf_status st = set_value(base, &keys[i], v, why, sizeof why);
        if (st != JF_OK) {
            jf_error_set(err, "environment %s: %s", var, why);
            return st;
        }
        src[i] = FROM_ENV;
    }
    return JF_OK;
}

/* A JETFLEET_ variable under the prefix of a known section (or of a
 * service the file has) that names no key there is a typo — a
 * JETFLEET_NATS_PASWORD would otherwise be ignored and the server's refusal
 * would be the only clue. Variables of services the file does not have,
 * and other JETFLEET_ names (JETFLEET_CONFIG …), are not ours to judge. */
static bool env_is(const char *var, const char *section, const char *key)
{
    char name[160];
    env_name(name, sizeof name, section, key);
    return key[0] != '\0' ? strcmp(var, name) == 0 : strncmp(var, name, strlen(name)) == 0;
}

static jf_status check_env_names(parse_ctx *c)
{
    extern char **environ;
    jf_config *cfg = c->cfg;
    for (char **e = environ; e != NULL && *e != NULL; e++) {
        const char *eq = strchr(*e, '=');
        size_t len = eq != NULL ? (size_t)(eq - *e) : strlen(*e);
        char var[160];
        if (len <= sizeof ENV_PREFIX - 1 || len >= sizeof var ||
            strncmp(*e, ENV_PREFIX, sizeof ENV_PREFIX - 1) != 0)
            continue;
        memcpy(var, *e, len);
        var[len] = '\0';

        bool known = false;
        char svc[JF_NAME_MAX + 16];
        for (int i = 0; i < NFIXED && !known; i++)
            for (size_t k = 0; k < fixed_sections[i].nkeys && !known; k++)
                known = env_is(var, fixed_sections[i].name, fixed_sections[i].keys[k].name);
        for (size_t i = 0; i < cfg->nservices && !known; i++) {
            snprintf(svc, sizeof svc, "%s%s", SERVICE_PREFIX, cfg->services[i].name);
            for (size_t k = 0; k < NKEYS(service_keys) && !known; k++)
                known = env_is(var, svc, service_keys[k].name);
        }
        if (known)
            continue;
        const char *section = NULL;
        for (int i = 0; i < NFIXED && section == NULL; i++)
            if (env_is(var, fixed_sections[i].name, ""))
                section = fixed_sections[i].name;
        for (size_t i = 0; i < cfg->nservices && section == NULL; i++) {
            snprintf(svc, sizeof svc, "%s%s", SERVICE_PREFIX, cfg->services[i].name);
            if (env_is(var, svc, ""))
                section = svc;
        }
        if (section != NULL) {
            jf_error_set(c->err, "environment %s: no such key in [%s] (a typo?)", var, section);
            return JF_ERR_INVALID;
        }
    }
    return JF_OK;
}

static jf_status apply_env(parse_ctx *c)
{
    jf_config *cfg = c->cfg;
    jf_status cst = check_env_names(c);
    if (cst != JF_OK)
        return cst;
    for (int i = 0; i < NFIXED; i++) {
        jf_status st = apply_env_section(fixed_sections[i].name, fixed_sections[i].keys,
                                         fixed_sections[i].nkeys, cfg, c->fixed_src[i], c->err);
        if (st != JF_OK)
            return st;
    }
    for (size_t i = 0; i < cfg->nservices; i++) {
        char section[sizeof SERVICE_PREFIX + JF_NAME_MAX];
        snprintf(section, sizeof section, "%s%s", SERVICE_PREFIX, cfg->services[i].name);
        jf_status st = apply_env_section(section, service_keys, NKEYS(service_keys),
                                         &cfg->services[i], c->svc_src[i], c->err);
        if (st != JF_OK)
            return st;
    }
    return JF_OK;
}

/* --- whole-config checks -------------------------------------------------- */

/* "FILE:LINE", "environment VAR" or "default": where a value came from. */
static void origin(char *buf, size_t cap, const parse_ctx *c, const char *section, const char *key,
                   int src)
{
    if (src > 0) {
        snprintf(buf, cap, "%s:%d", c->name, src);
    } else if (src == FROM_ENV) {
        char var[160];
        env_name(var, sizeof var, section, key);
        snprintf(buf, cap, "environment %s", var);
    } else {
        snprintf(buf, cap, "default");
    }
}

static size_t key_index(const key_def *keys, size_t n, const char *name)
{
    size_t idx = 0;
    find_key(keys, n, name, &idx);
    return idx;
}

static int fixed_src(const parse_ctx *c, int sect, const char *key)
{
    return c
        ->fixed_src[sect][key_index(fixed_sections[sect].keys, fixed_sections[sect].nkeys, key)];
}

static int svc_src(const parse_ctx *c, size_t svc, const char *key)
{
    return c->svc_src[svc][key_index(service_keys, NKEYS(service_keys), key)];
}

static jf_status check_whole(parse_ctx *c)
{
    const jf_config *cfg = c->cfg;
    char o1[256], o2[256];

    for (size_t i = 0; i < cfg->nservices; i++) {
        const jf_service_config *s = &cfg->services[i];
        char section[sizeof SERVICE_PREFIX + JF_NAME_MAX];
        snprintf(section, sizeof section, "%s%s", SERVICE_PREFIX, s->name);
        if (svc_src(c, i, "kind") == 0) {
            jf_error_set(c->err, "%s:%d: [%s] kind: missing (http, postgres or noop)", c->name, s->line,
                         section);
            return JF_ERR_INVALID;
        }
        if (s->kind == JF_KIND_POSTGRES && s->sql == NULL) {
            origin(o1, sizeof o1, c, section, "kind", svc_src(c, i, "kind"));
            jf_error_set(c->err,
                         "%s: [%s] kind = postgres needs sql = SELECT your_function($1::jsonb)",
                         o1, section);
            return JF_ERR_INVALID;
        }
        if (s->kind == JF_KIND_POSTGRES && strstr(s->sql, "$1") == NULL) {
            origin(o1, sizeof o1, c, section, "sql", svc_src(c, i, "sql"));
            jf_error_set(c->err, "%s: [%s] sql must pass the envelope as $1, e.g. SELECT f($1::jsonb)",
                         o1, section);
            return JF_ERR_INVALID;
        }
        if (s->kind == JF_KIND_POSTGRES && s->dsn == NULL && cfg->postgres_dsn == NULL) {
            origin(o1, sizeof o1, c, section, "kind", svc_src(c, i, "kind"));
            jf_error_set(c->err, "%s: [%s] kind = postgres needs dsn here or in [postgres]", o1,
                         section);
            return JF_ERR_INVALID;
        }
        if (s->breaker.min_calls > s->breaker.window) {
            /* Point at the key the user set: min_calls may be the default. */
            const char *key =
                svc_src(c, i, "breaker_min_calls") != 0 ? "breaker_min_calls" : "breaker_window";
            origin(o1, sizeof o1, c, section, key, svc_src(c, i, key));
            jf_error_set(c->err, "%s: [%s] breaker_min_calls = %d exceeds breaker_window = %d", o1,
                         section, s->breaker.min_calls, s->breaker.window);
            return JF_ERR_INVALID;
        }
        if (s->kind == JF_KIND_HTTP && s->url == NULL) {
            origin(o1, sizeof o1, c, section, "kind", svc_src(c, i, "kind"));
            jf_error_set(c->err, "%s: [%s] kind = http needs url = http://… or https://…", o1,
                         section);
            return JF_ERR_INVALID;
        }
        /* Two services must not answer to the same environment variables. */
        for (size_t j = 0; j < i; j++) {
            char a[160], b[160];
            env_name(a, sizeof a, section, "");
            char other[sizeof SERVICE_PREFIX + JF_NAME_MAX];
            snprintf(other, sizeof other, "%s%s", SERVICE_PREFIX, cfg->services[j].name);
            env_name(b, sizeof b, other, "");
            if (strcmp(a, b) == 0) {
                jf_error_set(c->err,
                             "%s:%d: [%s] and [%s] (line %d) share the environment prefix %s; "
                             "rename one",
                             c->name, s->line, section, other, cfg->services[j].line, a);
                return JF_ERR_INVALID;
            }
        }
    }

    /* The ledger's breaker, like the services', is built at start; refuse
     * here what jf_breaker_create would refuse there without a location. */
    const jf_breaker_config *lb = &cfg->ledger_breaker;
    if (lb->min_calls > lb->window) {
        const char *key = fixed_src(c, S_POSTGRES, "breaker_min_calls") != 0 ? "breaker_min_calls"
                                                                              : "breaker_window";
        origin(o1, sizeof o1, c, "postgres", key, fixed_src(c, S_POSTGRES, key));
        jf_error_set(c->err, "%s: [postgres] breaker_min_calls = %d exceeds breaker_window = %d",
                     o1, lb->min_calls, lb->window);
        return JF_ERR_INVALID;
    }

    const jf_consumer_config *cc = &cfg->consumer;
    if (cfg->nservices > 0 && (size_t)cc->max_in_flight < 3 * cfg->nservices) {
        origin(o1, sizeof o1, c, "consumer", "max_in_flight",
               fixed_src(c, S_CONSUMER, "max_in_flight"));
        jf_error_set(c->err,
                     "%s: [consumer] max_in_flight = %d is too small for %zu services: each of "
                     "their %zu durables keeps a pull open, so it must be at least %zu",
                     o1, cc->max_in_flight, cfg->nservices, 3 * cfg->nservices, 3 * cfg->nservices);
        return JF_ERR_INVALID;
    }
    if (cc->pull_batch > cc->max_in_flight && fixed_src(c, S_CONSUMER, "pull_batch") == 0) {
        /* The default batch follows a small max_in_flight down: nobody who
         * sets max_in_flight = 64 should have to set pull_batch too. */
        c->cfg->consumer.pull_batch = cc->max_in_flight;
    }
    if (cc->pull_batch > cc->max_in_flight) {
        /* Lead with the key the user set, so the location points at it. */
        int batch_src = fixed_src(c, S_CONSUMER, "pull_batch");
        int max_src = fixed_src(c, S_CONSUMER, "max_in_flight");
        origin(o1, sizeof o1, c, "consumer", "pull_batch", batch_src);
        origin(o2, sizeof o2, c, "consumer", "max_in_flight", max_src);
        if (batch_src == 0)
            jf_error_set(c->err,
                         "%s: [consumer] max_in_flight = %d must be at least [consumer] "
                         "pull_batch = %d (%s)",
                         o2, cc->max_in_flight, cc->pull_batch, o1);
        else
            jf_error_set(c->err,
                         "%s: [consumer] pull_batch = %d must not exceed [consumer] "
                         "max_in_flight = %d (%s)",
                         o1, cc->pull_batch, cc->max_in_flight, o2);
        return JF_ERR_INVALID;
    }

    const jf_stream_config *sc = &cfg->stream;
    if (strcmp(sc->name, sc->dlq) == 0) {
        const char *key = fixed_src(c, S_STREAM, "dlq") != 0 ? "dlq" : "name";
        origin(o1, sizeof o1, c, "stream", key, fixed_src(c, S_STREAM, key));
        jf_error_set(c->err, "%s: [stream] dlq must differ from [stream] name (both \"%s\")", o1,
                     sc->name);
        return JF_ERR_INVALID;
    }
    if (sc->max_age_ms > 0 && sc->duplicate_window_ms > sc->max_age_ms) {
        /* nats-server refuses such a stream; say so before connecting. */
        int win_src = fixed_src(c, S_STREAM, "duplicate_window");
        int age_src = fixed_src(c, S_STREAM, "max_age");
        char win[32], age[32];
        jf_duration_format(win, sizeof win, sc->duplicate_window_ms);
        jf_duration_format(age, sizeof age, sc->max_age_ms);
        origin(o1, sizeof o1, c, "stream", "duplicate_window", win_src);
        origin(o2, sizeof o2, c, "stream", "max_age", age_src);
        if (win_src == 0)
            jf_error_set(c->err,
                         "%s: [stream] max_age = %s must be at least [stream] duplicate_window = "
                         "%s (%s)",
                         o2, age, win, o1);
        else
            jf_error_set(c->err,
                         "%s: [stream] duplicate_window = %s must not exceed [stream] max_age = "
                         "%s (%s)",
                         o1, win, age, o2);
        return JF_ERR_INVALID;
    }

    const jf_nats_config *nc = &cfg->nats;
    if (nc->password != NULL && nc->user == NULL) {
        origin(o1, sizeof o1, c, "nats", "password", fixed_src(c, S_NATS, "password"));
        jf_error_set(c->err, "%s: [nats] password is set but [nats] user is not", o1);
        return JF_ERR_INVALID;
    }
    if ((nc->tls_cert == NULL) != (nc->tls_key == NULL)) {
        const char *set = nc->tls_cert != NULL ? "tls_cert" : "tls_key";
        const char *unset = nc->tls_cert != NULL ? "tls_key" : "tls_cert";
        origin(o1, sizeof o1, c, "nats", set, fixed_src(c, S_NATS, set));
        jf_error_set(c->err, "%s: [nats] %s is set but [nats] %s is not; give both", o1, set,
                     unset);
        return JF_ERR_INVALID;
    }
    if (cfg->intake.token != NULL && cfg->intake.token_file != NULL) {
        origin(o1, sizeof o1, c, "intake", "token_file", fixed_src(c, S_INTAKE, "token_file"));
        origin(o2, sizeof o2, c, "intake", "token", fixed_src(c, S_INTAKE, "token"));
        jf_error_set(c->err, "%s: [intake] token_file and [intake] token (%s) are both set; give one",
                     o1, o2);
        return JF_ERR_INVALID;
    }
    return JF_OK;
}

/* --- public ---------------------------------------------------------------- */

static jf_status load(jf_config **out, FILE *fp, const char *text, const char *name,
                      const char *path, jf_error *err)
{
    jf_status st = JF_ERR_NOMEM;
    parse_ctx *c = calloc(1, sizeof *c); /* ~20 KiB of line bookkeeping: not on the stack */
    jf_config *cfg = calloc(1, sizeof *cfg);
    if (c == NULL || cfg == NULL) {
        jf_error_set(err, "out of memory loading the configuration");
        goto fail;
    }
    if (config_defaults(cfg) != JF_OK) {
        jf_error_set(err, "out of memory loading the configuration");
        goto fail;
    }
    if (path != NULL && (cfg->path = dup_str(path)) == NULL) {
        jf_error_set(err, "out of memory loading the configuration");
        goto fail;
    }
    c->cfg = cfg;
    c->name = name;
    c->fp = fp;
    c->text = text;
    c->left = text != NULL ? strlen(text) : 0;
    c->sect = S_NONE;
    c->err = err;
    if ((fp != NULL || text != NULL) && (st = parse_source(c)) != JF_OK)
        goto fail;
    if ((st = apply_env(c)) != JF_OK)
        goto fail;
    if ((st = check_whole(c)) != JF_OK)
        goto fail;
    /* A postgres service without its own dsn uses the ledger's database. */
    for (size_t i = 0; i < cfg->nservices; i++) {
        jf_service_config *s = &cfg->services[i];
        if (s->kind == JF_KIND_POSTGRES && s->dsn == NULL &&
            (s->dsn = dup_str(cfg->postgres_dsn)) == NULL) {
            jf_error_set(err, "out of memory");
            st = JF_ERR_NOMEM;
            goto fail;
        }
    }
    free(c);
    *out = cfg;
    return JF_OK;

fail:
    jf_config_destroy(cfg);
    free(c);
    return st;
}

jf_status jf_config_load(jf_config **out, const char *path, jf_error *err)
{
    const char *file = path != NULL ? path : DEFAULT_FILE;
    FILE *fp = fopen(file, "r");
    if (fp == NULL) {
        int e = errno;
        if (path == NULL && e == ENOENT)
            return load(out, NULL, NULL, DEFAULT_FILE, NULL, err);
        jf_error_set(err, "cannot open %s: %s", file, strerror(e));
        return e == ENOENT ? JF_ERR_NOTFOUND : JF_ERR_IO;
    }
    jf_status st = load(out, fp, NULL, file, file, err);
    fclose(fp);
    return st;
}

jf_status jf_config_load_string(jf_config **out, const char *text, const char *name, jf_error *err)
{
    return load(out, NULL, text != NULL ? text : "", name != NULL ? name : "<string>", NULL, err);
}

void jf_config_destroy(jf_config *cfg)
{
    if (cfg == NULL)
        return;
    free(cfg->path);
    free(cfg->nats.url);
    free(cfg->nats.name);
    free(cfg->nats.user);
    free(cfg->nats.password);
    free(cfg->nats.token);
    free(cfg->nats.creds);
    free(cfg->nats.nkey_seed);
    free(cfg->nats.tls_ca);
    free(cfg->nats.tls_cert);
    free(cfg->nats.tls_key);
    free(cfg->stream.name);
    free(cfg->stream.dlq);
    free(cfg->postgres_dsn);
    free(cfg->consumer.metrics_listen);
    free(cfg->intake.listen);
    free(cfg->intake.token);
    free(cfg->intake.token_file);
    for (size_t i = 0; i < cfg->nservices; i++) {
        jf_service_config *s = &cfg->services[i];
        free(s->url);
        free(s->tls_ca);
        free(s->auth_header);
        free(s->auth_header_file);
        free(s->auth_header_env);
        free(s->result_required);
        free(s->sql);
        free(s->dsn);
    }
    free(cfg);
}

const jf_service_config *jf_config_service(const jf_config *cfg, const char *name)
{
    if (cfg == NULL || name == NULL)
        return NULL;
    for (size_t i = 0; i < cfg->nservices; i++)
        if (strcmp(cfg->services[i].name, name) == 0)
            return &cfg->services[i];
    return NULL;
}
