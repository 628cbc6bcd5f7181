/* publish.c — `jetfleet-publisher publish`: one job built from options,
 * published synchronously so its PubAck (stream, sequence, duplicate) can be
 * printed. */
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uuid/uuid.h>

#include "duration.h"
#include "envelope.h"
#include "publisher.h"
#include "rfc3339.h"

/* Largest payload read from stdin: nats-server refuses max_payload above
 * 64 MiB, so nothing longer could ever be published. */
#define STDIN_MAX (64u * 1024 * 1024)

static void usage(FILE *out)
{
    fprintf(out,
            "Usage: %s [GLOBAL OPTIONS] publish --service S --type T [OPTIONS] [PAYLOAD_JSON | -]\n"
            "\n"
            "Publishes one job on jobs.<service>.<priority>.<type> and prints\n"
            "{\"id\":...,\"stream\":...,\"seq\":...,\"duplicate\":...} on stdout.\n"
            "PAYLOAD_JSON is any JSON value (default {}); '-' reads it from stdin.\n"
            "\n"
            "Options:\n"
            "  -s, --service S     downstream service (a subject token) [required]\n"
            "  -t, --type T        job type (a subject token) [required]\n"
            "  -p, --priority P    high, normal or low (default normal)\n"
            "  -i, --id ID         job id, also the Nats-Msg-Id: publishing the same id again\n"
            "                      within the duplicate window stores nothing (default: a UUID)\n"
            "      --tenant X      tenant of the job\n"
            "      --deadline TIME RFC 3339 date-time, or a duration from now (e.g. 10m)\n"
            "  -h, --help          show this help and exit\n",
            JF_PUBLISHER_PROG);
}

/* Reads all of stdin, at most STDIN_MAX bytes. */
static int read_stdin(char **out, size_t *len)
{
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    if (buf == NULL)
        return jf_pub_usage_error("publish", "out of memory");
    for (;;) {
        if (n > STDIN_MAX) {
            free(buf);
            return jf_pub_usage_error("publish", "payload on stdin is larger than %u bytes",
                                      STDIN_MAX);
        }
        if (n == cap) {
            /* One byte past the limit is enough to know it was passed. */
            size_t ncap = cap * 2 > STDIN_MAX + 1 ? STDIN_MAX + 1 : cap * 2;
            char *nb = realloc(buf, ncap);
            if (nb == NULL) {
                free(buf);
                return jf_pub_usage_error("publish", "out of memory");
            }
            buf = nb;
            cap = ncap;
        }
        ssize_t r = read(STDIN_FILENO, buf + n, cap - n);
        if (r == 0)
            break;
        if (r < 0) {
            if (errno == EINTR)
                continue;
            free(buf);
            return jf_pub_usage_error("publish", "cannot read the payload from stdin: %s",
                                      strerror(errno));
        }
        n += (size_t)r;
    }
    *out = buf;
    *len = n;
    return JF_EXIT_OK;
}

/* Appends s as a JSON string, quotes included; truncates rather than
 * overflow (build() sizes its buffer so that it never has to). */
static size_t put_str(char *buf, size_t len, size_t cap, const char *s)
{
    if (len + 3 > cap)
        return len;
    buf[len++] = '"';
    len = jf_json_escape(buf, len, cap - 1, s); /* keeps room for the closing quote */
    buf[len++] = '"';
    buf[len] = '\0';
    return len;
}

static size_t put_raw(char *buf, size_t len, const char *s, size_t n)
{
    memcpy(buf + len, s, n);
    len += n;
    buf[len] = '\0';
    return len;
}

typedef struct job_args {
    const char *service, *type, *id, *tenant, *deadline;
    jf_priority priority;
    const char *payload;
    size_t payload_len;
    char created_at[32];
} job_args;

/* The envelope in DESIGN.md's field order. The payload is embedded as the
 * user wrote it (after a JSON check), so numbers keep their exact text. */
static char *build(const job_args *a, size_t *len_out)
{
    size_t text = strlen(a->id) + strlen(a->service) + strlen(a->type) +
                  (a->tenant ? strlen(a->tenant) : 0) + (a->deadline ? strlen(a->deadline) : 0);
    size_t cap = 6 * text + a->payload_len + 256; /* an escape is at most 6 bytes */
    char *b = malloc(cap);
    if (b == NULL)
        return NULL;
    size_t n = 0;
    n = put_raw(b, n, "{\"id\":", 6);
    n = put_str(b, n, cap, a->id);
    n = put_raw(b, n, ",\"service\":", 11);
    n = put_str(b, n, cap, a->service);
    n = put_raw(b, n, ",\"priority\":", 12);
    n = put_str(b, n, cap, jf_priority_name(a->priority));
    n = put_raw(b, n, ",\"type\":", 8);
    n = put_str(b, n, cap, a->type);
    if (a->tenant != NULL) {
        n = put_raw(b, n, ",\"tenant\":", 10);
        n = put_str(b, n, cap, a->tenant);
    }
    n = put_raw(b, n, ",\"payload\":", 11);
    n = put_raw(b, n, a->payload, a->payload_len);
    n = put_raw(b, n, ",\"created_at\":", 14);
    n = put_str(b, n, cap, a->created_at);
    if (a->deadline != NULL) {
        n = put_raw(b, n, ",\"deadline\":", 12);
        n = put_str(b, n, cap, a->deadline);
    }
    n = put_raw(b, n, "}", 1);
    *len_out = n;
    return b;
}

