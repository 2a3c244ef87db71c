/* api: the api role's own declarations, shared by its modules (api/ only). */
#ifndef PAYMENTD_API_API_H
#define PAYMENTD_API_API_H

#include <event2/http.h>
#include <jansson.h>
#include <nng/nng.h>
#include <stdbool.h>
#include <stdint.h>

#include "params.h"
#include "ratelimit.h"
#include "pgev.h"
#include "redisev.h"
#include "metrics.h"
#include "role.h"

struct auth_cache;

struct api {
    struct role_ctx *ctx;
    struct evhttp *http;
    struct evhttp_bound_socket *bound;
    struct pgev_pool *pg;
    struct redisev *redis;
    nng_socket workers;
    int inflight;
    struct event *stop_timer;
    struct auth_cache *auth;
    int64_t confirm_wait_ms;
    int jobs_in_flight; /* gateway jobs sent to workers and not yet answered */
    struct saga *saga;  /* order intake, on api/0 when SAGA_ACCOUNT is set */
    struct ratelimit *ratelimit;
    char owner[128];   /* boot_id/pid/start time: this process, as a claim's holder */
    struct wake *wake; /* tells the outbox about committed events */
};

/* A list request's page (lists.c). */
struct list_query {
    int64_t limit;
    const char *after, *before, *cursor;
    bool backward;
    char created[4][24];  /* gte, gt, lte, lt as text */
    const char *bound[4]; /* the same, NULL when absent (query parameters) */
    char fetch[24];       /* limit + 1 */
    const char *what;     /* the resource's name, for errors */
    const char *url;      /* the list's URL */
};

struct api_req;
typedef void (*api_handler)(struct api_req *r);

/* Where a request is in its life (request.c moves it, nothing else). */
enum req_state { REQ_RECEIVED, REQ_CLAIMED, REQ_WAITING, REQ_ANSWERING, REQ_ANSWERED };

/* One /v1 request from arrival to response. */
struct api_req {
    enum req_state state;
    struct api *api;
    struct evhttp_request *req;
    enum evhttp_cmd_type method;
    const char *route; /* route name for logs */
    enum metric_route mroute;
    char id[80]; /* the :id path segment, when the route has one */
    int64_t account_id;
    json_t *params;
    api_handler handler;
    int64_t started_us;
    /* idempotency */
    char idem_key[256];
    bool has_idem;
    bool idem_owner;
    bool idem_replay;
    int64_t idem_row;
    char idem_hash[65];
    char idem_redis_key[96];
    char holder[160];        /* this request as the holder of its key's claim */
    bool idem_deferred;      /* its handler's statement takes the key's claim itself */
    bool idem_claims_itself; /* the route's handler can (create, confirm) */
    int64_t idem_resource;   /* internal id of a resource an earlier attempt created */
    int claim_tries;
    bool not_executed; /* refused before executing: the answer is not kept for the key */
    /* handler state */
    struct event *timer;    /* CONFIRM_WAIT_MS while WAITING */
    api_handler on_wait;    /* what the timer does (answers with pending_body) */
    char *pending_body;     /* the answer to give if the worker does not answer in time */
    void *state_data;       /* a handler's parsed arguments between two callbacks */
    struct list_query list; /* list endpoints: the page asked for */
    int refs;               /* the flow, and callbacks that may still arrive for it */
    int jobs_out;           /* gateway jobs sent and not answered */
    bool job_slot;          /* holds one of the api's MAX_PENDING_JOBS slots */
    const char *auth_error; /* why authentication failed (a fixed message) */
    /* The Redis side of the idempotency claim, taken in the limiter's call. */
    enum { IDEM_REDIS_NONE, IDEM_REDIS_CLAIMED, IDEM_REDIS_HELD } idem_redis;
    char *idem_redis_value; /* what a held key holds ("L..." or "D...") */
    size_t idem_redis_len;
    bool params_failed; /* parameters refused: answered once the limiter let it through */
    struct params_error params_error;
};

/* api.c */
void api_request_begin(struct api *api, struct evhttp_request *req);
/* Writes an answer to the client, with its metrics and log line. */
void api_write(struct api_req *r, int status, const char *body);

