// nm_moe.c — null-expert MoE: routing (moe_route_null), dispatch sorted by expert with null
// slots cut, grouped expert FFNs (work items in parallel, one thread each), and a per-token
// combine in a fixed slot order (deterministic: no atomics, no dependence on the schedule).
//
// The expert FFNs run on a small register-tiled kernel instead of BLAS: out^T = W x^T with the
// tokens of one expert along the vector lanes and each weight broadcast from its row, so the
// weights are streamed straight from memory (with a prefetch one tile ahead) and never packed.
// One expert's tokens (~64 at T = 2048, E[K] = 2) are too few for a packing GEMM to amortise
// its copy of the weights; this kernel reaches near-peak FMA rates there (tests/bench/).
// AVX-512F and AVX2+FMA versions are chosen at run time; elsewhere the same layout goes
// through cblas_sgemm. NM_ISA=generic|avx2|avx512 caps the choice (for tests).
#include "nm_moe.h"

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "nm_ops.h"
#include "nm_simd.h"

// ---- router ----

// logsumexp of the N + M expanded logits, and the top-kr reals in descending order (ties to
// the lower id) — portable version.
static double scan_scalar(const float *zt, int N, int M, int kr, int *order) {
    const float zn = zt[N];
    float mx = -INFINITY;
    for (int i = 0; i < N; i++) mx = zt[i] > mx ? zt[i] : mx;
    if (M > 0 && zn > mx) mx = zn;
    double s = 0.0;
    for (int i = 0; i < N; i++) s += expf(zt[i] - mx); // each term <= 1, summed in double
    if (M > 0) s += M * exp((double)zn - mx);
    // Top-kr by insertion into a sorted list (one pass, K small). Strict > keeps an earlier
    // (lower) id ahead of a later one with an equal logit.
    int nsel = 0;
    for (int i = 0; i < N; i++) {
        if (nsel == kr && !(zt[i] > zt[order[kr - 1]])) continue;
        int j = nsel < kr ? nsel++ : kr - 1;
        while (j > 0 && zt[i] > zt[order[j - 1]]) {
            order[j] = order[j - 1];
            j--;
        }
        order[j] = i;
    }
    return mx + log(s);
}

#ifdef NM_X86
// The same with AVX-512: a vector max and exp-sum, then kr rounds of "largest available,
// lowest index on ties". Returns 0 (nothing written) when a logit is NaN: the caller then
// uses scan_scalar, so both paths select identically. Otherwise returns how many leading
// entries of order it wrote (-1 for none): kr, or fewer when M >= K and fewer reals reach
// the null logit (a real below it then never gets a slot; the selected prefix is the same).
static NM_AVX512 int scan512(const float *zt, int N, int M, int K, int kr, int *order, double *lse) {
    const int nv = (N + 15) / 16;
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    __m512 vmx = ninf;
    __mmask16 nan = 0;
    for (int v = 0; v < nv; v++) {
        __m512 x = _mm512_mask_loadu_ps(ninf, nm_mask512((size_t)(N - 16 * v)), zt + 16 * v);
        nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
        vmx = _mm512_max_ps(vmx, x);
    }
    const float zn = zt[N];
    if (nan || zn != zn) return 0;
    if (M >= K) { // only reals with z >= zn can win a slot against M >= K null copies
        int above = 0;
        const __m512 vzn = _mm512_set1_ps(zn);
        for (int v = 0; v < nv; v++) {
            const __mmask16 m = nm_mask512((size_t)(N - 16 * v));
            above += __builtin_popcount(_mm512_mask_cmp_ps_mask(m, _mm512_maskz_loadu_ps(m, zt + 16 * v), vzn, _CMP_GE_OQ));
        }
        if (above < kr) kr = above;
    }
    float mx = _mm512_reduce_max_ps(vmx);
    if (M > 0 && zn > mx) mx = zn;
    __m512d acc = _mm512_setzero_pd();
    const __m512 vm = _mm512_set1_ps(mx);
    for (int v = 0; v < nv; v++) {
        __mmask16 m = nm_mask512((size_t)(N - 16 * v));
        acc = nm_widen_add512(acc, _mm512_maskz_mov_ps(m, nm_exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, zt + 16 * v), vm))));
    }
    double s = nm_hsum512d(acc);
    if (M > 0) s += M * exp((double)zn - mx);
    *lse = mx + log(s);
    __mmask16 avail[nv];
    for (int v = 0; v < nv; v++) avail[v] = nm_mask512((size_t)(N - 16 * v));
    for (int k = 0; k < kr; k++) {
        __m512 best = ninf;
        for (int v = 0; v < nv; v++) best = _mm512_mask_max_ps(best, avail[v], best, _mm512_maskz_loadu_ps(avail[v], zt + 16 * v));
        const __m512 b = _mm512_set1_ps(_mm512_reduce_max_ps(best));
        for (int v = 0;; v++) { // found: no NaN, and an available lane holds the maximum
            __mmask16 hit = _mm512_mask_cmp_ps_mask(avail[v], _mm512_maskz_loadu_ps(avail[v], zt + 16 * v), b, _CMP_EQ_OQ);
            if (hit) {
                int bit = __builtin_ctz(hit);
                order[k] = 16 * v + bit;
                avail[v] &= (__mmask16) ~(1u << bit);
                break;
            }
        }
    }
    return kr > 0 ? kr : -1; // -1: none (0 means "use scan_scalar")
}
#endif

