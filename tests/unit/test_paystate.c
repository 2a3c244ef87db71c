/* Unit tests for common/paystate.c: properties of the payment state machine's
 * table and of the attempts' status changes, so that a row added later cannot
 * reopen the paths that once lost money. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "paystate.h"

static const char *const statuses[] = {"requires_payment_method",
                                       "requires_confirmation",
                                       "requires_action",
                                       "processing",
                                       "requires_capture",
                                       "succeeded",
                                       "canceled"};
#define N_STATUSES (sizeof(statuses) / sizeof(statuses[0]))

static int
status_index(const char *s)
{
    for (size_t i = 0; i < N_STATUSES; i++)
        if (strcmp(statuses[i], s) == 0)
            return (int)i;
    return -1;
}

static bool
starts_with(const char *s, const char *prefix)
{
    return strncmp(s, prefix, strlen(prefix)) == 0;
}

static void
test_rows_are_well_formed(void **state)
{
    (void)state;
    for (size_t i = 0; i < paystate_transitions_count; i++) {
        const struct paystate_transition *t = &paystate_transitions[i];
        assert_true(t->from[0] == '\0' || status_index(t->from) >= 0);
        assert_true(status_index(t->to) >= 0);
        /* (from, event) decides: one row each. */
        for (size_t k = i + 1; k < paystate_transitions_count; k++)
            assert_false(strcmp(t->from, paystate_transitions[k].from) == 0 &&
                         strcmp(t->event, paystate_transitions[k].event) == 0);
        assert_string_equal(paystate_next(t->from, t->event), t->to);
    }
    assert_null(paystate_next("succeeded", "cancel"));
    assert_null(paystate_next("requires_capture", "confirm"));
}

static void
test_final_states_have_no_way_out(void **state)
{
    (void)state;
    assert_true(paystate_final("succeeded"));
    assert_true(paystate_final("canceled"));
    for (size_t i = 0; i < N_STATUSES; i++) {
        if (strcmp(statuses[i], "succeeded") != 0 && strcmp(statuses[i], "canceled") != 0)
            assert_false(paystate_final(statuses[i]));
    }
}

/* Every state is reached from creation, and from every state a final one
 * is reached: nothing is stranded by the table itself. */
static void
test_everything_reachable_and_nothing_stranded(void **state)
{
    (void)state;
    bool reach[N_STATUSES] = {0};
    for (size_t i = 0; i < paystate_transitions_count; i++)
        if (!paystate_transitions[i].from[0])
            reach[status_index(paystate_transitions[i].to)] = true;
    for (bool grew = true; grew;) {
        grew = false;
        for (size_t i = 0; i < paystate_transitions_count; i++) {
            const struct paystate_transition *t = &paystate_transitions[i];
            if (t->from[0] && reach[status_index(t->from)] && !reach[status_index(t->to)])
                reach[status_index(t->to)] = grew = true;
        }
    }
    for (size_t i = 0; i < N_STATUSES; i++)
        assert_true(reach[i]);
    bool ends[N_STATUSES] = {0};
    ends[status_index("succeeded")] = ends[status_index("canceled")] = true;
    for (bool grew = true; grew;) {
        grew = false;
        for (size_t i = 0; i < paystate_transitions_count; i++) {
            const struct paystate_transition *t = &paystate_transitions[i];
            if (t->from[0] && ends[status_index(t->to)] && !ends[status_index(t->from)])
                ends[status_index(t->from)] = grew = true;
        }
    }
    for (size_t i = 0; i < N_STATUSES; i++)
        assert_true(ends[i]);
}

/* Money moves only through the gateway: an operation of the api or the
 * sweeps never lands in succeeded, and only a gateway outcome leaves
 * processing (except a re-confirm's void, which stays in it). */
static void
test_only_gateway_outcomes_move_money(void **state)
{
    (void)state;
    for (size_t i = 0; i < paystate_transitions_count; i++) {
        const struct paystate_transition *t = &paystate_transitions[i];
        bool outcome = strchr(t->event, '.') && !starts_with(t->event, "create");
        if (strcmp(t->to, "succeeded") == 0)
            assert_true(outcome);
        if (strcmp(t->from, "processing") == 0)
            assert_true(outcome);
    }
}

/* While a charge may still complete at the gateway (3-D Secure pending, an
 * authorization held), leaving that state goes through the gateway: cancel,
 * expire and a new confirm lead to processing (a void first), never
 * straight to canceled; and a failure report cannot wipe an authorization. */
