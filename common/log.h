/* log: one JSON object per line on stderr; see log.c. */
#ifndef PAYMENTD_LOG_H
#define PAYMENTD_LOG_H

#include <stddef.h>

enum log_level { LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR, LOG_FATAL };

void log_init(const char *role, int index);
void log_set_level(enum log_level level);
int log_parse_level(const char *name, enum log_level *out);
void log_set_request_id(const char *request_id);
void log_set_payment_id(const char *payment_id);
void log_msg(enum log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define log_debug(...) log_msg(LOG_DEBUG, __VA_ARGS__)
#define log_info(...)  log_msg(LOG_INFO, __VA_ARGS__)
#define log_warn(...)  log_msg(LOG_WARN, __VA_ARGS__)
#define log_error(...) log_msg(LOG_ERROR, __VA_ARGS__)

/* Logs at fatal level and exits with the given code (2 = bad environment). */
void log_fatal(int exit_code, const char *fmt, ...) __attribute__((format(printf, 2, 3)))
__attribute__((noreturn));

/* Appends s to buf as a JSON string body (no quotes), escaping as needed.
 * Returns the number of bytes written, truncating at cap - 1. */
size_t log_json_escape(char *buf, size_t cap, const char *s);

#endif
