// nm_ops.c — dense ops over OpenBLAS, with AVX-512 / AVX2 versions of the elementwise
// exponentials (SwiGLU, softmax) chosen at run time (NM_ISA=generic|avx2|avx512 caps it).
#include "nm_ops.h"

#include <cblas.h>
#include <math.h>
#include "nm_simd.h"

#ifdef NM_X86
#define AVX512 NM_AVX512
#define AVX2 NM_AVX2

static AVX512 void swiglu512(float *out, const float *g, const float *u, size_t n) {
    for (size_t i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? 0xffff : (__mmask16)((1u << (n - i)) - 1);
        __m512 a = _mm512_maskz_loadu_ps(m, g + i), b = _mm512_maskz_loadu_ps(m, u + i);
        __m512 den = _mm512_add_ps(_mm512_set1_ps(1.0f), nm_exp512(_mm512_sub_ps(_mm512_setzero_ps(), a)));
        _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(_mm512_div_ps(a, den), b));
    }
}

static AVX2 void swiglu256(float *out, const float *g, const float *u, size_t n) {
    for (size_t i = 0; i < n; i += 8) {
        __m256i m = nm_mask256(n - i < 8 ? n - i : 8);
        __m256 a = _mm256_maskload_ps(g + i, m), b = _mm256_maskload_ps(u + i, m);
        __m256 den = _mm256_add_ps(_mm256_set1_ps(1.0f), nm_exp256(_mm256_sub_ps(_mm256_setzero_ps(), a)));
        _mm256_maskstore_ps(out + i, m, _mm256_mul_ps(_mm256_div_ps(a, den), b));
    }
}

// x[i] = exp(x[i] - mx); returns the sum (in double, lane-wise then in a fixed order)
static AVX512 double expsum512(float *x, int n, float mx) {
    __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
    const __m512 vm = _mm512_set1_ps(mx);
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? 0xffff : (__mmask16)((1u << (n - i)) - 1);
        __m512 v = nm_exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), vm));
        v = _mm512_maskz_mov_ps(m, v);
        _mm512_mask_storeu_ps(x + i, m, v);
        s0 = _mm512_add_pd(s0, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
        s1 = _mm512_add_pd(s1, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
    }
    double t[8];
    _mm512_storeu_pd(t, _mm512_add_pd(s0, s1));
    return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
}

static AVX2 double expsum256(float *x, int n, float mx) {
    __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
    const __m256 vm = _mm256_set1_ps(mx);
    for (int i = 0; i < n; i += 8) {
        __m256i m = nm_mask256((size_t)(n - i < 8 ? n - i : 8));
        __m256 v = _mm256_and_ps(nm_exp256(_mm256_sub_ps(_mm256_maskload_ps(x + i, m), vm)), _mm256_castsi256_ps(m));
        _mm256_maskstore_ps(x + i, m, v);
        s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
        s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
    }
    double t[4];
    _mm256_storeu_pd(t, _mm256_add_pd(s0, s1));
    return (t[0] + t[1]) + (t[2] + t[3]);
}
#endif

void nm_matmul_forward(float *out, const float *x, const float *w, int T, int in, int out_dim, float beta) {
    // x: (T, in)  w: (out_dim, in)  out: (T, out_dim)
    if (T <= 0 || out_dim <= 0) return;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, out_dim, in, 1.0f, x, in, w, in, beta, out, out_dim);
}

void nm_rmsnorm_forward(float *out, const float *x, const float *w, int T, int D, float eps) {
    // x, out: (T, D)  w: (D). Rows are independent (each in a fixed order): threads split them.
    #pragma omp parallel for schedule(static) if ((size_t)T * D >= 65536)
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
    // x: (T, n_heads*hd); tokens are independent: threads split them
    int half = hd / 2;
    #pragma omp parallel for schedule(static) if ((size_t)T * n_heads * hd >= 65536)
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
#ifdef NM_X86
    int isa = nm_isa();
    if (isa == NM_ISA_AVX512) return swiglu512(out, g, u, n);
    if (isa == NM_ISA_AVX2) return swiglu256(out, g, u, n);
#endif
    for (size_t i = 0; i < n; i++) {
        float a = g[i];
        out[i] = a / (1.0f + expf(-a)) * u[i];
    }
}

#ifdef NM_X86
static AVX512 void softmax512(float *x, int n) {
    __m512 vmx = _mm512_set1_ps(-INFINITY);
    for (int i = 0; i < n; i += 16) // max(x, m) keeps m where x is NaN, as the scalar loop does
        vmx = _mm512_max_ps(_mm512_mask_loadu_ps(vmx, nm_mask512((size_t)(n - i)), x + i), vmx);
    const float mx = _mm512_reduce_max_ps(vmx);
    const __m512 inv = _mm512_set1_ps((float)(1.0 / expsum512(x, n, mx)));
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = nm_mask512((size_t)(n - i));
        _mm512_mask_storeu_ps(x + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), inv));
    }
}
#endif

void nm_softmax_row(float *x, int n) {
#ifdef NM_X86
    int isa = nm_isa();
    if (isa == NM_ISA_AVX512) return softmax512(x, n);
#endif
    float mx = -INFINITY;
    for (int i = 0; i < n; i++) mx = x[i] > mx ? x[i] : mx;
    double s = 0.0;
#ifdef NM_X86
    if (isa == NM_ISA_AVX2) s = expsum256(x, n, mx);
    else
#endif
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
