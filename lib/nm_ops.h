// nm_ops.h — the dense ops of the forward pass (CPU, float32, OpenBLAS).
// Shapes are written (rows, cols), row-major. Backward passes join these when training lands.
#ifndef NM_OPS_H
#define NM_OPS_H

#include <stddef.h>

// out = x W^T.   x: (T, in)  W: (out_dim, in)  out: (T, out_dim). beta = 1 accumulates.
void nm_matmul_forward(float *out, const float *x, const float *w, int T, int in, int out_dim, float beta);

// out = x / sqrt(mean(x^2) + eps) * w.   x, out: (T, D)  w: (D). out may alias x.
void nm_rmsnorm_forward(float *out, const float *x, const float *w, int T, int D, float eps);

// Rotary embedding in place, half-split pairs (i, i + hd/2), for n_heads heads per row.
// x: (T, n_heads*hd); token t sits at position pos0 + t. inv_freq: (hd/2) = theta^(-2i/hd).
void nm_rope_forward(float *x, int T, int n_heads, int hd, int pos0, const float *inv_freq);

// out = silu(g) * u, elementwise over n values.  out may alias g.
void nm_swiglu_forward(float *out, const float *g, const float *u, size_t n);

// Numerically safe softmax of one row in place.
void nm_softmax_row(float *x, int n);

// SwiGLU feed-forward: out (+)= W_down (silu(W_gate x) * W_up x).
// x: (T, D)  wg, wu: (H, D)  wd: (D, H)  hidden: scratch (2, T, H)  out: (T, D)
void nm_ffn_forward(float *out, const float *x, const float *wg, const float *wu, const float *wd, int T, int D, int H,
                    float *hidden, float beta);

#endif
