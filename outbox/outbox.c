/*
 * outbox - the event publishing role, which also runs the webhook
 * deliveries (deliver.c) and the maintenance sweeps (sweep.c).
 *
 * Offers outbox_main(), run by role_run() in the outbox process. Every
 * state change writes its event into the outbox table in the same
 * transaction; this role gets each of them out, at least once:
 *   - it wakes when a writer (api, worker) says it committed events, an
 *     NNG message on its PULL socket (common/wake.c; no NOTIFY, which would
 *     make those commits queue on a database-wide lock), and also polls
 *     every OUTBOX_POLL_MS, so a lost wake-up only delays;
 *   - it claims a batch with FOR UPDATE SKIP LOCKED, taking only the oldest
 *     pending event of each payment, so that two dispatchers (two hosts)
 *     can run side by side and events of one payment still go out in order;
 *     a claim is a lease (OUTBOX_LEASE_MS): a dispatcher that dies after
 *     claiming or publishing leaves the rows to be claimed again, and they
 *     are published again with the same event id;
 *   - it publishes each event on an NNG PUB socket (EVENTS_URL), the
 *     message being the event type, a NUL byte, then a msgpack envelope of
 *     type "event" whose body carries the event JSON, so subscribers filter
 *     by type with NNG's prefix subscriptions;
 *   - only then does it mark the rows sent, in the statement that claims
 *     the next batch (one commit per cycle); a failed publish is retried
 *     after an exponential back-off with full jitter;
 *   - a subscriber that was away asks for what it missed: on the role's
 *     REP socket (ipc://RUN_DIR/outbox.N.ipc) an events.replay request with
 *     the last event id it saw is answered with the events sent after it,
 *     in order, with their own ids (outbox_replay);
 *   - PUB drops what it sends while a subscriber is not connected, and
 *     subscribers re-dial a restarted dispatcher only after a moment: the
 *     first publish waits OUTBOX_START_DELAY_MS after the socket is
 *     listening, so a restart does not send the backlog into the void.
 * Everything runs on the role's libevent loop: PostgreSQL through pgev,
 * NNG sends are non-blocking. Calls common/ only.
 */
#include <event2/buffer.h>
#include <nng/nng.h>
#include <nng/protocol/pipeline0/pull.h>
#include <nng/protocol/pubsub0/pub.h>
#include <nng/protocol/reqrep0/rep.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "envelope.h"
#include "log.h"
#include "metrics.h"
#include "outbox.h"
#include "pgev.h"
#include "role.h"
#include "wake.h"
#include "xmalloc.h"

#define OUTBOX_BATCH     "1000"
#define OUTBOX_PUB_QUEUE 8192 /* messages per subscriber; NNG's maximum */

struct outbox {
    struct role_ctx *ctx;
    struct pgev_pool *pg; /* claims and marks */
    nng_socket wake;      /* PULL: writers' wake-ups after a commit */
    nng_socket pub;
    bool busy;  /* a cycle (mark and claim) is in flight */
    bool open;  /* the start delay has passed */
    bool again; /* woken while busy: look again when done */
    struct event *poll;
    struct deliver *deliver;
    struct sweep *sweep;
    char lease[24];
    char last_error[160]; /* the error last logged, so a repeating one is logged once */
    unsigned long long published;
};

static void outbox_kick(struct outbox *o);

/* Logs a database error once for as long as it repeats (the dispatcher
 * polls every second; a missing table should not fill the journal). */
static void
outbox_db_error(struct outbox *o, const char *what, const char *err)
{
    char line[160];
    snprintf(line, sizeof(line), "%s: %s", what, err ? err : "error");
    line[strcspn(line, "\n")] = '\0';
    if (strcmp(line, o->last_error) == 0)
        return;
    snprintf(o->last_error, sizeof(o->last_error), "%s", line);
    log_warn("outbox: %s (logged once while it repeats)", line);
}

static void
outbox_db_ok(struct outbox *o)
{
    if (o->last_error[0]) {
        log_info("outbox: database working again");
        o->last_error[0] = '\0';
    }
}

/* One statement per cycle: it marks the events the last cycle published
 * ($1; $2 failed: retried after an exponential back-off with full jitter),
 * adds their webhook deliveries, and claims the next batch ($3 rows, leased
 * for $4 ms). A claimed event waits for every earlier unsent event of its
 * payment, except those being marked sent by this very statement (its
 * snapshot still shows them unsent). Data-modifying CTEs run whether or
 * not the query reads them. Every row carries the number of deliveries
 * added; a single row without an id means nothing was claimed. */
