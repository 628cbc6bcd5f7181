/* Unit tests for common/rfc3339.c: strict RFC 3339 parsing (offset
 * mandatory), formatting, and the wall clock. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "rfc3339.h"

static int64_t parse_ok(const char *s)
{
    int64_t ms = 0;
    if (jf_rfc3339_parse(&ms, s, strlen(s)) != JF_OK)
        fail_msg("rejected valid date-time \"%s\"", s);
    return ms;
}

static void parse_bad(const char *s)
{
    int64_t ms = 12345;
    if (jf_rfc3339_parse(&ms, s, strlen(s)) != JF_ERR_INVALID)
        fail_msg("accepted invalid date-time \"%s\"", s);
    assert_int_equal(ms, 12345); /* output untouched on error */
}

static void test_parse_known_instants(void **state)
{
    (void)state;
    assert_int_equal(parse_ok("1970-01-01T00:00:00Z"), 0);
    assert_int_equal(parse_ok("2026-11-22T10:00:00Z"), INT64_C(1795341600000));
    assert_int_equal(parse_ok("2000-02-29T00:00:00Z"), INT64_C(951782400000));
    assert_int_equal(parse_ok("2024-02-29T23:59:59Z"), INT64_C(1709251199000));
    assert_int_equal(parse_ok("1900-03-01T00:00:00Z"), INT64_C(-2203891200000));
    assert_int_equal(parse_ok("1969-12-31T23:59:59.999Z"), -1);
    assert_int_equal(parse_ok("0001-01-01T00:00:00Z"), INT64_C(-62135596800000));
    assert_int_equal(parse_ok("0000-01-01T00:00:00Z"), INT64_C(-62167219200000));
    assert_int_equal(parse_ok("9999-12-31T23:59:59.999Z"), INT64_C(253402300799999));
}

static void test_parse_fraction(void **state)
{
    (void)state;
    const int64_t base = INT64_C(1795341600000);
    assert_int_equal(parse_ok("2026-11-22T10:00:00.1Z"), base + 100);
    assert_int_equal(parse_ok("2026-11-22T10:00:00.12Z"), base + 120);
    assert_int_equal(parse_ok("2026-11-22T10:00:00.123Z"), base + 123);
    /* Beyond milliseconds: truncated, never rounded up into the next ms. */
    assert_int_equal(parse_ok("2026-11-22T10:00:00.123999999Z"), base + 123);
    assert_int_equal(parse_ok("2026-11-22T10:00:00.000000000001Z"), base);
}

static void test_parse_offsets(void **state)
{
    (void)state;
    const int64_t base = INT64_C(1795341600000); /* 2026-11-22T10:00:00Z */
    assert_int_equal(parse_ok("2026-11-22T12:00:00+02:00"), base);
    assert_int_equal(parse_ok("2026-11-22T04:30:00-05:30"), base);
    assert_int_equal(parse_ok("2026-11-22T10:00:00+00:00"), base);
    assert_int_equal(parse_ok("2026-11-22T10:00:00-00:00"), base);
    assert_int_equal(parse_ok("2026-11-23T09:59:00+23:59"), base);
    /* An offset can carry the instant across a day and a year boundary. */
    assert_int_equal(parse_ok("1969-12-31T19:00:00-05:00"), 0);
    assert_int_equal(parse_ok("2026-11-22T10:00:00.500+02:00"), base - 2 * 3600000 + 500);
}

static void test_parse_lower_case_and_leap_second(void **state)
{
    (void)state;
    assert_int_equal(parse_ok("2026-11-22t10:00:00z"), INT64_C(1795341600000));
    /* 23:59:60 is the leap second; it maps like POSIX time onto the next second. */
    assert_int_equal(parse_ok("2016-12-31T23:59:60Z"), parse_ok("2017-01-01T00:00:00Z"));
    assert_int_equal(parse_ok("2016-12-31T23:59:60.5Z"), parse_ok("2017-01-01T00:00:00.500Z"));
}

