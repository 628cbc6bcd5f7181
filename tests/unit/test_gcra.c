/* GCRA: many simulated callers sharing one TAT for a simulated minute never
 * put more than N + burst - 1 slots into any window of one unit (checked at
 * every slot, which covers every half-open window); leases of several slots;
 * idle time banks nothing beyond the burst; a clock that jumps back; absurd
 * sizes refused without touching the state. */
#include <inttypes.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "backoff.h"
#include "gcra.h"

#define SEC_US INT64_C(1000000)

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* The most slots in any half-open window [t, t + unit): the busiest window
 * starts at some slot, so checking windows that start at slots is enough. */
static int64_t max_in_window(int64_t *slots, size_t n, int64_t unit)
{
    qsort(slots, n, sizeof *slots, cmp_i64);
    int64_t best = 0;
    size_t hi = 0;
    for (size_t lo = 0; lo < n; lo++) {
        if (hi < lo)
            hi = lo;
        while (hi < n && slots[hi] < slots[lo] + unit)
            hi++;
        if ((int64_t)(hi - lo) > best)
            best = (int64_t)(hi - lo);
    }
    return best;
}

typedef struct sim {
    int64_t count, unit_us, burst, guard_us;
    int64_t window_us; /* the window checked; 0 = unit_us */
    int callers;
    int max_lease;
    int64_t duration_us;
} sim;

/* Callers wake at random times; each takes a lease of 1..max_lease slots
 * when the last slot of its previous lease has passed (as the fleet does:
 * one lease ahead at most), all on one shared TAT. Returns the number of
 * slots taken; *worst gets the busiest window. */
static size_t run_sim(const sim *s, uint64_t seed, int64_t *worst)
{
    jf_rng rng;
    jf_rng_seed_with(&rng, seed);
    int64_t interval = jf_gcra_interval_us(s->count, s->unit_us, s->guard_us);
    int64_t tau = jf_gcra_tau_us(interval, s->burst);
    assert_true(interval > 0 && tau >= 0);

    size_t cap = (size_t)(s->duration_us / interval + s->burst + 16) + (size_t)s->max_lease * 64;
    int64_t *slots = malloc(cap * sizeof *slots);
    int64_t *next_free = calloc((size_t)s->callers, sizeof *next_free);
    assert_non_null(slots);
    assert_non_null(next_free);
    size_t n = 0;
    int64_t tat = 0;
    int64_t start = INT64_C(1700000000) * SEC_US; /* a realistic epoch */
    int64_t now = start;
    while (now < start + s->duration_us) {
        /* Time moves in uneven steps, sometimes not at all. */
        now += jf_rng_between0(&rng, interval / 3);
        int c = (int)jf_rng_between0(&rng, s->callers - 1);
        if (now < next_free[c])
            continue;
        int64_t k = 1 + jf_rng_between0(&rng, s->max_lease - 1);
        jf_gcra_lease lease;
        assert_true(jf_gcra_take(&tat, now, interval, tau, k, &lease));
        int64_t prev = INT64_MIN;
        for (int64_t i = 0; i < k; i++) {
            int64_t slot = jf_gcra_lease_slot(&lease, i);
            assert_true(slot >= now);
            assert_true(slot >= prev); /* non-decreasing within a lease */
            prev = slot;
            assert_true(n < cap);
            slots[n++] = slot;
        }
        next_free[c] = prev;
    }
    *worst = max_in_window(slots, n, s->window_us ? s->window_us : s->unit_us);
    free(slots);
    free(next_free);
    return n;
}

static void check_sim(const sim *s, uint64_t seed)
{
    int64_t worst = 0;
    size_t n = run_sim(s, seed, &worst);
    int64_t bound = s->count + s->burst - 1;
    if (worst > bound)
        fail_msg("%" PRId64 "/%" PRId64 "us burst %" PRId64 ": a window holds %" PRId64
                 " slots, bound %" PRId64,
                 s->count, s->unit_us, s->burst, worst, bound);
    /* Not merely safe but saturated: demand always exceeds the rate, so
     * the whole minute is used (a limiter that grants nothing would pass
     * the bound). */
    int64_t units = s->duration_us / s->unit_us;
    int64_t expected = units * s->count;
    if ((int64_t)n < expected * 97 / 100)
        fail_msg("only %zu slots in %" PRId64 " units of %" PRId64 " (expected ~%" PRId64 ")", n,
                 units, s->count, expected);
    if (s->guard_us == 0)
        assert_true(worst >= s->count); /* the bound is reached, not loose */
}

