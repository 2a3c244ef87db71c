/*
 * paymentctl - the operator's command-line tool.
 *
 * Offers main(): status, restart ROLE[/INDEX], stop ROLE[/INDEX],
 * start ROLE[/INDEX] and drain go to the supervisor's control socket
 * (REQ/REP, ipc://RUN_DIR/control.ipc); ping ROLE/INDEX asks a worker or
 * the outbox directly. RUN_DIR comes from --run-dir, else the environment,
 * else --config FILE, else ./var/run when it exists (what ./scripts/run
 * uses), else /run/paymentd. A supervisor that is not running or does not
 * answer within 5 s is reported with exit code 1; a bad command line
 * exits 2. Calls envelope, config, NNG (blocking calls: this is a CLI).
 */
#include <getopt.h>
#include <nng/nng.h>
#include <jansson.h>
#include <nng/supplemental/util/platform.h>
#include <nng/protocol/pubsub0/sub.h>
#include <nng/protocol/reqrep0/req.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "ctl_db.h"
#include "envelope.h"
#include "paystate.h"
#include "xmalloc.h"

static void
usage(FILE *out)
{
    fprintf(out, "usage: paymentctl [--run-dir DIR] [--config FILE] COMMAND\n"
                 "commands:\n"
                 "  status                  the role table\n"
                 "  restart ROLE[/INDEX]    restart a role (api, worker, outbox, exporter)\n"
                 "  stop ROLE[/INDEX]       stop a role and keep it down\n"
                 "  start ROLE[/INDEX]      start a stopped or failed role\n"
                 "  drain                   stop intake: api processes finish and stay down\n"
                 "  ping ROLE/INDEX         ping a worker or the outbox over NNG\n"
                 "  intake [--raw]          send an InventoryReserved message, given as JSON on\n"
                 "                          stdin (orderId, amount, currency, customerId,\n"
                 "                          paymentMethod, eventId); --raw sends stdin as is;\n"
                 "                          print the answer as JSON; exit 0 ok, 1 refused,\n"
                 "                          2 no answer within 10 s\n"
                 "  subscribe [TYPE|all] [N] [--after EVENT_ID]\n"
                 "                          print events as JSON lines (every type, or one;\n"
                 "                          stop after N); --after first replays what was\n"
                 "                          sent after that event\n"
                 "  migrate                 apply the database migrations that are missing\n"
                 "  create-account NAME     create an account and print its id\n"
                 "  create-key ACCOUNT      create a secret API key and print it (once)\n"
                 "  revoke-key KEY          revoke a secret API key\n"
                 "  transitions             print the payment state machine's table (Markdown)\n");
}

/* What ./scripts/run writes, relative to the repository's root. */
#define CTL_DEV_CONFIG "var/paymentd.env"

static const char *
ctl_run_dir(const char *opt_dir, const char *config_path)
{
    static char buf[512];
    if (opt_dir)
        return opt_dir;
    if (getenv("RUN_DIR"))
        return getenv("RUN_DIR");
    if (config_path) {
        struct config cfg;
        char err[256];
        if (config_load(&cfg, config_path, err, sizeof(err)) < 0) {
            fprintf(stderr, "paymentctl: %s\n", err);
            exit(2);
        }
        snprintf(buf, sizeof(buf), "%s", cfg.run_dir);
        config_free(&cfg);
        return buf;
    }
    return "/run/paymentd";
}

