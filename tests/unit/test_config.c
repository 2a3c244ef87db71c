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

static const char *const keys_used[] = {
    "PORT",        "WORKERS",      "RESTART_PERIOD",    "LOG_LEVEL",         "JWT_SECRET",
    "INSTANCE",    "METRICS_PORT", "POSTGRES_PASSWORD", "ROLE_HANG_TIMEOUT", "GATEWAY_PROVIDERS",
    "GATEWAY_URL", "GATEWAY_KEY"};

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
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
