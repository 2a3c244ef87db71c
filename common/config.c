/*
 * config - the service's configuration, read from environment variables and
 * from a KEY=VALUE file (the format systemd's EnvironmentFile= reads).
 *
 * Offers config_load(), config_set(), config_export(), config_free() and the
 * scalar parsers config_parse_int()/config_parse_duration(). Every key is
 * described once in config_keys[]: its name, type, default and bounds. A bad
 * value or an unknown key in the file fails the whole load with one line that
 * names the variable (never its value when the key is a secret); the caller
 * decides whether that ends start-up (exit 2) or refuses a reload. The
 * environment cannot be checked for unknown keys, since it also holds PATH
 * and friends. Some checks span keys: PROCESSING_LEASE_MS, when unset, is
 * derived from the gateway retry and database timeout settings, and is
 * refused when set below what they allow a job to take
 * (config_job_worst_case_ms). Calls xmalloc and libc only.
 */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "xmalloc.h"

enum config_type { T_INT, T_DURATION, T_STRING, T_HOST, T_NAME, T_PATH, T_LEVEL };

struct config_desc {
    const char *name;
    enum config_type type;
    const char *def; /* NULL: optional, unset */
    long min, max;   /* T_INT bounds; T_DURATION bounds in ms; T_STRING length */
    int64_t unit_ms; /* T_DURATION: unit of a bare number */
    size_t offset;   /* into struct config */
    bool restart;    /* change needs a full restart */
    bool secret;
};

#define OFF(field) offsetof(struct config, field)

