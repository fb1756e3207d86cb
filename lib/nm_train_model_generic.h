// nm_train_model_generic.h — internal: the whole-model training forward/backward
// (nm_train_model.h) written once for a real type. Included by nm_train_model.c with R, FN(name)
// and GEMM defined (as nm_ops_generic.h). Not a public header.

#if !defined(R) || !defined(FN) || !defined(GEMM)
#error "nm_train_model_generic.h is included from nm_train_model.c only"
#endif

typedef struct {
    int cap_T, cap_B, cap_rows, L;
    size_t cap_att; // floats of one layer's attention probabilities (sum over sequences of nh*Ts^2)
    size_t *att_off; // [B] start of each sequence's probabilities within a layer's block
    R *x;      // (L+1, T, D) residual stream entering each layer; x[L] enters the final norm
    R *h;      // (L, T, D) after the attention residual
    R *xn1, *xn2;     // (L, T, D) normalised inputs of attention and MoE
    R *rstd1, *rstd2; // (L, T)
    R *q, *k, *v;     // (L, T, qd | kvd) after RoPE
    R *ao;            // (L, T, qd) attention output before o_proj
    R *att;           // (L, cap_att)
    R *inv_freq;      // (hd/2)
    void *moe;        // [L] nm_moe_cache of this precision
    int n_loss;
    int32_t *loss_rows; // [n_loss] tokens with a target
    int32_t *cells;     // [n_patch] grid cell of each patch row (backward of pos_embed)
    R *xl, *xf, *rstdf; // (n_loss, D), (n_loss, D), (n_loss): final norm of the loss rows
    R *logits;        // (n_loss, V), then the softmax in place for the backward
    double *row_max, *row_sum; // (n_loss) of the softmax of each logits row, kept for the backward
    R *patch_emb;     // (n_patch, D)
    // backward scratch
    R *dx, *dh, *dy, *dt, *dq, *dk, *dv, *dao, *datt, *dpe;
} FN(acts_priv);

#define MOE_CACHE FN(nm_moe_cache)

static void FN(acts_release)(FN(acts_priv) *p) {
    if (p->moe)
        for (int l = 0; l < p->L; l++) FN(nm_moe_cache_free)(&((MOE_CACHE *)p->moe)[l]);
    free(p->moe);
    free(p->att_off);
    R *bufs[] = {p->x, p->h, p->xn1, p->xn2, p->rstd1, p->rstd2, p->q, p->k, p->v, p->ao, p->att, p->inv_freq,
                 p->xl, p->xf, p->rstdf, p->logits, p->patch_emb, p->dx, p->dh, p->dy, p->dt, p->dq, p->dk, p->dv,
                 p->dao, p->datt, p->dpe};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) free(bufs[i]);
    free(p->loss_rows);
    free(p->cells);
    free(p->row_max);
    free(p->row_sum);
    memset(p, 0, sizeof *p);
}

void FN(nm_train_acts_free)(FN(nm_train_acts) *a) {
    if (!a->priv) return;
    FN(acts_release)(a->priv);
    free(a->priv);
    a->priv = NULL;
}

void FN(nm_train_batch_free)(FN(nm_train_batch) *b) {
    free(b->start);
    free(b->id);
    free(b->patch);
    free(b->target);
    free(b->loss_w);
    free(b->loss_kind);
    free(b->modality);
    free(b->patch_rows);
    memset(b, 0, sizeof *b);
}

