/* config.h — the one INI file both programs read (DESIGN.md "Configuration").
 *
 * Every key can be overridden by the environment variable
 * JETFLEET_<SECTION>_<KEY> (upper case, '.' and '-' as '_'), e.g.
 * JETFLEET_NATS_URL or JETFLEET_SERVICE_LLM_MAX_DELIVER. An override wins
 * over the file. Unknown sections and keys are errors (a typo must not be
 * ignored silently); errors name the file, line and key, or the variable.
 * Services are declared only by [service.NAME] sections of the file (the
 * environment can override their keys, not add services); each needs `kind`.
 * Optional strings left empty are NULL. Secrets (password, token, dsn, URLs)
 * never appear in an error message. jetfleet.ini.example lists every key. */
#ifndef JF_CONFIG_H
#define JF_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "duration.h"
#include "log.h"
#include "status.h"

#define JF_MAX_SERVICES 64
#define JF_MAX_BACKOFF 16
#define JF_NAME_MAX 64 /* service names: subject tokens of at most this many bytes */

typedef enum jf_handler_kind {
    JF_KIND_NOOP = 0,
    JF_KIND_HTTP,
    JF_KIND_POSTGRES,
} jf_handler_kind;

/* A count-based circuit breaker (per service, and one for the ledger). */
typedef struct jf_breaker_config {
    int window;            /* last N calls judged; default 20 */
    int min_calls;         /* no verdict before this many calls in the window; default 10 */
    int failure_rate;      /* percent of failures that opens it; default 50 */
    int64_t slow_call_ms;  /* a call slower than this is slow; 0 = off (default) */
    int slow_rate;         /* percent of slow calls that opens it; default 100 */
    int64_t open_ms;       /* first open period; default 5s */
    int64_t open_max_ms;   /* cap of the period, which doubles on each trip in a row; default 5m */
    int probes;            /* calls let through half-open; default 3 */
} jf_breaker_config;

typedef struct jf_nats_config {
    char *url;       /* comma-separated server list; default nats://127.0.0.1:4222 */
    char *name;      /* connection name shown in server monitoring; NULL: the program's name */
    char *user;      /* user/password auth */
    char *password;
    char *token;
    char *creds;     /* path of a .creds file (JWT + seed) */
    char *nkey_seed; /* path of a file holding an nkey seed */
    char *tls_ca;    /* CA bundle; setting any tls_* key turns TLS on */
    char *tls_cert;
    char *tls_key;
    int64_t connect_timeout_ms; /* default 5s */
    int64_t reconnect_wait_ms;  /* default 2s; jitter 0..1s is added */
    int64_t request_timeout_ms; /* JetStream API and PubAck wait; default 5s */
} jf_nats_config;

typedef struct jf_stream_config {
    char *name;                  /* JOBS */
    char *dlq;                   /* JOBS_DLQ */
    int64_t max_age_ms;          /* JOBS max_age; default 7d */
    int64_t dlq_max_age_ms;      /* JOBS_DLQ max_age; default 30d */
    int64_t duplicate_window_ms; /* default 2m */
    int replicas;                /* default 1 */
    int64_t max_bytes;           /* -1 = unlimited (default) */
} jf_stream_config;

typedef struct jf_consumer_config {
    int max_in_flight;          /* per process; default 256 */
    int pull_batch;             /* largest single pull; default 128 */
    int pulls;                  /* open pulls per durable at most; default 4 */
    int64_t pull_expires_ms;    /* default 5s */
    int priority_weights[3];    /* high, normal, low shares of a busy process; default 6,3,1 */
    int64_t shutdown_grace_ms;  /* default 30s */
    int64_t stats_interval_ms;  /* 0 = no periodic stats line; default 0 */
    char *metrics_listen;       /* HOST:PORT of /metrics, /healthz, /readyz; NULL = off */
} jf_consumer_config;

