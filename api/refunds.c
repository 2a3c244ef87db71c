/*
 * refunds - the refund endpoints, in Stripe's shapes: POST /v1/refunds,
 * GET /v1/refunds/:id, POST /v1/refunds/:id (metadata), GET /v1/refunds
 * (by payment_intent or charge, keyset pages) and POST /v1/refunds/:id/cancel.
 *
 * Offers refunds_create() ... refunds_cancel() and refunds_respond_current().
 * A refund is created by one call of refund_create() (sql/011_refunds.sql):
 * under the payment's row lock it checks that the payment succeeded, that
 * the amount fits in what was captured and not yet refunded or held by
 * another refund, holds it (amount_refund_pending; a CHECK keeps the sum
 * within amount_received, whatever the concurrency), and writes the refund,
 * its gateway attempt (its own idempotency key) and refund.created in one
 * transaction. A worker then refunds at the gateway; the client gets the
 * refund as the worker leaves it (succeeded, failed, or pending while the
 * gateway settles it), or as it stands after CONFIRM_WAIT_MS. A pending
 * refund the gateway holds can be canceled: the cancel goes to the gateway
 * too, which decides. Errors use Stripe's codes: amount_too_large,
 * charge_already_refunded, charge_not_refundable. Calls api, intents
 * (sending jobs), lists, params, pgev.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api.h"
#include "money.h"

static const char *const create_params[] = {"payment_intent", "charge", "amount", "reason",
                                            "metadata",       "expand", NULL};

/* The column `name` of row 0, or NULL when it is NULL. */
static const char *
refunds_col(PGresult *res, const char *name)
{
    int col = PQfnumber(res, name);
    if (col < 0)
        abort(); /* a statement of ours lost a column */
    return PQgetisnull(res, 0, col) ? NULL : PQgetvalue(res, 0, col);
}

static void
refunds_on_object(void *arg, PGresult *res, const char *err)
{
    struct api_req *r = arg;
    if (!v1_rows(r, res, err))
        return;
    if (PQntuples(res) == 0 || PQgetisnull(res, 0, 0)) {
        v1_not_found(r, "refund", "id");
        return;
    }
    v1_respond(r, 200, PQgetvalue(res, 0, 0));
}

/* ---- create ---- */

static void
refunds_on_created(void *arg, PGresult *res, const char *err)
{
    struct api_req *r = arg;
    struct params_error e;
    if (!v1_rows(r, res, err))
        return;
    const char *result = refunds_col(res, "result");
    const char *left = refunds_col(res, "left_amount");
    bool by_charge = json_object_get(r->params, "payment_intent") == NULL;
    if (strcmp(result, "created") == 0) {
        intents_send_job(r, res, refunds_col(res, "object"));
        return;
    }
    if (strcmp(result, "not_found") == 0) {
        char msg[160];
        snprintf(msg, sizeof(msg), "No such %s.", by_charge ? "charge" : "payment_intent");
        r->not_executed = true;
        v1_error(r, 404, "invalid_request_error", "resource_missing", msg,
                 by_charge ? "charge" : "payment_intent");
        return;
    }
    if (strcmp(result, "already_refunded") == 0) {
        params_fail(&e, 400, "charge_already_refunded", NULL,
                    "This charge has already been refunded (or is being refunded) in full.");
    } else if (strcmp(result, "too_large") == 0) {
        params_fail(&e, 400, "amount_too_large", "amount",
                    "Refund amount is greater than the unrefunded amount on the charge (%s).",
                    left ? left : "0");
    } else {
        params_fail(&e, 400, "charge_not_refundable", by_charge ? "charge" : "payment_intent",
                    "This payment has no captured charge to refund: only a succeeded payment "
                    "can be refunded.");
    }
    v1_params_error(r, &e);
}

