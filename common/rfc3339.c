#include "rfc3339.h"

#include <stdbool.h>
#include <time.h>

/* Civil-date arithmetic is done here rather than through timegm(3)/gmtime_r(3):
 * timegm is not in POSIX, both depend on the width of time_t, and neither
 * reports day-of-month errors (timegm silently turns Feb 30 into Mar 2). The
 * algorithms are H. Hinnant's days_from_civil / civil_from_days, exact for
 * every proleptic Gregorian date. */

#define MS_PER_DAY INT64_C(86400000)

static bool is_leap(int64_t y)
{
    return (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
}

int jf_days_in_month(int64_t y, int m)
{
    static const int dim[12] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    return m == 2 && is_leap(y) ? 29 : dim[m - 1];
}

/* Days since 1970-01-01 of y-m-d (m 1..12, d 1..31). */
int64_t jf_days_from_civil(int64_t y, int m, int d)
{
    y -= m <= 2;
    const int64_t era = (y >= 0 ? y : y - 399) / 400;
    const int64_t yoe = y - era * 400;                                   /* [0, 399] */
    const int64_t doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1; /* [0, 365] */
    const int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;           /* [0, 146096] */
    return era * 146097 + doe - 719468;
}

static void civil_from_days(int64_t z, int64_t *y, int *m, int *d)
{
    z += 719468;
    const int64_t era = (z >= 0 ? z : z - 146096) / 146097;
    const int64_t doe = z - era * 146097;
    const int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    const int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    const int64_t mp = (5 * doy + 2) / 153;
    *d = (int)(doy - (153 * mp + 2) / 5 + 1);
    *m = (int)(mp < 10 ? mp + 3 : mp - 9);
    *y = yoe + era * 400 + (*m <= 2);
}

/* Reads exactly n ASCII digits at s; -1 when any of them is not a digit. */
static int digits(const char *s, int n)
{
    int v = 0;
    for (int i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        v = v * 10 + (s[i] - '0');
    }
    return v;
}

jf_status jf_rfc3339_parse(int64_t *out_ms, const char *s, size_t len)
{
    /* Layout (RFC 3339 §5.6): YYYY-MM-DDTHH:MM:SS[.f+](Z|+HH:MM|-HH:MM).
     * Every fixed-width field is read only after checking len covers it, so
     * s need not be NUL-terminated and an embedded NUL fails as a non-digit. */
    if (s == NULL || len < 20)
        return JF_ERR_INVALID;
    if (s[4] != '-' || s[7] != '-' || (s[10] != 'T' && s[10] != 't') || s[13] != ':' ||
        s[16] != ':')
        return JF_ERR_INVALID;
    const int year = digits(s, 4), mon = digits(s + 5, 2), day = digits(s + 8, 2);
    const int hour = digits(s + 11, 2), min = digits(s + 14, 2), sec = digits(s + 17, 2);
    if (year < 0 || mon < 1 || mon > 12 || day < 1 || day > jf_days_in_month(year, mon))
        return JF_ERR_INVALID;
    /* Second 60 is the leap second RFC 3339 allows; like POSIX time it maps
     * onto the first second of the next minute. Which minutes may really
     * carry one depends on the offset and the IERS bulletins, so it is not
     * checked further. */
    if (hour < 0 || hour > 23 || min < 0 || min > 59 || sec < 0 || sec > 60)
        return JF_ERR_INVALID;

    size_t i = 19;
    int frac_ms = 0;
    if (i < len && s[i] == '.') {
        size_t start = ++i;
        int scale = 100;
        while (i < len && s[i] >= '0' && s[i] <= '9') {
            /* Digits past milliseconds are accepted and truncated. */
            frac_ms += (s[i] - '0') * scale;
            scale /= 10;
            i++;
        }
        if (i == start)
            return JF_ERR_INVALID;
    }

    int offset_min;
    if (i < len && (s[i] == 'Z' || s[i] == 'z')) {
        offset_min = 0;
        i++;
    } else if (i < len && (s[i] == '+' || s[i] == '-')) {
        if (len - i < 6 || s[i + 3] != ':')
            return JF_ERR_INVALID;
        const int oh = digits(s + i + 1, 2), om = digits(s + i + 4, 2);
        if (oh < 0 || oh > 23 || om < 0 || om > 59)
            return JF_ERR_INVALID;
        offset_min = (oh * 60 + om) * (s[i] == '-' ? -1 : 1);
        i += 6;
    } else {
        return JF_ERR_INVALID; /* no offset: a local time names no instant */
    }
    if (i != len)
        return JF_ERR_INVALID;

    const int64_t secs = jf_days_from_civil(year, mon, day) * 86400 + hour * 3600 + min * 60 + sec -
                         (int64_t)offset_min * 60;
    *out_ms = secs * 1000 + frac_ms;
    return JF_OK;
}

static void put_digits(char *p, int64_t v, int width)
{
    for (int i = width - 1; i >= 0; i--) {
        p[i] = (char)('0' + v % 10);
        v /= 10;
    }
}

size_t jf_rfc3339_format(char *buf, size_t cap, int64_t ms)
{
    /* Floor division, so instants before 1970 land on the right day. */
    int64_t days = ms / MS_PER_DAY, rem = ms % MS_PER_DAY;
    if (rem < 0) {
        rem += MS_PER_DAY;
        days--;
    }
    int64_t year;
    int mon, day;
    civil_from_days(days, &year, &mon, &day);
    /* Four-digit years only: that is all RFC 3339 can write. Failure leaves
     * an empty string behind for callers that print buf regardless. */
    if (cap < 25 || year < 0 || year > 9999) {
        if (cap > 0)
            buf[0] = '\0';
        return 0;
    }
    const int64_t secs = rem / 1000;
    put_digits(buf, year, 4);
    buf[4] = '-';
    put_digits(buf + 5, mon, 2);
    buf[7] = '-';
    put_digits(buf + 8, day, 2);
    buf[10] = 'T';
    put_digits(buf + 11, secs / 3600, 2);
    buf[13] = ':';
    put_digits(buf + 14, secs / 60 % 60, 2);
    buf[16] = ':';
    put_digits(buf + 17, secs % 60, 2);
    buf[19] = '.';
    put_digits(buf + 20, rem % 1000, 3);
    buf[23] = 'Z';
    buf[24] = '\0';
    return 24;
}

int64_t jf_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}
