/* pgev: a small pool of non-blocking libpq connections on a libevent loop; see pgev.c. */
#ifndef PAYMENTD_PGEV_H
#define PAYMENTD_PGEV_H

#include <event2/event.h>
#include <libpq-fe.h>
#include <stdbool.h>

#include "config.h"

struct pgev_pool;

/* Called on the loop once per query: res is the last result (cleared by the
 * pool after the call; an error result when the server ended the statement,
 * e.g. at statement_timeout) or NULL with err set when the query could not
 * run or had no result within DB_STATEMENT_TIMEOUT_MS + 2 s. */
typedef void (*pgev_cb)(void *arg, PGresult *res, const char *err);

/* Opens size connections with statement_timeout = DB_STATEMENT_TIMEOUT_MS.
 * Resolves POSTGRES_HOST first (blocking: call before the loop runs); a
 * name that does not resolve ends the process with EXIT_ROLE_CONFIG
 * (EXIT_ROLE_FAILURE when DNS could not answer). */
struct pgev_pool *pgev_pool_new(struct event_base *base, const struct config *cfg, int size);
void pgev_pool_free(struct pgev_pool *pool);

/* Queues a parameterised query (text parameters); the callback always runs,
 * later, on the loop. Returns an id usable with pgev_forget(). */
unsigned long pgev_query(struct pgev_pool *pool, const char *sql, int nparams,
                         const char *const *params, pgev_cb cb, void *arg);
/* Like pgev_query() for SQL with static storage (a string literal): runs it
 * as a prepared statement, prepared once per connection. */
unsigned long pgev_exec(struct pgev_pool *pool, const char *static_sql, int nparams,
                        const char *const *params, pgev_cb cb, void *arg);

/* A statement that many callers' runs may share one transaction (group
 * commit). batch_sql takes $1, a JSON array with each caller's parameters
 * (an array of strings and nulls), and returns rows whose first column is
 * the caller's number (1, 2, ... in the array's order) and second its
 * failure ("SQLSTATE XXXXX: message", or NULL: each caller's run is its own
 * savepoint, so one failing leaves the others' intact), then the columns
 * single_sql returns. Both strings have static storage. */
struct pgev_batch {
    const char *single_sql;
    const char *batch_sql;
    int max; /* callers in one transaction at most */
};

/* Like pgev_exec(), but when this pool's connections are all busy, the
 * queued runs of the same statement go in one transaction when a
 * connection frees; each callback gets a result of its own rows and
 * single_sql's columns, or NULL and the failure ("SQLSTATE XXXXX: ..."). */
unsigned long pgev_exec_batched(struct pgev_pool *pool, const struct pgev_batch *b, int nparams,
                                const char *const *params, pgev_cb cb, void *arg);

/* The SQLSTATE of a failed query (out, 6 bytes), from its result or, for a
 * run that failed inside a batch, from err; NULL when none is known. */
const char *pgev_sqlstate(PGresult *res, const char *err, char *out);

/* The caller no longer wants the answer of query id: its callback is not called. */
void pgev_forget(struct pgev_pool *pool, unsigned long id);

/* Called for each NOTIFY received (channel, payload), and with an empty
 * channel each time a connection has been (re)established. */
typedef void (*pgev_notify_cb)(void *arg, const char *channel, const char *payload);

/* Runs static_sql (e.g. "LISTEN outbox") first on every new connection and
 * delivers notifications to cb. Call before the loop runs. */
void pgev_pool_on_connect(struct pgev_pool *pool, const char *static_sql, pgev_notify_cb cb,
                          void *arg);

/* Number of connections currently established. */
int pgev_pool_connected(const struct pgev_pool *pool);

/* Fills libpq connection keywords from the configuration (DATABASE_URL or
 * POSTGRES_*); exposed for the tools that connect synchronously. Neither
 * resolved addresses nor timeouts: a migration must never be cut off. */
void pgev_conninfo(const struct config *cfg, const char **keys, const char **vals, int cap);

#endif
