/* fleet.h — the consumer process: one event loop that keeps pulls open on
 * every durable it serves, hands jobs to handlers, and settles each job
 * (ack, NAK with backoff, or dead letter) only once its outcome is known. */
#ifndef JF_FLEET_H
#define JF_FLEET_H

#include <nats/nats.h>
#include <signal.h>
#include <stdbool.h>

#include "config.h"
#include "status.h"

typedef struct jf_fleet jf_fleet;

typedef struct jf_fleet_options {
    const jf_config *cfg;           /* borrowed; outlives the fleet */
    const char *const *services;    /* NULL-terminated names to serve; NULL = all */
    bool provision;                 /* create missing streams and durables */
    /* Set by a signal that arrived during start-up (before the loop owns
     * SIGTERM/SIGINT): the fleet then stops as soon as it runs. */
    volatile sig_atomic_t *stop_requested;
} jf_fleet_options;

/* Connects, provisions (or verifies), creates handlers. */
jf_status jf_fleet_create(jf_fleet **out, const jf_fleet_options *opts, jf_error *err);

/* Runs until SIGTERM/SIGINT and a drain within shutdown_grace. Blocks. */
jf_status jf_fleet_run(jf_fleet *f, jf_error *err);

void jf_fleet_destroy(jf_fleet *f);

#endif