// Routes one token. order: scratch of K ints; eg: scratch of K doubles.
static void route_token(const nm_routing *r, const float *zt, size_t t, int N, int M, int K, int copy, int isa, int *order,
                        double *eg) {
    const float zn = zt[N];
    int kr = K < N ? K : N;
    double lse;
#ifdef NM_X86
    int got = isa == NM_ISA_AVX512 ? scan512(zt, N, M, K, kr, order, &lse) : 0;
    if (got) kr = got < 0 ? 0 : got; // only the first kr entries of order are valid
    else
#endif
        lse = scan_scalar(zt, N, M, kr, order);
    (void)isa;
    // Merge: a real expert goes first while its logit >= the null logit (a real expert
    // has a lower slot index than every null copy, so it wins ties).
    int ir = 0, nulls_left = M, nr = 0;
    int16_t *slot = r->slot + t * K;
    float *prob = r->prob + t * K, *gate = r->gate + t * K;
    for (int k = 0; k < K; k++) {
        int take_real = ir < kr && (nulls_left == 0 || zt[order[ir]] >= zn);
        if (take_real) {
            slot[k] = (int16_t)order[ir];
            prob[k] = (float)exp((double)zt[order[ir]] - lse);
            ir++;
            nr++;
        } else {
            slot[k] = -1;
            prob[k] = (float)exp((double)zn - lse);
            nulls_left--;
        }
    }
    r->n_real[t] = (uint8_t)nr;
    r->lse[t] = (float)lse;
    r->null_mass[t] = M > 0 ? (float)(M * exp((double)zn - lse)) : 0.0f;
    // Gates: a softmax over the selected logits (real ones only for zero kind; all K for
    // copy kind). Ratios of p would be 0/0 once the null logit dominates by ~88.
    float gm = -INFINITY;
    for (int k = 0; k < K; k++)
        if (slot[k] >= 0 || copy) gm = fmaxf(gm, slot[k] >= 0 ? zt[slot[k]] : zn);
    double gs = 0.0;
    for (int k = 0; k < K; k++) {
        eg[k] = (slot[k] >= 0 || copy) ? exp((double)(slot[k] >= 0 ? zt[slot[k]] : zn) - gm) : 0.0;
        gs += eg[k];
    }
    for (int k = 0; k < K; k++) gate[k] = (slot[k] >= 0 || copy) ? (float)(eg[k] / gs) : 0.0f;
}

// Routes tokens [t0, t1) (logits z of all tokens).
static void route_range(const nm_routing *r, const float *z, int t0, int t1, const nm_moe_config *mc) {
    const int N = mc->num_experts, M = mc->null_copies, K = mc->top_k;
    const int copy = mc->null_kind == NM_NULL_COPY, isa = nm_isa();
    int order[K]; // selected real experts in descending logit, ties to the lower id
    double eg[K];
    for (int t = t0; t < t1; t++) route_token(r, z + (size_t)t * (N + 1), (size_t)t, N, M, K, copy, isa, order, eg);
}

void moe_route_null(const nm_routing *r, const float *z, int T, const nm_moe_config *mc) {
    // Tokens are independent: each thread routes a fixed block of them.
    #pragma omp parallel if (T >= 64)
    {
        const int nt = omp_get_num_threads(), id = omp_get_thread_num();
        route_range(r, z, (int)((long long)T * id / nt), (int)((long long)T * (id + 1) / nt), mc);
    }
}

