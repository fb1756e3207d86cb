// nm_train_model.h — the whole model's training forward and backward over a packed batch.
//
// A batch is B sequences (nm_sample.h) laid one after another: T tokens in all. Every
// token-wise op (embeddings, norms, projections, the MoE layer, the LM head) runs on all T
// rows at once; attention and RoPE run per sequence (positions restart at 0, no attention
// across sequences). The MoE layer sees the whole batch, so L_bal and L_z are global over it
// (DESIGN.md §2).
//
// Parameters live in one flat array laid out exactly like nm_model's arena (nm_param_layout):
// an nm_model's arena is a valid `params` for the f32 path, and gradients use the same layout.
// Both precisions come from one source (nm_train_model_generic.h): `_f64` for the whole-model
// gradient check, `_f32` for training.
//
// Loss = sum_t loss_w[t] * CE_t  +  w_bal * mean over layers of L_bal  +  w_z * mean over
// layers of L_z. The batch builder sets loss_w so that the CE part is a weighted mean
// (weights sum to 1); averaging the auxiliary losses over layers keeps their weights
// independent of depth.
#ifndef NM_TRAIN_MODEL_H
#define NM_TRAIN_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "nm_config.h"
#include "nm_error.h"
#include "nm_train_moe.h"

#define NM_NO_TENSOR ((size_t)-1)

// Where each tensor starts in the flat parameter array (floats; NM_NO_TENSOR when absent).
typedef struct {
    size_t attn_norm, wq, wk, wv, wo, moe_norm, router, gate, up, down, sh_gate, sh_up, sh_down;
} nm_layer_offsets;

typedef struct {
    nm_config cfg;
    size_t len; // floats, padding included (as nm_model.arena_len)
    size_t embed, patch_w, patch_b, pos_embed, norm, lm_head; // lm_head == embed when tied
    nm_layer_offsets *layer; // [L]
} nm_param_layout;

nm_status nm_param_layout_init(nm_param_layout *pl, const nm_config *cfg, nm_error *err);
void nm_param_layout_free(nm_param_layout *pl);

// What a forward measured (f32 and f64 alike).
typedef struct {
    double loss, ce, l_bal, l_z;     // l_bal, l_z: means over layers
    double ce_answer, ce_prompt;     // unweighted mean CE of answer / prompt targets (0 when none)
    long n_answer, n_prompt;         // targets counted
    long tokens, slots, real_slots;  // slots = tokens * K * layers
    long zero_compute, token_layers; // (token, layer) pairs with n_real = 0, and all of them
    double real_vision, real_text;   // sums of n_real / K over (token, layer) of each modality
    long vision, text;               // (token, layer) pairs of each modality
} nm_train_stats;

#define NM_TRAIN_MODEL_DECLARE(R, S)                                                                              \
    typedef struct {                                                                                             \
        int B, T;                 /* sequences, tokens */                                                        \
        int cap_B, cap_T, cap_patch;                                                                             \
        int *start;               /* [B+1] first token of each sequence; start[B] = T */                        \
        int32_t *id;              /* [T] token id; -1 = image patch */                                           \
        int32_t *patch;           /* [T] grid cell of a patch token, -1 otherwise */                             \
        int32_t *target;          /* [T] id of the next token, -1 = no loss */                                   \
        R *loss_w;                /* [T] weight of the target in the loss; 0 where target = -1 */                \
        uint8_t *loss_kind;       /* [T] NM_LOSS_* (statistics) */                                               \
        uint8_t *modality;        /* [T] NM_MOD_* (statistics) */                                                \
        int n_patch;              /* patch tokens in the batch */                                                \
        R *patch_rows;            /* (n_patch, 3*p*p) each patch token's pixels, in token order */               \
    } nm_train_batch##S;                                                                                         \
                                                                                                                 \
    /* Activations kept by the forward for the backward; zero-initialise, grows, reused. */                     \
    typedef struct {                                                                                             \
        void *priv;                                                                                              \
    } nm_train_acts##S;                                                                                          \
                                                                                                                 \
    /* Grows the batch to hold B sequences, T tokens, n_patch patches (p: patch size). */                        \
    nm_status nm_train_batch_reserve##S(nm_train_batch##S *b, int B, int T, int n_patch, int p, nm_error *err);  \
    void nm_train_batch_free##S(nm_train_batch##S *b);                                                           \
                                                                                                                 \
    /* Forward of the whole batch; fills st. params: pl->len floats. */                                          \
    nm_status nm_train_forward##S(nm_train_acts##S *a, nm_train_stats *st, const R *params,                     \
                                  const nm_param_layout *pl, const nm_train_batch##S *b, double w_bal,          \
                                  double w_z, nm_error *err);                                                    \
    /* Backward of the last forward (same a, params, b): grads (+=) of the total loss. */                       \
    nm_status nm_train_backward##S(nm_train_acts##S *a, R *grads, const R *params, const nm_param_layout *pl,  \
                                   const nm_train_batch##S *b, double w_bal, double w_z, nm_error *err);         \
    /* The logits of the loss rows of the last forward: (n, V) and their token indices. A backward */           \
    /* reuses the buffer for dlogits: read them before calling it. */                                           \
    const R *nm_train_logits##S(const nm_train_acts##S *a, int *n, const int32_t **rows);                        \
    /* Layer l's MoE routing of the last forward (n_real, slot, gates...); NULL before any forward. */          \
    const nm_moe_cache##S *nm_train_moe_cache##S(const nm_train_acts##S *a, int l);                              \
    void nm_train_acts_free##S(nm_train_acts##S *a);

NM_TRAIN_MODEL_DECLARE(double, _f64)
NM_TRAIN_MODEL_DECLARE(float, _f32)

#endif
