// nm_train_ops.h — the dense ops of the model with their backward passes, for training.
//
// Every op comes in two precisions built from one source (nm_ops_generic.h): `_f64` (double,
// the reference the gradient checks run on) and `_f32` (float, what training runs). Each
// forward is paired with its backward, named alike. Arguments: outputs first, then inputs,
// weights, sizes. Shapes are (rows, cols), row-major; T = tokens of one sequence.
//
// Gradient rule (as in llm.c): parameter gradients are accumulated (+=), activation gradients
// are written (=). What a backward needs from its forward (rstd, att, probs) is an explicit
// output of the forward. A gradient pointer documented "may be NULL" is skipped.
//
// The f32 forwards compute what the inference engine computes (nm_ops.c, nm_engine.c):
// RMSNorm accumulates the sum of squares in double, RoPE takes angles in double, softmax sums
// in double, attention scale is 1/sqrt(hd). The f32 matrix products go through cblas_sgemm,
// the f64 ones through cblas_dgemm.
//
// The MoE layer (router, experts, gates) and the losses L_bal, L_z: nm_train_moe.h.
#ifndef NM_TRAIN_OPS_H
#define NM_TRAIN_OPS_H

#include <stddef.h>
#include <stdint.h>

#define NM_TRAIN_OPS_DECLARE(R, S)                                                                                \
    /* out = x W^T (+ b).  x: (T, in)  W: (out_dim, in)  b: (out_dim) or NULL  out: (T, out_dim) */             \
    void nm_linear_forward##S(R *out, const R *x, const R *w, const R *b, int T, int in, int out_dim);          \
    /* dx = dout W (=; dx may be NULL)  dw += dout^T x  db += sum_t dout (db may be NULL) */                    \
    void nm_linear_backward##S(R *dx, R *dw, R *db, const R *dout, const R *x, const R *w, int T, int in,       \
                               int out_dim);                                                                     \
                                                                                                                 \
    /* out[t] = E[ids[t]] for ids[t] >= 0; rows with ids[t] < 0 (image patches) are left as they are. */       \
    /* ids: (T)  E: (V, D)  out: (T, D) */                                                                       \
    void nm_embedding_forward##S(R *out, const int32_t *ids, const R *E, int T, int D);                         \
    /* dE[ids[t]] += dout[t] for ids[t] >= 0. Also the backward of pos_embed with ids = patch index. */        \
    void nm_embedding_backward##S(R *dE, const R *dout, const int32_t *ids, int T, int D);                      \
                                                                                                                 \
    /* Patch pixels as rows, flattened (channel, row, col) as vision.patch_embed expects. */                   \
    /* pixels: (3, S, S)  patch_idx: (n) grid cells, row-major  rows: (n, 3*p*p). No backward (data). */        \
    void nm_patch_gather##S(R *rows, const R *pixels, const int32_t *patch_idx, int n, int S, int p);           \
                                                                                                                 \
    /* out = x / sqrt(mean(x^2) + eps) * w.  x, out: (T, D)  w: (D)  rstd: (T) saved for the backward. */      \
    void nm_rmsnorm_forward##S(R *out, R *rstd, const R *x, const R *w, int T, int D, double eps);              \
    /* dx (=), dw (+=).  dout, x, dx: (T, D)  rstd: (T) from the forward. */                                    \
    void nm_rmsnorm_backward##S(R *dx, R *dw, const R *dout, const R *x, const R *w, const R *rstd, int T,      \
                                int D);                                                                          \
                                                                                                                 \
    /* inv_freq[i] = theta^(-2i/hd), i < hd/2 (rounded to R, as the engine does). inv_freq: (hd/2) */          \
    void nm_rope_freqs##S(R *inv_freq, int hd, double theta);                                                   \
    /* Half-split rotary embedding: pairs (i, i + hd/2) of each head rotated by (pos0 + t) * inv_freq[i]. */   \
    /* x, out: (T, n_heads*hd); out may alias x. */                                                             \
    void nm_rope_forward##S(R *out, const R *x, int T, int n_heads, int hd, int pos0, const R *inv_freq);       \
    /* dx = dout rotated by the opposite angle (=). dx may alias dout. */                                       \
    void nm_rope_backward##S(R *dx, const R *dout, int T, int n_heads, int hd, int pos0, const R *inv_freq);    \
                                                                                                                 \
    /* out = silu(g) * u elementwise.  g, u, out: (n); out may alias g or u. */                                \
    void nm_swiglu_forward##S(R *out, const R *g, const R *u, size_t n);                                        \
    /* dg, du (=); they may alias dout. */                                                                       \
    void nm_swiglu_backward##S(R *dg, R *du, const R *dout, const R *g, const R *u, size_t n);                  \
                                                                                                                 \
    /* Causal GQA attention over one sequence, scale 1/sqrt(hd); query head h reads kv head */                 \
    /* h / (nh/nkv). q: (T, nh*hd)  k, v: (T, nkv*hd)  out: (T, nh*hd) */                                       \
    /* att: (nh, T, T) softmax probabilities, saved for the backward (zero above the diagonal). */             \
    void nm_attention_forward##S(R *out, R *att, const R *q, const R *k, const R *v, int T, int nh, int nkv,    \
                                 int hd);                                                                        \
    /* dq, dk, dv (=; dk, dv summed over the heads of a group). datt: (nh, T, T) scratch. */                   \
    void nm_attention_backward##S(R *dq, R *dk, R *dv, R *datt, const R *dout, const R *q, const R *k,         \
                                  const R *v, const R *att, int T, int nh, int nkv, int hd);                     \
                                                                                                                 \
    /* Mean cross-entropy over the tokens with targets[t] >= 0 (-1 = no loss; else < V). */                    \
    /* logits, probs: (T, V); probs = softmax(logits) of every row, saved for the backward. */                 \
    /* Returns the loss (0 when no token counts). */                                                             \
    double nm_crossentropy_forward##S(R *probs, const R *logits, const int32_t *targets, int T, int V);         \
    /* dlogits = dloss * (probs - onehot(target)) / n_counted on counted rows, 0 elsewhere (=). */             \
    void nm_crossentropy_backward##S(R *dlogits, const R *probs, const int32_t *targets, int T, int V,          \
                                     double dloss);

NM_TRAIN_OPS_DECLARE(double, _f64)
NM_TRAIN_OPS_DECLARE(float, _f32)

#endif
