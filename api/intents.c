/*
 * intents - the PaymentIntent endpoints: create, retrieve, update, list,
 * confirm, capture and cancel.
 *
 * Offers intents_create() ... intents_cancel(), intents_can_send_job() and
 * intents_respond_current(). Every state change is one call of a SQL
 * function of sql/010_attempts.sql (pi_create, pi_update, pi_confirm,
 * pi_capture, pi_cancel): it locks the intent, asks the state machine's
 * table whether the operation is allowed from its status (a refusal answers
 * payment_intent_unexpected_state, never a silent overwrite), checks that
 * this request still holds its Idempotency-Key claim, and writes the change,
 * its event and — when the operation moves money — the gateway attempt, in
 * one transaction. The attempt goes to a worker over NNG (one REQ context
 * per job); the client gets the outcome, or the intent as `processing`
 * after CONFIRM_WAIT_MS while the job goes on. A declined card answers 402
 * with a card_error, as Stripe does; a capture the gateway refused answers
 * 400. Another account's intent is simply not found (404). Calls api,
 * request, params, pgev, nngev, jobs, money, ids.
 */
#include <event2/buffer.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api.h"
#include "envelope.h"
#include "ids.h"
#include "log.h"
#include "money.h"
#include "xmalloc.h"

static const char *const create_params[] = {"amount",         "currency",   "customer",
                                            "description",    "metadata",   "capture_method",
                                            "payment_method", "confirm",    "payment_method_types",
                                            "expand",         "return_url", NULL};
static const char *const update_params[] = {"amount",         "currency", "customer",
                                            "description",    "metadata", "payment_method",
                                            "capture_method", "expand",   NULL};
static const char *const confirm_params[] = {"payment_method", "capture_method", "return_url",
                                             "expand", NULL};
static const char *const capture_params[] = {"amount_to_capture", "expand", NULL};
static const char *const cancel_params[] = {"cancellation_reason", "expand", NULL};
static const char *const list_params[] = {
    "limit", "starting_after", "ending_before", "customer", "created", "expand", NULL};

/* ---- answers ---- */

static void
intents_unexpected_state(struct api_req *r, const char *action, const char *status)
{
    char msg[200];
    snprintf(msg, sizeof(msg), "You cannot %s this PaymentIntent because it has a status of %s.",
             action, status);
    v1_error(r, 400, "invalid_request_error", "payment_intent_unexpected_state", msg, NULL);
}

/* Answers with an intent object: 402 card_error when the last attempt was
 * declined and the intent went back to requires_payment_method. */
void
intents_respond_object(struct api_req *r, const char *obj)
{
    json_t *o = json_loads(obj, 0, NULL);
    json_t *lpe = o ? json_object_get(o, "last_payment_error") : NULL;
    const char *status = o ? json_string_value(json_object_get(o, "status")) : NULL;
    bool confirm_like = strstr(r->route, "confirm") || strstr(r->route, "create");
    if (confirm_like && status && strcmp(status, "requires_payment_method") == 0 &&
        json_is_object(lpe)) {
        json_t *err = json_deep_copy(lpe);
        json_object_set(err, "payment_intent", o);
        json_t *root = json_pack("{s:o}", "error", err);
        char *text = json_dumps(root, JSON_COMPACT);
        v1_respond(r, 402, text);
        free(text);
        json_decref(root);
    } else {
        v1_respond(r, 200, obj);
    }
    json_decref(o);
}

/* The statement ran and found the intent (its first column is NULL when the
 * intent does not exist for this account); otherwise answers and says no. */
static bool
intents_found(struct api_req *r, PGresult *res, const char *err)
{
    if (!v1_rows(r, res, err))
        return false;
    if (PQntuples(res) == 0 || PQgetisnull(res, 0, 0)) {
        v1_not_found(r, "payment_intent", "intent");
        return false;
    }
    return true;
}

/* What a request says about its claim, for the fenced SQL functions. */
struct intents_claim {
    char *claim; /* a claim the statement takes itself (idem_claim_json), or NULL */
    char row[24];
    const char *row_or_null, *holder_or_null;
    char account[24], lease[24];
};

