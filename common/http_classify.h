/* http_classify.h — what a downstream HTTP answer means for a job, and the
 * auth header a service sends: the pure parts of the http handler
 * (consumer/handler_http.c), here so unit tests reach them without a network.
 *
 * The call contract (DESIGN.md "Downstream HTTP call"): 2xx succeeds, and a
 * JSON body is the job's result; 408, 425, 429 and 5xx are retried, honouring
 * Retry-After; any other 4xx is permanent. 408 and 5xx count against the
 * service's breaker, 425 and 429 do not (the service is healthy, just busy
 * with us). With result_required set, a 2xx that is not a JSON object holding
 * every listed key is a retryable service fault: the service answered, but
 * not in the shape asked for. Anything else (1xx, 3xx — redirects are not
 * followed —, a status past 599) is a retryable service fault too: the
 * endpoint does not behave like the service we were told to call. */
#ifndef JF_HTTP_CLASSIFY_H
#define JF_HTTP_CLASSIFY_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

#include "config.h"
#include "status.h"

typedef enum jf_http_class {
    JF_HTTP_SUCCESS = 0,
    JF_HTTP_RETRY,
    JF_HTTP_PERMANENT,
} jf_http_class;

#define JF_HTTP_SNIPPET_MAX 200 /* bytes of a body quoted in an error */
#define JF_HTTP_ERROR_MAX   320

typedef struct jf_http_verdict {
    jf_http_class cls;
    bool service_fault;            /* counts against the service's breaker */
    bool use_retry_after;          /* a Retry-After header of this response is to be honoured */
    json_t *result;                /* success: the job's result, owned by the caller; may be NULL */
    char error[JF_HTTP_ERROR_MAX]; /* one printable line; "" on success */
} jf_http_verdict;

/* The keys of result_required, parsed once. */
typedef struct jf_http_required jf_http_required;

/* Parses "key1,key2" (spaces around keys ignored). An empty key is an error
 * naming the service. list NULL or empty: *out = NULL (nothing required). */
jf_status jf_http_required_parse(jf_http_required **out, const char *service, const char *list,
                                 jf_error *err);
void jf_http_required_destroy(jf_http_required *req);

/* Judges one complete response: status and body (len bytes, any content;
 * the caller bounds it). req may be NULL. Fills every field of *out. */
void jf_http_classify(jf_http_verdict *out, long status, const void *body, size_t len,
                      const jf_http_required *req);

/* Reads the service's auth header from whichever of auth_header,
 * auth_header_file (its first line) and auth_header_env (the variable's
 * value) is set — at most one may be — and checks it is "Name: value" with a
 * token name, a non-empty value and no control characters. *out = NULL when
 * none is set; otherwise a string the caller frees with jf_http_auth_free().
 * Any problem with the source is JF_ERR_INVALID (a config error); errors
 * name the service, the key and the file or variable, never the value. */
jf_status jf_http_auth_load(char **out, const jf_service_config *svc, jf_error *err);

/* Wipes and frees a header from jf_http_auth_load(); NULL is a no-op. */
void jf_http_auth_free(char *header);

/* Writes at most max bytes (and fewer than cap) of src as one printable
 * line: leading blanks dropped, control characters and runs of blanks turned
 * into one space, bytes that are not UTF-8 into '?', never cutting a
 * character. Returns the length written; dst is NUL-terminated when cap > 0. */
size_t jf_http_one_line(char *dst, size_t cap, const void *src, size_t len, size_t max);

#endif
