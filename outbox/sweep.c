/*
 * sweep - the maintenance sweeps, in the outbox role, run by one leader
 * across every process and host.
 *
 * Offers sweep_start() and sweep_stop(). Leadership is a PostgreSQL
 * session advisory lock taken with pg_try_advisory_lock on a connection of
 * its own: whoever holds it sweeps, the others keep trying, and a leader
 * whose connection drops loses it to the next one. Every SWEEP_INTERVAL_MS
 * the leader:
 *   - re-drives gateway attempts still pending past their lease (their job
 *     was lost with an api or a worker, or its retries ran out): the same
 *     attempt goes to a worker again, with the same idempotency key, marked
 *     as a re-drive so that the worker first asks the gateway what became
 *     of it; a gateway that took the first call answers with that outcome,
 *     so money is never moved twice and a charge is never failed over;
 *   - expires open payments past expires_at (24 h after creation, 7 days
 *     after an authorization): canceled at once when nothing is held, else
 *     a void of the open charge goes to a worker first (pi_expire);
 *   - removes idempotency keys older than 24 hours, and gateway callback ids
 *     (their dedupe records) older than 30 days;
 * and every CONSISTENCY_INTERVAL_MS it counts succeeded intents without a
 * succeeded charge or capture, intents whose amount_received differs from
 * what their attempts captured, and payments processing without exactly one
 * pending attempt, into gauges and a log line. Calls pgev, nngev, jobs.
 */
#include <nng/nng.h>
#include <nng/protocol/reqrep0/req.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jobs.h"
#include "log.h"
#include "metrics.h"
#include "outbox.h"
#include "xmalloc.h"

#define SWEEP_LOCK_ID         "7215403902"
#define SWEEP_SLOW_TIMEOUT_MS 300000

struct sweep {
    struct role_ctx *ctx;
    struct pgev_pool *pg;   /* the sweeps' statements */
    struct pgev_pool *slow; /* the whole-table checks: a longer statement timeout */
    struct pgev_pool *lock; /* one connection holding the advisory lock */
    nng_socket workers;
    struct event *timer;
    bool leader;
    bool trying;
    int64_t last_check_mono;
    char lease[24];
};

static void
sweep_on_job(void *arg, int err, nng_msg *reply)
{
    char *id = arg;
    if (err)
        log_warn("sweeps: re-driving %s: %s; it will be tried again", id, nng_strerror(err));
    else
        log_info("sweeps: payment %s finished after being re-driven", id);
    if (reply)
        nng_msg_free(reply);
    free(id);
}

/* Sends the attempts in res (attempt_jobs' columns) to the workers. */
static void
sweep_send(struct sweep *s, PGresult *res, bool redrive)
{
    const struct config *cfg = &s->ctx->cfg;
    for (int i = 0; i < PQntuples(res); i++) {
        size_t n;
        void *bytes = jobs_message(PQgetvalue(res, i, 0), shm_now_ms() + cfg->job_timeout_ms, res,
                                   i, redrive, NULL, &n);
        if (!bytes)
            continue;
        nngev_request(s->ctx->nngev, s->workers, nngev_msg(bytes, n), (int)cfg->job_timeout_ms,
                      sweep_on_job, xstrdup(PQgetvalue(res, i, 0)));
        free(bytes);
    }
}

static void
sweep_on_stuck(void *arg, PGresult *res, const char *err)
{
    struct sweep *s = arg;
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK) {
        log_warn("sweeps: looking for attempts past their lease failed: %s",
                 err ? err : PQresultErrorMessage(res));
        return;
    }
    for (int i = 0; i < PQntuples(res); i++) {
        log_warn("sweeps: payment %s: attempt %s was pending past its lease: asking a worker to "
                 "resolve it",
                 PQgetvalue(res, i, 0), PQgetvalue(res, i, PQfnumber(res, "key")));
        metric_inc(role_metrics(s->ctx), MC_PAYMENTS_REDRIVEN);
    }
    sweep_send(s, res, true);
}

static void
sweep_on_expired(void *arg, PGresult *res, const char *err)
{
    struct sweep *s = arg;
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK) {
        log_warn("sweeps: expiring payments failed: %s", err ? err : PQresultErrorMessage(res));
        return;
    }
    long long n = PQntuples(res);
    atomic_fetch_add_explicit(&role_metrics(s->ctx)->counters[MC_INTENTS_EXPIRED], (uint64_t)n,
                              memory_order_relaxed);
    if (n)
        log_info("sweeps: %lld payments expired", n);
    sweep_send(s, res, false);
}

