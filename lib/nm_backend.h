// nm_backend.h — compute backends of the forward engine: a table of function pointers.
//
// The engine (nm_engine.c) is a driver: it owns the activations and the KV cache, allocated
// in the backend's memory, and calls one table entry per step of the forward pass. The CPU
// backend (nm_backend_cpu.c) wraps the reference code of nm_ops.c / nm_moe.c unchanged, so its
// results are bit-identical to what the engine computed before the table existed. The CUDA
// backend (kernels/, built when nvcc is found) implements the same entries with kernels and
// cuBLAS.
//
// Granularity. One entry per op the engine's forward calls: embed, linear, rmsnorm, rope,
// attention (against the KV cache), residual add, the router (moe_route) and the whole MoE layer
// (moe). The MoE layer is one entry, not five (router, permutation, grouped GEMM, SwiGLU,
// combine): on the CPU those steps are one fused, multi-threaded pass over shared scratch
// (nm_moe.c) that must stay bit-identical, and on the GPU they share device scratch and one
// host sync (the expert counts). The CUDA steps are tested one by one in the kernel sandbox
// (kernels/sandbox.cu); the table test (tests/test_backend.c) checks the layer and the router.
//
// Memory. Every float/int pointer given to an op lies in the backend's memory (host memory for
// the CPU backend, device memory for CUDA), except where an entry says "host". Shapes are
// (rows, cols), row-major. Ops are queued in order; only to_host and finish wait for them.
//
// Weights. model_upload returns the model "as the backend holds it": an nm_model whose
// pointers are backend addresses (the CPU backend returns the host model itself). With
// opt.bf16 the CUDA backend stores every GEMM weight as BF16 (attention projections, patch
// embedding, expert and shared-expert FFNs, the LM head) and runs those GEMMs on BF16 inputs
// with F32 accumulation; the router, norms, biases, position and token embeddings stay F32.
// Such pointers are typed float * but hold BF16: only the backend dereferences them.
#ifndef NM_BACKEND_H
#define NM_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "nm_error.h"
#include "nm_model.h"
#include "nm_moe.h"

