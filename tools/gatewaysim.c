/*
 * gatewaysim - the project's payment gateway simulator, an HTTP server that
 * tests and users start on any port. It behaves like a real card gateway:
 * every charge and every refund has a status, a charge keeps a record of what
 * was held, captured and refunded, and a list of the operations done to it
 * (its refunds' too); late outcomes come as signed callbacks that may arrive
 * late, out of order or twice.
 *
 * Offers main(). Endpoints (JSON bodies, Idempotency-Key honoured on every
 * POST: a repeat gets the first answer, status code and body, and never
 * charges or refunds twice; the same key with other parameters gets 400):
 *   POST /v1/charges {amount, currency, payment_method, capture, metadata?}
 *   POST /v1/charges/:id/capture {amount?}    only from requires_capture
 *   POST /v1/charges/:id/cancel               only from requires_capture or requires_action
 *   POST /v1/refunds {charge, amount?, metadata?}  of a captured charge, at most what is left
 *   POST /v1/refunds/:id/cancel               only from pending
 *   GET  /v1/charges/:id, /v1/refunds/:id     the charge or refund now
 *   GET  /v1/charges?idempotency_key=K        the charge that K's request created or acted
 *                                             on, as it is now (for recovery)
 *   GET  /v1/refunds?idempotency_key=K        the refund that K's request created or
 *                                             canceled, as it is now
 *   GET  /v1/ledger                           {charges: how many, data: every charge}
 *   POST /_config {latency_ms, fail_rate, reset_rate, timeout_rate, rate_limit_rate,
 * callback_delay_ms, callback_jitter_ms, callback_duplicate_rate, refund_fail_rate, async_refund:
 * bool, refuse_ms: refuse connections for that long} POST /_reset forget every charge, refund and
 * pending callback A refused capture, cancel or refund is 400 {error: {message, code:
 * charge_not_capturable | charge_not_cancelable | charge_not_refundable | charge_already_refunded |
 * amount_too_large | parameter_invalid_integer}, charge: <the charge now>}; a refused refund cancel
 * is 400 {error: {message, code: refund_not_cancelable}, refund: <the refund now>}. Charge
 * statuses: requires_action (3-D Secure) -> succeeded | requires_capture | failed, requires_capture
 * -> succeeded | pending (async capture) | canceled, pending -> succeeded. Refund statuses: (new)
 * -> succeeded | failed | pending (async refund), pending -> succeeded | failed | canceled. A
 * charge may be refunded while succeeded and captured, up to amount_captured - amount_refunded -
 * its pending refunds; a failed or canceled refund holds nothing. The tables sim_charge_moves and
 * sim_refund_moves are the only place that says so. A charge carries its refunds (every status) and
 * refunded (all it captured is refunded); each refund's steps are in the charge's operations as
 * refund, refund_settle and refund_cancel. With --key, every /v1 call but the ledger needs
 * "Authorization: Bearer KEY" (401 otherwise). With --callback-url and --callback-secret, a charge
 * that needs the customer's action settles
 * --callback-delay-ms later (500 by default) if it still needs it, and a signed callback
 * (Gateway-Signature: t=...,v1=HMAC-SHA256(secret, t "." body)) tells the outcome:
 * charge.succeeded (captured, or only authorized when capture was false) or charge.failed.
 * With --async-capture as well, a capture answers "pending" and settles the same way later
 * (charge.captured). With --async-refund (callbacks or not) a refund answers "pending" and
 * settles --callback-delay-ms later, if still pending, to succeeded (charge.refunded with the
 * charge, and refund.updated with the refund) or failed (refund.updated). A share of refunds
 * (--refund-fail-rate) and those whose metadata has "fail": "true" fail with failure_reason
 * "declined", at once or when they settle. Each callback waits a further random
 * 0..--callback-jitter-ms, a share (--callback-duplicate-rate) is sent twice with the same
 * event id, and each is retried every second until it gets a 2xx (--callback-tries, 30 by
 * default). The event is built from its object when first sent; a charge that moved on
 * before then gets none. Without callbacks a charge that needs action keeps needing it until
 * it is canceled.
 * Test payment methods use Stripe's names: pm_card_visa and other cards succeed,
 * pm_card_chargeDeclined and pm_card_insufficientFunds decline, pm_card_authenticationRequired
 * and pm_card_threeDSecureRequired need action, and
 * pm_card_authenticationRequiredChargeDeclinedInsufficientFunds needs action then declines.
 * Fault injection (by flag or /_config) applies to every /v1 POST alike: added latency, a
 * share of 503 answers sent before processing (marked "processed": false), 429 answers with
 * Retry-After: 1, and resets and timeouts after the operation was done (the ambiguous cases;
 * a swallowed answer's connection closes when the client hangs up, or after 10 minutes).
 * A bad flag exits with 2; a bad request gets a 4xx; a move outside the tables aborts.
 * Calls libevent, jansson, crypto, ids, net.
 */
#include <errno.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <getopt.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>

#include "crypto.h"
#include "ids.h"
#include "net.h"
#include "xmalloc.h"

/* How long an answer the timeout fault swallows keeps its connection when
 * the client does not hang up first: longer than any client waits (paymentd
 * allows GATEWAY_TIMEOUT_MS up to 10 minutes), short enough that a long run
 * under load does not pile up sockets. */
#define SIM_HOLD_MS 600000
/* A callback receiver that does not answer within this counts as a failed try. */
#define SIM_CALLBACK_TIMEOUT_S 5

struct pending;
struct settle;
struct callback;

struct sim {
    struct event_base *base;
    json_t *charges; /* id -> charge */
    json_t *refunds; /* id -> refund, the same object as in its charge's refunds list */
    json_t *by_key;  /* idempotency key -> {hash, code, body, charge: id?, refund: id?} */
    json_t *ordered; /* charge ids in creation order */
    long latency_ms;
    long fail_rate, reset_rate, timeout_rate, rate_limit_rate; /* percent */
    long refund_fail_rate; /* percent of refunds that fail (declined) */
    long long charges_made;
    struct evhttp *http;
    struct evhttp_bound_socket *listener; /* NULL while refusing connections */
    const char *bind;
    int port;
    struct event *refuse_timer;
    const char *callback_url;        /* --callback-url: where asynchronous outcomes are sent */
    struct evhttp_uri *callback_uri; /* callback_url, parsed at start */
    const char *callback_secret;     /* --callback-secret: signs them */
    long callback_delay_ms;          /* --callback-delay-ms: when the customer "authenticates" */
    long callback_jitter_ms;         /* --callback-jitter-ms: extra random wait per callback */
    long callback_duplicate_rate;    /* --callback-duplicate-rate: percent sent twice */
    long callback_tries;             /* --callback-tries: sends before giving up */
    bool async_capture;              /* --async-capture: captures settle later, by callback */
    bool async_refund;               /* --async-refund: refunds pend, settle later */
    const char *key;     /* --key: the Bearer token every /v1 call but the ledger must carry */
    unsigned generation; /* bumped by /_reset: older callbacks are dropped */
    LIST_HEAD(, pending) pendings;
    LIST_HEAD(, settle) settles;
    LIST_HEAD(, callback) callbacks;
};

static struct sim sim;

/* ---- small helpers ---- */

static unsigned
sim_random(unsigned below)
{
    uint32_t r = 0;
    if (below == 0 || getrandom(&r, sizeof(r), 0) != sizeof(r))
        return 0;
    return r % below;
}

static int
sim_roll(long percent)
{
    return percent > 0 && (long)sim_random(100) < percent;
}