nm_status FN(nm_train_batch_reserve)(FN(nm_train_batch) *b, int B, int T, int n_patch, int p, nm_error *err) {
    if (B > b->cap_B) {
        int *s = realloc(b->start, (size_t)(B + 1) * sizeof *s);
        if (!s) return NM_NOMEM(err, "batch");
        b->start = s;
        b->cap_B = B;
    }
    if (T > b->cap_T) {
        int32_t *id = realloc(b->id, (size_t)T * sizeof *id);
        if (id) b->id = id;
        int32_t *pa = realloc(b->patch, (size_t)T * sizeof *pa);
        if (pa) b->patch = pa;
        int32_t *tg = realloc(b->target, (size_t)T * sizeof *tg);
        if (tg) b->target = tg;
        R *w = realloc(b->loss_w, (size_t)T * sizeof *w);
        if (w) b->loss_w = w;
        uint8_t *lk = realloc(b->loss_kind, (size_t)T);
        if (lk) b->loss_kind = lk;
        uint8_t *mo = realloc(b->modality, (size_t)T);
        if (mo) b->modality = mo;
        if (!id || !pa || !tg || !w || !lk || !mo) return NM_NOMEM(err, "batch");
        b->cap_T = T;
    }
    if (n_patch > b->cap_patch) {
        R *r = realloc(b->patch_rows, (size_t)n_patch * 3 * p * p * sizeof *r);
        if (!r) return NM_NOMEM(err, "batch pixels");
        b->patch_rows = r;
        b->cap_patch = n_patch;
    }
    return NM_OK;
}

// (Re)allocates the activations for this batch. Everything is sized by T, the number of loss
// rows and the attention blocks, and kept when big enough.
static nm_status FN(acts_reserve)(FN(acts_priv) *p, const nm_config *c, const FN(nm_train_batch) *b, int n_loss,
                                  nm_error *err) {
    const int L = c->num_layers, D = c->hidden_size, qd = c->num_heads * c->head_dim,
              kvd = c->num_kv_heads * c->head_dim, V = c->vocab_size;
    size_t att = 0;
    for (int s = 0; s < b->B; s++) {
        size_t ts = (size_t)(b->start[s + 1] - b->start[s]);
        att += (size_t)c->num_heads * ts * ts;
    }
    if (!p->moe) {
        p->L = L;
        p->moe = calloc((size_t)L, sizeof(MOE_CACHE));
        p->inv_freq = malloc((size_t)(c->head_dim / 2) * sizeof(R));
        if (!p->moe || !p->inv_freq) return NM_NOMEM(err, "training activations");
        FN(nm_rope_freqs)(p->inv_freq, c->head_dim, c->rope_theta);
    }
    if (b->B > p->cap_B) {
        size_t *o = realloc(p->att_off, (size_t)b->B * sizeof *o);
        if (!o) return NM_NOMEM(err, "training activations");
        p->att_off = o;
        p->cap_B = b->B;
    }
#define GROW(ptr, n)                                                                                             \
    do {                                                                                                         \
        free(ptr);                                                                                               \
        (ptr) = malloc((size_t)(n) * sizeof(R));                                                                 \
        if (!(ptr)) return NM_NOMEM(err, "training activations");                                              \
    } while (0)
    if (b->T > p->cap_T) {
        const size_t T = (size_t)b->T, wide = (size_t)(D > qd ? D : qd);
        GROW(p->x, (L + 1) * T * D);
        GROW(p->h, L * T * D);
        GROW(p->xn1, L * T * D);
        GROW(p->xn2, L * T * D);
        GROW(p->rstd1, L * T);
        GROW(p->rstd2, L * T);
        GROW(p->q, L * T * qd);
        GROW(p->k, L * T * kvd);
        GROW(p->v, L * T * kvd);
        GROW(p->ao, L * T * qd);
        GROW(p->patch_emb, T * D);
        GROW(p->dx, T * D);
        GROW(p->dh, T * D);
        GROW(p->dy, T * wide);
        GROW(p->dt, T * wide);
        GROW(p->dq, T * qd);
        GROW(p->dk, T * kvd);
        GROW(p->dv, T * kvd);
        GROW(p->dao, T * qd);
        GROW(p->dpe, T * D);
        free(p->loss_rows);
        free(p->cells);
        p->loss_rows = malloc(T * sizeof *p->loss_rows);
        p->cells = malloc(T * sizeof *p->cells);
        if (!p->loss_rows || !p->cells) return NM_NOMEM(err, "training activations");
        p->cap_T = b->T;
    }
    if (n_loss > p->cap_rows) {
        GROW(p->xl, (size_t)n_loss * D);
        GROW(p->xf, (size_t)n_loss * D);
        GROW(p->rstdf, n_loss);
        GROW(p->logits, (size_t)n_loss * V);
        free(p->row_max);
        free(p->row_sum);
        p->row_max = malloc((size_t)n_loss * sizeof(double));
        p->row_sum = malloc((size_t)n_loss * sizeof(double));
        if (!p->row_max || !p->row_sum) return NM_NOMEM(err, "training activations");
        p->cap_rows = n_loss;
    }
    if (att > p->cap_att) {
        GROW(p->att, (size_t)L * att);
        GROW(p->datt, att);
        p->cap_att = att;
    }
#undef GROW
    att = 0;
    for (int s = 0; s < b->B; s++) {
        size_t ts = (size_t)(b->start[s + 1] - b->start[s]);
        p->att_off[s] = att;
        att += (size_t)c->num_heads * ts * ts;
    }
    return NM_OK;
}

