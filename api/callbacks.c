/*
 * callbacks - inbound gateway callbacks: POST /v1/gateway_webhooks/{provider}.
 *
 * Offers callbacks_receive(), the route's handler. A gateway tells us about
 * outcomes that came later than its answer: a charge that needed the
 * customer's action succeeded or failed, an authorization was captured.
 * The request carries no API key; its credential is the signature over the
 * raw body (Gateway-Signature, see signature.c) with the provider's
 * GATEWAY_WEBHOOK_SECRET, within 300 s either way. The client IP is rate
 * limited (RATE_LIMIT_CALLBACKS per minute). One statement applies it: the
 * gateway's event id is recorded (a repeat answers 200 and changes nothing),
 * the payment moves only from a state the outcome may follow (processing,
 * requires_action, requires_capture) and only for its latest charge, with
 * its transaction row and outbox event; a late or out-of-order callback for
 * a payment in a final state is recorded, logged and counted, and changes
 * nothing. A charge not known yet answers 404 so that the gateway sends it
 * again later. Calls api, signature, ratelimit, pgev.
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "api.h"
#include "ids.h"
#include "log.h"
#include "signature.h"
#include "xmalloc.h"

#define CALLBACK_TOLERANCE_S 300

struct callback {
    char provider[32];
    char event_id[256];
    char type[64];
    char charge[128];
    char amount[24];
    char failure_code[64];
    char failure_message[256];
    const char *status; /* what the payment becomes */
    const char *event;  /* its outbox event */
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
    struct callback *cb = r->state;
    struct shm_metrics *m = role_metrics(r->api->ctx);
    if (!v1_rows(r, res, err))
        return;
    if (PQgetisnull(res, 0, 1)) { /* no payment holds this charge (yet) */
        callbacks_reject(r, 404, "resource_missing",
                         "No payment holds this charge; send the callback again later.");
        return;
    }
    const char *payment = PQgetvalue(res, 0, 1);
    const char *before = PQgetvalue(res, 0, 2);
    if (strcmp(PQgetvalue(res, 0, 0), "0") == 0) {
        metric_inc(m, MC_CALLBACKS_DUPLICATE);
        v1_respond(r, 200, "{\"received\":true,\"duplicate\":true}");
        return;
    }
    if (strcmp(PQgetvalue(res, 0, 3), "0") == 0) {
        metric_inc(m, MC_CALLBACKS_IGNORED);
        log_warn("gateway callback %s (%s) for payment %s ignored: the payment is %s", cb->event_id,
                 cb->type, payment, before);
        v1_respond(r, 200, "{\"received\":true,\"applied\":false}");
        return;
    }
    metric_inc(m, MC_CALLBACKS_APPLIED);
    log_info("gateway callback %s: payment %s %s -> %s", cb->event_id, payment, before, cb->status);
    v1_respond(r, 200, "{\"received\":true,\"applied\":true}");
}

static void
callbacks_apply(struct api_req *r)
{
    struct callback *cb = r->state;
    char txn[64];
    char *lpe = NULL;
    ids_time_ordered(txn, sizeof(txn), "txn_", 8);
    if (strcmp(cb->status, "requires_payment_method") == 0) {
        json_t *e = json_pack("{s:s,s:s,s:s}", "type", "card_error", "code",
                              cb->failure_code[0] ? cb->failure_code : "card_declined", "message",
                              "Your card was declined.");
        lpe = json_dumps(e, JSON_COMPACT);
        json_decref(e);
    }
    const char *params[11] = {cb->provider,
                              cb->event_id,
                              cb->type,
                              cb->charge,
                              cb->status,
                              cb->amount[0] ? cb->amount : NULL,
                              lpe,
                              cb->event,
                              txn,
                              cb->failure_code[0] ? cb->failure_code : NULL,
                              cb->failure_message[0] ? cb->failure_message : NULL};
    /* The states an outcome may follow; any other (a final one) is kept. */
    pgev_exec(
        r->api->pg,
        "WITH cur AS (SELECT p.id, p.status, p.public_id, p.latest_charge FROM payment_intents p"
        "  WHERE p.gateway_provider = $1 AND (p.latest_charge = $4 OR p.gateway_intent_id = $4)"
        "  ORDER BY p.latest_charge = $4 DESC LIMIT 1 FOR UPDATE),"
        " ins AS (INSERT INTO gateway_events (provider, event_id, type, payment_intent_id, applied)"
        "  SELECT $1, $2, $3, cur.id, cur.latest_charge = $4"
        "   AND cur.status IN ('processing', 'requires_action', 'requires_capture') FROM cur"
        "  ON CONFLICT DO NOTHING RETURNING applied),"
        " upd AS (UPDATE payment_intents p SET status = $5,"
        "  amount_received = CASE WHEN $5 = 'succeeded' THEN coalesce($6::bigint, p.amount)"
        "   ELSE p.amount_received END,"
        "  amount_capturable = 0, last_payment_error = $7::jsonb, next_action = NULL,"
        "  version = p.version + 1, updated_at = now()"
        "  FROM cur WHERE p.id = cur.id AND (SELECT applied FROM ins) RETURNING p.*),"
        " tx AS (INSERT INTO payment_transactions (transaction_id, payment_intent_id, type,"
        "  status, amount, currency, gateway_provider, gateway_transaction_id, failure_code,"
        "  failure_message, processed_at)"
        "  SELECT $9, upd.id, CASE WHEN $3 = 'charge.captured' THEN 'capture' ELSE 'charge' END,"
        "  CASE WHEN $5 = 'succeeded' THEN 'succeeded' ELSE 'failed' END,"
        "  CASE WHEN $5 = 'succeeded' THEN upd.amount_received ELSE upd.amount END,"
        "  upd.currency, $1, $4, $10, $11, now() FROM upd RETURNING 1),"
        " saga AS (SELECT saga_outcome_event(ROW(upd.*)::payment_intents, $9, $11) FROM upd"
        "  WHERE upd.order_id IS NOT NULL),"
        " ev AS (SELECT outbox_event(upd.account_id, $8,"
        "  payment_intent_object(ROW(upd.*)::payment_intents), upd.public_id) FROM upd)"
        " SELECT (SELECT count(*) FROM ins), (SELECT public_id FROM cur), (SELECT status FROM cur),"
        "  (SELECT count(*) FROM upd), (SELECT count(*) FROM tx), (SELECT count(*) FROM ev),"
        "  (SELECT count(*) FROM saga)",
        11, params, callbacks_on_applied, r);
    free(lpe);
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
    if (strcmp(cb->type, "charge.succeeded") == 0 || strcmp(cb->type, "charge.captured") == 0) {
        cb->status = "succeeded";
        cb->event = "payment_intent.succeeded";
    } else if (strcmp(cb->type, "charge.failed") == 0) {
        cb->status = "requires_payment_method";
        cb->event = "payment_intent.payment_failed";
    } else {
        *why = "Unknown callback type: expected charge.succeeded, charge.captured or "
               "charge.failed.";
        goto out;
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
    struct callback *cb = r->state;
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
    callbacks_apply(r);
}

void
callbacks_receive(struct api_req *r)
{
    r->state = xcalloc(1, sizeof(struct callback));
    ratelimit_check(r, RL_CALLBACK, callbacks_on_limited);
}
