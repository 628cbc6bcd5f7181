#include "duration.h"

#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

/* Largest first: a duration's parts must come in this order, each at most
 * once, so "1m1m" or "30s1m" (almost always typos) are refused. */
static const struct {
    const char *name;
    size_t len;
    int64_t ms;
} units[] = {
    {"d", 1, 86400000}, {"h", 1, 3600000}, {"m", 1, 60000}, {"s", 1, 1000}, {"ms", 2, 1},
};
#define NUNITS (sizeof units / sizeof units[0])

/* Input can be anything a user typed, so messages quote a bounded, escaped
 * copy of it. */
#define QUOTE_MAX 64

static void quote(char *buf, size_t cap, const char *s, size_t len)
{
    size_t o = 0;
    if (cap == 0)
        return;
    for (size_t i = 0; i < len && i < QUOTE_MAX && o + 5 < cap; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch < 0x20 || ch == 0x7f || ch == '"' || ch == '\\')
            o += (size_t)snprintf(buf + o, cap - o, "\\x%02x", ch);
        else
            buf[o++] = (char)ch;
    }
    if (len > QUOTE_MAX && o + 4 < cap) {
        memcpy(buf + o, "...", 3);
        o += 3;
    }
    buf[o] = '\0';
}

static bool is_digit(char c)
{
    return c >= '0' && c <= '9';
}

