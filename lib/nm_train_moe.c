// nm_train_moe.c — the training MoE layer (nm_train_moe.h) in float64 and float32, both built
// from nm_moe_generic.h (one source, as nm_train_ops.c). The two precisions differ only in how
// they route: float32 calls the inference router itself (moe_route_null), so training selects
// exactly what inference selects; float64 has the same rule written out for double logits below.
#include "nm_train_moe.h"

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "nm_moe.h"
#include "nm_train_ops.h"

// The buffers a cache holds (its public routing arrays and the private ones), one capacity each.
enum {
    B_N_REAL, B_SLOT, B_LOGITS, B_PROB, B_GATE, B_LSE,                          // public (nm_moe_cache)
    B_OFFSETS, B_CURSOR, B_WORK, B_ROW_SLOT, B_SLOT_ROW, B_XS, B_HG, B_HU, B_ACT, B_EO, // forward
    B_SH_HG, B_SH_HU, B_SH_ACT, B_NULL_MASS, B_P_ALL, B_SHARE, B_PSUM,
    B_DGATE, B_DXS, B_DZ, B_SH_DH, B_SCRATCH,                                    // backward scratch
    B_COUNT
};

// GEMMs of fewer multiply-adds than this run without a parallel region: below OpenBLAS's own
// threshold for threading a GEMM (2^18 in 0.3.21, 2^16 in older releases), so one thread either way.
#define SMALL_MACS 65536.0
// Rows of C per block of the whole-batch GEMMs (gemm_blocked): tokens, or weight rows for the
// router's and the shared expert's weight gradients (whose inner dimension is all the tokens).
#define TOKEN_BLOCK 128
#define WEIGHT_BLOCK 32

// Grows a buffer to at least `bytes`, 64-byte aligned. Contents are not kept (every forward
// rewrites what it uses). Returns the buffer, or NULL (the old one freed, *cap = 0).
static void *grow(void *old, size_t *cap, size_t bytes) {
    if (old && *cap >= bytes) return old;
    free(old);
    bytes = bytes ? (bytes + 63) / 64 * 64 : 64;
    void *p = aligned_alloc(64, bytes);
    *cap = p ? bytes : 0;
    return p;
}

// Expert work items are sorted by this key, descending: busiest expert first (so the dynamic
// schedule ends evenly), ties by expert id. The order never changes a result.
static int64_t work_key(int32_t rows, int expert) { return (int64_t)rows << 32 | (int64_t)expert; }
static int work_expert(int64_t key) { return (int)(key & 0xffffffff); }
static int cmp_work_desc(const void *a, const void *b) {
    const int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x < y) - (x > y);
}

// ---- routing, float32: the inference router on the float32 logits ----

static void route_tokens_f32(nm_moe_cache_f32 *c, float *null_mass, const nm_moe_config *mc, int T) {
    const nm_routing r = {c->n_real, c->slot, c->prob, c->gate, null_mass, c->lse};
    moe_route_null(&r, c->logits, T, mc);
}

// ---- routing, float64: moe_route_null's rule for double logits ----
// S = the top K of the expanded logits z~ = [z_0 .. z_{N-1}, z_N x M], ties to the lower slot:
// the reals in descending order (ties to the lower id), merged with the M null copies, a real
// going first while its logit >= the null logit (it has the lower slot index). p = softmax(z~),
// gates a softmax over the selected real logits (copy kind: over all K selected logits).
static void route_tokens_f64(nm_moe_cache_f64 *c, double *null_mass, const nm_moe_config *mc, int T) {
    const int N = mc->num_experts, M = mc->null_copies, K = mc->top_k, kr = K < N ? K : N;
    const int copy = mc->null_kind == NM_NULL_COPY;
    int order[kr > 0 ? kr : 1]; // the top-kr reals, descending
    for (int t = 0; t < T; t++) {
        const double *z = c->logits + (size_t)t * (N + 1), zn = z[N];
        double mx = -INFINITY;
        for (int i = 0; i < N; i++) mx = fmax(mx, z[i]);
        if (M > 0) mx = fmax(mx, zn);
        double s = 0.0;
        for (int i = 0; i < N; i++) s += exp(z[i] - mx);
        if (M > 0) s += M * exp(zn - mx);
        const double lse = mx + log(s);
        // insertion into a sorted list; strict > keeps the lower id ahead on ties
        int nsel = 0;
        for (int i = 0; i < N; i++) {
            if (nsel == kr && !(z[i] > z[order[kr - 1]])) continue;
            int j = nsel < kr ? nsel++ : kr - 1;
            while (j > 0 && z[i] > z[order[j - 1]]) {
                order[j] = order[j - 1];
                j--;
            }
            order[j] = i;
        }
        int16_t *slot = c->slot + (size_t)t * K;
        double *prob = c->prob + (size_t)t * K, *gate = c->gate + (size_t)t * K;
        int ir = 0, nulls_left = M;
        for (int k = 0; k < K; k++) {
            if (ir < kr && (nulls_left == 0 || z[order[ir]] >= zn)) {
                slot[k] = (int16_t)order[ir++];
                prob[k] = exp(z[slot[k]] - lse);
            } else {
                slot[k] = -1;
                prob[k] = exp(zn - lse);
                nulls_left--;
            }
        }
        c->n_real[t] = (uint8_t)ir;
        c->lse[t] = lse;
        null_mass[t] = M > 0 ? M * exp(zn - lse) : 0.0;
        double gm = -INFINITY, gs = 0.0;
        for (int k = 0; k < K; k++)
            if (slot[k] >= 0 || copy) gm = fmax(gm, slot[k] >= 0 ? z[slot[k]] : zn);
        for (int k = 0; k < K; k++) {
            gate[k] = slot[k] >= 0 || copy ? exp((slot[k] >= 0 ? z[slot[k]] : zn) - gm) : 0.0;
            gs += gate[k];
        }
        for (int k = 0; k < K; k++) gate[k] = gs > 0 ? gate[k] / gs : 0.0; // gs = 0: no real slot (zero kind)
    }
}

#define R double
#define FN(name) name##_f64
#define GEMM cblas_dgemm
#include "nm_moe_generic.h"
#undef R
#undef FN
#undef GEMM

#define R float
#define FN(name) name##_f32
#define GEMM cblas_sgemm
#include "nm_moe_generic.h"
#undef R
#undef FN
#undef GEMM