// ---- the expert kernel: outT (R, cp) = W (R, Kd) · XT (Kd, cp), cp a multiple of 8 ----
// Tiles of up to 6 weight rows by up to 64 tokens (AVX-512; AVX2: 16), and a last block of
// 8 tokens on 256-bit vectors with up to 12 rows (8-token granularity halves the padding).
// Each output is accumulated over the whole of Kd in a fixed order (d = 0, 1, ...), so no
// result depends on the tiling. Every tile prefetches the next tile's weight rows.

#ifdef NM_X86
#define AVX512 NM_AVX512
#define AVX2 NM_AVX2
#define INLINE NM_INLINE

INLINE AVX512 void tile512(float *outT, int cp, const float *W, int Kd, const float *XT, const int RB, const int NB) {
    // outT: RB rows of NB*16 tokens (row stride cp); W: RB rows (stride Kd); XT: (Kd, cp)
    const char *pf = (const char *)(W + (size_t)RB * Kd); // the next tile's rows
    __m512 acc[6][4];
#pragma GCC unroll 6
    for (int r = 0; r < RB; r++)
#pragma GCC unroll 4
        for (int n = 0; n < NB; n++) acc[r][n] = _mm512_setzero_ps();
    for (int d = 0; d < Kd; d++) {
        __m512 x[4];
        if (!(d & 1)) _mm_prefetch(pf + 4 * RB * (size_t)d, _MM_HINT_T1);
#pragma GCC unroll 4
        for (int n = 0; n < NB; n++) x[n] = _mm512_loadu_ps(XT + (size_t)d * cp + 16 * n);
#pragma GCC unroll 6
        for (int r = 0; r < RB; r++) {
            __m512 w = _mm512_set1_ps(W[(size_t)r * Kd + d]);
#pragma GCC unroll 4
            for (int n = 0; n < NB; n++) acc[r][n] = _mm512_fmadd_ps(w, x[n], acc[r][n]);
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < RB; r++)
#pragma GCC unroll 4
        for (int n = 0; n < NB; n++) _mm512_storeu_ps(outT + (size_t)r * cp + 16 * n, acc[r][n]);
}

INLINE AVX2 void tile256(float *outT, int cp, const float *W, int Kd, const float *XT, const int RB, const int NB) {
    // outT: RB rows of NB*8 tokens. RB*NB <= 12 accumulators + NB inputs + 1 broadcast <= 16 ymm
    const char *pf = (const char *)(W + (size_t)RB * Kd);
    __m256 acc[12][2];
#pragma GCC unroll 12
    for (int r = 0; r < RB; r++)
#pragma GCC unroll 2
        for (int n = 0; n < NB; n++) acc[r][n] = _mm256_setzero_ps();
    for (int d = 0; d < Kd; d++) {
        if (RB > 8 || !(d & 1)) _mm_prefetch(pf + 4 * RB * (size_t)d, _MM_HINT_T1);
        __m256 x[2];
#pragma GCC unroll 2
        for (int n = 0; n < NB; n++) x[n] = _mm256_loadu_ps(XT + (size_t)d * cp + 8 * n);
#pragma GCC unroll 12
        for (int r = 0; r < RB; r++) {
            __m256 w = _mm256_broadcast_ss(W + (size_t)r * Kd + d);
#pragma GCC unroll 2
            for (int n = 0; n < NB; n++) acc[r][n] = _mm256_fmadd_ps(w, x[n], acc[r][n]);
        }
    }
#pragma GCC unroll 12
    for (int r = 0; r < RB; r++)
#pragma GCC unroll 2
        for (int n = 0; n < NB; n++) _mm256_storeu_ps(outT + (size_t)r * cp + 8 * n, acc[r][n]);
}

typedef void (*tile_fn)(float *, int, const float *, int, const float *);
#define T512(RB, NB) \
    static AVX512 void t512_##RB##_##NB(float *o, int cp, const float *W, int Kd, const float *X) { tile512(o, cp, W, Kd, X, RB, NB); }
#define T512_ROW(RB) T512(RB, 1) T512(RB, 2) T512(RB, 3) T512(RB, 4)
T512_ROW(6) T512_ROW(4) T512_ROW(2) T512_ROW(1)
#define T256(RB, NB) \
    static AVX2 void t256_##RB##_##NB(float *o, int cp, const float *W, int Kd, const float *X) { tile256(o, cp, W, Kd, X, RB, NB); }
T256(6, 2) T256(4, 2) T256(2, 2) T256(1, 2) T256(12, 1) T256(6, 1) T256(4, 1) T256(2, 1) T256(1, 1)

static const tile_fn k512[7][5] = {
    [1] = {NULL, t512_1_1, t512_1_2, t512_1_3, t512_1_4}, [2] = {NULL, t512_2_1, t512_2_2, t512_2_3, t512_2_4},
    [4] = {NULL, t512_4_1, t512_4_2, t512_4_3, t512_4_4}, [6] = {NULL, t512_6_1, t512_6_2, t512_6_3, t512_6_4}};
static const tile_fn k256x16[7] = {[1] = t256_1_2, [2] = t256_2_2, [4] = t256_4_2, [6] = t256_6_2};
static const tile_fn k256x8[13] = {[1] = t256_1_1, [2] = t256_2_1, [4] = t256_4_1, [6] = t256_6_1, [12] = t256_12_1};
#endif

static void expert_gemm(int isa, float *outT, const float *W, int R, int Kd, const float *XT, int cp) {
#ifdef NM_X86
    if (isa != NM_ISA_GENERIC) {
        const int c16 = cp & ~15; // whole 16-token blocks; then one 8-token block if cp % 16 == 8
        for (int j = 0; j < R;) {
            const int left = R - j, rb = left >= 12 ? 12 : left >= 6 ? 6 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
            for (int jj = j; jj < j + rb; jj += rb < 6 ? rb : 6) {
                const int r6 = rb < 6 ? rb : 6;
                const float *Wj = W + (size_t)jj * Kd;
                float *oj = outT + (size_t)jj * cp;
                if (isa == NM_ISA_AVX512)
                    for (int n = 0; n < c16; n += 64) {
                        int nb = (c16 - n) / 16 < 4 ? (c16 - n) / 16 : 4;
                        k512[r6][nb](oj + n, cp, Wj, Kd, XT + n);
                    }
                else
                    for (int n = 0; n < c16; n += 16) k256x16[r6](oj + n, cp, Wj, Kd, XT + n);
            }
            if (cp & 8) k256x8[rb](outT + (size_t)j * cp + c16, cp, W + (size_t)j * Kd, Kd, XT + c16);
            j += rb;
        }
        return;
    }
#endif
    (void)isa;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, R, cp, Kd, 1.0f, W, Kd, XT, cp, 0.0f, outT, cp);
}

