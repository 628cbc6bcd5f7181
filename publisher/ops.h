/* ops.h — what the operating commands of jetfleet-publisher share: replay,
 * dlq and status (and batch --wait).
 *
 *   jf_window     reads a window of a stream through a short-lived
 *                 ephemeral pull consumer (replay.c)
 *   jf_repub      asynchronous republishing with bounded pending, every
 *                 PubAck checked and, on request, each settled publish
 *                 handed back to the command's thread (replay.c)
 *   jf_pacer      a --rate throttle (replay.c)
 *   jf_wait_set   the jobs of a batch and the wait for their end (status.c)
 *
 * Everything here runs on the command's thread except the PubAck handler,
 * which nats.c calls on its reply thread; jf_repub hands its results over
 * under a mutex. */
#ifndef JF_PUB_OPS_H
#define JF_PUB_OPS_H

#include <jansson.h>
#include <nats/nats.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "publisher.h"
#include "status.h"

/* ---- reading a window of a stream --------------------------------------- */

typedef struct jf_window jf_window;

typedef struct jf_window_opts {
    const char *stream;
    const char *filter;    /* FilterSubject; NULL: the whole stream */
    uint64_t start_seq;    /* > 0: from this sequence */
    int64_t start_time_ms; /* > 0 (and start_seq 0): from this time */
    uint64_t end_seq;      /* inclusive: a message past it ends the window */
    int batch;             /* messages per pull request (1..256) */
    int64_t wait_ms;       /* a pull that brings nothing within this is an error */
} jf_window_opts;

/* Creates the ephemeral consumer (no acks, memory storage, deleted by the
 * server when idle for a while, and by jf_window_close). Blocking. */
jf_status jf_window_open(jf_window **out, natsConnection *nc, jsCtx *js, const jf_window_opts *o,
                         jf_error *err);

/* The next message of the window (the caller destroys it) with its stream
 * sequence and time (ns since the epoch). JF_ERR_NOTFOUND at the end of the
 * window; another status on a failure. Blocks for at most o->wait_ms. */
jf_status jf_window_next(jf_window *w, natsMsg **out, uint64_t *seq, int64_t *time_ns,
                         jf_error *err);

/* Deletes the consumer; NULL is a no-op. */
void jf_window_close(jf_window *w);

/* ---- republishing --------------------------------------------------------- */

typedef struct jf_repub_done {
    uint64_t tag; /* the tag header's value */
    bool ok;      /* stored (or a duplicate of a stored one) in the wanted stream */
    bool duplicate;
} jf_repub_done;

typedef struct jf_repub {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    const char *stream;     /* the stream every message must land in */
    const char *tag_header; /* NULL: no hand-back, counts only */
    unsigned long long stored, duplicates, failed, logged;
    unsigned long long lost_tags; /* settled but not queued (out of memory) */
    jf_repub_done *done;          /* settled, oldest first, not yet taken */
    size_t done_len, done_cap;
    int64_t timeout_ms;
    jsPubOptions po;
} jf_repub;

/* Fills jo's PublishAsync settings ([publisher] max_pending and timeout)
 * for r; call before jf_pub_session_connect(…, jo). When tag_header is
 * given, every settled publish whose message carries that header (a
 * decimal number) is queued for jf_repub_take; a caller that takes them
 * before each send keeps that queue within [publisher] max_pending.
 * jf_repub_destroy releases what init allocated (after the connection is
 * closed: the PubAck handler uses r). */
jf_status jf_repub_init(jf_repub *r, const jf_config *cfg, jsOptions *jo, const char *tag_header,
                        jf_error *err);
void jf_repub_destroy(jf_repub *r);

/* Publishes *msg asynchronously; nats.c takes it (on JF_OK *msg is NULL,
 * on failure the caller still owns it and should count it as failed). */
jf_status jf_repub_send(jf_repub *r, jsCtx *js, natsMsg **msg, jf_error *err);

/* Moves up to cap settled publishes into out; returns how many. */
size_t jf_repub_take(jf_repub *r, jf_repub_done *out, size_t cap);

/* Waits for every pending PubAck (each ends by its own timeout); returns
 * how many were still pending at the end (they count as failed). */
unsigned long long jf_repub_finish(jf_repub *r, jsCtx *js);

/* Counters: stored, duplicates, failed (PubAck errors and timeouts). */
void jf_repub_counts(jf_repub *r, unsigned long long out[3]);

/* ---- pacing and progress ---------------------------------------------------- */

typedef struct jf_pacer {
    double per_sec; /* 0: no limit */
    int64_t start_ms;
    unsigned long long sent;
} jf_pacer;

/* Parses "N" or "N/s" "N/m" "N/h" (N > 0) into messages per second. */
jf_status jf_pacer_parse(double *per_sec, const char *s, jf_error *err);
void jf_pacer_start(jf_pacer *p, double per_sec);
/* Sleeps until the next message may go; returns early when interrupted. */
void jf_pacer_wait(jf_pacer *p);

/* A one-line progress report on stderr when it is a terminal: only after a
 * second, at most five refreshes a second. */
typedef struct jf_progress {
    bool tty;
    bool shown;
    int64_t start_ms, last_ms;
} jf_progress;

void jf_progress_start(jf_progress *pg);
/* True when a line should be drawn now (then the caller prints it with
 * jf_progress_print). */
bool jf_progress_due(jf_progress *pg);
void jf_progress_print(jf_progress *pg, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void jf_progress_clear(jf_progress *pg);

/* ---- command-line values and output ------------------------------------------ */

/* A decimal number without sign or blanks. */
bool jf_parse_u64(const char *s, uint64_t *out);

/* Prints o as one compact JSON line on stdout (reals to ms precision) and
 * releases it; NULL (out of memory) prints nothing. */
void jf_print_json(json_t *o);

/* Seconds as a JSON real rounded to milliseconds. */
json_t *jf_json_seconds(double secs);

/* TIME: RFC 3339 date-time, or a duration meaning that long ago ("10m"). */
jf_status jf_parse_past_time(int64_t *out_ms, const char *s, jf_error *err);

/* A subject filter: tokens of [A-Za-z0-9_-] or '*', '>' only as the last
 * token, and the first token must equal prefix. */
bool jf_filter_valid(const char *s, const char *prefix);

/* ---- the ledger, read by the publisher (status.c) --------------------------- */

/* The jobs of one batch, gathered from its PubAcks, and the wait for all of
 * them to be finished. Not thread-safe: batch.c adds under its own lock. */
typedef struct jf_wait_set jf_wait_set;

jf_status jf_wait_set_create(jf_wait_set **out, jf_error *err);
void jf_wait_set_destroy(jf_wait_set *ws);
/* Records one stored (or duplicate) job: its id, subject and JOBS sequence. */
jf_status jf_wait_set_add(jf_wait_set *ws, const char *id, const char *subject, uint64_t seq);

/* Polls until every job of ws is finished, drawing a progress bar on a
 * terminal, then prints {"succeeded":N,"dead":N,"unfinished":N,
 * "seconds":S,"rate":R} on stdout (seconds since start_ms). timeout_ms 0:
 * no limit. Finished means, with [postgres] dsn: the job's ledger row is
 * succeeded or dead; without: every durable that got jobs of the batch has
 * its ack floor at or past the batch's highest sequence for it (jobs are
 * acknowledged only once their outcome, dead letter included, is stored),
 * and dead ones are the batch's sequences found in JOBS_DLQ. Returns the
 * exit code (1 on timeout, interruption or failure). */
int jf_batch_wait(jf_pub_session *s, jf_wait_set *ws, int64_t timeout_ms, int64_t start_ms);

#endif
