/*
 * worker - the gateway role.
 *
 * Offers worker_main(), run by role_run() in each worker process. A worker
 * listens for jobs from the api processes and the sweeps on its own REP
 * socket (ipc://RUN_DIR/worker.N.ipc), WORKER_CONCURRENCY at once, and runs
 * each on its libevent loop. A job names one gateway attempt (a
 * payment_transactions row: a charge or authorization, a capture, a void)
 * with its own idempotency key, which every call for it carries, so a job
 * that NNG re-sends after a worker died, that is retried here after a
 * timeout, or that the sweeps re-drive can never move money twice.
 *
 * A refund is an attempt too, and so is the cancel of a refund the gateway
 * holds as pending; several refunds of one payment may be in flight.
 *
 * The call goes through the provider's adapter (libcurl multi); only
 * failures that are certainly not processed or ambiguous are retried
 * (exponential back-off with full jitter, same key); a decline is final.
 * A capture or void the gateway refuses is resolved by retrieving the
 * charge: whatever state it is in is the truth (captured before the void
 * reached it, voided, expired). A re-driven attempt, whose earlier answer
 * may be lost, is resolved the same way first: the charge its key created
 * or targeted is retrieved, and the operation is sent again (same key) only
 * while it is still needed. Every outcome is recorded by one statement,
 * attempt_apply() (sql/010_attempts.sql), which moves the attempt and its
 * payment through the state machine's tables, writes the event, and names
 * the next attempt when there is one (a re-confirm sends the new charge
 * once the old one is voided): the job goes on with it. When retries run
 * out the attempt stays pending for the sweeps. Calls common/, gateway,
 * breaker.
 */
#include <jansson.h>
#include <nng/nng.h>
#include <nng/protocol/reqrep0/rep.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "breaker.h"
#include "envelope.h"
#include "gateway.h"
#include "httputil.h"
#include "ids.h"
#include "jobs.h"
#include "log.h"
#include "metrics.h"
#include "pgev.h"
#include "role.h"
#include "wake.h"
#include "xmalloc.h"

#define JOB_BACKOFF_BASE_MS 100
#define JOB_CHAIN_MAX       8 /* attempts one job runs in a row (void, then charge) */

struct worker {
    struct role_ctx *ctx;
    struct pgev_pool *pg;
    struct curlev *curl;
    struct gateway *gw[CONFIG_MAX_PROVIDERS]; /* GATEWAY_PROVIDERS, in priority order */
    int n_gw;
    nng_socket sock;
    int jobs;
    char lease[24];
    struct wake *wake; /* tells the outbox about committed events */
};

/* What the job does next with its attempt. */
enum job_step {
    STEP_CALL,    /* send the operation */
    STEP_REDRIVE, /* a re-driven attempt: first ask what became of it */
    STEP_RESOLVE, /* the gateway refused a capture or void: ask the charge's state */
};

struct job {
    struct worker *w;
    struct nngev_job *nj;
    char request_id[ENVELOPE_ID_MAX];
    int64_t attempt_id, intent_id, amount;
    char key[160], op[16], purpose[16], public_id[64], currency[8], payment_method[256];
    char target[80], target_key[160];
    char provider[32]; /* the provider this attempt is pinned to */
    int prov;          /* its index in w->gw */
    enum job_step step;
    /* Per provider, with several: this job sent to it; an answer from it was
     * not certain; another job with this key may have reached it. */
    bool sent[CONFIG_MAX_PROVIDERS], unsure[CONFIG_MAX_PROVIDERS];
    bool tried_before[CONFIG_MAX_PROVIDERS];
    char why[256];     /* why the current provider is being left */
    char recorded[20]; /* the state last recorded for the attempt */
    /* The api request this job answers, whose answer the outcome's own
     * statement keeps under its Idempotency-Key (idem_row 0: none). */
    int64_t idem_row;
    char holder[160], route[16];
    int tries;
    int chain;
    int64_t gateway_started_us;
    int64_t lease_renewed_ms;
    bool probe; /* this call is the breaker's half-open probe */
    struct event *retry;
};

static void
worker_jobs_changed(struct worker *w, int delta)
{
    w->jobs += delta;
    atomic_store_explicit(&role_metrics(w->ctx)->active_payments, w->jobs, memory_order_relaxed);
}

/* ---- replies ---- */

