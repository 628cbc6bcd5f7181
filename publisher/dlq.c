/* dlq.c — `jetfleet-publisher dlq list|show|redrive|purge`: the dead letters
 * of JOBS_DLQ (DESIGN.md "Dead-letter message").
 *
 * Entries are read through a short-lived ephemeral consumer (ops.h
 * jf_window) up to the stream's last sequence when the command starts, so
 * dead letters that arrive meanwhile (a re-driven job failing again) wait
 * for the next run.
 *
 * Re-drive sends an entry's body, unchanged, back to its original subject
 * (Jetfleet-Subject) with Nats-Msg-Id redrive-<dlq seq>, so a re-drive that
 * is repeated (a crash between publish and delete) is stored once, and
 * Jetfleet-Redrive-Of: <dlq seq>, which makes the consumer's ledger reset
 * the job's dead row. The entry is deleted only once the PubAck of its
 * republish has arrived: until then it stays listed. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "envelope.h"
#include "ops.h"
#include "rfc3339.h"

#define TAKE_BATCH 256

static const char *const REASONS[] = {"invalid", "permanent", "max_deliveries", "expired"};

static void usage(FILE *out)
{
    fprintf(out,
            "Usage: %s [GLOBAL OPTIONS] dlq COMMAND [OPTIONS]\n"
            "\n"
            "The dead letters of the dead-letter stream (JOBS_DLQ): each holds a job's\n"
            "original body and the headers Jetfleet-Reason, -Error, -Deliveries, -Stream,\n"
            "-Stream-Seq, -Subject and -Failed-At.\n"
            "\n"
            "Commands:\n"
            "  list       one JSON line per dead letter\n"
            "  show SEQ   one dead letter: headers and body\n"
            "  redrive    send dead letters back to their original subjects\n"
            "  purge      delete dead letters\n"
            "\n"
            "Filters (list, redrive, purge):\n"
            "  --reason R    invalid, permanent, max_deliveries or expired\n"
            "  --subject F   a subject filter on the dead letters' subjects\n"
            "                dlq.<service>.<priority>.<type>, e.g. dlq.llm.> or dlq.*.high.>\n"
            "\n"
            "Run '%s dlq COMMAND --help' for the options of a command.\n",
            JF_PUBLISHER_PROG, JF_PUBLISHER_PROG);
}

static void usage_list(FILE *out)
{
    fprintf(
        out,
        "Usage: %s [GLOBAL OPTIONS] dlq list [--reason R] [--subject F] [--limit N]\n"
        "\n"
        "One JSON line per dead letter, oldest first:\n"
        "  {\"seq\":N,\"subject\":S,\"reason\":R,\"error\":E,\"deliveries\":N,\"failed_at\":T,\n"
        "   \"stream_seq\":N,\"original_subject\":S,\"job_id\":ID}\n"
        "seq is the dead letter's sequence in JOBS_DLQ, stream_seq the job's in JOBS;\n"
        "job_id is null when the body is not a JSON object with a string id.\n"
        "\n"
        "Options:\n"
        "      --reason R    only dead letters with this reason\n"
        "      --subject F   only subjects matching this filter (default dlq.>)\n"
        "      --limit N     at most N lines\n"
        "  -h, --help        show this help and exit\n",
        JF_PUBLISHER_PROG);
}

static void usage_show(FILE *out)
{
    fprintf(out,
            "Usage: %s [GLOBAL OPTIONS] dlq show SEQ\n"
            "\n"
            "Prints the dead letter with sequence SEQ of JOBS_DLQ as one JSON object:\n"
            "  {\"seq\":N,\"subject\":S,\"time\":T,\"headers\":{NAME:VALUE,...},\"body\":TEXT}\n"
            "(a header given more than once has an array of values; a body that is not\n"
            "UTF-8 is given as \"body_base64\"). Indented on a terminal.\n"
            "Exit status 1 when there is no such dead letter.\n"
            "\n"
            "Options:\n"
            "  -h, --help    show this help and exit\n",
            JF_PUBLISHER_PROG);
}

static void usage_redrive(FILE *out)
{
    fprintf(out,
            "Usage: %s [GLOBAL OPTIONS] dlq redrive [--reason R] [--subject F] [--rate R]\n"
            "                                        [--dry-run]\n"
            "\n"
            "Sends each matching dead letter back to its original subject (header\n"
            "Jetfleet-Subject) with its body unchanged, Nats-Msg-Id redrive-<dlq seq> (a\n"
            "repeated re-drive is stored once) and Jetfleet-Redrive-Of: <dlq seq>. With a\n"
            "ledger the job's row is reset (attempts 1, replays + 1). A dead letter is\n"
            "deleted from JOBS_DLQ only after the server acknowledged its republish.\n"
            "\n"
            "One JSON line on stdout at the end:\n"
            "  {\"redriven\":N,\"duplicates\":N,\"skipped\":N,\"failed\":N,\"seconds\":S}\n"
            "'duplicates' had been re-driven already (and are deleted now); 'skipped' have\n"
            "no usable Jetfleet-Subject and stay; 'failed' stay for another run.\n"
            "Exit status 1 when any failed.\n"
            "\n"
            "Options:\n"
            "      --reason R    only dead letters with this reason\n"
            "      --subject F   only subjects matching this filter (default dlq.>)\n"
            "      --rate R      at most R re-drives a second (N, N/s, N/m, N/h)\n"
            "      --dry-run     change nothing; list what would be re-driven, one JSON\n"
            "                    line each: {\"seq\":N,\"subject\":S,\"reason\":R,\"job_id\":ID}\n"
            "  -h, --help        show this help and exit\n",
            JF_PUBLISHER_PROG);
}

static void usage_purge(FILE *out)
{
    fprintf(out,
            "Usage: %s [GLOBAL OPTIONS] dlq purge [--reason R] [--subject F] [--yes]\n"
            "\n"
            "Deletes the matching dead letters (those stored when the command starts).\n"
            "Without a filter it deletes them all, and asks for --yes.\n"
            "One JSON line on stdout: {\"purged\":N,\"seconds\":S}.\n"
            "\n"
            "Options:\n"
            "      --reason R    only dead letters with this reason\n"
            "      --subject F   only subjects matching this filter (default dlq.>)\n"
            "  -y, --yes         confirm a purge without filters\n"
            "  -h, --help        show this help and exit\n",
            JF_PUBLISHER_PROG);
}

/* ------------------------------------------------------------------------- */

