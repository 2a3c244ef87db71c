/*
 * redisev - a Redis connection through hiredis's asynchronous API and its
 * libevent adapter, re-established by itself.
 *
 * Offers redisev_new()/redisev_free(), redisev_connected() and
 * redisev_command(). The connection is opened without blocking; on failure
 * or loss it is retried every second, and while it is down every command
 * is refused at once (-1), so callers fall back immediately rather than
 * queueing behind a dead server. hiredis frees its context after the
 * disconnect callback, so nothing here touches it after that point. With
 * REDIS_PASSWORD set, AUTH is the first command on every connection.
 * Calls hiredis, libevent, config, log, xmalloc.
 */
#include "redisev.h"

#include <hiredis/adapters/libevent.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "xmalloc.h"

struct redisev {
    struct event_base *base;
    char *host;
    int port;
    char *password;
    redisAsyncContext *ac;
    bool connected;
    bool closing;
    bool warned;
    struct event *retry;
};

static void redisev_connect(struct redisev *r);

static void
redisev_schedule(struct redisev *r)
{
    struct timeval tv = {1, 0};
    if (!r->closing)
        evtimer_add(r->retry, &tv);
}

static void
redisev_on_connect(const redisAsyncContext *ac, int status)
{
    struct redisev *r = ac->data;
    if (status != REDIS_OK) {
        if (!r->warned)
            log_warn("redis %s:%d unavailable: %s", r->host, r->port, ac->errstr);
        r->warned = true;
        r->ac = NULL; /* hiredis frees it */
        redisev_schedule(r);
        return;
    }
    if (r->warned)
        log_info("redis %s:%d connected", r->host, r->port);
    r->warned = false;
    r->connected = true;
}

static void
redisev_on_disconnect(const redisAsyncContext *ac, int status)
{
    struct redisev *r = ac->data;
    r->connected = false;
    r->ac = NULL;
    if (status != REDIS_OK && !r->closing) {
        log_warn("redis %s:%d connection lost", r->host, r->port);
        r->warned = true;
    }
    redisev_schedule(r);
}

static void
redisev_on_auth(redisAsyncContext *ac, void *reply, void *priv)
{
    redisReply *rep = reply;
    (void)priv;
    if (!rep || rep->type == REDIS_REPLY_ERROR) {
        log_warn("redis AUTH refused");
        redisAsyncDisconnect(ac);
    }
}

static void
redisev_connect(struct redisev *r)
{
    r->ac = redisAsyncConnect(r->host, r->port);
    if (!r->ac) {
        redisev_schedule(r);
        return;
    }
    if (r->ac->err) {
        if (!r->warned)
            log_warn("redis %s:%d unavailable: %s", r->host, r->port, r->ac->errstr);
        r->warned = true;
        redisAsyncFree(r->ac);
        r->ac = NULL;
        redisev_schedule(r);
        return;
    }
    r->ac->data = r;
    redisLibeventAttach(r->ac, r->base);
    redisAsyncSetConnectCallback(r->ac, redisev_on_connect);
    redisAsyncSetDisconnectCallback(r->ac, redisev_on_disconnect);
    if (r->password && *r->password) {
        const char *argv[2] = {"AUTH", r->password};
        redisAsyncCommandArgv(r->ac, redisev_on_auth, NULL, 2, argv, NULL);
    }
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
    r->base = base;
    r->host = xstrdup(cfg->redis_host);
    r->port = cfg->redis_port;
    r->password = cfg->redis_password ? xstrdup(cfg->redis_password) : NULL;
    r->retry = evtimer_new(base, redisev_on_retry, r);
    redisev_connect(r);
    return r;
}

bool
redisev_connected(const struct redisev *r)
{
    return r->connected;
}

struct redisev_call {
    redisev_cb cb;
    void *arg;
};

static void
redisev_on_reply(redisAsyncContext *ac, void *reply, void *priv)
{
    struct redisev_call *call = priv;
    (void)ac;
    call->cb(call->arg, reply);
    free(call);
}

int
redisev_command(struct redisev *r, redisev_cb cb, void *arg, int argc, const char **argv)
{
    if (!r->connected || !r->ac)
        return -1;
    if (!cb) /* fire and forget */
        return redisAsyncCommandArgv(r->ac, NULL, NULL, argc, argv, NULL) == REDIS_OK ? 0 : -1;
    struct redisev_call *call = xmalloc(sizeof(*call));
    call->cb = cb;
    call->arg = arg;
    if (redisAsyncCommandArgv(r->ac, redisev_on_reply, call, argc, argv, NULL) != REDIS_OK) {
        free(call);
        return -1;
    }
    return 0;
}

void
redisev_free(struct redisev *r)
{
    r->closing = true;
    if (r->ac) {
        /* Pending callbacks run with a NULL reply during the free. */
        redisAsyncFree(r->ac);
        r->ac = NULL;
    }
    event_free(r->retry);
    free(r->host);
    free(r->password);
    free(r);
}
