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
 *
 * Nothing waits without a bound. Every connection of a pool runs with PostgreSQL's
 * statement_timeout = DB_STATEMENT_TIMEOUT_MS and idle_in_transaction_session_timeout = twice that
 * (libpq's options keyword; the tools' synchronous connections, pgev_conninfo(), get neither, so
 * migrations never time out). A client-side guard covers a server or network that stalls so the
 * server's own timeout never reaches us: a query whose result is not in DB_STATEMENT_TIMEOUT_MS +
 * 2 s after it was sent fails (callback once, with an error), and its connection is closed and
 * re-opened; libpq does not apply connect_timeout to a non-blocking connect, so the guard bounds
 * that too. No cancel request is sent, since PQcancel() blocks; the server's statement_timeout ends
 * the orphaned statement. An idle connection (a LISTEN, a held advisory lock) has no guard running.
 * POSTGRES_HOST is resolved once, in pgev_pool_new(), and connections go to the addresses (libpq's
 * hostaddr, with host kept for TLS and .pgpass), so no reconnect waits for DNS; a name that does
 * not resolve ends the process with EXIT_ROLE_CONFIG (EXIT_ROLE_FAILURE when DNS could not answer,
 * so the supervisor tries again). DATABASE_URL is left to libpq, which resolves its host on every
 * connect. Calls libpq, libevent, config, net, log, shm (clock), xmalloc.
 */
#include "pgev.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>

#include <jansson.h>

#include "log.h"
#include "net.h"
#include "role.h"
#include "shm.h"
#include "xmalloc.h"

#define PGEV_QUEUE_MAX    20000
#define PGEV_RETRY_MIN_MS 100
#define PGEV_RETRY_MAX_MS 5000

#define PGEV_MAX_PREPARED 64

#define PGEV_MAX_ADDRS        8    /* addresses POSTGRES_HOST may resolve to, all tried */
#define PGEV_CONNECT_GUARD_MS 5000 /* per address, as connect_timeout=5 for the tools */
#define PGEV_GUARD_SLACK_MS   2000 /* past statement_timeout before the client gives up */

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
    const struct pgev_batch *batch; /* it may share a transaction with others */
    struct pgev_query **members;    /* a batch: the callers' runs it carries */
    int nmembers;
    struct pgev_pool *pool; /* a batch: where a member to run again goes */
};
TAILQ_HEAD(pgev_qlist, pgev_query);

enum conn_state { CONN_DOWN, CONN_CONNECTING, CONN_IDLE, CONN_BUSY };

