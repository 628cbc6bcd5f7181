/* Unit tests for common/jsmsg.c: JetStream ack subjects in both layouts
 * nats-server writes (v1, and v2 with domain and account hash), everything
 * that must be refused with the offending token named, and the pull status
 * classification the consumer's pull loop acts on. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "jsmsg.h"

static jf_ack_meta ok_n(const char *s, size_t len)
{
    jf_ack_meta m;
    jf_error err = {{0}};
    jf_status st = jf_ack_meta_parse(&m, s, len, &err);
    if (st != JF_OK)
        fail_msg("refused ack subject \"%.*s\": %s", (int)len, s, err.msg);
    return m;
}

static jf_ack_meta ok(const char *s)
{
    return ok_n(s, strlen(s));
}

/* Asserts JF_ERR_INVALID, the output untouched, and an error on one line
 * that contains want (the token's number and name, or the rule). */
static void bad_n(const char *s, size_t len, const char *want)
{
    jf_ack_meta m;
    memset(&m, 0xA5, sizeof m);
    jf_ack_meta before = m;
    jf_error err = {{0}};
    if (jf_ack_meta_parse(&m, s, len, &err) != JF_ERR_INVALID)
        fail_msg("accepted bad ack subject \"%.*s\"", (int)len, s);
    assert_memory_equal(&m, &before, sizeof m);
    if (strstr(err.msg, want) == NULL)
        fail_msg("error \"%s\" does not contain \"%s\"", err.msg, want);
    for (const char *p = err.msg; *p; p++)
        if ((unsigned char)*p < 0x20)
            fail_msg("error is not one line: \"%s\"", err.msg);
    assert_int_equal(jf_ack_meta_parse(&m, s, len, NULL), JF_ERR_INVALID);
}

static void bad(const char *s, const char *want)
{
    bad_n(s, strlen(s), want);
}

static void assert_span(const char *p, size_t n, const char *want)
{
    if (p == NULL || n != strlen(want) || memcmp(p, want, n) != 0)
        fail_msg("span \"%.*s\" is not \"%s\"", p ? (int)n : 6, p ? p : "(null)", want);
}

/* ---- accepted --------------------------------------------------------- */

static void test_v1(void **state)
{
    (void)state;
    /* As nats-server 2.9.10 writes it for the durable llm-normal of JOBS. */
    const char *s = "$JS.ACK.JOBS.llm-normal.1.42.7.1764322800123456789.5";
    jf_ack_meta m = ok(s);
    assert_null(m.domain);
    assert_span(m.stream, m.stream_len, "JOBS");
    assert_span(m.consumer, m.consumer_len, "llm-normal");
    assert_true(m.stream >= s && m.consumer + m.consumer_len <= s + strlen(s));
    assert_int_equal(m.delivered, 1);
    assert_int_equal(m.stream_seq, 42);
    assert_int_equal(m.consumer_seq, 7);
    assert_int_equal(m.timestamp_ns, INT64_C(1764322800123456789));
    assert_int_equal(m.pending, 5);
}

static void test_v2_no_domain(void **state)
{
    (void)state;
    jf_ack_meta m = ok("$JS.ACK._.ACC0123456789HASH.JOBS.echo-high.3.1000.12.1764322800000000000.0");
    assert_null(m.domain);
    assert_int_equal(m.domain_len, 0);
    assert_span(m.stream, m.stream_len, "JOBS");
    assert_span(m.consumer, m.consumer_len, "echo-high");
    assert_int_equal(m.delivered, 3);
    assert_int_equal(m.stream_seq, 1000);
    assert_int_equal(m.consumer_seq, 12);
    assert_int_equal(m.timestamp_ns, INT64_C(1764322800000000000));
    assert_int_equal(m.pending, 0);
}

static void test_v2_domain_and_random(void **state)
{
    (void)state;
    jf_ack_meta m = ok("$JS.ACK.hub.ACCHASH.JOBS_DLQ.ops-low.1.2.3.4.5.r4nd0m");
    assert_span(m.domain, m.domain_len, "hub");
    assert_span(m.stream, m.stream_len, "JOBS_DLQ");
    assert_span(m.consumer, m.consumer_len, "ops-low");
    assert_int_equal(m.delivered, 1);
    assert_int_equal(m.stream_seq, 2);
    assert_int_equal(m.consumer_seq, 3);
    assert_int_equal(m.timestamp_ns, 4);
    assert_int_equal(m.pending, 5);
}

static void test_number_limits(void **state)
{
    (void)state;
    jf_ack_meta m = ok("$JS.ACK.S.C.0.9223372036854775807.00000000000000000001.0.9223372036854775807");
    assert_int_equal(m.delivered, 0);
    assert_true(m.stream_seq == UINT64_C(9223372036854775807));
    assert_int_equal(m.consumer_seq, 1); /* leading zeros: nats.c reads them too */
    assert_true(m.pending == UINT64_C(9223372036854775807));
}