static FN(nm_moe_params) FN(moe_params)(R *base, const nm_layer_offsets *o) {
    FN(nm_moe_params) w = {base + o->router, base + o->gate, base + o->up, base + o->down, NULL, NULL, NULL};
    if (o->sh_gate != NM_NO_TENSOR) w.sh_gate = base + o->sh_gate, w.sh_up = base + o->sh_up, w.sh_down = base + o->sh_down;
    return w;
}

const R *FN(nm_train_logits)(const FN(nm_train_acts) *a, int *n, const int32_t **rows) {
    const FN(acts_priv) *p = a->priv;
    *n = p ? p->n_loss : 0;
    *rows = p ? p->loss_rows : NULL;
    return p ? p->logits : NULL;
}

const FN(nm_moe_cache) *FN(nm_train_moe_cache)(const FN(nm_train_acts) *a, int l) {
    const FN(acts_priv) *p = a->priv;
    return p && p->moe && l >= 0 && l < p->L ? &((const MOE_CACHE *)p->moe)[l] : NULL;
}

// x (T, D) += o (T, D)
static void FN(add_into)(R *x, const R *o, size_t n) {
    #pragma omp parallel for schedule(static) if (n >= 65536)
    for (size_t i = 0; i < n; i++) x[i] += o[i];
}

