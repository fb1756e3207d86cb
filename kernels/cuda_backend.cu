// cuda_backend.cu — the CUDA table of nm_backend.h: instance (streams, cuBLAS), memory, weight
// upload (F32 or BF16), routing records copied to the host asynchronously, and the registry's
// probes. The ops themselves live in cuda_dense.cu, cuda_attention.cu, cuda_router.cu,
// cuda_permute.cu and cuda_moe.cu.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_common.cuh"

#define STR2(x) #x
#define STR(x) STR2(x)

extern "C" const char *nm_cuda_build_version(void) { return STR(__CUDACC_VER_MAJOR__) "." STR(__CUDACC_VER_MINOR__); }

extern "C" int nm_cuda_device_count(char *why, size_t n) {
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) {
        if (why) snprintf(why, n, "%s", cudaGetErrorString(e));
        cudaGetLastError(); // the error is not sticky: clear it
        return 0;
    }
    if (count < 1 && why) snprintf(why, n, "the CUDA runtime reports 0 devices");
    return count;
}

extern "C" void nm_cuda_device_name(char *buf, size_t n) {
    cudaDeviceProp p;
    if (cudaGetDeviceProperties(&p, 0) != cudaSuccess) {
        snprintf(buf, n, "unknown device");
        return;
    }
    snprintf(buf, n, "%s (sm_%d%d)", p.name, p.major, p.minor);
}

nm_status nm_cuda_scratch(nm_cuda_ctx *c, int which, size_t bytes, void **out, nm_error *err) {
    if (bytes == 0) bytes = 16;
    if (!c->scr[which] || c->scr_cap[which] < bytes) {
        if (c->scr[which]) {
            NM_CU_CHECK(cudaStreamSynchronize(c->stream)); // queued work may still read the old buffer
            cudaFree(c->scr[which]);
            c->scr[which] = NULL;
            c->scr_cap[which] = 0;
        }
        bytes = (bytes + 255) / 256 * 256 * 5 / 4; // headroom: fewer regrowths as T varies
        NM_CU_CHECK(cudaMalloc(&c->scr[which], bytes));
        c->scr_cap[which] = bytes;
    }
    *out = c->scr[which];
    return NM_OK;
}

// ---- instance ----

static void cuda_close(nm_backend *b) {
    nm_cuda_ctx *c = nm_cuda_get(b);
    if (!c) return;
    if (c->stream) cudaStreamSynchronize(c->stream);
    if (c->copy_stream) cudaStreamSynchronize(c->copy_stream);
    for (int i = 0; i < SCR_COUNT; i++) cudaFree(c->scr[i]);
    cudaFreeHost(c->h_offsets);
    cudaFreeHost(c->h_ptrs);
    cudaFreeHost(c->h_stage);
    free(c->pending);
    if (c->blas) cublasDestroy(c->blas);
    if (c->routing_ready) cudaEventDestroy(c->routing_ready);
    if (c->stream) cudaStreamDestroy(c->stream);
    if (c->copy_stream) cudaStreamDestroy(c->copy_stream);
    free(c);
    b->ctx = NULL;
}

static nm_status cuda_open_inner(nm_cuda_ctx *c, nm_error *err) {
    NM_CU_CHECK(cudaSetDevice(c->device));
    NM_CU_CHECK(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking));
    NM_CU_CHECK(cudaStreamCreateWithFlags(&c->copy_stream, cudaStreamNonBlocking));
    NM_CU_CHECK(cudaEventCreateWithFlags(&c->routing_ready, cudaEventDisableTiming));
    NM_BLAS_CHECK(cublasCreate(&c->blas));
    NM_BLAS_CHECK(cublasSetStream(c->blas, c->stream));
    // F32 GEMMs stay F32 (no TF32), so the CUDA trace can match the CPU one; cuBLAS is then
    // bit-wise repeatable run to run on one GPU model.
    NM_BLAS_CHECK(cublasSetMathMode(c->blas, CUBLAS_DEFAULT_MATH));
    return NM_OK;
}

static nm_status cuda_open(nm_backend *b, nm_error *err) {
    nm_cuda_ctx *c = (nm_cuda_ctx *)calloc(1, sizeof *c);
    if (!c) return NM_NOMEM(err, "CUDA backend");
    c->device = b->opt.device_index;
    c->bf16 = b->opt.bf16;
    c->expert_gemm = b->opt.expert_gemm;
    b->ctx = c;
    nm_status s = cuda_open_inner(c, err);
    if (s != NM_OK) cuda_close(b);
    return s;
}

