// nm_backend_cpu.c — the CPU backend: the reference code of nm_ops.c and nm_moe.c behind the
// table of nm_backend.h, over OpenBLAS and OpenMP. This is the code the engine ran before the
// table existed, moved here unchanged (same calls, same order), so its results are bit-identical.
#include "nm_backend.h"

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "nm_moe.h"
#include "nm_ops.h"

// Query rows per attention work item: each thread's score buffer is QBLOCK x context. Small
// blocks waste little on the causal mask (keys after the block's last query are never
// computed) and give the threads many (head, block) items to share.
#define QBLOCK 64

typedef struct {
    nm_moe_workspace moe;
    float *scores;     // per thread: (QBLOCK, context) attention scores
    size_t scores_cap; // floats
    float *patch_rows; // (n_patch, 3*p*p) gathered pixels
    float *patch_emb;  // (n_patch, D)
    size_t patch_rows_cap, patch_emb_cap;
} cpu_ctx;

// Grows *p to hold n floats (contents not kept).
static nm_status grow_floats(float **p, size_t *cap, size_t n, const char *what, nm_error *err) {
    if (*p && *cap >= n) return NM_OK;
    free(*p);
    *p = malloc((n ? n : 1) * sizeof(float));
    *cap = *p ? n : 0;
    return *p ? NM_OK : NM_NOMEM(err, what);
}

static nm_status cpu_open(nm_backend *b, nm_error *err) {
    cpu_ctx *c = calloc(1, sizeof *c);
    if (!c) return NM_NOMEM(err, "CPU backend");
    b->ctx = c;
    return NM_OK;
}

static void cpu_close(nm_backend *b) {
    cpu_ctx *c = b->ctx;
    if (!c) return;
    nm_moe_workspace_free(&c->moe);
    free(c->scores);
    free(c->patch_rows);
    free(c->patch_emb);
    free(c);
    b->ctx = NULL;
}

static nm_status cpu_alloc(nm_backend *b, void **p, size_t bytes, nm_error *err) {
    (void)b;
    *p = malloc(bytes ? bytes : 1);
    return *p ? NM_OK : nm_fail(err, NM_ERR_NOMEM, "out of memory allocating %zu bytes", bytes);
}

static void cpu_release(nm_backend *b, void *p) {
    (void)b;
    free(p);
}

static nm_status cpu_copy(nm_backend *b, void *dst, const void *src, size_t bytes, nm_error *err) {
    (void)b;
    (void)err;
    if (bytes && dst != src) memcpy(dst, src, bytes);
    return NM_OK;
}

static nm_status cpu_model_upload(nm_backend *b, const nm_model *host, const nm_model **out, nm_error *err) {
    (void)b;
    (void)err;
    *out = host; // the host weights are the CPU backend's weights
    return NM_OK;
}

static void cpu_model_release(nm_backend *b, const nm_model *w) {
    (void)b;
    (void)w;
}

// Token and patch embeddings. x: (T, D)
static nm_status cpu_embed(nm_backend *b, float *x, const nm_model *m, const int32_t *ids, const int32_t *patch_idx,
                           const float *pixels, int T, nm_error *err) {
    cpu_ctx *cx = b->ctx;
    const nm_config *c = &m->cfg;
    const int D = c->hidden_size;
    int n_patch = 0;
    for (int t = 0; t < T; t++) {
        if (ids[t] >= 0) memcpy(x + (size_t)t * D, m->embed + (size_t)ids[t] * D, (size_t)D * sizeof(float));
        else n_patch++;
    }
    if (n_patch == 0) return NM_OK;
    // Gather the patches' pixels as rows (channel, row, col), one GEMM for all of them.
    const int p = c->patch_size, S = c->image_size, g = S / p, pp = 3 * p * p;
    nm_status s;
    if ((s = grow_floats(&cx->patch_rows, &cx->patch_rows_cap, (size_t)n_patch * pp, "patch rows", err)) != NM_OK ||
        (s = grow_floats(&cx->patch_emb, &cx->patch_emb_cap, (size_t)n_patch * D, "patch embeddings", err)) != NM_OK)
        return s;
    float *rows = cx->patch_rows, *emb = cx->patch_emb;
    int r = 0;
    for (int t = 0; t < T; t++) {
        if (ids[t] >= 0) continue;
        int gr = patch_idx[t] / g, gc = patch_idx[t] % g;
        float *dst = rows + (size_t)r++ * pp;
        for (int ch = 0; ch < 3; ch++)
            for (int y = 0; y < p; y++)
                memcpy(dst + (ch * p + y) * p, pixels + ((size_t)ch * S + gr * p + y) * S + gc * p, (size_t)p * sizeof(float));
    }
    nm_matmul_forward(emb, rows, m->patch_w, n_patch, pp, D, 0.0f);
    r = 0;
    for (int t = 0; t < T; t++) {
        if (ids[t] >= 0) continue;
        const float *er = emb + (size_t)r++ * D, *pe = m->pos_embed + (size_t)patch_idx[t] * D;
        float *o = x + (size_t)t * D;
        for (int d = 0; d < D; d++) o[d] = er[d] + m->patch_b[d] + pe[d];
    }
    return NM_OK;
}