static void
job_reply_answer(struct job *j, const char *object, const char *error, int answer_code,
                 const char *answer_body)
{
    struct envelope_writer w;
    size_t n;
    envelope_begin(&w, MSG_JOB_REPLY, j->request_id, 0, answer_body ? 3 : 1);
    if (object)
        envelope_put_str(&w, "object", object);
    else
        envelope_put_str(&w, "error", error ? error : "failed");
    if (answer_body) {
        envelope_put_int(&w, "answer_code", answer_code);
        envelope_put_str(&w, "answer_body", answer_body);
    }
    void *bytes = envelope_finish(&w, &n);
    nngev_respond(j->nj, nngev_msg(bytes, n));
    free(bytes);
    if (j->retry)
        event_free(j->retry);
    worker_jobs_changed(j->w, -1);
    free(j);
}

static void
job_reply(struct job *j, const char *object, const char *error)
{
    job_reply_answer(j, object, error, 0, NULL);
}

static void
job_on_current(void *arg, PGresult *res, const char *err)
{
    struct job *j = arg;
    if (res && PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1)
        job_reply(j, PQgetvalue(res, 0, 0), NULL);
    else
        job_reply(j, NULL, err ? err : "payment not found");
}

/* Replies with the intent as it is now (the outcome is not known yet, or
 * somebody else recorded it). */
static bool job_is_refund(const struct job *j);

static void
job_reply_current(struct job *j)
{
    char id[24];
    if (job_is_refund(j)) { /* the refund (a cancel's: the refund it cancels) */
        snprintf(id, sizeof(id), "%lld", (long long)j->attempt_id);
        const char *params[1] = {id};
        pgev_exec(j->w->pg,
                  "SELECT refund_object(r)::text FROM refunds r WHERE r.attempt_id ="
                  " (SELECT CASE type WHEN 'refund' THEN id ELSE parent_id END"
                  "  FROM payment_transactions WHERE id = $1)",
                  1, params, job_on_current, j);
        return;
    }
    snprintf(id, sizeof(id), "%lld", (long long)j->intent_id);
    const char *params[1] = {id};
    pgev_exec(j->w->pg,
              "SELECT payment_intent_object(p)::text FROM payment_intents p WHERE id = $1", 1,
              params, job_on_current, j);
}

/* ---- the attempt a job runs ---- */

static const char *
job_col(PGresult *res, int row, const char *name)
{
    int col = PQfnumber(res, name);
    if (col < 0)
        abort(); /* a statement of ours lost a column */
    return PQgetvalue(res, row, col);
}

static int
worker_provider(const struct worker *w, const char *name)
{
    if (!*name)
        return 0;
    for (int i = 0; i < w->n_gw; i++)
        if (strcmp(w->gw[i]->name, name) == 0)
            return i;
    return -1;
}

static bool
job_is_charge(const struct job *j)
{
    return strcmp(j->op, "charge") == 0 || strcmp(j->op, "authorization") == 0;
}

static bool
job_is_refund(const struct job *j)
{
    return strcmp(j->op, "refund") == 0 || strcmp(j->op, "refund_cancel") == 0;
}

/* Takes the next attempt (attempt_jobs' columns in row 0 of res). */
static int
job_take_attempt(struct job *j, PGresult *res)
{
    j->attempt_id = strtoll(job_col(res, 0, "attempt_id"), NULL, 10);
    snprintf(j->key, sizeof(j->key), "%s", job_col(res, 0, "key"));
    snprintf(j->op, sizeof(j->op), "%s", job_col(res, 0, "type"));
    snprintf(j->purpose, sizeof(j->purpose), "%s", job_col(res, 0, "purpose"));
    j->amount = strtoll(job_col(res, 0, "amount"), NULL, 10);
    snprintf(j->currency, sizeof(j->currency), "%s", job_col(res, 0, "currency"));
    snprintf(j->payment_method, sizeof(j->payment_method), "%s", job_col(res, 0, "payment_method"));
    snprintf(j->provider, sizeof(j->provider), "%s", job_col(res, 0, "provider"));
    snprintf(j->target, sizeof(j->target), "%s", job_col(res, 0, "target"));
    snprintf(j->target_key, sizeof(j->target_key), "%s", job_col(res, 0, "target_key"));
    memset(j->sent, 0, sizeof(j->sent));
    memset(j->unsure, 0, sizeof(j->unsure));
    memset(j->tried_before, 0, sizeof(j->tried_before));
    j->tries = 0;
    j->step = STEP_CALL;
    j->prov = worker_provider(j->w, j->provider);
    return j->prov < 0 ? -1 : 0;
}

static void job_run(struct job *j);

/* ---- recording the outcome ---- */

