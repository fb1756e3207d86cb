// nm_engine.c — CPU forward pass (DESIGN.md §3 block structure) over OpenBLAS.
//   h  = x + Attn(RMSNorm(x));   x' = h + MoE(RMSNorm(h));   logits = lm_head(RMSNorm(x_L))
#include "nm_engine.h"

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

struct nm_engine {
    const nm_model *m;
    int max_tokens, pos;
    float *k_cache, *v_cache; // (L, max_tokens, nkv*hd)
    float *inv_freq;          // (hd/2)
    float *rope_cs;           // (max_tokens, hd): cos then sin of position * inv_freq[i], i < hd/2
    // per-call activations, grown to the largest T seen
    int cap, nth;             // tokens and threads the activations were cut for
    size_t score_stride;      // floats of score buffer per thread
    float *x, *xn, *q, *k, *v, *att, *moe_out, *scores, *patch_buf, *norm_last;
    nm_moe_workspace moe;
};

static void free_acts(nm_engine *e) {
    free(e->x); free(e->xn); free(e->q); free(e->k); free(e->v); free(e->att); free(e->moe_out);
    free(e->scores); free(e->patch_buf); free(e->norm_last);
    e->x = e->xn = e->q = e->k = e->v = e->att = e->moe_out = e->scores = e->patch_buf = e->norm_last = NULL;
    e->cap = 0;
}

void nm_engine_free(nm_engine *e) {
    if (!e) return;
    free_acts(e);
    nm_moe_workspace_free(&e->moe);
    free(e->k_cache);
    free(e->v_cache);
    free(e->inv_freq);
    free(e->rope_cs);
    free(e);
}

nm_status nm_engine_create(nm_engine **out, const nm_model *m, int max_tokens, nm_error *err) {
    *out = NULL;
    const nm_config *c = &m->cfg;
    if (max_tokens < 1 || max_tokens > c->max_positions)
        return nm_fail(err, NM_ERR_LIMIT, "sequence of %d tokens is outside 1..max_positions = %d", max_tokens,
                       c->max_positions);
    nm_engine *e = calloc(1, sizeof *e);
    if (!e) return NM_NOMEM(err, "engine");
    e->m = m;
    e->max_tokens = max_tokens;
    size_t kvdim = (size_t)c->num_kv_heads * c->head_dim;
    size_t n = (size_t)c->num_layers * max_tokens * kvdim;
    e->k_cache = malloc(n * sizeof(float));
    e->v_cache = malloc(n * sizeof(float));
    e->inv_freq = malloc((size_t)(c->head_dim / 2) * sizeof(float));
    e->rope_cs = malloc((size_t)max_tokens * c->head_dim * sizeof(float));
    if (!e->k_cache || !e->v_cache || !e->inv_freq || !e->rope_cs) {
        nm_engine_free(e);
        return nm_fail(err, NM_ERR_NOMEM, "out of memory for a KV cache of %d tokens", max_tokens);
    }
    const int half = c->head_dim / 2;
    for (int i = 0; i < half; i++) e->inv_freq[i] = (float)pow(c->rope_theta, -2.0 * i / c->head_dim);
    // The rotary angles of every position, once (the same values nm_rope_forward computes).
    for (int p = 0; p < max_tokens; p++)
        for (int i = 0; i < half; i++) {
            // angle in double: positions up to 1e6 times frequencies up to 1 lose precision in float
            double a = (double)p * e->inv_freq[i];
            e->rope_cs[(size_t)p * c->head_dim + i] = (float)cos(a);
            e->rope_cs[(size_t)p * c->head_dim + half + i] = (float)sin(a);
        }
    *out = e;
    return NM_OK;
}

void nm_engine_reset(nm_engine *e) { e->pos = 0; }
int nm_engine_capacity(const nm_engine *e) { return e->max_tokens; }

static nm_status reserve(nm_engine *e, int T, nm_error *err) {
    const int nth = omp_get_max_threads();
    if (T <= e->cap && nth == e->nth) return NM_OK;
    if (T < e->cap) T = e->cap;
    free_acts(e);
    const nm_config *c = &e->m->cfg;
    size_t t = (size_t)T, D = (size_t)c->hidden_size, qd = (size_t)c->num_heads * c->head_dim,
           kvd = (size_t)c->num_kv_heads * c->head_dim, qb = t < QBLOCK ? t : QBLOCK;
    size_t pp = c->has_vision ? 3u * (size_t)c->patch_size * c->patch_size : 1;
    e->x = malloc(t * D * sizeof(float));
    e->xn = malloc(t * D * sizeof(float));
    e->q = malloc(t * qd * sizeof(float));
    e->k = malloc(t * kvd * sizeof(float));
    e->v = malloc(t * kvd * sizeof(float));
    e->att = malloc(t * qd * sizeof(float));
    e->moe_out = malloc(t * D * sizeof(float));
    e->scores = malloc((size_t)nth * qb * (size_t)e->max_tokens * sizeof(float)); // one per thread
    e->patch_buf = malloc(t * pp * sizeof(float));
    e->norm_last = malloc(t * D * sizeof(float));
    if (!e->x || !e->xn || !e->q || !e->k || !e->v || !e->att || !e->moe_out || !e->scores || !e->patch_buf ||
        !e->norm_last) {
        free_acts(e);
        return nm_fail(err, NM_ERR_NOMEM, "out of memory for activations of %d tokens", T);
    }
    e->cap = T;
    e->nth = nth;
    e->score_stride = qb * (size_t)e->max_tokens;
    return NM_OK;
}