/* request.c: the request's lifetime (see there for the states). */
struct api_req *request_new(struct api *api, struct evhttp_request *req);
/* Its handler starts: the request owns its key, or has none. */
void request_claimed(struct api_req *r);
/* A gateway job is out: holds a reference until request_job_done(), and
 * calls on_wait after wait_ms unless answered by then. */
void request_wait(struct api_req *r, int64_t wait_ms, api_handler on_wait);
void request_job_done(struct api_req *r);
/* True until the request has started to answer. */
bool request_open(const struct api_req *r);
/* The one way to answer: stored under the key when it has one, then sent;
 * later answers are dropped. */
void request_answer(struct api_req *r, int status, const char *body);
/* Sends now (a replay, or an answer just stored). */
void request_send(struct api_req *r, int status, const char *body);
void request_hold(struct api_req *r);
void request_release(struct api_req *r);
int request_live_count(void);

/* v1.c */
void v1_dispatch(struct api *api, struct evhttp_request *req);
/* Answers a request (through the idempotency store when a key is in use). */
void v1_respond(struct api_req *r, int status, const char *body);
void v1_error(struct api_req *r, int status, const char *type, const char *code,
              const char *message, const char *param);
void v1_params_error(struct api_req *r, const struct params_error *e);
void v1_db_error(struct api_req *r, const char *err);
/* 429 rate_limit with Retry-After. */
void v1_too_many(struct api_req *r, int retry_after_s);
/* True when a query returned rows; otherwise answers 503 and returns false. */
bool v1_rows(struct api_req *r, PGresult *res, const char *err);
/* 404 resource_missing for the :id of the request. */
void v1_not_found(struct api_req *r, const char *what, const char *param);
/* The request's claim on its Idempotency-Key was taken over (SQLSTATE
 * PD010 from a fenced write): answers 409 and stores nothing. */
bool v1_claim_lost(struct api_req *r, PGresult *res, const char *err);

/* auth.c */
struct auth_cache *auth_cache_new(void);
void auth_cache_free(struct auth_cache *c);
typedef void (*auth_cb)(struct api_req *r, int64_t account_id);
void auth_lookup(struct api_req *r, const char *key, auth_cb cb);
/* The internal id of the account with this public id (from a verified JWT). */
void auth_lookup_account(struct api_req *r, const char *public_id, auth_cb cb);

/* callbacks.c */
void callbacks_receive(struct api_req *r);

/* idem.c */
/* Sets api->owner, the holder tag of this process's idempotency claims. */
void idem_owner_init(struct api *api);
/* The request's parameter hash and Redis key, before the rate limiter's call. */
void idem_prepare(struct api_req *r);
/* Goes on after the limiter's call reported the Redis claim (idem_redis). */
void idem_resume(struct api_req *r);
#define IDEM_REDIS_LOCK_MS "60000"
/* Stores the answer under the key (checking the claim is still this
 * request's), then sends it with request_send() and drops the store's
 * reference. */
void idem_finish(struct api_req *r, int status, const char *body);
/* The claim a deferring handler passes to its statement (JSON text, to
 * free), or NULL when the request has no deferred claim. */
char *idem_claim_json(struct api_req *r);
/* The handler's statement found the key taken (SQLSTATE PD011): decide
 * from the key's row as for any other route (replay, 409, takeover). */
void idem_claim_taken(struct api_req *r);
/* The worker kept this answer under the key: copy it to Redis and send it. */
void idem_answered(struct api_req *r, int status, const char *body);

/* lists.c */
int lists_parse(const json_t *params, struct list_query *lq, struct params_error *err);
/* A whole list request: the allowed parameters, one optional string filter
 * ($2 of the page statements), and the page statement for each direction
 * (LISTS_SQL with "<", "DESC" and with ">", "ASC"). */
void lists_run(struct api_req *r, const char *const *allowed, const char *filter_param,
               const char *sql_forward, const char *sql_backward, const char *what,
               const char *url);
/* res: one row (cursor_ok, NULL) for an empty page, else (cursor_ok, object text) per row. */
void lists_respond(struct api_req *r, PGresult *res, const struct list_query *lq, const char *what,
                   const char *url);

