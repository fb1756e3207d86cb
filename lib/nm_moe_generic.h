// nm_moe_generic.h — internal: the training MoE layer (nm_train_moe.h) written once for a real type.
//
// Included by nm_train_moe.c once per precision, with these defined:
//   R        the real type (double or float)
//   FN(name) the name with the precision suffix (name##_f64 / name##_f32), for types too
//   GEMM     cblas_dgemm / cblas_sgemm
// and, before the include: FN(route_tokens)(cache, null_mass, mc, T), the routing decision from
// cache->logits into the cache's routing arrays; grow(); the B_* buffer indices; work_key();
// SMALL_MACS, TOKEN_BLOCK and WEIGHT_BLOCK.
// Not a public header: it defines functions and must be included only from nm_train_moe.c.
//
// The layer, as appendix B of the paper computes it (DESIGN.md §2):
//   forward   logits = y Wr^T (one GEMM) -> routing -> dispatch: every selected real slot gets a
//             row, rows grouped by expert (null slots get none: they cost nothing) -> per expert,
//             in parallel: gather its tokens, hg = xs Wg^T, hu = xs Wu^T, act = silu(hg) hu,
//             eo = act Wd^T (one GEMM per matrix) -> shared expert over all tokens -> per token,
//             out = shared + sum over its slots in slot order of g * eo (copy kind: g * y for a
//             null slot) -> L_bal, L_z.
//   backward  per expert, in parallel: deo = g dout, dg = dout . eo, dWd += deo^T act,
//             dact = deo Wd, (dhg, dhu) = swiglu', dWg += dhg^T xs, dWu += dhu^T xs,
//             dxs = dhg Wg + dhu Wu -> per token: dz from the gates' softmax, L_bal and L_z ->
//             dWr += dz^T y, dy = dz Wr -> shared expert -> dy += each row's dxs in slot order.
// Determinism: inside the parallel regions BLAS runs single-threaded (the OpenMP build of
// OpenBLAS does so in an active region), each work item writes only its own rows and its own
// expert's weight gradients, and everything shared by tokens is summed per token in slot order
// after the parallel part. The whole-batch GEMMs (router, shared expert) are cut into fixed row
// blocks (gemm_blocked). No float atomics, no reduction whose order depends on the schedule or
// on the thread count: the bits are the same with any number of threads.

#if !defined(R) || !defined(FN) || !defined(GEMM)
#error "nm_moe_generic.h is included from nm_train_moe.c only"
#endif

// What a forward keeps besides the public routing arrays. Per-row buffers hold one row per
// selected real slot, grouped by expert: rows offsets[e] .. offsets[e+1]-1 are expert e's, in
// token order. Null slots have no row.
typedef struct {
    int nth;           // threads the per-thread scratch was cut for (the backward uses at most these)
    int rows;          // real slots of the last forward
    int max_rows;      // rows of its busiest expert
    int n_work;        // experts with at least one row
    int32_t *offsets;  // [N+1] first row of each expert
    int32_t *cursor;   // [N]   dispatch cursor
    int64_t *work;     // [N]   work_key of each expert with rows, busiest first
    int32_t *row_slot; // [rows] slot index t*K + k of each row
    int32_t *slot_row; // [T*K] row of each slot; -1 for a null slot
    R *xs;             // (rows, D) each row's input y_t, gathered
    R *hg, *hu;        // (rows, H) gate and up pre-activations
    R *act;            // (rows, H) silu(hg) * hu
    R *eo;             // (rows, D) ungated expert output E_e(y_t)
    R *sh_hg, *sh_hu;  // (T, Hs) the shared expert's pre-activations
    R *sh_act;         // (T, Hs)
    R *null_mass;      // [T] written by the router, not needed after it
    R *p_all;          // (T, N+1) softmax p over the expanded slots: each real expert's, and
                       //          (column N) one null copy's; for L_bal, L_z and their backward
    double *share;     // [N+1] f_i of each real expert; [N]: all M null copies together
    double *psum;      // [N+1] sum over tokens of p_i; [N]: of one null copy's p
    // backward scratch: the backward cannot fail, so the forward sizes it
    R *dgate;          // [T*K] dL/dg of each real slot
    R *dxs;            // (rows, D) each row's share of dy
    R *dz;             // (T, N+1) dL/dlogits
    R *sh_dh;          // (2, T, Hs) the shared expert's dhg, dhu
    R *scratch;        // nth x (max_rows, D + 2H): one expert's deo, dhg, dhu per thread
    size_t cap[B_COUNT];
} FN(moe_priv);

