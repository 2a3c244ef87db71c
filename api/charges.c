/*
 * charges - the charges a payment's attempts made at the gateway, read as
 * Stripe users read them: GET /v1/charges/:id and GET /v1/charges (newest
 * first, filter payment_intent, keyset pages), with amount_captured,
 * amount_refunded, refunded and the refunds list (charge_object() in
 * sql/011_refunds.sql). Read only. Offers charges_retrieve() and
 * charges_list(). Calls api, lists, pgev.
 */
#include <stdio.h>

#include "api.h"

static void
charges_on_one(void *arg, PGresult *res, const char *err)
{
    struct api_req *r = arg;
    if (!v1_rows(r, res, err))
        return;
    if (PQntuples(res) == 0) {
        v1_not_found(r, "charge", "id");
        return;
    }
    v1_respond(r, 200, PQgetvalue(res, 0, 0));
}

void
charges_retrieve(struct api_req *r)
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
    pgev_exec(r->api->pg,
              "SELECT charge_object(c.attempt)::text FROM charges c WHERE public_id = $1"
              " AND account_id = $2 LIMIT 1",
              2, params, charges_on_one, r);
}

void
charges_list(struct api_req *r)
{
    static const char *const allowed[] = {
        "limit", "starting_after", "ending_before", "payment_intent", "created", "expand", NULL};
#define CHARGES_PAGE(cmp, order)                                                                   \
    LISTS_SQL("charges", "public_id", "charge_object(p.attempt)::text", "p.payment_intent = $2",   \
              "true", cmp, order)
    lists_run(r, allowed, "payment_intent", CHARGES_PAGE("<", "DESC"), CHARGES_PAGE(">", "ASC"),
              "charge", "/v1/charges");
#undef CHARGES_PAGE
}
