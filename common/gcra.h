/* gcra.h — Generic Cell Rate Algorithm arithmetic for strict rate limits
 * ("rate = N/unit" in DESIGN.md), pure integer microseconds: the caller
 * passes the time and keeps the state, so the state can live anywhere (the
 * fleet keeps it in a JetStream KV key updated by compare-and-set).
 *
 * State: one number, the theoretical arrival time (TAT): when the next call
 * would be due if calls came exactly `interval` apart. A slot is granted at
 * max(now, TAT - tau) and moves TAT to max(TAT, now) + interval, so a slot is
 * never earlier than tau before its place in the strict schedule.
 *
 * Bound (what API providers count). With interval T and tau = (b - 1) * T
 * for a burst of b, any two slots taken k apart in the order of taking are
 * at least k * T - tau apart in time. Hence a half-open window [t, t + L)
 * holds fewer than L / T + b slots. With T >= L / N (jf_gcra_interval_us()
 * rounds up), a window of one unit holds at most N + b - 1 slots: exactly N
 * when b = 1. A closed window [t, t + L] may hold one more (slots at both
 * ends), which is why the fleet adds a small guard to T (see
 * jf_gcra_interval_us()). The bound is about slot times: a call started
 * later than its slot can land in the next window, so a caller that cannot
 * use a slot on time must drop it and take a new one.
 *
 * The bound holds whatever `now` the callers pass, in any order (a clock
 * that jumps back, callers whose clocks differ): TAT never moves back, so a
 * clock that jumps back by d only makes its callers wait d longer. */
#ifndef JF_GCRA_H
#define JF_GCRA_H

#include <stdbool.h>
#include <stdint.h>

/* ceil((period_us + guard_us) / count): the spacing of N = count calls per
 * period, widened by guard_us per period to absorb start-time jitter. 0 when
 * count < 1, period_us < 1, guard_us < 0 or the sum overflows. */
int64_t jf_gcra_interval_us(int64_t count, int64_t period_us, int64_t guard_us);

/* (burst - 1) * interval_us; -1 when burst < 1, interval_us < 1 or the
 * product overflows. */
int64_t jf_gcra_tau_us(int64_t interval_us, int64_t burst);

/* n slots taken at once. Slot i (0 <= i < n) is
 * max(now_us, base_us + i * interval_us): non-decreasing, and once past the
 * burst spaced exactly interval_us apart. */
typedef struct jf_gcra_lease {
    int64_t now_us;
    int64_t base_us;
    int64_t interval_us;
    int64_t n;
} jf_gcra_lease;

/* Takes n slots at now_us and advances *tat_us by them. A *tat_us in the
 * past (or 0 for "never used") means no backlog. False, with *tat_us and
 * *out untouched, when n < 1, interval_us < 1, tau_us < 0 or a slot or the
 * new TAT would overflow int64 (an absurd n or TAT). */
bool jf_gcra_take(int64_t *tat_us, int64_t now_us, int64_t interval_us, int64_t tau_us, int64_t n,
                  jf_gcra_lease *out);

/* Slot i of a lease (0 <= i < lease->n). */
int64_t jf_gcra_lease_slot(const jf_gcra_lease *lease, int64_t i);

#endif
