/* config: typed configuration from the environment and a KEY=VALUE file; see config.c. */
#ifndef PAYMENTD_CONFIG_H
#define PAYMENTD_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "log.h"

enum config_key {
    CFG_PORT,
    CFG_BIND_ADDRESS,
    CFG_METRICS_PORT,
    CFG_METRICS_BIND_ADDRESS,
    CFG_API_PROCESSES,
    CFG_WORKERS,
    CFG_RESTART_INTENSITY,
    CFG_RESTART_PERIOD,
    CFG_ROLE_HANG_TIMEOUT,
    CFG_SHUTDOWN_TIMEOUT,
    CFG_RUN_DIR,
    CFG_INSTANCE,
    CFG_LOG_LEVEL,
    CFG_DATABASE_URL,
    CFG_POSTGRES_HOST,
    CFG_POSTGRES_PORT,
    CFG_POSTGRES_USERNAME,
    CFG_POSTGRES_PASSWORD,
    CFG_POSTGRES_DATABASE,
    CFG_DB_POOL_SIZE,
    CFG_REDIS_HOST,
    CFG_REDIS_PORT,
    CFG_REDIS_PASSWORD,
    CFG_REDIS_TIMEOUT_MS,
    CFG_JWT_SECRET,
    CFG_READY_CHECK_TIMEOUT_MS,
    CFG_CONFIRM_WAIT_MS,
    CFG_JOB_TIMEOUT_MS,
    CFG_GATEWAY_URL,
    CFG_GATEWAY_TIMEOUT_MS,
    CFG_WORKER_CONCURRENCY,
    CFG_DB_QUEUE_TIMEOUT_MS,
    CFG_DB_STATEMENT_TIMEOUT_MS,
    CFG_DB_BATCH_MAX,
    CFG_EVENTS_URL,
    CFG_OUTBOX_POLL_MS,
    CFG_OUTBOX_LEASE_MS,
    CFG_OUTBOX_START_DELAY_MS,
    CFG_INTAKE_URL,
    CFG_SAGA_ACCOUNT,
    CFG_WEBHOOK_ALLOW_PRIVATE,
    CFG_WEBHOOK_RETRY_WINDOW,
    CFG_WEBHOOK_TIMEOUT_MS,
    CFG_SWEEP_INTERVAL_MS,
    CFG_PROCESSING_LEASE_MS,
    CFG_CONSISTENCY_INTERVAL_MS,
    CFG_MAX_PENDING_JOBS,
    CFG_GATEWAY_MAX_ATTEMPTS,
    CFG_GATEWAY_RETRY_CAP_MS,
    CFG_BREAKER_FAILURES,
    CFG_BREAKER_OPEN_MS,
    CFG_BREAKER_FAILURE_RATE,
    CFG_BREAKER_WINDOW,
    CFG_GATEWAY_PROVIDERS,
    CFG_GATEWAY_KEY,
    CFG_MAX_BODY_BYTES,
    CFG_MAX_HEADER_BYTES,
    CFG_REQUEST_TIMEOUT_MS,
    CFG_JWT_ISSUER,
    CFG_JWT_AUDIENCE,
    CFG_JWT_ACCOUNT_CLAIM,
    CFG_RATE_LIMIT_WRITES,
    CFG_RATE_LIMIT_READS,
    CFG_RATE_LIMIT_CALLBACKS,
    CFG_RATE_LIMIT_AUTH_FAILURES,
    CFG_GATEWAY_WEBHOOK_SECRET,
    CFG_TLS_CERT_FILE,
    CFG_TLS_KEY_FILE,
    CFG__COUNT
};

/* A gateway provider: GATEWAY_PROVIDERS names them in priority order,
 * GATEWAY_URL and GATEWAY_KEY list their URLs and keys in the same order. */
#define CONFIG_MAX_PROVIDERS 8
struct config_provider {
    char name[32];
    char url[512];
    char key[256];            /* empty: none sent */
    char webhook_secret[512]; /* callbacks' signing secrets, '|'-separated; empty: refused */
};

