/* Unit tests for common/envelope.c: round trips and every rejection path. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "envelope.h"

static void *
make_ping(size_t *len)
{
    struct envelope_writer w;
    envelope_begin(&w, MSG_CTL, "req_123", 42, 3);
    envelope_put_str(&w, "cmd", "restart");
    envelope_put_int(&w, "index", -7);
    envelope_put_bool(&w, "ok", true);
    return envelope_finish(&w, len);
}

/* Packs a map with the given envelope fields, skipping or altering one. */
enum mutation { M_NONE, M_SKIP, M_WRONG_TYPE };

static void *
make_custom(const char *field, enum mutation m, int version, const char *type, size_t *len)
{
    msgpack_sbuffer sb;
    msgpack_packer pk;
    const char *fields[] = {"v", "type", "id", "request_id", "sent_at_ms", "deadline_ms", "body"};
    int n = 7;
    msgpack_sbuffer_init(&sb);
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, (size_t)(m == M_SKIP ? n - 1 : n));
    for (int i = 0; i < n; i++) {
        const char *f = fields[i];
        bool hit = field && strcmp(field, f) == 0;
        if (hit && m == M_SKIP)
            continue;
        envelope_pack_str(&pk, f);
        if (hit && m == M_WRONG_TYPE) {
            /* strings become integers and everything else a string */
            if (strcmp(f, "v") == 0 || strcmp(f, "sent_at_ms") == 0 ||
                strcmp(f, "deadline_ms") == 0 || strcmp(f, "body") == 0)
                envelope_pack_str(&pk, "x");
            else
                msgpack_pack_int(&pk, 5);
            continue;
        }
        if (strcmp(f, "v") == 0)
            msgpack_pack_int(&pk, version);
        else if (strcmp(f, "type") == 0)
            envelope_pack_str(&pk, type);
        else if (strcmp(f, "id") == 0)
            envelope_pack_str(&pk, "msg_1");
        else if (strcmp(f, "request_id") == 0)
            envelope_pack_str(&pk, "");
        else if (strcmp(f, "body") == 0)
            msgpack_pack_map(&pk, 0);
        else
            msgpack_pack_int64(&pk, 1000);
    }
    *len = sb.size;
    return msgpack_sbuffer_release(&sb);
}

static void
test_round_trip(void **state)
{
    (void)state;
    size_t len;
    void *buf = make_ping(&len);
    struct envelope env;
    char cmd[16];
    int64_t idx;
    bool ok;

    assert_int_equal(envelope_decode(&env, buf, len), ENV_OK);
    assert_int_equal(env.v, 1);
    assert_string_equal(env.type, MSG_CTL);
    assert_string_equal(env.request_id, "req_123");
    assert_int_equal(env.deadline_ms, 42);
    assert_true(strncmp(env.id, "msg_", 4) == 0);
    assert_true(env.sent_at_ms > 1700000000000LL);
    assert_int_equal(envelope_get_str(env.body, "cmd", cmd, sizeof(cmd)), 0);
    assert_string_equal(cmd, "restart");
    assert_int_equal(envelope_get_int(env.body, "index", &idx), 0);
    assert_int_equal(idx, -7);
    assert_int_equal(envelope_get_bool(env.body, "ok", &ok), 0);
    assert_true(ok);
    /* A string too long for the caller's buffer is refused, not truncated. */
    char tiny[4];
    assert_int_equal(envelope_get_str(env.body, "cmd", tiny, sizeof(tiny)), -1);
    assert_int_equal(envelope_get_int(env.body, "cmd", &idx), -1);
    assert_null(envelope_get(env.body, "absent"));
    envelope_free(&env);
    free(buf);
}

static void
test_every_truncation_rejected(void **state)
{
    (void)state;
    size_t len;
    uint8_t *buf = make_ping(&len);
    for (size_t cut = 0; cut < len; cut++) {
        struct envelope env;
        enum envelope_error e = envelope_decode(&env, buf, cut);
        assert_int_not_equal(e, ENV_OK);
        envelope_free(&env);
    }
    free(buf);
}

static void
test_trailing_bytes(void **state)
{
    (void)state;
    size_t len;
    uint8_t *buf = make_ping(&len);
    uint8_t *longer = malloc(len + 1);
    memcpy(longer, buf, len);
    longer[len] = 0xc0;
    struct envelope env;
    assert_int_equal(envelope_decode(&env, longer, len + 1), ENV_ERR_TRAILING);
    envelope_free(&env);
    free(longer);
    free(buf);
}

static void
test_missing_fields(void **state)
{
    (void)state;
    const char *fields[] = {"v", "type", "id", "request_id", "sent_at_ms", "deadline_ms", "body"};
    for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++) {
        size_t len;
        void *buf = make_custom(fields[i], M_SKIP, 1, MSG_PING, &len);
        struct envelope env;
        assert_int_equal(envelope_decode(&env, buf, len), ENV_ERR_MISSING_FIELD);
        assert_string_equal(env.field, fields[i]);
        envelope_free(&env);
        free(buf);
    }
}

