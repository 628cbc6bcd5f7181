/* handler_http.c — kind = http: each job is one POST to the service's url
 * (DESIGN.md "Downstream HTTP call"), on libcurl's multi interface driven by
 * the consumer's libuv loop.
 *
 * No thread per call: curl tells us which sockets to watch
 * (CURLMOPT_SOCKETFUNCTION -> one uv_poll_t per socket) and when to wake it
 * (CURLMOPT_TIMERFUNCTION -> one uv_timer_t per service); the loop hands
 * readiness back with curl_multi_socket_action and we collect finished
 * transfers with curl_multi_info_read. One CURLM per service owns that
 * service's connection pool, so keep-alive connections (and, over https,
 * HTTP/2 streams multiplexed on one connection) are reused across jobs
 * while each call costs only its easy handle and buffers.
 *
 * curl callbacks never report an outcome: jf_job_finish() runs only from
 * drain(), outside any curl callback, so whatever the fleet does in it
 * (start another job, cancel one) may touch the multi handle safely.
 *
 * Secrets: the auth header is read once at create, kept in the service's
 * header list (wiped at destroy), never logged and never quoted in an error.
 * The url may hold credentials too, so errors name only "host:port". */
#include <curl/curl.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "handler.h"
#include "http_classify.h"
#include "log.h"
#include "retry_after.h"
#include "rfc3339.h"

#define BUFFER_SIZE            16384 /* curl's receive and send buffers, per transfer */
#define CONNECT_TIMEOUT_MAX_MS 10000
#define ERROR_BODY_KEEP        512 /* bytes of a non-2xx body kept for the error line */
#define BODY_INITIAL           1024
#define RETRY_AFTER_MAX        128 /* what jf_retry_after_parse looks at */
#define MAXCONNECTS_MIN        16
#define MAXCONNECTS_MAX        1024

typedef struct http_svc http_svc;

/* One socket curl asked us to watch. */
typedef struct sock {
    uv_poll_t poll; /* first: the handle's address is the struct's */
    http_svc *h;
    curl_socket_t fd;
    struct sock *prev, *next;
} sock;

/* One call in flight. */
typedef struct call {
    http_svc *h;
    jf_job *job;
    CURL *easy;
    struct call *prev, *next;
    /* The per-call headers, chained in front of the service's shared list
     * (curl only reads the list), so a call allocates no header nodes. */
    struct curl_slist hdr[2];
    char idem[sizeof "Idempotency-Key: " + JF_ID_MAX];
    char attempt[40];
    unsigned char *body;
    size_t len, cap;
    uint64_t received;
    bool too_large;
    bool no_memory;
    bool sent;           /* the request went out once (CURLOPT_PREREQFUNCTION) */
    bool resend_refused; /* curl wanted to send it again: aborted instead */
    bool has_retry_after;
    size_t retry_after_len;
    char retry_after[RETRY_AFTER_MAX];
    char errbuf[CURL_ERROR_SIZE];
} call;

struct http_svc {
    uv_loop_t *loop;
    const jf_service_config *svc;
    CURLM *multi;
    uv_timer_t timer;
    bool timer_ready;
    bool curl_ready; /* curl_global_init done */
    bool https;
    bool dying;
    int closing; /* uv handles whose close callback is still due */
    long timeout_ms, connect_timeout_ms;
    size_t body_max;            /* max_response, or SIZE_MAX when unlimited */
    struct curl_slist *headers; /* Content-Type, Expect, the auth header */
    char *auth;
    jf_http_required *req;
    char target[300]; /* "host:port" for error lines */
    call calls;       /* sentinel of the calls in flight */
    sock socks;       /* sentinel of the watched sockets */
};

/* ---- memory and handles ---------------------------------------------- */

static void wipe_headers(struct curl_slist *l)
{
    /* The list holds a copy of the auth header. */
    for (; l != NULL; l = l->next)
        explicit_bzero(l->data, strlen(l->data));
}

static void free_svc(http_svc *h)
{
    wipe_headers(h->headers);
    curl_slist_free_all(h->headers);
    jf_http_auth_free(h->auth);
    jf_http_required_destroy(h->req);
    if (h->curl_ready)
        curl_global_cleanup();
    free(h);
}