static const struct config_desc config_keys[CFG__COUNT] = {
    [CFG_PORT] = {"PORT", T_INT, "3005", 1, 65535, 0, OFF(port), false, false},
    [CFG_BIND_ADDRESS] = {"BIND_ADDRESS", T_HOST, "0.0.0.0", 1, 255, 0, OFF(bind_address), false,
                          false},
    [CFG_METRICS_PORT] = {"METRICS_PORT", T_INT, "9105", 1, 65535, 0, OFF(metrics_port), false,
                          false},
    [CFG_METRICS_BIND_ADDRESS] = {"METRICS_BIND_ADDRESS", T_HOST, "0.0.0.0", 1, 255, 0,
                                  OFF(metrics_bind_address), false, false},
    [CFG_API_PROCESSES] = {"API_PROCESSES", T_INT, "2", 1, 32, 0, OFF(api_processes), true, false},
    [CFG_WORKERS] = {"WORKERS", T_INT, "2", 1, 32, 0, OFF(workers), true, false},
    [CFG_RESTART_INTENSITY] = {"RESTART_INTENSITY", T_INT, "5", 1, 1000, 0, OFF(restart_intensity),
                               false, false},
    [CFG_RESTART_PERIOD] = {"RESTART_PERIOD", T_DURATION, "60", 1000, 86400000, 1000,
                            OFF(restart_period_ms), false, false},
    [CFG_ROLE_HANG_TIMEOUT] = {"ROLE_HANG_TIMEOUT", T_DURATION, "10", 2000, 3600000, 1000,
                               OFF(role_hang_timeout_ms), false, false},
    [CFG_SHUTDOWN_TIMEOUT] = {"SHUTDOWN_TIMEOUT", T_DURATION, "30", 100, 3600000, 1000,
                              OFF(shutdown_timeout_ms), false, false},
    [CFG_RUN_DIR] = {"RUN_DIR", T_PATH, "/run/paymentd", 1, 80, 0, OFF(run_dir), true, false},
    [CFG_INSTANCE] = {"INSTANCE", T_NAME, "paymentd", 1, 32, 0, OFF(instance), true, false},
    [CFG_LOG_LEVEL] = {"LOG_LEVEL", T_LEVEL, "info", 0, 0, 0, OFF(log_level), false, false},
    [CFG_DATABASE_URL] = {"DATABASE_URL", T_STRING, NULL, 1, 1024, 0, OFF(database_url), false,
                          true},
    [CFG_POSTGRES_HOST] = {"POSTGRES_HOST", T_STRING, "127.0.0.1", 1, 255, 0, OFF(postgres_host),
                           false, false},
    [CFG_POSTGRES_PORT] = {"POSTGRES_PORT", T_INT, "5432", 1, 65535, 0, OFF(postgres_port), false,
                           false},
    [CFG_POSTGRES_USERNAME] = {"POSTGRES_USERNAME", T_STRING, "paymentd", 1, 63, 0,
                               OFF(postgres_username), false, false},
    [CFG_POSTGRES_PASSWORD] = {"POSTGRES_PASSWORD", T_STRING, NULL, 0, 1024, 0,
                               OFF(postgres_password), false, true},
    [CFG_POSTGRES_DATABASE] = {"POSTGRES_DATABASE", T_STRING, "paymentd", 1, 63, 0,
                               OFF(postgres_database), false, false},
    [CFG_DB_POOL_SIZE] = {"DB_POOL_SIZE", T_INT, "4", 1, 64, 0, OFF(db_pool_size), false, false},
    [CFG_REDIS_HOST] = {"REDIS_HOST", T_HOST, "127.0.0.1", 1, 255, 0, OFF(redis_host), false,
                        false},
    [CFG_REDIS_PORT] = {"REDIS_PORT", T_INT, "6379", 1, 65535, 0, OFF(redis_port), false, false},
    [CFG_REDIS_PASSWORD] = {"REDIS_PASSWORD", T_STRING, NULL, 0, 1024, 0, OFF(redis_password),
                            false, true},
    [CFG_REDIS_TIMEOUT_MS] = {"REDIS_TIMEOUT_MS", T_DURATION, "250", 10, 60000, 1,
                              OFF(redis_timeout_ms), false, false},
    [CFG_JWT_SECRET] = {"JWT_SECRET", T_STRING, NULL, 32, 4096, 0, OFF(jwt_secret), false, true},
    [CFG_READY_CHECK_TIMEOUT_MS] = {"READY_CHECK_TIMEOUT_MS", T_DURATION, "1000", 10, 60000, 1,
                                    OFF(ready_check_timeout_ms), false, false},
    [CFG_CONFIRM_WAIT_MS] = {"CONFIRM_WAIT_MS", T_DURATION, "10000", 0, 600000, 1,
                             OFF(confirm_wait_ms), false, false},
    [CFG_JOB_TIMEOUT_MS] = {"JOB_TIMEOUT_MS", T_DURATION, "600000", 1000, 86400000, 1,
                            OFF(job_timeout_ms), false, false},
    [CFG_GATEWAY_URL] = {"GATEWAY_URL", T_STRING, "http://127.0.0.1:12111", 8, 4096, 0,
                         OFF(gateway_url), false, false},
    [CFG_GATEWAY_TIMEOUT_MS] = {"GATEWAY_TIMEOUT_MS", T_DURATION, "30000", 100, 600000, 1,
                                OFF(gateway_timeout_ms), false, false},
    [CFG_WORKER_CONCURRENCY] = {"WORKER_CONCURRENCY", T_INT, "1024", 1, 100000, 0,
                                OFF(worker_concurrency), false, false},
    [CFG_DB_QUEUE_TIMEOUT_MS] = {"DB_QUEUE_TIMEOUT_MS", T_DURATION, "2000", 10, 600000, 1,
                                 OFF(db_queue_timeout_ms), false, false},
    [CFG_DB_STATEMENT_TIMEOUT_MS] = {"DB_STATEMENT_TIMEOUT_MS", T_DURATION, "5000", 100, 3600000, 1,
                                     OFF(db_statement_timeout_ms), false, false},
    [CFG_DB_BATCH_MAX] = {"DB_BATCH_MAX", T_INT, "64", 1, 256, 0, OFF(db_batch_max), false, false},
    [CFG_EVENTS_URL] = {"EVENTS_URL", T_STRING, NULL, 6, 300, 0, OFF(events_url), false, false},
    [CFG_OUTBOX_POLL_MS] = {"OUTBOX_POLL_MS", T_DURATION, "1000", 10, 600000, 1,
                            OFF(outbox_poll_ms), false, false},
    [CFG_OUTBOX_LEASE_MS] = {"OUTBOX_LEASE_MS", T_DURATION, "30000", 100, 3600000, 1,
                             OFF(outbox_lease_ms), false, false},
    [CFG_OUTBOX_START_DELAY_MS] = {"OUTBOX_START_DELAY_MS", T_DURATION, "1000", 0, 60000, 1,
                                   OFF(outbox_start_delay_ms), false, false},
    [CFG_INTAKE_URL] = {"INTAKE_URL", T_STRING, NULL, 6, 300, 0, OFF(intake_url), false, false},
    [CFG_SAGA_ACCOUNT] = {"SAGA_ACCOUNT", T_STRING, NULL, 6, 64, 0, OFF(saga_account), false,
                          false},
    [CFG_WEBHOOK_ALLOW_PRIVATE] = {"WEBHOOK_ALLOW_PRIVATE", T_INT, "0", 0, 1, 0,
                                   OFF(webhook_allow_private), false, false},
    [CFG_WEBHOOK_RETRY_WINDOW] = {"WEBHOOK_RETRY_WINDOW", T_DURATION, "72h", 1000, 2592000000, 1000,
                                  OFF(webhook_retry_window_ms), false, false},
    [CFG_WEBHOOK_TIMEOUT_MS] = {"WEBHOOK_TIMEOUT_MS", T_DURATION, "10000", 100, 60000, 1,
                                OFF(webhook_timeout_ms), false, false},
    [CFG_SWEEP_INTERVAL_MS] = {"SWEEP_INTERVAL_MS", T_DURATION, "5000", 100, 3600000, 1,
                               OFF(sweep_interval_ms), false, false},
    [CFG_PROCESSING_LEASE_MS] = {"PROCESSING_LEASE_MS", T_DURATION, NULL, 1000, 86400000, 1,
                                 OFF(processing_lease_ms), false, false},
    [CFG_CONSISTENCY_INTERVAL_MS] = {"CONSISTENCY_INTERVAL_MS", T_DURATION, "600000", 500, 86400000,
                                     1, OFF(consistency_interval_ms), false, false},
    [CFG_MAX_PENDING_JOBS] = {"MAX_PENDING_JOBS", T_INT, "10000", 1, 1000000, 0,
                              OFF(max_pending_jobs), false, false},
    [CFG_GATEWAY_MAX_ATTEMPTS] = {"GATEWAY_MAX_ATTEMPTS", T_INT, "5", 1, 100, 0,
                                  OFF(gateway_max_attempts), false, false},
    [CFG_GATEWAY_RETRY_CAP_MS] = {"GATEWAY_RETRY_CAP_MS", T_DURATION, "30000", 10, 3600000, 1,
                                  OFF(gateway_retry_cap_ms), false, false},
    [CFG_BREAKER_FAILURES] = {"BREAKER_FAILURES", T_INT, "5", 1, 1000, 0, OFF(breaker_failures),
                              false, false},
    [CFG_BREAKER_OPEN_MS] = {"BREAKER_OPEN_MS", T_DURATION, "30000", 100, 3600000, 1,
                             OFF(breaker_open_ms), false, false},
    [CFG_BREAKER_FAILURE_RATE] = {"BREAKER_FAILURE_RATE", T_INT, "50", 1, 100, 0,
                                  OFF(breaker_failure_rate), false, false},
    [CFG_BREAKER_WINDOW] = {"BREAKER_WINDOW", T_DURATION, "30", 1000, 3600000, 1000,
                            OFF(breaker_window_ms), false, false},
    [CFG_GATEWAY_PROVIDERS] = {"GATEWAY_PROVIDERS", T_STRING, "sim", 1, 255, 0,
                               OFF(gateway_providers), true, false},
    [CFG_GATEWAY_KEY] = {"GATEWAY_KEY", T_STRING, NULL, 1, 4096, 0, OFF(gateway_key), false, true},
    [CFG_MAX_BODY_BYTES] = {"MAX_BODY_BYTES", T_INT, "1048576", 1024, 67108864, 0,
                            OFF(max_body_bytes), false, false},
    [CFG_MAX_HEADER_BYTES] = {"MAX_HEADER_BYTES", T_INT, "16384", 1024, 1048576, 0,
                              OFF(max_header_bytes), false, false},
    [CFG_REQUEST_TIMEOUT_MS] = {"REQUEST_TIMEOUT_MS", T_DURATION, "30000", 100, 600000, 1,
                                OFF(request_timeout_ms), false, false},
    [CFG_JWT_ISSUER] = {"JWT_ISSUER", T_STRING, NULL, 1, 255, 0, OFF(jwt_issuer), false, false},
    [CFG_JWT_AUDIENCE] = {"JWT_AUDIENCE", T_STRING, NULL, 1, 255, 0, OFF(jwt_audience), false,
                          false},
    [CFG_JWT_ACCOUNT_CLAIM] = {"JWT_ACCOUNT_CLAIM", T_STRING, "sub", 1, 64, 0,
                               OFF(jwt_account_claim), false, false},
    [CFG_RATE_LIMIT_WRITES] = {"RATE_LIMIT_WRITES", T_INT, "100", 1, 100000000, 0,
                               OFF(rate_limit_writes), false, false},
    [CFG_RATE_LIMIT_READS] = {"RATE_LIMIT_READS", T_INT, "100", 1, 100000000, 0,
                              OFF(rate_limit_reads), false, false},
    [CFG_RATE_LIMIT_CALLBACKS] = {"RATE_LIMIT_CALLBACKS", T_INT, "100", 1, 100000000, 0,
                                  OFF(rate_limit_callbacks), false, false},
    [CFG_RATE_LIMIT_AUTH_FAILURES] = {"RATE_LIMIT_AUTH_FAILURES", T_INT, "10", 1, 100000000, 0,
                                      OFF(rate_limit_auth_failures), false, false},
    [CFG_GATEWAY_WEBHOOK_SECRET] = {"GATEWAY_WEBHOOK_SECRET", T_STRING, NULL, 16, 8192, 0,
                                    OFF(gateway_webhook_secret), false, true},
    [CFG_TLS_CERT_FILE] = {"TLS_CERT_FILE", T_PATH, NULL, 1, 1024, 0, OFF(tls_cert_file), false,
                           false},
    [CFG_TLS_KEY_FILE] = {"TLS_KEY_FILE", T_PATH, NULL, 1, 1024, 0, OFF(tls_key_file), false,
                          false},
};

