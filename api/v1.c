/*
 * v1 - the /v1 REST surface: authentication, body parsing, routing and the
 * single way out for every answer.
 *
 * Offers v1_dispatch() (from the HTTP callback), v1_respond(), v1_error(),
 * v1_params_error(), v1_db_error() and v1_claim_lost(). A request goes:
 * Authorization header -> auth_lookup() -> parameters (form or JSON body,
 * or the query string for GET) -> route -> idempotency claim for a POST with
 * an Idempotency-Key -> handler -> v1_respond(), which stores the answer for
 * the key before it is sent. Errors have Stripe's shape and status codes.
 * The request's lifetime is request.c's: it may outlive its answer while a
 * worker job is still out. Calls api, request, params, auth, idem,
 * intents, httputil.
 */
#include <ctype.h>
#include <event2/buffer.h>
#include <event2/keyvalq_struct.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "api.h"
#include "authz.h"
#include "httputil.h"
#include "log.h"
#include "xmalloc.h"

struct route {
    enum evhttp_cmd_type method;
    const char *collection; /* path after /v1/ */
    bool has_id;
    const char *action; /* after /:id/, or NULL */
    const char *name;
    api_handler handler;
    enum metric_route mroute;
    bool unauthenticated; /* its own credential (a signature), no API key */
};

static const struct route v1_routes[] = {
    {EVHTTP_REQ_POST, "payment_intents", false, NULL, "payment_intents.create", intents_create,
     MR_PI_CREATE, false},
    {EVHTTP_REQ_GET, "payment_intents", false, NULL, "payment_intents.list", intents_list,
     MR_PI_LIST, false},
    {EVHTTP_REQ_GET, "payment_intents", true, NULL, "payment_intents.retrieve", intents_retrieve,
     MR_PI_RETRIEVE, false},
    {EVHTTP_REQ_POST, "payment_intents", true, NULL, "payment_intents.update", intents_update,
     MR_PI_UPDATE, false},
    {EVHTTP_REQ_POST, "payment_intents", true, "confirm", "payment_intents.confirm",
     intents_confirm, MR_PI_CONFIRM, false},
    {EVHTTP_REQ_POST, "payment_intents", true, "capture", "payment_intents.capture",
     intents_capture, MR_PI_CAPTURE, false},
    {EVHTTP_REQ_POST, "payment_intents", true, "cancel", "payment_intents.cancel", intents_cancel,
     MR_PI_CANCEL, false},
    {EVHTTP_REQ_POST, "refunds", false, NULL, "refunds.create", refunds_create, MR_OTHER, false},
    {EVHTTP_REQ_GET, "refunds", false, NULL, "refunds.list", refunds_list, MR_OTHER, false},
    {EVHTTP_REQ_GET, "refunds", true, NULL, "refunds.retrieve", refunds_retrieve, MR_OTHER, false},
    {EVHTTP_REQ_POST, "refunds", true, NULL, "refunds.update", refunds_update, MR_OTHER, false},
    {EVHTTP_REQ_POST, "refunds", true, "cancel", "refunds.cancel", refunds_cancel, MR_OTHER, false},
    {EVHTTP_REQ_GET, "charges", false, NULL, "charges.list", charges_list, MR_OTHER, false},
    {EVHTTP_REQ_GET, "charges", true, NULL, "charges.retrieve", charges_retrieve, MR_OTHER, false},
    {EVHTTP_REQ_POST, "webhook_endpoints", false, NULL, "webhook_endpoints.create", webhooks_create,
     MR_OTHER, false},
    {EVHTTP_REQ_GET, "webhook_endpoints", false, NULL, "webhook_endpoints.list", webhooks_list,
     MR_OTHER, false},
    {EVHTTP_REQ_GET, "webhook_endpoints", true, NULL, "webhook_endpoints.retrieve",
     webhooks_retrieve, MR_OTHER, false},
    {EVHTTP_REQ_POST, "webhook_endpoints", true, NULL, "webhook_endpoints.update", webhooks_update,
     MR_OTHER, false},
    {EVHTTP_REQ_DELETE, "webhook_endpoints", true, NULL, "webhook_endpoints.delete",
     webhooks_delete, MR_OTHER, false},
    {EVHTTP_REQ_GET, "events", false, NULL, "events.list", events_list, MR_EVENTS_LIST, false},
    {EVHTTP_REQ_GET, "events", true, NULL, "events.retrieve", events_retrieve, MR_EVENTS_RETRIEVE,
     false},
    {EVHTTP_REQ_POST, "gateway_webhooks", true, NULL, "gateway_webhooks.receive", callbacks_receive,
     MR_OTHER, true},
};

