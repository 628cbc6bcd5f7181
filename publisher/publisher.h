/* publisher.h — what main.c, publish.c and batch.c share inside
 * jetfleet-publisher: the global options, the session every command opens
 * once its own arguments are valid, and the exit codes. */
#ifndef JF_PUBLISHER_H
#define JF_PUBLISHER_H

#include <nats/nats.h>
#include <stdbool.h>
#include <stddef.h>

#include "config.h"
#include "log.h"
#include "status.h"

#define JF_PUBLISHER_PROG "jetfleet-publisher"
#ifndef JF_VERSION
#define JF_VERSION JETFLEET_VERSION /* from project(VERSION) in CMakeLists.txt */
#endif

/* Exit codes of the CLI contract. */
enum {
    JF_EXIT_OK = 0,
    JF_EXIT_FAIL = 1,  /* runtime failure: server, network, rejected jobs */
    JF_EXIT_USAGE = 2, /* bad arguments or configuration */
};

/* Options given before the command. */
typedef struct jf_pub_globals {
    const char *config_path; /* NULL: jetfleet.ini in the working directory, if any */
    bool no_provision;
    bool has_log_level; /* --log-level given: wins over [log] level */
    jf_log_level log_level;
} jf_pub_globals;

/* A loaded config and a JetStream context whose streams were provisioned
 * (or verified, with --no-provision). */
typedef struct jf_pub_session {
    jf_config *cfg;
    natsConnection *nc;
    jsCtx *js;
    size_t max_payload; /* the server's, in bytes */
} jf_pub_session;

/* Loads the config and applies the log level; logs what is wrong and
 * returns the exit code. On JF_EXIT_OK s->cfg is set, nothing else. */
int jf_pub_session_load(jf_pub_session *s, const jf_pub_globals *g);

/* Connects, creates the JetStream context from jo (NULL: defaults; a zero
 * Wait becomes [nats] request_timeout) and provisions or verifies the
 * streams. Logs what is wrong and returns the exit code. */
int jf_pub_session_connect(jf_pub_session *s, const jf_pub_globals *g, jsOptions *jo);

/* Releases whatever load/connect set up; safe on a zeroed session. */
void jf_pub_session_close(jf_pub_session *s);

/* Prints "jetfleet-publisher CMD: <message>" and a hint to --help on stderr;
 * returns JF_EXIT_USAGE. */
int jf_pub_usage_error(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* The option getopt_long has just refused with '?': "-x" for an unknown
 * letter (also inside a cluster such as -xV), else the argument as given. */
const char *jf_pub_bad_option(int argc, char **argv);

/* After jf_pub_catch_signals, the first SIGINT/SIGTERM only sets a flag
 * (jf_pub_interrupted) so a long command can stop reading input and finish
 * what is in flight; a second one ends the process. The flag is the only
 * mutable global of the program. */
void jf_pub_catch_signals(void);
bool jf_pub_interrupted(void);

/* The most precise text nats.c has for s, the last failure on this thread. */
const char *jf_pub_nats_error(natsStatus s);

/* Commands: argv[0] is the command name; return the exit code. */
int jf_cmd_publish(int argc, char **argv, const jf_pub_globals *g);
int jf_cmd_batch(int argc, char **argv, const jf_pub_globals *g);
int jf_cmd_replay(int argc, char **argv, const jf_pub_globals *g); /* replay.c */
int jf_cmd_dlq(int argc, char **argv, const jf_pub_globals *g);    /* dlq.c */
int jf_cmd_status(int argc, char **argv, const jf_pub_globals *g); /* status.c */
int jf_cmd_serve(int argc, char **argv, const jf_pub_globals *g);  /* serve.c */

/* Monotonic milliseconds, for durations and progress. */
int64_t jf_pub_mono_ms(void);

#endif
