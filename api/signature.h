/* signature: signed callback headers (t=...,v1=...) and their check; see signature.c. */
#ifndef PAYMENTD_API_SIGNATURE_H
#define PAYMENTD_API_SIGNATURE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define SIG_MAX_V1 8

struct sig_header {
    int64_t t;
    int n_v1;
    uint8_t v1[SIG_MAX_V1][32]; /* decoded HMAC-SHA256 values */
};

/* Parses "t=<unix>,v1=<64 hex>[,v1=...]" (other schemes are skipped);
 * -1 when malformed, without t, or without any v1. */
int sig_parse(const char *header, struct sig_header *out);

enum sig_result { SIG_OK, SIG_TOO_OLD, SIG_TOO_NEW, SIG_MISMATCH };

/* Checks h against body: |now - t| within tolerance_s, and one v1 equal
 * (in constant time) to HMAC-SHA256(secret, t "." body) for one of the
 * '|'-separated secrets. */
enum sig_result sig_verify(const struct sig_header *h, const char *secrets, const char *body,
                           size_t len, int64_t now, int64_t tolerance_s);

#endif
