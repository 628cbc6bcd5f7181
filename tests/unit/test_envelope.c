/* Unit tests for common/envelope.c: every rule of DESIGN.md's job envelope
 * contract, the subject helpers, and agreement with the example files of
 * schemas/job.schema.json (schemas/examples/job-*.json). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <dirent.h>

#include "envelope.h"

#ifndef JF_SOURCE_DIR
#error "JF_SOURCE_DIR must name the source tree (set by tests/CMakeLists.txt)"
#endif

#define LEN(lit) (sizeof(lit) - 1)
/* A valid envelope with room for extra members before the closing brace. */
#define ENV(extra)                                                                                 \
    "{\"id\":\"tender-8145\",\"service\":\"llm\",\"type\":\"enrich\",\"payload\":{}" extra "}"
/* The same without one required member. */
#define NO_ID "{\"service\":\"llm\",\"type\":\"enrich\",\"payload\":{}}"

static jf_envelope *parse_ok_n(const char *data, size_t len, const char *subject)
{
    jf_envelope *env = NULL;
    jf_error err = {{0}};
    jf_status st = jf_envelope_parse(&env, data, len, subject, 0, &err);
    if (st != JF_OK)
        fail_msg("rejected valid envelope (%s): %s\n  input: %.*s", jf_status_name(st), err.msg,
                 (int)(len > 300 ? 300 : len), data);
    assert_non_null(env);
    return env;
}

static jf_envelope *parse_ok(const char *json, const char *subject)
{
    return parse_ok_n(json, strlen(json), subject);
}

/* Asserts JF_ERR_INVALID, *out untouched, and an error naming the rule. */
static void expect_invalid_n(const char *data, size_t len, const char *subject, size_t max_payload,
                             const char *want)
{
    jf_envelope *sentinel = (jf_envelope *)&sentinel;
    jf_envelope *env = sentinel;
    jf_error err = {{0}};
    jf_status st = jf_envelope_parse(&env, data, len, subject, max_payload, &err);
    if (st != JF_ERR_INVALID)
        fail_msg("want invalid, got %s (%s)\n  input: %.*s", jf_status_name(st), err.msg,
                 (int)(len > 300 ? 300 : len), data);
    assert_ptr_equal(env, sentinel);
    if (strstr(err.msg, want) == NULL)
        fail_msg("error \"%s\" does not contain \"%s\"", err.msg, want);
    for (const char *p = err.msg; *p; p++) {
        if ((unsigned char)*p < 0x20)
            fail_msg("error is not one line: \"%s\"", err.msg);
    }
    /* err may be NULL: the verdict must not depend on it. */
    assert_int_equal(jf_envelope_parse(&env, data, len, subject, max_payload, NULL),
                     JF_ERR_INVALID);
    assert_ptr_equal(env, sentinel);
}

/* ---- valid envelopes -------------------------------------------------- */

static void test_minimal(void **state)
{
    (void)state;
    jf_envelope *env =
        parse_ok("{\"id\":\"a\",\"service\":\"s\",\"type\":\"t\",\"payload\":{}}", NULL);
    assert_string_equal(env->id, "a");
    assert_string_equal(env->service, "s");
    assert_string_equal(env->type, "t");
    assert_null(env->tenant);
    assert_int_equal(env->priority, JF_PRIO_NORMAL);
    assert_false(env->has_created_at);
    assert_false(env->has_deadline);
    assert_true(json_is_object(json_object_get(env->root, "payload")));
    jf_envelope_destroy(env);
}

static void test_all_fields(void **state)
{
    (void)state;
    const char *json =
        "{\"id\": \"tender-8145\", \"service\": \"llm\", \"priority\": \"high\","
        " \"type\": \"enrich\", \"tenant\": \"acme\", \"payload\": {\"tender_id\": 8145},"
        " \"created_at\": \"2026-11-22T10:00:00Z\","
        " \"deadline\": \"2026-11-22T12:00:00.250Z\"}";
    jf_envelope *env = parse_ok(json, "jobs.llm.high.enrich");
    assert_string_equal(env->id, "tender-8145");
    assert_string_equal(env->service, "llm");
    assert_string_equal(env->type, "enrich");
    assert_string_equal(env->tenant, "acme");
    assert_int_equal(env->priority, JF_PRIO_HIGH);
    assert_true(env->has_created_at);
    assert_int_equal(env->created_at_ms, INT64_C(1795341600000));
    assert_true(env->has_deadline);
    assert_int_equal(env->deadline_ms, INT64_C(1795341600000) + 7200000 + 250);
    json_t *tid = json_object_get(json_object_get(env->root, "payload"), "tender_id");
    assert_int_equal(json_integer_value(tid), 8145);
    jf_envelope_destroy(env);
}