static json_int_t
sim_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (json_int_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void
sim_timer_add(struct event *ev, long ms)
{
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    evtimer_add(ev, &tv);
}

static json_int_t
sim_int(json_t *o, const char *field)
{
    return json_integer_value(json_object_get(o, field));
}

static const char *
sim_str(json_t *o, const char *field)
{
    return json_string_value(json_object_get(o, field));
}

/* ---- answers: latency, resets and swallowed answers ---- */

enum answer_how {
    ANSWER_SEND,  /* after the latency */
    ANSWER_RESET, /* close the connection instead */
    ANSWER_HOLD,  /* never answer: close when the client gives up, or after SIM_HOLD_MS */
};

/* An answer waiting for its moment; owns nothing of the request, which
 * libevent frees once the answer is sent or the connection closed. */
struct pending {
    struct evhttp_request *req;
    int code;
    char *body;
    enum answer_how how;
    struct event *timer;
    struct event *watch; /* ANSWER_HOLD: readable when the client hangs up */
    LIST_ENTRY(pending) link;
};

static void
sim_send_now(struct evhttp_request *req, int code, const char *body)
{
    struct evbuffer *buf = evbuffer_new();
    evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type", "application/json");
    evbuffer_add(buf, body, strlen(body));
    evhttp_send_reply(req, code, code == 200 ? "OK" : "Error", buf);
    evbuffer_free(buf);
}

static void
sim_pending_free(struct pending *p)
{
    LIST_REMOVE(p, link);
    event_free(p->timer);
    if (p->watch)
        event_free(p->watch);
    free(p->body);
    free(p);
}

/* Closes the request's connection without an answer: the caller cannot know
 * what happened. Freeing the connection frees the request too. */
static void
sim_close(struct evhttp_request *req)
{
    struct evhttp_connection *conn = evhttp_request_get_connection(req);
    if (conn)
        evhttp_connection_free(conn);
    else
        evhttp_request_free(req); /* libevent let go of it: it is ours */
}

/* Sends the answer or closes the connection, then forgets p. The watch goes
 * first, while its socket is still open. */
static void
sim_pending_finish(struct pending *p)
{
    if (p->watch) {
        event_free(p->watch);
        p->watch = NULL;
    }
    if (p->how == ANSWER_SEND)
        sim_send_now(p->req, p->code, p->body);
    else
        sim_close(p->req);
    sim_pending_free(p);
}

static void
sim_on_delay(evutil_socket_t fd, short what, void *arg)
{
    struct pending *p = arg;
    (void)fd;
    (void)what;
    sim_pending_finish(p);
}

/* The socket of a swallowed answer became readable. libevent does not read
 * while a request waits for its answer, so without this watch a client that
 * gave up would keep its socket open here until SIM_HOLD_MS. */
static void
sim_on_hold_read(evutil_socket_t fd, short what, void *arg)
{
    struct pending *p = arg;
    char c;
    (void)what;
    ssize_t n = recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
        event_add(p->watch, NULL);
        return;
    }
    /* More data (a pipelined request) says nothing: hold until the timer.
     * End of file or an error: the client is gone, so close. */
    if (n <= 0)
        sim_pending_finish(p);
}

static void
sim_hold_watch(struct pending *p)
{
    struct evhttp_connection *conn = evhttp_request_get_connection(p->req);
    struct bufferevent *bev = conn ? evhttp_connection_get_bufferevent(conn) : NULL;
    evutil_socket_t fd = bev ? bufferevent_getfd(bev) : -1;
    if (fd < 0)
        return;
    p->watch = event_new(sim.base, fd, EV_READ, sim_on_hold_read, p);
    event_add(p->watch, NULL);
}

static void
sim_pending_start(struct evhttp_request *req, int code, const char *body, enum answer_how how,
                  long delay_ms)
{
    struct pending *p = xcalloc(1, sizeof(*p));
    p->req = req;
    p->code = code;
    p->body = xstrdup(body ? body : "");
    p->how = how;
    p->timer = evtimer_new(sim.base, sim_on_delay, p);
    LIST_INSERT_HEAD(&sim.pendings, p, link);
    if (how == ANSWER_HOLD)
        sim_hold_watch(p);
    sim_timer_add(p->timer, delay_ms);
}

/* Answers after the configured latency; with faults, sometimes never
 * (timeout) or with a reset, though the operation was done. */
static void
sim_answer(struct evhttp_request *req, int code, const char *body, bool faults)
{
    if (faults && sim_roll(sim.timeout_rate))
        sim_pending_start(req, code, body, ANSWER_HOLD, SIM_HOLD_MS);
    else if (faults && sim_roll(sim.reset_rate))
        sim_pending_start(req, code, body, ANSWER_RESET, sim.latency_ms);
    else
        sim_pending_start(req, code, body, ANSWER_SEND, sim.latency_ms);
}

/* Closes the request's connection without reading or answering it. */
static void
sim_drop(struct evhttp_request *req)
{
    sim_pending_start(req, 0, NULL, ANSWER_RESET, 0);
}

static json_t *
sim_error_json(const char *message)
{
    return json_pack("{s:{s:s}}", "error", "message", message);
}

static void
sim_error(struct evhttp_request *req, int code, const char *message)
{
    json_t *o = sim_error_json(message);
    char *text = json_dumps(o, JSON_COMPACT);
    sim_answer(req, code, text, false);
    free(text);
    json_decref(o);
}

static json_t *
sim_body(struct evhttp_request *req)
{
    struct evbuffer *in = evhttp_request_get_input_buffer(req);
    size_t len = evbuffer_get_length(in);
    if (len == 0)
        return json_object();
    json_t *o = json_loadb((const char *)evbuffer_pullup(in, (ssize_t)len), len, 0, NULL);
    if (o && !json_is_object(o)) {
        json_decref(o);
        return NULL;
    }
    return o;
}

/* ---- the state machines: charges and refunds ---- */

enum op {
    OP_CREATE,
    OP_CAPTURE,
    OP_CANCEL,
    OP_REFUND,
    OP_SETTLE,
    OP_REFUND_SETTLE,
    OP_REFUND_CANCEL,
};

static const char *const sim_op_names[] = {"create", "capture",       "cancel",       "refund",
                                           "settle", "refund_settle", "refund_cancel"};

struct move {
    enum op op;
    const char *from, *to;
};

/* Every status change a charge may make, and by which operation. A new
 * charge has no status yet (from NULL). A refund may be made only of a
 * succeeded charge, which it keeps succeeded. */
static const struct move sim_charge_moves[] = {
    {OP_CREATE, NULL, "succeeded"},
    {OP_CREATE, NULL, "requires_capture"},
    {OP_CREATE, NULL, "requires_action"},
    {OP_CREATE, NULL, "failed"},
    {OP_SETTLE, "requires_action", "succeeded"},
    {OP_SETTLE, "requires_action", "requires_capture"},
    {OP_SETTLE, "requires_action", "failed"},
    {OP_CAPTURE, "requires_capture", "succeeded"},
    {OP_CAPTURE, "requires_capture", "pending"},
    {OP_SETTLE, "pending", "succeeded"},
    {OP_CANCEL, "requires_capture", "canceled"},
    {OP_CANCEL, "requires_action", "canceled"},
    {OP_REFUND, "succeeded", "succeeded"},
};

/* Every status change a refund may make. Only a pending refund (async)
 * still moves; succeeded, failed and canceled are final. */
