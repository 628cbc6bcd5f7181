/* main.c — jetfleet-publisher: global options, command dispatch, and the
 * session (config, connection, streams) the commands share. */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "nats_conn.h"
#include "provision.h"
#include "publisher.h"

static volatile sig_atomic_t g_interrupted;

static void on_signal(int sig)
{
    (void)sig;
    g_interrupted = 1;
}

void jf_pub_catch_signals(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    /* A second signal takes the default action: an impatient user wins. */
    sa.sa_flags = SA_RESETHAND;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

bool jf_pub_interrupted(void)
{
    return g_interrupted != 0;
}

int64_t jf_pub_mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

const char *jf_pub_nats_error(natsStatus s)
{
    return jf_nats_error_text(s);
}

int jf_pub_usage_error(const char *cmd, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (cmd != NULL)
        fprintf(stderr, "%s %s: %s\nTry '%s %s --help'.\n", JF_PUBLISHER_PROG, cmd, msg,
                JF_PUBLISHER_PROG, cmd);
    else
        fprintf(stderr, "%s: %s\nTry '%s --help'.\n", JF_PUBLISHER_PROG, msg, JF_PUBLISHER_PROG);
    return JF_EXIT_USAGE;
}

const char *jf_pub_bad_option(int argc, char **argv)
{
    static char letter[3] = "-?";
    /* Inside a cluster getopt has not moved optind past it yet, so
     * argv[optind - 1] is the argument before it; optopt names the letter. */
    const char *prev = argv[optind - 1];
    const char *cur = optind < argc ? argv[optind] : NULL;
    if (optopt > 0 && optopt < 128 &&
        ((prev[0] == '-' && prev[1] != '-') ||
         (cur != NULL && cur[0] == '-' && cur[1] != '-' && strchr(cur, optopt) != NULL))) {
        letter[1] = (char)optopt;
        return letter;
    }
    return prev;
}

int jf_pub_session_load(jf_pub_session *s, const jf_pub_globals *g)
{
    jf_error err = {{0}};
    jf_config *cfg = NULL;

    jf_status st = jf_config_load(&cfg, g->config_path, &err);
    if (st != JF_OK) {
        jf_log(JF_LOG_ERROR, "cannot load the configuration", JF_S("error", err.msg));
        return JF_EXIT_USAGE;
    }
    jf_log_set_level(g->has_log_level ? g->log_level : cfg->log_level);
    s->cfg = cfg;
    return JF_EXIT_OK;
}

int jf_pub_session_connect(jf_pub_session *s, const jf_pub_globals *g, jsOptions *jo)
{
    jf_error err = {{0}};
    jsOptions defaults;
    jf_status st;
    natsStatus ns;

    st = jf_nats_connect(&s->nc, s->cfg, JF_PUBLISHER_PROG, NULL, &err);
    if (st != JF_OK) {
        jf_log(JF_LOG_ERROR, "cannot connect to NATS", JF_S("error", err.msg));
        /* Bad [nats] settings or files they name are configuration errors;
         * a server that cannot be reached or refuses us is a runtime one. */
        return st == JF_ERR_NATS || st == JF_ERR_TIMEOUT ? JF_EXIT_FAIL : JF_EXIT_USAGE;
    }
    int64_t mp = natsConnection_GetMaxPayload(s->nc);
    s->max_payload = mp > 0 ? (size_t)mp : 0;

    if (jo == NULL) {
        jsOptions_Init(&defaults);
        jo = &defaults;
    }
    if (jo->Wait <= 0)
        jo->Wait = s->cfg->nats.request_timeout_ms > 0 ? s->cfg->nats.request_timeout_ms : 5000;
    if ((ns = natsConnection_JetStream(&s->js, s->nc, jo)) != NATS_OK) {
        jf_log(JF_LOG_ERROR, "cannot create a JetStream context",
               JF_S("error", jf_pub_nats_error(ns)));
        return JF_EXIT_FAIL;
    }

    /* The publisher writes only to JOBS, but creating JOBS_DLQ as well means
     * a fresh install has both before the first consumer starts. */
    if (g->no_provision)
        st = jf_verify_streams(s->js, s->cfg, true, &err);
    else
        st = jf_provision_streams(s->js, s->cfg, true, &err);
    if (st != JF_OK) {
        jf_log(JF_LOG_ERROR,
               g->no_provision ? "streams are not usable" : "cannot provision streams",
               JF_S("error", err.msg));
        /* A stream that differs from the config is a runtime state of the
         * server, not a usage error: exit 1 (DESIGN.md exit codes). */
        return JF_EXIT_FAIL;
    }
    return JF_EXIT_OK;
}

void jf_pub_session_close(jf_pub_session *s)
{
    if (s == NULL)
        return;
    jsCtx_Destroy(s->js);
    s->js = NULL;
    /* Every publish was acknowledged (or counted as failed) before this,
     * so nothing waits in nats.c's buffer. */
    natsConnection_Destroy(s->nc);
    s->nc = NULL;
    jf_config_destroy(s->cfg);
    s->cfg = NULL;
}

static void usage(FILE *out)
{
    fprintf(out,
            "Usage: %s [OPTIONS] COMMAND [ARGS...]\n"
            "\n"
            "Puts jobs into the JetStream stream of jetfleet (JOBS by default),\n"
            "creating the streams JOBS and JOBS_DLQ when they are missing.\n"
            "\n"
            "Commands:\n"
            "  publish    publish one job built from options\n"
            "  batch      publish NDJSON job envelopes from a file or stdin\n"
            "  replay     republish a window of JOBS so the fleet reprocesses it\n"
            "  dlq        list, show, re-drive or purge dead letters\n"
            "  status     per service and priority: pending, in flight, dead; or one job\n"
            "  serve      HTTP intake: POST /jobs, GET /jobs/{id}, GET /healthz\n"
            "\n"
            "Options (before the command):\n"
            "  -c, --config FILE     configuration file (default: ./jetfleet.ini when present)\n"
            "      --no-provision    do not create missing streams, only check them\n"
            "      --log-level L     debug, info, warn, error or off (default: [log] level)\n"
            "  -h, --help            show this help and exit\n"
            "  -V, --version         show the version and exit\n"
            "\n"
            "Run '%s COMMAND --help' for the options of a command.\n"
            "Exit status: 0 ok, 1 runtime failure, 2 usage or configuration error.\n",
            JF_PUBLISHER_PROG, JF_PUBLISHER_PROG);
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"config", required_argument, NULL, 'c'},    {"no-provision", no_argument, NULL, 'P'},
        {"log-level", required_argument, NULL, 'L'}, {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},         {NULL, 0, NULL, 0},
    };
    jf_pub_globals g = {0};
    int c;

    opterr = 0;
    /* '+': stop at the command, whose options are its own. */
    while ((c = getopt_long(argc, argv, "+:c:hV", longopts, NULL)) != -1) {
        switch (c) {
        case 'c':
            g.config_path = optarg;
            break;
        case 'P':
            g.no_provision = true;
            break;
        case 'L':
            if (jf_log_level_parse(&g.log_level, optarg) != JF_OK)
                return jf_pub_usage_error(NULL,
                                          "--log-level: '%s' is not one of debug, info, warn, "
                                          "error, off",
                                          optarg);
            g.has_log_level = true;
            jf_log_set_level(g.log_level);
            break;
        case 'h':
            usage(stdout);
            return JF_EXIT_OK;
        case 'V':
            printf("%s %s\n", JF_PUBLISHER_PROG, JF_VERSION);
            return JF_EXIT_OK;
        case ':':
            return jf_pub_usage_error(NULL, "option %s needs a value", argv[optind - 1]);
        default:
            return jf_pub_usage_error(NULL, "unknown option %s", jf_pub_bad_option(argc, argv));
        }
    }
    if (optind >= argc)
        return jf_pub_usage_error(NULL, "missing command (publish, batch, replay, dlq, status or serve)");

    static const struct {
        const char *name;
        int (*run)(int, char **, const jf_pub_globals *);
    } commands[] = {
        {"publish", jf_cmd_publish}, {"batch", jf_cmd_batch},   {"replay", jf_cmd_replay},
        {"dlq", jf_cmd_dlq},         {"status", jf_cmd_status}, {"serve", jf_cmd_serve},
    };
    const char *cmd = argv[optind];
    int (*run)(int, char **, const jf_pub_globals *) = NULL;
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (strcmp(cmd, commands[i].name) == 0)
            run = commands[i].run;
    if (run == NULL)
        return jf_pub_usage_error(
            NULL, "unknown command '%s' (publish, batch, replay, dlq, status or serve)", cmd);

    /* A closed stdout must show up as a write error, not kill the process. */
    signal(SIGPIPE, SIG_IGN);

    int sub_argc = argc - optind;
    char **sub_argv = argv + optind;
    optind = 0; /* glibc: a full restart of getopt for the command's own options */
    int rc = run(sub_argc, sub_argv, &g);

    /* Lets nats.c's threads end, so leak checkers see a clean exit. */
    nats_CloseAndWait(2000);
    if (fflush(stdout) != 0 && rc == JF_EXIT_OK) {
        jf_log(JF_LOG_ERROR, "cannot write the result", JF_S("error", strerror(errno)));
        rc = JF_EXIT_FAIL;
    }
    return rc;
}
