/* fuzz_config — the INI config loader (jf_config_load_string): any text is
 * refused with one line that starts with where the problem is, or accepted
 * as a config that keeps the whole-config rules; a secret's value never
 * appears in an error.
 *
 * Input: the INI text itself (up to its first NUL). A comment line
 * ";!env NAME=VALUE" also sets JETFLEET_NAME=VALUE for this one load (at
 * most ENV_MAX of them), so the environment overrides are fuzzed too while
 * the text stays a plain INI file for the parser. */
#include "fuzz.h"

#include <ctype.h>
#include <strings.h>

#include "breaker.h"
#include "config.h"
#include "envelope.h"

#define ENV_MAX      4
#define ENV_NAME_MAX 96
#define SECRET_MIN   8 /* shorter values could appear in a message by chance */

extern char **environ;

/* The caller's own JETFLEET_* variables would make runs irreproducible. */
static void clear_jetfleet_env(void)
{
    for (;;) {
        char name[256];
        bool found = false;
        for (char **e = environ; *e != NULL; e++) {
            if (strncmp(*e, "JETFLEET_", 9) == 0) {
                const char *eq = strchr(*e, '=');
                size_t n = eq != NULL ? (size_t)(eq - *e) : strlen(*e);
                if (n >= sizeof name)
                    n = sizeof name - 1;
                memcpy(name, *e, n);
                name[n] = '\0';
                found = true;
                break;
            }
        }
        if (!found || unsetenv(name) != 0)
            return;
    }
}

static size_t count_occurrences(const char *hay, const char *needle)
{
    size_t c = 0;
    for (const char *p = hay; (p = strstr(p, needle)) != NULL; p++)
        c++;
    return c;
}

/* The keys config.c marks secret, in a file line ("password") or as the
 * end of a variable's name ("NATS_PASSWORD", "SERVICE_LLM_AUTH_HEADER"). */
static bool is_secret_key(const char *k, size_t n, bool env)
{
    static const char *const keys[] = {"password", "token", "dsn", "url", "auth_header"};
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        size_t kn = strlen(keys[i]);
        if (!env && kn == n && memcmp(keys[i], k, n) == 0)
            return true;
        if (env && n > kn && k[n - kn - 1] == '_' && strncasecmp(k + n - kn, keys[i], kn) == 0)
            return true;
    }
    return false;
}

static jf_status load_text(jf_config **out, const char *text, jf_error *err);

static void confirm_leak(const char *text, size_t at, size_t n, const char *err)
{
    char other[256];
    for (size_t i = 0; i < n; i++)
        other[i] = "ZQ9"[i % 3];
    other[n] = '\0';
    if (strstr(text, other) != NULL)
        return;
    char *alt = strdup(text);
    if (alt == NULL)
        return;
    memcpy(alt + at, other, n);
    jf_config *cfg = NULL;
    jf_error err2;
    memset(&err2, 0, sizeof err2);
    if (load_text(&cfg, alt, &err2) == JF_OK)
        jf_config_destroy(cfg);
    else
        FUZZ_CHECK(strstr(err2.msg, other) == NULL, "secret \"%.*s\" in error \"%s\"", (int)n,
                   text + at, err);
    free(alt);
}

/* For every "<secret key> = <value>" line whose value is SECRET_MIN or more
 * letters and digits found nowhere else in the text: err must not hold it.
 * The value may also be a word of the message's own text ("publisher"), so
 * a hit is confirmed by loading again with the value replaced: a leak shows
 * the replacement too. */
static void check_no_secret(const char *text, const char *err)
{
    const char *line = text;
    while (*line != '\0') {
        const char *eol = strchr(line, '\n');
        const char *end = eol != NULL ? eol : line + strlen(line);
        const char *p = line;
        const bool env = (size_t)(end - line) > 6 && memcmp(line, ";!env ", 6) == 0;
        if (env)
            p += 6;
        while (p < end && (*p == ' ' || *p == '\t'))
            p++;
        const char *k = p;
        while (p < end && (isalnum((unsigned char)*p) || *p == '_'))
            p++;
        size_t kn = (size_t)(p - k);
        while (p < end && (*p == ' ' || *p == '\t'))
            p++;
        if (kn > 0 && p < end && (*p == '=' || *p == ':') && is_secret_key(k, kn, env)) {
            p++;
            while (p < end && (*p == ' ' || *p == '\t'))
                p++;
            const char *v = p;
            while (p < end && isalnum((unsigned char)*p))
                p++;
            size_t vn = (size_t)(p - v);
            while (p < end && (*p == ' ' || *p == '\t' || *p == '\r'))
                p++;
            if (p == end && vn >= SECRET_MIN && vn < 256) {
                char secret[256];
                memcpy(secret, v, vn);
                secret[vn] = '\0';
                if (count_occurrences(text, secret) == 1 && strstr(err, secret) != NULL)
                    confirm_leak(text, (size_t)(v - text), vn, err);
            }
        }
        line = eol != NULL ? eol + 1 : end;
    }
}