const char *
config_key_name(enum config_key key)
{
    return config_keys[key].name;
}

bool
config_key_needs_restart(enum config_key key)
{
    return config_keys[key].restart;
}

bool
config_key_is_secret(enum config_key key)
{
    return config_keys[key].secret;
}

int
config_parse_int(const char *s, long min, long max, long *out)
{
    char *end;
    long v;
    if (!s || !*s || isspace((unsigned char)*s))
        return -1;
    errno = 0;
    v = strtol(s, &end, 10);
    if (errno || *end || v < min || v > max)
        return -1;
    *out = v;
    return 0;
}

int
config_parse_duration(const char *s, int64_t default_unit_ms, int64_t *out_ms)
{
    int64_t v = 0, unit = default_unit_ms;
    const char *p = s;
    if (!s || !isdigit((unsigned char)*p))
        return -1;
    for (; isdigit((unsigned char)*p); p++) {
        if (v > (INT64_MAX - 9) / 10)
            return -1;
        v = v * 10 + (*p - '0');
    }
    if (*p == '\0')
        unit = default_unit_ms;
    else if (strcmp(p, "ms") == 0)
        unit = 1;
    else if (strcmp(p, "s") == 0)
        unit = 1000;
    else if (strcmp(p, "m") == 0 || strcmp(p, "min") == 0)
        unit = 60000;
    else if (strcmp(p, "h") == 0)
        unit = 3600000;
    else
        return -1;
    if (v > INT64_MAX / unit)
        return -1;
    *out_ms = v * unit;
    return 0;
}

