/*
 * deliver - merchant webhook deliveries, in the outbox role.
 *
 * Offers deliver_start(), deliver_kick() and deliver_stop(). When the
 * dispatcher marks events sent, the same statement creates one
 * webhook_deliveries row per enabled endpoint of the account that
 * subscribed to the event's type (outbox.c), so a delivery exists before
 * the event counts as handed over. This module claims due deliveries
 * (FOR UPDATE SKIP LOCKED, as a lease, so several dispatchers can run),
 * one at a time per payment and endpoint, in event order (a delivery waits
 * while an earlier event of the same payment is pending or failing there),
 * POSTs the event JSON through libcurl's multi interface on the role's loop,
 * and signs it the way the stock Stripe libraries verify:
 *     Payments-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, t "." body)>
 * (also sent as Stripe-Signature). A 2xx within WEBHOOK_TIMEOUT_MS is
 * delivered; anything else is retried with exponential back-off and full
 * jitter (1 s doubling to an hour). An endpoint that has failed every try
 * for WEBHOOK_RETRY_WINDOW (3 days) is disabled, its pending deliveries are
 * abandoned, and a webhook_endpoint.disabled event says so. Connections to
 * private addresses are refused at connect time unless
 * WEBHOOK_ALLOW_PRIVATE=1. Secrets and bodies are never logged. Calls
 * curlev, pgev, crypto.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "crypto.h"
#include "curlev.h"
#include "log.h"
#include "metrics.h"
#include "outbox.h"
#include "xmalloc.h"

#define DELIVER_BATCH "50"

struct deliver {
    struct role_ctx *ctx;
    struct pgev_pool *pg;
    struct curlev *curl;
    struct event *timer;
    bool busy;
    bool again;
    int in_flight;
    char lease[24];
    char window[24];
};

struct attempt {
    struct deliver *d;
    char id[24];
    char endpoint[24];
};

static void
deliver_on_recorded(void *arg, PGresult *res, const char *err)
{
    (void)arg;
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK)
        log_warn("webhooks: recording a delivery failed: %s",
                 err ? err : PQresultErrorMessage(res));
    else if (PQntuples(res) == 1 && strcmp(PQgetvalue(res, 0, 0), "t") == 0)
        log_warn("webhooks: endpoint %s failed every try for the retry window: disabled",
                 PQgetvalue(res, 0, 1));
}

static void
deliver_on_response(void *arg, const struct curlev_response *resp)
{
    struct attempt *a = arg;
    struct deliver *d = a->d;
    char status[16], error[160];
    bool ok = resp->rc == CURLE_OK && resp->status >= 200 && resp->status < 300;
    snprintf(status, sizeof(status), "%ld", resp->status);
    if (ok)
        error[0] = '\0';
    else if (resp->rc != CURLE_OK)
        snprintf(error, sizeof(error), "%s", resp->error ? resp->error : "transfer failed");
    else
        snprintf(error, sizeof(error), "answered %ld", resp->status);
    d->in_flight--;
    metric_inc(role_metrics(d->ctx), ok ? MC_WEBHOOK_ATTEMPTS : MC_WEBHOOK_FAILURES);
    if (!ok)
        metric_inc(role_metrics(d->ctx), MC_WEBHOOK_ATTEMPTS);
    const char *params[5] = {a->id, ok ? "t" : "f", resp->status ? status : NULL, ok ? NULL : error,
                             d->window};
    /* One statement: the delivery's outcome, the endpoint's failure streak,
     * and, past the retry window, the endpoint disabled with its event. */
    pgev_exec(
        d->pg,
        "WITH upd AS (UPDATE webhook_deliveries SET"
        "  status = CASE WHEN $2::boolean THEN 'delivered'"
        "   WHEN (SELECT w.status = 'enabled' AND w.failing_since < now() - $5::bigint *"
        "    interval '1 millisecond' FROM webhook_endpoints w WHERE w.id = endpoint_id)"
        "   THEN 'abandoned' ELSE 'failed' END,"
        "  delivered_at = CASE WHEN $2::boolean THEN now() END, last_status = $3::integer,"
        "  last_error = $4, next_attempt_at = now() + make_interval(secs => random() *"
        "   least(3600, 2 ^ least(attempts, 12)))"
        "  WHERE id = $1 RETURNING endpoint_id),"
        /* One UPDATE for the streak and the disabling: two updates of the
         * same row in one statement would see only one of them applied. */
        " ep AS (UPDATE webhook_endpoints w SET"
        "  failing_since = CASE WHEN $2::boolean THEN NULL"
        "   ELSE coalesce(w.failing_since, now()) END,"
        "  status = CASE WHEN NOT $2::boolean AND w.status = 'enabled'"
        "   AND w.failing_since < now() - $5::bigint * interval '1 millisecond'"
        "   THEN 'disabled' ELSE w.status END,"
        "  updated_at = CASE WHEN NOT $2::boolean AND w.status = 'enabled'"
        "   AND w.failing_since < now() - $5::bigint * interval '1 millisecond'"
        "   THEN now() ELSE w.updated_at END"
        "  FROM upd WHERE w.id = upd.endpoint_id RETURNING w.*),"
        " dis AS (SELECT * FROM ep WHERE NOT $2::boolean AND ep.status = 'disabled'"
        "  AND ep.updated_at = now()),"
        " gone AS (UPDATE webhook_deliveries x SET status = 'abandoned' FROM dis"
        "  WHERE x.endpoint_id = dis.id AND x.status IN ('pending', 'failed') RETURNING 1),"
        " ev AS (INSERT INTO outbox (event_id, account_id, aggregate_type, aggregate_id, type,"
        "  payload) SELECT e.id, dis.account_id, 'webhook_endpoint', dis.public_id,"
        "  'webhook_endpoint.disabled',"
        "  json_build_object('id', e.id, 'object', 'event', 'api_version', '2024-06-20',"
        "   'created', extract(epoch FROM now())::bigint, 'livemode', false,"
        "   'type', 'webhook_endpoint.disabled',"
        "   'data', json_build_object('object', "
        "webhook_endpoint_object(ROW(dis.*)::webhook_endpoints, false)))"
        "  FROM dis, (SELECT 'evt_' || replace(gen_random_uuid()::text, '-', '') AS id) e"
        "  RETURNING 1)"
        " SELECT EXISTS (SELECT 1 FROM dis), (SELECT public_id FROM dis),"
        "  (SELECT count(*) FROM gone), (SELECT count(*) FROM ev)",
        5, params, deliver_on_recorded, d);
    free(a);
}

