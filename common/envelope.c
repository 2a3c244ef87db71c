/*
 * envelope - encoding and checking of the msgpack envelope that every
 * message between paymentd processes travels in:
 *     {v: 1, type, id, request_id, sent_at_ms, deadline_ms, body}
 *
 * Offers envelope_decode()/envelope_free() (the border check), the
 * envelope_writer functions for building one, and small accessors for body
 * fields. Input from another process is untrusted: envelope_scan() walks the
 * raw bytes first, without allocating, so a declared container of four
 * billion elements in a ten-byte message is refused before msgpack-c would
 * try to allocate for it; then the unpacked map is checked field by field.
 * Every failure is an error value naming the field, never a crash. Calls
 * msgpack-c, ids and xmalloc.
 */
#include "envelope.h"

#include <stdlib.h>
#include <string.h>

#include "ids.h"
#include "shm.h"
#include "xmalloc.h"

static const char *const envelope_types[] = {
    MSG_PING,          MSG_PONG,         MSG_CTL,         MSG_CTL_REPLY,
    MSG_JOB,           MSG_JOB_REPLY,    MSG_EVENT,       MSG_INVENTORY_RESERVED,
    MSG_EVENTS_REPLAY, MSG_EVENTS_BATCH, MSG_INTAKE_REPLY};

bool
envelope_type_known(const char *type)
{
    for (size_t i = 0; i < sizeof(envelope_types) / sizeof(envelope_types[0]); i++) {
        if (strcmp(type, envelope_types[i]) == 0)
            return true;
    }
    return false;
}

const char *
envelope_strerror(enum envelope_error err)
{
    switch (err) {
    case ENV_OK:
        return "ok";
    case ENV_ERR_OVERSIZE:
        return "message too large";
    case ENV_ERR_TRUNCATED:
        return "message truncated";
    case ENV_ERR_MALFORMED:
        return "not valid msgpack";
    case ENV_ERR_TOO_COMPLEX:
        return "message nested too deeply or has too many elements";
    case ENV_ERR_NOT_MAP:
        return "envelope is not a map with string keys";
    case ENV_ERR_MISSING_FIELD:
        return "required field missing";
    case ENV_ERR_FIELD_TYPE:
        return "field has the wrong type or size";
    case ENV_ERR_VERSION:
        return "unsupported envelope version";
    case ENV_ERR_UNKNOWN_TYPE:
        return "unknown message type";
    case ENV_ERR_WRONG_TYPE:
        return "unexpected message type";
    case ENV_ERR_TRAILING:
        return "trailing bytes after the envelope";
    }
    return "unknown error";
}

/* ---- structural scan ---- */

static uint64_t
scan_be(const uint8_t *p, int n)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = (v << 8) | p[i];
    return v;
}

enum envelope_error
envelope_scan(const uint8_t *p, size_t len, int max_depth, size_t max_items)
{
    /* left[d]: objects still to read at depth d. */
    uint64_t left[ENVELOPE_MAX_DEPTH + 2];
    int depth = 0;
    size_t pos = 0, items = 0;

    if (max_depth > ENVELOPE_MAX_DEPTH)
        max_depth = ENVELOPE_MAX_DEPTH;
    left[0] = 1;
    while (depth >= 0) {
        if (left[depth] == 0) {
            depth--;
            continue;
        }
        if (pos >= len)
            return ENV_ERR_TRUNCATED;
        if (++items > max_items)
            return ENV_ERR_TOO_COMPLEX;
        left[depth]--;
        uint8_t b = p[pos];
        uint64_t skip = 0, n = 0;
        int hdr = 1, lenbytes = 0, container = 0; /* container: 1 array, 2 map */

        if (b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3) {
            hdr = 1;
        } else if (b >= 0x80 && b <= 0x8f) {
            n = b & 0x0f;
            container = 2;
        } else if (b >= 0x90 && b <= 0x9f) {
            n = b & 0x0f;
            container = 1;
        } else if (b >= 0xa0 && b <= 0xbf) {
            skip = b & 0x1f;
        } else {
            switch (b) {
            case 0xc4:
            case 0xd9:
                lenbytes = 1;
                break;
            case 0xc5:
            case 0xda:
                lenbytes = 2;
                break;
            case 0xc6:
            case 0xdb:
                lenbytes = 4;
                break;
            case 0xc7:
                lenbytes = 1;
                skip = 1;
                break;
            case 0xc8:
                lenbytes = 2;
                skip = 1;
                break;
            case 0xc9:
                lenbytes = 4;
                skip = 1;
                break;
            case 0xca:
                skip = 4;
                break;
            case 0xcb:
                skip = 8;
                break;
            case 0xcc:
            case 0xd0:
                skip = 1;
                break;
            case 0xcd:
            case 0xd1:
                skip = 2;
                break;
            case 0xce:
            case 0xd2:
                skip = 4;
                break;
            case 0xcf:
            case 0xd3:
                skip = 8;
                break;
            case 0xd4:
                skip = 2;
                break;
            case 0xd5:
                skip = 3;
                break;
            case 0xd6:
                skip = 5;
                break;
            case 0xd7:
                skip = 9;
                break;
            case 0xd8:
                skip = 17;
                break;
            case 0xdc:
                lenbytes = 2;
                container = 1;
                break;
            case 0xdd:
                lenbytes = 4;
                container = 1;
                break;
            case 0xde:
                lenbytes = 2;
                container = 2;
                break;
            case 0xdf:
                lenbytes = 4;
                container = 2;
                break;
            default:
                return ENV_ERR_MALFORMED; /* 0xc1 */
            }
        }
        if (lenbytes) {
            if (len - pos < (size_t)(1 + lenbytes))
                return ENV_ERR_TRUNCATED;
            uint64_t v = scan_be(p + pos + 1, lenbytes);
            hdr = 1 + lenbytes;
            if (container)
                n = v;
            else
                skip += v;
        }
        if (len - pos < (uint64_t)hdr || len - pos - (uint64_t)hdr < skip)
            return ENV_ERR_TRUNCATED;
        pos += (size_t)hdr + (size_t)skip;
        if (container) {
            uint64_t count = container == 2 ? n * 2 : n;
            /* Every element takes at least one byte. */
            if (count > len - pos)
                return ENV_ERR_TRUNCATED;
            if (count > max_items)
                return ENV_ERR_TOO_COMPLEX;
            if (count > 0) {
                if (depth + 1 > max_depth)
                    return ENV_ERR_TOO_COMPLEX;
                left[++depth] = count;
            }
        }
    }
    return pos == len ? ENV_OK : ENV_ERR_TRAILING;
}

