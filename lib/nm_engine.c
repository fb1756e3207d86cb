// nm_engine.c — the forward pass (DESIGN.md §3 block structure) as a driver over a backend's
// table of ops (nm_backend.h):
//   h  = x + Attn(RMSNorm(x));   x' = h + MoE(RMSNorm(h));   logits = lm_head(RMSNorm(x_L))
// The engine owns the activations, the KV cache and the rotary table, all in backend memory.
#include "nm_engine.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

struct nm_engine {
    const nm_model *m;   // host model: the config and input validation
    nm_backend *b;
    const nm_model *w;   // the weights as the backend holds them
    nm_engine_options opt;
    int max_tokens, pos;
    float *k_cache, *v_cache; // backend: (L, max_tokens, nkv*hd)
    float *rope_cs;           // backend: (max_tokens, hd): cos then sin of position * inv_freq[i], i < hd/2
    // per-call activations in backend memory, grown to the largest T seen
    int cap;
    float *x, *xn, *q, *att, *moe_out, *norm_last; // (cap, D) or (cap, nh*hd)
    float *logits;            // (cap, V); only when the backend's memory is not host memory
    nm_routing route;         // [L] x cap records (layer l at l*cap); only when not host memory
};

#define RELEASE(e, p) ((e)->b->ops->release((e)->b, (p)), (p) = NULL)

static void free_acts(nm_engine *e) {
    RELEASE(e, e->x); RELEASE(e, e->xn); RELEASE(e, e->q); RELEASE(e, e->att); RELEASE(e, e->moe_out);
    RELEASE(e, e->norm_last); RELEASE(e, e->logits);
    nm_routing *r = &e->route;
    RELEASE(e, r->n_real); RELEASE(e, r->slot); RELEASE(e, r->prob); RELEASE(e, r->gate); RELEASE(e, r->null_mass);
    RELEASE(e, r->lse);
    e->cap = 0;
}

void nm_engine_free(nm_engine *e) {
    if (!e) return;
    if (e->b) {
        free_acts(e);
        RELEASE(e, e->k_cache);
        RELEASE(e, e->v_cache);
        RELEASE(e, e->rope_cs);
        e->b->ops->model_release(e->b, e->w);
        nm_backend_close(e->b);
    }
    free(e);
}

static nm_status balloc(nm_engine *e, void *pp, size_t bytes, nm_error *err) {
    return e->b->ops->alloc(e->b, (void **)pp, bytes, err);
}

nm_status nm_engine_create_on(nm_engine **out, const nm_model *m, int max_tokens, const nm_engine_options *opt,
                              nm_error *err) {
    *out = NULL;
    const nm_config *c = &m->cfg;
    if (max_tokens < 1 || max_tokens > c->max_positions)
        return nm_fail(err, NM_ERR_LIMIT, "sequence of %d tokens is outside 1..max_positions = %d", max_tokens,
                       c->max_positions);
    nm_engine *e = calloc(1, sizeof *e);
    if (!e) return NM_NOMEM(err, "engine");
    e->m = m;
    e->max_tokens = max_tokens;
    if (opt) e->opt = *opt;
    if (!e->opt.device) e->opt.device = "cpu";
    e->opt.device = strcmp(e->opt.device, "cuda") ? "cpu" : "cuda"; // a static string the engine may keep
    const nm_backend_options bo = {.bf16 = e->opt.bf16, .expert_gemm = e->opt.expert_gemm};
    float *table = NULL;
    nm_status s = nm_backend_open(&e->b, opt && opt->device ? opt->device : "cpu", &bo, err);
    if (s != NM_OK) goto fail;
    if ((s = e->b->ops->model_upload(e->b, m, &e->w, err)) != NM_OK) goto fail;
    const int hd = c->head_dim, half = hd / 2;
    const size_t kvdim = (size_t)c->num_kv_heads * hd, n = (size_t)c->num_layers * max_tokens * kvdim;
    const size_t table_bytes = (size_t)max_tokens * hd * sizeof(float);
    if ((s = balloc(e, &e->k_cache, n * sizeof(float), err)) != NM_OK ||
        (s = balloc(e, &e->v_cache, n * sizeof(float), err)) != NM_OK ||
        (s = balloc(e, &e->rope_cs, table_bytes, err)) != NM_OK) {
        s = nm_fail(err, NM_ERR_NOMEM, "out of memory for a KV cache of %d tokens", max_tokens);
        goto fail;
    }
    // The rotary angles of every position, once, on the host (the same values nm_rope_forward
    // computes), then copied to the backend: every backend rotates by the same table.
    float *inv_freq = malloc((size_t)(half > 0 ? half : 1) * sizeof *inv_freq);
    table = malloc(table_bytes);
    if (!inv_freq || !table) {
        free(inv_freq);
        s = nm_fail(err, NM_ERR_NOMEM, "out of memory for a KV cache of %d tokens", max_tokens);
        goto fail;
    }
    for (int i = 0; i < half; i++) inv_freq[i] = (float)pow(c->rope_theta, -2.0 * i / hd);
    for (int p = 0; p < max_tokens; p++)
        for (int i = 0; i < half; i++) {
            // angle in double: positions up to 1e6 times frequencies up to 1 lose precision in float
            double a = (double)p * inv_freq[i];
            table[(size_t)p * hd + i] = (float)cos(a);
            table[(size_t)p * hd + half + i] = (float)sin(a);
        }
    free(inv_freq);
    if ((s = e->b->ops->to_backend(e->b, e->rope_cs, table, table_bytes, err)) != NM_OK) goto fail;
    free(table);
    *out = e;
    return NM_OK;
fail:
    free(table);
    nm_engine_free(e);
    return s;
}

