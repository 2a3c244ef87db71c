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

#define CALLBACK_MAX_ITEMS 100 /* refunds listed in one charge.refunded */

/* What a callback says about one object (a charge, or a refund). */
struct callback_item {
    char id[128];
    char key[160]; /* the attempt's idempotency key, when the gateway echoes it */
    char amount[24];
    char failure_code[64];
    char failure_message[256];
    const char *state; /* the object's state; NULL: not one we act on */
};

struct callback {
    char provider[32];
    char event_id[256];
    char type[64];
    /* The charge's outcome (charge.*), the refund's (refund.updated), or each
     * refund of a charge.refunded. */
    struct callback_item items[CALLBACK_MAX_ITEMS];
    int n_items;
};

static void
callbacks_reject(struct api_req *r, int status, const char *code, const char *msg)
{
    metric_inc(role_metrics(r->api->ctx), MC_CALLBACKS_REJECTED);
    r->not_executed = true;
    v1_error(r, status, "invalid_request_error", code, msg, NULL);
}

/* One row per item: result, payment, status before, status after. The
 * callback is applied when any item was; a repeat when all were repeats; a
 * single object nobody holds answers 404 (the gateway sends it again). */
static void
callbacks_on_applied(void *arg, PGresult *res, const char *err)
{
    struct api_req *r = arg;
    struct callback *cb = r->state_data;
    struct shm_metrics *m = role_metrics(r->api->ctx);
    if (!v1_rows(r, res, err))
        return;
    int applied = 0, duplicate = 0, unknown = 0, n = PQntuples(res);
    for (int i = 0; i < n; i++) {
        const char *result = PQgetvalue(res, i, 0);
        if (strcmp(result, "applied") == 0) {
            applied++;
            log_info("gateway callback %s (%s): payment %s %s -> %s", cb->event_id, cb->type,
                     PQgetvalue(res, i, 1), PQgetvalue(res, i, 2), PQgetvalue(res, i, 3));
        } else if (strcmp(result, "duplicate") == 0) {
            duplicate++;
        } else if (strcmp(result, "unknown") == 0) {
            unknown++;
        } else {
            log_warn("gateway callback %s (%s) for payment %s ignored: the payment is %s and the "
                     "state machine has no such transition for this object",
                     cb->event_id, cb->type, PQgetvalue(res, i, 1), PQgetvalue(res, i, 2));
        }
    }
    /* A charge not known yet may be one whose answer is on its way: 404, so
     * the gateway sends it again. A refund's attempt is always written
     * before the gateway hears of it: an unknown refund is not ours (made
     * at the gateway directly); it is counted and left to reconciliation. */
    if (n == 1 && unknown == 1 && strncmp(cb->type, "refund.", 7) != 0 &&
        strcmp(cb->type, "charge.refunded") != 0) {
        callbacks_reject(r, 404, "resource_missing",
                         "No payment holds this object; send the callback again later.");
        return;
    }
    if (unknown)
        log_warn("gateway callback %s (%s): %d object(s) no payment holds; not applied",
                 cb->event_id, cb->type, unknown);
    if (applied) {
        metric_inc(m, MC_CALLBACKS_APPLIED);
        v1_respond(r, 200, "{\"received\":true,\"applied\":true}");
    } else if (n > 0 && duplicate == n) {
        metric_inc(m, MC_CALLBACKS_DUPLICATE);
        v1_respond(r, 200, "{\"received\":true,\"duplicate\":true}");
    } else {
        metric_inc(m, MC_CALLBACKS_IGNORED);
        v1_respond(r, 200, "{\"received\":true,\"applied\":false}");
    }
}

/* Items as PostgreSQL array literals, one array per field. */
static char *
callbacks_array(const struct callback *cb, size_t field)
{
    struct evbuffer *b = evbuffer_new();
    evbuffer_add(b, "{", 1);
    for (int i = 0; i < cb->n_items; i++) {
        const struct callback_item *it = &cb->items[i];
        const char *v = field == 0   ? it->id
                        : field == 1 ? it->key
                        : field == 2 ? it->state
                        : field == 3 ? it->amount
                        : field == 4 ? it->failure_code
                                     : it->failure_message;
        if (i)
            evbuffer_add(b, ",", 1);
        if (!v || !*v) {
            evbuffer_add(b, "NULL", 4);
            continue;
        }
        evbuffer_add(b, "\"", 1);
        for (const char *p = v; *p; p++) {
            if (*p == '"' || *p == '\\')
                evbuffer_add(b, "\\", 1);
            evbuffer_add(b, p, 1);
        }
        evbuffer_add(b, "\"", 1);
    }
    evbuffer_add(b, "}", 2); /* with its NUL */
    size_t len = evbuffer_get_length(b);
    char *text = xmalloc(len);
    evbuffer_remove(b, text, len);
    evbuffer_free(b);
    return text;
}