static void
intents_claim(const struct api_req *r, struct intents_claim *c)
{
    snprintf(c->row, sizeof(c->row), "%lld", (long long)r->idem_row);
    c->row_or_null = r->idem_row ? c->row : NULL;
    c->holder_or_null = r->idem_row || r->idem_deferred ? r->holder : NULL;
    snprintf(c->account, sizeof(c->account), "%lld", (long long)r->account_id);
    snprintf(c->lease, sizeof(c->lease), "%lld", (long long)INTENTS_LEASE(r->api));
}

/* The outcome of a capture or a cancel, as Stripe answers them. */
static void
intents_respond_outcome(struct api_req *r, const char *obj)
{
    json_t *o = json_loads(obj, 0, NULL);
    const char *status = o ? json_string_value(json_object_get(o, "status")) : NULL;
    const char *kind = o ? json_string_value(json_object_get(o, "object")) : NULL;
    char st[40];
    bool refund = kind && strcmp(kind, "refund") == 0;
    snprintf(st, sizeof(st), "%s", status ? status : "unknown");
    json_decref(o);
    if (refund) {
        v1_respond(r, 200, obj); /* a refund answers as it stands, pending or final */
    } else if (r->mroute == MR_PI_CAPTURE && strcmp(st, "requires_capture") == 0) {
        v1_error(r, 400, "invalid_request_error", "capture_refused",
                 "The payment gateway refused to capture this PaymentIntent; its authorization "
                 "stands and can be captured again or canceled.",
                 NULL);
    } else if (r->mroute == MR_PI_CAPTURE && strcmp(st, "canceled") == 0) {
        v1_error(r, 400, "invalid_request_error", "charge_expired_for_capture",
                 "The authorization of this PaymentIntent expired or was voided at the gateway; "
                 "it was canceled and nothing was captured.",
                 NULL);
    } else if (r->mroute == MR_PI_CAPTURE && strcmp(st, "succeeded") != 0 &&
               strcmp(st, "processing") != 0) {
        intents_unexpected_state(r, "capture", st);
    } else if (r->mroute == MR_PI_CANCEL && strcmp(st, "canceled") != 0 &&
               strcmp(st, "processing") != 0) {
        /* The charge completed before the void reached it: it stands. */
        intents_unexpected_state(r, "cancel", st);
    } else {
        intents_respond_object(r, obj);
    }
}

struct intents_job {
    struct api_req *r;
};

static void
intents_on_job_reply(void *arg, int err, nng_msg *reply)
{
    struct intents_job *job = arg;
    struct api_req *r = job->r;
    free(job);
    if (err) {
        log_warn("%s %s: worker job failed: %s; the payment stays processing", r->route, r->id,
                 nng_strerror(err));
        if (request_open(r))
            intents_respond_object(r, r->pending_body);
        request_job_done(r);
        return;
    }
    /* The decoded envelope points into the message: free it last. */
    struct envelope env;
    enum envelope_error e = envelope_decode(&env, nng_msg_body(reply), nng_msg_len(reply));
    const msgpack_object *obj = e == ENV_OK ? envelope_get(env.body, "object") : NULL;
    if (e != ENV_OK || strcmp(env.type, MSG_JOB_REPLY) != 0) {
        log_warn("%s: bad worker reply: %s", r->route, envelope_strerror(e));
        if (request_open(r))
            intents_respond_object(r, r->pending_body);
    } else if (request_open(r) && envelope_get(env.body, "answer_body")) {
        /* The worker kept the answer under the key already: send just that. */
        int64_t code = 0;
        const msgpack_object *body = envelope_get(env.body, "answer_body");
        envelope_get_int(env.body, "answer_code", &code);
        char *text = body->type == MSGPACK_OBJECT_STR
                         ? xstrndup(body->via.str.ptr, body->via.str.size)
                         : xstrdup("{}");
        idem_answered(r, (int)code, text);
        free(text);
    } else if (request_open(r)) {
        if (obj && obj->type == MSGPACK_OBJECT_STR) {
            char *text = xstrndup(obj->via.str.ptr, obj->via.str.size);
            intents_respond_outcome(r, text);
            free(text);
        } else {
            /* The worker could not finish or record it (its database
             * connection failed, say): the change this request made stands
             * and the sweeps finish the payment, so answer with it as it
             * stands, never with an error that the key would replay. */
            char msg[200] = "no reason given";
            envelope_get_str(env.body, "error", msg, sizeof(msg));
            log_warn("%s %s: worker: %s; answering with the payment as it stands", r->route, r->id,
                     msg);
            intents_respond_object(r, r->pending_body);
        }
    }
    envelope_free(&env);
    nng_msg_free(reply);
    request_job_done(r);
}