void FN(nm_moe_cache_free)(FN(nm_moe_cache) *c) {
    if (!c) return;
    FN(moe_priv) *p = c->priv;
    free(c->n_real); free(c->slot); free(c->logits); free(c->prob); free(c->gate); free(c->lse);
    if (p) {
        free(p->offsets); free(p->cursor); free(p->work); free(p->row_slot); free(p->slot_row);
        free(p->xs); free(p->hg); free(p->hu); free(p->act); free(p->eo);
        free(p->sh_hg); free(p->sh_hu); free(p->sh_act); free(p->null_mass); free(p->p_all);
        free(p->share); free(p->psum);
        free(p->dgate); free(p->dxs); free(p->dz); free(p->sh_dh); free(p->scratch);
        free(p);
    }
    memset(c, 0, sizeof *c);
}

// buf = a buffer of at least `bytes`, its capacity in p->cap[idx]; false when out of memory
#define GROW(buf, idx, bytes) (((buf) = grow((buf), &p->cap[idx], (bytes))) != NULL)

static void FN(count_priv_bytes)(FN(nm_moe_cache) *c) {
    FN(moe_priv) *p = c->priv;
    c->priv_bytes = sizeof *p;
    for (int i = B_OFFSETS; i < B_COUNT; i++) c->priv_bytes += p->cap[i];
}

// The buffers whose size follows T alone.
static nm_status FN(reserve_tokens)(FN(nm_moe_cache) *c, const nm_moe_config *mc, int T, nm_error *err) {
    if (!c->priv && !(c->priv = calloc(1, sizeof(FN(moe_priv)))))
        return nm_fail(err, NM_ERR_NOMEM, "out of memory for the MoE training cache (%d tokens)", T);
    FN(moe_priv) *p = c->priv;
    const size_t N = (size_t)mc->num_experts, S = N + 1, t = (size_t)T, TK = t * (size_t)mc->top_k,
                 Hs = (size_t)mc->shared_expert_hidden, r = sizeof(R);
    const int ok = GROW(c->n_real, B_N_REAL, t) && GROW(c->slot, B_SLOT, TK * sizeof(int16_t)) &&
                   GROW(c->logits, B_LOGITS, t * S * r) && GROW(c->prob, B_PROB, TK * r) &&
                   GROW(c->gate, B_GATE, TK * r) && GROW(c->lse, B_LSE, t * r) &&
                   GROW(p->offsets, B_OFFSETS, S * sizeof(int32_t)) && GROW(p->cursor, B_CURSOR, N * sizeof(int32_t)) &&
                   GROW(p->work, B_WORK, N * sizeof(int64_t)) && GROW(p->slot_row, B_SLOT_ROW, TK * sizeof(int32_t)) &&
                   GROW(p->sh_hg, B_SH_HG, t * Hs * r) && GROW(p->sh_hu, B_SH_HU, t * Hs * r) &&
                   GROW(p->sh_act, B_SH_ACT, t * Hs * r) && GROW(p->null_mass, B_NULL_MASS, t * r) &&
                   GROW(p->p_all, B_P_ALL, t * S * r) &&
                   GROW(p->share, B_SHARE, S * sizeof(double)) && GROW(p->psum, B_PSUM, S * sizeof(double)) &&
                   GROW(p->dgate, B_DGATE, TK * r) && GROW(p->dz, B_DZ, t * S * r) &&
                   GROW(p->sh_dh, B_SH_DH, 2 * t * Hs * r);
    FN(count_priv_bytes)(c);
    return ok ? NM_OK : nm_fail(err, NM_ERR_NOMEM, "out of memory for the MoE training cache (%d tokens)", T);
}

