/* Unit tests for common/http_classify.c: what an HTTP answer means for a
 * job (DESIGN.md "Downstream HTTP call", result_required), the one-line
 * error quotes, and loading the auth header without ever echoing it. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "http_classify.h"

#define SECRET "Bearer s3cr3t-t0ken"

static jf_http_verdict judge(long status, const char *body, const jf_http_required *req)
{
    jf_http_verdict v;
    jf_http_classify(&v, status, body, body ? strlen(body) : 0, req);
    return v;
}

static jf_http_required *required(const char *list)
{
    jf_http_required *req = NULL;
    jf_error err = {{0}};
    if (jf_http_required_parse(&req, "llm", list, &err) != JF_OK)
        fail_msg("result_required \"%s\" refused: %s", list, err.msg);
    return req;
}

/* ---- 2xx ------------------------------------------------------------- */

static void test_2xx_json_is_the_result(void **state)
{
    (void)state;
    jf_http_verdict v = judge(200, "{\"summary\":\"ok\",\"score\":3}", NULL);
    assert_int_equal(v.cls, JF_HTTP_SUCCESS);
    assert_false(v.service_fault);
    assert_string_equal(v.error, "");
    assert_non_null(v.result);
    assert_true(json_is_object(v.result));
    assert_int_equal(json_integer_value(json_object_get(v.result, "score")), 3);
    json_decref(v.result);

    v = judge(201, " 42 ", NULL); /* any JSON value */
    assert_int_equal(v.cls, JF_HTTP_SUCCESS);
    assert_int_equal(json_integer_value(v.result), 42);
    json_decref(v.result);

    v = judge(299, "[1,2]", NULL);
    assert_int_equal(v.cls, JF_HTTP_SUCCESS);
    assert_int_equal(json_array_size(v.result), 2);
    json_decref(v.result);
}

static void test_2xx_other_bodies(void **state)
{
    (void)state;
    jf_http_verdict v = judge(204, "", NULL);
    assert_int_equal(v.cls, JF_HTTP_SUCCESS);
    assert_null(v.result);

    /* Not JSON: kept as a string. */
    v = judge(200, "plain text answer", NULL);
    assert_int_equal(v.cls, JF_HTTP_SUCCESS);
    assert_string_equal(json_string_value(v.result), "plain text answer");
    json_decref(v.result);

    v = judge(200, "{\"truncated\":", NULL);
    assert_int_equal(v.cls, JF_HTTP_SUCCESS);
    assert_string_equal(json_string_value(v.result), "{\"truncated\":");
    json_decref(v.result);

    /* Bytes that are not UTF-8 become U+FFFD; a NUL survives. */
    static const char bin[] = "a\xff"
                              "b\xc3\xa9\0z";
    jf_http_classify(&v, 200, bin, sizeof bin - 1, NULL);
    assert_int_equal(v.cls, JF_HTTP_SUCCESS);
    assert_int_equal(json_string_length(v.result), 9);
    assert_memory_equal(json_string_value(v.result),
                        "a\xef\xbf\xbd"
                        "b\xc3\xa9\0z",
                        9);
    json_decref(v.result);
}

static void test_result_required(void **state)
{
    (void)state;
    jf_http_required *req = required(" summary , score ");

    jf_http_verdict v = judge(200, "{\"summary\":\"s\",\"score\":null,\"x\":1}", req);
    assert_int_equal(v.cls, JF_HTTP_SUCCESS);
    assert_false(v.service_fault);
    assert_non_null(v.result);
    json_decref(v.result);

    v = judge(200, "{\"summary\":\"s\"}", req);
    assert_int_equal(v.cls, JF_HTTP_RETRY);
    assert_true(v.service_fault);
    assert_null(v.result);
    assert_string_equal(v.error, "2xx without required key score");

    v = judge(200, "{\"Summary\":\"s\",\"score\":1}", req); /* keys are case-sensitive */
    assert_string_equal(v.error, "2xx without required key summary");

    v = judge(200, "Sure! Here is the JSON you asked for:\n{\"summary\"", req);
    assert_int_equal(v.cls, JF_HTTP_RETRY);
    assert_true(v.service_fault);
    assert_string_equal(v.error,
                        "2xx body is not JSON: Sure! Here is the JSON you asked for: {\"summary\"");

    v = judge(204, "", req);
    assert_int_equal(v.cls, JF_HTTP_RETRY);
    assert_string_equal(v.error, "2xx body is not JSON");

    v = judge(200, "[\"summary\",\"score\"]", req);
    assert_int_equal(v.cls, JF_HTTP_RETRY);
    assert_true(v.service_fault);
    assert_string_equal(v.error, "2xx body is not a JSON object: [\"summary\",\"score\"]");

    /* Only 2xx bodies are judged by shape. */
    v = judge(400, "{\"summary\":\"s\",\"score\":1}", req);
    assert_int_equal(v.cls, JF_HTTP_PERMANENT);
    jf_http_required_destroy(req);
}

