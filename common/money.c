/*
 * money - currencies and amounts. Amounts are integers in the currency's
 * minor unit everywhere in paymentd (never floating point); this module
 * knows which ISO 4217 currencies are accepted and their exponents (JPY 0,
 * USD 2, KWD 3) and the accepted amount range. Offers money_exponent() and
 * money_amount_valid(). Calls libc.
 */
#include "money.h"

#include <string.h>

static const struct {
    const char code[4];
    int exponent;
} money_currencies[] = {
    {"aed", 2}, {"ars", 2}, {"aud", 2}, {"bgn", 2}, {"bhd", 3}, {"brl", 2}, {"cad", 2}, {"chf", 2},
    {"clp", 0}, {"cny", 2}, {"cop", 2}, {"czk", 2}, {"dkk", 2}, {"egp", 2}, {"eur", 2}, {"gbp", 2},
    {"hkd", 2}, {"huf", 2}, {"idr", 2}, {"ils", 2}, {"inr", 2}, {"isk", 0}, {"jod", 3}, {"jpy", 0},
    {"kes", 2}, {"krw", 0}, {"kwd", 3}, {"mad", 2}, {"mxn", 2}, {"myr", 2}, {"ngn", 2}, {"nok", 2},
    {"nzd", 2}, {"omr", 3}, {"pen", 2}, {"php", 2}, {"pkr", 2}, {"pln", 2}, {"pyg", 0}, {"qar", 2},
    {"ron", 2}, {"rwf", 0}, {"sar", 2}, {"sek", 2}, {"sgd", 2}, {"thb", 2}, {"tnd", 3}, {"try", 2},
    {"twd", 2}, {"uah", 2}, {"ugx", 0}, {"usd", 2}, {"vnd", 0}, {"xaf", 0}, {"xof", 0}, {"zar", 2},
};

int
money_exponent(const char *currency)
{
    if (strlen(currency) != 3)
        return -1;
    for (size_t i = 0; i < sizeof(money_currencies) / sizeof(money_currencies[0]); i++) {
        if (memcmp(money_currencies[i].code, currency, 3) == 0)
            return money_currencies[i].exponent;
    }
    return -1;
}

bool
money_amount_valid(int64_t amount)
{
    return amount >= 1 && amount <= MONEY_MAX_AMOUNT;
}
