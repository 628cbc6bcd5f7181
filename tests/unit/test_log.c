/* Unit tests for common/log.c: every line is one valid JSON object, also
 * when a field is far longer than a line (a hostile subject, a huge error):
 * the value is cut at a whole character and ends in "...", and fields that
 * find no room are left out with "truncated": true. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>

#include "log.h"

/* Runs fn with stderr sent to a temp file; returns the parsed last line. */
static json_t *capture(void (*fn)(void), char *raw, size_t cap)
{
    char path[] = "/tmp/jf-test-log-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    int saved = dup(STDERR_FILENO);
    dup2(fd, STDERR_FILENO);
    fn();
    dup2(saved, STDERR_FILENO);
    close(saved);
    ssize_t n = pread(fd, raw, cap - 1, 0);
    close(fd);
    unlink(path);
    assert_true(n > 0);
    raw[n] = '\0';
    assert_int_equal(raw[n - 1], '\n');
    assert_null(memchr(raw, '\n', (size_t)n - 1)); /* one line */
    json_error_t e;
    json_t *j = json_loadb(raw, (size_t)n, 0, &e);
    if (j == NULL)
        fail_msg("not JSON (%s): %.200s", e.text, raw);
    return j;
}

static char *big; /* 10,000 bytes: "é" (2 bytes) and '"' and control bytes mixed */

static void log_big_field(void)
{
    jf_log(JF_LOG_ERROR, "dead-lettered", JF_S("subject", big), JF_I("seq", 42),
           JF_S("error", big), JF_S("job_id", "j-1"));
}

static void test_long_field_is_cut_and_line_stays_json(void **state)
{
    (void)state;
    char *raw = malloc(8192);
    json_t *j = capture(log_big_field, raw, 8192);
    assert_true(strlen(raw) <= 4096);
    assert_string_equal(json_string_value(json_object_get(j, "msg")), "dead-lettered");
    const char *subject = json_string_value(json_object_get(j, "subject"));
    assert_non_null(subject);
    size_t n = strlen(subject);
    assert_true(n > 1000 && n < 4096);
    assert_string_equal(subject + n - 3, "...");
    /* Cut at a whole character: what precedes "..." is a prefix of big. */
    assert_memory_equal(subject, big, n - 3);
    /* The fields after the long one had no room: left out, and said so. */
    assert_true(json_is_true(json_object_get(j, "truncated")));
    assert_null(json_object_get(j, "error"));
    json_decref(j);
    free(raw);
}

static void log_short(void)
{
    jf_log(JF_LOG_WARN, "stats", JF_S("durable", "work-\"high\"\n"), JF_I("acked", -7));
}

static void test_short_line_is_whole(void **state)
{
    (void)state;
    char raw[1024];
    json_t *j = capture(log_short, raw, sizeof raw);
    assert_string_equal(json_string_value(json_object_get(j, "durable")), "work-\"high\"\n");
    assert_int_equal(json_integer_value(json_object_get(j, "acked")), -7);
    assert_string_equal(json_string_value(json_object_get(j, "level")), "warn");
    assert_null(json_object_get(j, "truncated"));
    json_decref(j);
}

static void log_bad_utf8(void)
{
    /* A stray 0xFF, a cut sequence, an overlong '/', an encoded surrogate,
     * then valid "é" and "€". */
    jf_log(JF_LOG_ERROR, "dead-lettered",
           JF_S("subject", "jobs.\xff.normal.\xc3"), JF_S("error", "a\xc0\xaf" "b\xed\xa0\x80" "c\xc3\xa9\xe2\x82\xac"));
}

static void test_invalid_utf8_becomes_replacement(void **state)
{
    (void)state;
    char raw[1024];
    json_t *j = capture(log_bad_utf8, raw, sizeof raw);
    assert_string_equal(json_string_value(json_object_get(j, "subject")),
                        "jobs.\xef\xbf\xbd" ".normal.\xef\xbf\xbd");
    /* Every byte of a bad sequence is replaced on its own. */
    assert_string_equal(json_string_value(json_object_get(j, "error")),
                        "a\xef\xbf\xbd\xef\xbf\xbd" "b\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd" "c\xc3\xa9\xe2\x82\xac");
    json_decref(j);
}

int main(void)
{
    big = malloc(10001);
    for (size_t i = 0; i < 10000;) {
        if (i % 97 == 5) {
            big[i++] = '"';
        } else if (i % 89 == 7) {
            big[i++] = '\x01';
        } else if (i + 1 < 10000) {
            big[i++] = '\xc3';
            big[i++] = '\xa9';
        } else {
            big[i++] = 'x';
        }
    }
    big[10000] = '\0';
    jf_log_set_level(JF_LOG_DEBUG);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_long_field_is_cut_and_line_stays_json),
        cmocka_unit_test(test_short_line_is_whole),
        cmocka_unit_test(test_invalid_utf8_becomes_replacement),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    free(big);
    return rc;
}
