/* Unit tests for common/retry_after.c: Retry-After as delta-seconds and as
 * the three HTTP-date forms, clamping, and everything that must be refused
 * (the caller then falls back to its own backoff). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "retry_after.h"

/* Wed, 21 Oct 2015 07:28:00 GMT */
#define NOW INT64_C(1445412480000)
#define MAX INT64_C(600000) /* 10 minutes */
#define BIG INT64_MAX

static int64_t ok_at(const char *v, int64_t now, int64_t max)
{
    int64_t ms = -12345;
    if (jf_retry_after_parse(&ms, v, strlen(v), now, max) != JF_OK)
        fail_msg("refused valid Retry-After \"%s\"", v);
    return ms;
}

static int64_t ok(const char *v)
{
    return ok_at(v, NOW, BIG);
}

static void bad(const char *v)
{
    int64_t ms = -12345;
    if (jf_retry_after_parse(&ms, v, strlen(v), NOW, BIG) != JF_ERR_INVALID)
        fail_msg("accepted invalid Retry-After \"%s\"", v);
    assert_int_equal(ms, -12345); /* output untouched on error */
}

static void test_delta_seconds(void **state)
{
    (void)state;
    assert_int_equal(ok("0"), 0);
    assert_int_equal(ok("1"), 1000);
    assert_int_equal(ok("120"), 120000);
    assert_int_equal(ok("0002"), 2000);
    /* Optional whitespace around the value (RFC 9110 OWS). */
    assert_int_equal(ok(" 5 "), 5000);
    assert_int_equal(ok("\t7\t"), 7000);
    assert_int_equal(ok("   42"), 42000);
}

static void test_delta_seconds_clamped(void **state)
{
    (void)state;
    assert_int_equal(ok_at("600", NOW, MAX), MAX);
    assert_int_equal(ok_at("599", NOW, MAX), 599000);
    assert_int_equal(ok_at("601", NOW, MAX), MAX);
    assert_int_equal(ok_at("86400", NOW, MAX), MAX);
    /* Huge values clamp instead of overflowing. */
    assert_int_equal(ok_at("999999999999999999999", NOW, MAX), MAX);
    assert_int_equal(ok_at("18446744073709551616", NOW, MAX), MAX);
    assert_int_equal(ok("999999999999999999999999999999999999999999"), INT64_MAX);
    assert_int_equal(ok("9223372036854775807"), INT64_MAX);
    assert_int_equal(ok("9223372036854776"), INT64_MAX); /* *1000 would overflow */
    assert_int_equal(ok("9223372036854775"), INT64_C(9223372036854775000));
    /* A zero (or negative) maximum turns every value into 0. */
    assert_int_equal(ok_at("30", NOW, 0), 0);
    assert_int_equal(ok_at("30", NOW, -5), 0);
    assert_int_equal(ok_at("Wed, 21 Oct 2015 07:29:00 GMT", NOW, 0), 0);
}

static void test_delta_seconds_refused(void **state)
{
    (void)state;
    bad("");
    bad(" ");
    bad("\t \t");
    bad("-1");
    bad("-0");
    bad("+5");
    bad("1e3");
    bad("1.5");
    bad("0x10");
    bad("5s");
    bad("5 5");
    bad("120abc");
    bad("12,3");
    bad("５"); /* a full-width digit */
    bad("\r\n5");
    bad("5\r\n");
}

static void test_imf_fixdate(void **state)
{
    (void)state;
    assert_int_equal(ok("Wed, 21 Oct 2015 07:28:00 GMT"), 0);     /* now */
    assert_int_equal(ok("Wed, 21 Oct 2015 07:29:30 GMT"), 90000); /* 90 s ahead */
    assert_int_equal(ok("Wed, 21 Oct 2015 07:28:01 GMT"), 1000);
    assert_int_equal(ok("Wed, 21 Oct 2015 07:27:59 GMT"), 0); /* past */
    assert_int_equal(ok("Sun, 06 Nov 1994 08:49:37 GMT"), 0); /* RFC 9110's example */
    assert_int_equal(ok("Sun, 01 Nov 2015 07:28:00 GMT"), 950400000);
    assert_int_equal(ok("Mon, 29 Feb 2016 00:00:00 GMT"), INT64_C(11291520000));
    assert_int_equal(ok(" Wed, 21 Oct 2015 07:29:00 GMT "), 60000);
    assert_int_equal(ok_at("Wed, 21 Oct 2015 07:29:00 GMT", NOW - 1000, BIG), 61000);
    assert_int_equal(ok_at("Thu, 22 Oct 2015 07:28:00 GMT", NOW, MAX), MAX);
    /* A leap second. */
    assert_int_equal(ok("Wed, 21 Oct 2015 07:28:60 GMT"), 60000);
}