static void
sweep_on_count(void *arg, PGresult *res, const char *err)
{
    struct sweep *s = arg;
    (void)err;
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1)
        return;
    long long keys = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    struct shm_metrics *m = role_metrics(s->ctx);
    atomic_fetch_add_explicit(&m->counters[MC_IDEMPOTENCY_KEYS_REMOVED], (uint64_t)keys,
                              memory_order_relaxed);
    if (keys)
        log_info("sweeps: %lld idempotency keys removed", keys);
}

static void
sweep_on_check(void *arg, PGresult *res, const char *err)
{
    struct sweep *s = arg;
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1) {
        log_warn("sweeps: consistency check failed to run: %s",
                 err ? err : PQresultErrorMessage(res));
        return;
    }
    int64_t a = strtoll(PQgetvalue(res, 0, 0), NULL, 10),
            b = strtoll(PQgetvalue(res, 0, 1), NULL, 10),
            c = strtoll(PQgetvalue(res, 0, 2), NULL, 10),
            d = strtoll(PQgetvalue(res, 0, 3), NULL, 10);
    struct shm_metrics *m = role_metrics(s->ctx);
    atomic_store_explicit(&m->inconsistent[0], a, memory_order_relaxed);
    atomic_store_explicit(&m->inconsistent[1], b, memory_order_relaxed);
    atomic_store_explicit(&m->inconsistent[2], c, memory_order_relaxed);
    atomic_store_explicit(&m->inconsistent[3], d, memory_order_relaxed);
    if (a || b || c || d)
        log_error("consistency check: %lld succeeded intents without a succeeded charge or "
                  "capture, %lld intents whose amounts differ from what their attempts "
                  "captured and refunded, %lld processing payments without exactly one pending "
                  "attempt, %lld charges open at the gateway that no payment waits on",
                  (long long)a, (long long)b, (long long)c, (long long)d);
    else
        log_info("consistency check: no violations");
}

static void
sweep_run(struct sweep *s)
{
    const char *params[1] = {s->lease};
    pgev_exec(s->pg,
              "WITH due AS (UPDATE payment_transactions a SET lease_until = now() +"
              "  $1::bigint * interval '1 millisecond' FROM"
              "  (SELECT id FROM payment_transactions WHERE status = 'pending'"
              "   AND lease_until < now()"
              "   ORDER BY lease_until LIMIT 100 FOR UPDATE SKIP LOCKED) d"
              "  WHERE a.id = d.id RETURNING a.id)"
              " SELECT j.public_id, j.* FROM due JOIN attempt_jobs j ON j.attempt_id = due.id",
              1, params, sweep_on_stuck, s);
    pgev_exec(s->pg, "SELECT r.public_id, j.* FROM pi_expire(100, $1::bigint) r" JOBS_JOIN, 1,
              params, sweep_on_expired, s);
    pgev_exec(s->pg,
              "WITH keys AS (DELETE FROM idempotency_keys WHERE id IN (SELECT id FROM"
              "  idempotency_keys WHERE created_at < now() - interval '24 hours' LIMIT 1000)"
              "  RETURNING 1),"
              /* Gateways resend callbacks for days, not months. */
              " gw AS (DELETE FROM gateway_events WHERE (provider, event_id) IN (SELECT"
              "  provider, event_id FROM gateway_events WHERE received_at < now() - interval"
              "  '30 days' LIMIT 1000) RETURNING 1)"
              " SELECT (SELECT count(*) FROM keys), (SELECT count(*) FROM gw)",
              0, NULL, sweep_on_count, s);
    int64_t now = shm_mono_ms();
    if (s->last_check_mono && now - s->last_check_mono < s->ctx->cfg.consistency_interval_ms)
        return;
    s->last_check_mono = now;
    pgev_exec(s->slow,
              "SELECT (SELECT count(*) FROM payment_intents p WHERE p.status = 'succeeded'"
              "  AND NOT EXISTS (SELECT 1 FROM payment_transactions t WHERE"
              "  t.payment_intent_id = p.id AND t.status = 'succeeded'"
              "  AND t.type IN ('charge', 'capture'))),"
              " (SELECT count(*) FROM payment_intents p WHERE p.amount_received <>"
              "  coalesce((SELECT sum(t.amount_captured) FROM payment_transactions t WHERE"
              "  t.payment_intent_id = p.id AND t.status = 'succeeded'"
              "  AND t.type IN ('charge', 'capture')), 0)"
              "  OR p.amount_refunded <> coalesce((SELECT sum(r.amount) FROM refunds r"
              "   WHERE r.payment_intent_id = p.id AND r.status = 'succeeded'), 0)"
              "  OR p.amount_refund_pending <> coalesce((SELECT sum(r.amount) FROM refunds r"
              "   WHERE r.payment_intent_id = p.id AND r.status = 'pending'), 0)),"
              " (SELECT count(*) FROM payment_intents p WHERE p.status = 'processing'"
              "  AND (SELECT count(*) FROM payment_transactions t WHERE t.payment_intent_id = p.id"
              "  AND t.status = 'pending' AND t.type NOT IN ('refund', 'refund_cancel')) <> 1),"
              " (SELECT count(*) FROM payment_transactions t JOIN payment_intents p"
              "  ON p.id = t.payment_intent_id WHERE t.type IN ('charge', 'authorization')"
              "  AND t.status IN ('requires_action', 'requires_capture')"
              "  AND (p.status NOT IN ('requires_action', 'requires_capture', 'processing')"
              "   OR t.id <> (attempt_open_charge(p.id)).id))",
              0, NULL, sweep_on_check, s);
}

