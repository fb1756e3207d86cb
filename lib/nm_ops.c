// nm_ops.c — dense ops over OpenBLAS.
#include "nm_ops.h"

#include <cblas.h>
#include <math.h>

void nm_matmul_forward(float *out, const float *x, const float *w, int T, int in, int out_dim, float beta) {
    // x: (T, in)  w: (out_dim, in)  out: (T, out_dim)
    if (T <= 0 || out_dim <= 0) return;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, out_dim, in, 1.0f, x, in, w, in, beta, out, out_dim);
}

void nm_rmsnorm_forward(float *out, const float *x, const float *w, int T, int D, float eps) {
    // x, out: (T, D)  w: (D)
    for (int t = 0; t < T; t++) {
        const float *xr = x + (size_t)t * D;
        float *o = out + (size_t)t * D;
        double ss = 0.0;
        for (int i = 0; i < D; i++) ss += (double)xr[i] * xr[i];
        float r = (float)(1.0 / sqrt(ss / D + eps));
        for (int i = 0; i < D; i++) o[i] = xr[i] * r * w[i];
    }
}

void nm_rope_forward(float *x, int T, int n_heads, int hd, int pos0, const float *inv_freq) {
    // x: (T, n_heads*hd)
    int half = hd / 2;
    for (int t = 0; t < T; t++) {
        double pos = pos0 + t;
        for (int i = 0; i < half; i++) {
            // angle in double: positions up to 1e6 times frequencies up to 1 lose precision in float
            double a = pos * inv_freq[i];
            float c = (float)cos(a), s = (float)sin(a);
            for (int h = 0; h < n_heads; h++) {
                float *v = x + (size_t)t * n_heads * hd + (size_t)h * hd;
                float x0 = v[i], x1 = v[i + half];
                v[i] = x0 * c - x1 * s;
                v[i + half] = x1 * c + x0 * s;
            }
        }
    }
}

void nm_swiglu_forward(float *out, const float *g, const float *u, size_t n) {
    for (size_t i = 0; i < n; i++) {
        float a = g[i];
        out[i] = a / (1.0f + expf(-a)) * u[i];
    }
}

void nm_softmax_row(float *x, int n) {
    float mx = -INFINITY;
    for (int i = 0; i < n; i++) mx = x[i] > mx ? x[i] : mx;
    double s = 0.0;
    for (int i = 0; i < n; i++) {
        x[i] = expf(x[i] - mx);
        s += x[i];
    }
    float inv = (float)(1.0 / s);
    for (int i = 0; i < n; i++) x[i] *= inv;
}

void nm_ffn_forward(float *out, const float *x, const float *wg, const float *wu, const float *wd, int T, int D, int H,
                    float *hidden, float beta) {
    // x: (T, D)  hidden: (2, T, H)  out: (T, D)
    float *g = hidden, *u = hidden + (size_t)T * H;
    nm_matmul_forward(g, x, wg, T, D, H, 0.0f);
    nm_matmul_forward(u, x, wu, T, D, H, 0.0f);
    nm_swiglu_forward(g, g, u, (size_t)T * H);
    nm_matmul_forward(out, g, wd, T, H, D, beta);
}