/* Metrics for a recorded outcome: the state reached, and for final states
 * the time since the payment was created (and the amount, when paid). */
static void
job_count_outcome(struct job *j, const char *status, int64_t age_us, int64_t received)
{
    struct shm_metrics *m = role_metrics(j->w->ctx);
    bool final = true;
    if (strcmp(status, "succeeded") == 0) {
        metric_payment(m, MP_SUCCEEDED);
        metric_observe(&m->payment_amount, metric_bucket_bounds_amount, (uint64_t)received);
    } else if (strcmp(status, "requires_payment_method") == 0) {
        metric_payment(m, MP_FAILED);
    } else if (strcmp(status, "canceled") == 0) {
        metric_payment(m, MP_CANCELED);
    } else if (strcmp(status, "requires_capture") == 0) {
        metric_payment(m, MP_REQUIRES_CAPTURE);
        final = false;
    } else if (strcmp(status, "requires_action") == 0) {
        metric_payment(m, MP_REQUIRES_ACTION);
        final = false;
    } else {
        final = false;
    }
    if (final && age_us > 0)
        metric_observe_us(m, MH_PAYMENT_DURATION, (uint64_t)age_us);
}

static void
job_count_refund(struct job *j, const char *status)
{
    struct shm_metrics *m = role_metrics(j->w->ctx);
    if (strcmp(status, "succeeded") == 0) {
        metric_inc(m, MC_REFUNDS_SUCCEEDED);
        metric_observe(&m->refund_amount, metric_bucket_bounds_amount, (uint64_t)j->amount);
    } else if (strcmp(status, "failed") == 0) {
        metric_inc(m, MC_REFUNDS_FAILED);
    } else if (strcmp(status, "canceled") == 0) {
        metric_inc(m, MC_REFUNDS_CANCELED);
    }
}

static void
job_on_recorded(void *arg, PGresult *res, const char *err)
{
    struct job *j = arg;
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1) {
        /* Not recorded: the attempt stays pending and the sweeps resolve it
         * with the same key. */
        log_error("payment %s: %s outcome not recorded: %s; left for recovery", j->public_id, j->op,
                  err ? err : PQresultErrorMessage(res));
        job_reply(j, NULL, "the outcome could not be recorded");
        return;
    }
    const char *status = job_col(res, 0, "status");
    wake_outbox(j->w->wake);
    if (strcmp(job_col(res, 0, "applied"), "t") == 0 && job_is_refund(j))
        job_count_refund(j, status);
    else if (strcmp(job_col(res, 0, "applied"), "t") == 0)
        job_count_outcome(j, status, strtoll(job_col(res, 0, "age_us"), NULL, 10),
                          strtoll(job_col(res, 0, "received"), NULL, 10));
    else if (strcmp(j->recorded, "pending") != 0)
        log_info("payment %s: %s %s was settled already (a callback or another job)", j->public_id,
                 j->op, j->key);
    if (jobs_has_attempt(res, 0)) {
        if (++j->chain >= JOB_CHAIN_MAX || job_take_attempt(j, res) < 0) {
            log_error("payment %s: next attempt not run here; left for recovery", j->public_id);
            job_reply(j, job_col(res, 0, "object"), NULL);
            return;
        }
        log_info("payment %s: the old charge is settled; next %s %s", j->public_id, j->op, j->key);
        job_run(j);
        return;
    }
    int col = PQfnumber(res, "answer_body");
    bool answered = col >= 0 && !PQgetisnull(res, 0, col);
    job_reply_answer(j, job_col(res, 0, "object"), NULL,
                     answered ? atoi(job_col(res, 0, "answer_code")) : 0,
                     answered ? PQgetvalue(res, 0, col) : NULL);
}

/* Records what the gateway says about the attempt's charge: state is one
 * of requires_action, requires_capture, succeeded, failed, canceled,
 * pending, rejected (attempt_apply's vocabulary). */