static void test_sliding_windows_strict(void **st)
{
    (void)st;
    /* 20/s, no burst, one-slot leases, 8 callers, one minute. */
    sim s = {20, SEC_US, 1, 0, 0, 8, 1, 60 * SEC_US};
    check_sim(&s, 1);
    /* With leases of up to 5 slots. */
    s.max_lease = 5;
    check_sim(&s, 2);
    /* A rate that does not divide the unit: 7/s (interval rounds up). */
    s = (sim){7, SEC_US, 1, 0, 0, 5, 2, 60 * SEC_US};
    check_sim(&s, 3);
    /* High rate with big leases: 1000/s. */
    s = (sim){1000, SEC_US, 1, 0, 0, 12, 50, 60 * SEC_US};
    check_sim(&s, 4);
}

static void test_sliding_windows_with_burst(void **st)
{
    (void)st;
    sim s = {20, SEC_US, 5, 0, 0, 8, 3, 60 * SEC_US};
    check_sim(&s, 5);
    s = (sim){20, SEC_US, 20, 0, 0, 8, 1, 60 * SEC_US};
    check_sim(&s, 6);
}

static void test_minute_unit(void **st)
{
    (void)st;
    /* 30/m over ten simulated minutes, burst 2. */
    sim s = {30, 60 * SEC_US, 2, 0, 0, 4, 1, 600 * SEC_US};
    check_sim(&s, 7);
}

static void test_guard_widens_spacing(void **st)
{
    (void)st;
    /* With a 10 ms guard, windows up to 10 ms longer than one unit keep the
     * bound: calls starting up to 10 ms late cannot crowd a window. */
    sim s = {20, SEC_US, 1, 10000, SEC_US + 10000, 6, 1, 60 * SEC_US};
    check_sim(&s, 8);
    /* Without it, such a window holds one more. */
    s.guard_us = 0;
    int64_t worst = 0;
    (void)run_sim(&s, 8, &worst);
    assert_int_equal(worst, 21);
    assert_int_equal(jf_gcra_interval_us(20, SEC_US, 10000), 50500);
}

static void test_interval_and_tau(void **st)
{
    (void)st;
    assert_int_equal(jf_gcra_interval_us(20, SEC_US, 0), 50000);
    assert_int_equal(jf_gcra_interval_us(7, SEC_US, 0), 142858); /* rounded up */
    assert_int_equal(jf_gcra_interval_us(30, 60 * SEC_US, 0), 2 * SEC_US);
    assert_int_equal(jf_gcra_interval_us(0, SEC_US, 0), 0);
    assert_int_equal(jf_gcra_interval_us(1, 0, 0), 0);
    assert_int_equal(jf_gcra_interval_us(1, SEC_US, -1), 0);
    assert_int_equal(jf_gcra_interval_us(1, INT64_MAX, 1), 0);
    assert_int_equal(jf_gcra_tau_us(50000, 1), 0);
    assert_int_equal(jf_gcra_tau_us(50000, 3), 100000);
    assert_int_equal(jf_gcra_tau_us(50000, 0), -1);
    assert_int_equal(jf_gcra_tau_us(INT64_MAX / 2, 4), -1);
}

static void test_lease_of_k(void **st)
{
    (void)st;
    const int64_t T = 50000, now = 10 * SEC_US;
    int64_t tat = 0;
    jf_gcra_lease l;

    /* No burst: k slots exactly T apart, starting now. */
    assert_true(jf_gcra_take(&tat, now, T, 0, 5, &l));
    for (int64_t i = 0; i < 5; i++)
        assert_int_equal(jf_gcra_lease_slot(&l, i), now + i * T);
    assert_int_equal(tat, now + 5 * T);
    /* The next lease continues the schedule. */
    assert_true(jf_gcra_take(&tat, now, T, 0, 2, &l));
    assert_int_equal(jf_gcra_lease_slot(&l, 0), now + 5 * T);
    assert_int_equal(jf_gcra_lease_slot(&l, 1), now + 6 * T);

    /* Burst 3 from idle: three slots now, then spaced. */
    tat = 0;
    assert_true(jf_gcra_take(&tat, now, T, 2 * T, 5, &l));
    const int64_t want[] = {now, now, now, now + T, now + 2 * T};
    for (int64_t i = 0; i < 5; i++)
        assert_int_equal(jf_gcra_lease_slot(&l, i), want[i]);
    assert_int_equal(tat, now + 5 * T);
    /* The burst is used up: the next slot is due at TAT - tau. */
    assert_true(jf_gcra_take(&tat, now, T, 2 * T, 1, &l));
    assert_int_equal(jf_gcra_lease_slot(&l, 0), now + 3 * T);
}

