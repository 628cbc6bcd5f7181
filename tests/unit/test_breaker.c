/* Circuit breaker: verdicts only after min_calls, failure and slow-call
 * thresholds exactly at and just below, 4xx-like outcomes that are not
 * failures, open periods doubling up to the cap, half-open permits, probe
 * failure and recovery. Time is passed in, never slept. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "breaker.h"

static jf_breaker_config defaults(void)
{
    return (jf_breaker_config){
        .window = 20,
        .min_calls = 10,
        .failure_rate = 50,
        .slow_call_ms = 0,
        .slow_rate = 100,
        .open_ms = 5000,
        .open_max_ms = 300000,
        .probes = 3,
    };
}

static jf_breaker *make(const jf_breaker_config *cfg)
{
    jf_breaker *b = NULL;
    jf_error err = {{0}};
    assert_int_equal(jf_breaker_create(&b, cfg, &err), JF_OK);
    assert_non_null(b);
    return b;
}

/* One allowed call with the given outcome; the breaker must let it in. */
static void call(jf_breaker *b, int64_t now, bool failure, int64_t duration)
{
    assert_true(jf_breaker_allow(b, now));
    jf_breaker_record(b, now, failure, duration);
}

static jf_breaker_state state(jf_breaker *b, int64_t now)
{
    return jf_breaker_state_at(b, now);
}

/* Trips a fresh-window breaker at `now` with min_calls failures. */
static void trip_now(jf_breaker *b, const jf_breaker_config *cfg, int64_t now)
{
    for (int i = 0; i < cfg->min_calls; i++)
        call(b, now, true, 1);
    assert_int_equal(state(b, now), JF_BREAKER_OPEN);
}

static void test_no_verdict_before_min_calls(void **st)
{
    (void)st;
    jf_breaker_config cfg = defaults();
    jf_breaker *b = make(&cfg);
    /* Nine failures in a row: 100% but below min_calls. */
    for (int i = 0; i < 9; i++)
        call(b, 1000, true, 1);
    assert_int_equal(state(b, 1000), JF_BREAKER_CLOSED);
    assert_int_equal(jf_breaker_trips(b), 0);
    /* The tenth makes the verdict. */
    call(b, 1000, true, 1);
    assert_int_equal(state(b, 1000), JF_BREAKER_OPEN);
    assert_int_equal(jf_breaker_trips(b), 1);
    assert_false(jf_breaker_allow(b, 1001));
    jf_breaker_destroy(b);
}

static void test_failure_rate_exactly_at_threshold(void **st)
{
    (void)st;
    jf_breaker_config cfg = defaults();
    jf_breaker *b = make(&cfg);
    /* 20 calls, 10 failures = exactly 50%: trips on the 20th. Successes
     * first so no earlier prefix reaches 50% with >= 10 calls. */
    for (int i = 0; i < 10; i++)
        call(b, 0, false, 1);
    for (int i = 0; i < 9; i++)
        call(b, 0, true, 1);
    assert_int_equal(state(b, 0), JF_BREAKER_CLOSED); /* 9/19 = 47% */
    call(b, 0, true, 1);
    assert_int_equal(state(b, 0), JF_BREAKER_OPEN); /* 10/20 */
    jf_breaker_destroy(b);
}

static void test_failure_rate_just_below_threshold(void **st)
{
    (void)st;
    jf_breaker_config cfg = defaults();
    jf_breaker *b = make(&cfg);
    /* Steady 9 failures in every 20 (45%) forever: never trips, however
     * the window slides. */
    for (int round = 0; round < 50; round++) {
        for (int i = 0; i < 20; i++)
            call(b, round, i < 9 ? false : (i >= 11), 1);
        /* 11 successes then 9 failures: any 20 in a row hold 9 */
    }
    assert_int_equal(state(b, 100), JF_BREAKER_CLOSED);
    assert_int_equal(jf_breaker_trips(b), 0);
    jf_breaker_destroy(b);
}