static void test_length_bounds_the_subject(void **state)
{
    (void)state;
    /* Only subject[0..len) is read: what follows is another buffer's. */
    const char buf[] = "$JS.ACK.S.C.1.2.3.4.5.and-more-tokens.x.y";
    jf_ack_meta m = ok_n(buf, strlen("$JS.ACK.S.C.1.2.3.4.5"));
    assert_int_equal(m.pending, 5);
    const char digits[] = "$JS.ACK.S.C.1.2.3.4.567";
    m = ok_n(digits, sizeof digits - 2);
    assert_int_equal(m.pending, 56);
    bad_n(buf, 7, "does not start with $JS.ACK.");
    bad_n(buf, 0, "does not start with $JS.ACK.");
    /* An embedded NUL is a byte like any other, and no subject has one. */
    bad_n("$JS.ACK.S\0X.C.1.2.3.4.5", 23, "token 3 (stream) has byte 0x00");
    bad_n("$JS.ACK.S.C.1.2.3.4.5\0", 22, "token 9 (pending) \"5?\" is not a number");
}

/* ---- refused ---------------------------------------------------------- */

static void test_prefix(void **state)
{
    (void)state;
    bad("JS.ACK.S.C.1.2.3.4.5", "does not start with $JS.ACK.");
    bad("$JS.ACk.S.C.1.2.3.4.5", "does not start with $JS.ACK.");
    bad("_INBOX.abc.def", "does not start with $JS.ACK.");
    bad("$JS.ACK", "does not start with $JS.ACK.");
    assert_int_equal(jf_ack_meta_parse(&(jf_ack_meta){0}, NULL, 0, NULL), JF_ERR_INVALID);
}

static void test_token_count(void **state)
{
    (void)state;
    bad("$JS.ACK.S.C.1.2.3.4", "8 tokens, expected 9 (v1) or 11-12");
    bad("$JS.ACK.S.C.1.2.3.4.5.6", "10 tokens");
    bad("$JS.ACK.D.H.S.C.1.2.3.4.5.R.X", "13 tokens");
    bad("$JS.ACK.", "3 tokens");
    bad("$JS.ACK.S.C.1.2.3.4.5.", "10 tokens");
    bad("$JS.ACK.D.H.S.C.1.2.3.4.5.", "token 12 (random token) is empty");
}

static void test_empty_tokens(void **state)
{
    (void)state;
    bad("$JS.ACK..C.1.2.3.4.5", "token 3 (stream) is empty");
    bad("$JS.ACK.S..1.2.3.4.5", "token 4 (consumer) is empty");
    bad("$JS.ACK.S.C..2.3.4.5", "token 5 (delivered) is empty");
    bad("$JS.ACK.S.C.1.2.3.4.", "token 9 (pending) is empty");
    bad("$JS.ACK..H.S.C.1.2.3.4.5", "token 3 (domain) is empty");
    bad("$JS.ACK.D..S.C.1.2.3.4.5", "token 4 (account hash) is empty");
}

static void test_numbers(void **state)
{
    (void)state;
    bad("$JS.ACK.S.C.1x.2.3.4.5", "token 5 (delivered) \"1x\" is not a number");
    bad("$JS.ACK.S.C.1.-2.3.4.5", "token 6 (stream sequence) \"-2\" is not a number");
    bad("$JS.ACK.S.C.1.+2.3.4.5", "token 6 (stream sequence) \"+2\" is not a number");
    bad("$JS.ACK.S.C.1.2. 3.4.5", "token 7 (consumer sequence) \" 3\" is not a number");
    bad("$JS.ACK.S.C.1.2.3.0x4.5", "token 8 (timestamp) \"0x4\" is not a number");
    bad("$JS.ACK.S.C.1.2.3.4.5e3", "token 9 (pending) \"5e3\" is not a number");
    bad("$JS.ACK.S.C.1.9223372036854775808.3.4.5",
        "token 6 (stream sequence) \"9223372036854775808\" is out of range");
    bad("$JS.ACK.S.C.1.2.3.99999999999999999999.5", "token 8 (timestamp) \"99999999999999999999\" is out of range");
    bad("$JS.ACK.D.H.S.C.1.2.3.4.five", "token 11 (pending) \"five\" is not a number");
    bad("$JS.ACK.D.H.S.C.one.2.3.4.5", "token 7 (delivered)");
}

