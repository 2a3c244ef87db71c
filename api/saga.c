/*
 * saga - the order saga's intake: InventoryReserved messages from other
 * services become payments.
 *
 * Offers saga_start() and saga_stop(). api/0 listens with an NNG PULL socket
 * at INTAKE_URL (one listener: an ipc path or tcp port cannot be shared by
 * several processes; publishers' PUSH sockets queue while it restarts). Each
 * message is a msgpack envelope of type InventoryReserved with orderId,
 * amount (integer, minor units), currency, customerId, paymentMethod and
 * eventId, checked field by field; a malformed one is logged, counted and
 * dropped, and the api keeps serving. A valid one creates the payment,
 * already processing, for the account SAGA_ACCOUNT, and sends the confirm
 * job to a worker. The payment's order id is unique per account, so the
 * same order again (a redelivery, a second publisher) creates nothing and
 * charges nothing. The worker's outcome statement writes PaymentCompleted or
 * PaymentFailed into the outbox with the outcome itself, so it survives
 * crashes like every other event. Calls api, envelope, nngev, pgev, money.
 */
#include <nng/nng.h>
#include <nng/protocol/pipeline0/pull.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api.h"
#include "envelope.h"
#include "ids.h"
#include "log.h"
#include "metrics.h"
#include "money.h"
#include "xmalloc.h"

struct saga {
    struct api *api;
    nng_socket pull;
    char account[24]; /* internal id, once looked up */
};

/* An order between its INSERT and its worker job. */
struct saga_pending {
    struct saga *s;
    char order_id[101];
};

struct saga_order {
    char order_id[101];
    int64_t amount;
    char currency[4];
    char customer[256];
    char payment_method[256];
    char event_id[128];
};

static void
saga_reject(struct saga *s, const char *why, const char *field)
{
    log_warn("saga: dropped an intake message: %s%s%s", why, field ? ": " : "", field ? field : "");
    metric_inc(role_metrics(s->api->ctx), MC_SAGA_REJECTED);
}

static bool
saga_token(const char *s)
{
    if (!*s)
        return false;
    for (; *s; s++) {
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') ||
              *s == '_' || *s == '-'))
            return false;
    }
    return true;
}

/* The border check of one InventoryReserved body; NULL or the bad field. */
static const char *
saga_decode(const msgpack_object *b, struct saga_order *o)
{
    if (envelope_get_str(b, "orderId", o->order_id, sizeof(o->order_id)) < 0 || !o->order_id[0])
        return "orderId";
    if (envelope_get_int(b, "amount", &o->amount) < 0 || !money_amount_valid(o->amount))
        return "amount";
    if (envelope_get_str(b, "currency", o->currency, sizeof(o->currency)) < 0)
        return "currency";
    for (char *p = o->currency; *p; p++)
        *p = (char)(*p >= 'A' && *p <= 'Z' ? *p + 32 : *p);
    if (money_exponent(o->currency) < 0)
        return "currency";
    if (envelope_get(b, "customerId") &&
        envelope_get_str(b, "customerId", o->customer, sizeof(o->customer)) < 0)
        return "customerId";
    if (envelope_get_str(b, "paymentMethod", o->payment_method, sizeof(o->payment_method)) < 0 ||
        !saga_token(o->payment_method))
        return "paymentMethod";
    if (envelope_get_str(b, "eventId", o->event_id, sizeof(o->event_id)) < 0 || !o->event_id[0])
        return "eventId";
    return NULL;
}

static void
saga_on_job(void *arg, int err, nng_msg *reply)
{
    struct saga_pending *p = arg;
    p->s->api->jobs_in_flight--;
    if (err)
        log_warn("saga: order %s: worker job failed (%s); the payment stays processing",
                 p->order_id, nng_strerror(err));
    if (reply)
        nng_msg_free(reply);
    free(p);
}

static void
saga_on_created(void *arg, PGresult *res, const char *err)
{
    struct saga_pending *p = arg;
    struct saga *s = p->s;
    const char *order = p->order_id;
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK) {
        /* Not acknowledged to anyone: the publisher's redelivery will retry. */
        log_error("saga: order %s: payment not created: %s", order,
                  err ? err : PQresultErrorMessage(res));
        free(p);
        return;
    }
    if (PQntuples(res) == 0) {
        log_info("saga: order %s already has its payment; message ignored", order);
        free(p);
        return;
    }
    const struct config *cfg = &s->api->ctx->cfg;
    size_t n;
    void *bytes = jobs_message("confirm", PQgetvalue(res, 0, 0), shm_now_ms() + cfg->job_timeout_ms,
                               res, 0, 1 + JOB_AMOUNT_COL_OFFSET, 0, NULL, &n);
    log_info("saga: order %s -> payment %s", order, PQgetvalue(res, 0, 0));
    s->api->jobs_in_flight++;
    nngev_request(s->api->ctx->nngev, s->api->workers, nngev_msg(bytes, n),
                  (int)cfg->job_timeout_ms, saga_on_job, p);
    free(bytes);
}