// The per-row buffers, once the routing has fixed the number of rows (and the busiest expert's).
static nm_status FN(reserve_rows)(FN(nm_moe_cache) *c, const nm_moe_config *mc, int D, nm_error *err) {
    FN(moe_priv) *p = c->priv;
    const size_t rows = (size_t)p->rows, d = (size_t)D, H = (size_t)mc->expert_hidden, r = sizeof(R);
    p->nth = omp_get_max_threads();
    const int ok = GROW(p->row_slot, B_ROW_SLOT, rows * sizeof(int32_t)) && GROW(p->xs, B_XS, rows * d * r) &&
                   GROW(p->hg, B_HG, rows * H * r) && GROW(p->hu, B_HU, rows * H * r) &&
                   GROW(p->act, B_ACT, rows * H * r) && GROW(p->eo, B_EO, rows * d * r) &&
                   GROW(p->dxs, B_DXS, rows * d * r) &&
                   GROW(p->scratch, B_SCRATCH, (size_t)p->nth * (size_t)p->max_rows * (d + 2 * H) * r);
    FN(count_priv_bytes)(c);
    return ok ? NM_OK : nm_fail(err, NM_ERR_NOMEM, "out of memory for the MoE training cache (%d real slots)", p->rows);
}
#undef GROW

// ---- GEMMs over the whole batch ----

// C (m, n) = op(A) op(B) + beta C, cut into fixed blocks of `rb` rows of C that run in parallel,
// each one GEMM on one thread (BLAS stays single-threaded inside an active parallel region). The
// cut follows the shapes only, never the thread count, and so do the result's bits: OpenBLAS's
// own threading of one big GEMM rounds differently at different thread counts. Below
// SMALL_MACS multiply-adds the blocks run in turn without a region (each is then under
// OpenBLAS's threshold for threading a GEMM: one thread either way, the same bits).
static void FN(gemm_blocked)(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int m, int n, int k, const R *A, int lda,
                             const R *B, int ldb, R beta, R *C, int ldc, int rb) {
    // op(A): (m, k)  op(B): (k, n)  C: (m, n)
    if (m <= 0 || n <= 0) return;
    const int blocks = (m + rb - 1) / rb;
    #pragma omp parallel for schedule(static) if ((double)m * n * k >= SMALL_MACS)
    for (int b = 0; b < blocks; b++) {
        const int r0 = b * rb, rows = m - r0 < rb ? m - r0 : rb;
        const R *Ab = ta == CblasNoTrans ? A + (size_t)r0 * lda : A + r0; // rows r0.. of op(A)
        GEMM(CblasRowMajor, ta, tb, rows, n, k, 1, Ab, lda, B, ldb, beta, C + (size_t)r0 * ldc, ldc);
    }
}

// ---- forward ----

// Dispatch: counts rows per expert and lays the rows out by expert (tokens in order inside an
// expert's block); null slots get no row. Sets rows, max_rows, offsets, the work list, and
// (after reserving the rows) row_slot / slot_row.
static nm_status FN(dispatch)(FN(nm_moe_cache) *c, const nm_moe_config *mc, int T, int D, nm_error *err) {
    FN(moe_priv) *p = c->priv;
    const int N = mc->num_experts, K = mc->top_k;
    const size_t TK = (size_t)T * K;
    int32_t *count = p->cursor; // counts first, then the cursor
    memset(count, 0, (size_t)N * sizeof *count);
    for (size_t i = 0; i < TK; i++)
        if (c->slot[i] >= 0) count[c->slot[i]]++;
    p->offsets[0] = 0;
    p->max_rows = 0;
    p->n_work = 0;
    for (int e = 0; e < N; e++) {
        p->offsets[e + 1] = p->offsets[e] + count[e];
        if (count[e] > p->max_rows) p->max_rows = count[e];
        if (count[e] > 0) p->work[p->n_work++] = work_key(count[e], e);
    }
    p->rows = p->offsets[N];
    qsort(p->work, (size_t)p->n_work, sizeof *p->work, cmp_work_desc);
    nm_status s = FN(reserve_rows)(c, mc, D, err);
    if (s != NM_OK) return s;
    memcpy(p->cursor, p->offsets, (size_t)N * sizeof *p->cursor);
    for (size_t i = 0; i < TK; i++) {
        const int e = c->slot[i];
        if (e < 0) {
            p->slot_row[i] = -1;
            continue;
        }
        const int row = p->cursor[e]++;
        p->row_slot[row] = (int32_t)i;
        p->slot_row[i] = row;
    }
    return NM_OK;
}

