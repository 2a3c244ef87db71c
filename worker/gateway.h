/* gateway: the adapter interface every payment gateway provider implements (worker/ only). */
#ifndef PAYMENTD_WORKER_GATEWAY_H
#define PAYMENTD_WORKER_GATEWAY_H

#include <stdbool.h>
#include <stdint.h>

#include "curlev.h"

enum gw_outcome {
    GW_SUCCEEDED,        /* charged, or captured */
    GW_REQUIRES_CAPTURE, /* authorized, waiting for capture */
    GW_REQUIRES_ACTION,  /* the customer must authenticate */
    GW_DECLINED,         /* a definite no: never retried */
    GW_CANCELED,         /* authorization voided */
    GW_NOT_PROCESSED, /* certainly not received: connection refused, 503 before processing, 429 */
    GW_AMBIGUOUS,     /* maybe received: timeout or reset after sending */
    GW_REJECTED,      /* another 4xx: the request itself was wrong */
    GW_PENDING,       /* accepted; the outcome comes later by callback */
    GW_NOT_FOUND,     /* a retrieve: the gateway never saw this key (or charge) */
};

enum gw_op {
    GW_CHARGE,
    GW_CAPTURE,
    GW_CANCEL,
    GW_RETRIEVE,
    GW_REFUND,
    GW_REFUND_CANCEL,   /* charge_id: the gateway's refund id */
    GW_RETRIEVE_REFUND, /* by refund id (charge_id) when set, else by idempotency key */
};

struct gw_request {
    enum gw_op op;
    const char *idempotency_key; /* the attempt's own key (for a retrieve: what to look up) */
    int64_t amount;
    const char *currency;
    const char *payment_method;
    bool capture;          /* charge: capture at once (automatic) or only authorize (manual) */
    const char *charge_id; /* capture, cancel, refund; a retrieve by charge id when set */
};

/* For a refund (GW_REFUND, GW_REFUND_CANCEL, GW_RETRIEVE_REFUND) the outcome
 * is the refund's status: succeeded, pending, canceled, or declined (failed,
 * with its failure_reason in code); charge_id is then the refund's id. */
struct gw_result {
    enum gw_outcome outcome;
    char charge_id[64];
    int64_t amount;
    char code[64];
    char decline_code[64];
    char message[256];
    long retry_after_ms;
};

typedef void (*gw_cb)(void *arg, const struct gw_result *res);

struct gateway {
    const char *name;
    void (*call)(struct gateway *gw, const struct gw_request *req, gw_cb cb, void *arg);
    void (*free)(struct gateway *gw);
    void *impl;
};

/* A gatewaysim-compatible provider called `name` at base_url; key, when
 * not empty, is sent as a Bearer token. */
struct gateway *gateway_sim_new(struct curlev *curl, const char *name, const char *base_url,
                                const char *key, long timeout_ms);
const char *gateway_outcome_name(enum gw_outcome o);

#endif