static void
saga_create(struct saga *s, const struct saga_order *o)
{
    char public_id[40], amount[24];
    ids_time_ordered(public_id, sizeof(public_id), "pi_", 8);
    snprintf(amount, sizeof(amount), "%lld", (long long)o->amount);
    const char *params[9] = {public_id,   s->account,        o->order_id,
                             amount,      o->currency,       o->customer[0] ? o->customer : NULL,
                             o->event_id, o->payment_method, s->api->ctx->cfg.providers[0].name};
    struct saga_pending *p = xcalloc(1, sizeof(*p));
    p->s = s;
    snprintf(p->order_id, sizeof(p->order_id), "%s", o->order_id);
    pgev_exec(s->api->pg,
              "WITH upd AS ("
              " INSERT INTO payment_intents (public_id, account_id, order_id, amount, currency,"
              "  customer, metadata, capture_method, payment_method, status, gateway_provider,"
              "  expires_at)"
              " VALUES ($1, $2, $3, $4, $5, $6, jsonb_build_object('saga_event_id', $7::text),"
              "  'automatic', $8, 'processing', $9, now() + interval '24 hours')"
              " ON CONFLICT (account_id, order_id) WHERE order_id IS NOT NULL DO NOTHING"
              " RETURNING *),"
              " ev AS (SELECT outbox_event(upd.account_id, 'payment_intent.created', " OBJ(
                  "upd") "::json, upd.public_id) FROM upd)"
                         " SELECT upd.public_id, " JOB_COLS ", (SELECT count(*) FROM ev) FROM upd",
              9, params, saga_on_created, p);
}

static void
saga_on_message(void *arg, nng_msg *msg)
{
    struct saga *s = arg;
    struct envelope env;
    struct saga_order o = {0};
    enum envelope_error e = envelope_decode(&env, nng_msg_body(msg), nng_msg_len(msg));
    if (e != ENV_OK) {
        saga_reject(s, envelope_strerror(e), env.field[0] ? env.field : NULL);
    } else if (strcmp(env.type, MSG_INVENTORY_RESERVED) != 0) {
        saga_reject(s, "unexpected message type", env.type);
    } else {
        const char *bad = saga_decode(env.body, &o);
        if (bad) {
            saga_reject(s, "missing or invalid field", bad);
        } else if (!s->account[0]) {
            log_error("saga: order %s dropped: account %s not found", o.order_id,
                      s->api->ctx->cfg.saga_account);
        } else {
            metric_inc(role_metrics(s->api->ctx), MC_SAGA_RECEIVED);
            saga_create(s, &o);
        }
    }
    envelope_free(&env);
    nng_msg_free(msg);
}

static void
saga_on_account(void *arg, PGresult *res, const char *err)
{
    struct saga *s = arg;
    char url[400];
    int rv;
    const struct config *cfg = &s->api->ctx->cfg;
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1) {
        log_error("saga: SAGA_ACCOUNT %s not found (%s): order intake is off", cfg->saga_account,
                  err ? err : "no such account");
        return;
    }
    snprintf(s->account, sizeof(s->account), "%s", PQgetvalue(res, 0, 0));
    if (cfg->intake_url)
        snprintf(url, sizeof(url), "%s", cfg->intake_url);
    else
        snprintf(url, sizeof(url), "ipc://%s/intake.ipc", cfg->run_dir);
    if ((rv = nng_pull0_open(&s->pull)) != 0 || (rv = nng_listen(s->pull, url, NULL, 0)) != 0) {
        log_error("saga: cannot listen at %s: %s", url, nng_strerror(rv));
        return;
    }
    nngev_receive(s->api->ctx->nngev, s->pull, saga_on_message, s);
    log_info("saga: taking InventoryReserved messages at %s", url);
}

void
saga_start(struct api *api)
{
    const struct config *cfg = &api->ctx->cfg;
    if (api->ctx->index != 0)
        return;
    if (!cfg->saga_account) {
        log_info("saga: SAGA_ACCOUNT is not set: order intake is off");
        return;
    }
    struct saga *s = xcalloc(1, sizeof(*s));
    s->api = api;
    api->saga = s;
    const char *params[1] = {cfg->saga_account};
    /* Looked up once; the listener opens only when the account exists. */
    pgev_exec(api->pg, "SELECT id FROM accounts WHERE public_id = $1", 1, params, saga_on_account,
              s);
}

void
saga_stop(struct api *api)
{
    if (!api->saga)
        return;
    if (api->saga->account[0])
        nng_close(api->saga->pull);
    free(api->saga);
    api->saga = NULL;
}
