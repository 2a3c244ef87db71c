/* Unit tests for common/config.c: defaults, environment, file, bad values. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "config.h"

static const char *const keys_used[] = {"PORT",
                                        "WORKERS",
                                        "RESTART_PERIOD",
                                        "LOG_LEVEL",
                                        "JWT_SECRET",
                                        "INSTANCE",
                                        "METRICS_PORT",
                                        "POSTGRES_PASSWORD",
                                        "ROLE_HANG_TIMEOUT",
                                        "GATEWAY_PROVIDERS",
                                        "GATEWAY_URL",
                                        "GATEWAY_KEY",
                                        "PROCESSING_LEASE_MS",
                                        "GATEWAY_TIMEOUT_MS",
                                        "GATEWAY_MAX_ATTEMPTS",
                                        "GATEWAY_RETRY_CAP_MS",
                                        "DB_STATEMENT_TIMEOUT_MS",
                                        "REDIS_TIMEOUT_MS"};

static int
clear_env(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(keys_used) / sizeof(keys_used[0]); i++)
        unsetenv(keys_used[i]);
    return 0;
}

static char *
write_file(const char *text)
{
    char *path = strdup("/tmp/paymentd-config-XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
    return path;
}

static void
test_defaults(void **state)
{
    (void)state;
    struct config cfg;
    char err[256];
    assert_int_equal(config_load(&cfg, NULL, err, sizeof(err)), 0);
    assert_int_equal(cfg.port, 3005);
    assert_int_equal(cfg.metrics_port, 9105);
    assert_int_equal(cfg.api_processes, 2);
    assert_int_equal(cfg.workers, 2);
    assert_int_equal(cfg.restart_intensity, 5);
    assert_int_equal(cfg.restart_period_ms, 60000);
    assert_int_equal(cfg.role_hang_timeout_ms, 10000);
    assert_null(cfg.jwt_secret);
    config_free(&cfg);
}

static void
test_environment_and_units(void **state)
{
    (void)state;
    struct config cfg;
    char err[256];
    setenv("PORT", "8080", 1);
    setenv("RESTART_PERIOD", "1500ms", 1);
    setenv("ROLE_HANG_TIMEOUT", "2m", 1);
    assert_int_equal(config_load(&cfg, NULL, err, sizeof(err)), 0);
    assert_int_equal(cfg.port, 8080);
    assert_int_equal(cfg.restart_period_ms, 1500);
    assert_int_equal(cfg.role_hang_timeout_ms, 120000);
    config_free(&cfg);
}

static void
test_file_wins_and_quotes(void **state)
{
    (void)state;
    struct config cfg;
    char err[256];
    setenv("WORKERS", "3", 1);
    char *path = write_file("# comment\n\n  WORKERS = 4\nINSTANCE=\"blue\"\nLOG_LEVEL='debug'\n");
    assert_int_equal(config_load(&cfg, path, err, sizeof(err)), 0);
    assert_int_equal(cfg.workers, 4);
    assert_string_equal(cfg.instance, "blue");
    assert_int_equal(cfg.log_level, LOG_DEBUG);
    config_free(&cfg);
    unlink(path);
    free(path);
}

static void
expect_error(const char *key, const char *value, const char *needle)
{
    struct config cfg;
    char err[256] = "";
    setenv(key, value, 1);
    assert_int_equal(config_load(&cfg, NULL, err, sizeof(err)), -1);
    if (!strstr(err, needle))
        fail_msg("error '%s' does not name '%s'", err, needle);
    unsetenv(key);
}

static void
test_bad_values_name_the_variable(void **state)
{
    (void)state;
    expect_error("PORT", "0", "PORT");
    expect_error("PORT", "70000", "PORT");
    expect_error("PORT", "80a", "PORT");
    expect_error("PORT", "", "PORT");
    expect_error("PORT", " 80", "PORT");
    expect_error("WORKERS", "100", "WORKERS");
    expect_error("WORKERS", "-1", "WORKERS");
    expect_error("RESTART_PERIOD", "5x", "RESTART_PERIOD");
    expect_error("RESTART_PERIOD", "99999999999999999999", "RESTART_PERIOD");
    expect_error("ROLE_HANG_TIMEOUT", "1", "ROLE_HANG_TIMEOUT"); /* below the 2 s floor */
    expect_error("LOG_LEVEL", "loud", "LOG_LEVEL");
    expect_error("INSTANCE", "Has Spaces", "INSTANCE");
    expect_error("METRICS_PORT", "3005", "METRICS_PORT"); /* same as PORT */
}

