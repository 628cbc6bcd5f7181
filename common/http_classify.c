/* http_classify.c — verdicts on downstream HTTP answers, the auth header.
 * See http_classify.h for the rules. */
#include "http_classify.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define REQUIRED_MAX    64   /* keys in result_required */
#define AUTH_HEADER_MAX 8192 /* bytes of an auth header line */

struct jf_http_required {
    size_t n;
    char *keys[REQUIRED_MAX];
};

/* ---- UTF-8 ------------------------------------------------------------ */

/* Length (1..4) of the well-formed UTF-8 character at s, or 0 when the
 * bytes there are not one (overlong forms, surrogates and code points past
 * U+10FFFF are not). */
static size_t utf8_char(const unsigned char *s, size_t n)
{
    if (n == 0)
        return 0;
    unsigned c = s[0];
    if (c < 0x80)
        return 1;
    size_t k;
    unsigned lo = 0x80, hi = 0xBF; /* allowed range of the second byte */
    if (c >= 0xC2 && c <= 0xDF) {
        k = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
        k = 3;
        if (c == 0xE0)
            lo = 0xA0;
        else if (c == 0xED)
            hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        k = 4;
        if (c == 0xF0)
            lo = 0x90;
        else if (c == 0xF4)
            hi = 0x8F;
    } else {
        return 0;
    }
    if (n < k || s[1] < lo || s[1] > hi)
        return 0;
    for (size_t i = 2; i < k; i++)
        if (s[i] < 0x80 || s[i] > 0xBF)
            return 0;
    return k;
}

size_t jf_http_one_line(char *dst, size_t cap, const void *src, size_t len, size_t max)
{
    const unsigned char *s = src;
    size_t out = 0, i = 0;
    bool blank = true; /* drops leading blanks and collapses runs */

    if (cap == 0)
        return 0;
    if (max > cap - 1)
        max = cap - 1;
    while (i < len) {
        size_t k = utf8_char(s + i, len - i);
        if (k == 1 && (s[i] < 0x20 || s[i] == 0x7F || s[i] == ' ')) {
            if (!blank && out < max) {
                dst[out++] = ' ';
                blank = true;
            }
            i++;
            continue;
        }
        if (k == 0) {
            if (out + 1 > max)
                break;
            dst[out++] = '?';
            i++;
        } else {
            if (out + k > max)
                break;
            memcpy(dst + out, s + i, k);
            out += k;
            i += k;
        }
        blank = false;
    }
    while (out > 0 && dst[out - 1] == ' ')
        out--;
    dst[out] = '\0';
    return out;
}

/* A JSON string holding the body, with bytes that are not UTF-8 replaced
 * by U+FFFD (jansson strings must be UTF-8). */
static json_t *lossy_string(const unsigned char *s, size_t len)
{
    if (len > (SIZE_MAX - 1) / 3)
        return NULL;
    char *buf = malloc(len * 3 + 1);
    if (buf == NULL)
        return NULL;
    size_t out = 0;
    for (size_t i = 0; i < len;) {
        size_t k = utf8_char(s + i, len - i);
        if (k == 0) {
            memcpy(buf + out, "\xEF\xBF\xBD", 3);
            out += 3;
            i++;
        } else {
            memcpy(buf + out, s + i, k);
            out += k;
            i += k;
        }
    }
    json_t *j = json_stringn_nocheck(buf, out);
    free(buf);
    return j;
}

/* ---- result_required -------------------------------------------------- */

void jf_http_required_destroy(jf_http_required *req)
{
    if (req == NULL)
        return;
    for (size_t i = 0; i < req->n; i++)
        free(req->keys[i]);
    free(req);
}

