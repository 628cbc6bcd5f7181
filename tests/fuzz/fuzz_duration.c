/* fuzz_duration — durations, duration lists and rates (common/duration.h).
 * Input: the text (up to its first NUL). Checked: a duration that parses is
 * non-negative and survives jf_duration_format and a second parse; a
 * one-item list agrees with the single parser; outputs are written only on
 * success and never past the caller's array; errors are one line. */
#include "fuzz.h"

#include "duration.h"

#define SENTINEL INT64_C(-77777)
#define LIST_MAX 16 /* as many as a backoff list holds (config.h) */

static void check_duration(const char *s)
{
    int64_t ms = SENTINEL;
    jf_error err;
    if (jf_duration_parse(&ms, s, &err) != JF_OK) {
        FUZZ_CHECK(ms == SENTINEL, "output written on error");
        FUZZ_CHECK(fuzz_one_line(err.msg) && strncmp(err.msg, "invalid duration \"", 18) == 0,
                   "error \"%s\"", err.msg);
        return;
    }
    FUZZ_CHECK(ms >= 0, "\"%s\" gave %lld ms", s, (long long)ms);
    char buf[64];
    size_t n = jf_duration_format(buf, sizeof buf, ms);
    FUZZ_CHECK(n == strlen(buf) && n < sizeof buf, "format of %lld: \"%s\" (%zu)", (long long)ms,
               buf, n);
    int64_t back = SENTINEL;
    FUZZ_CHECK(jf_duration_parse(&back, buf, &err) == JF_OK && back == ms,
               "\"%s\" = %lld ms formats as \"%s\", which parses as %lld", s, (long long)ms, buf,
               (long long)back);
}

static void check_list(const char *s, size_t max)
{
    int64_t out[LIST_MAX + 1];
    for (size_t i = 0; i <= LIST_MAX; i++)
        out[i] = SENTINEL;
    size_t n = 12345;
    jf_error err;
    if (jf_duration_list_parse(out, max, &n, s, &err) != JF_OK) {
        FUZZ_CHECK(n == 12345 && out[0] == SENTINEL, "output written on error");
        FUZZ_CHECK(fuzz_one_line(err.msg), "error \"%s\"", err.msg);
        return;
    }
    FUZZ_CHECK(n >= 1 && n <= max, "%zu items with max %zu", n, max);
    for (size_t i = 0; i < n; i++)
        FUZZ_CHECK(out[i] >= 0, "item %zu is %lld", i, (long long)out[i]);
    FUZZ_CHECK(out[max] == SENTINEL, "wrote past max %zu", max);
    if (strchr(s, ',') == NULL) {
        /* One item: the single parser must agree once blanks are trimmed. */
        const char *a = s, *b = s + strlen(s);
        while (*a == ' ' || *a == '\t')
            a++;
        while (b > a && (b[-1] == ' ' || b[-1] == '\t'))
            b--;
        char *one = fuzz_cstr((const uint8_t *)a, (size_t)(b - a));
        int64_t ms = SENTINEL;
        FUZZ_CHECK(one == NULL || (jf_duration_parse(&ms, one, &err) == JF_OK && ms == out[0]),
                   "list \"%s\" = %lld, single parse says %lld", s, (long long)out[0],
                   (long long)ms);
        free(one);
    }
}

static void check_rate(const char *s)
{
    jf_rate r = {SENTINEL, SENTINEL};
    jf_error err;
    if (jf_rate_parse(&r, s, &err) != JF_OK) {
        FUZZ_CHECK(r.count == SENTINEL && r.period_ms == SENTINEL, "output written on error");
        FUZZ_CHECK(fuzz_one_line(err.msg) && strncmp(err.msg, "invalid rate \"", 14) == 0,
                   "error \"%s\"", err.msg);
        return;
    }
    FUZZ_CHECK(r.count >= 0 && r.count <= 1000000000, "count %lld", (long long)r.count);
    FUZZ_CHECK((r.count == 0 && r.period_ms == 0) ||
                   (r.count > 0 &&
                    (r.period_ms == 1000 || r.period_ms == 60000 || r.period_ms == 3600000)),
               "\"%s\" gave %lld per %lld ms", s, (long long)r.count, (long long)r.period_ms);
}

/* The formatter on any int64 (first 8 bytes) and any capacity (byte 8). */
static void check_format(const uint8_t *data, size_t size)
{
    if (size < 9)
        return;
    uint64_t u = 0;
    for (int i = 0; i < 8; i++)
        u = u << 8 | data[i];
    const int64_t ms = (int64_t)u;
    const size_t cap = data[8] % 72;
    char *buf = malloc(cap > 0 ? cap : 1);
    if (buf == NULL)
        return;
    char full[96];
    const size_t n = jf_duration_format(full, sizeof full, ms);
    FUZZ_CHECK(n == strlen(full), "length %zu of \"%s\"", n, full);
    FUZZ_CHECK(jf_duration_format(buf, cap, ms) == n, "length depends on the buffer");
    if (cap > 0)
        FUZZ_CHECK(strlen(buf) == (n < cap ? n : cap - 1) && strncmp(buf, full, strlen(buf)) == 0,
                   "\"%s\" cut to %zu is \"%s\"", full, cap, buf);
    free(buf);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *s = fuzz_cstr(data, size);
    if (s == NULL)
        return 0;
    check_duration(s);
    check_list(s, 1 + size % LIST_MAX);
    check_rate(s);
    check_format(data, size);
    free(s);
    return 0;
}