static void test_unicode(void **state)
{
    (void)state;
    /* Raw UTF-8 in id, tenant and payload: 2-, 3- and 4-byte sequences. */
    const char *json =
        "{\"id\":\"due-diligence-\xc3\xbc-7\",\"service\":\"dd\",\"type\":\"report\","
        "\"tenant\":\"M\xc3\xbcller GmbH\","
        "\"payload\":{\"notes\":\"\xe6\x97\xa5\xe6\x9c\xac \xe2\x9c\x93 \xf0\x9f\x9a\x80\"}}";
    jf_envelope *env = parse_ok(json, NULL);
    assert_string_equal(env->id, "due-diligence-\xc3\xbc-7");
    assert_string_equal(env->tenant, "M\xc3\xbcller GmbH");
    json_t *notes = json_object_get(json_object_get(env->root, "payload"), "notes");
    assert_string_equal(json_string_value(notes),
                        "\xe6\x97\xa5\xe6\x9c\xac \xe2\x9c\x93 \xf0\x9f\x9a\x80");
    jf_envelope_destroy(env);
}

static void test_escaped_chars(void **state)
{
    (void)state;
    /* Escapes decode to the bytes they stand for: quote, backslash, slash,
     * a BMP character and a surrogate pair (U+1F680). */
    const char *json = "{\"id\":\"a\\\"b\\\\c\\/d\\u00e9\\ud83d\\ude80\",\"service\":\"s\","
                       "\"type\":\"t\",\"payload\":\"line\\nbreak\\ttab\"}";
    jf_envelope *env = parse_ok(json, NULL);
    assert_string_equal(env->id, "a\"b\\c/d\xc3\xa9\xf0\x9f\x9a\x80");
    assert_string_equal(json_string_value(json_object_get(env->root, "payload")),
                        "line\nbreak\ttab");
    jf_envelope_destroy(env);
}

static void test_priority_default_and_subject(void **state)
{
    (void)state;
    jf_envelope *env = parse_ok(ENV(""), "jobs.llm.normal.enrich");
    assert_int_equal(env->priority, JF_PRIO_NORMAL);
    jf_envelope_destroy(env);
    env = parse_ok(ENV(",\"priority\":\"low\""), "jobs.llm.low.enrich");
    assert_int_equal(env->priority, JF_PRIO_LOW);
    jf_envelope_destroy(env);
    env = parse_ok(ENV(",\"priority\":\"normal\""), "jobs.llm.normal.enrich");
    assert_int_equal(env->priority, JF_PRIO_NORMAL);
    jf_envelope_destroy(env);
}

static void test_deadline_with_offset(void **state)
{
    (void)state;
    jf_envelope *env = parse_ok(ENV(",\"deadline\":\"2026-11-22T12:00:00+02:00\","
                                    "\"created_at\":\"2026-11-22t04:30:00.5-05:30\""),
                                NULL);
    assert_true(env->has_deadline);
    assert_int_equal(env->deadline_ms, INT64_C(1795341600000));
    assert_true(env->has_created_at);
    assert_int_equal(env->created_at_ms, INT64_C(1795341600500));
    jf_envelope_destroy(env);
}

static void test_payload_any_value(void **state)
{
    (void)state;
    static const char *const payloads[] = {
        "null", "0", "-1.5e3", "true", "\"text\"", "[]", "[1,[2,{\"a\":null}]]", "{}"};
    for (size_t i = 0; i < sizeof payloads / sizeof payloads[0]; i++) {
        char json[256];
        snprintf(json, sizeof json,
                 "{\"id\":\"a\",\"service\":\"s\",\"type\":\"t\",\"payload\":%s}", payloads[i]);
        jf_envelope *env = parse_ok(json, NULL);
        assert_non_null(json_object_get(env->root, "payload"));
        jf_envelope_destroy(env);
    }
}

