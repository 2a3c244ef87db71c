/*
 * saga - the order saga's intake: InventoryReserved messages from other
 * services become payments, and each message is answered.
 *
 * Offers saga_start() and saga_stop(). api/0 listens with an NNG REP socket
 * at INTAKE_URL (one listener: an ipc path or tcp port cannot be shared by
 * several processes), served through nngev with SAGA_CONTEXTS messages in
 * flight. Each request is a msgpack envelope of type InventoryReserved with
 * orderId, amount (integer, minor units), currency, customerId,
 * paymentMethod and eventId, checked field by field; a string that holds a
 * card number is refused. Every request gets one intake.reply envelope:
 *
 *   {ok: true,  paymentId, duplicate}          the payment row is committed
 *   {ok: false, error, field, retry: false}    malformed: never send it again
 *                                              (field absent when the bytes
 *                                              are no envelope, or when the
 *                                              database refused the data)
 *   {ok: false, error, retry: true}            send it again later: database
 *                                              unavailable, SAGA_ACCOUNT not
 *                                              found yet, api/0 stopping
 *
 * The answer leaves only once the statement that stores the payment has
 * committed, so a publisher (a REQ socket, which re-sends what is not
 * answered) loses nothing to a database error or a restart of api/0. A valid
 * message creates the payment, already processing with its charge attempt,
 * for the account SAGA_ACCOUNT, and after the answer sends the attempt to a
 * worker. The payment's order id is unique per account, so
 * the same order again (a re-send, a second publisher) creates nothing and
 * charges nothing, and is answered ok with the existing payment's id and
 * duplicate: true. The worker's outcome statement writes PaymentCompleted or
 * PaymentFailed into the outbox with the outcome itself, so it survives
 * crashes like every other event; a payment whose job was lost (api/0 died
 * between answer and job) is finished by the processing sweep. Calls api,
 * envelope, nngev, pgev, money, redact.
 */
#include <nng/nng.h>
#include <nng/protocol/reqrep0/rep.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>

#include "api.h"
#include "envelope.h"
#include "ids.h"
#include "log.h"
#include "metrics.h"
#include "money.h"
#include "redact.h"
#include "wake.h"
#include "xmalloc.h"

/* Messages handled at once. Each holds an NNG context and at most one query;
 * beyond this NNG keeps further messages in the publishers' pipes. */
#define SAGA_CONTEXTS 32

struct saga_order {
    char order_id[101];
    int64_t amount;
    char currency[4];
    char customer[256];
    char payment_method[256];
    char event_id[128];
};

/* One accepted message. saga.c owns it from decode to free:
 * STORING (statement in flight) -> answered -> [CHARGING (worker job in
 * flight, for a new payment)] -> freed. While STORING it is on saga.open, so
 * that saga_stop() can withdraw the query before the pool would call back
 * into freed memory. */
enum saga_state { SAGA_STORING, SAGA_CHARGING };

struct saga_req {
    LIST_ENTRY(saga_req) link;
    struct saga *s;
    struct api *api; /* outlives s: the worker job's callback uses this */
    enum saga_state state;
    struct nngev_job *job; /* the message's context, until answered */
    unsigned long query;   /* the query in flight, while on saga.open */
    char request_id[ENVELOPE_ID_MAX];
    struct saga_order o;
};

struct saga {
    struct api *api;
    nng_socket rep;
    bool listening;
    char account[24];            /* internal id, once looked up */
    unsigned long account_query; /* the account lookup in flight, or 0 */
    LIST_HEAD(, saga_req) open;
};

/* One answer to a publisher. */
struct saga_answer {
    bool ok;
    const char *payment_id; /* ok */
    bool duplicate;         /* ok: the order already had this payment */
    const char *error;      /* not ok: the reason */
    const char *field;      /* not ok, malformed: the field at fault, when there is one */
    bool retry;             /* not ok: the same message may succeed later */
};

static void saga_find_account(struct saga *s);

/* ---- answers ---- */

