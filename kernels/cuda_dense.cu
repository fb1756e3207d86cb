// cuda_dense.cu — the dense ops of the CUDA backend: linear (cuBLAS), RMSNorm, RoPE, residual
// add, BF16 conversion, token + patch embedding, SwiGLU.
//
// Elementwise arithmetic uses explicit round-to-nearest intrinsics (__fmul_rn, __fadd_rn) where
// the CPU reference does separate multiplies and adds: nvcc would otherwise contract them into
// FMAs, and these ops can then match the CPU bit for bit (tests/test_backend.c checks them).
#include <stdlib.h>

#include "cuda_common.cuh"

// ---- linear: out (T, out_dim) = x (T, in) W^T (+ beta out) ----

nm_status nm_cuda_linear(nm_cuda_ctx *c, float *out, const float *x, const void *W, int T, int in, int out_dim,
                         float beta, nm_error *err) {
    if (T <= 0 || out_dim <= 0) return NM_OK;
    const float one = 1.0f;
    // Row-major out = x W^T is column-major out^T (out_dim, T) = W (in, out_dim)^T · x^T (in, T).
    if (!c->bf16) {
        NM_BLAS_CHECK(cublasSgemm(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, out_dim, T, in, &one, (const float *)W, in, x, in,
                                  &beta, out, out_dim));
        return NM_OK;
    }
    void *xb;
    NM_TRY(nm_cuda_scratch(c, SCR_X_BF16, (size_t)T * in * sizeof(__nv_bfloat16), &xb, err));
    NM_TRY(nm_cuda_to_bf16(c->stream, (__nv_bfloat16 *)xb, x, (size_t)T * in, err));
    NM_BLAS_CHECK(cublasGemmEx(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, out_dim, T, in, &one, W, CUDA_R_16BF, in, xb,
                               CUDA_R_16BF, in, &beta, out, CUDA_R_32F, out_dim, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    return NM_OK;
}

// ---- RMSNorm: one block per row, the sum of squares in double (as the CPU) ----

#define NORM_THREADS 256

static __global__ void rmsnorm_kernel(float *out, const float *x, const float *w, int D, float eps) {
    // x, out: (T, D), row blockIdx.x
    const float *xr = x + (size_t)blockIdx.x * D;
    float *o = out + (size_t)blockIdx.x * D;
    double ss = 0.0;
    for (int i = threadIdx.x; i < D; i += NORM_THREADS) ss += (double)xr[i] * xr[i];
    __shared__ double part[NORM_THREADS];
    part[threadIdx.x] = ss;
    __syncthreads();
    for (int s = NORM_THREADS / 2; s > 0; s /= 2) { // fixed tree: the same sum every run
        if (threadIdx.x < s) part[threadIdx.x] += part[threadIdx.x + s];
        __syncthreads();
    }
    const float r = (float)(1.0 / sqrt(part[0] / D + eps));
    for (int i = threadIdx.x; i < D; i += NORM_THREADS) o[i] = __fmul_rn(__fmul_rn(xr[i], r), w[i]);
}

nm_status nm_cuda_rmsnorm(cudaStream_t st, float *out, const float *x, const float *w, int T, int D, float eps,
                          nm_error *err) {
    if (T <= 0) return NM_OK;
    rmsnorm_kernel<<<T, NORM_THREADS, 0, st>>>(out, x, w, D, eps);
    NM_LAUNCH_CHECK();
    return NM_OK;
}

// ---- RoPE with the engine's position table: x (T, n_heads*hd), cs (T, hd) ----

static __global__ void rope_kernel(float *x, const float *cs_rows, int n_heads, int hd) {
    const int t = blockIdx.x, h = blockIdx.y, half = hd / 2;
    const float *cs = cs_rows + (size_t)t * hd, *sn = cs + half;
    float *v = x + ((size_t)t * n_heads + h) * hd;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const float x0 = v[i], x1 = v[i + half];
        v[i] = __fsub_rn(__fmul_rn(x0, cs[i]), __fmul_rn(x1, sn[i]));
        v[i + half] = __fadd_rn(__fmul_rn(x1, cs[i]), __fmul_rn(x0, sn[i]));
    }
}

nm_status nm_cuda_rope(cudaStream_t st, float *x, const float *cs, int T, int n_heads, int hd, nm_error *err) {
    if (T <= 0 || n_heads <= 0) return NM_OK;
    const int threads = hd / 2 < 32 ? 32 : (hd / 2 > 128 ? 128 : hd / 2);
    rope_kernel<<<dim3(T, n_heads), threads, 0, st>>>(x, cs, n_heads, hd);
    NM_LAUNCH_CHECK();
    return NM_OK;
}

// ---- elementwise ----

static __global__ void add_kernel(float *x, const float *y, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        x[i] = __fadd_rn(x[i], y[i]);
}

static int grid_for(size_t n, int threads) {
    size_t g = (n + threads - 1) / threads;
    return (int)(g > 65535 ? 65535 : (g ? g : 1));
}

nm_status nm_cuda_add(cudaStream_t st, float *x, const float *y, size_t n, nm_error *err) {
    if (n == 0) return NM_OK;
    add_kernel<<<grid_for(n, 256), 256, 0, st>>>(x, y, n);
    NM_LAUNCH_CHECK();
    return NM_OK;
}

static __global__ void to_bf16_kernel(__nv_bfloat16 *out, const float *x, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = __float2bfloat16_rn(x[i]);
}

nm_status nm_cuda_to_bf16(cudaStream_t st, __nv_bfloat16 *out, const float *x, size_t n, nm_error *err) {
    if (n == 0) return NM_OK;
    to_bf16_kernel<<<grid_for(n, 256), 256, 0, st>>>(out, x, n);
    NM_LAUNCH_CHECK();
    return NM_OK;
}

static __device__ __forceinline__ float load_f(const float *p, size_t i) { return p[i]; }
static __device__ __forceinline__ float load_f(const __nv_bfloat16 *p, size_t i) { return __bfloat162float(p[i]); }
static __device__ __forceinline__ void store_f(float *p, size_t i, float v) { p[i] = v; }
static __device__ __forceinline__ void store_f(__nv_bfloat16 *p, size_t i, float v) { p[i] = __float2bfloat16_rn(v); }

template <typename Tv>
static __global__ void swiglu_kernel(Tv *out, const Tv *g, const Tv *u, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float a = load_f(g, i);
        store_f(out, i, __fmul_rn(__fdiv_rn(a, __fadd_rn(1.0f, expf(-a))), load_f(u, i)));
    }
}