static const struct move sim_refund_moves[] = {
    {OP_REFUND, NULL, "succeeded"},
    {OP_REFUND, NULL, "failed"},
    {OP_REFUND, NULL, "pending"},
    {OP_REFUND_SETTLE, "pending", "succeeded"},
    {OP_REFUND_SETTLE, "pending", "failed"},
    {OP_REFUND_CANCEL, "pending", "canceled"},
};

struct machine {
    const char *what;
    const struct move *moves;
    size_t n;
};

static const struct machine sim_charge_machine = {
    "charge", sim_charge_moves, sizeof(sim_charge_moves) / sizeof(sim_charge_moves[0])};
static const struct machine sim_refund_machine = {
    "refund", sim_refund_moves, sizeof(sim_refund_moves) / sizeof(sim_refund_moves[0])};

static bool
sim_same(const char *a, const char *b)
{
    return a == b || (a && b && strcmp(a, b) == 0);
}

/* True when m lets op move an object from status from to status to (to
 * NULL: to any status). */
static bool
sim_allows(const struct machine *m, enum op op, const char *from, const char *to)
{
    for (size_t i = 0; i < m->n; i++)
        if (m->moves[i].op == op && sim_same(m->moves[i].from, from) &&
            (!to || strcmp(m->moves[i].to, to) == 0))
            return true;
    return false;
}

/* Callers check sim_can() or sim_refund_can() first, so a move outside the
 * table is our own bug. */
static void
sim_check_move(const struct machine *m, enum op op, const char *from, const char *to)
{
    if (sim_allows(m, op, from, to))
        return;
    fprintf(stderr, "gatewaysim: %s cannot move a %s from %s to %s\n", sim_op_names[op], m->what,
            from ? from : "(new)", to);
    abort();
}

/* True when op may be applied to a charge in status from. */
static bool
sim_can(enum op op, const char *from)
{
    return sim_allows(&sim_charge_machine, op, from, NULL);
}

static bool
sim_refund_can(enum op op, const char *from)
{
    return sim_allows(&sim_refund_machine, op, from, NULL);
}

static void
sim_record(json_t *ch, enum op op, const char *key, json_int_t amount, const char *status,
           const char *refund_id)
{
    json_t *rec = json_pack("{s:s,s:o,s:I,s:s,s:I}", "op", sim_op_names[op], "key",
                            key ? json_string(key) : json_null(), "amount", amount, "status",
                            status, "at_ms", sim_now_ms());
    if (refund_id)
        json_object_set_new(rec, "refund", json_string(refund_id));
    json_array_append_new(json_object_get(ch, "operations"), rec);
}

/* Moves the charge to status to and records the operation. */
static void
sim_move(json_t *ch, enum op op, const char *to, const char *key, json_int_t amount)
{
    sim_check_move(&sim_charge_machine, op, sim_str(ch, "status"), to);
    json_object_set_new(ch, "status", json_string(to));
    sim_record(ch, op, key, amount, to, NULL);
}

/* The sum of the amounts of the charge's refunds in status status. */
static json_int_t
sim_refunds_in(json_t *ch, const char *status)
{
    json_int_t sum = 0;
    size_t i;
    json_t *re;
    json_array_foreach(json_object_get(ch, "refunds"), i, re)
    {
        if (sim_same(sim_str(re, "status"), status))
            sum += sim_int(re, "amount");
    }
    return sum;
}

/* What may still be refunded: a pending refund holds its amount until it
 * settles or is canceled. */
static json_int_t
sim_refundable(json_t *ch)
{
    return sim_int(ch, "amount_captured") - sim_int(ch, "amount_refunded") -
           sim_refunds_in(ch, "pending");
}

/* Moves a refund of the charge ch to status to and records the operation
 * in the charge. amount_refunded is the sum of the succeeded refunds, and
 * never more than was captured once pending ones are counted too. */
static void
sim_refund_move(json_t *ch, json_t *re, enum op op, const char *to, const char *key)
{
    sim_check_move(&sim_refund_machine, op, sim_str(re, "status"), to);
    json_object_set_new(re, "status", json_string(to));
    if (strcmp(to, "failed") == 0)
        json_object_set_new(re, "failure_reason", json_string("declined"));
    json_int_t captured = sim_int(ch, "amount_captured");
    json_int_t refunded = sim_refunds_in(ch, "succeeded");
    json_object_set_new(ch, "amount_refunded", json_integer(refunded));
    json_object_set_new(ch, "refunded", json_boolean(captured > 0 && refunded == captured));
    if (sim_refundable(ch) < 0) {
        fprintf(stderr, "gatewaysim: charge %s refunds more than it captured\n", sim_str(ch, "id"));
        abort();
    }
    sim_record(ch, op, key, sim_int(re, "amount"), to, sim_str(re, "id"));
}

/* A refund fails when its metadata asks for it ("fail": "true", so that a
 * test can be sure) or by the configured share. */
static bool
sim_refund_fails(json_t *re)
{
    return sim_same(sim_str(json_object_get(re, "metadata"), "fail"), "true") ||
           sim_roll(sim.refund_fail_rate);
}

/* Test payment methods; any other name is a card that pays. */
static const struct method {
    const char *name;
    bool needs_action;        /* 3-D Secure first */
    const char *decline_code; /* NULL: the card pays */
    const char *message;
} sim_methods[] = {
    {"pm_card_chargeDeclined", false, "generic_decline", "Your card was declined."},
    {"pm_card_visa_chargeDeclined", false, "generic_decline", "Your card was declined."},
    {"pm_card_insufficientFunds", false, "insufficient_funds", "Your card has insufficient funds."},
    {"pm_card_visa_chargeDeclinedInsufficientFunds", false, "insufficient_funds",
     "Your card has insufficient funds."},
    {"pm_card_authenticationRequired", true, NULL, NULL},
    {"pm_card_threeDSecureRequired", true, NULL, NULL},
    {"pm_card_authenticationRequiredChargeDeclinedInsufficientFunds", true, "insufficient_funds",
     "Your card has insufficient funds."},
};

static const struct method *
sim_method(const char *name)
{
    static const struct method pays = {"", false, NULL, NULL};
    for (size_t i = 0; i < sizeof(sim_methods) / sizeof(sim_methods[0]); i++)
        if (strcmp(sim_methods[i].name, name) == 0)
            return &sim_methods[i];
    return &pays;
}

/* The card's outcome once nothing stands in the way (at creation, or when
 * the customer has authenticated): declined, authorized, or charged. */
static void
sim_decide(json_t *ch, enum op op, const char *key)
{
    const struct method *m = sim_method(sim_str(ch, "payment_method"));
    json_int_t amt = sim_int(ch, "amount");
    if (m->decline_code) {
        json_object_set_new(ch, "failure_code", json_string("card_declined"));
        json_object_set_new(ch, "decline_code", json_string(m->decline_code));
        json_object_set_new(ch, "failure_message", json_string(m->message));
        sim_move(ch, op, "failed", key, op == OP_CREATE ? amt : 0);
        return;
    }
    json_object_set_new(ch, "amount_authorized", json_integer(amt));
    if (json_is_true(json_object_get(ch, "capture"))) {
        json_object_set_new(ch, "captured", json_true());
        json_object_set_new(ch, "amount_captured", json_integer(amt));
        sim_move(ch, op, "succeeded", key, amt);
    } else {
        sim_move(ch, op, "requires_capture", key, amt);
    }
}

/* ---- callbacks: outcomes that come after the answer ---- */

/* What a callback or a settlement is about. */
enum kind { KIND_CHARGE, KIND_REFUND };