static bool
config_valid_host(const char *s)
{
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (!isalnum(c) && c != '.' && c != '-' && c != ':' && c != '_')
            return false;
    }
    return true;
}

static bool
config_valid_name(const char *s)
{
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (!islower(c) && !isdigit(c) && c != '-' && c != '_')
            return false;
    }
    return true;
}

/* Validates one raw value and stores the typed result in cfg. */
static int
config_apply(struct config *cfg, enum config_key key, char *err, size_t errlen)
{
    const struct config_desc *d = &config_keys[key];
    const char *raw = cfg->raw[key];
    char *field = (char *)cfg + d->offset;
    long iv;
    int64_t ms;
    size_t len;

    if (!raw) {
        if (d->type == T_STRING || d->type == T_HOST || d->type == T_PATH || d->type == T_NAME)
            *(const char **)field = NULL;
        return 0;
    }
    len = strlen(raw);
    switch (d->type) {
    case T_INT:
        if (config_parse_int(raw, d->min, d->max, &iv) < 0) {
            snprintf(err, errlen, "%s must be an integer from %ld to %ld", d->name, d->min, d->max);
            return -1;
        }
        *(int *)field = (int)iv;
        return 0;
    case T_DURATION:
        if (config_parse_duration(raw, d->unit_ms, &ms) < 0 || ms < d->min || ms > d->max) {
            snprintf(err, errlen,
                     "%s must be a duration from %ld ms to %ld ms (a number in %s, or with a "
                     "unit: ms, s, m, h)",
                     d->name, d->min, d->max, d->unit_ms == 1 ? "milliseconds" : "seconds");
            return -1;
        }
        *(int64_t *)field = ms;
        return 0;
    case T_LEVEL:
        if (log_parse_level(raw, (enum log_level *)field) < 0) {
            snprintf(err, errlen, "%s must be one of debug, info, warn, error", d->name);
            return -1;
        }
        return 0;
    case T_HOST:
        if (len < (size_t)d->min || len > (size_t)d->max || !config_valid_host(raw)) {
            snprintf(err, errlen, "%s must be a host name or IP address", d->name);
            return -1;
        }
        break;
    case T_NAME:
        if (len < (size_t)d->min || len > (size_t)d->max || !config_valid_name(raw)) {
            snprintf(err, errlen, "%s must be 1 to %ld characters of a-z, 0-9, '-' and '_'",
                     d->name, d->max);
            return -1;
        }
        break;
    case T_PATH:
        if (len < (size_t)d->min || len > (size_t)d->max || strchr(raw, '\n')) {
            snprintf(err, errlen, "%s must be a path of at most %ld characters", d->name, d->max);
            return -1;
        }
        break;
    case T_STRING:
        if (len < (size_t)d->min || len > (size_t)d->max) {
            snprintf(err, errlen, "%s must be %ld to %ld characters long", d->name, d->min, d->max);
            return -1;
        }
        break;
    }
    *(const char **)field = raw;
    return 0;
}