/* ---- decoding ---- */

const msgpack_object *
envelope_get(const msgpack_object *map, const char *key)
{
    size_t klen = strlen(key);
    if (!map || map->type != MSGPACK_OBJECT_MAP)
        return NULL;
    for (uint32_t i = 0; i < map->via.map.size; i++) {
        const msgpack_object *k = &map->via.map.ptr[i].key;
        if (k->type == MSGPACK_OBJECT_STR && k->via.str.size == klen &&
            memcmp(k->via.str.ptr, key, klen) == 0)
            return &map->via.map.ptr[i].val;
    }
    return NULL;
}

int
envelope_get_str(const msgpack_object *map, const char *key, char *out, size_t cap)
{
    const msgpack_object *o = envelope_get(map, key);
    if (!o || o->type != MSGPACK_OBJECT_STR || o->via.str.size >= cap)
        return -1;
    if (memchr(o->via.str.ptr, '\0', o->via.str.size))
        return -1;
    memcpy(out, o->via.str.ptr, o->via.str.size);
    out[o->via.str.size] = '\0';
    return 0;
}

int
envelope_get_int(const msgpack_object *map, const char *key, int64_t *out)
{
    const msgpack_object *o = envelope_get(map, key);
    if (!o)
        return -1;
    if (o->type == MSGPACK_OBJECT_POSITIVE_INTEGER) {
        if (o->via.u64 > INT64_MAX)
            return -1;
        *out = (int64_t)o->via.u64;
        return 0;
    }
    if (o->type == MSGPACK_OBJECT_NEGATIVE_INTEGER) {
        *out = o->via.i64;
        return 0;
    }
    return -1;
}

int
envelope_get_bool(const msgpack_object *map, const char *key, bool *out)
{
    const msgpack_object *o = envelope_get(map, key);
    if (!o || o->type != MSGPACK_OBJECT_BOOLEAN)
        return -1;
    *out = o->via.boolean;
    return 0;
}

static enum envelope_error
envelope_field_error(struct envelope *env, const char *field, bool present)
{
    strncpy(env->field, field, sizeof(env->field) - 1);
    return present ? ENV_ERR_FIELD_TYPE : ENV_ERR_MISSING_FIELD;
}