struct pgev_conn {
    struct pgev_pool *pool;
    PGconn *pg;
    enum conn_state state;
    struct event *ev;    /* socket readiness, re-made when the socket changes */
    struct event *retry; /* reconnect timer */
    struct event *guard; /* pending while connecting or while a query is in flight */
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
    int batch_max;            /* DB_BATCH_MAX: runs sharing one transaction at most */
    int64_t guard_ms;         /* a query's result must be in by then */
    int64_t connect_guard_ms; /* a connection must be up by then */
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
    /* LISTEN answers COMMAND_OK, a SELECT (the sweeps' lock connection) TUPLES_OK. */
    if (!res || (PQresultStatus(res) != PGRES_COMMAND_OK && PQresultStatus(res) != PGRES_TUPLES_OK))
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

static void pgev_batch_complete(struct pgev_query *b, PGresult *res, const char *err);
static int pgev_statement(struct pgev_pool *pool, const char *static_sql);

static void
pgev_complete(struct pgev_query *q, PGresult *res, const char *err)
{
    if (q->members)
        pgev_batch_complete(q, res, err);
    else if (!q->forgotten)
        q->cb(q->arg, res, err);
    free(q->members);
    pgev_query_free(q);
}

/* ---- group commit ---- */

const char *
pgev_sqlstate(PGresult *res, const char *err, char *out)
{
    const char *s = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    if (!s && err && strncmp(err, "SQLSTATE ", 9) == 0 && strlen(err) >= 14)
        s = err + 9;
    if (!s)
        return NULL;
    memcpy(out, s, 5);
    out[5] = '\0';
    return out;
}

/* One caller's share of a batch's result: its rows, and the columns after
 * the caller's number and failure. */
static PGresult *
pgev_member_result(PGresult *res, int member)
{
    int ncols = PQnfields(res) - 2;
    PGresAttDesc *att = xcalloc((size_t)(ncols > 0 ? ncols : 1), sizeof(*att));
    for (int c = 0; c < ncols; c++) {
        att[c].name = PQfname(res, c + 2);
        att[c].tableid = PQftable(res, c + 2);
        att[c].columnid = PQftablecol(res, c + 2);
        att[c].format = PQfformat(res, c + 2);
        att[c].typid = PQftype(res, c + 2);
        att[c].typlen = PQfsize(res, c + 2);
        att[c].atttypmod = PQfmod(res, c + 2);
    }
    PGresult *m = PQmakeEmptyPGresult(NULL, PGRES_TUPLES_OK);
    if (!m || !PQsetResultAttrs(m, ncols, att))
        abort(); /* out of memory */
    free(att);
    int out = 0;
    for (int r = 0; r < PQntuples(res); r++) {
        if (atoi(PQgetvalue(res, r, 0)) != member)
            continue;
        for (int c = 0; c < ncols; c++) {
            bool null = PQgetisnull(res, r, c + 2);
            if (!PQsetvalue(m, out, c, null ? NULL : PQgetvalue(res, r, c + 2),
                            null ? -1 : PQgetlength(res, r, c + 2)))
                abort();
        }
        out++;
    }
    return m;
}

static void
pgev_batch_complete(struct pgev_query *b, PGresult *res, const char *err)
{
    bool ok = res && PQresultStatus(res) == PGRES_TUPLES_OK;
    char failed[300];
    if (!ok)
        snprintf(failed, sizeof(failed), "%s",
                 err ? err : (res ? PQresultErrorMessage(res) : "batch failed"));
    for (int i = 0; i < b->nmembers; i++) {
        struct pgev_query *q = b->members[i];
        const char *mine = ok ? NULL : failed;
        for (int r = 0; ok && r < PQntuples(res); r++) {
            if (atoi(PQgetvalue(res, r, 0)) == i + 1 && !PQgetisnull(res, r, 1))
                mine = PQgetvalue(res, r, 1);
        }
        if (mine) {
            char state[6];
            const char *st = ok ? pgev_sqlstate(NULL, mine, state) : NULL;
            if (st && !q->forgotten &&
                (!strcmp(st, "40P01") || !strcmp(st, "40001") || !strcmp(st, "55P03"))) {
                /* A deadlock with another batch, or a lock it would not
                 * wait for (lock_timeout): its savepoint was rolled back;
                 * it runs again, alone, first in line. */
                log_debug("postgres: a batched run is run again alone: %s", mine);
                q->batch = NULL;
                q->queued_ms = shm_mono_ms();
                TAILQ_INSERT_HEAD(&b->pool->queue, q, link);
                b->pool->queued++;
                continue;
            }
            if (ok) /* the batch's error column: the caller's own failure */
                log_debug("postgres: a batched run failed: %s", mine);
            pgev_complete(q, NULL, mine);
            continue;
        }
        PGresult *m = pgev_member_result(res, i + 1);
        pgev_complete(q, m, NULL);
        PQclear(m);
    }
}

/* A run's parameters as a JSON array, or NULL when one of them is not
 * UTF-8 text (jansson keeps only that): such a run goes alone, its
 * parameters as they are, rather than shifted by a dropped element. */
static json_t *
pgev_batch_params(const struct pgev_query *q)
{
    json_t *one = json_array();
    for (int p = 0; p < q->nparams; p++) {
        const char *v = q->params[p];
        json_t *e = v ? json_string(v) : json_null();
        if (!e || json_array_append_new(one, e) != 0) {
            json_decref(one);
            return NULL;
        }
    }
    return one;
}

/* Takes the queued runs of q's statement (q first) into one batch query,
 * or returns q when it runs alone. */
static struct pgev_query *
pgev_batch_gather(struct pgev_pool *pool, struct pgev_query *q)
{
    const struct pgev_batch *kind = q->batch;
    struct pgev_query *members[256];
    int n = 0, max = kind->max < pool->batch_max ? kind->max : pool->batch_max;
    if (max > 256)
        max = 256;
    json_t *all = json_array(), *one;
    if (!(one = pgev_batch_params(q))) {
        json_decref(all);
        return q; /* its parameters are no JSON text: it runs alone */
    }
    json_array_append_new(all, one);
    members[n++] = q;
    for (struct pgev_query *o = TAILQ_FIRST(&pool->queue), *next; o && n < max; o = next) {
        next = TAILQ_NEXT(o, link);
        if (o->batch != kind || o->forgotten || !(one = pgev_batch_params(o)))
            continue;
        json_array_append_new(all, one);
        TAILQ_REMOVE(&pool->queue, o, link);
        pool->queued--;
        members[n++] = o;
    }
    if (n == 1) {
        json_decref(all);
        return q;
    }
    char *text = json_dumps(all, JSON_COMPACT);
    json_decref(all);
    struct pgev_query *b = xcalloc(1, sizeof(*b));
    b->id = ++pool->next_id;
    b->stmt = pgev_statement(pool, kind->batch_sql);
    b->sql = b->stmt < 0 ? xstrdup(kind->batch_sql) : NULL;
    b->nparams = 1;
    b->params = xcalloc(1, sizeof(char *));
    b->params[0] = text;
    b->queued_ms = q->queued_ms;
    b->pool = pool;
    b->members = xcalloc((size_t)n, sizeof(*b->members));
    memcpy(b->members, members, (size_t)n * sizeof(*members));
    b->nmembers = n;
    return b;
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

/* Closes the connection (for good when the pool closes, else it is
 * re-opened after the back-off delay); the query in flight, if any, fails
 * with query_err. */
static void
pgev_conn_close(struct pgev_conn *c, const char *why, const char *query_err)
{
    struct pgev_pool *pool = c->pool;
    if (!pool->closing)
        log_warn("postgres connection lost: %s", why);
    evtimer_del(c->guard);
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
        pgev_complete(q, NULL, query_err);
    }
    if (pool->closing)
        return;
    struct timeval tv = {c->retry_ms / 1000, (c->retry_ms % 1000) * 1000};
    evtimer_add(c->retry, &tv);
    c->retry_ms = c->retry_ms * 2 > PGEV_RETRY_MAX_MS ? PGEV_RETRY_MAX_MS : c->retry_ms * 2;
}

static void
pgev_conn_fail(struct pgev_conn *c, const char *why)
{
    pgev_conn_close(c, why, "database connection lost");
}

static void
pgev_guard_arm(struct pgev_conn *c, int64_t ms)
{
    struct timeval tv = {(time_t)(ms / 1000), (suseconds_t)((ms % 1000) * 1000)};
    evtimer_add(c->guard, &tv);
}

/* The guard ran out: the connection attempt or the query in flight took
 * longer than any healthy server needs. Runs from a timer, not from a
 * libpq call, so closing the connection here is safe. */
static void
pgev_on_guard(evutil_socket_t fd, short what, void *arg)
{
    struct pgev_conn *c = arg;
    char why[128];
    (void)fd;
    (void)what;
    if (c->state == CONN_CONNECTING) {
        snprintf(why, sizeof(why), "not established within %lld ms",
                 (long long)c->pool->connect_guard_ms);
        pgev_conn_fail(c, why);
    } else if (c->state == CONN_BUSY) {
        snprintf(why, sizeof(why),
                 "no result within %lld ms (DB_STATEMENT_TIMEOUT_MS + %d s); closing it",
                 (long long)c->pool->guard_ms, PGEV_GUARD_SLACK_MS / 1000);
        pgev_conn_close(c, why, "database statement timed out");
    }
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
        evtimer_del(c->guard);
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
        evtimer_del(c->guard);
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
    pgev_guard_arm(c, pool->connect_guard_ms);
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
    /* Armed once per query: the PREPARE that may precede it counts too. */
    if (!evtimer_pending(c->guard, NULL))
        pgev_guard_arm(c, c->pool->guard_ms);
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
        if (q->batch)
            q = pgev_batch_gather(pool, q);
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

/* Appends item to a comma-separated list in buf. */
static void
pgev_list_add(char *buf, size_t cap, const char *item)
{
    size_t len = strlen(buf);
    snprintf(buf + len, cap - len, "%s%s", len ? "," : "", item);
}

/* The pool's connection keywords: the tools' (pgev_conninfo) plus the
 * addresses POSTGRES_HOST resolves to now, at start-up, and the server-side
 * timeouts. The values are private copies: the configuration may be
 * replaced later. */
static void
pgev_pool_conninfo(struct pgev_pool *pool, const struct config *cfg)
{
    char hosts[4096], hostaddrs[4096], options[2048];
    char addrs[PGEV_MAX_ADDRS][NET_ADDR_MAX], item[256], err[256];
    int n = 0, targets = 0;
    bool resolved = false;

    pgev_conninfo(cfg, pool->keys, pool->vals, 13);
    while (pool->keys[n])
        n++;
    hosts[0] = hostaddrs[0] = '\0';
    for (const char *p = cfg->database_url ? "" : cfg->postgres_host;
         *p && targets < PGEV_MAX_ADDRS;) {
        size_t len = strcspn(p, ",");
        snprintf(item, sizeof(item), "%.*s", (int)len, p);
        p += len + (p[len] == ',');
        if (item[0] == '/' || item[0] == '@' || item[0] == '\0') {
            /* A Unix-socket directory: no name to resolve. */
            pgev_list_add(hosts, sizeof(hosts), item);
            pgev_list_add(hostaddrs, sizeof(hostaddrs), "");
            targets++;
            continue;
        }
        bool transient;
        int k =
            net_resolve(item, false, addrs, PGEV_MAX_ADDRS - targets, &transient, err, sizeof(err));
        if (k < 0)
            log_fatal(transient ? EXIT_ROLE_FAILURE : EXIT_ROLE_CONFIG,
                      "POSTGRES_HOST %s cannot be resolved: %s", item, err);
        /* libpq tries them in turn, as it would the addresses of the name. */
        for (int i = 0; i < k; i++) {
            pgev_list_add(hosts, sizeof(hosts), item);
            pgev_list_add(hostaddrs, sizeof(hostaddrs), addrs[i]);
        }
        targets += k;
        resolved = true;
    }
    for (int i = 0; resolved && i < n; i++) {
        if (strcmp(pool->keys[i], "host") == 0)
            pool->vals[i] = hosts;
    }
    if (resolved) {
        pool->keys[n] = "hostaddr";
        pool->vals[n++] = hostaddrs;
    }
    pool->connect_guard_ms = (int64_t)PGEV_CONNECT_GUARD_MS * (targets > 1 ? targets : 1);

    /* Options already given (in DATABASE_URL, or PGOPTIONS) come first:
     * this keyword replaces them, so they are carried over. */
    const char *given = NULL;
    PQconninfoOption *parsed = cfg->database_url ? PQconninfoParse(cfg->database_url, NULL) : NULL;
    for (PQconninfoOption *o = parsed; o && o->keyword; o++) {
        if (strcmp(o->keyword, "options") == 0 && o->val && *o->val)
            given = o->val;
    }
    if (!given)
        given = getenv("PGOPTIONS");
    snprintf(options, sizeof(options),
             "%s%s-c statement_timeout=%lld -c idle_in_transaction_session_timeout=%lld",
             given ? given : "", given && *given ? " " : "",
             (long long)cfg->db_statement_timeout_ms, (long long)cfg->db_statement_timeout_ms * 2);
    PQconninfoFree(parsed);
    pool->keys[n] = "options";
    pool->vals[n++] = options;
    pool->keys[n] = NULL;
    pool->vals[n] = NULL;
    for (int i = 0; pool->keys[i]; i++)
        pool->vals[i] = xstrdup(pool->vals[i]);
}

struct pgev_pool *
pgev_pool_new(struct event_base *base, const struct config *cfg, int size)
{
    struct pgev_pool *pool = xcalloc(1, sizeof(*pool));
    pool->base = base;
    pool->size = size;
    pool->queue_timeout_ms = cfg->db_queue_timeout_ms;
    pool->batch_max = cfg->db_batch_max > 0 ? cfg->db_batch_max : 1;
    pool->guard_ms = cfg->db_statement_timeout_ms + PGEV_GUARD_SLACK_MS;
    pgev_pool_conninfo(pool, cfg);
    TAILQ_INIT(&pool->queue);
    pool->conns = xcalloc((size_t)size, sizeof(*pool->conns));
    for (int i = 0; i < size; i++) {
        struct pgev_conn *c = &pool->conns[i];
        c->pool = pool;
        c->sock = -1;
        c->retry_ms = PGEV_RETRY_MIN_MS;
        c->retry = evtimer_new(base, pgev_on_retry, c);
        c->guard = evtimer_new(base, pgev_on_guard, c);
        pgev_conn_start(c);
    }
    struct timeval tv = {0, 250000};
    pool->sweep = event_new(base, -1, EV_PERSIST, pgev_on_sweep, pool);
    event_add(pool->sweep, &tv);
    return pool;
}

static unsigned long
pgev_enqueue(struct pgev_pool *pool, int stmt, const char *sql, int nparams,
             const char *const *params, pgev_cb cb, void *arg, const struct pgev_batch *batch)
{
    struct pgev_query *q = xcalloc(1, sizeof(*q));
    q->batch = batch;
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
    return pgev_enqueue(pool, -1, sql, nparams, params, cb, arg, NULL);
}

/* The prepared statement's index for static_sql, or -1 when the table is full. */
static int
pgev_statement(struct pgev_pool *pool, const char *static_sql)
{
    /* Statements are known by their address: the caller's string literal. */
    int stmt;
    for (stmt = 0; stmt < pool->nstatements && pool->statements[stmt] != static_sql; stmt++)
        ;
    if (stmt == pool->nstatements) {
        if (pool->nstatements == PGEV_MAX_PREPARED)
            return -1;
        pool->statements[pool->nstatements++] = static_sql;
    }
    return stmt;
}

unsigned long
pgev_exec(struct pgev_pool *pool, const char *static_sql, int nparams, const char *const *params,
          pgev_cb cb, void *arg)
{
    int stmt = pgev_statement(pool, static_sql);
    return pgev_enqueue(pool, stmt, stmt < 0 ? static_sql : NULL, nparams, params, cb, arg, NULL);
}

unsigned long
pgev_exec_batched(struct pgev_pool *pool, const struct pgev_batch *b, int nparams,
                  const char *const *params, pgev_cb cb, void *arg)
{
    int stmt = pgev_statement(pool, b->single_sql);
    return pgev_enqueue(pool, stmt, stmt < 0 ? b->single_sql : NULL, nparams, params, cb, arg, b);
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
        struct pgev_query *c = pool->conns[i].q;
        if (c && c->id == id)
            c->forgotten = true;
        for (int m = 0; c && m < c->nmembers; m++) {
            if (c->members[m]->id == id)
                c->members[m]->forgotten = true;
        }
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
        event_free(c->guard);
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
