/* net: listening sockets; see net.c. */
#ifndef PAYMENTD_NET_H
#define PAYMENTD_NET_H

#include <stdbool.h>
#include <stddef.h>

/* Opens a non-blocking listening TCP socket; -1 with a message on failure. */
int net_listen(const char *addr, int port, bool reuseport, char *err, size_t errlen);

#endif