static void test_parse_rejects(void **state)
{
    (void)state;
    static const char *const bad[] = {
        "",
        "2026-11-22",
        "2026-11-22T10:00:00",  /* no offset */
        "2026-11-22T10:00",     /* no seconds */
        "2026-11-22T10:00Z",    /* no seconds */
        "2026-11-22 10:00:00Z", /* space separator */
        "2026-11-22_10:00:00Z",
        "2026-02-30T10:00:00Z",      /* Feb 30 */
        "2026-02-29T10:00:00Z",      /* not a leap year */
        "1900-02-29T10:00:00Z",      /* century, not a leap year */
        "2026-04-31T10:00:00Z",      /* April has 30 days */
        "2026-13-01T10:00:00Z",      /* month 13 */
        "2026-00-10T10:00:00Z",      /* month 0 */
        "2026-11-00T10:00:00Z",      /* day 0 */
        "2026-11-32T10:00:00Z",      /* day 32 */
        "2026-11-22T24:00:00Z",      /* hour 24 */
        "2026-11-22T10:60:00Z",      /* minute 60 */
        "2026-11-22T10:00:61Z",      /* second 61 */
        "2026-11-22T10:00:00+24:00", /* offset hour 24 */
        "2026-11-22T10:00:00+02:60", /* offset minute 60 */
        "2026-11-22T10:00:00+02",    /* offset without minutes */
        "2026-11-22T10:00:00+0200",  /* offset without colon */
        "2026-11-22T10:00:00+2:00",
        "2026-11-22T10:00:00.Z",  /* dot without digits */
        "2026-11-22T10:00:00,5Z", /* comma fraction */
        "2026-11-22T10:00:00ZZ",  /* trailing garbage */
        "2026-11-22T10:00:00Z ",
        " 2026-11-22T10:00:00Z",
        "26-11-22T10:00:00Z",
        "+2026-11-22T10:00:00Z",
        "2026-1-22T10:00:00Z",
        "2026-11-22T1:00:00Z",
        "2026-11-22T10:00:00UTC",
        "2026-11-22T10:00:00 Z",
        "２０２６-11-22T10:00:00Z", /* full-width digits */
        "2026-11-22T10:0a:00Z",
        "2026/11/22T10:00:00Z",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        parse_bad(bad[i]);
}

static void test_parse_respects_len(void **state)
{
    (void)state;
    int64_t ms = 7;
    /* The valid prefix is not enough: len says where the string ends. */
    const char *s = "2026-11-22T10:00:00Zjunk";
    assert_int_equal(jf_rfc3339_parse(&ms, s, 20), JF_OK);
    assert_int_equal(ms, INT64_C(1795341600000));
    ms = 7;
    assert_int_equal(jf_rfc3339_parse(&ms, s, 19), JF_ERR_INVALID);
    assert_int_equal(jf_rfc3339_parse(&ms, s, 24), JF_ERR_INVALID);
    /* An embedded NUL (possible in a JSON string) is not a terminator. */
    static const char nul[] = "2026-11-22T10:00:00Z\0";
    assert_int_equal(jf_rfc3339_parse(&ms, nul, sizeof nul - 1), JF_ERR_INVALID);
    static const char nul_mid[] = "2026-11-22T10:00:0\0Z";
    assert_int_equal(jf_rfc3339_parse(&ms, nul_mid, sizeof nul_mid - 1), JF_ERR_INVALID);
    assert_int_equal(jf_rfc3339_parse(&ms, NULL, 0), JF_ERR_INVALID);
    assert_int_equal(ms, 7);
}

static void test_format(void **state)
{
    (void)state;
    char buf[32];
    assert_int_equal(jf_rfc3339_format(buf, sizeof buf, 0), 24);
    assert_string_equal(buf, "1970-01-01T00:00:00.000Z");
    assert_int_equal(jf_rfc3339_format(buf, sizeof buf, INT64_C(1795341600123)), 24);
    assert_string_equal(buf, "2026-11-22T10:00:00.123Z");
    assert_int_equal(jf_rfc3339_format(buf, sizeof buf, -1), 24);
    assert_string_equal(buf, "1969-12-31T23:59:59.999Z");
    assert_int_equal(jf_rfc3339_format(buf, sizeof buf, INT64_C(951782400000)), 24);
    assert_string_equal(buf, "2000-02-29T00:00:00.000Z");
    assert_int_equal(jf_rfc3339_format(buf, sizeof buf, INT64_C(-62167219200000)), 24);
    assert_string_equal(buf, "0000-01-01T00:00:00.000Z");
    assert_int_equal(jf_rfc3339_format(buf, sizeof buf, INT64_C(253402300799999)), 24);
    assert_string_equal(buf, "9999-12-31T23:59:59.999Z");
}

static void test_format_limits(void **state)
{
    (void)state;
    char buf[32];
    /* Exactly 25 bytes is enough; 24 leaves no room for the NUL. */
    assert_int_equal(jf_rfc3339_format(buf, 25, 0), 24);
    memset(buf, 'x', sizeof buf);
    assert_int_equal(jf_rfc3339_format(buf, 24, 0), 0);
    assert_string_equal(buf, "");
    assert_int_equal(jf_rfc3339_format(buf, 0, 0), 0);
    /* Years RFC 3339 cannot write. */
    assert_int_equal(jf_rfc3339_format(buf, sizeof buf, INT64_C(253402300800000)), 0);
    assert_string_equal(buf, "");
    assert_int_equal(jf_rfc3339_format(buf, sizeof buf, INT64_C(-62167219200001)), 0);
    assert_int_equal(jf_rfc3339_format(buf, sizeof buf, INT64_MAX), 0);
    assert_int_equal(jf_rfc3339_format(buf, sizeof buf, INT64_MIN), 0);
}

static void test_round_trip(void **state)
{
    (void)state;
    /* Steps of a prime number of ms from year 0 to 9999 visit every month,
     * leap day and time of day in many combinations. */
    const int64_t lo = INT64_C(-62167219200000), hi = INT64_C(253402300799999);
    const int64_t step = INT64_C(9999991) * 997; /* ~115 days */
    char buf[32];
    int n = 0;
    for (int64_t ms = lo; ms <= hi; ms += step, n++) {
        assert_int_equal(jf_rfc3339_format(buf, sizeof buf, ms), 24);
        int64_t back = 0;
        assert_int_equal(jf_rfc3339_parse(&back, buf, 24), JF_OK);
        if (back != ms)
            fail_msg("%s parsed back as %lld, want %lld", buf, (long long)back, (long long)ms);
    }
    assert_true(n > 30000);
    /* Every day of a leap year and of a common year, at midnight. */
    for (int64_t d = 0; d < 366 * 2; d++) {
        const int64_t ms = INT64_C(1704067200000) + d * 86400000; /* from 2024-01-01 */
        assert_int_equal(jf_rfc3339_format(buf, sizeof buf, ms), 24);
        int64_t back = 0;
        assert_int_equal(jf_rfc3339_parse(&back, buf, 24), JF_OK);
        assert_int_equal(back, ms);
    }
}

static void test_now(void **state)
{
    (void)state;
    const int64_t before = (int64_t)time(NULL) * 1000;
    const int64_t now = jf_now_ms();
    const int64_t after = (int64_t)time(NULL) * 1000 + 1000;
    assert_true(now >= before && now <= after);
    assert_true(now > INT64_C(1704067200000)); /* after 2024-01-01: really ms, not s */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse_known_instants),
        cmocka_unit_test(test_parse_fraction),
        cmocka_unit_test(test_parse_offsets),
        cmocka_unit_test(test_parse_lower_case_and_leap_second),
        cmocka_unit_test(test_parse_rejects),
        cmocka_unit_test(test_parse_respects_len),
        cmocka_unit_test(test_format),
        cmocka_unit_test(test_format_limits),
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_now),
    };
    return cmocka_run_group_tests_name("rfc3339", tests, NULL, NULL);
}
