/*
 * callbacks - inbound gateway callbacks: POST /v1/gateway_webhooks/{provider}.
 *
 * Offers callbacks_receive(), the route's handler. A gateway tells us about
 * outcomes that came later than its answer: a charge that needed the
 * customer's action succeeded or failed, an authorization was captured.
 * The request carries no API key; its credential is the signature over the
 * raw body (Gateway-Signature, see signature.c) with the provider's
 * GATEWAY_WEBHOOK_SECRET, within 300 s either way. The client IP is rate
 * limited (RATE_LIMIT_CALLBACKS per minute). One statement applies it
 * (gateway_callback in sql/010_attempts.sql): the gateway's event id is
 * recorded (a repeat answers 200 and changes nothing), the charge is matched
 * to its gateway attempt by the gateway's charge id or by the attempt's key
 * the gateway echoes, and the outcome is applied only where the state
 * machine allows it: to an attempt whose answer is still outstanding, to an
 * open 3-D Secure charge of a payment in requires_action, to a capture that
 * settles later; about a charge a void is racing, it is recorded on the
 * charge and the void's answer decides. Anything else (a late or repeated
 * outcome, a charge.failed for an authorization, a callback for an old
 * attempt) is recorded, logged, counted and changes nothing. A charge not
 * known yet answers 404 so that the gateway sends it again later. Calls
 * api, signature, ratelimit, pgev.
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "api.h"
#include "log.h"
#include "signature.h"
#include "xmalloc.h"

#define CALLBACK_TOLERANCE_S 300

struct callback {
    char provider[32];
    char event_id[256];
    char type[64];
    char charge[128];
    char key[160]; /* the attempt's idempotency key, when the gateway echoes it */
    char amount[24];
    char failure_code[64];
    char failure_message[256];
    const char *state; /* the charge's state the callback reports; NULL: not one we act on */
};

static void
callbacks_reject(struct api_req *r, int status, const char *code, const char *msg)
{
    metric_inc(role_metrics(r->api->ctx), MC_CALLBACKS_REJECTED);
    r->not_executed = true;
    v1_error(r, status, "invalid_request_error", code, msg, NULL);
}

static void
callbacks_on_applied(void *arg, PGresult *res, const char *err)
{
    struct api_req *r = arg;
    struct callback *cb = r->state_data;
    struct shm_metrics *m = role_metrics(r->api->ctx);
    if (!v1_rows(r, res, err))
        return;
    const char *result = PQgetvalue(res, 0, 0);
    const char *payment = PQgetvalue(res, 0, 1);
    const char *before = PQgetvalue(res, 0, 2);
    const char *after = PQgetvalue(res, 0, 3);
    if (strcmp(result, "unknown") == 0) { /* no attempt holds this charge (yet) */
        callbacks_reject(r, 404, "resource_missing",
                         "No payment holds this charge; send the callback again later.");
        return;
    }
    if (strcmp(result, "duplicate") == 0) {
        metric_inc(m, MC_CALLBACKS_DUPLICATE);
        v1_respond(r, 200, "{\"received\":true,\"duplicate\":true}");
        return;
    }
    if (strcmp(result, "ignored") == 0) {
        metric_inc(m, MC_CALLBACKS_IGNORED);
        log_warn("gateway callback %s (%s) for payment %s ignored: the payment is %s and the "
                 "state machine has no such transition for this charge",
                 cb->event_id, cb->type, payment, before);
        v1_respond(r, 200, "{\"received\":true,\"applied\":false}");
        return;
    }
    metric_inc(m, MC_CALLBACKS_APPLIED);
    log_info("gateway callback %s (%s): payment %s %s -> %s", cb->event_id, cb->type, payment,
             before, after);
    v1_respond(r, 200, "{\"received\":true,\"applied\":true}");
}

static void
callbacks_apply(struct api_req *r)
{
    struct callback *cb = r->state_data;
    char lease[24];
    snprintf(lease, sizeof(lease), "%lld", (long long)INTENTS_LEASE(r->api));
    const char *params[11] = {cb->provider,
                              cb->event_id,
                              cb->type,
                              cb->charge,
                              cb->key[0] ? cb->key : NULL,
                              cb->state,
                              cb->amount[0] ? cb->amount : NULL,
                              cb->failure_code[0] ? cb->failure_code : NULL,
                              cb->failure_message[0] ? cb->failure_message : NULL,
                              r->api->ctx->cfg.providers[0].name,
                              lease};
    /* The state machine decides (sql/010_attempts.sql gateway_callback):
     * the callback is matched to its attempt and applied only where the
     * table allows it from the payment's state; else recorded and ignored. */
    pgev_exec(r->api->pg,
              "SELECT result, coalesce(payment, ''), coalesce(status_before, ''),"
              " coalesce(status, '') FROM gateway_callback($1, $2, $3, $4, $5, $6, $7::bigint,"
              " $8, $9, $10, $11::bigint)",
              11, params, callbacks_on_applied, r);
}

static int
callbacks_copy(char *dst, size_t cap, json_t *obj, const char *key, bool required)
{
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) {
        dst[0] = '\0';
        return required ? -1 : 0;
    }
    if (json_is_integer(v)) {
        snprintf(dst, cap, "%lld", (long long)json_integer_value(v));
        return 0;
    }
    const char *s = json_string_value(v);
    if (!s || strlen(s) >= cap || (required && !*s))
        return -1;
    snprintf(dst, cap, "%s", s);
    return 0;
}

