/*
 * nngev - bridges NNG's asynchronous I/O and a libevent loop.
 *
 * Offers nngev_new()/nngev_free(), nngev_request() for REQ clients (one NNG
 * context per request, so many requests are in flight at once and NNG itself
 * re-sends a request whose peer died), nngev_serve()/nngev_respond() for
 * REP servers with several contexts, and nngev_receive() for PULL sockets.
 *
 * NNG completes operations on its own threads. Those callbacks never touch
 * loop objects: they only move the finished operation onto a mutex-protected
 * list and write to an eventfd; the loop reads the eventfd and runs the
 * handlers on its own thread. A callback may start the next NNG operation of
 * the same context (a receive after a send) since that touches NNG only.
 * Failures are reported to the handler as NNG error numbers. Calls NNG,
 * libevent, xmalloc.
 */
#include "nngev.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/queue.h>
#include <unistd.h>

#include "xmalloc.h"

enum op_kind { OP_REQUEST, OP_SERVE, OP_PULL };
enum op_phase { PH_SEND, PH_RECV };

struct nngev_op {
    TAILQ_ENTRY(nngev_op) done_link; /* on ev->done while waiting for the loop */
    LIST_ENTRY(nngev_op) all_link;   /* on ev->ops while alive */
    struct nngev *ev;
    enum op_kind kind;
    enum op_phase phase;
    nng_aio *aio;
    nng_ctx ctx;
    bool queued;
    int err;
    nng_msg *msg;
    /* OP_REQUEST */
    nngev_reply_cb reply_cb;
    void *arg;
    /* OP_SERVE */
    struct nngev_server *server;
    /* OP_PULL */
    nng_socket sock;
    nngev_message_cb message_cb;
};

struct nngev_job {
    struct nngev_op op; /* a job is its serving operation */
};

struct nngev_server {
    struct nngev *ev;
    nngev_request_cb cb;
    void *arg;
    int count;
    struct nngev_op **ops;
};

struct nngev {
    struct event_base *base;
    struct event *wake;
    int efd;
    pthread_mutex_t lock;
    TAILQ_HEAD(, nngev_op) done;
    LIST_HEAD(, nngev_op) ops;
    struct nngev_server **servers;
    int nservers;
};

/* NNG thread: queue the operation for the loop. */
static void
nngev_handoff(struct nngev_op *op)
{
    struct nngev *ev = op->ev;
    uint64_t one = 1;
    pthread_mutex_lock(&ev->lock);
    if (!op->queued) {
        op->queued = true;
        TAILQ_INSERT_TAIL(&ev->done, op, done_link);
    }
    pthread_mutex_unlock(&ev->lock);
    ssize_t w = write(ev->efd, &one, sizeof(one));
    (void)w; /* EAGAIN means a wake-up is already pending */
}

static void
nngev_aio_done(void *arg)
{
    struct nngev_op *op = arg;
    int rv = nng_aio_result(op->aio);

    if (op->phase == PH_SEND) {
        if (rv != 0) {
            nng_msg_free(nng_aio_get_msg(op->aio));
            nng_aio_set_msg(op->aio, NULL);
            if (op->kind == OP_SERVE) {
                if (rv == NNG_ECLOSED || rv == NNG_ECANCELED)
                    return;
                /* The requester went away; serve the next request. */
                op->phase = PH_RECV;
                nng_ctx_recv(op->ctx, op->aio);
                return;
            }
            op->err = rv;
            nngev_handoff(op);
            return;
        }
        op->phase = PH_RECV;
        nng_ctx_recv(op->ctx, op->aio);
        return;
    }
    if (rv != 0) {
        if (op->kind != OP_REQUEST && (rv == NNG_ECLOSED || rv == NNG_ECANCELED))
            return;
        if (op->kind == OP_SERVE) {
            nng_ctx_recv(op->ctx, op->aio);
            return;
        }
        if (op->kind == OP_PULL) {
            nng_recv_aio(op->sock, op->aio);
            return;
        }
        op->err = rv;
    } else {
        op->msg = nng_aio_get_msg(op->aio);
        nng_aio_set_msg(op->aio, NULL);
    }
    nngev_handoff(op);
}

static void
nngev_op_free(struct nngev_op *op)
{
    nng_aio_stop(op->aio);
    nng_aio_free(op->aio);
    nng_ctx_close(op->ctx);
    if (op->msg)
        nng_msg_free(op->msg);
    free(op);
}

