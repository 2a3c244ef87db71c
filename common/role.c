/*
 * role - the runtime shared by every role process (api, worker, outbox,
 * exporter).
 *
 * Offers role_run(), which loads the configuration, maps the shared-memory
 * segment, claims the role's slot, sets up the libevent loop with signal
 * events (handlers do no work: libevent turns SIGTERM into a loop callback),
 * a one-second heartbeat in the role table, and the NNG hand-off, then calls
 * the role's entry point. A child notices a dead supervisor twice over: the
 * kernel sends SIGTERM (PR_SET_PDEATHSIG, set before exec by the supervisor)
 * and the heartbeat checks getppid(). Also offers role_ready(),
 * role_answer_ping() and role_serve_pings() for the ping every role answers.
 * Start-up failures exit with EXIT_ROLE_CONFIG (bad configuration or an
 * unusable environment) so that the supervisor does not respawn in a loop.
 * Calls config, log, shm, nngev, envelope, libevent, NNG.
 */
#include "role.h"

#include <errno.h>
#include <nng/nng.h>
#include <nng/protocol/reqrep0/rep.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <unistd.h>

#include "envelope.h"
#include "log.h"
#include "metrics.h"
#include "xmalloc.h"

void
role_url(const struct config *cfg, enum role_kind role, int index, char *buf, size_t cap)
{
    snprintf(buf, cap, "ipc://%s/%s.%d.ipc", cfg->run_dir, shm_role_name(role), index);
}

void
role_events_url(const struct config *cfg, char *buf, size_t cap)
{
    if (cfg->events_url)
        snprintf(buf, cap, "%s", cfg->events_url);
    else
        snprintf(buf, cap, "ipc://%s/events.ipc", cfg->run_dir);
}

void
role_control_url(const struct config *cfg, char *buf, size_t cap)
{
    snprintf(buf, cap, "ipc://%s/control.ipc", cfg->run_dir);
}

void
role_ready(struct role_ctx *ctx)
{
    atomic_store(&ctx->slot->heartbeat_ms, shm_now_ms());
    atomic_store(&ctx->slot->ready, 1);
    log_info("ready");
}

struct shm_metrics *
role_metrics(struct role_ctx *ctx)
{
    return &ctx->slot->metrics;
}

static void
role_on_signal(evutil_socket_t sig, short what, void *arg)
{
    struct role_ctx *ctx = arg;
    (void)what;
    if (sig == SIGPIPE)
        return;
    if (ctx->stopping) {
        log_info("second stop signal: exiting now");
        event_base_loopbreak(ctx->base);
        return;
    }
    ctx->stopping = true;
    atomic_store(&ctx->slot->ready, 0);
    log_info("stopping on signal %d", (int)sig);
    if (ctx->on_stop)
        ctx->on_stop(ctx);
    else
        event_base_loopbreak(ctx->base);
}

static void
role_on_heartbeat(evutil_socket_t fd, short what, void *arg)
{
    struct role_ctx *ctx = arg;
    (void)fd;
    (void)what;
    atomic_store(&ctx->slot->heartbeat_ms, shm_now_ms());
    if (ctx->supervisor_pid && getppid() != ctx->supervisor_pid) {
        log_warn("supervisor %d is gone: exiting", (int)ctx->supervisor_pid);
        exit(0);
    }
}

nng_msg *
role_answer_ping(struct role_ctx *ctx, const void *data, size_t len)
{
    struct envelope env;
    struct envelope_writer w;
    enum envelope_error e = envelope_decode(&env, data, len);
    nng_msg *reply = NULL;

    if (e != ENV_OK) {
        log_warn("dropped message: %s%s%s", envelope_strerror(e), env.field[0] ? ": " : "",
                 env.field);
        metric_inc(role_metrics(ctx), MC_ENVELOPES_REJECTED);
        goto out;
    }
    if (strcmp(env.type, MSG_PING) != 0) {
        log_warn("dropped message: unexpected type %s", env.type);
        metric_inc(role_metrics(ctx), MC_ENVELOPES_REJECTED);
        goto out;
    }
    envelope_begin(&w, MSG_PONG, env.request_id, 0, 4);
    envelope_put_str(&w, "role", shm_role_name(ctx->role));
    envelope_put_int(&w, "index", ctx->index);
    envelope_put_int(&w, "pid", getpid());
    envelope_put_str(&w, "ping_id", env.id);
    size_t n;
    void *bytes = envelope_finish(&w, &n);
    reply = nngev_msg(bytes, n);
    free(bytes);
    metric_inc(role_metrics(ctx), MC_NNG_PINGS_ANSWERED);
out:
    envelope_free(&env);
    return reply;
}

static void
role_on_ping(void *arg, struct nngev_job *job, nng_msg *req)
{
    struct role_ctx *ctx = arg;
    nng_msg *reply = role_answer_ping(ctx, nng_msg_body(req), nng_msg_len(req));
    nng_msg_free(req);
    nngev_respond(job, reply);
}

