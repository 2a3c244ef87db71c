/*
 * metrics - the fixed metric catalog kept in shared memory, and its
 * Prometheus rendering.
 *
 * Offers metric_inc()/metric_payment() (header), metric_observe(),
 * metric_observe_us(), metric_http() and metrics_render(). Each process
 * writes only its own slot with relaxed atomic adds; the exporter sums the
 * slots when scraped, so a restarted process keeps the totals of its slot
 * and counters never go backwards. Histograms have fixed buckets, stored per
 * bucket and rendered cumulatively; durations are kept in integer
 * microseconds and printed as seconds with six decimals, amounts in minor
 * units, so no floating point is involved. Calls shm, libevent buffers.
 */
#include "metrics.h"

#include <inttypes.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

const uint64_t metric_bucket_bounds_us[METRIC_BUCKETS] = {
    500,    1000,   2500,   5000,    10000,   25000,   50000,
    100000, 250000, 500000, 1000000, 2500000, 5000000, 10000000};

const uint64_t metric_bucket_bounds_amount[METRIC_BUCKETS] = {
    100,   500,    1000,   2500,   5000,    10000,   25000,
    50000, 100000, 250000, 500000, 1000000, 5000000, 10000000};

static const int metric_codes[METRIC_CODES - 1] = {200, 400, 401, 402, 404, 405,
                                                   409, 413, 429, 500, 503};

static const char *const route_names[MR__COUNT] = {
    [MR_HEALTHZ] = "/healthz",
    [MR_READYZ] = "/readyz",
    [MR_METRICS] = "/metrics",
    [MR_PI_CREATE] = "payment_intents.create",
    [MR_PI_RETRIEVE] = "payment_intents.retrieve",
    [MR_PI_UPDATE] = "payment_intents.update",
    [MR_PI_LIST] = "payment_intents.list",
    [MR_PI_CONFIRM] = "payment_intents.confirm",
    [MR_PI_CAPTURE] = "payment_intents.capture",
    [MR_PI_CANCEL] = "payment_intents.cancel",
    [MR_EVENTS_LIST] = "events.list",
    [MR_EVENTS_RETRIEVE] = "events.retrieve",
    [MR_OTHER] = "other",
};

static const char *const payment_names[MP__COUNT] = {
    [MP_SUCCEEDED] = "succeeded",
    [MP_FAILED] = "failed",
    [MP_REQUIRES_ACTION] = "requires_action",
    [MP_REQUIRES_CAPTURE] = "requires_capture",
    [MP_CANCELED] = "canceled",
};

struct counter_desc {
    const char *name;
    const char *help;
    const char *labels; /* NULL or "{...}"; entries of one family are adjacent */
};

