/* jetfleet.ini: defaults, every section, environment overrides, and the
 * messages a user gets for a bad file. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "config.h"

extern char **environ;

/* Each test starts with no JETFLEET_* variable, whatever the caller's
 * shell exports. */
static int clear_env(void **state)
{
    (void)state;
    for (;;) {
        char name[256] = "";
        for (char **e = environ; e && *e; e++) {
            if (strncmp(*e, "JETFLEET_", 9) == 0) {
                const char *eq = strchr(*e, '=');
                size_t n = eq ? (size_t)(eq - *e) : strlen(*e);
                if (n < sizeof name) {
                    memcpy(name, *e, n);
                    name[n] = '\0';
                }
                break;
            }
        }
        if (name[0] == '\0')
            return 0;
        unsetenv(name);
    }
}

static jf_config *load_ok(const char *text)
{
    jf_config *cfg = NULL;
    jf_error err = {{0}};
    jf_status st = jf_config_load_string(&cfg, text, "t.ini", &err);
    if (st != JF_OK)
        fail_msg("load failed (%s): %s", jf_status_name(st), err.msg);
    assert_non_null(cfg);
    return cfg;
}

/* Loads text expecting st; returns the message (static storage). */
static const char *load_fail(const char *text, jf_status want)
{
    static jf_error err;
    jf_config *cfg = (jf_config *)(uintptr_t)0x1; /* must stay untouched */
    memset(&err, 0, sizeof err);
    jf_status st = jf_config_load_string(&cfg, text, "t.ini", &err);
    if (st != want)
        fail_msg("status %s, want %s; message: %s", jf_status_name(st), jf_status_name(want),
                 err.msg);
    assert_ptr_equal(cfg, (jf_config *)(uintptr_t)0x1);
    assert_true(strlen(err.msg) > 0);
    return err.msg;
}

#define assert_msg_has(msg, needle)                                                                \
    do {                                                                                           \
        if (strstr((msg), (needle)) == NULL)                                                       \
            fail_msg("message \"%s\" lacks \"%s\"", (msg), (needle));                              \
    } while (0)

#define assert_msg_lacks(msg, needle)                                                              \
    do {                                                                                           \
        if (strstr((msg), (needle)) != NULL)                                                       \
            fail_msg("message \"%s\" contains \"%s\"", (msg), (needle));                           \
    } while (0)

static void check_defaults(const jf_config *c)
{
    assert_int_equal(c->log_level, JF_LOG_INFO);
    assert_string_equal(c->nats.url, "nats://127.0.0.1:4222");
    assert_null(c->nats.name);
    assert_null(c->nats.user);
    assert_null(c->nats.password);
    assert_null(c->nats.token);
    assert_null(c->nats.creds);
    assert_null(c->nats.nkey_seed);
    assert_null(c->nats.tls_ca);
    assert_null(c->nats.tls_cert);
    assert_null(c->nats.tls_key);
    assert_int_equal(c->nats.connect_timeout_ms, 5000);
    assert_int_equal(c->nats.reconnect_wait_ms, 2000);
    assert_int_equal(c->nats.request_timeout_ms, 5000);
    assert_string_equal(c->stream.name, "JOBS");
    assert_string_equal(c->stream.dlq, "JOBS_DLQ");
    assert_int_equal(c->stream.max_age_ms, INT64_C(7) * 86400000);
    assert_int_equal(c->stream.dlq_max_age_ms, INT64_C(30) * 86400000);
    assert_int_equal(c->stream.duplicate_window_ms, 120000);
    assert_int_equal(c->stream.replicas, 1);
    assert_int_equal(c->stream.max_bytes, -1);
    assert_null(c->postgres_dsn);
    assert_int_equal(c->consumer.max_in_flight, 256);
    assert_int_equal(c->consumer.pull_batch, 128);
    assert_int_equal(c->consumer.pulls, 4);
    assert_int_equal(c->consumer.pull_expires_ms, 5000);
    assert_int_equal(c->consumer.priority_weights[0], 6);
    assert_int_equal(c->consumer.priority_weights[1], 3);
    assert_int_equal(c->consumer.priority_weights[2], 1);
    assert_int_equal(c->consumer.shutdown_grace_ms, 30000);
    assert_int_equal(c->consumer.stats_interval_ms, 0);
    assert_int_equal(c->publisher.max_pending, 1024);
    assert_int_equal(c->publisher.timeout_ms, 5000);
}

static void check_service_defaults(const jf_service_config *s)
{
    assert_int_equal(s->timeout_ms, 30000);
    assert_int_equal(s->max_deliver, 5);
    assert_int_equal(s->backoff_n, 3);
    assert_int_equal(s->backoff_ms[0], 1000);
    assert_int_equal(s->backoff_ms[1], 5000);
    assert_int_equal(s->backoff_ms[2], 30000);
    assert_int_equal(s->fleet_in_flight, 1000);
    assert_int_equal(s->ack_wait_ms, 30000);
    assert_int_equal(s->rate.count, 0);
    assert_int_equal(s->rate.period_ms, 0);
    assert_int_equal(s->delay_ms, 0);
    assert_int_equal(s->fail_attempts, 0);
}

static void test_defaults(void **state)
{
    (void)state;
    jf_config *c = load_ok("");
    check_defaults(c);
    assert_null(c->path);
    assert_int_equal(c->nservices, 0);
    assert_null(jf_config_service(c, "llm"));
    jf_config_destroy(c);

    /* Comments, blank lines and empty sections change nothing. */
    c = load_ok("; comment\n# another\n\n[nats]\n[stream]\n[consumer]\n\n");
    check_defaults(c);
    jf_config_destroy(c);

    jf_config_destroy(NULL);
    assert_null(jf_config_service(NULL, "x"));
}

