/* crypto: hashing and encoding helpers over OpenSSL; see crypto.c. */
#ifndef PAYMENTD_CRYPTO_H
#define PAYMENTD_CRYPTO_H

#include <stddef.h>
#include <stdint.h>

void crypto_sha256(const void *data, size_t len, uint8_t out[32]);
/* Lowercase hex of len bytes into out (2*len+1 bytes). */
void crypto_hex(const uint8_t *in, size_t len, char *out);
/* HMAC-SHA256 of data under key, as lowercase hex (65 bytes with the NUL). */
void crypto_hmac_sha256_hex(const void *key, size_t keylen, const void *data, size_t len,
                            char out[65]);
/* Constant-time comparison; 0 when equal. */
int crypto_equal(const void *a, const void *b, size_t len);

#endif