/* The service's memory goes with the last of its uv handles: uv_close is
 * asynchronous and the loop still holds pointers into it until then. */
static void on_handle_closed(http_svc *h)
{
    if (--h->closing == 0 && h->dying)
        free_svc(h);
}

static void on_sock_closed(uv_handle_t *hd)
{
    sock *s = (sock *)hd;
    http_svc *h = s->h;
    free(s);
    on_handle_closed(h);
}

static void on_timer_closed(uv_handle_t *hd)
{
    on_handle_closed(hd->data);
}

static void sock_close(sock *s)
{
    /* Stop at once (not in the close callback): curl may open a new socket
     * with the same descriptor before the loop runs the callback. */
    uv_poll_stop(&s->poll);
    s->prev->next = s->next;
    s->next->prev = s->prev;
    s->h->closing++;
    uv_close((uv_handle_t *)&s->poll, on_sock_closed);
}

static void drop_call(call *c)
{
    http_svc *h = c->h;
    if (h->multi != NULL)
        curl_multi_remove_handle(h->multi, c->easy);
    curl_easy_cleanup(c->easy);
    c->prev->next = c->next;
    c->next->prev = c->prev;
    free(c->body);
    free(c);
}

/* ---- outcomes ---------------------------------------------------------- */

static void transport_error(const http_svc *h, call *c, CURLcode rc, char *buf, size_t cap,
                            bool *fault)
{
    char detail[CURL_ERROR_SIZE];
    long os_errno = 0;

    jf_http_one_line(detail, sizeof detail, c->errbuf, strnlen(c->errbuf, sizeof c->errbuf),
                     sizeof detail - 1);
    if (detail[0] == '\0')
        snprintf(detail, sizeof detail, "%s", curl_easy_strerror(rc));
    curl_easy_getinfo(c->easy, CURLINFO_OS_ERRNO, &os_errno);
    *fault = true;

    if (c->resend_refused) {
        snprintf(buf, cap, "connection lost before an answer (%s)", h->target);
        return;
    }
    switch (rc) {
    case CURLE_OPERATION_TIMEDOUT: {
        curl_off_t connected_us = 0, total_us = 0;
        curl_easy_getinfo(c->easy, CURLINFO_CONNECT_TIME_T, &connected_us);
        curl_easy_getinfo(c->easy, CURLINFO_TOTAL_TIME_T, &total_us);
        /* A reused connection has no connect time: c->sent says the
         * request went out on some connection. */
        if (c->sent)
            connected_us = connected_us > 0 ? connected_us : 1;
        if (connected_us == 0 && total_us / 1000 < h->timeout_ms)
            snprintf(buf, cap, "connect timeout after %ld ms (%s)", h->connect_timeout_ms,
                     h->target);
        else if (connected_us == 0)
            snprintf(buf, cap, "timeout after %ld ms (no connection to %s)", h->timeout_ms,
                     h->target);
        else
            snprintf(buf, cap, "timeout after %ld ms", h->timeout_ms);
        return;
    }
    case CURLE_COULDNT_CONNECT:
        if (os_errno == ECONNREFUSED)
            snprintf(buf, cap, "connection refused (%s)", h->target);
        else if (os_errno != 0)
            snprintf(buf, cap, "cannot connect (%s): %s", h->target, strerror((int)os_errno));
        else
            snprintf(buf, cap, "cannot connect (%s): %s", h->target, detail);
        return;
    case CURLE_COULDNT_RESOLVE_HOST:
        snprintf(buf, cap, "cannot resolve host (%s)", h->target);
        return;
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
        snprintf(buf, cap, "connection error (%s): %s", h->target, detail);
        return;
    case CURLE_GOT_NOTHING:
        snprintf(buf, cap, "empty reply (%s)", h->target);
        return;
    case CURLE_PARTIAL_FILE:
        snprintf(buf, cap, "response cut short (%s)", h->target);
        return;
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_CIPHER:
    case CURLE_SSL_ISSUER_ERROR:
    case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
    case CURLE_SSL_INVALIDCERTSTATUS:
    case CURLE_SSL_SHUTDOWN_FAILED:
    case CURLE_SSL_CACERT_BADFILE:
    case CURLE_SSL_CRL_BADFILE:
        snprintf(buf, cap, "TLS error (%s): %s", h->target, detail);
        return;
    case CURLE_OUT_OF_MEMORY:
        *fault = false;
        snprintf(buf, cap, "out of memory");
        return;
    case CURLE_WRITE_ERROR:
        if (c->no_memory) {
            *fault = false;
            snprintf(buf, cap, "out of memory for the response");
            return;
        }
        break;
    default:
        break;
    }
    snprintf(buf, cap, "%s (%s)", detail, h->target);
}

