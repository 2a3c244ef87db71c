/* outbox: the outbox role's own declarations, shared by its modules (outbox/ only). */
#ifndef PAYMENTD_OUTBOX_OUTBOX_H
#define PAYMENTD_OUTBOX_OUTBOX_H

#include "pgev.h"
#include "role.h"

struct deliver;

/* deliver.c: merchant webhook deliveries. */
struct deliver *deliver_start(struct role_ctx *ctx, struct pgev_pool *pg);
void deliver_kick(struct deliver *d);
void deliver_stop(struct deliver *d);

/* sweep.c: maintenance sweeps, one leader across processes and hosts. */
struct sweep;
struct sweep *sweep_start(struct role_ctx *ctx, struct pgev_pool *pg);
void sweep_stop(struct sweep *s);

#endif
