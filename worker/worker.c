/*
 * worker - the gateway role.
 *
 * Offers worker_main(), run by role_run() in each worker process. A worker
 * listens for jobs from the api processes on its own REP socket
 * (ipc://RUN_DIR/worker.N.ipc), WORKER_CONCURRENCY at once, and runs each
 * on its libevent loop: a gateway call through libcurl's multi interface,
 * then one SQL statement that records the outcome (intent status with an
 * optimistic version check, a payment_transactions row and the outbox
 * event, in one transaction), then the reply with the intent object.
 *
 * The gateway idempotency key is the payment id with the operation and the
 * version the attempt started from, so a job that NNG re-sends after a
 * worker died, or that is retried here after a timeout, can never charge
 * twice. Only failures that are certainly not processed or
 * ambiguous are retried (exponential back-off with full jitter, same key);
 * a decline is final. When retries run out the payment stays `processing`
 * for the recovery sweep. Calls common/, gateway.
 */
#include <jansson.h>
#include <nng/nng.h>
#include <nng/protocol/reqrep0/rep.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "envelope.h"
#include "breaker.h"
#include "gateway.h"
#include "httputil.h"
#include "ids.h"
#include "log.h"
#include "metrics.h"
#include "pgev.h"
#include "role.h"
#include "xmalloc.h"

#define JOB_BACKOFF_BASE_MS 100

struct worker {
    struct role_ctx *ctx;
    struct pgev_pool *pg;
    struct curlev *curl;
    struct gateway *gw[CONFIG_MAX_PROVIDERS]; /* GATEWAY_PROVIDERS, in priority order */
    int n_gw;
    nng_socket sock;
    int jobs;
};

struct job {
    struct worker *w;
    struct nngev_job *nj;
    char op[16];
    char request_id[ENVELOPE_ID_MAX];
    int64_t intent_id, version, account_id, amount, amount_to_capture;
    char public_id[64], currency[8], payment_method[256], capture_method[16], reason[40];
    char charge_id[64];
    char provider[32]; /* the provider this payment is pinned to; empty: the first */
    int prov;          /* its index in w->gw */
    /* Per provider, with several: this job sent to it; an answer from it was
     * not certain; another attempt with this key may have reached it. */
    bool sent[CONFIG_MAX_PROVIDERS], unsure[CONFIG_MAX_PROVIDERS];
    bool tried_before[CONFIG_MAX_PROVIDERS];
    char why[256]; /* why the current provider is being left */
    char idem_key[128];
    int attempt;
    int64_t gateway_started_us;
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
job_reply(struct job *j, const char *object, const char *error)
{
    struct envelope_writer w;
    size_t n;
    envelope_begin(&w, MSG_JOB_REPLY, j->request_id, 0, 1);
    if (object)
        envelope_put_str(&w, "object", object);
    else
        envelope_put_str(&w, "error", error ? error : "failed");
    void *bytes = envelope_finish(&w, &n);
    nngev_respond(j->nj, nngev_msg(bytes, n));
    free(bytes);
    if (j->retry)
        event_free(j->retry);
    worker_jobs_changed(j->w, -1);
    free(j);
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

/* Replies with the intent as it is now (after another worker won the race,
 * or when the outcome is not known yet). */
static void
job_reply_current(struct job *j)
{
    char id[24];
    snprintf(id, sizeof(id), "%lld", (long long)j->intent_id);
    const char *params[1] = {id};
    pgev_exec(j->w->pg,
              "SELECT payment_intent_object(p)::text FROM payment_intents p WHERE id = $1", 1,
              params, job_on_current, j);
}

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
    }
    if (final && age_us > 0)
        metric_observe_us(m, MH_PAYMENT_DURATION, (uint64_t)age_us);
}

static void
job_on_recorded(void *arg, PGresult *res, const char *err)
{
    struct job *j = arg;
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK) {
        log_error("payment %s: outcome not recorded: %s", j->public_id,
                  err ? err : PQresultErrorMessage(res));
        job_reply(j, NULL, "the outcome could not be recorded");
        return;
    }
    if (PQntuples(res) == 0) {
        /* The version moved: another attempt recorded it first. */
        job_reply_current(j);
        return;
    }
    job_count_outcome(j, PQgetvalue(res, 0, 3), strtoll(PQgetvalue(res, 0, 5), NULL, 10),
                      strtoll(PQgetvalue(res, 0, 6), NULL, 10));
    job_reply(j, PQgetvalue(res, 0, 0), NULL);
}

