/* nats_conn.h — a NATS connection from [nats] config: server list,
 * user/password, token, creds file, nkey seed file, TLS; reconnects forever
 * with jitter and logs disconnects and reconnects. */
#ifndef JF_NATS_CONN_H
#define JF_NATS_CONN_H

#include <nats/nats.h>
#include <stdbool.h>

#include "config.h"
#include "status.h"

typedef void (*jf_nats_event_cb)(natsConnection *nc, void *closure);

typedef struct jf_nats_callbacks {
    jf_nats_event_cb on_disconnected; /* optional, called on a NATS thread */
    jf_nats_event_cb on_reconnected;  /* optional, called on a NATS thread */
    void *closure;
    /* Deliver messages of all subscriptions through nats.c's global
     * delivery thread pool instead of a thread per subscription (the
     * consumer opens a short-lived subscription per pull request). */
    bool global_delivery;
} jf_nats_callbacks;

/* The most precise text nats.c has for s (the last failure on this thread),
 * without nats.c's "(conn.c:2088): " source position. Never NULL. */
const char *jf_nats_error_text(natsStatus s);

/* Connects (retrying the first connect until connect_timeout passes). cbs
 * may be NULL. On success *out is owned by the caller (natsConnection_Destroy). */
jf_status jf_nats_connect(natsConnection **out, const jf_config *cfg, const char *default_name,
                          const jf_nats_callbacks *cbs, jf_error *err);

#endif
