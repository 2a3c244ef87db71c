/*
 * jobs - the gateway job message (envelope type job.request) that the api
 * (confirm, capture, cancel, the saga) and the outbox (re-driving attempts
 * whose lease ran out, expiring payments) send to workers. A job names one
 * attempt: a payment_transactions row with its own idempotency key, which
 * the worker uses for every call of it, so a job sent twice never moves
 * money twice. Offers jobs_message() and jobs_has_attempt(); the row comes
 * from a statement selecting the attempt_jobs view's columns, read by name.
 * Calls envelope.
 */
#include "jobs.h"

#include <stdlib.h>

#include "envelope.h"

static const char *
jobs_col(PGresult *res, int row, const char *name)
{
    int col = PQfnumber(res, name);
    if (col < 0)
        abort(); /* a statement of ours lost a column the job needs */
    return PQgetvalue(res, row, col);
}

bool
jobs_has_attempt(PGresult *res, int row)
{
    int col = PQfnumber(res, "attempt_id");
    return col >= 0 && row < PQntuples(res) && !PQgetisnull(res, row, col);
}

void *
jobs_message(const char *request_id, int64_t deadline_ms, PGresult *res, int row, bool redrive,
             const struct jobs_answer *answer, size_t *len)
{
    if (!jobs_has_attempt(res, row))
        return NULL;
    struct envelope_writer w;
    bool keyed = answer && answer->idem_row > 0;
    envelope_begin(&w, MSG_JOB, request_id, deadline_ms, keyed ? 16 : 13);
    if (keyed) {
        envelope_put_int(&w, "idem_row", answer->idem_row);
        envelope_put_str(&w, "holder", answer->holder);
        envelope_put_str(&w, "route", answer->route);
    }
    envelope_put_int(&w, "attempt_id", strtoll(jobs_col(res, row, "attempt_id"), NULL, 10));
    envelope_put_str(&w, "key", jobs_col(res, row, "key"));
    envelope_put_str(&w, "op", jobs_col(res, row, "type"));
    envelope_put_str(&w, "purpose", jobs_col(res, row, "purpose"));
    envelope_put_int(&w, "intent_id", strtoll(jobs_col(res, row, "intent_id"), NULL, 10));
    envelope_put_str(&w, "public_id", jobs_col(res, row, "public_id"));
    envelope_put_int(&w, "amount", strtoll(jobs_col(res, row, "amount"), NULL, 10));
    envelope_put_str(&w, "currency", jobs_col(res, row, "currency"));
    envelope_put_str(&w, "payment_method", jobs_col(res, row, "payment_method"));
    envelope_put_str(&w, "provider", jobs_col(res, row, "provider"));
    envelope_put_str(&w, "target", jobs_col(res, row, "target"));
    envelope_put_str(&w, "target_key", jobs_col(res, row, "target_key"));
    envelope_put_bool(&w, "redrive", redrive);
    return envelope_finish(&w, len);
}