static void
test_gateway_providers(void **state)
{
    (void)state;
    struct config cfg;
    char err[256] = "";
    assert_int_equal(config_load(&cfg, NULL, err, sizeof(err)), 0);
    assert_int_equal(cfg.n_providers, 1);
    assert_string_equal(cfg.providers[0].name, "sim");
    assert_string_equal(cfg.providers[0].url, "http://127.0.0.1:12111");
    assert_string_equal(cfg.providers[0].key, "");
    config_free(&cfg);

    setenv("GATEWAY_PROVIDERS", "sim_a,sim_b", 1);
    setenv("GATEWAY_URL", "http://10.0.0.1:1,https://gw.example/x", 1);
    setenv("GATEWAY_KEY", "ka,kb-secret", 1);
    assert_int_equal(config_load(&cfg, NULL, err, sizeof(err)), 0);
    assert_int_equal(cfg.n_providers, 2);
    assert_string_equal(cfg.providers[1].name, "sim_b");
    assert_string_equal(cfg.providers[1].url, "https://gw.example/x");
    assert_string_equal(cfg.providers[1].key, "kb-secret");
    config_free(&cfg);

    expect_error("GATEWAY_URL", "http://a:1", "GATEWAY_URL"); /* one URL for two providers */
    setenv("GATEWAY_URL", "http://a:1,ftp://b", 1);
    assert_int_equal(config_load(&cfg, NULL, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "GATEWAY_URL"));
    setenv("GATEWAY_URL", "http://a:1,http://b:2", 1);
    setenv("GATEWAY_KEY", "only-one-secret", 1);
    assert_int_equal(config_load(&cfg, NULL, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "GATEWAY_KEY"));
    assert_null(strstr(err, "only-one-secret"));
    unsetenv("GATEWAY_KEY");
    expect_error("GATEWAY_PROVIDERS", "sim_a,sim_a", "GATEWAY_PROVIDERS");
    expect_error("GATEWAY_PROVIDERS", "sim_a,", "GATEWAY_PROVIDERS");
    expect_error("GATEWAY_PROVIDERS", "Sim A,b", "GATEWAY_PROVIDERS");
    expect_error("GATEWAY_PROVIDERS", "a,b,c,d,e,f,g,h,i", "GATEWAY_PROVIDERS");
}

static void
test_secret_value_never_in_error(void **state)
{
    (void)state;
    struct config cfg;
    char err[256] = "";
    setenv("JWT_SECRET", "tooshort-secret-value", 1);
    assert_int_equal(config_load(&cfg, NULL, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "JWT_SECRET"));
    assert_null(strstr(err, "tooshort-secret-value"));
    unsetenv("JWT_SECRET");
    /* Two secrets while rotating, each at least 32 bytes. */
    setenv("JWT_SECRET", "0123456789abcdef0123456789abcdef|fedcba9876543210fedcba9876543210", 1);
    assert_int_equal(config_load(&cfg, NULL, err, sizeof(err)), 0);
    config_free(&cfg);
    setenv("JWT_SECRET", "0123456789abcdef0123456789abcdef|short-old-secret", 1);
    assert_int_equal(config_load(&cfg, NULL, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "JWT_SECRET"));
    assert_null(strstr(err, "short-old-secret"));
    setenv("JWT_SECRET", "0123456789abcdef0123456789abcdef|", 1);
    assert_int_equal(config_load(&cfg, NULL, err, sizeof(err)), -1);
    unsetenv("JWT_SECRET");
    assert_true(config_key_is_secret(CFG_JWT_SECRET));
    assert_true(config_key_is_secret(CFG_POSTGRES_PASSWORD));
    assert_false(config_key_is_secret(CFG_PORT));
}

static void
test_file_errors(void **state)
{
    (void)state;
    struct config cfg;
    char err[256] = "";
    char *path = write_file("PORT=3006\nNOT_A_KEY=1\n");
    assert_int_equal(config_load(&cfg, path, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "NOT_A_KEY"));
    assert_non_null(strstr(err, "line 2"));
    unlink(path);
    free(path);
    path = write_file("PORT 3006\n");
    assert_int_equal(config_load(&cfg, path, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "KEY=VALUE"));
    unlink(path);
    free(path);
    path = write_file("PORT=abc\n");
    assert_int_equal(config_load(&cfg, path, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "PORT"));
    unlink(path);
    free(path);
    assert_int_equal(config_load(&cfg, "/nonexistent/paymentd.env", err, sizeof(err)), -1);
    assert_non_null(strstr(err, "/nonexistent/paymentd.env"));
}

