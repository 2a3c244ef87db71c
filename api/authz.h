/* authz: credentials from the Authorization header, and JWT checks; see authz.c. */
#ifndef PAYMENTD_API_AUTHZ_H
#define PAYMENTD_API_AUTHZ_H

#include <stddef.h>
#include <time.h>

enum authz_kind { AUTHZ_KEY, AUTHZ_JWT };

/* The secret of "Bearer X" or "Basic base64(X:)" into out, and whether it
 * is an API key or a JWT; -1 when the header is absent or malformed. */
int authz_parse(const char *header, char *out, size_t cap, enum authz_kind *kind);

struct authz_jwt_policy {
    const char *secret;        /* JWT_SECRET, at least 32 bytes */
    const char *issuer;        /* NULL: not checked */
    const char *audience;      /* NULL: not checked */
    const char *account_claim; /* the claim naming the account (acct_...) */
};

/* 0 when token is an HS256 JWT valid at now under p, with the account's
 * public id in account; else -1 and *why, a fixed reason for the log. */
int authz_jwt_verify(const char *token, const struct authz_jwt_policy *p, time_t now, char *account,
                     size_t cap, const char **why);

/* 0 when the token's JOSE header is a JSON object whose alg is HS256. */
int authz_jwt_header_ok(const char *token);

#endif