static int
refunds_reason(const json_t *params, const char **out, struct params_error *err)
{
    static const char *const reasons[] = {"duplicate", "fraudulent", "requested_by_customer", NULL};
    int rc = params_str(params, "reason", 40, out, err);
    if (rc != 0)
        return rc;
    for (const char *const *p = reasons; *p; p++)
        if (strcmp(*p, *out) == 0)
            return 0;
    params_fail(err, 400, "parameter_invalid", "reason",
                "Invalid reason: must be one of duplicate, fraudulent or requested_by_customer.");
    return -1;
}

void
refunds_create(struct api_req *r)
{
    struct params_error e;
    const char *pi = NULL, *charge = NULL, *reason = NULL;
    int64_t amount = 0;
    int has_amount;
    json_t *meta = NULL;
    bool clear = false;
    if (params_only(r->params, create_params, &e) < 0 ||
        params_str(r->params, "payment_intent", 80, &pi, &e) < 0 ||
        params_str(r->params, "charge", 80, &charge, &e) < 0 ||
        (has_amount = params_int(r->params, "amount", &amount, &e)) < 0 ||
        refunds_reason(r->params, &reason, &e) < 0 ||
        params_metadata(r->params, &meta, &clear, &e) < 0) {
        v1_params_error(r, &e);
        return;
    }
    if (!pi && !charge) {
        params_fail(&e, 400, "parameter_missing", "payment_intent",
                    "You must pass either payment_intent or charge.");
        json_decref(meta);
        v1_params_error(r, &e);
        return;
    }
    if (has_amount == 0 && !money_amount_valid(amount)) {
        params_fail(&e, 400, "parameter_invalid", "amount",
                    "Invalid amount: must be a positive integer in the currency's smallest unit.");
        json_decref(meta);
        v1_params_error(r, &e);
        return;
    }
    if (!intents_can_send_job(r)) {
        json_decref(meta);
        return;
    }
    char *meta_text = meta ? json_dumps(meta, JSON_COMPACT) : NULL;
    json_decref(meta);
    char account[24], amt[24], row[24], lease[24];
    snprintf(account, sizeof(account), "%lld", (long long)r->account_id);
    snprintf(amt, sizeof(amt), "%lld", (long long)amount);
    snprintf(row, sizeof(row), "%lld", (long long)r->idem_row);
    snprintf(lease, sizeof(lease), "%lld", (long long)INTENTS_LEASE(r->api));
    const char *params[9] = {account,
                             pi,
                             charge,
                             has_amount == 0 ? amt : NULL,
                             reason,
                             meta_text,
                             r->idem_row ? row : NULL,
                             r->idem_row ? r->holder : NULL,
                             lease};
    pgev_exec(
        r->api->pg,
        "SELECT r.result, r.left_amount, r.object, j.* FROM refund_create($1::bigint, $2, $3,"
        " $4::bigint, $5, jsonb_strip_nulls($6::jsonb), $7::bigint, $8, $9::bigint) r" JOBS_JOIN,
        9, params, refunds_on_created, r);
    free(meta_text);
}

/* ---- retrieve, update, list ---- */

void
refunds_retrieve(struct api_req *r)
{
    static const char *const allowed[] = {"expand", NULL};
    struct params_error e;
    char account[24];
    if (params_only(r->params, allowed, &e) < 0) {
        v1_params_error(r, &e);
        return;
    }
    snprintf(account, sizeof(account), "%lld", (long long)r->account_id);
    const char *params[2] = {r->id, account};
    pgev_exec(
        r->api->pg,
        "SELECT refund_object(r)::text FROM refunds r WHERE public_id = $1 AND account_id = $2", 2,
        params, refunds_on_object, r);
}

void
refunds_respond_current(struct api_req *r, int64_t refund_id)
{
    char id[24], account[24];
    snprintf(id, sizeof(id), "%lld", (long long)refund_id);
    snprintf(account, sizeof(account), "%lld", (long long)r->account_id);
    const char *params[2] = {id, account};
    pgev_exec(r->api->pg,
              "SELECT refund_object(r)::text FROM refunds r WHERE id = $1 AND account_id = $2", 2,
              params, refunds_on_object, r);
}

