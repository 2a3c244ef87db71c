/*
 * ratelimit - request rate limits shared by every api process and host.
 *
 * Offers ratelimit_new()/ratelimit_free(), ratelimit_check() and
 * ratelimit_auth_failed(). Limits are fixed windows counted in Redis by one
 * Lua script, so a check and its count are one atomic step and one round
 * trip: per account and route class (writes and reads, per second), per
 * client IP for inbound gateway callbacks (per minute), and per client IP
 * for failed authentications (per minute; past the limit every request from
 * that IP is refused, also with a right key, until the window passes).
 * With Redis unavailable each process counts alone in a small table, with
 * each limit divided by API_PROCESSES, so the service is never unlimited.
 * The script goes by its SHA-1 (EVALSHA), and in full only when Redis
 * answers NOSCRIPT. The callback gets 0 (allowed) or the seconds to wait
 * (429). Calls redisev, shm, OpenSSL.
 */
#include "ratelimit.h"

#include <stdio.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <openssl/sha.h>

#include "api.h"
#include "crypto.h"
#include "metrics.h"
#include "xmalloc.h"

#define RL_LOCAL_SLOTS    4096
#define RL_AUTH_WINDOW_MS 60000

/* KEYS[1]: the client IP's failed-authentication counter; KEYS[2]: the
 * window counter to hit, or "" for none; KEYS[3]: an idempotency key's
 * Redis entry, or "". ARGV: failure limit, failure window ms, hit limit,
 * hit window ms, "fail" to count a failure, the idempotency lock value and
 * its lifetime in ms. Returns {0 | 1 (IP blocked) | 2 (over the limit), ms
 * until the window ends, and when allowed with KEYS[3]: 1 (lock taken) or
 * 2 (held: its value follows)}, so a request's limit and its idempotency
 * claim, or its stored answer, cost one round trip. */
static const char rl_script[] =
    "local f = tonumber(redis.call('GET', KEYS[1]) or '0')\n"
    "if ARGV[5] == 'fail' then\n"
    "  f = redis.call('INCR', KEYS[1])\n"
    "  if f == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end\n"
    "  if f > tonumber(ARGV[1]) then return {1, redis.call('PTTL', KEYS[1])} end\n"
    "  return {0, 0}\n"
    "end\n"
    "if f >= tonumber(ARGV[1]) then return {1, redis.call('PTTL', KEYS[1])} end\n"
    "if KEYS[2] == '' then return {0, 0} end\n"
    "local n = redis.call('INCR', KEYS[2])\n"
    "if n == 1 then redis.call('PEXPIRE', KEYS[2], ARGV[4]) end\n"
    "if n > tonumber(ARGV[3]) then return {2, redis.call('PTTL', KEYS[2])} end\n"
    "if KEYS[3] == '' then return {0, 0} end\n"
    "if redis.call('SET', KEYS[3], ARGV[6], 'NX', 'PX', ARGV[7]) then return {0, 0, 1} end\n"
    "return {0, 0, 2, redis.call('GET', KEYS[3])}\n";

struct rl_slot {
    char key[96];
    int64_t window; /* window index (ms / window length) */
    int64_t count;
};

struct ratelimit {
    struct api *api;
    char sha[41]; /* the script's SHA-1: EVALSHA sends 40 bytes, not the script */
    struct rl_slot slots[RL_LOCAL_SLOTS];
};

struct rl_call {
    struct api_req *r;
    ratelimit_cb cb;
    enum rl_class cls;
    char ip[64];
    char hit[96];
    int64_t hit_limit, hit_window_ms;
    bool fail;
    bool sent_script; /* EVAL after Redis answered NOSCRIPT (restarted or flushed) */
};

struct ratelimit *
ratelimit_new(struct api *api)
{
    struct ratelimit *rl = xcalloc(1, sizeof(*rl));
    uint8_t digest[SHA_DIGEST_LENGTH];
    rl->api = api;
    SHA1((const unsigned char *)rl_script, strlen(rl_script), digest);
    crypto_hex(digest, SHA_DIGEST_LENGTH, rl->sha);
    return rl;
}

void
ratelimit_free(struct ratelimit *rl)
{
    free(rl);
}

static uint64_t
rl_hash(const char *s)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

/* Counts one hit in this process's table; returns the count in the window
 * and sets *left_ms. A collision evicts the older entry (counts restart). */
