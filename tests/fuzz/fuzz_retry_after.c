/* fuzz_retry_after — the Retry-After parser (common/retry_after.h).
 *
 * Input: byte 0 picks max_ms from a table (low 3 bits), bytes 1-6 give
 * now_ms (big-endian, reduced to 1970..9999), the rest is the header value,
 * passed with its exact length (not NUL-terminated). Checked: the result is
 * within [0, max_ms]; values over 128 bytes are refused; delta-seconds
 * agree with a plain model; for the two date forms that do not depend on
 * now (IMF-fixdate, asctime) the delay shrinks as now grows, by as much. */
#include "fuzz.h"

#include "retry_after.h"

#define HEADER     7
#define NOW_RANGE  INT64_C(253402300800000) /* 10000-01-01T00:00:00Z in ms */
#define VALUE_MAX  128
#define SENTINEL   INT64_C(-424242)

static const int64_t max_table[8] = {INT64_MAX, 600000, 0, -5, 999, 86400000, 1000, INT64_MIN};

static jf_status parse(int64_t *out, const char *v, size_t n, int64_t now, int64_t max)
{
    *out = SENTINEL;
    jf_status st = jf_retry_after_parse(out, v, n, now, max);
    if (st != JF_OK)
        FUZZ_CHECK(*out == SENTINEL, "output written on error");
    return st;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < HEADER)
        return 0;
    const int64_t max = max_table[data[0] & 7];
    uint64_t u = 0;
    for (int i = 1; i < HEADER; i++)
        u = u << 8 | data[i];
    const int64_t now = (int64_t)(u % (uint64_t)NOW_RANGE);
    /* The value is the end of the input: a read past it is one past the
     * fuzzer's own buffer, which ASan reports. */
    const char *v = (const char *)data + HEADER;
    const size_t n = size - HEADER;
    const int64_t cap = max > 0 ? max : 0;

    int64_t ms;
    const jf_status st = parse(&ms, v, n, now, max);
    FUZZ_CHECK(st == JF_OK || st == JF_ERR_INVALID, "status %d", (int)st);
    if (n > VALUE_MAX)
        FUZZ_CHECK(st == JF_ERR_INVALID, "accepted a %zu-byte value", n);
    if (st == JF_OK)
        FUZZ_CHECK(ms >= 0 && ms <= cap, "%lld ms outside [0, %lld]", (long long)ms,
                   (long long)cap);
    if (n > VALUE_MAX)
        return 0;

    /* The model of delta-seconds: optional blanks, then digits only. */
    size_t a = 0, b = n;
    while (a < b && (v[a] == ' ' || v[a] == '\t'))
        a++;
    while (b > a && (v[b - 1] == ' ' || v[b - 1] == '\t'))
        b--;
    if (a < b && v[a] >= '0' && v[a] <= '9') {
        bool digits = true;
        int64_t secs = 0; /* saturates at INT64_MAX / 10 */
        for (size_t i = a; i < b; i++) {
            if (v[i] < '0' || v[i] > '9') {
                digits = false;
                break;
            }
            if (secs < INT64_MAX / 10)
                secs = secs * 10 + (v[i] - '0');
        }
        if (!digits) {
            FUZZ_CHECK(st == JF_ERR_INVALID, "accepted \"%.*s\"", (int)n, v);
            return 0;
        }
        const int64_t want = secs > cap / 1000 ? cap : secs * 1000;
        FUZZ_CHECK(st == JF_OK && ms == want, "\"%.*s\" with max %lld gave %lld, want %lld",
                   (int)n, v, (long long)max, (long long)ms, (long long)want);
        return 0;
    }

    /* A date read without reference to now: one second later, the delay
     * is the same or up to a second shorter (clamping only ever helps). */
    if (st == JF_OK && memchr(v, '-', n) == NULL && now + 1000 < NOW_RANGE) {
        int64_t later;
        FUZZ_CHECK(parse(&later, v, n, now + 1000, max) == JF_OK,
                   "\"%.*s\" refused one second later", (int)n, v);
        FUZZ_CHECK(later <= ms && ms - later <= 1000, "\"%.*s\": %lld ms, a second later %lld ms",
                   (int)n, v, (long long)ms, (long long)later);
    }
    return 0;
}
