/*
 * authz - reading credentials from a request: the Authorization header and
 * JSON Web Tokens.
 *
 * Offers authz_parse(), which takes "Bearer <secret>" or "Basic
 * base64(<secret>:)" apart and tells an API key from a JWT, and
 * authz_jwt_verify(), which accepts a JWT only when its header names HS256
 * (checked before libjwt sees the token, so "none" or an asymmetric
 * algorithm is refused whatever the library would do), its signature
 * verifies with JWT_SECRET (or, while rotating, either of "new|old"), it carries an `exp` in the
 * future (and any `nbf` in the past), `iss` and `aud` match when configured, and the configured
 * claim names an account. Reasons for refusal are fixed strings for the log; the token itself never
 * appears in one. Pure functions: no I/O. Calls libjwt, jansson, OpenSSL.
 */
#include "authz.h"

#include <errno.h>
#include <jansson.h>
#include <jwt.h>
#include <stdbool.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define AUTHZ_MAX_TOKEN 4096

int
authz_parse(const char *header, char *out, size_t cap, enum authz_kind *kind)
{
    if (!header)
        return -1;
    const char *secret = NULL;
    char decoded[AUTHZ_MAX_TOKEN];
    if (strncasecmp(header, "Bearer ", 7) == 0) {
        secret = header + 7;
        while (*secret == ' ')
            secret++;
    } else if (strncasecmp(header, "Basic ", 6) == 0) {
        const char *b64 = header + 6;
        size_t len = strlen(b64);
        if (len == 0 || len > (sizeof(decoded) - 1) / 3 * 4 || len % 4)
            return -1;
        int n = EVP_DecodeBlock((unsigned char *)decoded, (const unsigned char *)b64, (int)len);
        if (n <= 0)
            return -1;
        /* EVP_DecodeBlock counts padding as zero bytes: trim them. */
        while (n > 0 && b64[len - 1] == '=' && decoded[n - 1] == '\0') {
            n--;
            len--;
        }
        decoded[n] = '\0';
        if (memchr(decoded, '\0', (size_t)n))
            return -1;
        char *colon = strchr(decoded, ':');
        if (colon)
            *colon = '\0';
        secret = decoded;
    } else {
        return -1;
    }
    size_t len = strlen(secret);
    if (len == 0 || len >= cap || len > AUTHZ_MAX_TOKEN - 1)
        return -1;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)secret[i];
        if (c <= ' ' || c >= 0x7f)
            return -1;
    }
    memcpy(out, secret, len + 1);
    const char *dot = strchr(out, '.');
    *kind = dot && strchr(dot + 1, '.') ? AUTHZ_JWT : AUTHZ_KEY;
    return 0;
}

/* Decodes base64url without padding into out; returns its length or -1. */
static int
authz_b64url(const char *s, size_t len, char *out, size_t cap)
{
    char std[AUTHZ_MAX_TOKEN];
    size_t n = 0;
    if (len == 0 || len + 3 >= sizeof(std))
        return -1;
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        if (c == '-')
            c = '+';
        else if (c == '_')
            c = '/';
        else if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9')))
            return -1;
        std[n++] = c;
    }
    int pad = (int)((4 - n % 4) % 4);
    if (pad == 3)
        return -1;
    for (int i = 0; i < pad; i++)
        std[n++] = '=';
    if (n / 4 * 3 >= cap)
        return -1;
    int got = EVP_DecodeBlock((unsigned char *)out, (const unsigned char *)std, (int)n);
    if (got < 0)
        return -1;
    got -= pad;
    out[got] = '\0';
    return got;
}

int
authz_jwt_header_ok(const char *token)
{
    const char *dot = strchr(token, '.');
    char head[1024];
    if (!dot)
        return -1;
    int n = authz_b64url(token, (size_t)(dot - token), head, sizeof(head));
    if (n <= 0)
        return -1;
    json_t *h = json_loadb(head, (size_t)n, JSON_REJECT_DUPLICATES, NULL);
    const char *alg = json_string_value(json_object_get(h, "alg"));
    int ok = json_is_object(h) && alg && strcmp(alg, "HS256") == 0 ? 0 : -1;
    json_decref(h);
    return ok;
}

/* Does the aud claim (a string or an array of strings) hold want? */
static bool
authz_aud_matches(jwt_t *jwt, const char *want)
{
    char *text = jwt_get_grants_json(jwt, "aud");
    if (!text)
        return false;
    json_t *aud = json_loads(text, JSON_DECODE_ANY, NULL);
    free(text);
    bool ok = false;
    if (json_is_string(aud)) {
        ok = strcmp(json_string_value(aud), want) == 0;
    } else if (json_is_array(aud)) {
        size_t i;
        json_t *v;
        json_array_foreach(aud, i, v) ok =
            ok || (json_is_string(v) && strcmp(json_string_value(v), want) == 0);
    }
    json_decref(aud);
    return ok;
}

int
authz_jwt_verify(const char *token, const struct authz_jwt_policy *p, time_t now, char *account,
                 size_t cap, const char **why)
{
    jwt_t *jwt = NULL;
    int rc = -1;
    *why = "malformed token";
    if (strlen(token) >= AUTHZ_MAX_TOKEN)
        return -1;
    if (authz_jwt_header_ok(token) < 0) {
        *why = "algorithm is not HS256";
        return -1;
    }
    /* JWT_SECRET may hold "new|old" while the issuer rotates: either verifies. */
    for (const char *s = p->secret; *s && !jwt;) {
        size_t len = strcspn(s, "|");
        if (jwt_decode(&jwt, token, (const unsigned char *)s, (int)len) != 0)
            jwt = NULL;
        s += len + (s[len] == '|');
    }
    if (!jwt) {
        *why = "signature does not verify";
        return -1;
    }
    if (jwt_get_alg(jwt) != JWT_ALG_HS256) {
        *why = "algorithm is not HS256";
        goto out;
    }
    errno = 0;
    long exp = jwt_get_grant_int(jwt, "exp");
    if (errno != 0) {
        *why = "no exp claim";
        goto out;
    }
    if (exp <= (long)now) {
        *why = "expired";
        goto out;
    }
    errno = 0;
    long nbf = jwt_get_grant_int(jwt, "nbf");
    if (errno == 0 && nbf > (long)now) {
        *why = "not valid yet (nbf)";
        goto out;
    }
    if (p->issuer) {
        const char *iss = jwt_get_grant(jwt, "iss");
        if (!iss || strcmp(iss, p->issuer) != 0) {
            *why = "wrong issuer";
            goto out;
        }
    }
    if (p->audience && !authz_aud_matches(jwt, p->audience)) {
        *why = "wrong audience";
        goto out;
    }
    const char *acct = jwt_get_grant(jwt, p->account_claim);
    if (!acct || !*acct || strlen(acct) >= cap) {
        *why = "no account claim";
        goto out;
    }
    for (const char *c = acct; *c; c++) {
        if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9') ||
              *c == '_')) {
            *why = "account claim is not an account id";
            goto out;
        }
    }
    snprintf(account, cap, "%s", acct);
    rc = 0;
out:
    jwt_free(jwt);
    return rc;
}