static int64_t
rl_local_hit(struct ratelimit *rl, const char *key, int64_t window_ms, int64_t add,
             int64_t *left_ms)
{
    int64_t now = shm_now_ms(), window = now / window_ms;
    struct rl_slot *s = &rl->slots[rl_hash(key) % RL_LOCAL_SLOTS];
    if (strcmp(s->key, key) != 0 || s->window != window) {
        snprintf(s->key, sizeof(s->key), "%s", key);
        s->window = window;
        s->count = 0;
    }
    s->count += add;
    *left_ms = (window + 1) * window_ms - now;
    return s->count;
}

static int64_t
rl_share(const struct ratelimit *rl, int64_t limit)
{
    int n = rl->api->ctx->cfg.api_processes;
    return (limit + n - 1) / n;
}

static const enum metric_counter rl_metric[] = {MC_RATE_LIMITED_WRITE, MC_RATE_LIMITED_READ,
                                                MC_RATE_LIMITED_CALLBACK};

static void
rl_finish(struct rl_call *c, int verdict, int64_t ttl_ms)
{
    struct shm_metrics *m = role_metrics(c->r->api->ctx);
    int retry_s = 0;
    if (verdict != 0) {
        retry_s = (int)((ttl_ms + 999) / 1000);
        if (retry_s < 1)
            retry_s = 1;
        metric_inc(m, verdict == 1 ? MC_RATE_LIMITED_AUTH : rl_metric[c->cls]);
    }
    struct api_req *r = c->r;
    ratelimit_cb cb = c->cb;
    free(c);
    cb(r, retry_s);
}

/* Redis unavailable: the same rules with this process's share of each limit. */
static void
rl_local(struct rl_call *c)
{
    struct ratelimit *rl = c->r->api->ratelimit;
    const struct config *cfg = &c->r->api->ctx->cfg;
    char fkey[96];
    int64_t left;
    metric_inc(role_metrics(c->r->api->ctx), MC_RATE_LIMIT_LOCAL);
    c->r->idem_redis = IDEM_REDIS_NONE; /* PostgreSQL alone decides the claim */
    snprintf(fkey, sizeof(fkey), "af:%s", c->ip);
    int64_t fails = rl_local_hit(rl, fkey, RL_AUTH_WINDOW_MS, c->fail ? 1 : 0, &left);
    int64_t flimit = rl_share(rl, cfg->rate_limit_auth_failures);
    if (c->cls == RL_CALLBACK && !c->fail)
        flimit = INT64_MAX; /* see rl_run */
    if (c->fail ? fails > flimit : fails >= flimit) {
        rl_finish(c, 1, left);
        return;
    }
    if (c->fail || !c->hit[0]) {
        rl_finish(c, 0, 0);
        return;
    }
    int64_t n = rl_local_hit(rl, c->hit, c->hit_window_ms, 1, &left);
    rl_finish(c, n > rl_share(rl, c->hit_limit) ? 2 : 0, left);
}

static void rl_run(struct rl_call *c);

static void
rl_on_reply(void *arg, redisReply *reply)
{
    struct rl_call *c = arg;
    request_release(c->r);
    if (reply && reply->type == REDIS_REPLY_ERROR && !c->sent_script &&
        strncmp(reply->str, "NOSCRIPT", 8) == 0) {
        c->sent_script = true; /* Redis does not know it yet: send it once */
        rl_run(c);
        return;
    }
    if (!reply || reply->type != REDIS_REPLY_ARRAY || reply->elements < 2 ||
        reply->element[0]->type != REDIS_REPLY_INTEGER ||
        reply->element[1]->type != REDIS_REPLY_INTEGER) {
        rl_local(c);
        return;
    }
    struct api_req *r = c->r;
    if (reply->elements >= 3 && reply->element[2]->type == REDIS_REPLY_INTEGER) {
        r->idem_redis = reply->element[2]->integer == 1 ? IDEM_REDIS_CLAIMED : IDEM_REDIS_HELD;
        if (reply->elements == 4 && reply->element[3]->type == REDIS_REPLY_STRING) {
            free(r->idem_redis_value);
            r->idem_redis_value = xstrndup(reply->element[3]->str, reply->element[3]->len);
            r->idem_redis_len = reply->element[3]->len;
        }
    }
    rl_finish(c, (int)reply->element[0]->integer, reply->element[1]->integer);
}