// Token and patch embeddings. x: (T, D)
static void embed_forward(nm_engine *e, float *x, const int32_t *ids, const int32_t *patch_idx, const float *pixels, int T) {
    const nm_model *m = e->m;
    const nm_config *c = &m->cfg;
    const int D = c->hidden_size;
    int n_patch = 0;
    for (int t = 0; t < T; t++) {
        if (ids[t] >= 0) memcpy(x + (size_t)t * D, m->embed + (size_t)ids[t] * D, (size_t)D * sizeof(float));
        else n_patch++;
    }
    if (n_patch == 0) return;
    // Gather the patches' pixels as rows (channel, row, col), one GEMM for all of them.
    const int p = c->patch_size, S = c->image_size, g = S / p, pp = 3 * p * p;
    float *rows = e->patch_buf, *emb = e->moe_out; // moe_out is free until the first layer's MoE
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
}

// Rotary embedding in place with the engine's table: the same arithmetic as nm_rope_forward
// (half-split pairs (i, i + hd/2)). x: (T, n_heads*hd), token t at position pos0 + t.
static void rope_apply(const nm_engine *e, float *x, int T, int n_heads, int pos0) {
    const int hd = e->m->cfg.head_dim, half = hd / 2;
    #pragma omp parallel for schedule(static) if ((size_t)T * n_heads * hd >= 65536)
    for (int t = 0; t < T; t++) {
        const float *cs = e->rope_cs + (size_t)(pos0 + t) * hd, *sn = cs + half;
        for (int h = 0; h < n_heads; h++) {
            float *v = x + ((size_t)t * n_heads + h) * hd;
            for (int i = 0; i < half; i++) {
                float x0 = v[i], x1 = v[i + half];
                v[i] = x0 * cs[i] - x1 * sn[i];
                v[i + half] = x1 * cs[i] + x0 * sn[i];
            }
        }
    }
}

// Causal GQA attention for T new tokens at positions pos0.. against the cache of layer l.
// xn: (T, D) normalised input; writes x += o_proj(attention).
static void attention_forward(nm_engine *e, int l, float *x, const float *xn, int T, int pos0) {
    const nm_config *c = &e->m->cfg;
    const nm_layer_weights *w = &e->m->layers[l];
    const int D = c->hidden_size, nh = c->num_heads, nkv = c->num_kv_heads, hd = c->head_dim;
    const int qd = nh * hd, kvd = nkv * hd, group = nh / nkv;
    nm_matmul_forward(e->q, xn, w->wq, T, D, qd, 0.0f);
    nm_matmul_forward(e->k, xn, w->wk, T, D, kvd, 0.0f);
    nm_matmul_forward(e->v, xn, w->wv, T, D, kvd, 0.0f);
    rope_apply(e, e->q, T, nh, pos0);
    rope_apply(e, e->k, T, nkv, pos0);
    float *kc = e->k_cache + (size_t)l * e->max_tokens * kvd, *vc = e->v_cache + (size_t)l * e->max_tokens * kvd;
    memcpy(kc + (size_t)pos0 * kvd, e->k, (size_t)T * kvd * sizeof(float));
    memcpy(vc + (size_t)pos0 * kvd, e->v, (size_t)T * kvd * sizeof(float));
    const float scale = 1.0f / sqrtf((float)hd);
    // Work items: (query block, head), the biggest blocks (latest queries) first. Each item
    // computes its own rows of att with single-threaded BLAS (OpenBLAS's OpenMP build stays
    // on one thread inside a parallel region) in its thread's score buffer.
    const int nblk = (T + QBLOCK - 1) / QBLOCK, n_items = nblk * nh;
    #pragma omp parallel num_threads(e->nth) if (n_items > 1 && (size_t)T * (pos0 + T) >= 4096)
    {
        float *scores = e->scores + (size_t)omp_get_thread_num() * e->score_stride;
        #pragma omp for schedule(dynamic, 1)
        for (int it = 0; it < n_items; it++) {
            const int b = nblk - 1 - it / nh, h = it % nh, kh = h / group;
            const int t0 = b * QBLOCK, tb = T - t0 < QBLOCK ? T - t0 : QBLOCK;
            const int ctx = pos0 + t0 + tb; // keys visible to the last query of the block
            // scores: (tb, ctx) = Q_h (tb, hd) K_h^T (hd, ctx) * scale
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, tb, ctx, hd, scale, e->q + (size_t)t0 * qd + h * hd, qd,
                        kc + kh * hd, kvd, 0.0f, scores, ctx);
            for (int i = 0; i < tb; i++) {
                float *row = scores + (size_t)i * ctx;
                int visible = pos0 + t0 + i + 1; // causal: keys 0..pos
                nm_softmax_row(row, visible);
                memset(row + visible, 0, (size_t)(ctx - visible) * sizeof *row);
            }
            // out: (tb, hd) = P (tb, ctx) V_h (ctx, hd)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, tb, hd, ctx, 1.0f, scores, ctx, vc + kh * hd, kvd, 0.0f,
                        e->att + (size_t)t0 * qd + h * hd, qd);
        }
    }
    nm_matmul_forward(x, e->att, w->wo, T, qd, D, 1.0f); // residual: x += o_proj(att)
}

