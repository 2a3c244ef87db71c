/*
 * httputil - helpers shared by the HTTP servers of the api and exporter
 * roles: JSON replies with the right headers, errors in Stripe's shape,
 * and a monotonic microsecond clock for latency histograms. Offers
 * http_reply_json(), http_error_body(), http_reply_error(), http_now_us(). Calls libevent,
 * jansson (for escaping error text), xmalloc.
 */
#include "httputil.h"
#include "redact.h"
#include "xmalloc.h"

#include <event2/buffer.h>
#include <event2/keyvalq_struct.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char *
http_reason(int code)
{
    switch (code) {
    case 200:
        return "OK";
    case 400:
        return "Bad Request";
    case 401:
        return "Unauthorized";
    case 402:
        return "Payment Required";
    case 404:
        return "Not Found";
    case 405:
        return "Method Not Allowed";
    case 409:
        return "Conflict";
    case 413:
        return "Payload Too Large";
    case 429:
        return "Too Many Requests";
    case 431:
        return "Request Header Fields Too Large";
    case 500:
        return "Internal Server Error";
    case 503:
        return "Service Unavailable";
    default:
        return "";
    }
}

void
http_reply_json(struct evhttp_request *req, int code, const char *json)
{
    struct evbuffer *buf = evbuffer_new();
    struct evkeyvalq *h = evhttp_request_get_output_headers(req);
    evhttp_add_header(h, "Content-Type", "application/json");
    evhttp_add_header(h, "Cache-Control", "no-cache, no-store");
    evbuffer_add(buf, json, strlen(json));
    evbuffer_add(buf, "\n", 1);
    evhttp_send_reply(req, code, http_reason(code), buf);
    evbuffer_free(buf);
}

char *
http_error_body(const char *type, const char *code, const char *message, const char *param)
{
    json_t *err = json_object();
    json_object_set_new(err, "type", json_string(type));
    if (code)
        json_object_set_new(err, "code", json_string(code));
    /* A message may quote what a client sent (an id, a parameter's name). */
    char *safe = xstrdup(message);
    redact(safe);
    json_object_set_new(err, "message", json_string(safe));
    free(safe);
    if (param && *param) {
        safe = xstrdup(param);
        redact(safe);
        json_object_set_new(err, "param", json_string(safe));
        free(safe);
    }
    json_t *root = json_pack("{s:o}", "error", err);
    char *text = json_dumps(root, JSON_COMPACT);
    json_decref(root);
    return text;
}

void
http_reply_error(struct evhttp_request *req, int status, const char *type, const char *code,
                 const char *message, const char *param)
{
    char *text = http_error_body(type, code, message, param);
    http_reply_json(req, status, text);
    free(text);
}

int64_t
http_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}
