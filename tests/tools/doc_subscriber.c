/*
 * doc_subscriber - an NNG subscriber written only from README's "Events"
 * section, with NNG, msgpack-c and jansson and none of paymentd's code: it
 * checks every message against the documented format and prints
 * "<type> <event_id>" per event, or "BAD <reason>" for a message that does
 * not match. Usage: doc_subscriber URL COUNT.
 */
#include <jansson.h>
#include <msgpack.h>
#include <nng/nng.h>
#include <nng/protocol/pubsub0/sub.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const msgpack_object *
get(const msgpack_object *map, const char *key)
{
    if (map->type != MSGPACK_OBJECT_MAP)
        return NULL;
    for (uint32_t i = 0; i < map->via.map.size; i++) {
        const msgpack_object *k = &map->via.map.ptr[i].key;
        if (k->type == MSGPACK_OBJECT_STR && k->via.str.size == strlen(key) &&
            memcmp(k->via.str.ptr, key, k->via.str.size) == 0)
            return &map->via.map.ptr[i].val;
    }
    return NULL;
}

static int
is_str(const msgpack_object *o)
{
    return o && o->type == MSGPACK_OBJECT_STR;
}

static const char *
check(const char *topic, const char *data, size_t len, char *out, size_t cap)
{
    msgpack_unpacked u;
    size_t off = 0;
    const char *bad = NULL;
    msgpack_unpacked_init(&u);
    if (msgpack_unpack_next(&u, data, len, &off) != MSGPACK_UNPACK_SUCCESS || off != len) {
        bad = "not one msgpack object";
        goto out;
    }
    const msgpack_object *env = &u.data, *v = get(env, "v"), *type = get(env, "type"),
                         *body = get(env, "body");
    if (!v || v->type != MSGPACK_OBJECT_POSITIVE_INTEGER || v->via.u64 != 1 || !is_str(type) ||
        type->via.str.size != 5 || memcmp(type->via.str.ptr, "event", 5) != 0 ||
        !is_str(get(env, "id")) || !is_str(get(env, "request_id")) || !get(env, "sent_at_ms") ||
        !get(env, "deadline_ms") || !body || body->type != MSGPACK_OBJECT_MAP) {
        bad = "envelope fields";
        goto out;
    }
    const msgpack_object *eid = get(body, "event_id"), *etype = get(body, "type"),
                         *agg = get(body, "aggregate_id"), *ev = get(body, "event");
    if (!is_str(eid) || !is_str(etype) || !is_str(agg) || !is_str(ev)) {
        bad = "body fields";
        goto out;
    }
    if (etype->via.str.size != strlen(topic) ||
        memcmp(etype->via.str.ptr, topic, etype->via.str.size) != 0) {
        bad = "topic differs from body type";
        goto out;
    }
    json_t *j = json_loadb(ev->via.str.ptr, ev->via.str.size, 0, NULL);
    if (!json_is_object(j)) {
        bad = "event is not a JSON object";
    } else if (strncmp(topic, "Payment", 7) == 0) {
        if (!json_is_string(json_object_get(j, "orderId")))
            bad = "saga message without orderId";
    } else if (!json_is_string(json_object_get(j, "id")) ||
               strncmp(json_string_value(json_object_get(j, "id")), eid->via.str.ptr,
                       eid->via.str.size) != 0 ||
               !json_is_object(json_object_get(json_object_get(j, "data"), "object"))) {
        bad = "Stripe event shape";
    }
    json_decref(j);
    snprintf(out, cap, "%s %.*s", topic, (int)eid->via.str.size, eid->via.str.ptr);
out:
    msgpack_unpacked_destroy(&u);
    return bad;
}

int
main(int argc, char **argv)
{
    nng_socket s;
    if (argc != 3)
        return 2;
    long count = atol(argv[2]);
    if (nng_sub0_open(&s) != 0 || nng_socket_set(s, NNG_OPT_SUB_SUBSCRIBE, "", 0) != 0 ||
        nng_socket_set_ms(s, NNG_OPT_RECONNMINT, 20) != 0 ||
        nng_dial(s, argv[1], NULL, NNG_FLAG_NONBLOCK) != 0)
        return 1;
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (long n = 0; n < count; n++) {
        nng_msg *m;
        char line[300];
        if (nng_recvmsg(s, &m, 0) != 0)
            return 1;
        const char *p = nng_msg_body(m);
        size_t len = nng_msg_len(m);
        const char *nul = memchr(p, '\0', len);
        const char *bad = "no NUL after the topic";
        if (nul)
            bad = check(p, nul + 1, len - (size_t)(nul + 1 - p), line, sizeof(line));
        if (bad)
            printf("BAD %s\n", bad);
        else
            printf("%s\n", line);
        nng_msg_free(m);
    }
    nng_close(s);
    return 0;
}
