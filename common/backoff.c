#include "backoff.h"

#include <time.h>
#include <unistd.h>

/* xorshift64* has a zero fixed point; any seed that mixes to zero is
 * replaced by this constant (the golden-ratio increment of splitmix64). */
#define NONZERO_SEED UINT64_C(0x9E3779B97F4A7C15)

/* splitmix64's finaliser: spreads nearby seeds (consecutive pids, close
 * clock readings) over the whole state space. */
static uint64_t mix64(uint64_t z)
{
    z += NONZERO_SEED;
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

void jf_rng_seed_with(jf_rng *rng, uint64_t seed)
{
    uint64_t s = mix64(seed);
    rng->s = s != 0 ? s : NONZERO_SEED;
}

void jf_rng_seed(jf_rng *rng)
{
    /* Processes started in the same instant on different hosts (a fleet
     * rolled out at once) must not retry in lockstep: the pid and the stack
     * address (ASLR) separate them when the clocks agree. */
    struct timespec rt = {0, 0}, mono = {0, 0};
    clock_gettime(CLOCK_REALTIME, &rt);
    clock_gettime(CLOCK_MONOTONIC, &mono);
    int on_stack = 0;
    uint64_t s = mix64((uint64_t)rt.tv_sec * UINT64_C(1000000000) + (uint64_t)rt.tv_nsec);
    s = mix64(s ^ ((uint64_t)mono.tv_sec * UINT64_C(1000000000) + (uint64_t)mono.tv_nsec));
    s = mix64(s ^ (uint64_t)getpid());
    s = mix64(s ^ (uint64_t)(uintptr_t)&on_stack);
    rng->s = s != 0 ? s : NONZERO_SEED;
}

uint64_t jf_rng_next(jf_rng *rng)
{
    uint64_t x = rng->s;
    if (x == 0) /* a zeroed struct that was never seeded */
        x = NONZERO_SEED;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    rng->s = x;
    return x * UINT64_C(0x2545F4914F6CDD1D);
}

int64_t jf_rng_between0(jf_rng *rng, int64_t bound)
{
    if (bound <= 0)
        return 0;
    uint64_t range = (uint64_t)bound + 1; /* at most 2^63: fits */
    /* Reject the top sliver so every value is equally likely: limit is the
     * largest multiple of range not above UINT64_MAX. */
    uint64_t limit = UINT64_MAX - (UINT64_MAX % range);
    uint64_t x;
    do
        x = jf_rng_next(rng);
    while (x >= limit);
    return (int64_t)(x % range);
}

int64_t jf_backoff_delay(const int64_t *steps, size_t n, unsigned attempt, int64_t floor_ms,
                         jf_rng *rng)
{
    int64_t d = 0;
    if (n > 0 && steps != NULL) {
        size_t i = attempt > 0 ? (size_t)attempt - 1 : 0;
        if (i >= n)
            i = n - 1;
        d = jf_rng_between0(rng, steps[i]);
    }
    return d < floor_ms ? floor_ms : d;
}