jf_status jf_http_required_parse(jf_http_required **out, const char *service, const char *list,
                                 jf_error *err)
{
    if (list == NULL || *list == '\0') {
        *out = NULL;
        return JF_OK;
    }
    jf_http_required *req = calloc(1, sizeof *req);
    if (req == NULL) {
        jf_error_set(err, "service %s: out of memory", service);
        return JF_ERR_NOMEM;
    }
    const char *p = list;
    for (;;) {
        const char *end = strchr(p, ',');
        if (end == NULL)
            end = p + strlen(p);
        const char *a = p, *b = end;
        while (a < b && (*a == ' ' || *a == '\t'))
            a++;
        while (b > a && (b[-1] == ' ' || b[-1] == '\t'))
            b--;
        if (a == b) {
            jf_error_set(err, "service %s: result_required: empty key in the list", service);
            goto fail;
        }
        if (req->n == REQUIRED_MAX) {
            jf_error_set(err, "service %s: result_required: more than %d keys", service,
                         REQUIRED_MAX);
            goto fail;
        }
        req->keys[req->n] = strndup(a, (size_t)(b - a));
        if (req->keys[req->n] == NULL) {
            jf_error_set(err, "service %s: out of memory", service);
            jf_http_required_destroy(req);
            return JF_ERR_NOMEM;
        }
        req->n++;
        if (*end == '\0')
            break;
        p = end + 1;
    }
    *out = req;
    return JF_OK;

fail:
    jf_http_required_destroy(req);
    return JF_ERR_INVALID;
}

/* ---- verdicts ---------------------------------------------------------- */

static void verdict_error(jf_http_verdict *v, const char *prefix, const void *body, size_t len)
{
    char line[JF_HTTP_SNIPPET_MAX + 1];
    size_t n = jf_http_one_line(line, sizeof line, body, len, JF_HTTP_SNIPPET_MAX);
    if (n > 0)
        snprintf(v->error, sizeof v->error, "%s: %s", prefix, line);
    else
        snprintf(v->error, sizeof v->error, "%s", prefix);
}

static void classify_2xx(jf_http_verdict *v, const unsigned char *body, size_t len,
                         const jf_http_required *req)
{
    json_error_t jerr;
    json_t *j = len > 0 ? json_loadb((const char *)body, len, JSON_DECODE_ANY, &jerr) : NULL;

    if (req == NULL) {
        v->cls = JF_HTTP_SUCCESS;
        /* Not JSON: still the service's answer, kept as a string. */
        v->result = j != NULL ? j : len > 0 ? lossy_string(body, len) : NULL;
        return;
    }
    v->cls = JF_HTTP_RETRY;
    v->service_fault = true;
    if (j == NULL) {
        verdict_error(v, "2xx body is not JSON", body, len);
        return;
    }
    if (!json_is_object(j)) {
        json_decref(j);
        verdict_error(v, "2xx body is not a JSON object", body, len);
        return;
    }
    for (size_t i = 0; i < req->n; i++) {
        if (json_object_get(j, req->keys[i]) == NULL) {
            json_decref(j);
            char key[101];
            jf_http_one_line(key, sizeof key, req->keys[i], strlen(req->keys[i]), 100);
            snprintf(v->error, sizeof v->error, "2xx without required key %s", key);
            return;
        }
    }
    v->cls = JF_HTTP_SUCCESS;
    v->service_fault = false;
    v->result = j;
}

void jf_http_classify(jf_http_verdict *out, long status, const void *body, size_t len,
                      const jf_http_required *req)
{
    char prefix[48];

    memset(out, 0, sizeof *out);
    if (status >= 200 && status <= 299) {
        classify_2xx(out, body, len, req);
        return;
    }
    snprintf(prefix, sizeof prefix, "HTTP %ld", status);
    if (status == 408 || status == 425 || status == 429 || (status >= 500 && status <= 599)) {
        out->cls = JF_HTTP_RETRY;
        out->service_fault = status != 425 && status != 429;
        out->use_retry_after = true;
    } else if (status >= 400 && status <= 499) {
        out->cls = JF_HTTP_PERMANENT;
    } else {
        out->cls = JF_HTTP_RETRY;
        out->service_fault = true;
        snprintf(prefix, sizeof prefix,
                 status >= 300 && status <= 399 ? "HTTP %ld (redirects are not followed)"
                                                : "HTTP %ld (unexpected status)",
                 status);
    }
    verdict_error(out, prefix, body, len);
}

/* ---- the auth header --------------------------------------------------- */

void jf_http_auth_free(char *header)
{
    if (header == NULL)
        return;
    explicit_bzero(header, strlen(header));
    free(header);
}

static bool is_tchar(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           (c != '\0' && strchr("!#$%&'*+-.^_`|~", c) != NULL);
}

/* "Name: value": a token, a colon, a value with something in it (curl reads
 * "Name:" alone as "remove this header") and nothing that could end the line. */
