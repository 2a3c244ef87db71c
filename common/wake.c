/*
 * wake - the dispatcher's wake-up after a commit, without NOTIFY.
 *
 * Offers wake_new(), wake_free(), wake_outbox() and wake_url(). A NOTIFY in
 * the transaction that writes an event makes every such commit queue on
 * PostgreSQL's one notification lock (held from PreCommit_Notify to the end
 * of the commit). Instead, a writer (api, worker) sends an empty message on
 * an NNG PUSH socket to the outbox's PULL socket (ipc://RUN_DIR/wake.ipc)
 * once its statement committed; the send never blocks and is dropped when
 * the queue is full or the outbox is away: a wake-up only shortens the
 * wait, the dispatcher's poll (OUTBOX_POLL_MS) still finds every event,
 * also those written on other hosts. Calls nng, log.
 */
#include "wake.h"

#include <nng/protocol/pipeline0/push.h>
#include <stdio.h>
#include <stdlib.h>

#include "log.h"
#include "xmalloc.h"

struct wake {
    nng_socket push;
    bool open;
};

void
wake_url(const struct config *cfg, char *buf, size_t cap)
{
    snprintf(buf, cap, "ipc://%s/wake.ipc", cfg->run_dir);
}

struct wake *
wake_new(const struct config *cfg)
{
    struct wake *w = xcalloc(1, sizeof(*w));
    char url[400];
    int rv;
    wake_url(cfg, url, sizeof(url));
    if ((rv = nng_push0_open(&w->push)) != 0) {
        log_warn("wake-ups to the outbox are off: %s", nng_strerror(rv));
        return w;
    }
    w->open = true;
    /* A handful queued is plenty: one wake-up makes the dispatcher look. */
    nng_socket_set_int(w->push, NNG_OPT_SENDBUF, 8);
    nng_socket_set_ms(w->push, NNG_OPT_RECONNMINT, 50);
    nng_socket_set_ms(w->push, NNG_OPT_RECONNMAXT, 1000);
    nng_dial(w->push, url, NULL, NNG_FLAG_NONBLOCK);
    return w;
}

void
wake_outbox(struct wake *w)
{
    nng_msg *msg;
    if (!w || !w->open || nng_msg_alloc(&msg, 0) != 0)
        return;
    if (nng_sendmsg(w->push, msg, NNG_FLAG_NONBLOCK) != 0)
        nng_msg_free(msg);
}

void
wake_free(struct wake *w)
{
    if (!w)
        return;
    if (w->open)
        nng_close(w->push);
    free(w);
}