nm_status nm_cuda_swiglu(cudaStream_t st, void *out, const void *g, const void *u, size_t n, int bf16, nm_error *err) {
    if (n == 0) return NM_OK;
    if (bf16)
        swiglu_kernel<<<grid_for(n, 256), 256, 0, st>>>((__nv_bfloat16 *)out, (const __nv_bfloat16 *)g,
                                                        (const __nv_bfloat16 *)u, n);
    else swiglu_kernel<<<grid_for(n, 256), 256, 0, st>>>((float *)out, (const float *)g, (const float *)u, n);
    NM_LAUNCH_CHECK();
    return NM_OK;
}

// ---- embeddings ----

static __global__ void embed_tokens_kernel(float *x, const float *E, const int32_t *ids, int D) {
    // x: (T, D); E: (V, D); rows of patch tokens (id -1) are left for the patch path
    const int t = blockIdx.x, id = ids[t];
    if (id < 0) return;
    for (int d = threadIdx.x; d < D; d += blockDim.x) x[(size_t)t * D + d] = E[(size_t)id * D + d];
}

static __global__ void patch_gather_kernel(float *rows, const float *pixels, const int32_t *list, int S, int p) {
    // rows: (n_patch, 3*p*p) in (channel, row, col) order; list: (n_patch, 2) = token, patch index
    const int r = blockIdx.x, g = S / p, pp = 3 * p * p, pidx = list[2 * r + 1], gr = pidx / g, gc = pidx % g;
    for (int i = threadIdx.x; i < pp; i += blockDim.x) {
        const int ch = i / (p * p), y = (i / p) % p, xx = i % p;
        rows[(size_t)r * pp + i] = pixels[((size_t)ch * S + gr * p + y) * S + gc * p + xx];
    }
}