static void
saga_send_answer(struct nngev_job *job, const char *request_id, const struct saga_answer *a)
{
    struct envelope_writer w;
    size_t n;
    envelope_begin(&w, MSG_INTAKE_REPLY, request_id, 0, a->ok || !a->field ? 3 : 4);
    envelope_put_bool(&w, "ok", a->ok);
    if (a->ok) {
        envelope_put_str(&w, "paymentId", a->payment_id);
        envelope_put_bool(&w, "duplicate", a->duplicate);
    } else {
        envelope_put_str(&w, "error", a->error);
        if (a->field)
            envelope_put_str(&w, "field", a->field);
        envelope_put_bool(&w, "retry", a->retry);
    }
    void *bytes = envelope_finish(&w, &n);
    nngev_respond(job, nngev_msg(bytes, n));
    free(bytes);
}

/* Answers r's message: it leaves saga.open, and its context serves the next.
 * Only a message still waiting for its row has an answer outstanding. */
static void
saga_answer(struct saga_req *r, const struct saga_answer *a)
{
    if (r->state != SAGA_STORING)
        abort();
    LIST_REMOVE(r, link);
    saga_send_answer(r->job, r->request_id, a);
    r->job = NULL;
    r->query = 0;
}

/* A malformed message: logged, counted, refused for good. */
static void
saga_refuse(struct saga *s, struct nngev_job *job, const char *request_id, const char *why,
            const char *field)
{
    log_warn("saga: refused an intake message: %s%s%s", why, field ? ": " : "", field ? field : "");
    metric_inc(role_metrics(s->api->ctx), MC_SAGA_REJECTED);
    saga_send_answer(job, request_id,
                     &(struct saga_answer){.error = why, .field = field, .retry = false});
}

/* Whether a failed statement may succeed when the same message comes again:
 * a lost connection, a full queue, a lock or serialization failure, a server
 * shutting down all pass; a data exception (22) or a violated constraint (23)
 * comes from the message itself and would fail every time. */
static bool
saga_db_retryable(const PGresult *res)
{
    const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    return !state || (strncmp(state, "22", 2) != 0 && strncmp(state, "23", 2) != 0);
}

static void
saga_answer_db_error(struct saga_req *r, const char *what, PGresult *res, const char *err)
{
    bool retry = saga_db_retryable(res);
    log_error("saga: order %s: %s: %s", r->o.order_id, what, err ? err : PQresultErrorMessage(res));
    if (!retry)
        metric_inc(role_metrics(r->s->api->ctx), MC_SAGA_REJECTED);
    saga_answer(r, &(struct saga_answer){.error = retry ? "database unavailable"
                                                        : "refused by the database",
                                         .retry = retry});
}

/* ---- the border check ---- */

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

/* A card number in any string of the message, known field or not, refuses it:
 * nothing downstream (row, event, log line) may ever hold one. NULL or the
 * field at fault (copied into field). */
