/*
 * log - structured logging, one JSON object per line on stderr.
 *
 * Offers log_init(), log_msg() and the log_* macros, log_fatal(), and the
 * per-request context setters log_set_request_id()/log_set_payment_id().
 * Every line carries time (UTC, milliseconds), level, role, index, pid and
 * msg. A line is assembled in a stack buffer and written with one write(2),
 * so lines from the processes sharing stderr never interleave; a message
 * longer than the buffer is truncated, never split. Callers must not pass
 * secrets or card data: this module cannot know what a string contains.
 * Calls only libc.
 */
#include "log.h"
#include "redact.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static const char *log_role = "paymentd";
static int log_index = 0;
static enum log_level log_min = LOG_INFO;
static char log_request_id[64];
static char log_payment_id[64];

static const char *const log_level_names[] = {"debug", "info", "warn", "error", "fatal"};

void
log_init(const char *role, int index)
{
    log_role = role;
    log_index = index;
}

void
log_set_level(enum log_level level)
{
    log_min = level;
}

int
log_parse_level(const char *name, enum log_level *out)
{
    for (int i = LOG_DEBUG; i <= LOG_ERROR; i++) {
        if (strcmp(name, log_level_names[i]) == 0) {
            *out = (enum log_level)i;
            return 0;
        }
    }
    return -1;
}

static void
log_set_field(char *dst, size_t cap, const char *value)
{
    if (!value) {
        dst[0] = '\0';
        return;
    }
    snprintf(dst, cap, "%s", value);
    redact(dst);
}

void
log_set_request_id(const char *request_id)
{
    log_set_field(log_request_id, sizeof(log_request_id), request_id);
}

void
log_set_payment_id(const char *payment_id)
{
    log_set_field(log_payment_id, sizeof(log_payment_id), payment_id);
}

size_t
log_json_escape(char *buf, size_t cap, const char *s)
{
    static const char hex[] = "0123456789abcdef";
    size_t n = 0;
    if (cap == 0)
        return 0;
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        char esc[7];
        size_t len;
        if (c == '"' || c == '\\') {
            esc[0] = '\\';
            esc[1] = (char)c;
            len = 2;
        } else if (c == '\n') {
            memcpy(esc, "\\n", 2);
            len = 2;
        } else if (c == '\t') {
            memcpy(esc, "\\t", 2);
            len = 2;
        } else if (c < 0x20 || c == 0x7f) {
            memcpy(esc, "\\u00", 4);
            esc[4] = hex[c >> 4];
            esc[5] = hex[c & 15];
            len = 6;
        } else {
            esc[0] = (char)c;
            len = 1;
        }
        if (n + len >= cap)
            break;
        memcpy(buf + n, esc, len);
        n += len;
    }
    buf[n] = '\0';
    return n;
}

static void
log_vwrite(enum log_level level, const char *fmt, va_list ap)
{
    char msg[2048];
    char line[4096];
    struct timespec ts;
    struct tm tm;
    size_t n;

    vsnprintf(msg, sizeof(msg), fmt, ap);
    redact(msg);
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    n = (size_t)snprintf(line, sizeof(line),
                         "{\"time\":\"%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ\",\"level\":\"%s\","
                         "\"role\":\"%s\",\"index\":%d,\"pid\":%ld",
                         tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
                         tm.tm_sec, ts.tv_nsec / 1000000, log_level_names[level], log_role,
                         log_index, (long)getpid());
    if (log_request_id[0]) {
        n += (size_t)snprintf(line + n, sizeof(line) - n, ",\"request_id\":\"");
        n += log_json_escape(line + n, sizeof(line) - n, log_request_id);
        n += (size_t)snprintf(line + n, sizeof(line) - n, "\"");
    }
    if (log_payment_id[0]) {
        n += (size_t)snprintf(line + n, sizeof(line) - n, ",\"payment_id\":\"");
        n += log_json_escape(line + n, sizeof(line) - n, log_payment_id);
        n += (size_t)snprintf(line + n, sizeof(line) - n, "\"");
    }
    n += (size_t)snprintf(line + n, sizeof(line) - n, ",\"msg\":\"");
    /* Keep room for the closing characters. */
    n += log_json_escape(line + n, sizeof(line) - n - 4, msg);
    memcpy(line + n, "\"}\n", 3);
    n += 3;
    ssize_t w = write(STDERR_FILENO, line, n);
    (void)w;
}

void
log_msg(enum log_level level, const char *fmt, ...)
{
    va_list ap;
    if (level < log_min)
        return;
    va_start(ap, fmt);
    log_vwrite(level, fmt, ap);
    va_end(ap);
}

void
log_fatal(int exit_code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    log_vwrite(LOG_FATAL, fmt, ap);
    va_end(ap);
    exit(exit_code);
}
