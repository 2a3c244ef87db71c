/*
 * idem - idempotent POST requests (the Idempotency-Key header).
 *
 * Offers idem_prepare(), idem_resume() and idem_finish(). The first request under a key
 * claims it, executes, and stores its response, which every later request
 * with the same key gets back byte for byte for 24 h; the same key with other
 * parameters answers 400 idempotency_error; a request arriving while the
 * first is still executing answers 409.
 *
 * Two layers, one truth. Redis holds a fast claim (SET NX PX) and a copy
 * of finished responses, so a replay costs one Redis round trip: the rate
 * limiter's script takes the claim or reads the stored answer in the same
 * call (ratelimit.c), and idem_resume() goes on from what it found. PostgreSQL
 * holds the row that decides: INSERT ... ON CONFLICT DO NOTHING claims the
 * key, and the response is written to that row before it is sent. With
 * Redis down, restarted or flushed every decision is taken from the row,
 * so the outcome is the same. A claim whose owner died is taken over: at
 * once when the owner was an api process of this instance on this host
 * that the role table shows is gone, else once it has been locked for more
 * than IDEM_LOCK_S; when that owner had already created its resource, the
 * new owner answers with that resource instead of creating a second one. Requests refused at
 * validation or by an unavailable database keep no result: the row is removed and the key can be
 * used again. Calls api, pgev, redisev, crypto.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "api.h"
#include "crypto.h"
#include "log.h"
#include "xmalloc.h"

#define IDEM_LOCK_S_TEXT "60"
/* Redis keeps a finished answer for an hour, where retries land (about
 * 1.1 KB a key: ~4 MB per sustained payment/s, against ~95 MB for 24 h);
 * replays after that come from the row in PostgreSQL, which keeps it 24 h. */
#define IDEM_CACHE_MS "3600000"

static void idem_claim_pg(struct api_req *r);

static void
idem_mismatch(struct api_req *r)
{
    char msg[400];
    snprintf(msg, sizeof(msg),
             "Keys for idempotent requests can only be used with the same parameters they were "
             "first used with. Try using a key other than '%.64s' if you meant to execute a "
             "different request.",
             r->idem_key);
    v1_error(r, 400, "idempotency_error", NULL, msg, NULL);
}

static void
idem_conflict(struct api_req *r)
{
    metric_inc(role_metrics(r->api->ctx), MC_IDEMPOTENT_CONFLICTS);
    v1_error(r, 409, "idempotency_error", NULL,
             "There is currently another in-progress request using this Idempotent Key (that "
             "probably means you submitted twice, and the other request is still going "
             "through). Please retry this request later.",
             NULL);
}

static void
idem_replay(struct api_req *r, int status, const char *body)
{
    r->idem_replay = true;
    metric_inc(role_metrics(r->api->ctx), MC_IDEMPOTENT_REPLAYS);
    evhttp_add_header(evhttp_request_get_output_headers(r->req), "Idempotent-Replayed", "true");
    request_send(r, status, body);
}

static void
idem_redis_store(struct api_req *r, int status, const char *body)
{
    if (!redisev_connected(r->api->redis))
        return;
    char *value = xasprintf("D%s%03d%s", r->idem_hash, status, body);
    const char *argv[5] = {"SET", r->idem_redis_key, value, "PX", IDEM_CACHE_MS};
    redisev_command(r->api->redis, NULL, NULL, 5, argv);
    free(value);
}

/* ---- PostgreSQL: the truth ---- */

/* A process's start time in clock ticks since boot (field 22 of
 * /proc/PID/stat), or -1 when there is no such process. */
