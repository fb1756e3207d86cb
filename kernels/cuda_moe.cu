// cuda_moe.cu — the null-expert MoE layer on the GPU (DESIGN.md §2, appendix B of the paper):
//   1. router logits z = y Wr^T (cuBLAS, F32 always)          (T, N+1)
//   2. fused router -> routing records                          cuda_router.cu
//   3. permutation: slots sorted by expert, null slots cut      cuda_permute.cu
//   4. the expert offsets to the host (the one sync of a layer: cuBLAS needs the group sizes)
//   5. gather the rows of each expert                           xs (rows, D)
//   6. expert FFNs over the rows: grouped cuBLAS GEMMs (or one GEMM per expert), SwiGLU   Y (rows, D)
//   7. shared expert over all tokens (dense)                    (T, D)
//   8. combine per token in slot order (no atomics: the same bits every run)
// Cost follows the real slots: null slots get no row in 5–6.
#include <stdlib.h>
#include <string.h>

#include "cuda_common.cuh"

// ---- gather and combine ----

template <typename Tv>
static __global__ void gather_rows_kernel(Tv *xs, const float *y, const int32_t *row_slot, int K, int D);

template <>
__global__ void gather_rows_kernel<float>(float *xs, const float *y, const int32_t *row_slot, int K, int D) {
    const int row = blockIdx.x, t = row_slot[row] / K;
    for (int d = threadIdx.x; d < D; d += blockDim.x) xs[(size_t)row * D + d] = y[(size_t)t * D + d];
}

template <>
__global__ void gather_rows_kernel<__nv_bfloat16>(__nv_bfloat16 *xs, const float *y, const int32_t *row_slot, int K,
                                                  int D) {
    const int row = blockIdx.x, t = row_slot[row] / K;
    for (int d = threadIdx.x; d < D; d += blockDim.x) xs[(size_t)row * D + d] = __float2bfloat16_rn(y[(size_t)t * D + d]);
}

nm_status nm_cuda_gather_rows(cudaStream_t st, void *xs, const float *y, const int32_t *row_slot, int rows, int K,
                              int D, int bf16, nm_error *err) {
    if (rows <= 0) return NM_OK;
    if (bf16) gather_rows_kernel<__nv_bfloat16><<<rows, 128, 0, st>>>((__nv_bfloat16 *)xs, y, row_slot, K, D);
    else gather_rows_kernel<float><<<rows, 128, 0, st>>>((float *)xs, y, row_slot, K, D);
    NM_LAUNCH_CHECK();
    return NM_OK;
}

static __device__ __forceinline__ float row_value(const float *Y, size_t i) { return Y[i]; }
static __device__ __forceinline__ float row_value(const __nv_bfloat16 *Y, size_t i) { return __bfloat162float(Y[i]); }

template <typename Tv>
static __global__ void combine_kernel(float *out, const float *shared, const Tv *Y, const float *y, const int16_t *slot,
                                      const float *gate, const int32_t *slot_row, int K, int D, int copy) {
    // out[t] = shared[t] (or 0) + Σ_k g_k·E_k(y_t), k in slot order; a copy-kind null slot adds g_k·y_t.
    // Each term is rounded as the CPU rounds it (g·row, then the add).
    const int t = blockIdx.x;
    const int16_t *st = slot + (size_t)t * K;
    const float *gt = gate + (size_t)t * K;
    const int32_t *sr = slot_row + (size_t)t * K;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float acc = shared ? shared[(size_t)t * D + d] : 0.0f;
        for (int k = 0; k < K; k++) {
            if (st[k] >= 0) acc = __fadd_rn(acc, __fmul_rn(gt[k], row_value(Y, (size_t)sr[k] * D + d)));
            else if (copy) acc = __fadd_rn(acc, __fmul_rn(gt[k], y[(size_t)t * D + d]));
        }
        out[(size_t)t * D + d] = acc;
    }
}

