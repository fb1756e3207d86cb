// nm_optim.h — the optimizer of the trainer: AdamW (PyTorch's algorithm), the WSD learning-rate
// schedule, the global gradient norm for clipping, and which tensors get weight decay.
//
// One training step, for parameters split into tensors p_i with gradients g_i:
//   norm  = sqrt(sum_i nm_grad_sumsq(g_i))          (or nm_grad_norm on one flat buffer)
//   if !isfinite(norm): skip the step (a NaN/Inf gradient must not reach the weights)
//   scale = nm_clip_scale(norm, c.grad_clip)         (1 when clipping is off or not needed)
//   lr    = nm_wsd_lr(&c, step)
//   for each i: nm_adamw_update(p_i, g_i, m_i, v_i, n_i, step, lr, scale,
//                               nm_param_decays(name_i), &c)
//   step++
// m and v (the moment estimates, float32 like the parameters) start at zero, and `step` is the
// number of updates done before this one; both belong in a checkpoint (nm_tensor_file.h).
//
// Determinism: every function here gives bit-identical results whatever the number of OpenMP
// threads (fixed chunking, partial sums combined in a fixed order, elementwise updates).
#ifndef NM_OPTIM_H
#define NM_OPTIM_H

#include <stddef.h>

#include "nm_error.h"

typedef struct {
    double lr;            // peak learning rate
    double beta1, beta2;  // moment decay rates (PyTorch's betas)
    double eps;           // added to sqrt(v_hat), as PyTorch
    double weight_decay;  // decoupled: p *= 1 - lr * weight_decay, for tensors that decay
    double grad_clip;     // largest global L2 norm of the gradient; 0 = no clipping
    long warmup_steps;    // linear warmup over this many steps (0 = none)
    long total_steps;     // length of the run; the decay ends at its last step
    double decay_frac;    // share of total_steps spent decaying at the end (WSD "D" phase)
    double final_lr_frac; // the learning rate at the end, as a fraction of lr
} nm_optim_config;

// Defaults: lr 1e-3, betas (0.9, 0.95), eps 1e-8, weight_decay 0.1, grad_clip 1.0,
// warmup_steps 0, total_steps 0 (the caller sets the run length), decay_frac 0.1,
// final_lr_frac 0.1.
void nm_optim_config_default(nm_optim_config *c);
// Checks ranges: lr > 0; 0 <= beta1, beta2 < 1; eps > 0; weight_decay >= 0 with
// lr * weight_decay < 1; grad_clip >= 0; warmup_steps >= 0; total_steps >= 1;
// decay_frac and final_lr_frac in [0, 1]; warmup and decay phases do not overlap.
// NM_ERR_INVALID with a message naming the field otherwise.
nm_status nm_optim_config_check(const nm_optim_config *c, nm_error *err);

// The WSD (warmup-stable-decay) schedule; step is 0-based. With W = warmup_steps,
// N = total_steps, Dn = nm_wsd_decay_steps(c) and S = N - Dn (the first decay step):
//   warmup factor  w(step) = (step + 1) / W   for step < W, else 1   (lr/W at step 0, lr at W-1)
//   decay factor   d(step) = 1                                          for step < S
//                          = 1 - (1 - final_lr_frac) * (step - S + 1) / Dn   for S <= step < N
//                          = final_lr_frac                              for step >= N
//   lr(step) = lr * min(w(step), d(step))
// So the last step of the run (N - 1) trains at exactly final_lr_frac * lr, and steps past the
// end stay there. Dn = 0 (decay_frac 0) means no decay. A negative step counts as step 0.
double nm_wsd_lr(const nm_optim_config *c, long step);
// Dn = round(decay_frac * total_steps), clamped to [0, total_steps].
long nm_wsd_decay_steps(const nm_optim_config *c);

// Sum of squares of g (n values), accumulated in double. Deterministic and parallel: the range
// is cut into a fixed number of chunks whose bounds depend on n only; each chunk is summed in
// a fixed order, and the chunk sums are added in chunk order.
double nm_grad_sumsq(const float *g, size_t n);
// sqrt(nm_grad_sumsq(g, n)): the L2 norm of g.
double nm_grad_norm(const float *g, size_t n);
// PyTorch's clip_grad_norm_ factor: min(1, max_norm / (norm + 1e-6)); 1 when max_norm <= 0.
// A non-finite norm gives 0 or NaN, as in PyTorch: check isfinite(norm) first.
double nm_clip_scale(double norm, double max_norm);

// One AdamW step on n elements, exactly PyTorch's torch.optim.AdamW (amsgrad off):
//   g'  = g * grad_scale                           (how clipping is applied)
//   m   = beta1 m + (1 - beta1) g'
//   v   = beta2 v + (1 - beta2) g'^2
//   p   = p * (1 - lr * weight_decay)              (only when decay != 0)
//   p  -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps),   t = step + 1
// p, m, v are updated in place (float32 storage; each element's arithmetic in double). lr is
// the step's learning rate (nm_wsd_lr); beta1, beta2, eps, weight_decay come from c.
// Elementwise and parallel over the elements, so the result does not depend on thread count.
void nm_adamw_update(float *p, const float *g, float *m, float *v, size_t n, long step, double lr,
                     double grad_scale, int decay, const nm_optim_config *c);

// Whether a model tensor (DESIGN.md §3 names) gets weight decay. The rule: 1-D scale and shift
// parameters do not — names ending in "norm.weight" (attn_norm, moe_norm, the final norm) or in
// ".bias" (vision.patch_embed.bias); every matrix, stacked expert tensor and embedding table does
// (embed_tokens, lm_head, the projections, the router, the experts, vision.pos_embed).
int nm_param_decays(const char *tensor_name);

#endif
