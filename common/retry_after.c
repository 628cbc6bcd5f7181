/* retry_after.c — Retry-After values (RFC 9110 10.2.3 and 5.6.7).
 *
 * The header is either delta-seconds or an HTTP-date in one of three forms:
 *   IMF-fixdate  "Sun, 06 Nov 1994 08:49:37 GMT"
 *   RFC 850      "Sunday, 06-Nov-94 08:49:37 GMT"
 *   asctime      "Sun Nov  6 08:49:37 1994"
 * The parsers are strict (HTTP-date is case-sensitive, every field has a
 * fixed width, the day name must be the date's weekday): a value we cannot
 * read with certainty is refused, and the caller falls back to its own
 * backoff, which is always safe. timegm(3) is not used: it is not POSIX, it
 * depends on the width of time_t and it quietly turns Feb 30 into Mar 2. */
#include "retry_after.h"
#include "rfc3339.h"

#include <stdbool.h>
#include <string.h>

#define VALUE_MAX  128
#define MS_PER_DAY INT64_C(86400000)

static const char *const wkday[7] = {"Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"};
static const char *const weekday[7] = {"Monday", "Tuesday",  "Wednesday", "Thursday",
                                       "Friday", "Saturday", "Sunday"};
static const char *const month[12] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                      "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};


/* The year of a day count since 1970-01-01 (the inverse, year only). */
static int64_t year_from_days(int64_t z)
{
    z += 719468;
    const int64_t era = (z >= 0 ? z : z - 146096) / 146097;
    const int64_t doe = z - era * 146097;
    const int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    const int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    const int64_t mp = (5 * doy + 2) / 153;
    return yoe + era * 400 + (mp >= 10);
}

/* 0 = Monday … 6 = Sunday. 1970-01-01 was a Thursday. */
static int weekday_of(int64_t days)
{
    int64_t w = (days + 3) % 7;
    return (int)(w < 0 ? w + 7 : w);
}

static int64_t floor_div(int64_t a, int64_t b)
{
    int64_t q = a / b;
    return (a % b != 0 && (a < 0) != (b < 0)) ? q - 1 : q;
}

/* A cursor over the value; every read checks the remaining length. */
typedef struct cur {
    const char *p;
    size_t n;
} cur;

static bool lit(cur *c, const char *s)
{
    size_t k = strlen(s);
    if (c->n < k || memcmp(c->p, s, k) != 0)
        return false;
    c->p += k;
    c->n -= k;
    return true;
}

/* Exactly n digits. */
static bool num(cur *c, size_t n, int *out)
{
    if (c->n < n)
        return false;
    int v = 0;
    for (size_t i = 0; i < n; i++) {
        if (c->p[i] < '0' || c->p[i] > '9')
            return false;
        v = v * 10 + (c->p[i] - '0');
    }
    c->p += n;
    c->n -= n;
    *out = v;
    return true;
}

/* One of names (count of them), matched exactly; its index or -1. */
static int name(cur *c, const char *const *names, int count)
{
    for (int i = 0; i < count; i++)
        if (lit(c, names[i]))
            return i;
    return -1;
}

/* "hh:mm:ss"; 60 seconds is a leap second, which RFC 9110 allows. */
static bool time_of_day(cur *c, int64_t *out_s)
{
    int h, m, s;
    if (!num(c, 2, &h) || !lit(c, ":") || !num(c, 2, &m) || !lit(c, ":") || !num(c, 2, &s))
        return false;
    if (h > 23 || m > 59 || s > 60)
        return false;
    *out_s = (int64_t)h * 3600 + m * 60 + s;
    return true;
}

/* Checks the calendar and the weekday, then converts. */
static bool civil_ms(int64_t y, int mon, int d, int wday, int64_t tod_s, int64_t *out_ms)
{
    if (d < 1 || d > jf_days_in_month(y, mon))
        return false;
    int64_t days = jf_days_from_civil(y, mon, d);
    if (weekday_of(days) != wday)
        return false;
    *out_ms = days * MS_PER_DAY + tod_s * 1000;
    return true;
}

