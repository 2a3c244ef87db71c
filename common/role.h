/* role: the runtime every role process shares; see role.c. */
#ifndef PAYMENTD_ROLE_H
#define PAYMENTD_ROLE_H

#include <event2/event.h>
#include <nng/nng.h>
#include <stdbool.h>

#include "config.h"
#include "nngev.h"
#include "shm.h"

/* Exit codes understood by the supervisor. */
#define EXIT_ROLE_FAILURE 1 /* crashed or could not serve: restart with back-off */
#define EXIT_ROLE_CONFIG  2 /* bad configuration or environment: do not respawn */

struct role_ctx {
    struct config cfg;
    enum role_kind role;
    int index;
    struct shm_segment *seg;
    struct shm_slot *slot;
    struct event_base *base;
    struct nngev *nngev;
    pid_t supervisor_pid; /* 0 when started alone */
    bool stopping;
    /* Set by the role: called once on SIGTERM/SIGINT (default: loopbreak). */
    void (*on_stop)(struct role_ctx *ctx);
    void *role_data;
    struct event *sig_term, *sig_int, *sig_pipe, *heartbeat;
};

/* Entry points, one per role, each in its own folder. */
int api_main(struct role_ctx *ctx);
int worker_main(struct role_ctx *ctx);
int outbox_main(struct role_ctx *ctx);
int exporter_main(struct role_ctx *ctx);

/* Runs a role process: configuration from the environment (set by the
 * supervisor) or config_path, shared memory, loop, heartbeat, signals. */
int role_run(enum role_kind role, int index, const char *config_path);

/* Raises the open-file limit to the hard limit. */
void role_raise_nofile(void);

/* Marks the role ready in the role table. */
void role_ready(struct role_ctx *ctx);
struct shm_metrics *role_metrics(struct role_ctx *ctx);

/* ipc:// URL of a role's own REP socket. */
void role_url(const struct config *cfg, enum role_kind role, int index, char *buf, size_t cap);
void role_control_url(const struct config *cfg, char *buf, size_t cap);
/* Where the outbox publishes events: EVENTS_URL, or ipc://RUN_DIR/events.ipc. */
void role_events_url(const struct config *cfg, char *buf, size_t cap);

/* Answers a ping envelope with a pong naming this process; NULL for anything else. */
nng_msg *role_answer_ping(struct role_ctx *ctx, const void *data, size_t len);

/* Serves pings on a REP socket listening at this role's own URL. */
int role_serve_pings(struct role_ctx *ctx, nng_socket *sock);

#endif
