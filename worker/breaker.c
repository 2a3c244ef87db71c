/*
 * breaker - the circuit breaker of one gateway provider, kept in shared
 * memory so that every worker process sees one state. It opens on a run of
 * consecutive failures, or on a failure rate over a window with enough
 * calls in it (a gateway failing one call in two never makes a run).
 *
 * Offers breaker_allow() and breaker_done(). Closed: calls go through, and
 * BREAKER_FAILURES consecutive failures open it. Open: calls are refused at
 * once (the payment stays processing and is finished later, never failed
 * over after an ambiguous answer) until BREAKER_OPEN_MS have passed; then
 * exactly one worker wins a compare-and-swap on the probe token and sends
 * one probe (half-open): success closes the breaker, failure opens it again.
 * Only C11 atomics: a worker that dies mid-probe leaves a token that the
 * next open period clears. Calls shm, log.
 */
#include "breaker.h"

#include "log.h"

static const char *const breaker_names[] = {"closed", "open", "half-open"};

static void
breaker_set(struct shm_breaker *b, uint32_t from, uint32_t to, const char *provider)
{
    if (atomic_compare_exchange_strong(&b->state, &from, to)) {
        if (to == BREAKER_OPEN) {
            atomic_store(&b->opened_ms, shm_now_ms());
            atomic_fetch_add(&b->opened_total, 1);
        }
        log_warn("circuit breaker %s: %s -> %s", provider, breaker_names[from], breaker_names[to]);
    }
}

bool
breaker_allow(struct shm_breaker *b, int64_t open_ms, bool *probe)
{
    *probe = false;
    uint32_t state = atomic_load(&b->state);
    if (state == BREAKER_CLOSED)
        return true;
    int64_t since = shm_now_ms() - atomic_load(&b->opened_ms);
    if (state == BREAKER_OPEN && since < open_ms)
        return false;
    /* Open long enough, or half-open: one probe at a time. A probe token
     * older than an open period belongs to a worker that died: take it. */
    uint32_t free_token = 0;
    if (!atomic_compare_exchange_strong(&b->probe, &free_token, 1)) {
        if (since < 2 * open_ms)
            return false;
        atomic_store(&b->probe, 1);
    }
    uint32_t open = BREAKER_OPEN;
    atomic_compare_exchange_strong(&b->state, &open, BREAKER_HALF_OPEN);
    *probe = true;
    return true;
}

/* Counts the call in the current window (a new window starts once the
 * old one is over; whoever wins the compare-and-swap resets the counts). */
static bool
breaker_rate_exceeded(struct shm_breaker *b, bool success, const struct breaker_policy *p)
{
    int64_t now = shm_now_ms(), start = atomic_load(&b->window_start_ms);
    if (now - start >= p->window_ms &&
        atomic_compare_exchange_strong(&b->window_start_ms, &start, now)) {
        atomic_store(&b->window_calls, 0);
        atomic_store(&b->window_failures, 0);
    }
    uint32_t calls = atomic_fetch_add(&b->window_calls, 1) + 1;
    uint32_t failed =
        success ? atomic_load(&b->window_failures) : atomic_fetch_add(&b->window_failures, 1) + 1;
    return !success && calls >= BREAKER_MIN_CALLS &&
           (uint64_t)failed * 100 >= (uint64_t)p->rate_pct * calls;
}

void
breaker_done(struct shm_breaker *b, bool success, bool probe, const struct breaker_policy *policy,
             const char *provider)
{
    bool rate = breaker_rate_exceeded(b, success, policy);
    if (success) {
        atomic_store(&b->failures, 0);
        if (probe)
            breaker_set(b, BREAKER_HALF_OPEN, BREAKER_CLOSED, provider);
    } else {
        uint32_t n = atomic_fetch_add(&b->failures, 1) + 1;
        if (probe)
            breaker_set(b, BREAKER_HALF_OPEN, BREAKER_OPEN, provider);
        else if (n >= (uint32_t)policy->failures || rate)
            breaker_set(b, BREAKER_CLOSED, BREAKER_OPEN, provider);
    }
    if (probe)
        atomic_store(&b->probe, 0);
}