static void
job_record(struct job *j, const char *state, const struct gw_result *r)
{
    char id[24], amount[24], idem[24];
    snprintf(id, sizeof(id), "%lld", (long long)j->attempt_id);
    snprintf(amount, sizeof(amount), "%lld", (long long)r->amount);
    snprintf(idem, sizeof(idem), "%lld", (long long)j->idem_row);
    const char *params[12] = {id,
                              state,
                              r->charge_id[0] ? r->charge_id : NULL,
                              amount,
                              r->code[0] ? r->code : NULL,
                              r->decline_code[0] ? r->decline_code : NULL,
                              r->message[0] ? r->message : NULL,
                              j->w->gw[0]->name,
                              j->w->lease,
                              j->idem_row ? idem : NULL,
                              j->idem_row ? j->holder : NULL,
                              j->idem_row ? j->route : NULL};
    log_info("payment %s: %s %s -> %s", j->public_id, j->op, j->key, state);
    snprintf(j->recorded, sizeof(j->recorded), "%s", state);
    /* Outcomes waiting together for a connection share one transaction
     * (sql/013_group_commit.sql). */
    static const struct pgev_batch apply = {
        "SELECT r.*, j.* FROM attempt_apply($1::bigint, $2, $3, $4::bigint, $5, $6, $7, $8,"
        " $9::bigint, $10::bigint, $11, $12) r LEFT JOIN LATERAL attempt_job(r.next_attempt) j"
        " ON true",
        "SELECT * FROM attempt_apply_batch($1::jsonb)", 64};
    pgev_exec_batched(j->w->pg, &apply, 12, params, job_on_recorded, j);
}

static const char *
job_state(enum gw_outcome o)
{
    switch (o) {
    case GW_SUCCEEDED:
        return "succeeded";
    case GW_REQUIRES_CAPTURE:
        return "requires_capture";
    case GW_REQUIRES_ACTION:
        return "requires_action";
    case GW_DECLINED:
        return "failed";
    case GW_CANCELED:
        return "canceled";
    case GW_PENDING:
        return "pending";
    default:
        return NULL;
    }
}

static void
job_on_renewed(void *arg, PGresult *res, const char *err)
{
    (void)arg;
    if (!res || PQresultStatus(res) != PGRES_COMMAND_OK)
        log_warn("an attempt's lease was not changed: %s", err ? err : PQresultErrorMessage(res));
}

/* A job that gives up holds its attempt no longer: the sweeps may take it
 * up after GATEWAY_RETRY_CAP_MS rather than a whole lease (which covers a
 * job's worst case, minutes). */
static void
job_release_lease(struct job *j)
{
    char id[24], after[24];
    snprintf(id, sizeof(id), "%lld", (long long)j->attempt_id);
    snprintf(after, sizeof(after), "%lld", (long long)j->w->ctx->cfg.gateway_retry_cap_ms);
    const char *params[2] = {id, after};
    pgev_exec(j->w->pg,
              "UPDATE payment_transactions SET lease_until = least(lease_until, now() +"
              " $2::bigint * interval '1 millisecond') WHERE id = $1 AND status = 'pending'",
              2, params, job_on_renewed, NULL);
}

/* The operation's answer is definite (or retries ran out). */
static void
job_finish(struct job *j, const struct gw_result *r)
{
    const char *state = job_state(r->outcome);
    if (j->step == STEP_REDRIVE) {
        /* What became of an attempt whose answer may be lost. */
        if (r->outcome == GW_NOT_FOUND && (job_is_charge(j) || strcmp(j->op, "refund") == 0)) {
            j->step = STEP_CALL; /* never reached the gateway: send it (same key) */
            j->tries = 0;
            job_run(j);
            return;
        }
        bool still_needed = (strcmp(j->op, "capture") == 0 && r->outcome == GW_REQUIRES_CAPTURE) ||
                            (strcmp(j->op, "void") == 0 && (r->outcome == GW_REQUIRES_CAPTURE ||
                                                            r->outcome == GW_REQUIRES_ACTION)) ||
                            (strcmp(j->op, "refund_cancel") == 0 && r->outcome == GW_PENDING);
        if (still_needed) {
            j->step = STEP_CALL; /* the charge still waits for it: send it (same key) */
            j->tries = 0;
            job_run(j);
            return;
        }
        /* A refund the gateway holds as pending is recorded so (its id is
         * learnt: it can be canceled); a capture settling later is not. */
        if (state && !(strcmp(j->op, "capture") == 0 && r->outcome == GW_PENDING)) {
            job_record(j, state, r);
            return;
        }
        if (r->outcome == GW_PENDING) { /* still settling: its callback (or a re-drive) ends it */
            job_reply_current(j);
            return;
        }
        goto unresolved;
    }
    if (j->step == STEP_RESOLVE) {
        /* The gateway refused the operation: the charge's state decides. */
        if (r->outcome == GW_NOT_FOUND && job_is_charge(j)) {
            struct gw_result refused = *r;
            snprintf(refused.message, sizeof(refused.message), "%s", j->why);
            job_record(j, "rejected", &refused); /* no charge under this key */
            return;
        }
        if (state) {
            job_record(j, state, r);
            return;
        }
        goto unresolved;
    }
    if (r->outcome == GW_REJECTED && job_is_charge(j)) {
        /* The gateway refused the request. Refused for this key, it may
         * still hold a charge made under it (an earlier send, whose answer
         * was lost, with other parameters): ask by key before calling it
         * rejected, i.e. certainly not charged. */
        snprintf(j->why, sizeof(j->why), "%s", r->message);
        j->step = STEP_RESOLVE;
        j->tries = 0;
        job_run(j);
        return;
    }
    if (r->outcome == GW_REJECTED && strcmp(j->op, "refund") == 0) {
        /* Refused (more than the charge holds, say): nothing was refunded. */
        struct gw_result failed = *r;
        snprintf(failed.code, sizeof(failed.code), "gateway_refused");
        job_record(j, "failed", &failed);
        return;
    }
    if (r->outcome == GW_REJECTED || r->outcome == GW_NOT_FOUND) {
        log_warn("payment %s: gateway refused %s %s (%s); asking for the charge's state",
                 j->public_id, j->op, j->key, r->message);
        j->step = STEP_RESOLVE;
        j->tries = 0;
        job_run(j);
        return;
    }
    if (state) {
        job_record(j, state, r);
        return;
    }
unresolved:
    log_error("payment %s: %s %s %s (%s); left for recovery", j->public_id, j->op, j->key,
              gateway_outcome_name(r->outcome), r->message);
    job_release_lease(j);
    job_reply_current(j);
}