static bool
config_valid_url(const char *s)
{
    return (strncmp(s, "http://", 7) == 0 || strncmp(s, "https://", 8) == 0) &&
           !strpbrk(s, " \t\r\n");
}

/* Splits a comma-separated list into fixed-size fields of the providers;
 * returns the number of items, or -1 when there are too many or one is
 * empty or too long. */
static int
config_split(const char *list, size_t field_offset, size_t cap, struct config_provider *out)
{
    int n = 0;
    const char *p = list;
    for (;;) {
        size_t len = strcspn(p, ",");
        if (len == 0 || len >= cap || n == CONFIG_MAX_PROVIDERS)
            return -1;
        char *dst = (char *)&out[n++] + field_offset;
        memcpy(dst, p, len);
        dst[len] = '\0';
        if (p[len] == '\0')
            return n;
        p += len + 1;
    }
}

/* GATEWAY_PROVIDERS, GATEWAY_URL and GATEWAY_KEY: parallel lists. */
static int
config_providers(struct config *cfg, char *err, size_t errlen)
{
    struct config_provider *pv = cfg->providers;
    memset(pv, 0, sizeof(cfg->providers));
    int n = config_split(cfg->gateway_providers, offsetof(struct config_provider, name),
                         sizeof(pv->name), pv);
    for (int i = 0; i < n; i++) {
        bool ok = config_valid_name(pv[i].name);
        for (int k = 0; k < i; k++)
            ok = ok && strcmp(pv[i].name, pv[k].name) != 0;
        if (!ok)
            n = -1;
    }
    if (n < 0) {
        snprintf(err, errlen,
                 "GATEWAY_PROVIDERS must list 1 to %d distinct names (a-z, 0-9, '-', '_', at "
                 "most 31 characters), comma-separated, in priority order",
                 CONFIG_MAX_PROVIDERS);
        return -1;
    }
    int urls =
        config_split(cfg->gateway_url, offsetof(struct config_provider, url), sizeof(pv->url), pv);
    for (int i = 0; urls > 0 && i < urls; i++)
        if (!config_valid_url(pv[i].url))
            urls = -1;
    if (urls != n) {
        snprintf(err, errlen,
                 "GATEWAY_URL must list one http:// or https:// URL per provider in "
                 "GATEWAY_PROVIDERS (%d), comma-separated",
                 n);
        return -1;
    }
    if (cfg->gateway_key && config_split(cfg->gateway_key, offsetof(struct config_provider, key),
                                         sizeof(pv->key), pv) != n) {
        snprintf(err, errlen,
                 "GATEWAY_KEY must list one key per provider in GATEWAY_PROVIDERS (%d), "
                 "comma-separated",
                 n);
        return -1;
    }
    if (cfg->gateway_webhook_secret &&
        config_split(cfg->gateway_webhook_secret, offsetof(struct config_provider, webhook_secret),
                     sizeof(pv->webhook_secret), pv) != n) {
        snprintf(err, errlen,
                 "GATEWAY_WEBHOOK_SECRET must list one secret per provider in GATEWAY_PROVIDERS "
                 "(%d), comma-separated ('|' between a new and an old one while rotating)",
                 n);
        return -1;
    }
    for (int i = 0; cfg->gateway_webhook_secret && i < n; i++) {
        /* Each secret at least 16 bytes: a short one can be guessed. */
        for (const char *p = pv[i].webhook_secret; *p;) {
            size_t len = strcspn(p, "|");
            if (len < 16) {
                snprintf(err, errlen,
                         "GATEWAY_WEBHOOK_SECRET: every secret must be at least 16 characters");
                return -1;
            }
            p += len + (p[len] == '|');
        }
    }
    cfg->n_providers = n;
    return 0;
}

