/* batch.c — `jetfleet-publisher batch FILE|-`: NDJSON envelopes, one per
 * line, published verbatim with asynchronous publishes.
 *
 * Memory is bounded twice: a line is never longer than the server's
 * max_payload (the reader's buffer), and at most [publisher] max_pending
 * publishes await their PubAck (nats.c stalls js_PublishMsgAsync beyond
 * that). Every PubAck is checked in the ack handler; [publisher] timeout
 * bounds each one (nats.c 3.4.1 waits forever without MaxWait). */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "duration.h"
#include "envelope.h"
#include "ops.h"
#include "publisher.h"

#define FAILURES_LOGGED 10 /* individual "publish failed" lines before going quiet */

static void usage(FILE *out)
{
    fprintf(out,
            "Usage: %s [GLOBAL OPTIONS] batch [--wait [--timeout D]] FILE|-\n"
            "\n"
            "Publishes NDJSON job envelopes, one per line, each on\n"
            "jobs.<service>.<priority>.<type> of its envelope (priority default normal),\n"
            "with its id as Nats-Msg-Id. Lines are sent unchanged; blank lines are skipped;\n"
            "an invalid line is reported on stderr as 'line N: invalid envelope: REASON'\n"
            "and skipped. '-' reads stdin.\n"
            "\n"
            "At the end one JSON line on stdout:\n"
            "  {\"published\":N,\"duplicates\":N,\"invalid\":N,\"failed\":N,\"seconds\":S}\n"
            "'duplicates' were already in the stream (same id within the duplicate window);\n"
            "'failed' got no positive PubAck within [publisher] timeout: publishing the\n"
            "same file again is safe and stores only what is missing.\n"
            "Exit status 1 when any line was invalid or failed.\n"
            "\n"
            "With --wait it then waits until every job of the batch is finished, with a\n"
            "progress bar on a terminal, and prints a second JSON line:\n"
            "  {\"succeeded\":N,\"dead\":N,\"unfinished\":N,\"seconds\":S,\"rate\":R}\n"
            "(seconds since the batch began; rate = finished jobs a second). Finished means:\n"
            "with [postgres] dsn, the job's ledger row is succeeded or dead; without a\n"
            "ledger, the durable of its service and priority acknowledged it (its ack floor\n"
            "reached the job's sequence; a job is acknowledged only after its outcome,\n"
            "dead letter included, is stored), and it is dead when JOBS_DLQ holds a dead\n"
            "letter of its sequence. Exit status 1 on --timeout or interruption.\n"
            "\n"
            "Options:\n"
            "      --wait        wait for the jobs to finish (see above)\n"
            "      --timeout D   stop waiting after D (e.g. 10m; default: no limit)\n"
            "  -h, --help        show this help and exit\n",
            JF_PUBLISHER_PROG);
}

/* ------------------------------------------------------------------------- */
/* Line reader with a hard maximum line length.                              */

typedef enum read_result {
    LINE_OK,
    LINE_TOO_LONG, /* reported once; the rest up to the next newline is skipped */
    LINE_EOF,
    LINE_ERROR,
} read_result;

typedef struct line_reader {
    int fd;
    char *buf;
    size_t cap;        /* max line + '\r' + '\n' */
    size_t max;        /* longest line accepted, without its line ending */
    size_t start, end; /* unread bytes are buf[start..end) */
    bool eof;
    bool skipping; /* inside a line already reported as too long */
    unsigned long long lineno;
    int err; /* errno of a failed read */
} line_reader;

static int reader_init(line_reader *r, int fd, size_t max)
{
    memset(r, 0, sizeof *r);
    r->fd = fd;
    r->max = max;
    r->cap = max + 2;
    r->buf = malloc(r->cap);
    return r->buf ? 0 : -1;
}

static void reader_free(line_reader *r)
{
    free(r->buf);
    r->buf = NULL;
}

/* Next line into *line and *len (pointing into the reader's buffer, valid until
 * the next call), without "\n" or "\r\n". */