/* Publishes body on subject with Nats-Msg-Id = id and prints the PubAck. */
static int send(jf_pub_session *s, const char *subject, const char *id, const char *body,
                size_t len)
{
    natsMsg *msg = NULL;
    jsPubAck *pa = NULL;
    jsErrCode code = 0;
    jsPubOptions po;
    natsStatus ns;
    int rc = JF_EXIT_FAIL;

    jsPubOptions_Init(&po);
    po.MaxWait = s->cfg->publisher.timeout_ms > 0 ? s->cfg->publisher.timeout_ms : 5000;

    ns = natsMsg_Create(&msg, subject, NULL, body, (int)len);
    if (ns == NATS_OK)
        ns = natsMsgHeader_Set(msg, "Nats-Msg-Id", id);
    if (ns == NATS_OK)
        ns = js_PublishMsg(&pa, s->js, msg, &po, &code);
    if (ns != NATS_OK) {
        const char *why = jf_pub_nats_error(ns);
        if (ns == NATS_TIMEOUT)
            why = "no acknowledgement from the server within [publisher] timeout";
        jf_log(JF_LOG_ERROR, "publish failed", JF_S("job_id", id), JF_S("subject", subject),
               JF_S("error", why));
        goto out;
    }

    /* Another stream holding jobs.> would have taken the job where no
     * consumer of this fleet looks. */
    if (pa->Stream == NULL || strcmp(pa->Stream, s->cfg->stream.name) != 0) {
        jf_log(JF_LOG_ERROR, "publish failed", JF_S("job_id", id), JF_S("subject", subject),
               JF_S("error", "stored by another stream than [stream] name"),
               JF_S("stream", pa->Stream));
        goto out;
    }

    /* A valid id (200 bytes, no control characters) escapes to 400 at most. */
    char line[2048];
    size_t n = 0;
    n = put_raw(line, n, "{\"id\":", 6);
    n = put_str(line, n, sizeof line, id);
    n = put_raw(line, n, ",\"stream\":", 10);
    n = put_str(line, n, sizeof line, pa->Stream ? pa->Stream : "");
    snprintf(line + n, sizeof line - n, ",\"seq\":%llu,\"duplicate\":%s}\n",
             (unsigned long long)pa->Sequence, pa->Duplicate ? "true" : "false");
    fputs(line, stdout);
    if (fflush(stdout) != 0) {
        jf_log(JF_LOG_ERROR, "cannot write the result", JF_S("error", strerror(errno)));
        goto out;
    }
    rc = JF_EXIT_OK;
out:
    jsPubAck_Destroy(pa);
    natsMsg_Destroy(msg);
    return rc;
}