static void
sweep_on_lock(void *arg, PGresult *res, const char *err)
{
    struct sweep *s = arg;
    (void)err;
    s->trying = false;
    if (res && PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1 &&
        strcmp(PQgetvalue(res, 0, 0), "t") == 0) {
        s->leader = true;
        log_info("sweeps: this process leads the maintenance sweeps");
        sweep_run(s);
    }
}

/* A (re)connected lock connection holds no lock any more. */
static void
sweep_on_connect(void *arg, const char *channel, const char *payload)
{
    struct sweep *s = arg;
    (void)channel;
    (void)payload;
    if (s->leader)
        log_warn("sweeps: lost the leader connection; trying again");
    s->leader = false;
}

static void
sweep_on_timer(evutil_socket_t fd, short what, void *arg)
{
    struct sweep *s = arg;
    (void)fd;
    (void)what;
    if (s->leader) {
        sweep_run(s);
        return;
    }
    if (s->trying)
        return;
    s->trying = true;
    pgev_exec(s->lock, "SELECT pg_try_advisory_lock(" SWEEP_LOCK_ID ")", 0, NULL, sweep_on_lock, s);
}

struct sweep *
sweep_start(struct role_ctx *ctx, struct pgev_pool *pg)
{
    const struct config *cfg = &ctx->cfg;
    struct sweep *s = xcalloc(1, sizeof(*s));
    char url[256];
    int rv;
    s->ctx = ctx;
    s->pg = pg;
    /* The consistency checks read whole tables: they get minutes, not the
     * DB_STATEMENT_TIMEOUT_MS that bounds everything on the money path. */
    struct config slow_cfg = *cfg;
    slow_cfg.db_statement_timeout_ms = SWEEP_SLOW_TIMEOUT_MS;
    s->slow = pgev_pool_new(ctx->base, &slow_cfg, 1);
    s->lock = pgev_pool_new(ctx->base, cfg, 1);
    pgev_pool_on_connect(s->lock, "SELECT 1", sweep_on_connect, s);
    snprintf(s->lease, sizeof(s->lease), "%lld", (long long)cfg->processing_lease_ms);
    if ((rv = nng_req0_open(&s->workers)) != 0)
        abort();
    nng_socket_set_ms(s->workers, NNG_OPT_RECONNMINT, 20);
    nng_socket_set_ms(s->workers, NNG_OPT_RECONNMAXT, 500);
    for (int i = 0; i < cfg->workers; i++) {
        role_url(cfg, ROLE_WORKER, i, url, sizeof(url));
        nng_dial(s->workers, url, NULL, NNG_FLAG_NONBLOCK);
    }
    s->timer = event_new(ctx->base, -1, EV_PERSIST, sweep_on_timer, s);
    struct timeval tv = {(time_t)(cfg->sweep_interval_ms / 1000),
                         (suseconds_t)((cfg->sweep_interval_ms % 1000) * 1000)};
    event_add(s->timer, &tv);
    return s;
}

void
sweep_stop(struct sweep *s)
{
    event_free(s->timer);
    nng_close(s->workers);
    pgev_pool_free(s->lock);
    pgev_pool_free(s->slow);
    free(s);
}
