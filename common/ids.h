/* ids: identifiers with a prefix and a random tail; see ids.c. */
#ifndef PAYMENTD_IDS_H
#define PAYMENTD_IDS_H

#include <stddef.h>

/* Writes prefix followed by 2*nbytes lowercase hex digits of OS randomness. */
void ids_random(char *out, size_t cap, const char *prefix, size_t nbytes);

/* Writes prefix, 12 hex digits of the current time in milliseconds and
 * 2*nbytes random hex digits: ids that sort by creation time. */
void ids_time_ordered(char *out, size_t cap, const char *prefix, size_t nbytes);

#endif
