/*
 * redact - the last line of defence for card data and secrets.
 *
 * Offers redact() and redact_has_card(). Code never logs request values on
 * purpose, but a client may put a card number in any field (an id in a URL,
 * an unknown parameter's name, an Idempotency-Key), and messages sometimes
 * quote such things. Every log line and every error message passes through
 * redact(), which masks card numbers (Luhn-valid runs of 13 to 19 digits,
 * also written in groups) and tokens shaped like API keys, webhook secrets
 * and JWTs. It keeps the text's length, so it works in place on any buffer.
 * redact_has_card() asks the same question of a buffer without changing it,
 * so that a caller can refuse a card number before anything stores it; both
 * use one scanner, so what is refused and what is masked cannot drift
 * apart. Calls libc only.
 */
#include "redact.h"

#include <ctype.h>
#include <string.h>

static bool
redact_luhn(const int *d, int n)
{
    int sum = 0;
    for (int i = 0; i < n; i++) {
        int v = d[n - 1 - i];
        if (i % 2 == 1) {
            v *= 2;
            if (v > 9)
                v -= 9;
        }
        sum += v;
    }
    return sum % 10 == 0;
}

/* The one card scanner, behind both redact() and redact_has_card(): finds
 * the first card number in [s, s+len) that starts at or after from, and
 * sets [*start, *end) to it. A card number is a whole word of 13 to 19
 * digits, possibly in groups split by single ' ' or '-', that passes the
 * Luhn check. A run that is not one is skipped as a whole, so a longer
 * number never yields a card from its tail. */
static bool
redact_find_card(const char *s, size_t len, size_t from, size_t *start, size_t *end)
{
    for (size_t i = from; i < len;) {
        if (!isdigit((unsigned char)s[i]) || (i > 0 && isalnum((unsigned char)s[i - 1]))) {
            i++;
            continue;
        }
        int digits[20], n = 0;
        size_t j = i, stop = i;
        while (j < len) {
            if (isdigit((unsigned char)s[j])) {
                if (n < 20)
                    digits[n] = s[j] - '0';
                n++;
                stop = ++j;
            } else if ((s[j] == ' ' || s[j] == '-') && j + 1 < len &&
                       isdigit((unsigned char)s[j + 1])) {
                j++;
            } else {
                break;
            }
        }
        bool word_end = stop >= len || !isalnum((unsigned char)s[stop]);
        if (n >= 13 && n <= 19 && word_end && redact_luhn(digits, n)) {
            *start = i;
            *end = stop;
            return true;
        }
        i = stop;
    }
    return false;
}

bool
redact_has_card(const char *s, size_t len)
{
    size_t start, end;
    return redact_find_card(s, len, 0, &start, &end);
}

/* Masks every card number's digits, keeping its separators. */
static bool
redact_cards(char *s)
{
    bool any = false;
    size_t len = strlen(s), start, end;
    for (size_t from = 0; redact_find_card(s, len, from, &start, &end); from = end) {
        for (size_t k = start; k < end; k++)
            if (isdigit((unsigned char)s[k]))
                s[k] = '*';
        any = true;
    }
    return any;
}

static bool
redact_token_char(char c)
{
    return isalnum((unsigned char)c) || c == '_' || c == '-' || c == '.';
}

/* Masks the rest of every token that starts with one of the prefixes. */
static bool
redact_tokens(char *s)
{
    static const char *const prefixes[] = {"sk_live_", "sk_test_", "rk_live_", "rk_test_",
                                           "whsec_",   "eyJ",      NULL};
    bool any = false;
    for (char *p = s; *p; p++) {
        if (p > s && redact_token_char(p[-1]))
            continue;
        for (const char *const *pre = prefixes; *pre; pre++) {
            size_t n = strlen(*pre);
            if (strncmp(p, *pre, n) != 0)
                continue;
            char *q = p + n;
            while (redact_token_char(*q))
                *q++ = '*';
            if (q - p > (long)n) {
                any = true;
                p = q - 1;
            }
            break;
        }
    }
    return any;
}

bool
redact(char *s)
{
    bool a = redact_cards(s);
    bool b = redact_tokens(s);
    return a || b;
}

void
text_copy(char *dst, size_t cap, const char *src)
{
    if (cap == 0)
        return;
    size_t n = strlen(src);
    if (n >= cap) {
        n = cap - 1;
        /* src[n] is the first byte left out: when it continues a
         * character, that character's first bytes go too. */
        while (n > 0 && ((unsigned char)src[n] & 0xc0) == 0x80)
            n--;
    }
    memcpy(dst, src, n);
    dst[n] = '\0';
}