static void test_window_slides(void **st)
{
    (void)st;
    jf_breaker_config cfg = defaults();
    jf_breaker *b = make(&cfg);
    /* Old failures leave the window: 11 successes, 9 failures, 20
     * successes, 9 failures again: at most 9 of the last 20 at any time
     * (18 if the first nine were still counted). */
    for (int i = 0; i < 11; i++)
        call(b, 0, false, 1);
    for (int i = 0; i < 9; i++)
        call(b, 0, true, 1);
    for (int i = 0; i < 20; i++)
        call(b, 0, false, 1);
    for (int i = 0; i < 9; i++)
        call(b, 0, true, 1);
    assert_int_equal(state(b, 0), JF_BREAKER_CLOSED);
    /* One more failure: 10 of the last 20. */
    call(b, 0, true, 1);
    assert_int_equal(state(b, 0), JF_BREAKER_OPEN);
    jf_breaker_destroy(b);
}

static void test_non_failures_do_not_count(void **st)
{
    (void)st;
    jf_breaker_config cfg = defaults();
    jf_breaker *b = make(&cfg);
    /* 4xx-like outcomes are recorded as failure=false: a thousand of them
     * never open the breaker. */
    for (int i = 0; i < 1000; i++)
        call(b, i, false, 5);
    assert_int_equal(state(b, 1000), JF_BREAKER_CLOSED);
    assert_int_equal(jf_breaker_trips(b), 0);
    jf_breaker_destroy(b);
}

static void test_slow_call_rate(void **st)
{
    (void)st;
    jf_breaker_config cfg = defaults();
    cfg.slow_call_ms = 1000;
    cfg.slow_rate = 60;
    jf_breaker *b = make(&cfg);
    /* Exactly 1000 ms is not slow ("slower than"). */
    for (int i = 0; i < 20; i++)
        call(b, 0, false, 1000);
    assert_int_equal(state(b, 0), JF_BREAKER_CLOSED);
    /* 11 slow of 20 = 55%: below 60. */
    for (int i = 0; i < 11; i++)
        call(b, 0, false, 1001);
    assert_int_equal(state(b, 0), JF_BREAKER_CLOSED);
    /* The 12th slow makes 12/20 = 60%. */
    call(b, 0, false, 5000);
    assert_int_equal(state(b, 0), JF_BREAKER_OPEN);
    jf_breaker_destroy(b);

    /* Slow-call checking off (slow_call_ms = 0): durations do not matter. */
    cfg = defaults();
    b = make(&cfg);
    for (int i = 0; i < 100; i++)
        call(b, 0, false, 1000000);
    assert_int_equal(state(b, 0), JF_BREAKER_CLOSED);
    jf_breaker_destroy(b);
}

static void test_open_period_doubles_and_caps(void **st)
{
    (void)st;
    jf_breaker_config cfg = defaults();
    cfg.open_ms = 1000;
    cfg.open_max_ms = 5000;
    cfg.probes = 1;
    jf_breaker *b = make(&cfg);
    int64_t now = 0;
    trip_now(b, &cfg, now);
    /* Each probe fails: periods 1s, 2s, 4s, then capped at 5s. */
    const int64_t periods[] = {1000, 2000, 4000, 5000, 5000, 5000};
    for (size_t i = 0; i < sizeof periods / sizeof periods[0]; i++) {
        int64_t until = jf_breaker_open_until(b);
        assert_int_equal(until, now + periods[i]);
        assert_int_equal(state(b, until - 1), JF_BREAKER_OPEN);
        assert_false(jf_breaker_allow(b, until - 1));
        now = until;
        assert_int_equal(state(b, now), JF_BREAKER_HALF_OPEN);
        assert_int_equal(jf_breaker_open_until(b), 0);
        call(b, now, true, 1); /* the probe fails: open again */
        assert_int_equal(state(b, now), JF_BREAKER_OPEN);
    }
    assert_int_equal(jf_breaker_trips(b), 7);
    jf_breaker_destroy(b);
}

