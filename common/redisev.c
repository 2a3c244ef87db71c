/*
 * redisev - a Redis connection through hiredis's asynchronous API and its
 * libevent adapter, re-established by itself, where every command with a
 * callback completes within REDIS_TIMEOUT_MS.
 *
 * Offers redisev_new()/redisev_free(), redisev_connected() and
 * redisev_command(). REDIS_HOST is resolved once, in redisev_new() (before
 * the loop runs; a name that does not resolve ends the process with
 * EXIT_ROLE_CONFIG, or EXIT_ROLE_FAILURE when DNS could not answer), and
 * every (re)connect goes to the address, so no reconnect waits for DNS.
 * The connection is opened without blocking and counts as up only once a
 * PING (after AUTH when REDIS_PASSWORD is set) has been answered; on
 * failure or loss it is retried every second, and while it is down every
 * command is refused at once (-1), so callers fall back immediately rather
 * than queueing behind a dead server.
 *
 * hiredis 0.14 (Debian 12) has no command timeout of its own, so each
 * command with a callback joins a FIFO with its deadline and one timer
 * watches the oldest. A reply that is late means the server (or the path
 * to it) is stalled, not that one command is slow: the whole connection
 * is dropped with redisAsyncFree(), which calls every pending callback
 * once with a NULL reply, and the reconnect timer takes over. No reply can
 * come late to a callback, since the connection it would arrive on is
 * gone. The same deadline bounds a connection attempt and its handshake.
 * hiredis frees its context after the disconnect callback, and runs a
 * callback before forgetting it, so nothing here touches the context past
 * those points (STYLE rule 8). Calls hiredis, libevent, config, net, log,
 * shm (clock), xmalloc.
 */
#include "redisev.h"

#include <hiredis/adapters/libevent.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>

#include "log.h"
#include "net.h"
#include "role.h"
#include "shm.h"
#include "xmalloc.h"

#define REDISEV_MAX_ADDRS      4
#define REDISEV_RETRY_MS       1000
#define REDISEV_MIN_CONNECT_MS 1000 /* a connect plus handshake gets at least this */

enum redisev_state {
    REDISEV_DOWN,       /* no context; the retry timer is pending */
    REDISEV_CONNECTING, /* connect and handshake (AUTH, PING) in flight */
    REDISEV_UP          /* PING answered: commands are accepted */
};

/* A command whose callback someone waits for. */
struct redisev_call {
    TAILQ_ENTRY(redisev_call) link;
    struct redisev *r;
    redisev_cb cb;
    void *arg;
    int64_t deadline_ms;
};
TAILQ_HEAD(redisev_calls, redisev_call);

struct redisev {
    struct event_base *base;
    char *host; /* REDIS_HOST as configured, for messages */
    char addrs[REDISEV_MAX_ADDRS][NET_ADDR_MAX];
    int naddrs;
    int addr; /* the address tried now: the next one after a failed connect */
    int port;
    char *password;
    int64_t timeout_ms;
    int64_t connect_timeout_ms;
    redisAsyncContext *ac;
    enum redisev_state state;
    bool closing;
    bool warned;
    struct event *retry;
    struct event *watchdog;       /* fires by the oldest pending deadline */
    struct redisev_calls pending; /* oldest first; deadlines never decrease */
};

static void redisev_connect(struct redisev *r);
static int redisev_send(struct redisev *r, redisev_cb cb, void *arg, int64_t timeout_ms, int argc,
                        const char **argv);

static void
redisev_schedule(struct redisev *r)
{
    struct timeval tv = {REDISEV_RETRY_MS / 1000, (REDISEV_RETRY_MS % 1000) * 1000};
    if (!r->closing)
        evtimer_add(r->retry, &tv);
}

static void
redisev_next_addr(struct redisev *r)
{
    r->addr = (r->addr + 1) % r->naddrs;
}

/* Gives up on the current connection: every pending callback runs once,
 * now, with a NULL reply, and a new connection is tried in a second. Only
 * called from a timer, never from inside a hiredis callback, so the free
 * is immediate. */
