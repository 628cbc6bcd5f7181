/* jetfleet-consumer — works jobs off the JOBS stream. */
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "config.h"
#include "fleet.h"
#include "log.h"

#define MAX_SERVICE_ARGS JF_MAX_SERVICES

/* Until the event loop takes SIGTERM/SIGINT over, a signal only asks the
 * fleet to stop once it runs (connecting and provisioning can take seconds). */
static volatile sig_atomic_t early_stop;

static void on_early_signal(int signum)
{
    (void)signum;
    early_stop = 1;
}

static const char usage[] =
    "Usage: jetfleet-consumer [OPTIONS]\n"
    "\n"
    "Pulls jobs from the JOBS stream through the durables <service>-<priority>\n"
    "(high, normal, low), runs each with its service's handler, and acknowledges\n"
    "it once its outcome is settled: success is acked, a retryable failure is\n"
    "NAKed with backoff, and an invalid, expired or permanently failed job (or one\n"
    "out of attempts) is dead-lettered to JOBS_DLQ before the original is acked.\n"
    "Runs until SIGTERM or SIGINT, then finishes in-flight jobs within\n"
    "[consumer] shutdown_grace, hands back the rest, and exits 0.\n"
    "\n"
    "Options:\n"
    "  --config FILE       configuration file (default: ./jetfleet.ini when present)\n"
    "  --service NAME      serve only this [service.NAME] (repeatable; default: all)\n"
    "  --no-provision      do not create streams or durables; fail if missing\n"
    "  --log-level LEVEL   debug, info, warn, error or off (overrides [log] level)\n"
    "  --help              show this help and exit\n"
    "  --version           show the version and exit\n"
    "\n"
    "Every config key can be set from the environment as JETFLEET_<SECTION>_<KEY>,\n"
    "e.g. JETFLEET_NATS_URL or JETFLEET_SERVICE_LLM_MAX_DELIVER.\n"
    "Logs are JSON lines on stderr. Exit status: 0 after a clean stop, 1 on a\n"
    "runtime failure, 2 on a usage or configuration error.\n";

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"config", required_argument, NULL, 'c'},   {"service", required_argument, NULL, 's'},
        {"no-provision", no_argument, NULL, 'n'},   {"log-level", required_argument, NULL, 'l'},
        {"help", no_argument, NULL, 'h'},           {"version", no_argument, NULL, 'V'},
        {NULL, 0, NULL, 0},
    };
    const char *config_path = NULL, *log_level = NULL;
    const char *services[MAX_SERVICE_ARGS + 1] = {NULL};
    int nservices = 0;
    bool provision = true;
    int c;

    opterr = 0;
    while ((c = getopt_long(argc, argv, "+c:s:hV", longopts, NULL)) != -1) {
        switch (c) {
        case 'c':
            config_path = optarg;
            break;
        case 's':
            if (nservices == MAX_SERVICE_ARGS) {
                fprintf(stderr, "jetfleet-consumer: too many --service options\n");
                return 2;
            }
            services[nservices++] = optarg;
            break;
        case 'n':
            provision = false;
            break;
        case 'l':
            log_level = optarg;
            break;
        case 'h':
            fputs(usage, stdout);
            return 0;
        case 'V':
            printf("jetfleet-consumer %s (nats.c %s)\n", JETFLEET_VERSION, nats_GetVersion());
            return 0;
        default:
            /* In a cluster ("-xh") getopt has not moved past it yet:
             * optopt names the letter. */
            if (optopt > 0 && optopt < 128 &&
                ((argv[optind - 1][0] == '-' && argv[optind - 1][1] != '-') ||
                 (optind < argc && argv[optind][0] == '-' && argv[optind][1] != '-' &&
                  strchr(argv[optind], optopt) != NULL)))
                fprintf(stderr, "jetfleet-consumer: unknown or incomplete option '-%c'\n%s",
                        optopt, "Try 'jetfleet-consumer --help'.\n");
            else
                fprintf(stderr, "jetfleet-consumer: unknown or incomplete option '%s'\n%s",
                        argv[optind - 1], "Try 'jetfleet-consumer --help'.\n");
            return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "jetfleet-consumer: unexpected argument '%s'\nTry 'jetfleet-consumer --help'.\n",
                argv[optind]);
        return 2;
    }

    jf_error err = {{0}};
    jf_config *cfg = NULL;
    if (jf_config_load(&cfg, config_path, &err) != JF_OK) {
        fprintf(stderr, "jetfleet-consumer: %s\n", err.msg);
        return 2;
    }
    jf_log_set_level(cfg->log_level);
    if (log_level != NULL) {
        jf_log_level lvl;
        if (jf_log_level_parse(&lvl, log_level) != JF_OK) {
            fprintf(stderr, "jetfleet-consumer: --log-level %s: expected debug, info, warn, error or off\n",
                    log_level);
            jf_config_destroy(cfg);
            return 2;
        }
        jf_log_set_level(lvl);
    }
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_early_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    /* Every in-flight HTTP call holds a socket: a thousand slow calls do not
     * fit the usual soft limit of 1024 descriptors. */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }

    jf_fleet *fleet = NULL;
    jf_fleet_options opts = {
        .cfg = cfg,
        .services = nservices > 0 ? services : NULL,
        .provision = provision,
        .stop_requested = &early_stop,
    };
    jf_status st = jf_fleet_create(&fleet, &opts, &err);
    int rc = 0;
    if (st != JF_OK) {
        jf_log(JF_LOG_ERROR, "cannot start", JF_S("error", err.msg));
        fprintf(stderr, "jetfleet-consumer: %s\n", err.msg);
        rc = st == JF_ERR_INVALID ? 2 : 1;
    } else if (jf_fleet_run(fleet, &err) != JF_OK) {
        jf_log(JF_LOG_ERROR, "stopped with an error", JF_S("error", err.msg));
        rc = 1;
    }
    jf_fleet_destroy(fleet); /* also closes the nats.c library (and waits for its threads) */
    jf_config_destroy(cfg);
    return rc;
}