static void test_streak_resets_after_close(void **st)
{
    (void)st;
    jf_breaker_config cfg = defaults();
    cfg.open_ms = 1000;
    cfg.probes = 1;
    jf_breaker *b = make(&cfg);
    trip_now(b, &cfg, 0);
    call(b, 1000, true, 1); /* probe fails: 2 s */
    assert_int_equal(jf_breaker_open_until(b), 3000);
    call(b, 3000, false, 1); /* probe succeeds: closed */
    assert_int_equal(state(b, 3000), JF_BREAKER_CLOSED);
    /* The next trip starts from open_ms again. */
    trip_now(b, &cfg, 10000);
    assert_int_equal(jf_breaker_open_until(b), 11000);
    jf_breaker_destroy(b);
}

static void test_half_open_permits_and_cancel(void **st)
{
    (void)st;
    jf_breaker_config cfg = defaults();
    jf_breaker *b = make(&cfg);
    trip_now(b, &cfg, 0);
    int64_t t = jf_breaker_open_until(b);
    /* Exactly `probes` permits. */
    assert_true(jf_breaker_allow(b, t));
    assert_true(jf_breaker_allow(b, t));
    assert_true(jf_breaker_allow(b, t));
    assert_false(jf_breaker_allow(b, t));
    assert_int_equal(state(b, t), JF_BREAKER_HALF_OPEN);
    /* A permit given back can be taken again, once. */
    jf_breaker_cancel(b);
    assert_true(jf_breaker_allow(b, t));
    assert_false(jf_breaker_allow(b, t));
    /* Two probes succeed: still half-open, no new permits (the third is
     * still out). */
    jf_breaker_record(b, t + 10, false, 1);
    jf_breaker_record(b, t + 10, false, 1);
    assert_int_equal(state(b, t + 10), JF_BREAKER_HALF_OPEN);
    assert_false(jf_breaker_allow(b, t + 10));
    /* The third is cancelled: its permit comes back. */
    jf_breaker_cancel(b);
    assert_true(jf_breaker_allow(b, t + 20));
    jf_breaker_record(b, t + 30, false, 1);
    /* All probes succeeded: closed, with an empty window (9 failures do
     * not trip it again although the old window had 10). */
    assert_int_equal(state(b, t + 30), JF_BREAKER_CLOSED);
    for (int i = 0; i < 9; i++)
        call(b, t + 40, true, 1);
    assert_int_equal(state(b, t + 40), JF_BREAKER_CLOSED);
    assert_int_equal(jf_breaker_trips(b), 1);
    /* Cancel while closed changes nothing. */
    jf_breaker_cancel(b);
    assert_int_equal(state(b, t + 40), JF_BREAKER_CLOSED);
    jf_breaker_destroy(b);
}

static void test_probe_failure_reopens(void **st)
{
    (void)st;
    jf_breaker_config cfg = defaults();
    jf_breaker *b = make(&cfg);
    trip_now(b, &cfg, 0);
    int64_t t = jf_breaker_open_until(b);
    assert_true(jf_breaker_allow(b, t));
    assert_true(jf_breaker_allow(b, t));
    jf_breaker_record(b, t + 5, false, 1);
    jf_breaker_record(b, t + 6, true, 1); /* second probe fails */
    assert_int_equal(state(b, t + 6), JF_BREAKER_OPEN);
    assert_int_equal(jf_breaker_open_until(b), t + 6 + 2 * cfg.open_ms);
    assert_int_equal(jf_breaker_trips(b), 2);
    assert_false(jf_breaker_allow(b, t + 7));
    jf_breaker_destroy(b);
}

static void test_slow_probe_reopens(void **st)
{
    (void)st;
    jf_breaker_config cfg = defaults();
    cfg.slow_call_ms = 100;
    cfg.probes = 1;
    jf_breaker *b = make(&cfg);
    trip_now(b, &cfg, 0);
    int64_t t = jf_breaker_open_until(b);
    call(b, t, false, 101);
    assert_int_equal(state(b, t), JF_BREAKER_OPEN);
    jf_breaker_destroy(b);
}

