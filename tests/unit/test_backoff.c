/* Retry delays: full jitter within each step, last step reused, a server's
 * Retry-After as a floor, and a PRNG that does not repeat across processes. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "backoff.h"

#define DRAWS 10000

static const int64_t steps[] = {1000, 5000, 30000};
#define NSTEPS (sizeof steps / sizeof steps[0])

/* Draws DRAWS delays and checks they lie in [lo, hi], their mean lies in
 * [mean_lo, mean_hi] and they reach close to both ends (not stuck). */
static void check_draws(jf_rng *rng, unsigned attempt, int64_t floor_ms, int64_t lo, int64_t hi,
                        double mean_lo, double mean_hi)
{
    double sum = 0;
    int64_t min = INT64_MAX, max = INT64_MIN;
    for (int i = 0; i < DRAWS; i++) {
        int64_t d = jf_backoff_delay(steps, NSTEPS, attempt, floor_ms, rng);
        if (d < lo || d > hi)
            fail_msg("attempt %u floor %lld: delay %lld outside [%lld, %lld]", attempt,
                     (long long)floor_ms, (long long)d, (long long)lo, (long long)hi);
        sum += (double)d;
        if (d < min)
            min = d;
        if (d > max)
            max = d;
    }
    double mean = sum / DRAWS;
    if (mean < mean_lo || mean > mean_hi)
        fail_msg("attempt %u: mean %.1f outside [%.1f, %.1f]", attempt, mean, mean_lo, mean_hi);
    /* With 10k uniform draws the extremes land within 1% of the ends. */
    int64_t slack = (hi - lo) / 100 + 1;
    if (min > lo + slack || max < hi - slack)
        fail_msg("attempt %u: draws span only [%lld, %lld] of [%lld, %lld]", attempt,
                 (long long)min, (long long)max, (long long)lo, (long long)hi);
}

static void test_each_step_full_jitter(void **state)
{
    (void)state;
    jf_rng rng;
    jf_rng_seed_with(&rng, 12345);
    for (unsigned a = 1; a <= NSTEPS; a++) {
        int64_t step = steps[a - 1];
        check_draws(&rng, a, 0, 0, step, 0.4 * (double)step, 0.6 * (double)step);
    }
}

static void test_last_step_reused(void **state)
{
    (void)state;
    jf_rng rng;
    jf_rng_seed_with(&rng, 777);
    static const unsigned attempts[] = {4, 5, 10, 1000, 4000000000u};
    for (size_t i = 0; i < sizeof attempts / sizeof attempts[0]; i++)
        check_draws(&rng, attempts[i], 0, 0, 30000, 12000.0, 18000.0);
}

static void test_attempt_zero_is_first(void **state)
{
    (void)state;
    jf_rng rng;
    jf_rng_seed_with(&rng, 99);
    check_draws(&rng, 0, 0, 0, 1000, 400.0, 600.0);
}

static void test_floor(void **state)
{
    (void)state;
    jf_rng rng;
    jf_rng_seed_with(&rng, 4242);
    /* A Retry-After above the step wins outright. */
    for (int i = 0; i < DRAWS; i++)
        assert_int_equal(jf_backoff_delay(steps, NSTEPS, 1, 20000, &rng), 20000);
    /* Inside the step: never below the floor, still jittered above it. */
    int at_floor = 0, above = 0;
    for (int i = 0; i < DRAWS; i++) {
        int64_t d = jf_backoff_delay(steps, NSTEPS, 2, 2000, &rng);
        assert_true(d >= 2000 && d <= 5000);
        if (d == 2000)
            at_floor++;
        else
            above++;
    }
    /* About 40% of uniform [0, 5000] falls below 2000 and is lifted to it. */
    assert_true(at_floor > DRAWS * 3 / 10 && at_floor < DRAWS * 5 / 10);
    assert_true(above > DRAWS / 2);
    /* No steps: the floor alone, or no delay. */
    assert_int_equal(jf_backoff_delay(NULL, 0, 1, 0, &rng), 0);
    assert_int_equal(jf_backoff_delay(steps, 0, 3, 0, &rng), 0);
    assert_int_equal(jf_backoff_delay(steps, 0, 3, 1500, &rng), 1500);
    /* A negative floor is no floor. */
    for (int i = 0; i < 1000; i++)
        assert_true(jf_backoff_delay(steps, NSTEPS, 1, -5, &rng) >= 0);
}

