// nm_train_moe.h — the null-expert MoE layer for training (DESIGN.md §2): a forward that keeps
// what the backward needs, the backward, and the auxiliary losses L_bal and L_z.
//
// Like nm_train_ops.h, everything exists in two precisions from one source: `_f64` (the
// reference the gradient checks run on) and `_f32` (what training runs).
//
// Semantics (exactly DESIGN.md §2; the same selection as moe_route_null in nm_moe.h):
//   z = y Wr^T (T, N+1); expanded logits N reals + M copies of z_N; p = softmax over N+M;
//   S = top-K slots by expanded logit, ties to the lower slot (a real beats a null copy);
//   zero kind: gates g = softmax of the selected *real* logits; out = sum_{i in R} g_i E_i(y)
//   (+ shared expert E_s(y)); n_real = 0 gives a routed output of 0.
//   copy kind: gates renormalised over all K selected slots; each selected null copy adds g * y.
// The top-K selection is piecewise constant: gradients flow through the gates (and through the
// softmax p inside L_bal and L_z), never through which slots were picked.
//
// Losses (global over the T tokens of one call — the trainer passes the whole batch at once):
//   L_bal = (N+M) sum_{i<N+M} f_i P_i   f_i = share of the T*K selections in slot i (no gradient),
//                                        P_i = mean over tokens of p_i; each null copy is a slot.
//   L_z   = (1/T) sum_t (logsumexp_i z~_{t,i})^2
// The backward adds w_bal * dL_bal and w_z * dL_z to the router's gradient (and to dy).
//
// Gradient rule (as nm_train_ops.h): parameter gradients are accumulated (+=), dy is written (=).
// Deterministic: the same inputs give bit-identical outputs and gradients whatever the thread
// count's schedule (fixed summation orders; no float atomics).
#ifndef NM_TRAIN_MOE_H
#define NM_TRAIN_MOE_H

#include <stddef.h>
#include <stdint.h>

#include "nm_config.h"
#include "nm_error.h"

#define NM_TRAIN_MOE_DECLARE(R, S)                                                                                \
    /* One layer's MoE parameters (or their gradients), laid out as in the model file. */                       \
    typedef struct {                                                                                             \
        R *router;          /* (N+1, D)  row N = the null logit */                                               \
        R *gate, *up;       /* (N, H, D) */                                                                      \
        R *down;            /* (N, D, H) */                                                                      \
        R *sh_gate, *sh_up; /* (Hs, D); NULL when Hs = 0 */                                                      \
        R *sh_down;         /* (D, Hs) */                                                                        \
    } nm_moe_params##S;                                                                                          \
                                                                                                                 \
    /* What one forward leaves for its backward. Zero-initialise; buffers grow and are reused; */                \
    /* free with nm_moe_cache_free. The routing fields use the trace's conventions (nm_moe.h). */                \
    typedef struct {                                                                                             \
        int T, K;                                                                                                \
        uint8_t *n_real;  /* [T]    real experts selected per token */                                           \
        int16_t *slot;    /* [T, K] expert id per selected slot by descending p; -1 = null copy */               \
        R *logits;        /* (T, N+1) router logits */                                                           \
        R *prob;          /* (T, K) p of each selected slot */                                                   \
        R *gate;          /* (T, K) gate of each selected slot (zero kind: 0 for null slots) */                  \
        R *lse;           /* [T] logsumexp of the expanded logits */                                             \
        double l_bal, l_z;   /* the two losses of this forward */                                                \
        long real_slots;     /* selected real slots, summed over tokens */                                       \
        void *priv;          /* everything else (per-slot activations, sort order, scratch) */                   \
        size_t priv_bytes;                                                                                       \
    } nm_moe_cache##S;                                                                                           \
                                                                                                                 \
    /* out: (T, D) (=)  y: (T, D), normalised input. Fails only for out of memory. */                           \
    nm_status nm_moe_train_forward##S(R *out, nm_moe_cache##S *c, const R *y, const nm_moe_params##S *w,        \
                                      const nm_moe_config *mc, int T, int D, nm_error *err);                     \
    /* dy (=) from dout (T, D) through the experts, the gates and the router, plus w_bal dL_bal and */           \
    /* w_z dL_z through the router; dw (+=). c, y, w: as given to the forward. */                                \
    void nm_moe_train_backward##S(R *dy, nm_moe_params##S *dw, const R *dout, double w_bal, double w_z,        \
                                  const nm_moe_cache##S *c, const R *y, const nm_moe_params##S *w,              \
                                  const nm_moe_config *mc, int T, int D);                                        \
    void nm_moe_cache_free##S(nm_moe_cache##S *c);

NM_TRAIN_MOE_DECLARE(double, _f64)
NM_TRAIN_MOE_DECLARE(float, _f32)

#endif
