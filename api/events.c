/*
 * events - the events API: GET /v1/events (newest first, keyset pages,
 * filters type and created) and GET /v1/events/:id, in Stripe's event shape
 * (evt_..., type, created, data.object). Events are the outbox rows that
 * every state change writes in its own transaction, so the list is exactly
 * what happened, scoped to the caller's account. The saga's PaymentCompleted
 * and PaymentFailed messages share the outbox but are not Stripe events and
 * are not listed. Offers events_list() and
 * events_retrieve(). Calls api, lists, pgev.
 */
#include <stdio.h>
#include <string.h>

#include "api.h"

static const char *const list_params[] = {
    "limit", "starting_after", "ending_before", "type", "created", "expand", NULL};

void
events_list(struct api_req *r)
{
#define EVENTS_PAGE(cmp, order)                                                                    \
    LISTS_SQL("outbox", "event_id", "p.payload::text", "p.type = $2",                              \
              "p.aggregate_type <> 'order'", cmp, order)
    lists_run(r, list_params, "type", EVENTS_PAGE("<", "DESC"), EVENTS_PAGE(">", "ASC"), "event",
              "/v1/events");
#undef EVENTS_PAGE
}

static void
events_on_one(void *arg, PGresult *res, const char *err)
{
    struct api_req *r = arg;
    if (!v1_rows(r, res, err))
        return;
    if (PQntuples(res) == 0) {
        v1_not_found(r, "event", "id");
        return;
    }
    v1_respond(r, 200, PQgetvalue(res, 0, 0));
}

void
events_retrieve(struct api_req *r)
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
              "SELECT payload::text FROM outbox WHERE event_id = $1 AND account_id = $2"
              " AND aggregate_type <> 'order'",
              2, params, events_on_one, r);
}