static read_result reader_next(line_reader *r, const char **line, size_t *len)
{
    for (;;) {
        char *nl = memchr(r->buf + r->start, '\n', r->end - r->start);
        if (nl != NULL) {
            size_t n = (size_t)(nl - (r->buf + r->start));
            const char *p = r->buf + r->start;
            r->start += n + 1;
            if (r->skipping) {
                r->skipping = false;
                continue;
            }
            r->lineno++;
            if (n > 0 && p[n - 1] == '\r')
                n--;
            if (n > r->max)
                return LINE_TOO_LONG;
            *line = p;
            *len = n;
            return LINE_OK;
        }
        if (r->eof) {
            /* A last line without a newline still counts. */
            if (r->start == r->end || r->skipping) {
                r->start = r->end;
                return LINE_EOF;
            }
            const char *p = r->buf + r->start;
            size_t n = r->end - r->start;
            r->start = r->end;
            r->lineno++;
            if (n > 0 && p[n - 1] == '\r')
                n--;
            if (n > r->max)
                return LINE_TOO_LONG;
            *line = p;
            *len = n;
            return LINE_OK;
        }
        if (r->skipping) {
            r->start = r->end = 0;
        } else if (r->start > 0) {
            memmove(r->buf, r->buf + r->start, r->end - r->start);
            r->end -= r->start;
            r->start = 0;
        }
        if (r->end == r->cap) {
            /* A full buffer and no newline: longer than any line we accept. */
            r->lineno++;
            r->skipping = true;
            r->start = r->end = 0;
            return LINE_TOO_LONG;
        }
        ssize_t got = read(r->fd, r->buf + r->end, r->cap - r->end);
        if (got < 0) {
            if (errno == EINTR) {
                if (jf_pub_interrupted())
                    return LINE_EOF;
                continue;
            }
            r->err = errno;
            return LINE_ERROR;
        }
        if (got == 0)
            r->eof = true;
        r->end += (size_t)got;
    }
}

static bool blank(const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] != ' ' && p[i] != '\t' && p[i] != '\r')
            return false;
    return true;
}

/* ------------------------------------------------------------------------- */
/* PubAck accounting, shared with nats.c's reply thread.                     */

typedef struct batch_stats {
    pthread_mutex_t mu;
    const char *stream; /* the stream every job must land in */
    unsigned long long published, duplicates, failed, logged_failures;
    jf_wait_set *wait; /* --wait: every stored job, for the wait after publishing */
} batch_stats;

static void log_failure(batch_stats *b, natsMsg *msg, const char *why)
{
    /* Called with b->mu held; logging is one write(2), so this is short. */
    if (b->logged_failures < FAILURES_LOGGED) {
        const char *id = NULL;
        if (natsMsgHeader_Get(msg, "Nats-Msg-Id", &id) != NATS_OK)
            id = NULL;
        jf_log(JF_LOG_WARN, "publish failed", JF_S("job_id", id),
               JF_S("subject", natsMsg_GetSubject(msg)), JF_S("error", why));
    } else if (b->logged_failures == FAILURES_LOGGED) {
        jf_log(JF_LOG_WARN, "more publishes failed; only the count is reported from now on",
               JF_I("logged", FAILURES_LOGGED));
    }
    b->logged_failures++;
}

