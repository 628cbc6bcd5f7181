#include "envelope.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rfc3339.h"

static const char *const prio_names[JF_PRIO_COUNT] = {"high", "normal", "low"};

const char *jf_priority_name(jf_priority p)
{
    if ((unsigned)p >= JF_PRIO_COUNT)
        return "unknown";
    return prio_names[p];
}

jf_status jf_priority_parse(jf_priority *out, const char *s)
{
    if (s == NULL)
        return JF_ERR_INVALID;
    for (int i = 0; i < JF_PRIO_COUNT; i++) {
        if (strcmp(s, prio_names[i]) == 0) {
            *out = (jf_priority)i;
            return JF_OK;
        }
    }
    return JF_ERR_INVALID;
}

/* Token check over an explicit length, so a JSON string with an embedded
 * NUL ("llm\u0000x") fails instead of passing as its C-string prefix. */
static bool token_valid_n(const char *s, size_t n)
{
    if (n == 0 || n > JF_TOKEN_MAX)
        return false;
    for (size_t i = 0; i < n; i++) {
        const char c = s[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '-'))
            return false;
    }
    return true;
}

bool jf_token_valid(const char *s)
{
    return s != NULL && token_valid_n(s, strnlen(s, JF_TOKEN_MAX + 1));
}

jf_status jf_subject_format(char *buf, size_t cap, const char *prefix, const char *service,
                            jf_priority p, const char *type)
{
    if (buf == NULL || !jf_token_valid(prefix) || !jf_token_valid(service) ||
        !jf_token_valid(type) || (unsigned)p >= JF_PRIO_COUNT)
        return JF_ERR_INVALID;
    const char *parts[4] = {prefix, service, prio_names[p], type};
    size_t lens[4], need = 0;
    for (int i = 0; i < 4; i++) {
        lens[i] = strlen(parts[i]);
        need += lens[i] + 1; /* a dot after each part but the last, then the NUL */
    }
    if (need > cap)
        return JF_ERR_INVALID;
    char *w = buf;
    for (int i = 0; i < 4; i++) {
        memcpy(w, parts[i], lens[i]);
        w += lens[i];
        *w++ = i < 3 ? '.' : '\0';
    }
    return JF_OK;
}

/* Error messages quote values from the message itself. They must stay one
 * short line: at most 48 bytes, control bytes as '?', never cut inside a
 * UTF-8 sequence (jansson has already checked the string is valid UTF-8). */
#define PREVIEW_MAX 48
static const char *preview(char buf[PREVIEW_MAX + 4], const char *s, size_t n)
{
    size_t take = n;
    if (take > PREVIEW_MAX) {
        take = PREVIEW_MAX;
        while (take > 0 && ((unsigned char)s[take] & 0xC0) == 0x80)
            take--;
    }
    for (size_t i = 0; i < take; i++) {
        const unsigned char c = (unsigned char)s[i];
        buf[i] = (c < 0x20 || c == 0x7f) ? '?' : (char)c;
    }
    if (take < n) {
        memcpy(buf + take, "...", 4);
    } else {
        buf[take] = '\0';
    }
    return buf;
}

/* jansson's error text may echo raw input ("near '...'"); keep it one line. */
static void one_line(jf_error *err)
{
    if (err == NULL)
        return;
    for (char *p = err->msg; *p; p++) {
        if ((unsigned char)*p < 0x20 || *p == 0x7f)
            *p = '?';
    }
}

/* jansson enforces no depth bound of its own short of 2048 levels, so the
 * bytes are scanned first: brackets outside strings are counted, and a
 * backslash inside a string skips the byte after it. Malformed input is left
 * for jansson to describe; this scan only answers "too deep or not". */
static bool depth_within(const unsigned char *p, size_t len, size_t *at)
{
    int depth = 0;
    bool in_string = false, escaped = false;
    for (size_t i = 0; i < len; i++) {
        const unsigned char c = p[i];
        if (in_string) {
            if (escaped)
                escaped = false;
            else if (c == '\\')
                escaped = true;
            else if (c == '"')
                in_string = false;
            continue;
        }
        if (c == '"') {
            in_string = true;
        } else if (c == '{' || c == '[') {
            if (++depth > JF_ENVELOPE_MAX_DEPTH) {
                *at = i;
                return false;
            }
        } else if ((c == '}' || c == ']') && depth > 0) {
            depth--;
        }
    }
    return true;
}

static const char *json_type_name(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        return "an object";
    case JSON_ARRAY:
        return "an array";
    case JSON_STRING:
        return "a string";
    case JSON_INTEGER:
    case JSON_REAL:
        return "a number";
    case JSON_TRUE:
    case JSON_FALSE:
        return "a boolean";
    case JSON_NULL:
        return "null";
    }
    return "unknown";
}