typedef struct dlq_args {
    const char *cmd; /* "dlq list" … for messages */
    const char *reason;
    const char *subject;
    unsigned long long limit; /* 0: none */
    double rate;
    bool dry_run;
    bool yes;
} dlq_args;

enum { O_REASON = 256, O_SUBJECT, O_LIMIT, O_RATE, O_DRY };

/* Options of list/redrive/purge; which ones a command takes is in allowed.
 * Returns -1 after --help, else the exit code. */
static int parse_filters(dlq_args *a, int argc, char **argv, const char *allowed,
                         void (*help)(FILE *))
{
    static const struct option longopts[] = {
        {"reason", required_argument, NULL, O_REASON},
        {"subject", required_argument, NULL, O_SUBJECT},
        {"limit", required_argument, NULL, O_LIMIT},
        {"rate", required_argument, NULL, O_RATE},
        {"dry-run", no_argument, NULL, O_DRY},
        {"yes", no_argument, NULL, 'y'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    jf_error err = {{0}};
    int c, idx = 0;

    a->subject = "dlq.>";
    opterr = 0;
    optind = 0;
    while ((c = getopt_long(argc, argv, ":hy", longopts, &idx)) != -1) {
        if (c == 'h') {
            help(stdout);
            return -1;
        }
        if (c == ':')
            return jf_pub_usage_error(a->cmd, "option %s needs a value", argv[optind - 1]);
        if (c == '?')
            return jf_pub_usage_error(a->cmd, "unknown option %s", jf_pub_bad_option(argc, argv));
        const char *name = c == 'y' ? "yes" : NULL;
        for (size_t i = 0; name == NULL && longopts[i].name != NULL; i++)
            if (longopts[i].val == c)
                name = longopts[i].name;
        char key[32];
        snprintf(key, sizeof key, ",%s,", name ? name : "");
        if (strstr(allowed, key) == NULL)
            return jf_pub_usage_error(a->cmd, "option --%s does not apply here", name);
        switch (c) {
        case O_REASON: {
            bool known = false;
            for (size_t i = 0; i < sizeof REASONS / sizeof REASONS[0]; i++)
                known = known || strcmp(optarg, REASONS[i]) == 0;
            if (!known)
                return jf_pub_usage_error(
                    a->cmd, "--reason: '%s' is not invalid, permanent, max_deliveries or expired",
                    optarg);
            a->reason = optarg;
            break;
        }
        case O_SUBJECT:
            if (!jf_filter_valid(optarg, "dlq"))
                return jf_pub_usage_error(a->cmd,
                                          "--subject: '%s' is not a subject filter within dlq.> "
                                          "(e.g. dlq.llm.>)",
                                          optarg);
            a->subject = optarg;
            break;
        case O_LIMIT: {
            uint64_t n = 0;
            if (!jf_parse_u64(optarg, &n) || n == 0)
                return jf_pub_usage_error(a->cmd, "--limit: '%s' is not a count (1 or more)",
                                          optarg);
            a->limit = n;
            break;
        }
        case O_RATE:
            if (jf_pacer_parse(&a->rate, optarg, &err) != JF_OK)
                return jf_pub_usage_error(a->cmd, "--rate: %s", err.msg);
            break;
        case O_DRY:
            a->dry_run = true;
            break;
        case 'y':
            a->yes = true;
            break;
        default:
            break;
        }
    }
    if (optind < argc)
        return jf_pub_usage_error(a->cmd, "unexpected argument '%s'", argv[optind]);
    return JF_EXIT_OK;
}

/* ------------------------------------------------------------------------- */
/* One dead letter as read                                                   */

typedef struct entry {
    natsMsg *m;
    uint64_t seq;
    const char *reason, *error, *deliveries, *failed_at, *stream_seq, *original_subject;
    char job_id[JF_ID_MAX + 1];
    bool has_job_id;
} entry;

static const char *header(natsMsg *m, const char *key)
{
    const char *v = NULL;
    return natsMsgHeader_Get(m, key, &v) == NATS_OK ? v : NULL;
}

static void entry_read(entry *e, natsMsg *m, uint64_t seq)
{
    memset(e, 0, sizeof *e);
    e->m = m;
    e->seq = seq;
    e->reason = header(m, "Jetfleet-Reason");
    e->error = header(m, "Jetfleet-Error");
    e->deliveries = header(m, "Jetfleet-Deliveries");
    e->failed_at = header(m, "Jetfleet-Failed-At");
    e->stream_seq = header(m, "Jetfleet-Stream-Seq");
    e->original_subject = header(m, "Jetfleet-Subject");
    /* A dead letter's body may be anything ("invalid"): only a JSON object
     * with a string id of at most JF_ID_MAX bytes names a job. */
    json_error_t jerr;
    json_t *root = json_loadb(natsMsg_GetData(m), (size_t)natsMsg_GetDataLength(m),
                              JSON_REJECT_DUPLICATES, &jerr);
    json_t *id = json_is_object(root) ? json_object_get(root, "id") : NULL;
    if (json_is_string(id) && json_string_length(id) <= JF_ID_MAX) {
        snprintf(e->job_id, sizeof e->job_id, "%s", json_string_value(id));
        e->has_job_id = true;
    }
    json_decref(root);
}

static json_t *str_or_null(const char *s)
{
    json_t *v = s != NULL ? json_string(s) : NULL;
    return v != NULL ? v : json_null();
}

static json_t *num_or_null(const char *s)
{
    uint64_t v = 0;
    return s != NULL && jf_parse_u64(s, &v) ? json_integer((json_int_t)v) : json_null();
}

static bool matches(const dlq_args *a, const entry *e)
{
    return a->reason == NULL || (e->reason != NULL && strcmp(a->reason, e->reason) == 0);
}

/* A subject a job can be published on: jobs.<token>.<token>.<token…>, no
 * wildcards. */
static bool job_subject_ok(const char *s)
{
    if (s == NULL || !jf_filter_valid(s, "jobs") || strchr(s, '*') != NULL ||
        strchr(s, '>') != NULL)
        return false;
    int dots = 0;
    for (const char *p = s; *p; p++)
        dots += *p == '.';
    return dots >= 3;
}

/* ------------------------------------------------------------------------- */

typedef struct dlq_ctx {
    jf_pub_session sess;
    jf_window *w;
    uint64_t end_seq; /* JOBS_DLQ's last sequence at start */
} dlq_ctx;

/* Connects and opens the window over the dead letters matching subject. */
static int open_entries(dlq_ctx *x, const jf_pub_globals *g, jsOptions *jo, const dlq_args *a,
                        int batch)
{
    int rc = jf_pub_session_connect(&x->sess, g, jo);
    if (rc != JF_EXIT_OK)
        return rc;
    jf_error err = {{0}};
    jsStreamInfo *si = NULL;
    jsErrCode code = 0;
    const char *dlq = x->sess.cfg->stream.dlq;
    natsStatus s = js_GetStreamInfo(&si, x->sess.js, dlq, NULL, &code);
    if (s != NATS_OK) {
        jf_log(JF_LOG_ERROR, "cannot read the dead-letter stream", JF_S("stream", dlq),
               JF_S("error", jf_pub_nats_error(s)));
        return JF_EXIT_FAIL;
    }
    x->end_seq = si->State.LastSeq;
    bool empty = si->State.Msgs == 0;
    jsStreamInfo_Destroy(si);
    if (empty)
        return JF_EXIT_OK;
    jf_window_opts wo = {
        .stream = dlq,
        .filter = a->subject,
        .end_seq = x->end_seq,
        .batch = batch,
        .wait_ms = x->sess.cfg->nats.request_timeout_ms,
    };
    if (jf_window_open(&x->w, x->sess.nc, x->sess.js, &wo, &err) != JF_OK) {
        jf_log(JF_LOG_ERROR, "cannot read the dead letters", JF_S("error", err.msg));
        return JF_EXIT_FAIL;
    }
    return JF_EXIT_OK;
}

/* The next entry into *m and *seq: 1, 0 at the end, -1 on a failure (logged). */
static int next_entry(dlq_ctx *x, natsMsg **m, uint64_t *seq)
{
    if (x->w == NULL || jf_pub_interrupted())
        return 0;
    jf_error err = {{0}};
    int64_t ts = 0;
    jf_status st = jf_window_next(x->w, m, seq, &ts, &err);
    if (st == JF_ERR_NOTFOUND)
        return 0;
    if (st != JF_OK) {
        jf_log(JF_LOG_ERROR, "reading the dead letters failed", JF_S("error", err.msg));
        return -1;
    }
    return 1;
}

static void close_ctx(dlq_ctx *x)
{
    jf_window_close(x->w);
    x->w = NULL;
    jf_pub_session_close(&x->sess);
}

/* ---- list ---------------------------------------------------------------- */

static int cmd_list(int argc, char **argv, const jf_pub_globals *g)
{
    dlq_args a = {.cmd = "dlq list"};
    dlq_ctx x;
    memset(&x, 0, sizeof x);
    int rc = parse_filters(&a, argc, argv, ",reason,subject,limit,", usage_list);
    if (rc != JF_EXIT_OK)
        return rc < 0 ? JF_EXIT_OK : rc;
    if ((rc = jf_pub_session_load(&x.sess, g)) != JF_EXIT_OK)
        return rc;
    jf_pub_catch_signals();
    if ((rc = open_entries(&x, g, NULL, &a, 256)) != JF_EXIT_OK)
        goto out;
    unsigned long long shown = 0;
    natsMsg *m = NULL;
    uint64_t seq = 0;
    int more;
    while ((a.limit == 0 || shown < a.limit) && (more = next_entry(&x, &m, &seq)) > 0) {
        entry e;
        entry_read(&e, m, seq);
        if (matches(&a, &e)) {
            json_t *o = json_object();
            json_object_set_new(o, "seq", json_integer((json_int_t)seq));
            json_object_set_new(o, "subject", str_or_null(natsMsg_GetSubject(m)));
            json_object_set_new(o, "reason", str_or_null(e.reason));
            json_object_set_new(o, "error", str_or_null(e.error));
            json_object_set_new(o, "deliveries", num_or_null(e.deliveries));
            json_object_set_new(o, "failed_at", str_or_null(e.failed_at));
            json_object_set_new(o, "stream_seq", num_or_null(e.stream_seq));
            json_object_set_new(o, "original_subject", str_or_null(e.original_subject));
            json_object_set_new(o, "job_id", e.has_job_id ? str_or_null(e.job_id) : json_null());
            jf_print_json(o);
            shown++;
        }
        natsMsg_Destroy(m);
    }
    rc = more < 0 || jf_pub_interrupted() ? JF_EXIT_FAIL : JF_EXIT_OK;
out:
    close_ctx(&x);
    return rc;
}

/* ---- show ---------------------------------------------------------------- */

static char *base64(const unsigned char *p, size_t n)
{
    static const char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    if (p == NULL)
        n = 0;
    char *out = malloc(4 * ((n + 2) / 3) + 1);
    if (out == NULL)
        return NULL;
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        unsigned v = (unsigned)p[i] << 16 | (i + 1 < n ? (unsigned)p[i + 1] << 8 : 0) |
                     (i + 2 < n ? p[i + 2] : 0);
        out[o++] = tab[v >> 18 & 63];
        out[o++] = tab[v >> 12 & 63];
        out[o++] = i + 1 < n ? tab[v >> 6 & 63] : '=';
        out[o++] = i + 2 < n ? tab[v & 63] : '=';
    }
    out[o] = '\0';
    return out;
}

static json_t *headers_json(natsMsg *m)
{
    json_t *h = json_object();
    const char **keys = NULL;
    int n = 0;
    if (natsMsgHeader_Keys(m, &keys, &n) != NATS_OK)
        return h;
    for (int i = 0; i < n; i++) {
        const char **vals = NULL;
        int nv = 0;
        if (natsMsgHeader_Values(m, keys[i], &vals, &nv) != NATS_OK)
            continue;
        if (nv == 1) {
            json_object_set_new(h, keys[i], str_or_null(vals[0]));
        } else {
            json_t *arr = json_array();
            for (int j = 0; j < nv; j++)
                json_array_append_new(arr, str_or_null(vals[j]));
            json_object_set_new(h, keys[i], arr);
        }
        free((void *)vals);
    }
    free((void *)keys);
    return h;
}

static int cmd_show(int argc, char **argv, const jf_pub_globals *g)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    int c;
    opterr = 0;
    optind = 0;
    while ((c = getopt_long(argc, argv, ":h", longopts, NULL)) != -1) {
        if (c == 'h') {
            usage_show(stdout);
            return JF_EXIT_OK;
        }
        return jf_pub_usage_error("dlq show", "unknown option %s", jf_pub_bad_option(argc, argv));
    }
    if (optind >= argc)
        return jf_pub_usage_error("dlq show", "missing SEQ");
    if (argc - optind > 1)
        return jf_pub_usage_error("dlq show", "one SEQ only");
    uint64_t seq = 0;
    if (!jf_parse_u64(argv[optind], &seq) || seq == 0)
        return jf_pub_usage_error("dlq show", "'%s' is not a sequence (1 or more)", argv[optind]);

    jf_pub_session sess = {0};
    int rc = jf_pub_session_load(&sess, g);
    if (rc != JF_EXIT_OK)
        return rc;
    if ((rc = jf_pub_session_connect(&sess, g, NULL)) != JF_EXIT_OK)
        goto out;
    natsMsg *m = NULL;
    jsErrCode code = 0;
    const char *dlq = sess.cfg->stream.dlq;
    natsStatus s = js_GetMsg(&m, sess.js, dlq, seq, NULL, &code);
    if (s != NATS_OK) {
        if (s == NATS_NOT_FOUND || code == JSNoMessageFoundErr) {
            fprintf(stderr, "%s dlq show: no dead letter with sequence %" PRIu64 " in %s\n",
                    JF_PUBLISHER_PROG, seq, dlq);
        } else {
            jf_log(JF_LOG_ERROR, "cannot read the dead letter", JF_S("stream", dlq),
                   JF_I("seq", seq), JF_S("error", jf_pub_nats_error(s)));
        }
        rc = JF_EXIT_FAIL;
        goto out;
    }
    char when[40];
    jf_rfc3339_format(when, sizeof when, natsMsg_GetTime(m) / 1000000);
    json_t *o = json_object();
    json_object_set_new(o, "seq", json_integer((json_int_t)seq));
    json_object_set_new(o, "subject", str_or_null(natsMsg_GetSubject(m)));
    json_object_set_new(o, "time", json_string(when));
    json_object_set_new(o, "headers", headers_json(m));
    const char *data = natsMsg_GetData(m);
    size_t len = (size_t)natsMsg_GetDataLength(m);
    json_t *body = json_stringn(data ? data : "", len);
    if (body != NULL) {
        json_object_set_new(o, "body", body);
    } else {
        char *b64 = base64((const unsigned char *)data, len);
        json_object_set_new(o, "body_base64", str_or_null(b64));
        free(b64);
    }
    natsMsg_Destroy(m);
    size_t flags = isatty(STDOUT_FILENO) == 1 ? JSON_INDENT(2) : JSON_COMPACT;
    char *text = json_dumps(o, flags);
    json_decref(o);
    if (text == NULL) {
        jf_log(JF_LOG_ERROR, "out of memory", JF_I("bytes", len));
        rc = JF_EXIT_FAIL;
        goto out;
    }
    puts(text);
    free(text);
    rc = JF_EXIT_OK;
out:
    jf_pub_session_close(&sess);
    return rc;
}

