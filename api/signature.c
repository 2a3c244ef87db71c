/*
 * signature - the signature on inbound gateway callbacks.
 *
 * Offers sig_parse() and sig_verify(). A callback carries
 *     Gateway-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, t "." body)>
 * with one v1 per secret the gateway signs with (several while it rotates
 * them); the receiver may also hold two secrets ('|'-separated) while it
 * rotates. A signature counts when its timestamp is within the tolerance
 * either way and any v1 matches any secret, compared with CRYPTO_memcmp so
 * that the time taken says nothing about how much matched. Pure: no I/O.
 * Calls OpenSSL.
 */
#include "signature.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int
sig_hex(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

int
sig_parse(const char *header, struct sig_header *out)
{
    bool have_t = false;
    memset(out, 0, sizeof(*out));
    if (!header || strlen(header) > 2048)
        return -1;
    for (const char *p = header; *p;) {
        while (*p == ' ')
            p++;
        size_t len = strcspn(p, ",");
        const char *eq = memchr(p, '=', len);
        if (!eq)
            return -1;
        size_t klen = (size_t)(eq - p), vlen = len - klen - 1;
        const char *v = eq + 1;
        if (klen == 1 && p[0] == 't') {
            int64_t t = 0;
            if (vlen == 0 || vlen > 12 || have_t)
                return -1;
            for (size_t i = 0; i < vlen; i++) {
                if (v[i] < '0' || v[i] > '9')
                    return -1;
                t = t * 10 + (v[i] - '0');
            }
            out->t = t;
            have_t = true;
        } else if (klen == 2 && p[0] == 'v' && p[1] == '1') {
            if (vlen != 64 || out->n_v1 == SIG_MAX_V1)
                return -1;
            for (size_t i = 0; i < 32; i++) {
                int hi = sig_hex(v[2 * i]), lo = sig_hex(v[2 * i + 1]);
                if (hi < 0 || lo < 0)
                    return -1;
                out->v1[out->n_v1][i] = (uint8_t)(hi << 4 | lo);
            }
            out->n_v1++;
        }
        p += len;
        if (*p == ',')
            p++;
    }
    return have_t && out->n_v1 > 0 ? 0 : -1;
}

enum sig_result
sig_verify(const struct sig_header *h, const char *secrets, const char *body, size_t len,
           int64_t now, int64_t tolerance_s)
{
    if (h->t < now - tolerance_s)
        return SIG_TOO_OLD;
    if (h->t > now + tolerance_s)
        return SIG_TOO_NEW;
    char ts[24];
    int tlen = snprintf(ts, sizeof(ts), "%lld.", (long long)h->t);
    unsigned char *payload = malloc((size_t)tlen + len + 1);
    if (!payload)
        abort();
    memcpy(payload, ts, (size_t)tlen);
    memcpy(payload + tlen, body, len);
    int ok = 0;
    for (const char *s = secrets; *s;) {
        size_t slen = strcspn(s, "|");
        unsigned char mac[32];
        unsigned int n = 0;
        if (HMAC(EVP_sha256(), s, (int)slen, payload, (size_t)tlen + len, mac, &n) && n == 32) {
            for (int i = 0; i < h->n_v1; i++)
                ok |= CRYPTO_memcmp(mac, h->v1[i], 32) == 0; /* every one compared */
        }
        s += slen;
        if (*s == '|')
            s++;
    }
    free(payload);
    return ok ? SIG_OK : SIG_MISMATCH;
}