static void test_names(void **state)
{
    (void)state;
    bad("$JS.ACK.S S.C.1.2.3.4.5", "token 3 (stream) has byte 0x20");
    bad("$JS.ACK.S.C*.1.2.3.4.5", "token 4 (consumer) has byte 0x2a");
    bad("$JS.ACK.S.>.1.2.3.4.5", "token 4 (consumer) has byte 0x3e");
    bad("$JS.ACK.S\t.C.1.2.3.4.5", "token 3 (stream) has byte 0x09");
    bad("$JS.ACK.D\r.H.S.C.1.2.3.4.5", "token 3 (domain) has byte 0x0d");
    bad("$JS.ACK.D.H.S.C.1.2.3.4.5.R\n", "token 12 (random token) has byte 0x0a");
}

static void test_error_quote_bounded(void **state)
{
    (void)state;
    char s[4096];
    int n = snprintf(s, sizeof s, "$JS.ACK.S.C.1.2.3.4.");
    memset(s + n, '9', sizeof s - (size_t)n - 1);
    s[sizeof s - 1] = '\0';
    jf_ack_meta m;
    jf_error err;
    assert_int_equal(jf_ack_meta_parse(&m, s, strlen(s), &err), JF_ERR_INVALID);
    assert_true(strlen(err.msg) < 300);
    assert_non_null(strstr(err.msg, "out of range"));
    assert_non_null(strstr(err.msg, "..."));
}

/* ---- pull status -------------------------------------------------------- */

static void test_pull_status(void **state)
{
    (void)state;
    assert_int_equal(jf_pull_status_classify("100", "Idle Heartbeat"), JF_PULL_HEARTBEAT);
    assert_int_equal(jf_pull_status_classify("100", NULL), JF_PULL_HEARTBEAT);
    assert_int_equal(jf_pull_status_classify("408", "Request Timeout"), JF_PULL_EXPIRED);
    assert_int_equal(jf_pull_status_classify("404", "No Messages"), JF_PULL_EXPIRED);
    assert_int_equal(jf_pull_status_classify("409", "Exceeded MaxWaiting"), JF_PULL_CONFLICT);
    assert_int_equal(jf_pull_status_classify("409", "Exceeded MaxRequestBatch of 256"),
                     JF_PULL_CONFLICT);
    assert_int_equal(jf_pull_status_classify("409", NULL), JF_PULL_CONFLICT);
    assert_int_equal(jf_pull_status_classify("409", ""), JF_PULL_CONFLICT);
    assert_int_equal(jf_pull_status_classify("409", "Consumer Deleted"), JF_PULL_CONSUMER_DELETED);
    assert_int_equal(jf_pull_status_classify("409", "consumer deleted"), JF_PULL_CONSUMER_DELETED);
    assert_int_equal(jf_pull_status_classify("409", "Consumer Delete"), JF_PULL_CONFLICT);
    /* Only a 409 says the durable is gone. */
    assert_int_equal(jf_pull_status_classify("404", "Consumer Deleted"), JF_PULL_EXPIRED);
    assert_int_equal(jf_pull_status_classify("503", "No Responders"), JF_PULL_OTHER);
    assert_int_equal(jf_pull_status_classify("4080", NULL), JF_PULL_OTHER);
    assert_int_equal(jf_pull_status_classify("40", NULL), JF_PULL_OTHER);
    assert_int_equal(jf_pull_status_classify(" 408", NULL), JF_PULL_OTHER);
    assert_int_equal(jf_pull_status_classify("", NULL), JF_PULL_OTHER);
    assert_int_equal(jf_pull_status_classify(NULL, "Consumer Deleted"), JF_PULL_OTHER);
}

static void test_pull_status_names(void **state)
{
    (void)state;
    assert_string_equal(jf_pull_status_name(JF_PULL_HEARTBEAT), "heartbeat");
    assert_string_equal(jf_pull_status_name(JF_PULL_EXPIRED), "expired");
    assert_string_equal(jf_pull_status_name(JF_PULL_CONFLICT), "conflict");
    assert_string_equal(jf_pull_status_name(JF_PULL_CONSUMER_DELETED), "consumer_deleted");
    assert_string_equal(jf_pull_status_name(JF_PULL_OTHER), "other");
    assert_string_equal(jf_pull_status_name((jf_pull_status)99), "other");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_v1),
        cmocka_unit_test(test_v2_no_domain),
        cmocka_unit_test(test_v2_domain_and_random),
        cmocka_unit_test(test_number_limits),
        cmocka_unit_test(test_length_bounds_the_subject),
        cmocka_unit_test(test_prefix),
        cmocka_unit_test(test_token_count),
        cmocka_unit_test(test_empty_tokens),
        cmocka_unit_test(test_numbers),
        cmocka_unit_test(test_names),
        cmocka_unit_test(test_error_quote_bounded),
        cmocka_unit_test(test_pull_status),
        cmocka_unit_test(test_pull_status_names),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
