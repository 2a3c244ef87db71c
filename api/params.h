/* params: request parameters from form or JSON bodies and query strings; see params.c. */
#ifndef PAYMENTD_API_PARAMS_H
#define PAYMENTD_API_PARAMS_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define PARAMS_MAX_COUNT 256
#define PARAMS_MAX_DEPTH 5
#define PARAMS_MAX_VALUE 5000

/* A failed parse or check: HTTP status, Stripe error code, message, param. */
struct params_error {
    int status;
    const char *code;
    char message[256];
    char param[64];
};

/* Parses an application/x-www-form-urlencoded body or query string with
 * bracket nesting (metadata[k]=v, expand[]=x) into a JSON object. */
json_t *params_parse_form(const char *data, size_t len, struct params_error *err);
/* Parses a JSON object body. */
json_t *params_parse_json(const char *data, size_t len, struct params_error *err);

/* Refuses any key not in allowed (NULL-terminated), naming the first one. */
int params_only(const json_t *params, const char *const *allowed, struct params_error *err);

/* Typed getters: 0 found, 1 absent, -1 present but invalid (err filled). */
int params_str(const json_t *params, const char *key, size_t maxlen, const char **out,
               struct params_error *err);
int params_int(const json_t *params, const char *key, int64_t *out, struct params_error *err);
int params_bool(const json_t *params, const char *key, bool *out, struct params_error *err);
/* Metadata as Stripe limits it (50 keys, 40-char keys, 500-char values).
 * Returns a JSON object whose "" values became null (delete on update), or
 * *clear set when metadata itself was "". */
int params_metadata(const json_t *params, json_t **out, bool *clear, struct params_error *err);

void params_fail(struct params_error *err, int status, const char *code, const char *param,
                 const char *fmt, ...) __attribute__((format(printf, 5, 6)));

/* Finds the first card number anywhere in parsed parameters (values at any
 * depth, keys, numbers) and fills err (400 parameter_invalid) naming its
 * parameter Stripe's way: payment_method, metadata[note],
 * payment_method_types[0]. A key that holds a card number is named by its
 * parent (metadata), and not at all at the top level, so that the name
 * never carries the number. Returns true when one was found. */
bool params_find_card(const json_t *params, struct params_error *err);

/* Canonical text of the parameters (sorted keys), for idempotency hashes. */
char *params_canonical(const json_t *params);

/* Whether s is valid UTF-8 (what jansson, and so every JSON column, keeps). */
bool params_utf8(const char *s);

#endif