/* Looks up a string member. Absent and optional: *s = NULL and JF_OK.
 * Present but null counts as "not a string": the contract has no nullable
 * fields, and accepting null would give two spellings of "absent". */
static jf_status string_member(const char **s, size_t *n, json_t *root, const char *key,
                               bool required, jf_error *err)
{
    json_t *v = json_object_get(root, key);
    if (v == NULL) {
        if (required) {
            jf_error_set(err, "%s: missing", key);
            return JF_ERR_INVALID;
        }
        *s = NULL;
        *n = 0;
        return JF_OK;
    }
    if (!json_is_string(v)) {
        jf_error_set(err, "%s: must be a string, not %s", key, json_type_name(v));
        return JF_ERR_INVALID;
    }
    *s = json_string_value(v);
    *n = json_string_length(v);
    return JF_OK;
}

/* id and tenant: 1..JF_ID_MAX bytes with no control character. Control
 * characters are Unicode's Cc: C0 (U+0000-U+001F), DEL (U+007F) and C1
 * (U+0080-U+009F, UTF-8 C2 80..C2 9F). They are rejected because ids end up
 * in NATS headers, log lines, SQL rows and HTTP headers (Idempotency-Key),
 * where such bytes split or corrupt records. Lone surrogates never get here:
 * jansson refuses them both as \u escapes and as raw UTF-8. */
static jf_status check_text(const char *key, const char *s, size_t n, jf_error *err)
{
    if (n == 0) {
        jf_error_set(err, "%s: empty", key);
        return JF_ERR_INVALID;
    }
    if (n > JF_ID_MAX) {
        jf_error_set(err, "%s: longer than %d bytes (%zu)", key, JF_ID_MAX, n);
        return JF_ERR_INVALID;
    }
    for (size_t i = 0; i < n; i++) {
        const unsigned char c = (unsigned char)s[i];
        unsigned cp = 0x110000;
        if (c < 0x20 || c == 0x7f)
            cp = c;
        else if (c == 0xC2 && i + 1 < n && (unsigned char)s[i + 1] <= 0x9F)
            cp = (unsigned char)s[i + 1]; /* C2 80..C2 9F encode U+0080..U+009F */
        if (cp != 0x110000) {
            jf_error_set(err, "%s: control character U+%04X at byte %zu", key, cp, i);
            return JF_ERR_INVALID;
        }
    }
    return JF_OK;
}

static jf_status check_token(const char *key, const char *s, size_t n, jf_error *err)
{
    if (token_valid_n(s, n))
        return JF_OK;
    char pv[PREVIEW_MAX + 4];
    jf_error_set(err, "%s: \"%s\" is not a subject token (1-%d of A-Z a-z 0-9 _ -)", key,
                 preview(pv, s, n), JF_TOKEN_MAX);
    return JF_ERR_INVALID;
}

static jf_status time_member(bool *has, int64_t *ms, json_t *root, const char *key, jf_error *err)
{
    const char *s;
    size_t n;
    jf_status st = string_member(&s, &n, root, key, false, err);
    if (st != JF_OK)
        return st;
    if (s == NULL) {
        *has = false;
        return JF_OK;
    }
    if (jf_rfc3339_parse(ms, s, n) != JF_OK) {
        char pv[PREVIEW_MAX + 4];
        jf_error_set(err, "%s: \"%s\" is not an RFC 3339 date-time with offset", key,
                     preview(pv, s, n));
        return JF_ERR_INVALID;
    }
    *has = true;
    return JF_OK;
}

/* Longest subject the envelope can own: jobs.<128>.normal.<128>. */
#define SUBJECT_MAX (4 + 1 + JF_TOKEN_MAX + 1 + 6 + 1 + JF_TOKEN_MAX + 1)

static jf_status check_subject(const char *subject, const jf_envelope *env, jf_error *err)
{
    char want[SUBJECT_MAX];
    if (jf_subject_format(want, sizeof want, "jobs", env->service, env->priority, env->type) !=
        JF_OK) {
        jf_error_set(err, "internal: cannot format subject"); /* tokens were checked */
        return JF_ERR_INVALID;
    }
    if (strcmp(subject, want) == 0)
        return JF_OK;

    /* Tell a subject of the wrong shape from one that names another job. */
    int dots = 0;
    for (const char *p = subject; *p; p++)
        dots += *p == '.';
    if (dots != 3 || strncmp(subject, "jobs.", 5) != 0) {
        jf_error_set(err, "subject %.*s is not jobs.<service>.<priority>.<type>", SUBJECT_MAX,
                     subject);
        one_line(err);
        return JF_ERR_INVALID;
    }
    jf_error_set(err, "subject %.*s does not match envelope (service %s, priority %s, type %s)",
                 SUBJECT_MAX, subject, env->service, prio_names[env->priority], env->type);
    one_line(err);
    return JF_ERR_INVALID;
}