static void
redisev_drop(struct redisev *r, const char *why)
{
    redisAsyncContext *ac = r->ac;
    if (!r->warned)
        log_warn("redis %s:%d %s: dropping the connection; commands fall back until it is back",
                 r->host, r->port, why);
    r->warned = true;
    if (r->state == REDISEV_CONNECTING)
        redisev_next_addr(r); /* this address may be the one that does not answer */
    r->ac = NULL;
    r->state = REDISEV_DOWN;
    if (ac)
        redisAsyncFree(ac); /* callbacks see state DOWN: new commands are refused */
    if (!TAILQ_EMPTY(&r->pending))
        abort(); /* hiredis called back every command it held */
    redisev_schedule(r);
}

static void
redisev_arm(struct redisev *r, int64_t in_ms)
{
    if (in_ms < 1)
        in_ms = 1;
    struct timeval tv = {(time_t)(in_ms / 1000), (suseconds_t)((in_ms % 1000) * 1000)};
    evtimer_add(r->watchdog, &tv);
}

static void
redisev_on_watchdog(evutil_socket_t fd, short what, void *arg)
{
    struct redisev *r = arg;
    struct redisev_call *oldest = TAILQ_FIRST(&r->pending);
    (void)fd;
    (void)what;
    if (!oldest)
        return;
    int64_t left = oldest->deadline_ms - shm_mono_ms();
    if (left > 0) {
        redisev_arm(r, left); /* the one it was armed for has been answered */
        return;
    }
    char why[96];
    if (r->state == REDISEV_UP)
        snprintf(why, sizeof(why), "did not answer within %lld ms (REDIS_TIMEOUT_MS)",
                 (long long)r->timeout_ms);
    else
        snprintf(why, sizeof(why), "did not connect and answer PING within %lld ms",
                 (long long)r->connect_timeout_ms);
    redisev_drop(r, why);
}

static void
redisev_on_connect(const redisAsyncContext *ac, int status)
{
    struct redisev *r = ac->data;
    if (status != REDIS_OK) {
        if (!r->warned)
            log_warn("redis %s:%d (%s) unavailable: %s", r->host, r->port, r->addrs[r->addr],
                     ac->errstr);
        r->warned = true;
        r->ac = NULL; /* hiredis frees it, calling the handshake's callbacks with NULL */
        r->state = REDISEV_DOWN;
        redisev_next_addr(r);
        redisev_schedule(r);
    }
    /* Connected: up once the handshake's PING is answered. */
}

static void
redisev_on_disconnect(const redisAsyncContext *ac, int status)
{
    struct redisev *r = ac->data;
    if (r->ac != ac)
        return; /* dropped by redisev_drop(), which has done the rest */
    r->state = REDISEV_DOWN;
    r->ac = NULL;
    if (status != REDIS_OK && !r->closing) {
        log_warn("redis %s:%d connection lost", r->host, r->port);
        r->warned = true;
    }
    redisev_schedule(r);
}

static void
redisev_on_auth(void *arg, redisReply *reply)
{
    struct redisev *r = arg;
    if (reply && reply->type == REDIS_REPLY_ERROR && r->ac) {
        log_warn("redis AUTH refused");
        redisAsyncDisconnect(r->ac);
    }
}

static void
redisev_on_ping(void *arg, redisReply *reply)
{
    struct redisev *r = arg;
    if (!reply || !r->ac)
        return; /* the connection is going away; its owner has seen to that */
    if (reply->type == REDIS_REPLY_ERROR) {
        /* NOAUTH, LOADING and the like: not usable yet. */
        if (!r->warned)
            log_warn("redis %s:%d not ready: %s", r->host, r->port, reply->str);
        r->warned = true;
        redisAsyncDisconnect(r->ac);
        return;
    }
    if (r->warned)
        log_info("redis %s:%d connected", r->host, r->port);
    r->warned = false;
    r->state = REDISEV_UP;
}

static void
redisev_connect(struct redisev *r)
{
    const char *addr = r->addrs[r->addr];
    r->ac = redisAsyncConnect(addr, r->port);
    if (!r->ac) {
        redisev_schedule(r);
        return;
    }
    if (r->ac->err) {
        if (!r->warned)
            log_warn("redis %s:%d (%s) unavailable: %s", r->host, r->port, addr, r->ac->errstr);
        r->warned = true;
        redisAsyncFree(r->ac);
        r->ac = NULL;
        redisev_next_addr(r);
        redisev_schedule(r);
        return;
    }
    r->state = REDISEV_CONNECTING;
    r->ac->data = r;
    redisLibeventAttach(r->ac, r->base);
    redisAsyncSetConnectCallback(r->ac, redisev_on_connect);
    redisAsyncSetDisconnectCallback(r->ac, redisev_on_disconnect);
    /* hiredis queues these until the socket is connected; their deadline
     * bounds the connect as well. */
    if (r->password && *r->password) {
        const char *auth[2] = {"AUTH", r->password};
        redisev_send(r, redisev_on_auth, r, r->connect_timeout_ms, 2, auth);
    }
    const char *ping[1] = {"PING"};
    redisev_send(r, redisev_on_ping, r, r->connect_timeout_ms, 1, ping);
}

