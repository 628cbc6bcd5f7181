/* rfc3339.h — RFC 3339 date-times (with a mandatory offset) <-> Unix ms. */
#ifndef JF_RFC3339_H
#define JF_RFC3339_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

/* Parses "2026-11-22T10:00:00Z", "…T10:00:00.123+02:00" ('t'/'z' in lower
 * case accepted, leap second 60 accepted). Checks field ranges, days per
 * month and leap years; the whole string must be consumed. */
jf_status jf_rfc3339_parse(int64_t *out_ms, const char *s, size_t len);

/* Writes ms as "YYYY-MM-DDTHH:MM:SS.mmmZ" (24 bytes + NUL); returns length. */
size_t jf_rfc3339_format(char *buf, size_t cap, int64_t ms);

/* Proleptic Gregorian calendar arithmetic (m 1..12, d 1..31), shared with
 * the HTTP-date parser: days since 1970-01-01, and days in a month. */
int64_t jf_days_from_civil(int64_t y, int m, int d);
int jf_days_in_month(int64_t y, int m);

/* Milliseconds since the epoch, CLOCK_REALTIME. */
int64_t jf_now_ms(void);

#endif