/* Sends one envelope and waits for the answer; returns the decoded reply. */
static int
ctl_call(const char *url, void *bytes, size_t len, struct envelope *reply, nng_msg **raw)
{
    nng_socket sock;
    int rv;
    if ((rv = nng_req0_open(&sock)) != 0) {
        fprintf(stderr, "paymentctl: %s\n", nng_strerror(rv));
        return -1;
    }
    nng_socket_set_ms(sock, NNG_OPT_RECVTIMEO, 5000);
    nng_socket_set_ms(sock, NNG_OPT_SENDTIMEO, 5000);
    if ((rv = nng_dial(sock, url, NULL, 0)) != 0) {
        fprintf(stderr, "paymentctl: cannot reach %s: %s (is paymentd running?)\n", url,
                nng_strerror(rv));
        nng_close(sock);
        return -1;
    }
    if ((rv = nng_send(sock, bytes, len, 0)) != 0 || (rv = nng_recvmsg(sock, raw, 0)) != 0) {
        fprintf(stderr, "paymentctl: no answer from %s: %s\n", url, nng_strerror(rv));
        nng_close(sock);
        return -1;
    }
    nng_close(sock);
    enum envelope_error e = envelope_decode(reply, nng_msg_body(*raw), nng_msg_len(*raw));
    if (e != ENV_OK) {
        fprintf(stderr, "paymentctl: bad answer: %s\n", envelope_strerror(e));
        envelope_free(reply);
        nng_msg_free(*raw);
        return -1;
    }
    return 0;
}

static void
ctl_print_exit(const msgpack_object *v, char *buf, size_t cap)
{
    if (!v || v->type == MSGPACK_OBJECT_NIL)
        snprintf(buf, cap, "-");
    else if (v->type == MSGPACK_OBJECT_NEGATIVE_INTEGER)
        snprintf(buf, cap, "signal %lld", (long long)-v->via.i64);
    else if (v->type == MSGPACK_OBJECT_POSITIVE_INTEGER)
        snprintf(buf, cap, "code %llu", (unsigned long long)v->via.u64);
    else
        snprintf(buf, cap, "?");
}

static void
ctl_print_uptime(int64_t s, char *buf, size_t cap)
{
    if (s < 120)
        snprintf(buf, cap, "%llds", (long long)s);
    else if (s < 7200)
        snprintf(buf, cap, "%lldm%llds", (long long)(s / 60), (long long)(s % 60));
    else
        snprintf(buf, cap, "%lldh%lldm", (long long)(s / 3600), (long long)(s % 3600 / 60));
}

static void
ctl_print_table(const msgpack_object *body)
{
    const msgpack_object *roles = envelope_get(body, "roles");
    int64_t pid = 0, up = 0;
    char upbuf[32];
    envelope_get_int(body, "supervisor_pid", &pid);
    envelope_get_int(body, "uptime_s", &up);
    ctl_print_uptime(up, upbuf, sizeof(upbuf));
    printf("supervisor pid %lld, up %s\n", (long long)pid, upbuf);
    printf("%-10s %-6s %-8s %-9s %-9s %-8s %s\n", "ROLE", "INDEX", "PID", "STATE", "RESTARTS",
           "UPTIME", "LAST EXIT");
    if (!roles || roles->type != MSGPACK_OBJECT_ARRAY)
        return;
    for (uint32_t i = 0; i < roles->via.array.size; i++) {
        const msgpack_object *r = &roles->via.array.ptr[i];
        char role[32] = "?", state[32] = "?", last[32], pidbuf[16];
        int64_t index = 0, rpid = 0, restarts = 0, uptime = 0;
        envelope_get_str(r, "role", role, sizeof(role));
        envelope_get_str(r, "state", state, sizeof(state));
        envelope_get_int(r, "index", &index);
        envelope_get_int(r, "pid", &rpid);
        envelope_get_int(r, "restarts", &restarts);
        envelope_get_int(r, "uptime_s", &uptime);
        ctl_print_exit(envelope_get(r, "last_exit"), last, sizeof(last));
        ctl_print_uptime(uptime, upbuf, sizeof(upbuf));
        snprintf(pidbuf, sizeof(pidbuf), "%lld", (long long)rpid);
        printf("%-10s %-6lld %-8s %-9s %-9lld %-8s %s\n", role, (long long)index,
               rpid > 0 ? pidbuf : "-", state, (long long)restarts, rpid > 0 ? upbuf : "-", last);
    }
}