static void test_required_parse(void **state)
{
    (void)state;
    jf_http_required *req = (jf_http_required *)&req; /* must be overwritten */
    jf_error err = {{0}};
    assert_int_equal(jf_http_required_parse(&req, "llm", NULL, &err), JF_OK);
    assert_null(req);
    req = (jf_http_required *)&req;
    assert_int_equal(jf_http_required_parse(&req, "llm", "", &err), JF_OK);
    assert_null(req);

    const char *bad[] = {"a,,b", ",a", "a,", " ", "a, ,b"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        req = (jf_http_required *)&req;
        assert_int_equal(jf_http_required_parse(&req, "llm", bad[i], &err), JF_ERR_INVALID);
        assert_ptr_equal(req, (jf_http_required *)&req); /* untouched */
        assert_non_null(strstr(err.msg, "service llm: result_required"));
    }

    char many[400] = "";
    for (int i = 0; i < 65; i++)
        snprintf(many + strlen(many), sizeof many - strlen(many), "%sk%d", i ? "," : "", i);
    assert_int_equal(jf_http_required_parse(&req, "llm", many, &err), JF_ERR_INVALID);
    assert_non_null(strstr(err.msg, "more than 64 keys"));
    *strrchr(many, ',') = '\0'; /* 64 keys are fine */
    req = required(many);
    jf_http_required_destroy(req);
    jf_http_required_destroy(NULL);
}

/* ---- errors ------------------------------------------------------------ */

static void test_retryable_statuses(void **state)
{
    (void)state;
    struct {
        long status;
        bool fault;
    } cases[] = {{408, true}, {425, false}, {429, false}, {500, true},
                 {502, true}, {503, true},  {504, true},  {599, true}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        jf_http_verdict v = judge(cases[i].status, "try later", NULL);
        char want[64];
        snprintf(want, sizeof want, "HTTP %ld: try later", cases[i].status);
        assert_int_equal(v.cls, JF_HTTP_RETRY);
        assert_int_equal(v.service_fault, cases[i].fault);
        assert_true(v.use_retry_after);
        assert_null(v.result);
        assert_string_equal(v.error, want);
    }
}

static void test_permanent_statuses(void **state)
{
    (void)state;
    long statuses[] = {400, 401, 403, 404, 405, 409, 410, 413, 422, 451, 499};
    for (size_t i = 0; i < sizeof statuses / sizeof statuses[0]; i++) {
        jf_http_verdict v = judge(statuses[i], "{\"error\":\"bad\"}", NULL);
        assert_int_equal(v.cls, JF_HTTP_PERMANENT);
        assert_false(v.service_fault);
        assert_false(v.use_retry_after);
        assert_null(v.result);
    }
    jf_http_verdict v = judge(400, "bad\r\nrequest:\tmissing  field\n", NULL);
    assert_string_equal(v.error, "HTTP 400: bad request: missing field");
    v = judge(404, "", NULL);
    assert_string_equal(v.error, "HTTP 404");
    v = judge(404, " \r\n ", NULL);
    assert_string_equal(v.error, "HTTP 404");
}

static void test_unexpected_statuses(void **state)
{
    (void)state;
    jf_http_verdict v = judge(301, "moved", NULL);
    assert_int_equal(v.cls, JF_HTTP_RETRY);
    assert_true(v.service_fault);
    assert_false(v.use_retry_after);
    assert_string_equal(v.error, "HTTP 301 (redirects are not followed): moved");
    v = judge(600, "", NULL);
    assert_int_equal(v.cls, JF_HTTP_RETRY);
    assert_true(v.service_fault);
    assert_string_equal(v.error, "HTTP 600 (unexpected status)");
    v = judge(101, "", NULL);
    assert_int_equal(v.cls, JF_HTTP_RETRY);
    v = judge(0, "", NULL);
    assert_int_equal(v.cls, JF_HTTP_RETRY);
    assert_true(v.service_fault);
}