// ---- memory ----

static nm_status cuda_alloc(nm_backend *b, void **p, size_t bytes, nm_error *err) {
    (void)b;
    *p = NULL;
    NM_CU_CHECK(cudaMalloc(p, bytes ? bytes : 16));
    return NM_OK;
}

static void cuda_release(nm_backend *b, void *p) {
    if (!p) return;
    cudaStreamSynchronize(nm_cuda_get(b)->stream);
    cudaFree(p);
}

static nm_status cuda_to_backend(nm_backend *b, void *dst, const void *src, size_t bytes, nm_error *err) {
    // From pageable memory the call returns once the source has been staged: src may be reused.
    NM_CU_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, nm_cuda_get(b)->stream));
    return NM_OK;
}

static nm_status cuda_to_host(nm_backend *b, void *dst, const void *src, size_t bytes, nm_error *err) {
    nm_cuda_ctx *c = nm_cuda_get(b);
    NM_CU_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, c->stream));
    NM_CU_CHECK(cudaStreamSynchronize(c->stream));
    return NM_OK;
}

// ---- weights ----

// GEMM weights (stored BF16 in BF16 mode); everything else stays F32. The router stays F32:
// routing decisions are what nullmap measures.
static int is_gemm_weight(const char *name) {
    return strstr(name, ".attn.") || strstr(name, ".experts.") || strstr(name, ".shared.") ||
           !strcmp(name, "lm_head.weight") || !strcmp(name, "vision.patch_embed.weight");
}

static void cuda_model_release(nm_backend *b, const nm_model *w) {
    (void)b;
    if (!w) return;
    nm_model *dev = (nm_model *)w;
    cudaFree(dev->arena);
    free(dev->layers);
    free(dev);
}

static nm_status upload_tensor(nm_cuda_ctx *c, char *dst, const float *src, size_t numel, int bf16, nm_error *err) {
    if (!bf16) {
        NM_CU_CHECK(cudaMemcpyAsync(dst, src, numel * sizeof(float), cudaMemcpyHostToDevice, c->stream));
        return NM_OK;
    }
    uint16_t *tmp = (uint16_t *)malloc((numel ? numel : 1) * sizeof *tmp);
    if (!tmp) return NM_NOMEM(err, "BF16 weights");
    for (size_t i = 0; i < numel; i++) tmp[i] = nm_f32_to_bf16(src[i]);
    cudaError_t e = cudaMemcpy(dst, tmp, numel * sizeof *tmp, cudaMemcpyHostToDevice);
    free(tmp);
    NM_CU_CHECK(e);
    return NM_OK;
}

static nm_status model_upload_inner(nm_cuda_ctx *c, const nm_model *host, nm_model *dev, nm_error *err) {
    const nm_config *cfg = &host->cfg;
    if (cfg->head_dim > NM_CUDA_MAX_HEAD_DIM)
        return nm_fail(err, NM_ERR_UNSUPPORTED, "head_dim %d is over the CUDA attention kernel's %d", cfg->head_dim,
                       NM_CUDA_MAX_HEAD_DIM);
    int n = nm_model_tensor_specs((nm_model *)host, NULL);
    nm_tensor_spec *hs = (nm_tensor_spec *)calloc((size_t)n, sizeof *hs), *ds = (nm_tensor_spec *)calloc((size_t)n, sizeof *ds);
    if (!hs || !ds) {
        free(hs);
        free(ds);
        return NM_NOMEM(err, "tensor table");
    }
    nm_model_tensor_specs((nm_model *)host, hs);
    nm_model_tensor_specs(dev, ds);
    const int tied_bf16 = cfg->tie_embeddings && c->bf16;
    // One device arena; every tensor 256-byte aligned.
    size_t total = 0;
    for (int i = 0; i < n; i++) {
        size_t es = c->bf16 && is_gemm_weight(hs[i].name) ? 2 : 4;
        total += (hs[i].numel * es + 255) / 256 * 256;
    }
    if (tied_bf16) total += ((size_t)cfg->vocab_size * cfg->hidden_size * 2 + 255) / 256 * 256;
    nm_status s = NM_OK;
    cudaError_t e = cudaMalloc(&dev->arena, total ? total : 256);
    if (e != cudaSuccess) {
        dev->arena = NULL;
        s = nm_fail(err, NM_ERR_NOMEM, "CUDA: out of device memory for %zu MiB of weights (%s)", total >> 20,
                    cudaGetErrorString(e));
        goto out;
    }
    {
        char *at = (char *)dev->arena;
        for (int i = 0; i < n && s == NM_OK; i++) {
            int bf = c->bf16 && is_gemm_weight(hs[i].name);
            *ds[i].dest = (float *)at;
            s = upload_tensor(c, at, *hs[i].dest, hs[i].numel, bf, err);
            at += (hs[i].numel * (bf ? 2 : 4) + 255) / 256 * 256;
        }
        if (s == NM_OK && cfg->tie_embeddings) {
            if (tied_bf16) {
                dev->lm_head = (float *)at;
                s = upload_tensor(c, at, host->embed, (size_t)cfg->vocab_size * cfg->hidden_size, 1, err);
            } else dev->lm_head = dev->embed;
        }
    }
    if (s == NM_OK) {
        e = cudaStreamSynchronize(c->stream);
        if (e != cudaSuccess) s = nm_fail(err, NM_ERR_INTERNAL, "CUDA: weight upload: %s", cudaGetErrorString(e));
    }
out:
    free(hs);
    free(ds);
    return s;
}

