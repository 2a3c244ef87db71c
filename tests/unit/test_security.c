/* Unit tests for the pure security pieces: redaction, callback signatures,
 * the Authorization header reader and JWT checks. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <jwt.h>

#include "authz.h"
#include "crypto.h"
#include "redact.h"
#include "signature.h"

static void
test_redact_cards_and_secrets(void **state)
{
    (void)state;
    char a[] = "No such payment_intent: '4242424242424242'";
    assert_true(redact(a));
    assert_string_equal(a, "No such payment_intent: '****************'");
    char b[] = "card 4000-0566-5566-5556 and 5555 5555 5555 4444 end";
    assert_true(redact(b));
    assert_null(strstr(b, "5556"));
    assert_null(strstr(b, "4444"));
    char c[] = "key sk_test_abcDEF123 and whsec_zzz9 and eyJhbGciOi.eyJzdWIi.sig";
    assert_true(redact(c));
    assert_null(strstr(c, "abcDEF123"));
    assert_null(strstr(c, "zzz9"));
    assert_null(strstr(c, "eyJzdWIi"));
    /* Not cards: failing Luhn, too short, inside a word, an id. */
    char d[] = "4242424242424241 12345 pi_01a2019efa42acca39c0d5ed37ee order 1234567890123";
    char copy[sizeof(d)];
    memcpy(copy, d, sizeof(d));
    redact(d);
    assert_string_equal(d, copy);
}

static void
sign(const char *secret, long long t, const char *body, char out[65])
{
    char payload[256];
    snprintf(payload, sizeof(payload), "%lld.%s", t, body);
    crypto_hmac_sha256_hex(secret, strlen(secret), payload, strlen(payload), out);
}

static void
test_signature(void **state)
{
    (void)state;
    const char *body = "{\"id\":\"gwevt_1\"}";
    char good[65], other[65], header[300];
    sign("secret-new-0123456789", 1000, body, good);
    sign("secret-bad-0123456789", 1000, body, other);
    struct sig_header h;
    snprintf(header, sizeof(header), "t=1000,v1=%s,v0=ignored,v1=%s", other, good);
    assert_int_equal(sig_parse(header, &h), 0);
    assert_int_equal(h.n_v1, 2);
    assert_int_equal(sig_verify(&h, "secret-new-0123456789", body, strlen(body), 1100, 300),
                     SIG_OK);
    /* Either of two receiver secrets (rotation). */
    assert_int_equal(sig_verify(&h, "old-secret-0123456789|secret-new-0123456789", body,
                                strlen(body), 1000, 300),
                     SIG_OK);
    assert_int_equal(sig_verify(&h, "secret-new-0123456789", "{\"id\":\"gwevt_2\"}", 16, 1000, 300),
                     SIG_MISMATCH);
    assert_int_equal(sig_verify(&h, "secret-new-0123456789", body, strlen(body), 1301, 300),
                     SIG_TOO_OLD);
    assert_int_equal(sig_verify(&h, "secret-new-0123456789", body, strlen(body), 699, 300),
                     SIG_TOO_NEW);
    assert_int_equal(sig_parse("v1=abc", &h), -1);
    assert_int_equal(sig_parse("t=1000", &h), -1);
    assert_int_equal(sig_parse("t=10x0,v1=00", &h), -1);
    assert_int_equal(sig_parse(NULL, &h), -1);
}

static void
test_authorization_header(void **state)
{
    (void)state;
    char out[256];
    enum authz_kind kind;
    assert_int_equal(authz_parse("Bearer sk_test_abc", out, sizeof(out), &kind), 0);
    assert_string_equal(out, "sk_test_abc");
    assert_int_equal(kind, AUTHZ_KEY);
    /* base64("sk_test_abc:") */
    assert_int_equal(authz_parse("Basic c2tfdGVzdF9hYmM6", out, sizeof(out), &kind), 0);
    assert_string_equal(out, "sk_test_abc");
    assert_int_equal(authz_parse("Bearer aaa.bbb.ccc", out, sizeof(out), &kind), 0);
    assert_int_equal(kind, AUTHZ_JWT);
    assert_int_equal(authz_parse("Bearer ", out, sizeof(out), &kind), -1);
    assert_int_equal(authz_parse("Token x", out, sizeof(out), &kind), -1);
    assert_int_equal(authz_parse("Bearer a b", out, sizeof(out), &kind), -1);
    assert_int_equal(authz_parse("Basic !!!!", out, sizeof(out), &kind), -1);
    assert_int_equal(authz_parse(NULL, out, sizeof(out), &kind), -1);
}