nm_status nm_engine_create(nm_engine **out, const nm_model *m, int max_tokens, nm_error *err) {
    return nm_engine_create_on(out, m, max_tokens, NULL, err);
}

void nm_engine_reset(nm_engine *e) { e->pos = 0; }
int nm_engine_capacity(const nm_engine *e) { return e->max_tokens; }
const nm_engine_options *nm_engine_get_options(const nm_engine *e) { return &e->opt; }

static nm_status reserve(nm_engine *e, int T, nm_error *err) {
    if (T <= e->cap) return NM_OK;
    free_acts(e);
    const nm_config *c = &e->m->cfg;
    const size_t t = (size_t)T, D = (size_t)c->hidden_size, qd = (size_t)c->num_heads * c->head_dim, f = sizeof(float);
    nm_status s;
    if ((s = balloc(e, &e->x, t * D * f, err)) != NM_OK || (s = balloc(e, &e->xn, t * D * f, err)) != NM_OK ||
        (s = balloc(e, &e->q, t * qd * f, err)) != NM_OK || (s = balloc(e, &e->att, t * qd * f, err)) != NM_OK ||
        (s = balloc(e, &e->moe_out, t * D * f, err)) != NM_OK || (s = balloc(e, &e->norm_last, t * D * f, err)) != NM_OK)
        goto fail;
    if (!e->b->ops->host_memory) {
        const size_t lt = (size_t)c->num_layers * t, ltk = lt * (size_t)c->moe.top_k;
        nm_routing *r = &e->route;
        if ((s = balloc(e, &e->logits, t * (size_t)c->vocab_size * f, err)) != NM_OK ||
            (s = balloc(e, &r->n_real, lt, err)) != NM_OK || (s = balloc(e, &r->slot, ltk * sizeof(int16_t), err)) != NM_OK ||
            (s = balloc(e, &r->prob, ltk * f, err)) != NM_OK || (s = balloc(e, &r->gate, ltk * f, err)) != NM_OK ||
            (s = balloc(e, &r->null_mass, lt * f, err)) != NM_OK || (s = balloc(e, &r->lse, lt * f, err)) != NM_OK)
            goto fail;
    }
    e->cap = T;
    return NM_OK;
fail:
    free_acts(e);
    return s;
}

// Routing records of layer l: T tokens from offset `at` (layer stride `cap`).
static nm_routing routing_view(const nm_routing *r, int l, int cap, int at, int K) {
    const size_t o = (size_t)l * cap + at;
    return (nm_routing){r->n_real + o, r->slot + o * K, r->prob + o * K, r->gate + o * K, r->null_mass + o, r->lse + o};
}