/* Turns a finished transfer into the job's outcome. */
static void complete(call *c, CURLcode rc)
{
    http_svc *h = c->h;
    jf_job *job = c->job;
    const jf_service_config *svc = h->svc;
    jf_job_result r = {.outcome = JF_OUTCOME_RETRY};
    jf_http_verdict v;
    char msg[1024];
    long status = 0;

    curl_easy_getinfo(c->easy, CURLINFO_RESPONSE_CODE, &status);
    if (rc == CURLE_FILESIZE_EXCEEDED)
        c->too_large = true; /* told by Content-Length, before any byte */
    bool error_status = status >= 300 || (status > 0 && status < 200);

    if (rc == CURLE_OK || (c->too_large && error_status)) {
        /* An error answer too long to read is still judged by its status. */
        jf_http_classify(&v, status, c->body, c->len, h->req);
        r.outcome = v.cls == JF_HTTP_SUCCESS ? JF_OUTCOME_OK
                    : v.cls == JF_HTTP_RETRY ? JF_OUTCOME_RETRY
                                             : JF_OUTCOME_PERMANENT;
        r.service_fault = v.service_fault;
        r.result = v.result;
        r.error = v.cls == JF_HTTP_SUCCESS ? NULL : v.error;
        if (v.use_retry_after && c->has_retry_after) {
            int64_t ms;
            if (jf_retry_after_parse(&ms, c->retry_after, c->retry_after_len, jf_now_ms(),
                                     svc->retry_after_max_ms) == JF_OK)
                r.retry_after_ms = ms;
        }
    } else if (c->too_large) {
        r.service_fault = true;
        snprintf(msg, sizeof msg, "response larger than max_response (%" PRId64 " bytes)",
                 svc->max_response);
        r.error = msg;
    } else {
        transport_error(h, c, rc, msg, sizeof msg, &r.service_fault);
        r.error = msg;
    }

    *jf_job_slot(job) = NULL;
    drop_call(c);
    jf_job_finish(job, &r);
}

/* Hands every finished transfer to the fleet. */
static void drain(http_svc *h)
{
    CURLMsg *m;
    int left;
    while ((m = curl_multi_info_read(h->multi, &left)) != NULL) {
        if (m->msg != CURLMSG_DONE)
            continue;
        call *c = NULL;
        CURLcode rc = m->data.result; /* m lives in the easy handle: read it first */
        curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&c);
        complete(c, rc);
    }
}

/* ---- the loop drives curl ---------------------------------------------- */

static void on_poll(uv_poll_t *p, int status, int events)
{
    sock *s = (sock *)p;
    http_svc *h = s->h;
    int flags = 0, running;

    if (status < 0) {
        flags = CURL_CSELECT_ERR;
    } else {
        if (events & UV_READABLE)
            flags |= CURL_CSELECT_IN;
        if (events & UV_WRITABLE)
            flags |= CURL_CSELECT_OUT;
    }
    /* s may be closed inside: use only h afterwards. */
    curl_multi_socket_action(h->multi, s->fd, flags, &running);
    drain(h);
}

