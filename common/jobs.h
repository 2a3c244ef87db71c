/* jobs: the gateway job message the api and the outbox send to workers; see jobs.c. */
#ifndef PAYMENTD_JOBS_H
#define PAYMENTD_JOBS_H

#include <libpq-fe.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* The columns of the attempt_jobs view (sql/010_attempts.sql), selected as
 * "j.*" next to the columns of a function call "r" that returns the
 * attempt it started as attempt_id: what a worker needs to run one gateway
 * attempt. attempt_job() reads it with a fresh snapshot, so the statement
 * sees the row its own function call wrote. */
#define JOBS_JOIN " LEFT JOIN LATERAL attempt_job(r.attempt_id) j ON true"

/* The job envelope for the attempt in row `row` of res (a statement that
 * selects attempt_jobs' columns by name), or NULL when that row names no
 * attempt. redrive: the sweeps send an attempt whose answer may be lost, so
 * the worker asks the gateway what became of it first. Free the result. */
/* The request a job answers: the worker keeps its answer under the key. */
struct jobs_answer {
    int64_t idem_row;   /* the Idempotency-Key's row, 0: none */
    const char *holder; /* the request's claim on it */
    const char *route;  /* create, confirm, capture, cancel, refund */
};

void *jobs_message(const char *request_id, int64_t deadline_ms, PGresult *res, int row,
                   bool redrive, const struct jobs_answer *answer, size_t *len);

/* True when row `row` of res names an attempt to send. */
bool jobs_has_attempt(PGresult *res, int row);

#endif