static nm_status cpu_linear(nm_backend *b, float *out, const float *x, const float *W, int T, int in, int out_dim,
                            float beta, nm_error *err) {
    (void)b;
    (void)err;
    nm_matmul_forward(out, x, W, T, in, out_dim, beta);
    return NM_OK;
}

static nm_status cpu_rmsnorm(nm_backend *b, float *out, const float *x, const float *w, int T, int D, float eps,
                             nm_error *err) {
    (void)b;
    (void)err;
    nm_rmsnorm_forward(out, x, w, T, D, eps);
    return NM_OK;
}

// Rotary embedding in place with the position table: the same arithmetic as nm_rope_forward
// (half-split pairs (i, i + hd/2)). x: (T, n_heads*hd); cs: (T, hd).
static nm_status cpu_rope(nm_backend *b, float *x, const float *cs_rows, int T, int n_heads, int hd, nm_error *err) {
    (void)b;
    (void)err;
    const int half = hd / 2;
    #pragma omp parallel for schedule(static) if ((size_t)T * n_heads * hd >= 65536)
    for (int t = 0; t < T; t++) {
        const float *cs = cs_rows + (size_t)t * hd, *sn = cs + half;
        for (int h = 0; h < n_heads; h++) {
            float *v = x + ((size_t)t * n_heads + h) * hd;
            for (int i = 0; i < half; i++) {
                float x0 = v[i], x1 = v[i + half];
                v[i] = x0 * cs[i] - x1 * sn[i];
                v[i + half] = x1 * cs[i] + x0 * sn[i];
            }
        }
    }
    return NM_OK;
}

// Causal GQA attention for T queries at positions pos0.. against the layer's cache.
static nm_status cpu_attention(nm_backend *b, float *att, const float *q, const float *kc, const float *vc, int T,
                               int pos0, int nh, int nkv, int hd, nm_error *err) {
    cpu_ctx *cx = b->ctx;
    const int qd = nh * hd, kvd = nkv * hd, group = nh / nkv;
    const float scale = 1.0f / sqrtf((float)hd);
    const int nth = omp_get_max_threads();
    const size_t stride = (size_t)(T < QBLOCK ? T : QBLOCK) * (size_t)(pos0 + T); // floats per thread
    nm_status s = grow_floats(&cx->scores, &cx->scores_cap, (size_t)nth * stride, "attention scores", err);
    if (s != NM_OK) return s;
    // Work items: (query block, head), the biggest blocks (latest queries) first. Each item
    // computes its own rows of att with single-threaded BLAS (OpenBLAS's OpenMP build stays
    // on one thread inside a parallel region) in its thread's score buffer.
    const int nblk = (T + QBLOCK - 1) / QBLOCK, n_items = nblk * nh;
    #pragma omp parallel num_threads(nth) if (n_items > 1 && (size_t)T * (pos0 + T) >= 4096)
    {
        float *scores = cx->scores + (size_t)omp_get_thread_num() * stride;
        #pragma omp for schedule(dynamic, 1)
        for (int it = 0; it < n_items; it++) {
            const int blk = nblk - 1 - it / nh, h = it % nh, kh = h / group;
            const int t0 = blk * QBLOCK, tb = T - t0 < QBLOCK ? T - t0 : QBLOCK;
            const int ctx = pos0 + t0 + tb; // keys visible to the last query of the block
            // scores: (tb, ctx) = Q_h (tb, hd) K_h^T (hd, ctx) * scale
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, tb, ctx, hd, scale, q + (size_t)t0 * qd + h * hd, qd,
                        kc + kh * hd, kvd, 0.0f, scores, ctx);
            for (int i = 0; i < tb; i++) {
                float *row = scores + (size_t)i * ctx;
                int visible = pos0 + t0 + i + 1; // causal: keys 0..pos
                nm_softmax_row(row, visible);
                memset(row + visible, 0, (size_t)(ctx - visible) * sizeof *row);
            }
            // out: (tb, hd) = P (tb, ctx) V_h (ctx, hd)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, tb, hd, ctx, 1.0f, scores, ctx, vc + kh * hd, kvd, 0.0f,
                        att + (size_t)t0 * qd + h * hd, qd);
        }
    }
    return NM_OK;
}

