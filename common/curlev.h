/* curlev: libcurl's multi-socket interface on a libevent loop; see curlev.c. */
#ifndef PAYMENTD_CURLEV_H
#define PAYMENTD_CURLEV_H

#include <curl/curl.h>
#include <event2/event.h>
#include <stdbool.h>
#include <stddef.h>

struct curlev;

/* Called on the loop once per request. rc is libcurl's result; sent tells
 * whether the request was (at least partly) written to the peer, which
 * separates "certainly not received" from "maybe received". */
struct curlev_response {
    CURLcode rc;
    long status;
    const char *body;
    size_t len;
    int sent;
    const char *error;
    long retry_after_ms; /* the Retry-After header in milliseconds, or 0 */
};
typedef void (*curlev_cb)(void *arg, const struct curlev_response *resp);

struct curlev *curlev_new(struct event_base *base);
void curlev_free(struct curlev *c);

/* Starts an HTTP request; headers is NULL-terminated. body may be NULL (GET). */
void curlev_request(struct curlev *c, const char *method, const char *url,
                    const char *const *headers, const char *body, long timeout_ms, curlev_cb cb,
                    void *arg);
int curlev_in_flight(const struct curlev *c);
/* Refuse connections to loopback, link-local and private addresses. */
void curlev_set_deny_private(struct curlev *c, bool deny);

#endif
