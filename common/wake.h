/* wake: tells the outbox dispatcher that events were committed; see wake.c. */
#ifndef PAYMENTD_WAKE_H
#define PAYMENTD_WAKE_H

#include <nng/nng.h>

#include "config.h"

struct wake;

/* A writer's side: dials the outbox's wake socket (never blocks). */
struct wake *wake_new(const struct config *cfg);
void wake_free(struct wake *w);
/* After a commit that may have written outbox events: a wake-up, dropped
 * when the dispatcher's queue is full (it is busy anyway) or it is away
 * (its poll finds the events). */
void wake_outbox(struct wake *w);

/* The dispatcher's side: the URL it listens on (NNG PULL). */
void wake_url(const struct config *cfg, char *buf, size_t cap);

#endif