static void
test_wrong_field_types(void **state)
{
    (void)state;
    const char *fields[] = {"v", "type", "id", "request_id", "sent_at_ms", "deadline_ms", "body"};
    for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++) {
        size_t len;
        void *buf = make_custom(fields[i], M_WRONG_TYPE, 1, MSG_PING, &len);
        struct envelope env;
        assert_int_equal(envelope_decode(&env, buf, len), ENV_ERR_FIELD_TYPE);
        assert_string_equal(env.field, fields[i]);
        envelope_free(&env);
        free(buf);
    }
}

static void
test_version_and_type(void **state)
{
    (void)state;
    size_t len;
    struct envelope env;
    void *buf = make_custom(NULL, M_NONE, 2, MSG_PING, &len);
    assert_int_equal(envelope_decode(&env, buf, len), ENV_ERR_VERSION);
    envelope_free(&env);
    free(buf);
    buf = make_custom(NULL, M_NONE, 1, "payment.teleport", &len);
    assert_int_equal(envelope_decode(&env, buf, len), ENV_ERR_UNKNOWN_TYPE);
    envelope_free(&env);
    free(buf);
    buf = make_custom(NULL, M_NONE, 1, MSG_PING, &len);
    assert_int_equal(envelope_decode(&env, buf, len), ENV_OK);
    envelope_free(&env);
    free(buf);
}

static void
test_not_a_map(void **state)
{
    (void)state;
    struct envelope env;
    const uint8_t array[] = {0x91, 0x01};
    const uint8_t intkey[] = {0x81, 0x01, 0x02};
    assert_int_equal(envelope_decode(&env, array, sizeof(array)), ENV_ERR_NOT_MAP);
    envelope_free(&env);
    assert_int_equal(envelope_decode(&env, intkey, sizeof(intkey)), ENV_ERR_NOT_MAP);
    envelope_free(&env);
    assert_int_equal(envelope_decode(&env, "", 0), ENV_ERR_TRUNCATED);
    envelope_free(&env);
    const uint8_t reserved[] = {0xc1};
    assert_int_equal(envelope_decode(&env, reserved, 1), ENV_ERR_MALFORMED);
    envelope_free(&env);
}

static void
test_oversize_and_bombs(void **state)
{
    (void)state;
    struct envelope env;
    uint8_t *big = calloc(1, ENVELOPE_MAX_SIZE + 1);
    assert_int_equal(envelope_decode(&env, big, ENVELOPE_MAX_SIZE + 1), ENV_ERR_OVERSIZE);
    envelope_free(&env);
    free(big);
    /* An array32 declaring four billion elements in five bytes. */
    const uint8_t bomb[] = {0xdd, 0xff, 0xff, 0xff, 0xff};
    assert_int_equal(envelope_decode(&env, bomb, sizeof(bomb)), ENV_ERR_TRUNCATED);
    envelope_free(&env);
    /* A str32 claiming 4 GiB. */
    const uint8_t longstr[] = {0xdb, 0xff, 0xff, 0xff, 0xff, 'a'};
    assert_int_equal(envelope_decode(&env, longstr, sizeof(longstr)), ENV_ERR_TRUNCATED);
    envelope_free(&env);
    /* Nesting deeper than allowed. */
    uint8_t deep[64];
    for (size_t i = 0; i < sizeof(deep) - 1; i++)
        deep[i] = 0x91;
    deep[sizeof(deep) - 1] = 0x01;
    assert_int_equal(envelope_decode(&env, deep, sizeof(deep)), ENV_ERR_TOO_COMPLEX);
    envelope_free(&env);
    /* Too many elements in total. */
    size_t n = ENVELOPE_MAX_ITEMS + 10;
    uint8_t *many = malloc(n + 3);
    many[0] = 0xdc;
    many[1] = (uint8_t)(n >> 8);
    many[2] = (uint8_t)n;
    memset(many + 3, 0x01, n);
    assert_int_equal(envelope_decode(&env, many, n + 3), ENV_ERR_TOO_COMPLEX);
    envelope_free(&env);
    free(many);
}

static void
test_strerror_names_everything(void **state)
{
    (void)state;
    for (int e = ENV_OK; e <= ENV_ERR_TRAILING; e++)
        assert_string_not_equal(envelope_strerror((enum envelope_error)e), "unknown error");
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_every_truncation_rejected),
        cmocka_unit_test(test_trailing_bytes),
        cmocka_unit_test(test_missing_fields),
        cmocka_unit_test(test_wrong_field_types),
        cmocka_unit_test(test_version_and_type),
        cmocka_unit_test(test_not_a_map),
        cmocka_unit_test(test_oversize_and_bombs),
        cmocka_unit_test(test_strerror_names_everything),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