nm_status nm_cuda_combine(cudaStream_t st, float *out, const float *shared, const void *Y, int y_bf16, const float *y,
                          const nm_routing *r, const int32_t *slot_row, int T, int K, int D, int copy, nm_error *err) {
    if (T <= 0) return NM_OK;
    const int threads = D < 256 ? 128 : 256;
    if (y_bf16)
        combine_kernel<<<T, threads, 0, st>>>(out, shared, (const __nv_bfloat16 *)Y, y, r->slot, r->gate, slot_row, K, D, copy);
    else combine_kernel<<<T, threads, 0, st>>>(out, shared, (const float *)Y, y, r->slot, r->gate, slot_row, K, D, copy);
    NM_LAUNCH_CHECK();
    return NM_OK;
}

// ---- expert GEMMs ----

// One GEMM family of the experts over their rows: C_e (rows_e, m) = B_e (rows_e, k) A_e (m, k)^T,
// A_e = A + e * m * k (weights), B_e / C_e at the expert's first row. In column-major terms
// C^T (m, rows) = A (k, m)^T B^T (k, rows): transa = T, transb = N.
typedef struct {
    const char *A; // weights of expert 0 (F32 or BF16)
    const char *B; // rows (F32 or BF16)
    char *C;       // output rows (F32 or BF16)
    int m, k;
} expert_gemm;

static nm_status gemm_per_expert(nm_cuda_ctx *c, const expert_gemm *g, int n_gemm, const int32_t *offsets, int N,
                                 nm_error *err) {
    const float one = 1.0f, zero = 0.0f;
    const cudaDataType_t ty = nm_cuda_gemm_type(c);
    const size_t es = nm_cuda_gemm_size(c);
    for (int e = 0; e < N; e++) {
        const int rows = offsets[e + 1] - offsets[e];
        if (rows == 0) continue;
        for (int j = 0; j < n_gemm; j++) {
            const expert_gemm *q = &g[j];
            NM_BLAS_CHECK(cublasGemmEx(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, q->m, rows, q->k, &one,
                                       q->A + (size_t)e * q->m * q->k * es, ty, q->k,
                                       q->B + (size_t)offsets[e] * q->k * es, ty, q->k, &zero,
                                       q->C + (size_t)offsets[e] * q->m * es, ty, q->m, CUBLAS_COMPUTE_32F,
                                       CUBLAS_GEMM_DEFAULT));
        }
    }
    return NM_OK;
}