/* ---- redrive ------------------------------------------------------------- */

typedef struct redrive_run {
    dlq_ctx *x;
    jf_repub rp;
    unsigned long long skipped, failed, deleted, listed;
} redrive_run;

/* Deletes the entries whose republish the server acknowledged. */
static void settle(redrive_run *r)
{
    jf_repub_done done[TAKE_BATCH];
    size_t n;
    const char *dlq = r->x->sess.cfg->stream.dlq;
    while ((n = jf_repub_take(&r->rp, done, TAKE_BATCH)) > 0) {
        for (size_t i = 0; i < n; i++) {
            if (!done[i].ok)
                continue; /* counted by the PubAck handler; the entry stays */
            jsErrCode code = 0;
            natsStatus s = js_DeleteMsg(r->x->sess.js, dlq, done[i].tag, NULL, &code);
            if (s == NATS_OK || code == JSNoMessageFoundErr) {
                r->deleted++;
            } else {
                /* Re-driven but still listed: a later re-drive within the
                 * duplicate window is stored once. */
                r->failed++;
                jf_log(JF_LOG_WARN, "re-driven, but the dead letter could not be deleted",
                       JF_S("stream", dlq), JF_I("seq", done[i].tag),
                       JF_S("error", jf_pub_nats_error(s)));
            }
        }
    }
}

