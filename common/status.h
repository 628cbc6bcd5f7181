/* status.h — the status code every fallible jetfleet function returns, and
 * the error detail that travels with it.
 *
 * Rule: a function returning jf_status writes its outputs only on JF_OK; on
 * any other status it fills the caller's jf_error (when not NULL) with one
 * line naming what went wrong and where (file:line, key, job id, subject). */
#ifndef JF_STATUS_H
#define JF_STATUS_H

#include <stddef.h>

typedef enum jf_status {
    JF_OK = 0,
    JF_ERR_INVALID,  /* bad input: config, CLI argument, envelope */
    JF_ERR_NOMEM,    /* allocation failed */
    JF_ERR_IO,       /* file or socket error */
    JF_ERR_NATS,     /* a NATS/JetStream call failed */
    JF_ERR_MISMATCH, /* an existing stream/durable differs from the config */
    JF_ERR_NOTFOUND, /* a file, stream, durable or key does not exist */
    JF_ERR_TIMEOUT,
} jf_status;

#define JF_ERROR_MAX 512

typedef struct jf_error {
    char msg[JF_ERROR_MAX];
} jf_error;

/* Formats into err->msg (truncating at JF_ERROR_MAX-1); err may be NULL. */
void jf_error_set(jf_error *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Short fixed name of a status ("invalid", "nomem", …); never NULL. */
const char *jf_status_name(jf_status s);

#endif