#ifdef NM_X86
// xt (D, cp): xt[d][i] = src[i][d], zeros for c <= i < cp. D % 16 == 0, cp % 8 == 0.
static AVX512 void gather_t512(float *xt, int cp, const float *const *src, int c, int D) {
    for (int i0 = 0; i0 < cp; i0 += 16) {
        const __mmask16 m = cp - i0 >= 16 ? 0xffff : 0x00ff;
        for (int d0 = 0; d0 < D; d0 += 16) {
            __m512 r[16];
#pragma GCC unroll 16
            for (int k = 0; k < 16; k++) r[k] = i0 + k < c ? _mm512_loadu_ps(src[i0 + k] + d0) : _mm512_setzero_ps();
            nm_transpose16(r);
#pragma GCC unroll 16
            for (int k = 0; k < 16; k++) _mm512_mask_storeu_ps(xt + (size_t)(d0 + k) * cp + i0, m, r[k]);
        }
    }
}

// dst[i][d] = g[i] * yt[d][i] for i < c. D % 16 == 0, cp % 8 == 0.
static AVX512 void scatter_t512(float *const *dst, const float *g, const float *yt, int cp, int c, int D) {
    for (int i0 = 0; i0 < c; i0 += 16) {
        const __mmask16 m = cp - i0 >= 16 ? 0xffff : 0x00ff;
        for (int d0 = 0; d0 < D; d0 += 16) {
            __m512 r[16];
#pragma GCC unroll 16
            for (int k = 0; k < 16; k++) r[k] = _mm512_maskz_loadu_ps(m, yt + (size_t)(d0 + k) * cp + i0);
            nm_transpose16(r);
#pragma GCC unroll 16
            for (int k = 0; k < 16; k++)
                if (i0 + k < c) _mm512_storeu_ps(dst[i0 + k] + d0, _mm512_mul_ps(_mm512_set1_ps(g[i0 + k]), r[k]));
        }
    }
}
#endif

// ---- workspace ----

void nm_moe_workspace_free(nm_moe_workspace *ws) {
    if (!ws) return;
    free(ws->logits); free(ws->yout); free(ws->shared_h); free(ws->scratch);
    free(ws->row_slot); free(ws->slot_row); free(ws->counts); free(ws->offsets); free(ws->cursor); free(ws->tasks);
    free(ws->n_real); free(ws->slot); free(ws->prob); free(ws->gate); free(ws->null_mass); free(ws->lse);
    memset(ws, 0, sizeof *ws);
}

