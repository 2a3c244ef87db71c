/* breaker: the circuit breaker of a gateway provider, in shared memory (worker/ only). */
#ifndef PAYMENTD_WORKER_BREAKER_H
#define PAYMENTD_WORKER_BREAKER_H

#include <stdbool.h>

#include "shm.h"

/* May a call go to the provider now? *probe is set when this call is the
 * one half-open probe (its outcome must be reported with breaker_done). */
bool breaker_allow(struct shm_breaker *b, int64_t open_ms, bool *probe);
/* When a breaker opens: after `failures` consecutive failures, or when at
 * least BREAKER_MIN_CALLS calls within window_ms failed at rate_pct or more. */
struct breaker_policy {
    int failures;
    int rate_pct;
    int64_t window_ms;
};
#define BREAKER_MIN_CALLS 10

/* Reports a call's outcome: success, or a failure that counts (timeouts,
 * connection errors, 429 and 5xx; never a decline). */
void breaker_done(struct shm_breaker *b, bool success, bool probe,
                  const struct breaker_policy *policy, const char *provider);

#endif
