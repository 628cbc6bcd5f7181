/* backoff.h — retry delays with full jitter, and the small PRNG behind them. */
#ifndef JF_BACKOFF_H
#define JF_BACKOFF_H

#include <stddef.h>
#include <stdint.h>

typedef struct jf_rng {
    uint64_t s;
} jf_rng;

/* Seeds from the clock, pid and address-space randomness; never zero. */
void jf_rng_seed(jf_rng *rng);
void jf_rng_seed_with(jf_rng *rng, uint64_t seed);
uint64_t jf_rng_next(jf_rng *rng);
/* Uniform in [0, bound]; bound <= 0 gives 0. */
int64_t jf_rng_between0(jf_rng *rng, int64_t bound);

/* Delay before the next attempt after `attempt` failed attempts (attempt >=
 * 1): steps[attempt-1], or the last step once the list is used up, with full
 * jitter (uniform in [0, step]), but never less than floor_ms (a server's
 * Retry-After). n == 0 means no delay beyond floor_ms. */
int64_t jf_backoff_delay(const int64_t *steps, size_t n, unsigned attempt, int64_t floor_ms,
                         jf_rng *rng);

#endif