static void test_every_section(void **state)
{
    (void)state;
    jf_config *c = load_ok("[nats]\n"
                           "url = nats://a:4222,nats://b:4222\n"
                           "name = worker-1\n"
                           "user = jf\n"
                           "password = pw\n"
                           "token = tk\n"
                           "creds = /etc/jf.creds\n"
                           "nkey_seed = /etc/jf.nk\n"
                           "tls_ca = /etc/ca.pem\n"
                           "tls_cert = /etc/c.pem\n"
                           "tls_key = /etc/k.pem\n"
                           "connect_timeout = 1500ms\n"
                           "reconnect_wait = 0\n"
                           "request_timeout = 1m\n"
                           "[stream]\n"
                           "name = WORK\n"
                           "dlq = WORK-dead\n"
                           "max_age = 1d12h\n"
                           "dlq_max_age = 0\n"
                           "duplicate_window = 10m\n"
                           "replicas = 3\n"
                           "max_bytes = 1073741824\n"
                           "[postgres]\n"
                           "dsn = postgresql://jf@127.0.0.1/jf\n"
                           "[consumer]\n"
                           "max_in_flight = 64\n"
                           "pull_batch = 32\n"
                           "pulls = 2\n"
                           "pull_expires = 2s\n"
                           "priority_weights = 10, 5 ,1\n"
                           "shutdown_grace = 5s\n"
                           "stats_interval = 10s\n"
                           "[publisher]\n"
                           "max_pending = 10\n"
                           "timeout = 250ms\n"
                           "[log]\n"
                           "level = debug\n");
    assert_string_equal(c->nats.url, "nats://a:4222,nats://b:4222");
    assert_string_equal(c->nats.name, "worker-1");
    assert_string_equal(c->nats.user, "jf");
    assert_string_equal(c->nats.password, "pw");
    assert_string_equal(c->nats.token, "tk");
    assert_string_equal(c->nats.creds, "/etc/jf.creds");
    assert_string_equal(c->nats.nkey_seed, "/etc/jf.nk");
    assert_string_equal(c->nats.tls_ca, "/etc/ca.pem");
    assert_string_equal(c->nats.tls_cert, "/etc/c.pem");
    assert_string_equal(c->nats.tls_key, "/etc/k.pem");
    assert_int_equal(c->nats.connect_timeout_ms, 1500);
    assert_int_equal(c->nats.reconnect_wait_ms, 0);
    assert_int_equal(c->nats.request_timeout_ms, 60000);
    assert_string_equal(c->stream.name, "WORK");
    assert_string_equal(c->stream.dlq, "WORK-dead");
    assert_int_equal(c->stream.max_age_ms, 36 * 3600000);
    assert_int_equal(c->stream.dlq_max_age_ms, 0);
    assert_int_equal(c->stream.duplicate_window_ms, 600000);
    assert_int_equal(c->stream.replicas, 3);
    assert_int_equal(c->stream.max_bytes, INT64_C(1073741824));
    assert_string_equal(c->postgres_dsn, "postgresql://jf@127.0.0.1/jf");
    assert_int_equal(c->consumer.max_in_flight, 64);
    assert_int_equal(c->consumer.pull_batch, 32);
    assert_int_equal(c->consumer.pulls, 2);
    assert_int_equal(c->consumer.pull_expires_ms, 2000);
    assert_int_equal(c->consumer.priority_weights[0], 10);
    assert_int_equal(c->consumer.priority_weights[1], 5);
    assert_int_equal(c->consumer.priority_weights[2], 1);
    assert_int_equal(c->consumer.shutdown_grace_ms, 5000);
    assert_int_equal(c->consumer.stats_interval_ms, 10000);
    assert_int_equal(c->publisher.max_pending, 10);
    assert_int_equal(c->publisher.timeout_ms, 250);
    assert_int_equal(c->log_level, JF_LOG_DEBUG);
    jf_config_destroy(c);

    /* Empty optional strings are unset, not "". */
    c = load_ok("[postgres]\ndsn =\n[nats]\nname =   ; none\n");
    assert_null(c->postgres_dsn);
    assert_null(c->nats.name);
    jf_config_destroy(c);
}

static void test_services(void **state)
{
    (void)state;
    jf_config *c = load_ok("; services\n"
                           "[service.llm]\n"
                           "kind = http\n"
                           "url = https://api.example.com/v1/enrich ; inline comment\n"
                           "timeout = 2m\n"
                           "max_deliver = 8\n"
                           "backoff = 2s, 10s,1m ,5m\n"
                           "fleet_in_flight = 20\n"
                           "ack_wait = 3m\n"
                           "rate = 30/m\n"
                           "\n"
                           "[service.echo_1]\n"
                           "kind = noop\n"
                           "delay = 50ms\n"
                           "fail_attempts = 2\n"
                           "[service.bare]\n"
                           "kind = noop\n");
    assert_int_equal(c->nservices, 3);
    const jf_service_config *s = jf_config_service(c, "llm");
    assert_non_null(s);
    assert_string_equal(s->name, "llm");
    assert_int_equal(s->line, 2);
    assert_int_equal(s->kind, JF_KIND_HTTP);
    assert_string_equal(s->url, "https://api.example.com/v1/enrich");
    assert_int_equal(s->timeout_ms, 120000);
    assert_int_equal(s->max_deliver, 8);
    assert_int_equal(s->backoff_n, 4);
    assert_int_equal(s->backoff_ms[0], 2000);
    assert_int_equal(s->backoff_ms[1], 10000);
    assert_int_equal(s->backoff_ms[2], 60000);
    assert_int_equal(s->backoff_ms[3], 300000);
    assert_int_equal(s->fleet_in_flight, 20);
    assert_int_equal(s->ack_wait_ms, 180000);
    assert_int_equal(s->rate.count, 30);
    assert_int_equal(s->rate.period_ms, 60000);

    s = jf_config_service(c, "echo_1");
    assert_non_null(s);
    assert_int_equal(s->line, 12);
    assert_int_equal(s->kind, JF_KIND_NOOP);
    assert_null(s->url);
    assert_int_equal(s->delay_ms, 50);
    assert_int_equal(s->fail_attempts, 2);

    s = jf_config_service(c, "bare");
    assert_non_null(s);
    assert_int_equal(s->line, 16);
    check_service_defaults(s);
    assert_null(jf_config_service(c, "missing"));
    assert_null(jf_config_service(c, "ll"));
    jf_config_destroy(c);
}