static void redrive_one(redrive_run *r, const dlq_args *a, entry *e)
{
    const char *subject = e->original_subject;
    if (!job_subject_ok(subject)) {
        r->skipped++;
        jf_log(JF_LOG_WARN, "skipped: no usable Jetfleet-Subject header", JF_I("seq", e->seq),
               JF_S("subject", natsMsg_GetSubject(e->m)), JF_S("original_subject", subject));
        return;
    }
    const char *omitted = NULL;
    if (natsMsgHeader_Get(e->m, "Jetfleet-Body-Omitted", &omitted) == NATS_OK) {
        /* Too big to carry: the job is still in its stream, at the seq the
         * headers name; re-driving the empty body would lose that pointer. */
        r->skipped++;
        jf_log(JF_LOG_WARN, "skipped: the dead letter does not hold the job's body; replay it",
               JF_I("seq", e->seq), JF_S("subject", subject), JF_S("body_bytes", omitted),
               JF_S("original_seq", e->stream_seq));
        return;
    }
    if (a->dry_run) {
        json_t *o = json_object();
        json_object_set_new(o, "seq", json_integer((json_int_t)e->seq));
        json_object_set_new(o, "subject", str_or_null(subject));
        json_object_set_new(o, "reason", str_or_null(e->reason));
        json_object_set_new(o, "job_id", e->has_job_id ? str_or_null(e->job_id) : json_null());
        jf_print_json(o);
        r->listed++;
        return;
    }
    char msgid[48], seqtxt[24];
    snprintf(msgid, sizeof msgid, "redrive-%" PRIu64, e->seq);
    snprintf(seqtxt, sizeof seqtxt, "%" PRIu64, e->seq);
    natsMsg *out = NULL;
    natsStatus s =
        natsMsg_Create(&out, subject, NULL, natsMsg_GetData(e->m), natsMsg_GetDataLength(e->m));
    if (s == NATS_OK)
        s = natsMsgHeader_Set(out, "Nats-Msg-Id", msgid);
    if (s == NATS_OK)
        s = natsMsgHeader_Set(out, "Jetfleet-Redrive-Of", seqtxt);
    jf_error err = {{0}};
    if (s != NATS_OK) {
        r->failed++;
        jf_log(JF_LOG_WARN, "cannot build the re-driven message", JF_I("seq", e->seq),
               JF_S("error", natsStatus_GetText(s)));
    } else if (jf_repub_send(&r->rp, r->x->sess.js, &out, &err) != JF_OK) {
        r->failed++;
        jf_log(JF_LOG_WARN, "publish failed", JF_I("seq", e->seq), JF_S("error", err.msg));
    }
    natsMsg_Destroy(out);
}

