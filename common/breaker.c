/* breaker.c — count-based circuit breaker (see breaker.h).
 *
 * The window is a ring of the last `window` outcomes, one byte each
 * (failure and slow bits); the failure and slow counts are kept up to date
 * as outcomes enter and leave, so a verdict costs O(1) per call. */
#include "breaker.h"

#include <stdlib.h>
#include <string.h>

#define OUT_FAILURE 0x1u
#define OUT_SLOW    0x2u

struct jf_breaker {
    jf_breaker_config cfg;
    jf_breaker_state state;
    unsigned char *ring; /* cfg.window outcomes */
    int pos;             /* next slot to write */
    int count;           /* outcomes in the window */
    int failures;
    int slows;
    int64_t open_until_ms;
    int streak;     /* trips in a row since it last closed */
    int probes_out; /* half-open permits handed out and not given back */
    int probes_ok;  /* half-open probes that succeeded */
    uint64_t trips;
};

jf_status jf_breaker_create(jf_breaker **out, const jf_breaker_config *cfg, jf_error *err)
{
    if (cfg->window < 1 || cfg->min_calls < 1 || cfg->min_calls > cfg->window) {
        jf_error_set(err,
                     "breaker: window %d and min_calls %d must satisfy 1 <= min_calls <= window",
                     cfg->window, cfg->min_calls);
        return JF_ERR_INVALID;
    }
    if (cfg->failure_rate < 1 || cfg->failure_rate > 100 || cfg->slow_rate < 1 ||
        cfg->slow_rate > 100) {
        jf_error_set(err, "breaker: failure_rate %d and slow_rate %d must be 1..100 percent",
                     cfg->failure_rate, cfg->slow_rate);
        return JF_ERR_INVALID;
    }
    if (cfg->open_ms < 1 || cfg->open_max_ms < 1 || cfg->probes < 1 || cfg->slow_call_ms < 0) {
        jf_error_set(err, "breaker: open %lld ms, open_max %lld ms and probes %d must be positive",
                     (long long)cfg->open_ms, (long long)cfg->open_max_ms, cfg->probes);
        return JF_ERR_INVALID;
    }
    jf_breaker *b = calloc(1, sizeof *b);
    if (b == NULL)
        goto fail_nomem;
    b->ring = calloc((size_t)cfg->window, 1);
    if (b->ring == NULL)
        goto fail_ring;
    b->cfg = *cfg;
    /* A cap below the first period would make the first period the cap. */
    if (b->cfg.open_max_ms < b->cfg.open_ms)
        b->cfg.open_max_ms = b->cfg.open_ms;
    b->state = JF_BREAKER_CLOSED;
    *out = b;
    return JF_OK;

fail_ring:
    free(b);
fail_nomem:
    jf_error_set(err, "breaker: out of memory");
    return JF_ERR_NOMEM;
}

void jf_breaker_destroy(jf_breaker *b)
{
    if (b == NULL)
        return;
    free(b->ring);
    free(b);
}

static void clear_window(jf_breaker *b)
{
    memset(b->ring, 0, (size_t)b->cfg.window);
    b->pos = b->count = b->failures = b->slows = 0;
}

static void trip(jf_breaker *b, int64_t now_ms)
{
    /* open_ms doubled (streak - 1) times, stopping at the cap; the loop
     * stops early so no shift can overflow. */
    int64_t period = b->cfg.open_ms;
    for (int i = 0; i < b->streak && period < b->cfg.open_max_ms; i++)
        period = period > b->cfg.open_max_ms / 2 ? b->cfg.open_max_ms : period * 2;
    if (period > b->cfg.open_max_ms)
        period = b->cfg.open_max_ms;
    b->streak++;
    b->trips++;
    b->state = JF_BREAKER_OPEN;
    b->open_until_ms = now_ms + period;
    b->probes_out = b->probes_ok = 0;
}