static void
redisev_on_retry(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    redisev_connect(arg);
}

struct redisev *
redisev_new(struct event_base *base, const struct config *cfg)
{
    struct redisev *r = xcalloc(1, sizeof(*r));
    char err[256];
    bool transient;

    r->base = base;
    r->host = xstrdup(cfg->redis_host);
    r->port = cfg->redis_port;
    r->password = cfg->redis_password ? xstrdup(cfg->redis_password) : NULL;
    r->timeout_ms = cfg->redis_timeout_ms;
    r->connect_timeout_ms =
        r->timeout_ms > REDISEV_MIN_CONNECT_MS ? r->timeout_ms : REDISEV_MIN_CONNECT_MS;
    /* IPv4 first, the order hiredis itself would have tried. */
    r->naddrs =
        net_resolve(r->host, true, r->addrs, REDISEV_MAX_ADDRS, &transient, err, sizeof(err));
    if (r->naddrs < 0)
        log_fatal(transient ? EXIT_ROLE_FAILURE : EXIT_ROLE_CONFIG,
                  "REDIS_HOST %s cannot be resolved: %s", r->host, err);
    TAILQ_INIT(&r->pending);
    r->retry = evtimer_new(base, redisev_on_retry, r);
    r->watchdog = evtimer_new(base, redisev_on_watchdog, r);
    redisev_connect(r);
    return r;
}

bool
redisev_connected(const struct redisev *r)
{
    return r->state == REDISEV_UP;
}

/* hiredis's callback for every command with a callback: exactly once per
 * command, with the reply or NULL (connection failed, lost or dropped). */
static void
redisev_on_reply(redisAsyncContext *ac, void *reply, void *priv)
{
    struct redisev_call *call = priv;
    struct redisev *r = call->r;
    redisev_cb cb = call->cb;
    void *arg = call->arg;
    (void)ac;
    TAILQ_REMOVE(&r->pending, call, link);
    free(call);
    cb(arg, reply); /* last: it may send another command */
}

static int
redisev_send(struct redisev *r, redisev_cb cb, void *arg, int64_t timeout_ms, int argc,
             const char **argv)
{
    struct redisev_call *call = xmalloc(sizeof(*call));
    call->r = r;
    call->cb = cb;
    call->arg = arg;
    call->deadline_ms = shm_mono_ms() + timeout_ms;
    if (redisAsyncCommandArgv(r->ac, redisev_on_reply, call, argc, argv, NULL) != REDIS_OK) {
        free(call);
        return -1;
    }
    TAILQ_INSERT_TAIL(&r->pending, call, link);
    if (!evtimer_pending(r->watchdog, NULL))
        redisev_arm(r, timeout_ms);
    return 0;
}

int
redisev_command(struct redisev *r, redisev_cb cb, void *arg, int argc, const char **argv)
{
    if (r->state != REDISEV_UP || !r->ac)
        return -1;
    if (!cb) /* fire and forget: nobody waits, so no deadline */
        return redisAsyncCommandArgv(r->ac, NULL, NULL, argc, argv, NULL) == REDIS_OK ? 0 : -1;
    return redisev_send(r, cb, arg, r->timeout_ms, argc, argv);
}

void
redisev_free(struct redisev *r)
{
    r->closing = true;
    r->state = REDISEV_DOWN;
    if (r->ac) {
        redisAsyncContext *ac = r->ac;
        r->ac = NULL;
        /* Pending callbacks run with a NULL reply during the free. */
        redisAsyncFree(ac);
    }
    if (!TAILQ_EMPTY(&r->pending))
        abort();
    event_free(r->watchdog);
    event_free(r->retry);
    free(r->host);
    free(r->password);
    free(r);
}