static int cmd_redrive(int argc, char **argv, const jf_pub_globals *g)
{
    dlq_args a = {.cmd = "dlq redrive"};
    dlq_ctx x;
    memset(&x, 0, sizeof x);
    redrive_run r = {.x = &x};
    jf_error err = {{0}};
    int rc = parse_filters(&a, argc, argv, ",reason,subject,rate,dry-run,", usage_redrive);
    if (rc != JF_EXIT_OK)
        return rc < 0 ? JF_EXIT_OK : rc;
    if ((rc = jf_pub_session_load(&x.sess, g)) != JF_EXIT_OK)
        return rc;
    jsOptions jo;
    jsOptions_Init(&jo);
    jf_repub_init(&r.rp, x.sess.cfg, &jo, "Jetfleet-Redrive-Of", &err);
    jf_pub_catch_signals();
    int batch = 256;
    if (a.rate > 0 && a.rate * 2 < batch)
        batch = a.rate * 2 < 1 ? 1 : (int)(a.rate * 2);
    if ((rc = open_entries(&x, g, &jo, &a, batch)) != JF_EXIT_OK)
        goto out;

    jf_progress pg;
    jf_pacer pacer;
    jf_progress_start(&pg);
    jf_pacer_start(&pacer, a.rate);
    natsMsg *m = NULL;
    uint64_t seq = 0;
    int more;
    unsigned long long read = 0;
    while ((more = next_entry(&x, &m, &seq)) > 0) {
        entry e;
        entry_read(&e, m, seq);
        read++;
        if (matches(&a, &e)) {
            if (!a.dry_run) {
                jf_pacer_wait(&pacer);
                settle(&r);
            }
            redrive_one(&r, &a, &e);
        }
        natsMsg_Destroy(m);
        if (jf_progress_due(&pg)) {
            unsigned long long c[3];
            jf_repub_counts(&r.rp, c);
            jf_progress_print(&pg,
                              "redrive: seq %" PRIu64 " of %" PRIu64 ", %llu read, %llu re-driven, "
                              "%llu deleted, %llu failed",
                              seq, x.end_seq, read, c[0] + c[1], r.deleted, c[2] + r.failed);
        }
    }
    unsigned long long stuck = a.dry_run ? 0 : jf_repub_finish(&r.rp, x.sess.js);
    settle(&r);
    jf_progress_clear(&pg);

    unsigned long long c[3];
    jf_repub_counts(&r.rp, c);
    unsigned long long failed = c[2] + r.failed + stuck;
    json_t *o = json_object();
    json_object_set_new(o, "redriven", json_integer((json_int_t)(a.dry_run ? r.listed : c[0])));
    json_object_set_new(o, "duplicates", json_integer((json_int_t)c[1]));
    json_object_set_new(o, "skipped", json_integer((json_int_t)r.skipped));
    json_object_set_new(o, "failed", json_integer((json_int_t)failed));
    json_object_set_new(o, "seconds",
                        jf_json_seconds((double)(jf_pub_mono_ms() - pg.start_ms) / 1000.0));
    if (a.dry_run)
        json_object_set_new(o, "dry_run", json_true());
    jf_print_json(o);
    rc = more < 0 || failed > 0 || jf_pub_interrupted() ? JF_EXIT_FAIL : JF_EXIT_OK;
out:
    /* The connection goes first: its reply thread uses r.rp. */
    close_ctx(&x);
    jf_repub_destroy(&r.rp);
    return rc;
}

