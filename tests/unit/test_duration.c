/* Durations and rates as a user writes them in jetfleet.ini or on the
 * command line ("--deadline 10m"). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "duration.h"

#define SENTINEL INT64_C(-777)

static int64_t parse_ok(const char *s)
{
    int64_t v = SENTINEL;
    jf_error err = {{0}};
    jf_status st = jf_duration_parse(&v, s, &err);
    if (st != JF_OK)
        fail_msg("jf_duration_parse(\"%s\") failed: %s", s, err.msg);
    return v;
}

/* Returns the message; checks the output was not touched. */
static const char *parse_bad(const char *s)
{
    static jf_error err;
    int64_t v = SENTINEL;
    memset(&err, 0, sizeof err);
    jf_status st = jf_duration_parse(&v, s, &err);
    if (st != JF_ERR_INVALID)
        fail_msg("jf_duration_parse(\"%s\") = %d (%lld), expected invalid", s ? s : "(null)",
                 (int)st, (long long)v);
    assert_int_equal(v, SENTINEL);
    assert_true(strlen(err.msg) > 0);
    return err.msg;
}

static void test_parse_valid(void **state)
{
    (void)state;
    assert_int_equal(parse_ok("0"), 0);
    assert_int_equal(parse_ok("0s"), 0);
    assert_int_equal(parse_ok("0ms"), 0);
    assert_int_equal(parse_ok("500ms"), 500);
    assert_int_equal(parse_ok("30s"), 30000);
    assert_int_equal(parse_ok("90s"), 90000);
    assert_int_equal(parse_ok("1m30s"), 90000);
    assert_int_equal(parse_ok("2h"), 2 * 3600000);
    assert_int_equal(parse_ok("7d"), INT64_C(7) * 86400000);
    assert_int_equal(parse_ok("1d2h3m4s5ms"), 86400000 + 2 * 3600000 + 3 * 60000 + 4000 + 5);
    assert_int_equal(parse_ok("1h5s"), 3600000 + 5000);
    assert_int_equal(parse_ok("007s"), 7000);
    assert_int_equal(parse_ok("1500ms"), 1500);
}

static void test_parse_invalid(void **state)
{
    (void)state;
    assert_non_null(strstr(parse_bad(""), "empty"));
    assert_non_null(strstr(parse_bad(NULL), "empty"));
    assert_non_null(strstr(parse_bad("5"), "missing unit"));
    assert_non_null(strstr(parse_bad("00"), "missing unit"));
    assert_non_null(strstr(parse_bad("1m5"), "missing unit"));
    assert_non_null(strstr(parse_bad("s"), "expected a number"));
    assert_non_null(strstr(parse_bad("ms"), "expected a number"));
    assert_non_null(strstr(parse_bad("-1s"), "sign"));
    assert_non_null(strstr(parse_bad("+1s"), "sign"));
    assert_non_null(strstr(parse_bad("1 s"), "spaces"));
    assert_non_null(strstr(parse_bad(" 1s"), "spaces"));
    parse_bad("1s ");
    assert_non_null(strstr(parse_bad("1.5s"), "fraction"));
    assert_non_null(strstr(parse_bad("1x"), "unknown unit \"x\""));
    assert_non_null(strstr(parse_bad("1S"), "unknown unit \"S\""));
    assert_non_null(strstr(parse_bad("1sec"), "unknown unit \"sec\""));
    assert_non_null(strstr(parse_bad("1m1m"), "largest to smallest"));
    assert_non_null(strstr(parse_bad("30s1m"), "largest to smallest"));
    assert_non_null(strstr(parse_bad("1ms1s"), "largest to smallest"));
    /* The message quotes the input so the user sees what was refused. */
    assert_non_null(strstr(parse_bad("12parsecs"), "\"12parsecs\""));
    /* Control characters are escaped, never copied raw into a log line. */
    const char *m = parse_bad("1s\n2s");
    assert_null(strchr(m, '\n'));
    assert_non_null(strstr(m, "\\x0a"));
}

static void test_parse_overflow(void **state)
{
    (void)state;
    assert_int_equal(parse_ok("9223372036854775807ms"), INT64_MAX);
    assert_non_null(strstr(parse_bad("9223372036854775808ms"), "too large"));
    assert_non_null(strstr(parse_bad("99999999999999999999999s"), "too large"));
    /* 106751991167 days fit, one more does not. */
    assert_int_equal(parse_ok("106751991167d"), INT64_C(106751991167) * 86400000);
    assert_non_null(strstr(parse_bad("106751991168d"), "too large"));
    /* Each part fits; their sum does not. */
    assert_non_null(strstr(parse_bad("106751991167d24h"), "too large"));
    assert_non_null(strstr(parse_bad("9223372036854775s1000ms"), "too large"));
    assert_int_equal(parse_ok("9223372036854775s807ms"), INT64_MAX);
}