static void on_timer(uv_timer_t *t)
{
    http_svc *h = t->data;
    int running;
    curl_multi_socket_action(h->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    drain(h);
}

static int on_curl_timer(CURLM *multi, long timeout_ms, void *userp)
{
    http_svc *h = userp;
    if (h->dying)
        return 0;
    /* curl must not be called back into from here: a 0 timeout fires on
     * the loop's next turn instead. */
    if (timeout_ms < 0)
        uv_timer_stop(&h->timer);
    else
        uv_timer_start(&h->timer, on_timer, (uint64_t)timeout_ms, 0);
    return 0;
}

static int on_curl_socket(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp)
{
    http_svc *h = userp;
    sock *s = socketp;

    if (what == CURL_POLL_REMOVE) {
        if (s != NULL) {
            if (!h->dying)
                curl_multi_assign(h->multi, fd, NULL);
            sock_close(s);
        }
        return 0;
    }
    if (s == NULL) {
        /* Returning -1 here would make curl 7.88 give up on the whole
         * multi handle; on failure the call instead times out. */
        s = calloc(1, sizeof *s);
        if (s == NULL) {
            jf_log(JF_LOG_ERROR, "http: out of memory watching a socket",
                   JF_S("service", h->svc->name));
            return 0;
        }
        int e = uv_poll_init_socket(h->loop, &s->poll, fd);
        if (e != 0) {
            jf_log(JF_LOG_ERROR, "http: cannot watch a socket", JF_S("service", h->svc->name),
                   JF_S("error", uv_strerror(e)));
            free(s);
            return 0;
        }
        s->h = h;
        s->fd = fd;
        s->next = &h->socks;
        s->prev = h->socks.prev;
        h->socks.prev->next = s;
        h->socks.prev = s;
        curl_multi_assign(h->multi, fd, s);
    }
    int events = 0;
    if (what & CURL_POLL_IN)
        events |= UV_READABLE;
    if (what & CURL_POLL_OUT)
        events |= UV_WRITABLE;
    uv_poll_start(&s->poll, events, on_poll);
    return 0;
}

/* ---- curl's data callbacks ----------------------------------------------- */

static size_t on_write(char *data, size_t size, size_t nmemb, void *userp)
{
    call *c = userp;
    const http_svc *h = c->h;
    size_t n = size * nmemb;
    long status = 0;

    c->received += n;
    if (c->received > h->body_max) {
        c->too_large = true;
        return 0; /* aborts the transfer: CURLE_WRITE_ERROR */
    }
    curl_easy_getinfo(c->easy, CURLINFO_RESPONSE_CODE, &status);
    size_t keep = n;
    if (status < 200 || status > 299) {
        /* Only the start of an error body is quoted; read, not kept. */
        keep = c->len >= ERROR_BODY_KEEP ? 0 : ERROR_BODY_KEEP - c->len;
        if (keep > n)
            keep = n;
    }
    if (keep == 0)
        return n;
    if (c->len + keep > c->cap) {
        size_t cap = c->cap ? c->cap : BODY_INITIAL;
        while (cap < c->len + keep)
            cap = cap > SIZE_MAX / 2 ? SIZE_MAX : cap * 2;
        if (cap > h->body_max && h->body_max >= c->len + keep)
            cap = h->body_max;
        unsigned char *b = realloc(c->body, cap);
        if (b == NULL) {
            c->no_memory = true;
            return 0;
        }
        c->body = b;
        c->cap = cap;
    }
    memcpy(c->body + c->len, data, keep);
    c->len += keep;
    return n;
}

static size_t on_header(char *data, size_t size, size_t nmemb, void *userp)
{
    call *c = userp;
    size_t n = size * nmemb;
    static const char name[] = "retry-after:";
    const size_t nl = sizeof name - 1;

    if (n >= 5 && memcmp(data, "HTTP/", 5) == 0) {
        /* A new response begins (after a 1xx): forget the previous one's. */
        c->has_retry_after = false;
    } else if (n > nl && strncasecmp(data, name, nl) == 0) {
        size_t len = n - nl;
        const char *v = data + nl;
        while (len > 0 && (v[len - 1] == '\r' || v[len - 1] == '\n'))
            len--;
        /* Longer than the parser reads: not a value we could honour. */
        c->has_retry_after = len <= sizeof c->retry_after;
        if (c->has_retry_after) {
            memcpy(c->retry_after, v, len);
            c->retry_after_len = len;
        }
    }
    return n;
}

/* libcurl silently sends a request again on a fresh connection when a
 * reused one dies before any byte of the answer (up to 5 times). The service
 * may have acted on the first copy, and the copies would be calls no attempt
 * counted (ledger, Jetfleet-Attempt, rate limit): the second send is refused
 * and the attempt fails retryably instead. */
static int on_prereq(void *userp, char *conn_primary_ip, char *conn_local_ip, int conn_primary_port,
                     int conn_local_port)
{
    call *c = userp;
    (void)conn_primary_ip;
    (void)conn_local_ip;
    (void)conn_primary_port;
    (void)conn_local_port;
    if (c->sent) {
        c->resend_refused = true;
        return CURL_PREREQFUNC_ABORT;
    }
    c->sent = true;
    return CURL_PREREQFUNC_OK;
}

/* ---- the handler ------------------------------------------------------- */

static void fail_now(jf_job *job, const char *error)
{
    /* Our own trouble (memory), not the service's. */
    jf_job_result r = {.outcome = JF_OUTCOME_RETRY, .error = error, .service_fault = false};
    jf_job_finish(job, &r);
}

static bool setup_easy(http_svc *h, call *c, const void *body, size_t len)
{
    const jf_service_config *svc = h->svc;
    CURL *e = c->easy;
    bool ok = true;

#define SET(opt, val) ok = ok && curl_easy_setopt(e, opt, val) == CURLE_OK
    SET(CURLOPT_PRIVATE, (char *)c);
    SET(CURLOPT_URL, svc->url);
    SET(CURLOPT_PROTOCOLS_STR, "http,https");
    SET(CURLOPT_NOSIGNAL, 1L);
    SET(CURLOPT_FOLLOWLOCATION, 0L);
    SET(CURLOPT_TIMEOUT_MS, h->timeout_ms);
    SET(CURLOPT_CONNECTTIMEOUT_MS, h->connect_timeout_ms);
    SET(CURLOPT_BUFFERSIZE, (long)BUFFER_SIZE);
    SET(CURLOPT_UPLOAD_BUFFERSIZE, (long)BUFFER_SIZE);
    SET(CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)len);
    SET(CURLOPT_POSTFIELDS, body); /* by reference: valid until the job is finished */
    SET(CURLOPT_HTTPHEADER, c->hdr);
    SET(CURLOPT_USERAGENT, "jetfleet/" JETFLEET_VERSION);
    SET(CURLOPT_WRITEFUNCTION, on_write);
    SET(CURLOPT_WRITEDATA, c);
    SET(CURLOPT_HEADERFUNCTION, on_header);
    SET(CURLOPT_HEADERDATA, c);
    SET(CURLOPT_ERRORBUFFER, c->errbuf);
    SET(CURLOPT_PREREQFUNCTION, on_prereq);
    SET(CURLOPT_PREREQDATA, c);
    if (svc->max_response >= 0)
        SET(CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)svc->max_response);
    if (h->https) {
        /* HTTP/2 when the server offers it; PIPEWAIT lets a new call wait
         * for a stream on the connection being set up rather than open one
         * more TLS connection of its own. */
        SET(CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_2TLS);
        SET(CURLOPT_PIPEWAIT, 1L);
        if (!svc->tls_verify) {
            SET(CURLOPT_SSL_VERIFYPEER, 0L);
            SET(CURLOPT_SSL_VERIFYHOST, 0L);
        }
        if (svc->tls_ca != NULL)
            SET(CURLOPT_CAINFO, svc->tls_ca);
    } else {
        SET(CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_1_1);
    }