static void test_lenient_where_the_contract_is(void **state)
{
    (void)state;
    /* Unknown top-level members: forward compatibility. */
    jf_envelope *env = parse_ok(ENV(",\"trace_id\":\"4bf9\",\"v\":2"), NULL);
    jf_envelope_destroy(env);
    /* Whitespace around the object is not "trailing bytes" (RFC 8259 ws). */
    env = parse_ok(" \t\r\n" ENV("") " \n", NULL);
    jf_envelope_destroy(env);
    /* A NUL is legal inside payload strings, and member order is free. */
    static const char nul_payload[] =
        "{\"payload\":{\"bin\":\"a\\u0000b\"},\"type\":\"t\",\"service\":\"s\",\"id\":\"x\"}";
    env = parse_ok_n(nul_payload, LEN(nul_payload), NULL);
    json_t *bin = json_object_get(json_object_get(env->root, "payload"), "bin");
    assert_int_equal(json_string_length(bin), 3);
    jf_envelope_destroy(env);
    /* len, not a NUL, ends the input. */
    static const char longer[] = ENV("") "garbage";
    env = parse_ok_n(longer, LEN(longer) - LEN("garbage"), NULL);
    jf_envelope_destroy(env);
    /* A message of exactly max_payload bytes fits. */
    jf_envelope *out = NULL;
    jf_error err;
    assert_int_equal(jf_envelope_parse(&out, ENV(""), LEN(ENV("")), NULL, LEN(ENV("")), &err),
                     JF_OK);
    jf_envelope_destroy(out);
    /* Leap second and lower-case t/z are RFC 3339. */
    env = parse_ok(ENV(",\"created_at\":\"2016-12-31T23:59:60z\""), NULL);
    jf_envelope_destroy(env);
}

/* Builds {"id":"a","service":"s","type":"t","payload":[[...]]} nested to
 * depth levels in all (the envelope object is level 1). */
static char *nested(int depth, char open, char close)
{
    const char *head = "{\"id\":\"a\",\"service\":\"s\",\"type\":\"t\",\"payload\":";
    size_t hl = strlen(head), inner = (size_t)depth - 1;
    char *s = malloc(hl + 6 * inner + 64); /* "{\"k\":" and "}" per level */
    assert_non_null(s);
    size_t n = 0;
    memcpy(s, head, hl);
    n = hl;
    for (size_t i = 0; i < inner; i++) {
        s[n++] = open;
        if (open == '{') {
            memcpy(s + n, "\"k\":", 4);
            n += 4;
        }
    }
    memcpy(s + n, "0", 1); /* innermost value: 0, or "k":0 after the last '{' */
    n += 1;
    for (size_t i = 0; i < inner; i++)
        s[n++] = close;
    s[n++] = '}';
    s[n] = '\0';
    return s;
}

static void test_depth_64_passes(void **state)
{
    (void)state;
    char *s = nested(64, '[', ']');
    jf_envelope *env = parse_ok(s, NULL);
    jf_envelope_destroy(env);
    free(s);
    s = nested(64, '{', '}');
    env = parse_ok(s, NULL);
    jf_envelope_destroy(env);
    free(s);
}

static void test_depth_65_fails(void **state)
{
    (void)state;
    char *s = nested(65, '[', ']');
    expect_invalid_n(s, strlen(s), NULL, 0, "nesting deeper than 64");
    free(s);
    s = nested(65, '{', '}');
    expect_invalid_n(s, strlen(s), NULL, 0, "nesting deeper than 64");
    free(s);
    /* Far deeper than jansson's own limit: still a clean verdict. */
    s = nested(100000, '[', ']');
    expect_invalid_n(s, strlen(s), NULL, 0, "nesting deeper than 64");
    free(s);
}

static void test_depth_ignores_brackets_in_strings(void **state)
{
    (void)state;
    /* 200 brackets inside a string, after an escaped quote and an escaped
     * backslash: text, not nesting. */
    char json[512];
    int n = snprintf(json, sizeof json,
                     "{\"id\":\"a\",\"service\":\"s\",\"type\":\"t\",\"payload\":\"\\\"\\\\");
    for (int i = 0; i < 200; i++)
        json[n++] = i % 2 ? '{' : '[';
    memcpy(json + n, "\"}", 3);
    jf_envelope *env = parse_ok(json, NULL);
    jf_envelope_destroy(env);
}

/* Repeats unit until the string holds len bytes (len a multiple of its size). */
static char *repeat(const char *unit, size_t len)
{
    char *s = malloc(len + 1);
    assert_non_null(s);
    const size_t ul = strlen(unit);
    assert_int_equal(len % ul, 0);
    for (size_t i = 0; i < len; i += ul)
        memcpy(s + i, unit, ul);
    s[len] = '\0';
    return s;
}

static char *with_member(const char *key, const char *value)
{
    const char *rest[][2] = {{"id", "a"}, {"service", "s"}, {"type", "t"}, {"tenant", NULL}};
    size_t cap = strlen(value) + 256;
    char *s = malloc(cap);
    assert_non_null(s);
    size_t n = (size_t)snprintf(s, cap, "{\"payload\":{}");
    for (size_t i = 0; i < 4; i++) {
        const char *v = strcmp(rest[i][0], key) == 0 ? value : rest[i][1];
        if (v != NULL)
            n += (size_t)snprintf(s + n, cap - n, ",\"%s\":\"%s\"", rest[i][0], v);
    }
    snprintf(s + n, cap - n, "}");
    return s;
}

