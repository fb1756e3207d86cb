// nm_config.h — the model configuration (DESIGN.md §3, config.json).
#ifndef NM_CONFIG_H
#define NM_CONFIG_H

#include "nm_error.h"

typedef enum {
    NM_NULL_ZERO = 0, // a null slot outputs nothing (the paper's method, the default)
    NM_NULL_COPY = 1, // a null slot outputs its input y (MoE++ "copy" experts, paper appendix A.2)
} nm_null_kind;

typedef struct {
    int num_experts;          // N real experts
    int null_copies;          // M copies of the one null logit (0: plain token choice)
    int top_k;                // K slots per token, 1 <= K <= N+M
    int expert_hidden;        // H
    int shared_expert_hidden; // Hs (0: no shared expert)
    nm_null_kind null_kind;
} nm_moe_config;

typedef struct {
    int bos, eos, image_start, image_end, pad; // special token ids (>= 256, < vocab_size)
} nm_tokenizer_config;

typedef struct {
    int format_version;
    int hidden_size;  // D
    int num_layers;   // L
    int num_heads;    // nh
    int num_kv_heads; // nkv (divides nh)
    int head_dim;     // hd (even)
    int vocab_size;   // V (> every special id)
    int max_positions;
    double rope_theta;
    double rms_norm_eps;
    int tie_embeddings; // 1: lm_head is embed_tokens
    nm_moe_config moe;
    int has_vision;     // 0: text-only model ("vision" absent)
    int image_size;     // S (multiple of patch_size)
    int patch_size;     // p
    int channels;       // must be 3
    nm_tokenizer_config tok;
} nm_config;

// Upper bounds that keep every size computation far from overflow. A config beyond them
// is rejected with NM_ERR_LIMIT (documented in README.md).
#define NM_MAX_DIM 65536        // hidden_size, head_dim, expert hidden sizes
#define NM_MAX_LAYERS 1024
#define NM_MAX_HEADS 1024
#define NM_MAX_EXPERTS 4096     // N and M each
#define NM_MAX_VOCAB (1 << 22)
#define NM_MAX_POSITIONS (1 << 20)

// A config built in code (tests, benches): zeroes *c and sets the parts every nullmap model
// shares — format_version 1, rope_theta 10000, rms_norm_eps 1e-6, the byte tokenizer (vocab 261,
// specials 256..260), zero null experts, untied head, text-only. The caller sets the shape.
void nm_config_init_byte(nm_config *c);

// Parses and validates config.json (through jansson). `path` is used in messages.
nm_status nm_config_load(nm_config *cfg, const char *path, nm_error *err);
nm_status nm_config_parse(nm_config *cfg, const char *json_text, const char *path, nm_error *err);
// Checks ranges and consistency (K <= N+M, nh % nkv == 0, special ids < V, …).
nm_status nm_config_validate(const nm_config *cfg, const char *path, nm_error *err);
// Writes config.json text (caller frees). NULL on allocation failure.
char *nm_config_to_json(const nm_config *cfg);

// Derived sizes.
static inline double nm_config_rho(const nm_config *c) {
    return (double)c->moe.num_experts / (double)(c->moe.num_experts + c->moe.null_copies);
}
static inline int nm_config_grid(const nm_config *c) { return c->has_vision ? c->image_size / c->patch_size : 0; }
static inline int nm_config_num_patches(const nm_config *c) { return nm_config_grid(c) * nm_config_grid(c); }

#endif