int
role_serve_pings(struct role_ctx *ctx, nng_socket *sock)
{
    char url[256];
    int rv;
    role_url(&ctx->cfg, ctx->role, ctx->index, url, sizeof(url));
    if ((rv = nng_rep0_open(sock)) != 0 || (rv = nng_listen(*sock, url, NULL, 0)) != 0) {
        log_error("cannot listen at %s: %s", url, nng_strerror(rv));
        return -1;
    }
    nngev_serve(ctx->nngev, *sock, 4, role_on_ping, ctx);
    return 0;
}

/* Every connection is a descriptor: take all the hard limit allows, as
 * nginx does with worker_rlimit_nofile. */
void
role_raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

int
role_run(enum role_kind role, int index, const char *config_path)
{
    static struct role_ctx ctx; /* lives as long as the process */
    char err[512];
    const char *slot_env = getenv("PAYMENTD_SLOT");
    const char *sup_env = getenv("PAYMENTD_SUPERVISOR_PID");
    int rc;

    log_init(shm_role_name(role), index);
    ctx.role = role;
    ctx.index = index;
    if (config_load(&ctx.cfg, config_path, err, sizeof(err)) < 0)
        log_fatal(EXIT_ROLE_CONFIG, "configuration: %s", err);
    log_set_level(ctx.cfg.log_level);
    if (sup_env) {
        ctx.supervisor_pid = (pid_t)atoi(sup_env);
        /* The supervisor may have died between fork and here. */
        if (getppid() != ctx.supervisor_pid)
            exit(0);
    }
    ctx.seg = shm_attach(ctx.cfg.instance, ctx.supervisor_pid == 0, err, sizeof(err));
    if (!ctx.seg)
        log_fatal(EXIT_ROLE_CONFIG, "%s", err);
    int slot = -1;
    if (slot_env) {
        long v;
        if (config_parse_int(slot_env, 0, SHM_MAX_SLOTS - 1, &v) < 0)
            log_fatal(EXIT_ROLE_CONFIG, "PAYMENTD_SLOT must be a slot number");
        slot = (int)v;
    } else {
        slot = shm_slot_claim(ctx.seg, role, index);
        if (slot < 0)
            log_fatal(EXIT_ROLE_CONFIG, "no free slot in the role table");
        atomic_store(&ctx.seg->slots[slot].pid, getpid());
        atomic_store(&ctx.seg->slots[slot].started_ms, shm_now_ms());
        atomic_store(&ctx.seg->slots[slot].state, SLOT_STARTING);
    }
    ctx.slot = &ctx.seg->slots[slot];
    atomic_store(&ctx.slot->ready, 0);
    atomic_store(&ctx.slot->heartbeat_ms, shm_now_ms());

    role_raise_nofile();
    ctx.base = event_base_new();
    if (!ctx.base)
        log_fatal(EXIT_ROLE_FAILURE, "cannot create an event loop");
    ctx.nngev = nngev_new(ctx.base);
    ctx.sig_term = evsignal_new(ctx.base, SIGTERM, role_on_signal, &ctx);
    ctx.sig_int = evsignal_new(ctx.base, SIGINT, role_on_signal, &ctx);
    ctx.sig_pipe = evsignal_new(ctx.base, SIGPIPE, role_on_signal, &ctx);
    evsignal_add(ctx.sig_term, NULL);
    evsignal_add(ctx.sig_int, NULL);
    evsignal_add(ctx.sig_pipe, NULL);
    ctx.heartbeat = event_new(ctx.base, -1, EV_PERSIST, role_on_heartbeat, &ctx);
    struct timeval one = {1, 0};
    event_add(ctx.heartbeat, &one);

    log_info("starting");
    switch (role) {
    case ROLE_API:
        rc = api_main(&ctx);
        break;
    case ROLE_WORKER:
        rc = worker_main(&ctx);
        break;
    case ROLE_OUTBOX:
        rc = outbox_main(&ctx);
        break;
    case ROLE_EXPORTER:
        rc = exporter_main(&ctx);
        break;
    default:
        log_fatal(EXIT_ROLE_CONFIG, "role %s cannot run as a child", shm_role_name(role));
    }
    atomic_store(&ctx.slot->ready, 0);
    if (!slot_env) {
        atomic_store(&ctx.slot->state, SLOT_STOPPED);
        atomic_store(&ctx.slot->pid, 0);
    }
    nngev_free(ctx.nngev);
    event_free(ctx.sig_term);
    event_free(ctx.sig_int);
    event_free(ctx.sig_pipe);
    event_free(ctx.heartbeat);
    event_base_free(ctx.base);
    shm_detach(ctx.seg);
    config_free(&ctx.cfg);
    log_info("stopped");
    return rc;
}
