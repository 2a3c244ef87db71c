/* Unit tests for worker/breaker.c: opening, the single half-open probe, closing. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "breaker.h"

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
        breaker_done(&b, false, probe, 3, "t");
    }
    breaker_done(&b, true, false, 3, "t"); /* a success resets the streak */
    for (int i = 0; i < 3; i++)
        breaker_done(&b, false, false, 3, "t");
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
        breaker_done(&b, false, false, 3, "t");
    usleep(30000);
    assert_true(breaker_allow(&b, 20, &p1));
    assert_true(p1);
    assert_int_equal(atomic_load(&b.state), BREAKER_HALF_OPEN);
    assert_false(breaker_allow(&b, 20, &p2)); /* the token is taken */
    breaker_done(&b, false, true, 3, "t");    /* the probe failed: open again */
    assert_int_equal(atomic_load(&b.state), BREAKER_OPEN);
    assert_int_equal(atomic_load(&b.opened_total), 2);
    usleep(30000);
    assert_true(breaker_allow(&b, 20, &p1));
    assert_true(p1);
    breaker_done(&b, true, true, 3, "t"); /* the probe succeeded: closed */
    assert_int_equal(atomic_load(&b.state), BREAKER_CLOSED);
    assert_true(breaker_allow(&b, 20, &p2));
    assert_false(p2);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_opens_after_consecutive_failures),
        cmocka_unit_test(test_exactly_one_probe_then_close_or_reopen),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