nm_status nm_engine_forward(nm_engine *e, const int32_t *ids, const int32_t *patch_idx, const float *pixels, int T,
                            float *logits, int all_logits, nm_trace_sample *trace, nm_error *err) {
    const nm_model *m = e->m;
    const nm_config *c = &m->cfg;
    const int D = c->hidden_size, V = c->vocab_size, L = c->num_layers, K = c->moe.top_k;
    if (T < 1) return nm_fail(err, NM_ERR_INVALID, "forward called with %d tokens", T);
    if (e->pos + T > e->max_tokens)
        return nm_fail(err, NM_ERR_LIMIT, "sequence would reach %d tokens, over this engine's %d", e->pos + T,
                       e->max_tokens);
    if (trace && (trace->capacity < e->pos + T || trace->n_layers != L || trace->top_k != K))
        return nm_fail(err, NM_ERR_INTERNAL, "trace sample does not fit the model or the sequence");
    for (int t = 0; t < T; t++) {
        if (ids[t] >= V || ids[t] < -1) return nm_fail(err, NM_ERR_INVALID, "token id %d is outside 0..%d", ids[t], V - 1);
        if (ids[t] == -1 && (!c->has_vision || !pixels || !patch_idx || patch_idx[t] < 0 ||
                             patch_idx[t] >= nm_config_num_patches(c)))
            return nm_fail(err, NM_ERR_INVALID, "image patch token %d has no valid patch or pixels", t);
    }
    nm_status s = reserve(e, T, err);
    if (s != NM_OK) return s;
    const int pos0 = e->pos;
    float *x = e->x, *xn = e->xn;
    embed_forward(e, x, ids, patch_idx, pixels, T);
    for (int l = 0; l < L; l++) {
        const nm_layer_weights *w = &m->layers[l];
        nm_rmsnorm_forward(xn, x, w->attn_norm, T, D, (float)c->rms_norm_eps);
        attention_forward(e, l, x, xn, T, pos0);
        nm_rmsnorm_forward(xn, x, w->moe_norm, T, D, (float)c->rms_norm_eps);
        // Routing records go straight into the trace (when kept) at this layer's rows.
        nm_routing r, *rp = NULL;
        if (trace) {
            size_t o = (size_t)l * trace->capacity + pos0;
            r = (nm_routing){trace->n_real + o, trace->slot + o * K, trace->prob + o * K, trace->gate + o * K,
                             trace->null_mass + o, trace->lse + o};
            rp = &r;
        }
        if ((s = nm_moe_forward(e->moe_out, xn, &w->moe, &c->moe, T, D, &e->moe, rp, err)) != NM_OK) return s;
        #pragma omp parallel for schedule(static) if ((size_t)T * D >= 65536)
        for (int t = 0; t < T; t++) { // residual
            float *xr = x + (size_t)t * D;
            const float *mr = e->moe_out + (size_t)t * D;
            for (int d = 0; d < D; d++) xr[d] += mr[d];
        }
    }
    if (logits) {
        int first = all_logits ? 0 : T - 1, n = all_logits ? T : 1;
        nm_rmsnorm_forward(e->norm_last, x + (size_t)first * D, m->norm, n, D, (float)c->rms_norm_eps);
        nm_matmul_forward(logits, e->norm_last, m->lm_head, n, D, V, 0.0f);
    }
    e->pos += T;
    if (trace && trace->n_tokens < e->pos) trace->n_tokens = e->pos;
    return NM_OK;
}