#define SECRET "0123456789abcdef0123456789abcdef"

static char *
make_jwt(jwt_alg_t alg, const char *key, long exp, const char *aud)
{
    jwt_t *jwt;
    assert_int_equal(jwt_new(&jwt), 0);
    jwt_add_grant(jwt, "sub", "acct_0123456789abcdef");
    jwt_add_grant(jwt, "iss", "issuer.example");
    if (aud)
        jwt_add_grant(jwt, "aud", aud);
    if (exp)
        jwt_add_grant_int(jwt, "exp", exp);
    jwt_set_alg(jwt, alg, key ? (const unsigned char *)key : NULL, key ? (int)strlen(key) : 0);
    char *token = jwt_encode_str(jwt);
    jwt_free(jwt);
    return token;
}

static void
test_jwt(void **state)
{
    (void)state;
    struct authz_jwt_policy p = {SECRET, "issuer.example", "paymentd", "sub"};
    char account[64];
    const char *why;
    time_t now = 1700000000;
    char *t = make_jwt(JWT_ALG_HS256, SECRET, now + 60, "paymentd");
    assert_int_equal(authz_jwt_verify(t, &p, now, account, sizeof(account), &why), 0);
    assert_string_equal(account, "acct_0123456789abcdef");
    free(t);
    t = make_jwt(JWT_ALG_HS256, SECRET, now - 1, "paymentd"); /* expired */
    assert_int_equal(authz_jwt_verify(t, &p, now, account, sizeof(account), &why), -1);
    free(t);
    t = make_jwt(JWT_ALG_HS256, SECRET, 0, "paymentd"); /* no exp */
    assert_int_equal(authz_jwt_verify(t, &p, now, account, sizeof(account), &why), -1);
    assert_string_equal(why, "no exp claim");
    free(t);
    t = make_jwt(JWT_ALG_HS256, SECRET, now + 60, "someone-else");
    assert_int_equal(authz_jwt_verify(t, &p, now, account, sizeof(account), &why), -1);
    free(t);
    t = make_jwt(JWT_ALG_HS256, "another-secret-another-secret-00", now + 60, "paymentd");
    assert_int_equal(authz_jwt_verify(t, &p, now, account, sizeof(account), &why), -1);
    free(t);
    t = make_jwt(JWT_ALG_HS512, SECRET, now + 60, "paymentd");
    assert_int_equal(authz_jwt_verify(t, &p, now, account, sizeof(account), &why), -1);
    assert_string_equal(why, "algorithm is not HS256");
    free(t);
    t = make_jwt(JWT_ALG_NONE, NULL, now + 60, "paymentd");
    assert_int_equal(authz_jwt_verify(t, &p, now, account, sizeof(account), &why), -1);
    free(t);
    /* While rotating, JWT_SECRET holds "new|old": a token signed with either verifies. */
    struct authz_jwt_policy rotating = {"new-secret-new-secret-new-secret-00|" SECRET,
                                        "issuer.example", "paymentd", "sub"};
    t = make_jwt(JWT_ALG_HS256, SECRET, now + 60, "paymentd");
    assert_int_equal(authz_jwt_verify(t, &rotating, now, account, sizeof(account), &why), 0);
    free(t);
    t = make_jwt(JWT_ALG_HS256, "new-secret-new-secret-new-secret-00", now + 60, "paymentd");
    assert_int_equal(authz_jwt_verify(t, &rotating, now, account, sizeof(account), &why), 0);
    assert_int_equal(authz_jwt_verify(t, &p, now, account, sizeof(account), &why), -1);
    free(t);
    assert_int_equal(authz_jwt_verify("a.b.c", &p, now, account, sizeof(account), &why), -1);
    assert_int_equal(authz_jwt_verify("...", &p, now, account, sizeof(account), &why), -1);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_redact_cards_and_secrets),
        cmocka_unit_test(test_signature),
        cmocka_unit_test(test_authorization_header),
        cmocka_unit_test(test_jwt),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