static void
intents_on_wait(struct api_req *r)
{
    /* The worker is slow or absent: answer with the intent as it stands
     * (processing); the job goes on and its outcome is stored. */
    intents_respond_object(r, r->pending_body);
}

bool
intents_can_send_job(struct api_req *r)
{
    if (r->job_slot)
        return true; /* a handler run again (its claim taken over) keeps its one slot */
    if (r->api->jobs_in_flight < r->api->ctx->cfg.max_pending_jobs) {
        /* Reserved now, so that concurrent requests cannot all pass; the
         * job's answer, or the end of a request that sent none, frees it. */
        r->api->jobs_in_flight++;
        r->job_slot = true;
        return true;
    }
    /* Refused before anything is written: the client may simply retry. */
    r->not_executed = true;
    evhttp_add_header(evhttp_request_get_output_headers(r->req), "Retry-After", "1");
    v1_error(r, 503, "api_error", "overloaded",
             "Too many payments are waiting for a gateway right now; retry shortly.", NULL);
    return false;
}

/* Sends the attempt named in row 0 of res to a worker and waits for its
 * answer (or CONFIRM_WAIT_MS, then answers pending_body). */
void
intents_send_job(struct api_req *r, PGresult *res, const char *pending_body)
{
    size_t n;
    struct api *api = r->api;
    const struct config *cfg = &api->ctx->cfg;
    /* The worker keeps the outcome's answer under the key, in the outcome's
     * own transaction (one commit fewer). */
    const char *route = r->mroute == MR_PI_CREATE    ? "create"
                        : r->mroute == MR_PI_CONFIRM ? "confirm"
                        : r->mroute == MR_PI_CAPTURE ? "capture"
                        : r->mroute == MR_PI_CANCEL  ? "cancel"
                                                     : "refund";
    struct jobs_answer answer = {r->idem_owner ? r->idem_row : 0, r->holder, route};
    void *bytes =
        jobs_message(r->id, shm_now_ms() + cfg->job_timeout_ms, res, 0, false, &answer, &n);
    if (!bytes) {
        intents_respond_object(r, pending_body);
        return;
    }
    free(r->pending_body);
    r->pending_body = xstrdup(pending_body);
    struct intents_job *job = xmalloc(sizeof(*job));
    job->r = r;
    if (!r->job_slot) { /* a job without a reservation (cancel of an authorization) */
        api->jobs_in_flight++;
        r->job_slot = true;
    }
    request_wait(r, api->confirm_wait_ms, intents_on_wait);
    nngev_request(api->ctx->nngev, api->workers, nngev_msg(bytes, n), (int)cfg->job_timeout_ms,
                  intents_on_job_reply, job);
    free(bytes);
}

/* The column `name` of row 0, or NULL when it is NULL. */
static const char *
intents_col(PGresult *res, const char *name)
{
    int col = PQfnumber(res, name);
    if (col < 0)
        abort(); /* a statement of ours lost a column */
    return PQgetisnull(res, 0, col) ? NULL : PQgetvalue(res, 0, col);
}

/* A statement that took its key's claim itself committed: the claim's row
 * is this request's from now on. */
static void
intents_took_claim(struct api_req *r, PGresult *res)
{
    int col = PQfnumber(res, "idem_row");
    if (!r->idem_deferred || col < 0 || PQntuples(res) != 1 || PQgetisnull(res, 0, col))
        return;
    r->idem_row = strtoll(PQgetvalue(res, 0, col), NULL, 10);
    r->idem_deferred = false;
}

/* A pi_* function ran and found the intent (is_found); otherwise answers
 * and says no. */
static bool
intents_locked(struct api_req *r, PGresult *res, const char *err)
{
    if (!v1_rows(r, res, err))
        return false;
    intents_took_claim(r, res);
    if (PQntuples(res) != 1 || strcmp(intents_col(res, "is_found"), "t") != 0) {
        v1_not_found(r, "payment_intent", "intent");
        return false;
    }
    return true;
}

/* ---- create ---- */

struct create_args {
    char public_id[40];
    char amount[24];
    char currency[4];
    const char *customer, *description, *payment_method, *capture_method;
    char *metadata;
    bool confirm;
};

