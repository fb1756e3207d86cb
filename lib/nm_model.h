// nm_model.h — model weights (DESIGN.md §3): load, validate, save, seeded random init.
//
// All weights are held as float32 (F16/BF16 files are converted exactly at load time).
// Row-major, nn.Linear convention: a weight is (out, in).
#ifndef NM_MODEL_H
#define NM_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "nm_config.h"
#include "nm_error.h"
#include "nm_safetensors.h"

// Models over nm_limit(NM_LIMIT_MODEL_PARAMS) float parameters (nm_limits.h; default 2^32,
// 16 GiB) are refused before allocating.

typedef struct {
    float *router;  // (N+1, D)  row N is the null logit
    float *gate;    // (N, H, D)
    float *up;      // (N, H, D)
    float *down;    // (N, D, H)
    float *sh_gate; // (Hs, D)   NULL when Hs = 0
    float *sh_up;   // (Hs, D)
    float *sh_down; // (D, Hs)
} nm_moe_weights;

typedef struct {
    float *attn_norm; // (D)
    float *wq;        // (nh*hd, D)
    float *wk;        // (nkv*hd, D)
    float *wv;        // (nkv*hd, D)
    float *wo;        // (D, nh*hd)
    float *moe_norm;  // (D)
    nm_moe_weights moe;
} nm_layer_weights;

typedef struct {
    nm_config cfg;
    float *embed;     // (V, D)
    float *patch_w;   // (D, 3*p*p)   NULL for text-only models
    float *patch_b;   // (D)
    float *pos_embed; // (grid*grid, D)
    nm_layer_weights *layers; // [L]
    float *norm;      // (D)
    float *lm_head;   // (V, D); equals embed when tie_embeddings
    float *arena;     // one allocation holding every weight
    size_t n_params;  // parameters (the arena also holds padding: each tensor starts 64-byte aligned)
    size_t arena_len; // floats in the arena, padding included (padding is zero)
    nm_dtype file_dtype; // dtype of the loaded file (F32 for a fresh init)
} nm_model;

// Loads DIR/config.json and DIR/model.safetensors. Every tensor is checked: missing,
// unexpected, misshapen or non-float tensors are all listed in one message.
nm_status nm_model_load(nm_model *m, const char *dir, nm_error *err);
// Allocates and fills a seeded random model (deterministic for a seed on every machine).
nm_status nm_model_init_random(nm_model *m, const nm_config *cfg, uint64_t seed, nm_error *err);
// Allocates a model with every weight (and the padding) zero: gradient and optimizer buffers.
nm_status nm_model_init_zero(nm_model *m, const nm_config *cfg, nm_error *err);
// Writes DIR/config.json and DIR/model.safetensors (each atomically) in dtype F32/F16/BF16.
// Creates DIR if needed.
nm_status nm_model_save(const nm_model *m, const char *dir, nm_dtype dtype, nm_error *err);
void nm_model_free(nm_model *m);

// The tensor table of a config: name, shape and where it lives in the model.
typedef struct {
    char name[96];
    int ndim;
    int64_t shape[3];
    size_t numel;
    float **dest; // address of the model's pointer for this tensor
    enum { NM_INIT_ONE, NM_INIT_ZERO, NM_INIT_NORMAL } init;
    float std;    // for NM_INIT_NORMAL
} nm_tensor_spec;

// Fills specs (may be NULL to count) and returns the number of tensors of the model.
int nm_model_tensor_specs(nm_model *m, nm_tensor_spec *specs);

#endif