static int
ctl_control(const char *run_dir, const char *cmd, const char *target)
{
    char url[600];
    struct envelope_writer w;
    struct envelope reply;
    nng_msg *raw;
    size_t len;
    bool ok = false;
    char message[256] = "";

    snprintf(url, sizeof(url), "ipc://%s/control.ipc", run_dir);
    envelope_begin(&w, MSG_CTL, NULL, 0, target ? 2 : 1);
    envelope_put_str(&w, "cmd", cmd);
    if (target)
        envelope_put_str(&w, "target", target);
    void *bytes = envelope_finish(&w, &len);
    int rc = ctl_call(url, bytes, len, &reply, &raw);
    free(bytes);
    if (rc < 0)
        return 1;
    envelope_get_bool(reply.body, "ok", &ok);
    envelope_get_str(reply.body, "message", message, sizeof(message));
    if (strcmp(cmd, "status") == 0 && ok)
        ctl_print_table(reply.body);
    else
        printf("%s\n", message);
    envelope_free(&reply);
    nng_msg_free(raw);
    return ok ? 0 : 1;
}

static int
ctl_ping(const char *run_dir, const char *target)
{
    char url[600], role[32];
    const char *slash = strchr(target, '/');
    struct envelope_writer w;
    struct envelope reply;
    nng_msg *raw;
    size_t len;
    int64_t pid = 0;

    if (!slash || slash == target || (size_t)(slash - target) >= sizeof(role)) {
        fprintf(stderr, "paymentctl: ping needs ROLE/INDEX, e.g. worker/0\n");
        return 2;
    }
    memcpy(role, target, (size_t)(slash - target));
    role[slash - target] = '\0';
    snprintf(url, sizeof(url), "ipc://%s/%s.%s.ipc", run_dir, role, slash + 1);
    envelope_begin(&w, MSG_PING, NULL, 0, 0);
    void *bytes = envelope_finish(&w, &len);
    int rc = ctl_call(url, bytes, len, &reply, &raw);
    free(bytes);
    if (rc < 0)
        return 1;
    envelope_get_int(reply.body, "pid", &pid);
    printf("pong from %s (pid %lld)\n", target, (long long)pid);
    envelope_free(&reply);
    nng_msg_free(raw);
    return 0;
}

/* How long `intake` waits for its answer in all, and after how long without
 * one NNG's REQ socket sends the message again (a re-sent message for an
 * order that exists answers ok/duplicate, so re-sending is always safe). */
#define CTL_INTAKE_TIMEOUT_MS 10000
#define CTL_INTAKE_RESEND_MS  3000

/* The answer's body as JSON; a string that is not UTF-8 becomes null. */
static json_t *
ctl_json(const msgpack_object *o)
{
    json_t *j;
    switch (o->type) {
    case MSGPACK_OBJECT_BOOLEAN:
        return json_boolean(o->via.boolean);
    case MSGPACK_OBJECT_POSITIVE_INTEGER:
        return json_integer((json_int_t)o->via.u64);
    case MSGPACK_OBJECT_NEGATIVE_INTEGER:
        return json_integer(o->via.i64);
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64:
        return json_real(o->via.f64);
    case MSGPACK_OBJECT_STR:
        j = json_stringn(o->via.str.ptr, o->via.str.size);
        return j ? j : json_null();
    case MSGPACK_OBJECT_ARRAY:
        j = json_array();
        for (uint32_t i = 0; i < o->via.array.size; i++)
            json_array_append_new(j, ctl_json(&o->via.array.ptr[i]));
        return j;
    case MSGPACK_OBJECT_MAP:
        j = json_object();
        for (uint32_t i = 0; i < o->via.map.size; i++) {
            const msgpack_object *k = &o->via.map.ptr[i].key;
            if (k->type == MSGPACK_OBJECT_STR)
                json_object_setn_new(j, k->via.str.ptr, k->via.str.size,
                                     ctl_json(&o->via.map.ptr[i].val));
        }
        return j;
    default:
        return json_null();
    }
}

