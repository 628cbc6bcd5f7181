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
    /* Never valid JSON text, and jansson words both badly: a NUL reads as
     * "near end of file", a byte order mark is quoted as an invisible
     * character. */
    if (len >= 3 && memcmp(data, "\xEF\xBB\xBF", 3) == 0) {
        jf_error_set(err, "not JSON: starts with a UTF-8 byte order mark");
        return JF_ERR_INVALID;
    }
    const unsigned char *nul = memchr(data, '\0', len);
    if (nul != NULL) {
        jf_error_set(err, "not JSON: NUL byte at byte %zu",
                     (size_t)(nul - (const unsigned char *)data));
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

/* ---- fast path ----------------------------------------------------------
 *
 * jansson builds a tree of the whole message, payload included, at about
 * 200 instructions a byte; the consumer needs seven top-level strings. The
 * scanner below checks RFC 8259 in one pass without allocating, for the
 * common case only: whatever it is not sure jansson accepts — a \u escape,
 * a number that might not fit, an exponent, a key that repeats or has an
 * escape, more keys than it tracks, a field rule broken — makes it give up,
 * and jf_envelope_parse decides (and words the error). So both accept
 * exactly the same messages, with the same errors. */

#define FAST_KEYS_MAX 128 /* keys of all open objects tracked for duplicates */

typedef struct fspan {
    const unsigned char *s;
    size_t n;
} fspan;

typedef struct fscan {
    const unsigned char *p, *end;
    fspan keys[FAST_KEYS_MAX];
    int nkeys;
} fscan;

enum { F_NONE = 0, F_STRING, F_OTHER };

typedef struct fmember {
    const char *name;
    size_t len;
    int kind;  /* F_NONE: absent */
    fspan val; /* F_STRING: the raw bytes, which have no escape */
} fmember;

static void fs_ws(fscan *s)
{
    while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r'))
        s->p++;
}

static bool cont(const unsigned char *p, const unsigned char *end, int n)
{
    if (end - p < n)
        return false;
    for (int i = 0; i < n; i++)
        if ((p[i] & 0xC0) != 0x80)
            return false;
    return true;
}

/* Skips the bytes of a string that need no second look: not a control
 * byte, a quote, a backslash or part of a multi-byte sequence, eight at a
 * time with the usual bit tricks (a byte of x is zero iff (x - 1) & ~x
 * sets its top bit, below 0x20 likewise with 0x20 subtracted; the lowest
 * flagged byte is always a true one). Most of a payload is such runs: a
 * string then costs well under an instruction per byte instead of
 * several. Returns the first byte that needs a look (or end). */
static const unsigned char *skip_plain(const unsigned char *p, const unsigned char *end)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    const uint64_t ones = 0x0101010101010101u, highs = 0x8080808080808080u;
    while (end - p >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        uint64_t q = v ^ (ones * '"'), b = v ^ (ones * '\\');
        uint64_t special =
            (((v - ones * 0x20) & ~v) | ((q - ones) & ~q) | ((b - ones) & ~b) | v) & highs;
        if (special != 0)
            return p + (__builtin_ctzll(special) >> 3);
        p += 8;
    }
#endif
    while (p < end && *p >= 0x20 && *p < 0x80 && *p != '"' && *p != '\\')
        p++;
    return p;
}

/* At the opening quote. Strict UTF-8 (no overlongs, no surrogates, at
 * most U+10FFFF), the two-character escapes only. */
static bool fs_string(fscan *s, fspan *out, bool *escaped)
{
    const unsigned char *p = s->p + 1, *end = s->end;
    *escaped = false;
    while (p < end) {
        p = skip_plain(p, end);
        if (p >= end)
            break;
        unsigned char c = *p;
        if (c == '"') {
            out->s = s->p + 1;
            out->n = (size_t)(p - (s->p + 1));
            s->p = p + 1;
            return true;
        }
        if (c == '\\') {
            if (p + 1 >= end || strchr("\"\\/bfnrt", p[1]) == NULL || p[1] == '\0')
                return false;
            *escaped = true;
            p += 2;
        } else if (c < 0x20) {
            return false;
        } else if (c < 0x80) {
            p++;
        } else if (c >= 0xC2 && c <= 0xDF) {
            if (!cont(p + 1, end, 1))
                return false;
            p += 2;
        } else if (c >= 0xE0 && c <= 0xEF) {
            if (!cont(p + 1, end, 2) || (c == 0xE0 && p[1] < 0xA0) || (c == 0xED && p[1] > 0x9F))
                return false;
            p += 3;
        } else if (c >= 0xF0 && c <= 0xF4) {
            if (!cont(p + 1, end, 3) || (c == 0xF0 && p[1] < 0x90) || (c == 0xF4 && p[1] > 0x8F))
                return false;
            p += 4;
        } else {
            return false;
        }
    }
    return false;
}