static void test_recovery_then_normal_service(void **st)
{
    (void)st;
    jf_breaker_config cfg = defaults();
    jf_breaker *b = make(&cfg);
    trip_now(b, &cfg, 0);
    /* Calls that were in flight when it tripped report late: ignored. */
    jf_breaker_record(b, 10, true, 1);
    jf_breaker_record(b, 10, false, 1);
    assert_int_equal(jf_breaker_open_until(b), cfg.open_ms);
    int64_t t = cfg.open_ms;
    for (int i = 0; i < cfg.probes; i++)
        call(b, t, false, 1);
    assert_int_equal(state(b, t), JF_BREAKER_CLOSED);
    assert_int_equal(jf_breaker_open_until(b), 0);
    for (int i = 0; i < 100; i++)
        call(b, t + i, false, 1);
    assert_int_equal(state(b, t + 100), JF_BREAKER_CLOSED);
    assert_int_equal(jf_breaker_trips(b), 1);
    jf_breaker_destroy(b);
}

static void test_state_names_and_config_errors(void **st)
{
    (void)st;
    assert_string_equal(jf_breaker_state_name(JF_BREAKER_CLOSED), "closed");
    assert_string_equal(jf_breaker_state_name(JF_BREAKER_OPEN), "open");
    assert_string_equal(jf_breaker_state_name(JF_BREAKER_HALF_OPEN), "half-open");
    assert_string_equal(jf_breaker_state_name((jf_breaker_state)42), "unknown");

    jf_breaker *b = (jf_breaker *)(uintptr_t)1;
    jf_error err = {{0}};
    jf_breaker_config cfg = defaults();
    cfg.min_calls = 21;
    assert_int_equal(jf_breaker_create(&b, &cfg, &err), JF_ERR_INVALID);
    assert_ptr_equal(b, (jf_breaker *)(uintptr_t)1); /* untouched on error */
    assert_non_null(strstr(err.msg, "min_calls"));
    cfg = defaults();
    cfg.failure_rate = 0;
    assert_int_equal(jf_breaker_create(&b, &cfg, &err), JF_ERR_INVALID);
    cfg = defaults();
    cfg.probes = 0;
    assert_int_equal(jf_breaker_create(&b, &cfg, &err), JF_ERR_INVALID);
    jf_breaker_destroy(NULL);
}

static void test_window_of_one(void **st)
{
    (void)st;
    jf_breaker_config cfg = defaults();
    cfg.window = 1;
    cfg.min_calls = 1;
    cfg.failure_rate = 100;
    jf_breaker *b = make(&cfg);
    call(b, 0, false, 1);
    call(b, 0, false, 1);
    assert_int_equal(state(b, 0), JF_BREAKER_CLOSED);
    call(b, 0, true, 1);
    assert_int_equal(state(b, 0), JF_BREAKER_OPEN);
    jf_breaker_destroy(b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_no_verdict_before_min_calls),
        cmocka_unit_test(test_failure_rate_exactly_at_threshold),
        cmocka_unit_test(test_failure_rate_just_below_threshold),
        cmocka_unit_test(test_window_slides),
        cmocka_unit_test(test_non_failures_do_not_count),
        cmocka_unit_test(test_slow_call_rate),
        cmocka_unit_test(test_open_period_doubles_and_caps),
        cmocka_unit_test(test_streak_resets_after_close),
        cmocka_unit_test(test_half_open_permits_and_cancel),
        cmocka_unit_test(test_probe_failure_reopens),
        cmocka_unit_test(test_slow_probe_reopens),
        cmocka_unit_test(test_recovery_then_normal_service),
        cmocka_unit_test(test_state_names_and_config_errors),
        cmocka_unit_test(test_window_of_one),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
