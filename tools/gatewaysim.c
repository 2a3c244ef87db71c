/*
 * gatewaysim - the project's payment gateway simulator, an HTTP server that
 * tests and users start on any port.
 *
 * Offers main(). Endpoints (JSON bodies, Idempotency-Key honoured on every
 * POST: a repeat gets the first answer and never charges twice; the same
 * key with other parameters gets 400):
 *   POST /v1/charges {amount, currency, payment_method, capture}
 *   POST /v1/charges/:id/capture {amount}     POST /v1/charges/:id/cancel
 *   POST /v1/refunds {charge, amount}         GET /v1/charges/:id
 *   GET  /v1/charges?idempotency_key=K        (retrieve by key, for recovery)
 *   GET  /v1/ledger                           every charge, and how many
 *   POST /_config {latency_ms, fail_rate, reset_rate, timeout_rate, rate_limit_rate,
 *                  refuse_ms: refuse connections for that long}
 *   POST /_reset                               forget every charge
 * With --key, every /v1 call but the ledger needs "Authorization: Bearer KEY" (401 otherwise).
 * With --callback-url and --callback-secret, a charge that needs the customer's action
 * succeeds --callback-delay-ms later (500 by default) and a signed charge.succeeded
 * callback (Gateway-Signature: t=...,v1=HMAC-SHA256(secret, t "." body)) is POSTed there,
 * again every second until it gets a 2xx (10 tries). With --async-capture as well, a capture
 * answers "pending" and settles the same way later (a charge.captured callback).
 * Test payment methods use Stripe's names: pm_card_visa and other cards
 * succeed, pm_card_chargeDeclined and pm_card_insufficientFunds decline,
 * pm_card_authenticationRequired needs action. Fault injection (by flag or
 * /_config): added latency, a share of 503 answers sent before processing
 * (marked "processed": false), 429 answers with Retry-After: 1, resets and
 * timeouts after the charge was taken (the ambiguous cases). Calls libevent, jansson, ids.
 */
#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <getopt.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "crypto.h"
#include "ids.h"
#include "net.h"
#include "xmalloc.h"

struct sim {
    struct event_base *base;
    json_t *charges; /* id -> charge */
    json_t *by_key;  /* idempotency key -> {hash, code, body, charge} */
    json_t *ordered; /* charge ids in creation order */
    long latency_ms;
    int fail_rate, reset_rate, timeout_rate, rate_limit_rate; /* percent */
    long long charges_made;
    struct evhttp *http;
    struct evhttp_bound_socket *listener; /* NULL while refusing connections */
    const char *bind;
    int port;
    struct event *refuse_timer;
    const char *callback_url;    /* --callback-url: where asynchronous outcomes are sent */
    const char *callback_secret; /* --callback-secret: signs them */
    long callback_delay_ms;      /* --callback-delay-ms: when the customer "authenticates" */
    bool async_capture;          /* --async-capture: captures settle later, by callback */
    const char *key; /* --key: the Bearer token every /v1 call but the ledger must carry */
};

static struct sim sim;

struct pending {
    struct evhttp_request *req;
    int code;
    char *body;
    bool reset;
    struct event *timer;
};

static int
sim_roll(int percent)
{
    uint32_t r = 0;
    if (percent <= 0)
        return 0;
    if (getrandom(&r, sizeof(r), 0) != sizeof(r))
        return 0;
    return (int)(r % 100) < percent;
}

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
sim_on_delay(evutil_socket_t fd, short what, void *arg)
{
    struct pending *p = arg;
    (void)fd;
    (void)what;
    if (p->reset) {
        /* Close the connection without an answer: the caller cannot know. */
        struct evhttp_connection *conn = evhttp_request_get_connection(p->req);
        if (conn)
            evhttp_connection_free(conn);
    } else {
        sim_send_now(p->req, p->code, p->body);
    }
    event_free(p->timer);
    free(p->body);
    free(p);
}

