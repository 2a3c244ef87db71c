/*
 * fuzz_params - libFuzzer targets for the request body readers: the form
 * decoder (FUZZ_FORM) or the JSON body reader. Any bytes must parse to a
 * parameter object or a params_error, never a crash, a leak or unbounded
 * work; a parsed object is read back through the typed getters.
 */
#include <stdint.h>
#include <stdlib.h>

#include "params.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct params_error err;
#ifdef FUZZ_FORM
    json_t *p = params_parse_form((const char *)data, size, &err);
#else
    json_t *p = params_parse_json((const char *)data, size, &err);
#endif
    if (p) {
        static const char *const allowed[] = {"amount", "currency", "metadata", "expand", NULL};
        const char *s;
        int64_t iv;
        bool bv;
        json_t *md = NULL;
        bool clear = false;
        params_only(p, allowed, &err);
        params_str(p, "currency", 3, &s, &err);
        params_int(p, "amount", &iv, &err);
        params_bool(p, "confirm", &bv, &err);
        if (params_metadata(p, &md, &clear, &err) == 0)
            json_decref(md);
        free(params_canonical(p));
        json_decref(p);
    }
    return 0;
}