static const struct counter_desc counter_catalog[MC__COUNT] = {
    [MC_NNG_PINGS_ANSWERED] = {"paymentd_nng_pings_answered_total",
                               "Pings answered over NNG by workers and the outbox.", NULL},
    [MC_ENVELOPES_REJECTED] = {"paymentd_envelopes_rejected_total",
                               "Messages dropped at the border as malformed.", NULL},
    [MC_IDEMPOTENT_REPLAYS] = {"paymentd_idempotent_replays_total",
                               "Responses replayed for a repeated Idempotency-Key.", NULL},
    [MC_IDEMPOTENT_CONFLICTS] = {"paymentd_idempotent_conflicts_total",
                                 "Requests refused because their key was in flight (409).", NULL},
    [MC_SAGA_RECEIVED] = {"paymentd_saga_messages_received_total",
                          "InventoryReserved messages accepted at the intake.", NULL},
    [MC_SAGA_REJECTED] = {"paymentd_saga_messages_rejected_total",
                          "Intake messages dropped as malformed.", NULL},
    [MC_EVENTS_PUBLISHED_NNG] = {"paymentd_events_published_total", "Events published, by sink.",
                                 "{sink=\"nng\"}"},
    [MC_EVENTS_PUBLISH_FAILED_NNG] = {"paymentd_events_publish_failures_total",
                                      "Events a sink did not accept (retried later), by sink.",
                                      "{sink=\"nng\"}"},
    [MC_WEBHOOK_ATTEMPTS] = {"paymentd_webhook_delivery_attempts_total",
                             "Webhook deliveries tried.", NULL},
    [MC_WEBHOOK_FAILURES] = {"paymentd_webhook_delivery_failures_total",
                             "Webhook delivery tries that did not get a 2xx in time.", NULL},
    [MC_PAYMENTS_REDRIVEN] =
        {"paymentd_payments_redriven_total",
         "Payments left processing past their lease and sent to a worker again.", NULL},
    [MC_INTENTS_EXPIRED] = {"paymentd_intents_expired_total",
                            "Open payment intents canceled at expires_at.", NULL},
    [MC_IDEMPOTENCY_KEYS_REMOVED] = {"paymentd_idempotency_keys_removed_total",
                                     "Idempotency keys removed after 24 hours.", NULL},
    [MC_GATEWAY_FAILOVERS] = {"paymentd_gateway_failovers_total",
                              "Payments moved to the next gateway provider (the previous one "
                              "certainly did not take them).",
                              NULL},
#define RATE_LIMITED "paymentd_rate_limited_total", "Requests answered 429, by route class."
    [MC_RATE_LIMITED_WRITE] = {RATE_LIMITED, "{class=\"write\"}"},
    [MC_RATE_LIMITED_READ] = {RATE_LIMITED, "{class=\"read\"}"},
    [MC_RATE_LIMITED_CALLBACK] = {RATE_LIMITED, "{class=\"callback\"}"},
    [MC_RATE_LIMITED_AUTH] = {RATE_LIMITED, "{class=\"auth_failures\"}"},
#define RATE_LOCAL                                                                                 \
    "paymentd_rate_limit_local_total",                                                             \
        "Rate-limit decisions taken by the process alone because Redis was unavailable."
    [MC_RATE_LIMIT_LOCAL] = {RATE_LOCAL, NULL},
#define CALLBACKS "paymentd_gateway_callbacks_total", "Inbound gateway callbacks, by result."
    [MC_CALLBACKS_APPLIED] = {CALLBACKS, "{result=\"applied\"}"},
    [MC_CALLBACKS_DUPLICATE] = {CALLBACKS, "{result=\"duplicate\"}"},
    [MC_CALLBACKS_IGNORED] = {CALLBACKS, "{result=\"ignored_final_state\"}"},
    [MC_CALLBACKS_REJECTED] = {CALLBACKS, "{result=\"rejected\"}"},
    [MC_AUTH_FAILURES] = {"paymentd_auth_failures_total",
                          "Requests refused for a missing, unknown or invalid credential.", NULL},
#define REFUNDS "paymentd_refunds_total", "Refunds that reached a final state, by state."
    [MC_REFUNDS_SUCCEEDED] = {REFUNDS, "{status=\"succeeded\"}"},
    [MC_REFUNDS_FAILED] = {REFUNDS, "{status=\"failed\"}"},
    [MC_REFUNDS_CANCELED] = {REFUNDS, "{status=\"canceled\"}"},
};

void
metric_observe(struct shm_histogram *h, const uint64_t *bounds, uint64_t value)
{
    int b = 0;
    while (b < METRIC_BUCKETS && value > bounds[b])
        b++;
    atomic_fetch_add_explicit(&h->buckets[b], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&h->sum, value, memory_order_relaxed);
    atomic_fetch_add_explicit(&h->count, 1, memory_order_relaxed);
}

void
metric_observe_us(struct shm_metrics *m, enum metric_histogram h, uint64_t us)
{
    metric_observe(&m->hist[h], metric_bucket_bounds_us, us);
}

void
metric_http(struct shm_metrics *m, enum metric_route route, int status, uint64_t us)
{
    int c = 0;
    while (c < METRIC_CODES - 1 && metric_codes[c] != status)
        c++;
    atomic_fetch_add_explicit(&m->http_requests[route][c], 1, memory_order_relaxed);
    metric_observe(&m->http_duration[route], metric_bucket_bounds_us, us);
}

/* ---- rendering ---- */

