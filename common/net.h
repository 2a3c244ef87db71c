/* net: listening sockets and start-up name resolution; see net.c. */
#ifndef PAYMENTD_NET_H
#define PAYMENTD_NET_H

#include <stdbool.h>
#include <stddef.h>

/* Opens a non-blocking listening TCP socket; -1 with a message on failure. */
int net_listen(const char *addr, int port, bool reuseport, char *err, size_t errlen);

struct sockaddr;

/* True for loopback, link-local, private, unique-local, unspecified and
 * other non-public addresses (IPv4, IPv6 and IPv4-mapped IPv6). */
bool net_address_private(const struct sockaddr *sa);
/* For a URL's host: true when it is such an address written literally, or
 * a name that always means this machine ("localhost"). Other names are
 * checked when connecting. */
bool net_host_private_literal(const char *host);

/* Longest numeric address text, IPv6 included. */
#define NET_ADDR_MAX 64

/* Resolves host (a name or a numeric address) to at most cap numeric
 * addresses for TCP, in getaddrinfo's order or with IPv4 first when
 * v4_first is set. Blocks while DNS answers: call it at start-up only.
 * Returns the number of addresses, or -1 with the reason in err and
 * *transient set when the resolver could not answer (EAI_AGAIN) rather
 * than saying the name does not exist. */
int net_resolve(const char *host, bool v4_first, char (*addrs)[NET_ADDR_MAX], int cap,
                bool *transient, char *err, size_t errlen);

#endif
