#include "log.h"

#include <stdatomic.h>
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

size_t jf_json_escape(char *buf, size_t len, size_t cap, const char *s)
{
    static const char hex[] = "0123456789abcdef";
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        char esc[8];
        const char *out = esc;
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
                esc[0] = (char)*p, esc[1] = '\0';
            }
        }
        len = put(buf, len, cap, out);
    }
    return len;
}

void jf_log_emit(jf_log_level level, const char *msg, const jf_log_field *fields, size_t n)
{
    char line[4096];
    size_t len = 0;
    struct timespec ts;
    struct tm tm;
    char tbuf[96];

    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    snprintf(tbuf, sizeof tbuf, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ", tm.tm_year + 1900,
             tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (long)(ts.tv_nsec / 1000000) % 1000);

    len = put(line, len, sizeof line, "{\"ts\":\"");
    len = put(line, len, sizeof line, tbuf);
    len = put(line, len, sizeof line, "\",\"level\":\"");
    len = put(line, len, sizeof line, level_names[level < JF_LOG_OFF ? level : JF_LOG_ERROR]);
    len = put(line, len, sizeof line, "\",\"msg\":\"");
    len = jf_json_escape(line, len, sizeof line, msg);
    len = put(line, len, sizeof line, "\"");
    for (size_t i = 0; i < n; i++) {
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
            len = put(line, len, sizeof line, "\"");
            len = jf_json_escape(line, len, sizeof line, fields[i].s);
            len = put(line, len, sizeof line, "\"");
        }
    }
    /* Room for "}\n" is kept even when a long field was truncated. */
    if (len > sizeof line - 3)
        len = sizeof line - 3;
    line[len++] = '}';
    line[len++] = '\n';
    ssize_t w = write(STDERR_FILENO, line, len);
    (void)w;
}