#ifdef __cplusplus
extern "C" {
#endif

// How a backend runs the expert GEMMs (CUDA: grouped cuBLAS call or one call per expert).
typedef enum {
    NM_GEMM_AUTO = 0,       // the backend's choice (CUDA: grouped when supported)
    NM_GEMM_GROUPED = 1,    // cublasGemmGroupedBatchedEx over the experts of a layer
    NM_GEMM_PER_EXPERT = 2, // one cublasGemmEx per expert with tokens
} nm_gemm_mode;

typedef struct {
    int bf16;                 // 1: BF16 GEMM weights and inputs, F32 accumulation (CUDA only)
    nm_gemm_mode expert_gemm; // CUDA only
    int device_index;         // CUDA device ordinal
} nm_backend_options;

typedef struct nm_backend nm_backend;

typedef struct nm_backend_ops {
    const char *name;
    int host_memory; // 1: backend memory is ordinary host memory (the CPU backend)

    // ---- instance ----
    nm_status (*open)(nm_backend *b, nm_error *err); // sets b->ctx
    void (*close)(nm_backend *b);

    // ---- memory ----
    nm_status (*alloc)(nm_backend *b, void **p, size_t bytes, nm_error *err);
    void (*release)(nm_backend *b, void *p); // NULL is a no-op
    // dst (backend) <- src (host); the host buffer may be reused when the call returns.
    nm_status (*to_backend)(nm_backend *b, void *dst, const void *src, size_t bytes, nm_error *err);
    // dst (host) <- src (backend); waits for every queued op first.
    nm_status (*to_host)(nm_backend *b, void *dst, const void *src, size_t bytes, nm_error *err);

    // ---- weights ----
    nm_status (*model_upload)(nm_backend *b, const nm_model *host, const nm_model **out, nm_error *err);
    void (*model_release)(nm_backend *b, const nm_model *w); // w from model_upload; NULL is a no-op

    // ---- the ops of the forward pass ----
    // x (T, D) = token embeddings, and for patch tokens patch_w · pixels + patch_b + pos_embed.
    // ids, patch_idx: (T) HOST arrays (-1 id: an image patch at patch_idx); pixels: (3, S, S) HOST.
    nm_status (*embed)(nm_backend *b, float *x, const nm_model *w, const int32_t *ids, const int32_t *patch_idx,
                       const float *pixels, int T, nm_error *err);
    // out (T, out_dim) = x (T, in) · W (out_dim, in)^T (+ beta · out). beta is 0 or 1.
    nm_status (*linear)(nm_backend *b, float *out, const float *x, const float *W, int T, int in, int out_dim,
                        float beta, nm_error *err);
    // out (T, D) = x / sqrt(mean(x²) + eps) · w (D). out may alias x.
    nm_status (*rmsnorm)(nm_backend *b, float *out, const float *x, const float *w, int T, int D, float eps,
                         nm_error *err);
    // Rotary embedding in place, half-split pairs (i, i + hd/2). x: (T, n_heads*hd);
    // cs: (T, hd) the position table's rows of these tokens (cos of the hd/2 angles, then sin).
    nm_status (*rope)(nm_backend *b, float *x, const float *cs, int T, int n_heads, int hd, nm_error *err);
    // Causal GQA attention of T queries at positions pos0.. against keys/values 0..pos0+T-1.
    // q: (T, nh*hd); kc, vc: (≥ pos0+T, nkv*hd) this layer's cache; att: (T, nh*hd).
    // Query head h reads kv head h / (nh/nkv); scale 1/sqrt(hd).
    nm_status (*attention)(nm_backend *b, float *att, const float *q, const float *kc, const float *vc, int T,
                           int pos0, int nh, int nkv, int hd, nm_error *err);
    // x (n) += y (n)
    nm_status (*add)(nm_backend *b, float *x, const float *y, size_t n, nm_error *err);
    // Routing of T tokens from router logits z: (T, N+1) (DESIGN.md §2; r's arrays in backend memory).
    nm_status (*moe_route)(nm_backend *b, const nm_routing *r, const float *z, int T, const nm_moe_config *mc,
                           nm_error *err);
    // out (T, D) = SharedExpert(y) + Σ_{i∈R} g_i E_i(y) (+ copy-kind null terms); y: (T, D).
    // w: this layer's weights as the backend holds them. r: routing out (backend memory) or NULL.
    nm_status (*moe)(nm_backend *b, float *out, const float *y, const nm_moe_weights *w, const nm_moe_config *mc,
                     int T, int D, const nm_routing *r, nm_error *err);
    // Routing records of T tokens: dst (HOST) <- src (backend). May complete only at `finish`;
    // src must not be overwritten before then.
    nm_status (*routing_to_host)(nm_backend *b, const nm_routing *dst, const nm_routing *src, int T, int K,
                                 nm_error *err);
    // Waits for every queued op and copy.
    nm_status (*finish)(nm_backend *b, nm_error *err);
} nm_backend_ops;

struct nm_backend {
    const nm_backend_ops *ops;
    nm_backend_options opt;
    void *ctx; // the backend's own state
};

// ---- registry ----

// The table of backend `name` ("cpu" or "cuda"), or NM_ERR_UNSUPPORTED with a message:
// "CUDA backend not built (...)" or "no CUDA device found: <reason>".
nm_status nm_backend_get(const char *name, const nm_backend_ops **ops, nm_error *err);
// Opens an instance (opt may be NULL: defaults). Free with nm_backend_close.
nm_status nm_backend_open(nm_backend **out, const char *name, const nm_backend_options *opt, nm_error *err);
void nm_backend_close(nm_backend *b);
// "cuda" when the CUDA backend is built and a device is present, else "cpu".
const char *nm_backend_default_name(void);
// One line for `nullmap --version`: "cpu (OpenBLAS), cuda (built with CUDA 13.0; 1 device: …)".
void nm_backend_describe(char *buf, size_t n);
// 1 when the CUDA backend is compiled in (a device may still be missing).
int nm_backend_cuda_built(void);

// The CPU table (always present).
const nm_backend_ops *nm_backend_cpu_ops(void);

#ifdef __cplusplus
}
#endif

#endif