static void
callbacks_apply(struct api_req *r)
{
    struct callback *cb = r->state_data;
    char lease[24];
    snprintf(lease, sizeof(lease), "%lld", (long long)INTENTS_LEASE(r->api));
    char *arrays[6];
    for (size_t f = 0; f < 6; f++)
        arrays[f] = callbacks_array(cb, f);
    bool many = strcmp(cb->type, "charge.refunded") == 0;
    const char *params[12] = {cb->provider,
                              cb->event_id,
                              many ? "refund.updated" : cb->type,
                              arrays[0],
                              arrays[1],
                              arrays[2],
                              arrays[3],
                              arrays[4],
                              arrays[5],
                              r->api->ctx->cfg.providers[0].name,
                              lease,
                              many ? "t" : "f"};
    /* The state machine decides (gateway_callback in sql/010_attempts.sql),
     * item by item: each is matched to its attempt and applied only where
     * the tables allow it; else recorded and ignored. A charge.refunded
     * item has its own event id (the event's, then ':' and the refund). */
    pgev_exec(r->api->pg,
              "SELECT g.result, coalesce(g.payment, ''), coalesce(g.status_before, ''),"
              " coalesce(g.status, '') FROM unnest($4::text[], $5::text[], $6::text[],"
              " $7::bigint[], $8::text[], $9::text[]) WITH ORDINALITY"
              "  AS x(id, key, state, amount, code, message, n),"
              " LATERAL gateway_callback($1, CASE WHEN $12::boolean THEN $2 || ':' || x.id"
              "  ELSE $2 END, $3, x.id, x.key, x.state, x.amount, x.code, x.message, $10,"
              "  $11::bigint) g ORDER BY x.n",
              12, params, callbacks_on_applied, r);
    for (size_t f = 0; f < 6; f++)
        free(arrays[f]);
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

/* One object of a callback: a charge, or a refund. */
static int
callbacks_item(struct callback_item *it, json_t *obj, const char *type)
{
    memset(it, 0, sizeof(*it)); /* a slot may be reused after an item not acted on */
    if (!json_is_object(obj) || callbacks_copy(it->id, sizeof(it->id), obj, "id", true) < 0 ||
        callbacks_copy(it->failure_code, sizeof(it->failure_code), obj, "failure_code", false) <
            0 ||
        callbacks_copy(it->failure_message, sizeof(it->failure_message), obj, "failure_message",
                       false) < 0)
        return -1;
    bool refund = strncmp(type, "refund.", 7) == 0 || strcmp(type, "charge.refunded") == 0;
    json_t *amount = json_object_get(obj, refund ? "amount" : "amount_captured");
    if (json_is_integer(amount) && json_integer_value(amount) > 0)
        snprintf(it->amount, sizeof(it->amount), "%lld", (long long)json_integer_value(amount));
    /* Our attempt's key, when the gateway echoes it (metadata, or its own field). */
    const char *key =
        json_string_value(json_object_get(json_object_get(obj, "metadata"), "paymentd_attempt"));
    if (!key)
        key = json_string_value(json_object_get(obj, "idempotency_key"));
    if (key && strlen(key) < sizeof(it->key))
        snprintf(it->key, sizeof(it->key), "%s", key);
    const char *status = json_string_value(json_object_get(obj, "status"));
    if (refund) {
        if (status && (strcmp(status, "succeeded") == 0 || strcmp(status, "failed") == 0 ||
                       strcmp(status, "canceled") == 0 || strcmp(status, "pending") == 0))
            it->state = strcmp(status, "succeeded") == 0  ? "succeeded"
                        : strcmp(status, "failed") == 0   ? "failed"
                        : strcmp(status, "canceled") == 0 ? "canceled"
                                                          : "pending";
        if (it->state && strcmp(it->state, "failed") == 0)
            callbacks_copy(it->failure_code, sizeof(it->failure_code), obj, "failure_reason",
                           false);
    } else if (strcmp(type, "charge.succeeded") == 0) {
        /* Captured, or only authorized (manual capture). */
        bool authorized_only = json_is_false(json_object_get(obj, "captured")) ||
                               (status && strcmp(status, "requires_capture") == 0);
        it->state = authorized_only ? "requires_capture" : "succeeded";
    } else if (strcmp(type, "charge.captured") == 0) {
        it->state = "succeeded";
    } else if (strcmp(type, "charge.failed") == 0) {
        it->state = "failed";
    }
    return 0;
}

/* Reads the body: {id, type, data: {object: {id, ...}}}; for charge.refunded
 * the charge's refunds (data.object.refunds, a list or {data: [...]}). */
static int
callbacks_decode(struct callback *cb, const char *body, size_t len, const char **why)
{
    json_t *root = json_loadb(body, len, JSON_REJECT_DUPLICATES, NULL);
    json_t *obj = json_object_get(json_object_get(root, "data"), "object");
    int rc = -1;
    *why = "The body must be a JSON event with id, type and data.object.id.";
    if (!json_is_object(obj) ||
        callbacks_copy(cb->event_id, sizeof(cb->event_id), root, "id", true) < 0 ||
        callbacks_copy(cb->type, sizeof(cb->type), root, "type", true) < 0)
        goto out;
    if (strcmp(cb->type, "charge.refunded") == 0) {
        json_t *list = json_object_get(obj, "refunds");
        if (json_is_object(list))
            list = json_object_get(list, "data");
        size_t i;
        json_t *v;
        json_array_foreach(list, i, v)
        {
            if (cb->n_items == CALLBACK_MAX_ITEMS) {
                log_warn("gateway callback %s lists more than %d refunds; the rest are left to "
                         "their refund.updated callbacks and the sweeps",
                         cb->event_id, CALLBACK_MAX_ITEMS);
                break;
            }
            if (callbacks_item(&cb->items[cb->n_items], v, cb->type) < 0)
                goto out;
            if (cb->items[cb->n_items].state)
                cb->n_items++;
        }
    } else {
        if (callbacks_item(&cb->items[0], obj, cb->type) < 0)
            goto out;
        cb->n_items = cb->items[0].state ? 1 : 0;
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
    if (cb->n_items == 0) { /* nothing this service acts on: counted, acknowledged */
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
