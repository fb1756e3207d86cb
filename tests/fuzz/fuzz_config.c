// fuzz_config.c — config.json: parsing and validation (nm_config_parse), and for every config
// that passes, the JSON it writes back must parse to the same config.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "nm_config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *text = malloc(size + 1);
    if (!text) return 0;
    memcpy(text, data, size);
    text[size] = '\0'; // nm_config_load refuses NUL bytes; the text stops at the first one
    nm_config cfg;
    nm_error err;
    if (nm_config_parse(&cfg, text, "config.json", &err) == NM_OK) {
        char *again = nm_config_to_json(&cfg);
        if (again) {
            nm_config back;
            if (nm_config_parse(&back, again, "written", &err) != NM_OK) abort(); // a valid config must round-trip
            if (back.hidden_size != cfg.hidden_size || back.moe.top_k != cfg.moe.top_k ||
                back.has_vision != cfg.has_vision || back.tok.pad != cfg.tok.pad)
                abort();
            free(again);
        }
        volatile int np = nm_config_num_patches(&cfg);
        (void)np;
    }
    free(text);
    return 0;
}