static nm_status cpu_add(nm_backend *b, float *x, const float *y, size_t n, nm_error *err) {
    (void)b;
    (void)err;
    #pragma omp parallel for schedule(static) if (n >= 65536)
    for (size_t i = 0; i < n; i++) x[i] += y[i];
    return NM_OK;
}

static nm_status cpu_moe_route(nm_backend *b, const nm_routing *r, const float *z, int T, const nm_moe_config *mc,
                               nm_error *err) {
    (void)b;
    (void)err;
    moe_route_null(r, z, T, mc);
    return NM_OK;
}

static nm_status cpu_moe(nm_backend *b, float *out, const float *y, const nm_moe_weights *w, const nm_moe_config *mc,
                         int T, int D, const nm_routing *r, nm_error *err) {
    cpu_ctx *cx = b->ctx;
    return nm_moe_forward(out, y, w, mc, T, D, &cx->moe, r, err);
}

static nm_status cpu_routing_to_host(nm_backend *b, const nm_routing *dst, const nm_routing *src, int T, int K,
                                     nm_error *err) {
    (void)b;
    (void)err;
    const size_t t = (size_t)T, tk = t * (size_t)K;
    if (dst->n_real != src->n_real) memcpy(dst->n_real, src->n_real, t);
    if (dst->slot != src->slot) memcpy(dst->slot, src->slot, tk * sizeof *dst->slot);
    if (dst->prob != src->prob) memcpy(dst->prob, src->prob, tk * sizeof *dst->prob);
    if (dst->gate != src->gate) memcpy(dst->gate, src->gate, tk * sizeof *dst->gate);
    if (dst->null_mass != src->null_mass) memcpy(dst->null_mass, src->null_mass, t * sizeof *dst->null_mass);
    if (dst->lse != src->lse) memcpy(dst->lse, src->lse, t * sizeof *dst->lse);
    return NM_OK;
}

static nm_status cpu_finish(nm_backend *b, nm_error *err) {
    (void)b;
    (void)err;
    return NM_OK;
}

static const nm_backend_ops CPU_OPS = {
    .name = "cpu",
    .host_memory = 1,
    .open = cpu_open,
    .close = cpu_close,
    .alloc = cpu_alloc,
    .release = cpu_release,
    .to_backend = cpu_copy,
    .to_host = cpu_copy,
    .model_upload = cpu_model_upload,
    .model_release = cpu_model_release,
    .embed = cpu_embed,
    .linear = cpu_linear,
    .rmsnorm = cpu_rmsnorm,
    .rope = cpu_rope,
    .attention = cpu_attention,
    .add = cpu_add,
    .moe_route = cpu_moe_route,
    .moe = cpu_moe,
    .routing_to_host = cpu_routing_to_host,
    .finish = cpu_finish,
};

const nm_backend_ops *nm_backend_cpu_ops(void) { return &CPU_OPS; }
