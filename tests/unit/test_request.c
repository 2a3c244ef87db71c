/* Unit tests for api/request.c: a request is answered once and freed once,
 * whatever order its job's reply, the CONFIRM_WAIT_MS timer and the store of
 * its answer under an Idempotency-Key come in. The HTTP write and the store
 * are test doubles; the timer is a real libevent timer. Run under
 * AddressSanitizer, a use after free or a double free fails the test. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>
#include <event2/event.h>

#include "api.h"

static int writes, last_status;
static struct api_req *stored_r; /* an answer being stored, not yet sent */
static int stored_status;

void
api_write(struct api_req *r, int status, const char *body)
{
    (void)r;
    (void)body;
    writes++;
    last_status = status;
}

void
idem_finish(struct api_req *r, int status, const char *body)
{
    (void)body;
    assert_null(stored_r); /* one store per request */
    r->idem_owner = false;
    stored_r = r;
    stored_status = status;
}

/* The store's write came back: send, and drop the store's reference. */
static void
store_done(void)
{
    struct api_req *r = stored_r;
    stored_r = NULL;
    request_send(r, stored_status, "{}");
    request_release(r);
}

static struct event_base *base;
static struct role_ctx ctx;
static struct api api;

static int
setup(void **state)
{
    (void)state;
    base = event_base_new();
    memset(&ctx, 0, sizeof(ctx));
    ctx.base = base;
    memset(&api, 0, sizeof(api));
    api.ctx = &ctx;
    writes = 0;
    stored_r = NULL;
    return 0;
}

static int
teardown(void **state)
{
    (void)state;
    assert_int_equal(request_live_count(), 0);
    assert_int_equal(api.jobs_in_flight, 0);
    event_base_free(base);
    return 0;
}

static void
on_wait_answer(struct api_req *r)
{
    request_answer(r, 200, "{\"status\":\"processing\"}");
}

static struct api_req *
claimed(bool idem)
{
    struct api_req *r = request_new(&api, NULL);
    r->route = "test";
    request_claimed(r);
    r->idem_owner = idem;
    return r;
}

static void
test_plain_answer_once(void **state)
{
    (void)state;
    struct api_req *r = claimed(false);
    request_answer(r, 200, "{}");
    assert_int_equal(writes, 1);
    assert_int_equal(request_live_count(), 0);
}

static void
test_timer_then_job_with_a_key(void **state)
{
    (void)state;
    struct api_req *r = claimed(true);
    api.jobs_in_flight++;
    r->job_slot = true;
    request_wait(r, 1, on_wait_answer);
    event_base_loop(base, EVLOOP_ONCE); /* the wait runs out: answered "processing" */
    assert_non_null(stored_r);
    assert_int_equal(writes, 0); /* being stored */
    /* The worker's outcome arrives while the answer is being stored. */
    assert_false(request_open(r));
    request_answer(r, 402, "{}"); /* dropped: one answer per request */
    request_job_done(r);
    assert_int_equal(request_live_count(), 1); /* the store still refers to it */
    store_done();
    assert_int_equal(writes, 1);
    assert_int_equal(last_status, 200);
}

static void
test_job_then_store_then_no_timer(void **state)
{
    (void)state;
    struct api_req *r = claimed(true);
    request_wait(r, 5, on_wait_answer);
    request_answer(r, 200, "{}"); /* the worker answered in time */
    request_job_done(r);
    store_done();
    assert_int_equal(writes, 1);
    assert_int_equal(request_live_count(), 0);
    struct timeval tv = {0, 20000};
    event_base_loopexit(base, &tv);
    event_base_dispatch(base); /* the timer went with the request */
    assert_int_equal(writes, 1);
}

static void
test_answered_before_the_job_returns(void **state)
{
    (void)state;
    struct api_req *r = claimed(false);
    request_wait(r, 1, on_wait_answer);
    event_base_loop(base, EVLOOP_ONCE);
    assert_int_equal(writes, 1);               /* answered "processing" at once (no key) */
    assert_int_equal(request_live_count(), 1); /* the job still refers to it */
    request_job_done(r);
    assert_int_equal(request_live_count(), 0);
}

static void
test_two_jobs_and_holds(void **state)
{
    (void)state;
    struct api_req *r = claimed(false);
    request_hold(r); /* a Redis call out */
    request_wait(r, 1000, on_wait_answer);
    request_answer(r, 200, "{}");
    request_release(r);
    assert_int_equal(request_live_count(), 1);
    request_job_done(r);
    assert_int_equal(writes, 1);
}

static void
test_reserved_slot_is_given_back(void **state)
{
    (void)state;
    struct api_req *r = claimed(false);
    api.jobs_in_flight++; /* reserved, then refused before a job was sent */
    r->job_slot = true;
    request_answer(r, 400, "{}");
    assert_int_equal(api.jobs_in_flight, 0);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_plain_answer_once, setup, teardown),
        cmocka_unit_test_setup_teardown(test_timer_then_job_with_a_key, setup, teardown),
        cmocka_unit_test_setup_teardown(test_job_then_store_then_no_timer, setup, teardown),
        cmocka_unit_test_setup_teardown(test_answered_before_the_job_returns, setup, teardown),
        cmocka_unit_test_setup_teardown(test_two_jobs_and_holds, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reserved_slot_is_given_back, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