static void test_length_limits(void **state)
{
    (void)state;
    struct {
        const char *key, *unit;
        size_t ok, bad;
        const char *want;
    } cases[] = {
        {"id", "x", 200, 201, "id: longer than 200 bytes"},
        /* Bytes, not characters: 100 two-byte characters fit, 101 do not. */
        {"id", "\xc3\xa9", 200, 202, "id: longer than 200 bytes"},
        {"tenant", "t", 200, 201, "tenant: longer than 200 bytes"},
        {"service", "s", 128, 129, "service: \""},
        {"type", "t", 128, 129, "type: \""},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *v = repeat(cases[i].unit, cases[i].ok);
        char *json = with_member(cases[i].key, v);
        jf_envelope *env = parse_ok(json, NULL);
        jf_envelope_destroy(env);
        free(json);
        free(v);
        v = repeat(cases[i].unit, cases[i].bad);
        json = with_member(cases[i].key, v);
        expect_invalid_n(json, strlen(json), NULL, 0, cases[i].want);
        free(json);
        free(v);
    }
}

/* ---- invalid envelopes: one table row per broken rule --------------------- */

typedef struct invalid_case {
    const char *name;
    const char *data;
    size_t len;
    const char *subject;
    size_t max_payload;
    const char *want; /* must appear in the error */
} invalid_case;

#define BAD(name, lit, want)                                                                       \
    {                                                                                              \
        name, lit, LEN(lit), NULL, 0, want                                                         \
    }
#define BAD_SUBJECT(name, lit, subj, want)                                                         \
    {                                                                                              \
        name, lit, LEN(lit), subj, 0, want                                                         \
    }

