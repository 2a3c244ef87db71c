/*
 * gateway_sim - the adapter for gatewaysim, the project's own gateway
 * simulator (tools/gatewaysim.c), spoken over HTTP with JSON bodies.
 *
 * Offers gateway_sim_new() and gateway_outcome_name(). Every call carries
 * an Idempotency-Key, so a repeated call can never charge twice. Answers
 * are classified for the retry and failover rules: a decline is final; a
 * refused connection, a 503 marked not processed, or a 429 is certainly
 * not processed; a timeout or reset after the request went out is
 * ambiguous and may only be resolved by asking again with the same key.
 * Calls curlev, jansson.
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gateway.h"
#include "redact.h"
#include "xmalloc.h"

struct sim {
    struct curlev *curl;
    char *base;
    char *auth; /* "Authorization: Bearer ...", or NULL */
    long timeout_ms;
};

struct sim_call {
    gw_cb cb;
    void *arg;
    enum gw_op op;
};

const char *
gateway_outcome_name(enum gw_outcome o)
{
    static const char *const names[] = {
        "succeeded",     "requires_capture", "requires_action", "declined", "canceled",
        "not_processed", "ambiguous",        "rejected",        "pending",  "not_found"};
    return (unsigned)o < sizeof(names) / sizeof(names[0]) ? names[o] : "unknown";
}

static void
sim_copy(char *dst, size_t cap, json_t *obj, const char *key)
{
    const char *v = json_string_value(json_object_get(obj, key));
    text_copy(dst, cap, v ? v : "");
}

static void
sim_on_response(void *arg, const struct curlev_response *resp)
{
    struct sim_call *call = arg;
    struct gw_result res = {0};

    if (resp->rc != CURLE_OK) {
        res.outcome = resp->sent ? GW_AMBIGUOUS : GW_NOT_PROCESSED;
        text_copy(res.message, sizeof(res.message), resp->error ? resp->error : "error");
        goto out;
    }
    json_t *body = json_loadb(resp->body, resp->len, 0, NULL);
    if (resp->status == 429 || resp->status == 503) {
        /* gatewaysim marks whether it did anything; without the mark it is unknown. */
        json_t *processed = body ? json_object_get(body, "processed") : NULL;
        res.outcome = json_is_false(processed) ? GW_NOT_PROCESSED : GW_AMBIGUOUS;
        if (resp->status == 429)
            res.outcome = GW_NOT_PROCESSED;
        res.retry_after_ms = resp->retry_after_ms;
        snprintf(res.message, sizeof(res.message), "gateway answered %ld", resp->status);
        json_decref(body);
        goto out;
    }
    if (resp->status >= 500 || !body) {
        res.outcome = GW_AMBIGUOUS;
        snprintf(res.message, sizeof(res.message), "gateway answered %ld", resp->status);
        json_decref(body);
        goto out;
    }
    if (resp->status == 401 || resp->status == 403) {
        /* Our credentials, not the payment: certainly not processed, and
         * another provider may take it. */
        res.outcome = GW_NOT_PROCESSED;
        snprintf(res.message, sizeof(res.message), "gateway refused the key (%ld)", resp->status);
        json_decref(body);
        goto out;
    }
    if (resp->status == 409 || resp->status == 423) {
        /* "In progress" or locked: another request with this key may be
         * moving the money right now: ambiguous, asked again later. */
        res.outcome = GW_AMBIGUOUS;
        snprintf(res.message, sizeof(res.message), "gateway answered %ld", resp->status);
        json_decref(body);
        goto out;
    }
    if (resp->status == 404 && (call->op == GW_RETRIEVE || call->op == GW_RETRIEVE_REFUND)) {
        res.outcome = GW_NOT_FOUND;
        snprintf(res.message, sizeof(res.message), "not known to the gateway");
        json_decref(body);
        goto out;
    }
    if (resp->status >= 400) {
        res.outcome = GW_REJECTED;
        json_t *err = json_object_get(body, "error");
        sim_copy(res.message, sizeof(res.message), err ? err : body, "message");
        json_decref(body);
        goto out;
    }
    const char *status = json_string_value(json_object_get(body, "status"));
    sim_copy(res.charge_id, sizeof(res.charge_id), body, "id");
    const char *kind = json_string_value(json_object_get(body, "object"));
    if (kind && strcmp(kind, "refund") == 0) {
        res.amount = json_integer_value(json_object_get(body, "amount"));
        if (status && strcmp(status, "succeeded") == 0)
            res.outcome = GW_SUCCEEDED;
        else if (status && strcmp(status, "pending") == 0)
            res.outcome = GW_PENDING;
        else if (status && strcmp(status, "canceled") == 0)
            res.outcome = GW_CANCELED;
        else if (status && strcmp(status, "failed") == 0) {
            res.outcome = GW_DECLINED;
            sim_copy(res.code, sizeof(res.code), body, "failure_reason");
        } else
            res.outcome = GW_AMBIGUOUS;
        json_decref(body);
        goto out;
    }
    res.amount = json_integer_value(json_object_get(body, "amount_captured"));
    if (!status)
        res.outcome = GW_AMBIGUOUS;
    else if (strcmp(status, "succeeded") == 0)
        res.outcome = GW_SUCCEEDED;
    else if (strcmp(status, "requires_capture") == 0)
        res.outcome = GW_REQUIRES_CAPTURE;
    else if (strcmp(status, "requires_action") == 0)
        res.outcome = GW_REQUIRES_ACTION;
    else if (strcmp(status, "canceled") == 0)
        res.outcome = GW_CANCELED;
    else if (strcmp(status, "pending") == 0)
        res.outcome = GW_PENDING;
    else if (strcmp(status, "failed") == 0) {
        res.outcome = GW_DECLINED;
        sim_copy(res.code, sizeof(res.code), body, "failure_code");
        sim_copy(res.decline_code, sizeof(res.decline_code), body, "decline_code");
        sim_copy(res.message, sizeof(res.message), body, "failure_message");
    } else
        res.outcome = GW_AMBIGUOUS;
    json_decref(body);
out:
    call->cb(call->arg, &res);
    free(call);
}