static __global__ void patch_finish_kernel(float *x, const float *emb, const float *bias, const float *pos,
                                           const int32_t *list, int D) {
    // x[token] = (emb[r] + bias) + pos_embed[patch]
    const int r = blockIdx.x, t = list[2 * r], pidx = list[2 * r + 1];
    for (int d = threadIdx.x; d < D; d += blockDim.x)
        x[(size_t)t * D + d] = __fadd_rn(__fadd_rn(emb[(size_t)r * D + d], bias[d]), pos[(size_t)pidx * D + d]);
}

nm_status nm_cuda_embed(nm_cuda_ctx *c, float *x, const nm_model *w, const int32_t *ids, const int32_t *patch_idx,
                        const float *pixels, int T, nm_error *err) {
    // ids, patch_idx, pixels: host
    const nm_config *cfg = &w->cfg;
    const int D = cfg->hidden_size;
    void *d_ids;
    NM_TRY(nm_cuda_scratch(c, SCR_IDS, (size_t)T * sizeof(int32_t), &d_ids, err));
    NM_CU_CHECK(cudaMemcpyAsync(d_ids, ids, (size_t)T * sizeof(int32_t), cudaMemcpyHostToDevice, c->stream));
    embed_tokens_kernel<<<T, 128, 0, c->stream>>>(x, w->embed, (const int32_t *)d_ids, D);
    NM_LAUNCH_CHECK();
    int n_patch = 0;
    for (int t = 0; t < T; t++) n_patch += ids[t] < 0;
    if (n_patch == 0) return NM_OK;
    int32_t *list = (int32_t *)malloc((size_t)n_patch * 2 * sizeof *list);
    if (!list) return NM_NOMEM(err, "patch list");
    for (int t = 0, r = 0; t < T; t++)
        if (ids[t] < 0) {
            list[2 * r] = t;
            list[2 * r + 1] = patch_idx[t];
            r++;
        }
    const int S = cfg->image_size, p = cfg->patch_size, pp = 3 * p * p;
    void *d_list, *d_pixels, *rows, *emb;
    nm_status s = nm_cuda_scratch(c, SCR_PATCH_LIST, (size_t)n_patch * 2 * sizeof(int32_t), &d_list, err);
    if (s == NM_OK) s = nm_cuda_scratch(c, SCR_PIXELS, (size_t)3 * S * S * sizeof(float), &d_pixels, err);
    if (s == NM_OK) s = nm_cuda_scratch(c, SCR_PATCH_ROWS, (size_t)n_patch * pp * sizeof(float), &rows, err);
    if (s == NM_OK) s = nm_cuda_scratch(c, SCR_PATCH_EMB, (size_t)n_patch * D * sizeof(float), &emb, err);
    if (s == NM_OK) {
        cudaError_t e = cudaMemcpyAsync(d_list, list, (size_t)n_patch * 2 * sizeof(int32_t), cudaMemcpyHostToDevice, c->stream);
        if (e == cudaSuccess)
            e = cudaMemcpyAsync(d_pixels, pixels, (size_t)3 * S * S * sizeof(float), cudaMemcpyHostToDevice, c->stream);
        if (e != cudaSuccess) s = nm_fail(err, NM_ERR_INTERNAL, "CUDA: patch upload: %s", cudaGetErrorString(e));
    }
    free(list); // pageable sources are staged before cudaMemcpyAsync returns
    NM_TRY(s);
    patch_gather_kernel<<<n_patch, 128, 0, c->stream>>>((float *)rows, (const float *)d_pixels, (const int32_t *)d_list, S, p);
    NM_LAUNCH_CHECK();
    NM_TRY(nm_cuda_linear(c, (float *)emb, (const float *)rows, w->patch_w, n_patch, pp, D, 0.0f, err));
    patch_finish_kernel<<<n_patch, 128, 0, c->stream>>>(x, (const float *)emb, w->patch_b, w->pos_embed,
                                                        (const int32_t *)d_list, D);
    NM_LAUNCH_CHECK();
    return NM_OK;
}