static const char outbox_cycle_sql[] =
    "WITH s AS (UPDATE outbox SET sent_at = now(), last_error = NULL"
    "  WHERE id = ANY($1::bigint[]) RETURNING 1),"
    " f AS (UPDATE outbox SET last_error = 'publish failed',"
    "  available_at = now() + make_interval(secs => random() *"
    "   least(3600, 2 ^ least(attempts, 12)))"
    "  WHERE id = ANY($2::bigint[]) RETURNING 1),"
    " d AS (INSERT INTO webhook_deliveries (endpoint_id, outbox_id, aggregate_id)"
    "  SELECT w.id, o.id, o.aggregate_id FROM outbox o JOIN webhook_endpoints w"
    "   ON w.account_id = o.account_id AND w.status = 'enabled' AND NOT w.deleted"
    "  WHERE o.id = ANY($1::bigint[]) AND o.aggregate_type <> 'order'"
    "  AND (o.type = ANY(w.enabled_events) OR '*' = ANY(w.enabled_events))"
    "  ON CONFLICT DO NOTHING RETURNING 1),"
    " batch AS (SELECT p.id FROM outbox p"
    "  WHERE p.sent_at IS NULL AND p.available_at <= now()"
    "  AND NOT EXISTS (SELECT 1 FROM outbox e WHERE e.aggregate_id = p.aggregate_id"
    "   AND e.sent_at IS NULL AND e.id < p.id AND e.id <> ALL($1::bigint[]))"
    "  ORDER BY p.id LIMIT $3 FOR UPDATE OF p SKIP LOCKED),"
    " claimed AS (UPDATE outbox o SET attempts = o.attempts + 1,"
    "  available_at = now() + $4::bigint * interval '1 millisecond'"
    "  FROM batch WHERE o.id = batch.id"
    "  RETURNING o.id, o.event_id, o.type, o.aggregate_id, o.payload::text)"
    " SELECT c.id, c.event_id, c.type, c.aggregate_id, c.payload, n.deliveries"
    " FROM (SELECT (SELECT count(*) FROM d) AS deliveries) n"
    " LEFT JOIN claimed c ON true ORDER BY c.id";

static void outbox_cycle(struct outbox *o, const char *sent, const char *failed);

/* Publishes one claimed row; 0 when the PUB socket took it. */
static int
outbox_publish(struct outbox *o, PGresult *res, int row)
{
    struct envelope_writer w;
    size_t n;
    const char *type = PQgetvalue(res, row, 2);
    envelope_begin(&w, MSG_EVENT, PQgetvalue(res, row, 1), 0, 4);
    envelope_put_str(&w, "event_id", PQgetvalue(res, row, 1));
    envelope_put_str(&w, "type", type);
    envelope_put_str(&w, "aggregate_id", PQgetvalue(res, row, 3));
    envelope_put_str(&w, "event", PQgetvalue(res, row, 4));
    void *bytes = envelope_finish(&w, &n);
    size_t tlen = strlen(type);
    nng_msg *msg;
    if (nng_msg_alloc(&msg, tlen + 1 + n) != 0)
        abort();
    memcpy(nng_msg_body(msg), type, tlen);
    ((char *)nng_msg_body(msg))[tlen] = '\0';
    memcpy((char *)nng_msg_body(msg) + tlen + 1, bytes, n);
    free(bytes);
    int rv = nng_sendmsg(o->pub, msg, NNG_FLAG_NONBLOCK);
    if (rv != 0) {
        nng_msg_free(msg);
        log_warn("outbox: publishing %s failed: %s", PQgetvalue(res, row, 1), nng_strerror(rv));
        return -1;
    }
    return 0;
}

static void
outbox_on_cycle(void *arg, PGresult *res, const char *err)
{
    struct outbox *o = arg;
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) < 1) {
        /* What the last cycle published stays leased: it is claimed and
         * published again when the lease ends (same event ids). */
        outbox_db_error(o, "claiming or marking events failed",
                        err   ? err
                        : res ? PQresultErrorMessage(res)
                              : "no result");
        o->busy = false;
        return;
    }
    outbox_db_ok(o);
    if (strcmp(PQgetvalue(res, 0, 5), "0") != 0)
        deliver_kick(o->deliver); /* new webhook deliveries */
    int rows = PQntuples(res);
    if (PQgetisnull(res, 0, 0)) {
        o->busy = false;
        if (o->again) {
            o->again = false;
            outbox_kick(o);
        }
        return;
    }
    /* Two arrays as PostgreSQL literals: published, and failed. */
    struct evbuffer *sent = evbuffer_new(), *failed = evbuffer_new();
    evbuffer_add(sent, "{", 1);
    evbuffer_add(failed, "{", 1);
    int nsent = 0, nfailed = 0;
    for (int i = 0; i < rows; i++) {
        bool ok = outbox_publish(o, res, i) == 0;
        struct evbuffer *b = ok ? sent : failed;
        evbuffer_add_printf(b, "%s%s", (ok ? nsent : nfailed) ? "," : "", PQgetvalue(res, i, 0));
        if (ok)
            nsent++;
        else
            nfailed++;
    }
    evbuffer_add(sent, "}\0", 2);
    evbuffer_add(failed, "}\0", 2);
    o->published += (unsigned long long)nsent;
    struct shm_metrics *m = role_metrics(o->ctx);
    atomic_fetch_add_explicit(&m->counters[MC_EVENTS_PUBLISHED_NNG], (uint64_t)nsent,
                              memory_order_relaxed);
    atomic_fetch_add_explicit(&m->counters[MC_EVENTS_PUBLISH_FAILED_NNG], (uint64_t)nfailed,
                              memory_order_relaxed);
    /* Marks them and claims what came meanwhile, in one commit. */
    o->again = false;
    outbox_cycle(o, (const char *)evbuffer_pullup(sent, -1),
                 (const char *)evbuffer_pullup(failed, -1));
    evbuffer_free(sent);
    evbuffer_free(failed);
}

