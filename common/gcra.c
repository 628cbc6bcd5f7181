/* gcra.c — GCRA slot arithmetic (see gcra.h for the bound it keeps). */
#include "gcra.h"

int64_t jf_gcra_interval_us(int64_t count, int64_t period_us, int64_t guard_us)
{
    int64_t span;
    if (count < 1 || period_us < 1 || guard_us < 0 ||
        __builtin_add_overflow(period_us, guard_us, &span))
        return 0;
    /* Rounding up keeps N * T >= L: rounding down would let a window of
     * one unit hold an extra call now and then. */
    return span / count + (span % count != 0);
}

int64_t jf_gcra_tau_us(int64_t interval_us, int64_t burst)
{
    int64_t tau;
    if (burst < 1 || interval_us < 1 || __builtin_mul_overflow(burst - 1, interval_us, &tau))
        return -1;
    return tau;
}

bool jf_gcra_take(int64_t *tat_us, int64_t now_us, int64_t interval_us, int64_t tau_us, int64_t n,
                  jf_gcra_lease *out)
{
    int64_t span, tat, base;
    if (n < 1 || interval_us < 1 || tau_us < 0)
        return false;
    /* A TAT in the past is no credit: idle time does not bank calls beyond
     * the burst. */
    int64_t start = *tat_us > now_us ? *tat_us : now_us;
    if (__builtin_mul_overflow(n, interval_us, &span) ||
        __builtin_add_overflow(start, span, &tat) || __builtin_sub_overflow(start, tau_us, &base))
        return false;
    *tat_us = tat;
    out->now_us = now_us;
    out->base_us = base;
    out->interval_us = interval_us;
    out->n = n;
    return true;
}

int64_t jf_gcra_lease_slot(const jf_gcra_lease *lease, int64_t i)
{
    /* base + i * interval <= the new TAT, which did not overflow. */
    int64_t t = lease->base_us + i * lease->interval_us;
    return t > lease->now_us ? t : lease->now_us;
}
