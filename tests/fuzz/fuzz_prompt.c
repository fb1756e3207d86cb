// fuzz_prompt.c — the prompt path: UTF-8 validation, the byte tokenizer and the sequence
// builder (nm_sequence_build), generated tokens (nm_sequence_push), display text of every
// token (nm_token_display) and the answer text (nm_sequence_answer).
// Input: byte 0 = flags (bit 0: with an image; bits 1-7: how many answer tokens to push),
// then the prompt (up to the first NUL, as a C string from the command line), then after the
// NUL the answer token ids as little-endian 16-bit values.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "nm_config.h"
#include "nm_tokenizer.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static nm_config cfg;
    if (!cfg.hidden_size) {
        nm_config_init_byte(&cfg);
        cfg.hidden_size = 8, cfg.num_layers = 1, cfg.num_heads = 1, cfg.num_kv_heads = 1, cfg.head_dim = 8;
        cfg.max_positions = 256, cfg.moe.num_experts = 2, cfg.moe.null_copies = 2, cfg.moe.top_k = 2;
        cfg.moe.expert_hidden = 4;
        cfg.has_vision = 1, cfg.image_size = 16, cfg.patch_size = 4, cfg.channels = 3;
    }
    if (size < 1) return 0;
    int with_image = data[0] & 1, n_answer = data[0] >> 1;
    size_t plen = strnlen((const char *)data + 1, size - 1);
    char *prompt = malloc(plen + 1);
    if (!prompt) return 0;
    memcpy(prompt, data + 1, plen);
    prompt[plen] = '\0';
    size_t bad = 0;
    (void)nm_utf8_valid(prompt, plen, &bad);
    nm_sequence seq;
    nm_error err;
    if (nm_sequence_build(&seq, &cfg, prompt, with_image, n_answer, &err) == NM_OK) {
        const uint8_t *ids = data + 1 + plen + 1;
        size_t n_ids = size > 2 + plen ? (size - 2 - plen) / 2 : 0;
        for (size_t i = 0; i < n_ids && (int)i < n_answer; i++) {
            int32_t id = (int32_t)(ids[2 * i] | ids[2 * i + 1] << 8) % cfg.vocab_size;
            if (nm_sequence_push(&seq, &cfg, id, &err) != NM_OK) break;
        }
        for (int i = 0; i < seq.n; i++) free(nm_token_display(&cfg, &seq, i));
        free(nm_sequence_answer(&cfg, &seq));
        nm_sequence_free(&seq);
    }
    free(prompt);
    return 0;
}