static void
intents_on_created(void *arg, PGresult *res, const char *err)
{
    struct api_req *r = arg;
    if (!v1_rows(r, res, err))
        return;
    intents_took_claim(r, res);
    if (PQntuples(res) != 1 || !intents_col(res, "object")) {
        v1_db_error(r, "insert returned no row");
        return;
    }
    snprintf(r->id, sizeof(r->id), "%s", intents_col(res, "public_id"));
    const char *obj = intents_col(res, "object");
    if (jobs_has_attempt(res, 0)) {
        intents_send_job(r, res, obj);
        return;
    }
    v1_respond(r, 200, obj);
}

static int
intents_currency(const json_t *params, char out[4], bool required, struct params_error *err)
{
    const char *cur;
    int rc = params_str(params, "currency", 3, &cur, err);
    if (rc < 0)
        return -1;
    if (rc == 1) {
        if (required) {
            params_fail(err, 400, "parameter_missing", "currency",
                        "Missing required param: currency.");
            return -1;
        }
        return 1;
    }
    for (int i = 0; i < 3 && cur[i]; i++)
        out[i] = (char)(cur[i] >= 'A' && cur[i] <= 'Z' ? cur[i] + 32 : cur[i]);
    out[3] = '\0';
    if (strlen(cur) != 3 || money_exponent(out) < 0) {
        params_fail(err, 400, "parameter_invalid", "currency",
                    "Invalid currency: must be a supported three-letter ISO code.");
        return -1;
    }
    return 0;
}

static int
intents_amount(const json_t *params, const char *key, char out[24], bool required,
               struct params_error *err)
{
    int64_t amount;
    int rc = params_int(params, key, &amount, err);
    if (rc < 0)
        return -1;
    if (rc == 1) {
        if (required) {
            params_fail(err, 400, "parameter_missing", key, "Missing required param: %s.", key);
            return -1;
        }
        return 1;
    }
    if (amount < 1) {
        params_fail(err, 400, "amount_too_small", key,
                    "Amount must be at least 1 in the currency's smallest unit.");
        return -1;
    }
    if (amount > MONEY_MAX_AMOUNT) {
        params_fail(err, 400, "amount_too_large", key, "Amount must be no more than %lld.",
                    (long long)MONEY_MAX_AMOUNT);
        return -1;
    }
    snprintf(out, 24, "%lld", (long long)amount);
    return 0;
}

static int
intents_token(const json_t *params, const char *key, const char **out, struct params_error *err)
{
    int rc = params_str(params, key, 255, out, err);
    if (rc != 0)
        return rc;
    for (const char *p = *out; *p; p++) {
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
              *p == '_')) {
            params_fail(err, 400, "parameter_invalid", key, "Invalid %s: not an id.", key);
            return -1;
        }
    }
    return **out ? 0 : 1;
}

static int
intents_capture_method(const json_t *params, const char **out, struct params_error *err)
{
    int rc = params_str(params, "capture_method", 32, out, err);
    if (rc != 0)
        return rc;
    if (strcmp(*out, "automatic_async") == 0)
        *out = "automatic";
    if (strcmp(*out, "automatic") != 0 && strcmp(*out, "manual") != 0) {
        params_fail(err, 400, "parameter_invalid", "capture_method",
                    "Invalid capture_method: must be one of automatic or manual.");
        return -1;
    }
    return 0;
}

static int
intents_pm_types(const json_t *params, struct params_error *err)
{
    json_t *t = json_object_get(params, "payment_method_types");
    size_t i;
    json_t *v;
    if (!t)
        return 0;
    if (!json_is_array(t))
        goto bad;
    json_array_foreach(t, i, v)
    {
        if (!json_is_string(v) || strcmp(json_string_value(v), "card") != 0)
            goto bad;
    }
    return 0;
bad:
    params_fail(err, 400, "parameter_invalid", "payment_method_types",
                "Invalid payment_method_types: only card is supported.");
    return -1;
}

