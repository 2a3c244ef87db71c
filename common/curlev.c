/*
 * curlev - outbound HTTP that never blocks an event loop: libcurl's multi
 * interface driven by libevent through CURLMOPT_SOCKETFUNCTION and
 * CURLMOPT_TIMERFUNCTION, many requests in flight per process.
 *
 * Offers curlev_new()/curlev_free(), curlev_request() and
 * curlev_in_flight(). Each finished transfer calls its callback once, on
 * the loop, with the status, the body and whether the request had been
 * sent (which the gateway code needs to tell a certain failure from an
 * ambiguous one). Easy handles are removed from the multi handle before
 * their callback runs, and freed after it returns. Connections are reused
 * across requests. Calls libcurl, libevent, xmalloc.
 */
#include "curlev.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>

#include "net.h"
#include "xmalloc.h"

struct curlev {
    struct event_base *base;
    bool deny_private;
    CURLM *multi;
    struct event *timer;
    int running;
    int in_flight;
};

struct curlev_sock {
    struct event *ev;
    struct curlev *c;
};

struct curlev_xfer {
    CURL *easy;
    struct curl_slist *headers;
    char *body;
    char *resp;
    size_t len, cap;
    curlev_cb cb;
    void *arg;
    char errbuf[CURL_ERROR_SIZE];
    long retry_after_ms;
};

static void curlev_check_done(struct curlev *c);

static size_t
curlev_write(char *ptr, size_t size, size_t nmemb, void *userdata)
{
    struct curlev_xfer *x = userdata;
    size_t n = size * nmemb;
    if (x->len + n + 1 > x->cap) {
        x->cap = (x->len + n + 1) * 2;
        x->resp = xrealloc(x->resp, x->cap);
    }
    memcpy(x->resp + x->len, ptr, n);
    x->len += n;
    x->resp[x->len] = '\0';
    return n;
}

/* Keeps Retry-After (delta seconds) for the gateway's retry rules. */
static size_t
curlev_header(char *buf, size_t size, size_t nitems, void *userdata)
{
    struct curlev_xfer *x = userdata;
    size_t n = size * nitems;
    if (n > 12 && strncasecmp(buf, "Retry-After:", 12) == 0) {
        long s = strtol(buf + 12, NULL, 10);
        if (s > 0 && s < 86400)
            x->retry_after_ms = s * 1000;
    }
    return n;
}

static void
curlev_on_socket_event(evutil_socket_t fd, short what, void *arg)
{
    struct curlev *c = arg;
    int flags = 0;
    if (what & EV_READ)
        flags |= CURL_CSELECT_IN;
    if (what & EV_WRITE)
        flags |= CURL_CSELECT_OUT;
    curl_multi_socket_action(c->multi, fd, flags, &c->running);
    curlev_check_done(c);
}

static void
curlev_on_timer(evutil_socket_t fd, short what, void *arg)
{
    struct curlev *c = arg;
    (void)fd;
    (void)what;
    curl_multi_socket_action(c->multi, CURL_SOCKET_TIMEOUT, 0, &c->running);
    curlev_check_done(c);
}

static int
curlev_socket_cb(CURL *easy, curl_socket_t s, int what, void *userp, void *socketp)
{
    struct curlev *c = userp;
    struct curlev_sock *cs = socketp;
    (void)easy;
    if (what == CURL_POLL_REMOVE) {
        if (cs) {
            event_free(cs->ev);
            free(cs);
            curl_multi_assign(c->multi, s, NULL);
        }
        return 0;
    }
    short kind = EV_PERSIST | ((what & CURL_POLL_IN) ? EV_READ : 0) |
                 ((what & CURL_POLL_OUT) ? EV_WRITE : 0);
    if (!cs) {
        cs = xcalloc(1, sizeof(*cs));
        cs->c = c;
        curl_multi_assign(c->multi, s, cs);
    } else {
        event_free(cs->ev);
    }
    cs->ev = event_new(c->base, s, kind, curlev_on_socket_event, c);
    event_add(cs->ev, NULL);
    return 0;
}

static int
curlev_timer_cb(CURLM *multi, long timeout_ms, void *userp)
{
    struct curlev *c = userp;
    (void)multi;
    if (timeout_ms < 0) {
        evtimer_del(c->timer);
        return 0;
    }
    struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
    evtimer_add(c->timer, &tv);
    return 0;
}

static void
curlev_xfer_free(struct curlev_xfer *x)
{
    curl_easy_cleanup(x->easy);
    curl_slist_free_all(x->headers);
    free(x->body);
    free(x->resp);
    free(x);
}