static void test_error_quote_is_bounded(void **state)
{
    (void)state;
    char body[1001];
    memset(body, 'x', 1000);
    body[1000] = '\0';
    jf_http_verdict v = judge(500, body, NULL);
    assert_int_equal(strlen(v.error), strlen("HTTP 500: ") + JF_HTTP_SNIPPET_MAX);

    /* A character is never cut in half. */
    memset(body, 'a', 199);
    memcpy(body + 199, "\xc3\xa9tail", 7);
    v = judge(400, body, NULL);
    assert_int_equal(strlen(v.error), strlen("HTTP 400: ") + 199);
    assert_int_equal(v.error[strlen(v.error) - 1], 'a');
}

static void test_one_line(void **state)
{
    (void)state;
    char out[64];
    assert_int_equal(jf_http_one_line(out, sizeof out, "  a\r\n\tb  c \x01", 12, 100), 5);
    assert_string_equal(out, "a b c");
    jf_http_one_line(out, sizeof out, "x\xff\xfey\xc3(\xed\xa0\x80z\xc0\xaf", 12, 100);
    assert_string_equal(out, "x??y?(???z??"); /* bad bytes, a surrogate, an overlong */
    jf_http_one_line(out, sizeof out, "\xe2\x82\xac\xf0\x9f\x98\x80", 7, 100);
    assert_string_equal(out, "\xe2\x82\xac\xf0\x9f\x98\x80");
    jf_http_one_line(out, sizeof out, "\xe2\x82\xac\xf0\x9f\x98\x80", 7, 6);
    assert_string_equal(out, "\xe2\x82\xac");   /* the 4-byte one does not fit */
    jf_http_one_line(out, 4, "abcdef", 6, 100); /* cap wins over max */
    assert_string_equal(out, "abc");
    jf_http_one_line(out, sizeof out, "a\0b", 3, 100);
    assert_string_equal(out, "a b");
    assert_int_equal(jf_http_one_line(out, 0, "abc", 3, 100), 0);
    assert_int_equal(jf_http_one_line(out, sizeof out, "abc   ", 6, 4), 3);
    assert_string_equal(out, "abc");
}

/* ---- the auth header ---------------------------------------------------- */

static jf_service_config svc_with(const char *header, const char *file, const char *env)
{
    jf_service_config s;
    memset(&s, 0, sizeof s);
    snprintf(s.name, sizeof s.name, "llm");
    s.auth_header = (char *)header;
    s.auth_header_file = (char *)file;
    s.auth_header_env = (char *)env;
    return s;
}

static char *auth_ok(const jf_service_config *s)
{
    char *h = (char *)"untouched";
    jf_error err = {{0}};
    if (jf_http_auth_load(&h, s, &err) != JF_OK)
        fail_msg("auth header refused: %s", err.msg);
    return h;
}

/* Refused, naming what, never quoting the secret. */
static void auth_bad(const jf_service_config *s, jf_status want, const char *names)
{
    char *h = (char *)"untouched";
    jf_error err = {{0}};
    assert_int_equal(jf_http_auth_load(&h, s, &err), want);
    assert_string_equal(h, "untouched");
    if (strstr(err.msg, names) == NULL)
        fail_msg("error \"%s\" does not name \"%s\"", err.msg, names);
    assert_null(strstr(err.msg, "s3cr3t"));
    assert_non_null(strstr(err.msg, "service llm"));
}

static void write_file(const char *path, const char *data, size_t len)
{
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    assert_int_equal(fwrite(data, 1, len, fp), len);
    fclose(fp);
}