/* Answers after the configured latency, or never (timeout), or with a reset. */
static void
sim_answer(struct evhttp_request *req, int code, const char *body, bool faults)
{
    struct pending *p = xcalloc(1, sizeof(*p));
    long delay = sim.latency_ms;
    p->req = req;
    p->code = code;
    p->body = xstrdup(body);
    if (faults && sim_roll(sim.timeout_rate))
        delay = 3600000; /* the client gives up long before */
    else if (faults && sim_roll(sim.reset_rate))
        p->reset = true;
    p->timer = evtimer_new(sim.base, sim_on_delay, p);
    struct timeval tv = {delay / 1000, (delay % 1000) * 1000};
    evtimer_add(p->timer, &tv);
}

/* Closes the request's connection without reading or answering it. */
static void
sim_drop(struct evhttp_request *req)
{
    struct pending *p = xcalloc(1, sizeof(*p));
    p->req = req;
    p->reset = true;
    p->timer = evtimer_new(sim.base, sim_on_delay, p);
    struct timeval tv = {0, 0};
    evtimer_add(p->timer, &tv);
}

static void
sim_error(struct evhttp_request *req, int code, const char *message)
{
    json_t *o = json_pack("{s:{s:s}}", "error", "message", message);
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

/* ---- callbacks: outcomes that come after the answer ---- */

struct callback {
    char *charge_id;
    const char *type; /* charge.succeeded (authenticated) or charge.captured (settled) */
    char *body;       /* set once the outcome is decided */
    int tries;
    struct event *timer;
};

static void sim_callback_send(struct callback *cb);

static void
sim_callback_free(struct callback *cb)
{
    event_free(cb->timer);
    free(cb->charge_id);
    free(cb->body);
    free(cb);
}

static void
sim_callback_retry(struct callback *cb)
{
    if (++cb->tries >= 10) {
        fprintf(stderr, "gatewaysim: callback for %s given up\n", cb->charge_id);
        sim_callback_free(cb);
        return;
    }
    struct timeval tv = {1, 0};
    evtimer_add(cb->timer, &tv);
}

static void
sim_on_callback_answer(struct evhttp_request *req, void *arg)
{
    struct callback *cb = arg;
    int code = req ? evhttp_request_get_response_code(req) : 0;
    if (code >= 200 && code < 300)
        sim_callback_free(cb);
    else
        sim_callback_retry(cb);
}

static void
sim_callback_send(struct callback *cb)
{
    struct evhttp_uri *uri = evhttp_uri_parse(sim.callback_url);
    if (!uri || !evhttp_uri_get_host(uri)) {
        fprintf(stderr, "gatewaysim: bad --callback-url\n");
        evhttp_uri_free(uri);
        sim_callback_free(cb);
        return;
    }
    int port = evhttp_uri_get_port(uri) > 0 ? evhttp_uri_get_port(uri) : 80;
    struct evhttp_connection *conn =
        evhttp_connection_base_new(sim.base, NULL, evhttp_uri_get_host(uri), (uint16_t)port);
    struct evhttp_request *req = evhttp_request_new(sim_on_callback_answer, cb);
    char t[24], payload_sig[65], header[200];
    snprintf(t, sizeof(t), "%lld", (long long)time(NULL));
    char *payload = xasprintf("%s.%s", t, cb->body);
    crypto_hmac_sha256_hex(sim.callback_secret, strlen(sim.callback_secret), payload,
                           strlen(payload), payload_sig);
    free(payload);
    snprintf(header, sizeof(header), "t=%s,v1=%s", t, payload_sig);
    struct evkeyvalq *h = evhttp_request_get_output_headers(req);
    evhttp_add_header(h, "Host", evhttp_uri_get_host(uri));
    evhttp_add_header(h, "Content-Type", "application/json");
    evhttp_add_header(h, "Gateway-Signature", header);
    evbuffer_add(evhttp_request_get_output_buffer(req), cb->body, strlen(cb->body));
    const char *path = evhttp_uri_get_path(uri);
    evhttp_make_request(conn, req, EVHTTP_REQ_POST, path && *path ? path : "/");
    evhttp_connection_free_on_completion(conn);
    evhttp_uri_free(uri);
}

/* The customer finished authenticating: the charge succeeds, and the
 * gateway says so with a signed callback. */
static void
sim_on_callback_timer(evutil_socket_t fd, short what, void *arg)
{
    struct callback *cb = arg;
    (void)fd;
    (void)what;
    if (!cb->body) {
        json_t *ch = json_object_get(sim.charges, cb->charge_id);
        if (!ch) {
            sim_callback_free(cb);
            return;
        }
        json_int_t amt = json_integer_value(json_object_get(ch, "amount"));
        if (json_is_integer(json_object_get(ch, "amount_to_capture")))
            amt = json_integer_value(json_object_get(ch, "amount_to_capture"));
        json_object_set_new(ch, "status", json_string("succeeded"));
        json_object_set_new(ch, "captured", json_true());
        json_object_set_new(ch, "amount_captured", json_integer(amt));
        char id[64];
        ids_random(id, sizeof(id), "gwevt_", 12);
        json_t *ev = json_pack("{s:s,s:s,s:I,s:{s:O}}", "id", id, "type", cb->type, "created",
                               (json_int_t)time(NULL), "data", "object", ch);
        cb->body = json_dumps(ev, JSON_COMPACT);
        json_decref(ev);
    }
    sim_callback_send(cb);
}

static void
sim_callback_schedule(const char *charge_id, const char *type)
{
    if (!sim.callback_url || !sim.callback_secret)
        return;
    struct callback *cb = xcalloc(1, sizeof(*cb));
    cb->charge_id = xstrdup(charge_id);
    cb->type = type;
    cb->timer = evtimer_new(sim.base, sim_on_callback_timer, cb);
    struct timeval tv = {sim.callback_delay_ms / 1000, (sim.callback_delay_ms % 1000) * 1000};
    evtimer_add(cb->timer, &tv);
}

/* ---- operations ---- */

static json_t *
sim_new_charge(json_t *body, const char *key, int *code)
{
    char id[64];
    json_t *amount = json_object_get(body, "amount");
    const char *currency = json_string_value(json_object_get(body, "currency"));
    const char *pm = json_string_value(json_object_get(body, "payment_method"));
    bool capture = !json_is_false(json_object_get(body, "capture"));
    if (!json_is_integer(amount) || json_integer_value(amount) <= 0 || !currency || !pm) {
        *code = 400;
        return json_pack("{s:{s:s}}", "error", "message",
                         "amount, currency and payment_method are required");
    }
    ids_time_ordered(id, sizeof(id), "ch_", 8);
    json_int_t amt = json_integer_value(amount);
    json_t *ch =
        json_pack("{s:s,s:s,s:I,s:s,s:s,s:I,s:I,s:b}", "id", id, "object", "charge", "amount", amt,
                  "currency", currency, "payment_method", pm, "amount_captured", (json_int_t)0,
                  "amount_refunded", (json_int_t)0, "captured", 0);
    const char *status = capture ? "succeeded" : "requires_capture";
    if (strcmp(pm, "pm_card_chargeDeclined") == 0 ||
        strcmp(pm, "pm_card_visa_chargeDeclined") == 0) {
        status = "failed";
        json_object_set_new(ch, "failure_code", json_string("card_declined"));
        json_object_set_new(ch, "decline_code", json_string("generic_decline"));
        json_object_set_new(ch, "failure_message", json_string("Your card was declined."));
    } else if (strcmp(pm, "pm_card_insufficientFunds") == 0 ||
               strcmp(pm, "pm_card_visa_chargeDeclinedInsufficientFunds") == 0) {
        status = "failed";
        json_object_set_new(ch, "failure_code", json_string("card_declined"));
        json_object_set_new(ch, "decline_code", json_string("insufficient_funds"));
        json_object_set_new(ch, "failure_message",
                            json_string("Your card has insufficient funds."));
    } else if (strcmp(pm, "pm_card_authenticationRequired") == 0 ||
               strcmp(pm, "pm_card_threeDSecureRequired") == 0) {
        status = "requires_action";
        if (capture)
            sim_callback_schedule(id, "charge.succeeded");
    } else if (capture) {
        json_object_set_new(ch, "amount_captured", json_integer(amt));
        json_object_set_new(ch, "captured", json_true());
    }
    json_object_set_new(ch, "status", json_string(status));
    json_object_set_new(ch, "idempotency_key", key ? json_string(key) : json_null());
    json_object_set(sim.charges, id, ch);
    json_array_append_new(sim.ordered, json_string(id));
    sim.charges_made++;
    *code = 200;
    return ch;
}

static json_t *
sim_capture(json_t *ch, json_t *body, int *code)
{
    const char *status = json_string_value(json_object_get(ch, "status"));
    json_int_t amt = json_integer_value(json_object_get(ch, "amount"));
    json_t *want = json_object_get(body, "amount");
    json_int_t cap = json_is_integer(want) ? json_integer_value(want) : amt;
    if (strcmp(status, "requires_capture") != 0 || cap <= 0 || cap > amt) {
        *code = 400;
        return json_pack("{s:{s:s}}", "error", "message", "charge cannot be captured");
    }
    if (sim.async_capture && sim.callback_url && sim.callback_secret) {
        /* Accepted now, settled later: the answer says pending and a
         * charge.captured callback follows. */
        json_object_set_new(ch, "status", json_string("pending"));
        json_object_set_new(ch, "amount_to_capture", json_integer(cap));
        sim_callback_schedule(json_string_value(json_object_get(ch, "id")), "charge.captured");
        *code = 200;
        return json_incref(ch);
    }
    json_object_set_new(ch, "status", json_string("succeeded"));
    json_object_set_new(ch, "captured", json_true());
    json_object_set_new(ch, "amount_captured", json_integer(cap));
    *code = 200;
    return json_incref(ch);
}

static json_t *
sim_cancel(json_t *ch, int *code)
{
    const char *status = json_string_value(json_object_get(ch, "status"));
    if (strcmp(status, "requires_capture") != 0 && strcmp(status, "requires_action") != 0) {
        *code = 400;
        return json_pack("{s:{s:s}}", "error", "message", "charge cannot be canceled");
    }
    json_object_set_new(ch, "status", json_string("canceled"));
    *code = 200;
    return json_incref(ch);
}

static json_t *
sim_refund(json_t *body, int *code)
{
    json_t *ch =
        json_object_get(sim.charges, json_string_value(json_object_get(body, "charge"))
                                         ? json_string_value(json_object_get(body, "charge"))
                                         : "");
    json_t *want = json_object_get(body, "amount");
    if (!ch) {
        *code = 404;
        return json_pack("{s:{s:s}}", "error", "message", "no such charge");
    }
    json_int_t captured = json_integer_value(json_object_get(ch, "amount_captured"));
    json_int_t refunded = json_integer_value(json_object_get(ch, "amount_refunded"));
    json_int_t amt = json_is_integer(want) ? json_integer_value(want) : captured - refunded;
    if (amt <= 0 || refunded + amt > captured) {
        *code = 400;
        return json_pack("{s:{s:s}}", "error", "message", "refund exceeds the captured amount");
    }
    char id[64];
    ids_time_ordered(id, sizeof(id), "re_", 8);
    json_object_set_new(ch, "amount_refunded", json_integer(refunded + amt));
    *code = 200;
    return json_pack("{s:s,s:s,s:I,s:O,s:s}", "id", id, "object", "refund", "amount", amt, "charge",
                     json_object_get(ch, "id"), "status", "succeeded");
}

/* ---- HTTP ---- */

static void
sim_post(struct evhttp_request *req, const char *path)
{
    json_t *body = sim_body(req);
    const char *key = evhttp_find_header(evhttp_request_get_input_headers(req), "Idempotency-Key");
    char hash[65] = "";
    int code = 404;
    json_t *result = NULL;

    if (!body) {
        sim_error(req, 400, "body must be a JSON object");
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
        char *canon = json_dumps(body, JSON_COMPACT | JSON_SORT_KEYS);
        char *text = xasprintf("%s %s", path, canon);
        uint8_t h[32];
        crypto_sha256(text, strlen(text), h);
        crypto_hex(h, 32, hash);
        free(text);
        free(canon);
        json_t *seen = json_object_get(sim.by_key, key);
        if (seen) {
            json_decref(body);
            if (strcmp(json_string_value(json_object_get(seen, "hash")), hash) != 0) {
                sim_error(req, 400, "idempotency key reused with other parameters");
                return;
            }
            sim_answer(req, (int)json_integer_value(json_object_get(seen, "code")),
                       json_string_value(json_object_get(seen, "body")), true);
            return;
        }
    }
    char id[80];
    if (strcmp(path, "/v1/charges") == 0) {
        result = sim_new_charge(body, key, &code);
    } else if (strcmp(path, "/v1/refunds") == 0) {
        result = sim_refund(body, &code);
    } else if (sscanf(path, "/v1/charges/%79[A-Za-z0-9_]/", id) == 1) {
        json_t *ch = json_object_get(sim.charges, id);
        const char *action = path + strlen("/v1/charges/") + strlen(id);
        if (!ch)
            result = json_pack("{s:{s:s}}", "error", "message", "no such charge"), code = 404;
        else if (strcmp(action, "/capture") == 0)
            result = sim_capture(ch, body, &code);
        else if (strcmp(action, "/cancel") == 0)
            result = sim_cancel(ch, &code);
    }
    json_decref(body);
    if (!result) {
        sim_error(req, 404, "no such endpoint");
        return;
    }
    char *text = json_dumps(result, JSON_COMPACT);
    json_decref(result);
    if (key)
        json_object_set_new(sim.by_key, key,
                            json_pack("{s:s,s:i,s:s}", "hash", hash, "code", code, "body", text));
    sim_answer(req, code, text, true);
    free(text);
}

static void
sim_get(struct evhttp_request *req, const char *path)
{
    char id[80];
    if (strcmp(path, "/v1/ledger") == 0) {
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
        return;
    }
    if (strcmp(path, "/v1/charges") == 0) {
        struct evkeyvalq q;
        const char *query = evhttp_uri_get_query(evhttp_request_get_evhttp_uri(req));
        if (query && evhttp_parse_query_str(query, &q) == 0) {
            const char *key = evhttp_find_header(&q, "idempotency_key");
            json_t *seen = key ? json_object_get(sim.by_key, key) : NULL;
            if (seen)
                sim_answer(req, (int)json_integer_value(json_object_get(seen, "code")),
                           json_string_value(json_object_get(seen, "body")), false);
            else
                sim_error(req, 404, "no request with this idempotency key");
            evhttp_clear_headers(&q);
            return;
        }
    }
    if (sscanf(path, "/v1/charges/%79[A-Za-z0-9_]", id) == 1) {
        json_t *ch = json_object_get(sim.charges, id);
        if (!ch) {
            sim_error(req, 404, "no such charge");
            return;
        }
        char *text = json_dumps(ch, JSON_COMPACT);
        sim_answer(req, 200, text, false);
        free(text);
        return;
    }
    sim_error(req, 404, "no such endpoint");
}

static void
sim_config(struct evhttp_request *req)
{
    json_t *b = sim_body(req);
    if (!b) {
        sim_send_now(req, 400, "{\"error\":{\"message\":\"bad JSON\"}}");
        return;
    }
    if (json_is_integer(json_object_get(b, "latency_ms")))
        sim.latency_ms = (long)json_integer_value(json_object_get(b, "latency_ms"));
    if (json_is_integer(json_object_get(b, "fail_rate")))
        sim.fail_rate = (int)json_integer_value(json_object_get(b, "fail_rate"));
    if (json_is_integer(json_object_get(b, "reset_rate")))
        sim.reset_rate = (int)json_integer_value(json_object_get(b, "reset_rate"));
    if (json_is_integer(json_object_get(b, "rate_limit_rate")))
        sim.rate_limit_rate = (int)json_integer_value(json_object_get(b, "rate_limit_rate"));
    if (json_is_integer(json_object_get(b, "timeout_rate")))
        sim.timeout_rate = (int)json_integer_value(json_object_get(b, "timeout_rate"));
    json_int_t refuse = json_integer_value(json_object_get(b, "refuse_ms"));
    json_decref(b);
    sim_send_now(req, 200, "{\"ok\":true}");
    if (refuse > 0 && sim.listener) {
        /* Down for refuse_ms: the listening socket is closed (new connections
         * are refused) and requests on open connections are dropped unread. */
        evhttp_del_accept_socket(sim.http, sim.listener);
        sim.listener = NULL;
        struct timeval tv = {(time_t)(refuse / 1000), (suseconds_t)(refuse % 1000) * 1000};
        evtimer_add(sim.refuse_timer, &tv);
    }
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
        if (strcmp(path, "/_config") == 0) {
            sim_config(req);
            return;
        }
        if (strcmp(path, "/_reset") == 0) {
            json_object_clear(sim.charges);
            json_object_clear(sim.by_key);
            json_array_clear(sim.ordered);
            sim.charges_made = 0;
            sim_send_now(req, 200, "{\"ok\":true}");
            return;
        }
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

int
main(int argc, char **argv)
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
                                         {"async-capture", no_argument, NULL, 'A'},
                                         {NULL, 0, NULL, 0}};
    int port = 12111, opt;
    sim.callback_delay_ms = 500;
    const char *bind = "127.0.0.1";
    char err[256];
    while ((opt = getopt_long(argc, argv, "p:b:l:f:r:t:k:U:S:D:A", opts, NULL)) != -1) {
        switch (opt) {
        case 'p':
            port = atoi(optarg);
            break;
        case 'b':
            bind = optarg;
            break;
        case 'l':
            sim.latency_ms = atol(optarg);
            break;
        case 'f':
            sim.fail_rate = atoi(optarg);
            break;
        case 'r':
            sim.reset_rate = atoi(optarg);
            break;
        case 't':
            sim.timeout_rate = atoi(optarg);
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
            sim.callback_delay_ms = atol(optarg);
            break;
        case 'A':
            sim.async_capture = true;
            break;
        default:
            fprintf(stderr, "usage: gatewaysim [--port N] [--bind ADDR] [--latency-ms N] "
                            "[--fail-rate PCT] [--reset-rate PCT] [--timeout-rate PCT] [--key KEY] "
                            "[--callback-url URL "
                            "--callback-secret S [--callback-delay-ms N] [--async-capture]]\n");
            return 2;
        }
    }
    if (port <= 0 || port > 65535) {
        fprintf(stderr, "gatewaysim: --port must be 1-65535\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    sim.base = event_base_new();
    sim.charges = json_object();
    sim.by_key = json_object();
    sim.ordered = json_array();
    struct evhttp *http = evhttp_new(sim.base);
    sim.http = http;
    sim.bind = bind;
    sim.port = port;
    sim.refuse_timer = evtimer_new(sim.base, sim_on_refuse_end, NULL);
    evhttp_set_gencb(http, sim_route, NULL);
    evhttp_set_allowed_methods(http, EVHTTP_REQ_GET | EVHTTP_REQ_POST);
    if (sim_listen(err, sizeof(err)) < 0) {
        fprintf(stderr, "gatewaysim: %s\n", err);
        return 1;
    }
    struct event *term = evsignal_new(sim.base, SIGTERM, sim_on_signal, sim.base);
    struct event *intr = evsignal_new(sim.base, SIGINT, sim_on_signal, sim.base);
    evsignal_add(term, NULL);
    evsignal_add(intr, NULL);
    fprintf(stderr, "gatewaysim listening on http://%s:%d\n", bind, port);
    event_base_dispatch(sim.base);
    evhttp_free(http);
    event_free(term);
    event_free(intr);
    event_free(sim.refuse_timer);
    event_base_free(sim.base);
    json_decref(sim.charges);
    json_decref(sim.by_key);
    json_decref(sim.ordered);
    return 0;
}
