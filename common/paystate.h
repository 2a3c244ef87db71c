/* paystate: the payment state machine and the gateway attempts' states, as tables; see paystate.c.
 */
#ifndef PAYMENTD_PAYSTATE_H
#define PAYMENTD_PAYSTATE_H

#include <stdbool.h>
#include <stddef.h>

/* A PaymentIntent's transition: from a status, an event (an operation of
 * the api or the sweeps, or a gateway outcome from a worker or a callback)
 * leads to a status, and writes the outbox event named (or none). "" as
 * from is the creation of the payment. */
struct paystate_transition {
    const char *from;
    const char *event;
    const char *to;
    const char *outbox_event; /* NULL: no event */
    const char *by;           /* which writers use it, for the README */
    const char *gateway;      /* what it does at the gateway, for the README */
};

/* An attempt's (payment_transactions row's) legal status change. */
struct paystate_attempt_transition {
    const char *type; /* charge, authorization, capture, void, refund */
    const char *from;
    const char *to;
};

/* A refund's transition: from its status, an event leads to a status and
 * writes the refund's event (charge.refunded follows a success too). */
struct paystate_refund_transition {
    const char *from; /* "" for creation */
    const char *event;
    const char *to;
    const char *outbox_event;
};

extern const struct paystate_transition paystate_transitions[];
extern const size_t paystate_transitions_count;
extern const struct paystate_attempt_transition paystate_attempt_transitions[];
extern const size_t paystate_attempt_transitions_count;
extern const struct paystate_refund_transition paystate_refund_transitions[];
extern const size_t paystate_refund_transitions_count;

/* The status an event leads to from a status, or NULL when the table has
 * no such transition (the writer must refuse). */
const char *paystate_next(const char *from, const char *event);
/* True for a payment status no transition leaves. */
bool paystate_final(const char *status);
/* True when an attempt of this type may move between the two statuses. */
bool paystate_attempt_allowed(const char *type, const char *from, const char *to);

#endif