static void
outbox_cycle(struct outbox *o, const char *sent, const char *failed)
{
    const char *params[4] = {sent, failed, OUTBOX_BATCH, o->lease};
    pgev_exec(o->pg, outbox_cycle_sql, 4, params, outbox_on_cycle, o);
}

static void
outbox_kick(struct outbox *o)
{
    if (!o->open)
        return; /* the start timer kicks once subscribers had time to connect */
    if (o->busy) {
        o->again = true;
        return;
    }
    o->busy = true;
    outbox_cycle(o, "{}", "{}");
}

/* A writer committed events (common/wake.c). */
static void
outbox_on_wake(void *arg, nng_msg *msg)
{
    nng_msg_free(msg);
    outbox_kick(arg);
}

static void
outbox_on_backlog(void *arg, PGresult *res, const char *err)
{
    struct outbox *o = arg;
    (void)err;
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1)
        return;
    struct shm_metrics *m = role_metrics(o->ctx);
    atomic_store_explicit(&m->events_pending, strtoll(PQgetvalue(res, 0, 0), NULL, 10),
                          memory_order_relaxed);
    atomic_store_explicit(&m->events_oldest_age_s, strtoll(PQgetvalue(res, 0, 1), NULL, 10),
                          memory_order_relaxed);
}

static void
outbox_on_poll(evutil_socket_t fd, short what, void *arg)
{
    struct outbox *o = arg;
    (void)fd;
    (void)what;
    outbox_kick(o);
    /* The backlog for the metrics; cheap through the partial index on unsent rows. */
    pgev_exec(o->pg,
              "SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at)), 0)::bigint"
              " FROM outbox WHERE sent_at IS NULL",
              0, NULL, outbox_on_backlog, o);
}

/* ---- replay for subscribers that were away ---- */

struct replay {
    struct nngev_job *job;
    char request_id[ENVELOPE_ID_MAX];
};

static void
outbox_on_replay_rows(void *arg, PGresult *res, const char *err)
{
    struct replay *rp = arg;
    struct envelope_writer w;
    size_t n;
    bool ok = res && PQresultStatus(res) == PGRES_TUPLES_OK;
    int rows = ok ? PQntuples(res) : 0;
    int shown = rows > 500 ? 500 : rows;
    envelope_begin(&w, MSG_EVENTS_BATCH, rp->request_id, 0, ok ? 2 : 1);
    if (!ok) {
        envelope_put_str(&w, "error", err ? "database unavailable" : "query failed");
    } else {
        envelope_put_bool(&w, "more", rows > 500);
        envelope_put_key(&w, "events");
        msgpack_pack_array(&w.pk, (size_t)shown);
        for (int i = 0; i < shown; i++) {
            msgpack_pack_map(&w.pk, 4);
            envelope_pack_str(&w.pk, "event_id");
            envelope_pack_str(&w.pk, PQgetvalue(res, i, 0));
            envelope_pack_str(&w.pk, "type");
            envelope_pack_str(&w.pk, PQgetvalue(res, i, 1));
            envelope_pack_str(&w.pk, "aggregate_id");
            envelope_pack_str(&w.pk, PQgetvalue(res, i, 2));
            envelope_pack_str(&w.pk, "event");
            envelope_pack_str(&w.pk, PQgetvalue(res, i, 3));
        }
    }
    void *bytes = envelope_finish(&w, &n);
    nngev_respond(rp->job, nngev_msg(bytes, n));
    free(bytes);
    free(rp);
}