static void test_long_service_name(void **state)
{
    (void)state;
    /* libinih keeps only 49 bytes of a section name; a 64-byte service name
     * must still arrive whole, and 65 bytes must be refused. */
    char name[JF_NAME_MAX + 2];
    memset(name, 'a', JF_NAME_MAX);
    name[JF_NAME_MAX] = '\0';
    char text[512];
    snprintf(text, sizeof text, "[service.%s]\nkind = noop\nmax_deliver = 9\n", name);
    jf_config *c = load_ok(text);
    assert_int_equal(c->nservices, 1);
    assert_string_equal(c->services[0].name, name);
    assert_int_equal(c->services[0].max_deliver, 9);
    jf_config_destroy(c);

    name[JF_NAME_MAX] = 'a';
    name[JF_NAME_MAX + 1] = '\0';
    snprintf(text, sizeof text, "\n[service.%s]\nkind = noop\n", name);
    const char *m = load_fail(text, JF_ERR_INVALID);
    assert_msg_has(m, "t.ini:2: ");
    assert_msg_has(m, "1-64 characters");
}

static void test_env_overrides(void **state)
{
    (void)state;
    const char *text = "[nats]\n"
                       "url = nats://file:4222\n"
                       "[consumer]\n"
                       "max_in_flight = 100\n"
                       "[postgres]\n"
                       "dsn = postgresql://file/db\n"
                       "[service.my-svc]\n"
                       "kind = noop\n"
                       "max_deliver = 3\n";
    setenv("JETFLEET_NATS_URL", "nats://env:4222", 1);
    setenv("JETFLEET_CONSUMER_MAX_IN_FLIGHT", "512", 1);
    setenv("JETFLEET_CONSUMER_PRIORITY_WEIGHTS", "1,1,1", 1);
    setenv("JETFLEET_POSTGRES_DSN", "", 1); /* empties the file's value */
    setenv("JETFLEET_LOG_LEVEL", "warn", 1);
    setenv("JETFLEET_STREAM_MAX_AGE", "1h", 1);
    setenv("JETFLEET_PUBLISHER_TIMEOUT", "9s", 1);
    setenv("JETFLEET_SERVICE_MY_SVC_MAX_DELIVER", "7", 1);
    setenv("JETFLEET_SERVICE_MY_SVC_KIND", "http", 1);
    setenv("JETFLEET_SERVICE_MY_SVC_URL", "http://127.0.0.1:9/x", 1);
    /* Not keys: a service absent from the file, and the config path. */
    setenv("JETFLEET_SERVICE_GHOST_KIND", "http", 1);
    setenv("JETFLEET_CONFIG", "/nonexistent", 1);

    jf_config *c = load_ok(text);
    assert_string_equal(c->nats.url, "nats://env:4222");
    assert_int_equal(c->consumer.max_in_flight, 512);
    assert_int_equal(c->consumer.priority_weights[0], 1);
    assert_int_equal(c->consumer.priority_weights[2], 1);
    assert_null(c->postgres_dsn);
    assert_int_equal(c->log_level, JF_LOG_WARN);
    assert_int_equal(c->stream.max_age_ms, 3600000);
    assert_int_equal(c->publisher.timeout_ms, 9000);
    assert_int_equal(c->nservices, 1);
    const jf_service_config *s = jf_config_service(c, "my-svc");
    assert_non_null(s);
    assert_int_equal(s->max_deliver, 7);
    assert_int_equal(s->kind, JF_KIND_HTTP);
    assert_string_equal(s->url, "http://127.0.0.1:9/x");
    assert_null(jf_config_service(c, "ghost"));
    jf_config_destroy(c);

    /* Overrides apply without a file too. */
    c = load_ok("");
    assert_string_equal(c->nats.url, "nats://env:4222");
    assert_int_equal(c->nservices, 0);
    jf_config_destroy(c);
}

static void test_env_bad_values(void **state)
{
    (void)state;
    setenv("JETFLEET_CONSUMER_MAX_IN_FLIGHT", "abc", 1);
    const char *m = load_fail("", JF_ERR_INVALID);
    assert_string_equal(m, "environment JETFLEET_CONSUMER_MAX_IN_FLIGHT: expected an integer from "
                           "1 to 100000, got \"abc\"");
    unsetenv("JETFLEET_CONSUMER_MAX_IN_FLIGHT");

    setenv("JETFLEET_SERVICE_LLM_TIMEOUT", "5 min", 1);
    m = load_fail("[service.llm]\nkind = noop\n", JF_ERR_INVALID);
    assert_msg_has(m, "environment JETFLEET_SERVICE_LLM_TIMEOUT: ");
    assert_msg_has(m, "\"5 min\"");
    unsetenv("JETFLEET_SERVICE_LLM_TIMEOUT");

    setenv("JETFLEET_LOG_LEVEL", "loud", 1);
    m = load_fail("", JF_ERR_INVALID);
    assert_msg_has(m, "environment JETFLEET_LOG_LEVEL: expected debug, info, warn, error or off");
    unsetenv("JETFLEET_LOG_LEVEL");

    /* An env value that breaks a whole-config rule is named as such. */
    setenv("JETFLEET_CONSUMER_MAX_IN_FLIGHT", "5", 1);
    m = load_fail("[service.a]\nkind = noop\n[service.b]\nkind = noop\n", JF_ERR_INVALID);
    assert_msg_has(m, "environment JETFLEET_CONSUMER_MAX_IN_FLIGHT");
    assert_msg_has(m, "max_in_flight = 5");
    unsetenv("JETFLEET_CONSUMER_MAX_IN_FLIGHT");

    /* Environment values are bounded. */
    char *big = malloc(5000);
    assert_non_null(big);
    memset(big, 'x', 4999);
    big[4999] = '\0';
    setenv("JETFLEET_NATS_NAME", big, 1);
    free(big);
    m = load_fail("", JF_ERR_INVALID);
    assert_msg_has(m, "environment JETFLEET_NATS_NAME: longer than");
    unsetenv("JETFLEET_NATS_NAME");

    /* A misspelt key under a known section is a typo, not silence. */
    setenv("JETFLEET_NATS_PASWORD", "s3cret-typo", 1);
    m = load_fail("", JF_ERR_INVALID);
    assert_string_equal(m, "environment JETFLEET_NATS_PASWORD: no such key in [nats] (a typo?)");
    unsetenv("JETFLEET_NATS_PASWORD");
    setenv("JETFLEET_SERVICE_LLM_TIMOUT", "5s", 1);
    m = load_fail("[service.llm]\nkind = noop\n", JF_ERR_INVALID);
    assert_string_equal(
        m, "environment JETFLEET_SERVICE_LLM_TIMOUT: no such key in [service.llm] (a typo?)");
    unsetenv("JETFLEET_SERVICE_LLM_TIMOUT");
    /* A key of another service whose name extends this one's is fine. */
    setenv("JETFLEET_SERVICE_LLM_X_TIMEOUT", "5s", 1);
    jf_config *c = load_ok("[service.llm]\nkind = noop\n[service.llm_x]\nkind = noop\n");
    assert_int_equal(jf_config_service(c, "llm_x")->timeout_ms, 5000);
    jf_config_destroy(c);
    unsetenv("JETFLEET_SERVICE_LLM_X_TIMEOUT");
}

