/*
 * webhooks - the webhook endpoints API: POST /v1/webhook_endpoints (url,
 * enabled_events[], description; the signing secret whsec_... is in this
 * answer only), GET list and one, POST :id to update (url, enabled_events,
 * description, disabled) and DELETE :id.
 *
 * Offers webhooks_create(), webhooks_list(), webhooks_retrieve(),
 * webhooks_update() and webhooks_delete(). A URL must be http(s) and may
 * not point at this machine or a private network (loopback, link-local,
 * private ranges; also names such as localhost) unless
 * WEBHOOK_ALLOW_PRIVATE=1: a merchant must not be able to make the service
 * call its own network. Names are resolved only when delivering, where the
 * address actually connected to is checked again. Calls api, params, lists,
 * net, ids, libcurl's URL parser.
 */
#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api.h"
#include "ids.h"
#include "net.h"
#include "xmalloc.h"

static const char *const known_events[] = {"*",
                                           "payment_intent.created",
                                           "payment_intent.succeeded",
                                           "payment_intent.payment_failed",
                                           "payment_intent.requires_action",
                                           "payment_intent.canceled",
                                           "payment_intent.amount_capturable_updated",
                                           "payment_intent.processing",
                                           NULL};

#define WE_OBJ(alias, secret) "webhook_endpoint_object(" alias ", " secret ")::text"

static void
webhooks_on_object(void *arg, PGresult *res, const char *err)
{
    struct api_req *r = arg;
    if (!v1_rows(r, res, err))
        return;
    if (PQntuples(res) == 0) {
        v1_not_found(r, "webhook endpoint", "id");
        return;
    }
    v1_respond(r, 200, PQgetvalue(res, 0, 0));
}

