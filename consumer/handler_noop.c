/* handler_noop.c — a handler that does no work: the benchmark baseline, and
 * with `delay` / `fail_attempts` a stand-in for real work in smoke runs and
 * tests of the pull loop (jobs held in flight, retries, dead letters). */
#include <stdio.h>
#include <stdlib.h>

#include "handler.h"

typedef struct noop {
    uv_loop_t *loop;
    const jf_service_config *svc;
} noop;

typedef struct noop_job {
    uv_timer_t timer; /* first: the handle's address is the struct's */
    noop *n;
    jf_job *job;
} noop_job;

static jf_status noop_create(void **impl, uv_loop_t *loop, const jf_service_config *svc,
                             jf_error *err)
{
    noop *n = calloc(1, sizeof *n);
    if (n == NULL) {
        jf_error_set(err, "service %s: out of memory", svc->name);
        return JF_ERR_NOMEM;
    }
    n->loop = loop;
    n->svc = svc;
    *impl = n;
    return JF_OK;
}

static void finish(const noop *n, jf_job *job)
{
    unsigned attempt = jf_job_attempt(job);
    if ((int)attempt <= n->svc->fail_attempts) {
        char msg[128];
        snprintf(msg, sizeof msg, "noop: simulated failure on attempt %u of %d", attempt,
                 n->svc->fail_attempts);
        jf_job_done(job, JF_OUTCOME_RETRY, msg, 0);
    } else {
        jf_job_done(job, JF_OUTCOME_OK, NULL, 0);
    }
}

static void free_handle(uv_handle_t *h)
{
    free(h);
}

static void on_timer(uv_timer_t *t)
{
    noop_job *nj = (noop_job *)t;
    jf_job *job = nj->job;
    noop *n = nj->n;
    *jf_job_slot(job) = NULL;
    uv_close((uv_handle_t *)&nj->timer, free_handle);
    finish(n, job);
}

static void noop_start(void *impl, jf_job *job)
{
    noop *n = impl;
    if (n->svc->delay_ms <= 0) {
        finish(n, job);
        return;
    }
    noop_job *nj = calloc(1, sizeof *nj);
    if (nj == NULL) {
        jf_job_done(job, JF_OUTCOME_RETRY, "noop: out of memory", 0);
        return;
    }
    nj->n = n;
    nj->job = job;
    uv_timer_init(n->loop, &nj->timer);
    uv_timer_start(&nj->timer, on_timer, (uint64_t)n->svc->delay_ms, 0);
    *jf_job_slot(job) = nj;
}

static void noop_cancel(void *impl, jf_job *job)
{
    (void)impl;
    noop_job *nj = *jf_job_slot(job);
    if (nj == NULL)
        return;
    *jf_job_slot(job) = NULL;
    uv_timer_stop(&nj->timer);
    uv_close((uv_handle_t *)&nj->timer, free_handle);
}

static void noop_destroy(void *impl)
{
    free(impl);
}

const jf_handler_ops jf_handler_noop = {
    .kind = "noop",
    .create = noop_create,
    .start = noop_start,
    .cancel = noop_cancel,
    .destroy = noop_destroy,
};

const jf_handler_ops *jf_handler_for_kind(jf_handler_kind kind)
{
    switch (kind) {
    case JF_KIND_NOOP:
        return &jf_handler_noop;
    case JF_KIND_HTTP:
        return &jf_handler_http;
    case JF_KIND_POSTGRES:
        return &jf_handler_postgres;
    }
    return NULL;
}