static const char *
saga_find_card(const struct envelope *env, char *field, size_t cap)
{
    const msgpack_object *b = env->body;
    if (redact_has_card(env->id, strlen(env->id)))
        return "id";
    if (redact_has_card(env->request_id, strlen(env->request_id)))
        return "request_id";
    for (uint32_t i = 0; i < b->via.map.size; i++) {
        const msgpack_object *k = &b->via.map.ptr[i].key, *v = &b->via.map.ptr[i].val;
        bool in_key =
            k->type == MSGPACK_OBJECT_STR && redact_has_card(k->via.str.ptr, k->via.str.size);
        if (!in_key &&
            (v->type != MSGPACK_OBJECT_STR || !redact_has_card(v->via.str.ptr, v->via.str.size)))
            continue;
        if (k->type != MSGPACK_OBJECT_STR || in_key)
            return "body"; /* never echo the number back as a field name */
        snprintf(field, cap, "%.*s", (int)k->via.str.size, k->via.str.ptr);
        return field;
    }
    return NULL;
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

/* ---- a new payment ---- */

static void
saga_on_job(void *arg, int err, nng_msg *reply)
{
    struct saga_req *r = arg;
    r->api->jobs_in_flight--;
    if (err)
        log_warn("saga: order %s: worker job failed (%s); the payment stays processing",
                 r->o.order_id, nng_strerror(err));
    if (reply)
        nng_msg_free(reply);
    free(r);
}

/* The statement's answer: the payment committed (created), or the order
 * already had its payment (not created: its id), or not stored. Only here is
 * the statement's result read. */
static void
saga_on_created(void *arg, PGresult *res, const char *err)
{
    struct saga_req *r = arg;
    struct saga *s = r->s;
    const char *order = r->o.order_id;
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK) {
        saga_answer_db_error(r, "payment not created", res, err);
        free(r);
        return;
    }
    if (PQntuples(res) != 1) {
        log_error("saga: order %s: the statement answered %d rows", order, PQntuples(res));
        saga_answer(r, &(struct saga_answer){.error = "database unavailable", .retry = true});
        free(r);
        return;
    }
    const char *payment_id = PQgetvalue(res, 0, PQfnumber(res, "public_id"));
    if (strcmp(PQgetvalue(res, 0, PQfnumber(res, "created")), "t") != 0) {
        log_info("saga: order %s already has its payment %s; nothing created", order, payment_id);
        saga_answer(r,
                    &(struct saga_answer){.ok = true, .payment_id = payment_id, .duplicate = true});
        free(r);
        return;
    }
    log_info("saga: order %s -> payment %s", order, payment_id);
    wake_outbox(s->api->wake); /* payment_intent.created */
    saga_answer(r, &(struct saga_answer){.ok = true, .payment_id = payment_id});

    const struct config *cfg = &s->api->ctx->cfg;
    size_t n;
    void *bytes =
        jobs_message(payment_id, shm_now_ms() + cfg->job_timeout_ms, res, 0, false, NULL, &n);
    if (!bytes) {
        free(r);
        return;
    }
    r->state = SAGA_CHARGING;
    s->api->jobs_in_flight++;
    nngev_request(s->api->ctx->nngev, s->api->workers, nngev_msg(bytes, n),
                  (int)cfg->job_timeout_ms, saga_on_job, r);
    free(bytes);
}

static void
saga_create(struct saga_req *r)
{
    struct saga *s = r->s;
    const struct saga_order *o = &r->o;
    char public_id[40], amount[24], lease[24];
    ids_time_ordered(public_id, sizeof(public_id), "pi_", 8);
    snprintf(amount, sizeof(amount), "%lld", (long long)o->amount);
    snprintf(lease, sizeof(lease), "%lld", (long long)INTENTS_LEASE(s->api));
    const char *params[10] = {public_id,   s->account,        o->order_id,
                              amount,      o->currency,       o->customer[0] ? o->customer : NULL,
                              o->event_id, o->payment_method, s->api->ctx->cfg.providers[0].name,
                              lease};
    r->state = SAGA_STORING;
    /* The payment, already processing, and its charge attempt, in one
     * transaction; an order that has its payment gets created = false. */
    r->query = pgev_exec(s->api->pg,
                         "SELECT r.public_id, r.created, j.* FROM pi_create($1, $2::bigint,"
                         " $4::bigint, $5, $6, NULL, jsonb_build_object('saga_event_id', $7::text),"
                         " 'automatic', $8, true, $3, $9, NULL, NULL, $10::bigint) r" JOBS_JOIN,
                         10, params, saga_on_created, r);
}

/* ---- intake ---- */