/* The charge or refund id names now; NULL when there is none (any more). */
static json_t *
sim_object(enum kind kind, const char *id)
{
    return json_object_get(kind == KIND_REFUND ? sim.refunds : sim.charges, id);
}

/* One delivery of one event. The body is built when it is first sent and
 * then resent unchanged (a retry or a duplicate is the same event). */
struct callback {
    enum kind kind; /* what data.object is */
    char *object_id;
    const char *type; /* charge.succeeded, charge.failed, charge.captured, charge.refunded or
                         refund.updated */
    char *expect;     /* the status the settlement left; another one at first send: nothing */
    char *body;       /* NULL until first sent */
    long tries;
    bool done; /* answered 2xx, or given up: freed on the next timer turn */
    unsigned generation;
    struct event *timer;
    struct evhttp_connection *conn; /* the last try's; freed outside its callbacks */
    LIST_ENTRY(callback) link;
};

static void sim_on_callback_timer(evutil_socket_t fd, short what, void *arg);

static bool
sim_callbacks_on(void)
{
    return sim.callback_uri && sim.callback_secret;
}

static void
sim_callback_free(struct callback *cb)
{
    LIST_REMOVE(cb, link);
    event_free(cb->timer);
    if (cb->conn)
        evhttp_connection_free(cb->conn);
    free(cb->object_id);
    free(cb->expect);
    free(cb->body);
    free(cb);
}

static void
sim_callback_new(enum kind kind, const char *object_id, const char *type, const char *expect,
                 const char *body, long delay_ms)
{
    struct callback *cb = xcalloc(1, sizeof(*cb));
    cb->kind = kind;
    cb->object_id = xstrdup(object_id);
    cb->type = type;
    cb->expect = xstrdup(expect); /* the object's own string changes with its status */
    cb->body = body ? xstrdup(body) : NULL;
    cb->generation = sim.generation;
    cb->timer = evtimer_new(sim.base, sim_on_callback_timer, cb);
    LIST_INSERT_HEAD(&sim.callbacks, cb, link);
    sim_timer_add(cb->timer, delay_ms);
}

/* Called by libevent when the receiver answered, failed or timed out;
 * possibly from inside evhttp_make_request (a refused local connection).
 * It only decides what comes next: the connection is still libevent's to
 * touch, so the timer frees it on a later turn. */
static void
sim_on_callback_answer(struct evhttp_request *req, void *arg)
{
    struct callback *cb = arg;
    int code = req ? evhttp_request_get_response_code(req) : 0;
    if (code >= 200 && code < 300) {
        cb->done = true;
    } else if (++cb->tries >= sim.callback_tries) {
        fprintf(stderr, "gatewaysim: callback for %s given up after %ld tries\n", cb->object_id,
                cb->tries);
        cb->done = true;
    }
    sim_timer_add(cb->timer, cb->done ? 0 : 1000);
}

static void
sim_callback_send(struct callback *cb)
{
    const char *host = evhttp_uri_get_host(sim.callback_uri);
    int port =
        evhttp_uri_get_port(sim.callback_uri) > 0 ? evhttp_uri_get_port(sim.callback_uri) : 80;
    const char *path = evhttp_uri_get_path(sim.callback_uri);
    char t[24], sig[65], header[200];

    cb->conn = evhttp_connection_base_new(sim.base, NULL, host, (uint16_t)port);
    evhttp_connection_set_timeout(cb->conn, SIM_CALLBACK_TIMEOUT_S);
    struct evhttp_request *req = evhttp_request_new(sim_on_callback_answer, cb);
    snprintf(t, sizeof(t), "%lld", (long long)time(NULL));
    char *payload = xasprintf("%s.%s", t, cb->body);
    crypto_hmac_sha256_hex(sim.callback_secret, strlen(sim.callback_secret), payload,
                           strlen(payload), sig);
    free(payload);
    snprintf(header, sizeof(header), "t=%s,v1=%s", t, sig);
    struct evkeyvalq *h = evhttp_request_get_output_headers(req);
    evhttp_add_header(h, "Host", host);
    evhttp_add_header(h, "Content-Type", "application/json");
    evhttp_add_header(h, "Gateway-Signature", header);
    evbuffer_add(evhttp_request_get_output_buffer(req), cb->body, strlen(cb->body));
    if (evhttp_make_request(cb->conn, req, EVHTTP_REQ_POST, path && *path ? path : "/") < 0) {
        /* Not queued and not answered: the request is still ours. */
        evhttp_request_free(req);
        sim_on_callback_answer(NULL, cb);
    }
}

/* Builds the event from its object as it is now, when it is first sent;
 * false when the object is gone (reset) or has moved on since it settled. */
static bool
sim_callback_build(struct callback *cb)
{
    json_t *obj = sim_object(cb->kind, cb->object_id);
    if (!obj || !sim_same(sim_str(obj, "status"), cb->expect))
        return false;
    char id[64];
    ids_random(id, sizeof(id), "gwevt_", 12);
    json_t *ev = json_pack("{s:s,s:s,s:I,s:{s:O}}", "id", id, "type", cb->type, "created",
                           (json_int_t)time(NULL), "data", "object", obj);
    cb->body = json_dumps(ev, JSON_COMPACT);
    json_decref(ev);
    if (sim_roll(sim.callback_duplicate_rate))
        sim_callback_new(cb->kind, cb->object_id, cb->type, cb->expect, cb->body,
                         (long)sim_random(1001));
    return true;
}

/* Queues an event about the object in its current status, after the jitter. */
static void
sim_callback_later(enum kind kind, json_t *obj, const char *type)
{
    if (sim_callbacks_on())
        sim_callback_new(kind, sim_str(obj, "id"), type, sim_str(obj, "status"), NULL,
                         (long)sim_random((unsigned)sim.callback_jitter_ms + 1));
}

static void
sim_on_callback_timer(evutil_socket_t fd, short what, void *arg)
{
    struct callback *cb = arg;
    (void)fd;
    (void)what;
    if (cb->conn) {
        evhttp_connection_free(cb->conn);
        cb->conn = NULL;
    }
    if (cb->done || cb->generation != sim.generation || (!cb->body && !sim_callback_build(cb))) {
        sim_callback_free(cb);
        return;
    }
    sim_callback_send(cb);
}

/* ---- settlements: the customer authenticates, a pending capture or refund clears ---- */

struct settle {
    enum kind kind;
    char *id;
    const char *from; /* requires_action or pending: settles only if still so */
    struct event *timer;
    LIST_ENTRY(settle) link;
};

static void
sim_settle_free(struct settle *s)
{
    LIST_REMOVE(s, link);
    event_free(s->timer);
    free(s->id);
    free(s);
}

/* The charge settles if it is still waiting (it may have been canceled, or
 * forgotten by /_reset), then a callback tells the outcome. */
static void
sim_charge_settle(json_t *ch, const char *from)
{
    const char *type;
    if (!ch || !sim_same(sim_str(ch, "status"), from))
        return;
    if (strcmp(from, "pending") == 0) {
        json_int_t amt = sim_int(ch, "amount_to_capture");
        json_object_set_new(ch, "captured", json_true());
        json_object_set_new(ch, "amount_captured", json_integer(amt));
        sim_move(ch, OP_SETTLE, "succeeded", NULL, amt);
        type = "charge.captured";
    } else {
        sim_decide(ch, OP_SETTLE, NULL);
        type = strcmp(sim_str(ch, "status"), "failed") == 0 ? "charge.failed" : "charge.succeeded";
    }
    sim_callback_later(KIND_CHARGE, ch, type);
}

