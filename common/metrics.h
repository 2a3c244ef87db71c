/* metrics: the metric catalog, updates and Prometheus rendering; see metrics.c. */
#ifndef PAYMENTD_METRICS_H
#define PAYMENTD_METRICS_H

#include <event2/buffer.h>
#include <stdatomic.h>
#include <stdint.h>

#include "shm.h"

extern const uint64_t metric_bucket_bounds_us[METRIC_BUCKETS];
extern const uint64_t metric_bucket_bounds_amount[METRIC_BUCKETS];

static inline void
metric_inc(struct shm_metrics *m, enum metric_counter c)
{
    atomic_fetch_add_explicit(&m->counters[c], 1, memory_order_relaxed);
}

static inline void
metric_payment(struct shm_metrics *m, enum metric_payment p)
{
    atomic_fetch_add_explicit(&m->payments[p], 1, memory_order_relaxed);
}

/* Adds one observation to a histogram with the given bucket bounds. */
void metric_observe(struct shm_histogram *h, const uint64_t *bounds, uint64_t value);
void metric_observe_us(struct shm_metrics *m, enum metric_histogram h, uint64_t us);
/* Counts one HTTP answer and its latency. */
void metric_http(struct shm_metrics *m, enum metric_route route, int status, uint64_t us);

/* Renders every metric of the segment in Prometheus text format 0.0.4. */
void metrics_render(const struct shm_segment *seg, const char *version, const char *commit,
                    struct evbuffer *out);

#endif