// One cublasGemmGroupedBatchedEx call for every (GEMM family, expert with rows) pair: each pair is
// a group of one problem (the experts' row counts differ). Returns NM_ERR_UNSUPPORTED when cuBLAS
// refuses the call (then the caller runs per expert).
// The pointer arrays are built in pinned memory and copied to the device on the stream; the two
// calls of a layer (gate+up, down) use separate regions (region 0: 6N pointers, region 1: 3N), so
// the second does not overwrite what the first call's pending copy still reads. The layer's sync
// on the expert offsets orders them against the next layer's calls.
static nm_status gemm_grouped(nm_cuda_ctx *c, const expert_gemm *g, int n_gemm, const int32_t *offsets, int N,
                              int region, nm_error *err) {
    int active = 0;
    for (int e = 0; e < N; e++) active += offsets[e + 1] > offsets[e];
    const int n = active * n_gemm;
    if (n == 0) return NM_OK;
    if (c->h_ptrs_cap < 9 * (size_t)N) {
        NM_CU_CHECK(cudaStreamSynchronize(c->stream)); // no copy reads the old array any more
        cudaFreeHost(c->h_ptrs);
        c->h_ptrs = NULL;
        c->h_ptrs_cap = 0;
        NM_CU_CHECK(cudaMallocHost((void **)&c->h_ptrs, 9 * (size_t)N * sizeof(void *)));
        c->h_ptrs_cap = 9 * (size_t)N;
    }
    void **h_ptrs = c->h_ptrs + (region ? 6 * (size_t)N : 0);
    int *ints = (int *)malloc((size_t)n * 6 * sizeof(int));
    float *scal = (float *)malloc((size_t)n * 2 * sizeof(float));
    cublasOperation_t *ops = (cublasOperation_t *)malloc((size_t)n * 2 * sizeof(cublasOperation_t));
    if (!ints || !scal || !ops) {
        free(ints);
        free(scal);
        free(ops);
        return NM_NOMEM(err, "grouped GEMM arguments");
    }
    int *m = ints, *nn = ints + n, *k = ints + 2 * n, *lda = ints + 3 * n, *ldb = ints + 4 * n, *ldc = ints + 5 * n;
    const size_t es = nm_cuda_gemm_size(c);
    void **hA = h_ptrs, **hB = hA + n, **hC = hB + n;
    int p = 0;
    for (int j = 0; j < n_gemm; j++)
        for (int e = 0; e < N; e++) {
            const int rows = offsets[e + 1] - offsets[e];
            if (rows == 0) continue;
            const expert_gemm *q = &g[j];
            ops[p] = CUBLAS_OP_T;
            ops[n + p] = CUBLAS_OP_N;
            m[p] = q->m, nn[p] = rows, k[p] = q->k, lda[p] = q->k, ldb[p] = q->k, ldc[p] = q->m;
            scal[p] = 1.0f, scal[n + p] = 0.0f;
            hA[p] = (void *)(q->A + (size_t)e * q->m * q->k * es);
            hB[p] = (void *)(q->B + (size_t)offsets[e] * q->k * es);
            hC[p] = (void *)(q->C + (size_t)offsets[e] * q->m * es);
            p++;
        }
    int *group_size = (int *)malloc((size_t)n * sizeof(int));
    void *d_ptrs = NULL;
    nm_status s = group_size ? nm_cuda_scratch(c, SCR_PTRS, 9 * (size_t)N * sizeof(void *), &d_ptrs, err)
                             : NM_NOMEM(err, "grouped GEMM arguments");
    if (s == NM_OK) {
        for (int i = 0; i < n; i++) group_size[i] = 1;
        d_ptrs = (void **)d_ptrs + (region ? 6 * (size_t)N : 0);
        cudaError_t ce = cudaMemcpyAsync(d_ptrs, h_ptrs, 3 * (size_t)n * sizeof(void *), cudaMemcpyHostToDevice, c->stream);
        if (ce != cudaSuccess) s = nm_fail(err, NM_ERR_INTERNAL, "CUDA: grouped GEMM pointers: %s", cudaGetErrorString(ce));
    }
    if (s == NM_OK) {
        void **dA = (void **)d_ptrs, **dB = dA + n, **dC = dB + n;
        const cudaDataType_t ty = nm_cuda_gemm_type(c);
        cublasStatus_t bs = cublasGemmGroupedBatchedEx(c->blas, ops, ops + n, m, nn, k, scal, (const void *const *)dA, ty,
                                                       lda, (const void *const *)dB, ty, ldb, scal + n, dC, ty, ldc, n,
                                                       group_size, CUBLAS_COMPUTE_32F);
        if (bs == CUBLAS_STATUS_NOT_SUPPORTED || bs == CUBLAS_STATUS_INVALID_VALUE)
            s = nm_fail(err, NM_ERR_UNSUPPORTED, "cuBLAS grouped GEMM refused: %s", cublasGetStatusString(bs));
        else if (bs != CUBLAS_STATUS_SUCCESS)
            s = nm_fail(err, NM_ERR_INTERNAL, "cuBLAS grouped GEMM: %s", cublasGetStatusString(bs));
    }
    free(group_size);
    free(ints);
    free(scal);
    free(ops);
    return s;
}

static nm_status run_expert_gemms(nm_cuda_ctx *c, const expert_gemm *g, int n_gemm, const int32_t *offsets, int N,
                                  nm_gemm_mode mode, int region, nm_error *err) {
    if (mode == NM_GEMM_PER_EXPERT || (mode == NM_GEMM_AUTO && c->grouped_unsupported))
        return gemm_per_expert(c, g, n_gemm, offsets, N, err);
    nm_status s = gemm_grouped(c, g, n_gemm, offsets, N, region, err);
    if (s == NM_ERR_UNSUPPORTED && mode == NM_GEMM_AUTO) { // remember, and run this layer per expert
        c->grouped_unsupported = 1;
        return gemm_per_expert(c, g, n_gemm, offsets, N, err);
    }
    return s;
}