// Grows *p to at least `bytes` (contents are not kept). 64-byte aligned.
static int grow(void *pp, size_t *cap, size_t bytes) {
    void **p = pp;
    if (*p && *cap >= bytes) return 1;
    free(*p);
    bytes = bytes ? (bytes + 63) / 64 * 64 : 64;
    *p = aligned_alloc(64, bytes);
    *cap = *p ? bytes : 0;
    return *p != NULL;
}

// Tokens per work item: one expert's rows are cut into chunks of at most CHUNK, so that a
// thread's tiles stay in its L2 and big experts spread over both threads.
#define CHUNK 128

// Per-thread scratch: an expert's xt, gt, ut, yt tiles, or the router's xt and logits tiles.
static size_t scratch_floats(const nm_moe_config *mc, int D) {
    const size_t e = 2 * (size_t)D + 2 * (size_t)mc->expert_hidden, r = (size_t)D + mc->num_experts + 1;
    return (size_t)CHUNK * (e > r ? e : r);
}

static nm_status workspace_reserve(nm_moe_workspace *ws, const nm_moe_config *mc, int T, int D, int nth, nm_error *err) {
    const size_t N = (size_t)mc->num_experts, K = (size_t)mc->top_k,
                 Hs = (size_t)mc->shared_expert_hidden, t = (size_t)T, f = sizeof(float), i4 = sizeof(int32_t);
    const size_t scratch = (size_t)nth * scratch_floats(mc, D) * f;
    int ok = grow(&ws->logits, &ws->cap[0], t * (N + 1) * f) && grow(&ws->yout, &ws->cap[1], t * K * D * f) &&
             grow(&ws->shared_h, &ws->cap[2], 2 * t * Hs * f) && grow(&ws->scratch, &ws->cap[3], scratch) &&
             grow(&ws->row_slot, &ws->cap[4], t * K * i4) && grow(&ws->slot_row, &ws->cap[5], t * K * i4) &&
             grow(&ws->counts, &ws->cap[6], (N + 1) * i4) && grow(&ws->offsets, &ws->cap[7], (N + 1) * i4) &&
             grow(&ws->cursor, &ws->cap[8], N * i4) && grow(&ws->tasks, &ws->cap[9], 6 * (t * K + N) * i4) &&
             grow(&ws->n_real, &ws->cap[10], t) && grow(&ws->slot, &ws->cap[11], t * K * sizeof(int16_t)) &&
             grow(&ws->prob, &ws->cap[12], t * K * f) && grow(&ws->gate, &ws->cap[13], t * K * f) &&
             grow(&ws->null_mass, &ws->cap[14], t * f) && grow(&ws->lse, &ws->cap[15], t * f);
    if (!ok) {
        nm_moe_workspace_free(ws);
        return nm_fail(err, NM_ERR_NOMEM, "out of memory for the MoE workspace (%d tokens)", T);
    }
    ws->scratch_threads = nth;
    return NM_OK;
}

// ---- one work item: rows [o, o + c) of expert e ----

// xt (D, cp): xt[d][i] = src[i][d], zeros for c <= i < cp (the inputs as columns).
static void gather_cols(int isa, float *xt, int cp, const float *const *src, int c, int D) {
#ifdef NM_X86
    if (isa == NM_ISA_AVX512 && D % 16 == 0) return gather_t512(xt, cp, src, c, D);
#endif
    (void)isa;
    for (int d0 = 0; d0 < D; d0 += 16) { // 16 features at a time keep the written lines in L1
        const int d1 = d0 + 16 < D ? d0 + 16 : D;
        for (int i = 0; i < cp; i++)
            for (int d = d0; d < d1; d++) xt[(size_t)d * cp + i] = i < c ? src[i][d] : 0.0f;
    }
}

// Rows whose output goes straight to `out` (the first real slot of its token, when nothing
// else is summed before it) are marked in row_slot with this bit.
#define DIRECT_BIT (1 << 30)

