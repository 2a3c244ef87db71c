/* httputil: small helpers for libevent's evhttp servers; see httputil.c. */
#ifndef PAYMENTD_HTTPUTIL_H
#define PAYMENTD_HTTPUTIL_H

#include <event2/http.h>
#include <stdint.h>

/* Sends a JSON body with the given status. */
void http_reply_json(struct evhttp_request *req, int code, const char *json);
/* The text of a Stripe-shaped error body (free it). */
char *http_error_body(const char *type, const char *code, const char *message, const char *param);
/* Stripe-shaped error: {"error":{"type","code","message","param"}}; code/param may be NULL. */
void http_reply_error(struct evhttp_request *req, int status, const char *type, const char *code,
                      const char *message, const char *param);
int64_t http_now_us(void);

#endif
