/* envelope.h — the job envelope (schemas/job.schema.json): parse, validate,
 * and the subject contract jobs.<service>.<priority>.<type>. */
#ifndef JF_ENVELOPE_H
#define JF_ENVELOPE_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "status.h"

#define JF_ENVELOPE_MAX_DEPTH 64 /* objects/arrays nested at most this deep */
#define JF_ID_MAX 200            /* bytes in id and tenant */
#define JF_TOKEN_MAX 128         /* bytes in service and type */

typedef enum jf_priority {
    JF_PRIO_HIGH = 0,
    JF_PRIO_NORMAL = 1,
    JF_PRIO_LOW = 2,
} jf_priority;
#define JF_PRIO_COUNT 3

const char *jf_priority_name(jf_priority p);
jf_status jf_priority_parse(jf_priority *out, const char *s);

/* True when s is a non-empty subject token: [A-Za-z0-9_-]+, at most
 * JF_TOKEN_MAX bytes. */
bool jf_token_valid(const char *s);

typedef struct jf_envelope {
    json_t *root;       /* owned; the fields below point into it (NULL after a
                           jf_envelope_scan fast path: they point into the envelope) */
    const char *id;     /* 1..200 bytes, no control characters */
    const char *service;
    const char *type;
    const char *tenant; /* NULL when absent */
    jf_priority priority;
    bool has_created_at;
    int64_t created_at_ms;
    bool has_deadline;
    int64_t deadline_ms;
} jf_envelope;

/* Parses and validates data[0..len) against every rule of DESIGN.md's
 * envelope contract. When subject is not NULL it must be
 * jobs.<service>.<priority>.<type> of this very envelope. max_payload > 0
 * bounds len. On error *out is untouched and err names the first rule
 * broken (e.g. "id: longer than 200 bytes"). The caller owns *out. */
jf_status jf_envelope_parse(jf_envelope **out, const void *data, size_t len, const char *subject,
                            size_t max_payload, jf_error *err);
/* The same verdict and error as jf_envelope_parse, several times faster on
 * valid envelopes: it scans without building a tree, so env->root is NULL
 * (the fields point into the envelope's own allocation) unless the message
 * needed jansson (escapes in a field, exponents, an error to word). For
 * callers that need the fields only (the consumer, batch publishing). */
jf_status jf_envelope_scan(jf_envelope **out, const void *data, size_t len, const char *subject,
                           size_t max_payload, jf_error *err);

void jf_envelope_destroy(jf_envelope *env);

/* Writes "jobs.<service>.<priority>.<type>" (prefix "jobs" or "dlq"). */
jf_status jf_subject_format(char *buf, size_t cap, const char *prefix, const char *service,
                            jf_priority p, const char *type);

#endif