#undef SET
    return ok;
}

static void http_start(void *impl, jf_job *job)
{
    http_svc *h = impl;
    const jf_envelope *env = jf_job_envelope(job);
    size_t len;
    const void *body = jf_job_body(job, &len);

    call *c = calloc(1, sizeof *c);
    if (c == NULL) {
        fail_now(job, "http: out of memory");
        return;
    }
    c->h = h;
    c->job = job;
    c->easy = curl_easy_init();
    if (c->easy == NULL) {
        free(c);
        fail_now(job, "http: cannot create a transfer (out of memory)");
        return;
    }
    snprintf(c->idem, sizeof c->idem, "Idempotency-Key: %s", env->id);
    snprintf(c->attempt, sizeof c->attempt, "Jetfleet-Attempt: %u", jf_job_attempt(job));
    c->hdr[0].data = c->idem;
    c->hdr[0].next = &c->hdr[1];
    c->hdr[1].data = c->attempt;
    c->hdr[1].next = h->headers;
    if (!setup_easy(h, c, body, len)) {
        curl_easy_cleanup(c->easy);
        free(c);
        fail_now(job, "http: cannot set up the transfer (out of memory)");
        return;
    }
    CURLMcode mc = curl_multi_add_handle(h->multi, c->easy);
    if (mc != CURLM_OK) {
        char msg[128];
        snprintf(msg, sizeof msg, "http: cannot start the transfer: %s", curl_multi_strerror(mc));
        curl_easy_cleanup(c->easy);
        free(c);
        fail_now(job, msg);
        return;
    }
    c->next = &h->calls;
    c->prev = h->calls.prev;
    h->calls.prev->next = c;
    h->calls.prev = c;
    *jf_job_slot(job) = c;
}

