/*
 * pgev - PostgreSQL access that never blocks an event loop.
 *
 * Offers pgev_pool_new()/pgev_pool_free(), pgev_query(), pgev_exec(),
 * pgev_forget() and pgev_pool_connected(). pgev_exec() runs a statement
 * whose text is a string literal as a prepared statement: it is prepared on
 * each connection the first time that connection runs it (and again after a
 * reconnect), so the server parses and plans it once, not per call. A pool owns a few libpq
 * connections in non-blocking mode; each runs one query at a time, driven by libevent read/write
 * events on its socket. Queries wait in one FIFO queue and go to the first idle connection. A
 * broken connection fails its query with an error (never a hang), is closed, and is re-opened with
 * a doubling delay (100 ms to 5 s); a query that waits in the queue longer than DB_QUEUE_TIMEOUT_MS
 * (no connection up, or too much load) fails, so callers answer 503 quickly instead of piling up.
 * Host names are resolved by libpq during connect: give POSTGRES_HOST as an address when that
 * lookup must not stall. Calls libpq, libevent, config, log, xmalloc.
 */
#include "pgev.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>

#include "log.h"
#include "shm.h"
#include "xmalloc.h"

#define PGEV_QUEUE_MAX    20000
#define PGEV_RETRY_MIN_MS 100
#define PGEV_RETRY_MAX_MS 5000

#define PGEV_MAX_PREPARED 64

struct pgev_query {
    TAILQ_ENTRY(pgev_query) link;
    unsigned long id;
    int stmt; /* index of a prepared statement, or -1 */
    char *sql;
    int nparams;
    char **params;
    pgev_cb cb;
    void *arg;
    bool forgotten;
    int64_t queued_ms;
};
TAILQ_HEAD(pgev_qlist, pgev_query);

enum conn_state { CONN_DOWN, CONN_CONNECTING, CONN_IDLE, CONN_BUSY };

struct pgev_conn {
    struct pgev_pool *pool;
    PGconn *pg;
    enum conn_state state;
    struct event *ev;    /* socket readiness, re-made when the socket changes */
    struct event *retry; /* reconnect timer */
    int sock;
    int retry_ms;
    struct pgev_query *q;
    PGresult *last;
    uint64_t prepared; /* bit n: statement n is prepared on this connection */
    bool preparing;    /* the PREPARE of q's statement is in flight */
};

struct pgev_pool {
    struct event_base *base;
    const char *keys[16];
    const char *vals[16];
    int size;
    struct pgev_conn *conns;
    struct pgev_qlist queue;
    int queued;
    unsigned long next_id;
    struct event *sweep; /* fails queries that waited too long */
    bool closing;
    int64_t queue_timeout_ms;
    const char *statements[PGEV_MAX_PREPARED]; /* static SQL, by statement index */
    int nstatements;
    const char *init_sql; /* run first on every new connection (LISTEN ...) */
    pgev_notify_cb notify_cb;
    void *notify_arg;
};

static void pgev_conn_start(struct pgev_conn *c);
static void pgev_on_socket(evutil_socket_t fd, short what, void *arg);
static void pgev_dispatch(struct pgev_pool *pool);
static void pgev_send(struct pgev_conn *c, struct pgev_query *q);

static void
pgev_init_done(void *arg, PGresult *res, const char *err)
{
    struct pgev_pool *pool = arg;
    if (!res || PQresultStatus(res) != PGRES_COMMAND_OK)
        log_warn("postgres: connection set-up statement failed: %s",
                 err ? err : PQresultErrorMessage(res));
    /* Whether a fresh connection was set up is also worth a wake-up: work may
     * have arrived while it was down. */
    if (pool->notify_cb)
        pool->notify_cb(pool->notify_arg, "", "");
}

void
pgev_conninfo(const struct config *cfg, const char **keys, const char **vals, int cap)
{
    int n = 0;
    if (cfg->database_url) {
        keys[n] = "dbname";
        vals[n++] = cfg->database_url; /* libpq expands a URI given as dbname */
    } else {
        keys[n] = "host";
        vals[n++] = cfg->postgres_host;
        keys[n] = "user";
        vals[n++] = cfg->postgres_username;
        keys[n] = "dbname";
        vals[n++] = cfg->postgres_database;
        if (cfg->postgres_password) {
            keys[n] = "password";
            vals[n++] = cfg->postgres_password;
        }
    }
    static char port[16];
    snprintf(port, sizeof(port), "%d", cfg->postgres_port);
    if (!cfg->database_url) {
        keys[n] = "port";
        vals[n++] = port;
    }
    keys[n] = "application_name";
    vals[n++] = "paymentd";
    keys[n] = "connect_timeout";
    vals[n++] = "5";
    if (n >= cap)
        abort();
    keys[n] = NULL;
    vals[n] = NULL;
}