// The attention half of block l: x += o_proj(Attn(xn)), writing this call's keys and values
// into the cache at positions pos0.. (straight from the projections, then rotated in place).
static nm_status attention_block(nm_engine *e, int l, int T, int pos0, nm_error *err) {
    const nm_backend_ops *o = e->b->ops;
    nm_backend *b = e->b;
    const nm_config *c = &e->m->cfg;
    const nm_layer_weights *w = &e->w->layers[l];
    const int D = c->hidden_size, nh = c->num_heads, nkv = c->num_kv_heads, hd = c->head_dim;
    const int qd = nh * hd, kvd = nkv * hd;
    float *kc = e->k_cache + (size_t)l * e->max_tokens * kvd, *vc = e->v_cache + (size_t)l * e->max_tokens * kvd;
    float *k_new = kc + (size_t)pos0 * kvd, *v_new = vc + (size_t)pos0 * kvd; // (T, kvd)
    const float *cs = e->rope_cs + (size_t)pos0 * hd;
    nm_status s;
    if ((s = o->linear(b, e->q, e->xn, w->wq, T, D, qd, 0.0f, err)) != NM_OK ||
        (s = o->linear(b, k_new, e->xn, w->wk, T, D, kvd, 0.0f, err)) != NM_OK ||
        (s = o->linear(b, v_new, e->xn, w->wv, T, D, kvd, 0.0f, err)) != NM_OK ||
        (s = o->rope(b, e->q, cs, T, nh, hd, err)) != NM_OK || (s = o->rope(b, k_new, cs, T, nkv, hd, err)) != NM_OK ||
        (s = o->attention(b, e->att, e->q, kc, vc, T, pos0, nh, nkv, hd, err)) != NM_OK)
        return s;
    return o->linear(b, e->x, e->att, w->wo, T, qd, D, 1.0f, err); // residual: x += o_proj(att)
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
    const nm_backend_ops *o = e->b->ops;
    nm_backend *b = e->b;
    const int host = o->host_memory, pos0 = e->pos;
    const float eps = (float)c->rms_norm_eps;
    if ((s = o->embed(b, e->x, e->w, ids, patch_idx, pixels, T, err)) != NM_OK) goto fail;
    for (int l = 0; l < L; l++) {
        const nm_layer_weights *w = &e->w->layers[l];
        if ((s = o->rmsnorm(b, e->xn, e->x, w->attn_norm, T, D, eps, err)) != NM_OK ||
            (s = attention_block(e, l, T, pos0, err)) != NM_OK ||
            (s = o->rmsnorm(b, e->xn, e->x, w->moe_norm, T, D, eps, err)) != NM_OK)
            goto fail;
        // Routing records: on a host-memory backend straight into the trace (when kept) at this
        // layer's rows; otherwise into the engine's backend buffers, then copied out (async).
        nm_routing in_trace, in_backend, *rp = NULL;
        if (trace) {
            in_trace = routing_view(&(nm_routing){trace->n_real, trace->slot, trace->prob, trace->gate,
                                                  trace->null_mass, trace->lse},
                                    l, trace->capacity, pos0, K);
            in_backend = host ? in_trace : routing_view(&e->route, l, e->cap, 0, K);
            rp = &in_backend;
        }
        if ((s = o->moe(b, e->moe_out, e->xn, &w->moe, &c->moe, T, D, rp, err)) != NM_OK) goto fail;
        if (trace && !host && (s = o->routing_to_host(b, &in_trace, &in_backend, T, K, err)) != NM_OK) goto fail;
        if ((s = o->add(b, e->x, e->moe_out, (size_t)T * D, err)) != NM_OK) goto fail; // residual
    }
    if (logits) {
        const int first = all_logits ? 0 : T - 1, n = all_logits ? T : 1;
        float *dst = host ? logits : e->logits;
        if ((s = o->rmsnorm(b, e->norm_last, e->x + (size_t)first * D, e->w->norm, n, D, eps, err)) != NM_OK ||
            (s = o->linear(b, dst, e->norm_last, e->w->lm_head, n, D, V, 0.0f, err)) != NM_OK)
            goto fail;
        if (!host && (s = o->to_host(b, logits, dst, (size_t)n * V * sizeof(float), err)) != NM_OK) goto fail;
    }
    if ((s = o->finish(b, err)) != NM_OK) return s;
    e->pos += T;
    if (trace && trace->n_tokens < e->pos) trace->n_tokens = e->pos;
    return NM_OK;
fail:
    // Let queued routing copies land now, while the trace they write into still exists.
    o->finish(b, NULL);
    return s;
}