static const invalid_case invalid_cases[] = {
    /* size */
    {"empty input", "", 0, NULL, 0, "empty message"},
    {"oversize vs max_payload", ENV(""), LEN(ENV("")), NULL, LEN(ENV("")) - 1,
     "exceeds max_payload"},
    {"oversize checked before JSON", "not json at all", LEN("not json at all"), NULL, 4,
     "exceeds max_payload"},
    /* exactly one JSON object */
    BAD("truncated JSON", "{\"id\":\"a\",\"service\":\"s\",\"type\":\"t\",\"payload\":{",
        "not JSON: "),
    BAD("truncated in a string", "{\"id\":\"tender-", "not JSON: "),
    BAD("not JSON", "hello", "not JSON: invalid token near 'hello' at line 1 column 5"),
    BAD("single quotes", "{'id':'a'}", "not JSON: "),
    BAD("array top level", "[" ENV("") "]", "not a JSON object: top level is an array"),
    BAD("string top level", "\"tender-8145\"", "top level is a string"),
    BAD("number top level", "42", "top level is a number"),
    BAD("null top level", "null", "top level is null"),
    BAD("two objects", ENV("") ENV(""), "not JSON: end of file expected"),
    BAD("two objects on two lines", ENV("") "\n" ENV(""), "at line 2"),
    BAD("trailing garbage", ENV("") " x", "not JSON: end of file expected"),
    BAD("trailing NUL byte", ENV("") "\0", "not JSON: "),
    BAD("byte order mark", "\xef\xbb\xbf" ENV(""), "not JSON: "),
    BAD("duplicate top-level key", ENV(",\"id\":\"b\""), "not JSON: duplicate object key"),
    BAD("duplicate key in payload",
        "{\"id\":\"a\",\"service\":\"s\",\"type\":\"t\",\"payload\":{\"x\":{\"k\":1,\"k\":2}}}",
        "not JSON: duplicate object key"),
    BAD("NaN", ENV(",\"x\":NaN"), "not JSON: invalid token"),
    BAD("Infinity", ENV(",\"x\":Infinity"), "not JSON: invalid token"),
    BAD("-Infinity", ENV(",\"x\":-Infinity"), "not JSON: invalid token"),
    BAD("block comment", "{/* job */\"id\":\"a\",\"service\":\"s\",\"type\":\"t\",\"payload\":{}}",
        "not JSON: "),
    BAD("line comment", ENV("") " // job", "not JSON: "),
    BAD("huge exponent", ENV(",\"x\":1e999"), "not JSON: real number overflow"),
    BAD("integer beyond 64 bits", ENV(",\"x\":123456789012345678901234567890"),
        "not JSON: too big integer"),
    BAD("leading zero", ENV(",\"x\":0123"), "not JSON: "),
    BAD("trailing comma", "{\"id\":\"a\",\"service\":\"s\",\"type\":\"t\",\"payload\":{},}",
        "not JSON: "),
    /* UTF-8 */
    BAD("invalid UTF-8 byte", ENV(",\"x\":\"\xff\""), "not JSON: unable to decode byte 0xff"),
    BAD("truncated UTF-8 sequence", ENV(",\"x\":\"\xe6\x97\""), "not JSON: unable to decode"),
    BAD("overlong UTF-8 '/'", ENV(",\"x\":\"\xc0\xaf\""), "not JSON: unable to decode byte 0xc0"),
    BAD("overlong UTF-8 NUL", ENV(",\"x\":\"\xe0\x80\x80\""), "not JSON: unable to decode"),
    BAD("UTF-8 encoded surrogate", ENV(",\"x\":\"\xed\xa0\x80\""),
        "not JSON: unable to decode byte 0xed"),
    BAD("code point beyond U+10FFFF", ENV(",\"x\":\"\xf4\x90\x80\x80\""),
        "not JSON: unable to decode"),
    BAD("lone high surrogate escape in id",
        "{\"id\":\"a\\ud800\",\"service\":\"s\",\"type\":\"t\",\"payload\":{}}",
        "not JSON: invalid Unicode '\\uD800'"),
    BAD("lone low surrogate escape in payload", ENV(",\"x\":\"\\udc00\""),
        "not JSON: invalid Unicode '\\uDC00'"),
    BAD("high surrogate then non-surrogate", ENV(",\"x\":\"\\ud83d\\u0041\""),
        "not JSON: invalid Unicode"),
    /* id */
    BAD("id missing", NO_ID, "id: missing"),
    BAD("id empty", "{\"id\":\"\",\"service\":\"s\",\"type\":\"t\",\"payload\":{}}", "id: empty"),
    BAD("id number", "{\"id\":8145,\"service\":\"s\",\"type\":\"t\",\"payload\":{}}",
        "id: must be a string, not a number"),
    BAD("id null", "{\"id\":null,\"service\":\"s\",\"type\":\"t\",\"payload\":{}}",
        "id: must be a string, not null"),
    BAD("id object", "{\"id\":{},\"service\":\"s\",\"type\":\"t\",\"payload\":{}}",
        "id: must be a string, not an object"),
    BAD("NUL in id", "{\"id\":\"a\\u0000b\",\"service\":\"s\",\"type\":\"t\",\"payload\":{}}",
        "id: control character U+0000 at byte 1"),
    BAD("escaped newline in id",
        "{\"id\":\"a\\n\",\"service\":\"s\",\"type\":\"t\",\"payload\":{}}",
        "id: control character U+000A at byte 1"),
    BAD("unit separator in id",
        "{\"id\":\"\\u001f\",\"service\":\"s\",\"type\":\"t\",\"payload\":{}}",
        "id: control character U+001F at byte 0"),
    BAD("DEL in id", "{\"id\":\"ab\x7f\",\"service\":\"s\",\"type\":\"t\",\"payload\":{}}",
        "id: control character U+007F at byte 2"),
    BAD("C1 control in id", "{\"id\":\"a\\u0085\",\"service\":\"s\",\"type\":\"t\",\"payload\":{}}",
        "id: control character U+0085 at byte 1"),
    BAD("raw tab in id", "{\"id\":\"a\tb\",\"service\":\"s\",\"type\":\"t\",\"payload\":{}}",
        "not JSON: control character 0x9"),
    /* tenant */
    BAD("tenant number", ENV(",\"tenant\":7"), "tenant: must be a string, not a number"),
    BAD("tenant null", ENV(",\"tenant\":null"), "tenant: must be a string, not null"),
    BAD("tenant empty", ENV(",\"tenant\":\"\""), "tenant: empty"),
    BAD("control character in tenant", ENV(",\"tenant\":\"ac\\u0007me\""),
        "tenant: control character U+0007 at byte 2"),
    /* service, type */
    BAD("service missing", "{\"id\":\"a\",\"type\":\"t\",\"payload\":{}}", "service: missing"),
    BAD("type missing", "{\"id\":\"a\",\"service\":\"s\",\"payload\":{}}", "type: missing"),
    BAD("service not a string", "{\"id\":\"a\",\"service\":[\"s\"],\"type\":\"t\",\"payload\":{}}",
        "service: must be a string, not an array"),
    BAD("service empty", "{\"id\":\"a\",\"service\":\"\",\"type\":\"t\",\"payload\":{}}",
        "service: \"\" is not a subject token"),
    BAD("space in service", "{\"id\":\"a\",\"service\":\"ll m\",\"type\":\"t\",\"payload\":{}}",
        "service: \"ll m\" is not a subject token"),
    BAD("dot in service", "{\"id\":\"a\",\"service\":\"llm.x\",\"type\":\"t\",\"payload\":{}}",
        "service: \"llm.x\" is not a subject token"),
    BAD("wildcard service", "{\"id\":\"a\",\"service\":\"*\",\"type\":\"t\",\"payload\":{}}",
        "service: \"*\" is not a subject token"),
    BAD("trailing newline in service",
        "{\"id\":\"a\",\"service\":\"llm\\n\",\"type\":\"t\",\"payload\":{}}",
        "service: \"llm?\" is not a subject token"),
    BAD("NUL in service",
        "{\"id\":\"a\",\"service\":\"llm\\u0000x\",\"type\":\"t\",\"payload\":{}}",
        "service: \"llm?x\" is not a subject token"),
    BAD("non-ASCII service",
        "{\"id\":\"a\",\"service\":\"ll\xc3\xbc\",\"type\":\"t\",\"payload\":{}}",
        "service: \"ll\xc3\xbc\" is not a subject token"),
    BAD("wildcard type", "{\"id\":\"a\",\"service\":\"s\",\"type\":\">\",\"payload\":{}}",
        "type: \">\" is not a subject token"),
    BAD("slash in type", "{\"id\":\"a\",\"service\":\"s\",\"type\":\"a/b\",\"payload\":{}}",
        "type: \"a/b\" is not a subject token"),
    BAD("type number", "{\"id\":\"a\",\"service\":\"s\",\"type\":1,\"payload\":{}}",
        "type: must be a string, not a number"),
    /* priority */
    BAD("priority bogus", ENV(",\"priority\":\"urgent\""),
        "priority: \"urgent\" is not one of high, normal, low"),
    BAD("priority upper case", ENV(",\"priority\":\"HIGH\""), "priority: \"HIGH\" is not one of"),
    BAD("priority null", ENV(",\"priority\":null"), "priority: must be a string, not null"),
    BAD("priority number", ENV(",\"priority\":1"), "priority: must be a string, not a number"),
    BAD("priority with NUL suffix", ENV(",\"priority\":\"normal\\u0000x\""),
        "priority: \"normal?x\" is not one of"),
    /* payload */
    BAD("payload missing", "{\"id\":\"a\",\"service\":\"s\",\"type\":\"t\"}", "payload: missing"),
    /* created_at, deadline */
    BAD("created_at without offset", ENV(",\"created_at\":\"2026-11-22T10:00:00\""),
        "created_at: \"2026-11-22T10:00:00\" is not an RFC 3339 date-time with offset"),
    BAD("created_at date only", ENV(",\"created_at\":\"2026-11-22\""),
        "created_at: \"2026-11-22\" is not"),
    BAD("created_at Feb 30", ENV(",\"created_at\":\"2026-02-30T10:00:00Z\""), "created_at: "),
    BAD("created_at month 13", ENV(",\"created_at\":\"2026-13-01T10:00:00Z\""), "created_at: "),
    BAD("created_at space separator", ENV(",\"created_at\":\"2026-11-22 10:00:00Z\""),
        "created_at: "),
    BAD("created_at epoch number", ENV(",\"created_at\":1795341600"),
        "created_at: must be a string, not a number"),
    BAD("deadline hour 24", ENV(",\"deadline\":\"2026-11-22T24:00:00Z\""),
        "deadline: \"2026-11-22T24:00:00Z\" is not an RFC 3339 date-time"),
    BAD("deadline offset without colon", ENV(",\"deadline\":\"2026-11-22T10:00:00+0200\""),
        "deadline: "),
    BAD("deadline null", ENV(",\"deadline\":null"), "deadline: must be a string, not null"),
    BAD("deadline trailing space", ENV(",\"deadline\":\"2026-11-22T10:00:00Z \""), "deadline: "),
    /* subject */
    BAD_SUBJECT("subject with other service", ENV(""), "jobs.x.normal.enrich",
                "subject jobs.x.normal.enrich does not match envelope (service llm, priority "
                "normal, type enrich)"),
    BAD_SUBJECT("subject with other priority", ENV(""), "jobs.llm.high.enrich",
                "subject jobs.llm.high.enrich does not match envelope (service llm, priority "
                "normal, type enrich)"),
    BAD_SUBJECT("subject with other priority than envelope's", ENV(",\"priority\":\"low\""),
                "jobs.llm.normal.enrich", "does not match envelope (service llm, priority low"),
    BAD_SUBJECT("subject with other type", ENV(""), "jobs.llm.normal.other",
                "does not match envelope (service llm, priority normal, type enrich)"),
    BAD_SUBJECT("subject without priority token", ENV(""), "jobs.llm.enrich",
                "subject jobs.llm.enrich is not jobs.<service>.<priority>.<type>"),
    BAD_SUBJECT("subject with five tokens", ENV(""), "jobs.llm.normal.enrich.x",
                "is not jobs.<service>.<priority>.<type>"),
    BAD_SUBJECT("subject under dlq", ENV(""), "dlq.llm.normal.enrich",
                "is not jobs.<service>.<priority>.<type>"),
    BAD_SUBJECT("empty subject", ENV(""), "", "is not jobs.<service>.<priority>.<type>"),
};