static nm_status cuda_model_upload(nm_backend *b, const nm_model *host, const nm_model **out, nm_error *err) {
    *out = NULL;
    nm_model *dev = (nm_model *)calloc(1, sizeof *dev);
    if (!dev) return NM_NOMEM(err, "device model");
    dev->cfg = host->cfg;
    dev->file_dtype = host->file_dtype;
    dev->n_params = host->n_params;
    dev->layers = (nm_layer_weights *)calloc((size_t)host->cfg.num_layers, sizeof *dev->layers);
    if (!dev->layers) {
        free(dev);
        return NM_NOMEM(err, "device model");
    }
    nm_status s = model_upload_inner(nm_cuda_get(b), host, dev, err);
    if (s != NM_OK) {
        cuda_model_release(b, dev);
        return s;
    }
    *out = dev;
    return NM_OK;
}

// ---- routing records: device -> pinned staging (copy stream) -> the trace at finish ----

static nm_status drain_pending(nm_cuda_ctx *c, nm_error *err) {
    NM_CU_CHECK(cudaStreamSynchronize(c->copy_stream));
    for (int i = 0; i < c->n_pending; i++)
        memcpy(c->pending[i].dst, c->h_stage + c->pending[i].offset, c->pending[i].bytes);
    c->n_pending = 0;
    c->h_stage_used = 0;
    return NM_OK;
}

static nm_status stage_copy(nm_cuda_ctx *c, void *dst, const void *src, size_t bytes, nm_error *err) {
    if (c->n_pending == c->pending_cap) {
        int cap = c->pending_cap ? 2 * c->pending_cap : 64;
        nm_cuda_pending *p = (nm_cuda_pending *)realloc(c->pending, (size_t)cap * sizeof *p);
        if (!p) return NM_NOMEM(err, "routing copy list");
        c->pending = p;
        c->pending_cap = cap;
    }
    size_t at = (c->h_stage_used + 63) / 64 * 64;
    if (at + bytes > c->h_stage_cap) { // grow the staging buffer: first let its copies land
        NM_TRY(drain_pending(c, err));
        size_t cap = c->h_stage_cap ? c->h_stage_cap : ((size_t)1 << 20);
        while (cap < bytes) cap *= 2;
        if (cap > c->h_stage_cap) {
            cudaFreeHost(c->h_stage);
            c->h_stage = NULL;
            c->h_stage_cap = 0;
            NM_CU_CHECK(cudaMallocHost((void **)&c->h_stage, cap));
            c->h_stage_cap = cap;
        }
        at = 0;
    }
    NM_CU_CHECK(cudaMemcpyAsync(c->h_stage + at, src, bytes, cudaMemcpyDeviceToHost, c->copy_stream));
    c->pending[c->n_pending++] = (nm_cuda_pending){dst, at, bytes};
    c->h_stage_used = at + bytes;
    return NM_OK;
}

