/* shm: the per-instance shared-memory segment; see shm.c. */
#ifndef PAYMENTD_SHM_H
#define PAYMENTD_SHM_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define SHM_MAGIC          0x50415944u /* "PAYD" */
#define SHM_LAYOUT_VERSION 12u
#define SHM_MAX_SLOTS      72 /* supervisor + 32 api + 32 workers + outbox + exporter + spare */

enum role_kind { ROLE_SUPERVISOR, ROLE_API, ROLE_WORKER, ROLE_OUTBOX, ROLE_EXPORTER, ROLE__COUNT };

/* Slot states, written by the supervisor. */
enum slot_state {
    SLOT_EMPTY,
    SLOT_STARTING, /* forked, not yet reported ready */
    SLOT_RUNNING,  /* reported ready */
    SLOT_STOPPING, /* asked to stop */
    SLOT_STOPPED,  /* stopped by an operator or by drain */
    SLOT_BACKOFF,  /* died, waiting for its restart */
    SLOT_FAILED,   /* crashed too often, or exited with code 2; left down */
    SLOT__COUNT
};

#define SHM_EXIT_NONE INT32_MIN

/* ---- metrics catalog: fixed at compile time, one copy per slot ---- */

enum metric_counter {
    MC_NNG_PINGS_ANSWERED,
    MC_ENVELOPES_REJECTED,
    MC_IDEMPOTENT_REPLAYS,
    MC_IDEMPOTENT_CONFLICTS,
    MC_SAGA_RECEIVED,
    MC_SAGA_REJECTED,
    MC_EVENTS_PUBLISHED_NNG,
    MC_EVENTS_PUBLISH_FAILED_NNG,
    MC_WEBHOOK_ATTEMPTS,
    MC_WEBHOOK_FAILURES,
    MC_PAYMENTS_REDRIVEN,
    MC_INTENTS_EXPIRED,
    MC_IDEMPOTENCY_KEYS_REMOVED,
    MC_GATEWAY_FAILOVERS,
    MC_RATE_LIMITED_WRITE,
    MC_RATE_LIMITED_READ,
    MC_RATE_LIMITED_CALLBACK,
    MC_RATE_LIMITED_AUTH,
    MC_RATE_LIMIT_LOCAL,
    MC_CALLBACKS_APPLIED,
    MC_CALLBACKS_DUPLICATE,
    MC_CALLBACKS_IGNORED,
    MC_CALLBACKS_REJECTED,
    MC_AUTH_FAILURES,
    MC_REFUNDS_SUCCEEDED,
    MC_REFUNDS_FAILED,
    MC_REFUNDS_CANCELED,
    MC__COUNT
};

/* HTTP routes, for http_requests_total{route,code} and the latency histogram. */
enum metric_route {
    MR_HEALTHZ,
    MR_READYZ,
    MR_METRICS,
    MR_PI_CREATE,
    MR_PI_RETRIEVE,
    MR_PI_UPDATE,
    MR_PI_LIST,
    MR_PI_CONFIRM,
    MR_PI_CAPTURE,
    MR_PI_CANCEL,
    MR_EVENTS_LIST,
    MR_EVENTS_RETRIEVE,
    MR_OTHER,
    MR__COUNT
};
#define METRIC_CODES 12 /* 200 400 401 402 404 405 409 413 429 500 503, other */

/* Outcomes of payments, for payments_total{status}. */
enum metric_payment {
    MP_SUCCEEDED,
    MP_FAILED,
    MP_REQUIRES_ACTION,
    MP_REQUIRES_CAPTURE,
    MP_CANCELED,
    MP__COUNT
};

/* Histograms in microseconds. */
enum metric_histogram { MH_PAYMENT_DURATION, MH_GATEWAY_SIM, MH__COUNT };

#define METRIC_BUCKETS 14

/* The sweeps' consistency checks (outbox/sweep.c), each a gauge. */
#define SHM_CONSISTENCY_CHECKS 4