static void test_imf_fixdate_refused(void **state)
{
    (void)state;
    bad("Wex, 21 Oct 2015 07:28:00 GMT"); /* no such day */
    bad("Thu, 21 Oct 2015 07:28:00 GMT"); /* not that date's weekday */
    bad("wed, 21 Oct 2015 07:28:00 GMT"); /* HTTP-date is case-sensitive */
    bad("WED, 21 Oct 2015 07:28:00 GMT");
    bad("Wednesday, 21 Oct 2015 07:28:00 GMT"); /* long name in the short form */
    bad("Wed, 21 Okt 2015 07:28:00 GMT");       /* no such month */
    bad("Wed, 21 oct 2015 07:28:00 GMT");
    bad("Mon, 30 Feb 2015 00:00:00 GMT"); /* Feb 30 */
    bad("Tue, 30 Feb 2016 00:00:00 GMT");
    bad("Sun, 29 Feb 2015 00:00:00 GMT"); /* 2015 is not a leap year */
    bad("Sat, 31 Apr 2015 00:00:00 GMT");
    bad("Wed, 00 Oct 2015 07:28:00 GMT");
    bad("Wed, 32 Oct 2015 07:28:00 GMT");
    bad("Wed, 21 Oct 2015 24:00:00 GMT");
    bad("Wed, 21 Oct 2015 07:60:00 GMT");
    bad("Wed, 21 Oct 2015 07:28:61 GMT");
    bad("Wed, 21 Oct 2015 7:28:00 GMT");
    bad("Wed, 1 Oct 2015 07:28:00 GMT"); /* day has two digits */
    bad("Wed, 21 Oct 15 07:28:00 GMT");
    bad("Wed, 21 Oct 2015 07:28:00 UTC");
    bad("Wed, 21 Oct 2015 07:28:00 gmt");
    bad("Wed, 21 Oct 2015 07:28:00");
    bad("Wed, 21 Oct 2015 07:28:00 GMTx"); /* trailing junk */
    bad("Wed, 21 Oct 2015 07:28:00 GMT foo");
    bad("Wed,21 Oct 2015 07:28:00 GMT");
    bad("Wed, 21  Oct 2015 07:28:00 GMT");
    bad("Wed, 21 Oct 2015 07:28:00  GMT");
    bad("Wed, 21 Oct 2015T07:28:00 GMT");
    bad("2015-10-21T07:28:00Z"); /* RFC 3339 is not an HTTP-date */
    bad("Wed, 21 Oct 2015 07:28:00 +0000");
    bad("Wed");
    bad("Wed,");
}

static void test_rfc850(void **state)
{
    (void)state;
    assert_int_equal(ok("Wednesday, 21-Oct-15 07:29:30 GMT"), 90000);
    assert_int_equal(ok("Sunday, 06-Nov-94 08:49:37 GMT"), 0);
    /* Two-digit years: up to 50 years ahead of now (2015) is the future,
     * beyond that the most recent past year with those digits. */
    assert_int_equal(ok("Thursday, 01-Jan-60 00:00:00 GMT"), INT64_C(1394728320000)); /* 2060 */
    assert_int_equal(ok("Thursday, 31-Dec-65 00:00:00 GMT") > 0, 1);                  /* 2065 */
    assert_int_equal(ok("Saturday, 01-Jan-66 00:00:00 GMT"), 0);                      /* 1966 */
    assert_int_equal(ok("Thursday, 01-Jan-70 00:00:00 GMT"), 0);                      /* 1970 */
    assert_int_equal(ok("Friday, 31-Dec-99 00:00:00 GMT"), 0);                        /* 1999 */
    assert_int_equal(ok_at("Wednesday, 21-Oct-15 07:29:30 GMT", NOW, MAX), 90000);
}

static void test_rfc850_refused(void **state)
{
    (void)state;
    bad("Wednesday, 01-Jan-70 00:00:00 GMT"); /* 2070's weekday: 70 is 1970 here */
    bad("Friday, 01-Jan-66 00:00:00 GMT");    /* 2066's weekday: 66 is 1966 here */
    bad("Wed, 21-Oct-15 07:28:00 GMT");       /* short day name in the long form */
    bad("Wednesday, 21-Oct-2015 07:28:00 GMT");
    bad("Wednesday, 21-Oct-5 07:28:00 GMT");
    bad("Wednesday, 21 Oct 15 07:28:00 GMT");
    bad("Wednesday, 21-Okt-15 07:28:00 GMT");
    bad("Wensday, 21-Oct-15 07:28:00 GMT");
    bad("wednesday, 21-Oct-15 07:28:00 GMT");
    bad("Thursday, 21-Oct-15 07:28:00 GMT");
    bad("Monday, 30-Feb-15 00:00:00 GMT");
    bad("Wednesday, 21-Oct-15 07:28:00 GMT junk");
    bad("Wednesday, 21-Oct-15 07:28:00");
}