static void
pgev_query_free(struct pgev_query *q)
{
    for (int i = 0; i < q->nparams; i++)
        free(q->params[i]);
    free(q->params);
    free(q->sql);
    free(q);
}

static void
pgev_complete(struct pgev_query *q, PGresult *res, const char *err)
{
    if (!q->forgotten)
        q->cb(q->arg, res, err);
    pgev_query_free(q);
}

static void
pgev_conn_event(struct pgev_conn *c, short what)
{
    if (c->ev)
        event_free(c->ev);
    c->sock = PQsocket(c->pg);
    c->ev = NULL;
    if (c->sock < 0)
        return;
    c->ev = event_new(c->pool->base, c->sock, what, pgev_on_socket, c);
    event_add(c->ev, NULL);
}

static void
pgev_conn_fail(struct pgev_conn *c, const char *why)
{
    struct pgev_pool *pool = c->pool;
    if (!pool->closing)
        log_warn("postgres connection lost: %s", why);
    if (c->ev) {
        event_free(c->ev);
        c->ev = NULL;
    }
    if (c->last) {
        PQclear(c->last);
        c->last = NULL;
    }
    if (c->pg) {
        PQfinish(c->pg);
        c->pg = NULL;
    }
    c->state = CONN_DOWN;
    c->prepared = 0;
    c->preparing = false;
    if (c->q) {
        struct pgev_query *q = c->q;
        c->q = NULL;
        pgev_complete(q, NULL, "database connection lost");
    }
    if (pool->closing)
        return;
    struct timeval tv = {c->retry_ms / 1000, (c->retry_ms % 1000) * 1000};
    evtimer_add(c->retry, &tv);
    c->retry_ms = c->retry_ms * 2 > PGEV_RETRY_MAX_MS ? PGEV_RETRY_MAX_MS : c->retry_ms * 2;
}

static void
pgev_connect_poll(struct pgev_conn *c)
{
    switch (PQconnectPoll(c->pg)) {
    case PGRES_POLLING_READING:
        pgev_conn_event(c, EV_READ);
        return;
    case PGRES_POLLING_WRITING:
        pgev_conn_event(c, EV_WRITE);
        return;
    case PGRES_POLLING_OK:
        if (PQsetnonblocking(c->pg, 1) != 0) {
            pgev_conn_fail(c, "cannot set non-blocking mode");
            return;
        }
        c->state = CONN_IDLE;
        c->retry_ms = PGEV_RETRY_MIN_MS;
        pgev_conn_event(c, EV_READ | EV_PERSIST);
        if (c->pool->init_sql) {
            /* Ahead of anything queued: a LISTEN must be in place before the
             * first query, or a notification could slip between them. */
            struct pgev_query *q = xcalloc(1, sizeof(*q));
            q->stmt = -1;
            q->sql = xstrdup(c->pool->init_sql);
            q->params = xcalloc(1, sizeof(char *));
            q->cb = pgev_init_done;
            q->arg = c->pool;
            pgev_send(c, q);
            return;
        }
        pgev_dispatch(c->pool);
        return;
    default: {
        char why[256];
        snprintf(why, sizeof(why), "%s", PQerrorMessage(c->pg));
        why[strcspn(why, "\n")] = '\0';
        pgev_conn_fail(c, why);
        return;
    }
    }
}

/* Reads whatever arrived; completes the query when its last result is in. */
static void
pgev_read(struct pgev_conn *c)
{
    if (!PQconsumeInput(c->pg)) {
        pgev_conn_fail(c, "read failed");
        return;
    }
    while (c->state == CONN_BUSY && !PQisBusy(c->pg)) {
        PGresult *res = PQgetResult(c->pg);
        if (res) {
            if (c->last)
                PQclear(c->last);
            c->last = res;
            continue;
        }
        struct pgev_query *q = c->q;
        PGresult *last = c->last;
        c->last = NULL;
        if (c->preparing) {
            /* The statement is prepared: now run the query itself. */
            bool ok = last && PQresultStatus(last) == PGRES_COMMAND_OK;
            c->preparing = false;
            if (ok) {
                PQclear(last);
                c->prepared |= UINT64_C(1) << q->stmt;
                pgev_send(c, q);
                continue;
            }
        }
        c->q = NULL;
        c->state = CONN_IDLE;
        pgev_complete(q, last, last ? NULL : "no result");
        PQclear(last);
    }
    if (c->state == CONN_DOWN)
        return; /* failed while sending the prepared query */
    if (PQstatus(c->pg) == CONNECTION_BAD) {
        pgev_conn_fail(c, "connection closed");
        return;
    }
    /* Hand notifications to whoever asked; drop them otherwise. */
    PGnotify *n;
    while ((n = PQnotifies(c->pg)) != NULL) {
        if (c->pool->notify_cb)
            c->pool->notify_cb(c->pool->notify_arg, n->relname, n->extra);
        PQfreemem(n);
    }
    if (c->state == CONN_IDLE)
        pgev_dispatch(c->pool);
}

