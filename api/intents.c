/*
 * intents - the PaymentIntent endpoints: create, retrieve, update, list,
 * confirm, capture and cancel.
 *
 * Offers intents_create() ... intents_cancel() and
 * intents_respond_current(). Every state change is one SQL statement: it
 * locks the intent, checks the transition against the states allowed for
 * it (payment_intent_unexpected_state otherwise, never a silent overwrite),
 * bumps version, writes the outbox event and returns the object, so a
 * change and its event commit together or not at all. Another account's
 * intent is simply not found (404). Gateway work (confirm, capture, cancel
 * of an authorization) goes to a worker over NNG, one REQ context per job;
 * the client gets the worker's answer, or the intent as `processing` after
 * CONFIRM_WAIT_MS while the job goes on. A declined card answers 402 with
 * a card_error, as Stripe does. Calls api, params, pgev, nngev, money, ids.
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

/* States from which each operation may start: the one table of legal
 * transitions that start in the api (workers finish them). */
#define OPEN_STATES "'requires_payment_method','requires_confirmation','requires_action'"

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
static void
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

/* ---- worker jobs ---- */

struct intents_job {
    struct api_req *r;
};

static void
intents_on_job_reply(void *arg, int err, nng_msg *reply)
{
    struct intents_job *job = arg;
    struct api_req *r = job->r;
    free(job);
    r->api->jobs_in_flight--;
    r->job_slot = false;
    if (err) {
        log_warn("%s %s: worker job failed: %s; the payment stays processing", r->route, r->id,
                 nng_strerror(err));
        if (!r->responded && r->pending_body)
            intents_respond_object(r, r->pending_body);
        v1_release(r);
        return;
    }
    /* The decoded envelope points into the message: free it last. */
    struct envelope env;
    enum envelope_error e = envelope_decode(&env, nng_msg_body(reply), nng_msg_len(reply));
    if (e != ENV_OK || strcmp(env.type, MSG_JOB_REPLY) != 0) {
        log_warn("%s: bad worker reply: %s", r->route, envelope_strerror(e));
        if (!r->responded && r->pending_body)
            intents_respond_object(r, r->pending_body);
        envelope_free(&env);
        nng_msg_free(reply);
        v1_release(r);
        return;
    }
    const msgpack_object *obj = envelope_get(env.body, "object");
    if (!r->responded) {
        if (obj && obj->type == MSGPACK_OBJECT_STR) {
            char *text = xstrndup(obj->via.str.ptr, obj->via.str.size);
            intents_respond_object(r, text);
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
            if (r->pending_body)
                intents_respond_object(r, r->pending_body);
            else
                v1_error(r, 500, "api_error", NULL, "The payment could not be processed.", NULL);
        }
    }
    envelope_free(&env);
    nng_msg_free(reply);
    v1_release(r);
}

static void
intents_on_wait_timeout(evutil_socket_t fd, short what, void *arg)
{
    struct api_req *r = arg;
    (void)fd;
    (void)what;
    /* The worker is slow or absent: answer with the intent as it stands
     * (processing); the job goes on and its outcome is stored. */
    if (!r->responded && r->pending_body)
        intents_respond_object(r, r->pending_body);
}

