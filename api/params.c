/*
 * params - the border between HTTP bodies and the handlers.
 *
 * Offers params_parse_form() and params_parse_json(), which turn a Stripe
 * style form body (metadata[order]=42, expand[]=x) or a JSON object into one
 * jansson object, so that every handler reads parameters the same way; the
 * typed getters params_str(), params_int(), params_bool(),
 * params_metadata(); params_only(), which refuses unknown parameters;
 * params_find_card(), which names the parameter holding a card number; and
 * params_canonical() for idempotency hashes. Limits on parameter count,
 * nesting depth and value length are enforced while parsing. Every failure
 * fills a params_error naming the parameter; values are never echoed into
 * messages, since a client may put a card number anywhere.
 * Calls jansson, redact, xmalloc.
 */
#include "params.h"

#include <ctype.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "redact.h"
#include "xmalloc.h"

void
params_fail(struct params_error *err, int status, const char *code, const char *param,
            const char *fmt, ...)
{
    va_list ap;
    err->status = status;
    err->code = code;
    snprintf(err->param, sizeof(err->param), "%s", param ? param : "");
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof(err->message), fmt, ap);
    va_end(ap);
}

static int
params_hexval(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    c = tolower(c);
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

/* Percent-decodes [s, s+len) with '+' as space; -1 on a bad escape or NUL. */
static char *
params_decode(const char *s, size_t len)
{
    char *out = xmalloc(len + 1);
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        if (c == '+') {
            c = ' ';
        } else if (c == '%') {
            int hi, lo;
            if (i + 2 >= len || (hi = params_hexval((unsigned char)s[i + 1])) < 0 ||
                (lo = params_hexval((unsigned char)s[i + 2])) < 0) {
                free(out);
                return NULL;
            }
            c = (char)(hi * 16 + lo);
            i += 2;
        }
        if (c == '\0') {
            free(out);
            return NULL;
        }
        out[n++] = c;
    }
    out[n] = '\0';
    return out;
}

/* Splits "a[b][]" into segments: "a", "b", "" (empty = append). */
static int
params_split_key(const char *key, char segs[PARAMS_MAX_DEPTH + 1][128], int *nsegs)
{
    const char *p = key;
    int n = 0;
    size_t len = strcspn(p, "[");
    if (len == 0 || len >= 128)
        return -1;
    memcpy(segs[n], p, len);
    segs[n++][len] = '\0';
    p += len;
    while (*p) {
        if (*p != '[' || n > PARAMS_MAX_DEPTH)
            return -1;
        const char *close = strchr(p, ']');
        if (!close || (size_t)(close - p - 1) >= 128)
            return -1;
        memcpy(segs[n], p + 1, (size_t)(close - p - 1));
        segs[n++][close - p - 1] = '\0';
        p = close + 1;
    }
    *nsegs = n;
    return 0;
}

/* jansson keeps only UTF-8 text: anything else would be dropped (a value)
 * or refused (a key, freeing what was to be stored under it). */
bool
params_utf8(const char *s)
{
    json_t *probe = json_string(s);
    json_decref(probe);
    return probe != NULL;
}

/* Refuses a card number found in parameter param; the message never
 * carries the number, and the name is chosen by the caller so that it
 * does not either. */
static void
params_card_fail(struct params_error *err, const char *param)
{
    params_fail(err, 400, "parameter_invalid", param,
                "Raw card numbers are not accepted in any parameter: create a payment method "
                "with a tokenization provider and pass its id as payment_method.");
}

/* A card number is never taken for an array index: read as one, it would
 * vanish from the tree (metadata[4242424242424242]=x would append x), and
 * params_find_card() could no longer refuse it. It stays a key instead. */
static bool
params_is_index(const char *s)
{
    if (!*s)
        return true;
    if (redact_has_card(s, strlen(s)))
        return false;
    for (; *s; s++) {
        if (!isdigit((unsigned char)*s))
            return false;
    }
    return true;
}