static void test_asctime(void **state)
{
    (void)state;
    assert_int_equal(ok("Wed Oct 21 07:29:30 2015"), 90000);
    assert_int_equal(ok("Sun Nov  6 08:49:37 1994"), 0);
    assert_int_equal(ok("Sun Nov 06 08:49:37 1994"), 0); /* 2DIGIT is allowed too */
    assert_int_equal(ok("Sun Nov  1 07:28:00 2015"), 950400000);
}

static void test_asctime_refused(void **state)
{
    (void)state;
    bad("Sun Nov 6 08:49:37 1994"); /* one space before a one-digit day */
    bad("Sun Nov   6 08:49:37 1994");
    bad("Sun Nov  6 08:49:37 94");
    bad("Sun Nov  6 08:49:37 1994 GMT");
    bad("Mon Nov  6 08:49:37 1994"); /* wrong weekday */
    bad("Sun Nox  6 08:49:37 1994");
    bad("Sun, Nov  6 08:49:37 1994");
    bad("Mon Feb 30 00:00:00 2015");
    bad("Wed Oct 21 07:28:00 2015x");
}

static void test_bounds(void **state)
{
    (void)state;
    int64_t ms = -1;
    /* len bounds the value: it need not be NUL-terminated. */
    assert_int_equal(jf_retry_after_parse(&ms, "120xyz", 3, NOW, BIG), JF_OK);
    assert_int_equal(ms, 120000);
    const char *date = "Wed, 21 Oct 2015 07:29:30 GMT and more";
    assert_int_equal(jf_retry_after_parse(&ms, date, 29, NOW, BIG), JF_OK);
    assert_int_equal(ms, 90000);
    /* An embedded NUL is not part of any form. */
    ms = -1;
    assert_int_equal(jf_retry_after_parse(&ms, "12\0", 3, NOW, BIG), JF_ERR_INVALID);
    assert_int_equal(jf_retry_after_parse(&ms, NULL, 0, NOW, BIG), JF_ERR_INVALID);
    assert_int_equal(jf_retry_after_parse(&ms, "5", 0, NOW, BIG), JF_ERR_INVALID);
    assert_int_equal(ms, -1);

    /* At most 128 bytes are looked at: a longer value is refused, even one
     * that would be valid after trimming. */
    char buf[300];
    memset(buf, ' ', sizeof buf);
    buf[0] = '5';
    assert_int_equal(jf_retry_after_parse(&ms, buf, 128, NOW, BIG), JF_OK);
    assert_int_equal(ms, 5000);
    ms = -1;
    assert_int_equal(jf_retry_after_parse(&ms, buf, 129, NOW, BIG), JF_ERR_INVALID);
    assert_int_equal(jf_retry_after_parse(&ms, buf, sizeof buf, NOW, BIG), JF_ERR_INVALID);
    assert_int_equal(ms, -1);
}

static void test_far_dates(void **state)
{
    (void)state;
    assert_int_equal(ok_at("Fri, 31 Dec 9999 23:59:59 GMT", NOW, MAX), MAX);
    assert_int_equal(ok("Fri, 31 Dec 9999 23:59:59 GMT"), INT64_C(253402300799000) - NOW);
    assert_int_equal(ok("Sat, 01 Jan 0000 00:00:00 GMT"), 0);
    assert_int_equal(ok("Thu, 01 Jan 1970 00:00:00 GMT"), 0);
    /* A clock before 1970 still works. */
    assert_int_equal(ok_at("Thu, 01 Jan 1970 00:00:01 GMT", -1000, BIG), 2000);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_delta_seconds),
        cmocka_unit_test(test_delta_seconds_clamped),
        cmocka_unit_test(test_delta_seconds_refused),
        cmocka_unit_test(test_imf_fixdate),
        cmocka_unit_test(test_imf_fixdate_refused),
        cmocka_unit_test(test_rfc850),
        cmocka_unit_test(test_rfc850_refused),
        cmocka_unit_test(test_asctime),
        cmocka_unit_test(test_asctime_refused),
        cmocka_unit_test(test_bounds),
        cmocka_unit_test(test_far_dates),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