static void expert_task(int isa, float *scr, float *out, const float *y, const nm_moe_weights *w, const nm_routing *r,
                        const nm_moe_workspace *ws, int e, int o, int c, int D, int H, int K) {
    const int cp = (c + 7) / 8 * 8; // tokens padded to whole 8-lane vectors (zeros)
    float *xt = scr, *gt = xt + (size_t)D * cp, *ut = gt + (size_t)H * cp, *yt = ut + (size_t)H * cp;
    const float *src[CHUNK];
    float *dst[CHUNK], g[CHUNK];
    for (int i = 0; i < c; i++) {
        const int32_t v = ws->row_slot[o + i], slot = v & ~DIRECT_BIT, t = slot / K;
        src[i] = y + (size_t)t * D;
        dst[i] = v & DIRECT_BIT ? out + (size_t)t * D : ws->yout + (size_t)(o + i) * D;
        g[i] = r->gate[slot];
    }
    gather_cols(isa, xt, cp, src, c, D);
    expert_gemm(isa, gt, w->gate + (size_t)e * H * D, H, D, xt, cp);
    expert_gemm(isa, ut, w->up + (size_t)e * H * D, H, D, xt, cp);
    nm_swiglu_forward(gt, gt, ut, (size_t)H * cp);
    expert_gemm(isa, yt, w->down + (size_t)e * D * H, D, H, gt, cp);
    // back to rows with the gate applied: dst[i] = g_i * yt[:, i]
#ifdef NM_X86
    if (isa == NM_ISA_AVX512 && D % 16 == 0) scatter_t512(dst, g, yt, cp, c, D);
    else
#endif
        for (int d0 = 0; d0 < D; d0 += 16) {
            const int d1 = d0 + 16 < D ? d0 + 16 : D;
            for (int i = 0; i < c; i++)
                for (int d = d0; d < d1; d++) dst[i][d] = g[i] * yt[(size_t)d * cp + i];
        }
}

// o += rows[0] + rows[1] + ... (added in this order to every element)
#ifdef NM_X86
static NM_AVX512 void add_rows512(float *o, const float *const *rows, int n, int D) {
    for (int d = 0; d < D; d += 16) {
        const __mmask16 m = nm_mask512((size_t)(D - d));
        __m512 v = _mm512_maskz_loadu_ps(m, o + d);
        for (int j = 0; j < n; j++) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, rows[j] + d));
        _mm512_mask_storeu_ps(o + d, m, v);
    }
}
#endif

static void add_rows(int isa, float *o, const float *const *rows, int n, int D) {
    if (n == 0) return;
#ifdef NM_X86
    if (isa == NM_ISA_AVX512) return add_rows512(o, rows, n, D);
#endif
    (void)isa;
    for (int j = 0; j < n; j++)
        for (int d = 0; d < D; d++) o[d] += rows[j][d];
}

// ---- the layer ----