static void
pgev_flush(struct pgev_conn *c)
{
    int rv = PQflush(c->pg);
    if (rv < 0)
        pgev_conn_fail(c, "write failed");
    else if (rv > 0)
        pgev_conn_event(c, EV_READ | EV_WRITE | EV_PERSIST);
    else
        pgev_conn_event(c, EV_READ | EV_PERSIST);
}

static void
pgev_on_socket(evutil_socket_t fd, short what, void *arg)
{
    struct pgev_conn *c = arg;
    (void)fd;
    if (c->state == CONN_CONNECTING) {
        pgev_connect_poll(c);
        return;
    }
    if ((what & EV_WRITE) && c->state == CONN_BUSY) {
        pgev_flush(c);
        if (c->state == CONN_DOWN)
            return;
    }
    if (what & EV_READ)
        pgev_read(c);
}

static void
pgev_conn_start(struct pgev_conn *c)
{
    struct pgev_pool *pool = c->pool;
    c->pg = PQconnectStartParams(pool->keys, pool->vals, 1);
    if (!c->pg || PQstatus(c->pg) == CONNECTION_BAD) {
        pgev_conn_fail(c, c->pg ? "connection refused" : "out of memory");
        return;
    }
    c->state = CONN_CONNECTING;
    pgev_conn_event(c, EV_WRITE);
}

static void
pgev_on_retry(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    pgev_conn_start(arg);
}

/* Sends q: a plain query, or a prepared statement (first preparing it on
 * this connection when it is not yet, which costs one round trip once). */
static void
pgev_send(struct pgev_conn *c, struct pgev_query *q)
{
    int ok;
    char name[16];
    c->q = q;
    c->state = CONN_BUSY;
    if (q->stmt < 0) {
        ok = PQsendQueryParams(c->pg, q->sql, q->nparams, NULL, (const char *const *)q->params,
                               NULL, NULL, 0);
    } else {
        snprintf(name, sizeof(name), "pgev_%d", q->stmt);
        if (c->prepared & (UINT64_C(1) << q->stmt)) {
            ok = PQsendQueryPrepared(c->pg, name, q->nparams, (const char *const *)q->params, NULL,
                                     NULL, 0);
        } else {
            c->preparing = true;
            ok = PQsendPrepare(c->pg, name, c->pool->statements[q->stmt], q->nparams, NULL);
        }
    }
    if (!ok) {
        pgev_conn_fail(c, "send failed");
        return;
    }
    pgev_flush(c);
}

static void
pgev_dispatch(struct pgev_pool *pool)
{
    for (int i = 0; i < pool->size && !TAILQ_EMPTY(&pool->queue); i++) {
        struct pgev_conn *c = &pool->conns[i];
        if (c->state != CONN_IDLE)
            continue;
        struct pgev_query *q = TAILQ_FIRST(&pool->queue);
        TAILQ_REMOVE(&pool->queue, q, link);
        pool->queued--;
        if (q->forgotten) {
            pgev_query_free(q);
            i--;
            continue;
        }
        pgev_send(c, q);
    }
}

static void
pgev_on_sweep(evutil_socket_t fd, short what, void *arg)
{
    struct pgev_pool *pool = arg;
    int64_t now = shm_mono_ms();
    struct pgev_query *q;
    bool any = false;
    (void)fd;
    (void)what;
    /* With every connection down (none up, none connecting) nothing queued
     * can run soon: fail it now so that callers answer 503 at once. */
    for (int i = 0; i < pool->size; i++)
        any = any || pool->conns[i].state != CONN_DOWN;
    while ((q = TAILQ_FIRST(&pool->queue)) != NULL &&
           (!any || now - q->queued_ms > pool->queue_timeout_ms)) {
        TAILQ_REMOVE(&pool->queue, q, link);
        pool->queued--;
        pgev_complete(q, NULL, "database unavailable");
    }
}