static void test_error_names_file_line_key(void **state)
{
    (void)state;
    const char *m = load_fail("[service.llm]\n"
                              "kind = noop\n"
                              "max_deliver = abc\n",
                              JF_ERR_INVALID);
    assert_string_equal(
        m, "t.ini:3: [service.llm] max_deliver: expected an integer from 1 to 1000, got \"abc\"");

    m = load_fail("[consumer]\n\n; c\npull_expires = 5x\n", JF_ERR_INVALID);
    assert_msg_has(m, "t.ini:4: [consumer] pull_expires: invalid duration \"5x\": unknown unit");

    m = load_fail("[consumer]\npull_expires = 2h\n", JF_ERR_INVALID);
    assert_string_equal(
        m, "t.ini:2: [consumer] pull_expires: expected a duration from 100ms to 1h, got \"2h\"");
}

static void test_unknown_key_and_section(void **state)
{
    (void)state;
    const char *m = load_fail("[nats]\nurl = nats://x:1\nuri = nats://y:1\n", JF_ERR_INVALID);
    assert_msg_has(m, "t.ini:3: [nats] uri: unknown key");
    assert_msg_has(m, "url");

    m = load_fail("[consumer]\nmax_inflight = 3\n", JF_ERR_INVALID);
    assert_msg_has(m, "t.ini:2: [consumer] max_inflight: unknown key");

    m = load_fail("[service.x]\nkind = noop\nretries = 3\n", JF_ERR_INVALID);
    assert_msg_has(m, "t.ini:3: [service.x] retries: unknown key");

    /* A section is checked at its header, even with no key under it. */
    m = load_fail("[nats]\n\n[natz]\n", JF_ERR_INVALID);
    assert_msg_has(m, "t.ini:3: unknown section [natz]");
    m = load_fail("[NATS]\nurl = x\n", JF_ERR_INVALID);
    assert_msg_has(m, "t.ini:1: unknown section [NATS]");
    m = load_fail("[service]\n", JF_ERR_INVALID);
    assert_msg_has(m, "t.ini:1: unknown section [service]");
    m = load_fail("[service.]\n", JF_ERR_INVALID);
    assert_msg_has(m, "t.ini:1: unknown section [service.]");
    m = load_fail("[service.a.b]\nkind = noop\n", JF_ERR_INVALID);
    assert_msg_has(m, "t.ini:1: [service.a.b]: a service name must be");
    m = load_fail("[service.a*]\n", JF_ERR_INVALID);
    assert_msg_has(m, "t.ini:1: [service.a*]");

    m = load_fail("url = nats://x:1\n[nats]\n", JF_ERR_INVALID);
    assert_msg_has(m, "t.ini:1: key \"url\" before any [section]");
}

static void test_syntax_errors(void **state)
{
    (void)state;
    const char *m = load_fail("[nats]\nurl = nats://x:1\n\njust some words\n", JF_ERR_INVALID);
    assert_msg_has(m, "t.ini:4: expected \"key = value\"");

    m = load_fail("[nats\nurl = x\n", JF_ERR_INVALID);
    assert_msg_has(m, "t.ini:1: section header without a closing ']'");

    m = load_fail("[nats] url = x\n", JF_ERR_INVALID);
    assert_msg_has(m, "t.ini:1: unexpected text after the section header");

    /* A trailing comment after a header is fine, as is spacing inside. */
    jf_config *c = load_ok("[ consumer ]   ; tuning\npulls = 3\n");
    assert_int_equal(c->consumer.pulls, 3);
    jf_config_destroy(c);

    /* The first of several errors is the one reported. */
    m = load_fail("[nats]\nnonsense\n[natz]\n", JF_ERR_INVALID);
    assert_msg_has(m, "t.ini:2: expected");

    /* inih would glue an indented line onto the previous value. */
    m = load_fail("[consumer]\npulls = 3\n  pull_batch = 8\n", JF_ERR_INVALID);
    assert_msg_has(m, "t.ini:3: indented line");
    c = load_ok("[consumer]\n  pulls = 3\n\t; indented comment\n");
    assert_int_equal(c->consumer.pulls, 3);
    jf_config_destroy(c);

    /* Lines are bounded by libinih's buffer; say so instead of splitting. */
    char text[512];
    memset(text, 0, sizeof text);
    strcpy(text, "[nats]\nname = ");
    memset(text + strlen(text), 'n', 300);
    strcat(text, "\n");
    m = load_fail(text, JF_ERR_INVALID);
    assert_msg_has(m, "t.ini:2: line longer than 198 bytes");
    /* … and 198 bytes is fine. */
    memset(text, 0, sizeof text);
    strcpy(text, "[nats]\nname = ");
    memset(text + strlen(text), 'n', 198 - strlen("name = "));
    strcat(text, "\n");
    c = load_ok(text);
    assert_int_equal(strlen(c->nats.name), 198 - strlen("name = "));
    jf_config_destroy(c);

    /* CRLF line ends, a UTF-8 BOM and a missing final newline are fine. */
    c = load_ok("\xEF\xBB\xBF[consumer]\r\npulls = 5\r\n[log]\r\nlevel = error");
    assert_int_equal(c->consumer.pulls, 5);
    assert_int_equal(c->log_level, JF_LOG_ERROR);
    jf_config_destroy(c);
}

