/*
 * api - the HTTP intake role.
 *
 * Offers api_main(), run by role_run() in each api process. Every api
 * process listens on the same PORT with SO_REUSEPORT and serves, on its own
 * libevent loop:
 *   GET /healthz  200 while the process lives (no dependency is consulted);
 *   GET /readyz   200 "ready" when PostgreSQL answers a query, Redis answers
 *                 PING, a worker answers an NNG ping and no gateway breaker
 *                 is open; 200 "degraded" when only Redis or a gateway is
 *                 missing (payments still work, more slowly or later);
 *                 else 503 naming the missing part;
 *   /v1/...       the Stripe-compatible API (v1.c and the modules it calls).
 * Nothing here blocks the loop: PostgreSQL through pgev, Redis through
 * redisev, workers through nngev. On SIGTERM the listener is closed first,
 * requests in flight are finished (bounded by SHUTDOWN_TIMEOUT), then the
 * process exits 0. Calls common/ only.
 */
#include <event2/buffer.h>
#include <event2/bufferevent_ssl.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <jansson.h>
#include <nng/nng.h>
#include <nng/protocol/reqrep0/req.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "envelope.h"
#include "httputil.h"
#include "log.h"
#include "metrics.h"
#include "net.h"
#include "pgev.h"
#include "redisev.h"
#include "role.h"
#include "wake.h"
#include "xmalloc.h"

#include "api.h"

/* ---- /readyz ---- */

enum check_part { CHECK_PG, CHECK_REDIS, CHECK_WORKERS, CHECK__COUNT };
static const char *const check_names[CHECK__COUNT] = {"postgres", "redis", "workers"};

/* One readiness probe. It lives until the reply is sent and every
 * dependency has answered (a Redis reply may come after the timeout). */
struct ready_check {
    struct api *api;
    struct evhttp_request *req;
    int64_t started_us;
    int pending;
    bool answered;
    unsigned long pg_query;
    const char *result[CHECK__COUNT]; /* NULL: still waiting; "ok" or a reason */
    struct event *timeout;
};

static void
ready_check_release(struct ready_check *rc)
{
    if (rc->answered && rc->pending == 0) {
        event_free(rc->timeout);
        free(rc);
    }
}

static void
ready_check_answer(struct ready_check *rc)
{
    struct api *api = rc->api;
    bool ok = true;
    json_t *checks = json_object();

    if (rc->answered)
        return;
    /* PostgreSQL and the workers are required; without Redis idempotency
     * runs on PostgreSQL alone, and an open breaker only delays payments. */
    bool degraded = false;
    for (int i = 0; i < CHECK__COUNT; i++) {
        const char *r = rc->result[i] ? rc->result[i] : "no answer in time";
        if (strcmp(r, "ok") != 0) {
            if (i == CHECK_REDIS)
                degraded = true;
            else
                ok = false;
        }
        json_object_set_new(checks, check_names[i], json_string(r));
    }
    static const char *const breaker_states[] = {"closed", "open", "half-open"};
    json_t *gateways = json_object();
    const struct shm_segment *seg = api->ctx->seg;
    for (int i = 0; i < SHM_MAX_BREAKERS && seg->breakers[i].provider[0]; i++) {
        uint32_t st = atomic_load(&seg->breakers[i].state);
        degraded = degraded || st != BREAKER_CLOSED;
        json_object_set_new(gateways, seg->breakers[i].provider,
                            json_string(st <= BREAKER_HALF_OPEN ? breaker_states[st] : "unknown"));
    }
    json_object_set_new(checks, "gateways", gateways);
    if (api->ctx->stopping) {
        ok = false;
        json_object_set_new(checks, "api", json_string("shutting down"));
    }
    json_t *root = json_pack("{s:s,s:o}", "status",
                             !ok        ? "unavailable"
                             : degraded ? "degraded"
                                        : "ready",
                             "checks", checks);
    char *body = json_dumps(root, JSON_COMPACT);
    http_reply_json(rc->req, ok ? 200 : 503, body);
    free(body);
    json_decref(root);
    metric_http(role_metrics(api->ctx), MR_READYZ, ok ? 200 : 503,
                (uint64_t)(http_now_us() - rc->started_us));
    rc->answered = true;
    if (rc->result[CHECK_PG] == NULL) {
        pgev_forget(api->pg, rc->pg_query);
        rc->pending--;
    }
    event_del(rc->timeout);
}

static void
ready_check_part(struct ready_check *rc, enum check_part part, const char *result)
{
    rc->result[part] = result;
    rc->pending--;
    if (rc->pending == 0)
        ready_check_answer(rc);
    ready_check_release(rc);
}