static long long
idem_proc_start(int pid)
{
    char path[64], buf[1024];
    snprintf(path, sizeof(path), "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    char *p = strrchr(buf, ')'); /* the command name may hold spaces */
    long long start = -1;
    for (int field = 2; p && *p; p++) {
        if (*p == ' ' && ++field == 22) {
            start = strtoll(p + 1, NULL, 10);
            break;
        }
    }
    return start;
}

void
idem_owner_init(struct api *api)
{
    char boot[64] = "unknown";
    FILE *f = fopen("/proc/sys/kernel/random/boot_id", "r");
    if (f) {
        if (!fgets(boot, sizeof(boot), f))
            snprintf(boot, sizeof(boot), "unknown");
        boot[strcspn(boot, "\n")] = '\0';
        fclose(f);
    }
    snprintf(api->owner, sizeof(api->owner), "%s/%d/%lld", boot, (int)getpid(),
             idem_proc_start(getpid()));
}

/* Is the api process that holds a claim certainly gone? Answerable only on
 * the machine (and boot) it ran on: there the process is either missing or
 * another one with the same pid started later. */
static bool
idem_owner_gone(const struct api *api, const char *holder)
{
    const char *slash = strchr(api->owner, '/');
    size_t prefix = slash ? (size_t)(slash - api->owner) + 1 : 0; /* "boot_id/" */
    int pid;
    long long started;
    if (!prefix || strncmp(holder, api->owner, prefix) != 0 ||
        sscanf(holder + prefix, "%d/%lld", &pid, &started) != 2 || pid <= 0 || started < 0)
        return false;
    return idem_proc_start(pid) != started;
}

static void
idem_on_takeover(void *arg, PGresult *res, const char *err)
{
    struct api_req *r = arg;
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK) {
        v1_db_error(r, err);
        return;
    }
    if (PQntuples(res) == 0) {
        idem_conflict(r); /* somebody else took it over first */
        return;
    }
    r->idem_owner = true;
    request_claimed(r);
    if (!PQgetisnull(res, 0, 0)) {
        /* The holder made its resource and died: answer with it as it stands. */
        log_info("idempotency key %s: resuming after an interrupted request", r->idem_key);
        int64_t id = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
        if (strncmp(PQgetvalue(res, 0, 1), "refund", 6) == 0)
            refunds_respond_current(r, id);
        else
            intents_respond_current(r, id);
        return;
    }
    r->handler(r);
}

static void
idem_on_claim(void *arg, PGresult *res, const char *err)
{
    struct api_req *r = arg;
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK) {
        v1_db_error(r, err);
        return;
    }
    if (PQntuples(res) == 0) {
        /* A concurrent claim committed after this statement's snapshot: look again. */
        if (++r->claim_tries < 3) {
            idem_claim_pg(r);
            return;
        }
        idem_conflict(r);
        return;
    }
    r->idem_row = strtoll(PQgetvalue(res, 0, 1), NULL, 10);
    if (strcmp(PQgetvalue(res, 0, 0), "new") == 0) {
        r->idem_owner = true;
        request_claimed(r);
        r->handler(r);
        return;
    }
    if (strcmp(PQgetvalue(res, 0, 2), r->idem_hash) != 0) {
        idem_mismatch(r);
        return;
    }
    if (!PQgetisnull(res, 0, 3)) {
        int status = atoi(PQgetvalue(res, 0, 3));
        const char *body = PQgetvalue(res, 0, 4);
        idem_redis_store(r, status, body); /* Redis lost it: put it back */
        idem_replay(r, status, body);
        return;
    }
    bool locked = strcmp(PQgetvalue(res, 0, 5), "t") == 0;
    const char *holder = PQgetvalue(res, 0, 6);
    if (locked && !idem_owner_gone(r->api, holder)) {
        idem_conflict(r);
        return;
    }
    if (locked)
        log_warn("idempotency key %s: its api process is gone; taking the request over",
                 r->idem_key);
    char row[32];
    snprintf(row, sizeof(row), "%lld", (long long)r->idem_row);
    const char *params[3] = {row, r->holder, holder};
    pgev_exec(r->api->pg,
              "UPDATE idempotency_keys SET locked_at = now(), locked_by = $2 WHERE id = $1"
              " AND response_code IS NULL AND (locked_at IS NULL OR locked_at < now() - "
              "interval '" IDEM_LOCK_S_TEXT " seconds' OR locked_by = $3)"
              " RETURNING resource_id, recovery_point",
              3, params, idem_on_takeover, r);
}

static void
idem_claim_pg(struct api_req *r)
{
    char account[32];
    const char *method = r->method == EVHTTP_REQ_POST ? "POST" : "GET";
    const char *path = evhttp_uri_get_path(evhttp_request_get_evhttp_uri(r->req));
    snprintf(account, sizeof(account), "%lld", (long long)r->account_id);
    const char *params[6] = {account, r->idem_key, method, path, r->idem_hash, r->holder};
    pgev_exec(r->api->pg,
              "WITH ins AS ("
              " INSERT INTO idempotency_keys (account_id, idempotency_key, request_method,"
              "  request_path, request_hash, locked_at, locked_by)"
              " VALUES ($1, $2, $3, $4, decode($5, 'hex'), now(), $6)"
              " ON CONFLICT (account_id, idempotency_key) DO NOTHING RETURNING id)"
              " SELECT 'new', id, NULL, NULL, NULL, NULL, NULL FROM ins"
              " UNION ALL"
              " SELECT 'old', k.id, encode(k.request_hash, 'hex'), k.response_code,"
              "  k.response_body, (k.locked_at IS NOT NULL AND"
              "   k.locked_at > now() - interval '" IDEM_LOCK_S_TEXT " seconds'),"
              "  coalesce(k.locked_by, '')"
              " FROM idempotency_keys k WHERE k.account_id = $1 AND k.idempotency_key = $2"
              "  AND NOT EXISTS (SELECT 1 FROM ins)",
              6, params, idem_on_claim, r);
}