/* ---- purge --------------------------------------------------------------- */

/* Without --reason the server purges by subject in one request, up to the
 * last sequence seen at start. */
static int purge_by_subject(dlq_ctx *x, const dlq_args *a, unsigned long long *purged)
{
    char subj[256], body[1200];
    const char *dlq = x->sess.cfg->stream.dlq;
    snprintf(subj, sizeof subj, "$JS.API.STREAM.PURGE.%s", dlq);
    snprintf(body, sizeof body, "{\"filter\":\"%s\",\"seq\":%" PRIu64 "}", a->subject,
             x->end_seq + 1);
    natsMsg *reply = NULL;
    int64_t timeout =
        x->sess.cfg->nats.request_timeout_ms > 0 ? x->sess.cfg->nats.request_timeout_ms : 5000;
    natsStatus s = natsConnection_RequestString(&reply, x->sess.nc, subj, body, timeout);
    if (s != NATS_OK) {
        jf_log(JF_LOG_ERROR, "purge failed", JF_S("stream", dlq),
               JF_S("error", jf_pub_nats_error(s)));
        return JF_EXIT_FAIL;
    }
    json_error_t jerr;
    json_t *r = json_loadb(natsMsg_GetData(reply), (size_t)natsMsg_GetDataLength(reply), 0, &jerr);
    natsMsg_Destroy(reply);
    json_t *e = json_object_get(r, "error");
    json_t *n = json_object_get(r, "purged");
    if (!json_is_object(r) || e != NULL || !json_is_integer(n)) {
        const char *d = json_string_value(json_object_get(e, "description"));
        jf_log(JF_LOG_ERROR, "purge failed", JF_S("stream", dlq),
               JF_S("error", d ? d : "unexpected answer from the server"));
        json_decref(r);
        return JF_EXIT_FAIL;
    }
    *purged = (unsigned long long)json_integer_value(n);
    json_decref(r);
    return JF_EXIT_OK;
}