nm_status FN(nm_train_forward)(FN(nm_train_acts) *a, nm_train_stats *st, const R *params, const nm_param_layout *pl,
                               const FN(nm_train_batch) *b, double w_bal, double w_z, nm_error *err) {
    // params: (pl->len) laid out as nm_model's arena; batch: T tokens in B sequences.
    // Keeps per layer x, h, xn1, xn2: (T, D); q: (T, nh*hd); k, v: (T, nkv*hd); attention
    // probabilities (nh, Ts, Ts) per sequence; the MoE cache; logits: (n_loss, V).
    const nm_config *c = &pl->cfg;
    const int L = c->num_layers, D = c->hidden_size, nh = c->num_heads, nkv = c->num_kv_heads, hd = c->head_dim;
    const int qd = nh * hd, kvd = nkv * hd, V = c->vocab_size, K = c->moe.top_k, T = b->T;
    const double eps = c->rms_norm_eps;
    R *P = (R *)params; // read only; the MoE parameter struct has non-const members
    memset(st, 0, sizeof *st);
    if (!a->priv && !(a->priv = calloc(1, sizeof(FN(acts_priv))))) return NM_NOMEM(err, "training activations");
    FN(acts_priv) *p = a->priv;
    int n_loss = 0;
    for (int t = 0; t < T; t++) n_loss += b->target[t] >= 0;
    nm_status s = FN(acts_reserve)(p, c, b, n_loss, err);
    if (s != NM_OK) return s;
    for (int t = 0, r = 0; t < T; t++)
        if (b->target[t] >= 0) p->loss_rows[r++] = t;
    p->n_loss = n_loss;

    // embeddings: token rows, then patch rows = patch_w pixels + patch_b + pos_embed[cell]
    R *x0 = p->x;
    FN(nm_embedding_forward)(x0, b->id, P + pl->embed, T, D);
    if (b->n_patch > 0) {
        const int pp = 3 * c->patch_size * c->patch_size;
        FN(nm_linear_forward)(p->patch_emb, b->patch_rows, P + pl->patch_w, P + pl->patch_b, b->n_patch, pp, D);
        for (int t = 0, r = 0; t < T; t++) {
            if (b->id[t] >= 0) continue;
            const R *e = p->patch_emb + (size_t)r++ * D, *pe = P + pl->pos_embed + (size_t)b->patch[t] * D;
            R *o = x0 + (size_t)t * D;
            for (int d = 0; d < D; d++) o[d] = e[d] + pe[d];
        }
    }

    for (int l = 0; l < L; l++) {
        const nm_layer_offsets *o = &pl->layer[l];
        const size_t TD = (size_t)T * D;
        R *x = p->x + l * TD, *h = p->h + l * TD, *xn1 = p->xn1 + l * TD, *xn2 = p->xn2 + l * TD;
        R *q = p->q + (size_t)l * T * qd, *k = p->k + (size_t)l * T * kvd, *v = p->v + (size_t)l * T * kvd;
        R *ao = p->ao + (size_t)l * T * qd, *att = p->att + (size_t)l * p->cap_att;
        FN(nm_rmsnorm_forward)(xn1, p->rstd1 + (size_t)l * T, x, P + o->attn_norm, T, D, eps);
        FN(nm_linear_forward)(q, xn1, P + o->wq, NULL, T, D, qd);
        FN(nm_linear_forward)(k, xn1, P + o->wk, NULL, T, D, kvd);
        FN(nm_linear_forward)(v, xn1, P + o->wv, NULL, T, D, kvd);
        // per sequence: RoPE from position 0, causal attention within the sequence
        // sequences in parallel (each op then runs on one thread); one sequence: the op's own threads
        #pragma omp parallel for schedule(dynamic, 1) if (b->B > 1)
        for (int sq = 0; sq < b->B; sq++) {
            const int t0 = b->start[sq], ts = b->start[sq + 1] - t0;
            FN(nm_rope_forward)(q + (size_t)t0 * qd, q + (size_t)t0 * qd, ts, nh, hd, 0, p->inv_freq);
            FN(nm_rope_forward)(k + (size_t)t0 * kvd, k + (size_t)t0 * kvd, ts, nkv, hd, 0, p->inv_freq);
            FN(nm_attention_forward)(ao + (size_t)t0 * qd, att + p->att_off[sq], q + (size_t)t0 * qd,
                                     k + (size_t)t0 * kvd, v + (size_t)t0 * kvd, ts, nh, nkv, hd);
        }
        memcpy(h, x, TD * sizeof(R));
        GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, T, D, qd, 1, ao, qd, P + o->wo, qd, 1, h, D); // h += ao Wo^T
        FN(nm_rmsnorm_forward)(xn2, p->rstd2 + (size_t)l * T, h, P + o->moe_norm, T, D, eps);
        MOE_CACHE *mc = &((MOE_CACHE *)p->moe)[l];
        FN(nm_moe_params) mw = FN(moe_params)(P, o);
        R *xnext = p->x + (l + 1) * TD;
        if ((s = FN(nm_moe_train_forward)(xnext, mc, xn2, &mw, &c->moe, T, D, err)) != NM_OK) return s;
        FN(add_into)(xnext, h, TD); // x' = h + MoE(RMSNorm(h))
        st->l_bal += mc->l_bal / L;
        st->l_z += mc->l_z / L;
        st->real_slots += mc->real_slots;
        for (int t = 0; t < T; t++) {
            const int nr = mc->n_real[t];
            st->zero_compute += nr == 0;
            if (b->modality[t] == NM_MOD_VISION) st->real_vision += (double)nr / K, st->vision++;
            else if (b->modality[t] == NM_MOD_TEXT) st->real_text += (double)nr / K, st->text++;
        }
    }
    st->tokens = T;
    st->slots = (long)T * K * L;
    st->token_layers = (long)T * L;

    // final norm and LM head on the loss rows only
    const R *xL = p->x + (size_t)L * T * D;
    for (int r = 0; r < n_loss; r++) memcpy(p->xl + (size_t)r * D, xL + (size_t)p->loss_rows[r] * D, D * sizeof(R));
    FN(nm_rmsnorm_forward)(p->xf, p->rstdf, p->xl, P + pl->norm, n_loss, D, eps);
    FN(nm_linear_forward)(p->logits, p->xf, P + pl->lm_head, NULL, n_loss, D, V);
    double ce = 0, ca = 0, cp = 0;
    for (int r = 0; r < n_loss; r++) {
        const int t = p->loss_rows[r];
        const R *z = p->logits + (size_t)r * V;
        double mx = z[0], sum = 0;
        for (int i = 1; i < V; i++) mx = z[i] > mx ? z[i] : mx;
        for (int i = 0; i < V; i++) sum += exp((double)z[i] - mx);
        p->row_max[r] = mx;
        p->row_sum[r] = sum;
        const double lse = mx + log(sum), l_t = lse - z[b->target[t]];
        ce += (double)b->loss_w[t] * l_t;
        if (b->loss_kind[t] == NM_LOSS_ANSWER) ca += l_t, st->n_answer++;
        else if (b->loss_kind[t] == NM_LOSS_PROMPT) cp += l_t, st->n_prompt++;
    }
    st->ce = ce;
    st->ce_answer = st->n_answer ? ca / st->n_answer : 0;
    st->ce_prompt = st->n_prompt ? cp / st->n_prompt : 0;
    st->loss = ce + w_bal * st->l_bal + w_z * st->l_z;
    return NM_OK;
}