/* Sends one message to the api's order intake (REQ to INTAKE_URL) and prints
 * its answer, the intake.reply body, as one JSON line. Exit code 0: ok (the
 * payment row is stored); 1: refused (see error, field, retry); 2: no answer
 * within CTL_INTAKE_TIMEOUT_MS, or a bad command line or input. */
static int
ctl_intake(const char *run_dir, const char *config_path, bool raw)
{
    char url[600], err[256];
    struct config cfg;
    static char input[65536];
    size_t n = fread(input, 1, sizeof(input), stdin);
    void *bytes = NULL;
    size_t len = n;
    nng_socket sock = NNG_SOCKET_INITIALIZER;
    nng_msg *answer = NULL;
    struct envelope reply;
    bool ok = false;
    int rv, rc = 2;

    if (config_load(&cfg, config_path, err, sizeof(err)) < 0) {
        fprintf(stderr, "paymentctl: configuration: %s\n", err);
        return 2;
    }
    if (cfg.intake_url)
        snprintf(url, sizeof(url), "%s", cfg.intake_url);
    else
        snprintf(url, sizeof(url), "ipc://%s/intake.ipc", run_dir);
    config_free(&cfg);
    if (!raw) {
        json_error_t jerr;
        json_t *in = json_loadb(input, n, 0, &jerr);
        if (!json_is_object(in)) {
            fprintf(stderr, "paymentctl: intake: stdin must be a JSON object\n");
            json_decref(in);
            return 2;
        }
        struct envelope_writer w;
        const char *k;
        json_t *v;
        envelope_begin(&w, MSG_INVENTORY_RESERVED, NULL, 0, (uint32_t)json_object_size(in));
        json_object_foreach(in, k, v)
        {
            if (json_is_integer(v))
                envelope_put_int(&w, k, json_integer_value(v));
            else if (json_is_string(v))
                envelope_put_str(&w, k, json_string_value(v));
            else {
                envelope_put_key(&w, k);
                msgpack_pack_nil(&w.pk);
            }
        }
        json_decref(in);
        bytes = envelope_finish(&w, &len);
    }
    nng_time deadline = nng_clock() + CTL_INTAKE_TIMEOUT_MS;
    /* A non-blocking dial: an api/0 that is (re)starting is waited for, and
     * NNG re-sends the message on the new connection. */
    if ((rv = nng_req0_open(&sock)) != 0 ||
        (rv = nng_socket_set_ms(sock, NNG_OPT_REQ_RESENDTIME, CTL_INTAKE_RESEND_MS)) != 0 ||
        (rv = nng_socket_set_ms(sock, NNG_OPT_RECONNMAXT, 1000)) != 0 ||
        (rv = nng_socket_set_ms(sock, NNG_OPT_SENDTIMEO, CTL_INTAKE_TIMEOUT_MS)) != 0 ||
        (rv = nng_dial(sock, url, NULL, NNG_FLAG_NONBLOCK)) != 0) {
        fprintf(stderr, "paymentctl: intake at %s: %s\n", url, nng_strerror(rv));
        goto out;
    }
    /* The send waits for a connection, the receive for the answer: both
     * within the one deadline. */
    if ((rv = nng_send(sock, raw ? input : bytes, len, 0)) == 0) {
        nng_time now = nng_clock();
        nng_socket_set_ms(sock, NNG_OPT_RECVTIMEO,
                          now < deadline ? (nng_duration)(deadline - now) : 1);
        rv = nng_recvmsg(sock, &answer, 0);
    }
    if (rv != 0) {
        fprintf(stderr, "paymentctl: intake at %s: no answer within %d s (%s)\n", url,
                CTL_INTAKE_TIMEOUT_MS / 1000, nng_strerror(rv));
        goto out;
    }
    enum envelope_error e = envelope_decode(&reply, nng_msg_body(answer), nng_msg_len(answer));
    if (e == ENV_OK && strcmp(reply.type, MSG_INTAKE_REPLY) == 0 &&
        envelope_get_bool(reply.body, "ok", &ok) == 0) {
        json_t *body = ctl_json(reply.body);
        char *line = json_dumps(body, JSON_COMPACT);
        printf("%s\n", line);
        free(line);
        json_decref(body);
        rc = ok ? 0 : 1;
    } else {
        fprintf(stderr, "paymentctl: intake at %s: bad answer: %s\n", url,
                e != ENV_OK ? envelope_strerror(e) : "not an intake.reply");
    }
    envelope_free(&reply);
out:
    free(bytes);
    if (answer)
        nng_msg_free(answer);
    nng_close(sock);
    return rc;
}