void
v1_respond(struct api_req *r, int status, const char *body)
{
    request_answer(r, status, body);
}

void
v1_error(struct api_req *r, int status, const char *type, const char *code, const char *message,
         const char *param)
{
    char *text = http_error_body(type, code, message, param);
    v1_respond(r, status, text);
    free(text);
}

bool
v1_claim_lost(struct api_req *r, PGresult *res, const char *err)
{
    char code[6];
    const char *state = pgev_sqlstate(res, err, code);
    if (state && strcmp(state, "PD011") == 0 && r->idem_deferred) {
        /* The key has a row already: nothing was written; its row decides. */
        r->idem_deferred = false;
        idem_claim_taken(r);
        return true;
    }
    if (!state || strcmp(state, "PD010") != 0)
        return false;
    /* Another request took this key over (its holder was presumed dead):
     * nothing of this one was written, and its answer is not ours to keep. */
    log_warn("%s: idempotency key %s was taken over; this request wrote nothing", r->route,
             r->idem_key);
    r->idem_owner = false;
    v1_error(r, 409, "idempotency_error", NULL,
             "Another request took over this Idempotency-Key while this one was running; "
             "retry to get its answer.",
             NULL);
    return true;
}

bool
v1_rows(struct api_req *r, PGresult *res, const char *err)
{
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK) {
        if (v1_claim_lost(r, res, err))
            return false;
        char code[6];
        const char *state = pgev_sqlstate(res, err, code);
        if (state && strncmp(state, "PD", 2) == 0) {
            /* The state machine refused a change this code asked for: our
             * own invariant, not the database's availability. Nothing was
             * written (the statement failed whole). */
            log_error("%s: refused by the state machine: %s", r->route,
                      res ? PQresultErrorMessage(res) : err);
            r->not_executed = true;
            v1_error(r, 500, "api_error", NULL,
                     "The payment could not be changed (an internal rule refused it).", NULL);
            return false;
        }
        v1_db_error(r, err ? err : PQresultErrorMessage(res));
        return false;
    }
    return true;
}

void
v1_not_found(struct api_req *r, const char *what, const char *param)
{
    char msg[200];
    snprintf(msg, sizeof(msg), "No such %s: '%.80s'", what, r->id);
    r->not_executed = true;
    v1_error(r, 404, "invalid_request_error", "resource_missing", msg, param);
}

void
v1_params_error(struct api_req *r, const struct params_error *e)
{
    /* Refused at validation: like Stripe, the key keeps no result for it. */
    r->not_executed = true;
    v1_error(r, e->status, "invalid_request_error", e->code, e->message, e->param);
}

void
v1_db_error(struct api_req *r, const char *err)
{
    log_warn("%s: database: %s", r->route, err ? err : "error");
    r->not_executed = true;
    evhttp_add_header(evhttp_request_get_output_headers(r->req), "Retry-After", "1");
    v1_error(r, 503, "api_error", "database_unavailable",
             "The service cannot reach its database right now; retry shortly.", NULL);
}

/* ---- authentication ---- */

static json_t *v1_parse_params(struct api_req *r, struct params_error *err);

/* An Idempotency-Key is stored and compared as text: valid UTF-8 without
 * control characters, or it could not be kept (and so not honoured). */
static bool
v1_printable_utf8(const char *s)
{
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p < 0x20 || *p == 0x7f)
            return false;
    }
    return params_utf8(s);
}

