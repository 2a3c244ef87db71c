/*
 * control - the supervisor's control socket, REQ/REP at
 * ipc://RUN_DIR/control.ipc, spoken by paymentctl.
 *
 * Offers control_start() and control_stop(). Each request is a ctl.request
 * envelope {cmd, target}; commands come from a table: status, restart,
 * stop, start (target ROLE or ROLE/INDEX) and drain. Anything else, or a
 * malformed envelope, gets an error reply and a log line; the supervisor
 * keeps running. Every reply is a ctl.reply {ok, message, roles[]} with the
 * role table. The socket's directory is private to the service user, which
 * is the access control. Calls supervisor, envelope, nngev, NNG.
 */
#include <nng/nng.h>
#include <nng/protocol/reqrep0/rep.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "envelope.h"
#include "log.h"
#include "role.h"
#include "supervisor.h"

static nng_socket control_sock;
static bool control_open;

/* Matches "ROLE" or "ROLE/INDEX"; returns the number of children matched. */
static int
control_match(struct supervisor *s, const char *target, struct child **out, int cap)
{
    char role_name[32];
    enum role_kind role;
    long index = -1;
    const char *slash = strchr(target, '/');
    size_t len = slash ? (size_t)(slash - target) : strlen(target);
    int n = 0;

    if (len == 0 || len >= sizeof(role_name))
        return 0;
    memcpy(role_name, target, len);
    role_name[len] = '\0';
    if (shm_role_parse(role_name, &role) < 0 || role == ROLE_SUPERVISOR)
        return 0;
    if (slash && config_parse_int(slash + 1, 0, SHM_MAX_SLOTS, &index) < 0)
        return 0;
    for (int i = 0; i < s->nchildren && n < cap; i++) {
        struct child *c = &s->children[i];
        if (c->role == role && (index < 0 || c->index == index))
            out[n++] = c;
    }
    return n;
}

static void
control_pack_roles(struct supervisor *s, struct envelope_writer *w)
{
    envelope_put_key(w, "roles");
    msgpack_pack_array(&w->pk, (size_t)s->nchildren);
    for (int i = 0; i < s->nchildren; i++) {
        struct child *c = &s->children[i];
        struct shm_slot *slot = &s->seg->slots[c->slot];
        msgpack_pack_map(&w->pk, 7);
        envelope_pack_str(&w->pk, "role");
        envelope_pack_str(&w->pk, shm_role_name(c->role));
        envelope_pack_str(&w->pk, "index");
        msgpack_pack_int(&w->pk, c->index);
        envelope_pack_str(&w->pk, "pid");
        msgpack_pack_int(&w->pk, c->pid);
        envelope_pack_str(&w->pk, "state");
        envelope_pack_str(&w->pk, shm_state_name(c->state));
        envelope_pack_str(&w->pk, "restarts");
        msgpack_pack_uint32(&w->pk, atomic_load(&slot->restarts));
        envelope_pack_str(&w->pk, "uptime_s");
        msgpack_pack_int64(&w->pk, supervisor_uptime_s(c));
        envelope_pack_str(&w->pk, "last_exit");
        int32_t le = atomic_load(&slot->last_exit);
        if (le == SHM_EXIT_NONE)
            msgpack_pack_nil(&w->pk);
        else
            msgpack_pack_int32(&w->pk, le);
    }
}

static nng_msg *
control_reply(struct supervisor *s, const char *request_id, bool ok, const char *message)
{
    struct envelope_writer w;
    size_t n;
    envelope_begin(&w, MSG_CTL_REPLY, request_id, 0, 5);
    envelope_put_bool(&w, "ok", ok);
    envelope_put_str(&w, "message", message);
    envelope_put_int(&w, "supervisor_pid", getpid());
    envelope_put_int(&w, "uptime_s", (shm_mono_ms() - s->started_mono) / 1000);
    control_pack_roles(s, &w);
    void *bytes = envelope_finish(&w, &n);
    nng_msg *m = nngev_msg(bytes, n);
    free(bytes);
    return m;
}