static void on_ack(jsCtx *js, natsMsg *msg, jsPubAck *pa, jsPubAckErr *pae, void *closure)
{
    batch_stats *b = closure;

    pthread_mutex_lock(&b->mu);
    if (pa != NULL && pa->Stream != NULL && strcmp(pa->Stream, b->stream) == 0) {
        if (pa->Duplicate)
            b->duplicates++;
        else
            b->published++;
        const char *id = NULL;
        if (b->wait != NULL && natsMsgHeader_Get(msg, "Nats-Msg-Id", &id) == NATS_OK)
            jf_wait_set_add(b->wait, id, natsMsg_GetSubject(msg), pa->Sequence);
    } else {
        b->failed++;
        if (pa != NULL) {
            log_failure(b, msg, "stored by another stream than [stream] name");
        } else if (pae != NULL && pae->Err == NATS_TIMEOUT) {
            log_failure(b, msg, "no acknowledgement within [publisher] timeout");
        } else {
            const char *why = pae && pae->ErrText && *pae->ErrText ? pae->ErrText
                              : pae                                ? natsStatus_GetText(pae->Err)
                                                                   : "no acknowledgement";
            log_failure(b, msg, why);
        }
    }
    pthread_mutex_unlock(&b->mu);
    /* With an AckHandler the message is ours to destroy (nats.c 3.4.1). */
    natsMsg_Destroy(msg);
}

static void snapshot(batch_stats *b, unsigned long long out[3])
{
    pthread_mutex_lock(&b->mu);
    out[0] = b->published;
    out[1] = b->duplicates;
    out[2] = b->failed;
    pthread_mutex_unlock(&b->mu);
}

/* ------------------------------------------------------------------------- */

typedef struct progress {
    bool tty;
    bool shown;
    int64_t start_ms, last_ms;
} progress;

static void progress_update(progress *pg, batch_stats *b, unsigned long long lines,
                            unsigned long long invalid)
{
    if (!pg->tty)
        return;
    int64_t now = jf_pub_mono_ms();
    /* Only batches taking more than a second, at most five refreshes a second. */
    if (now - pg->start_ms < 1000 || now - pg->last_ms < 200)
        return;
    pg->last_ms = now;
    pg->shown = true;
    unsigned long long c[3];
    snapshot(b, c);
    double secs = (double)(now - pg->start_ms) / 1000.0;
    fprintf(
        stderr,
        "\r\033[K%llu lines: %llu published, %llu duplicates, %llu invalid, %llu failed (%.0f/s)",
        lines, c[0], c[1], invalid, c[2], secs > 0 ? (double)(c[0] + c[1]) / secs : 0.0);
}

static void progress_clear(progress *pg)
{
    if (pg->shown)
        fputs("\r\033[K", stderr);
}

/* Publishes one valid line; returns false when the line counts as failed. */
static bool publish_line(jsCtx *js, jsPubOptions *po, const char *subject, const char *id,
                         const char *line, size_t len, unsigned long long lineno)
{
    natsMsg *msg = NULL;
    natsStatus s = natsMsg_Create(&msg, subject, NULL, line, (int)len);
    if (s == NATS_OK)
        s = natsMsgHeader_Set(msg, "Nats-Msg-Id", id);
    /* A stall (max_pending PubAcks outstanding for longer than StallWait)
     * clears as soon as the oldest publish is acknowledged or times out;
     * after a stall the message is still ours, so it can be tried again. */
    if (s == NATS_OK) {
        for (int tries = 0; tries < 3; tries++) {
            s = js_PublishMsgAsync(js, &msg, po);
            if (s != NATS_TIMEOUT)
                break;
        }
    }
    natsMsg_Destroy(msg); /* NULL when nats.c took it */
    if (s != NATS_OK) {
        jf_log(JF_LOG_WARN, "publish failed", JF_S("job_id", id), JF_S("subject", subject),
               JF_I("line", lineno), JF_S("error", jf_pub_nats_error(s)));
        return false;
    }
    return true;
}