nm_status FN(nm_train_backward)(FN(nm_train_acts) *a, R *grads, const R *params, const nm_param_layout *pl,
                                const FN(nm_train_batch) *b, double w_bal, double w_z, nm_error *err) {
    // grads: (pl->len), accumulated (+=). Walks the layers backwards with dx: (T, D), the
    // gradient of the residual stream; scratch dh, dy, dt: (T, max(D, qd)); dq, dk, dv per layer.
    const nm_config *c = &pl->cfg;
    const int L = c->num_layers, D = c->hidden_size, nh = c->num_heads, nkv = c->num_kv_heads, hd = c->head_dim;
    const int qd = nh * hd, kvd = nkv * hd, V = c->vocab_size, T = b->T;
    R *P = (R *)params, *G = grads;
    FN(acts_priv) *p = a->priv;
    if (!p) return nm_fail(err, NM_ERR_INTERNAL, "backward without a forward");
    const int n_loss = p->n_loss;

    // cross-entropy: dlogits = w_t (softmax - onehot), in place over the logits
    for (int r = 0; r < n_loss; r++) {
        const int t = p->loss_rows[r];
        R *z = p->logits + (size_t)r * V;
        const double mx = p->row_max[r], sum = p->row_sum[r], w = b->loss_w[t]; // from the forward
        for (int i = 0; i < V; i++) z[i] = (R)(w * exp((double)z[i] - mx) / sum);
        z[b->target[t]] -= (R)w;
    }
    // LM head and final norm: dxf = dlogits W; then the norm's backward into the loss rows of dx
    R *dxf = p->dt;
    FN(nm_linear_backward)(dxf, G + pl->lm_head, NULL, p->logits, p->xf, P + pl->lm_head, n_loss, D, V);
    R *dx = p->dx;
    memset(dx, 0, (size_t)T * D * sizeof(R));
    FN(nm_rmsnorm_backward)(p->dy, G + pl->norm, dxf, p->xl, P + pl->norm, p->rstdf, n_loss, D);
    for (int r = 0; r < n_loss; r++) memcpy(dx + (size_t)p->loss_rows[r] * D, p->dy + (size_t)r * D, D * sizeof(R));

    for (int l = L - 1; l >= 0; l--) {
        const nm_layer_offsets *o = &pl->layer[l];
        const size_t TD = (size_t)T * D;
        R *x = p->x + l * TD, *h = p->h + l * TD, *xn1 = p->xn1 + l * TD, *xn2 = p->xn2 + l * TD;
        R *q = p->q + (size_t)l * T * qd, *k = p->k + (size_t)l * T * kvd, *v = p->v + (size_t)l * T * kvd;
        R *ao = p->ao + (size_t)l * T * qd, *att = p->att + (size_t)l * p->cap_att;
        // x' = h + MoE(RMSNorm(h)): dh = dx + RMSNorm'(MoE'(dx))
        MOE_CACHE *mc = &((MOE_CACHE *)p->moe)[l];
        FN(nm_moe_params) mw = FN(moe_params)(P, o), mg = FN(moe_params)(G, o);
        FN(nm_moe_train_backward)(p->dy, &mg, dx, w_bal / L, w_z / L, mc, xn2, &mw, &c->moe, T, D);
        FN(nm_rmsnorm_backward)(p->dt, G + o->moe_norm, p->dy, h, P + o->moe_norm, p->rstd2 + (size_t)l * T, T, D);
        R *dh = p->dh;
        for (size_t i = 0; i < TD; i++) dh[i] = dx[i] + p->dt[i];
        // h = x + ao Wo^T
        FN(nm_linear_backward)(p->dao, G + o->wo, NULL, dh, ao, P + o->wo, T, qd, D);
        #pragma omp parallel for schedule(dynamic, 1) if (b->B > 1)
        for (int sq = 0; sq < b->B; sq++) {
            const int t0 = b->start[sq], ts = b->start[sq + 1] - t0;
            R *dq = p->dq + (size_t)t0 * qd, *dk = p->dk + (size_t)t0 * kvd;
            FN(nm_attention_backward)(dq, dk, p->dv + (size_t)t0 * kvd, p->datt + p->att_off[sq],
                                      p->dao + (size_t)t0 * qd, q + (size_t)t0 * qd, k + (size_t)t0 * kvd,
                                      v + (size_t)t0 * kvd, att + p->att_off[sq], ts, nh, nkv, hd);
            FN(nm_rope_backward)(dq, dq, ts, nh, hd, 0, p->inv_freq);
            FN(nm_rope_backward)(dk, dk, ts, nkv, hd, 0, p->inv_freq);
        }
        // dxn1 = dq Wq + dk Wk + dv Wv
        R *dxn1 = p->dy;
        FN(nm_linear_backward)(dxn1, G + o->wq, NULL, p->dq, xn1, P + o->wq, T, D, qd);
        FN(nm_linear_backward)(NULL, G + o->wk, NULL, p->dk, xn1, P + o->wk, T, D, kvd);
        FN(nm_linear_backward)(NULL, G + o->wv, NULL, p->dv, xn1, P + o->wv, T, D, kvd);
        GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, D, kvd, 1, p->dk, kvd, P + o->wk, D, 1, dxn1, D);
        GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, D, kvd, 1, p->dv, kvd, P + o->wv, D, 1, dxn1, D);
        FN(nm_rmsnorm_backward)(p->dt, G + o->attn_norm, dxn1, x, P + o->attn_norm, p->rstd1 + (size_t)l * T, T, D);
        for (size_t i = 0; i < TD; i++) dx[i] = dh[i] + p->dt[i];
    }

    // embeddings
    FN(nm_embedding_backward)(G + pl->embed, dx, b->id, T, D);
    if (b->n_patch > 0) {
        const int pp = 3 * c->patch_size * c->patch_size;
        int32_t *cells = p->cells;
        for (int t = 0, r = 0; t < T; t++) {
            if (b->id[t] >= 0) continue;
            memcpy(p->dpe + (size_t)r * D, dx + (size_t)t * D, D * sizeof(R));
            cells[r++] = b->patch[t];
        }
        FN(nm_linear_backward)(NULL, G + pl->patch_w, G + pl->patch_b, p->dpe, b->patch_rows, P + pl->patch_w,
                               b->n_patch, pp, D);
        FN(nm_embedding_backward)(G + pl->pos_embed, p->dpe, cells, b->n_patch, D);
    }
    return NM_OK;
}

#undef MOE_CACHE
