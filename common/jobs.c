/*
 * jobs - the gateway job message (envelope type job.request) that the api
 * (confirm, capture, cancel, the saga) and the outbox (re-driving payments
 * left in processing) send to workers. Offers jobs_message(); the row it
 * reads comes from a statement returning JOB_COLS. Calls envelope.
 */
#include "jobs.h"

#include <stdlib.h>

#include "envelope.h"

void *
jobs_message(const char *op, const char *request_id, int64_t deadline_ms, PGresult *res, int row,
             int amount_col, int64_t amount_to_capture, const char *reason, size_t *len)
{
    struct envelope_writer w;
    envelope_begin(&w, MSG_JOB, request_id, deadline_ms, 12);
    envelope_put_str(&w, "op", op);
    envelope_put_int(&w, "intent_id", strtoll(PQgetvalue(res, row, amount_col - 4), NULL, 10));
    envelope_put_int(&w, "version", strtoll(PQgetvalue(res, row, amount_col - 3), NULL, 10));
    envelope_put_str(&w, "public_id", PQgetvalue(res, row, amount_col - 2));
    envelope_put_int(&w, "account_id", strtoll(PQgetvalue(res, row, amount_col - 1), NULL, 10));
    envelope_put_int(&w, "amount", strtoll(PQgetvalue(res, row, amount_col), NULL, 10));
    envelope_put_str(&w, "currency", PQgetvalue(res, row, amount_col + 1));
    envelope_put_str(&w, "payment_method", PQgetvalue(res, row, amount_col + 2));
    envelope_put_str(&w, "capture_method", PQgetvalue(res, row, amount_col + 3));
    envelope_put_str(&w, "provider", PQgetvalue(res, row, amount_col + 4));
    envelope_put_int(&w, "amount_to_capture", amount_to_capture);
    envelope_put_str(&w, "reason", reason ? reason : "");
    return envelope_finish(&w, len);
}
