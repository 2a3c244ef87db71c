/*
 * paystate - the payment state machine: the one table of a PaymentIntent's
 * transitions, and the table of its gateway attempts' status changes.
 *
 * Offers paystate_transitions[] and paystate_attempt_transitions[] with
 * their counts, paystate_next(), paystate_final() and
 * paystate_attempt_allowed(). The tables are data, not code: `paymentctl
 * migrate` copies them into PostgreSQL (payment_transitions,
 * attempt_transitions), where a trigger checks every status change a
 * writer makes — api, worker, callbacks, sweeps — against them and writes
 * the outbox event named here, so an illegal change is an error, never a
 * silent overwrite, and every state change has its one event. The README's
 * state table is printed from here (`paymentctl transitions`). Calls nothing.
 *
 * Status names are Stripe's: requires_payment_method, requires_confirmation,
 * requires_action, processing (exactly one gateway operation in flight),
 * requires_capture, succeeded, canceled.
 */
#include "paystate.h"

#include <string.h>

#define RPM  "requires_payment_method"
#define RC   "requires_confirmation"
#define RA   "requires_action"
#define PROC "processing"
#define RCAP "requires_capture"
#define SUCC "succeeded"
#define CANC "canceled"

#define EV_CREATED  "payment_intent.created"
#define EV_ACTION   "payment_intent.requires_action"
#define EV_CAPTURE  "payment_intent.amount_capturable_updated"
#define EV_SUCCEED  "payment_intent.succeeded"
#define EV_FAILED   "payment_intent.payment_failed"
#define EV_CANCELED "payment_intent.canceled"

const struct paystate_transition paystate_transitions[] = {
    /* creation */
    {"", "create", RPM, EV_CREATED, "api", "-"},
    {"", "create.with_payment_method", RC, EV_CREATED, "api", "-"},
    {"", "create.confirm", PROC, EV_CREATED, "api, saga", "charge (or authorize) with a new key"},
    /* operations */
    {RPM, "attach_payment_method", RC, NULL, "api (update)", "-"},
    {RPM, "confirm", PROC, NULL, "api", "charge (or authorize) with a new key"},
    {RC, "confirm", PROC, NULL, "api", "charge (or authorize) with a new key"},
    {RA, "confirm", PROC, NULL, "api",
     "void the pending 3-D Secure charge first, then charge with a new key"},
    {RCAP, "capture", PROC, NULL, "api", "capture the open authorization"},
    {RPM, "cancel", CANC, EV_CANCELED, "api", "- (nothing is held)"},
    {RC, "cancel", CANC, EV_CANCELED, "api", "- (nothing is held)"},
    {RA, "cancel", PROC, NULL, "api", "void the pending 3-D Secure charge"},
    {RCAP, "cancel", PROC, NULL, "api", "void the open authorization"},
    {RPM, "expire", CANC, EV_CANCELED, "sweeps (24 h)", "-"},
    {RC, "expire", CANC, EV_CANCELED, "sweeps (24 h)", "-"},
    {RA, "expire", PROC, NULL, "sweeps (24 h)", "void the pending 3-D Secure charge"},
    {RCAP, "expire", PROC, NULL, "sweeps (7 days)", "void the open authorization"},
    /* outcomes of the operation in flight (worker, sweeps' re-drive, callbacks) */
    {PROC, "charge.requires_action", RA, EV_ACTION, "worker, callbacks",
     "the customer must authenticate"},
    {PROC, "charge.authorized", RCAP, EV_CAPTURE, "worker, callbacks", "authorized, held"},
    {PROC, "charge.captured", SUCC, EV_SUCCEED, "worker, callbacks", "captured"},
    {PROC, "charge.failed", RPM, EV_FAILED, "worker, callbacks",
     "declined or refused: nothing held"},
    {PROC, "capture.succeeded", SUCC, EV_SUCCEED, "worker, callbacks", "captured"},
    {PROC, "capture.refused", RCAP, NULL, "worker", "capture refused; the authorization stands"},
    {PROC, "authorization.lost", CANC, EV_CANCELED, "worker",
     "the authorization was already voided or expired at the gateway"},
    {PROC, "void.released", CANC, EV_CANCELED, "worker", "voided (or it had failed): nothing held"},
    {PROC, "void.reconfirm", PROC, NULL, "worker",
     "the old charge is voided; the new charge is sent next"},
    /* late outcomes of a 3-D Secure charge (callbacks) */
    {RA, "charge.authorized", RCAP, EV_CAPTURE, "callbacks", "authorized, held"},
    {RA, "charge.captured", SUCC, EV_SUCCEED, "callbacks", "captured"},
    {RA, "charge.failed", RPM, EV_FAILED, "callbacks", "authentication or charge failed"},
};
const size_t paystate_transitions_count =
    sizeof(paystate_transitions) / sizeof(paystate_transitions[0]);