static void test_list(void **state)
{
    (void)state;
    int64_t out[4] = {1, 2, 3, 4};
    size_t n = 99;
    jf_error err = {{0}};

    assert_int_equal(jf_duration_list_parse(out, 4, &n, "1s,5s,30s", &err), JF_OK);
    assert_int_equal(n, 3);
    assert_int_equal(out[0], 1000);
    assert_int_equal(out[1], 5000);
    assert_int_equal(out[2], 30000);

    assert_int_equal(jf_duration_list_parse(out, 4, &n, " 250ms , 1m30s\t,\t0 ", &err), JF_OK);
    assert_int_equal(n, 3);
    assert_int_equal(out[0], 250);
    assert_int_equal(out[1], 90000);
    assert_int_equal(out[2], 0);

    assert_int_equal(jf_duration_list_parse(out, 4, &n, "2h", &err), JF_OK);
    assert_int_equal(n, 1);
    assert_int_equal(out[0], 7200000);

    assert_int_equal(jf_duration_list_parse(out, 4, &n, "1s,2s,3s,4s", &err), JF_OK);
    assert_int_equal(n, 4);

    /* Failures leave out and n alone. */
    static const struct {
        const char *s;
        const char *want;
    } bad[] = {
        {"", "item 1: empty"},          {"  ", "item 1: empty"},
        {"1s,,2s", "item 2: empty"},    {"1s,", "item 2: empty"},
        {",1s", "item 1: empty"},       {"1s,5x", "item 2: unknown unit"},
        {"1s 2s", "item 1: no spaces"}, {"1s,2s,3s,4s,5s", "more than 4 items"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int64_t o[4] = {-1, -1, -1, -1};
        size_t k = 42;
        memset(&err, 0, sizeof err);
        assert_int_equal(jf_duration_list_parse(o, 4, &k, bad[i].s, &err), JF_ERR_INVALID);
        if (strstr(err.msg, bad[i].want) == NULL)
            fail_msg("\"%s\": message \"%s\" lacks \"%s\"", bad[i].s, err.msg, bad[i].want);
        assert_int_equal(k, 42);
        for (int j = 0; j < 4; j++)
            assert_int_equal(o[j], -1);
    }
}

static void test_format(void **state)
{
    (void)state;
    static const struct {
        int64_t ms;
        const char *s;
    } cases[] = {
        {0, "0s"},
        {1, "1ms"},
        {250, "250ms"},
        {1000, "1s"},
        {1500, "1s500ms"},
        {90000, "1m30s"},
        {3600000, "1h"},
        {3600000 + 5000, "1h5s"},
        {INT64_C(7) * 86400000, "7d"},
        {INT64_C(86400000) + 1, "1d1ms"},
        {INT64_MAX, "106751991167d7h12m55s807ms"},
        {-90000, "-1m30s"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char buf[64];
        size_t n = jf_duration_format(buf, sizeof buf, cases[i].ms);
        assert_string_equal(buf, cases[i].s);
        assert_int_equal(n, strlen(cases[i].s));
    }
    /* INT64_MIN must not overflow while negating. */
    char buf[64];
    jf_duration_format(buf, sizeof buf, INT64_MIN);
    assert_string_equal(buf, "-106751991167d7h12m55s808ms");

    /* Truncation: snprintf-like, always terminated, full length returned. */
    char small[4];
    assert_int_equal(jf_duration_format(small, sizeof small, 90000), 5);
    assert_string_equal(small, "1m3");
    assert_int_equal(jf_duration_format(NULL, 0, 90000), 5);
}

static void test_format_round_trip(void **state)
{
    (void)state;
    /* parse(format(x)) == x for spread-out values, including every unit
     * boundary neighbourhood. */
    uint64_t x = 88172645463325252u;
    for (int i = 0; i < 20000; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        int64_t ms = (int64_t)(x >> (1 + (i % 63)));
        char buf[64];
        jf_duration_format(buf, sizeof buf, ms);
        int64_t back = parse_ok(buf);
        if (back != ms)
            fail_msg("%lld -> \"%s\" -> %lld", (long long)ms, buf, (long long)back);
    }
    static const int64_t edges[] = {0,       999,     1000,     1001,     59999,    60000,
                                    3599999, 3600000, 86399999, 86400000, INT64_MAX};
    for (size_t i = 0; i < sizeof edges / sizeof edges[0]; i++) {
        char buf[64];
        jf_duration_format(buf, sizeof buf, edges[i]);
        assert_int_equal(parse_ok(buf), edges[i]);
    }
}

static void test_rate(void **state)
{
    (void)state;
    jf_rate r = {-1, -1};
    jf_error err = {{0}};
    assert_int_equal(jf_rate_parse(&r, "30/m", &err), JF_OK);
    assert_int_equal(r.count, 30);
    assert_int_equal(r.period_ms, 60000);
    assert_int_equal(jf_rate_parse(&r, "20/s", &err), JF_OK);
    assert_int_equal(r.count, 20);
    assert_int_equal(r.period_ms, 1000);
    assert_int_equal(jf_rate_parse(&r, "1000/h", &err), JF_OK);
    assert_int_equal(r.count, 1000);
    assert_int_equal(r.period_ms, 3600000);

    static const char *const none[] = {"", "0", "none"};
    for (size_t i = 0; i < 3; i++) {
        r.count = r.period_ms = -1;
        assert_int_equal(jf_rate_parse(&r, none[i], &err), JF_OK);
        assert_int_equal(r.count, 0);
        assert_int_equal(r.period_ms, 0);
    }

    static const char *const bad[] = {"30",
                                      "30/",
                                      "/m",
                                      "30/x",
                                      "0/m",
                                      "-1/m",
                                      "30/min",
                                      "30 /m",
                                      "30/ m",
                                      "30/m ",
                                      "1.5/s",
                                      "1000000001/s",
                                      "99999999999999999999999/s",
                                      "NONE"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        jf_rate o = {-5, -5};
        memset(&err, 0, sizeof err);
        if (jf_rate_parse(&o, bad[i], &err) != JF_ERR_INVALID)
            fail_msg("rate \"%s\" accepted", bad[i]);
        assert_int_equal(o.count, -5);
        assert_int_equal(o.period_ms, -5);
        assert_non_null(strstr(err.msg, "invalid rate"));
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse_valid),    cmocka_unit_test(test_parse_invalid),
        cmocka_unit_test(test_parse_overflow), cmocka_unit_test(test_list),
        cmocka_unit_test(test_format),         cmocka_unit_test(test_format_round_trip),
        cmocka_unit_test(test_rate),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
