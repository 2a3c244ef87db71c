/* money: ISO 4217 currencies and amount checks; see money.c. */
#ifndef PAYMENTD_MONEY_H
#define PAYMENTD_MONEY_H

#include <stdbool.h>
#include <stdint.h>

/* Largest amount in minor units accepted for any currency (Stripe's limit). */
#define MONEY_MAX_AMOUNT 99999999LL

/* Exponent (0, 2 or 3) of a lowercase ISO 4217 code, or -1 when unknown. */
int money_exponent(const char *currency);
bool money_amount_valid(int64_t amount);

#endif