static void test_duplicates(void **state)
{
    (void)state;
    const char *m = load_fail("[service.llm]\nkind = noop\n\n[service.x]\nkind = noop\n"
                              "[service.llm]\nkind = noop\n",
                              JF_ERR_INVALID);
    assert_msg_has(m, "t.ini:6: [service.llm] appears twice (first at line 1)");

    m = load_fail("[nats]\nurl = a\n[consumer]\n[nats]\n", JF_ERR_INVALID);
    assert_msg_has(m, "t.ini:4: [nats] appears twice (first at line 1)");

    m = load_fail("[consumer]\npulls = 2\npulls = 3\n", JF_ERR_INVALID);
    assert_msg_has(m, "t.ini:3: [consumer] pulls: given twice (first at line 2)");

    /* Names that differ only in case or '-'/'_' collide in the environment. */
    m = load_fail("[service.a-b]\nkind = noop\n[service.a_b]\nkind = noop\n", JF_ERR_INVALID);
    assert_msg_has(m, "t.ini:3: [service.a_b] and [service.a-b]");
    assert_msg_has(m, "JETFLEET_SERVICE_A_B_");
}

static void test_bad_values(void **state)
{
    (void)state;
    static const struct {
        const char *text;
        const char *want;
    } cases[] = {
        {"[stream]\nreplicas = 6\n",
         "t.ini:2: [stream] replicas: expected an integer from 1 to 5, got \"6\""},
        {"[stream]\nreplicas = 1.0\n", "[stream] replicas: expected an integer"},
        {"[stream]\nreplicas = +1\n", "[stream] replicas: expected an integer"},
        {"[stream]\nreplicas = 99999999999999999999\n", "[stream] replicas: expected an integer"},
        {"[stream]\nmax_bytes = 0\n", "[stream] max_bytes: expected a number of bytes, or -1"},
        {"[stream]\nmax_bytes = -2\n", "[stream] max_bytes: expected a number of bytes"},
        {"[stream]\nname = JO BS\n",
         "[stream] name: expected 1-64 characters of A-Z a-z 0-9 _ -, got \"JO BS\""},
        {"[stream]\ndlq = jobs.dlq\n", "[stream] dlq: expected 1-64 characters"},
        {"[stream]\nduplicate_window = 0\n",
         "[stream] duplicate_window: expected a duration from 1ms"},
        {"[stream]\nmax_age = 36501d\n", "[stream] max_age: expected a duration from 0s to 36500d"},
        {"[nats]\nurl =\n", "[nats] url: must not be empty"},
        {"[nats]\nconnect_timeout = 0\n",
         "[nats] connect_timeout: expected a duration from 1ms to 1h"},
        {"[consumer]\npriority_weights = 6,3\n",
         "[consumer] priority_weights: expected three integers"},
        {"[consumer]\npriority_weights = 6,3,1,1\n",
         "[consumer] priority_weights: expected three integers"},
        {"[consumer]\npriority_weights = 6,0,1\n",
         "[consumer] priority_weights: expected three integers from 1 to 1000"},
        {"[consumer]\npriority_weights = 6,,1\n", "[consumer] priority_weights: expected three"},
        {"[consumer]\npriority_weights = 6 3 1\n", "[consumer] priority_weights: expected three"},
        {"[consumer]\nmax_in_flight = 0\n", "[consumer] max_in_flight: expected an integer from 1"},
        {"[consumer]\npulls = \n", "[consumer] pulls: expected an integer from 1 to 64, got \"\""},
        {"[publisher]\nmax_pending = many\n", "[publisher] max_pending: expected an integer"},
        {"[log]\nlevel = loud\n",
         "t.ini:2: [log] level: expected debug, info, warn, error or off, got \"loud\""},
        {"[service.s]\nkind = grpc\n",
         "t.ini:2: [service.s] kind: expected http, postgres or noop, got \"grpc\""},
        {"[service.s]\nkind = noop\nrate = 30/x\n",
         "t.ini:3: [service.s] rate: invalid rate \"30/x\""},
        {"[service.s]\nkind = noop\nbackoff = 1s,,5s\n",
         "t.ini:3: [service.s] backoff: invalid duration list \"1s,,5s\": item 2: empty"},
        {"[service.s]\nkind = noop\nbackoff = 1s,2d\n",
         "[service.s] backoff: expected durations from 0s to 1d"},
        {"[service.s]\nkind = noop\nbackoff = 1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s\n",
         "more than 16 items"},
        {"[service.s]\nkind = noop\nmax_deliver = 1001\n",
         "[service.s] max_deliver: expected an integer from 1 to 1000"},
        {"[service.s]\nkind = noop\nack_wait = 10ms\n",
         "[service.s] ack_wait: expected a duration from 100ms"},
        {"[service.s]\nkind = noop\nfail_attempts = -1\n",
         "[service.s] fail_attempts: expected an integer from 0 to 1000"},
        {"[service.s]\nkind = noop\ndelay = soon\n",
         "[service.s] delay: invalid duration \"soon\""},
        {"[service.s]\nkind = http\nurl = ftp://x/y\n",
         "t.ini:3: [service.s] url: expected a URL starting with http:// or https://"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *m = load_fail(cases[i].text, JF_ERR_INVALID);
        if (strstr(m, cases[i].want) == NULL)
            fail_msg("case %zu: message \"%s\" lacks \"%s\"", i, m, cases[i].want);
    }
}

static void test_service_rules(void **state)
{
    (void)state;
    const char *m = load_fail("[service.llm]\ntimeout = 5s\n", JF_ERR_INVALID);
    assert_string_equal(m, "t.ini:1: [service.llm] kind: missing (http, postgres or noop)");

    m = load_fail("\n[service.llm]\nkind = http\n", JF_ERR_INVALID);
    assert_msg_has(m, "t.ini:3: [service.llm] kind = http needs url");

    /* Three durables per service each keep a pull open. */
    m = load_fail(
        "[consumer]\nmax_in_flight = 5\n[service.a]\nkind = noop\n[service.b]\nkind = noop\n",
        JF_ERR_INVALID);
    assert_msg_has(m, "t.ini:2: [consumer] max_in_flight = 5 is too small for 2 services");
    assert_msg_has(m, "at least 6");
    jf_config *c = load_ok("[consumer]\nmax_in_flight = 6\npull_batch = 6\n"
                           "[service.a]\nkind = noop\n[service.b]\nkind = noop\n");
    assert_int_equal(c->nservices, 2);
    jf_config_destroy(c);
    /* No services (the publisher's case) needs no minimum. */
    c = load_ok("[consumer]\nmax_in_flight = 1\npull_batch = 1\n");
    jf_config_destroy(c);

    m = load_fail("[consumer]\npull_batch = 300\n", JF_ERR_INVALID);
    assert_msg_has(m, "t.ini:2: [consumer] pull_batch = 300 must not exceed [consumer] "
                      "max_in_flight = 256 (default)");
    /* The default batch follows a small max_in_flight down. */
    c = load_ok("[consumer]\nmax_in_flight = 50\n");
    assert_int_equal(c->consumer.pull_batch, 50);
    jf_config_destroy(c);
    setenv("JETFLEET_CONSUMER_PULL_BATCH", "64", 1);
    m = load_fail("[consumer]\nmax_in_flight = 50\n", JF_ERR_INVALID);
    assert_msg_has(m, "environment JETFLEET_CONSUMER_PULL_BATCH: [consumer] pull_batch = 64 must "
                      "not exceed [consumer] max_in_flight = 50 (t.ini:2)");
    unsetenv("JETFLEET_CONSUMER_PULL_BATCH");

    m = load_fail("[stream]\ndlq = JOBS\n", JF_ERR_INVALID);
    assert_msg_has(m, "t.ini:2: [stream] dlq must differ from [stream] name");
    m = load_fail("[stream]\n\nname = JOBS_DLQ\n", JF_ERR_INVALID);
    assert_msg_has(m, "t.ini:3: [stream] dlq must differ from [stream] name");

    m = load_fail("[stream]\nmax_age = 1m\n", JF_ERR_INVALID);
    assert_msg_has(m, "t.ini:2: [stream] max_age = 1m must be at least [stream] "
                      "duplicate_window = 2m (default)");
    m = load_fail("[stream]\nduplicate_window = 8d\n", JF_ERR_INVALID);
    assert_msg_has(m, "t.ini:2: [stream] duplicate_window = 8d must not exceed [stream] "
                      "max_age = 7d (default)");
    c = load_ok("[stream]\nmax_age = 0\nduplicate_window = 1h\n");
    jf_config_destroy(c);

    m = load_fail("[nats]\ntls_cert = /c.pem\n", JF_ERR_INVALID);
    assert_msg_has(m, "t.ini:2: [nats] tls_cert is set but [nats] tls_key is not");
}

static void test_secrets_never_printed(void **state)
{
    (void)state;
    const char *m = load_fail("[nats]\npassword = hunter2\n", JF_ERR_INVALID);
    assert_msg_has(m, "t.ini:2: [nats] password is set but [nats] user is not");
    assert_msg_lacks(m, "hunter2");

    m = load_fail("[nats]\nuser = u\npassword = hunter2\npassword = hunter3\n", JF_ERR_INVALID);
    assert_msg_has(m, "t.ini:4: [nats] password: given twice");
    assert_msg_lacks(m, "hunter");

    /* A tab inside a value is a control character: refused, not echoed. */
    m = load_fail("[nats]\nuser = u\npassword = hun\tter2\n", JF_ERR_INVALID);
    assert_msg_has(m, "t.ini:3: [nats] password: must not contain control characters");
    assert_msg_lacks(m, "hun");

    setenv("JETFLEET_NATS_TOKEN", "s3cr3t\x01", 1);
    m = load_fail("", JF_ERR_INVALID);
    assert_msg_has(m, "environment JETFLEET_NATS_TOKEN: must not contain control characters");
    assert_msg_lacks(m, "s3cr3t");
    unsetenv("JETFLEET_NATS_TOKEN");

    setenv("JETFLEET_POSTGRES_DSN", "postgresql://u:pa55@h/db\n", 1);
    m = load_fail("", JF_ERR_INVALID);
    assert_msg_has(m, "environment JETFLEET_POSTGRES_DSN");
    assert_msg_lacks(m, "pa55");
    unsetenv("JETFLEET_POSTGRES_DSN");

    m = load_fail("[service.s]\nkind = http\nurl = ftp://u:pa55@h/\n", JF_ERR_INVALID);
    assert_msg_lacks(m, "pa55");

    /* Non-secret values are quoted so the user sees the typo. */
    m = load_fail("[nats]\nuser = u\npassword = p\nconnect_timeout = 5 s\n", JF_ERR_INVALID);
    assert_msg_has(m, "\"5 s\"");
}

static char tmpdir[64];
static char old_cwd[4096];

/* Runs even when the test fails: leaves no directory behind and restores
 * the working directory for the tests that follow. */
static int files_teardown(void **state)
{
    (void)state;
    if (old_cwd[0] != '\0' && chdir(old_cwd) != 0)
        return -1;
    if (tmpdir[0] != '\0') {
        char p[160];
        snprintf(p, sizeof p, "%s/custom.ini", tmpdir);
        unlink(p);
        snprintf(p, sizeof p, "%s/jetfleet.ini", tmpdir);
        unlink(p);
        rmdir(tmpdir);
    }
    return 0;
}

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    assert_int_equal(fputs(text, f) >= 0, 1);
    assert_int_equal(fclose(f), 0);
}