struct pgev_pool *
pgev_pool_new(struct event_base *base, const struct config *cfg, int size)
{
    struct pgev_pool *pool = xcalloc(1, sizeof(*pool));
    pool->base = base;
    pool->size = size;
    pool->queue_timeout_ms = cfg->db_queue_timeout_ms;
    pgev_conninfo(cfg, pool->keys, pool->vals, 15);
    /* The configuration may be replaced later; keep private copies. */
    for (int i = 0; pool->keys[i]; i++)
        pool->vals[i] = xstrdup(pool->vals[i]);
    TAILQ_INIT(&pool->queue);
    pool->conns = xcalloc((size_t)size, sizeof(*pool->conns));
    for (int i = 0; i < size; i++) {
        struct pgev_conn *c = &pool->conns[i];
        c->pool = pool;
        c->sock = -1;
        c->retry_ms = PGEV_RETRY_MIN_MS;
        c->retry = evtimer_new(base, pgev_on_retry, c);
        pgev_conn_start(c);
    }
    struct timeval tv = {0, 250000};
    pool->sweep = event_new(base, -1, EV_PERSIST, pgev_on_sweep, pool);
    event_add(pool->sweep, &tv);
    return pool;
}

static unsigned long
pgev_enqueue(struct pgev_pool *pool, int stmt, const char *sql, int nparams,
             const char *const *params, pgev_cb cb, void *arg)
{
    struct pgev_query *q = xcalloc(1, sizeof(*q));
    q->id = ++pool->next_id;
    q->stmt = stmt;
    q->sql = stmt < 0 ? xstrdup(sql) : NULL;
    q->nparams = nparams;
    q->params = xcalloc((size_t)(nparams ? nparams : 1), sizeof(char *));
    for (int i = 0; i < nparams; i++)
        q->params[i] = params[i] ? xstrdup(params[i]) : NULL;
    q->cb = cb;
    q->arg = arg;
    q->queued_ms = shm_mono_ms();
    if (pool->queued >= PGEV_QUEUE_MAX) {
        /* Still asynchronous: fail it from the sweep on the next turn. */
        q->queued_ms = 0;
        TAILQ_INSERT_HEAD(&pool->queue, q, link);
        pool->queued++;
        return q->id;
    }
    TAILQ_INSERT_TAIL(&pool->queue, q, link);
    pool->queued++;
    pgev_dispatch(pool);
    return q->id;
}

unsigned long
pgev_query(struct pgev_pool *pool, const char *sql, int nparams, const char *const *params,
           pgev_cb cb, void *arg)
{
    return pgev_enqueue(pool, -1, sql, nparams, params, cb, arg);
}

unsigned long
pgev_exec(struct pgev_pool *pool, const char *static_sql, int nparams, const char *const *params,
          pgev_cb cb, void *arg)
{
    /* Statements are known by their address: the caller's string literal. */
    int stmt;
    for (stmt = 0; stmt < pool->nstatements && pool->statements[stmt] != static_sql; stmt++)
        ;
    if (stmt == pool->nstatements) {
        if (pool->nstatements == PGEV_MAX_PREPARED)
            return pgev_enqueue(pool, -1, static_sql, nparams, params, cb, arg);
        pool->statements[pool->nstatements++] = static_sql;
    }
    return pgev_enqueue(pool, stmt, NULL, nparams, params, cb, arg);
}

void
pgev_forget(struct pgev_pool *pool, unsigned long id)
{
    struct pgev_query *q;
    TAILQ_FOREACH(q, &pool->queue, link)
    {
        if (q->id == id) {
            q->forgotten = true;
            return;
        }
    }
    for (int i = 0; i < pool->size; i++) {
        if (pool->conns[i].q && pool->conns[i].q->id == id)
            pool->conns[i].q->forgotten = true;
    }
}

void
pgev_pool_on_connect(struct pgev_pool *pool, const char *static_sql, pgev_notify_cb cb, void *arg)
{
    pool->init_sql = static_sql;
    pool->notify_cb = cb;
    pool->notify_arg = arg;
}

int
pgev_pool_connected(const struct pgev_pool *pool)
{
    int n = 0;
    for (int i = 0; i < pool->size; i++)
        n += pool->conns[i].state == CONN_IDLE || pool->conns[i].state == CONN_BUSY;
    return n;
}

void
pgev_pool_free(struct pgev_pool *pool)
{
    struct pgev_query *q;
    pool->closing = true;
    for (int i = 0; i < pool->size; i++) {
        struct pgev_conn *c = &pool->conns[i];
        pgev_conn_fail(c, "pool closed");
        event_free(c->retry);
    }
    while ((q = TAILQ_FIRST(&pool->queue)) != NULL) {
        TAILQ_REMOVE(&pool->queue, q, link);
        q->forgotten = true;
        pgev_query_free(q);
    }
    event_free(pool->sweep);
    for (int i = 0; pool->keys[i]; i++)
        free((char *)pool->vals[i]);
    free(pool->conns);
    free(pool);
}