void
intents_create(struct api_req *r)
{
    struct params_error e;
    struct create_args a = {0};
    json_t *meta = NULL;
    bool clear;

    if (params_only(r->params, create_params, &e) < 0 ||
        intents_amount(r->params, "amount", a.amount, true, &e) < 0 ||
        intents_currency(r->params, a.currency, true, &e) < 0 ||
        params_str(r->params, "customer", 255, &a.customer, &e) < 0 ||
        params_str(r->params, "description", 1000, &a.description, &e) < 0 ||
        intents_token(r->params, "payment_method", &a.payment_method, &e) < 0 ||
        intents_capture_method(r->params, &a.capture_method, &e) < 0 ||
        params_bool(r->params, "confirm", &a.confirm, &e) < 0 ||
        intents_pm_types(r->params, &e) < 0 || params_metadata(r->params, &meta, &clear, &e) < 0) {
        v1_params_error(r, &e);
        return;
    }
    if (a.confirm && a.payment_method && !intents_can_send_job(r)) {
        json_decref(meta);
        return;
    }
    if (a.confirm && !a.payment_method) {
        params_fail(&e, 400, "parameter_missing", "payment_method",
                    "You cannot confirm this PaymentIntent because it's missing a payment "
                    "method. Pass payment_method with confirm=true.");
        json_decref(meta);
        v1_params_error(r, &e);
        return;
    }
    if (meta) {
        /* On create an empty value simply means no such key. */
        json_t *stripped = json_object();
        const char *k;
        json_t *v;
        json_object_foreach(meta, k, v)
        {
            if (!json_is_null(v))
                json_object_set(stripped, k, v);
        }
        a.metadata = json_dumps(stripped, JSON_COMPACT);
        json_decref(stripped);
        json_decref(meta);
    }
    ids_time_ordered(a.public_id, sizeof(a.public_id), "pi_", 8);
    struct intents_claim c;
    intents_claim(r, &c);
    c.claim = idem_claim_json(r);
    const char *params[16] = {a.public_id,
                              c.account,
                              a.amount,
                              a.currency,
                              a.customer,
                              a.description,
                              a.metadata,
                              a.capture_method ? a.capture_method : "automatic",
                              a.payment_method,
                              a.confirm ? "t" : "f",
                              NULL, /* no order: the saga's */
                              r->api->ctx->cfg.providers[0].name,
                              c.row_or_null,
                              c.holder_or_null,
                              c.lease,
                              c.claim};
    /* Creates waiting together for a connection share one transaction
     * (sql/013_group_commit.sql). */
    static const struct pgev_batch create = {
        "SELECT r.object, r.status, r.public_id, r.idem_row, j.* FROM pi_create($1, $2::bigint,"
        " $3::bigint, $4, $5, $6, $7::jsonb, $8, $9, $10::boolean, $11, $12, $13::bigint, $14,"
        " $15::bigint, $16::jsonb) r" JOBS_JOIN,
        "SELECT * FROM pi_create_batch($1::jsonb)", 64};
    pgev_exec_batched(r->api->pg, &create, 16, params, intents_on_created, r);
    free(a.metadata);
    free(c.claim);
}

/* ---- retrieve ---- */

static void
intents_on_object(void *arg, PGresult *res, const char *err)
{
    struct api_req *r = arg;
    if (!intents_found(r, res, err))
        return;
    intents_respond_object(r, PQgetvalue(res, 0, 0));
}

void
intents_retrieve(struct api_req *r)
{
    static const char *const allowed[] = {"expand", "client_secret", NULL};
    struct params_error e;
    char account[24];
    if (params_only(r->params, allowed, &e) < 0) {
        v1_params_error(r, &e);
        return;
    }
    snprintf(account, sizeof(account), "%lld", (long long)r->account_id);
    const char *params[2] = {r->id, account};
    pgev_exec(r->api->pg,
              "SELECT " OBJ("p") " FROM payment_intents p WHERE public_id = $1 AND account_id = $2",
              2, params, intents_on_object, r);
}

void
intents_respond_current(struct api_req *r, int64_t intent_id)
{
    char id[24], account[24];
    snprintf(id, sizeof(id), "%lld", (long long)intent_id);
    snprintf(account, sizeof(account), "%lld", (long long)r->account_id);
    const char *params[2] = {id, account};
    pgev_exec(r->api->pg,
              "SELECT " OBJ("p") " FROM payment_intents p WHERE id = $1 AND account_id = $2", 2,
              params, intents_on_object, r);
}

/* ---- update ---- */

