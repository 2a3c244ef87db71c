/* Unit tests for supervisor/backoff.c: delays, reset and restart intensity. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "backoff.h"

static void
test_doubling_to_cap(void **state)
{
    (void)state;
    struct backoff b;
    int64_t delay, now = 0;
    const int64_t expect[] = {1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000};
    backoff_init(&b);
    for (size_t i = 0; i < sizeof(expect) / sizeof(expect[0]); i++) {
        now += 100000; /* far apart: intensity never trips */
        assert_false(backoff_crash(&b, now, 10, 5, 60000, &delay));
        assert_int_equal(delay, expect[i]);
    }
}

static void
test_reset_after_stable_uptime(void **state)
{
    (void)state;
    struct backoff b;
    int64_t delay;
    backoff_init(&b);
    assert_false(backoff_crash(&b, 1000, 10, 5, 60000, &delay));
    assert_false(backoff_crash(&b, 3000, 10, 5, 60000, &delay));
    assert_int_equal(delay, 2000);
    /* Up for 59.9 s: no reset yet. */
    assert_false(backoff_crash(&b, 70000, 59999, 5, 60000, &delay));
    assert_int_equal(delay, 4000);
    /* Up for 60 s: back to the minimum. */
    assert_false(backoff_crash(&b, 140000, 60000, 5, 60000, &delay));
    assert_int_equal(delay, 1000);
}

static void
test_intensity_limit(void **state)
{
    (void)state;
    struct backoff b;
    int64_t delay;
    backoff_init(&b);
    /* Five crashes within the period are tolerated, the sixth is not. */
    for (int i = 0; i < 5; i++)
        assert_false(backoff_crash(&b, 1000 + i * 100, 10, 5, 60000, &delay));
    assert_true(backoff_crash(&b, 1600, 10, 5, 60000, &delay));
}

static void
test_intensity_window_slides(void **state)
{
    (void)state;
    struct backoff b;
    int64_t delay;
    backoff_init(&b);
    /* One crash every 20 s with a 60 s period: at most 3 in any window. */
    for (int i = 0; i < 50; i++)
        assert_false(backoff_crash(&b, (int64_t)i * 20000, 10, 3, 60000, &delay));
    /* Intensity 2: the third crash within 60 s trips. */
    backoff_init(&b);
    assert_false(backoff_crash(&b, 0, 10, 2, 60000, &delay));
    assert_false(backoff_crash(&b, 1000, 10, 2, 60000, &delay));
    assert_true(backoff_crash(&b, 3000, 10, 2, 60000, &delay));
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_doubling_to_cap),
        cmocka_unit_test(test_reset_after_stable_uptime),
        cmocka_unit_test(test_intensity_limit),
        cmocka_unit_test(test_intensity_window_slides),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
