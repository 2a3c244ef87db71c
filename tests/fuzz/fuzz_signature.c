/*
 * fuzz_signature - libFuzzer target for the gateway callback signature
 * header: any header text must parse or be refused, and a parsed one
 * verifies or not, never a crash or a leak.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "signature.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *header = malloc(size + 1);
    memcpy(header, data, size);
    header[size] = '\0';
    struct sig_header h;
    if (sig_parse(header, &h) == 0)
        sig_verify(&h, "secret-one-0123456789|secret-two-0123456789", header, size, h.t, 300);
    free(header);
    return 0;
}