nm_status nm_cuda_expert_ffn(nm_cuda_ctx *c, void *Y, const void *xs, const nm_moe_weights *w, const int32_t *offsets,
                             int N, int D, int H, nm_gemm_mode mode, nm_error *err) {
    const int rows = offsets[N];
    if (rows == 0) return NM_OK;
    const size_t es = nm_cuda_gemm_size(c);
    void *G, *U;
    NM_TRY(nm_cuda_scratch(c, SCR_G, (size_t)rows * H * es, &G, err));
    NM_TRY(nm_cuda_scratch(c, SCR_U, (size_t)rows * H * es, &U, err));
    // gate and up in one call: G_e = xs_e W_gate[e]^T, U_e = xs_e W_up[e]^T   (rows_e, H)
    const expert_gemm gate_up[2] = {{(const char *)w->gate, (const char *)xs, (char *)G, H, D},
                                    {(const char *)w->up, (const char *)xs, (char *)U, H, D}};
    NM_TRY(run_expert_gemms(c, gate_up, 2, offsets, N, mode, 0, err));
    NM_TRY(nm_cuda_swiglu(c->stream, G, G, U, (size_t)rows * H, c->bf16, err)); // G = silu(G) * U
    // down: Y_e = G_e W_down[e]^T   (rows_e, D)
    const expert_gemm down = {(const char *)w->down, (const char *)G, (char *)Y, D, H};
    return run_expert_gemms(c, &down, 1, offsets, N, mode, 1, err);
}

// ---- the layer ----

static nm_status routing_scratch(nm_cuda_ctx *c, nm_routing *r, int T, int K, nm_error *err) {
    const size_t t = (size_t)T, tk = t * K;
    void *p[6];
    NM_TRY(nm_cuda_scratch(c, SCR_R_NREAL, t, &p[0], err));
    NM_TRY(nm_cuda_scratch(c, SCR_R_SLOT, tk * sizeof(int16_t), &p[1], err));
    NM_TRY(nm_cuda_scratch(c, SCR_R_PROB, tk * sizeof(float), &p[2], err));
    NM_TRY(nm_cuda_scratch(c, SCR_R_GATE, tk * sizeof(float), &p[3], err));
    NM_TRY(nm_cuda_scratch(c, SCR_R_NULL, t * sizeof(float), &p[4], err));
    NM_TRY(nm_cuda_scratch(c, SCR_R_LSE, t * sizeof(float), &p[5], err));
    *r = (nm_routing){(uint8_t *)p[0], (int16_t *)p[1], (float *)p[2], (float *)p[3], (float *)p[4], (float *)p[5]};
    return NM_OK;
}

// The shared expert over every token: out (T, D) = W_down (silu(W_gate y) * W_up y)
static nm_status shared_expert(nm_cuda_ctx *c, float *out, const float *y, const nm_moe_weights *w, int T, int D, int Hs,
                               nm_error *err) {
    void *h;
    NM_TRY(nm_cuda_scratch(c, SCR_SH_H, 2 * (size_t)T * Hs * sizeof(float), &h, err));
    float *g = (float *)h, *u = g + (size_t)T * Hs;
    NM_TRY(nm_cuda_linear(c, g, y, w->sh_gate, T, D, Hs, 0.0f, err));
    NM_TRY(nm_cuda_linear(c, u, y, w->sh_up, T, D, Hs, 0.0f, err));
    NM_TRY(nm_cuda_swiglu(c->stream, g, g, u, (size_t)T * Hs, 0, err));
    return nm_cuda_linear(c, out, g, w->sh_down, T, Hs, D, 0.0f, err);
}