static int
params_insert(json_t *root, const char *key, const char *value, struct params_error *err)
{
    char segs[PARAMS_MAX_DEPTH + 1][128];
    int n;
    json_t *cur = root;

    if (params_split_key(key, segs, &n) < 0) {
        params_fail(err, 400, "parameter_invalid", NULL, "Invalid parameter name.");
        return -1;
    }
    for (int i = 0; i < n; i++) {
        bool last = i == n - 1;
        bool next_is_array = !last && params_is_index(segs[i + 1]);
        json_t *child;
        if (json_is_array(cur)) {
            /* a[]=x or a[0]=x: append; a[0][k]=v: extend the last element when
             * the index repeats, else append a new one */
            if (redact_has_card(segs[i], strlen(segs[i]))) {
                /* a[]=x&a[4242424242424242]=y: the array cannot keep the
                 * number as a key, and must not drop it unseen. */
                params_card_fail(err, segs[0]);
                return -1;
            }
            if (last) {
                json_array_append_new(cur, json_string(value));
                return 0;
            }
            size_t sz = json_array_size(cur);
            long idx = segs[i][0] ? strtol(segs[i], NULL, 10) : -1;
            if (idx >= 0 && (size_t)idx < sz)
                child = json_array_get(cur, (size_t)idx);
            else {
                child = next_is_array ? json_array() : json_object();
                json_array_append_new(cur, child);
            }
        } else {
            child = json_object_get(cur, segs[i]);
            if (last) {
                if (child) {
                    params_fail(err, 400, "parameter_invalid", segs[0],
                                "Parameter %s was given more than once.", segs[0]);
                    return -1;
                }
                json_object_set_new(cur, segs[i], json_string(value));
                return 0;
            }
            if (!child) {
                child = next_is_array ? json_array() : json_object();
                json_object_set_new(cur, segs[i], child);
            }
        }
        if (!json_is_object(child) && !json_is_array(child)) {
            params_fail(err, 400, "parameter_invalid", segs[0],
                        "Parameter %s mixes a value and nested values.", segs[0]);
            return -1;
        }
        cur = child;
    }
    return 0;
}

json_t *
params_parse_form(const char *data, size_t len, struct params_error *err)
{
    json_t *root = json_object();
    const char *p = data, *end = data + len;
    int count = 0;

    while (p < end) {
        const char *amp = memchr(p, '&', (size_t)(end - p));
        const char *stop = amp ? amp : end;
        if (stop > p) {
            const char *eq = memchr(p, '=', (size_t)(stop - p));
            const char *kend = eq ? eq : stop;
            char *key = params_decode(p, (size_t)(kend - p));
            char *val = eq ? params_decode(eq + 1, (size_t)(stop - eq - 1)) : xstrdup("");
            if (!key || !val || !key[0] || !params_utf8(key) || !params_utf8(val)) {
                free(key);
                free(val);
                params_fail(err, 400, "parameter_invalid", NULL,
                            "The request body is not valid form encoding (UTF-8 text).");
                goto fail;
            }
            if (++count > PARAMS_MAX_COUNT || strlen(val) > PARAMS_MAX_VALUE) {
                params_fail(err, 400, "parameter_invalid", NULL,
                            count > PARAMS_MAX_COUNT ? "Too many parameters."
                                                     : "A parameter value is too long.");
                free(key);
                free(val);
                goto fail;
            }
            int rc = params_insert(root, key, val, err);
            free(key);
            free(val);
            if (rc < 0)
                goto fail;
        }
        p = stop + 1;
    }
    return root;
fail:
    json_decref(root);
    return NULL;
}

static int
params_check_json(const json_t *v, int depth, int *count, struct params_error *err)
{
    if (depth > PARAMS_MAX_DEPTH + 1 || ++*count > PARAMS_MAX_COUNT * 4) {
        params_fail(err, 400, "parameter_invalid", NULL,
                    "The JSON body is nested too deeply or has too many values.");
        return -1;
    }
    if (json_is_string(v) && json_string_length(v) > PARAMS_MAX_VALUE) {
        params_fail(err, 400, "parameter_invalid", NULL, "A parameter value is too long.");
        return -1;
    }
    if (json_is_object(v)) {
        const char *k;
        json_t *c;
        json_object_foreach((json_t *)v, k, c)
        {
            if (params_check_json(c, depth + 1, count, err) < 0)
                return -1;
        }
    } else if (json_is_array(v)) {
        size_t i;
        json_t *c;
        json_array_foreach(v, i, c)
        {
            if (params_check_json(c, depth + 1, count, err) < 0)
                return -1;
        }
    }
    return 0;
}