static void
ready_on_pg(void *arg, PGresult *res, const char *err)
{
    struct ready_check *rc = arg;
    const char *r = "ok";
    if (!res)
        r = err ? "unavailable" : "no result";
    else if (PQresultStatus(res) != PGRES_TUPLES_OK)
        r = "query failed";
    ready_check_part(rc, CHECK_PG, r);
}

static void
ready_on_redis(void *arg, redisReply *reply)
{
    struct ready_check *rc = arg;
    const char *r = "ok";
    if (!reply)
        r = "connection lost";
    else if (reply->type == REDIS_REPLY_ERROR)
        r = "error reply";
    if (rc->answered) {
        rc->pending--;
        ready_check_release(rc);
        return;
    }
    ready_check_part(rc, CHECK_REDIS, r);
}

static void
ready_on_worker(void *arg, int err, nng_msg *reply)
{
    struct ready_check *rc = arg;
    const char *r = "ok";
    if (err) {
        r = err == NNG_ETIMEDOUT ? "no worker answered" : "worker request failed";
    } else {
        struct envelope env;
        enum envelope_error e = envelope_decode(&env, nng_msg_body(reply), nng_msg_len(reply));
        if (e != ENV_OK || strcmp(env.type, MSG_PONG) != 0)
            r = "bad answer from worker";
        envelope_free(&env);
        nng_msg_free(reply);
    }
    if (rc->answered) {
        rc->pending--;
        ready_check_release(rc);
        return;
    }
    ready_check_part(rc, CHECK_WORKERS, r);
}

static void
ready_on_timeout(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    ready_check_answer(arg);
    ready_check_release(arg);
}

static void
api_readyz(struct api *api, struct evhttp_request *req)
{
    struct ready_check *rc = xcalloc(1, sizeof(*rc));
    const struct config *cfg = &api->ctx->cfg;
    struct envelope_writer w;
    size_t n;

    rc->api = api;
    rc->req = req;
    rc->started_us = http_now_us();
    rc->pending = CHECK__COUNT;
    rc->timeout = evtimer_new(api->ctx->base, ready_on_timeout, rc);
    api_request_begin(api, req);
    struct timeval tv = {(time_t)(cfg->ready_check_timeout_ms / 1000),
                         (suseconds_t)((cfg->ready_check_timeout_ms % 1000) * 1000 + 100000)};
    evtimer_add(rc->timeout, &tv);

    /* Each dependency reports through ready_check_part(); the last one answers. */
    envelope_begin(&w, MSG_PING, NULL, shm_now_ms() + cfg->ready_check_timeout_ms, 0);
    void *bytes = envelope_finish(&w, &n);
    nngev_request(api->ctx->nngev, api->workers, nngev_msg(bytes, n),
                  (int)cfg->ready_check_timeout_ms, ready_on_worker, rc);
    free(bytes);

    const char *ping[1] = {"PING"};
    if (redisev_command(api->redis, ready_on_redis, rc, 1, ping) < 0)
        ready_check_part(rc, CHECK_REDIS, "not connected");

    if (rc->answered || rc->pending == 0)
        return;
    if (pgev_pool_connected(api->pg) == 0)
        ready_check_part(rc, CHECK_PG, "not connected");
    else
        rc->pg_query = pgev_exec(api->pg, "SELECT 1", 0, NULL, ready_on_pg, rc);
}

/* ---- routing ---- */

/* Called by libevent once a deferred response has been written out, so
 * that a stopping api exits only after its last answer left the socket. */
static void
api_request_complete(struct evhttp_request *req, void *arg)
{
    struct api *api = arg;
    (void)req;
    api->inflight--;
    if (api->ctx->stopping && api->inflight == 0) {
        log_info("in-flight requests finished");
        event_base_loopexit(api->ctx->base, NULL);
    }
}

/* Counts a request whose answer comes later (after a database, Redis or
 * worker round trip). */
void
api_request_begin(struct api *api, struct evhttp_request *req)
{
    api->inflight++;
    evhttp_request_set_on_complete_cb(req, api_request_complete, api);
}

