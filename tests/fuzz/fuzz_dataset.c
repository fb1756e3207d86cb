// fuzz_dataset.c — the trainer's data-set reader: DIR/train.jsonl and DIR/info.json
// (nm_dataset_load), then each text-only record as a training sample (nm_sample_build).
// Input: the JSONL text, optionally followed by "\n--- info.json ---\n" and info.json's text.
#include <stdint.h>
#include <string.h>

#include "fuzz_util.h"
#include "nm_config.h"
#include "nm_data.h"
#include "nm_sample.h"

#define SEPARATOR "\n--- info.json ---\n"
#define MAX_SAMPLES 8

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static nm_config cfg;
    if (!cfg.hidden_size) {
        nm_config_init_byte(&cfg);
        cfg.hidden_size = 8, cfg.num_layers = 1, cfg.num_heads = 1, cfg.num_kv_heads = 1, cfg.head_dim = 8;
        cfg.max_positions = 128, cfg.moe.num_experts = 2, cfg.moe.null_copies = 2, cfg.moe.top_k = 2;
        cfg.moe.expert_hidden = 4;
        fuzz_limit("data_line_bytes=64K");
        fuzz_limit("data_records=4096");
    }
    const char *dir = fuzz_tmp_dir();
    const uint8_t *sep = fuzz_find(data, size, SEPARATOR);
    size_t jsonl_size = sep ? (size_t)(sep - data) : size;
    fuzz_write(dir, "train.jsonl", data, jsonl_size);
    if (sep) {
        size_t off = jsonl_size + strlen(SEPARATOR);
        fuzz_write(dir, "info.json", data + off, size - off);
    } else {
        fuzz_remove(dir, "info.json");
    }
    nm_dataset d;
    nm_error err;
    if (nm_dataset_load(&d, dir, "train", &err) != NM_OK) return 0;
    for (int i = 0, built = 0; i < d.n && built < MAX_SAMPLES; i++) {
        if (d.rec[i].image) continue; // images are fuzzed by the png/jpeg harnesses
        nm_sample s;
        if (nm_sample_build(&s, &cfg, &d.rec[i], &err) == NM_OK) nm_sample_free(&s);
        built++;
    }
    nm_dataset_free(&d);
    return 0;
}