static void
intents_on_updated(void *arg, PGresult *res, const char *err)
{
    struct api_req *r = arg;
    if (!intents_locked(r, res, err))
        return;
    const char *refused = intents_col(res, "refused");
    if (refused && strcmp(refused, "locked_in_action") == 0) {
        v1_error(r, 400, "invalid_request_error", "payment_intent_unexpected_state",
                 "You cannot update amount, currency, payment_method or capture_method of this "
                 "PaymentIntent while it has a status of requires_action (the customer is "
                 "authenticating that charge): confirm it again with a new payment_method, or "
                 "cancel it.",
                 NULL);
        return;
    }
    if (refused) {
        intents_unexpected_state(r, "update", refused);
        return;
    }
    v1_respond(r, 200, intents_col(res, "object"));
}

void
intents_update(struct api_req *r)
{
    struct params_error e;
    char amount[24], currency[4];
    const char *customer = NULL, *description = NULL, *pm = NULL, *capture = NULL;
    json_t *meta = NULL;
    bool clear = false;
    int has_amount, has_currency, has_customer, has_description;

    if (params_only(r->params, update_params, &e) < 0 ||
        (has_amount = intents_amount(r->params, "amount", amount, false, &e)) < 0 ||
        (has_currency = intents_currency(r->params, currency, false, &e)) < 0 ||
        (has_customer = params_str(r->params, "customer", 255, &customer, &e)) < 0 ||
        (has_description = params_str(r->params, "description", 1000, &description, &e)) < 0 ||
        intents_token(r->params, "payment_method", &pm, &e) < 0 ||
        intents_capture_method(r->params, &capture, &e) < 0 ||
        params_metadata(r->params, &meta, &clear, &e) < 0) {
        v1_params_error(r, &e);
        return;
    }
    char *meta_text = meta ? json_dumps(meta, JSON_COMPACT) : NULL;
    json_decref(meta);
    struct intents_claim c;
    intents_claim(r, &c);
    const char *params[14] = {r->id,
                              c.account,
                              has_amount == 0 ? amount : NULL,
                              has_currency == 0 ? currency : NULL,
                              has_customer == 0 ? "t" : "f",
                              customer,
                              has_description == 0 ? "t" : "f",
                              description,
                              clear ? "t" : "f",
                              meta_text,
                              pm,
                              capture,
                              c.row_or_null,
                              c.holder_or_null};
    pgev_exec(r->api->pg,
              "SELECT * FROM pi_update($1, $2::bigint, $3::bigint, $4, $5::boolean, $6,"
              " $7::boolean, $8, $9::boolean, $10::jsonb, $11, $12, $13::bigint, $14)",
              14, params, intents_on_updated, r);
    free(meta_text);
}

/* ---- confirm ---- */

static void
intents_on_confirm_started(void *arg, PGresult *res, const char *err)
{
    struct api_req *r = arg;
    if (!intents_locked(r, res, err))
        return;
    if (!jobs_has_attempt(res, 0)) { /* the transition was refused */
        const char *status = intents_col(res, "status_before");
        if (strcmp(intents_col(res, "has_pm"), "f") == 0 &&
            strcmp(status, "requires_payment_method") == 0) {
            struct params_error e;
            params_fail(&e, 400, "parameter_missing", "payment_method",
                        "You cannot confirm this PaymentIntent because it's missing a payment "
                        "method.");
            v1_params_error(r, &e);
            return;
        }
        intents_unexpected_state(r, "confirm", status);
        return;
    }
    intents_send_job(r, res, intents_col(res, "object"));
}

void
intents_confirm(struct api_req *r)
{
    struct params_error e;
    const char *pm = NULL, *capture = NULL, *return_url = NULL;
    if (params_only(r->params, confirm_params, &e) < 0 ||
        intents_token(r->params, "payment_method", &pm, &e) < 0 ||
        intents_capture_method(r->params, &capture, &e) < 0 ||
        params_str(r->params, "return_url", 2048, &return_url, &e) < 0) {
        v1_params_error(r, &e);
        return;
    }
    if (!intents_can_send_job(r))
        return;
    struct intents_claim c;
    intents_claim(r, &c);
    c.claim = idem_claim_json(r);
    const char *params[9] = {
        r->id,         c.account,        pm,      capture, r->api->ctx->cfg.providers[0].name,
        c.row_or_null, c.holder_or_null, c.lease, c.claim};
    pgev_exec(r->api->pg,
              "SELECT r.is_found, r.status_before, r.has_pm, r.object, r.idem_row, j.* FROM"
              " pi_confirm($1, $2::bigint, $3, $4, $5, $6::bigint, $7, $8::bigint, $9::jsonb) "
              "r" JOBS_JOIN,
              9, params, intents_on_confirm_started, r);
    free(c.claim);
}