/* Checks url; 0 or -1 with e filled. */
static int
webhooks_url(struct api_req *r, const char *url, struct params_error *e)
{
    CURLU *u = curl_url();
    char *scheme = NULL, *host = NULL;
    int rc = -1;
    if (curl_url_set(u, CURLUPART_URL, url, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK ||
        (strcmp(scheme, "https") != 0 && strcmp(scheme, "http") != 0)) {
        params_fail(e, 400, "url_invalid", "url", "Invalid URL: must be an http or https URL.");
        goto out;
    }
    if (!r->api->ctx->cfg.webhook_allow_private && net_host_private_literal(host)) {
        params_fail(e, 400, "url_invalid", "url",
                    "Invalid URL: it points at a private, loopback or link-local address.");
        goto out;
    }
    rc = 0;
out:
    curl_free(scheme);
    curl_free(host);
    curl_url_cleanup(u);
    return rc;
}

/* enabled_events as a PostgreSQL array literal ({a,b}); NULL when absent. */
static int
webhooks_events(const json_t *params, char **out, struct params_error *e)
{
    json_t *v = json_object_get(params, "enabled_events");
    size_t i;
    json_t *ev;
    *out = NULL;
    if (!v)
        return 1;
    if (!json_is_array(v) || json_array_size(v) == 0 || json_array_size(v) > 100)
        goto bad;
    struct evbuffer *buf = evbuffer_new();
    evbuffer_add(buf, "{", 1);
    json_array_foreach(v, i, ev)
    {
        const char *name = json_string_value(ev);
        bool known = false;
        for (const char *const *k = known_events; name && *k; k++)
            known = known || strcmp(*k, name) == 0;
        if (!known) {
            evbuffer_free(buf);
            goto bad;
        }
        evbuffer_add_printf(buf, "%s\"%s\"", i ? "," : "", name);
    }
    evbuffer_add(buf, "}", 2);
    *out = xstrdup((const char *)evbuffer_pullup(buf, -1));
    evbuffer_free(buf);
    return 0;
bad:
    params_fail(e, 400, "parameter_invalid", "enabled_events",
                "Invalid enabled_events: a list of known event types, or *.");
    return -1;
}

void
webhooks_create(struct api_req *r)
{
    static const char *const allowed[] = {
        "url", "enabled_events", "description", "api_version", "metadata", "expand", NULL};
    struct params_error e;
    const char *url = NULL, *description = NULL;
    char *events = NULL, id[48], secret[80], account[24];
    int rc;
    if (params_only(r->params, allowed, &e) < 0 ||
        (rc = params_str(r->params, "url", 2048, &url, &e)) < 0 ||
        params_str(r->params, "description", 1000, &description, &e) < 0 ||
        webhooks_events(r->params, &events, &e) < 0) {
        v1_params_error(r, &e);
        return;
    }
    if (!url || !events) {
        free(events);
        params_fail(&e, 400, "parameter_missing", url ? "enabled_events" : "url",
                    "Missing required param: %s.", url ? "enabled_events" : "url");
        v1_params_error(r, &e);
        return;
    }
    if (webhooks_url(r, url, &e) < 0) {
        free(events);
        v1_params_error(r, &e);
        return;
    }
    ids_random(id, sizeof(id), "we_", 12);
    ids_random(secret, sizeof(secret), "whsec_", 24);
    snprintf(account, sizeof(account), "%lld", (long long)r->account_id);
    char row[24];
    snprintf(row, sizeof(row), "%lld", (long long)r->idem_row);
    const char *params[8] = {id,
                             account,
                             url,
                             events,
                             description,
                             secret,
                             r->idem_row ? row : NULL,
                             r->idem_row ? r->holder : NULL};
    /* Written only while this request holds its Idempotency-Key's claim. */
    pgev_exec(r->api->pg,
              "WITH hold AS (SELECT idempotency_hold($7::bigint, $8))"
              " INSERT INTO webhook_endpoints (public_id, account_id, url, enabled_events,"
              " description, secret) SELECT $1, $2, $3, $4::text[], $5, $6 FROM hold"
              " RETURNING " WE_OBJ("webhook_endpoints", "true"),
              8, params, webhooks_on_object, r);
    free(events);
}

void
webhooks_retrieve(struct api_req *r)
{
    char account[24];
    snprintf(account, sizeof(account), "%lld", (long long)r->account_id);
    const char *params[2] = {r->id, account};
    pgev_exec(
        r->api->pg,
        "SELECT " WE_OBJ("w", "false") " FROM webhook_endpoints w"
                                       " WHERE public_id = $1 AND account_id = $2 AND NOT deleted",
        2, params, webhooks_on_object, r);
}

void
webhooks_list(struct api_req *r)
{
    static const char *const allowed[] = {"limit", "starting_after", "ending_before", "expand",
                                          NULL};
#define WE_PAGE(cmp, order)                                                                        \
    LISTS_SQL("webhook_endpoints", "public_id", WE_OBJ("p", "false"), "true", "NOT p.deleted",     \
              cmp, order)
    lists_run(r, allowed, NULL, WE_PAGE("<", "DESC"), WE_PAGE(">", "ASC"), "webhook_endpoint",
              "/v1/webhook_endpoints");
#undef WE_PAGE
}

void
webhooks_update(struct api_req *r)
{
    static const char *const allowed[] = {"url",      "enabled_events", "description", "disabled",
                                          "metadata", "expand",         NULL};
    struct params_error e;
    const char *url = NULL, *description = NULL;
    char *events = NULL, account[24];
    bool disabled = false;
    int has_disabled;
    if (params_only(r->params, allowed, &e) < 0 ||
        params_str(r->params, "url", 2048, &url, &e) < 0 ||
        params_str(r->params, "description", 1000, &description, &e) < 0 ||
        webhooks_events(r->params, &events, &e) < 0 ||
        (has_disabled = params_bool(r->params, "disabled", &disabled, &e)) < 0 ||
        (url && webhooks_url(r, url, &e) < 0)) {
        free(events);
        v1_params_error(r, &e);
        return;
    }
    snprintf(account, sizeof(account), "%lld", (long long)r->account_id);
    char row[24];
    snprintf(row, sizeof(row), "%lld", (long long)r->idem_row);
    const char *params[8] = {r->id,
                             account,
                             url,
                             events,
                             description,
                             has_disabled == 0 ? (disabled ? "disabled" : "enabled") : NULL,
                             r->idem_row ? row : NULL,
                             r->idem_row ? r->holder : NULL};
    /* Re-enabling forgets a failure streak; the deliveries start over. Written
     * only while this request holds its Idempotency-Key's claim. */
    pgev_exec(r->api->pg,
              "WITH hold AS (SELECT idempotency_hold($7::bigint, $8))"
              " UPDATE webhook_endpoints w SET url = coalesce($3, url),"
              " enabled_events = coalesce($4::text[], enabled_events),"
              " description = coalesce($5, description), status = coalesce($6, status),"
              " failing_since = CASE WHEN $6 = 'enabled' THEN NULL ELSE failing_since END,"
              " updated_at = now()"
              " FROM hold WHERE public_id = $1 AND account_id = $2 AND NOT deleted"
              " RETURNING " WE_OBJ("w", "false"),
              8, params, webhooks_on_object, r);
    free(events);
}

void
webhooks_delete(struct api_req *r)
{
    char account[24];
    snprintf(account, sizeof(account), "%lld", (long long)r->account_id);
    const char *params[2] = {r->id, account};
    pgev_exec(r->api->pg,
              "UPDATE webhook_endpoints SET deleted = true, status = 'disabled',"
              " updated_at = now() WHERE public_id = $1 AND account_id = $2 AND NOT deleted"
              " RETURNING json_build_object('id', public_id, 'object', 'webhook_endpoint',"
              " 'deleted', true)::text",
              2, params, webhooks_on_object, r);
}