int jf_cmd_batch(int argc, char **argv, const jf_pub_globals *g)
{
    enum { O_WAIT = 256, O_TIMEOUT };
    static const struct option longopts[] = {
        {"wait", no_argument, NULL, O_WAIT},
        {"timeout", required_argument, NULL, O_TIMEOUT},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    bool wait = false;
    int64_t wait_timeout_ms = 0;
    jf_error werr = {{0}};
    jf_pub_session sess = {0};
    batch_stats b = {.mu = PTHREAD_MUTEX_INITIALIZER};
    line_reader r = {0};
    progress pg = {0};
    int fd = -1, c, rc;
    unsigned long long invalid = 0, send_failed = 0;
    bool aborted = false; /* input or connection lost before the end */

    opterr = 0;
    while ((c = getopt_long(argc, argv, ":h", longopts, NULL)) != -1) {
        switch (c) {
        case O_WAIT:
            wait = true;
            break;
        case O_TIMEOUT:
            if (jf_duration_parse(&wait_timeout_ms, optarg, &werr) != JF_OK)
                return jf_pub_usage_error("batch", "--timeout: %s", werr.msg);
            break;
        case 'h':
            usage(stdout);
            return JF_EXIT_OK;
        case ':':
            return jf_pub_usage_error("batch", "option %s needs a value", argv[optind - 1]);
        default:
            return jf_pub_usage_error("batch", "unknown option %s", jf_pub_bad_option(argc, argv));
        }
    }
    if (wait_timeout_ms > 0 && !wait)
        return jf_pub_usage_error("batch", "--timeout applies to --wait only");
    if (optind >= argc)
        return jf_pub_usage_error("batch", "missing FILE (or - for stdin)");
    if (argc - optind > 1)
        return jf_pub_usage_error("batch", "one FILE at most, got %d", argc - optind);
    const char *path = argv[optind];
    if (strcmp(path, "-") == 0) {
        fd = STDIN_FILENO;
    } else if ((fd = open(path, O_RDONLY | O_CLOEXEC)) < 0) {
        return jf_pub_usage_error("batch", "cannot open %s: %s", path, strerror(errno));
    } else {
        /* open(2) takes a directory; refuse it here, as the usage error it
         * is, rather than as a read failure after connecting. */
        struct stat st;
        if (fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) {
            close(fd);
            return jf_pub_usage_error("batch", "cannot read %s: %s", path, strerror(EISDIR));
        }
    }

    if ((rc = jf_pub_session_load(&sess, g)) != JF_EXIT_OK)
        goto out;
    if (wait && jf_wait_set_create(&b.wait, &werr) != JF_OK) {
        jf_log(JF_LOG_ERROR, "out of memory", JF_S("error", werr.msg));
        rc = JF_EXIT_FAIL;
        goto out;
    }
    const jf_config *cfg = sess.cfg;
    int64_t timeout = cfg->publisher.timeout_ms > 0 ? cfg->publisher.timeout_ms : 5000;
    b.stream = cfg->stream.name;

    jsOptions jo;
    jsOptions_Init(&jo);
    jo.PublishAsync.MaxPending = cfg->publisher.max_pending > 0 ? cfg->publisher.max_pending : 1024;
    jo.PublishAsync.AckHandler = on_ack;
    jo.PublishAsync.AckHandlerClosure = &b;
    /* Past the per-message timeout every pending publish has been settled,
     * so a stall longer than that means the connection itself is stuck. */
    jo.PublishAsync.StallWait = timeout + 1000;
    if ((rc = jf_pub_session_connect(&sess, g, &jo)) != JF_EXIT_OK)
        goto out;

    size_t max = sess.max_payload > 0 ? sess.max_payload : 1024 * 1024;
    if (reader_init(&r, fd, max) != 0) {
        jf_log(JF_LOG_ERROR, "out of memory", JF_I("bytes", max + 2));
        rc = JF_EXIT_FAIL;
        goto out;
    }

    jsPubOptions po;
    jsPubOptions_Init(&po);
    po.MaxWait = timeout;

    jf_pub_catch_signals();
    pg.tty = isatty(STDERR_FILENO) == 1;
    pg.start_ms = pg.last_ms = jf_pub_mono_ms();

    for (;;) {
        const char *line = NULL;
        size_t len = 0;
        read_result rr = reader_next(&r, &line, &len);
        if (rr == LINE_EOF)
            break;
        if (rr == LINE_ERROR) {
            jf_log(JF_LOG_ERROR, "cannot read the input", JF_S("file", path),
                   JF_S("error", strerror(r.err)));
            aborted = true;
            break;
        }
        if (rr == LINE_TOO_LONG) {
            invalid++;
            progress_clear(&pg);
            fprintf(stderr, "line %llu: longer than max_payload (%zu bytes)\n", r.lineno, max);
            continue;
        }
        if (blank(line, len))
            continue;

        jf_envelope *env = NULL;
        jf_error err = {{0}};
        if (jf_envelope_scan(&env, line, len, NULL, max, &err) != JF_OK) {
            invalid++;
            progress_clear(&pg);
            fprintf(stderr, "line %llu: invalid envelope: %s\n", r.lineno, err.msg);
            continue;
        }
        char subject[3 * JF_TOKEN_MAX + 32];
        if (jf_subject_format(subject, sizeof subject, "jobs", env->service, env->priority,
                              env->type) != JF_OK) {
            invalid++;
            progress_clear(&pg);
            fprintf(stderr, "line %llu: invalid envelope: subject too long\n", r.lineno);
        } else if (!publish_line(sess.js, &po, subject, env->id, line, len, r.lineno)) {
            send_failed++;
        }
        jf_envelope_destroy(env);

        progress_update(&pg, &b, r.lineno, invalid);
        if (jf_pub_interrupted())
            break;
        if (natsConnection_IsClosed(sess.nc)) {
            jf_log(JF_LOG_ERROR, "connection closed; stopping", JF_I("line", r.lineno));
            aborted = true;
            break;
        }
    }
    if (jf_pub_interrupted())
        jf_log(JF_LOG_WARN, "interrupted; waiting for the acknowledgements of what was sent",
               JF_I("line", r.lineno));

    /* Each pending publish ends by its own MaxWait; the margin covers the
     * reply thread's latency. What is still pending then counts as failed. */
    jsPubOptions done;
    jsPubOptions_Init(&done);
    done.MaxWait = timeout + 2000;
    unsigned long long stuck = 0;
    if (js_PublishAsyncComplete(sess.js, &done) == NATS_TIMEOUT) {
        natsMsgList pending = {0};
        if (js_PublishAsyncGetPendingList(&pending, sess.js) == NATS_OK) {
            stuck = (unsigned long long)pending.Count;
            natsMsgList_Destroy(&pending);
        }
        jf_log(JF_LOG_ERROR, "publishes still unacknowledged at the end", JF_I("count", stuck));
    }
    progress_clear(&pg);

    unsigned long long cnt[3];
    snapshot(&b, cnt);
    unsigned long long failed = cnt[2] + send_failed + stuck;
    double secs = (double)(jf_pub_mono_ms() - pg.start_ms) / 1000.0;
    printf("{\"published\":%llu,\"duplicates\":%llu,\"invalid\":%llu,\"failed\":%llu,"
           "\"seconds\":%.3f}\n",
           cnt[0], cnt[1], invalid, failed, secs);
    rc = (invalid > 0 || failed > 0 || aborted || jf_pub_interrupted()) ? JF_EXIT_FAIL : JF_EXIT_OK;
    if (wait && stuck > 0) {
        jf_log(JF_LOG_ERROR, "not waiting: some publishes are still unacknowledged",
               JF_I("count", stuck));
    } else if (wait && !aborted && !jf_pub_interrupted()) {
        /* Every PubAck is in (or counted failed): the set no longer changes. */
        fflush(stdout);
        int wrc = jf_batch_wait(&sess, b.wait, wait_timeout_ms, pg.start_ms);
        if (rc == JF_EXIT_OK)
            rc = wrc;
    }

out:
    /* Closing the connection ends nats.c's reply thread before b goes away. */
    jf_pub_session_close(&sess);
    jf_wait_set_destroy(b.wait);
    reader_free(&r);
    if (fd > STDIN_FILENO)
        close(fd);
    return rc;
}