/* Everything after the JSON parse: the field rules in DESIGN.md order. */
static jf_status validate(jf_envelope *env, const char *subject, jf_error *err)
{
    json_t *root = env->root;
    const char *s;
    size_t n;
    jf_status st;

    if ((st = string_member(&s, &n, root, "id", true, err)) != JF_OK ||
        (st = check_text("id", s, n, err)) != JF_OK)
        return st;
    env->id = s;

    if ((st = string_member(&s, &n, root, "tenant", false, err)) != JF_OK)
        return st;
    if (s != NULL && (st = check_text("tenant", s, n, err)) != JF_OK)
        return st;
    env->tenant = s;

    if ((st = string_member(&s, &n, root, "service", true, err)) != JF_OK ||
        (st = check_token("service", s, n, err)) != JF_OK)
        return st;
    env->service = s;

    if ((st = string_member(&s, &n, root, "type", true, err)) != JF_OK ||
        (st = check_token("type", s, n, err)) != JF_OK)
        return st;
    env->type = s;

    if ((st = string_member(&s, &n, root, "priority", false, err)) != JF_OK)
        return st;
    env->priority = JF_PRIO_NORMAL;
    /* strlen == n rules out "normal\u0000junk" matching as "normal". */
    if (s != NULL && (strlen(s) != n || jf_priority_parse(&env->priority, s) != JF_OK)) {
        char pv[PREVIEW_MAX + 4];
        jf_error_set(err, "priority: \"%s\" is not one of high, normal, low", preview(pv, s, n));
        return JF_ERR_INVALID;
    }

    if ((st = time_member(&env->has_created_at, &env->created_at_ms, root, "created_at", err)) !=
            JF_OK ||
        (st = time_member(&env->has_deadline, &env->deadline_ms, root, "deadline", err)) != JF_OK)
        return st;

    if (json_object_get(root, "payload") == NULL) {
        jf_error_set(err, "payload: missing");
        return JF_ERR_INVALID;
    }

    if (subject != NULL)
        return check_subject(subject, env, err);
    return JF_OK;
}

jf_status jf_envelope_parse(jf_envelope **out, const void *data, size_t len, const char *subject,
                            size_t max_payload, jf_error *err)
{
    /* Size first: it is the cheapest rule and bounds all the work below. */
    if (max_payload > 0 && len > max_payload) {
        jf_error_set(err, "message of %zu bytes exceeds max_payload of %zu bytes", len,
                     max_payload);
        return JF_ERR_INVALID;
    }
    if (len == 0 || data == NULL) {
        jf_error_set(err, "empty message");
        return JF_ERR_INVALID;
    }
    size_t at = 0;
    if (!depth_within(data, len, &at)) {
        jf_error_set(err, "nesting deeper than %d levels at byte %zu", JF_ENVELOPE_MAX_DEPTH, at);
        return JF_ERR_INVALID;
    }

    /* JSON_ALLOW_NUL: "\u0000" is legal JSON and a payload may carry it;
     * the text fields are checked over their full json_string_length, so a
     * NUL there is still refused (as a control character or a bad token).
     * JSON_DECODE_ANY lets a top-level scalar parse so that the error can say
     * "top level is a string" instead of jansson's "'[' or '{' expected".
     * Numbers jansson cannot hold (integers beyond int64, reals beyond
     * double) fail here: the consumer could not process them either. */
    json_error_t jerr;
    json_t *root =
        json_loadb(data, len, JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL | JSON_DECODE_ANY, &jerr);
    if (root == NULL) {
        if (json_error_code(&jerr) == json_error_out_of_memory) {
            jf_error_set(err, "out of memory parsing a %zu-byte message", len);
            return JF_ERR_NOMEM;
        }
        jf_error_set(err, "not JSON: %s at line %d column %d", jerr.text, jerr.line, jerr.column);
        one_line(err);
        return JF_ERR_INVALID;
    }
    if (!json_is_object(root)) {
        jf_error_set(err, "not a JSON object: top level is %s", json_type_name(root));
        json_decref(root);
        return JF_ERR_INVALID;
    }

    jf_envelope *env = calloc(1, sizeof *env);
    if (env == NULL) {
        jf_error_set(err, "out of memory");
        json_decref(root);
        return JF_ERR_NOMEM;
    }
    env->root = root;
    jf_status st = validate(env, subject, err);
    if (st != JF_OK) {
        jf_envelope_destroy(env);
        return st;
    }
    *out = env;
    return JF_OK;
}

void jf_envelope_destroy(jf_envelope *env)
{
    if (env == NULL)
        return;
    json_decref(env->root);
    free(env);
}
