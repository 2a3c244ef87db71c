/*
 * lists - Stripe's list endpoints, shared by every resource: the limit,
 * starting_after / ending_before cursors and created[gte|gt|lte|lt]
 * parameters, and the {"object": "list", "data", "has_more", "url"} answer.
 *
 * Offers lists_run() (a whole list request), lists_parse() and
 * lists_respond(). Pages are keyset pages on the
 * resource's identity key (never OFFSET): a statement fetches limit + 1 rows
 * after (or before) the cursor, and the extra row only tells has_more.
 * Calls api, params.
 */
#include <event2/buffer.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api.h"
#include "xmalloc.h"

static int
lists_created(const json_t *params, char bounds[4][24], struct params_error *err)
{
    static const char *const ops[4] = {"gte", "gt", "lte", "lt"};
    json_t *c = json_object_get(params, "created");
    int64_t v;
    if (!c)
        return 0;
    if (json_is_integer(c) || json_is_string(c)) {
        if (params_int(params, "created", &v, err) < 0)
            return -1;
        snprintf(bounds[0], 24, "%lld", (long long)v);
        snprintf(bounds[2], 24, "%lld", (long long)v);
        return 0;
    }
    if (!json_is_object(c))
        goto bad;
    const char *k;
    json_t *val;
    json_object_foreach(c, k, val)
    {
        int i;
        for (i = 0; i < 4 && strcmp(ops[i], k) != 0; i++)
            ;
        if (i == 4 || params_int(c, k, &v, err) < 0)
            goto bad;
        snprintf(bounds[i], 24, "%lld", (long long)v);
    }
    return 0;
bad:
    params_fail(err, 400, "parameter_invalid", "created",
                "Invalid created: use created[gte], created[gt], created[lte] or created[lt] "
                "with unix timestamps.");
    return -1;
}

int
lists_parse(const json_t *params, struct list_query *lq, struct params_error *err)
{
    memset(lq, 0, sizeof(*lq));
    lq->limit = 10;
    if (params_int(params, "limit", &lq->limit, err) < 0 ||
        params_str(params, "starting_after", 80, &lq->after, err) < 0 ||
        params_str(params, "ending_before", 80, &lq->before, err) < 0 ||
        lists_created(params, lq->created, err) < 0)
        return -1;
    if (lq->limit < 1 || lq->limit > 100) {
        params_fail(err, 400, "parameter_invalid", "limit",
                    "Invalid limit: must be between 1 and 100.");
        return -1;
    }
    if (lq->after && lq->before) {
        params_fail(err, 400, "parameter_invalid", "ending_before",
                    "starting_after and ending_before cannot be used together.");
        return -1;
    }
    lq->backward = lq->before != NULL;
    lq->cursor = lq->backward ? lq->before : lq->after;
    snprintf(lq->fetch, sizeof(lq->fetch), "%lld", (long long)lq->limit + 1);
    for (int i = 0; i < 4; i++)
        lq->bound[i] = lq->created[i][0] ? lq->created[i] : NULL;
    return 0;
}

void
lists_respond(struct api_req *r, PGresult *res, const struct list_query *lq, const char *what,
              const char *url)
{
    int n = PQntuples(res);
    if (n >= 1 && strcmp(PQgetvalue(res, 0, 0), "f") == 0) {
        struct params_error e;
        params_fail(&e, 400, "resource_missing", lq->backward ? "ending_before" : "starting_after",
                    "No such %s for the list cursor.", what);
        v1_params_error(r, &e);
        return;
    }
    int rows = (n == 1 && PQgetisnull(res, 0, 1)) ? 0 : n;
    bool has_more = rows > lq->limit;
    if (has_more)
        rows = (int)lq->limit;
    struct evbuffer *buf = evbuffer_new();
    evbuffer_add_printf(buf, "{\"object\":\"list\",\"data\":[");
    for (int i = 0; i < rows; i++) {
        int at = lq->backward ? rows - 1 - i : i; /* backward pages come oldest first */
        evbuffer_add_printf(buf, "%s%s", i ? "," : "", PQgetvalue(res, at, 1));
    }
    evbuffer_add_printf(buf, "],\"has_more\":%s,\"url\":\"%s\"}", has_more ? "true" : "false", url);
    size_t len = evbuffer_get_length(buf);
    char *text = xmalloc(len + 1);
    evbuffer_remove(buf, text, len);
    text[len] = '\0';
    evbuffer_free(buf);
    v1_respond(r, 200, text);
    free(text);
}

static void
lists_on_page(void *arg, PGresult *res, const char *err)
{
    struct api_req *r = arg;
    if (v1_rows(r, res, err))
        lists_respond(r, res, &r->list, r->list.what, r->list.url);
}

void
lists_run(struct api_req *r, const char *const *allowed, const char *filter_param,
          const char *sql_forward, const char *sql_backward, const char *what, const char *url)
{
    struct params_error e;
    const char *filter = NULL;
    char account[24];
    struct list_query *lq = &r->list;

    if (params_only(r->params, allowed, &e) < 0 || lists_parse(r->params, lq, &e) < 0 ||
        (filter_param && params_str(r->params, filter_param, 255, &filter, &e) < 0)) {
        v1_params_error(r, &e);
        return;
    }
    lq->what = what;
    lq->url = url;
    snprintf(account, sizeof(account), "%lld", (long long)r->account_id);
    const char *params[8] = {account,      filter,       lq->bound[0], lq->bound[1],
                             lq->bound[2], lq->bound[3], lq->cursor,   lq->fetch};
    pgev_exec(r->api->pg, lq->backward ? sql_backward : sql_forward, 8, params, lists_on_page, r);
}