static void test_files(void **state)
{
    (void)state;
    strcpy(tmpdir, "/tmp/jf-cfg-XXXXXX");
    assert_non_null(mkdtemp(tmpdir));
    char path[128];
    snprintf(path, sizeof path, "%s/custom.ini", tmpdir);

    /* A named file that is missing is an error, not defaults. */
    jf_config *c = (jf_config *)(uintptr_t)0x1;
    jf_error err = {{0}};
    assert_int_equal(jf_config_load(&c, path, &err), JF_ERR_NOTFOUND);
    assert_ptr_equal(c, (jf_config *)(uintptr_t)0x1);
    char want[256];
    snprintf(want, sizeof want, "cannot open %s: No such file or directory", path);
    assert_string_equal(err.msg, want);

    /* A named file is read, and its name is in messages. */
    write_file(path, "[consumer]\npulls = 7\n");
    assert_int_equal(jf_config_load(&c, path, &err), JF_OK);
    assert_int_equal(c->consumer.pulls, 7);
    assert_string_equal(c->path, path);
    jf_config_destroy(c);

    write_file(path, "[consumer]\n\npulls = 70\n");
    c = (jf_config *)(uintptr_t)0x1;
    assert_int_equal(jf_config_load(&c, path, &err), JF_ERR_INVALID);
    assert_ptr_equal(c, (jf_config *)(uintptr_t)0x1);
    snprintf(want, sizeof want,
             "%s:3: [consumer] pulls: expected an integer from 1 to 64, got \"70\"", path);
    assert_string_equal(err.msg, want);

    /* A directory cannot be read as a file. */
    c = (jf_config *)(uintptr_t)0x1;
    assert_int_not_equal(jf_config_load(&c, tmpdir, &err), JF_OK);
    assert_ptr_equal(c, (jf_config *)(uintptr_t)0x1);
    assert_msg_has(err.msg, tmpdir);

    /* No path: ./jetfleet.ini when present, else defaults. */
    assert_non_null(getcwd(old_cwd, sizeof old_cwd));
    assert_int_equal(chdir(tmpdir), 0);
    c = NULL;
    assert_int_equal(jf_config_load(&c, NULL, &err), JF_OK);
    assert_null(c->path);
    check_defaults(c);
    jf_config_destroy(c);

    write_file("jetfleet.ini", "[consumer]\nmax_in_flight = 177\n");
    c = NULL;
    assert_int_equal(jf_config_load(&c, NULL, &err), JF_OK);
    assert_string_equal(c->path, "jetfleet.ini");
    assert_int_equal(c->consumer.max_in_flight, 177);
    jf_config_destroy(c);

    write_file("jetfleet.ini", "[consumer]\nmax_in_flight = x\n");
    assert_int_equal(jf_config_load(&c, NULL, &err), JF_ERR_INVALID);
    assert_msg_has(err.msg, "jetfleet.ini:2: [consumer] max_in_flight");
}