static void
ctl_print_event(const char *event_id, const char *type, const char *json, int len)
{
    printf("{\"event_id\":\"%s\",\"type\":\"%s\",\"event\":%.*s}\n", event_id, type, len, json);
}

/* Prints the events sent after `after`, asking the outbox in batches;
 * returns how many were printed, or -1. */
static long
ctl_replay(const char *run_dir, const char *type, char *after, size_t cap, long count)
{
    char url[600];
    long printed = 0;
    bool more = true;
    snprintf(url, sizeof(url), "ipc://%s/outbox.0.ipc", run_dir);
    while (more) {
        struct envelope_writer w;
        struct envelope reply;
        nng_msg *raw;
        size_t len;
        envelope_begin(&w, MSG_EVENTS_REPLAY, NULL, 0, 1);
        envelope_put_str(&w, "after", after);
        void *bytes = envelope_finish(&w, &len);
        int rc = ctl_call(url, bytes, len, &reply, &raw);
        free(bytes);
        if (rc < 0)
            return -1;
        const msgpack_object *events = envelope_get(reply.body, "events");
        more = false;
        envelope_get_bool(reply.body, "more", &more);
        if (!events || events->type != MSGPACK_OBJECT_ARRAY) {
            fprintf(stderr, "paymentctl: replay refused by the outbox\n");
            envelope_free(&reply);
            nng_msg_free(raw);
            return -1;
        }
        for (uint32_t i = 0; i < events->via.array.size; i++) {
            const msgpack_object *e = &events->via.array.ptr[i];
            char id[ENVELOPE_ID_MAX], etype[120];
            const msgpack_object *ev = envelope_get(e, "event");
            if (envelope_get_str(e, "event_id", id, sizeof(id)) < 0 ||
                envelope_get_str(e, "type", etype, sizeof(etype)) < 0 || !ev ||
                ev->type != MSGPACK_OBJECT_STR)
                continue;
            snprintf(after, cap, "%s", id);
            if (type && strcmp(type, etype) != 0)
                continue;
            if (count > 0 && printed >= count) { /* N events in all, replayed ones included */
                more = false;
                break;
            }
            ctl_print_event(id, etype, ev->via.str.ptr, (int)ev->via.str.size);
            printed++;
        }
        envelope_free(&reply);
        nng_msg_free(raw);
    }
    return printed;
}

/* Prints each event published by the outbox as one JSON line; with after,
 * first the events sent after that id (for a subscriber that was away). */