/* One keyset page of table for account $1, newest first ("<", "DESC") or
 * walking back from a cursor (">", "ASC"). Parameters: $1 account, $2 the
 * resource's own filter (filter_sql, true when $2 IS NULL), scope_sql a fixed
 * condition on the rows (or "true"), $3..$6 created
 * gte/gt/lte/lt (unix seconds), $7 the cursor's public id, $8 rows to fetch.
 * Columns: whether the cursor exists, then the object text. */
#define LISTS_SQL(table, public_col, obj, filter_sql, scope_sql, cmp, order)                       \
    "WITH c AS (SELECT $7::text IS NULL OR EXISTS (SELECT 1 FROM " table "  WHERE " public_col     \
    " = $7 AND account_id = $1) AS ok,"                                                            \
    "  (SELECT id FROM " table " WHERE " public_col " = $7 AND account_id = $1) AS id),"           \
    " page AS (SELECT " obj " AS obj, p.id FROM " table " p, c"                                    \
    "  WHERE p.account_id = $1 AND c.ok AND " scope_sql "  AND ($2::text IS NULL OR " filter_sql   \
    ")"                                                                                            \
    "  AND ($3::bigint IS NULL OR p.created_at >= to_timestamp($3))"                               \
    "  AND ($4::bigint IS NULL OR p.created_at >= to_timestamp($4 + 1))"                           \
    "  AND ($5::bigint IS NULL OR p.created_at < to_timestamp($5 + 1))"                            \
    "  AND ($6::bigint IS NULL OR p.created_at < to_timestamp($6))"                                \
    "  AND ($7::text IS NULL OR p.id " cmp " c.id)"                                                \
    "  ORDER BY p.id " order " LIMIT $8)"                                                          \
    " SELECT c.ok, page.obj FROM c LEFT JOIN page ON true ORDER BY page.id " order

/* webhooks.c */
void webhooks_create(struct api_req *r);
void webhooks_list(struct api_req *r);
void webhooks_retrieve(struct api_req *r);
void webhooks_update(struct api_req *r);
void webhooks_delete(struct api_req *r);

/* events.c */
void events_list(struct api_req *r);
void events_retrieve(struct api_req *r);

/* intents.c */
/* Back-pressure: false (and a 503 with Retry-After sent) when this api has
 * MAX_PENDING_JOBS gateway jobs in flight already. */
bool intents_can_send_job(struct api_req *r);
void intents_create(struct api_req *r);
void intents_retrieve(struct api_req *r);
void intents_update(struct api_req *r);
void intents_list(struct api_req *r);
void intents_confirm(struct api_req *r);
void intents_capture(struct api_req *r);
void intents_cancel(struct api_req *r);
/* Sends the gateway attempt named in row 0 of res (attempt_jobs' columns)
 * to a worker; the request is answered with the worker's outcome, or with
 * pending_body after CONFIRM_WAIT_MS. */
void intents_send_job(struct api_req *r, PGresult *res, const char *pending_body);
/* Answers with an object: an intent (402 card_error after a decline on
 * create or confirm) or a refund. */
void intents_respond_object(struct api_req *r, const char *obj);

/* refunds.c */
void refunds_create(struct api_req *r);
void refunds_retrieve(struct api_req *r);
void refunds_update(struct api_req *r);
void refunds_list(struct api_req *r);
void refunds_cancel(struct api_req *r);
/* Answers with a refund by internal id (idempotency recovery). */
void refunds_respond_current(struct api_req *r, int64_t refund_id);

/* charges.c */
void charges_retrieve(struct api_req *r);
void charges_list(struct api_req *r);
#include "jobs.h"

/* The job's wait, the lease of attempts, the first provider: every
 * operation that starts a gateway attempt passes these. */
#define INTENTS_LEASE(api) ((api)->ctx->cfg.processing_lease_ms)

#define OBJ(alias) "payment_intent_object(ROW(" alias ".*)::payment_intents)::text"

/* saga.c */
void saga_start(struct api *api);
void saga_stop(struct api *api);

/* Answers with the current object of an intent by internal id (idempotency recovery). */
void intents_respond_current(struct api_req *r, int64_t intent_id);

#endif