static void test_example_file(void **state)
{
    (void)state;
    jf_config *ex = NULL, *def = NULL;
    jf_error err = {{0}};
    jf_status st = jf_config_load(&ex, JF_SOURCE_DIR "/jetfleet.ini.example", &err);
    if (st != JF_OK)
        fail_msg("jetfleet.ini.example: %s", err.msg);
    /* The example's values for the fixed sections are the real defaults. */
    def = load_ok("");
    check_defaults(ex);
    assert_int_equal(ex->log_level, def->log_level);

    const jf_service_config *llm = jf_config_service(ex, "llm");
    assert_non_null(llm);
    assert_int_equal(llm->kind, JF_KIND_HTTP);
    assert_non_null(llm->url);
    assert_int_equal(llm->rate.count, 30);
    assert_int_equal(llm->rate.period_ms, 60000);
    assert_int_equal(llm->fleet_in_flight, 20);
    assert_int_equal(llm->max_deliver, 5);
    const jf_service_config *echo = jf_config_service(ex, "echo");
    assert_non_null(echo);
    assert_int_equal(echo->kind, JF_KIND_NOOP);
    assert_int_equal(echo->delay_ms, 50);
    jf_config_destroy(ex);
    jf_config_destroy(def);
}


/* The downstream-service keys: http, postgres, breaker and rate. */
static void test_downstream_keys(void **state)
{
    (void)state;
    jf_config *c = load_ok("[postgres]\ndsn = host=/tmp dbname=x\nconnections = 3\n"
                           "breaker_window = 8\nbreaker_min_calls = 4\n"
                           "[service.llm]\nkind = http\nurl = https://api.example/v1\n"
                           "tls_verify = no\ntls_ca = /etc/ca.pem\nauth_header = X-Key: s3cret\n"
                           "max_response = 4096\nretry_after_max = 2m\n"
                           "result_required = score,keywords\nrate = 30/m\nburst = 5\n"
                           "breaker_failure_rate = 25\nbreaker_slow_call = 10s\n"
                           "breaker_open = 2s\nbreaker_open_max = 1m\nbreaker_probes = 2\n"
                           "[service.db]\nkind = postgres\nsql = SELECT f($1::jsonb)\n");
    const jf_service_config *llm = jf_config_service(c, "llm");
    assert_non_null(llm);
    assert_int_equal(llm->kind, JF_KIND_HTTP);
    assert_false(llm->tls_verify);
    assert_string_equal(llm->tls_ca, "/etc/ca.pem");
    assert_string_equal(llm->auth_header, "X-Key: s3cret");
    assert_int_equal(llm->max_response, 4096);
    assert_int_equal(llm->retry_after_max_ms, 120000);
    assert_string_equal(llm->result_required, "score,keywords");
    assert_int_equal(llm->rate.count, 30);
    assert_int_equal(llm->rate.period_ms, 60000);
    assert_int_equal(llm->burst, 5);
    assert_int_equal(llm->breaker.failure_rate, 25);
    assert_int_equal(llm->breaker.slow_call_ms, 10000);
    assert_int_equal(llm->breaker.open_ms, 2000);
    assert_int_equal(llm->breaker.open_max_ms, 60000);
    assert_int_equal(llm->breaker.probes, 2);
    assert_int_equal(llm->breaker.window, 20); /* default */
    const jf_service_config *db = jf_config_service(c, "db");
    assert_int_equal(db->kind, JF_KIND_POSTGRES);
    assert_string_equal(db->dsn, "host=/tmp dbname=x"); /* from [postgres] */
    assert_string_equal(db->sql, "SELECT f($1::jsonb)");
    assert_true(db->tls_verify); /* default */
    assert_int_equal(db->max_response, 1 << 20);
    assert_int_equal(c->postgres_connections, 3);
    assert_int_equal(c->ledger_breaker.window, 8);
    assert_int_equal(c->ledger_breaker.min_calls, 4);
    jf_config_destroy(c);

    const char *m = load_fail("[service.a]\nkind = noop\ntls_verify = maybe\n", JF_ERR_INVALID);
    assert_msg_has(m, "t.ini:3: [service.a] tls_verify: expected true or false");
    m = load_fail("[service.a]\nkind = postgres\n", JF_ERR_INVALID);
    assert_msg_has(m, "kind = postgres needs sql");
    m = load_fail("[service.a]\nkind = postgres\nsql = SELECT 1\n", JF_ERR_INVALID);
    assert_msg_has(m, "t.ini:3: [service.a] sql must pass the envelope as $1");
    m = load_fail("[service.a]\nkind = postgres\nsql = SELECT f($1)\n", JF_ERR_INVALID);
    assert_msg_has(m, "needs dsn here or in [postgres]");
    m = load_fail("[service.a]\nkind = noop\nbreaker_window = 5\n", JF_ERR_INVALID);
    assert_msg_has(m, "breaker_min_calls = 10 exceeds breaker_window = 5");
    m = load_fail("[service.a]\nkind = noop\nauth_header = Bad Secret Value\nburst = 0\n",
                  JF_ERR_INVALID);
    assert_msg_has(m, "t.ini:4: [service.a] burst");
}