/* ---- capture and cancel ---- */

static void
intents_on_capture_started(void *arg, PGresult *res, const char *err)
{
    struct api_req *r = arg;
    if (!intents_locked(r, res, err))
        return;
    const char *status = intents_col(res, "status_before");
    if (jobs_has_attempt(res, 0)) {
        intents_send_job(r, res, intents_col(res, "object"));
    } else if (strcmp(status, "requires_capture") == 0) {
        struct params_error e;
        params_fail(&e, 400, "amount_too_large", "amount_to_capture",
                    "amount_to_capture must be less than or equal to amount_capturable (%s).",
                    intents_col(res, "capturable"));
        v1_params_error(r, &e);
    } else {
        intents_unexpected_state(r, "capture", status);
    }
}

void
intents_capture(struct api_req *r)
{
    struct params_error e;
    char amount[24] = "";
    int has_amount;
    if (params_only(r->params, capture_params, &e) < 0 ||
        (has_amount = intents_amount(r->params, "amount_to_capture", amount, false, &e)) < 0) {
        v1_params_error(r, &e);
        return;
    }
    if (!intents_can_send_job(r))
        return;
    struct intents_claim c;
    intents_claim(r, &c);
    const char *params[6] = {r->id,         c.account,        has_amount == 0 ? amount : NULL,
                             c.row_or_null, c.holder_or_null, c.lease};
    pgev_exec(r->api->pg,
              "SELECT r.is_found, r.status_before, r.capturable, r.object, j.* FROM"
              " pi_capture($1, $2::bigint, $3::bigint, $4::bigint, $5, $6::bigint) r" JOBS_JOIN,
              6, params, intents_on_capture_started, r);
}

static void
intents_on_cancel_started(void *arg, PGresult *res, const char *err)
{
    struct api_req *r = arg;
    if (!intents_locked(r, res, err))
        return;
    const char *obj = intents_col(res, "object");
    if (jobs_has_attempt(res, 0)) { /* a charge is open: a worker voids it first */
        intents_send_job(r, res, obj);
    } else if (obj) { /* nothing was held: canceled by this very statement */
        metric_payment(role_metrics(r->api->ctx), MP_CANCELED);
        v1_respond(r, 200, obj);
    } else {
        intents_unexpected_state(r, "cancel", intents_col(res, "status_before"));
    }
}

void
intents_cancel(struct api_req *r)
{
    static const char *const reasons[] = {"duplicate", "fraudulent", "requested_by_customer",
                                          "abandoned", NULL};
    struct params_error e;
    const char *reason = NULL;
    if (params_only(r->params, cancel_params, &e) < 0 ||
        params_str(r->params, "cancellation_reason", 40, &reason, &e) < 0) {
        v1_params_error(r, &e);
        return;
    }
    if (reason) {
        bool ok = false;
        for (const char *const *p = reasons; *p; p++)
            ok = ok || strcmp(*p, reason) == 0;
        if (!ok) {
            params_fail(&e, 400, "parameter_invalid", "cancellation_reason",
                        "Invalid cancellation_reason: must be one of duplicate, fraudulent, "
                        "requested_by_customer or abandoned.");
            v1_params_error(r, &e);
            return;
        }
    }
    struct intents_claim c;
    intents_claim(r, &c);
    const char *params[6] = {r->id, c.account, reason, c.row_or_null, c.holder_or_null, c.lease};
    pgev_exec(r->api->pg,
              "SELECT r.is_found, r.status_before, r.object, j.* FROM pi_cancel($1, $2::bigint,"
              " $3, $4::bigint, $5, $6::bigint) r" JOBS_JOIN,
              6, params, intents_on_cancel_started, r);
}

/* ---- list ---- */

void
intents_list(struct api_req *r)
{
#define INTENTS_PAGE(cmp, order)                                                                   \
    LISTS_SQL("payment_intents", "public_id", OBJ("p"), "p.customer = $2", "true", cmp, order)
    lists_run(r, list_params, "customer", INTENTS_PAGE("<", "DESC"), INTENTS_PAGE(">", "ASC"),
              "payment_intent", "/v1/payment_intents");
#undef INTENTS_PAGE
}
