/*
 * fuzz_envelope - libFuzzer target for the envelope decoder: any bytes must
 * decode to an envelope or an error value, never a crash, a leak or an
 * oversize allocation; a decoded body is walked with the accessors.
 */
#include <stddef.h>
#include <stdint.h>

#include "envelope.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct envelope env;
    if (envelope_decode(&env, data, size) == ENV_OK) {
        char buf[64];
        int64_t iv;
        bool bv;
        envelope_get_str(env.body, "cmd", buf, sizeof(buf));
        envelope_get_str(env.body, "target", buf, sizeof(buf));
        envelope_get_int(env.body, "index", &iv);
        envelope_get_bool(env.body, "ok", &bv);
        envelope_get(env.body, "roles");
    }
    envelope_free(&env);
    return 0;
}