nm_status nm_cuda_moe(nm_cuda_ctx *c, float *out, const float *y, const nm_moe_weights *w, const nm_moe_config *mc,
                      int T, int D, const nm_routing *routing, nm_error *err) {
    // y: (T, D)  out: (T, D)
    if (T <= 0) return NM_OK;
    const int N = mc->num_experts, K = mc->top_k, H = mc->expert_hidden, Hs = mc->shared_expert_hidden;
    const size_t TK = (size_t)T * K, es = nm_cuda_gemm_size(c);
    nm_routing local;
    if (!routing) {
        NM_TRY(routing_scratch(c, &local, T, K, err));
        routing = &local;
    }
    // 1–2. router logits (F32) and the fused routing
    void *z;
    NM_TRY(nm_cuda_scratch(c, SCR_LOGITS, (size_t)T * (N + 1) * sizeof(float), &z, err));
    const float one = 1.0f, zero = 0.0f;
    NM_BLAS_CHECK(cublasSgemm(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, N + 1, T, D, &one, w->router, D, y, D, &zero, (float *)z,
                              N + 1));
    NM_TRY(nm_cuda_route(c->stream, routing, (const float *)z, T, mc, err));
    // 3. permutation
    void *chunk_counts, *totals, *offsets, *row_slot, *slot_row;
    const size_t n_chunks = (TK + NM_CUDA_PERMUTE_CHUNK - 1) / NM_CUDA_PERMUTE_CHUNK;
    NM_TRY(nm_cuda_scratch(c, SCR_CHUNK_COUNTS, n_chunks * N * sizeof(int32_t), &chunk_counts, err));
    NM_TRY(nm_cuda_scratch(c, SCR_TOTALS, (size_t)N * sizeof(int32_t), &totals, err));
    NM_TRY(nm_cuda_scratch(c, SCR_OFFSETS, (size_t)(N + 1) * sizeof(int32_t), &offsets, err));
    NM_TRY(nm_cuda_scratch(c, SCR_ROW_SLOT, TK * sizeof(int32_t), &row_slot, err));
    NM_TRY(nm_cuda_scratch(c, SCR_SLOT_ROW, TK * sizeof(int32_t), &slot_row, err));
    NM_TRY(nm_cuda_permute(c->stream, (int32_t *)offsets, (int32_t *)row_slot, (int32_t *)slot_row,
                           (int32_t *)chunk_counts, (int32_t *)totals, routing->slot, T, K, N, err));
    // 4. the expert offsets to the host
    if (c->h_offsets_cap < (size_t)N + 1) {
        cudaFreeHost(c->h_offsets);
        c->h_offsets = NULL;
        c->h_offsets_cap = 0;
        NM_CU_CHECK(cudaMallocHost((void **)&c->h_offsets, (size_t)(N + 1) * sizeof(int32_t)));
        c->h_offsets_cap = (size_t)N + 1;
    }
    NM_CU_CHECK(cudaMemcpyAsync(c->h_offsets, offsets, (size_t)(N + 1) * sizeof(int32_t), cudaMemcpyDeviceToHost, c->stream));
    NM_CU_CHECK(cudaStreamSynchronize(c->stream));
    const int rows = c->h_offsets[N];
    // 5–6. gathered rows through the expert FFNs
    void *xs = NULL, *Y = NULL;
    if (rows > 0) {
        NM_TRY(nm_cuda_scratch(c, SCR_XS, (size_t)rows * D * es, &xs, err));
        NM_TRY(nm_cuda_scratch(c, SCR_Y, (size_t)rows * D * es, &Y, err));
        NM_TRY(nm_cuda_gather_rows(c->stream, xs, y, (const int32_t *)row_slot, rows, K, D, c->bf16, err));
        NM_TRY(nm_cuda_expert_ffn(c, Y, xs, w, c->h_offsets, N, D, H, c->expert_gemm, err));
    }
    // 7. shared expert
    float *sh = NULL;
    if (Hs > 0) {
        void *p;
        NM_TRY(nm_cuda_scratch(c, SCR_SH_OUT, (size_t)T * D * sizeof(float), &p, err));
        sh = (float *)p;
        NM_TRY(shared_expert(c, sh, y, w, T, D, Hs, err));
    }
    // 8. combine
    return nm_cuda_combine(c->stream, out, sh, Y, c->bf16, y, routing, (const int32_t *)slot_row, T, K, D,
                           mc->null_kind == NM_NULL_COPY, err);
}