/* Gateway calls one job can make: GATEWAY_MAX_ATTEMPTS tries, plus one
 * call per further provider, since a failover (after an answer that the
 * charge was certainly not taken) does not spend a try (worker/worker.c). */
static int64_t
config_job_calls(const struct config *cfg)
{
    return (int64_t)cfg->gateway_max_attempts + (cfg->n_providers > 1 ? cfg->n_providers - 1 : 0);
}

/* Statements one job runs while the payment is processing: with one
 * provider the outcome's record and one read (the charge to capture or
 * cancel, or the current state when nothing is recorded); with several,
 * each provider's call is recorded before it and each failover pins the
 * next provider, so two per provider. */
static int64_t
config_job_statements(const struct config *cfg)
{
    return cfg->n_providers > 1 ? 2 * (int64_t)cfg->n_providers : 2;
}

int64_t
config_job_worst_case_ms(const struct config *cfg)
{
    return config_job_calls(cfg) * cfg->gateway_timeout_ms +
           (int64_t)(cfg->gateway_max_attempts - 1) * cfg->gateway_retry_cap_ms +
           config_job_statements(cfg) * cfg->db_statement_timeout_ms;
}

/* PROCESSING_LEASE_MS: derived from the retry settings when unset (so it
 * follows them), refused when set below a job's worst case, since the
 * sweeps would then send a second job for a payment whose first is still
 * calling the gateway. The raw value stays NULL when derived, so that a
 * child process derives it again from the same settings. */