/* The refund settles if it is still pending (not canceled, not forgotten):
 * it succeeds, and the charge's amount_refunded grows only now, or it
 * fails. Callbacks tell both the refund's and, on success, the charge's new
 * state, as separate events. */
static void
sim_refund_settle(json_t *re)
{
    if (!re || !sim_same(sim_str(re, "status"), "pending"))
        return;
    json_t *ch = json_object_get(sim.charges, sim_str(re, "charge"));
    if (!ch) {
        /* /_reset forgets charges and refunds together. */
        fprintf(stderr, "gatewaysim: refund %s has no charge\n", sim_str(re, "id"));
        abort();
    }
    bool fails = sim_refund_fails(re);
    sim_refund_move(ch, re, OP_REFUND_SETTLE, fails ? "failed" : "succeeded", NULL);
    if (!fails)
        sim_callback_later(KIND_CHARGE, ch, "charge.refunded");
    sim_callback_later(KIND_REFUND, re, "refund.updated");
}

static void
sim_on_settle(evutil_socket_t fd, short what, void *arg)
{
    struct settle *s = arg;
    (void)fd;
    (void)what;
    if (s->kind == KIND_REFUND)
        sim_refund_settle(sim_object(KIND_REFUND, s->id));
    else
        sim_charge_settle(sim_object(KIND_CHARGE, s->id), s->from);
    sim_settle_free(s);
}

static void
sim_settle_schedule(enum kind kind, const char *id, const char *from)
{
    struct settle *s = xcalloc(1, sizeof(*s));
    s->kind = kind;
    s->id = xstrdup(id);
    s->from = from;
    s->timer = evtimer_new(sim.base, sim_on_settle, s);
    LIST_INSERT_HEAD(&sim.settles, s, link);
    sim_timer_add(s->timer, sim.callback_delay_ms);
}

/* ---- operations ---- */

/* What a POST did: the answer, and the charge and refund it created or
 * named (NULL when none), which its idempotency key then leads to. */
struct outcome {
    int code;
    json_t *body;
    const char *charge_id;
    const char *refund_id;
};

static struct outcome
sim_fail(int code, const char *message)
{
    return (struct outcome){.code = code, .body = sim_error_json(message)};
}

static struct outcome
sim_ok(json_t *ch, json_t *re)
{
    return (struct outcome){.code = 200,
                            .body = json_incref(re ? re : ch),
                            .charge_id = sim_str(ch, "id"),
                            .refund_id = re ? sim_str(re, "id") : NULL};
}

/* A refused capture, cancel or refund: the error and the charge as it is. */
static struct outcome
sim_refuse(json_t *ch, const char *code, const char *message)
{
    return (struct outcome){.code = 400,
                            .body = json_pack("{s:{s:s,s:s},s:O}", "error", "message", message,
                                              "code", code, "charge", ch),
                            .charge_id = sim_str(ch, "id")};
}

static struct outcome
sim_new_charge(json_t *body, const char *key)
{
    char id[64];
    json_t *amount = json_object_get(body, "amount");
    json_t *metadata = json_object_get(body, "metadata");
    const char *currency = sim_str(body, "currency");
    const char *pm = sim_str(body, "payment_method");
    bool capture = !json_is_false(json_object_get(body, "capture"));
    if (!json_is_integer(amount) || json_integer_value(amount) <= 0 || !currency || !pm)
        return sim_fail(400, "amount, currency and payment_method are required");
    if (metadata && !json_is_object(metadata))
        return sim_fail(400, "metadata must be an object");
    ids_time_ordered(id, sizeof(id), "ch_", 8);
    json_t *ch = json_pack(
        "{s:s,s:s,s:I,s:s,s:s,s:b,s:n,s:b,s:I,s:I,s:I,s:b,s:b,s:o,s:o,s:I,s:[],s:[]}", "id", id,
        "object", "charge", "amount", json_integer_value(amount), "currency", currency,
        "payment_method", pm, "capture", capture, "status", "captured", 0, "amount_authorized",
        (json_int_t)0, "amount_captured", (json_int_t)0, "amount_refunded", (json_int_t)0,
        "refunded", 0, "voided", 0, "idempotency_key", key ? json_string(key) : json_null(),
        "metadata", metadata ? json_deep_copy(metadata) : json_object(), "created",
        (json_int_t)time(NULL), "refunds", "operations");
    if (sim_method(pm)->needs_action) {
        sim_move(ch, OP_CREATE, "requires_action", key, json_integer_value(amount));
        /* Without callbacks nobody could learn the outcome: it waits for a cancel. */
        if (sim_callbacks_on())
            sim_settle_schedule(KIND_CHARGE, id, "requires_action");
    } else {
        sim_decide(ch, OP_CREATE, key);
    }
    json_object_set_new(sim.charges, id, ch);
    json_array_append_new(sim.ordered, json_string(id));
    sim.charges_made++;
    return sim_ok(ch, NULL);
}

static struct outcome
sim_capture(json_t *ch, json_t *body, const char *key)
{
    const char *status = sim_str(ch, "status");
    json_int_t held = sim_int(ch, "amount_authorized");
    json_t *want = json_object_get(body, "amount");
    if (!sim_can(OP_CAPTURE, status))
        return sim_refuse(ch, "charge_not_capturable",
                          "only a requires_capture charge can be "
                          "captured");
    if (want && !json_is_integer(want))
        return sim_refuse(ch, "charge_not_capturable", "amount must be an integer");
    json_int_t cap = want ? json_integer_value(want) : held;
    if (cap <= 0 || cap > held)
        return sim_refuse(ch, "charge_not_capturable",
                          "amount must be positive and at most amount_authorized");
    if (sim.async_capture && sim_callbacks_on()) {
        /* Accepted now, settled later: the answer says pending and a
         * charge.captured callback follows. */
        json_object_set_new(ch, "amount_to_capture", json_integer(cap));
        sim_move(ch, OP_CAPTURE, "pending", key, cap);
        sim_settle_schedule(KIND_CHARGE, sim_str(ch, "id"), "pending");
    } else {
        json_object_set_new(ch, "captured", json_true());
        json_object_set_new(ch, "amount_captured", json_integer(cap));
        sim_move(ch, OP_CAPTURE, "succeeded", key, cap);
    }
    return sim_ok(ch, NULL);
}

/* Voids the authorization. amount_authorized stays as the record of what
 * was held; status canceled says it no longer is. */
static struct outcome
sim_cancel(json_t *ch, const char *key)
{
    if (!sim_can(OP_CANCEL, sim_str(ch, "status")))
        return sim_refuse(ch, "charge_not_cancelable",
                          "only a requires_capture or requires_action charge can be canceled");
    json_object_set_new(ch, "voided", json_true());
    sim_move(ch, OP_CANCEL, "canceled", key, sim_int(ch, "amount_authorized"));
    return sim_ok(ch, NULL);
}

/* Refunds amount (by default all that is left) of a captured charge. The
 * refund is answered succeeded or failed at once, or pending with
 * --async-refund, when it settles --callback-delay-ms later. */
