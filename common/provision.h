/* provision.h — creates the streams and durables of DESIGN.md when missing,
 * and verifies them when present: a difference from the config is an error
 * (JF_ERR_MISMATCH) naming the stream or durable and the field, never a
 * silent change. */
#ifndef JF_PROVISION_H
#define JF_PROVISION_H

#include <nats/nats.h>
#include <stdbool.h>

#include "config.h"
#include "envelope.h"
#include "status.h"

/* JOBS (jobs.>, limits retention, file storage, duplicate window) and,
 * when with_dlq, JOBS_DLQ (dlq.>). */
jf_status jf_provision_streams(jsCtx *js, const jf_config *cfg, bool with_dlq, jf_error *err);

/* Checks that the streams exist (for --no-provision). */
jf_status jf_verify_streams(jsCtx *js, const jf_config *cfg, bool with_dlq, jf_error *err);

/* The durable "<service>-<priority>": pull, filter jobs.<service>.<priority>.>,
 * explicit ack, AckWait = ack_wait, MaxAckPending = fleet_in_flight,
 * MaxDeliver unlimited (jetfleet counts real attempts itself, so a job is
 * never silently parked by the server). create=false only verifies. */
jf_status jf_provision_durable(jsCtx *js, const jf_config *cfg, const jf_service_config *svc,
                               jf_priority p, bool create, jf_error *err);

/* Writes "<service>-<priority>". */
void jf_durable_name(char *buf, size_t cap, const char *service, jf_priority p);

#endif