static bool header_ok(const char *h)
{
    const unsigned char *p = (const unsigned char *)h;
    size_t n = 0;
    while (is_tchar(p[n]))
        n++;
    if (n == 0 || p[n] != ':')
        return false;
    bool value = false;
    for (p += n + 1; *p != '\0'; p++) {
        if ((*p < 0x20 && *p != '\t') || *p == 0x7F)
            return false;
        if (*p != ' ' && *p != '\t')
            value = true;
    }
    return value;
}

/* The first line of path, without its line end, at most AUTH_HEADER_MAX bytes. */
static jf_status read_first_line(char **out, const char *service, const char *path, jf_error *err)
{
    char buf[AUTH_HEADER_MAX + 2];
    jf_status st = JF_OK;
    FILE *fp = fopen(path, "rb");
    if (fp == NULL) {
        jf_error_set(err, "service %s: auth_header_file %s: %s", service, path, strerror(errno));
        return JF_ERR_INVALID;
    }
    size_t n = fread(buf, 1, sizeof buf - 1, fp);
    if (ferror(fp)) {
        jf_error_set(err, "service %s: auth_header_file %s: read error", service, path);
        st = JF_ERR_INVALID;
        goto out;
    }
    buf[n] = '\0';
    char *nl = memchr(buf, '\n', n);
    size_t line = nl != NULL ? (size_t)(nl - buf) : n;
    if (nl == NULL && n > AUTH_HEADER_MAX) {
        jf_error_set(err, "service %s: auth_header_file %s: first line longer than %d bytes",
                     service, path, AUTH_HEADER_MAX);
        st = JF_ERR_INVALID;
        goto out;
    }
    if (line > 0 && buf[line - 1] == '\r')
        line--;
    if (memchr(buf, '\0', line) != NULL) {
        jf_error_set(err, "service %s: auth_header_file %s: first line holds a NUL byte", service,
                     path);
        st = JF_ERR_INVALID;
        goto out;
    }
    *out = strndup(buf, line);
    if (*out == NULL) {
        jf_error_set(err, "service %s: out of memory", service);
        st = JF_ERR_NOMEM;
    }
out:
    explicit_bzero(buf, sizeof buf);
    fclose(fp);
    return st;
}

jf_status jf_http_auth_load(char **out, const jf_service_config *svc, jf_error *err)
{
    const char *key;
    char *h = NULL;
    jf_status st;
    int set = (svc->auth_header != NULL) + (svc->auth_header_file != NULL) +
              (svc->auth_header_env != NULL);

    if (set == 0) {
        *out = NULL;
        return JF_OK;
    }
    if (set > 1) {
        jf_error_set(err,
                     "service %s: set only one of auth_header, auth_header_file and "
                     "auth_header_env",
                     svc->name);
        return JF_ERR_INVALID;
    }
    if (svc->auth_header != NULL) {
        key = "auth_header";
        h = strdup(svc->auth_header);
    } else if (svc->auth_header_file != NULL) {
        key = "auth_header_file";
        st = read_first_line(&h, svc->name, svc->auth_header_file, err);
        if (st != JF_OK)
            return st;
    } else {
        key = "auth_header_env";
        const char *v = getenv(svc->auth_header_env);
        if (v == NULL || *v == '\0') {
            jf_error_set(err, "service %s: auth_header_env: variable %s is %s", svc->name,
                         svc->auth_header_env, v == NULL ? "not set" : "empty");
            return JF_ERR_INVALID;
        }
        if (strlen(v) > AUTH_HEADER_MAX) {
            jf_error_set(err, "service %s: auth_header_env: variable %s is longer than %d bytes",
                         svc->name, svc->auth_header_env, AUTH_HEADER_MAX);
            return JF_ERR_INVALID;
        }
        h = strdup(v);
    }
    if (h == NULL) {
        jf_error_set(err, "service %s: out of memory", svc->name);
        return JF_ERR_NOMEM;
    }
    if (!header_ok(h)) {
        /* Which source, never the value: it is a secret. */
        if (svc->auth_header_file != NULL)
            jf_error_set(err, "service %s: auth_header_file %s: first line is not \"Name: value\"",
                         svc->name, svc->auth_header_file);
        else if (svc->auth_header_env != NULL)
            jf_error_set(err, "service %s: auth_header_env: variable %s is not \"Name: value\"",
                         svc->name, svc->auth_header_env);
        else
            jf_error_set(err, "service %s: %s is not \"Name: value\"", svc->name, key);
        jf_http_auth_free(h);
        return JF_ERR_INVALID;
    }
    *out = h;
    return JF_OK;
}
