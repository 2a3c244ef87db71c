/*
 * fuzz_authorization - libFuzzer target for the Authorization header
 * reader: Bearer and Basic credentials, and JWTs through the HS256-only
 * check, never a crash or a leak, whatever the bytes.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "authz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *header = malloc(size + 1);
    memcpy(header, data, size);
    header[size] = '\0';
    char out[4096], account[64];
    enum authz_kind kind;
    if (authz_parse(header, out, sizeof(out), &kind) == 0 && kind == AUTHZ_JWT) {
        struct authz_jwt_policy p = {"0123456789abcdef0123456789abcdef", "issuer", "aud", "sub"};
        const char *why;
        authz_jwt_verify(out, &p, 1700000000, account, sizeof(account), &why);
    }
    free(header);
    return 0;
}