static struct outcome
sim_refund(json_t *body, const char *key)
{
    const char *charge = sim_str(body, "charge");
    json_t *ch = json_object_get(sim.charges, charge ? charge : "");
    json_t *want = json_object_get(body, "amount");
    json_t *metadata = json_object_get(body, "metadata");
    if (!ch)
        return sim_fail(404, "no such charge");
    if (want && (!json_is_integer(want) || json_integer_value(want) <= 0))
        return sim_refuse(ch, "parameter_invalid_integer", "amount must be a positive integer");
    if (metadata && !json_is_object(metadata)) {
        struct outcome o = sim_fail(400, "metadata must be an object");
        o.charge_id = sim_str(ch, "id");
        return o;
    }
    if (!sim_can(OP_REFUND, sim_str(ch, "status")) ||
        !json_is_true(json_object_get(ch, "captured")))
        return sim_refuse(ch, "charge_not_refundable", "only a captured charge can be refunded");
    json_int_t left = sim_refundable(ch);
    if (left <= 0)
        return sim_refuse(ch, "charge_already_refunded",
                          "the charge is refunded in full, or the rest is being refunded");
    json_int_t amt = want ? json_integer_value(want) : left;
    if (amt > left)
        return sim_refuse(ch, "amount_too_large",
                          "amount is more than the charge's amount_captured, less what is "
                          "refunded or being refunded");
    char id[64];
    ids_time_ordered(id, sizeof(id), "re_", 8);
    json_t *re = json_pack(
        "{s:s,s:s,s:I,s:O,s:O,s:n,s:n,s:o,s:o,s:I}", "id", id, "object", "refund", "amount", amt,
        "currency", json_object_get(ch, "currency"), "charge", json_object_get(ch, "id"), "status",
        "failure_reason", "idempotency_key", key ? json_string(key) : json_null(), "metadata",
        metadata ? json_deep_copy(metadata) : json_object(), "created", (json_int_t)time(NULL));
    /* One object, two places: the charge's list shows every change. */
    json_object_set_new(sim.refunds, id, re);
    json_array_append(json_object_get(ch, "refunds"), re);
    if (sim.async_refund) {
        sim_refund_move(ch, re, OP_REFUND, "pending", key);
        sim_settle_schedule(KIND_REFUND, id, "pending");
    } else {
        sim_refund_move(ch, re, OP_REFUND, sim_refund_fails(re) ? "failed" : "succeeded", key);
    }
    return sim_ok(ch, re);
}

/* Cancels a pending refund: its amount is not refunded and may be
 * refunded again. */
static struct outcome
sim_refund_cancel(json_t *re, const char *key)
{
    json_t *ch = json_object_get(sim.charges, sim_str(re, "charge"));
    if (!ch) {
        fprintf(stderr, "gatewaysim: refund %s has no charge\n", sim_str(re, "id"));
        abort();
    }
    if (!sim_refund_can(OP_REFUND_CANCEL, sim_str(re, "status")))
        return (struct outcome){.code = 400,
                                .body = json_pack("{s:{s:s,s:s},s:O}", "error", "message",
                                                  "only a pending refund can be canceled", "code",
                                                  "refund_not_cancelable", "refund", re),
                                .charge_id = sim_str(ch, "id"),
                                .refund_id = sim_str(re, "id")};
    sim_refund_move(ch, re, OP_REFUND_CANCEL, "canceled", key);
    return sim_ok(ch, re);
}

/* ---- HTTP ---- */

/* Splits "PREFIXID" and "PREFIXID/ACTION" (prefix "/v1/charges/" or
 * "/v1/refunds/"); false for other paths. */
static bool
sim_object_path(const char *path, const char *prefix, char *id, size_t cap, const char **action)
{
    size_t plen = strlen(prefix);
    if (strncmp(path, prefix, plen) != 0)
        return false;
    const char *s = path + plen;
    size_t n = strcspn(s, "/");
    if (n == 0 || n >= cap)
        return false;
    memcpy(id, s, n);
    id[n] = '\0';
    *action = s + n;
    return true;
}

/* Does what the POST asks; code 0 when no endpoint matches. */
static struct outcome
sim_dispatch(const char *path, json_t *body, const char *key)
{
    char id[80];
    const char *action;
    if (strcmp(path, "/v1/charges") == 0)
        return sim_new_charge(body, key);
    if (strcmp(path, "/v1/refunds") == 0)
        return sim_refund(body, key);
    if (sim_object_path(path, "/v1/refunds/", id, sizeof(id), &action)) {
        if (strcmp(action, "/cancel") != 0)
            return (struct outcome){0};
        json_t *re = json_object_get(sim.refunds, id);
        return re ? sim_refund_cancel(re, key) : sim_fail(404, "no such refund");
    }
    if (!sim_object_path(path, "/v1/charges/", id, sizeof(id), &action) ||
        (strcmp(action, "/capture") != 0 && strcmp(action, "/cancel") != 0))
        return (struct outcome){0};
    json_t *ch = json_object_get(sim.charges, id);
    if (!ch)
        return sim_fail(404, "no such charge");
    return strcmp(action, "/capture") == 0 ? sim_capture(ch, body, key) : sim_cancel(ch, key);
}

static void
sim_request_hash(const char *path, json_t *body, char hash[65])
{
    char *canon = json_dumps(body, JSON_COMPACT | JSON_SORT_KEYS);
    char *text = xasprintf("%s %s", path, canon);
    uint8_t h[32];
    crypto_sha256(text, strlen(text), h);
    crypto_hex(h, 32, hash);
    free(text);
    free(canon);
}

/* Answers a POST whose key was seen before: the first answer again, or
 * 400 when the parameters differ. False when the key is new. */
static bool
sim_replay(struct evhttp_request *req, const char *key, const char *hash)
{
    json_t *seen = json_object_get(sim.by_key, key);
    if (!seen)
        return false;
    if (strcmp(sim_str(seen, "hash"), hash) != 0)
        sim_error(req, 400, "idempotency key reused with other parameters");
    else
        sim_answer(req, (int)sim_int(seen, "code"), sim_str(seen, "body"), true);
    return true;
}

/* Keys become JSON strings (in by_key and in the charge), which must be UTF-8. */
static bool
sim_utf8(const char *text)
{
    json_t *s = json_string(text);
    json_decref(s);
    return s != NULL;
}

static void
sim_post(struct evhttp_request *req, const char *path)
{
    json_t *body = sim_body(req);
    const char *key = evhttp_find_header(evhttp_request_get_input_headers(req), "Idempotency-Key");
    char hash[65] = "";

    if (!body) {
        sim_error(req, 400, "body must be a JSON object");
        return;
    }
    if (key && !sim_utf8(key)) {
        json_decref(body);
        sim_error(req, 400, "Idempotency-Key must be UTF-8");
        return;
    }
    if (sim_roll(sim.rate_limit_rate)) {
        json_decref(body);
        evhttp_add_header(evhttp_request_get_output_headers(req), "Retry-After", "1");
        sim_answer(req, 429, "{\"error\":{\"message\":\"rate limited\"},\"processed\":false}",
                   false);
        return;
    }
    if (sim_roll(sim.fail_rate)) {
        json_decref(body);
        sim_answer(req, 503, "{\"error\":{\"message\":\"unavailable\"},\"processed\":false}",
                   false);
        return;
    }
    if (key) {
        sim_request_hash(path, body, hash);
        if (sim_replay(req, key, hash)) {
            json_decref(body);
            return;
        }
    }
    struct outcome out = sim_dispatch(path, body, key);
    json_decref(body);
    if (!out.body) {
        sim_error(req, 404, "no such endpoint");
        return;
    }
    char *text = json_dumps(out.body, JSON_COMPACT);
    json_decref(out.body);
    if (key)
        json_object_set_new(sim.by_key, key,
                            json_pack("{s:s,s:i,s:s,s:s?,s:s?}", "hash", hash, "code", out.code,
                                      "body", text, "charge", out.charge_id, "refund",
                                      out.refund_id));
    sim_answer(req, out.code, text, true);
    free(text);
}