static void run_invalid_case(void **state)
{
    const invalid_case *c = *state;
    expect_invalid_n(c->data, c->len, c->subject, c->max_payload, c->want);
}

/* ---- the schema's example files -------------------------------------------- */

static char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        fail_msg("cannot open %s", path);
    char *buf = malloc(1 << 20);
    assert_non_null(buf);
    *len = fread(buf, 1, 1 << 20, f);
    assert_true(feof(f));
    fclose(f);
    return buf;
}

static void test_schema_examples_agree(void **state)
{
    (void)state;
    const char *dir = JF_SOURCE_DIR "/schemas/examples";
    DIR *d = opendir(dir);
    if (d == NULL)
        fail_msg("cannot open %s", dir);
    int valid = 0, invalid = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        const char *name = de->d_name;
        size_t nl = strlen(name);
        if (strncmp(name, "job-", 4) != 0 || nl < 5 || strcmp(name + nl - 5, ".json") != 0)
            continue;
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, name);
        size_t len;
        char *data = read_file(path, &len);
        jf_envelope *env = NULL;
        jf_error err = {{0}};
        jf_status st = jf_envelope_parse(&env, data, len, NULL, 0, &err);
        if (strncmp(name, "job-invalid-", 12) == 0) {
            if (st != JF_ERR_INVALID)
                fail_msg("%s: accepted, but the file name says invalid", name);
            invalid++;
        } else {
            if (st != JF_OK)
                fail_msg("%s: rejected: %s", name, err.msg);
            /* And on the subject it would be published on. */
            char subject[300];
            assert_int_equal(jf_subject_format(subject, sizeof subject, "jobs", env->service,
                                               env->priority, env->type),
                             JF_OK);
            jf_envelope_destroy(env);
            env = NULL;
            if (jf_envelope_parse(&env, data, len, subject, 0, &err) != JF_OK)
                fail_msg("%s on %s: rejected: %s", name, subject, err.msg);
            jf_envelope_destroy(env);
            valid++;
        }
        free(data);
    }
    closedir(d);
    /* An empty or missing examples directory must not pass silently. */
    assert_true(valid >= 3);
    assert_true(invalid >= 10);
}