static void close_breaker(jf_breaker *b)
{
    b->state = JF_BREAKER_CLOSED;
    b->streak = 0;
    b->open_until_ms = 0;
    b->probes_out = b->probes_ok = 0;
    clear_window(b);
}

/* Open periods end by the clock, not by an event: every entry point moves
 * an expired open breaker to half-open first. */
static void advance(jf_breaker *b, int64_t now_ms)
{
    if (b->state == JF_BREAKER_OPEN && now_ms >= b->open_until_ms) {
        b->state = JF_BREAKER_HALF_OPEN;
        b->probes_out = b->probes_ok = 0;
    }
}

bool jf_breaker_allow(jf_breaker *b, int64_t now_ms)
{
    advance(b, now_ms);
    switch (b->state) {
    case JF_BREAKER_CLOSED:
        return true;
    case JF_BREAKER_OPEN:
        return false;
    case JF_BREAKER_HALF_OPEN:
        /* Probes already judged keep their permit: `probes` calls in all. */
        if (b->probes_out + b->probes_ok >= b->cfg.probes)
            return false;
        b->probes_out++;
        return true;
    }
    return false;
}

void jf_breaker_cancel(jf_breaker *b)
{
    if (b->state == JF_BREAKER_HALF_OPEN && b->probes_out > 0)
        b->probes_out--;
}

void jf_breaker_record(jf_breaker *b, int64_t now_ms, bool failure, int64_t duration_ms)
{
    bool slow = b->cfg.slow_call_ms > 0 && duration_ms > b->cfg.slow_call_ms;

    advance(b, now_ms);
    switch (b->state) {
    case JF_BREAKER_OPEN:
        /* A call that started before the trip: its verdict is already in. */
        return;
    case JF_BREAKER_HALF_OPEN:
        if (b->probes_out > 0)
            b->probes_out--;
        /* A slow probe is no proof of recovery either. */
        if (failure || slow) {
            trip(b, now_ms);
            return;
        }
        if (++b->probes_ok >= b->cfg.probes)
            close_breaker(b);
        return;
    case JF_BREAKER_CLOSED:
        break;
    }

    unsigned char out = (unsigned char)((failure ? OUT_FAILURE : 0u) | (slow ? OUT_SLOW : 0u));
    if (b->count == b->cfg.window) {
        unsigned char old = b->ring[b->pos];
        b->failures -= (old & OUT_FAILURE) != 0;
        b->slows -= (old & OUT_SLOW) != 0;
    } else {
        b->count++;
    }
    b->ring[b->pos] = out;
    b->pos = (b->pos + 1) % b->cfg.window;
    b->failures += failure;
    b->slows += slow;

    if (b->count < b->cfg.min_calls)
        return;
    /* Percentages compared in integers: "reach 50%" of 20 is exactly 10. */
    bool too_many_failures = (int64_t)b->failures * 100 >= (int64_t)b->cfg.failure_rate * b->count;
    bool too_slow =
        b->cfg.slow_call_ms > 0 && (int64_t)b->slows * 100 >= (int64_t)b->cfg.slow_rate * b->count;
    if (too_many_failures || too_slow)
        trip(b, now_ms);
}

jf_breaker_state jf_breaker_state_at(jf_breaker *b, int64_t now_ms)
{
    advance(b, now_ms);
    return b->state;
}

const char *jf_breaker_state_name(jf_breaker_state s)
{
    switch (s) {
    case JF_BREAKER_CLOSED:
        return "closed";
    case JF_BREAKER_OPEN:
        return "open";
    case JF_BREAKER_HALF_OPEN:
        return "half-open";
    }
    return "unknown";
}

int64_t jf_breaker_open_until(const jf_breaker *b)
{
    return b->state == JF_BREAKER_OPEN ? b->open_until_ms : 0;
}

uint64_t jf_breaker_trips(const jf_breaker *b)
{
    return b->trips;
}