void
v1_too_many(struct api_req *r, int retry_after_s)
{
    char ra[16];
    snprintf(ra, sizeof(ra), "%d", retry_after_s);
    r->not_executed = true;
    evhttp_add_header(evhttp_request_get_output_headers(r->req), "Retry-After", ra);
    v1_error(r, 429, "invalid_request_error", "rate_limit",
             "Too many requests hit the API too quickly. Retry after the time in Retry-After.",
             NULL);
}

static void
v1_on_auth_failure_counted(struct api_req *r, int retry_after_s)
{
    if (retry_after_s > 0) {
        v1_too_many(r, retry_after_s);
        return;
    }
    r->not_executed = true;
    v1_error(r, 401, "invalid_request_error", "api_key_invalid", r->auth_error, NULL);
}

/* Every refused credential counts against the client IP before the 401. */
static void
v1_auth_failed(struct api_req *r, const char *why)
{
    r->auth_error = why;
    ratelimit_auth_failed(r, v1_on_auth_failure_counted);
}

/* Within its limits: parameters, idempotency, handler. */
static void
v1_on_limited(struct api_req *r, int retry_after_s)
{
    if (retry_after_s > 0) {
        v1_too_many(r, retry_after_s);
        return;
    }
    if (r->params_failed) {
        v1_params_error(r, &r->params_error);
        return;
    }
    if (r->has_idem) {
        idem_resume(r);
        return;
    }
    request_claimed(r);
    r->handler(r);
}

/* Authenticated: parameters and the Idempotency-Key are read now, so that
 * the limiter's Redis call can take the key's claim too; refusals are
 * answered after the limit is counted. */
static void
v1_on_auth(struct api_req *r, int64_t account_id)
{
    if (account_id < 0) {
        v1_db_error(r, "key lookup failed");
        return;
    }
    if (account_id == 0) {
        v1_auth_failed(r, "Invalid API Key provided.");
        return;
    }
    r->account_id = account_id;
    r->params = v1_parse_params(r, &r->params_error);
    r->params_failed = r->params == NULL;
    /* A card number in any parameter is refused like an invalid one, before
     * the key is claimed: nothing stores it, nothing sends it on. */
    if (!r->params_failed && params_find_card(r->params, &r->params_error))
        r->params_failed = true;
    const char *idem =
        evhttp_find_header(evhttp_request_get_input_headers(r->req), "Idempotency-Key");
    if (!r->params_failed && idem && r->method == EVHTTP_REQ_POST) {
        if (strlen(idem) == 0 || strlen(idem) > 255 || !v1_printable_utf8(idem)) {
            params_fail(&r->params_error, 400, "idempotency_key_invalid", NULL,
                        "Idempotency-Key must be 1 to 255 bytes of printable UTF-8.");
            r->params_failed = true;
        } else {
            snprintf(r->idem_key, sizeof(r->idem_key), "%s", idem);
            r->has_idem = true;
            idem_prepare(r);
        }
    }
    ratelimit_check(r, r->method == EVHTTP_REQ_GET ? RL_READ : RL_WRITE, v1_on_limited);
}

/* A Bearer JWT: verified here, then its account is looked up. */
static void
v1_jwt(struct api_req *r, const char *token)
{
    const struct config *cfg = &r->api->ctx->cfg;
    char account[64];
    const char *why;
    if (!cfg->jwt_secret) {
        v1_auth_failed(r, "JWT authentication is not enabled; use an API key.");
        return;
    }
    struct authz_jwt_policy policy = {cfg->jwt_secret, cfg->jwt_issuer, cfg->jwt_audience,
                                      cfg->jwt_account_claim};
    if (authz_jwt_verify(token, &policy, time(NULL), account, sizeof(account), &why) < 0) {
        log_info("%s: JWT refused: %s", r->route, why);
        v1_auth_failed(r, "Invalid or expired JWT provided.");
        return;
    }
    auth_lookup_account(r, account, v1_on_auth);
}

/* ---- parameters and routing ---- */