typedef void (*control_action)(struct supervisor *, struct child *);

static const struct {
    const char *cmd;
    control_action action; /* NULL: no target */
    const char *done;
} control_commands[] = {
    {"status", NULL, "ok"},
    {"drain", NULL, "draining: api processes stop after their requests"},
    {"restart", supervisor_restart_child, "restarting"},
    {"stop", supervisor_stop_child, "stopping"},
    {"start", supervisor_start_child, "starting"},
};

static nng_msg *
control_handle(struct supervisor *s, const void *data, size_t len)
{
    struct envelope env;
    char cmd[32], target[64] = "", msg[160];
    enum envelope_error e = envelope_decode(&env, data, len);
    nng_msg *reply;

    if (e != ENV_OK) {
        log_warn("control: dropped message: %s %s", envelope_strerror(e), env.field);
        snprintf(msg, sizeof(msg), "bad request: %s", envelope_strerror(e));
        reply = control_reply(s, "", false, msg);
        goto out;
    }
    if (strcmp(env.type, MSG_CTL) != 0 || envelope_get_str(env.body, "cmd", cmd, sizeof(cmd)) < 0) {
        log_warn("control: request without a command");
        reply = control_reply(s, env.request_id, false, "bad request: cmd missing");
        goto out;
    }
    if (envelope_get(env.body, "target") &&
        envelope_get_str(env.body, "target", target, sizeof(target)) < 0) {
        reply = control_reply(s, env.request_id, false, "bad request: target is not a string");
        goto out;
    }
    for (size_t i = 0; i < sizeof(control_commands) / sizeof(control_commands[0]); i++) {
        if (strcmp(cmd, control_commands[i].cmd) != 0)
            continue;
        if (s->phase != RUNNING && strcmp(cmd, "status") != 0) {
            reply = control_reply(s, env.request_id, false, "the service is shutting down");
            goto out;
        }
        if (!control_commands[i].action) {
            if (strcmp(cmd, "drain") == 0)
                supervisor_drain(s);
            reply = control_reply(s, env.request_id, true, control_commands[i].done);
            goto out;
        }
        struct child *matched[SHM_MAX_SLOTS];
        int n = control_match(s, target, matched, SHM_MAX_SLOTS);
        if (n == 0) {
            snprintf(msg, sizeof(msg),
                     "no role matches '%.40s' (use api, worker, outbox or exporter, optionally "
                     "with /INDEX)",
                     target);
            reply = control_reply(s, env.request_id, false, msg);
            goto out;
        }
        for (int k = 0; k < n; k++)
            control_commands[i].action(s, matched[k]);
        log_info("control: %s %s (%d processes)", cmd, target, n);
        snprintf(msg, sizeof(msg), "%s %s (%d process%s)", control_commands[i].done, target, n,
                 n == 1 ? "" : "es");
        reply = control_reply(s, env.request_id, true, msg);
        goto out;
    }
    snprintf(msg, sizeof(msg), "unknown command '%.32s'", cmd);
    reply = control_reply(s, env.request_id, false, msg);
out:
    envelope_free(&env);
    return reply;
}

static void
control_on_request(void *arg, struct nngev_job *job, nng_msg *req)
{
    struct supervisor *s = arg;
    nng_msg *reply = control_handle(s, nng_msg_body(req), nng_msg_len(req));
    nng_msg_free(req);
    nngev_respond(job, reply);
}

int
control_start(struct supervisor *s)
{
    char url[300];
    int rv;
    role_control_url(&s->cfg, url, sizeof(url));
    if ((rv = nng_rep0_open(&control_sock)) != 0 ||
        (rv = nng_listen(control_sock, url, NULL, 0)) != 0) {
        log_error("control socket %s: %s", url, nng_strerror(rv));
        return -1;
    }
    control_open = true;
    nngev_serve(s->nngev, control_sock, 2, control_on_request, s);
    return 0;
}

void
control_stop(void)
{
    if (control_open)
        nng_close(control_sock);
    control_open = false;
}
