/* nngev: NNG asynchronous I/O handed to a libevent loop; see nngev.c. */
#ifndef PAYMENTD_NNGEV_H
#define PAYMENTD_NNGEV_H

#include <event2/event.h>
#include <nng/nng.h>

struct nngev;
struct nngev_server;
struct nngev_job;

struct nngev *nngev_new(struct event_base *base);
/* Stops every outstanding operation; callbacks are not called after this. */
void nngev_free(struct nngev *ev);

/* Called on the loop thread with the reply (owned by the callee, free with
 * nng_msg_free) or NULL and an NNG error (NNG_ETIMEDOUT, NNG_ECLOSED ...). */
typedef void (*nngev_reply_cb)(void *arg, int err, nng_msg *reply);

/* Sends req (ownership passes) on a REQ socket in a fresh context and calls
 * cb once with the outcome; timeout_ms bounds the send and the wait. */
void nngev_request(struct nngev *ev, nng_socket sock, nng_msg *req, int timeout_ms,
                   nngev_reply_cb cb, void *arg);

/* Called on the loop thread for each request received by a server. The
 * callee owns req and must call nngev_respond() for the job exactly once,
 * now or later. */
typedef void (*nngev_request_cb)(void *arg, struct nngev_job *job, nng_msg *req);

/* Serves a REP socket with `contexts` requests in flight at once. */
struct nngev_server *nngev_serve(struct nngev *ev, nng_socket rep, int contexts,
                                 nngev_request_cb cb, void *arg);
/* Sends reply (ownership passes) or, with NULL, drops the request unanswered. */
void nngev_respond(struct nngev_job *job, nng_msg *reply);

/* Called on the loop for each message received; the callee owns msg. */
typedef void (*nngev_message_cb)(void *arg, nng_msg *msg);

/* Receives on a socket (PULL) for as long as it is open. */
void nngev_receive(struct nngev *ev, nng_socket sock, nngev_message_cb cb, void *arg);

/* Builds an nng_msg from bytes. */
nng_msg *nngev_msg(const void *data, size_t len);

#endif