static void
api_route(struct evhttp_request *req, void *arg)
{
    struct api *api = arg;
    const char *path = evhttp_uri_get_path(evhttp_request_get_evhttp_uri(req));
    enum evhttp_cmd_type method = evhttp_request_get_command(req);
    int64_t t0 = http_now_us();

    if (!path)
        path = "/";
    size_t header_bytes = 0;
    struct evkeyval *h;
    for (h = evhttp_request_get_input_headers(req)->tqh_first; h; h = h->next.tqe_next)
        header_bytes += strlen(h->key) + strlen(h->value) + 4;
    if (header_bytes > (size_t)api->ctx->cfg.max_header_bytes) {
        metric_http(role_metrics(api->ctx), MR_OTHER, 431, (uint64_t)(http_now_us() - t0));
        http_reply_error(req, 431, "invalid_request_error", "request_headers_too_large",
                         "The request's headers are too large.", NULL);
        return;
    }
    if (strcmp(path, "/healthz") == 0 && (method == EVHTTP_REQ_GET || method == EVHTTP_REQ_HEAD)) {
        http_reply_json(req, 200, "{\"status\":\"ok\"}");
        metric_http(role_metrics(api->ctx), MR_HEALTHZ, 200, (uint64_t)(http_now_us() - t0));
        return;
    }
    if (strcmp(path, "/readyz") == 0 && (method == EVHTTP_REQ_GET || method == EVHTTP_REQ_HEAD)) {
        api_readyz(api, req);
        return;
    }
    if (strncmp(path, "/v1/", 4) == 0) {
        v1_dispatch(api, req);
        return;
    }
    char msg[300];
    snprintf(msg, sizeof(msg),
             "Unrecognized request URL (%.200s). This endpoint is not served "
             "by this version of paymentd.",
             path);
    metric_http(role_metrics(api->ctx), MR_OTHER, 404, (uint64_t)(http_now_us() - t0));
    http_reply_error(req, 404, "invalid_request_error", NULL, msg, NULL);
}

/* Writes the answer of a /v1 request (request.c decides when). */
void
api_write(struct api_req *r, int status, const char *body)
{
    http_reply_json(r->req, status, body);
    metric_http(role_metrics(r->api->ctx), r->mroute, status,
                (uint64_t)(http_now_us() - r->started_us));
    log_debug("%s %d %lld us", r->route, status, (long long)(http_now_us() - r->started_us));
}

/* ---- lifecycle ---- */

static void
api_on_stop_timeout(evutil_socket_t fd, short what, void *arg)
{
    struct api *api = arg;
    (void)fd;
    (void)what;
    log_warn("shutdown timeout: %d requests still in flight are cut off", api->inflight);
    event_base_loopexit(api->ctx->base, NULL);
}

static void
api_on_stop(struct role_ctx *ctx)
{
    struct api *api = ctx->role_data;
    if (api->bound) {
        evhttp_del_accept_socket(api->http, api->bound);
        api->bound = NULL;
    }
    log_info("listener closed; %d requests in flight", api->inflight);
    if (api->inflight == 0) {
        event_base_loopexit(ctx->base, NULL);
        return;
    }
    struct timeval tv = {(time_t)(ctx->cfg.shutdown_timeout_ms / 1000),
                         (suseconds_t)((ctx->cfg.shutdown_timeout_ms % 1000) * 1000)};
    api->stop_timer = evtimer_new(ctx->base, api_on_stop_timeout, api);
    evtimer_add(api->stop_timer, &tv);
}

static int
api_dial_workers(struct api *api)
{
    const struct config *cfg = &api->ctx->cfg;
    char url[256];
    int rv;
    if ((rv = nng_req0_open(&api->workers)) != 0) {
        log_error("cannot open the worker socket: %s", nng_strerror(rv));
        return -1;
    }
    /* A restarted worker is found again within half a second. */
    nng_socket_set_ms(api->workers, NNG_OPT_RECONNMINT, 20);
    nng_socket_set_ms(api->workers, NNG_OPT_RECONNMAXT, 500);
    for (int i = 0; i < cfg->workers; i++) {
        role_url(cfg, ROLE_WORKER, i, url, sizeof(url));
        /* Non-blocking dial: NNG keeps re-dialing a worker that is down. */
        if ((rv = nng_dial(api->workers, url, NULL, NNG_FLAG_NONBLOCK)) != 0) {
            log_error("cannot dial %s: %s", url, nng_strerror(rv));
            return -1;
        }
    }
    return 0;
}

/* ---- TLS ---- */

/* Each accepted connection gets an OpenSSL bufferevent (libevent sets its
 * socket); without TLS_CERT_FILE the api speaks plain HTTP, as behind a
 * proxy that terminates TLS. */
static struct bufferevent *
api_tls_bev(struct event_base *base, void *arg)
{
    SSL *ssl = SSL_new(arg);
    if (!ssl)
        return NULL;
    struct bufferevent *bev = bufferevent_openssl_socket_new(
        base, -1, ssl, BUFFEREVENT_SSL_ACCEPTING, BEV_OPT_CLOSE_ON_FREE | BEV_OPT_DEFER_CALLBACKS);
    if (bev)
        bufferevent_openssl_set_allow_dirty_shutdown(bev, 1);
    return bev;
}

