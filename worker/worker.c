/*
 * worker - the gateway role.
 *
 * Offers worker_main(), run by role_run() in each worker process. A worker
 * listens for jobs from the api processes on its own REP socket
 * (ipc://RUN_DIR/worker.N.ipc) and serves them on its libevent loop through
 * nngev, several at once. This version answers the ping job that /readyz
 * sends; gateway jobs arrive with the payments core. SIGTERM stops the loop
 * after the current turn. Calls common/ only.
 */
#include <nng/nng.h>

#include "log.h"
#include "role.h"

int
worker_main(struct role_ctx *ctx)
{
    nng_socket jobs;
    if (role_serve_pings(ctx, &jobs) < 0)
        return EXIT_ROLE_FAILURE;
    role_ready(ctx);
    event_base_dispatch(ctx->base);
    nng_close(jobs);
    return 0;
}