static void http_cancel(void *impl, jf_job *job)
{
    (void)impl;
    call *c = *jf_job_slot(job);
    if (c == NULL)
        return;
    *jf_job_slot(job) = NULL;
    drop_call(c);
}

/* "host:port" of the url, for error lines, and whether it is https. */
static jf_status read_url(http_svc *h, jf_error *err)
{
    const jf_service_config *svc = h->svc;
    jf_status st = JF_OK;
    char *scheme = NULL, *host = NULL, *port = NULL;
    CURLU *u = curl_url();
    if (u == NULL) {
        jf_error_set(err, "service %s: out of memory", svc->name);
        return JF_ERR_NOMEM;
    }
    CURLUcode uc = curl_url_set(u, CURLUPART_URL, svc->url, 0);
    if (uc == CURLUE_OK)
        uc = curl_url_get(u, CURLUPART_SCHEME, &scheme, 0);
    if (uc == CURLUE_OK)
        uc = curl_url_get(u, CURLUPART_HOST, &host, 0);
    if (uc == CURLUE_OK)
        uc = curl_url_get(u, CURLUPART_PORT, &port, CURLU_DEFAULT_PORT);
    if (uc != CURLUE_OK) {
        /* The url itself is not quoted: it may carry credentials. */
        jf_error_set(err, "service %s: url: %s", svc->name, curl_url_strerror(uc));
        st = JF_ERR_INVALID;
        goto out;
    }
    if (strcasecmp(scheme, "http") != 0 && strcasecmp(scheme, "https") != 0) {
        jf_error_set(err, "service %s: url: scheme %s is not http or https", svc->name, scheme);
        st = JF_ERR_INVALID;
        goto out;
    }
    h->https = strcasecmp(scheme, "https") == 0;
    snprintf(h->target, sizeof h->target, "%s:%s", host, port);
out:
    curl_free(scheme);
    curl_free(host);
    curl_free(port);
    curl_url_cleanup(u);
    return st;
}

static jf_status build_headers(http_svc *h, jf_error *err)
{
    /* "Expect:" turns off curl's 100-continue round trip for big bodies. */
    const char *fixed[] = {"Content-Type: application/json", "Expect:"};
    for (size_t i = 0; i < sizeof fixed / sizeof fixed[0]; i++) {
        struct curl_slist *l = curl_slist_append(h->headers, fixed[i]);
        if (l == NULL)
            goto nomem;
        h->headers = l;
    }
    if (h->auth != NULL) {
        struct curl_slist *l = curl_slist_append(h->headers, h->auth);
        if (l == NULL)
            goto nomem;
        h->headers = l;
    }
    return JF_OK;
nomem:
    jf_error_set(err, "service %s: out of memory", h->svc->name);
    return JF_ERR_NOMEM;
}