static void test_zero_step(void **state)
{
    (void)state;
    jf_rng rng;
    jf_rng_seed_with(&rng, 1);
    const int64_t z[] = {0, 0};
    for (int i = 0; i < 100; i++)
        assert_int_equal(jf_backoff_delay(z, 2, 1, 0, &rng), 0);
}

static void test_seeds(void **state)
{
    (void)state;
    jf_rng a, b, c;
    /* The same seed replays the same sequence … */
    jf_rng_seed_with(&a, 2024);
    jf_rng_seed_with(&b, 2024);
    for (int i = 0; i < 100; i++)
        assert_int_equal(jf_rng_next(&a), jf_rng_next(&b));
    /* … neighbouring seeds do not. */
    jf_rng_seed_with(&a, 1);
    jf_rng_seed_with(&b, 2);
    int same = 0;
    for (int i = 0; i < 100; i++)
        same += jf_rng_next(&a) == jf_rng_next(&b);
    assert_int_equal(same, 0);

    /* Seed 0 must not leave xorshift at its zero fixed point. */
    jf_rng_seed_with(&c, 0);
    assert_true(c.s != 0);
    uint64_t x = jf_rng_next(&c), y = jf_rng_next(&c);
    assert_true(x != 0 || y != 0);
    assert_true(x != y);

    /* Clock seeding: non-zero, and two seedings differ. */
    jf_rng_seed(&a);
    jf_rng_seed(&b);
    assert_true(a.s != 0);
    assert_true(b.s != 0);
    assert_true(a.s != b.s);
    assert_true(jf_rng_next(&a) != jf_rng_next(&b));

    /* A never-seeded zeroed generator still moves. */
    jf_rng z = {0};
    assert_true(jf_rng_next(&z) != jf_rng_next(&z));
}

static void test_between0(void **state)
{
    (void)state;
    jf_rng rng;
    jf_rng_seed_with(&rng, 31337);
    assert_int_equal(jf_rng_between0(&rng, 0), 0);
    assert_int_equal(jf_rng_between0(&rng, -1), 0);
    assert_int_equal(jf_rng_between0(&rng, INT64_MIN), 0);

    /* Every value of [0, 9] comes up about a tenth of the time. */
    int counts[10] = {0};
    for (int i = 0; i < 100000; i++) {
        int64_t v = jf_rng_between0(&rng, 9);
        assert_true(v >= 0 && v <= 9);
        counts[v]++;
    }
    for (int i = 0; i < 10; i++)
        if (counts[i] < 9000 || counts[i] > 11000)
            fail_msg("value %d drawn %d times of 100000", i, counts[i]);

    /* Both ends of [0, 1] are reachable. */
    int ones = 0;
    for (int i = 0; i < 1000; i++)
        ones += (int)jf_rng_between0(&rng, 1);
    assert_true(ones > 400 && ones < 600);

    /* The widest bound stays in range; the top half is reached. */
    int high = 0;
    for (int i = 0; i < 1000; i++) {
        int64_t v = jf_rng_between0(&rng, INT64_MAX);
        assert_true(v >= 0);
        high += v > INT64_MAX / 2;
    }
    assert_true(high > 400 && high < 600);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_each_step_full_jitter),
        cmocka_unit_test(test_last_step_reused),
        cmocka_unit_test(test_attempt_zero_is_first),
        cmocka_unit_test(test_floor),
        cmocka_unit_test(test_zero_step),
        cmocka_unit_test(test_seeds),
        cmocka_unit_test(test_between0),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