static json_t *
v1_parse_params(struct api_req *r, struct params_error *err)
{
    if (r->method == EVHTTP_REQ_GET || r->method == EVHTTP_REQ_DELETE) {
        const char *q = evhttp_uri_get_query(evhttp_request_get_evhttp_uri(r->req));
        return params_parse_form(q ? q : "", q ? strlen(q) : 0, err);
    }
    struct evbuffer *in = evhttp_request_get_input_buffer(r->req);
    size_t len = evbuffer_get_length(in);
    const char *data = len ? (const char *)evbuffer_pullup(in, (ssize_t)len) : "";
    const char *ct = evhttp_find_header(evhttp_request_get_input_headers(r->req), "Content-Type");
    if (ct && strncasecmp(ct, "application/json", 16) == 0)
        return len ? params_parse_json(data, len, err) : json_object();
    if (memchr(data, '\0', len)) {
        params_fail(err, 400, "parameter_invalid", NULL, "The request body contains NUL bytes.");
        return NULL;
    }
    return params_parse_form(data, len, err);
}

static const struct route *
v1_route(struct api_req *r, const char *path)
{
    char coll[64] = "", id[80] = "", action[32] = "";
    const char *p = path + 4; /* after "/v1/" */
    size_t n = strcspn(p, "/");
    if (n == 0 || n >= sizeof(coll))
        return NULL;
    memcpy(coll, p, n);
    p += n;
    if (*p == '/') {
        p++;
        n = strcspn(p, "/");
        if (n == 0 || n >= sizeof(id))
            return NULL;
        memcpy(id, p, n);
        for (size_t i = 0; i < n; i++) {
            if (!isalnum((unsigned char)id[i]) && id[i] != '_' && id[i] != '-')
                return NULL;
        }
        p += n;
        if (*p == '/') {
            p++;
            n = strlen(p);
            if (n == 0 || n >= sizeof(action) || strchr(p, '/'))
                return NULL;
            memcpy(action, p, n);
        }
    }
    for (size_t i = 0; i < sizeof(v1_routes) / sizeof(v1_routes[0]); i++) {
        const struct route *rt = &v1_routes[i];
        if (rt->method != r->method || strcmp(rt->collection, coll) != 0)
            continue;
        if (rt->has_id != (id[0] != '\0'))
            continue;
        if ((rt->action == NULL) != (action[0] == '\0'))
            continue;
        if (rt->action && strcmp(rt->action, action) != 0)
            continue;
        snprintf(r->id, sizeof(r->id), "%s", id);
        return rt;
    }
    return NULL;
}

void
v1_dispatch(struct api *api, struct evhttp_request *req)
{
    struct api_req *r = request_new(api, req);
    char key[4096];
    const char *path = evhttp_uri_get_path(evhttp_request_get_evhttp_uri(req));
    struct evkeyvalq *hdrs = evhttp_request_get_input_headers(req);

    r->method = evhttp_request_get_command(req);
    r->route = "v1";
    r->mroute = MR_OTHER;
    r->started_us = http_now_us();
    api_request_begin(api, req);

    const struct route *rt = v1_route(r, path);
    if (!rt) {
        char msg[300];
        snprintf(msg, sizeof(msg), "Unrecognized request URL (%s: %.200s).",
                 r->method == EVHTTP_REQ_GET    ? "GET"
                 : r->method == EVHTTP_REQ_POST ? "POST"
                                                : "?",
                 path);
        v1_error(r, 404, "invalid_request_error", NULL, msg, NULL);
        return;
    }
    r->route = rt->name;
    r->mroute = rt->mroute;
    r->handler = rt->handler;
    /* Create and confirm take their Idempotency-Key's claim in their own
     * statement (one commit for both). */
    r->idem_claims_itself = rt->handler == intents_create || rt->handler == intents_confirm;
    if (rt->unauthenticated) { /* gateway callbacks: their signature is their credential */
        request_claimed(r);
        r->handler(r);
        return;
    }
    enum authz_kind kind;
    if (authz_parse(evhttp_find_header(hdrs, "Authorization"), key, sizeof(key), &kind) < 0) {
        v1_auth_failed(r, "You did not provide an API key. Provide it in the Authorization header "
                          "(Authorization: Bearer YOUR_SECRET_KEY).");
        return;
    }
    if (kind == AUTHZ_JWT)
        v1_jwt(r, key);
    else
        auth_lookup(r, key, v1_on_auth);
}
