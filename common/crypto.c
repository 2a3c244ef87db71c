/*
 * crypto - the few cryptographic helpers the service needs, all through
 * OpenSSL: SHA-256 (API keys are stored and looked up by their hash, and
 * idempotent requests are compared by the hash of their parameters), HMAC-
 * SHA256 (webhook signatures), hex encoding and constant-time comparison.
 * Offers crypto_sha256(), crypto_hmac_sha256_hex(), crypto_hex(),
 * crypto_equal(). Nothing here fails except by abort on a
 * broken OpenSSL. Calls OpenSSL.
 */
#include "crypto.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <stdlib.h>

void
crypto_sha256(const void *data, size_t len, uint8_t out[32])
{
    unsigned int n = 0;
    if (!EVP_Digest(data, len, out, &n, EVP_sha256(), NULL) || n != 32)
        abort();
}

void
crypto_hex(const uint8_t *in, size_t len, char *out)
{
    static const char hex[] = "0123456789abcdef";
    for (size_t i = 0; i < len; i++) {
        out[2 * i] = hex[in[i] >> 4];
        out[2 * i + 1] = hex[in[i] & 15];
    }
    out[2 * len] = '\0';
}

void
crypto_hmac_sha256_hex(const void *key, size_t keylen, const void *data, size_t len, char out[65])
{
    unsigned char mac[32];
    unsigned int n = 0;
    if (!HMAC(EVP_sha256(), key, (int)keylen, data, len, mac, &n) || n != 32)
        abort();
    crypto_hex(mac, 32, out);
}

int
crypto_equal(const void *a, const void *b, size_t len)
{
    return CRYPTO_memcmp(a, b, len);
}