static int
config_lease(struct config *cfg, char *err, size_t errlen)
{
    int64_t worst = config_job_worst_case_ms(cfg);
    char calls[96];

    cfg->job_worst_case_ms = worst;
    cfg->processing_lease_set = cfg->raw[CFG_PROCESSING_LEASE_MS] != NULL;
    if (!cfg->processing_lease_set) {
        cfg->processing_lease_ms = worst + CONFIG_LEASE_MARGIN_MS;
        return 0;
    }
    if (cfg->processing_lease_ms >= worst)
        return 0;
    if (cfg->n_providers > 1)
        snprintf(calls, sizeof(calls), "(GATEWAY_MAX_ATTEMPTS %d + GATEWAY_PROVIDERS %d - 1)",
                 cfg->gateway_max_attempts, cfg->n_providers);
    else
        snprintf(calls, sizeof(calls), "GATEWAY_MAX_ATTEMPTS %d", cfg->gateway_max_attempts);
    snprintf(err, errlen,
             "PROCESSING_LEASE_MS (%lld ms) is shorter than a gateway job's worst case, %lld ms = "
             "%s x GATEWAY_TIMEOUT_MS %lld + %d x GATEWAY_RETRY_CAP_MS %lld + %lld x "
             "DB_STATEMENT_TIMEOUT_MS %lld; raise it, or leave it unset (worst case + %d s)",
             (long long)cfg->processing_lease_ms, (long long)worst, calls,
             (long long)cfg->gateway_timeout_ms, cfg->gateway_max_attempts - 1,
             (long long)cfg->gateway_retry_cap_ms, (long long)config_job_statements(cfg),
             (long long)cfg->db_statement_timeout_ms, CONFIG_LEASE_MARGIN_MS / 1000);
    return -1;
}

static int
config_validate(struct config *cfg, char *err, size_t errlen)
{
    for (int k = 0; k < CFG__COUNT; k++) {
        if (config_apply(cfg, (enum config_key)k, err, errlen) < 0)
            return -1;
    }
    if (cfg->port == cfg->metrics_port) {
        snprintf(err, errlen, "METRICS_PORT must differ from PORT");
        return -1;
    }
    for (const char *p = cfg->jwt_secret; p && *p;) {
        /* "new|old" while rotating: each at least 32 bytes. */
        size_t len = strcspn(p, "|");
        if (len < 32) {
            snprintf(err, errlen, "JWT_SECRET: every secret must be at least 32 bytes");
            return -1;
        }
        p += len + (p[len] == '|');
        if (p[-1] == '|' && !*p) {
            snprintf(err, errlen, "JWT_SECRET: every secret must be at least 32 bytes");
            return -1;
        }
    }
    if ((cfg->tls_cert_file == NULL) != (cfg->tls_key_file == NULL)) {
        snprintf(err, errlen, "TLS_CERT_FILE and TLS_KEY_FILE must be set together");
        return -1;
    }
    if (config_providers(cfg, err, errlen) < 0)
        return -1;
    return config_lease(cfg, err, errlen);
}

