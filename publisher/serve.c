/* serve.c — `jetfleet-publisher serve`: the HTTP intake for services that do
 * not speak NATS.
 *
 *   POST /jobs        one envelope or a JSON array of them; 202 once every
 *                     PubAck is in: {"ids":[…],"seqs":[…],"duplicates":[…]}
 *   GET  /jobs/{id}   the job's ledger row ([postgres] dsn)
 *   GET  /healthz     200 while the NATS connection is up, else 503
 *
 * Threads: libmicrohttpd runs one thread per connection, because a request
 * blocks until JetStream acknowledges its jobs (or the ledger answers); a
 * slow PubAck then holds only its own connection. What the threads share is
 * read-only after start (config, token digest), thread-safe (the nats.c
 * connection), atomic (counters, the stopping flag) or behind a mutex held
 * for no I/O (the idle ledger connections).
 *
 * A request's jobs are validated as a whole before anything is published: a
 * 400 means nothing of the request was stored. Each job is published with
 * Nats-Msg-Id = its id, so repeating a request whose answer was lost (or a
 * 503 after a partial publish) stores every job once. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <jansson.h>
#include <libpq-fe.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <openssl/crypto.h>
#include <openssl/sha.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uuid/uuid.h>

#include "listen.h"
#include "envelope.h"
#include "publisher.h"

#define CONNECTION_LIMIT    256 /* connections (and so threads) at once */
#define IDLE_TIMEOUT_S      60  /* an idle keep-alive connection is closed after this */
#define LISTEN_BACKLOG      256
#define POOL_IDLE_MAX       4 /* idle ledger connections kept */
#define TOKEN_FILE_MAX      4096
#define PATH_LOG_MAX        256        /* bytes of a request path in the access log */
#define DRAIN_MAX           (4u << 20) /* body bytes past max_body read (and dropped) for a 413 */
#define LEDGER_TIMEOUT_S    "5"        /* connect_timeout of a ledger connection */
#define LEDGER_STATEMENT_MS "5000"

static void usage(FILE *out)
{
    fprintf(out,
            "Usage: %s [GLOBAL OPTIONS] serve [--listen HOST:PORT]\n"
            "\n"
            "HTTP intake: accepts jobs over HTTP and publishes them to JetStream.\n"
            "\n"
            "  POST /jobs       body: one job envelope, or a JSON array of at most\n"
            "                   [intake] max_jobs envelopes; an envelope without \"id\" gets\n"
            "                   a UUID. Answers 202 "
            "{\"ids\":[...],\"seqs\":[...],\"duplicates\":[...]}\n"
            "                   once JetStream has acknowledged every job; 400\n"
            "                   {\"error\":...,\"index\":i} for bad JSON or an invalid envelope\n"
            "                   (then nothing is published); 413 over [intake] max_body.\n"
            "  GET /jobs/{id}   the job's row in the ledger ([postgres] dsn): 200, or 404;\n"
            "                   501 without a ledger, 503 when it is unreachable.\n"
            "  GET /healthz     200 {\"status\":\"ok\",\"nats\":\"connected\"}, else 503.\n"
            "\n"
            "With [intake] token or token_file set, /jobs endpoints need the header\n"
            "'Authorization: Bearer <token>' (401 otherwise). Access log: one JSON line per\n"
            "request on stderr (method, path, status, ms). Prints 'listening on HOST:PORT'\n"
            "on stdout once ready; SIGTERM or SIGINT stops it after the requests in\n"
            "progress are answered.\n"
            "\n"
            "Options:\n"
            "  -l, --listen HOST:PORT  IPv4 address to listen on (default: [intake] listen,\n"
            "                          127.0.0.1:8080); port 0 picks a free port\n"
            "  -h, --help              show this help and exit\n",
            JF_PUBLISHER_PROG);
}

/* ------------------------------------------------------------------------- */
/* Ledger connections: taken from the idle list or opened, given back after  */
/* one query. The mutex guards the list only, never a query.                 */

typedef struct pgpool {
    pthread_mutex_t mu;
    const char *dsn; /* NULL: no ledger configured */
    PGconn *idle[POOL_IDLE_MAX];
    int nidle;
} pgpool;

/* The first line of libpq's message (it may span several). */
static void pg_message(char *why, size_t cap, const char *msg)
{
    size_t n = strcspn(msg ? msg : "", "\n");
    snprintf(why, cap, "%.*s", (int)n, msg ? msg : "");
}

static PGconn *pool_get(pgpool *p, bool fresh, char *why, size_t cap)
{
    PGconn *c = NULL;
    if (!fresh) {
        pthread_mutex_lock(&p->mu);
        if (p->nidle > 0)
            c = p->idle[--p->nidle];
        pthread_mutex_unlock(&p->mu);
        if (c != NULL)
            return c;
    }
    /* Ours first, so the same settings in the user's dsn win. */
    const char *keys[] = {"connect_timeout", "application_name", "options", "dbname", NULL};
    const char *vals[] = {LEDGER_TIMEOUT_S, "jetfleet-intake",
                          "-c statement_timeout=" LEDGER_STATEMENT_MS " -c TimeZone=UTC", p->dsn,
                          NULL};
    c = PQconnectdbParams(keys, vals, 1);
    if (c == NULL || PQstatus(c) != CONNECTION_OK) {
        pg_message(why, cap, c ? PQerrorMessage(c) : "out of memory");
        PQfinish(c);
        return NULL;
    }
    return c;
}