static void test_auth_none_and_inline(void **state)
{
    (void)state;
    jf_service_config s = svc_with(NULL, NULL, NULL);
    assert_null(auth_ok(&s));

    s = svc_with("Authorization: " SECRET, NULL, NULL);
    char *h = auth_ok(&s);
    assert_string_equal(h, "Authorization: " SECRET);
    jf_http_auth_free(h);
    jf_http_auth_free(NULL);

    s = svc_with("X-Api-Key:" SECRET, NULL, NULL); /* no space after the colon is fine */
    jf_http_auth_free(auth_ok(&s));

    const char *bad[] = {
        SECRET,                    /* no name */
        ": " SECRET,               /* empty name */
        "Auth orization: " SECRET, /* not a token */
        "X-Key:",                  /* curl would drop the header */
        "X-Key:   ",
        "X-Key: " SECRET "\r\nX-Injected: 1", /* a second header */
        "X-Key: " SECRET "\n",
        "X-Key: s3cr3t\x7f",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        s = svc_with(bad[i], NULL, NULL);
        auth_bad(&s, JF_ERR_INVALID, "auth_header is not \"Name: value\"");
    }

    s = svc_with("A: b", "/nonexistent", NULL);
    auth_bad(&s, JF_ERR_INVALID, "set only one of");
    s = svc_with(NULL, "/nonexistent", "JF_TEST_AUTH");
    auth_bad(&s, JF_ERR_INVALID, "set only one of");
}

static void test_auth_file(void **state)
{
    (void)state;
    char dir[] = "/tmp/jf-auth-XXXXXX";
    assert_non_null(mkdtemp(dir));
    char path[128];
    snprintf(path, sizeof path, "%s/auth", dir);

    const char *two = "Authorization: " SECRET "\r\nsecond line: ignored\n";
    write_file(path, two, strlen(two));
    jf_service_config s = svc_with(NULL, path, NULL);
    char *h = auth_ok(&s);
    assert_string_equal(h, "Authorization: " SECRET);
    jf_http_auth_free(h);

    write_file(path, "X-Key: " SECRET, strlen("X-Key: " SECRET)); /* no line end */
    h = auth_ok(&s);
    assert_string_equal(h, "X-Key: " SECRET);
    jf_http_auth_free(h);

    write_file(path, "", 0);
    auth_bad(&s, JF_ERR_INVALID, path);
    write_file(path, "\nAuthorization: " SECRET "\n", strlen("\nAuthorization: " SECRET "\n"));
    auth_bad(&s, JF_ERR_INVALID, "first line is not \"Name: value\"");
    write_file(path, SECRET "\n", strlen(SECRET "\n"));
    auth_bad(&s, JF_ERR_INVALID, path);
    write_file(path, "X-Key: s3cr3t\0x\n", 16);
    auth_bad(&s, JF_ERR_INVALID, "NUL");

    static char big[9000];
    memcpy(big, "X-Key: ", 7);
    memset(big + 7, 's', sizeof big - 7);
    write_file(path, big, sizeof big);
    auth_bad(&s, JF_ERR_INVALID, "longer than 8192 bytes");

    unlink(path);
    auth_bad(&s, JF_ERR_INVALID, path);
    rmdir(dir);
}

static void test_auth_env(void **state)
{
    (void)state;
    jf_service_config s = svc_with(NULL, NULL, "JF_TEST_AUTH");
    setenv("JF_TEST_AUTH", "Authorization: " SECRET, 1);
    char *h = auth_ok(&s);
    assert_string_equal(h, "Authorization: " SECRET);
    jf_http_auth_free(h);

    setenv("JF_TEST_AUTH", SECRET, 1);
    auth_bad(&s, JF_ERR_INVALID, "variable JF_TEST_AUTH is not \"Name: value\"");
    setenv("JF_TEST_AUTH", "", 1);
    auth_bad(&s, JF_ERR_INVALID, "variable JF_TEST_AUTH is empty");
    unsetenv("JF_TEST_AUTH");
    auth_bad(&s, JF_ERR_INVALID, "variable JF_TEST_AUTH is not set");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_2xx_json_is_the_result),
        cmocka_unit_test(test_2xx_other_bodies),
        cmocka_unit_test(test_result_required),
        cmocka_unit_test(test_required_parse),
        cmocka_unit_test(test_retryable_statuses),
        cmocka_unit_test(test_permanent_statuses),
        cmocka_unit_test(test_unexpected_statuses),
        cmocka_unit_test(test_error_quote_is_bounded),
        cmocka_unit_test(test_one_line),
        cmocka_unit_test(test_auth_none_and_inline),
        cmocka_unit_test(test_auth_file),
        cmocka_unit_test(test_auth_env),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