/* Reads the body: {id, type, data: {object: {id, amount_captured, failure_code, ...}}}. */
static int
callbacks_decode(struct callback *cb, const char *body, size_t len, const char **why)
{
    json_t *root = json_loadb(body, len, JSON_REJECT_DUPLICATES, NULL);
    json_t *obj = json_object_get(json_object_get(root, "data"), "object");
    int rc = -1;
    *why = "The body must be a JSON event with id, type and data.object.id.";
    if (!json_is_object(obj) ||
        callbacks_copy(cb->event_id, sizeof(cb->event_id), root, "id", true) < 0 ||
        callbacks_copy(cb->type, sizeof(cb->type), root, "type", true) < 0 ||
        callbacks_copy(cb->charge, sizeof(cb->charge), obj, "id", true) < 0 ||
        callbacks_copy(cb->failure_code, sizeof(cb->failure_code), obj, "failure_code", false) <
            0 ||
        callbacks_copy(cb->failure_message, sizeof(cb->failure_message), obj, "failure_message",
                       false) < 0)
        goto out;
    json_t *amount = json_object_get(obj, "amount_captured");
    if (json_is_integer(amount) && json_integer_value(amount) > 0)
        snprintf(cb->amount, sizeof(cb->amount), "%lld", (long long)json_integer_value(amount));
    /* Our attempt's key, when the gateway echoes it (metadata, or its own field). */
    const char *key =
        json_string_value(json_object_get(json_object_get(obj, "metadata"), "paymentd_attempt"));
    if (!key)
        key = json_string_value(json_object_get(obj, "idempotency_key"));
    if (key && strlen(key) < sizeof(cb->key))
        snprintf(cb->key, sizeof(cb->key), "%s", key);
    const char *status = json_string_value(json_object_get(obj, "status"));
    if (strcmp(cb->type, "charge.succeeded") == 0) {
        /* Captured, or only authorized (manual capture). */
        bool authorized_only = json_is_false(json_object_get(obj, "captured")) ||
                               (status && strcmp(status, "requires_capture") == 0);
        cb->state = authorized_only ? "requires_capture" : "succeeded";
    } else if (strcmp(cb->type, "charge.captured") == 0) {
        cb->state = "succeeded";
    } else if (strcmp(cb->type, "charge.failed") == 0) {
        cb->state = "failed";
    }
    rc = 0;
out:
    json_decref(root);
    return rc;
}

static void
callbacks_on_limited(struct api_req *r, int retry_after_s)
{
    const struct config *cfg = &r->api->ctx->cfg;
    struct callback *cb = r->state_data;
    if (retry_after_s > 0) {
        v1_too_many(r, retry_after_s);
        return;
    }
    const struct config_provider *pv = NULL;
    for (int i = 0; i < cfg->n_providers; i++)
        if (strcmp(cfg->providers[i].name, r->id) == 0)
            pv = &cfg->providers[i];
    if (!pv || !pv->webhook_secret[0]) {
        callbacks_reject(r, 404, "resource_missing",
                         "No gateway provider with callbacks by this name.");
        return;
    }
    snprintf(cb->provider, sizeof(cb->provider), "%s", pv->name);
    struct sig_header sig;
    const char *header =
        evhttp_find_header(evhttp_request_get_input_headers(r->req), "Gateway-Signature");
    if (!header || sig_parse(header, &sig) < 0) {
        callbacks_reject(r, 400, "signature_missing",
                         "A Gateway-Signature header (t=...,v1=...) is required.");
        return;
    }
    struct evbuffer *in = evhttp_request_get_input_buffer(r->req);
    size_t len = evbuffer_get_length(in);
    const char *body = len ? (const char *)evbuffer_pullup(in, (ssize_t)len) : "";
    enum sig_result v =
        sig_verify(&sig, pv->webhook_secret, body, len, (int64_t)time(NULL), CALLBACK_TOLERANCE_S);
    if (v != SIG_OK) {
        log_warn("gateway callback for %s refused: %s", pv->name,
                 v == SIG_TOO_OLD   ? "timestamp too old"
                 : v == SIG_TOO_NEW ? "timestamp in the future"
                                    : "no signature matches");
        callbacks_reject(r, 401, "signature_invalid",
                         "The signature does not match the body, or its timestamp is outside "
                         "the tolerance.");
        return;
    }
    const char *why;
    if (callbacks_decode(cb, body, len, &why) < 0) {
        callbacks_reject(r, 400, "parameter_invalid", why);
        return;
    }
    if (!cb->state) { /* a type this service does not act on: counted, acknowledged */
        metric_inc(role_metrics(r->api->ctx), MC_CALLBACKS_IGNORED);
        log_info("gateway callback %s of type %s ignored: not a charge outcome", cb->event_id,
                 cb->type);
        v1_respond(r, 200, "{\"received\":true,\"applied\":false}");
        return;
    }
    callbacks_apply(r);
}

void
callbacks_receive(struct api_req *r)
{
    r->state_data = xcalloc(1, sizeof(struct callback));
    ratelimit_check(r, RL_CALLBACK, callbacks_on_limited);
}