static void test_idle_banks_only_the_burst(void **st)
{
    (void)st;
    const int64_t T = 50000;
    int64_t tat = 0;
    jf_gcra_lease l;
    assert_true(jf_gcra_take(&tat, SEC_US, T, 3 * T, 1, &l));
    /* An hour idle, then a rush of 10 single takes at the same instant:
     * only burst (4) of them are due now. */
    int64_t now = SEC_US + 3600 * SEC_US;
    int due_now = 0;
    for (int i = 0; i < 10; i++) {
        assert_true(jf_gcra_take(&tat, now, T, 3 * T, 1, &l));
        due_now += jf_gcra_lease_slot(&l, 0) == now;
    }
    assert_int_equal(due_now, 4);
}

static void test_clock_jumps_back(void **st)
{
    (void)st;
    const int64_t T = 100000, tau = T; /* burst 2 */
    int64_t tat = 0, last = 0;
    jf_gcra_lease l;
    int64_t now = 100 * SEC_US;
    for (int i = 0; i < 20; i++) {
        assert_true(jf_gcra_take(&tat, now, T, tau, 1, &l));
        last = jf_gcra_lease_slot(&l, 0);
        now += T;
    }
    int64_t tat_before = tat;
    /* The clock goes back 30 s. */
    now -= 30 * SEC_US;
    assert_true(jf_gcra_take(&tat, now, T, tau, 1, &l));
    int64_t slot = jf_gcra_lease_slot(&l, 0);
    /* The state never moves back, and the new slot keeps the spacing with
     * the ones granted before the jump: no extra calls. */
    assert_true(tat > tat_before);
    assert_true(slot >= last + T - tau);
    /* The price: this caller waits about the jump. */
    assert_true(slot - now <= 30 * SEC_US + 2 * T);
    assert_true(slot - now >= 30 * SEC_US - 2 * T);
    /* A burst after the jump is no bigger than allowed either: a window of
     * one second from the jumped-back slot holds at most 10 + 1. */
    int64_t slots[64];
    int n = 0;
    slots[n++] = last;
    slots[n++] = slot;
    for (int i = 0; i < 40; i++) {
        assert_true(jf_gcra_take(&tat, now, T, tau, 1, &l));
        slots[n++] = jf_gcra_lease_slot(&l, 0);
    }
    assert_true(max_in_window(slots, (size_t)n, SEC_US) <= 11);
}

static void test_absurd_sizes_refused(void **st)
{
    (void)st;
    const int64_t T = 50000;
    int64_t tat = 5 * SEC_US;
    jf_gcra_lease l = {1, 2, 3, 4};
    jf_gcra_lease untouched = l;

    assert_false(jf_gcra_take(&tat, SEC_US, T, 0, INT64_MAX, &l));
    assert_false(jf_gcra_take(&tat, SEC_US, T, 0, INT64_MAX / T + 1, &l));
    assert_false(jf_gcra_take(&tat, SEC_US, T, 0, 0, &l));
    assert_false(jf_gcra_take(&tat, SEC_US, T, 0, -3, &l));
    assert_false(jf_gcra_take(&tat, SEC_US, 0, 0, 1, &l));
    assert_false(jf_gcra_take(&tat, SEC_US, T, -1, 1, &l));
    assert_int_equal(tat, 5 * SEC_US);
    assert_memory_equal(&l, &untouched, sizeof l);

    /* A TAT near the end of time (a corrupt value) cannot overflow. */
    int64_t far = INT64_MAX - T / 2;
    assert_false(jf_gcra_take(&far, SEC_US, T, 0, 1, &l));
    assert_int_equal(far, INT64_MAX - T / 2);
    /* tau larger than the clock: the base may be negative, no overflow. */
    int64_t t0 = 0;
    assert_true(jf_gcra_take(&t0, 0, 1, INT64_MAX, 3, &l));
    assert_int_equal(jf_gcra_lease_slot(&l, 2), 0);

    /* Huge but representable: a trillion 1 µs slots; the last is exact. */
    tat = 0;
    assert_true(jf_gcra_take(&tat, SEC_US, 1, 0, INT64_C(1000000000000), &l));
    assert_int_equal(tat, SEC_US + INT64_C(1000000000000));
    assert_int_equal(jf_gcra_lease_slot(&l, INT64_C(999999999999)), SEC_US + INT64_C(999999999999));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_interval_and_tau),
        cmocka_unit_test(test_sliding_windows_strict),
        cmocka_unit_test(test_sliding_windows_with_burst),
        cmocka_unit_test(test_minute_unit),
        cmocka_unit_test(test_guard_widens_spacing),
        cmocka_unit_test(test_lease_of_k),
        cmocka_unit_test(test_idle_banks_only_the_burst),
        cmocka_unit_test(test_clock_jumps_back),
        cmocka_unit_test(test_absurd_sizes_refused),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