/* ---- Redis: the fast path ---- */

void
idem_prepare(struct api_req *r)
{
    static unsigned long long claims;
    uint8_t hash[32];
    /* The holder names this process and this request: a claim taken over
     * from it fences exactly this request's later writes. */
    snprintf(r->holder, sizeof(r->holder), "%s#%llu", r->api->owner, ++claims);
    char *canon = params_canonical(r->params);
    const char *path = evhttp_uri_get_path(evhttp_request_get_evhttp_uri(r->req));
    char *text = xasprintf("POST %s %s", path, canon);
    crypto_sha256(text, strlen(text), hash);
    crypto_hex(hash, 32, r->idem_hash);
    free(text);
    free(canon);
    crypto_sha256(r->idem_key, strlen(r->idem_key), hash);
    char keyhex[65];
    crypto_hex(hash, 16, keyhex);
    snprintf(r->idem_redis_key, sizeof(r->idem_redis_key), "idem:%lld:%s", (long long)r->account_id,
             keyhex);
}

/* The Redis lock was taken (or tried) in the rate limiter's round trip;
 * what it found decides the way on. */
void
idem_resume(struct api_req *r)
{
    const char *v = r->idem_redis_value;
    size_t len = r->idem_redis_len;
    if (r->idem_redis == IDEM_REDIS_HELD && v && len > 65) {
        if (memcmp(v + 1, r->idem_hash, 64) != 0) {
            idem_mismatch(r);
            return;
        }
        if (v[0] == 'D' && len >= 68) {
            char code[4] = {v[65], v[66], v[67], 0};
            char *body = xstrndup(v + 68, len - 68);
            idem_replay(r, atoi(code), body);
            free(body);
            return;
        }
        /* 'L': claimed and not finished; PostgreSQL knows whether its owner
         * still lives. */
    }
    if (r->idem_claims_itself && r->idem_redis != IDEM_REDIS_HELD) {
        /* A new key, as far as Redis knows (or Redis could not say): the
         * handler's own statement takes the claim, in its transaction. */
        r->idem_deferred = true;
        r->idem_owner = true;
        request_claimed(r);
        r->handler(r);
        return;
    }
    /* Held in Redis, or a route that claims first: PostgreSQL decides. */
    idem_claim_pg(r);
}

char *
idem_claim_json(struct api_req *r)
{
    if (!r->idem_deferred)
        return NULL;
    json_t *c =
        json_pack("{s:s,s:s,s:s,s:s}", "key", r->idem_key, "method", "POST", "path",
                  evhttp_uri_get_path(evhttp_request_get_evhttp_uri(r->req)), "hash", r->idem_hash);
    if (!c)
        abort(); /* the key was checked to be UTF-8 text (v1.c): cannot happen */
    char *text = json_dumps(c, JSON_COMPACT);
    json_decref(c);
    return text;
}

void
idem_claim_taken(struct api_req *r)
{
    r->idem_owner = false;
    r->claim_tries = 0;
    idem_claim_pg(r);
}

void
idem_answered(struct api_req *r, int status, const char *body)
{
    r->idem_owner = false; /* kept already, by the worker */
    idem_redis_store(r, status, body);
    request_send(r, status, body);
}

/* ---- storing the answer ---- */

/* Writing the answer (or releasing a key nothing was done under) outlives
 * the request when the database is away: the client gets its answer at
 * once, and the write is tried again so that the key is not left locked
 * by a process that is no longer working on it. */
#define IDEM_WRITE_TRIES    30
#define IDEM_WRITE_RETRY_MS 2000

struct idem_store {
    struct api_req *r; /* NULL once the answer was sent */
    struct api *api;
    int status;
    char *body;
    char row[32];
    char holder[160];
    bool release;
    int tries;
    struct event *timer;
};

static void idem_write(struct idem_store *st);