nm_status nm_moe_forward(float *out, const float *y, const nm_moe_weights *w, const nm_moe_config *mc, int T, int D,
                         nm_moe_workspace *ws, const nm_routing *routing, nm_error *err) {
    // y: (T, D)  out: (T, D)
    const int nth = omp_get_max_threads();
    nm_status s = workspace_reserve(ws, mc, T, D, nth, err);
    if (s != NM_OK) return s;
    const int N = mc->num_experts, K = mc->top_k, H = mc->expert_hidden, Hs = mc->shared_expert_hidden;
    const int isa = nm_isa();
    nm_routing local = {ws->n_real, ws->slot, ws->prob, ws->gate, ws->null_mass, ws->lse};
    const nm_routing *r = routing ? routing : &local;

    // 1. router logits z = y Wr^T: (T, N+1), then the routing decision; each thread does both
    //    for its own block of tokens. With SIMD the logits come from the expert kernel on
    //    CHUNK tokens at a time (inputs gathered as columns), so each token's logits are the
    //    same sums whatever T is (prefill and decode route alike); otherwise from BLAS.
    const size_t scr_floats = scratch_floats(mc, D);
    #pragma omp parallel num_threads(nth) if (T >= 64)
    {
        const int nt = omp_get_num_threads(), id = omp_get_thread_num();
        const int t0 = (int)((long long)T * id / nt), t1 = (int)((long long)T * (id + 1) / nt);
        if (isa == NM_ISA_GENERIC) {
            nm_matmul_forward(ws->logits + (size_t)t0 * (N + 1), y + (size_t)t0 * D, w->router, t1 - t0, D, N + 1, 0.0f);
            route_range(r, ws->logits, t0, t1, mc);
        } else {
            float *xt = ws->scratch + (size_t)id * scr_floats, *zt = xt + (size_t)D * CHUNK;
            const float *src[CHUNK];
            for (int c0 = t0; c0 < t1; c0 += CHUNK) {
                const int c = t1 - c0 < CHUNK ? t1 - c0 : CHUNK, cp = (c + 7) / 8 * 8;
                for (int i = 0; i < c; i++) src[i] = y + (size_t)(c0 + i) * D;
                gather_cols(isa, xt, cp, src, c, D);
                expert_gemm(isa, zt, w->router, N + 1, D, xt, cp);
                for (int i = 0; i < c; i++) {
                    float *zr = ws->logits + (size_t)(c0 + i) * (N + 1);
                    for (int j = 0; j <= N; j++) zr[j] = zt[(size_t)j * cp + i];
                }
                route_range(r, ws->logits, c0, c0 + c, mc);
            }
        }
    }

    // 2. dispatch: count rows per expert, prefix sum, then place each real slot; tokens keep
    //    their order inside an expert's block. Null slots get no row: they are cut here.
    int32_t *counts = ws->counts, *offsets = ws->offsets, *cursor = ws->cursor;
    memset(counts, 0, (size_t)N * sizeof *counts);
    const size_t TK = (size_t)T * K;
    for (size_t i = 0; i < TK; i++)
        if (r->slot[i] >= 0) counts[r->slot[i]]++;
    offsets[0] = 0;
    for (int e = 0; e < N; e++) offsets[e + 1] = offsets[e] + counts[e];
    memcpy(cursor, offsets, (size_t)N * sizeof *cursor);
    // Without a shared expert or copy-kind nulls, a token's first real slot is the first term
    // of its sum: that expert writes its output row straight into `out`.
    const int copy = mc->null_kind == NM_NULL_COPY, direct = Hs == 0 && !copy;
    for (int t = 0; t < T; t++) {
        int first = direct;
        for (int k = 0; k < K; k++) {
            const size_t i = (size_t)t * K + k;
            const int e = r->slot[i];
            if (e < 0) {
                ws->slot_row[i] = -1;
                continue;
            }
            const int row = cursor[e]++;
            ws->row_slot[row] = (int32_t)i | (first ? DIRECT_BIT : 0);
            ws->slot_row[i] = row;
            first = 0;
        }
    }

    // 3. work items: each expert's rows in chunks of at most CHUNK, the biggest first so that
    //    the dynamic schedule ends evenly. Every item writes its own rows: the schedule never
    //    changes a result.
    int32_t *tasks = ws->tasks;
    int n_tasks = 0, max_c = 0;
    for (int e = 0; e < N; e++)
        for (int o = 0; o < counts[e]; o += CHUNK) {
            int c = counts[e] - o < CHUNK ? counts[e] - o : CHUNK;
            tasks[3 * n_tasks] = e, tasks[3 * n_tasks + 1] = offsets[e] + o, tasks[3 * n_tasks + 2] = c;
            n_tasks++;
            if (c > max_c) max_c = c;
        }
    if (n_tasks > 1 && max_c > 16) { // counting sort by size, descending (stable)
        int32_t *sorted = tasks + 3 * (size_t)n_tasks, hist[CHUNK + 2] = {0};
        for (int i = 0; i < n_tasks; i++) hist[CHUNK - tasks[3 * i + 2] + 1]++;
        for (int v = 1; v <= CHUNK + 1; v++) hist[v] += hist[v - 1];
        for (int i = 0; i < n_tasks; i++) {
            int at = hist[CHUNK - tasks[3 * i + 2]]++;
            memcpy(sorted + 3 * at, tasks + 3 * i, 3 * sizeof *tasks);
        }
        memcpy(tasks, sorted, 3 * (size_t)n_tasks * sizeof *tasks);
    }
    #pragma omp parallel num_threads(nth) if (n_tasks > 1)
    {
        float *scr = ws->scratch + (size_t)omp_get_thread_num() * scr_floats;
        #pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < n_tasks; i++)
            expert_task(isa, scr, out, y, w, r, ws, tasks[3 * i], tasks[3 * i + 1], tasks[3 * i + 2], D, H, K);
    }

    // 4. shared expert over every token (multi-threaded BLAS)
    if (Hs > 0) nm_ffn_forward(out, y, w->sh_gate, w->sh_up, w->sh_down, T, D, Hs, ws->shared_h, 0.0f);

    // 5. combine: per token, in slot order, out (+)= g * E(y) (rows carry their gate already;
    //    copy kind: a null slot adds g * y). In direct mode the first real row is in out.
    #pragma omp parallel for schedule(static) if ((size_t)T * D >= 32768)
    for (int t = 0; t < T; t++) {
        float *o = out + (size_t)t * D;
        const int32_t *sr = ws->slot_row + (size_t)t * K;
        if (!copy) { // out holds the shared expert or (direct) the first real row already
            if (Hs == 0 && r->n_real[t] == 0) {
                memset(o, 0, (size_t)D * sizeof *o);
                continue;
            }
            const float *rows[K];
            int n = 0, k = 0;
            if (direct)
                while (sr[k++] < 0) {}
            for (; k < K; k++)
                if (sr[k] >= 0) rows[n++] = ws->yout + (size_t)sr[k] * D;
            add_rows(isa, o, rows, n, D);
            continue;
        }
        int first = Hs == 0;
        for (int k = 0; k < K; k++) {
            size_t i = (size_t)t * K + k;
            int row = sr[k];
            if (row >= 0) {
                const float *src = ws->yout + (size_t)row * D;
                if (first) memcpy(o, src, (size_t)D * sizeof *o);
                else for (int d = 0; d < D; d++) o[d] += src[d];
            } else {
                const float g = r->gate[i], *src = y + (size_t)t * D;
                if (first) for (int d = 0; d < D; d++) o[d] = g * src[d];
                else for (int d = 0; d < D; d++) o[d] += g * src[d];
            }
            first = 0;
        }
        if (first) memset(o, 0, (size_t)D * sizeof *o);
    }
    return NM_OK;
}