// Whether the expert work items are worth a parallel region. Below the bar every expert GEMM
// has m n k < SMALL_MACS, under OpenBLAS's own threshold for threading a GEMM, so it runs on
// one thread either way and the results are the same bits; tiny calls (the gradient checks run
// thousands) then skip the region's start-up and the spinning of idle threads.
static int FN(experts_in_parallel)(const FN(moe_priv) *p, int D, int H) {
    return p->n_work > 1 && (double)p->rows * D * H >= SMALL_MACS;
}

// Expert e on its rows: gather the inputs, then hg, hu, act, eo, one GEMM per matrix.
static void FN(expert_forward)(FN(moe_priv) *p, const R *y, const FN(nm_moe_params) *w, int e, int D, int H, int K) {
    // xs, eo: (n, D)  hg, hu, act: (n, H)  Wg, Wu: (H, D)  Wd: (D, H)
    const int o = p->offsets[e], n = p->offsets[e + 1] - o;
    R *xs = p->xs + (size_t)o * D, *hg = p->hg + (size_t)o * H, *hu = p->hu + (size_t)o * H,
      *act = p->act + (size_t)o * H, *eo = p->eo + (size_t)o * D;
    const R *wg = w->gate + (size_t)e * H * D, *wu = w->up + (size_t)e * H * D, *wd = w->down + (size_t)e * D * H;
    for (int r = 0; r < n; r++) memcpy(xs + (size_t)r * D, y + (size_t)(p->row_slot[o + r] / K) * D, (size_t)D * sizeof(R));
    GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, n, H, D, 1, xs, D, wg, D, 0, hg, H); // hg = xs Wg^T
    GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, n, H, D, 1, xs, D, wu, D, 0, hu, H); // hu = xs Wu^T
    FN(nm_swiglu_forward)(act, hg, hu, (size_t)n * H);
    GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, n, D, H, 1, act, H, wd, H, 0, eo, D); // eo = act Wd^T
}

// p_all: every token's softmax p over the expanded slots, once (tokens in parallel): a real
// expert's p_i, and in column N one null copy's (0 when M = 0: the null logit is not a slot).
static void FN(softmax_all)(FN(moe_priv) *p, const FN(nm_moe_cache) *c, const nm_moe_config *mc, int T) {
    const int N = mc->num_experts, M = mc->null_copies, S = N + 1;
    #pragma omp parallel for schedule(static) if ((size_t)T * S >= 16384)
    for (int t = 0; t < T; t++) {
        const R *z = c->logits + (size_t)t * S;
        R *pt = p->p_all + (size_t)t * S;
        const double lse = c->lse[t];
        for (int i = 0; i < N; i++) pt[i] = (R)exp((double)z[i] - lse);
        pt[N] = M > 0 ? (R)exp((double)z[N] - lse) : 0;
    }
}

// L_bal = (N+M) sum_i f_i P_i and L_z = mean_t lse_t^2 over this call's T tokens. The M null
// copies share one logit, so their P_i are equal and sum_{copies} f_i P_i = F_null P_copy: only
// the null copies' total share F_null matters (kept in share[N]). Sums in token order (double).
static void FN(losses_forward)(FN(nm_moe_cache) *c, const nm_moe_config *mc, int T) {
    FN(moe_priv) *p = c->priv;
    const int N = mc->num_experts, M = mc->null_copies, K = mc->top_k;
    const size_t TK = (size_t)T * K;
    memset(p->share, 0, (size_t)(N + 1) * sizeof *p->share);
    memset(p->psum, 0, (size_t)(N + 1) * sizeof *p->psum);
    for (size_t i = 0; i < TK; i++) p->share[c->slot[i] >= 0 ? c->slot[i] : N] += 1.0;
    for (int i = 0; i <= N; i++) p->share[i] /= (double)TK;
    double zz = 0.0;
    long real = 0;
    for (int t = 0; t < T; t++) {
        const R *pt = p->p_all + (size_t)t * (N + 1);
        for (int i = 0; i <= N; i++) p->psum[i] += pt[i];
        zz += (double)c->lse[t] * c->lse[t];
        real += c->n_real[t];
    }
    double fp = 0.0;
    for (int i = 0; i <= N; i++) fp += p->share[i] * p->psum[i];
    c->l_bal = (double)(N + M) * fp / T;
    c->l_z = zz / T;
    c->real_slots = real;
}