static void
rl_run(struct rl_call *c)
{
    struct api *api = c->r->api;
    const struct config *cfg = &api->ctx->cfg;
    char fkey[96], flimit[24], fwindow[24], hlimit[24], hwindow[24];
    snprintf(fkey, sizeof(fkey), "rl:af:%s", c->ip);
    /* Gateway callbacks carry their own credential (a signature) and their
     * own limit: an address blocked for bad API keys (the gateway's may be
     * the same, as on one host) still gets its payments' outcomes. */
    snprintf(flimit, sizeof(flimit), "%d",
             c->cls == RL_CALLBACK && !c->fail ? INT_MAX : cfg->rate_limit_auth_failures);
    snprintf(fwindow, sizeof(fwindow), "%d", RL_AUTH_WINDOW_MS);
    snprintf(hlimit, sizeof(hlimit), "%lld", (long long)c->hit_limit);
    snprintf(hwindow, sizeof(hwindow), "%lld", (long long)c->hit_window_ms);
    char hkey[112] = "", lock[80] = "";
    if (c->hit[0])
        snprintf(hkey, sizeof(hkey), "rl:%s", c->hit);
    /* An idempotent write also takes its key's Redis lock in this call. */
    struct ratelimit *rl = api->ratelimit;
    struct api_req *r = c->r;
    bool idem =
        !c->fail && c->cls == RL_WRITE && r->has_idem && !r->params_failed && r->idem_redis_key[0];
    if (idem)
        snprintf(lock, sizeof(lock), "L%s", r->idem_hash);
    const char *argv[13] = {c->sent_script ? "EVAL" : "EVALSHA",
                            c->sent_script ? rl_script : rl->sha,
                            "3",
                            fkey,
                            hkey,
                            idem ? r->idem_redis_key : "",
                            flimit,
                            fwindow,
                            hlimit,
                            hwindow,
                            c->fail ? "fail" : "check",
                            lock,
                            IDEM_REDIS_LOCK_MS};
    request_hold(c->r);
    if (!redisev_connected(api->redis) ||
        redisev_command(api->redis, rl_on_reply, c, 13, argv) < 0) {
        request_release(c->r);
        rl_local(c);
    }
}

static void
rl_client_ip(struct api_req *r, char *out, size_t cap)
{
    struct evhttp_connection *conn = evhttp_request_get_connection(r->req);
    const char *addr = NULL;
    ev_uint16_t port = 0;
    if (conn)
        evhttp_connection_get_peer(conn, (char **)&addr, &port);
    snprintf(out, cap, "%s", addr && *addr ? addr : "unknown");
}

void
ratelimit_check(struct api_req *r, enum rl_class cls, ratelimit_cb cb)
{
    const struct config *cfg = &r->api->ctx->cfg;
    struct rl_call *c = xcalloc(1, sizeof(*c));
    c->r = r;
    c->cb = cb;
    c->cls = cls;
    rl_client_ip(r, c->ip, sizeof(c->ip));
    int64_t now = shm_now_ms();
    switch (cls) {
    case RL_WRITE:
    case RL_READ:
        c->hit_limit = cls == RL_WRITE ? cfg->rate_limit_writes : cfg->rate_limit_reads;
        c->hit_window_ms = 1000;
        snprintf(c->hit, sizeof(c->hit), "%c:%lld:%lld", cls == RL_WRITE ? 'w' : 'r',
                 (long long)r->account_id, (long long)(now / c->hit_window_ms));
        break;
    case RL_CALLBACK:
        c->hit_limit = cfg->rate_limit_callbacks;
        c->hit_window_ms = 60000;
        snprintf(c->hit, sizeof(c->hit), "cb:%s:%lld", c->ip, (long long)(now / c->hit_window_ms));
        break;
    }
    rl_run(c);
}

void
ratelimit_auth_failed(struct api_req *r, ratelimit_cb cb)
{
    struct rl_call *c = xcalloc(1, sizeof(*c));
    c->r = r;
    c->cb = cb;
    c->fail = true;
    metric_inc(role_metrics(r->api->ctx), MC_AUTH_FAILURES);
    rl_client_ip(r, c->ip, sizeof(c->ip));
    rl_run(c);
}
