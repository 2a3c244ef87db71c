/* redisev: one hiredis asynchronous connection on a libevent loop; see redisev.c. */
#ifndef PAYMENTD_REDISEV_H
#define PAYMENTD_REDISEV_H

#include <event2/event.h>
#include <hiredis/async.h>
#include <stdbool.h>

#include "config.h"

struct redisev;

/* Called exactly once per command: reply is NULL when Redis could not say
 * (not answered within REDIS_TIMEOUT_MS, connection failed or lost). */
typedef void (*redisev_cb)(void *arg, redisReply *reply);

/* Resolves REDIS_HOST (blocking: call before the loop runs) and starts
 * connecting. A name that does not resolve ends the process: exit
 * EXIT_ROLE_CONFIG, or EXIT_ROLE_FAILURE when DNS could not answer. */
struct redisev *redisev_new(struct event_base *base, const struct config *cfg);
void redisev_free(struct redisev *r);
bool redisev_connected(const struct redisev *r);

/* Sends a command given as argv (cb may be NULL: nobody waits for the reply). Returns -1 (callback
 * not called) when not connected, so that the caller takes its Redis-less path at once; else cb
 * runs later, within REDIS_TIMEOUT_MS. A late reply drops the connection (every pending callback
 * then runs with NULL) and it is re-opened after a second. */
int redisev_command(struct redisev *r, redisev_cb cb, void *arg, int argc, const char **argv);

#endif
