/* redact: masks card numbers and secrets in text bound for logs and errors; see redact.c. */
#ifndef PAYMENTD_REDACT_H
#define PAYMENTD_REDACT_H

#include <stdbool.h>
#include <stddef.h>

/* Masks, in place and keeping the length, every card number (13 to 19
 * digits, optionally in groups split by single spaces or dashes, passing
 * the Luhn check) and every secret-looking token (sk_/rk_ API keys,
 * whsec_ signing secrets, JWTs) in s. Returns true when anything was masked. */
bool redact(char *s);

/* Says whether [s, s+len) holds a card number, by the same rule redact()
 * masks them; s need not be NUL-terminated. */
bool redact_has_card(const char *s, size_t len);

/* Copies src into dst (cap bytes, NUL included) without cutting a UTF-8
 * character in two: text from a gateway ends up in PostgreSQL, which
 * refuses a broken sequence, so an outcome could never be recorded. */
void text_copy(char *dst, size_t cap, const char *src);

#endif