bool
intents_can_send_job(struct api_req *r)
{
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

/* Sends a gateway job for request r and arms the CONFIRM_WAIT_MS answer. */
static void
intents_send_job(struct api_req *r, const char *op, PGresult *res, int row, int amount_col,
                 int64_t amount_to_capture, const char *reason, const char *pending_body)
{
    size_t n;
    struct api *api = r->api;
    const struct config *cfg = &api->ctx->cfg;
    void *bytes = jobs_message(op, r->id, shm_now_ms() + cfg->job_timeout_ms, res, row, amount_col,
                               amount_to_capture, reason, &n);

    free(r->pending_body);
    r->pending_body = xstrdup(pending_body);
    struct intents_job *job = xmalloc(sizeof(*job));
    job->r = r;
    r->refs++;
    if (!r->job_slot) { /* a job without a reservation (cancel of an authorization) */
        api->jobs_in_flight++;
        r->job_slot = true;
    }
    nngev_request(api->ctx->nngev, api->workers, nngev_msg(bytes, n), (int)cfg->job_timeout_ms,
                  intents_on_job_reply, job);
    free(bytes);
    r->timer = evtimer_new(api->ctx->base, intents_on_wait_timeout, r);
    struct timeval tv = {(time_t)(api->confirm_wait_ms / 1000),
                         (suseconds_t)((api->confirm_wait_ms % 1000) * 1000)};
    evtimer_add(r->timer, &tv);
}

/* ---- create ---- */

struct create_args {
    char public_id[40];
    char account[24];
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
    if (PQntuples(res) != 1) {
        v1_db_error(r, "insert returned no row");
        return;
    }
    snprintf(r->id, sizeof(r->id), "%s", PQgetvalue(res, 0, 2));
    const char *obj = PQgetvalue(res, 0, 0);
    if (strcmp(PQgetvalue(res, 0, 1), "processing") == 0) {
        intents_send_job(r, "confirm", res, 0, 3 + JOB_AMOUNT_COL_OFFSET, 0, NULL, obj);
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
    snprintf(a.account, sizeof(a.account), "%lld", (long long)r->account_id);
    char idem[24];
    snprintf(idem, sizeof(idem), "%lld", (long long)r->idem_row);
    const char *status = a.confirm          ? "processing"
                         : a.payment_method ? "requires_confirmation"
                                            : "requires_payment_method";
    const char *params[12] = {a.public_id,
                              a.account,
                              a.amount,
                              a.currency,
                              a.customer,
                              a.description,
                              a.metadata,
                              a.capture_method ? a.capture_method : "automatic",
                              a.payment_method,
                              status,
                              r->idem_row ? idem : NULL,
                              a.confirm ? r->api->ctx->cfg.providers[0].name : NULL};
    pgev_exec(
        r->api->pg,
        "WITH upd AS ("
        " INSERT INTO payment_intents (public_id, account_id, amount, currency, customer,"
        "  description, metadata, capture_method, payment_method, status,"
        "  gateway_provider, expires_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, coalesce($7::jsonb, '{}'), $8, $9, $10, $12,"
        "  now() + interval '24 hours')"
        " RETURNING *),"
        " ev AS (SELECT outbox_event(upd.account_id, 'payment_intent.created', " OBJ(
            "upd") "::json, upd.public_id) FROM upd),"
                   " idem AS (UPDATE idempotency_keys SET recovery_point = 'created',"
                   "  resource_id = (SELECT id FROM upd) WHERE id = $11::bigint RETURNING 1)"
                   " SELECT " OBJ(
                       "upd") ", upd.status, upd.public_id, " JOB_COLS ","
                              " (SELECT count(*) FROM ev), (SELECT count(*) FROM idem) FROM upd",
        12, params, intents_on_created, r);
    free(a.metadata);
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
    if (!intents_found(r, res, err))
        return;
    if (PQgetisnull(res, 0, 1)) {
        intents_unexpected_state(r, "update", PQgetvalue(res, 0, 0));
        return;
    }
    v1_respond(r, 200, PQgetvalue(res, 0, 1));
}

void
intents_update(struct api_req *r)
{
    struct params_error e;
    char amount[24], currency[4], account[24];
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
    snprintf(account, sizeof(account), "%lld", (long long)r->account_id);
    const char *params[12] = {r->id,
                              account,
                              has_amount == 0 ? amount : NULL,
                              has_currency == 0 ? currency : NULL,
                              has_customer == 0 ? "t" : "f",
                              customer,
                              has_description == 0 ? "t" : "f",
                              description,
                              clear ? "t" : "f",
                              meta_text,
                              pm,
                              capture};
    pgev_exec(r->api->pg,
              "WITH cur AS (SELECT id, status FROM payment_intents"
              "  WHERE public_id = $1 AND account_id = $2 FOR UPDATE),"
              " upd AS (UPDATE payment_intents p SET"
              "  amount = coalesce($3::bigint, p.amount),"
              "  currency = coalesce($4, p.currency),"
              "  customer = CASE WHEN $5::boolean THEN nullif($6, '') ELSE p.customer END,"
              "  description = CASE WHEN $7::boolean THEN nullif($8, '') ELSE p.description END,"
              "  metadata = CASE WHEN $9::boolean THEN '{}'::jsonb"
              "   ELSE jsonb_strip_nulls(p.metadata || coalesce($10::jsonb, '{}'::jsonb)) END,"
              "  payment_method = coalesce($11, p.payment_method),"
              "  capture_method = coalesce($12, p.capture_method),"
              "  status = CASE WHEN $11 IS NOT NULL AND p.status = 'requires_payment_method'"
              "   THEN 'requires_confirmation' ELSE p.status END,"
              "  version = p.version + 1, updated_at = now()"
              "  FROM cur WHERE p.id = cur.id AND cur.status IN (" OPEN_STATES ")"
              "  RETURNING p.*)"
              " SELECT (SELECT status FROM cur), (SELECT " OBJ("upd") " FROM upd)",
              12, params, intents_on_updated, r);
    free(meta_text);
}

/* ---- confirm ---- */

static void
intents_on_confirm_started(void *arg, PGresult *res, const char *err)
{
    struct api_req *r = arg;
    if (!intents_found(r, res, err))
        return;
    if (PQgetisnull(res, 0, 3)) { /* no upd row: the transition was refused */
        const char *status = PQgetvalue(res, 0, 0);
        if (strcmp(PQgetvalue(res, 0, 1), "f") == 0 &&
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
    intents_send_job(r, "confirm", res, 0, 3 + JOB_AMOUNT_COL_OFFSET, 0, NULL,
                     PQgetvalue(res, 0, 2));
}

void
intents_confirm(struct api_req *r)
{
    struct params_error e;
    const char *pm = NULL, *capture = NULL, *return_url = NULL;
    char account[24];
    if (params_only(r->params, confirm_params, &e) < 0 ||
        intents_token(r->params, "payment_method", &pm, &e) < 0 ||
        intents_capture_method(r->params, &capture, &e) < 0 ||
        params_str(r->params, "return_url", 2048, &return_url, &e) < 0) {
        v1_params_error(r, &e);
        return;
    }
    if (!intents_can_send_job(r))
        return;
    snprintf(account, sizeof(account), "%lld", (long long)r->account_id);
    char idem[24];
    snprintf(idem, sizeof(idem), "%lld", (long long)r->idem_row);
    const char *params[6] = {
        r->id, account, pm, capture, r->api->ctx->cfg.providers[0].name, r->idem_row ? idem : NULL};
    pgev_exec(r->api->pg,
              "WITH cur AS (SELECT id, status, payment_method FROM payment_intents"
              "  WHERE public_id = $1 AND account_id = $2 FOR UPDATE),"
              " upd AS (UPDATE payment_intents p SET status = 'processing',"
              "  payment_method = coalesce($3, p.payment_method),"
              "  capture_method = coalesce($4, p.capture_method), gateway_provider = $5,"
              "  last_payment_error = NULL, next_action = NULL,"
              "  version = p.version + 1, updated_at = now()"
              "  FROM cur WHERE p.id = cur.id AND cur.status IN (" OPEN_STATES ")"
              "  AND coalesce($3, cur.payment_method) IS NOT NULL RETURNING p.*),"
              /* A retry of this key after its api died answers with the payment. */
              " idem AS (UPDATE idempotency_keys SET recovery_point = 'confirm_started',"
              "  resource_id = upd.id FROM upd WHERE idempotency_keys.id = $6::bigint)"
              " SELECT (SELECT status FROM cur), (SELECT payment_method IS NOT NULL FROM cur),"
              "  " OBJ("upd") ", " JOB_COLS " FROM (SELECT 1) one LEFT JOIN upd ON true",
              6, params, intents_on_confirm_started, r);
}

/* ---- capture and cancel of an authorization (worker jobs) ---- */

struct capture_args {
    int64_t amount_to_capture; /* 0: all */
    const char *reason;
    bool cancel;
};

static void
intents_on_locked(void *arg, PGresult *res, const char *err)
{
    struct api_req *r = arg;
    struct capture_args *a = r->state;
    r->state = NULL;
    if (!intents_found(r, res, err)) {
        free(a);
        return;
    }
    const char *status = PQgetvalue(res, 0, 0);
    const char *obj = PQgetvalue(res, 0, 1);
    int64_t capturable = strtoll(PQgetvalue(res, 0, 2), NULL, 10);
    if (a->cancel) {
        if (strcmp(PQgetvalue(res, 0, 3), "1") == 0) {
            metric_payment(role_metrics(r->api->ctx), MP_CANCELED);
            v1_respond(r, 200, obj); /* canceled by this very statement */
        } else if (strcmp(status, "requires_capture") == 0) {
            intents_send_job(r, "cancel", res, 0, 4 + JOB_AMOUNT_COL_OFFSET, 0, a->reason, obj);
        } else {
            intents_unexpected_state(r, "cancel", status);
        }
        free(a);
        return;
    }
    if (strcmp(status, "requires_capture") != 0) {
        intents_unexpected_state(r, "capture", status);
    } else if (a->amount_to_capture > capturable) {
        struct params_error e;
        params_fail(&e, 400, "amount_too_large", "amount_to_capture",
                    "amount_to_capture must be less than or equal to amount_capturable (%lld).",
                    (long long)capturable);
        v1_params_error(r, &e);
    } else {
        intents_send_job(r, "capture", res, 0, 4 + JOB_AMOUNT_COL_OFFSET,
                         a->amount_to_capture ? a->amount_to_capture : capturable, NULL, obj);
    }
    free(a);
}

void
intents_capture(struct api_req *r)
{
    struct params_error e;
    char amount[24] = "0", account[24];
    struct capture_args *a = xcalloc(1, sizeof(*a));
    if (params_only(r->params, capture_params, &e) < 0 ||
        intents_amount(r->params, "amount_to_capture", amount, false, &e) < 0) {
        free(a);
        v1_params_error(r, &e);
        return;
    }
    if (!intents_can_send_job(r)) {
        free(a);
        return;
    }
    a->amount_to_capture = strtoll(amount, NULL, 10);
    r->state = a;
    snprintf(account, sizeof(account), "%lld", (long long)r->account_id);
    const char *params[2] = {r->id, account};
    pgev_exec(r->api->pg,
              "SELECT upd.status, " OBJ(
                  "upd") ", upd.amount_capturable, NULL, " JOB_COLS
                         " FROM payment_intents upd WHERE public_id = $1 AND account_id = $2",
              2, params, intents_on_locked, r);
}

void
intents_cancel(struct api_req *r)
{
    static const char *const reasons[] = {"duplicate", "fraudulent", "requested_by_customer",
                                          "abandoned", NULL};
    struct params_error e;
    const char *reason = NULL;
    char account[24];
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
    struct capture_args *a = xcalloc(1, sizeof(*a));
    a->cancel = true;
    a->reason = reason; /* points into r->params, which outlives the query */
    r->state = a;
    snprintf(account, sizeof(account), "%lld", (long long)r->account_id);
    const char *params[3] = {r->id, account, reason};
    /* Open intents are canceled here at once; an authorization (requires_capture)
     * must be voided at the gateway first, by a worker. */
    pgev_exec(
        r->api->pg,
        "WITH cur AS (SELECT id FROM payment_intents"
        "  WHERE public_id = $1 AND account_id = $2 FOR UPDATE),"
        " upd AS (UPDATE payment_intents p SET status = 'canceled',"
        "  cancellation_reason = $3, canceled_at = now(), version = p.version + 1,"
        "  updated_at = now() FROM cur WHERE p.id = cur.id AND p.status IN (" OPEN_STATES ")"
        "  RETURNING p.*),"
        " ev AS (SELECT outbox_event(upd.account_id, 'payment_intent.canceled',"
        "  " OBJ(
            "upd") "::json, upd.public_id) FROM upd),"
                   " res AS (SELECT * FROM upd UNION ALL SELECT p.* FROM payment_intents p, cur"
                   "  WHERE p.id = cur.id AND NOT EXISTS (SELECT 1 FROM upd))"
                   " SELECT upd.status, " OBJ("upd") ", upd.amount_capturable,"
                                                     "  (SELECT count(*) FROM ev), " JOB_COLS
                                                     " FROM res upd",
        3, params, intents_on_locked, r);
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