static void
test_set_and_export(void **state)
{
    (void)state;
    struct config cfg;
    char err[256];
    assert_int_equal(config_load(&cfg, NULL, err, sizeof(err)), 0);
    assert_int_equal(config_set(&cfg, "WORKERS", "7", err, sizeof(err)), 0);
    assert_int_equal(cfg.workers, 7);
    assert_int_equal(config_set(&cfg, "WORKERS", "x", err, sizeof(err)), -1);
    assert_int_equal(config_set(&cfg, "NOPE", "1", err, sizeof(err)), -1);
    assert_int_equal(config_set(&cfg, "WORKERS", "5", err, sizeof(err)), 0);
    config_export(&cfg);
    assert_string_equal(getenv("WORKERS"), "5");
    config_free(&cfg);
    unsetenv("WORKERS");
}

static void
test_parsers(void **state)
{
    (void)state;
    int64_t ms;
    long v;
    assert_int_equal(config_parse_duration("10", 1000, &ms), 0);
    assert_int_equal(ms, 10000);
    assert_int_equal(config_parse_duration("250ms", 1000, &ms), 0);
    assert_int_equal(ms, 250);
    assert_int_equal(config_parse_duration("1h", 1, &ms), 0);
    assert_int_equal(ms, 3600000);
    assert_int_equal(config_parse_duration("-1", 1, &ms), -1);
    assert_int_equal(config_parse_duration("1.5s", 1, &ms), -1);
    assert_int_equal(config_parse_duration("", 1, &ms), -1);
    assert_int_equal(config_parse_int("42", 0, 100, &v), 0);
    assert_int_equal(v, 42);
    assert_int_equal(config_parse_int("101", 0, 100, &v), -1);
    assert_int_equal(config_parse_int("4 ", 0, 100, &v), -1);
}

static void
test_remote_timeouts(void **state)
{
    (void)state;
    struct config cfg;
    char err[256];
    assert_int_equal(config_load(&cfg, NULL, err, sizeof(err)), 0);
    assert_int_equal(cfg.redis_timeout_ms, 250);
    assert_int_equal(cfg.db_statement_timeout_ms, 5000);
    config_free(&cfg);
    setenv("REDIS_TIMEOUT_MS", "1s", 1);
    setenv("DB_STATEMENT_TIMEOUT_MS", "2500", 1);
    assert_int_equal(config_load(&cfg, NULL, err, sizeof(err)), 0);
    assert_int_equal(cfg.redis_timeout_ms, 1000);
    assert_int_equal(cfg.db_statement_timeout_ms, 2500);
    config_free(&cfg);
    unsetenv("DB_STATEMENT_TIMEOUT_MS");
    expect_error("REDIS_TIMEOUT_MS", "0", "REDIS_TIMEOUT_MS");
    expect_error("REDIS_TIMEOUT_MS", "2m", "REDIS_TIMEOUT_MS"); /* above 60 s */
    expect_error("DB_STATEMENT_TIMEOUT_MS", "0", "DB_STATEMENT_TIMEOUT_MS");
    expect_error("DB_STATEMENT_TIMEOUT_MS", "50ms", "DB_STATEMENT_TIMEOUT_MS");
}

/* Unset, the lease is a job's worst case plus 10 s, and follows the
 * settings it comes from; it is not exported, so a child derives it too. */
static void
test_lease_derived(void **state)
{
    (void)state;
    struct config cfg;
    char err[512];
    assert_int_equal(config_load(&cfg, NULL, err, sizeof(err)), 0);
    /* 5 x 30 s + 4 x 30 s + 2 x 5 s */
    assert_int_equal(cfg.job_worst_case_ms, 280000);
    assert_int_equal(config_job_worst_case_ms(&cfg), 280000);
    assert_int_equal(cfg.processing_lease_ms, 290000);
    assert_false(cfg.processing_lease_set);
    config_export(&cfg);
    assert_null(getenv("PROCESSING_LEASE_MS"));
    config_free(&cfg);

    setenv("GATEWAY_TIMEOUT_MS", "500", 1);
    setenv("GATEWAY_MAX_ATTEMPTS", "3", 1);
    setenv("GATEWAY_RETRY_CAP_MS", "200", 1);
    setenv("DB_STATEMENT_TIMEOUT_MS", "1000", 1);
    assert_int_equal(config_load(&cfg, NULL, err, sizeof(err)), 0);
    assert_int_equal(cfg.job_worst_case_ms, 3 * 500 + 2 * 200 + 2 * 1000);
    assert_int_equal(cfg.processing_lease_ms, 3900 + 10000);
    /* A reload with more attempts moves the derived lease with it. */
    assert_int_equal(config_set(&cfg, "GATEWAY_MAX_ATTEMPTS", "4", err, sizeof(err)), 0);
    assert_int_equal(cfg.processing_lease_ms, 4 * 500 + 3 * 200 + 2 * 1000 + 10000);
    assert_false(cfg.processing_lease_set);
    config_free(&cfg);

    /* With two providers a failover adds one call and two statements. */
    setenv("GATEWAY_PROVIDERS", "sim_a,sim_b", 1);
    setenv("GATEWAY_URL", "http://127.0.0.1:1,http://127.0.0.1:2", 1);
    assert_int_equal(config_load(&cfg, NULL, err, sizeof(err)), 0);
    assert_int_equal(cfg.job_worst_case_ms, 4 * 500 + 2 * 200 + 4 * 1000);
    assert_int_equal(cfg.processing_lease_ms, 6400 + 10000);
    config_free(&cfg);
}

