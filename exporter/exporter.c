/*
 * exporter - the Prometheus exporter role.
 *
 * Offers exporter_main(), run by role_run() in the single exporter process.
 * It serves GET /metrics on METRICS_BIND_ADDRESS:METRICS_PORT in the
 * Prometheus text format, rendered from the shared-memory segment by
 * metrics_render(): it reads, never writes, other processes' slots. A port
 * already in use is reported and the process exits with a failure so that
 * the supervisor retries with back-off. Calls common/ only.
 */
#include <event2/buffer.h>
#include <event2/http.h>
#include <string.h>

#include "httputil.h"
#include "log.h"
#include "metrics.h"
#include "net.h"
#include "role.h"

#ifndef PAYMENTD_VERSION
#define PAYMENTD_VERSION "0.0.0"
#endif
#ifndef PAYMENTD_COMMIT
#define PAYMENTD_COMMIT "unknown"
#endif

static void
exporter_route(struct evhttp_request *req, void *arg)
{
    struct role_ctx *ctx = arg;
    const char *path = evhttp_uri_get_path(evhttp_request_get_evhttp_uri(req));
    int64_t t0 = http_now_us();

    if (!path || strcmp(path, "/metrics") != 0) {
        http_reply_error(req, 404, "invalid_request_error", NULL, "Only /metrics is served here.",
                         NULL);
        metric_http(role_metrics(ctx), MR_OTHER, 404, (uint64_t)(http_now_us() - t0));
        return;
    }
    struct evbuffer *buf = evbuffer_new();
    metrics_render(ctx->seg, PAYMENTD_VERSION, PAYMENTD_COMMIT, buf);
    evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type",
                      "text/plain; version=0.0.4; charset=utf-8");
    evhttp_send_reply(req, 200, "OK", buf);
    evbuffer_free(buf);
    metric_http(role_metrics(ctx), MR_METRICS, 200, (uint64_t)(http_now_us() - t0));
}

int
exporter_main(struct role_ctx *ctx)
{
    const struct config *cfg = &ctx->cfg;
    char err[256];
    int fd = net_listen(cfg->metrics_bind_address, cfg->metrics_port, false, err, sizeof(err));
    if (fd < 0) {
        log_error("cannot serve metrics: %s", err);
        return EXIT_ROLE_FAILURE;
    }
    struct evhttp *http = evhttp_new(ctx->base);
    evhttp_set_gencb(http, exporter_route, ctx);
    evhttp_set_timeout(http, 10);
    evhttp_set_allowed_methods(http, EVHTTP_REQ_GET | EVHTTP_REQ_HEAD);
    if (!evhttp_accept_socket_with_handle(http, fd)) {
        log_error("cannot accept on metrics port %d", cfg->metrics_port);
        return EXIT_ROLE_FAILURE;
    }
    log_info("serving /metrics on %s:%d", cfg->metrics_bind_address, cfg->metrics_port);
    role_ready(ctx);
    event_base_dispatch(ctx->base);
    evhttp_free(http);
    return 0;
}