enum envelope_error
envelope_decode(struct envelope *env, const void *buf, size_t len)
{
    const msgpack_object *root;
    size_t off = 0;
    int64_t iv;
    enum envelope_error e;

    memset(env, 0, sizeof(*env));
    msgpack_unpacked_init(&env->unpacked);
    if (len > ENVELOPE_MAX_SIZE)
        return ENV_ERR_OVERSIZE;
    if (len == 0)
        return ENV_ERR_TRUNCATED;
    e = envelope_scan(buf, len, ENVELOPE_MAX_DEPTH, ENVELOPE_MAX_ITEMS);
    if (e != ENV_OK)
        return e;
    switch (msgpack_unpack_next(&env->unpacked, buf, len, &off)) {
    case MSGPACK_UNPACK_SUCCESS:
        break;
    case MSGPACK_UNPACK_EXTRA_BYTES:
        return ENV_ERR_TRAILING;
    case MSGPACK_UNPACK_CONTINUE:
        return ENV_ERR_TRUNCATED;
    default:
        return ENV_ERR_MALFORMED;
    }
    root = &env->unpacked.data;
    if (root->type != MSGPACK_OBJECT_MAP)
        return ENV_ERR_NOT_MAP;
    for (uint32_t i = 0; i < root->via.map.size; i++) {
        if (root->via.map.ptr[i].key.type != MSGPACK_OBJECT_STR)
            return ENV_ERR_NOT_MAP;
    }

    if (envelope_get_int(root, "v", &iv) < 0)
        return envelope_field_error(env, "v", envelope_get(root, "v") != NULL);
    if (iv != ENVELOPE_VERSION) {
        strcpy(env->field, "v");
        return ENV_ERR_VERSION;
    }
    env->v = (uint32_t)iv;
    if (envelope_get_str(root, "type", env->type, sizeof(env->type)) < 0 || !env->type[0])
        return envelope_field_error(env, "type", envelope_get(root, "type") != NULL);
    if (!envelope_type_known(env->type)) {
        strcpy(env->field, "type");
        return ENV_ERR_UNKNOWN_TYPE;
    }
    if (envelope_get_str(root, "id", env->id, sizeof(env->id)) < 0 || !env->id[0])
        return envelope_field_error(env, "id", envelope_get(root, "id") != NULL);
    if (envelope_get_str(root, "request_id", env->request_id, sizeof(env->request_id)) < 0)
        return envelope_field_error(env, "request_id", envelope_get(root, "request_id") != NULL);
    if (envelope_get_int(root, "sent_at_ms", &env->sent_at_ms) < 0 || env->sent_at_ms < 0)
        return envelope_field_error(env, "sent_at_ms", envelope_get(root, "sent_at_ms") != NULL);
    if (envelope_get_int(root, "deadline_ms", &env->deadline_ms) < 0 || env->deadline_ms < 0)
        return envelope_field_error(env, "deadline_ms", envelope_get(root, "deadline_ms") != NULL);
    env->body = envelope_get(root, "body");
    if (!env->body || env->body->type != MSGPACK_OBJECT_MAP)
        return envelope_field_error(env, "body", env->body != NULL);
    return ENV_OK;
}

void
envelope_free(struct envelope *env)
{
    msgpack_unpacked_destroy(&env->unpacked);
    env->body = NULL;
}

/* ---- encoding ---- */

void
envelope_pack_str(msgpack_packer *pk, const char *s)
{
    size_t n = strlen(s);
    msgpack_pack_str(pk, n);
    msgpack_pack_str_body(pk, s, n);
}

void
envelope_begin(struct envelope_writer *w, const char *type, const char *request_id,
               int64_t deadline_ms, uint32_t body_fields)
{
    char id[ENVELOPE_ID_MAX];

    if (!envelope_type_known(type))
        abort(); /* a sender naming an unregistered type is our own bug */
    ids_random(id, sizeof(id), "msg_", 12);
    msgpack_sbuffer_init(&w->sbuf);
    msgpack_packer_init(&w->pk, &w->sbuf, msgpack_sbuffer_write);
    msgpack_pack_map(&w->pk, 7);
    envelope_pack_str(&w->pk, "v");
    msgpack_pack_uint32(&w->pk, ENVELOPE_VERSION);
    envelope_pack_str(&w->pk, "type");
    envelope_pack_str(&w->pk, type);
    envelope_pack_str(&w->pk, "id");
    envelope_pack_str(&w->pk, id);
    envelope_pack_str(&w->pk, "request_id");
    envelope_pack_str(&w->pk, request_id ? request_id : "");
    envelope_pack_str(&w->pk, "sent_at_ms");
    msgpack_pack_int64(&w->pk, shm_now_ms());
    envelope_pack_str(&w->pk, "deadline_ms");
    msgpack_pack_int64(&w->pk, deadline_ms);
    envelope_pack_str(&w->pk, "body");
    msgpack_pack_map(&w->pk, body_fields);
}

void
envelope_put_key(struct envelope_writer *w, const char *key)
{
    envelope_pack_str(&w->pk, key);
}

void
envelope_put_str(struct envelope_writer *w, const char *key, const char *value)
{
    envelope_pack_str(&w->pk, key);
    envelope_pack_str(&w->pk, value);
}

void
envelope_put_int(struct envelope_writer *w, const char *key, int64_t value)
{
    envelope_pack_str(&w->pk, key);
    msgpack_pack_int64(&w->pk, value);
}

void
envelope_put_bool(struct envelope_writer *w, const char *key, bool value)
{
    envelope_pack_str(&w->pk, key);
    if (value)
        msgpack_pack_true(&w->pk);
    else
        msgpack_pack_false(&w->pk);
}

void *
envelope_finish(struct envelope_writer *w, size_t *len)
{
    *len = w->sbuf.size;
    void *data = msgpack_sbuffer_release(&w->sbuf);
    msgpack_sbuffer_destroy(&w->sbuf);
    return data;
}

void
envelope_writer_free(struct envelope_writer *w)
{
    msgpack_sbuffer_destroy(&w->sbuf);
}