struct shm_histogram {
    _Atomic uint64_t buckets[METRIC_BUCKETS + 1]; /* last one is +Inf; not cumulative */
    _Atomic uint64_t sum;
    _Atomic uint64_t count;
};

struct shm_metrics {
    _Atomic uint64_t counters[MC__COUNT];
    _Atomic uint64_t http_requests[MR__COUNT][METRIC_CODES];
    struct shm_histogram http_duration[MR__COUNT];
    _Atomic uint64_t payments[MP__COUNT];
    struct shm_histogram hist[MH__COUNT];
    struct shm_histogram payment_amount; /* minor units */
    struct shm_histogram refund_amount;  /* minor units, succeeded refunds */
    _Atomic int64_t active_payments;     /* gauge: gateway jobs in flight */
    _Atomic int64_t events_pending;      /* gauge, outbox: unsent events */
    _Atomic int64_t events_oldest_age_s; /* gauge, outbox: age of the oldest unsent event */
    _Atomic int64_t inconsistent[SHM_CONSISTENCY_CHECKS]; /* gauges, outbox: check counts */
};

struct shm_slot {
    _Atomic uint32_t role;  /* enum role_kind */
    _Atomic uint32_t index; /* index within the role */
    _Atomic uint32_t state; /* enum slot_state, supervisor-owned */
    _Atomic int32_t pid;
    _Atomic uint32_t restarts;
    _Atomic int32_t last_exit; /* >= 0 exit code, < 0 minus the signal, SHM_EXIT_NONE */
    _Atomic int64_t started_ms;
    _Atomic int64_t heartbeat_ms; /* written by the role */
    _Atomic uint32_t ready;       /* written by the role: 1 once serving */
    _Atomic uint32_t in_use;      /* slot claimed */
    struct shm_metrics metrics;
};

/* One circuit breaker per gateway provider, shared by every worker. */
enum breaker_state { BREAKER_CLOSED, BREAKER_OPEN, BREAKER_HALF_OPEN };
#define SHM_MAX_BREAKERS 8

struct shm_breaker {
    _Atomic uint32_t state;    /* enum breaker_state */
    _Atomic uint32_t failures; /* consecutive */
    _Atomic int64_t opened_ms; /* CLOCK_REALTIME when it last opened */
    _Atomic uint32_t probe;    /* 1 while one worker's half-open probe is out */
    _Atomic uint64_t opened_total;
    _Atomic int64_t window_start_ms; /* the failure-rate window */
    _Atomic uint32_t window_calls;
    _Atomic uint32_t window_failures;
    char provider[32]; /* written once by the supervisor before any role starts */
};

struct shm_segment {
    uint32_t magic;
    uint32_t layout_version;
    uint32_t slot_count;
    uint32_t reserved;
    _Atomic int32_t supervisor_pid;
    _Atomic uint32_t draining;
    _Atomic int64_t created_ms;
    struct shm_breaker breakers[SHM_MAX_BREAKERS]; /* GATEWAY_PROVIDERS' order */
    struct shm_slot slots[SHM_MAX_SLOTS];
};

/* Creates a fresh segment for instance (refusing when a live supervisor owns it). */
struct shm_segment *shm_create(const char *instance, char *err, size_t errlen);
/* Maps an existing segment; create_if_missing for a role started alone. */
struct shm_segment *shm_attach(const char *instance, bool create_if_missing, char *err,
                               size_t errlen);
void shm_detach(struct shm_segment *seg);
void shm_remove(const char *instance);

/* Finds the slot of (role, index), claiming a free one when absent. -1 when full. */
int shm_slot_claim(struct shm_segment *seg, enum role_kind role, int index);

const char *shm_role_name(enum role_kind role);
int shm_role_parse(const char *name, enum role_kind *out);
const char *shm_state_name(enum slot_state state);

int64_t shm_now_ms(void);  /* CLOCK_REALTIME */
int64_t shm_mono_ms(void); /* CLOCK_MONOTONIC */

#endif
