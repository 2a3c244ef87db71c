/*
 * metrics - the fixed metric catalog kept in shared memory, and its
 * Prometheus rendering.
 *
 * Offers metric_inc() (header), metric_observe_us() and metrics_render().
 * Each process writes only its own slot with relaxed atomic adds; the
 * exporter sums the slots when scraped, so a restarted process keeps the
 * totals of its slot and counters never go backwards. Histograms have fixed
 * buckets in microseconds, stored per bucket and rendered cumulatively; the
 * sum is kept in integer microseconds and printed as seconds with six
 * decimals, so no floating point is involved. Calls shm, libevent buffers.
 */
#include "metrics.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

const uint64_t metric_bucket_bounds_us[METRIC_BUCKETS] = {
    500,    1000,   2500,   5000,    10000,   25000,   50000,
    100000, 250000, 500000, 1000000, 2500000, 5000000, 10000000};

struct counter_desc {
    const char *name;
    const char *help;
    const char *labels;
};

static const struct counter_desc counter_catalog[MC__COUNT] = {
    [MC_HTTP_HEALTHZ_200] = {"paymentd_http_requests_total", "HTTP requests answered.",
                             "route=\"/healthz\",code=\"200\""},
    [MC_HTTP_READYZ_200] = {"paymentd_http_requests_total", NULL, "route=\"/readyz\",code=\"200\""},
    [MC_HTTP_READYZ_503] = {"paymentd_http_requests_total", NULL, "route=\"/readyz\",code=\"503\""},
    [MC_HTTP_METRICS_200] = {"paymentd_http_requests_total", NULL,
                             "route=\"/metrics\",code=\"200\""},
    [MC_HTTP_NOT_FOUND] = {"paymentd_http_requests_total", NULL, "route=\"other\",code=\"404\""},
    [MC_NNG_PINGS_ANSWERED] = {"paymentd_nng_pings_answered_total",
                               "Pings answered over NNG by workers and the outbox.", ""},
    [MC_ENVELOPES_REJECTED] = {"paymentd_envelopes_rejected_total",
                               "Messages dropped at the border as malformed.", ""},
};

static const struct counter_desc hist_catalog[MH__COUNT] = {
    [MH_HTTP_HEALTHZ] = {"paymentd_http_request_duration_seconds", "Time from request to response.",
                         "route=\"/healthz\""},
    [MH_HTTP_READYZ] = {"paymentd_http_request_duration_seconds", NULL, "route=\"/readyz\""},
    [MH_HTTP_METRICS] = {"paymentd_http_request_duration_seconds", NULL, "route=\"/metrics\""},
};

void
metric_observe_us(struct shm_metrics *m, enum metric_histogram h, uint64_t us)
{
    struct shm_histogram *hist = &m->hist[h];
    int b = 0;
    while (b < METRIC_BUCKETS && us > metric_bucket_bounds_us[b])
        b++;
    atomic_fetch_add_explicit(&hist->buckets[b], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&hist->sum_us, us, memory_order_relaxed);
    atomic_fetch_add_explicit(&hist->count, 1, memory_order_relaxed);
}

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

static void
metrics_render_counters(const struct shm_segment *seg, struct evbuffer *out)
{
    for (int c = 0; c < MC__COUNT; c++) {
        const struct counter_desc *d = &counter_catalog[c];
        uint64_t total = 0;
        for (int i = 0; i < SHM_MAX_SLOTS; i++)
            total += atomic_load_explicit(&seg->slots[i].metrics.counters[c], memory_order_relaxed);
        if (d->help)
            metrics_header(out, d->name, d->help, "counter");
        if (d->labels[0])
            evbuffer_add_printf(out, "%s{%s} %" PRIu64 "\n", d->name, d->labels, total);
        else
            evbuffer_add_printf(out, "%s %" PRIu64 "\n", d->name, total);
    }
}

static void
metrics_render_histograms(const struct shm_segment *seg, struct evbuffer *out)
{
    char le[32], sum[32];
    for (int h = 0; h < MH__COUNT; h++) {
        const struct counter_desc *d = &hist_catalog[h];
        uint64_t buckets[METRIC_BUCKETS + 1] = {0}, total_sum = 0, count = 0, cum = 0;
        for (int i = 0; i < SHM_MAX_SLOTS; i++) {
            const struct shm_histogram *hs = &seg->slots[i].metrics.hist[h];
            for (int b = 0; b <= METRIC_BUCKETS; b++)
                buckets[b] += atomic_load_explicit(&hs->buckets[b], memory_order_relaxed);
            total_sum += atomic_load_explicit(&hs->sum_us, memory_order_relaxed);
        }
        if (d->help)
            metrics_header(out, d->name, d->help, "histogram");
        for (int b = 0; b <= METRIC_BUCKETS; b++) {
            cum += buckets[b];
            if (b < METRIC_BUCKETS)
                metrics_seconds(le, sizeof(le), metric_bucket_bounds_us[b]);
            else
                strcpy(le, "+Inf");
            evbuffer_add_printf(out, "%s_bucket{%s,le=\"%s\"} %" PRIu64 "\n", d->name, d->labels,
                                le, cum);
        }
        /* _count equals the +Inf bucket by construction, even mid-update. */
        count = cum;
        metrics_seconds(sum, sizeof(sum), total_sum);
        evbuffer_add_printf(out, "%s_sum{%s} %s\n", d->name, d->labels, sum);
        evbuffer_add_printf(out, "%s_count{%s} %" PRIu64 "\n", d->name, d->labels, count);
    }
}

void
metrics_render(const struct shm_segment *seg, const char *version, const char *commit,
               struct evbuffer *out)
{
    metrics_header(out, "paymentd_build_info", "Build of the running paymentd.", "gauge");
    evbuffer_add_printf(out, "paymentd_build_info{version=\"%s\",commit=\"%s\"} 1\n", version,
                        commit);
    metrics_render_roles(seg, out);
    metrics_render_counters(seg, out);
    metrics_render_histograms(seg, out);
}