/* ---- gateway calls with retries ---- */

static void
job_on_retry(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    job_run(arg);
}

/* A job that runs long (retries, a long queue) renews its attempt's lease,
 * so the sweeps do not re-drive what a worker still holds. */
static void
job_renew_lease(struct job *j)
{
    int64_t now = shm_mono_ms();
    int64_t lease = j->w->ctx->cfg.processing_lease_ms;
    if (now - j->lease_renewed_ms < lease / 4)
        return;
    j->lease_renewed_ms = now;
    char id[24];
    snprintf(id, sizeof(id), "%lld", (long long)j->attempt_id);
    const char *params[2] = {id, j->w->lease};
    pgev_exec(j->w->pg,
              "UPDATE payment_transactions SET lease_until = now() + $2::bigint * interval"
              " '1 millisecond' WHERE id = $1 AND status = 'pending'",
              2, params, job_on_renewed, NULL);
}

static void
job_retry_later(struct job *j, const struct gw_result *r)
{
    /* Full jitter: a random delay up to the exponential ceiling, capped;
     * a Retry-After from the gateway (429) is honoured, within the cap. */
    const struct config *cfg = &j->w->ctx->cfg;
    uint32_t rnd = 0;
    if (getrandom(&rnd, sizeof(rnd), 0) != sizeof(rnd))
        rnd = 0;
    int64_t cap = cfg->gateway_retry_cap_ms;
    int64_t ceiling = j->tries < 30 ? (int64_t)JOB_BACKOFF_BASE_MS << j->tries : cap;
    if (ceiling > cap)
        ceiling = cap;
    long delay = (long)(rnd % (uint32_t)ceiling);
    if (r->retry_after_ms > 0)
        delay = r->retry_after_ms < cap ? r->retry_after_ms : (long)cap;
    log_warn("payment %s: gateway %s %s (%s); retry %d in %ld ms with the same key", j->public_id,
             j->w->gw[j->prov]->name, gateway_outcome_name(r->outcome), r->message, j->tries,
             delay);
    job_renew_lease(j);
    if (!j->retry)
        j->retry = evtimer_new(j->w->ctx->base, job_on_retry, j);
    struct timeval tv = {delay / 1000, (delay % 1000) * 1000};
    evtimer_add(j->retry, &tv);
}

static void
job_on_pinned(void *arg, PGresult *res, const char *err)
{
    struct job *j = arg;
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK) {
        /* Not pinned, so not sent: the sweep re-drives it from the same provider. */
        log_error("payment %s: failover not recorded: %s; left for recovery", j->public_id,
                  err ? err : PQresultErrorMessage(res));
        job_reply_current(j);
        return;
    }
    if (PQntuples(res) == 0) {
        /* Another job moved it first, or may have reached the provider:
         * it stays, and recovery asks that provider again. */
        log_warn("payment %s: not moved from %s (another job may have reached it); left for "
                 "recovery",
                 j->public_id, j->w->gw[j->prov]->name);
        job_reply_current(j);
        return;
    }
    log_warn("payment %s: %s did not take it (%s); failing over to %s", j->public_id,
             j->w->gw[j->prov]->name, j->why, j->w->gw[j->prov + 1]->name);
    metric_inc(role_metrics(j->w->ctx), MC_GATEWAY_FAILOVERS);
    j->prov++;
    snprintf(j->provider, sizeof(j->provider), "%s", j->w->gw[j->prov]->name);
    job_run(j);
}