static void
sim_send_json(struct evhttp_request *req, json_t *o)
{
    char *text = json_dumps(o, JSON_COMPACT);
    sim_answer(req, 200, text, false);
    free(text);
}

static void
sim_ledger(struct evhttp_request *req)
{
    json_t *data = json_array();
    size_t i;
    json_t *v;
    json_array_foreach(sim.ordered, i, v)
    {
        json_array_append(data, json_object_get(sim.charges, json_string_value(v)));
    }
    json_t *o = json_pack("{s:I,s:o}", "charges", (json_int_t)sim.charges_made, "data", data);
    char *text = json_dumps(o, JSON_COMPACT);
    sim_send_now(req, 200, text);
    free(text);
    json_decref(o);
}

/* GET /v1/charges?idempotency_key=K (/v1/refunds?...): the charge (the
 * refund) K's request created or acted on, as it is now (not the answer
 * that request got). A charge's key leads to no refund; a refund's key
 * leads to its charge as well. */
static void
sim_by_key(struct evhttp_request *req, enum kind kind)
{
    struct evkeyvalq q;
    const char *query = evhttp_uri_get_query(evhttp_request_get_evhttp_uri(req));
    json_t *obj = NULL;
    if (query && evhttp_parse_query_str(query, &q) == 0) {
        const char *key = evhttp_find_header(&q, "idempotency_key");
        json_t *seen = key ? json_object_get(sim.by_key, key) : NULL;
        const char *id = seen ? sim_str(seen, kind == KIND_REFUND ? "refund" : "charge") : NULL;
        obj = id ? sim_object(kind, id) : NULL;
        evhttp_clear_headers(&q);
    }
    if (obj)
        sim_send_json(req, obj);
    else
        sim_error(req, 404, "no request with this idempotency key");
}

static void
sim_get(struct evhttp_request *req, const char *path)
{
    char id[80];
    const char *action;
    json_t *obj;
    if (strcmp(path, "/v1/ledger") == 0) {
        sim_ledger(req);
    } else if (strcmp(path, "/v1/charges") == 0) {
        sim_by_key(req, KIND_CHARGE);
    } else if (strcmp(path, "/v1/refunds") == 0) {
        sim_by_key(req, KIND_REFUND);
    } else if (sim_object_path(path, "/v1/charges/", id, sizeof(id), &action) && !*action) {
        obj = json_object_get(sim.charges, id);
        if (obj)
            sim_send_json(req, obj);
        else
            sim_error(req, 404, "no such charge");
    } else if (sim_object_path(path, "/v1/refunds/", id, sizeof(id), &action) && !*action) {
        obj = json_object_get(sim.refunds, id);
        if (obj)
            sim_send_json(req, obj);
        else
            sim_error(req, 404, "no such refund");
    } else {
        sim_error(req, 404, "no such endpoint");
    }
}

/* POST /_config: every knob is checked before any is applied. */
static void
sim_config(struct evhttp_request *req)
{
    const struct {
        const char *name;
        long *value;
        long max;
    } knobs[] = {
        {"latency_ms", &sim.latency_ms, 3600000},
        {"fail_rate", &sim.fail_rate, 100},
        {"reset_rate", &sim.reset_rate, 100},
        {"timeout_rate", &sim.timeout_rate, 100},
        {"rate_limit_rate", &sim.rate_limit_rate, 100},
        {"callback_jitter_ms", &sim.callback_jitter_ms, 3600000},
        {"callback_duplicate_rate", &sim.callback_duplicate_rate, 100},
        {"refund_fail_rate", &sim.refund_fail_rate, 100},
        {"callback_delay_ms", &sim.callback_delay_ms, 3600000},
    };
    size_t n = sizeof(knobs) / sizeof(knobs[0]);
    json_t *b = sim_body(req);
    if (!b) {
        sim_send_now(req, 400, "{\"error\":{\"message\":\"bad JSON\"}}");
        return;
    }
    json_t *async_refund = json_object_get(b, "async_refund");
    bool bad = async_refund && !json_is_boolean(async_refund);
    const char *k;
    json_t *given;
    json_object_foreach(b, k, given)
    {
        bool known = strcmp(k, "async_refund") == 0 || strcmp(k, "refuse_ms") == 0;
        for (size_t i = 0; i < n; i++)
            known = known || strcmp(k, knobs[i].name) == 0;
        bad = bad || !known; /* a misspelt setting is an error, not a silent no-op */
    }
    for (size_t i = 0; i < n && !bad; i++) {
        json_t *v = json_object_get(b, knobs[i].name);
        bad = v && (!json_is_integer(v) || json_integer_value(v) < 0 ||
                    json_integer_value(v) > knobs[i].max);
    }
    if (bad) {
        json_decref(b);
        sim_send_now(req, 400,
                     "{\"error\":{\"message\":\"a setting is unknown or out of range\"}}");
        return;
    }
    for (size_t i = 0; i < n; i++)
        if (json_object_get(b, knobs[i].name))
            *knobs[i].value = (long)sim_int(b, knobs[i].name);
    if (async_refund)
        sim.async_refund = json_is_true(async_refund);
    json_int_t refuse = sim_int(b, "refuse_ms");
    json_decref(b);
    sim_send_now(req, 200, "{\"ok\":true}");
    if (refuse > 0 && sim.listener) {
        /* Down for refuse_ms: the listening socket is closed (new connections
         * are refused) and requests on open connections are dropped unread. */
        evhttp_del_accept_socket(sim.http, sim.listener);
        sim.listener = NULL;
        sim_timer_add(sim.refuse_timer, (long)refuse);
    }
}

/* POST /_reset: forgets every charge, refund and key. Settlement timers
 * find their charge or refund gone and do nothing; callbacks of the old
 * generation are dropped at their next turn, sent or not. */
static void
sim_reset(struct evhttp_request *req)
{
    json_object_clear(sim.charges);
    json_object_clear(sim.refunds);
    json_object_clear(sim.by_key);
    json_array_clear(sim.ordered);
    sim.charges_made = 0;
    sim.generation++;
    sim_send_now(req, 200, "{\"ok\":true}");
}

static int
sim_listen(char *err, size_t errlen)
{
    int fd = net_listen(sim.bind, sim.port, false, err, errlen);
    if (fd < 0)
        return -1;
    sim.listener = evhttp_accept_socket_with_handle(sim.http, fd);
    return sim.listener ? 0 : -1;
}

static void
sim_on_refuse_end(evutil_socket_t fd, short what, void *arg)
{
    char err[256];
    (void)fd;
    (void)what;
    (void)arg;
    if (sim_listen(err, sizeof(err)) < 0) {
        fprintf(stderr, "gatewaysim: cannot listen again: %s\n", err);
        event_base_loopbreak(sim.base);
    }
}

static void
sim_route(struct evhttp_request *req, void *arg)
{
    const char *path = evhttp_uri_get_path(evhttp_request_get_evhttp_uri(req));
    (void)arg;
    if (!path)
        path = "/";
    if (!sim.listener) {
        sim_drop(req);
        return;
    }
    if (sim.key && strncmp(path, "/v1/", 4) == 0 && strcmp(path, "/v1/ledger") != 0) {
        const char *auth =
            evhttp_find_header(evhttp_request_get_input_headers(req), "Authorization");
        if (!auth || strncmp(auth, "Bearer ", 7) != 0 || strcmp(auth + 7, sim.key) != 0) {
            sim_send_now(req, 401, "{\"error\":{\"message\":\"invalid API key\"}}");
            return;
        }
    }
    switch (evhttp_request_get_command(req)) {
    case EVHTTP_REQ_GET:
        sim_get(req, path);
        return;
    case EVHTTP_REQ_POST:
        if (strcmp(path, "/_config") == 0)
            sim_config(req);
        else if (strcmp(path, "/_reset") == 0)
            sim_reset(req);
        else
            sim_post(req, path);
        return;
    default:
        sim_send_now(req, 405, "{\"error\":{\"message\":\"method not allowed\"}}");
    }
}