/* ---- helpers: priority, token, subject ------------------------------------ */

static void test_priority_names(void **state)
{
    (void)state;
    static const char *const names[] = {"high", "normal", "low"};
    for (int i = 0; i < JF_PRIO_COUNT; i++) {
        jf_priority p = JF_PRIO_COUNT;
        assert_string_equal(jf_priority_name((jf_priority)i), names[i]);
        assert_int_equal(jf_priority_parse(&p, names[i]), JF_OK);
        assert_int_equal(p, i);
    }
    jf_priority p = JF_PRIO_LOW;
    assert_int_equal(jf_priority_parse(&p, "High"), JF_ERR_INVALID);
    assert_int_equal(jf_priority_parse(&p, "medium"), JF_ERR_INVALID);
    assert_int_equal(jf_priority_parse(&p, ""), JF_ERR_INVALID);
    assert_int_equal(jf_priority_parse(&p, "normal "), JF_ERR_INVALID);
    assert_int_equal(jf_priority_parse(&p, NULL), JF_ERR_INVALID);
    assert_int_equal(p, JF_PRIO_LOW);
    assert_string_equal(jf_priority_name((jf_priority)JF_PRIO_COUNT), "unknown");
    assert_string_equal(jf_priority_name((jf_priority)-1), "unknown");
}