static void pool_put(pgpool *p, PGconn *c)
{
    if (c == NULL)
        return;
    if (PQstatus(c) == CONNECTION_OK && PQtransactionStatus(c) == PQTRANS_IDLE) {
        pthread_mutex_lock(&p->mu);
        if (p->nidle < POOL_IDLE_MAX) {
            p->idle[p->nidle++] = c;
            c = NULL;
        }
        pthread_mutex_unlock(&p->mu);
    }
    PQfinish(c);
}

static void pool_close(pgpool *p)
{
    while (p->nidle > 0)
        PQfinish(p->idle[--p->nidle]);
}

/* ------------------------------------------------------------------------- */
/* Shared state                                                              */

typedef struct intake {
    const jf_config *cfg;
    natsConnection *nc;
    size_t max_payload;
    size_t max_body;
    size_t max_jobs;
    int64_t timeout_ms;
    bool auth;
    unsigned char token_sha[SHA256_DIGEST_LENGTH];
    pgpool pool;
    atomic_bool stopping;
    atomic_int busy; /* requests publishing or querying the ledger, or not yet answered */
    atomic_ullong requests, jobs_accepted;
} intake;

typedef enum route {
    R_HEALTHZ,
    R_POST_JOBS,
    R_GET_JOB,
    R_ANSWERED, /* a response is queued (an early 4xx): ignore the body */
} route;

typedef struct request {
    int64_t start_ms;
    route route;
    char method[16];
    char path[PATH_LOG_MAX + 4];
    char *body;
    size_t len, cap;
    size_t dropped;     /* body bytes beyond max_body, read and thrown away */
    unsigned status;    /* answered with; 0 while none */
    const char *closed; /* why the connection was closed without an answer */
    size_t njobs;
    bool busy; /* counted in intake.busy until on_completed */
} request;

/* One envelope of a POST. */
typedef struct item {
    char *owned; /* the envelope with a generated id, or NULL */
    const char *data;
    size_t len;
    jf_envelope *env;
    char subject[3 * JF_TOKEN_MAX + 32];
    bool done; /* PubAck seen (ok or error) */
    bool ok;
    uint64_t seq;
    bool duplicate;
    char error[256];
} item;

/* ------------------------------------------------------------------------- */
/* Responses                                                                 */

static enum MHD_Result send_text(request *r, struct MHD_Connection *conn, unsigned status,
                                 char *text, size_t len, const char *allow, bool auth_challenge)
{
    struct MHD_Response *resp = MHD_create_response_from_buffer(len, text, MHD_RESPMEM_MUST_FREE);
    if (resp == NULL) {
        free(text);
        return MHD_NO;
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
    if (allow != NULL)
        MHD_add_response_header(resp, MHD_HTTP_HEADER_ALLOW, allow);
    if (auth_challenge)
        MHD_add_response_header(resp, MHD_HTTP_HEADER_WWW_AUTHENTICATE,
                                "Bearer realm=\"jetfleet\"");
    enum MHD_Result ret = MHD_queue_response(conn, status, resp);
    MHD_destroy_response(resp);
    if (ret == MHD_YES)
        r->status = status;
    return ret;
}

/* Takes body (a JSON value) and answers it, with a newline for curl users. */
static enum MHD_Result send_json(request *r, struct MHD_Connection *conn, unsigned status,
                                 json_t *body, const char *allow, bool auth_challenge)
{
    char *text = body ? json_dumps(body, JSON_COMPACT) : NULL;
    json_decref(body);
    if (text == NULL)
        return MHD_NO;
    size_t len = strlen(text);
    char *t = realloc(text, len + 2);
    if (t == NULL) {
        free(text);
        return MHD_NO;
    }
    t[len++] = '\n';
    t[len] = '\0';
    return send_text(r, conn, status, t, len, allow, auth_challenge);
}

/* {"error": message[, "index": i]}; index < 0 leaves it out. */
static enum MHD_Result send_error(request *r, struct MHD_Connection *conn, unsigned status,
                                  long index, const char *allow, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));

static enum MHD_Result send_error(request *r, struct MHD_Connection *conn, unsigned status,
                                  long index, const char *allow, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    json_t *j = json_object();
    json_object_set_new(j, "error", json_string(msg));
    if (json_object_get(j, "error") == NULL) /* not UTF-8: an echoed byte of bad input */
        json_object_set_new(j, "error", json_string("invalid request"));
    if (index >= 0)
        json_object_set_new(j, "index", json_integer(index));
    return send_json(r, conn, status, j, allow, status == MHD_HTTP_UNAUTHORIZED);
}

/* ------------------------------------------------------------------------- */
/* Authentication                                                            */

/* Compares digests, so neither the token's bytes nor its length show in the
 * time a wrong guess takes. */
static bool token_ok(const intake *in, const char *header)
{
    if (header == NULL || strncasecmp(header, "Bearer ", 7) != 0)
        return false;
    const char *tok = header + 7;
    while (*tok == ' ')
        tok++;
    unsigned char d[SHA256_DIGEST_LENGTH];
    SHA256((const unsigned char *)tok, strlen(tok), d);
    return CRYPTO_memcmp(d, in->token_sha, sizeof d) == 0;
}

/* The token from [intake] token, or the first line of token_file. Returns
 * an exit code; the token itself is never printed. */