nm_status FN(nm_moe_train_forward)(R *out, FN(nm_moe_cache) *c, const R *y, const FN(nm_moe_params) *w,
                                   const nm_moe_config *mc, int T, int D, nm_error *err) {
    // y, out: (T, D)  logits: (T, N+1)
    const int N = mc->num_experts, K = mc->top_k, H = mc->expert_hidden, Hs = mc->shared_expert_hidden, S = N + 1;
    const int copy = mc->null_kind == NM_NULL_COPY;
    nm_status s = FN(reserve_tokens)(c, mc, T, err);
    c->T = 0; // until this forward has succeeded
    if (s != NM_OK) return s;
    FN(moe_priv) *p = c->priv;
    c->K = K;
    if (T <= 0) {
        c->l_bal = c->l_z = 0.0;
        c->real_slots = 0;
        return NM_OK;
    }

    // 1. router logits and the routing decision
    FN(gemm_blocked)(CblasNoTrans, CblasTrans, T, S, D, y, D, w->router, D, 0, c->logits, S, TOKEN_BLOCK);
    FN(route_tokens)(c, p->null_mass, mc, T);

    // 2. rows grouped by expert; null slots cut
    if ((s = FN(dispatch)(c, mc, T, D, err)) != NM_OK) return s;

    // 3. the experts, one work item each (BLAS single-threaded inside)
    #pragma omp parallel for schedule(dynamic, 1) num_threads(p->nth) if (FN(experts_in_parallel)(p, D, H))
    for (int i = 0; i < p->n_work; i++) FN(expert_forward)(p, y, w, work_expert(p->work[i]), D, H, K);

    // 4. shared expert over every token: hg = y Wsg^T, hu = y Wsu^T, out = act_s Wsd^T
    if (Hs > 0) {
        FN(gemm_blocked)(CblasNoTrans, CblasTrans, T, Hs, D, y, D, w->sh_gate, D, 0, p->sh_hg, Hs, TOKEN_BLOCK);
        FN(gemm_blocked)(CblasNoTrans, CblasTrans, T, Hs, D, y, D, w->sh_up, D, 0, p->sh_hu, Hs, TOKEN_BLOCK);
        FN(nm_swiglu_forward)(p->sh_act, p->sh_hg, p->sh_hu, (size_t)T * Hs);
        FN(gemm_blocked)(CblasNoTrans, CblasTrans, T, D, Hs, p->sh_act, Hs, w->sh_down, Hs, 0, out, D, TOKEN_BLOCK);
    }

    // 5. combine, per token in slot order: out (+)= g * E(y) (copy kind: g * y for a null slot)
    #pragma omp parallel for schedule(static) if ((size_t)T * D >= 16384)
    for (int t = 0; t < T; t++) {
        R *o = out + (size_t)t * D;
        const R *yt = y + (size_t)t * D;
        int first = Hs == 0; // out holds the shared expert's output otherwise
        for (int k = 0; k < K; k++) {
            const size_t i = (size_t)t * K + k;
            const int row = p->slot_row[i];
            if (row < 0 && !copy) continue;
            const R g = c->gate[i], *src = row >= 0 ? p->eo + (size_t)row * D : yt;
            if (first) for (int d = 0; d < D; d++) o[d] = g * src[d];
            else for (int d = 0; d < D; d++) o[d] += g * src[d];
            first = 0;
        }
        if (first) memset(o, 0, (size_t)D * sizeof *o); // n_real = 0, nothing else: routed output 0
    }

    // 6. the auxiliary losses
    FN(softmax_all)(p, c, mc, T);
    FN(losses_forward)(c, mc, T);
    c->T = T;
    return NM_OK;
}

// ---- backward ----