static bool is_alpha(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

/* Parses s[0..len) into *out; on failure *reason names the problem (static
 * text, or written into rbuf). */
static bool parse_span(const char *s, size_t len, int64_t *out, char *rbuf, size_t rcap)
{
    if (len == 0) {
        snprintf(rbuf, rcap, "empty");
        return false;
    }
    if (len == 1 && s[0] == '0') {
        *out = 0;
        return true;
    }
    int64_t total = 0;
    size_t prev_unit = 0; /* index + 1 of the last unit used; 0 = none yet */
    size_t i = 0;
    while (i < len) {
        if (!is_digit(s[i])) {
            if (s[i] == '-' || s[i] == '+')
                snprintf(rbuf, rcap, "no sign allowed");
            else if (s[i] == ' ' || s[i] == '\t')
                snprintf(rbuf, rcap, "no spaces allowed");
            else
                snprintf(rbuf, rcap, "expected a number at offset %zu", i);
            return false;
        }
        int64_t v = 0;
        size_t digits_at = i;
        while (i < len && is_digit(s[i])) {
            int d = s[i] - '0';
            if (v > (INT64_MAX - d) / 10) {
                snprintf(rbuf, rcap, "too large");
                return false;
            }
            v = v * 10 + d;
            i++;
        }
        size_t u0 = i;
        while (i < len && is_alpha(s[i]))
            i++;
        if (u0 == i) {
            char q[QUOTE_MAX + 8];
            quote(q, sizeof q, s + digits_at, i - digits_at);
            if (i < len && (s[i] == ' ' || s[i] == '\t'))
                snprintf(rbuf, rcap, "no spaces allowed");
            else if (i < len && (s[i] == '.' || s[i] == ','))
                snprintf(rbuf, rcap, "no fractions allowed (write 1500ms, not 1.5s)");
            else
                snprintf(rbuf, rcap, "missing unit after %s (use ms, s, m, h or d)", q);
            return false;
        }
        size_t k = 0;
        while (k < NUNITS &&
               !(units[k].len == i - u0 && memcmp(units[k].name, s + u0, i - u0) == 0))
            k++;
        if (k == NUNITS) {
            char q[QUOTE_MAX + 8];
            quote(q, sizeof q, s + u0, i - u0);
            snprintf(rbuf, rcap, "unknown unit \"%s\" (use ms, s, m, h or d)", q);
            return false;
        }
        if (k + 1 <= prev_unit) {
            snprintf(rbuf, rcap, "units must go from largest to smallest, each once (like 1h30m)");
            return false;
        }
        prev_unit = k + 1;
        if (v > (INT64_MAX - total) / units[k].ms) {
            snprintf(rbuf, rcap, "too large");
            return false;
        }
        total += v * units[k].ms;
    }
    *out = total;
    return true;
}

jf_status jf_duration_parse(int64_t *out_ms, const char *s, jf_error *err)
{
    char reason[160];
    int64_t v;
    if (s == NULL)
        s = "";
    size_t len = strlen(s);
    if (!parse_span(s, len, &v, reason, sizeof reason)) {
        char q[QUOTE_MAX * 4 + 8];
        quote(q, sizeof q, s, len);
        jf_error_set(err, "invalid duration \"%s\": %s", q, reason);
        return JF_ERR_INVALID;
    }
    *out_ms = v;
    return JF_OK;
}

static bool is_blank(char c)
{
    return c == ' ' || c == '\t';
}

/* Walks the list once; writes items only when out is not NULL, so a first
 * pass can validate everything before the caller's array is touched. */
static jf_status walk_list(int64_t *out, size_t max, size_t *n, const char *s, jf_error *err)
{
    size_t count = 0;
    const char *p = s;
    for (;;) {
        const char *end = strchr(p, ',');
        if (end == NULL)
            end = p + strlen(p);
        const char *a = p, *b = end;
        while (a < b && is_blank(*a))
            a++;
        while (b > a && is_blank(b[-1]))
            b--;
        char q[QUOTE_MAX * 4 + 8];
        char reason[160];
        int64_t v;
        if (count == max) {
            quote(q, sizeof q, s, strlen(s));
            jf_error_set(err, "invalid duration list \"%s\": more than %zu items", q, max);
            return JF_ERR_INVALID;
        }
        if (!parse_span(a, (size_t)(b - a), &v, reason, sizeof reason)) {
            quote(q, sizeof q, s, strlen(s));
            jf_error_set(err, "invalid duration list \"%s\": item %zu: %s", q, count + 1, reason);
            return JF_ERR_INVALID;
        }
        if (out != NULL)
            out[count] = v;
        count++;
        if (*end == '\0')
            break;
        p = end + 1;
    }
    *n = count;
    return JF_OK;
}

jf_status jf_duration_list_parse(int64_t *out_ms, size_t max, size_t *n, const char *s,
                                 jf_error *err)
{
    size_t count;
    if (s == NULL)
        s = "";
    jf_status st = walk_list(NULL, max, &count, s, err);
    if (st != JF_OK)
        return st;
    walk_list(out_ms, max, &count, s, err);
    *n = count;
    return JF_OK;
}

size_t jf_duration_format(char *buf, size_t cap, int64_t ms)
{
    char tmp[96];
    size_t len = 0;
    uint64_t v;
    if (ms < 0) {
        tmp[len++] = '-';
        v = (uint64_t)(-(ms + 1)) + 1; /* INT64_MIN has no positive twin */
    } else {
        v = (uint64_t)ms;
    }
    if (v == 0) {
        memcpy(tmp + len, "0s", 3);
        len += 2;
    }
    for (size_t k = 0; k < NUNITS && v > 0; k++) {
        uint64_t q = v / (uint64_t)units[k].ms;
        if (q == 0)
            continue;
        len += (size_t)snprintf(tmp + len, sizeof tmp - len, "%" PRIu64 "%s", q, units[k].name);
        v %= (uint64_t)units[k].ms;
    }
    tmp[len] = '\0';
    if (cap > 0) {
        size_t c = len < cap - 1 ? len : cap - 1;
        memcpy(buf, tmp, c);
        buf[c] = '\0';
    }
    return len;
}

#define RATE_MAX 1000000000

jf_status jf_rate_parse(jf_rate *out, const char *s, jf_error *err)
{
    if (s == NULL)
        s = "";
    size_t len = strlen(s);
    char q[QUOTE_MAX * 4 + 8];
    if (len == 0 || strcmp(s, "0") == 0 || strcmp(s, "none") == 0) {
        out->count = 0;
        out->period_ms = 0;
        return JF_OK;
    }
    int64_t n = 0;
    size_t i = 0;
    while (i < len && is_digit(s[i])) {
        n = n * 10 + (s[i] - '0');
        if (n > RATE_MAX)
            break;
        i++;
    }
    int64_t period = 0;
    if (i > 0 && i + 2 == len && s[i] == '/') {
        switch (s[i + 1]) {
        case 's':
            period = 1000;
            break;
        case 'm':
            period = 60000;
            break;
        case 'h':
            period = 3600000;
            break;
        default:
            break;
        }
    }
    quote(q, sizeof q, s, len);
    if (n > RATE_MAX) {
        jf_error_set(err, "invalid rate \"%s\": more than %d calls per unit", q, RATE_MAX);
        return JF_ERR_INVALID;
    }
    if (period == 0 || n == 0) {
        jf_error_set(err,
                     "invalid rate \"%s\": expected N/s, N/m or N/h with N a positive integer "
                     "(like 30/m), or none",
                     q);
        return JF_ERR_INVALID;
    }
    out->count = n;
    out->period_ms = period;
    return JF_OK;
}
