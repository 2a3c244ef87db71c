/* envelope: the msgpack envelope of every message between processes; see envelope.c. */
#ifndef PAYMENTD_ENVELOPE_H
#define PAYMENTD_ENVELOPE_H

#include <msgpack.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define ENVELOPE_VERSION   1
#define ENVELOPE_MAX_SIZE  (256 * 1024)
#define ENVELOPE_MAX_DEPTH 16
#define ENVELOPE_MAX_ITEMS 4096
#define ENVELOPE_TYPE_MAX  48
#define ENVELOPE_ID_MAX    64

enum envelope_error {
    ENV_OK = 0,
    ENV_ERR_OVERSIZE,
    ENV_ERR_TRUNCATED,
    ENV_ERR_MALFORMED,
    ENV_ERR_TOO_COMPLEX,
    ENV_ERR_NOT_MAP,
    ENV_ERR_MISSING_FIELD,
    ENV_ERR_FIELD_TYPE,
    ENV_ERR_VERSION,
    ENV_ERR_UNKNOWN_TYPE,
    ENV_ERR_WRONG_TYPE,
    ENV_ERR_TRAILING,
};

struct envelope {
    uint32_t v;
    char type[ENVELOPE_TYPE_MAX];
    char id[ENVELOPE_ID_MAX];
    char request_id[ENVELOPE_ID_MAX];
    int64_t sent_at_ms;
    int64_t deadline_ms;        /* 0: none */
    const msgpack_object *body; /* a map, valid until envelope_free() */
    msgpack_unpacked unpacked;
    char field[24]; /* the field an error refers to */
};

/* Decodes and checks one envelope. On error, env->field names the field
 * involved (when there is one); envelope_free() is safe either way. The
 * decoded strings point into buf: keep buf until envelope_free(). */
enum envelope_error envelope_decode(struct envelope *env, const void *buf, size_t len);
void envelope_free(struct envelope *env);
const char *envelope_strerror(enum envelope_error err);

/* Checks the msgpack structure without allocating: a declared container size
 * larger than the bytes left, nesting deeper than max_depth or more than
 * max_items objects is refused before the unpacker can act on it. */
enum envelope_error envelope_scan(const uint8_t *p, size_t len, int max_depth, size_t max_items);

/* ---- building ---- */

struct envelope_writer {
    msgpack_sbuffer sbuf;
    msgpack_packer pk;
};

/* Starts an envelope of a known type with body_fields key/value pairs to follow. */
void envelope_begin(struct envelope_writer *w, const char *type, const char *request_id,
                    int64_t deadline_ms, uint32_t body_fields);
void envelope_put_str(struct envelope_writer *w, const char *key, const char *value);
void envelope_put_int(struct envelope_writer *w, const char *key, int64_t value);
void envelope_put_bool(struct envelope_writer *w, const char *key, bool value);
/* Writes only the key; the caller packs the value with w->pk. */
void envelope_put_key(struct envelope_writer *w, const char *key);
void envelope_pack_str(msgpack_packer *pk, const char *s);
/* Hands over the bytes (free with free()). */
void *envelope_finish(struct envelope_writer *w, size_t *len);
void envelope_writer_free(struct envelope_writer *w);

/* ---- reading a body ---- */

const msgpack_object *envelope_get(const msgpack_object *map, const char *key);
/* Copies a string field of at most cap-1 bytes. -1: missing or wrong type or too long. */
int envelope_get_str(const msgpack_object *map, const char *key, char *out, size_t cap);
int envelope_get_int(const msgpack_object *map, const char *key, int64_t *out);
int envelope_get_bool(const msgpack_object *map, const char *key, bool *out);

/* Message types known to every process. */
#define MSG_PING               "ping"
#define MSG_PONG               "pong"
#define MSG_CTL                "ctl.request"
#define MSG_CTL_REPLY          "ctl.reply"
#define MSG_JOB                "job.request" /* api -> worker: a gateway job */
#define MSG_JOB_REPLY          "job.reply"   /* worker -> api: the intent after the job */
#define MSG_EVENT              "event"       /* outbox -> subscribers: one Stripe-shaped event */
#define MSG_INVENTORY_RESERVED "InventoryReserved" /* publishers -> api: pay for an order */
#define MSG_INTAKE_REPLY       "intake.reply"      /* api -> publisher: the order's answer */
#define MSG_EVENTS_REPLAY      "events.replay"     /* subscriber -> outbox: events after an id */
#define MSG_EVENTS_BATCH       "events.batch"      /* outbox -> subscriber: those events */

bool envelope_type_known(const char *type);

#endif