static int
config_find(const char *name, size_t len)
{
    for (int k = 0; k < CFG__COUNT; k++) {
        if (strlen(config_keys[k].name) == len && memcmp(config_keys[k].name, name, len) == 0)
            return k;
    }
    return -1;
}

static void
config_set_raw(struct config *cfg, int key, const char *value)
{
    free(cfg->raw[key]);
    cfg->raw[key] = value ? xstrdup(value) : NULL;
}

/* Removes one level of matching quotes, as systemd's EnvironmentFile= does. */
static char *
config_unquote(char *v)
{
    size_t len = strlen(v);
    if (len >= 2 && (v[0] == '"' || v[0] == '\'') && v[len - 1] == v[0]) {
        v[len - 1] = '\0';
        return v + 1;
    }
    return v;
}

int
config_parse_file(struct config *cfg, const char *path, char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");
    char line[4096];
    int lineno = 0, rc = -1;

    if (!f) {
        snprintf(err, errlen, "config file %s: %s", path, strerror(errno));
        return -1;
    }
    while (fgets(line, sizeof(line), f)) {
        char *p = line, *eq, *end;
        lineno++;
        if (!strchr(line, '\n') && !feof(f)) {
            snprintf(err, errlen, "config file %s line %d: line too long", path, lineno);
            goto out;
        }
        line[strcspn(line, "\r\n")] = '\0';
        while (isspace((unsigned char)*p))
            p++;
        if (*p == '\0' || *p == '#' || *p == ';')
            continue;
        eq = strchr(p, '=');
        if (!eq) {
            snprintf(err, errlen, "config file %s line %d: expected KEY=VALUE", path, lineno);
            goto out;
        }
        end = eq;
        while (end > p && isspace((unsigned char)end[-1]))
            end--;
        int key = config_find(p, (size_t)(end - p));
        if (key < 0) {
            snprintf(err, errlen, "config file %s line %d: unknown variable %.*s", path, lineno,
                     (int)(end - p) > 64 ? 64 : (int)(end - p), p);
            goto out;
        }
        char *v = eq + 1;
        while (isspace((unsigned char)*v))
            v++;
        char *vend = v + strlen(v);
        while (vend > v && isspace((unsigned char)vend[-1]))
            *--vend = '\0';
        config_set_raw(cfg, key, config_unquote(v));
    }
    rc = 0;
out:
    fclose(f);
    return rc;
}

int
config_load(struct config *cfg, const char *path, char *err, size_t errlen)
{
    memset(cfg, 0, sizeof(*cfg));
    for (int k = 0; k < CFG__COUNT; k++) {
        const char *env = getenv(config_keys[k].name);
        config_set_raw(cfg, k, env ? env : config_keys[k].def);
    }
    if (path && config_parse_file(cfg, path, err, errlen) < 0)
        goto fail;
    if (config_validate(cfg, err, errlen) < 0)
        goto fail;
    return 0;
fail:
    config_free(cfg);
    return -1;
}

int
config_set(struct config *cfg, const char *key, const char *value, char *err, size_t errlen)
{
    int k = config_find(key, strlen(key));
    if (k < 0) {
        snprintf(err, errlen, "unknown variable %s", key);
        return -1;
    }
    config_set_raw(cfg, k, value);
    return config_validate(cfg, err, errlen);
}

void
config_export(const struct config *cfg)
{
    for (int k = 0; k < CFG__COUNT; k++) {
        if (cfg->raw[k])
            setenv(config_keys[k].name, cfg->raw[k], 1);
        else
            unsetenv(config_keys[k].name);
    }
}

void
config_free(struct config *cfg)
{
    for (int k = 0; k < CFG__COUNT; k++) {
        free(cfg->raw[k]);
        cfg->raw[k] = NULL;
    }
}