/* [intake] (jetfleet-publisher serve) and [consumer] metrics_listen. */
static void test_intake_and_metrics_keys(void **state)
{
    (void)state;
    jf_config *c = load_ok("");
    assert_string_equal(c->intake.listen, "127.0.0.1:8080");
    assert_null(c->intake.token);
    assert_null(c->intake.token_file);
    assert_int_equal(c->intake.max_body, 1 << 20);
    assert_int_equal(c->intake.max_jobs, 1000);
    assert_null(c->consumer.metrics_listen);
    jf_config_destroy(c);

    c = load_ok("[intake]\nlisten = 0.0.0.0:9000\ntoken = s3cret\nmax_body = 4096\n"
                "max_jobs = 10\n[consumer]\nmetrics_listen = 127.0.0.1:9464\n");
    assert_string_equal(c->intake.listen, "0.0.0.0:9000");
    assert_string_equal(c->intake.token, "s3cret");
    assert_int_equal(c->intake.max_body, 4096);
    assert_int_equal(c->intake.max_jobs, 10);
    assert_string_equal(c->consumer.metrics_listen, "127.0.0.1:9464");
    jf_config_destroy(c);

    setenv("JETFLEET_INTAKE_TOKEN_FILE", "/run/secrets/intake", 1);
    setenv("JETFLEET_CONSUMER_METRICS_LISTEN", "127.0.0.1:9100", 1);
    c = load_ok("");
    assert_string_equal(c->intake.token_file, "/run/secrets/intake");
    assert_string_equal(c->consumer.metrics_listen, "127.0.0.1:9100");
    jf_config_destroy(c);

    /* Both sources of the token: ambiguous, refused, and the token is not quoted. */
    const char *m = load_fail("[intake]\ntoken = hunter2\n", JF_ERR_INVALID);
    assert_msg_has(m, "environment JETFLEET_INTAKE_TOKEN_FILE: [intake] token_file and [intake] "
                      "token (t.ini:2) are both set");
    assert_msg_lacks(m, "hunter2");
    unsetenv("JETFLEET_INTAKE_TOKEN_FILE");
    unsetenv("JETFLEET_CONSUMER_METRICS_LISTEN");

    m = load_fail("[intake]\nmax_body = 0\n", JF_ERR_INVALID);
    assert_msg_has(m, "t.ini:2: [intake] max_body: expected an integer from 1");
    m = load_fail("[intake]\nmax_jobs = many\n", JF_ERR_INVALID);
    assert_msg_has(m, "t.ini:2: [intake] max_jobs");
    m = load_fail("[intake]\nlisten =\n", JF_ERR_INVALID);
    assert_msg_has(m, "t.ini:2: [intake] listen: must not be empty");
    m = load_fail("[intake]\ntoken = a\tb\n", JF_ERR_INVALID);
    assert_msg_has(m, "[intake] token: must not contain control characters");
}

#define T(f) cmocka_unit_test_setup(f, clear_env)

int main(void)
{
    const struct CMUnitTest tests[] = {
        T(test_defaults),
        T(test_every_section),
        T(test_services),
        T(test_long_service_name),
        T(test_env_overrides),
        T(test_env_bad_values),
        T(test_error_names_file_line_key),
        T(test_unknown_key_and_section),
        T(test_syntax_errors),
        T(test_duplicates),
        T(test_bad_values),
        T(test_service_rules),
        T(test_secrets_never_printed),
        T(test_downstream_keys),
        T(test_intake_and_metrics_keys),
        cmocka_unit_test_setup_teardown(test_files, clear_env, files_teardown),
        T(test_example_file),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