typedef struct jf_publisher_config {
    int max_pending;       /* async publishes awaiting a PubAck; default 1024 */
    int64_t timeout_ms;    /* per-message PubAck timeout; default 5s */
} jf_publisher_config;

/* `jetfleet-publisher serve`: the HTTP intake. */
typedef struct jf_intake_config {
    char *listen;          /* HOST:PORT; default 127.0.0.1:8080 */
    char *token;           /* bearer token for /jobs; secret; NULL (and no token_file) = no auth */
    char *token_file;      /* a file whose first line is the token */
    int max_body;          /* request body bytes at most; default 1 MiB */
    int max_jobs;          /* envelopes in one POST /jobs at most; default 1000 */
} jf_intake_config;

typedef struct jf_service_config {
    char name[JF_NAME_MAX + 1];
    int line;                  /* line of the [service.X] header, for messages */
    jf_handler_kind kind;
    char *url;                 /* http */
    int64_t timeout_ms;        /* per call; default 30s */
    int max_deliver;           /* real attempts; default 5 */
    int64_t backoff_ms[JF_MAX_BACKOFF];
    size_t backoff_n;          /* default 1s,5s,30s */
    int fleet_in_flight;       /* MaxAckPending of each durable; default 1000 */
    int64_t ack_wait_ms;       /* durable AckWait; default 30s */
    jf_rate rate;              /* fleet-wide; period 0 = none */
    int burst;                 /* calls allowed at once above the rate's spacing; default 1 */
    int64_t delay_ms;          /* noop: simulated work per job; default 0 */
    int fail_attempts;         /* noop: the first N attempts of every job fail (retryable); default 0 */
    /* http */
    char *tls_ca;              /* CA bundle for https (default: the system's) */
    bool tls_verify;           /* verify the server certificate and host; default true */
    char *auth_header;         /* "Name: value" sent on every call; secret */
    char *auth_header_file;    /* a file whose first line is "Name: value" */
    char *auth_header_env;     /* an environment variable holding "Name: value" */
    int64_t max_response;      /* response body bytes at most; default 1 MiB */
    int64_t retry_after_max_ms; /* Retry-After is clamped to this; default 10m */
    char *result_required;     /* comma-separated keys a 2xx JSON body must have; NULL = any */
    int max_connections;       /* per host; 0 = no cap (default) */
    /* postgres */
    char *sql;                 /* e.g. SELECT enrich($1::jsonb); $1 is the envelope */
    char *dsn;                 /* default: [postgres] dsn; secret */
    jf_breaker_config breaker;
} jf_service_config;

typedef struct jf_config {
    char *path;                /* the file read, or NULL when none */
    jf_log_level log_level;    /* [log] level; default info */
    jf_nats_config nats;
    jf_stream_config stream;
    char *postgres_dsn;        /* [postgres] dsn; NULL/empty = no ledger */
    int postgres_connections;  /* [postgres] connections per process; default 2 */
    int64_t postgres_statement_timeout_ms; /* [postgres] statement_timeout; default 30s */
    jf_breaker_config ledger_breaker; /* [postgres] breaker_* */
    jf_consumer_config consumer;
    jf_publisher_config publisher;
    jf_intake_config intake;
    jf_service_config services[JF_MAX_SERVICES];
    size_t nservices;
} jf_config;

/* Loads defaults, then path (when not NULL), then the environment, then
 * checks the whole (e.g. max_in_flight >= 3 x services). When path is NULL
 * and "jetfleet.ini" exists in the working directory, that file is read.
 * A path given but missing is an error. The caller owns *out. */
jf_status jf_config_load(jf_config **out, const char *path, jf_error *err);

/* The same from a string (tests); name is used in messages. */
jf_status jf_config_load_string(jf_config **out, const char *text, const char *name,
                                jf_error *err);

void jf_config_destroy(jf_config *cfg);

/* The service called name, or NULL. */
const jf_service_config *jf_config_service(const jf_config *cfg, const char *name);

#endif
