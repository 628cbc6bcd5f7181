/* breaker.h — a count-based circuit breaker (pure logic: the caller passes
 * the time, so tests drive it without sleeping).
 *
 * Closed: calls flow; the last `window` outcomes are kept. Once at least
 * `min_calls` are in the window and failures reach `failure_rate` percent
 * (or slow calls reach `slow_rate` percent, when slow_call_ms > 0), it
 * trips: Open for open_ms, doubling on each trip in a row up to
 * open_max_ms. Then Half-open: `probes` calls are let through; if all
 * succeed (and are not slow) it closes and the trip streak resets, the first
 * failure opens it again. Not thread-safe: one owner thread. */
#ifndef JF_BREAKER_H
#define JF_BREAKER_H

#include <stdbool.h>
#include <stdint.h>

#include "config.h"
#include "status.h"

typedef enum jf_breaker_state {
    JF_BREAKER_CLOSED = 0,
    JF_BREAKER_OPEN,
    JF_BREAKER_HALF_OPEN,
} jf_breaker_state;

typedef struct jf_breaker jf_breaker;

/* cfg is copied. */
jf_status jf_breaker_create(jf_breaker **out, const jf_breaker_config *cfg, jf_error *err);
void jf_breaker_destroy(jf_breaker *b);

/* May a call start now? In half-open this takes one of the probe permits;
 * give it back with jf_breaker_cancel() if the call does not happen. */
bool jf_breaker_allow(jf_breaker *b, int64_t now_ms);
void jf_breaker_cancel(jf_breaker *b);

/* The outcome of a call that was allowed. */
void jf_breaker_record(jf_breaker *b, int64_t now_ms, bool failure, int64_t duration_ms);

/* State at now_ms (an open breaker whose period is over reads half-open). */
jf_breaker_state jf_breaker_state_at(jf_breaker *b, int64_t now_ms);
const char *jf_breaker_state_name(jf_breaker_state s);

/* While open: when it turns half-open; otherwise 0. */
int64_t jf_breaker_open_until(const jf_breaker *b);

/* Trips since creation. */
uint64_t jf_breaker_trips(const jf_breaker *b);

#endif