static void test_token_valid(void **state)
{
    (void)state;
    assert_true(jf_token_valid("llm"));
    assert_true(jf_token_valid("A-Za_z0-9"));
    assert_true(jf_token_valid("-"));
    assert_false(jf_token_valid(""));
    assert_false(jf_token_valid(NULL));
    assert_false(jf_token_valid("a.b"));
    assert_false(jf_token_valid("a b"));
    assert_false(jf_token_valid("*"));
    assert_false(jf_token_valid(">"));
    assert_false(jf_token_valid("llm\n"));
    assert_false(jf_token_valid("\xc3\xbc"));
    char *s = repeat("x", JF_TOKEN_MAX);
    assert_true(jf_token_valid(s));
    free(s);
    s = repeat("x", JF_TOKEN_MAX + 1);
    assert_false(jf_token_valid(s));
    free(s);
}

static void test_subject_format(void **state)
{
    (void)state;
    char buf[64];
    assert_int_equal(jf_subject_format(buf, sizeof buf, "jobs", "llm", JF_PRIO_NORMAL, "enrich"),
                     JF_OK);
    assert_string_equal(buf, "jobs.llm.normal.enrich");
    assert_int_equal(jf_subject_format(buf, sizeof buf, "dlq", "files", JF_PRIO_HIGH, "process"),
                     JF_OK);
    assert_string_equal(buf, "dlq.files.high.process");
    /* Exactly enough room, then one byte short (output left alone). */
    assert_int_equal(jf_subject_format(buf, LEN("jobs.a.low.b") + 1, "jobs", "a", JF_PRIO_LOW, "b"),
                     JF_OK);
    assert_string_equal(buf, "jobs.a.low.b");
    memcpy(buf, "untouched", 10);
    assert_int_equal(jf_subject_format(buf, LEN("jobs.a.low.b"), "jobs", "a", JF_PRIO_LOW, "b"),
                     JF_ERR_INVALID);
    assert_int_equal(jf_subject_format(buf, sizeof buf, "jobs", "a.b", JF_PRIO_LOW, "c"),
                     JF_ERR_INVALID);
    assert_int_equal(jf_subject_format(buf, sizeof buf, "jobs", "a", JF_PRIO_LOW, ""),
                     JF_ERR_INVALID);
    assert_int_equal(jf_subject_format(buf, sizeof buf, "jobs", "a", (jf_priority)7, "b"),
                     JF_ERR_INVALID);
    assert_int_equal(jf_subject_format(buf, sizeof buf, "jo bs", "a", JF_PRIO_LOW, "b"),
                     JF_ERR_INVALID);
    assert_int_equal(jf_subject_format(NULL, 0, "jobs", "a", JF_PRIO_LOW, "b"), JF_ERR_INVALID);
    assert_string_equal(buf, "untouched");
}

static void test_destroy_null(void **state)
{
    (void)state;
    jf_envelope_destroy(NULL);
}

int main(void)
{
    static const struct CMUnitTest fixed[] = {
        cmocka_unit_test(test_minimal),
        cmocka_unit_test(test_all_fields),
        cmocka_unit_test(test_unicode),
        cmocka_unit_test(test_escaped_chars),
        cmocka_unit_test(test_priority_default_and_subject),
        cmocka_unit_test(test_deadline_with_offset),
        cmocka_unit_test(test_payload_any_value),
        cmocka_unit_test(test_lenient_where_the_contract_is),
        cmocka_unit_test(test_depth_64_passes),
        cmocka_unit_test(test_depth_65_fails),
        cmocka_unit_test(test_depth_ignores_brackets_in_strings),
        cmocka_unit_test(test_length_limits),
        cmocka_unit_test(test_schema_examples_agree),
        cmocka_unit_test(test_priority_names),
        cmocka_unit_test(test_token_valid),
        cmocka_unit_test(test_subject_format),
        cmocka_unit_test(test_destroy_null),
    };
    enum {
        N_FIXED = sizeof fixed / sizeof fixed[0],
        N_INVALID = sizeof invalid_cases / sizeof invalid_cases[0],
    };
    /* One cmocka test per table row, so a failure names the broken case. */
    struct CMUnitTest tests[N_FIXED + N_INVALID];
    char names[N_INVALID][96];
    memcpy(tests, fixed, sizeof fixed);
    for (size_t i = 0; i < N_INVALID; i++) {
        snprintf(names[i], sizeof names[i], "invalid: %s", invalid_cases[i].name);
        tests[N_FIXED + i] = (struct CMUnitTest){
            .name = names[i],
            .test_func = run_invalid_case,
            .initial_state = (void *)&invalid_cases[i],
        };
    }
    return cmocka_run_group_tests_name("envelope", tests, NULL, NULL);
}