/* An attempt is open until final: pending (an answer outstanding),
 * requires_action (3-D Secure at the gateway), requires_capture (an
 * authorization held). Final: succeeded, failed, canceled. For an
 * authorization, succeeded means captured and canceled means voided. */
const struct paystate_attempt_transition paystate_attempt_transitions[] = {
    {"charge", "pending", "requires_action"},
    {"charge", "pending", "succeeded"},
    {"charge", "pending", "failed"},
    {"charge", "requires_action", "succeeded"},
    {"charge", "requires_action", "failed"},
    {"charge", "requires_action", "canceled"},
    {"authorization", "pending", "requires_action"},
    {"authorization", "pending", "requires_capture"},
    {"authorization", "pending", "failed"},
    {"authorization", "requires_action", "requires_capture"},
    {"authorization", "requires_action", "failed"},
    {"authorization", "requires_action", "canceled"},
    {"authorization", "requires_capture", "succeeded"},
    {"authorization", "requires_capture", "canceled"},
    {"capture", "pending", "succeeded"},
    {"capture", "pending", "failed"},
    {"void", "pending", "succeeded"},
    {"void", "pending", "failed"},
    {"refund", "pending", "succeeded"},
    {"refund", "pending", "failed"},
    {"refund", "pending", "canceled"},
    {"refund_cancel", "pending", "succeeded"},
    {"refund_cancel", "pending", "failed"},
};
const size_t paystate_attempt_transitions_count =
    sizeof(paystate_attempt_transitions) / sizeof(paystate_attempt_transitions[0]);

/* A refund is pending while its gateway refund is outstanding (an answer
 * to come, or the gateway's refund itself pending), then final. Its
 * amount is held against the payment's amount_received from creation; a
 * failed or canceled refund gives it back. */
const struct paystate_refund_transition paystate_refund_transitions[] = {
    {"", "create", "pending", "refund.created"},
    {"pending", "refund.succeeded", "succeeded", "refund.updated"},
    {"pending", "refund.failed", "failed", "refund.failed"},
    {"pending", "refund.canceled", "canceled", "refund.updated"},
    /* A gateway may fail a refund it had reported succeeded (the card was
     * closed, say): the money is back with the merchant and may be refunded
     * again. */
    {"succeeded", "refund.reversed", "failed", "refund.failed"},
};
const size_t paystate_refund_transitions_count =
    sizeof(paystate_refund_transitions) / sizeof(paystate_refund_transitions[0]);

const char *
paystate_next(const char *from, const char *event)
{
    for (size_t i = 0; i < paystate_transitions_count; i++) {
        const struct paystate_transition *t = &paystate_transitions[i];
        if (strcmp(t->from, from) == 0 && strcmp(t->event, event) == 0)
            return t->to;
    }
    return NULL;
}

bool
paystate_final(const char *status)
{
    for (size_t i = 0; i < paystate_transitions_count; i++)
        if (strcmp(paystate_transitions[i].from, status) == 0)
            return false;
    return true;
}

bool
paystate_attempt_allowed(const char *type, const char *from, const char *to)
{
    for (size_t i = 0; i < paystate_attempt_transitions_count; i++) {
        const struct paystate_attempt_transition *t = &paystate_attempt_transitions[i];
        if (strcmp(t->type, type) == 0 && strcmp(t->from, from) == 0 && strcmp(t->to, to) == 0)
            return true;
    }
    return false;
}
