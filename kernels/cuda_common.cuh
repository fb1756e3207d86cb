// cuda_common.cuh — internal to the CUDA backend: the backend state, the one error-checking
// macro family (CUDA runtime, cuBLAS, kernel launches), scratch buffers, and the launchers
// of every kernel (also used by kernels/sandbox.cu, which checks them one by one).
//
// Layout conventions: row-major, shapes (rows, cols) as in lib/. Every launcher takes the
// stream it runs on, returns an nm_status and fills the nm_error on failure.
#ifndef NM_CUDA_COMMON_CUH
#define NM_CUDA_COMMON_CUH

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

extern "C" {
#include "nm_backend.h"
#include "nm_cuda.h"
}

// ---- errors: every CUDA / cuBLAS call and every launch goes through these ----

#define NM_CU_CHECK(call)                                                                                       \
    do {                                                                                                        \
        cudaError_t e_ = (call);                                                                                \
        if (e_ != cudaSuccess)                                                                                  \
            return nm_fail(err, e_ == cudaErrorMemoryAllocation ? NM_ERR_NOMEM : NM_ERR_INTERNAL,                \
                           "CUDA: %s (%s) at %s:%d", cudaGetErrorString(e_), cudaGetErrorName(e_), __FILE__, __LINE__); \
    } while (0)

#define NM_BLAS_CHECK(call)                                                                                     \
    do {                                                                                                        \
        cublasStatus_t b_ = (call);                                                                             \
        if (b_ != CUBLAS_STATUS_SUCCESS)                                                                        \
            return nm_fail(err, b_ == CUBLAS_STATUS_ALLOC_FAILED ? NM_ERR_NOMEM : NM_ERR_INTERNAL,               \
                           "cuBLAS: %s at %s:%d", cublasGetStatusString(b_), __FILE__, __LINE__);              \
    } while (0)

// After a <<<...>>> launch: launch-configuration errors surface here.
#define NM_LAUNCH_CHECK() NM_CU_CHECK(cudaGetLastError())

#define NM_TRY(expr)                                                                                            \
    do {                                                                                                        \
        nm_status s_ = (expr);                                                                                  \
        if (s_ != NM_OK) return s_;                                                                             \
    } while (0)

// ---- scratch: device buffers that grow on demand (contents not kept) ----

enum nm_cuda_scratch {
    SCR_IDS, SCR_PATCH_LIST, SCR_PIXELS, SCR_PATCH_ROWS, SCR_PATCH_EMB, // embed
    SCR_X_BF16,                                                          // linear: x as BF16
    SCR_LOGITS,                                                          // moe: router logits (T, N+1)
    SCR_R_NREAL, SCR_R_SLOT, SCR_R_PROB, SCR_R_GATE, SCR_R_NULL, SCR_R_LSE, // routing when none is given
    SCR_CHUNK_COUNTS, SCR_TOTALS, SCR_OFFSETS, SCR_ROW_SLOT, SCR_SLOT_ROW, // permutation
    SCR_XS, SCR_G, SCR_U, SCR_Y, SCR_PTRS,                               // expert GEMMs
    SCR_SH_H, SCR_SH_OUT,                                                // shared expert
    SCR_COUNT
};

// Pending copy from the pinned staging buffer to a host destination (done at finish).
typedef struct {
    void *dst;
    size_t offset, bytes;
} nm_cuda_pending;

typedef struct {
    int device;
    int bf16;                   // GEMM weights and inputs in BF16
    nm_gemm_mode expert_gemm;   // requested mode
    int grouped_unsupported;    // cuBLAS refused the grouped call once: per-expert from then on
    cudaStream_t stream;        // every op
    cudaStream_t copy_stream;   // routing records to the host
    cudaEvent_t routing_ready;  // recorded on `stream` before each routing copy
    cublasHandle_t blas;
    void *scr[SCR_COUNT];
    size_t scr_cap[SCR_COUNT];
    // pinned host memory
    int32_t *h_offsets;         // [N+1] expert offsets of the current layer
    size_t h_offsets_cap;       // ints
    void **h_ptrs;              // pointer arrays of a grouped GEMM, built on the host
    size_t h_ptrs_cap;          // pointers
    char *h_stage;              // routing records on their way to the trace
    size_t h_stage_cap, h_stage_used;
    nm_cuda_pending *pending;
    int n_pending, pending_cap;
} nm_cuda_ctx;

static inline nm_cuda_ctx *nm_cuda_get(nm_backend *b) { return (nm_cuda_ctx *)b->ctx; }

