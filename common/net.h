/* net: listening sockets; see net.c. */
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

#endif