json_t *
params_parse_json(const char *data, size_t len, struct params_error *err)
{
    json_error_t jerr;
    int count = 0;
    json_t *root = json_loadb(data, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        params_fail(err, 400, "parameter_invalid", NULL,
                    "The request body is not valid JSON (line %d, column %d).", jerr.line,
                    jerr.column);
        return NULL;
    }
    if (!json_is_object(root)) {
        params_fail(err, 400, "parameter_invalid", NULL, "The JSON body must be an object.");
        json_decref(root);
        return NULL;
    }
    if (params_check_json(root, 0, &count, err) < 0) {
        json_decref(root);
        return NULL;
    }
    return root;
}

int
params_only(const json_t *params, const char *const *allowed, struct params_error *err)
{
    const char *k;
    json_t *v;
    json_object_foreach((json_t *)params, k, v)
    {
        bool ok = false;
        for (const char *const *a = allowed; *a; a++)
            ok = ok || strcmp(*a, k) == 0;
        if (ok)
            continue;
        if (strcmp(k, "card") == 0 || strcmp(k, "payment_method_data") == 0 ||
            strcmp(k, "source") == 0) {
            /* Name the field (card[number]) but never echo what it holds. */
            char field[64];
            json_t *card =
                json_is_object(v) && json_object_get(v, "card") ? json_object_get(v, "card") : v;
            snprintf(field, sizeof(field), "%s%s", k,
                     json_is_object(card) && json_object_get(card, "number")
                         ? (card == v ? "[number]" : "[card][number]")
                         : "");
            params_fail(err, 400, "parameter_unknown", field,
                        "Sending raw card data is not supported: create a payment method with "
                        "a tokenization provider and pass its id as payment_method.");
            return -1;
        }
        params_fail(err, 400, "parameter_unknown", k, "Received unknown parameter: %.60s", k);
        return -1;
    }
    return 0;
}

int
params_str(const json_t *params, const char *key, size_t maxlen, const char **out,
           struct params_error *err)
{
    json_t *v = json_object_get(params, key);
    if (!v || json_is_null(v))
        return 1;
    if (!json_is_string(v)) {
        params_fail(err, 400, "parameter_invalid", key, "Invalid string: %s must be a string.",
                    key);
        return -1;
    }
    if (json_string_length(v) > maxlen) {
        params_fail(err, 400, "parameter_invalid", key,
                    "Invalid string: %s must be at most %zu characters.", key, maxlen);
        return -1;
    }
    *out = json_string_value(v);
    return 0;
}

int
params_int(const json_t *params, const char *key, int64_t *out, struct params_error *err)
{
    json_t *v = json_object_get(params, key);
    if (!v || json_is_null(v))
        return 1;
    if (json_is_integer(v)) {
        *out = (int64_t)json_integer_value(v);
        return 0;
    }
    if (json_is_string(v)) {
        const char *s = json_string_value(v);
        const char *p = s;
        int64_t n = 0;
        if (*p == '-')
            p++;
        if (*p && strlen(p) <= 18) {
            for (; *p && isdigit((unsigned char)*p); p++)
                n = n * 10 + (*p - '0');
            if (*p == '\0') {
                *out = s[0] == '-' ? -n : n;
                return 0;
            }
        }
    }
    params_fail(err, 400, "parameter_invalid_integer", key,
                "Invalid integer: %s must be a whole number.", key);
    return -1;
}

int
params_bool(const json_t *params, const char *key, bool *out, struct params_error *err)
{
    json_t *v = json_object_get(params, key);
    if (!v || json_is_null(v))
        return 1;
    if (json_is_boolean(v)) {
        *out = json_is_true(v);
        return 0;
    }
    if (json_is_string(v) &&
        (strcmp(json_string_value(v), "true") == 0 || strcmp(json_string_value(v), "false") == 0)) {
        *out = strcmp(json_string_value(v), "true") == 0;
        return 0;
    }
    params_fail(err, 400, "parameter_invalid", key, "Invalid boolean: %s must be true or false.",
                key);
    return -1;
}