static int
ctl_subscribe(const char *run_dir, const char *config_path, const char *type, long count,
              const char *after)
{
    char url[600];
    nng_socket sock;
    int rv;
    struct config cfg;
    char err[256];
    if (config_load(&cfg, config_path, err, sizeof(err)) < 0) {
        fprintf(stderr, "paymentctl: configuration: %s\n", err);
        return 2;
    }
    if (cfg.events_url)
        snprintf(url, sizeof(url), "%s", cfg.events_url);
    else
        snprintf(url, sizeof(url), "ipc://%s/events.ipc", run_dir);
    config_free(&cfg);
    if ((rv = nng_sub0_open(&sock)) == 0) {
        /* Find a restarted dispatcher quickly: it waits about a second for us. */
        nng_socket_set_ms(sock, NNG_OPT_RECONNMINT, 20);
        nng_socket_set_ms(sock, NNG_OPT_RECONNMAXT, 200);
        nng_socket_set_int(sock, NNG_OPT_RECVBUF, 8192); /* SUB drops what overflows it */
    }
    if (rv != 0 ||
        (rv = nng_socket_set(sock, NNG_OPT_SUB_SUBSCRIBE, type ? type : "",
                             type ? strlen(type) + 1 : 0)) != 0 ||
        (rv = nng_dial(sock, url, NULL, NNG_FLAG_NONBLOCK)) != 0) {
        fprintf(stderr, "paymentctl: cannot subscribe at %s: %s\n", url, nng_strerror(rv));
        return 1;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    long seen = 0;
    if (after) {
        /* The SUB socket is already dialled: what is published during the
         * replay waits in it (it may come twice: same ids, at least once). */
        char cursor[ENVELOPE_ID_MAX];
        snprintf(cursor, sizeof(cursor), "%s", after);
        long n = ctl_replay(run_dir, type, cursor, sizeof(cursor), count);
        if (n < 0) {
            nng_close(sock);
            return 1;
        }
        seen = n;
    }
    for (; count <= 0 || seen < count;) {
        nng_msg *msg;
        if ((rv = nng_recvmsg(sock, &msg, 0)) != 0) {
            fprintf(stderr, "paymentctl: %s\n", nng_strerror(rv));
            nng_close(sock);
            return 1;
        }
        const char *body = nng_msg_body(msg);
        size_t len = nng_msg_len(msg);
        const char *nul = memchr(body, '\0', len);
        char event_id[80] = "", etype[120] = "";
        struct envelope env;
        enum envelope_error e = nul ? envelope_decode(&env, nul + 1, len - (size_t)(nul + 1 - body))
                                    : ENV_ERR_TRUNCATED;
        const msgpack_object *ev = e == ENV_OK ? envelope_get(env.body, "event") : NULL;
        if (e == ENV_OK && strcmp(env.type, MSG_EVENT) == 0 && ev &&
            ev->type == MSGPACK_OBJECT_STR) {
            envelope_get_str(env.body, "event_id", event_id, sizeof(event_id));
            envelope_get_str(env.body, "type", etype, sizeof(etype));
            ctl_print_event(event_id, etype, ev->via.str.ptr, (int)ev->via.str.size);
            seen++;
        } else {
            fprintf(stderr, "paymentctl: dropped a malformed event message\n");
        }
        if (nul)
            envelope_free(&env);
        nng_msg_free(msg);
    }
    nng_close(sock);
    return 0;
}

/* The state machine's table as the README shows it (common/paystate.c,
 * which `migrate` also writes into the database). */
static int
ctl_transitions(void)
{
    printf("| from | event | to | event written | by | at the gateway |\n"
           "| --- | --- | --- | --- | --- | --- |\n");
    for (size_t i = 0; i < paystate_transitions_count; i++) {
        const struct paystate_transition *t = &paystate_transitions[i];
        printf("| %s | `%s` | %s | %s | %s | %s |\n", t->from[0] ? t->from : "(new)", t->event,
               t->to, t->outbox_event ? t->outbox_event : "-", t->by, t->gateway);
    }
    printf("\nRefunds:\n\n| from | event | to | event written |\n| --- | --- | --- | --- |\n");
    for (size_t i = 0; i < paystate_refund_transitions_count; i++) {
        const struct paystate_refund_transition *t = &paystate_refund_transitions[i];
        printf("| %s | `%s` | %s | %s |\n", t->from[0] ? t->from : "(new)", t->event, t->to,
               t->outbox_event);
    }
    return 0;
}

int
main(int argc, char **argv)
{
    static const struct option opts[] = {{"run-dir", required_argument, NULL, 'd'},
                                         {"config", required_argument, NULL, 'c'},
                                         {"help", no_argument, NULL, 'h'},
                                         {NULL, 0, NULL, 0}};
    const char *opt_dir = NULL, *config_path = NULL;
    int opt;
    while ((opt = getopt_long(argc, argv, "+d:c:h", opts, NULL)) != -1) {
        switch (opt) {
        case 'd':
            opt_dir = optarg;
            break;
        case 'c':
            config_path = optarg;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (optind >= argc) {
        usage(stderr);
        return 2;
    }
    /* After ./scripts/run, from the repository's root, its configuration
     * (database, RUN_DIR) is found without flags. */
    if (!config_path && !opt_dir && !getenv("DATABASE_URL") && !getenv("POSTGRES_HOST") &&
        !getenv("RUN_DIR") && access(CTL_DEV_CONFIG, R_OK) == 0)
        config_path = CTL_DEV_CONFIG; /* never over a database the environment names */
    const char *cmd = argv[optind];
    const char *arg = optind + 1 < argc ? argv[optind + 1] : NULL;
    const char *run_dir = ctl_run_dir(opt_dir, config_path);
    if (strcmp(cmd, "status") == 0 || strcmp(cmd, "drain") == 0) {
        if (arg) {
            usage(stderr);
            return 2;
        }
        return ctl_control(run_dir, cmd, NULL);
    }
    if (strcmp(cmd, "restart") == 0 || strcmp(cmd, "stop") == 0 || strcmp(cmd, "start") == 0) {
        if (!arg || optind + 2 < argc) {
            fprintf(stderr, "paymentctl: %s needs ROLE or ROLE/INDEX\n", cmd);
            return 2;
        }
        return ctl_control(run_dir, cmd, arg);
    }
    if (strcmp(cmd, "ping") == 0 && arg)
        return ctl_ping(run_dir, arg);
    if (strcmp(cmd, "intake") == 0) {
        bool raw = arg && strcmp(arg, "--raw") == 0;
        if ((arg && !raw) || optind + 2 < argc) {
            usage(stderr);
            return 2;
        }
        return ctl_intake(run_dir, config_path, raw);
    }
    if (strcmp(cmd, "subscribe") == 0) {
        long count = 0;
        const char *type = NULL, *after = NULL;
        int positional = 0;
        for (int i = optind + 1; i < argc; i++) {
            if (strcmp(argv[i], "--after") == 0 && i + 1 < argc) {
                after = argv[++i];
            } else if (positional == 0) {
                type = strcmp(argv[i], "all") != 0 ? argv[i] : NULL;
                positional++;
            } else if (positional == 1 && config_parse_int(argv[i], 1, 100000000, &count) == 0) {
                positional++;
            } else {
                fprintf(stderr, "paymentctl: subscribe [TYPE|all] [N] [--after EVENT_ID]\n");
                return 2;
            }
        }
        return ctl_subscribe(run_dir, config_path, type, count, after);
    }
    if (strcmp(cmd, "transitions") == 0)
        return ctl_transitions();
    if (strcmp(cmd, "migrate") == 0 || strcmp(cmd, "create-account") == 0 ||
        strcmp(cmd, "create-key") == 0 || strcmp(cmd, "revoke-key") == 0) {
        struct config cfg;
        char err[512];
        int rc;
        if ((strcmp(cmd, "migrate") == 0) != (arg == NULL) || optind + 2 < argc) {
            usage(stderr);
            return 2;
        }
        if (config_load(&cfg, config_path, err, sizeof(err)) < 0) {
            fprintf(stderr, "paymentctl: configuration: %s\n", err);
            return 2;
        }
        if (strcmp(cmd, "migrate") == 0)
            rc = ctl_migrate(&cfg);
        else if (strcmp(cmd, "create-account") == 0)
            rc = ctl_create_account(&cfg, arg);
        else if (strcmp(cmd, "revoke-key") == 0)
            rc = ctl_revoke_key(&cfg, arg);
        else
            rc = ctl_create_key(&cfg, arg);
        config_free(&cfg);
        return rc;
    }
    fprintf(stderr, "paymentctl: unknown command '%s'\n", cmd);
    usage(stderr);
    return 2;
}