struct config {
    /* Raw text of every key as given or defaulted; NULL when unset and optional. */
    char *raw[CFG__COUNT];
    int port;
    const char *bind_address;
    int metrics_port;
    const char *metrics_bind_address;
    int api_processes;
    int workers;
    int restart_intensity;
    int64_t restart_period_ms;
    int64_t role_hang_timeout_ms;
    int64_t shutdown_timeout_ms;
    const char *run_dir;
    const char *instance;
    enum log_level log_level;
    const char *database_url;
    const char *postgres_host;
    int postgres_port;
    const char *postgres_username;
    const char *postgres_password;
    const char *postgres_database;
    int db_pool_size;
    const char *redis_host;
    int redis_port;
    const char *redis_password;
    int64_t redis_timeout_ms; /* a Redis reply not in by then: the connection is dropped */
    const char *jwt_secret;
    int64_t ready_check_timeout_ms;
    int64_t confirm_wait_ms;
    int64_t job_timeout_ms;
    const char *gateway_url; /* one per provider, comma-separated */
    int64_t gateway_timeout_ms;
    int worker_concurrency;
    int64_t db_queue_timeout_ms;
    int64_t db_statement_timeout_ms; /* PostgreSQL statement_timeout of the pools */
    int db_batch_max;                /* runs of one statement sharing a transaction; 1: none */
    const char *events_url;          /* NULL: ipc://RUN_DIR/events.ipc */
    int64_t outbox_poll_ms;
    int64_t outbox_lease_ms;
    int64_t outbox_start_delay_ms;
    const char *intake_url;   /* NULL: ipc://RUN_DIR/intake.ipc */
    const char *saga_account; /* NULL: no saga intake */
    int webhook_allow_private;
    int64_t webhook_retry_window_ms;
    int64_t webhook_timeout_ms;
    int64_t sweep_interval_ms;
    int64_t processing_lease_ms; /* as set, or derived: job_worst_case_ms + 10 s */
    bool processing_lease_set;   /* PROCESSING_LEASE_MS was given explicitly */
    int64_t job_worst_case_ms;   /* longest a gateway job can take; see config_job_worst_case_ms */
    int64_t consistency_interval_ms;
    int max_pending_jobs;
    int gateway_max_attempts;
    int64_t gateway_retry_cap_ms;
    int breaker_failures;
    int64_t breaker_open_ms;
    int breaker_failure_rate;
    int64_t breaker_window_ms;
    const char *gateway_providers;
    const char *gateway_key;
    int n_providers;
    struct config_provider providers[CONFIG_MAX_PROVIDERS];
    int max_body_bytes;
    int max_header_bytes;
    int64_t request_timeout_ms;
    const char *jwt_issuer;   /* NULL: not checked */
    const char *jwt_audience; /* NULL: not checked */
    const char *jwt_account_claim;
    int rate_limit_writes;        /* per account per second */
    int rate_limit_reads;         /* per account per second */
    int rate_limit_callbacks;     /* per client IP per minute */
    int rate_limit_auth_failures; /* per client IP per minute */
    const char *gateway_webhook_secret;
    const char *tls_cert_file;
    const char *tls_key_file;
};

/* Loads the configuration: defaults, then the environment, then the file at
 * path (when not NULL), which wins because it is what SIGHUP re-reads. On
 * error returns -1 and writes one line naming the variable into err. */
int config_load(struct config *cfg, const char *path, char *err, size_t errlen);
void config_free(struct config *cfg);

/* Parses one KEY=VALUE file into cfg's raw values; exposed for tests. */
int config_parse_file(struct config *cfg, const char *path, char *err, size_t errlen);

/* Sets one raw value and re-validates the whole configuration. */
int config_set(struct config *cfg, const char *key, const char *value, char *err, size_t errlen);

/* Exports every set key into the process environment (for a child's exec). */
void config_export(const struct config *cfg);

const char *config_key_name(enum config_key key);
/* True when a change of this key needs a full restart of the service. */
bool config_key_needs_restart(enum config_key key);
/* True when the value must never be printed. */
bool config_key_is_secret(enum config_key key);

/* The longest a gateway job can keep a payment in processing: every call
 * of the job at GATEWAY_TIMEOUT_MS, the back-off waits between them at
 * GATEWAY_RETRY_CAP_MS, and its database statements at
 * DB_STATEMENT_TIMEOUT_MS. PROCESSING_LEASE_MS may not be shorter, or the
 * sweeps would re-drive a payment whose job is still running. */
int64_t config_job_worst_case_ms(const struct config *cfg);

/* Added to the worst case when PROCESSING_LEASE_MS is not set. */
#define CONFIG_LEASE_MARGIN_MS 10000

/* Parses a duration: digits with an optional unit (ms, s, m, h); a bare
 * number is in default_unit_ms. Returns -1 on bad syntax or overflow. */
int config_parse_duration(const char *s, int64_t default_unit_ms, int64_t *out_ms);
/* Parses a decimal integer in [min, max]. */
int config_parse_int(const char *s, long min, long max, long *out);

#endif
