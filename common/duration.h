/* duration.h — durations ("500ms", "30s", "1m30s", "2h", "7d") and rates
 * ("30/m", "20/s", "1000/h"). All results are milliseconds. */
#ifndef JF_DURATION_H
#define JF_DURATION_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

/* Parses one or more <integer><unit> parts (units ms, s, m, h, d), e.g.
 * "1m30s"; "0" alone is zero. No sign, no spaces inside, no overflow past
 * ~292 million years. On error err says what was wrong with s. */
jf_status jf_duration_parse(int64_t *out_ms, const char *s, jf_error *err);

/* Parses a comma-separated list of durations ("1s,5s,30s"; blanks around
 * commas allowed) into out[0..max); *n gets the count (at least 1). */
jf_status jf_duration_list_parse(int64_t *out_ms, size_t max, size_t *n, const char *s,
                                 jf_error *err);

/* Writes ms in the shortest exact form ("1m30s", "250ms", "0s"). */
size_t jf_duration_format(char *buf, size_t cap, int64_t ms);

typedef struct jf_rate {
    int64_t count;     /* N calls … */
    int64_t period_ms; /* … per this many ms; 0 = no rate limit */
} jf_rate;

/* Parses "N/s", "N/m", "N/h" (N a positive integer); "" or "0" or "none" is
 * no limit. */
jf_status jf_rate_parse(jf_rate *out, const char *s, jf_error *err);

#endif