struct outcome {
    const char *status;
    const char *amount_received;
    const char *amount_capturable;
    const char *last_payment_error;
    const char *next_action;
    const char *tx_type;
    const char *tx_status;
    const char *tx_amount;
    const char *failure_code;
    const char *failure_message;
    const char *event;
    const char *cancellation_reason;
};

static void
job_record(struct job *j, const struct outcome *o, const char *charge_id)
{
    char id[24], version[24], txn[64];
    snprintf(id, sizeof(id), "%lld", (long long)j->intent_id);
    snprintf(version, sizeof(version), "%lld", (long long)j->version);
    ids_time_ordered(txn, sizeof(txn), "txn_", 8);
    const char *params[17] = {id,
                              version,
                              o->status,
                              o->amount_received,
                              o->amount_capturable,
                              o->last_payment_error,
                              o->next_action,
                              charge_id && *charge_id ? charge_id : NULL,
                              o->cancellation_reason,
                              txn,
                              o->tx_type,
                              o->tx_status,
                              o->tx_amount,
                              o->failure_code,
                              o->failure_message,
                              o->event,
                              j->w->gw[j->prov]->name};
    pgev_exec(j->w->pg,
              "WITH upd AS (UPDATE payment_intents p SET status = $3,"
              "  amount_received = coalesce($4::bigint, p.amount_received),"
              "  amount_capturable = coalesce($5::bigint, p.amount_capturable),"
              "  last_payment_error = $6::jsonb, next_action = $7::jsonb,"
              "  gateway_intent_id = coalesce(p.gateway_intent_id, $8),"
              "  latest_charge = coalesce($8, p.latest_charge),"
              "  cancellation_reason = coalesce($9, p.cancellation_reason),"
              "  canceled_at = CASE WHEN $3 = 'canceled' THEN now() ELSE p.canceled_at END,"
              "  version = p.version + 1, updated_at = now()"
              "  WHERE p.id = $1 AND p.version = $2 RETURNING p.*),"
              " tx AS (INSERT INTO payment_transactions (transaction_id, payment_intent_id, type,"
              "  status, amount, currency, gateway_provider, gateway_transaction_id, failure_code,"
              "  failure_message, processed_at)"
              "  SELECT $10, upd.id, $11, $12, $13::bigint, upd.currency, $17, $8, $14, $15, now()"
              "  FROM upd RETURNING 1),"
              " saga AS (SELECT saga_outcome_event(ROW(upd.*)::payment_intents, $10, $15) FROM upd"
              "  WHERE upd.order_id IS NOT NULL"
              "  AND upd.status IN ('succeeded', 'requires_payment_method', 'canceled')),"
              " ev AS (SELECT outbox_event(upd.account_id, $16,"
              "  payment_intent_object(ROW(upd.*)::payment_intents), upd.public_id) FROM upd)"
              " SELECT payment_intent_object(ROW(upd.*)::payment_intents)::text,"
              "  (SELECT count(*) FROM tx), (SELECT count(*) FROM ev), upd.status,"
              "  (SELECT count(*) FROM saga),"
              "  (extract(epoch FROM clock_timestamp() - upd.created_at) * 1000000)::bigint,"
              "  upd.amount_received FROM upd",
              17, params, job_on_recorded, j);
}

static char *
job_decline_error(struct job *j, const struct gw_result *r)
{
    json_t *pm = json_pack("{s:s,s:s,s:s}", "id", j->payment_method, "object", "payment_method",
                           "type", "card");
    json_t *err = json_pack(
        "{s:s,s:s,s:s,s:o}", "type", "card_error", "code", r->code[0] ? r->code : "card_declined",
        "message", r->message[0] ? r->message : "Your card was declined.", "payment_method", pm);
    if (r->decline_code[0])
        json_object_set_new(err, "decline_code", json_string(r->decline_code));
    char *text = json_dumps(err, JSON_COMPACT);
    json_decref(err);
    return text;
}

static char *
job_rejected_error(const struct gw_result *r)
{
    json_t *err = json_pack("{s:s,s:s,s:s}", "type", "api_error", "code", "processing_error",
                            "message", "The payment gateway could not process this payment.");
    (void)r; /* the gateway's own words go to the transaction row, not to the client */
    char *text = json_dumps(err, JSON_COMPACT);
    json_decref(err);
    return text;
}