// ---- float64 reference ----

static void expert_naive(double *acc, double g, const float *x, const float *wg, const float *wu, const float *wd, int D,
                         int H) {
    // acc (D) += g * wd (silu(wg x) * wu x)
    for (int j = 0; j < H; j++) {
        double a = 0, b = 0;
        for (int d = 0; d < D; d++) {
            a += (double)wg[(size_t)j * D + d] * x[d];
            b += (double)wu[(size_t)j * D + d] * x[d];
        }
        double h = a / (1.0 + exp(-a)) * b;
        for (int d = 0; d < D; d++) acc[d] += g * (double)wd[(size_t)d * H + j] * h;
    }
}

void nm_moe_forward_naive(double *out, const float *y, const nm_moe_weights *w, const nm_moe_config *mc, int T, int D) {
    const int N = mc->num_experts, M = mc->null_copies, K = mc->top_k, H = mc->expert_hidden,
              Hs = mc->shared_expert_hidden, S = N + M;
    double *z = malloc((size_t)S * sizeof *z);
    int *sel = malloc((size_t)S * sizeof *sel);
    if (!z || !sel) {
        free(z);
        free(sel);
        for (size_t i = 0; i < (size_t)T * D; i++) out[i] = NAN;
        return;
    }
    for (int t = 0; t < T; t++) {
        const float *x = y + (size_t)t * D;
        double *o = out + (size_t)t * D;
        for (int d = 0; d < D; d++) o[d] = 0;
        // expanded logits, materialised (the reference may be slow and obvious)
        for (int i = 0; i <= N; i++) {
            double a = 0;
            for (int d = 0; d < D; d++) a += (double)w->router[(size_t)i * D + d] * x[d];
            if (i < N) z[i] = a;
            else for (int j = 0; j < M; j++) z[N + j] = a;
        }
        // top-K by a stable selection: largest first, lower index on ties
        for (int i = 0; i < S; i++) sel[i] = 0;
        int chosen[256], nch = 0;
        for (int k = 0; k < K; k++) {
            int best = -1;
            for (int i = 0; i < S; i++)
                if (!sel[i] && (best < 0 || z[i] > z[best])) best = i;
            sel[best] = 1;
            chosen[nch++] = best;
        }
        double mx = -INFINITY, s = 0;
        for (int k = 0; k < K; k++)
            if (chosen[k] < N || mc->null_kind == NM_NULL_COPY) mx = fmax(mx, z[chosen[k]]);
        for (int k = 0; k < K; k++)
            if (chosen[k] < N || mc->null_kind == NM_NULL_COPY) s += exp(z[chosen[k]] - mx);
        for (int k = 0; k < K; k++) {
            int e = chosen[k];
            if (e >= N && mc->null_kind != NM_NULL_COPY) continue;
            double g = exp(z[e] - mx) / s;
            if (e < N)
                expert_naive(o, g, x, w->gate + (size_t)e * H * D, w->up + (size_t)e * H * D, w->down + (size_t)e * D * H, D, H);
            else
                for (int d = 0; d < D; d++) o[d] += g * x[d];
        }
        if (Hs > 0) expert_naive(o, 1.0, x, w->sh_gate, w->sh_up, w->sh_down, D, Hs);
    }
    free(z);
    free(sel);
}