/* The provider certainly did not take the charge: pin the attempt to the
 * next provider (so recovery asks that one) before calling it. Every call
 * to a provider is recorded first (job_record_tried), so the provider may
 * be left only when the calls recorded for it are exactly this job's own
 * (one, or none when the breaker refused the first). */
static void
job_failover(struct job *j, const struct gw_result *r)
{
    struct worker *w = j->w;
    char id[24];
    snprintf(id, sizeof(id), "%lld", (long long)j->attempt_id);
    snprintf(j->why, sizeof(j->why), "%s", r->message);
    const char *params[4] = {id, w->gw[j->prov + 1]->name, w->gw[j->prov]->name,
                             j->sent[j->prov] ? "1" : "0"};
    pgev_exec(w->pg,
              "UPDATE payment_transactions SET gateway_provider = $2 WHERE id = $1"
              " AND status = 'pending' AND gateway_provider = $3"
              " AND coalesce(cardinality(array_positions(providers_tried, $3::text)), 0)"
              "  = $4::int RETURNING 1",
              4, params, job_on_pinned, j);
}

/* What follows a gateway answer (or a breaker's refusal): failover when
 * the provider certainly did not take a charge and another one is left,
 * a retry with the same key and provider for what may be retried, else
 * the answer is acted on (or the attempt left for recovery). */
static void
job_next(struct job *j, const struct gw_result *r, bool refused)
{
    const struct config *cfg = &j->w->ctx->cfg;
    /* Failover only when nothing this job heard from the provider left a
     * doubt, and no job before this one's first call reached it. */
    bool clean = !j->unsure[j->prov] && !j->tried_before[j->prov];
    if (r->outcome == GW_NOT_PROCESSED && job_is_charge(j) && j->step == STEP_CALL &&
        j->prov + 1 < j->w->n_gw && clean) {
        job_failover(j, r);
        return;
    }
    bool retryable = r->outcome == GW_NOT_PROCESSED || r->outcome == GW_AMBIGUOUS;
    if (retryable && !refused && ++j->tries < cfg->gateway_max_attempts) {
        job_retry_later(j, r);
        return;
    }
    job_finish(j, r);
}

static void
job_on_gateway(void *arg, const struct gw_result *r)
{
    struct job *j = arg;
    metric_observe_us(role_metrics(j->w->ctx), MH_GATEWAY_SIM,
                      (uint64_t)(http_now_us() - j->gateway_started_us));
    bool retryable = r->outcome == GW_NOT_PROCESSED || r->outcome == GW_AMBIGUOUS;
    const struct config *cfg = &j->w->ctx->cfg;
    /* A decline or another definite answer shows the gateway is up. */
    struct breaker_policy policy = {cfg->breaker_failures, cfg->breaker_failure_rate,
                                    cfg->breaker_window_ms};
    breaker_done(&j->w->ctx->seg->breakers[j->prov], !retryable, j->probe, &policy,
                 j->w->gw[j->prov]->name);
    j->probe = false;
    if (r->outcome != GW_NOT_PROCESSED)
        j->unsure[j->prov] = true; /* it may hold the charge: never leave it */
    job_next(j, r, false);
}

static void
job_on_tried(void *arg, PGresult *res, const char *err)
{
    struct job *j = arg;
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1) {
        if (res && PQresultStatus(res) == PGRES_TUPLES_OK) {
            job_reply_current(j); /* moved on: settled, or pinned to another provider */
            return;
        }
        log_error("payment %s: gateway attempt not recorded: %s; left for recovery", j->public_id,
                  err ? err : PQresultErrorMessage(res));
        job_reply_current(j);
        return;
    }
    j->tried_before[j->prov] = strcmp(PQgetvalue(res, 0, 0), "t") == 0;
    j->sent[j->prov] = true; /* recorded: from now on it counts as sent */
    job_run(j);
}

/* With several providers, records that this attempt goes to the provider
 * before the first call, and learns whether an earlier job sent it there. */