/* The REP socket: pings, and replays of the events sent after a given id. */
static void
outbox_on_request(void *arg, struct nngev_job *job, nng_msg *msg)
{
    struct outbox *o = arg;
    struct envelope env;
    char after[ENVELOPE_ID_MAX] = "";
    enum envelope_error e = envelope_decode(&env, nng_msg_body(msg), nng_msg_len(msg));
    if (e == ENV_OK && strcmp(env.type, MSG_EVENTS_REPLAY) == 0 &&
        envelope_get_str(env.body, "after", after, sizeof(after)) == 0) {
        struct replay *rp = xcalloc(1, sizeof(*rp));
        rp->job = job;
        snprintf(rp->request_id, sizeof(rp->request_id), "%s", env.request_id);
        const char *params[1] = {after};
        /* Sent events only: the rest are on their way through PUB. An unknown
         * or empty id replays from the start of what is kept. */
        pgev_exec(o->pg,
                  "SELECT event_id, type, aggregate_id, payload::text FROM outbox"
                  " WHERE sent_at IS NOT NULL AND id > coalesce((SELECT id FROM outbox"
                  "  WHERE event_id = $1), 0) ORDER BY id LIMIT 501",
                  1, params, outbox_on_replay_rows, rp);
        envelope_free(&env);
        nng_msg_free(msg);
        return;
    }
    envelope_free(&env);
    nng_msg *reply = role_answer_ping(o->ctx, nng_msg_body(msg), nng_msg_len(msg));
    nng_msg_free(msg);
    nngev_respond(job, reply);
}

static void
outbox_on_open(evutil_socket_t fd, short what, void *arg)
{
    struct outbox *o = arg;
    (void)fd;
    (void)what;
    o->open = true;
    outbox_kick(o);
}

int
outbox_main(struct role_ctx *ctx)
{
    struct outbox o = {.ctx = ctx};
    const struct config *cfg = &ctx->cfg;
    nng_socket ping;
    char url[400];
    int rv;

    role_url(cfg, ROLE_OUTBOX, ctx->index, url, sizeof(url));
    if ((rv = nng_rep0_open(&ping)) != 0 || (rv = nng_listen(ping, url, NULL, 0)) != 0) {
        log_error("cannot listen at %s: %s", url, nng_strerror(rv));
        return EXIT_ROLE_FAILURE;
    }
    role_events_url(cfg, url, sizeof(url));
    /* PUB drops what a subscriber's queue cannot hold: the deepest queue
     * NNG allows rides out bursts (a backlog published after an outage). */
    if ((rv = nng_pub0_open(&o.pub)) != 0 ||
        (rv = nng_socket_set_int(o.pub, NNG_OPT_SENDBUF, OUTBOX_PUB_QUEUE)) != 0 ||
        (rv = nng_listen(o.pub, url, NULL, 0)) != 0) {
        log_error("cannot publish events at %s: %s", url, nng_strerror(rv));
        return EXIT_ROLE_FAILURE;
    }
    snprintf(o.lease, sizeof(o.lease), "%lld", (long long)cfg->outbox_lease_ms);
    o.pg = pgev_pool_new(ctx->base, cfg, 2);
    wake_url(cfg, url, sizeof(url));
    if ((rv = nng_pull0_open(&o.wake)) != 0 || (rv = nng_listen(o.wake, url, NULL, 0)) != 0) {
        log_error("cannot listen for wake-ups at %s: %s", url, nng_strerror(rv));
        return EXIT_ROLE_FAILURE;
    }
    nngev_receive(ctx->nngev, o.wake, outbox_on_wake, &o);
    role_events_url(cfg, url, sizeof(url));
    o.poll = event_new(ctx->base, -1, EV_PERSIST, outbox_on_poll, &o);
    struct timeval tv = {(time_t)(cfg->outbox_poll_ms / 1000),
                         (suseconds_t)((cfg->outbox_poll_ms % 1000) * 1000)};
    event_add(o.poll, &tv);
    struct event *open = evtimer_new(ctx->base, outbox_on_open, &o);
    struct timeval delay = {(time_t)(cfg->outbox_start_delay_ms / 1000),
                            (suseconds_t)((cfg->outbox_start_delay_ms % 1000) * 1000)};
    evtimer_add(open, &delay);
    o.deliver = deliver_start(ctx, o.pg);
    o.sweep = sweep_start(ctx, o.pg);
    nngev_serve(ctx->nngev, ping, 4, outbox_on_request, &o);
    log_info("publishing events at %s", url);
    role_ready(ctx);
    event_base_dispatch(ctx->base);
    sweep_stop(o.sweep);
    deliver_stop(o.deliver);
    event_free(o.poll);
    event_free(open);
    nng_close(o.wake);
    pgev_pool_free(o.pg);
    nng_close(o.pub);
    nng_close(ping);
    return 0;
}