static int load_token(intake *in, const jf_config *cfg)
{
    char buf[TOKEN_FILE_MAX + 1];
    const char *tok = cfg->intake.token;
    if (cfg->intake.token_file != NULL) {
        int fd = open(cfg->intake.token_file, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            return jf_pub_usage_error("serve", "[intake] token_file: cannot open %s: %s",
                                      cfg->intake.token_file, strerror(errno));
        size_t n = 0;
        for (;;) {
            ssize_t got = read(fd, buf + n, sizeof buf - 1 - n);
            if (got < 0 && errno == EINTR)
                continue;
            if (got < 0) {
                int e = errno;
                close(fd);
                return jf_pub_usage_error("serve", "[intake] token_file: cannot read %s: %s",
                                          cfg->intake.token_file, strerror(e));
            }
            if (got == 0 || (n += (size_t)got) == sizeof buf - 1)
                break;
        }
        close(fd);
        buf[n] = '\0';
        buf[strcspn(buf, "\r\n")] = '\0';
        size_t len = strlen(buf);
        while (len > 0 && (buf[len - 1] == ' ' || buf[len - 1] == '\t'))
            buf[--len] = '\0';
        if (len == 0)
            return jf_pub_usage_error("serve",
                                      "[intake] token_file: %s has no token on its first line",
                                      cfg->intake.token_file);
        tok = buf;
    }
    if (tok != NULL) {
        in->auth = true;
        SHA256((const unsigned char *)tok, strlen(tok), in->token_sha);
    }
    OPENSSL_cleanse(buf, sizeof buf);
    return JF_EXIT_OK;
}

/* ------------------------------------------------------------------------- */
/* POST /jobs                                                                */

static bool is_ws(char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

typedef struct split_result {
    long index;
    char why[256];
} split_result;

static void split_fail(split_result *res, long index, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void split_fail(split_result *res, long index, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(res->why, sizeof res->why, fmt, ap);
    va_end(ap);
    res->index = index;
}

static bool push_item(item **v, size_t *n, size_t *cap, const char *p, size_t len)
{
    if (*n == *cap) {
        size_t ncap = *cap ? *cap * 2 : 8;
        item *nv = realloc(*v, ncap * sizeof *nv);
        if (nv == NULL)
            return false;
        *v = nv;
        *cap = ncap;
    }
    memset(&(*v)[*n], 0, sizeof **v);
    (*v)[*n].data = p;
    (*v)[*n].len = len;
    (*n)++;
    return true;
}

/* Cuts the body into envelopes: the whole body, or the elements of a
 * top-level array, as byte ranges, so each job is published with the bytes
 * the client sent. Only the array's own brackets and commas are looked at
 * (outside strings); each element is then checked by jf_envelope_parse.
 * Returns 0, or the HTTP status to answer with res saying why. */
static unsigned split_body(const char *b, size_t n, size_t max_jobs, item **items, size_t *count,
                           split_result *res)
{
    size_t cap = 0, i = 0;
    *count = 0;
    res->index = 0;
    while (i < n && is_ws(b[i]))
        i++;
    while (n > i && is_ws(b[n - 1]))
        n--;
    if (i == n) {
        split_fail(res, 0, "empty body: expected a job envelope or an array of envelopes");
        return MHD_HTTP_BAD_REQUEST;
    }
    if (b[i] != '[') {
        if (!push_item(items, count, &cap, b + i, n - i))
            goto nomem;
        return 0;
    }
    i++;
    while (i < n && is_ws(b[i]))
        i++;
    if (i < n && b[i] == ']') {
        split_fail(res, 0, "the array holds no envelopes");
        return MHD_HTTP_BAD_REQUEST;
    }
    for (;;) {
        while (i < n && is_ws(b[i]))
            i++;
        size_t start = i;
        int depth = 0;
        bool in_str = false;
        for (; i < n; i++) {
            char c = b[i];
            if (in_str) {
                if (c == '\\')
                    i++;
                else if (c == '"')
                    in_str = false;
                continue;
            }
            if (c == '"') {
                in_str = true;
            } else if (c == '{' || c == '[') {
                depth++;
            } else if (c == '}' || c == ']') {
                if (depth == 0)
                    break;
                depth--;
            } else if (c == ',' && depth == 0) {
                break;
            }
        }
        if (i >= n) {
            split_fail(res, (long)*count, "not valid JSON: the array is not closed");
            return MHD_HTTP_BAD_REQUEST;
        }
        if (b[i] == '}') {
            split_fail(res, (long)*count, "not valid JSON: unexpected '}'");
            return MHD_HTTP_BAD_REQUEST;
        }
        size_t end = i;
        while (end > start && is_ws(b[end - 1]))
            end--;
        if (*count == max_jobs) {
            split_fail(res, (long)*count,
                       "more than %zu envelopes in one request ([intake] max_jobs)", max_jobs);
            return MHD_HTTP_CONTENT_TOO_LARGE;
        }
        if (!push_item(items, count, &cap, b + start, end - start))
            goto nomem;
        if (b[i++] == ']')
            break;
    }
    while (i < n && is_ws(b[i]))
        i++;
    if (i != n) {
        split_fail(res, (long)*count - 1, "not valid JSON: bytes after the array");
        return MHD_HTTP_BAD_REQUEST;
    }
    return 0;
nomem:
    split_fail(res, -1, "out of memory");
    return MHD_HTTP_SERVICE_UNAVAILABLE;
}

/* Validates one envelope (adding an id when it has none, as `publish`
 * does) and forms its subject. */
static bool prepare_item(const intake *in, item *it, char *why, size_t cap)
{
    if (it->len > 0 && it->data[0] == '{') {
        json_error_t je;
        json_t *root = json_loadb(it->data, it->len, JSON_REJECT_DUPLICATES, &je);
        if (json_is_object(root) && json_object_get(root, "id") == NULL) {
            uuid_t u;
            char id[40];
            uuid_generate_random(u);
            uuid_unparse_lower(u, id);
            size_t j = 1;
            while (j < it->len && is_ws(it->data[j]))
                j++;
            bool empty = j < it->len && it->data[j] == '}';
            size_t room = it->len + strlen(id) + 16;
            it->owned = malloc(room);
            if (it->owned == NULL) {
                json_decref(root);
                snprintf(why, cap, "out of memory");
                return false;
            }
            int k = snprintf(it->owned, room, "{\"id\":\"%s\"%s", id, empty ? "" : ",");
            memcpy(it->owned + k, it->data + 1, it->len - 1);
            it->data = it->owned;
            it->len = (size_t)k + it->len - 1;
        }
        json_decref(root);
    }
    jf_error err = {{0}};
    if (jf_envelope_parse(&it->env, it->data, it->len, NULL, in->max_payload, &err) != JF_OK) {
        snprintf(why, cap, "invalid envelope: %s", err.msg);
        return false;
    }
    if (jf_subject_format(it->subject, sizeof it->subject, "jobs", it->env->service,
                          it->env->priority, it->env->type) != JF_OK) {
        snprintf(why, cap, "invalid envelope: subject too long");
        return false;
    }
    return true;
}

static void read_puback(const intake *in, item *it, natsMsg *m)
{
    const char *status = NULL;
    it->done = true;
    if (natsMsg_GetDataLength(m) == 0 && natsMsgHeader_Get(m, "Status", &status) == NATS_OK) {
        snprintf(it->error, sizeof it->error, "%s",
                 strcmp(status, "503") == 0 ? "no stream stores the subject" : "status reply");
        return;
    }
    json_error_t je;
    json_t *pa = json_loadb(natsMsg_GetData(m), (size_t)natsMsg_GetDataLength(m), 0, &je);
    json_t *e = json_object_get(pa, "error");
    const char *stream = json_string_value(json_object_get(pa, "stream"));
    if (pa == NULL) {
        snprintf(it->error, sizeof it->error, "malformed PubAck");
    } else if (e != NULL) {
        const char *d = json_string_value(json_object_get(e, "description"));
        snprintf(it->error, sizeof it->error, "JetStream: %s", d ? d : "error");
    } else if (stream == NULL || strcmp(stream, in->cfg->stream.name) != 0) {
        /* Another stream holding jobs.> took it, where no consumer looks. */
        snprintf(it->error, sizeof it->error, "stored by stream %s, not [stream] name",
                 stream ? stream : "(none)");
    } else {
        it->ok = true;
        it->seq = (uint64_t)json_integer_value(json_object_get(pa, "seq"));
        it->duplicate = json_is_true(json_object_get(pa, "duplicate"));
    }
    json_decref(pa);
}

/* One job: nats.c's request shares one reply subscription across the
 * connection, which spares a SUB and an UNSUB per request. */
static size_t publish_one(const intake *in, item *it)
{
    natsMsg *m = NULL, *reply = NULL;
    natsStatus s = natsMsg_Create(&m, it->subject, NULL, it->data, (int)it->len);
    if (s == NATS_OK)
        s = natsMsgHeader_Set(m, "Nats-Msg-Id", it->env->id);
    if (s == NATS_OK)
        s = natsConnection_RequestMsg(&reply, in->nc, m, in->timeout_ms);
    if (s == NATS_OK) {
        read_puback(in, it, reply);
    } else {
        it->done = true;
        snprintf(it->error, sizeof it->error, "%s",
                 s == NATS_TIMEOUT         ? "no acknowledgement within [publisher] timeout"
                 : s == NATS_NO_RESPONDERS ? "no stream stores the subject"
                                           : natsStatus_GetText(s));
    }
    natsMsg_Destroy(reply);
    natsMsg_Destroy(m);
    return it->ok ? 0 : 1;
}

/* Publishes every item with its own reply subject under one inbox, so the
 * PubAcks of this request are told apart from any other request's, and
 * waits for them until [publisher] timeout. Returns how many failed. */
static size_t publish_items(const intake *in, item *items, size_t n)
{
    natsInbox *inbox = NULL;
    natsSubscription *sub = NULL;
    char wild[160], reply[192];
    size_t pending = 0, failed = 0;
    natsStatus s;

    if (natsConnection_Status(in->nc) != NATS_CONN_STATUS_CONNECTED) {
        for (size_t i = 0; i < n; i++)
            snprintf(items[i].error, sizeof items[i].error, "NATS is not connected");
        return n;
    }
    if (n == 1)
        return publish_one(in, &items[0]);
    s = natsInbox_Create(&inbox);
    if (s == NATS_OK) {
        snprintf(wild, sizeof wild, "%s.*", (const char *)inbox);
        s = natsConnection_SubscribeSync(&sub, in->nc, wild);
    }
    /* Room for every PubAck of the request, whatever the default limits. */
    if (s == NATS_OK && n > 1000)
        s = natsSubscription_SetPendingLimits(sub, (int)n + 16, -1);
    if (s != NATS_OK) {
        for (size_t i = 0; i < n; i++)
            snprintf(items[i].error, sizeof items[i].error, "%s", natsStatus_GetText(s));
        failed = n;
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        natsMsg *m = NULL;
        snprintf(reply, sizeof reply, "%s.%zu", (const char *)inbox, i);
        s = natsMsg_Create(&m, items[i].subject, reply, items[i].data, (int)items[i].len);
        if (s == NATS_OK)
            s = natsMsgHeader_Set(m, "Nats-Msg-Id", items[i].env->id);
        if (s == NATS_OK)
            s = natsConnection_PublishMsg(in->nc, m);
        natsMsg_Destroy(m);
        if (s != NATS_OK) {
            items[i].done = true;
            snprintf(items[i].error, sizeof items[i].error, "%s", natsStatus_GetText(s));
        } else {
            pending++;
        }
    }
    int64_t deadline = jf_pub_mono_ms() + in->timeout_ms;
    while (pending > 0) {
        int64_t left = deadline - jf_pub_mono_ms();
        if (left <= 0)
            break;
        natsMsg *m = NULL;
        s = natsSubscription_NextMsg(&m, sub, left);
        if (s != NATS_OK)
            break;
        const char *dot = strrchr(natsMsg_GetSubject(m), '.');
        char *end = NULL;
        unsigned long long idx = dot ? strtoull(dot + 1, &end, 10) : n;
        if (dot != NULL && *end == '\0' && idx < n && !items[idx].done) {
            read_puback(in, &items[idx], m);
            pending--;
        }
        natsMsg_Destroy(m);
    }
    for (size_t i = 0; i < n; i++) {
        if (!items[i].done)
            snprintf(items[i].error, sizeof items[i].error,
                     "no acknowledgement within [publisher] timeout");
        if (!items[i].ok)
            failed++;
    }
out:
    if (sub != NULL) {
        natsSubscription_Unsubscribe(sub);
        natsSubscription_Destroy(sub);
    }
    natsInbox_Destroy(inbox);
    return failed;
}

static json_t *ack_lists(const item *items, size_t n)
{
    json_t *ids = json_array(), *seqs = json_array(), *dups = json_array();
    for (size_t i = 0; i < n; i++) {
        json_array_append_new(ids, json_string(items[i].env->id));
        json_array_append_new(seqs,
                              items[i].ok ? json_integer((json_int_t)items[i].seq) : json_null());
        json_array_append_new(dups, json_boolean(items[i].ok && items[i].duplicate));
    }
    return json_pack("{s:o,s:o,s:o}", "ids", ids, "seqs", seqs, "duplicates", dups);
}

static enum MHD_Result handle_post(intake *in, request *r, struct MHD_Connection *conn)
{
    item *items = NULL;
    size_t n = 0;
    split_result sr;
    enum MHD_Result ret;

    if (r->dropped > 0)
        return send_error(r, conn, MHD_HTTP_CONTENT_TOO_LARGE, -1, NULL,
                          "body larger than %zu bytes ([intake] max_body)", in->max_body);
    unsigned status = split_body(r->body ? r->body : "", r->len, in->max_jobs, &items, &n, &sr);
    if (status != 0) {
        ret = send_error(r, conn, status, sr.index, NULL, "%s", sr.why);
        goto out;
    }
    r->njobs = n;
    for (size_t i = 0; i < n; i++) {
        char why[JF_ERROR_MAX + 32];
        if (!prepare_item(in, &items[i], why, sizeof why)) {
            ret = send_error(r, conn, MHD_HTTP_BAD_REQUEST, (long)i, NULL, "%s", why);
            goto out;
        }
    }

    if (jf_log_enabled(JF_LOG_DEBUG))
        jf_log(JF_LOG_DEBUG, "publishing", JF_S("job_id", items[0].env->id),
               JF_S("subject", items[0].subject), JF_I("jobs", n));
    size_t failed = publish_items(in, items, n);
    if (failed > 0) {
        size_t first = 0;
        while (items[first].ok)
            first++;
        jf_log(JF_LOG_WARN, "publish failed", JF_S("job_id", items[first].env->id),
               JF_S("subject", items[first].subject), JF_S("error", items[first].error),
               JF_I("failed", failed), JF_I("jobs", n));
        json_t *j = ack_lists(items, n);
        char msg[512];
        snprintf(msg, sizeof msg,
                 "%zu of %zu jobs not acknowledged (first: %s); sending the same request again "
                 "is safe: ids already stored are not stored twice",
                 failed, n, items[first].error);
        json_object_set_new(j, "error", json_string(msg));
        json_object_set_new(j, "index", json_integer((json_int_t)first));
        ret = send_json(r, conn, MHD_HTTP_SERVICE_UNAVAILABLE, j, NULL, false);
        goto out;
    }
    atomic_fetch_add(&in->jobs_accepted, n);
    ret = send_json(r, conn, MHD_HTTP_ACCEPTED, ack_lists(items, n), NULL, false);
out:
    for (size_t i = 0; i < n; i++) {
        jf_envelope_destroy(items[i].env);
        free(items[i].owned);
    }
    free(items);
    return ret;
}

/* ------------------------------------------------------------------------- */
/* GET /jobs/{id}                                                            */

/* Every column, so what later migrations add (replays, …) shows too;
 * timestamps come out as RFC 3339 in UTC (TimeZone set on connect). */
static const char LEDGER_SQL[] =
    "SELECT row_to_json(j)::text FROM jetfleet_jobs j WHERE job_id = $1";

static enum MHD_Result handle_get_job(intake *in, request *r, struct MHD_Connection *conn,
                                      const char *id)
{
    char why[512];
    /* MHD has percent-decoded the path already: /jobs/a%2Fb asks for "a/b". */
    if (strlen(id) > JF_ID_MAX)
        return send_error(r, conn, MHD_HTTP_BAD_REQUEST, -1, NULL, "job id: longer than %d bytes",
                          JF_ID_MAX);
    json_t *idj = json_string(id);
    if (idj == NULL)
        return send_error(r, conn, MHD_HTTP_BAD_REQUEST, -1, NULL, "job id: not UTF-8");
    if (in->pool.dsn == NULL) {
        json_decref(idj);
        return send_error(r, conn, MHD_HTTP_NOT_IMPLEMENTED, -1, NULL,
                          "no ledger configured ([postgres] dsn is empty)");
    }

    /* An idle connection may have died with a server restart: one more try
     * on a fresh one before calling the ledger unreachable. */
    PGresult *res = NULL;
    PGconn *c = NULL;
    for (int attempt = 0; attempt < 2; attempt++) {
        c = pool_get(&in->pool, attempt > 0, why, sizeof why);
        if (c == NULL)
            break;
        const char *params[1] = {id};
        res = PQexecParams(c, LEDGER_SQL, 1, NULL, params, NULL, NULL, 0);
        if (PQstatus(c) == CONNECTION_OK)
            break;
        pg_message(why, sizeof why, PQerrorMessage(c));
        PQclear(res);
        res = NULL;
        PQfinish(c);
        c = NULL;
    }
    if (c == NULL) {
        json_decref(idj);
        jf_log(JF_LOG_WARN, "ledger unreachable", JF_S("job_id", id), JF_S("error", why));
        return send_error(r, conn, MHD_HTTP_SERVICE_UNAVAILABLE, -1, NULL, "ledger unreachable: %s",
                          why);
    }
    enum MHD_Result ret;
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
        pg_message(why, sizeof why, PQresultErrorMessage(res));
        if (state != NULL && strcmp(state, "42P01") == 0)
            ret = send_error(r, conn, MHD_HTTP_SERVICE_UNAVAILABLE, -1, NULL,
                             "the ledger has no table jetfleet_jobs yet (jetfleet-consumer "
                             "creates it)");
        else
            ret = send_error(r, conn, MHD_HTTP_SERVICE_UNAVAILABLE, -1, NULL,
                             "ledger query failed: %s", why);
    } else if (PQntuples(res) == 0) {
        json_t *j = json_pack("{s:s,s:O}", "error", "no such job in the ledger", "job_id", idj);
        ret = send_json(r, conn, MHD_HTTP_NOT_FOUND, j, NULL, false);
    } else {
        const char *text = PQgetvalue(res, 0, 0);
        size_t len = strlen(text);
        char *copy = malloc(len + 2);
        if (copy == NULL) {
            ret = MHD_NO;
        } else {
            memcpy(copy, text, len);
            copy[len++] = '\n';
            copy[len] = '\0';
            ret = send_text(r, conn, MHD_HTTP_OK, copy, len, NULL, false);
        }
    }
    PQclear(res);
    pool_put(&in->pool, c);
    json_decref(idj);
    return ret;
}

/* ------------------------------------------------------------------------- */
/* GET /healthz                                                              */

static const char *conn_state(natsConnStatus st)
{
    switch (st) {
    case NATS_CONN_STATUS_CONNECTED:
        return "connected";
    case NATS_CONN_STATUS_CONNECTING:
        return "connecting";
    case NATS_CONN_STATUS_RECONNECTING:
        return "reconnecting";
    case NATS_CONN_STATUS_CLOSED:
        return "closed";
    case NATS_CONN_STATUS_DRAINING_SUBS:
    case NATS_CONN_STATUS_DRAINING_PUBS:
        return "draining";
    default:
        return "disconnected";
    }
}

static enum MHD_Result handle_healthz(intake *in, request *r, struct MHD_Connection *conn)
{
    natsConnStatus st = natsConnection_Status(in->nc);
    bool up = st == NATS_CONN_STATUS_CONNECTED && !atomic_load(&in->stopping);
    json_t *j = json_pack("{s:s,s:s}", "status", up ? "ok" : "unavailable", "nats", conn_state(st));
    return send_json(r, conn, up ? MHD_HTTP_OK : MHD_HTTP_SERVICE_UNAVAILABLE, j, NULL, false);
}

/* ------------------------------------------------------------------------- */
/* MHD callbacks                                                             */

static bool is_get(const char *m)
{
    return strcmp(m, MHD_HTTP_METHOD_GET) == 0 || strcmp(m, MHD_HTTP_METHOD_HEAD) == 0;
}

/* First call of a request: route it, and answer at once what needs no
 * body (errors, auth, a Content-Length over the limit). */
static enum MHD_Result begin(intake *in, request *r, struct MHD_Connection *conn, const char *url,
                             const char *method)
{
    bool jobs = strcmp(url, "/jobs") == 0;
    bool job = strncmp(url, "/jobs/", 6) == 0 && url[6] != '\0';
    r->route = R_ANSWERED;
    if (strcmp(url, "/healthz") == 0) {
        if (!is_get(method))
            return send_error(r, conn, MHD_HTTP_METHOD_NOT_ALLOWED, -1, "GET, HEAD", "%s takes GET",
                              url);
        r->route = R_HEALTHZ;
        return MHD_YES;
    }
    if (!jobs && !job)
        return send_error(r, conn, MHD_HTTP_NOT_FOUND, -1, NULL,
                          "no such endpoint (POST /jobs, GET /jobs/{id}, GET /healthz)");
    if (jobs && strcmp(method, MHD_HTTP_METHOD_POST) != 0)
        return send_error(r, conn, MHD_HTTP_METHOD_NOT_ALLOWED, -1, "POST", "/jobs takes POST");
    if (job && !is_get(method))
        return send_error(r, conn, MHD_HTTP_METHOD_NOT_ALLOWED, -1, "GET, HEAD",
                          "/jobs/{id} takes GET");
    if (in->auth) {
        const char *h =
            MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
        if (h == NULL)
            return send_error(r, conn, MHD_HTTP_UNAUTHORIZED, -1, NULL,
                              "missing 'Authorization: Bearer <token>'");
        if (!token_ok(in, h))
            return send_error(r, conn, MHD_HTTP_UNAUTHORIZED, -1, NULL, "invalid bearer token");
    }
    if (atomic_load(&in->stopping))
        return send_error(r, conn, MHD_HTTP_SERVICE_UNAVAILABLE, -1, NULL, "shutting down");
    if (jobs) {
        const char *cl =
            MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        if (cl != NULL && strtoull(cl, NULL, 10) > in->max_body)
            return send_error(r, conn, MHD_HTTP_CONTENT_TOO_LARGE, -1, NULL,
                              "body larger than %zu bytes ([intake] max_body)", in->max_body);
        r->route = R_POST_JOBS;
        return MHD_YES;
    }
    r->route = R_GET_JOB;
    return MHD_YES;
}

static bool body_append(intake *in, request *r, const char *data, size_t n)
{
    if (r->dropped > 0 || n > in->max_body - r->len) {
        r->dropped += n;
        /* A chunked body far beyond the limit is not worth reading to the
         * end for a 413: close the connection instead. */
        if (r->dropped <= in->max_body || r->dropped <= DRAIN_MAX)
            return true;
        r->closed = "body far beyond [intake] max_body; connection closed";
        return false;
    }
    if (r->len + n > r->cap) {
        size_t ncap = r->cap ? r->cap : 4096;
        while (ncap < r->len + n)
            ncap *= 2;
        if (ncap > in->max_body)
            ncap = in->max_body;
        char *nb = realloc(r->body, ncap + 1);
        if (nb == NULL) {
            r->closed = "out of memory for the body";
            return false;
        }
        r->body = nb;
        r->cap = ncap;
    }
    memcpy(r->body + r->len, data, n);
    r->len += n;
    return true;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version, const char *upload_data,
                                  size_t *upload_data_size, void **con_cls)
{
    intake *in = cls;
    request *r = *con_cls;

    if (r == NULL) {
        r = calloc(1, sizeof *r);
        if (r == NULL)
            return MHD_NO;
        *con_cls = r;
        r->start_ms = jf_pub_mono_ms();
        snprintf(r->method, sizeof r->method, "%s", method);
        size_t ul = strlen(url);
        snprintf(r->path, sizeof r->path, "%.*s%s", PATH_LOG_MAX, url,
                 ul > PATH_LOG_MAX ? "..." : "");
        atomic_fetch_add(&in->requests, 1);
        return begin(in, r, conn, url, method);
    }
    if (*upload_data_size > 0) {
        bool keep = r->route != R_POST_JOBS || body_append(in, r, upload_data, *upload_data_size);
        *upload_data_size = 0;
        return keep ? MHD_YES : MHD_NO;
    }
    enum MHD_Result ret = MHD_YES;
    switch (r->route) {
    case R_ANSWERED:
        break;
    case R_HEALTHZ:
        ret = handle_healthz(in, r, conn);
        break;
    /* Busy until on_completed, not until the handler returns: MHD writes the
     * queued answer after that, and MHD_stop_daemon at shutdown would close
     * the socket under it (the client would get no 202 for published jobs). */
    case R_POST_JOBS:
        atomic_fetch_add(&in->busy, 1);
        r->busy = true;
        ret = handle_post(in, r, conn);
        break;
    case R_GET_JOB:
        atomic_fetch_add(&in->busy, 1);
        r->busy = true;
        ret = handle_get_job(in, r, conn, url + 6);
        break;
    }
    r->route = R_ANSWERED;
    return ret;
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    request *r = *con_cls;
    if (r == NULL)
        return;
    if (r->busy)
        atomic_fetch_sub(&((intake *)cls)->busy, 1);
    int64_t ms = jf_pub_mono_ms() - r->start_ms;
    if (r->status == 0)
        jf_log(JF_LOG_INFO, "request", JF_S("method", r->method), JF_S("path", r->path),
               JF_I("status", 0), JF_I("ms", ms),
               JF_S("error", r->closed ? r->closed : "connection closed before an answer"));
    else if (r->njobs > 0)
        jf_log(JF_LOG_INFO, "request", JF_S("method", r->method), JF_S("path", r->path),
               JF_I("status", r->status), JF_I("ms", ms), JF_I("jobs", r->njobs));
    else
        jf_log(JF_LOG_INFO, "request", JF_S("method", r->method), JF_S("path", r->path),
               JF_I("status", r->status), JF_I("ms", ms));
    free(r->body);
    free(r);
    *con_cls = NULL;
}

__attribute__((format(printf, 2, 0))) static void on_mhd_log(void *cls, const char *fmt, va_list ap)
{
    char msg[512];
    vsnprintf(msg, sizeof msg, fmt, ap);
    msg[strcspn(msg, "\n")] = '\0';
    jf_log(JF_LOG_WARN, "http server", JF_S("error", msg));
}

/* ------------------------------------------------------------------------- */
/* Start and stop                                                            */

/* Our own socket: a port in use is reported as such, and port 0 resolves
 * to the port the kernel chose. */
static int open_listener(const struct sockaddr_in *addr, uint16_t *port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    int one = 1;
    struct sockaddr_in bound;
    socklen_t blen = sizeof bound;
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
        bind(fd, (const struct sockaddr *)addr, sizeof *addr) != 0 ||
        listen(fd, LISTEN_BACKLOG) != 0 || getsockname(fd, (struct sockaddr *)&bound, &blen) != 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    *port = ntohs(bound.sin_port);
    return fd;
}

int jf_cmd_serve(int argc, char **argv, const jf_pub_globals *g)
{
    static const struct option longopts[] = {
        {"listen", required_argument, NULL, 'l'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *listen_arg = NULL;
    jf_pub_session sess = {0};
    intake in = {0};
    struct MHD_Daemon *daemon = NULL;
    struct sockaddr_in addr;
    int c, rc, lfd = -1;
    bool mu_init = false;
    sigset_t sigs;

    opterr = 0;
    while ((c = getopt_long(argc, argv, ":l:h", longopts, NULL)) != -1) {
        switch (c) {
        case 'l':
            listen_arg = optarg;
            break;
        case 'h':
            usage(stdout);
            return JF_EXIT_OK;
        case ':':
            return jf_pub_usage_error("serve", "option %s needs a value", argv[optind - 1]);
        default:
            return jf_pub_usage_error("serve", "unknown option %s", jf_pub_bad_option(argc, argv));
        }
    }
    if (optind < argc)
        return jf_pub_usage_error("serve", "unexpected argument '%s'", argv[optind]);
    if (listen_arg != NULL && !jf_listen_parse(&addr, listen_arg))
        return jf_pub_usage_error("serve", "--listen: '%s' is not an IPv4 HOST:PORT", listen_arg);

    if ((rc = jf_pub_session_load(&sess, g)) != JF_EXIT_OK)
        goto out;
    const jf_config *cfg = sess.cfg;
    if (listen_arg == NULL && !jf_listen_parse(&addr, cfg->intake.listen)) {
        rc = jf_pub_usage_error("serve", "[intake] listen: '%s' is not an IPv4 HOST:PORT",
                                cfg->intake.listen);
        goto out;
    }
    if ((rc = load_token(&in, cfg)) != JF_EXIT_OK)
        goto out;
    in.cfg = cfg;
    in.max_body = (size_t)cfg->intake.max_body;
    in.max_jobs = (size_t)cfg->intake.max_jobs;
    in.timeout_ms = cfg->publisher.timeout_ms > 0 ? cfg->publisher.timeout_ms : 5000;
    in.pool.dsn = cfg->postgres_dsn;
    pthread_mutex_init(&in.pool.mu, NULL);
    mu_init = true;

    /* SIGTERM and SIGINT are taken by sigwait below; every thread created
     * from here on (nats.c's, MHD's) inherits the mask. */
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);

    if ((rc = jf_pub_session_connect(&sess, g, NULL)) != JF_EXIT_OK)
        goto out;
    in.nc = sess.nc;
    in.max_payload = sess.max_payload;

    char host[INET_ADDRSTRLEN], where[64];
    uint16_t port = 0;
    inet_ntop(AF_INET, &addr.sin_addr, host, sizeof host);
    snprintf(where, sizeof where, "%s:%u", host, (unsigned)ntohs(addr.sin_port));
    if ((lfd = open_listener(&addr, &port)) < 0) {
        jf_log(JF_LOG_ERROR, "cannot listen", JF_S("address", where),
               JF_S("error", strerror(errno)));
        rc = JF_EXIT_FAIL;
        goto out;
    }
    unsigned flags = MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ITC |
                     MHD_USE_AUTO | MHD_USE_ERROR_LOG;
    /* The logger first: MHD reports problems with later options through it. */
    daemon = MHD_start_daemon(flags, 0, NULL, NULL, on_request, &in, MHD_OPTION_EXTERNAL_LOGGER,
                              on_mhd_log, NULL, MHD_OPTION_LISTEN_SOCKET, (MHD_socket)lfd,
                              MHD_OPTION_CONNECTION_LIMIT, (unsigned)CONNECTION_LIMIT,
                              MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)IDLE_TIMEOUT_S,
                              MHD_OPTION_NOTIFY_COMPLETED, on_completed, &in, MHD_OPTION_END);
    if (daemon == NULL) {
        jf_log(JF_LOG_ERROR, "cannot start the HTTP server", JF_S("address", where),
               JF_S("error", "MHD_start_daemon failed"));
        rc = JF_EXIT_FAIL;
        goto out;
    }
    lfd = -1; /* MHD's now; MHD_quiesce_daemon hands it back */
    snprintf(where, sizeof where, "%s:%u", host, (unsigned)port);
    jf_log(JF_LOG_INFO, "intake ready", JF_S("listen", where), JF_S("stream", cfg->stream.name),
           JF_S("auth", in.auth ? "bearer" : "none"),
           JF_S("ledger", in.pool.dsn ? "configured" : "none"), JF_I("max_body", in.max_body),
           JF_I("max_jobs", in.max_jobs));
    printf("listening on %s\n", where);
    fflush(stdout);

    int sig = 0;
    while (sigwait(&sigs, &sig) != 0)
        ;
    jf_log(JF_LOG_INFO, "shutting down", JF_S("signal", sig == SIGTERM ? "SIGTERM" : "SIGINT"));

    /* Stop accepting, refuse new requests on open connections, and let
     * those already publishing get their PubAcks and answers. */
    atomic_store(&in.stopping, true);
    MHD_socket qfd = MHD_quiesce_daemon(daemon);
    int64_t deadline = jf_pub_mono_ms() + in.timeout_ms + 1000;
    while (atomic_load(&in.busy) > 0 && jf_pub_mono_ms() < deadline)
        usleep(10000);
    MHD_stop_daemon(daemon);
    daemon = NULL;
    if (qfd != MHD_INVALID_SOCKET)
        close(qfd);
    jf_log(JF_LOG_INFO, "intake stopped", JF_I("requests", atomic_load(&in.requests)),
           JF_I("jobs_accepted", atomic_load(&in.jobs_accepted)));
    rc = JF_EXIT_OK;

out:
    if (daemon != NULL)
        MHD_stop_daemon(daemon);
    if (lfd >= 0)
        close(lfd);
    pool_close(&in.pool);
    if (mu_init)
        pthread_mutex_destroy(&in.pool.mu);
    jf_pub_session_close(&sess);
    return rc;
}