static jf_status http_create(void **impl, uv_loop_t *loop, const jf_service_config *svc,
                             jf_error *err)
{
    jf_status st;
    http_svc *h = calloc(1, sizeof *h);
    if (h == NULL) {
        jf_error_set(err, "service %s: out of memory", svc->name);
        return JF_ERR_NOMEM;
    }
    h->loop = loop;
    h->svc = svc;
    h->calls.next = h->calls.prev = &h->calls;
    h->socks.next = h->socks.prev = &h->socks;
    h->timeout_ms = svc->timeout_ms > LONG_MAX ? LONG_MAX : (long)svc->timeout_ms;
    h->connect_timeout_ms =
        h->timeout_ms < CONNECT_TIMEOUT_MAX_MS ? h->timeout_ms : CONNECT_TIMEOUT_MAX_MS;
    h->body_max = svc->max_response < 0 || (uint64_t)svc->max_response > SIZE_MAX
                      ? SIZE_MAX
                      : (size_t)svc->max_response;

    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        jf_error_set(err, "service %s: cannot initialise libcurl", svc->name);
        st = JF_ERR_IO;
        goto fail;
    }
    h->curl_ready = true;
    if (svc->url == NULL) {
        jf_error_set(err, "service %s: kind = http needs url", svc->name);
        st = JF_ERR_INVALID;
        goto fail;
    }
    if ((st = read_url(h, err)) != JF_OK)
        goto fail;
    if ((st = jf_http_auth_load(&h->auth, svc, err)) != JF_OK)
        goto fail;
    if ((st = jf_http_required_parse(&h->req, svc->name, svc->result_required, err)) != JF_OK)
        goto fail;
    if ((st = build_headers(h, err)) != JF_OK)
        goto fail;
    h->multi = curl_multi_init();
    if (h->multi == NULL) {
        jf_error_set(err, "service %s: cannot create a libcurl multi handle", svc->name);
        st = JF_ERR_NOMEM;
        goto fail;
    }

    /* Nothing below fails: from here on the memory is freed by close
     * callbacks (see http_destroy). */
    uv_timer_init(loop, &h->timer);
    h->timer.data = h;
    h->timer_ready = true;

    long maxconn = svc->max_connections > 0 ? svc->max_connections : svc->fleet_in_flight;
    if (svc->max_connections <= 0 && maxconn < MAXCONNECTS_MIN)
        maxconn = MAXCONNECTS_MIN;
    if (maxconn > MAXCONNECTS_MAX)
        maxconn = MAXCONNECTS_MAX;
    curl_multi_setopt(h->multi, CURLMOPT_SOCKETFUNCTION, on_curl_socket);
    curl_multi_setopt(h->multi, CURLMOPT_SOCKETDATA, h);
    curl_multi_setopt(h->multi, CURLMOPT_TIMERFUNCTION, on_curl_timer);
    curl_multi_setopt(h->multi, CURLMOPT_TIMERDATA, h);
    curl_multi_setopt(h->multi, CURLMOPT_PIPELINING, (long)CURLPIPE_MULTIPLEX);
    curl_multi_setopt(h->multi, CURLMOPT_MAXCONNECTS, maxconn);
    if (svc->max_connections > 0)
        curl_multi_setopt(h->multi, CURLMOPT_MAX_HOST_CONNECTIONS, (long)svc->max_connections);

    if (h->https && !svc->tls_verify)
        jf_log(JF_LOG_WARN, "TLS verification is off: the service's certificate is not checked",
               JF_S("service", svc->name), JF_S("target", h->target));
    if (jf_log_enabled(JF_LOG_DEBUG))
        jf_log(JF_LOG_DEBUG, "http service ready", JF_S("service", svc->name),
               JF_S("target", h->target), JF_S("scheme", h->https ? "https" : "http"),
               JF_I("timeout_ms", h->timeout_ms), JF_I("max_connections", svc->max_connections),
               JF_S("auth_header", h->auth ? "set" : "none"));
    *impl = h;
    return JF_OK;

fail:
    free_svc(h); /* no uv handle exists yet */
    return st;
}

static void http_destroy(void *impl)
{
    http_svc *h = impl;
    if (h == NULL)
        return;
    /* The fleet cancels its jobs first; whatever is left is dropped
     * without an outcome (its job may be gone already: not touched). */
    for (call *c = h->calls.next, *next; c != &h->calls; c = next) {
        next = c->next;
        drop_call(c);
    }
    h->dying = true;
    curl_multi_cleanup(h->multi); /* closes the pooled connections */
    h->multi = NULL;
    for (sock *s = h->socks.next, *next; s != &h->socks; s = next) {
        next = s->next;
        sock_close(s);
    }
    uv_timer_stop(&h->timer);
    h->closing++;
    uv_close((uv_handle_t *)&h->timer, on_timer_closed);
}

const jf_handler_ops jf_handler_http = {
    .kind = "http",
    .create = http_create,
    .start = http_start,
    .cancel = http_cancel,
    .destroy = http_destroy,
};