void
refunds_update(struct api_req *r)
{
    static const char *const allowed[] = {"metadata", "expand", NULL};
    struct params_error e;
    json_t *meta = NULL;
    bool clear = false;
    if (params_only(r->params, allowed, &e) < 0 ||
        params_metadata(r->params, &meta, &clear, &e) < 0) {
        v1_params_error(r, &e);
        return;
    }
    char *meta_text = meta ? json_dumps(meta, JSON_COMPACT) : NULL;
    json_decref(meta);
    char account[24], row[24];
    snprintf(account, sizeof(account), "%lld", (long long)r->account_id);
    snprintf(row, sizeof(row), "%lld", (long long)r->idem_row);
    const char *params[6] = {r->id,
                             account,
                             clear ? "t" : "f",
                             meta_text,
                             r->idem_row ? row : NULL,
                             r->idem_row ? r->holder : NULL};
    /* Metadata only; written while this request holds its key's claim. */
    pgev_exec(r->api->pg,
              "WITH hold AS (SELECT idempotency_hold($5::bigint, $6))"
              " UPDATE refunds x SET metadata = CASE WHEN $3::boolean THEN '{}'::jsonb"
              "  ELSE jsonb_strip_nulls(x.metadata || coalesce($4::jsonb, '{}'::jsonb)) END,"
              "  updated_at = now()"
              " FROM hold WHERE public_id = $1 AND account_id = $2"
              " RETURNING refund_object(x)::text",
              6, params, refunds_on_object, r);
    free(meta_text);
}

void
refunds_list(struct api_req *r)
{
    static const char *const allowed[] = {
        "limit",  "starting_after", "ending_before", "payment_intent",
        "charge", "created",        "expand",        NULL};
    /* One filter: the payment or the charge (their ids do not overlap). */
    const char *filter = json_object_get(r->params, "payment_intent") ? "payment_intent" : "charge";
#define REFUNDS_PAGE(cmp, order)                                                                   \
    LISTS_SQL("refunds_listed", "public_id", "refund_object(p.refund)::text",                      \
              "(p.payment_intent = $2 OR p.charge = $2)", "true", cmp, order)
    lists_run(r, allowed, filter, REFUNDS_PAGE("<", "DESC"), REFUNDS_PAGE(">", "ASC"), "refund",
              "/v1/refunds");
#undef REFUNDS_PAGE
}

/* ---- cancel ---- */

static void
refunds_on_cancel(void *arg, PGresult *res, const char *err)
{
    struct api_req *r = arg;
    if (!v1_rows(r, res, err))
        return;
    const char *result = refunds_col(res, "result");
    if (strcmp(result, "not_found") == 0) {
        v1_not_found(r, "refund", "id");
        return;
    }
    if (strcmp(result, "canceling") == 0) {
        intents_send_job(r, res, refunds_col(res, "object"));
        return;
    }
    r->not_executed = true;
    v1_error(r, 400, "invalid_request_error", "refund_not_cancelable",
             "Only a refund the gateway holds as pending can be canceled: this one is final, or "
             "still on its way to the gateway (retry shortly).",
             NULL);
}

void
refunds_cancel(struct api_req *r)
{
    static const char *const allowed[] = {"expand", NULL};
    struct params_error e;
    if (params_only(r->params, allowed, &e) < 0) {
        v1_params_error(r, &e);
        return;
    }
    if (!intents_can_send_job(r))
        return;
    char account[24], row[24], lease[24];
    snprintf(account, sizeof(account), "%lld", (long long)r->account_id);
    snprintf(row, sizeof(row), "%lld", (long long)r->idem_row);
    snprintf(lease, sizeof(lease), "%lld", (long long)INTENTS_LEASE(r->api));
    const char *params[5] = {account, r->id, r->idem_row ? row : NULL,
                             r->idem_row ? r->holder : NULL, lease};
    pgev_exec(r->api->pg,
              "SELECT r.result, r.object, j.* FROM refund_cancel($1::bigint, $2, $3::bigint, $4,"
              " $5::bigint) r" JOBS_JOIN,
              5, params, refunds_on_cancel, r);
}