/* Integers of at most 18 digits fit int64; a fraction without exponent in
 * at most 24 characters is a finite double. Anything else: give up. */
static bool fs_number(fscan *s)
{
    const unsigned char *p = s->p, *end = s->end, *start = s->p;
    if (p < end && *p == '-')
        p++;
    if (p >= end)
        return false;
    const unsigned char *digits = p;
    if (*p == '0')
        p++;
    else if (*p >= '1' && *p <= '9')
        while (p < end && *p >= '0' && *p <= '9')
            p++;
    else
        return false;
    size_t int_digits = (size_t)(p - digits);
    bool frac = false;
    if (p < end && *p == '.') {
        p++;
        const unsigned char *f = p;
        while (p < end && *p >= '0' && *p <= '9')
            p++;
        if (p == f)
            return false;
        frac = true;
    }
    if (p < end && (*p == 'e' || *p == 'E'))
        return false;
    if (frac ? (size_t)(p - start) > 24 : int_digits > 18)
        return false;
    s->p = p;
    return true;
}

static bool fs_literal(fscan *s, const char *lit, size_t n)
{
    if ((size_t)(s->end - s->p) < n || memcmp(s->p, lit, n) != 0)
        return false;
    s->p += n;
    return true;
}

static bool fs_value(fscan *s, int depth);

/* At '{'. top (not NULL for the envelope itself) collects its members. */
static bool fs_object(fscan *s, int depth, fmember *top, size_t ntop)
{
    if (depth > JF_ENVELOPE_MAX_DEPTH)
        return false;
    int first_key = s->nkeys;
    s->p++;
    fs_ws(s);
    if (s->p < s->end && *s->p == '}') {
        s->p++;
        return true;
    }
    for (;;) {
        fspan key;
        bool esc;
        if (s->p >= s->end || *s->p != '"' || !fs_string(s, &key, &esc) || esc)
            return false;
        for (int i = first_key; i < s->nkeys; i++)
            if (s->keys[i].n == key.n && memcmp(s->keys[i].s, key.s, key.n) == 0)
                return false; /* a duplicate: jansson words the error */
        if (s->nkeys == FAST_KEYS_MAX)
            return false;
        s->keys[s->nkeys++] = key;
        fs_ws(s);
        if (s->p >= s->end || *s->p != ':')
            return false;
        s->p++;
        fs_ws(s);
        fmember *m = NULL;
        for (size_t i = 0; top != NULL && i < ntop; i++)
            if (top[i].len == key.n && memcmp(top[i].name, key.s, key.n) == 0)
                m = &top[i];
        if (m != NULL && s->p < s->end && *s->p == '"') {
            if (!fs_string(s, &m->val, &esc))
                return false;
            m->kind = esc ? F_OTHER : F_STRING;
        } else {
            if (!fs_value(s, depth))
                return false;
            if (m != NULL)
                m->kind = F_OTHER;
        }
        fs_ws(s);
        if (s->p < s->end && *s->p == ',') {
            s->p++;
            fs_ws(s);
            continue;
        }
        if (s->p < s->end && *s->p == '}') {
            s->p++;
            s->nkeys = first_key;
            return true;
        }
        return false;
    }
}

static bool fs_array(fscan *s, int depth)
{
    if (depth > JF_ENVELOPE_MAX_DEPTH)
        return false;
    s->p++;
    fs_ws(s);
    if (s->p < s->end && *s->p == ']') {
        s->p++;
        return true;
    }
    for (;;) {
        if (!fs_value(s, depth))
            return false;
        fs_ws(s);
        if (s->p < s->end && *s->p == ',') {
            s->p++;
            fs_ws(s);
            continue;
        }
        if (s->p < s->end && *s->p == ']') {
            s->p++;
            return true;
        }
        return false;
    }
}

static bool fs_value(fscan *s, int depth)
{
    if (s->p >= s->end)
        return false;
    fspan sp;
    bool esc;
    switch (*s->p) {
    case '{':
        return fs_object(s, depth + 1, NULL, 0);
    case '[':
        return fs_array(s, depth + 1);
    case '"':
        return fs_string(s, &sp, &esc);
    case 't':
        return fs_literal(s, "true", 4);
    case 'f':
        return fs_literal(s, "false", 5);
    case 'n':
        return fs_literal(s, "null", 4);
    default:
        return fs_number(s);
    }
}

enum { M_ID, M_SERVICE, M_TYPE, M_PRIORITY, M_TENANT, M_CREATED, M_DEADLINE, M_PAYLOAD, M_COUNT };