static void
job_finish(struct job *j, const struct gw_result *r)
{
    struct outcome o = {0};
    char amount[24], captured[24];
    char *lpe = NULL;
    snprintf(amount, sizeof(amount), "%lld", (long long)j->amount);
    snprintf(captured, sizeof(captured), "%lld",
             (long long)(j->amount_to_capture ? j->amount_to_capture : j->amount));

    switch (r->outcome) {
    case GW_SUCCEEDED:
        o.status = "succeeded";
        o.amount_capturable = "0";
        o.tx_status = "succeeded";
        o.event = "payment_intent.succeeded";
        if (strcmp(j->op, "capture") == 0) {
            o.amount_received = captured;
            o.tx_type = "capture";
            o.tx_amount = captured;
        } else {
            o.amount_received = amount;
            o.tx_type = "charge";
            o.tx_amount = amount;
        }
        break;
    case GW_REQUIRES_CAPTURE:
        o.status = "requires_capture";
        o.amount_capturable = amount;
        o.tx_type = "authorization";
        o.tx_status = "succeeded";
        o.tx_amount = amount;
        o.event = "payment_intent.amount_capturable_updated";
        break;
    case GW_REQUIRES_ACTION:
        o.status = "requires_action";
        o.next_action = "{\"type\":\"use_stripe_sdk\",\"use_stripe_sdk\":{\"type\":"
                        "\"three_d_secure_redirect\"}}";
        o.tx_type = "authorization";
        o.tx_status = "requires_action";
        o.tx_amount = amount;
        o.event = "payment_intent.requires_action";
        break;
    case GW_DECLINED:
        lpe = job_decline_error(j, r);
        o.status = "requires_payment_method";
        o.last_payment_error = lpe;
        o.tx_type = "charge";
        o.tx_status = "failed";
        o.tx_amount = amount;
        o.failure_code = r->decline_code[0] ? r->decline_code : r->code;
        o.failure_message = r->message;
        o.event = "payment_intent.payment_failed";
        break;
    case GW_CANCELED:
        o.status = "canceled";
        o.amount_capturable = "0";
        o.tx_type = "cancel";
        o.tx_status = "succeeded";
        o.tx_amount = "0";
        o.event = "payment_intent.canceled";
        o.cancellation_reason = j->reason[0] ? j->reason : NULL;
        break;
    case GW_REJECTED:
        if (strcmp(j->op, "confirm") != 0)
            goto unresolved;
        /* The gateway refused the request itself: certainly not charged. */
        lpe = job_rejected_error(r);
        o.status = "requires_payment_method";
        o.last_payment_error = lpe;
        o.tx_type = "charge";
        o.tx_status = "failed";
        o.tx_amount = amount;
        o.failure_code = "processing_error";
        o.failure_message = r->message;
        o.event = "payment_intent.payment_failed";
        break;
    case GW_PENDING:
        /* Taken, settled later: the gateway's callback records the outcome
         * (callbacks.c); asking again with the same key is harmless. */
        log_info("payment %s: %s accepted by %s, settles by callback", j->public_id, j->op,
                 j->w->gw[j->prov]->name);
        job_reply_current(j);
        return;
    default:
    unresolved:
        log_error("payment %s: %s %s (%s); left for recovery", j->public_id, j->op,
                  gateway_outcome_name(r->outcome), r->message);
        job_reply_current(j);
        return;
    }
    log_info("payment %s: %s -> %s", j->public_id, j->op, o.status);
    job_record(j, &o, r->charge_id);
    free(lpe);
}

/* ---- gateway calls with retries ---- */

static void job_call(struct job *j);

