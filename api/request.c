/*
 * request - the lifetime of one /v1 request, as an object with explicit
 * states that only this module moves.
 *
 * Offers request_new(), request_claimed(), request_wait(),
 * request_job_done(), request_open(), request_answer(), request_send(),
 * request_hold() and request_release(). A request goes
 *
 *   RECEIVED  authenticating, counting its rate limit, claiming its key
 *   CLAIMED   it owns its Idempotency-Key (or has none): its handler runs
 *   WAITING   a gateway job is out; the job's reply or the CONFIRM_WAIT_MS
 *             timer answers, whichever comes first
 *   ANSWERING its answer is being stored under its Idempotency-Key, and is
 *             sent once stored
 *   ANSWERED  sent to the client
 *
 * and is freed when nothing refers to it any more: the flow itself until
 * it is answered, a job that is out, a store of its answer, a Redis call.
 * Every reference is taken with request_hold() (or by request_wait()) and
 * dropped with request_release(), so nothing is freed while a callback can
 * still reach it (STYLE 8). Only the first answer counts: an answer asked
 * for once the request is ANSWERING or ANSWERED is dropped (the timer and
 * the job's reply race by design), so a client never gets two. Calls api
 * (api_write), idem (idem_finish), log.
 */
#include <event2/event.h>
#include <stdlib.h>

#include "api.h"
#include "log.h"
#include "wake.h"
#include "xmalloc.h"

static int request_live; /* requests not yet freed, for tests and leak checks */

struct api_req *
request_new(struct api *api, struct evhttp_request *req)
{
    struct api_req *r = xcalloc(1, sizeof(*r));
    r->api = api;
    r->req = req;
    r->refs = 1; /* the flow's own, dropped when it is answered */
    r->state = REQ_RECEIVED;
    request_live++;
    return r;
}

int
request_live_count(void)
{
    return request_live;
}

void
request_claimed(struct api_req *r)
{
    /* CLAIMED again: a handler that took its key itself found it taken,
     * and runs once more after the key's row decided (idem.c). */
    if (r->state != REQ_RECEIVED && r->state != REQ_CLAIMED)
        abort();
    r->state = REQ_CLAIMED;
}

static void
request_on_wait(evutil_socket_t fd, short what, void *arg)
{
    struct api_req *r = arg;
    (void)fd;
    (void)what;
    if (r->state == REQ_WAITING && r->on_wait)
        r->on_wait(r);
}

void
request_wait(struct api_req *r, int64_t wait_ms, api_handler on_wait)
{
    if (r->state != REQ_CLAIMED && r->state != REQ_WAITING)
        abort(); /* a job for a request that is already answered */
    r->state = REQ_WAITING;
    r->refs++; /* the job's: released by request_job_done() */
    r->jobs_out++;
    r->on_wait = on_wait;
    if (!r->timer)
        r->timer = evtimer_new(r->api->ctx->base, request_on_wait, r);
    struct timeval tv = {(time_t)(wait_ms / 1000), (suseconds_t)((wait_ms % 1000) * 1000)};
    evtimer_add(r->timer, &tv);
}

void
request_job_done(struct api_req *r)
{
    if (r->jobs_out <= 0)
        abort();
    r->jobs_out--;
    if (r->job_slot) {
        r->api->jobs_in_flight--;
        r->job_slot = false;
    }
    request_release(r);
}

bool
request_open(const struct api_req *r)
{
    return r->state < REQ_ANSWERING;
}

void
request_answer(struct api_req *r, int status, const char *body)
{
    if (!request_open(r)) {
        log_debug("%s: a second answer (%d) dropped", r->route, status);
        return;
    }
    if (r->timer)
        evtimer_del(r->timer);
    if (r->idem_owner) {
        r->state = REQ_ANSWERING;
        r->refs++; /* the store's: released once the answer is stored and sent */
        idem_finish(r, status, body);
        return;
    }
    request_send(r, status, body);
}

void
request_send(struct api_req *r, int status, const char *body)
{
    if (r->state == REQ_ANSWERED)
        abort(); /* the one answer was sent already */
    r->state = REQ_ANSWERED;
    if (r->timer)
        evtimer_del(r->timer);
    api_write(r, status, body);
    if (r->method == EVHTTP_REQ_POST)
        wake_outbox(r->api->wake); /* it may have committed events */
    request_release(r);            /* the flow's */
}

void
request_hold(struct api_req *r)
{
    r->refs++;
}

void
request_release(struct api_req *r)
{
    if (r->refs <= 0)
        abort();
    if (--r->refs > 0)
        return;
    if (r->state != REQ_ANSWERED)
        abort(); /* freed without an answer: the client would hang */
    if (r->job_slot)
        r->api->jobs_in_flight--; /* reserved, but no job was sent */
    if (r->timer)
        event_free(r->timer);
    json_decref(r->params);
    free(r->idem_redis_value);
    free(r->pending_body);
    free(r->state_data);
    free(r);
    request_live--;
}