static void
saga_on_request(void *arg, struct nngev_job *job, nng_msg *msg)
{
    struct saga *s = arg;
    struct envelope env;
    struct saga_order o = {0};
    const char *bad;
    char card_field[64];
    enum envelope_error e = envelope_decode(&env, nng_msg_body(msg), nng_msg_len(msg));
    if (e != ENV_OK) {
        saga_refuse(s, job, "", envelope_strerror(e), env.field[0] ? env.field : NULL);
    } else if (strcmp(env.type, MSG_INVENTORY_RESERVED) != 0) {
        saga_refuse(s, job, env.request_id, "unexpected message type", "type");
    } else if ((bad = saga_find_card(&env, card_field, sizeof(card_field))) != NULL) {
        /* Not even the request id is echoed: it may be where the number is. */
        saga_refuse(s, job, "", "contains a card number", bad);
    } else if ((bad = saga_decode(env.body, &o)) != NULL) {
        saga_refuse(s, job, env.request_id, "missing or invalid field", bad);
    } else if (s->api->ctx->stopping) {
        saga_send_answer(job, env.request_id,
                         &(struct saga_answer){.error = "api/0 is stopping", .retry = true});
    } else if (!s->account[0]) {
        log_error("saga: order %s not taken: account %s not found", o.order_id,
                  s->api->ctx->cfg.saga_account);
        saga_send_answer(job, env.request_id,
                         &(struct saga_answer){.error = "SAGA_ACCOUNT not found", .retry = true});
        saga_find_account(s);
    } else {
        metric_inc(role_metrics(s->api->ctx), MC_SAGA_RECEIVED);
        struct saga_req *r = xcalloc(1, sizeof(*r));
        r->s = s;
        r->api = s->api;
        r->job = job;
        r->o = o;
        snprintf(r->request_id, sizeof(r->request_id), "%s", env.request_id);
        LIST_INSERT_HEAD(&s->open, r, link);
        saga_create(r);
    }
    envelope_free(&env);
    nng_msg_free(msg);
}

/* Opens the REP socket once, after the first account lookup whatever its
 * outcome: without the account every message is answered "retry". */
static void
saga_listen(struct saga *s)
{
    const struct config *cfg = &s->api->ctx->cfg;
    char url[400];
    int rv;
    if (s->listening)
        return;
    if (cfg->intake_url)
        snprintf(url, sizeof(url), "%s", cfg->intake_url);
    else
        snprintf(url, sizeof(url), "ipc://%s/intake.ipc", cfg->run_dir);
    if ((rv = nng_rep0_open(&s->rep)) != 0) {
        log_error("saga: cannot open the intake socket: %s", nng_strerror(rv));
        return;
    }
    s->listening = true; /* open: saga_stop() closes it */
    if ((rv = nng_listen(s->rep, url, NULL, 0)) != 0) {
        log_error("saga: cannot listen at %s: %s", url, nng_strerror(rv));
        return;
    }
    nngev_serve(s->api->ctx->nngev, s->rep, SAGA_CONTEXTS, saga_on_request, s);
    log_info("saga: taking InventoryReserved messages at %s", url);
}

static void
saga_on_account(void *arg, PGresult *res, const char *err)
{
    struct saga *s = arg;
    const struct config *cfg = &s->api->ctx->cfg;
    s->account_query = 0;
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1)
        log_error("saga: SAGA_ACCOUNT %s not found (%s): intake answers retry until it is",
                  cfg->saga_account, err ? err : "no such account");
    else
        snprintf(s->account, sizeof(s->account), "%s", PQgetvalue(res, 0, 0));
    saga_listen(s);
}

/* Looks the account up, once at a time: at start, and again on a message
 * while it was not found (the database was down, or the account is new). */
static void
saga_find_account(struct saga *s)
{
    const char *params[1] = {s->api->ctx->cfg.saga_account};
    if (s->account_query)
        return;
    s->account_query = pgev_exec(s->api->pg, "SELECT id FROM accounts WHERE public_id = $1", 1,
                                 params, saga_on_account, s);
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
    LIST_INIT(&s->open);
    api->saga = s;
    saga_find_account(s);
}

/* Called after the loop has stopped and before the pool is freed. Messages
 * not answered yet stay unanswered: their publishers send them again to the
 * next api/0, and an INSERT that committed meanwhile answers "duplicate". */
void
saga_stop(struct api *api)
{
    struct saga *s = api->saga;
    struct saga_req *r;
    if (!s)
        return;
    if (s->listening)
        nng_close(s->rep);
    if (s->account_query)
        pgev_forget(api->pg, s->account_query);
    while ((r = LIST_FIRST(&s->open)) != NULL) {
        LIST_REMOVE(r, link);
        pgev_forget(api->pg, r->query);
        free(r);
    }
    free(s);
    api->saga = NULL;
}
