/* redisev: one hiredis asynchronous connection on a libevent loop; see redisev.c. */
#ifndef PAYMENTD_REDISEV_H
#define PAYMENTD_REDISEV_H

#include <event2/event.h>
#include <hiredis/async.h>
#include <stdbool.h>

#include "config.h"

struct redisev;

/* reply is NULL when the connection failed before an answer. */
typedef void (*redisev_cb)(void *arg, redisReply *reply);

struct redisev *redisev_new(struct event_base *base, const struct config *cfg);
void redisev_free(struct redisev *r);
bool redisev_connected(const struct redisev *r);

/* Sends a command given as argv (cb may be NULL: nobody waits for the reply). Returns -1 (callback
 * not called) when not connected, so that the caller takes its Redis-less path at once. */
int redisev_command(struct redisev *r, redisev_cb cb, void *arg, int argc, const char **argv);

#endif