int jf_cmd_publish(int argc, char **argv, const jf_pub_globals *g)
{
    static const struct option longopts[] = {
        {"service", required_argument, NULL, 's'},  {"type", required_argument, NULL, 't'},
        {"priority", required_argument, NULL, 'p'}, {"id", required_argument, NULL, 'i'},
        {"tenant", required_argument, NULL, 'T'},   {"deadline", required_argument, NULL, 'D'},
        {"help", no_argument, NULL, 'h'},           {NULL, 0, NULL, 0},
    };
    job_args a = {.priority = JF_PRIO_NORMAL};
    jf_pub_session sess = {0};
    char *stdin_buf = NULL, *body = NULL, *deadline_buf = NULL;
    jf_envelope *env = NULL;
    char idbuf[40];
    jf_error err = {{0}};
    int c, rc = JF_EXIT_USAGE;

    opterr = 0;
    while ((c = getopt_long(argc, argv, ":s:t:p:i:h", longopts, NULL)) != -1) {
        switch (c) {
        case 's':
            a.service = optarg;
            break;
        case 't':
            a.type = optarg;
            break;
        case 'p':
            if (jf_priority_parse(&a.priority, optarg) != JF_OK)
                return jf_pub_usage_error(
                    "publish", "--priority: '%s' is not one of high, normal, low", optarg);
            break;
        case 'i':
            a.id = optarg;
            break;
        case 'T':
            a.tenant = optarg;
            break;
        case 'D':
            a.deadline = optarg;
            break;
        case 'h':
            usage(stdout);
            return JF_EXIT_OK;
        case ':':
            return jf_pub_usage_error("publish", "option %s needs a value", argv[optind - 1]);
        default:
            return jf_pub_usage_error("publish", "unknown option %s", jf_pub_bad_option(argc, argv));
        }
    }
    if (a.service == NULL)
        return jf_pub_usage_error("publish", "--service is required");
    if (a.type == NULL)
        return jf_pub_usage_error("publish", "--type is required");
    if (!jf_token_valid(a.service))
        return jf_pub_usage_error(
            "publish", "--service: '%s' is not a subject token ([A-Za-z0-9_-], 1-%d bytes)",
            a.service, JF_TOKEN_MAX);
    if (!jf_token_valid(a.type))
        return jf_pub_usage_error("publish",
                                  "--type: '%s' is not a subject token ([A-Za-z0-9_-], 1-%d bytes)",
                                  a.type, JF_TOKEN_MAX);
    if (argc - optind > 1)
        return jf_pub_usage_error("publish", "one payload at most, got %d arguments",
                                  argc - optind);

    /* The payload: an argument, stdin, or {}. */
    if (optind < argc && strcmp(argv[optind], "-") == 0) {
        if ((rc = read_stdin(&stdin_buf, &a.payload_len)) != JF_EXIT_OK)
            goto out;
        a.payload = stdin_buf;
    } else if (optind < argc) {
        a.payload = argv[optind];
        a.payload_len = strlen(a.payload);
    } else {
        a.payload = "{}";
        a.payload_len = 2;
    }
    rc = JF_EXIT_USAGE;
    /* Surrounding whitespace (the newline of `echo … |`) would end up inside
     * the job; JSON does not need it. */
    while (a.payload_len > 0 && memchr(" \t\r\n", a.payload[0], 4) != NULL)
        a.payload++, a.payload_len--;
    while (a.payload_len > 0 && memchr(" \t\r\n", a.payload[a.payload_len - 1], 4) != NULL)
        a.payload_len--;
    /* jansson words these badly (a NUL reads as "end of file", a byte order
     * mark is quoted invisibly); neither is ever valid JSON text. */
    const char *nul = memchr(a.payload, '\0', a.payload_len);
    if (nul != NULL) {
        jf_pub_usage_error("publish", "payload: not valid JSON: NUL byte at byte %zu",
                           (size_t)(nul - a.payload));
        goto out;
    }
    if (a.payload_len >= 3 && memcmp(a.payload, "\xEF\xBB\xBF", 3) == 0) {
        jf_pub_usage_error("publish", "payload: not valid JSON: starts with a UTF-8 byte order mark");
        goto out;
    }
    json_error_t jerr;
    json_t *pj =
        json_loadb(a.payload, a.payload_len, JSON_DECODE_ANY | JSON_REJECT_DUPLICATES, &jerr);
    if (pj == NULL) {
        jf_pub_usage_error("publish", "payload: not valid JSON: %s (line %d, column %d)", jerr.text,
                           jerr.line, jerr.column);
        goto out;
    }
    json_decref(pj);

    int64_t now = jf_now_ms();
    jf_rfc3339_format(a.created_at, sizeof a.created_at, now);
    if (a.deadline != NULL) {
        int64_t when = 0, d = 0;
        if (jf_rfc3339_parse(&when, a.deadline, strlen(a.deadline)) != JF_OK) {
            if (jf_duration_parse(&d, a.deadline, &err) != JF_OK) {
                jf_pub_usage_error("publish",
                                   "--deadline: '%s' is neither an RFC 3339 date-time nor a "
                                   "duration (%s)",
                                   a.deadline, err.msg);
                goto out;
            }
            when = now + d;
            deadline_buf = malloc(32);
            if (deadline_buf == NULL)
                goto out;
            jf_rfc3339_format(deadline_buf, 32, when);
            a.deadline = deadline_buf;
        }
        if (when <= now)
            jf_log(JF_LOG_WARN,
                   "deadline has already passed: the job will be dead-lettered as expired",
                   JF_S("deadline", a.deadline));
    }
    if (a.id == NULL) {
        uuid_t u;
        uuid_generate_random(u);
        uuid_unparse_lower(u, idbuf);
        a.id = idbuf;
    }

    char subject[3 * JF_TOKEN_MAX + 32];
    if (jf_subject_format(subject, sizeof subject, "jobs", a.service, a.priority, a.type) !=
        JF_OK) {
        jf_pub_usage_error("publish", "cannot form the subject from --service and --type");
        goto out;
    }
    size_t len = 0;
    if ((body = build(&a, &len)) == NULL) {
        jf_pub_usage_error("publish", "out of memory");
        goto out;
    }
    /* The same check every consumer will make, before anything is sent. */
    if (jf_envelope_parse(&env, body, len, subject, 0, &err) != JF_OK) {
        jf_pub_usage_error("publish", "invalid envelope: %s", err.msg);
        goto out;
    }

    if ((rc = jf_pub_session_load(&sess, g)) != JF_EXIT_OK)
        goto out;
    if ((rc = jf_pub_session_connect(&sess, g, NULL)) != JF_EXIT_OK)
        goto out;
    if (sess.max_payload > 0 && len > sess.max_payload) {
        rc = jf_pub_usage_error("publish",
                                "the job is %zu bytes, more than the server's max_payload (%zu)",
                                len, sess.max_payload);
        goto out;
    }
    rc = send(&sess, subject, a.id, body, len);

out:
    jf_pub_session_close(&sess);
    jf_envelope_destroy(env);
    free(body);
    free(deadline_buf);
    free(stdin_buf);
    return rc;
}