static void
deliver_send(struct deliver *d, PGresult *res, int row)
{
    const char *body = PQgetvalue(res, row, 3);
    const char *secret = PQgetvalue(res, row, 2);
    char sig[65], ts[24], header_p[160], header_s[160];
    snprintf(ts, sizeof(ts), "%lld", (long long)time(NULL));
    char *signed_payload = xasprintf("%s.%s", ts, body);
    crypto_hmac_sha256_hex(secret, strlen(secret), signed_payload, strlen(signed_payload), sig);
    free(signed_payload);
    snprintf(header_p, sizeof(header_p), "Payments-Signature: t=%s,v1=%s", ts, sig);
    snprintf(header_s, sizeof(header_s), "Stripe-Signature: t=%s,v1=%s", ts, sig);
    const char *headers[] = {"Content-Type: application/json; charset=utf-8",
                             "User-Agent: paymentd-webhooks/1",
                             header_p,
                             header_s,
                             "Expect:",
                             NULL};
    struct attempt *a = xcalloc(1, sizeof(*a));
    a->d = d;
    snprintf(a->id, sizeof(a->id), "%s", PQgetvalue(res, row, 0));
    snprintf(a->endpoint, sizeof(a->endpoint), "%s", PQgetvalue(res, row, 4));
    d->in_flight++;
    curlev_request(d->curl, "POST", PQgetvalue(res, row, 1), headers, body,
                   (long)d->ctx->cfg.webhook_timeout_ms, deliver_on_response, a);
}

static void
deliver_on_claimed(void *arg, PGresult *res, const char *err)
{
    struct deliver *d = arg;
    d->busy = false;
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK) {
        log_warn("webhooks: claiming deliveries failed: %s", err ? err : PQresultErrorMessage(res));
        return;
    }
    int rows = PQntuples(res);
    for (int i = 0; i < rows; i++)
        deliver_send(d, res, i);
    if (rows > 0 || d->again) {
        d->again = false;
        deliver_kick(d);
    }
}

void
deliver_kick(struct deliver *d)
{
    if (d->busy) {
        d->again = true;
        return;
    }
    if (d->in_flight >= 500)
        return; /* the timer comes back when some have finished */
    d->busy = true;
    const char *params[2] = {DELIVER_BATCH, d->lease};
    pgev_exec(d->pg,
              "WITH due AS (SELECT x.id FROM webhook_deliveries x"
              "  WHERE x.status IN ('pending', 'failed') AND x.next_attempt_at <= now()"
              /* in order per payment: an earlier event of the same one goes first */
              "  AND NOT EXISTS (SELECT 1 FROM webhook_deliveries y"
              "   WHERE y.endpoint_id = x.endpoint_id AND y.aggregate_id = x.aggregate_id"
              "   AND y.outbox_id < x.outbox_id AND y.status IN ('pending', 'failed'))"
              "  ORDER BY x.next_attempt_at, x.id LIMIT $1 FOR UPDATE SKIP LOCKED),"
              " gone AS (UPDATE webhook_deliveries x SET status = 'abandoned' FROM due,"
              "  webhook_endpoints w WHERE x.id = due.id AND w.id = x.endpoint_id"
              "  AND (w.status <> 'enabled' OR w.deleted) RETURNING x.id)"
              " UPDATE webhook_deliveries x SET attempts = x.attempts + 1,"
              "  next_attempt_at = now() + $2::bigint * interval '1 millisecond'"
              " FROM due, webhook_endpoints w, outbox o"
              " WHERE x.id = due.id AND w.id = x.endpoint_id AND o.id = x.outbox_id"
              "  AND w.status = 'enabled' AND NOT w.deleted"
              " RETURNING x.id, w.url, w.secret, o.payload::text, w.public_id",
              2, params, deliver_on_claimed, d);
}

static void
deliver_on_timer(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    deliver_kick(arg);
}

struct deliver *
deliver_start(struct role_ctx *ctx, struct pgev_pool *pg)
{
    struct deliver *d = xcalloc(1, sizeof(*d));
    d->ctx = ctx;
    d->pg = pg;
    d->curl = curlev_new(ctx->base);
    curlev_set_deny_private(d->curl, !ctx->cfg.webhook_allow_private);
    /* A claimed delivery is retried by someone else only after its try had
     * all the time it may take. */
    snprintf(d->lease, sizeof(d->lease), "%lld", (long long)ctx->cfg.webhook_timeout_ms + 5000);
    snprintf(d->window, sizeof(d->window), "%lld", (long long)ctx->cfg.webhook_retry_window_ms);
    d->timer = event_new(ctx->base, -1, EV_PERSIST, deliver_on_timer, d);
    struct timeval tv = {0, 500000};
    event_add(d->timer, &tv);
    return d;
}

void
deliver_stop(struct deliver *d)
{
    event_free(d->timer);
    curlev_free(d->curl);
    free(d);
}