static void
curlev_check_done(struct curlev *c)
{
    CURLMsg *msg;
    int left;
    while ((msg = curl_multi_info_read(c->multi, &left)) != NULL) {
        if (msg->msg != CURLMSG_DONE)
            continue;
        CURL *easy = msg->easy_handle;
        CURLcode rc = msg->data.result;
        struct curlev_xfer *x;
        curl_easy_getinfo(easy, CURLINFO_PRIVATE, (char **)&x);
        curl_multi_remove_handle(c->multi, easy);
        c->in_flight--;
        struct curlev_response resp = {0};
        curl_off_t up = 0;
        curl_easy_getinfo(easy, CURLINFO_RESPONSE_CODE, &resp.status);
        curl_easy_getinfo(easy, CURLINFO_SIZE_UPLOAD_T, &up);
        curl_off_t connect_time = 0;
        curl_easy_getinfo(easy, CURLINFO_CONNECT_TIME_T, &connect_time);
        resp.rc = rc;
        resp.retry_after_ms = x->retry_after_ms;
        resp.body = x->resp ? x->resp : "";
        resp.len = x->len;
        /* Sent when any answer came, any byte of the request went out, or a
         * fresh connection was made. A reused keep-alive connection has no
         * connect time: its request counts by the bytes written. */
        long request_size = 0;
        curl_easy_getinfo(easy, CURLINFO_REQUEST_SIZE, &request_size);
        resp.sent = resp.status > 0 || request_size > 0 || up > 0 ||
                    (rc != CURLE_COULDNT_CONNECT && rc != CURLE_COULDNT_RESOLVE_HOST &&
                     rc != CURLE_COULDNT_RESOLVE_PROXY && connect_time > 0);
        resp.error = rc == CURLE_OK ? NULL : (x->errbuf[0] ? x->errbuf : curl_easy_strerror(rc));
        x->cb(x->arg, &resp);
        curlev_xfer_free(x);
    }
}

/* Refuses to connect to a private address, whatever name led there (a DNS
 * answer can change between a check and the connection: the check is here). */
static curl_socket_t
curlev_open_socket(void *clientp, curlsocktype purpose, struct curl_sockaddr *address)
{
    (void)clientp;
    if (purpose != CURLSOCKTYPE_IPCXN || net_address_private(&address->addr))
        return CURL_SOCKET_BAD;
    return socket(address->family, address->socktype | SOCK_CLOEXEC, address->protocol);
}

void
curlev_set_deny_private(struct curlev *c, bool deny)
{
    c->deny_private = deny;
}

struct curlev *
curlev_new(struct event_base *base)
{
    static int global_done;
    if (!global_done) {
        curl_global_init(CURL_GLOBAL_DEFAULT);
        global_done = 1;
    }
    struct curlev *c = xcalloc(1, sizeof(*c));
    c->base = base;
    c->multi = curl_multi_init();
    c->timer = evtimer_new(base, curlev_on_timer, c);
    curl_multi_setopt(c->multi, CURLMOPT_SOCKETFUNCTION, curlev_socket_cb);
    curl_multi_setopt(c->multi, CURLMOPT_SOCKETDATA, c);
    curl_multi_setopt(c->multi, CURLMOPT_TIMERFUNCTION, curlev_timer_cb);
    curl_multi_setopt(c->multi, CURLMOPT_TIMERDATA, c);
    /* HTTP/1.1 carries one request per connection at a time: a cap here
     * would queue jobs inside libcurl, where their timeouts already run. */
    curl_multi_setopt(c->multi, CURLMOPT_MAX_HOST_CONNECTIONS, 0L);
    curl_multi_setopt(c->multi, CURLMOPT_MAXCONNECTS, 1024L);
    return c;
}

void
curlev_request(struct curlev *c, const char *method, const char *url, const char *const *headers,
               const char *body, long timeout_ms, curlev_cb cb, void *arg)
{
    struct curlev_xfer *x = xcalloc(1, sizeof(*x));
    x->easy = curl_easy_init();
    x->cb = cb;
    x->arg = arg;
    for (const char *const *h = headers; h && *h; h++)
        x->headers = curl_slist_append(x->headers, *h);
    curl_easy_setopt(x->easy, CURLOPT_URL, url);
    curl_easy_setopt(x->easy, CURLOPT_CUSTOMREQUEST, method);
    curl_easy_setopt(x->easy, CURLOPT_HTTPHEADER, x->headers);
    curl_easy_setopt(x->easy, CURLOPT_WRITEFUNCTION, curlev_write);
    curl_easy_setopt(x->easy, CURLOPT_WRITEDATA, x);
    curl_easy_setopt(x->easy, CURLOPT_HEADERFUNCTION, curlev_header);
    curl_easy_setopt(x->easy, CURLOPT_HEADERDATA, x);
    curl_easy_setopt(x->easy, CURLOPT_PRIVATE, x);
    curl_easy_setopt(x->easy, CURLOPT_ERRORBUFFER, x->errbuf);
    curl_easy_setopt(x->easy, CURLOPT_TIMEOUT_MS, timeout_ms);
    curl_easy_setopt(x->easy, CURLOPT_CONNECTTIMEOUT_MS, timeout_ms < 5000 ? timeout_ms : 5000);
    curl_easy_setopt(x->easy, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(x->easy, CURLOPT_PROTOCOLS_STR, "http,https");
    if (c->deny_private)
        curl_easy_setopt(x->easy, CURLOPT_OPENSOCKETFUNCTION, curlev_open_socket);
    if (body) {
        x->body = xstrdup(body);
        curl_easy_setopt(x->easy, CURLOPT_POSTFIELDS, x->body);
        curl_easy_setopt(x->easy, CURLOPT_POSTFIELDSIZE, (long)strlen(x->body));
    }
    c->in_flight++;
    curl_multi_add_handle(c->multi, x->easy);
}

int
curlev_in_flight(const struct curlev *c)
{
    return c->in_flight;
}

void
curlev_free(struct curlev *c)
{
    /* Transfers still running are abandoned without their callbacks (the
     * process is stopping); their handles go with the multi handle. */
    curl_multi_cleanup(c->multi);
    event_free(c->timer);
    free(c);
}
