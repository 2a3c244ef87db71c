/* Unit tests for the pure security pieces: redaction, the card number
 * refusal, callback signatures, the Authorization header reader and JWT
 * checks. */
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

#include "params.h"

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

/* Parses a body as a request's would be, then looks for a card; param gets
 * the parameter named in the error, which must never hold the number. */
static bool
card_in(json_t *p, const struct params_error *parse_err, char param[64])
{
    struct params_error err;
    bool found;
    if (!p) { /* the form parser refuses what it cannot keep */
        err = *parse_err;
        found = true;
    } else {
        found = params_find_card(p, &err);
        json_decref(p);
    }
    if (found) {
        assert_int_equal(err.status, 400);
        assert_string_equal(err.code, "parameter_invalid");
        assert_non_null(strstr(err.message, "Raw card numbers are not accepted"));
        assert_false(redact_has_card(err.message, strlen(err.message)));
        assert_false(redact_has_card(err.param, strlen(err.param)));
        assert_null(strstr(err.message, "4242"));
        snprintf(param, 64, "%s", err.param);
    }
    return found;
}

static bool
card_in_form(const char *body, char param[64])
{
    struct params_error err;
    return card_in(params_parse_form(body, strlen(body), &err), &err, param);
}

static bool
card_in_json(const char *body, char param[64])
{
    struct params_error err;
    json_t *p = params_parse_json(body, strlen(body), &err);
    assert_non_null(p);
    return card_in(p, &err, param);
}

static void
test_card_numbers_refused(void **state)
{
    (void)state;
    char param[64];
    /* The same rule redact() masks by, asked without changing the buffer. */
    assert_true(redact_has_card("4242424242424242", 16));
    assert_false(redact_has_card("12 4242424242424242", 2)); /* only the buffer's length */
    assert_false(redact_has_card("4242424242424241", 16));

    assert_true(card_in_form("amount=100&metadata[k]=4242424242424242", param));
    assert_string_equal(param, "metadata[k]");
    assert_true(card_in_form("amount=100&payment_method=4242424242424242&confirm=true", param));
    assert_string_equal(param, "payment_method");
    /* Luhn-invalid 16 digits; Luhn-valid 12 and 20 digits; inside a word: not cards. */
    assert_false(card_in_form("metadata[k]=4242424242424241", param));
    assert_false(card_in_form("metadata[k]=424242424242", param));
    assert_false(card_in_form("metadata[k]=42424242424242424242", param));
    assert_false(card_in_form("metadata[k]=ref4242424242424242&description=pi_4242", param));
    assert_false(card_in_form("amount=100&currency=usd&metadata[order]=1234567890123", param));
    /* 13 and 19 digits, the bounds. */
    assert_true(card_in_form("description=4222222222222", param));
    assert_string_equal(param, "description");
    assert_false(card_in_form("customer=6011000990139424000", param)); /* 19, not Luhn */
    assert_true(card_in_form("customer=4000000000000000006", param));  /* 19 digits, Luhn */
    assert_string_equal(param, "customer");
    /* Grouped by single spaces (also '+' in a form) or dashes, and in text. */
    assert_true(card_in_form("metadata[k]=4242%204242%204242%204242", param));
    assert_string_equal(param, "metadata[k]");
    assert_true(card_in_form("metadata[k]=4242+4242+4242+4242", param));
    assert_true(card_in_form("metadata[k]=4242-4242-4242-4242", param));
    assert_true(card_in_form("description=card+4242424242424242+thanks", param));
    assert_string_equal(param, "description");
    assert_false(card_in_form("metadata[k]=4242++4242+4242+4242", param)); /* two spaces */
    /* Keys: named by what holds them, never by the number. */
    assert_true(card_in_form("amount=100&metadata[4242424242424242]=x", param));
    assert_string_equal(param, "metadata");
    assert_true(card_in_form("amount=100&4242424242424242=x", param));
    assert_string_equal(param, "");
    assert_true(card_in_form("a[0][4242424242424242]=x", param));
    assert_string_equal(param, "a[0]");
    assert_true(card_in_form("a[]=x&a[4242424242424242]=y", param));
    assert_string_equal(param, "a");
    assert_true(card_in_form("metadata[card+4242-4242-4242-4242]=x", param));
    assert_string_equal(param, "metadata");
    /* Ordinary indices and keys still parse as before. */
    assert_false(card_in_form("a[]=x&a[foo]=y&b[0][c]=1&b[7]=2&metadata[42]=z", param));
    /* Arrays and nesting, named Stripe's way. */
    assert_true(
        card_in_form("payment_method_types[]=card&payment_method_types[]=4242424242424242", param));
    assert_string_equal(param, "payment_method_types[1]");
    assert_true(card_in_form("a[0][b]=x&a[1][b]=5555555555554444", param));
    assert_string_equal(param, "a[1][b]");
    assert_true(card_in_form("card[number]=4242424242424242&card[cvc]=123", param));
    assert_string_equal(param, "card[number]");
    /* JSON bodies: strings, numbers, nested arrays. */
    assert_true(
        card_in_json("{\"amount\": 100, \"metadata\": {\"k\": \"4242424242424242\"}}", param));
    assert_string_equal(param, "metadata[k]");
    assert_true(card_in_json("{\"metadata\": {\"k\": 4242424242424242}}", param));
    assert_string_equal(param, "metadata[k]");
    assert_true(card_in_json("{\"description\": 4242424242424242.0}", param));
    assert_string_equal(param, "description");
    assert_true(
        card_in_json("{\"x\": [[\"a\"], [\"b\", {\"c\": [\"4242-4242-4242-4242\"]}]]}", param));
    assert_string_equal(param, "x[1][1][c][0]");
    assert_true(card_in_json("{\"metadata\": {\"n\": {\"4242424242424242\": 1}}}", param));
    assert_string_equal(param, "metadata[n]");
    assert_false(card_in_json("{\"amount\": 4242424242424241, \"confirm\": true, \"m\": null, "
                              "\"r\": 1.5, \"a\": [1, 2, \"pm_card_visa\"]}",
                              param));
    /* A name longer than the buffer is cut, not overrun. */
    assert_true(
        card_in_json("{\"metadata\": {\"kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk\": {"
                     "\"kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk\": \"4242424242424242\"}}}",
                     param));
    assert_int_equal(strlen(param), 63);
    assert_memory_equal(param, "metadata[kkkk", 13);
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

/* Gateway text is cut to fit without splitting a UTF-8 character. */
static void
test_text_copy(void **state)
{
    (void)state;
    char out[6];
    text_copy(out, sizeof(out), "abc");
    assert_string_equal(out, "abc");
    text_copy(out, sizeof(out), "abcdefgh");
    assert_string_equal(out, "abcde");
    /* "abcd" + e-acute (2 bytes): the cut falls inside it, so it goes. */
    text_copy(out, sizeof(out), "abcd\xc3\xa9x");
    assert_string_equal(out, "abcd");
    /* "abc" + e-acute fits exactly. */
    text_copy(out, sizeof(out), "abc\xc3\xa9x");
    assert_string_equal(out, "abc\xc3\xa9");
    /* A 4-byte character cut after its second byte. */
    text_copy(out, sizeof(out), "abc\xf0\x9f\x92\xb3");
    assert_string_equal(out, "abc");
    text_copy(out, 1, "abc");
    assert_string_equal(out, "");
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_redact_cards_and_secrets),
        cmocka_unit_test(test_card_numbers_refused),
        cmocka_unit_test(test_signature),
        cmocka_unit_test(test_text_copy),
        cmocka_unit_test(test_authorization_header),
        cmocka_unit_test(test_jwt),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
