/*
 * net - listening sockets for the HTTP servers. Offers net_listen(), which
 * resolves a numeric or named address, sets SO_REUSEADDR (and SO_REUSEPORT
 * for the api processes, which share one port and let the kernel spread
 * connections among them) and returns a non-blocking, close-on-exec socket.
 * Failures come back as -1 with the reason. Also offers the address guard
 * for outbound calls to merchants' URLs, net_address_private() and
 * net_host_private_literal(), so that a webhook URL cannot make the service
 * call its own network, and net_resolve(), which turns the PostgreSQL and
 * Redis host names into addresses once at start-up so that no reconnect
 * waits for DNS on an event loop. Calls libc.
 */
#include "net.h"

#include <errno.h>
#include <fcntl.h>
#include <arpa/inet.h>
#include <ctype.h>
#include <netdb.h>
#include <netinet/in.h>
#include <strings.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int
net_listen(const char *addr, int port, bool reuseport, char *err, size_t errlen)
{
    struct addrinfo hints = {0}, *res = NULL;
    char portstr[16];
    int fd = -1, one = 1, rv;

    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    snprintf(portstr, sizeof(portstr), "%d", port);
    rv = getaddrinfo(addr, portstr, &hints, &res);
    if (rv != 0) {
        snprintf(err, errlen, "cannot resolve %s: %s", addr, gai_strerror(rv));
        return -1;
    }
    fd = socket(res->ai_family, res->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        snprintf(err, errlen, "socket: %s", strerror(errno));
        goto fail;
    }
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (reuseport && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) < 0) {
        snprintf(err, errlen, "SO_REUSEPORT: %s", strerror(errno));
        goto fail;
    }
    if (bind(fd, res->ai_addr, res->ai_addrlen) < 0) {
        snprintf(err, errlen, "bind %s:%d: %s", addr, port, strerror(errno));
        goto fail;
    }
    if (listen(fd, 1024) < 0) {
        snprintf(err, errlen, "listen %s:%d: %s", addr, port, strerror(errno));
        goto fail;
    }
    freeaddrinfo(res);
    return fd;
fail:
    if (fd >= 0)
        close(fd);
    freeaddrinfo(res);
    return -1;
}

static bool
net_v4_private(uint32_t a) /* host byte order */
{
    return (a >> 24) == 0 ||                   /* 0.0.0.0/8 */
           (a >> 24) == 10 ||                  /* 10/8 */
           (a >> 24) == 127 ||                 /* loopback */
           (a >> 16) == ((169u << 8) | 254) || /* link-local */
           (a >> 20) == ((172u << 4) | 1) ||   /* 172.16/12 */
           (a >> 16) == ((192u << 8) | 168) || /* 192.168/16 */
           (a >> 22) == ((100u << 2) | 1) ||   /* 100.64/10 carrier-grade NAT */
           (a >> 8) == ((192u << 16) | 0) ||   /* 192.0.0/24 */
           (a >> 17) == ((198u << 7) | 9) ||   /* 198.18/15 benchmarking */
           (a >> 28) >= 14;                    /* multicast and reserved */
}

bool
net_address_private(const struct sockaddr *sa)
{
    if (sa->sa_family == AF_INET)
        return net_v4_private(ntohl(((const struct sockaddr_in *)sa)->sin_addr.s_addr));
    if (sa->sa_family == AF_INET6) {
        const struct in6_addr *a = &((const struct sockaddr_in6 *)sa)->sin6_addr;
        const uint8_t *b = a->s6_addr;
        if (IN6_IS_ADDR_V4MAPPED(a)) {
            uint32_t v4 =
                ((uint32_t)b[12] << 24) | ((uint32_t)b[13] << 16) | ((uint32_t)b[14] << 8) | b[15];
            return net_v4_private(v4);
        }
        return IN6_IS_ADDR_LOOPBACK(a) || IN6_IS_ADDR_UNSPECIFIED(a) || IN6_IS_ADDR_LINKLOCAL(a) ||
               IN6_IS_ADDR_SITELOCAL(a) || IN6_IS_ADDR_MULTICAST(a) ||
               (b[0] & 0xfe) == 0xfc; /* fc00::/7 unique local */
    }
    return true; /* anything else is not a public internet address */
}

bool
net_host_private_literal(const char *host)
{
    struct sockaddr_in v4 = {.sin_family = AF_INET};
    struct sockaddr_in6 v6 = {.sin6_family = AF_INET6};
    char buf[256];
    size_t n = strlen(host);
    if (n == 0 || n >= sizeof(buf))
        return true;
    /* [v6] as it appears in URLs */
    if (host[0] == '[' && host[n - 1] == ']') {
        memcpy(buf, host + 1, n - 2);
        buf[n - 2] = '\0';
    } else {
        memcpy(buf, host, n + 1);
    }
    if (inet_pton(AF_INET, buf, &v4.sin_addr) == 1)
        return net_address_private((struct sockaddr *)&v4);
    if (inet_pton(AF_INET6, buf, &v6.sin6_addr) == 1)
        return net_address_private((struct sockaddr *)&v6);
    /* Numeric forms that inet_pton refuses but resolvers accept (0x7f.1,
     * 2130706433), and names that always mean this machine. */
    struct in_addr loose;
    if (inet_aton(buf, &loose) == 1) {
        v4.sin_addr = loose;
        return net_address_private((struct sockaddr *)&v4);
    }
    return strcasecmp(buf, "localhost") == 0 ||
           (n > 10 && strcasecmp(buf + n - 10, ".localhost") == 0);
}

int
net_resolve(const char *host, bool v4_first, char (*addrs)[NET_ADDR_MAX], int cap, bool *transient,
            char *err, size_t errlen)
{
    struct addrinfo hints = {0}, *res = NULL;
    int n = 0, rv;

    *transient = false;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    rv = getaddrinfo(host, NULL, &hints, &res);
    if (rv != 0) {
        *transient = rv == EAI_AGAIN;
        snprintf(err, errlen, "%s", rv == EAI_SYSTEM ? strerror(errno) : gai_strerror(rv));
        return -1;
    }
    /* Two passes when IPv4 goes first (as hiredis itself orders them). */
    for (int pass = v4_first ? 0 : 1; pass < 2; pass++) {
        for (struct addrinfo *ai = res; ai && n < cap; ai = ai->ai_next) {
            char text[NET_ADDR_MAX];
            bool dup = false;
            if (ai->ai_family != AF_INET && ai->ai_family != AF_INET6)
                continue;
            if (v4_first && (pass == 0) != (ai->ai_family == AF_INET))
                continue;
            if (getnameinfo(ai->ai_addr, ai->ai_addrlen, text, sizeof(text), NULL, 0,
                            NI_NUMERICHOST) != 0)
                continue;
            for (int i = 0; i < n && !dup; i++)
                dup = strcmp(addrs[i], text) == 0;
            if (!dup)
                memcpy(addrs[n++], text, sizeof(text));
        }
    }
    freeaddrinfo(res);
    if (n == 0)
        snprintf(err, errlen, "no IPv4 or IPv6 address");
    return n > 0 ? n : -1;
}
