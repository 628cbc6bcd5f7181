/* log.h — JSON-lines logging on stderr.
 *
 * Every line is one JSON object with stable keys: "ts" (RFC 3339, ms),
 * "level", "msg", then the caller's fields ("job_id", "service", "subject",
 * "seq", "error", …). The level is checked before any formatting happens.
 * Thread-safe: a line is written with one write(2) call.
 *
 * Never pass a secret (password, token, auth header) as a field. */
#ifndef JF_LOG_H
#define JF_LOG_H

#include <stdbool.h>
#include <stddef.h>

#include "status.h"

typedef enum jf_log_level {
    JF_LOG_DEBUG = 0,
    JF_LOG_INFO,
    JF_LOG_WARN,
    JF_LOG_ERROR,
    JF_LOG_OFF,
} jf_log_level;

typedef struct jf_log_field {
    const char *key;
    int is_int;
    const char *s; /* NULL is written as JSON null */
    long long i;
} jf_log_field;

#define JF_S(k, v) ((jf_log_field){(k), 0, (v), 0})
#define JF_I(k, v) ((jf_log_field){(k), 1, NULL, (long long)(v)})

void jf_log_set_level(jf_log_level level);
jf_log_level jf_log_get_level(void);
bool jf_log_enabled(jf_log_level level);

/* Parses "debug", "info", "warn", "error", "off". */
jf_status jf_log_level_parse(jf_log_level *out, const char *s);

void jf_log_emit(jf_log_level level, const char *msg, const jf_log_field *fields, size_t n);

/* jf_log(level, "message", JF_S("job_id", id), JF_I("seq", seq)); at least one field. */
#define jf_log(level, msg, ...)                                                                    \
    do {                                                                                           \
        if (jf_log_enabled(level)) {                                                               \
            const jf_log_field jf_f_[] = {__VA_ARGS__};                                            \
            jf_log_emit((level), (msg), jf_f_, sizeof jf_f_ / sizeof jf_f_[0]);                    \
        }                                                                                          \
    } while (0)

#define jf_log0(level, msg)                                                                        \
    do {                                                                                           \
        if (jf_log_enabled(level))                                                                 \
            jf_log_emit((level), (msg), NULL, 0);                                                  \
    } while (0)

/* Appends s to buf as the inside of a JSON string (escaped), bounded by cap;
 * returns the new length. Used by the logger and by tools that print JSON. */
size_t jf_json_escape(char *buf, size_t len, size_t cap, const char *s);

#endif