// Expert e on its rows: dg and deo = g dout per row, the weight gradients (this expert's own:
// no other work item touches them), and dxs, each row's share of dy.
static void FN(expert_backward)(R *scr, FN(moe_priv) *p, FN(nm_moe_params) *dw, const R *dout,
                                const FN(nm_moe_cache) *c, const FN(nm_moe_params) *w, int e, int D, int H, int K) {
    // xs, eo, deo, dxs: (n, D)  hg, hu, act, dhg, dhu: (n, H)  Wg, Wu: (H, D)  Wd: (D, H)
    const int o = p->offsets[e], n = p->offsets[e + 1] - o;
    const R *xs = p->xs + (size_t)o * D, *hg = p->hg + (size_t)o * H, *hu = p->hu + (size_t)o * H,
            *act = p->act + (size_t)o * H, *eo = p->eo + (size_t)o * D;
    const R *wg = w->gate + (size_t)e * H * D, *wu = w->up + (size_t)e * H * D, *wd = w->down + (size_t)e * D * H;
    R *dwg = dw->gate + (size_t)e * H * D, *dwu = dw->up + (size_t)e * H * D, *dwd = dw->down + (size_t)e * D * H;
    R *deo = scr, *dhg = deo + (size_t)n * D, *dhu = dhg + (size_t)n * H, *dxs = p->dxs + (size_t)o * D;
    for (int r = 0; r < n; r++) {
        const int32_t i = p->row_slot[o + r];
        const R g = c->gate[i], *dt = dout + (size_t)(i / K) * D, *er = eo + (size_t)r * D;
        R *dr = deo + (size_t)r * D;
        double dg = 0.0; // dL/dg = dout_t . E_e(y_t)
        for (int d = 0; d < D; d++) {
            dg += (double)dt[d] * er[d];
            dr[d] = g * dt[d];
        }
        p->dgate[i] = (R)dg;
    }
    GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, D, H, n, 1, deo, D, act, H, 1, dwd, H);   // dWd += deo^T act
    GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, H, D, 1, deo, D, wd, H, 0, dhg, H);  // dact = deo Wd
    FN(nm_swiglu_backward)(dhg, dhu, dhg, hg, hu, (size_t)n * H);
    GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, H, D, n, 1, dhg, H, xs, D, 1, dwg, D);    // dWg += dhg^T xs
    GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, H, D, n, 1, dhu, H, xs, D, 1, dwu, D);    // dWu += dhu^T xs
    GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, D, H, 1, dhg, H, wg, D, 0, dxs, D);  // dxs = dhg Wg
    GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, D, H, 1, dhu, H, wu, D, 1, dxs, D);  //     + dhu Wu
}

// dz (N+1) = dL/dlogits of token t:
//   gates   g = softmax over the selected logits (real ones; copy kind: all K), so
//           dz_i += g_i (dg_i - sum_j g_j dg_j) over the selected set; a null copy's dg = dout . y
//   L_bal   dL/dp_j = cb f_j (cb = w_bal (N+M)/T, f without gradient), through p = softmax(z~):
//           dz~_j = p_j (cb f_j - s), s = sum_i p_i cb f_i
//   L_z     dL/dlse = cz = 2 w_z lse / T, dlse/dz~_j = p_j
// The M null copies all read the one logit z_N: their dz~ sum into dz_N (M p_copy = null mass).
static void FN(router_backward_token)(R *dz, const FN(nm_moe_cache) *c, const FN(moe_priv) *p, const R *dout_t,
                                      const R *y_t, double w_bal, double w_z, const nm_moe_config *mc, int t, int T,
                                      int D) {
    const int N = mc->num_experts, M = mc->null_copies, K = mc->top_k, copy = mc->null_kind == NM_NULL_COPY;
    const double cb = w_bal * (N + M) / T, cz = 2.0 * w_z * (double)c->lse[t] / T;
    const R *pt = p->p_all + (size_t)t * (N + 1); // pt[N]: one null copy's p (0 when M = 0)
    double s = 0.0;
    for (int i = 0; i <= N; i++) s += (double)pt[i] * cb * p->share[i];
    for (int i = 0; i < N; i++) dz[i] = (R)(pt[i] * (cb * p->share[i] - s + cz));
    dz[N] = (R)(pt[N] * (cb * p->share[N] - M * s + M * cz)); // M = 0: z_N is not used at all
    const int16_t *sl = c->slot + (size_t)t * K;
    const R *g = c->gate + (size_t)t * K, *dg = p->dgate + (size_t)t * K;
    double dg_null = 0.0;
    if (copy && c->n_real[t] < K)
        for (int d = 0; d < D; d++) dg_null += (double)dout_t[d] * y_t[d];
    double gdg = 0.0;
    for (int k = 0; k < K; k++)
        if (sl[k] >= 0) gdg += (double)g[k] * dg[k];
        else if (copy) gdg += (double)g[k] * dg_null;
    for (int k = 0; k < K; k++)
        if (sl[k] >= 0) dz[sl[k]] += (R)(g[k] * (dg[k] - gdg));
        else if (copy) dz[N] += (R)(g[k] * (dg_null - gdg));
}

