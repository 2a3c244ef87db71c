/*
 * ids - identifiers: a short prefix and a random tail from the kernel's
 * CSPRNG (getrandom(2)). Offers ids_random(). A failing getrandom() is a
 * broken environment, not an input error: the process aborts. Calls libc.
 */
#include "ids.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

void
ids_random(char *out, size_t cap, const char *prefix, size_t nbytes)
{
    static const char hex[] = "0123456789abcdef";
    uint8_t raw[64];
    size_t plen = strlen(prefix), got = 0;

    if (nbytes > sizeof(raw) || plen + 2 * nbytes + 1 > cap)
        abort();
    while (got < nbytes) {
        ssize_t n = getrandom(raw + got, nbytes - got, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            abort();
        }
        got += (size_t)n;
    }
    memcpy(out, prefix, plen);
    for (size_t i = 0; i < nbytes; i++) {
        out[plen + 2 * i] = hex[raw[i] >> 4];
        out[plen + 2 * i + 1] = hex[raw[i] & 15];
    }
    out[plen + 2 * nbytes] = '\0';
}

void
ids_time_ordered(char *out, size_t cap, const char *prefix, size_t nbytes)
{
    struct timespec ts;
    char tail[160];
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t ms = (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
    ids_random(tail, sizeof(tail), "", nbytes);
    if ((size_t)snprintf(out, cap, "%s%012llx%s", prefix, (unsigned long long)ms, tail) >= cap)
        abort();
}
