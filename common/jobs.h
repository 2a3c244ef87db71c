/* jobs: the gateway job message the api and the outbox send to workers; see jobs.c. */
#ifndef PAYMENTD_JOBS_H
#define PAYMENTD_JOBS_H

#include <libpq-fe.h>
#include <stddef.h>
#include <stdint.h>

/* The columns every job-starting statement returns, in this order (the
 * statement names the intent row "upd"). */
#define JOB_COLS                                                                                   \
    "upd.id, upd.version, upd.public_id, upd.account_id, upd.amount, upd.currency,"                \
    " coalesce(upd.payment_method, ''), upd.capture_method, coalesce(upd.gateway_provider, '')"
#define JOB_AMOUNT_COL_OFFSET 4 /* amount is the fifth of JOB_COLS */

/* The job envelope for a worker, from a row with the JOB_COLS whose amount
 * is at amount_col; free the result. */
void *jobs_message(const char *op, const char *request_id, int64_t deadline_ms, PGresult *res,
                   int row, int amount_col, int64_t amount_to_capture, const char *reason,
                   size_t *len);

#endif
