/*
 * outbox - the event publishing and maintenance role.
 *
 * Offers outbox_main(), run by role_run() in the single outbox process. It
 * runs its libevent loop, heartbeats through the role runtime and answers
 * pings on ipc://RUN_DIR/outbox.0.ipc so that operators and tests can check
 * it is alive. Publishing outbox rows and the maintenance sweeps arrive with
 * the outbox issue. Calls common/ only.
 */
#include <nng/nng.h>

#include "log.h"
#include "role.h"

int
outbox_main(struct role_ctx *ctx)
{
    nng_socket sock;
    if (role_serve_pings(ctx, &sock) < 0)
        return EXIT_ROLE_FAILURE;
    role_ready(ctx);
    event_base_dispatch(ctx->base);
    nng_close(sock);
    return 0;
}