static nm_status cuda_routing_to_host(nm_backend *b, const nm_routing *dst, const nm_routing *src, int T, int K,
                                     nm_error *err) {
    nm_cuda_ctx *c = nm_cuda_get(b);
    const size_t t = (size_t)T, tk = t * (size_t)K;
    // The copies start when the ops queued so far (the router of this layer) are done, and run
    // beside the next layer's work.
    NM_CU_CHECK(cudaEventRecord(c->routing_ready, c->stream));
    NM_CU_CHECK(cudaStreamWaitEvent(c->copy_stream, c->routing_ready, 0));
    NM_TRY(stage_copy(c, dst->n_real, src->n_real, t, err));
    NM_TRY(stage_copy(c, dst->slot, src->slot, tk * sizeof(int16_t), err));
    NM_TRY(stage_copy(c, dst->prob, src->prob, tk * sizeof(float), err));
    NM_TRY(stage_copy(c, dst->gate, src->gate, tk * sizeof(float), err));
    NM_TRY(stage_copy(c, dst->null_mass, src->null_mass, t * sizeof(float), err));
    NM_TRY(stage_copy(c, dst->lse, src->lse, t * sizeof(float), err));
    return NM_OK;
}

static nm_status cuda_finish(nm_backend *b, nm_error *err) {
    nm_cuda_ctx *c = nm_cuda_get(b);
    NM_CU_CHECK(cudaStreamSynchronize(c->stream));
    return drain_pending(c, err);
}

// ---- ops: thin adapters to the launchers ----

static nm_status cuda_embed(nm_backend *b, float *x, const nm_model *w, const int32_t *ids, const int32_t *patch_idx,
                            const float *pixels, int T, nm_error *err) {
    return nm_cuda_embed(nm_cuda_get(b), x, w, ids, patch_idx, pixels, T, err);
}
static nm_status cuda_linear(nm_backend *b, float *out, const float *x, const float *W, int T, int in, int out_dim,
                             float beta, nm_error *err) {
    return nm_cuda_linear(nm_cuda_get(b), out, x, W, T, in, out_dim, beta, err);
}
static nm_status cuda_rmsnorm(nm_backend *b, float *out, const float *x, const float *w, int T, int D, float eps,
                              nm_error *err) {
    return nm_cuda_rmsnorm(nm_cuda_get(b)->stream, out, x, w, T, D, eps, err);
}
static nm_status cuda_rope(nm_backend *b, float *x, const float *cs, int T, int n_heads, int hd, nm_error *err) {
    return nm_cuda_rope(nm_cuda_get(b)->stream, x, cs, T, n_heads, hd, err);
}
static nm_status cuda_attention(nm_backend *b, float *att, const float *q, const float *kc, const float *vc, int T,
                                int pos0, int nh, int nkv, int hd, nm_error *err) {
    return nm_cuda_attention(nm_cuda_get(b)->stream, att, q, kc, vc, T, pos0, nh, nkv, hd, err);
}
static nm_status cuda_add(nm_backend *b, float *x, const float *y, size_t n, nm_error *err) {
    return nm_cuda_add(nm_cuda_get(b)->stream, x, y, n, err);
}
static nm_status cuda_moe_route(nm_backend *b, const nm_routing *r, const float *z, int T, const nm_moe_config *mc,
                                nm_error *err) {
    return nm_cuda_route(nm_cuda_get(b)->stream, r, z, T, mc, err);
}
static nm_status cuda_moe(nm_backend *b, float *out, const float *y, const nm_moe_weights *w, const nm_moe_config *mc,
                          int T, int D, const nm_routing *r, nm_error *err) {
    return nm_cuda_moe(nm_cuda_get(b), out, y, w, mc, T, D, r, err);
}

static const nm_backend_ops CUDA_OPS = {
    /* name */ "cuda",
    /* host_memory */ 0,
    /* open */ cuda_open,
    /* close */ cuda_close,
    /* alloc */ cuda_alloc,
    /* release */ cuda_release,
    /* to_backend */ cuda_to_backend,
    /* to_host */ cuda_to_host,
    /* model_upload */ cuda_model_upload,
    /* model_release */ cuda_model_release,
    /* embed */ cuda_embed,
    /* linear */ cuda_linear,
    /* rmsnorm */ cuda_rmsnorm,
    /* rope */ cuda_rope,
    /* attention */ cuda_attention,
    /* add */ cuda_add,
    /* moe_route */ cuda_moe_route,
    /* moe */ cuda_moe,
    /* routing_to_host */ cuda_routing_to_host,
    /* finish */ cuda_finish,
};

extern "C" const nm_backend_ops *nm_cuda_backend_ops(void) { return &CUDA_OPS; }