static void
job_record_tried(struct job *j)
{
    char id[24];
    snprintf(id, sizeof(id), "%lld", (long long)j->attempt_id);
    const char *params[2] = {id, j->w->gw[j->prov]->name};
    pgev_exec(j->w->pg,
              /* Only the provider the attempt is pinned to may be called: a
               * job re-sent after another one moved it finds no row. */
              "WITH old AS (SELECT id, $2 = ANY(providers_tried) AS before"
              "  FROM payment_transactions WHERE id = $1 AND status = 'pending'"
              "  AND gateway_provider = $2 FOR UPDATE)"
              " UPDATE payment_transactions a SET providers_tried ="
              "  array_append(a.providers_tried, $2::text)"
              " FROM old WHERE a.id = old.id RETURNING old.before",
              2, params, job_on_tried, j);
}

/* Runs the job's current step against its provider. */
static void
job_run(struct job *j)
{
    struct gw_request req = {0};
    req.idempotency_key = j->key;
    req.amount = j->amount;
    req.currency = j->currency;
    req.payment_method = j->payment_method;
    req.charge_id = j->target;
    if (j->step != STEP_CALL) {
        /* Ask what became of it: a charge (or refund) by the key that
         * created it, a capture's or void's charge (a refund cancel's
         * refund) by its id, or by the key that created it when its id was
         * never learnt. */
        req.op = job_is_refund(j) ? GW_RETRIEVE_REFUND : GW_RETRIEVE;
        if (job_is_charge(j) || strcmp(j->op, "refund") == 0) {
            req.charge_id = NULL;
        } else if (!j->target[0]) {
            req.idempotency_key = j->target_key;
        }
    } else if (strcmp(j->op, "refund") == 0) {
        req.op = GW_REFUND;
    } else if (strcmp(j->op, "refund_cancel") == 0) {
        req.op = GW_REFUND_CANCEL;
    } else if (job_is_charge(j)) {
        req.op = GW_CHARGE;
        req.capture = strcmp(j->op, "charge") == 0;
    } else if (strcmp(j->op, "capture") == 0) {
        req.op = GW_CAPTURE;
    } else {
        req.op = GW_CANCEL;
    }
    /* With several providers a charge's first call to one is recorded
     * first; the breaker is asked after, so that a probe token it hands out
     * is spent on this very call. */
    if (j->w->n_gw > 1 && req.op == GW_CHARGE && !j->sent[j->prov]) {
        job_record_tried(j);
        return;
    }
    if (!j->probe && !breaker_allow(&j->w->ctx->seg->breakers[j->prov],
                                    j->w->ctx->cfg.breaker_open_ms, &j->probe)) {
        /* Refused without calling: certainly not received. Another provider
         * may take a charge; else the attempt stays pending and the sweeps
         * finish it once the gateway is back. */
        struct gw_result r = {.outcome = GW_NOT_PROCESSED};
        snprintf(r.message, sizeof(r.message), "circuit breaker open");
        job_next(j, &r, true);
        return;
    }
    if (req.op != GW_RETRIEVE)
        j->sent[j->prov] = true;
    j->gateway_started_us = http_now_us();
    struct gateway *gw = j->w->gw[j->prov];
    gw->call(gw, &req, job_on_gateway, j);
}

/* ---- intake ---- */

static int
job_decode(struct job *j, const struct envelope *env)
{
    const msgpack_object *b = env->body;
    bool redrive = false;
    if (envelope_get_int(b, "attempt_id", &j->attempt_id) < 0 ||
        envelope_get_str(b, "key", j->key, sizeof(j->key)) < 0 ||
        envelope_get_str(b, "op", j->op, sizeof(j->op)) < 0 ||
        envelope_get_str(b, "purpose", j->purpose, sizeof(j->purpose)) < 0 ||
        envelope_get_int(b, "intent_id", &j->intent_id) < 0 ||
        envelope_get_str(b, "public_id", j->public_id, sizeof(j->public_id)) < 0 ||
        envelope_get_int(b, "amount", &j->amount) < 0 ||
        envelope_get_str(b, "currency", j->currency, sizeof(j->currency)) < 0 ||
        envelope_get_str(b, "payment_method", j->payment_method, sizeof(j->payment_method)) < 0 ||
        envelope_get_str(b, "provider", j->provider, sizeof(j->provider)) < 0 ||
        envelope_get_str(b, "target", j->target, sizeof(j->target)) < 0 ||
        envelope_get_str(b, "target_key", j->target_key, sizeof(j->target_key)) < 0 ||
        envelope_get_bool(b, "redrive", &redrive) < 0)
        return -1;
    if (!job_is_charge(j) && !job_is_refund(j) && strcmp(j->op, "capture") != 0 &&
        strcmp(j->op, "void") != 0)
        return -1;
    if (j->attempt_id <= 0 || j->intent_id <= 0 || j->amount < 0 || !j->key[0])
        return -1;
    if (!job_is_charge(j) && !j->target[0] && !j->target_key[0])
        return -1; /* a capture or void names the charge it acts on */
    j->step = redrive ? STEP_REDRIVE : STEP_CALL;
    if (envelope_get(b, "idem_row") &&
        (envelope_get_int(b, "idem_row", &j->idem_row) < 0 ||
         envelope_get_str(b, "holder", j->holder, sizeof(j->holder)) < 0 ||
         envelope_get_str(b, "route", j->route, sizeof(j->route)) < 0 || j->idem_row <= 0))
        return -1;
    return 0;
}