static void
sim_on_signal(evutil_socket_t sig, short what, void *arg)
{
    (void)sig;
    (void)what;
    event_base_loopbreak(arg);
}

/* ---- start-up and shut-down ---- */

static const char sim_usage[] =
    "usage: gatewaysim [--port N] [--bind ADDR] [--latency-ms N] [--fail-rate PCT] "
    "[--reset-rate PCT] [--timeout-rate PCT] [--key KEY] [--callback-url URL --callback-secret S "
    "[--callback-delay-ms N] [--callback-jitter-ms N] [--callback-duplicate-rate PCT] "
    "[--callback-tries N] [--async-capture]] [--async-refund] [--refund-fail-rate PCT]\n";

/* A numeric flag in [min, max]; anything else is a bad start-up. */
static long
sim_number(const char *flag, const char *text, long min, long max)
{
    char *end;
    errno = 0;
    long v = strtol(text, &end, 10);
    if (errno || end == text || *end || v < min || v > max) {
        fprintf(stderr, "gatewaysim: --%s must be a number from %ld to %ld\n", flag, min, max);
        exit(2);
    }
    return v;
}

static void
sim_options(int argc, char **argv)
{
    static const struct option opts[] = {{"port", required_argument, NULL, 'p'},
                                         {"bind", required_argument, NULL, 'b'},
                                         {"latency-ms", required_argument, NULL, 'l'},
                                         {"fail-rate", required_argument, NULL, 'f'},
                                         {"reset-rate", required_argument, NULL, 'r'},
                                         {"timeout-rate", required_argument, NULL, 't'},
                                         {"key", required_argument, NULL, 'k'},
                                         {"callback-url", required_argument, NULL, 'U'},
                                         {"callback-secret", required_argument, NULL, 'S'},
                                         {"callback-delay-ms", required_argument, NULL, 'D'},
                                         {"callback-jitter-ms", required_argument, NULL, 'J'},
                                         {"callback-duplicate-rate", required_argument, NULL, 'P'},
                                         {"callback-tries", required_argument, NULL, 'T'},
                                         {"async-capture", no_argument, NULL, 'A'},
                                         {"async-refund", no_argument, NULL, 'R'},
                                         {"refund-fail-rate", required_argument, NULL, 'F'},
                                         {NULL, 0, NULL, 0}};
    int opt;
    sim.port = 12111;
    sim.bind = "127.0.0.1";
    sim.callback_delay_ms = 500;
    sim.callback_tries = 30;
    while ((opt = getopt_long(argc, argv, "p:b:l:f:r:t:k:U:S:D:J:P:T:ARF:", opts, NULL)) != -1) {
        switch (opt) {
        case 'p':
            sim.port = (int)sim_number("port", optarg, 1, 65535);
            break;
        case 'b':
            sim.bind = optarg;
            break;
        case 'l':
            sim.latency_ms = sim_number("latency-ms", optarg, 0, 3600000);
            break;
        case 'f':
            sim.fail_rate = sim_number("fail-rate", optarg, 0, 100);
            break;
        case 'r':
            sim.reset_rate = sim_number("reset-rate", optarg, 0, 100);
            break;
        case 't':
            sim.timeout_rate = sim_number("timeout-rate", optarg, 0, 100);
            break;
        case 'k':
            sim.key = optarg;
            break;
        case 'U':
            sim.callback_url = optarg;
            break;
        case 'S':
            sim.callback_secret = optarg;
            break;
        case 'D':
            sim.callback_delay_ms = sim_number("callback-delay-ms", optarg, 0, 3600000);
            break;
        case 'J':
            sim.callback_jitter_ms = sim_number("callback-jitter-ms", optarg, 0, 3600000);
            break;
        case 'P':
            sim.callback_duplicate_rate = sim_number("callback-duplicate-rate", optarg, 0, 100);
            break;
        case 'T':
            sim.callback_tries = sim_number("callback-tries", optarg, 1, 1000000);
            break;
        case 'A':
            sim.async_capture = true;
            break;
        case 'R':
            sim.async_refund = true;
            break;
        case 'F':
            sim.refund_fail_rate = sim_number("refund-fail-rate", optarg, 0, 100);
            break;
        default:
            fputs(sim_usage, stderr);
            exit(2);
        }
    }
    if (optind < argc || !sim.callback_url != !sim.callback_secret) {
        fputs(sim_usage, stderr);
        exit(2);
    }
    if (sim.callback_url) {
        sim.callback_uri = evhttp_uri_parse(sim.callback_url);
        if (!sim.callback_uri || !evhttp_uri_get_host(sim.callback_uri)) {
            fprintf(stderr, "gatewaysim: --callback-url must be an http URL with a host\n");
            exit(2);
        }
    }
}

/* Frees what the loop still held when it stopped. Timers and watches go
 * before evhttp_free, which closes the sockets they watch and frees the
 * requests the pending answers point at. */
static void
sim_free_all(void)
{
    while (!LIST_EMPTY(&sim.settles))
        sim_settle_free(LIST_FIRST(&sim.settles));
    while (!LIST_EMPTY(&sim.callbacks))
        sim_callback_free(LIST_FIRST(&sim.callbacks));
    while (!LIST_EMPTY(&sim.pendings))
        sim_pending_free(LIST_FIRST(&sim.pendings));
    evhttp_free(sim.http);
    event_free(sim.refuse_timer);
    if (sim.callback_uri)
        evhttp_uri_free(sim.callback_uri);
    json_decref(sim.charges);
    json_decref(sim.refunds);
    json_decref(sim.by_key);
    json_decref(sim.ordered);
}

int
main(int argc, char **argv)
{
    char err[256];
    sim_options(argc, argv);
    signal(SIGPIPE, SIG_IGN);
    LIST_INIT(&sim.pendings);
    LIST_INIT(&sim.settles);
    LIST_INIT(&sim.callbacks);
    sim.base = event_base_new();
    sim.charges = json_object();
    sim.refunds = json_object();
    sim.by_key = json_object();
    sim.ordered = json_array();
    sim.http = evhttp_new(sim.base);
    sim.refuse_timer = evtimer_new(sim.base, sim_on_refuse_end, NULL);
    evhttp_set_gencb(sim.http, sim_route, NULL);
    evhttp_set_allowed_methods(sim.http, EVHTTP_REQ_GET | EVHTTP_REQ_POST);
    if (sim_listen(err, sizeof(err)) < 0) {
        fprintf(stderr, "gatewaysim: %s\n", err);
        return 1;
    }
    struct event *term = evsignal_new(sim.base, SIGTERM, sim_on_signal, sim.base);
    struct event *intr = evsignal_new(sim.base, SIGINT, sim_on_signal, sim.base);
    evsignal_add(term, NULL);
    evsignal_add(intr, NULL);
    fprintf(stderr, "gatewaysim listening on http://%s:%d\n", sim.bind, sim.port);
    event_base_dispatch(sim.base);
    sim_free_all();
    event_free(term);
    event_free(intr);
    event_base_free(sim.base);
    return 0;
}