/* Set, it must cover the worst case: equal is accepted, shorter stops
 * start-up (and refuses a reload) naming the variable, the worst case and
 * the settings it comes from. */
static void
test_lease_refused_when_too_short(void **state)
{
    (void)state;
    struct config cfg;
    char err[512] = "";
    setenv("GATEWAY_TIMEOUT_MS", "500", 1);
    setenv("GATEWAY_MAX_ATTEMPTS", "3", 1);
    setenv("GATEWAY_RETRY_CAP_MS", "200", 1);
    setenv("DB_STATEMENT_TIMEOUT_MS", "1000", 1);
    setenv("PROCESSING_LEASE_MS", "3900", 1);
    assert_int_equal(config_load(&cfg, NULL, err, sizeof(err)), 0);
    assert_int_equal(cfg.processing_lease_ms, 3900);
    assert_true(cfg.processing_lease_set);
    config_export(&cfg);
    assert_string_equal(getenv("PROCESSING_LEASE_MS"), "3900");
    /* A reload that makes jobs longer than the set lease is refused. */
    assert_int_equal(config_set(&cfg, "GATEWAY_MAX_ATTEMPTS", "4", err, sizeof(err)), -1);
    assert_non_null(strstr(err, "PROCESSING_LEASE_MS"));
    config_free(&cfg);

    setenv("PROCESSING_LEASE_MS", "3899", 1);
    assert_int_equal(config_load(&cfg, NULL, err, sizeof(err)), -1);
    const char *needles[] = {"PROCESSING_LEASE_MS",
                             "3899",
                             "3900",
                             "GATEWAY_MAX_ATTEMPTS 3",
                             "GATEWAY_TIMEOUT_MS 500",
                             "GATEWAY_RETRY_CAP_MS 200",
                             "DB_STATEMENT_TIMEOUT_MS 1000"};
    for (size_t i = 0; i < sizeof(needles) / sizeof(needles[0]); i++) {
        if (!strstr(err, needles[i]))
            fail_msg("error '%s' does not name '%s'", err, needles[i]);
    }
    assert_null(strchr(err, '\n')); /* one line */

    /* The defaults: 280 s of worst case, so the old 60 s lease is refused. */
    unsetenv("GATEWAY_TIMEOUT_MS");
    unsetenv("GATEWAY_MAX_ATTEMPTS");
    unsetenv("GATEWAY_RETRY_CAP_MS");
    unsetenv("DB_STATEMENT_TIMEOUT_MS");
    setenv("PROCESSING_LEASE_MS", "60000", 1);
    assert_int_equal(config_load(&cfg, NULL, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "280000"));
    setenv("PROCESSING_LEASE_MS", "5m", 1);
    assert_int_equal(config_load(&cfg, NULL, err, sizeof(err)), 0);
    assert_int_equal(cfg.processing_lease_ms, 300000);
    config_free(&cfg);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_defaults, clear_env),
        cmocka_unit_test_setup(test_environment_and_units, clear_env),
        cmocka_unit_test_setup(test_file_wins_and_quotes, clear_env),
        cmocka_unit_test_setup(test_bad_values_name_the_variable, clear_env),
        cmocka_unit_test_setup(test_gateway_providers, clear_env),
        cmocka_unit_test_setup(test_secret_value_never_in_error, clear_env),
        cmocka_unit_test_setup(test_file_errors, clear_env),
        cmocka_unit_test_setup(test_set_and_export, clear_env),
        cmocka_unit_test_setup(test_parsers, clear_env),
        cmocka_unit_test_setup(test_remote_timeouts, clear_env),
        cmocka_unit_test_setup(test_lease_derived, clear_env),
        cmocka_unit_test_setup(test_lease_refused_when_too_short, clear_env),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