static void
job_on_retry(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    job_call(arg);
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
    int64_t ceiling = j->attempt < 30 ? (int64_t)JOB_BACKOFF_BASE_MS << j->attempt : cap;
    if (ceiling > cap)
        ceiling = cap;
    long delay = (long)(rnd % (uint32_t)ceiling);
    if (r->retry_after_ms > 0)
        delay = r->retry_after_ms < cap ? r->retry_after_ms : (long)cap;
    log_warn("payment %s: gateway %s %s (%s); retry %d in %ld ms with the same key", j->public_id,
             j->w->gw[j->prov]->name, gateway_outcome_name(r->outcome), r->message, j->attempt,
             delay);
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
        /* Another attempt moved it first, or may have reached the provider:
         * it stays, and recovery asks that provider again. */
        log_warn("payment %s: not moved from %s (another attempt may have reached it); left for "
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
    job_call(j);
}

/* The provider certainly did not take the charge: pin the payment to the
 * next provider (so recovery asks that one) before calling it. */
static void
job_failover(struct job *j, const struct gw_result *r)
{
    struct worker *w = j->w;
    char id[24], version[24];
    snprintf(id, sizeof(id), "%lld", (long long)j->intent_id);
    snprintf(version, sizeof(version), "%lld", (long long)j->version);
    snprintf(j->why, sizeof(j->why), "%s", r->message);
    /* When this job never called the provider it leaves, another attempt
     * with the same key may have: then the move is refused. */
    /* Every call to a provider is recorded first (job_record_tried), so the
     * provider may be left only when the calls recorded for it are exactly
     * this job's own (one, or none when the breaker refused the first). */
    const char *params[5] = {id, version, w->gw[j->prov + 1]->name, w->gw[j->prov]->name,
                             j->sent[j->prov] ? "1" : "0"};
    pgev_exec(w->pg,
              "UPDATE payment_intents SET gateway_provider = $3 WHERE id = $1 AND version = $2"
              " AND status = 'processing' AND gateway_provider = $4"
              " AND (CASE WHEN gateway_tried_version = $2 THEN"
              "  coalesce(cardinality(array_positions(gateway_tried, $4::text)), 0) ELSE 0 END)"
              "  = $5::int RETURNING 1",
              5, params, job_on_pinned, j);
}

/* What follows a gateway answer (or a breaker's refusal): failover when
 * the provider certainly did not take a charge and another one is left,
 * a retry with the same key and provider for what may be retried, else
 * the outcome is recorded (or left for recovery). */
static void
job_next(struct job *j, const struct gw_result *r, bool refused)
{
    const struct config *cfg = &j->w->ctx->cfg;
    /* Failover only when nothing this job heard from the provider left a
     * doubt, and no attempt before this job's own first call reached it. */
    bool clean = !j->unsure[j->prov] && !j->tried_before[j->prov];
    if (r->outcome == GW_NOT_PROCESSED && strcmp(j->op, "confirm") == 0 &&
        j->prov + 1 < j->w->n_gw && clean) {
        job_failover(j, r);
        return;
    }
    bool retryable = r->outcome == GW_NOT_PROCESSED || r->outcome == GW_AMBIGUOUS;
    if (retryable && !refused && ++j->attempt < cfg->gateway_max_attempts) {
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
job_send(struct job *j, const struct gw_request *req)
{
    j->sent[j->prov] = true;
    j->gateway_started_us = http_now_us();
    struct gateway *gw = j->w->gw[j->prov];
    gw->call(gw, req, job_on_gateway, j);
}

static void
job_on_tried(void *arg, PGresult *res, const char *err)
{
    struct job *j = arg;
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1) {
        if (res && PQresultStatus(res) == PGRES_TUPLES_OK) {
            job_reply_current(j); /* moved on: finished, or pinned to another provider */
            return;
        }
        log_error("payment %s: gateway attempt not recorded: %s; left for recovery", j->public_id,
                  err ? err : PQresultErrorMessage(res));
        job_reply_current(j);
        return;
    }
    j->tried_before[j->prov] = strcmp(PQgetvalue(res, 0, 0), "t") == 0;
    j->sent[j->prov] = true; /* recorded: from now on it counts as sent */
    job_call(j);
}

/* With several providers, records that this attempt goes to the provider
 * before the first call, and learns whether an earlier attempt did. */
static void
job_record_tried(struct job *j)
{
    char id[24], version[24];
    snprintf(id, sizeof(id), "%lld", (long long)j->intent_id);
    snprintf(version, sizeof(version), "%lld", (long long)j->version);
    const char *params[3] = {id, version, j->w->gw[j->prov]->name};
    pgev_exec(j->w->pg,
              /* Only the provider the payment is pinned to may be called: a
               * job re-sent after another attempt moved it finds no row. */
              "WITH old AS (SELECT id, coalesce(gateway_tried_version = $2 AND"
              "  $3 = ANY(gateway_tried), false) AS before FROM payment_intents"
              "  WHERE id = $1 AND version = $2 AND status = 'processing'"
              "  AND gateway_provider = $3 FOR UPDATE)"
              " UPDATE payment_intents p SET gateway_tried = CASE WHEN"
              "  p.gateway_tried_version = $2 THEN array_append(p.gateway_tried, $3::text)"
              "  ELSE ARRAY[$3::text] END, gateway_tried_version = $2"
              " FROM old WHERE p.id = old.id RETURNING old.before",
              3, params, job_on_tried, j);
}

static void
job_call(struct job *j)
{
    struct gw_request req = {0};
    req.idempotency_key = j->idem_key;
    req.amount = j->amount;
    req.currency = j->currency;
    req.payment_method = j->payment_method;
    req.charge_id = j->charge_id;
    if (strcmp(j->op, "confirm") == 0) {
        req.op = GW_CHARGE;
        req.capture = strcmp(j->capture_method, "manual") != 0;
    } else if (strcmp(j->op, "capture") == 0) {
        req.op = GW_CAPTURE;
        req.amount = j->amount_to_capture;
    } else {
        req.op = GW_CANCEL;
    }
    if (!breaker_allow(&j->w->ctx->seg->breakers[j->prov], j->w->ctx->cfg.breaker_open_ms,
                       &j->probe)) {
        /* Refused without calling: certainly not received. Another provider
         * may take it; else the payment stays processing and the sweeps
         * finish it once the gateway is back. */
        struct gw_result r = {.outcome = GW_NOT_PROCESSED};
        snprintf(r.message, sizeof(r.message), "circuit breaker open");
        job_next(j, &r, true);
        return;
    }
    if (j->w->n_gw > 1 && req.op == GW_CHARGE && !j->sent[j->prov]) {
        job_record_tried(j);
        return;
    }
    job_send(j, &req);
}

/* Capture and cancel act on the charge the confirm created. */
static void
job_on_charge_id(void *arg, PGresult *res, const char *err)
{
    struct job *j = arg;
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1 ||
        PQgetisnull(res, 0, 0)) {
        job_reply(j, NULL, err ? err : "no authorization to act on");
        return;
    }
    snprintf(j->charge_id, sizeof(j->charge_id), "%s", PQgetvalue(res, 0, 0));
    job_call(j);
}

/* ---- intake ---- */

static int
job_decode(struct job *j, const struct envelope *env)
{
    const msgpack_object *b = env->body;
    if (envelope_get_str(b, "op", j->op, sizeof(j->op)) < 0 ||
        envelope_get_int(b, "intent_id", &j->intent_id) < 0 ||
        envelope_get_int(b, "version", &j->version) < 0 ||
        envelope_get_str(b, "public_id", j->public_id, sizeof(j->public_id)) < 0 ||
        envelope_get_int(b, "account_id", &j->account_id) < 0 ||
        envelope_get_int(b, "amount", &j->amount) < 0 ||
        envelope_get_str(b, "currency", j->currency, sizeof(j->currency)) < 0 ||
        envelope_get_str(b, "payment_method", j->payment_method, sizeof(j->payment_method)) < 0 ||
        envelope_get_str(b, "capture_method", j->capture_method, sizeof(j->capture_method)) < 0 ||
        envelope_get_str(b, "provider", j->provider, sizeof(j->provider)) < 0 ||
        envelope_get_int(b, "amount_to_capture", &j->amount_to_capture) < 0 ||
        envelope_get_str(b, "reason", j->reason, sizeof(j->reason)) < 0)
        return -1;
    if (strcmp(j->op, "confirm") != 0 && strcmp(j->op, "capture") != 0 &&
        strcmp(j->op, "cancel") != 0)
        return -1;
    if (j->intent_id <= 0 || j->amount <= 0 || j->amount_to_capture < 0)
        return -1;
    return 0;
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
    envelope_free(&env);
    nng_msg_free(msg);
    worker_jobs_changed(w, +1);
    /* One gateway idempotency key per attempt: the payment id and the version
     * the attempt started from. A job re-sent by NNG, or retried here, has the
     * same version and so the same key (never a second charge); confirming
     * again after a decline is a new attempt with a new key. */
    snprintf(j->idem_key, sizeof(j->idem_key), "%s:%s:%lld", j->public_id, j->op,
             (long long)j->version);
    j->prov = worker_provider(w, j->provider);
    if (j->prov < 0) {
        /* Only the provider it is pinned to can say whether it was charged. */
        log_error("payment %s is pinned to gateway provider %s, which is not configured; left "
                  "processing",
                  j->public_id, j->provider);
        job_reply_current(j);
        return;
    }
    if (strcmp(j->op, "confirm") == 0) {
        job_call(j);
        return;
    }
    char id[24];
    snprintf(id, sizeof(id), "%lld", (long long)j->intent_id);
    const char *params[1] = {id};
    pgev_exec(w->pg, "SELECT gateway_intent_id FROM payment_intents WHERE id = $1", 1, params,
              job_on_charge_id, j);
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
    w.pg = pgev_pool_new(ctx->base, cfg, cfg->db_pool_size);
    w.curl = curlev_new(ctx->base);
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
    pgev_pool_free(w.pg);
    return 0;
}