static void
metrics_seconds(char *buf, size_t cap, uint64_t us)
{
    snprintf(buf, cap, "%" PRIu64 ".%06" PRIu64, us / 1000000, us % 1000000);
    /* Trim trailing zeros for readability: 0.500000 -> 0.5, 1.000000 -> 1 */
    char *dot = strchr(buf, '.');
    char *end = buf + strlen(buf) - 1;
    while (end > dot && *end == '0')
        *end-- = '\0';
    if (end == dot)
        *end = '\0';
}

static void
metrics_header(struct evbuffer *out, const char *name, const char *help, const char *type)
{
    evbuffer_add_printf(out, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* Sums one histogram over every slot; pick() finds it in a slot. */
typedef const struct shm_histogram *(*hist_pick)(const struct shm_metrics *m, int arg);

static void
metrics_histogram(const struct shm_segment *seg, struct evbuffer *out, const char *name,
                  const char *labels, hist_pick pick, int arg, bool seconds)
{
    uint64_t buckets[METRIC_BUCKETS + 1] = {0}, sum = 0, cum = 0;
    const uint64_t *bounds = seconds ? metric_bucket_bounds_us : metric_bucket_bounds_amount;
    char le[32], total[32];
    for (int i = 0; i < SHM_MAX_SLOTS; i++) {
        const struct shm_histogram *h = pick(&seg->slots[i].metrics, arg);
        for (int b = 0; b <= METRIC_BUCKETS; b++)
            buckets[b] += atomic_load_explicit(&h->buckets[b], memory_order_relaxed);
        sum += atomic_load_explicit(&h->sum, memory_order_relaxed);
    }
    const char *sep = labels[0] ? "," : "";
    for (int b = 0; b <= METRIC_BUCKETS; b++) {
        cum += buckets[b];
        if (b == METRIC_BUCKETS)
            strcpy(le, "+Inf");
        else if (seconds)
            metrics_seconds(le, sizeof(le), bounds[b]);
        else
            snprintf(le, sizeof(le), "%" PRIu64, bounds[b]);
        evbuffer_add_printf(out, "%s_bucket{%s%sle=\"%s\"} %" PRIu64 "\n", name, labels, sep, le,
                            cum);
    }
    if (seconds)
        metrics_seconds(total, sizeof(total), sum);
    else
        snprintf(total, sizeof(total), "%" PRIu64, sum);
    /* _count equals the +Inf bucket by construction, even mid-update. */
    evbuffer_add_printf(out, "%s_sum%s%s%s %s\n", name, labels[0] ? "{" : "", labels,
                        labels[0] ? "}" : "", total);
    evbuffer_add_printf(out, "%s_count%s%s%s %" PRIu64 "\n", name, labels[0] ? "{" : "", labels,
                        labels[0] ? "}" : "", cum);
}

static const struct shm_histogram *
pick_http(const struct shm_metrics *m, int route)
{
    return &m->http_duration[route];
}

static const struct shm_histogram *
pick_hist(const struct shm_metrics *m, int h)
{
    return &m->hist[h];
}

static const struct shm_histogram *
pick_amount(const struct shm_metrics *m, int refunds)
{
    return refunds ? &m->refund_amount : &m->payment_amount;
}

static void
metrics_render_roles(const struct shm_segment *seg, struct evbuffer *out)
{
    uint64_t restarts[ROLE__COUNT] = {0};
    bool present[ROLE__COUNT] = {false};

    metrics_header(out, "paymentd_role_up", "1 when the role process is running and ready.",
                   "gauge");
    for (int i = 0; i < SHM_MAX_SLOTS; i++) {
        const struct shm_slot *s = &seg->slots[i];
        if (atomic_load(&s->in_use) != 1)
            continue;
        uint32_t role = atomic_load(&s->role);
        if (role >= ROLE__COUNT || role == ROLE_SUPERVISOR)
            continue;
        int up = atomic_load(&s->pid) > 0 && atomic_load(&s->ready) == 1;
        evbuffer_add_printf(out, "paymentd_role_up{role=\"%s\",index=\"%u\"} %d\n",
                            shm_role_name((enum role_kind)role), atomic_load(&s->index), up);
        restarts[role] += atomic_load(&s->restarts);
        present[role] = true;
    }
    metrics_header(out, "paymentd_role_restarts_total",
                   "Restarts of role processes by the supervisor.", "counter");
    for (int r = ROLE_API; r < ROLE__COUNT; r++) {
        if (present[r])
            evbuffer_add_printf(out, "paymentd_role_restarts_total{role=\"%s\"} %" PRIu64 "\n",
                                shm_role_name((enum role_kind)r), restarts[r]);
    }
}

static uint64_t
metrics_sum(const struct shm_segment *seg, size_t offset)
{
    uint64_t total = 0;
    for (int i = 0; i < SHM_MAX_SLOTS; i++) {
        const char *base = (const char *)&seg->slots[i].metrics;
        total +=
            atomic_load_explicit((const _Atomic uint64_t *)(base + offset), memory_order_relaxed);
    }
    return total;
}

static void
metrics_render_http(const struct shm_segment *seg, struct evbuffer *out)
{
    char labels[96];
    metrics_header(out, "paymentd_http_requests_total", "HTTP requests answered.", "counter");
    for (int r = 0; r < MR__COUNT; r++) {
        for (int c = 0; c < METRIC_CODES; c++) {
            uint64_t n =
                metrics_sum(seg, offsetof(struct shm_metrics, http_requests) +
                                     ((size_t)r * METRIC_CODES + (size_t)c) * sizeof(uint64_t));
            if (n == 0)
                continue;
            char code[8];
            if (c < METRIC_CODES - 1)
                snprintf(code, sizeof(code), "%d", metric_codes[c]);
            else
                strcpy(code, "other");
            evbuffer_add_printf(
                out, "paymentd_http_requests_total{route=\"%s\",code=\"%s\"} %" PRIu64 "\n",
                route_names[r], code, n);
        }
    }
    metrics_header(out, "paymentd_http_request_duration_seconds", "Time from request to response.",
                   "histogram");
    for (int r = 0; r < MR__COUNT; r++) {
        snprintf(labels, sizeof(labels), "route=\"%s\"", route_names[r]);
        metrics_histogram(seg, out, "paymentd_http_request_duration_seconds", labels, pick_http, r,
                          true);
    }
}

static void
metrics_render_payments(const struct shm_segment *seg, struct evbuffer *out)
{
    metrics_header(out, "paymentd_payments_total", "Payments that reached a state, by state.",
                   "counter");
    for (int p = 0; p < MP__COUNT; p++)
        evbuffer_add_printf(out, "paymentd_payments_total{status=\"%s\"} %" PRIu64 "\n",
                            payment_names[p],
                            metrics_sum(seg, offsetof(struct shm_metrics, payments) +
                                                 (size_t)p * sizeof(uint64_t)));
    metrics_header(out, "paymentd_payment_duration_seconds",
                   "Time from the creation of a payment to its final state.", "histogram");
    metrics_histogram(seg, out, "paymentd_payment_duration_seconds", "", pick_hist,
                      MH_PAYMENT_DURATION, true);
    metrics_header(out, "paymentd_payment_amount",
                   "Amounts of succeeded payments, in the currency's minor unit.", "histogram");
    metrics_histogram(seg, out, "paymentd_payment_amount", "", pick_amount, 0, false);
    metrics_header(out, "paymentd_refund_amount",
                   "Amounts of succeeded refunds, in the currency's minor unit.", "histogram");
    metrics_histogram(seg, out, "paymentd_refund_amount", "", pick_amount, 1, false);
    metrics_header(out, "paymentd_gateway_request_duration_seconds",
                   "Duration of one gateway HTTP call.", "histogram");
    metrics_histogram(seg, out, "paymentd_gateway_request_duration_seconds", "provider=\"sim\"",
                      pick_hist, MH_GATEWAY_SIM, true);
    int64_t active = 0;
    for (int i = 0; i < SHM_MAX_SLOTS; i++)
        active +=
            atomic_load_explicit(&seg->slots[i].metrics.active_payments, memory_order_relaxed);
    metrics_header(out, "paymentd_active_payments", "Gateway jobs in flight in the workers.",
                   "gauge");
    evbuffer_add_printf(out, "paymentd_active_payments %" PRId64 "\n", active);
}

void
metrics_render(const struct shm_segment *seg, const char *version, const char *commit,
               struct evbuffer *out)
{
    metrics_header(out, "paymentd_build_info", "Build of the running paymentd.", "gauge");
    evbuffer_add_printf(out, "paymentd_build_info{version=\"%s\",commit=\"%s\"} 1\n", version,
                        commit);
    metrics_render_roles(seg, out);
    for (int c = 0; c < MC__COUNT; c++) {
        const struct counter_desc *d = &counter_catalog[c];
        if (c == 0 || strcmp(counter_catalog[c - 1].name, d->name) != 0)
            metrics_header(out, d->name, d->help, "counter");
        evbuffer_add_printf(out, "%s%s %" PRIu64 "\n", d->name, d->labels ? d->labels : "",
                            metrics_sum(seg, offsetof(struct shm_metrics, counters) +
                                                 (size_t)c * sizeof(uint64_t)));
    }
    int64_t pending = 0, oldest = 0;
    for (int i = 0; i < SHM_MAX_SLOTS; i++) {
        const struct shm_metrics *m = &seg->slots[i].metrics;
        int64_t p = atomic_load_explicit(&m->events_pending, memory_order_relaxed);
        int64_t o = atomic_load_explicit(&m->events_oldest_age_s, memory_order_relaxed);
        pending = p > pending ? p : pending; /* every dispatcher sees the same table */
        oldest = o > oldest ? o : oldest;
    }
    static const char *const checks[SHM_CONSISTENCY_CHECKS] = {
        "succeeded_without_transaction", "amount_received_mismatch",
        "processing_without_one_attempt", "stray_open_charges"};
    int64_t bad[SHM_CONSISTENCY_CHECKS] = {0};
    for (int i = 0; i < SHM_MAX_SLOTS; i++)
        for (int k = 0; k < SHM_CONSISTENCY_CHECKS; k++) {
            int64_t v =
                atomic_load_explicit(&seg->slots[i].metrics.inconsistent[k], memory_order_relaxed);
            bad[k] = v > bad[k] ? v : bad[k];
        }
    metrics_header(out, "paymentd_consistency_violations",
                   "Rows failing a consistency check at its last run, by check.", "gauge");
    for (int k = 0; k < SHM_CONSISTENCY_CHECKS; k++)
        evbuffer_add_printf(out, "paymentd_consistency_violations{check=\"%s\"} %" PRId64 "\n",
                            checks[k], bad[k]);
    metrics_header(out, "paymentd_circuit_breaker_state",
                   "Gateway circuit breaker: 0 closed, 1 open, 2 half-open.", "gauge");
    for (int i = 0; i < SHM_MAX_BREAKERS && seg->breakers[i].provider[0]; i++)
        evbuffer_add_printf(out, "paymentd_circuit_breaker_state{provider=\"%s\"} %u\n",
                            seg->breakers[i].provider, atomic_load(&seg->breakers[i].state));
    metrics_header(out, "paymentd_circuit_breaker_opened_total",
                   "Times the gateway circuit breaker opened.", "counter");
    for (int i = 0; i < SHM_MAX_BREAKERS && seg->breakers[i].provider[0]; i++)
        evbuffer_add_printf(out,
                            "paymentd_circuit_breaker_opened_total{provider=\"%s\"} %" PRIu64 "\n",
                            seg->breakers[i].provider, atomic_load(&seg->breakers[i].opened_total));
    metrics_header(out, "paymentd_events_pending", "Events written and not yet published.",
                   "gauge");
    evbuffer_add_printf(out, "paymentd_events_pending %" PRId64 "\n", pending);
    metrics_header(out, "paymentd_events_oldest_pending_age_seconds",
                   "Age of the oldest event not yet published.", "gauge");
    evbuffer_add_printf(out, "paymentd_events_oldest_pending_age_seconds %" PRId64 "\n", oldest);
    metrics_render_http(seg, out);
    metrics_render_payments(seg, out);
}