int
params_metadata(const json_t *params, json_t **out, bool *clear, struct params_error *err)
{
    json_t *v = json_object_get(params, "metadata");
    const char *k;
    json_t *val;
    *clear = false;
    *out = NULL;
    if (!v || json_is_null(v))
        return 1;
    if (json_is_string(v) && json_string_length(v) == 0) {
        *clear = true;
        return 0;
    }
    if (!json_is_object(v)) {
        params_fail(err, 400, "parameter_invalid", "metadata",
                    "Invalid metadata: must be a set of key-value pairs.");
        return -1;
    }
    if (json_object_size(v) > 50) {
        params_fail(err, 400, "parameter_invalid", "metadata",
                    "Invalid metadata: at most 50 keys are allowed.");
        return -1;
    }
    json_t *m = json_object();
    json_object_foreach(v, k, val)
    {
        char param[64];
        snprintf(param, sizeof(param), "metadata[%.40s]", k);
        if (strlen(k) > 40) {
            params_fail(err, 400, "parameter_invalid", "metadata",
                        "Invalid metadata: keys must be at most 40 characters.");
            goto fail;
        }
        if (json_is_integer(val)) {
            json_object_set_new(m, k,
                                json_sprintf("%" JSON_INTEGER_FORMAT, json_integer_value(val)));
            continue;
        }
        if (!json_is_string(val)) {
            params_fail(err, 400, "parameter_invalid", param,
                        "Invalid metadata: values must be strings.");
            goto fail;
        }
        if (json_string_length(val) > 500) {
            params_fail(err, 400, "parameter_invalid", param,
                        "Invalid metadata: values must be at most 500 characters.");
            goto fail;
        }
        json_object_set_new(m, k, json_string_length(val) ? json_copy(val) : json_null());
    }
    *out = m;
    return 0;
fail:
    json_decref(m);
    return -1;
}

/* A number is text a client typed too: 4242424242424242 sent as a JSON
 * integer would become a metadata string. A real that holds a whole number
 * (4242424242424242.0) is read the same way, within int64's range so that
 * the conversion is defined; past 2^53 a double may already have lost
 * digits the client sent, and only what it still holds can be checked. */
static bool
params_number_has_card(const json_t *v)
{
    char text[32];
    if (json_is_integer(v)) {
        snprintf(text, sizeof(text), "%" JSON_INTEGER_FORMAT, json_integer_value(v));
    } else {
        double d = json_real_value(v);
        if (!(d > -9e18 && d < 9e18) || d != (double)(int64_t)d)
            return false;
        snprintf(text, sizeof(text), "%" PRId64, (int64_t)d);
    }
    return redact_has_card(text, strlen(text));
}

/* Appends "[seg]" (or "seg" at the top) to the name in param[0..len);
 * a name too long for the buffer is cut, which only shortens it. */
static size_t
params_name_push(char *param, size_t size, size_t len, const char *seg)
{
    int n = snprintf(param + len, size - len, len ? "[%s]" : "%s", seg);
    return n < 0 || (size_t)n >= size - len ? size - 1 : len + (size_t)n;
}

/* Walks v, whose own name is param[0..len), depth first in the order the
 * client sent it; on a hit, param holds the name and true is returned. */
static bool
params_card_walk(const json_t *v, char *param, size_t size, size_t len)
{
    if (json_is_string(v))
        return redact_has_card(json_string_value(v), json_string_length(v));
    if (json_is_number(v))
        return params_number_has_card(v);
    if (json_is_object(v)) {
        const char *k;
        json_t *c;
        json_object_foreach((json_t *)v, k, c)
        {
            if (redact_has_card(k, strlen(k))) {
                param[len] = '\0'; /* named by the object that holds the key */
                return true;
            }
            if (params_card_walk(c, param, size, params_name_push(param, size, len, k)))
                return true;
            param[len] = '\0';
        }
    } else if (json_is_array(v)) {
        size_t i;
        json_t *c;
        json_array_foreach(v, i, c)
        {
            char idx[24];
            snprintf(idx, sizeof(idx), "%zu", i);
            if (params_card_walk(c, param, size, params_name_push(param, size, len, idx)))
                return true;
            param[len] = '\0';
        }
    }
    return false;
}

bool
params_find_card(const json_t *params, struct params_error *err)
{
    char param[sizeof(err->param)] = "";
    if (!params_card_walk(params, param, sizeof(param), 0))
        return false;
    params_card_fail(err, param);
    return true;
}

char *
params_canonical(const json_t *params)
{
    return json_dumps(params, JSON_COMPACT | JSON_SORT_KEYS);
}