/* subject == "jobs.<service>.<priority>.<type>" of env, without building
 * it (check_subject words a mismatch). */
static bool subject_matches(const char *subject, const jf_envelope *env)
{
    const char *parts[3] = {env->service, prio_names[env->priority], env->type};
    if (strncmp(subject, "jobs.", 5) != 0)
        return false;
    subject += 5;
    for (int i = 0; i < 3; i++) {
        size_t n = strlen(parts[i]);
        if (strncmp(subject, parts[i], n) != 0 || subject[n] != (i < 2 ? '.' : '\0'))
            return false;
        subject += n + 1;
    }
    return true;
}

/* The envelope when the fast path is sure; NULL when jansson must decide. */
static jf_envelope *fast_parse(const void *data, size_t len, const char *subject,
                               size_t max_payload)
{
    static const char *const names[M_COUNT] = {"id",     "service",    "type",     "priority",
                                               "tenant", "created_at", "deadline", "payload"};
    fmember m[M_COUNT];
    for (int i = 0; i < M_COUNT; i++)
        m[i] = (fmember){.name = names[i], .len = strlen(names[i]), .kind = F_NONE, .val = {NULL, 0}};
    if (data == NULL || len == 0 || (max_payload > 0 && len > max_payload))
        return NULL;
    fscan sc, *s = &sc; /* 2 KiB on the stack: this runs for every message */
    s->p = data;
    s->end = s->p + len;
    s->nkeys = 0;
    fs_ws(s);
    bool ok = s->p < s->end && *s->p == '{' && fs_object(s, 1, m, M_COUNT);
    if (ok) {
        fs_ws(s);
        ok = s->p == s->end;
    }
    if (!ok)
        return NULL;
    /* The strings the envelope keeps; every other member only needs to be there. */
    static const int text[] = {M_ID, M_SERVICE, M_TYPE, M_PRIORITY, M_TENANT, M_CREATED,
                               M_DEADLINE};
    size_t need = 0;
    for (size_t i = 0; i < sizeof text / sizeof text[0]; i++) {
        const fmember *f = &m[text[i]];
        if (f->kind == F_OTHER)
            return NULL;
        if (f->kind == F_STRING)
            need += f->val.n + 1;
    }
    if (m[M_ID].kind == F_NONE || m[M_SERVICE].kind == F_NONE || m[M_TYPE].kind == F_NONE ||
        m[M_PAYLOAD].kind == F_NONE)
        return NULL;

    jf_envelope *env = calloc(1, sizeof *env + need);
    if (env == NULL)
        return NULL;
    char *w = (char *)(env + 1);
    const char *val[M_COUNT] = {0};
    for (size_t i = 0; i < sizeof text / sizeof text[0]; i++) {
        const fmember *f = &m[text[i]];
        if (f->kind != F_STRING)
            continue;
        memcpy(w, f->val.s, f->val.n);
        w[f->val.n] = '\0';
        val[text[i]] = w;
        w += f->val.n + 1;
    }
    jf_error err;
    env->id = val[M_ID];
    env->service = val[M_SERVICE];
    env->type = val[M_TYPE];
    env->tenant = val[M_TENANT];
    env->priority = JF_PRIO_NORMAL;
    if (check_text("id", env->id, m[M_ID].val.n, &err) != JF_OK ||
        (env->tenant != NULL && check_text("tenant", env->tenant, m[M_TENANT].val.n, &err) != JF_OK) ||
        !token_valid_n(env->service, m[M_SERVICE].val.n) ||
        !token_valid_n(env->type, m[M_TYPE].val.n) ||
        (val[M_PRIORITY] != NULL && jf_priority_parse(&env->priority, val[M_PRIORITY]) != JF_OK) ||
        (val[M_CREATED] != NULL &&
         jf_rfc3339_parse(&env->created_at_ms, val[M_CREATED], m[M_CREATED].val.n) != JF_OK) ||
        (val[M_DEADLINE] != NULL &&
         jf_rfc3339_parse(&env->deadline_ms, val[M_DEADLINE], m[M_DEADLINE].val.n) != JF_OK) ||
        (subject != NULL && !subject_matches(subject, env))) {
        free(env);
        return NULL;
    }
    env->has_created_at = val[M_CREATED] != NULL;
    env->has_deadline = val[M_DEADLINE] != NULL;
    return env;
}

jf_status jf_envelope_scan(jf_envelope **out, const void *data, size_t len, const char *subject,
                           size_t max_payload, jf_error *err)
{
    jf_envelope *env = fast_parse(data, len, subject, max_payload);
    if (env == NULL)
        return jf_envelope_parse(out, data, len, subject, max_payload, err);
    *out = env;
    return JF_OK;
}