/* ";!env NAME=VALUE" lines: set them; returns how many, names in names[]. */
static size_t set_env_lines(const char *text, char names[ENV_MAX][ENV_NAME_MAX + 16])
{
    size_t n = 0;
    for (const char *p = text; p != NULL && *p != '\0' && n < ENV_MAX;) {
        const char *eol = strchr(p, '\n');
        size_t len = eol != NULL ? (size_t)(eol - p) : strlen(p);
        if (len > 6 && memcmp(p, ";!env ", 6) == 0) {
            const char *name = p + 6, *eq = memchr(name, '=', len - 6);
            size_t nn = eq != NULL ? (size_t)(eq - name) : 0;
            bool ok = nn > 0 && nn <= ENV_NAME_MAX;
            for (size_t i = 0; ok && i < nn; i++)
                ok = isupper((unsigned char)name[i]) || isdigit((unsigned char)name[i]) ||
                     name[i] == '_';
            if (ok) {
                size_t vn = len - 6 - nn - 1;
                char *value = malloc(vn + 1);
                if (value != NULL) {
                    memcpy(value, eq + 1, vn);
                    value[vn] = '\0';
                    snprintf(names[n], ENV_NAME_MAX + 16, "JETFLEET_%.*s", (int)nn, name);
                    if (setenv(names[n], value, 1) == 0)
                        n++;
                    free(value);
                }
            }
        }
        p = eol != NULL ? eol + 1 : NULL;
    }
    return n;
}

/* A config that loads must never be refused later: the consumer builds a
 * breaker from each of these at start. */
static void check_breaker(const jf_breaker_config *bc, const char *whose)
{
    jf_breaker *b = NULL;
    jf_error err;
    FUZZ_CHECK(jf_breaker_create(&b, bc, &err) == JF_OK, "breaker of %s: %s", whose, err.msg);
    jf_breaker_destroy(b);
}

static void check_config(const jf_config *cfg)
{
    check_breaker(&cfg->ledger_breaker, "[postgres]");
    FUZZ_CHECK(cfg->nats.url != NULL && cfg->stream.name != NULL && cfg->stream.dlq != NULL,
               "a required string is NULL");
    FUZZ_CHECK(strcmp(cfg->stream.name, cfg->stream.dlq) != 0, "stream and dlq both \"%s\"",
               cfg->stream.name);
    FUZZ_CHECK(cfg->nservices <= JF_MAX_SERVICES, "%zu services", cfg->nservices);
    FUZZ_CHECK(cfg->consumer.pull_batch >= 1 &&
                   cfg->consumer.pull_batch <= cfg->consumer.max_in_flight,
               "pull_batch %d, max_in_flight %d", cfg->consumer.pull_batch,
               cfg->consumer.max_in_flight);
    FUZZ_CHECK(cfg->nservices == 0 || (size_t)cfg->consumer.max_in_flight >= 3 * cfg->nservices,
               "max_in_flight %d for %zu services", cfg->consumer.max_in_flight,
               cfg->nservices);
    for (size_t i = 0; i < cfg->nservices; i++) {
        const jf_service_config *s = &cfg->services[i];
        size_t n = strlen(s->name);
        FUZZ_CHECK(n >= 1 && n <= JF_NAME_MAX && jf_token_valid(s->name),
                   "service name \"%s\"", s->name);
        FUZZ_CHECK(jf_config_service(cfg, s->name) == s, "service \"%s\" found twice", s->name);
        FUZZ_CHECK(s->backoff_n >= 1 && s->backoff_n <= JF_MAX_BACKOFF, "backoff_n %zu",
                   s->backoff_n);
        for (size_t k = 0; k < s->backoff_n; k++)
            FUZZ_CHECK(s->backoff_ms[k] >= 0, "backoff %lld", (long long)s->backoff_ms[k]);
        FUZZ_CHECK(s->kind != JF_KIND_HTTP ||
                       (s->url != NULL && (strncmp(s->url, "http://", 7) == 0 ||
                                           strncmp(s->url, "https://", 8) == 0)),
                   "http service \"%s\" without an http(s) url", s->name);
        FUZZ_CHECK(s->kind != JF_KIND_POSTGRES || (s->sql != NULL && s->dsn != NULL),
                   "postgres service \"%s\" without sql or dsn", s->name);
        check_breaker(&s->breaker, s->name);
        FUZZ_CHECK(s->rate.count >= 0 && (s->rate.count == 0) == (s->rate.period_ms == 0),
                   "rate %lld/%lld", (long long)s->rate.count, (long long)s->rate.period_ms);
    }
}

/* One load with the text's ";!env" variables set, and unset after. */
static jf_status load_text(jf_config **out, const char *text, jf_error *err)
{
    char names[ENV_MAX][ENV_NAME_MAX + 16];
    const size_t nenv = set_env_lines(text, names);
    const jf_status st = jf_config_load_string(out, text, "fuzz.ini", err);
    for (size_t i = 0; i < nenv; i++)
        unsetenv(names[i]);
    return st;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static bool cleared;
    if (!cleared) {
        clear_jetfleet_env();
        cleared = true;
    }
    char *text = fuzz_cstr(data, size);
    if (text == NULL)
        return 0;
    jf_config *const sentinel = (jf_config *)&cleared;
    jf_config *cfg = sentinel;
    jf_error err;
    memset(&err, 0, sizeof err);
    jf_status st = load_text(&cfg, text, &err);
    if (st == JF_OK) {
        FUZZ_CHECK(cfg != sentinel && cfg != NULL, "no config on success");
        check_config(cfg);
        jf_config_destroy(cfg);
    } else {
        FUZZ_CHECK(st == JF_ERR_INVALID, "status %s (%s)", jf_status_name(st), err.msg);
        FUZZ_CHECK(cfg == sentinel, "output written on error");
        FUZZ_CHECK(fuzz_one_line(err.msg), "error is not one line: \"%s\"", err.msg);
        /* Errors say where: the file (and line), or the variable. */
        FUZZ_CHECK(strncmp(err.msg, "fuzz.ini", 8) == 0 ||
                       strncmp(err.msg, "environment JETFLEET_", 21) == 0,
                   "error names no place: \"%s\"", err.msg);
        check_no_secret(text, err.msg);
    }
    free(text);
    return 0;
}