/* "Sun, 06 Nov 1994 08:49:37 GMT" */
static bool imf_fixdate(cur c, int64_t *out_ms)
{
    int wd, d, mon, y;
    int64_t tod;
    if ((wd = name(&c, wkday, 7)) < 0 || !lit(&c, ", ") || !num(&c, 2, &d) || !lit(&c, " ") ||
        (mon = name(&c, month, 12)) < 0 || !lit(&c, " ") || !num(&c, 4, &y) || !lit(&c, " ") ||
        !time_of_day(&c, &tod) || !lit(&c, " GMT") || c.n != 0)
        return false;
    return civil_ms(y, mon + 1, d, wd, tod, out_ms);
}

/* "Sunday, 06-Nov-94 08:49:37 GMT". A two-digit year that would lie more
 * than 50 years after now is the most recent past year with those digits
 * (RFC 9110 5.6.7). */
static bool rfc850_date(cur c, int64_t now_ms, int64_t *out_ms)
{
    int wd, d, mon, yy;
    int64_t tod;
    if ((wd = name(&c, weekday, 7)) < 0 || !lit(&c, ", ") || !num(&c, 2, &d) || !lit(&c, "-") ||
        (mon = name(&c, month, 12)) < 0 || !lit(&c, "-") || !num(&c, 2, &yy) || !lit(&c, " ") ||
        !time_of_day(&c, &tod) || !lit(&c, " GMT") || c.n != 0)
        return false;
    int64_t now_year = year_from_days(floor_div(now_ms, MS_PER_DAY));
    int64_t y = now_year - (now_year % 100 + 100) % 100 + yy;
    if (y > now_year + 50)
        y -= 100;
    return civil_ms(y, mon + 1, d, wd, tod, out_ms);
}

/* "Sun Nov  6 08:49:37 1994" (the day is "SP DIGIT" or two digits). */
static bool asctime_date(cur c, int64_t *out_ms)
{
    int wd, d, mon, y;
    int64_t tod;
    if ((wd = name(&c, wkday, 7)) < 0 || !lit(&c, " ") || (mon = name(&c, month, 12)) < 0 ||
        !lit(&c, " "))
        return false;
    if (c.n > 0 && c.p[0] == ' ') {
        c.p++;
        c.n--;
        if (!num(&c, 1, &d))
            return false;
    } else if (!num(&c, 2, &d)) {
        return false;
    }
    if (!lit(&c, " ") || !time_of_day(&c, &tod) || !lit(&c, " ") || !num(&c, 4, &y) || c.n != 0)
        return false;
    return civil_ms(y, mon + 1, d, wd, tod, out_ms);
}

static bool is_ows(char ch)
{
    return ch == ' ' || ch == '\t';
}

jf_status jf_retry_after_parse(int64_t *out_ms, const char *value, size_t len, int64_t now_ms,
                               int64_t max_ms)
{
    if (value == NULL || len > VALUE_MAX)
        return JF_ERR_INVALID;
    if (max_ms < 0)
        max_ms = 0;
    while (len > 0 && is_ows(value[0])) {
        value++;
        len--;
    }
    while (len > 0 && is_ows(value[len - 1]))
        len--;
    if (len == 0)
        return JF_ERR_INVALID;

    int64_t delay;
    if (value[0] >= '0' && value[0] <= '9') {
        /* delta-seconds: digits only. Past max_ms there is nothing left to
         * learn, so stop accumulating there instead of overflowing. */
        const int64_t cap_s = max_ms / 1000 + 1;
        int64_t s = 0;
        for (size_t i = 0; i < len; i++) {
            if (value[i] < '0' || value[i] > '9')
                return JF_ERR_INVALID;
            if (s <= cap_s)
                s = s * 10 + (value[i] - '0');
        }
        delay = s >= cap_s ? max_ms : s * 1000;
    } else {
        cur c = {value, len};
        int64_t at;
        if (!imf_fixdate(c, &at) && !rfc850_date(c, now_ms, &at) && !asctime_date(c, &at))
            return JF_ERR_INVALID;
        delay = at > now_ms ? at - now_ms : 0;
    }
    *out_ms = delay > max_ms ? max_ms : delay;
    return JF_OK;
}