static void
idem_store_free(struct idem_store *st)
{
    if (st->timer)
        event_free(st->timer);
    free(st->body);
    free(st);
}

static void
idem_on_write_retry(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    idem_write(arg);
}

static void
idem_on_stored(void *arg, PGresult *res, const char *err)
{
    struct idem_store *st = arg;
    struct api_req *r = st->r;
    bool ok =
        res && (PQresultStatus(res) == PGRES_COMMAND_OK || PQresultStatus(res) == PGRES_TUPLES_OK);
    /* What the key keeps: this answer, or one kept first (the worker's
     * outcome, while this request's CONFIRM_WAIT_MS ran out); none when the
     * claim was taken over meanwhile (the new holder's answer is the key's). */
    bool kept = false;
    if (ok && !st->release) {
        kept = PQntuples(res) == 1 && !PQgetisnull(res, 0, 0);
        if (kept && strcmp(PQgetvalue(res, 0, 1), st->body) != 0) {
            st->status = atoi(PQgetvalue(res, 0, 0));
            free(st->body);
            st->body = xstrdup(PQgetvalue(res, 0, 1));
        } else if (!kept) {
            log_warn("idempotency key row %s: claim taken over; this answer is not kept", st->row);
        }
    }
    if (r) {
        if (kept)
            idem_redis_store(r, st->status, st->body);
        st->r = NULL;
        request_send(r, st->status, st->body);
        request_release(r); /* the store's reference */
    }
    if (ok) {
        if (st->tries > 1)
            log_info("idempotency key row %s: %s after %d tries", st->row,
                     st->release ? "released" : "answer stored", st->tries);
        idem_store_free(st);
        return;
    }
    if (st->tries >= IDEM_WRITE_TRIES) {
        log_error("idempotency key row %s: %s: %s; it is taken over after the lock period", st->row,
                  st->release ? "not released" : "answer not stored",
                  err ? err : PQresultErrorMessage(res));
        idem_store_free(st);
        return;
    }
    if (st->tries == 1)
        log_warn("idempotency key row %s: %s: %s; trying again", st->row,
                 st->release ? "not released" : "answer not stored",
                 err ? err : PQresultErrorMessage(res));
    if (!st->timer)
        st->timer = evtimer_new(st->api->ctx->base, idem_on_write_retry, st);
    struct timeval tv = {IDEM_WRITE_RETRY_MS / 1000, (IDEM_WRITE_RETRY_MS % 1000) * 1000};
    evtimer_add(st->timer, &tv);
}

static void
idem_write(struct idem_store *st)
{
    char code[8];
    st->tries++;
    if (st->release) {
        /* Nothing was done under this key: remove it; if a resource was
         * made after all, unlock it so a retry answers with that. Only
         * while this request still holds the claim. */
        const char *params[2] = {st->row, st->holder};
        pgev_exec(st->api->pg,
                  "WITH d AS (DELETE FROM idempotency_keys WHERE id = $1 AND resource_id IS NULL"
                  "  AND locked_by = $2 RETURNING 1)"
                  " UPDATE idempotency_keys SET locked_at = NULL WHERE id = $1"
                  "  AND resource_id IS NOT NULL AND response_code IS NULL AND locked_by = $2",
                  2, params, idem_on_stored, st);
        return;
    }
    snprintf(code, sizeof(code), "%d", st->status);
    const char *params[4] = {st->row, code, st->body, st->holder};
    pgev_exec(st->api->pg,
              "SELECT code, body FROM idempotency_store($1::bigint, $2::integer, $3, $4)", 4,
              params, idem_on_stored, st);
}

void
idem_finish(struct api_req *r, int status, const char *body)
{
    struct idem_store *st = xcalloc(1, sizeof(*st));
    st->r = r;
    st->api = r->api;
    st->status = status;
    st->body = xstrdup(body);
    st->release = r->not_executed;
    r->idem_owner = false;
    snprintf(st->row, sizeof(st->row), "%lld", (long long)r->idem_row);
    snprintf(st->holder, sizeof(st->holder), "%s", r->holder);
    if (st->release && redisev_connected(r->api->redis)) {
        const char *argv[2] = {"DEL", r->idem_redis_key};
        redisev_command(r->api->redis, NULL, NULL, 2, argv);
    }
    if (r->idem_row == 0) {
        /* A claim its handler would have taken in its own statement, which
         * never committed: no row to write (nothing was done). */
        st->r = NULL;
        request_send(r, status, body);
        request_release(r);
        idem_store_free(st);
        return;
    }
    idem_write(st);
}
