// fuzz_safetensors.c — the safetensors reader: header, tensor table, dtype conversions
// (nm_safetensors_parse), the same bytes as a model's model.safetensors next to a fixed tiny
// config.json (nm_model_load: names, shapes, dtypes against the config), and as a checkpoint
// file (nm_tensor_file_metadata).
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_util.h"
#include "nm_model.h"
#include "nm_safetensors.h"
#include "nm_tensor_file.h"

// The model of tests/fuzz/corpus/safetensors/tiny-model-*.safetensors.
static const char *TINY_CONFIG =
    "{ \"model_type\": \"nullmap-moe\", \"format_version\": 1, \"hidden_size\": 8, \"num_layers\": 1,\n"
    "  \"num_heads\": 1, \"num_kv_heads\": 1, \"head_dim\": 8, \"vocab_size\": 261, \"max_positions\": 64,\n"
    "  \"tie_embeddings\": true,\n"
    "  \"moe\": { \"num_experts\": 2, \"null_copies\": 2, \"top_k\": 2, \"expert_hidden\": 4 },\n"
    "  \"tokenizer\": { \"type\": \"byte\", \"bos\": 256, \"eos\": 257 } }\n";

#define MAX_CONVERT 65536 // elements converted per tensor (all of them in any small input)

static void convert_all(const nm_safetensors *st) {
    float *f = malloc(MAX_CONVERT * sizeof *f);
    int32_t *i32 = malloc(MAX_CONVERT * sizeof *i32);
    nm_error err;
    for (int i = 0; f && i32 && i < st->n_tensors; i++) {
        const nm_st_tensor *t = &st->tensors[i];
        if (nm_safetensors_find(st, t->name) == NULL) abort();
        if (t->numel > MAX_CONVERT) continue;
        if (t->data + t->nbytes > st->data + st->data_size) abort(); // the parser's promise
        if (nm_st_tensor_to_f32(f, t, &err) != NM_OK) (void)nm_st_tensor_to_i32(i32, t, &err);
    }
    free(f);
    free(i32);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static const char *dir;
    if (!dir) {
        fuzz_limit("safetensors_header_bytes=1M");
        dir = fuzz_tmp_dir();
        fuzz_write(dir, "config.json", TINY_CONFIG, strlen(TINY_CONFIG));
    }
    nm_safetensors st;
    nm_error err;
    if (nm_safetensors_parse(&st, data, size, "fuzz.safetensors", &err) != NM_OK) return 0;
    convert_all(&st);
    nm_safetensors_close(&st);
    // The file readers below parse the same way first (nm_safetensors_open), so only a file
    // that parses reaches their own checks: writing the others out would only cost time.
    fuzz_write(dir, "model.safetensors", data, size);
    nm_model m;
    if (nm_model_load(&m, dir, &err) == NM_OK) nm_model_free(&m);
    char path[600];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    char *meta = NULL;
    if (nm_tensor_file_metadata(path, &meta, &err) == NM_OK) free(meta);
    return 0;
}