/* Loop thread: run finished operations. */
static void
nngev_wake(evutil_socket_t fd, short what, void *arg)
{
    struct nngev *ev = arg;
    uint64_t n;
    TAILQ_HEAD(, nngev_op) batch = TAILQ_HEAD_INITIALIZER(batch);
    (void)what;
    ssize_t r = read(fd, &n, sizeof(n));
    (void)r;
    pthread_mutex_lock(&ev->lock);
    TAILQ_CONCAT(&batch, &ev->done, done_link);
    struct nngev_op *op;
    TAILQ_FOREACH(op, &batch, done_link)
    op->queued = false;
    pthread_mutex_unlock(&ev->lock);

    while ((op = TAILQ_FIRST(&batch)) != NULL) {
        TAILQ_REMOVE(&batch, op, done_link);
        if (op->kind == OP_REQUEST) {
            nng_msg *msg = op->msg;
            op->msg = NULL;
            LIST_REMOVE(op, all_link);
            nngev_reply_cb cb = op->reply_cb;
            void *cbarg = op->arg;
            int err = op->err;
            nngev_op_free(op);
            cb(cbarg, err, msg);
        } else if (op->kind == OP_PULL) {
            nng_msg *msg = op->msg;
            op->msg = NULL;
            op->message_cb(op->arg, msg);
            nng_recv_aio(op->sock, op->aio); /* the next message */
        } else {
            nng_msg *msg = op->msg;
            op->msg = NULL;
            op->server->cb(op->server->arg, (struct nngev_job *)op, msg);
        }
    }
}

struct nngev *
nngev_new(struct event_base *base)
{
    struct nngev *ev = xcalloc(1, sizeof(*ev));
    ev->base = base;
    ev->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (ev->efd < 0)
        abort();
    pthread_mutex_init(&ev->lock, NULL);
    TAILQ_INIT(&ev->done);
    LIST_INIT(&ev->ops);
    ev->wake = event_new(base, ev->efd, EV_READ | EV_PERSIST, nngev_wake, ev);
    event_add(ev->wake, NULL);
    return ev;
}

static struct nngev_op *
nngev_op_new(struct nngev *ev, enum op_kind kind)
{
    struct nngev_op *op = xcalloc(1, sizeof(struct nngev_job));
    op->ev = ev;
    op->kind = kind;
    if (nng_aio_alloc(&op->aio, nngev_aio_done, op) != 0)
        abort();
    LIST_INSERT_HEAD(&ev->ops, op, all_link);
    return op;
}

void
nngev_request(struct nngev *ev, nng_socket sock, nng_msg *req, int timeout_ms, nngev_reply_cb cb,
              void *arg)
{
    struct nngev_op *op = nngev_op_new(ev, OP_REQUEST);
    int rv;
    op->reply_cb = cb;
    op->arg = arg;
    op->phase = PH_SEND;
    if ((rv = nng_ctx_open(&op->ctx, sock)) != 0) {
        /* Report on the loop, never re-entrantly from the caller. */
        nng_msg_free(req);
        op->err = rv;
        nngev_handoff(op);
        return;
    }
    nng_aio_set_timeout(op->aio, timeout_ms);
    nng_aio_set_msg(op->aio, req);
    nng_ctx_send(op->ctx, op->aio);
}

struct nngev_server *
nngev_serve(struct nngev *ev, nng_socket rep, int contexts, nngev_request_cb cb, void *arg)
{
    struct nngev_server *srv = xcalloc(1, sizeof(*srv));
    srv->ev = ev;
    srv->cb = cb;
    srv->arg = arg;
    srv->count = contexts;
    srv->ops = xcalloc((size_t)contexts, sizeof(*srv->ops));
    for (int i = 0; i < contexts; i++) {
        struct nngev_op *op = nngev_op_new(ev, OP_SERVE);
        op->server = srv;
        op->phase = PH_RECV;
        if (nng_ctx_open(&op->ctx, rep) != 0)
            abort();
        srv->ops[i] = op;
        nng_ctx_recv(op->ctx, op->aio);
    }
    ev->servers = xrealloc(ev->servers, sizeof(*ev->servers) * (size_t)(ev->nservers + 1));
    ev->servers[ev->nservers++] = srv;
    return srv;
}

void
nngev_respond(struct nngev_job *job, nng_msg *reply)
{
    struct nngev_op *op = &job->op;
    if (!reply) {
        op->phase = PH_RECV;
        nng_ctx_recv(op->ctx, op->aio);
        return;
    }
    op->phase = PH_SEND;
    nng_aio_set_msg(op->aio, reply);
    nng_ctx_send(op->ctx, op->aio);
}

void
nngev_receive(struct nngev *ev, nng_socket sock, nngev_message_cb cb, void *arg)
{
    struct nngev_op *op = nngev_op_new(ev, OP_PULL);
    op->sock = sock;
    op->message_cb = cb;
    op->arg = arg;
    op->phase = PH_RECV;
    nng_recv_aio(sock, op->aio);
}

nng_msg *
nngev_msg(const void *data, size_t len)
{
    nng_msg *m;
    if (nng_msg_alloc(&m, len) != 0)
        abort();
    memcpy(nng_msg_body(m), data, len);
    return m;
}

void
nngev_free(struct nngev *ev)
{
    struct nngev_op *op;
    /* Stop every operation first so that no callback runs during the frees. */
    LIST_FOREACH(op, &ev->ops, all_link)
    nng_aio_stop(op->aio);
    while ((op = LIST_FIRST(&ev->ops)) != NULL) {
        LIST_REMOVE(op, all_link);
        nngev_op_free(op);
    }
    for (int i = 0; i < ev->nservers; i++) {
        free(ev->servers[i]->ops);
        free(ev->servers[i]);
    }
    free(ev->servers);
    event_free(ev->wake);
    close(ev->efd);
    pthread_mutex_destroy(&ev->lock);
    free(ev);
}