void FN(nm_moe_train_backward)(R *dy, FN(nm_moe_params) *dw, const R *dout, double w_bal, double w_z,
                               const FN(nm_moe_cache) *c, const R *y, const FN(nm_moe_params) *w,
                               const nm_moe_config *mc, int T, int D) {
    // dy, dout, y: (T, D)  dz: (T, N+1)
    FN(moe_priv) *p = c->priv;
    if (T <= 0 || !p) return;
    const int N = mc->num_experts, K = mc->top_k, H = mc->expert_hidden, Hs = mc->shared_expert_hidden, S = N + 1;
    const int copy = mc->null_kind == NM_NULL_COPY;

    // 1. the experts (each writes its own weight gradients, its rows' dgate and dxs)
    #pragma omp parallel num_threads(p->nth) if (FN(experts_in_parallel)(p, D, H))
    {
        R *scr = p->scratch + (size_t)omp_get_thread_num() * p->max_rows * (D + 2 * H);
        #pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < p->n_work; i++) FN(expert_backward)(scr, p, dw, dout, c, w, work_expert(p->work[i]), D, H, K);
    }

    // 2. dL/dlogits per token: gates, L_bal, L_z
    #pragma omp parallel for schedule(static) if ((size_t)T * S >= 16384)
    for (int t = 0; t < T; t++)
        FN(router_backward_token)(p->dz + (size_t)t * S, c, p, dout + (size_t)t * D, y + (size_t)t * D, w_bal, w_z, mc,
                                  t, T, D);

    // 3. router: dWr += dz^T y, dy = dz Wr
    FN(gemm_blocked)(CblasTrans, CblasNoTrans, S, D, T, p->dz, S, y, D, 1, dw->router, D, WEIGHT_BLOCK);
    FN(gemm_blocked)(CblasNoTrans, CblasNoTrans, T, D, S, p->dz, S, w->router, D, 0, dy, D, TOKEN_BLOCK);

    // 4. shared expert: dWsd += dout^T act_s, dact_s = dout Wsd, swiglu', dWsg/dWsu, dy += ...
    if (Hs > 0) {
        R *dhg = p->sh_dh, *dhu = dhg + (size_t)T * Hs;
        FN(gemm_blocked)(CblasTrans, CblasNoTrans, D, Hs, T, dout, D, p->sh_act, Hs, 1, dw->sh_down, Hs, WEIGHT_BLOCK);
        FN(gemm_blocked)(CblasNoTrans, CblasNoTrans, T, Hs, D, dout, D, w->sh_down, Hs, 0, dhg, Hs, TOKEN_BLOCK);
        FN(nm_swiglu_backward)(dhg, dhu, dhg, p->sh_hg, p->sh_hu, (size_t)T * Hs);
        FN(gemm_blocked)(CblasTrans, CblasNoTrans, Hs, D, T, dhg, Hs, y, D, 1, dw->sh_gate, D, WEIGHT_BLOCK);
        FN(gemm_blocked)(CblasTrans, CblasNoTrans, Hs, D, T, dhu, Hs, y, D, 1, dw->sh_up, D, WEIGHT_BLOCK);
        FN(gemm_blocked)(CblasNoTrans, CblasNoTrans, T, D, Hs, dhg, Hs, w->sh_gate, D, 1, dy, D, TOKEN_BLOCK);
        FN(gemm_blocked)(CblasNoTrans, CblasNoTrans, T, D, Hs, dhu, Hs, w->sh_up, D, 1, dy, D, TOKEN_BLOCK);
    }

    // 5. dy += each selected slot's share, per token in slot order (copy kind: g dout for a null slot)
    #pragma omp parallel for schedule(static) if ((size_t)T * D >= 16384)
    for (int t = 0; t < T; t++) {
        R *d = dy + (size_t)t * D;
        const R *dt = dout + (size_t)t * D;
        for (int k = 0; k < K; k++) {
            const size_t i = (size_t)t * K + k;
            const int row = p->slot_row[i];
            if (row >= 0) {
                const R *src = p->dxs + (size_t)row * D;
                for (int j = 0; j < D; j++) d[j] += src[j];
            } else if (copy) {
                const R g = c->gate[i];
                for (int j = 0; j < D; j++) d[j] += g * dt[j];
            }
        }
    }
}
