/* Unit tests for common/metrics.c: the shared-memory histogram and its rendering. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <event2/buffer.h>

#include "metrics.h"

static char *
render(const struct shm_segment *seg)
{
    struct evbuffer *buf = evbuffer_new();
    metrics_render(seg, "1.2.3", "abc", buf);
    size_t n = evbuffer_get_length(buf);
    char *text = malloc(n + 1);
    evbuffer_remove(buf, text, n);
    text[n] = '\0';
    evbuffer_free(buf);
    return text;
}

static void
expect_line(const char *text, const char *line)
{
    char *needle = malloc(strlen(line) + 3);
    strcpy(needle, "\n");
    strcat(needle, line);
    strcat(needle, "\n");
    if (!strstr(text, needle))
        fail_msg("missing line: %s", line);
    free(needle);
}

static void
test_histogram_buckets(void **state)
{
    (void)state;
    struct shm_segment *seg = calloc(1, sizeof(*seg));
    struct shm_metrics *m = &seg->slots[1].metrics;
    metric_http(m, MR_HEALTHZ, 200, 100);      /* <= 0.0005 */
    metric_http(m, MR_HEALTHZ, 200, 500);      /* <= 0.0005, bounds are inclusive */
    metric_http(m, MR_HEALTHZ, 200, 501);      /* <= 0.001 */
    metric_http(m, MR_HEALTHZ, 200, 3000000);  /* <= 5 */
    metric_http(m, MR_HEALTHZ, 503, 99000000); /* +Inf */
    const struct shm_histogram *h = &m->http_duration[MR_HEALTHZ];
    assert_int_equal(atomic_load(&h->buckets[0]), 2);
    assert_int_equal(atomic_load(&h->buckets[1]), 1);
    assert_int_equal(atomic_load(&h->buckets[METRIC_BUCKETS]), 1);
    assert_int_equal(atomic_load(&h->count), 5);
    assert_int_equal(atomic_load(&h->sum), 102001101);

    /* A second process's slot is summed in. */
    metric_http(&seg->slots[2].metrics, MR_HEALTHZ, 200, 700);

    char *text = render(seg);
    expect_line(text, "# TYPE paymentd_http_request_duration_seconds histogram");
    expect_line(
        text, "paymentd_http_request_duration_seconds_bucket{route=\"/healthz\",le=\"0.0005\"} 2");
    expect_line(text,
                "paymentd_http_request_duration_seconds_bucket{route=\"/healthz\",le=\"0.001\"} 4");
    expect_line(text,
                "paymentd_http_request_duration_seconds_bucket{route=\"/healthz\",le=\"2.5\"} 4");
    expect_line(text,
                "paymentd_http_request_duration_seconds_bucket{route=\"/healthz\",le=\"5\"} 5");
    expect_line(text,
                "paymentd_http_request_duration_seconds_bucket{route=\"/healthz\",le=\"+Inf\"} 6");
    expect_line(text, "paymentd_http_request_duration_seconds_sum{route=\"/healthz\"} 102.001801");
    expect_line(text, "paymentd_http_request_duration_seconds_count{route=\"/healthz\"} 6");
    expect_line(text, "paymentd_http_requests_total{route=\"/healthz\",code=\"200\"} 5");
    expect_line(text, "paymentd_http_requests_total{route=\"/healthz\",code=\"503\"} 1");
    expect_line(text, "paymentd_build_info{version=\"1.2.3\",commit=\"abc\"} 1");
    /* The TYPE line appears once per family, not once per label set. */
    char *first = strstr(text, "# TYPE paymentd_http_request_duration_seconds ");
    assert_non_null(first);
    assert_null(strstr(first + 1, "# TYPE paymentd_http_request_duration_seconds "));
    free(text);
    free(seg);
}

static void
test_amounts_and_payments(void **state)
{
    (void)state;
    struct shm_segment *seg = calloc(1, sizeof(*seg));
    struct shm_metrics *m = &seg->slots[5].metrics;
    metric_observe(&m->payment_amount, metric_bucket_bounds_amount, 2000);
    metric_observe(&m->payment_amount, metric_bucket_bounds_amount, 99);
    metric_payment(m, MP_SUCCEEDED);
    metric_payment(&seg->slots[6].metrics, MP_SUCCEEDED);
    metric_payment(m, MP_FAILED);
    atomic_store(&m->active_payments, 7);
    atomic_store(&seg->slots[6].metrics.active_payments, 3);
    char *text = render(seg);
    expect_line(text, "paymentd_payment_amount_bucket{le=\"100\"} 1");
    expect_line(text, "paymentd_payment_amount_bucket{le=\"2500\"} 2");
    expect_line(text, "paymentd_payment_amount_sum 2099");
    expect_line(text, "paymentd_payment_amount_count 2");
    expect_line(text, "paymentd_payments_total{status=\"succeeded\"} 2");
    expect_line(text, "paymentd_payments_total{status=\"failed\"} 1");
    expect_line(text, "paymentd_active_payments 10");
    free(text);
    free(seg);
}

static void
test_counters_and_roles(void **state)
{
    (void)state;
    struct shm_segment *seg = calloc(1, sizeof(*seg));
    metric_inc(&seg->slots[3].metrics, MC_IDEMPOTENT_REPLAYS);
    metric_inc(&seg->slots[4].metrics, MC_IDEMPOTENT_REPLAYS);
    atomic_store(&seg->slots[3].in_use, 1);
    atomic_store(&seg->slots[3].role, ROLE_WORKER);
    atomic_store(&seg->slots[3].index, 1);
    atomic_store(&seg->slots[3].pid, 1234);
    atomic_store(&seg->slots[3].ready, 1);
    atomic_store(&seg->slots[3].restarts, 3);
    atomic_store(&seg->slots[4].in_use, 1);
    atomic_store(&seg->slots[4].role, ROLE_WORKER);
    atomic_store(&seg->slots[4].index, 0);
    atomic_store(&seg->slots[4].restarts, 2);
    char *text = render(seg);
    expect_line(text, "paymentd_idempotent_replays_total 2");
    expect_line(text, "paymentd_role_up{role=\"worker\",index=\"1\"} 1");
    expect_line(text, "paymentd_role_up{role=\"worker\",index=\"0\"} 0");
    expect_line(text, "paymentd_role_restarts_total{role=\"worker\"} 5");
    free(text);
    free(seg);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_histogram_buckets),
        cmocka_unit_test(test_amounts_and_payments),
        cmocka_unit_test(test_counters_and_roles),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