static void
test_open_charges_are_voided_not_forgotten(void **state)
{
    (void)state;
    const char *open[] = {"requires_action", "requires_capture"};
    for (size_t i = 0; i < 2; i++) {
        assert_string_equal(paystate_next(open[i], "cancel"), "processing");
        assert_string_equal(paystate_next(open[i], "expire"), "processing");
    }
    assert_string_equal(paystate_next("requires_action", "confirm"), "processing");
    assert_null(paystate_next("requires_capture", "charge.failed"));
    assert_null(paystate_next("requires_capture", "charge.captured"));
    assert_null(paystate_next("requires_capture", "attach_payment_method"));
    /* Nothing held: cancel is immediate. */
    assert_string_equal(paystate_next("requires_payment_method", "cancel"), "canceled");
    assert_string_equal(paystate_next("requires_confirmation", "cancel"), "canceled");
}

/* Exactly one event per state change: every transition into a state other
 * than processing names its event (creation included), except going back to
 * a state the payment was in before the operation (a refused capture) and
 * attaching a payment method, which Stripe does not announce either. */
static void
test_every_visible_change_has_its_event(void **state)
{
    (void)state;
    for (size_t i = 0; i < paystate_transitions_count; i++) {
        const struct paystate_transition *t = &paystate_transitions[i];
        bool silent = strcmp(t->to, "processing") == 0 ||
                      strcmp(t->event, "capture.refused") == 0 ||
                      strcmp(t->event, "attach_payment_method") == 0;
        if (silent && t->from[0])
            assert_null(t->outbox_event);
        else
            assert_non_null(t->outbox_event);
        if (strcmp(t->to, "succeeded") == 0)
            assert_string_equal(t->outbox_event, "payment_intent.succeeded");
        if (strcmp(t->to, "canceled") == 0)
            assert_string_equal(t->outbox_event, "payment_intent.canceled");
    }
}

static void
test_attempts_stay_open_until_final(void **state)
{
    (void)state;
    const char *types[] = {"charge", "authorization", "capture", "void", "refund"};
    const char *final[] = {"succeeded", "failed", "canceled"};
    for (size_t t = 0; t < 5; t++) {
        bool leaves_pending = false;
        for (size_t i = 0; i < paystate_attempt_transitions_count; i++) {
            const struct paystate_attempt_transition *a = &paystate_attempt_transitions[i];
            if (strcmp(a->type, types[t]) != 0)
                continue;
            leaves_pending = leaves_pending || strcmp(a->from, "pending") == 0;
            assert_string_not_equal(a->to, "pending"); /* nothing becomes pending again */
            for (size_t f = 0; f < 3; f++)
                assert_string_not_equal(a->from, final[f]); /* final is final */
        }
        assert_true(leaves_pending);
    }
    /* An automatic charge is never only authorized; an authorization is
     * captured or voided only once held. */
    assert_false(paystate_attempt_allowed("charge", "pending", "requires_capture"));
    assert_false(paystate_attempt_allowed("authorization", "requires_action", "succeeded"));
    assert_true(paystate_attempt_allowed("authorization", "requires_capture", "succeeded"));
    assert_true(paystate_attempt_allowed("charge", "requires_action", "canceled"));
}

/* Every refund change announces itself; a refund the gateway fails after it
 * succeeded goes back to failed (its amount refundable again). */
static void
test_refund_table(void **state)
{
    (void)state;
    for (size_t i = 0; i < paystate_refund_transitions_count; i++)
        assert_non_null(paystate_refund_transitions[i].outbox_event);
    bool reversed = false;
    for (size_t i = 0; i < paystate_refund_transitions_count; i++) {
        const struct paystate_refund_transition *t = &paystate_refund_transitions[i];
        reversed = reversed || (strcmp(t->from, "succeeded") == 0 && strcmp(t->to, "failed") == 0);
        assert_string_not_equal(t->from, "failed");
        assert_string_not_equal(t->from, "canceled");
    }
    assert_true(reversed);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rows_are_well_formed),
        cmocka_unit_test(test_final_states_have_no_way_out),
        cmocka_unit_test(test_everything_reachable_and_nothing_stranded),
        cmocka_unit_test(test_only_gateway_outcomes_move_money),
        cmocka_unit_test(test_open_charges_are_voided_not_forgotten),
        cmocka_unit_test(test_every_visible_change_has_its_event),
        cmocka_unit_test(test_attempts_stay_open_until_final),
        cmocka_unit_test(test_refund_table),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