static int cmd_purge(int argc, char **argv, const jf_pub_globals *g)
{
    dlq_args a = {.cmd = "dlq purge"};
    dlq_ctx x;
    memset(&x, 0, sizeof x);
    int rc = parse_filters(&a, argc, argv, ",reason,subject,yes,", usage_purge);
    if (rc != JF_EXIT_OK)
        return rc < 0 ? JF_EXIT_OK : rc;
    bool filtered = a.reason != NULL || strcmp(a.subject, "dlq.>") != 0;
    if (!filtered && !a.yes)
        return jf_pub_usage_error("dlq purge",
                                  "without --reason or --subject this deletes every dead letter: "
                                  "add --yes");
    if ((rc = jf_pub_session_load(&x.sess, g)) != JF_EXIT_OK)
        return rc;
    jf_pub_catch_signals();
    int64_t t0 = jf_pub_mono_ms();
    unsigned long long purged = 0, failed = 0;
    if (a.reason == NULL) {
        /* Only the end sequence is needed; the window stays closed. */
        if ((rc = jf_pub_session_connect(&x.sess, g, NULL)) != JF_EXIT_OK)
            goto out;
        jsStreamInfo *si = NULL;
        natsStatus s = js_GetStreamInfo(&si, x.sess.js, x.sess.cfg->stream.dlq, NULL, NULL);
        if (s != NATS_OK) {
            jf_log(JF_LOG_ERROR, "cannot read the dead-letter stream",
                   JF_S("stream", x.sess.cfg->stream.dlq), JF_S("error", jf_pub_nats_error(s)));
            rc = JF_EXIT_FAIL;
            goto out;
        }
        x.end_seq = si->State.LastSeq;
        jsStreamInfo_Destroy(si);
        if ((rc = purge_by_subject(&x, &a, &purged)) != JF_EXIT_OK)
            goto out;
    } else {
        if ((rc = open_entries(&x, g, NULL, &a, 256)) != JF_EXIT_OK)
            goto out;
        natsMsg *m = NULL;
        uint64_t seq = 0;
        int more;
        while ((more = next_entry(&x, &m, &seq)) > 0) {
            entry e;
            entry_read(&e, m, seq);
            if (matches(&a, &e)) {
                jsErrCode code = 0;
                natsStatus s = js_DeleteMsg(x.sess.js, x.sess.cfg->stream.dlq, seq, NULL, &code);
                if (s == NATS_OK) {
                    purged++;
                } else if (code != JSNoMessageFoundErr) {
                    failed++;
                    jf_log(JF_LOG_WARN, "cannot delete a dead letter", JF_I("seq", seq),
                           JF_S("error", jf_pub_nats_error(s)));
                }
            }
            natsMsg_Destroy(m);
        }
        if (more < 0)
            failed++;
    }
    json_t *o = json_object();
    json_object_set_new(o, "purged", json_integer((json_int_t)purged));
    if (failed > 0)
        json_object_set_new(o, "failed", json_integer((json_int_t)failed));
    json_object_set_new(o, "seconds", jf_json_seconds((double)(jf_pub_mono_ms() - t0) / 1000.0));
    jf_print_json(o);
    rc = failed > 0 || jf_pub_interrupted() ? JF_EXIT_FAIL : JF_EXIT_OK;
out:
    close_ctx(&x);
    return rc;
}

/* ------------------------------------------------------------------------- */

int jf_cmd_dlq(int argc, char **argv, const jf_pub_globals *g)
{
    if (argc < 2)
        return jf_pub_usage_error("dlq", "missing command (list, show, redrive or purge)");
    const char *sub = argv[1];
    if (strcmp(sub, "--help") == 0 || strcmp(sub, "-h") == 0) {
        usage(stdout);
        return JF_EXIT_OK;
    }
    if (strcmp(sub, "list") == 0)
        return cmd_list(argc - 1, argv + 1, g);
    if (strcmp(sub, "show") == 0)
        return cmd_show(argc - 1, argv + 1, g);
    if (strcmp(sub, "redrive") == 0)
        return cmd_redrive(argc - 1, argv + 1, g);
    if (strcmp(sub, "purge") == 0)
        return cmd_purge(argc - 1, argv + 1, g);
    return jf_pub_usage_error("dlq", "unknown command '%s' (list, show, redrive or purge)", sub);
}