static void
sim_call(struct gateway *gw, const struct gw_request *req, gw_cb cb, void *arg)
{
    struct sim *s = gw->impl;
    struct sim_call *call = xmalloc(sizeof(*call));
    char url[600], key[200];
    json_t *body = json_object();
    const char *method = "POST";

    call->cb = cb;
    call->arg = arg;
    call->op = req->op;
    switch (req->op) {
    case GW_CHARGE:
        snprintf(url, sizeof(url), "%s/v1/charges", s->base);
        json_object_set_new(body, "amount", json_integer(req->amount));
        json_object_set_new(body, "currency", json_string(req->currency));
        json_object_set_new(body, "payment_method", json_string(req->payment_method));
        json_object_set_new(body, "capture", json_boolean(req->capture));
        /* The gateway keeps our attempt's key on the charge and echoes it in
         * callbacks, so a callback finds its attempt even when the answer
         * to this call was lost. */
        json_object_set_new(body, "metadata",
                            json_pack("{s:s}", "paymentd_attempt", req->idempotency_key));
        break;
    case GW_CAPTURE:
        snprintf(url, sizeof(url), "%s/v1/charges/%s/capture", s->base, req->charge_id);
        json_object_set_new(body, "amount", json_integer(req->amount));
        break;
    case GW_CANCEL:
        snprintf(url, sizeof(url), "%s/v1/charges/%s/cancel", s->base, req->charge_id);
        break;
    case GW_REFUND:
        snprintf(url, sizeof(url), "%s/v1/refunds", s->base);
        json_object_set_new(body, "charge", json_string(req->charge_id));
        json_object_set_new(body, "amount", json_integer(req->amount));
        json_object_set_new(body, "metadata",
                            json_pack("{s:s}", "paymentd_attempt", req->idempotency_key));
        break;
    case GW_REFUND_CANCEL:
        snprintf(url, sizeof(url), "%s/v1/refunds/%s/cancel", s->base, req->charge_id);
        break;
    case GW_RETRIEVE_REFUND:
        method = "GET";
        if (req->charge_id && *req->charge_id)
            snprintf(url, sizeof(url), "%s/v1/refunds/%s", s->base, req->charge_id);
        else
            snprintf(url, sizeof(url), "%s/v1/refunds?idempotency_key=%s", s->base,
                     req->idempotency_key);
        break;
    case GW_RETRIEVE:
        method = "GET";
        if (req->charge_id && *req->charge_id)
            snprintf(url, sizeof(url), "%s/v1/charges/%s", s->base, req->charge_id);
        else
            snprintf(url, sizeof(url), "%s/v1/charges?idempotency_key=%s", s->base,
                     req->idempotency_key);
        break;
    }
    bool get = req->op == GW_RETRIEVE || req->op == GW_RETRIEVE_REFUND;
    char *text = get ? NULL : json_dumps(body, JSON_COMPACT);
    json_decref(body);
    snprintf(key, sizeof(key), "Idempotency-Key: %s", req->idempotency_key);
    const char *headers[] = {"Content-Type: application/json", key, "Expect:", s->auth, NULL};
    curlev_request(s->curl, method, url, headers, text, s->timeout_ms, sim_on_response, call);
    free(text);
}

static void
sim_free(struct gateway *gw)
{
    struct sim *s = gw->impl;
    free(s->base);
    free(s->auth);
    free(s);
    free(gw);
}

struct gateway *
gateway_sim_new(struct curlev *curl, const char *name, const char *base_url, const char *key,
                long timeout_ms)
{
    struct gateway *gw = xcalloc(1, sizeof(*gw));
    struct sim *s = xcalloc(1, sizeof(*s));
    s->curl = curl;
    s->base = xstrdup(base_url);
    size_t n = strlen(s->base);
    if (n && s->base[n - 1] == '/')
        s->base[n - 1] = '\0';
    s->timeout_ms = timeout_ms;
    if (key && *key) {
        size_t len = strlen(key) + 32;
        s->auth = xmalloc(len);
        snprintf(s->auth, len, "Authorization: Bearer %s", key);
    }
    gw->name = name;
    gw->call = sim_call;
    gw->free = sim_free;
    gw->impl = s;
    return gw;
}