/* TLS 1.2 or newer with the configured certificate chain and key; NULL
 * (with the reason in err) when they cannot be used. */
static SSL_CTX *
api_tls_context(const struct config *cfg, char *err, size_t errlen)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (!ctx || SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) != 1) {
        snprintf(err, errlen, "cannot set up TLS");
        SSL_CTX_free(ctx);
        return NULL;
    }
    SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION |
                                 SSL_OP_CIPHER_SERVER_PREFERENCE);
    if (SSL_CTX_use_certificate_chain_file(ctx, cfg->tls_cert_file) != 1) {
        snprintf(err, errlen, "TLS_CERT_FILE %s: not a readable PEM certificate chain",
                 cfg->tls_cert_file);
        goto fail;
    }
    if (SSL_CTX_use_PrivateKey_file(ctx, cfg->tls_key_file, SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_check_private_key(ctx) != 1) {
        snprintf(err, errlen, "TLS_KEY_FILE %s: not a readable PEM key matching TLS_CERT_FILE",
                 cfg->tls_key_file);
        goto fail;
    }
    return ctx;
fail:
    ERR_clear_error();
    SSL_CTX_free(ctx);
    return NULL;
}

int
api_main(struct role_ctx *ctx)
{
    struct api api = {.ctx = ctx};
    idem_owner_init(&api);
    const struct config *cfg = &ctx->cfg;
    char err[256];
    int fd;

    ctx->role_data = &api;
    ctx->on_stop = api_on_stop;
    SSL_CTX *tls = NULL;
    if (cfg->tls_cert_file && !(tls = api_tls_context(cfg, err, sizeof(err)))) {
        log_error("%s", err);
        return EXIT_ROLE_CONFIG;
    }
    fd = net_listen(cfg->bind_address, cfg->port, true, err, sizeof(err));
    if (fd < 0) {
        log_error("cannot listen: %s", err);
        return EXIT_ROLE_FAILURE;
    }
    if (api_dial_workers(&api) < 0)
        return EXIT_ROLE_FAILURE;
    api.pg = pgev_pool_new(ctx->base, cfg, cfg->db_pool_size);
    api.redis = redisev_new(ctx->base, cfg);
    api.wake = wake_new(cfg);
    api.auth = auth_cache_new();
    api.ratelimit = ratelimit_new(&api);
    api.confirm_wait_ms = cfg->confirm_wait_ms;
    api.http = evhttp_new(ctx->base);
    evhttp_set_gencb(api.http, api_route, &api);
    if (tls)
        evhttp_set_bevcb(api.http, api_tls_bev, tls);
    /* Past MAX_HEADER_BYTES a request answers 431 (api_route); libevent's
     * own bound, four times that, answers 413 without reading further. A
     * body over MAX_BODY_BYTES answers 413; a request not read in full
     * within REQUEST_TIMEOUT_MS is cut off. */
    evhttp_set_max_headers_size(api.http, (ev_ssize_t)cfg->max_header_bytes * 4);
    evhttp_set_max_body_size(api.http, (ev_ssize_t)cfg->max_body_bytes);
    struct timeval request_tv = {(time_t)(cfg->request_timeout_ms / 1000),
                                 (suseconds_t)((cfg->request_timeout_ms % 1000) * 1000)};
    evhttp_set_timeout_tv(api.http, &request_tv);
    evhttp_set_allowed_methods(api.http, EVHTTP_REQ_GET | EVHTTP_REQ_POST | EVHTTP_REQ_HEAD |
                                             EVHTTP_REQ_DELETE);
    api.bound = evhttp_accept_socket_with_handle(api.http, fd);
    if (!api.bound) {
        log_error("cannot accept on port %d", cfg->port);
        return EXIT_ROLE_FAILURE;
    }
    log_info("listening on %s:%d (%s)", cfg->bind_address, cfg->port, tls ? "HTTPS" : "HTTP");
    saga_start(&api);
    role_ready(ctx);
    event_base_dispatch(ctx->base);

    if (api.stop_timer)
        event_free(api.stop_timer);
    evhttp_free(api.http);
    saga_stop(&api);
    nng_close(api.workers);
    redisev_free(api.redis);
    wake_free(api.wake);
    pgev_pool_free(api.pg);
    auth_cache_free(api.auth);
    ratelimit_free(api.ratelimit);
    SSL_CTX_free(tls);
    return 0;
}
