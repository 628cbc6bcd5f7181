/* limits.h — fleet-wide limits shared by every consumer process through a
 * JetStream key-value bucket (jetfleet_limits), updated by compare-and-set:
 *
 *  - rate = N/unit (+ burst): GCRA. The bucket holds each service's
 *    theoretical arrival time; a process takes slots spaced period/N apart
 *    (a lease of several at once for high rates) and starts each call no
 *    earlier than its slot, so the whole fleet keeps the spacing.
 *  - fleet_in_flight: a counting semaphore. The bucket holds, per service,
 *    the slots each process holds with a heartbeat time; entries of a
 *    process that stopped heartbeating (crashed) are reclaimed.
 *
 * When the bucket cannot be read or written the limits fail closed: no slot
 * is granted until it can (logged). KV calls block, so they run on libuv's
 * thread pool; callbacks come back on the loop thread. */
#ifndef JF_LIMITS_H
#define JF_LIMITS_H

#include <nats/nats.h>
#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#include "config.h"
#include "status.h"

typedef struct jf_limits jf_limits;

/* Creates the bucket when missing. process_id names this process's entries
 * (unique per process: e.g. hostname-pid-random). */
jf_status jf_limits_create(jf_limits **out, uv_loop_t *loop, jsCtx *js, const jf_config *cfg,
                           const char *process_id, jf_error *err);
void jf_limits_destroy(jf_limits *lim);

/* True when the service has a rate or a fleet-wide in-flight limit that
 * this module enforces. */
bool jf_limits_rate_limited(const jf_limits *lim, const jf_service_config *svc);
bool jf_limits_inflight_limited(const jf_limits *lim, const jf_service_config *svc);

/* Asks for the right to start one call. cb(arg, slot_ms) comes back on the
 * loop thread when granted: slot_ms is the wall-clock time (ms) at which the
 * call may start (now or later). Each granted in-flight slot must be given
 * back with jf_limits_release_inflight() when the call ends. Pending
 * requests are answered with slot_ms = -1 on destroy. */
typedef void (*jf_limits_cb)(void *arg, int64_t slot_ms);
void jf_limits_acquire_rate(jf_limits *lim, const jf_service_config *svc, jf_limits_cb cb,
                            void *arg);
void jf_limits_acquire_inflight(jf_limits *lim, const jf_service_config *svc, jf_limits_cb cb,
                                void *arg);
void jf_limits_release_inflight(jf_limits *lim, const jf_service_config *svc);

/* Counters for logs/metrics. */
uint64_t jf_limits_rate_waits(const jf_limits *lim, const jf_service_config *svc);

#endif
