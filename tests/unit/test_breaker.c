/* Unit tests for worker/breaker.c: opening, the single half-open probe, closing. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "breaker.h"

static const struct breaker_policy streak3 = {3, 100, 60000};

static void
test_opens_after_consecutive_failures(void **state)
{
    (void)state;
    struct shm_breaker b;
    bool probe;
    memset(&b, 0, sizeof(b));
    for (int i = 0; i < 2; i++) {
        assert_true(breaker_allow(&b, 60000, &probe));
        assert_false(probe);
        breaker_done(&b, false, probe, &streak3, "t");
    }
    breaker_done(&b, true, false, &streak3, "t"); /* a success resets the streak */
    for (int i = 0; i < 3; i++)
        breaker_done(&b, false, false, &streak3, "t");
    assert_int_equal(atomic_load(&b.state), BREAKER_OPEN);
    assert_false(breaker_allow(&b, 60000, &probe)); /* open: refused at once */
    assert_int_equal(atomic_load(&b.opened_total), 1);
}

static void
test_exactly_one_probe_then_close_or_reopen(void **state)
{
    (void)state;
    struct shm_breaker b;
    bool p1, p2;
    memset(&b, 0, sizeof(b));
    for (int i = 0; i < 3; i++)
        breaker_done(&b, false, false, &streak3, "t");
    usleep(30000);
    assert_true(breaker_allow(&b, 20, &p1));
    assert_true(p1);
    assert_int_equal(atomic_load(&b.state), BREAKER_HALF_OPEN);
    assert_false(breaker_allow(&b, 20, &p2));     /* the token is taken */
    breaker_done(&b, false, true, &streak3, "t"); /* the probe failed: open again */
    assert_int_equal(atomic_load(&b.state), BREAKER_OPEN);
    assert_int_equal(atomic_load(&b.opened_total), 2);
    usleep(30000);
    assert_true(breaker_allow(&b, 20, &p1));
    assert_true(p1);
    breaker_done(&b, true, true, &streak3, "t"); /* the probe succeeded: closed */
    assert_int_equal(atomic_load(&b.state), BREAKER_CLOSED);
    assert_true(breaker_allow(&b, 20, &p2));
    assert_false(p2);
}

static void
test_failure_rate_over_a_window(void **state)
{
    (void)state;
    struct shm_breaker b;
    const struct breaker_policy half = {1000, 50, 60000}; /* no streak will do it */
    memset(&b, 0, sizeof(b));
    /* Every other call fails: never two failures in a row. */
    for (int i = 0; i < 9; i++)
        breaker_done(&b, i % 2 == 0, false, &half, "t");
    assert_int_equal(atomic_load(&b.state), BREAKER_CLOSED); /* fewer calls than the minimum */
    breaker_done(&b, false, false, &half, "t");              /* 10 calls, 5 failed: 50 % */
    assert_int_equal(atomic_load(&b.state), BREAKER_OPEN);
    /* A healthy window never opens it. */
    struct shm_breaker ok;
    memset(&ok, 0, sizeof(ok));
    for (int i = 0; i < 100; i++)
        breaker_done(&ok, i % 5 != 0, false, &half, "t"); /* 20 % failures */
    assert_int_equal(atomic_load(&ok.state), BREAKER_CLOSED);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_opens_after_consecutive_failures),
        cmocka_unit_test(test_exactly_one_probe_then_close_or_reopen),
        cmocka_unit_test(test_failure_rate_over_a_window),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