// Device scratch slot `which` with at least `bytes` (contents are lost when it grows).
nm_status nm_cuda_scratch(nm_cuda_ctx *c, int which, size_t bytes, void **out, nm_error *err);

// Element type of GEMM operands in the current mode.
static inline cudaDataType_t nm_cuda_gemm_type(const nm_cuda_ctx *c) { return c->bf16 ? CUDA_R_16BF : CUDA_R_32F; }
static inline size_t nm_cuda_gemm_size(const nm_cuda_ctx *c) { return c->bf16 ? 2 : 4; }

// ---- launchers (kernels/cuda_*.cu) ----

// cuda_dense.cu
nm_status nm_cuda_linear(nm_cuda_ctx *c, float *out, const float *x, const void *W, int T, int in, int out_dim,
                         float beta, nm_error *err);
nm_status nm_cuda_rmsnorm(cudaStream_t st, float *out, const float *x, const float *w, int T, int D, float eps,
                          nm_error *err);
nm_status nm_cuda_rope(cudaStream_t st, float *x, const float *cs, int T, int n_heads, int hd, nm_error *err);
nm_status nm_cuda_add(cudaStream_t st, float *x, const float *y, size_t n, nm_error *err);
// x (n) as BF16 into out (n)
nm_status nm_cuda_to_bf16(cudaStream_t st, __nv_bfloat16 *out, const float *x, size_t n, nm_error *err);
nm_status nm_cuda_embed(nm_cuda_ctx *c, float *x, const nm_model *w, const int32_t *ids, const int32_t *patch_idx,
                        const float *pixels, int T, nm_error *err);
// out (n) = silu(g) * u; g, u, out F32 or (bf16 = 1) BF16. out may alias g.
nm_status nm_cuda_swiglu(cudaStream_t st, void *out, const void *g, const void *u, size_t n, int bf16, nm_error *err);

// cuda_attention.cu
#define NM_CUDA_MAX_HEAD_DIM 256
nm_status nm_cuda_attention(cudaStream_t st, float *att, const float *q, const float *kc, const float *vc, int T,
                            int pos0, int nh, int nkv, int hd, nm_error *err);

// cuda_router.cu: routing records of T tokens from router logits z (T, N+1), DESIGN.md §2.
nm_status nm_cuda_route(cudaStream_t st, const nm_routing *r, const float *z, int T, const nm_moe_config *mc,
                        nm_error *err);

// cuda_permute.cu: slots sorted by expert, tokens in order inside each expert's block, null
// slots cut. slot: (T*K) expert ids (-1 null). Fills offsets (N+1) (exclusive prefix sum of the
// per-expert counts), row_slot (offsets[N]) = slot index t*K+k of each row, slot_row (T*K) = row
// of each slot or -1. chunk_counts: scratch (ceil(TK/1024), N); totals: scratch (N).
#define NM_CUDA_PERMUTE_CHUNK 1024
nm_status nm_cuda_permute(cudaStream_t st, int32_t *offsets, int32_t *row_slot, int32_t *slot_row,
                          int32_t *chunk_counts, int32_t *totals, const int16_t *slot, int T, int K, int N,
                          nm_error *err);

// cuda_moe.cu
// xs (rows, D) = y[token of row] (F32 or BF16).
nm_status nm_cuda_gather_rows(cudaStream_t st, void *xs, const float *y, const int32_t *row_slot, int rows, int K,
                              int D, int bf16, nm_error *err);
// out (T, D) = shared (or 0) + Σ_k in slot order: gate·Y[slot_row] (real) or gate·y (copy null).
nm_status nm_cuda_combine(cudaStream_t st, float *out, const float *shared, const void *Y, int y_bf16, const float *y,
                          const nm_routing *r, const int32_t *slot_row, int T, int K, int D, int copy, nm_error *err);
// The expert FFNs of one layer over the permuted rows: Y = down(silu(gate xs) * up xs) per expert.
// offsets: HOST (N+1). mode: grouped or per expert (AUTO: grouped, falling back once refused).
nm_status nm_cuda_expert_ffn(nm_cuda_ctx *c, void *Y, const void *xs, const nm_moe_weights *w, const int32_t *offsets,
                             int N, int D, int H, nm_gemm_mode mode, nm_error *err);
nm_status nm_cuda_moe(nm_cuda_ctx *c, float *out, const float *y, const nm_moe_weights *w, const nm_moe_config *mc,
                      int T, int D, const nm_routing *r, nm_error *err);

#endif
