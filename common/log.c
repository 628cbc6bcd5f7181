#include "log.h"

#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

static _Atomic int g_level = JF_LOG_INFO; /* the one global: read by every thread */

static const char *const level_names[] = {"debug", "info", "warn", "error", "off"};

void jf_log_set_level(jf_log_level level)
{
    atomic_store(&g_level, (int)level);
}

jf_log_level jf_log_get_level(void)
{
    return (jf_log_level)atomic_load(&g_level);
}

bool jf_log_enabled(jf_log_level level)
{
    return level != JF_LOG_OFF && (int)level >= atomic_load(&g_level);
}

jf_status jf_log_level_parse(jf_log_level *out, const char *s)
{
    for (int i = 0; i <= JF_LOG_OFF; i++) {
        if (strcasecmp(s, level_names[i]) == 0) {
            *out = (jf_log_level)i;
            return JF_OK;
        }
    }
    if (strcasecmp(s, "warning") == 0) {
        *out = JF_LOG_WARN;
        return JF_OK;
    }
    return JF_ERR_INVALID;
}

static size_t put(char *buf, size_t len, size_t cap, const char *s)
{
    while (*s && len + 1 < cap)
        buf[len++] = *s++;
    buf[len < cap ? len : cap - 1] = '\0';
    return len;
}

/* Bytes of the valid UTF-8 sequence at p (1 for ASCII), 0 when invalid. */
static size_t utf8_len(const unsigned char *p)
{
    unsigned c = p[0];
    if (c < 0x80)
        return 1;
    size_t n = c >= 0xC2 && c <= 0xDF ? 2 : c >= 0xE0 && c <= 0xEF ? 3 : c >= 0xF0 && c <= 0xF4 ? 4 : 0;
    for (size_t k = 1; k < n; k++)
        if ((p[k] & 0xC0) != 0x80)
            return 0; /* also stops at the NUL */
    if ((c == 0xE0 && p[1] < 0xA0) || (c == 0xED && p[1] > 0x9F) || (c == 0xF0 && p[1] < 0x90) ||
        (c == 0xF4 && p[1] > 0x8F))
        return 0;
    return n;
}

/* Appends s JSON-escaped, whole escapes and whole UTF-8 sequences only:
 * stops before the first that does not fit (keeping the NUL) and then
 * clears *all, so a cut string is still a valid JSON string. */
static size_t escape_some(char *buf, size_t len, size_t cap, const char *s, bool *all)
{
    static const char hex[] = "0123456789abcdef";
    *all = true;
    for (const unsigned char *p = (const unsigned char *)s; *p;) {
        char esc[8];
        const char *out = esc;
        size_t n = 1;
        switch (*p) {
        case '"':
            out = "\\\"";
            break;
        case '\\':
            out = "\\\\";
            break;
        case '\n':
            out = "\\n";
            break;
        case '\r':
            out = "\\r";
            break;
        case '\t':
            out = "\\t";
            break;
        default:
            if (*p < 0x20 || *p == 0x7f) {
                esc[0] = '\\', esc[1] = 'u', esc[2] = '0', esc[3] = '0';
                esc[4] = hex[*p >> 4], esc[5] = hex[*p & 15], esc[6] = '\0';
            } else {
                /* A multi-byte sequence goes whole; one that is not valid
                 * UTF-8 (a stray byte, cut, overlong, a surrogate, beyond
                 * U+10FFFF: subjects and errors quote raw bytes from the
                 * wire) becomes U+FFFD, so the line stays valid JSON. */
                n = utf8_len(p);
                if (n == 0) {
                    out = "\\ufffd";
                    n = 1;
                } else {
                    memcpy(esc, p, n);
                    esc[n] = '\0';
                }
            }
        }
        size_t olen = strlen(out);
        if (len + olen + 1 > cap) {
            *all = false;
            break;
        }
        memcpy(buf + len, out, olen);
        len += olen;
        buf[len] = '\0';
        p += n;
    }
    if (len < cap)
        buf[len] = '\0';
    return len;
}

size_t jf_json_escape(char *buf, size_t len, size_t cap, const char *s)
{
    bool all;
    return escape_some(buf, len, cap, s, &all);
}

/* A log line is at most LINE_MAX bytes and always one valid JSON object: a
 * string that does not fit is cut (at a whole character) and ends in
 * "...", fields that find no room at all are left out and "truncated":true
 * says so. */
#define LINE_MAX_BYTES 4096
#define TAIL_RESERVE   32 /* room kept for ...", "truncated":true and }\n */

static size_t put_value(char *line, size_t len, const char *s)
{
    bool all;
    len = put(line, len, LINE_MAX_BYTES, "\"");
    len = escape_some(line, len, LINE_MAX_BYTES - TAIL_RESERVE, s, &all);
    if (!all)
        len = put(line, len, LINE_MAX_BYTES, "...");
    return put(line, len, LINE_MAX_BYTES, "\"");
}

void jf_log_emit(jf_log_level level, const char *msg, const jf_log_field *fields, size_t n)
{
    char line[LINE_MAX_BYTES];
    size_t len = 0;
    struct timespec ts;
    struct tm tm;
    char tbuf[96];
    bool dropped = false;

    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    snprintf(tbuf, sizeof tbuf, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ", tm.tm_year + 1900,
             tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (long)(ts.tv_nsec / 1000000) % 1000);

    len = put(line, len, sizeof line, "{\"ts\":\"");
    len = put(line, len, sizeof line, tbuf);
    len = put(line, len, sizeof line, "\",\"level\":\"");
    len = put(line, len, sizeof line, level_names[level < JF_LOG_OFF ? level : JF_LOG_ERROR]);
    len = put(line, len, sizeof line, "\",\"msg\":");
    len = put_value(line, len, msg);
    for (size_t i = 0; i < n; i++) {
        /* The key and a short value must fit whole, or the field is left out. */
        if (len + strlen(fields[i].key) * 6 + 40 + TAIL_RESERVE > sizeof line) {
            dropped = true;
            continue;
        }
        len = put(line, len, sizeof line, ",\"");
        len = jf_json_escape(line, len, sizeof line, fields[i].key);
        len = put(line, len, sizeof line, "\":");
        if (fields[i].is_int) {
            char num[32];
            snprintf(num, sizeof num, "%lld", fields[i].i);
            len = put(line, len, sizeof line, num);
        } else if (fields[i].s == NULL) {
            len = put(line, len, sizeof line, "null");
        } else {
            len = put_value(line, len, fields[i].s);
        }
    }
    if (dropped)
        len = put(line, len, sizeof line, ",\"truncated\":true");
    line[len++] = '}';
    line[len++] = '\n';
    ssize_t w = write(STDERR_FILENO, line, len);
    (void)w;
}
