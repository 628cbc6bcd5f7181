/* retry_after.h — the HTTP Retry-After header (RFC 9110 10.2.3): a number of
 * seconds, or an HTTP-date (IMF-fixdate; also RFC 850 and asctime forms). */
#ifndef JF_RETRY_AFTER_H
#define JF_RETRY_AFTER_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

/* The delay in ms the header asks for, relative to now_ms, clamped to
 * [0, max_ms]. A date in the past gives 0. Garbage, a negative number or an
 * empty value gives JF_ERR_INVALID (the caller falls back to its backoff).
 * len bounds the value (it need not be NUL-terminated); at most 128 bytes
 * are looked at. */
jf_status jf_retry_after_parse(int64_t *out_ms, const char *value, size_t len, int64_t now_ms,
                               int64_t max_ms);

#endif