static void
worker_on_message(void *arg, struct nngev_job *nj, nng_msg *msg)
{
    struct worker *w = arg;
    struct envelope env;
    enum envelope_error e = envelope_decode(&env, nng_msg_body(msg), nng_msg_len(msg));
    if (e == ENV_OK && strcmp(env.type, MSG_PING) == 0) {
        envelope_free(&env);
        nng_msg *reply = role_answer_ping(w->ctx, nng_msg_body(msg), nng_msg_len(msg));
        nng_msg_free(msg);
        nngev_respond(nj, reply);
        return;
    }
    struct job *j = xcalloc(1, sizeof(*j));
    j->w = w;
    j->nj = nj;
    if (e != ENV_OK || strcmp(env.type, MSG_JOB) != 0 || job_decode(j, &env) < 0) {
        log_warn("dropped job: %s%s%s", e != ENV_OK ? envelope_strerror(e) : "bad job body",
                 env.field[0] ? ": " : "", env.field);
        metric_inc(role_metrics(w->ctx), MC_ENVELOPES_REJECTED);
        envelope_free(&env);
        nng_msg_free(msg);
        free(j);
        nngev_respond(nj, NULL);
        return;
    }
    snprintf(j->request_id, sizeof(j->request_id), "%s", env.request_id);
    int64_t queued_ms = shm_now_ms() - env.sent_at_ms;
    envelope_free(&env);
    nng_msg_free(msg);
    worker_jobs_changed(w, +1);
    j->lease_renewed_ms = shm_mono_ms();
    if (queued_ms > w->ctx->cfg.processing_lease_ms / 4) {
        j->lease_renewed_ms = 0; /* it waited long in a queue: renew now */
        job_renew_lease(j);
    }
    j->prov = worker_provider(w, j->provider);
    if (j->prov < 0) {
        /* Only the provider it is pinned to can say whether it was charged. */
        log_error("payment %s is pinned to gateway provider %s, which is not configured; left "
                  "pending",
                  j->public_id, j->provider);
        job_reply_current(j);
        return;
    }
    job_run(j);
}

int
worker_main(struct role_ctx *ctx)
{
    struct worker w = {.ctx = ctx};
    const struct config *cfg = &ctx->cfg;
    char url[256];
    int rv;

    role_url(cfg, ROLE_WORKER, ctx->index, url, sizeof(url));
    if ((rv = nng_rep0_open(&w.sock)) != 0 || (rv = nng_listen(w.sock, url, NULL, 0)) != 0) {
        log_error("cannot listen at %s: %s", url, nng_strerror(rv));
        return EXIT_ROLE_FAILURE;
    }
    snprintf(w.lease, sizeof(w.lease), "%lld", (long long)cfg->processing_lease_ms);
    w.pg = pgev_pool_new(ctx->base, cfg, cfg->db_pool_size);
    w.curl = curlev_new(ctx->base);
    w.wake = wake_new(cfg);
    for (int i = 0; i < cfg->n_providers && i < SHM_MAX_BREAKERS; i++)
        w.gw[w.n_gw++] = gateway_sim_new(w.curl, cfg->providers[i].name, cfg->providers[i].url,
                                         cfg->providers[i].key, (long)cfg->gateway_timeout_ms);
    nngev_serve(ctx->nngev, w.sock, cfg->worker_concurrency, worker_on_message, &w);
    role_ready(ctx);
    event_base_dispatch(ctx->base);
    nng_close(w.sock);
    for (int i = 0; i < w.n_gw; i++)
        w.gw[i]->free(w.gw[i]);
    curlev_free(w.curl);
    wake_free(w.wake);
    pgev_pool_free(w.pg);
    return 0;
}
