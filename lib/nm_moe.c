// nm_moe.c — null-expert MoE: routing (moe_route_null), dispatch sorted by expert with null
// slots cut, grouped expert GEMMs (experts in parallel, single-threaded BLAS inside), and a
// per-token combine in a fixed slot order (deterministic: no atomics, no order dependence).
#include "nm_moe.h"

#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "nm_ops.h"

// ---- router ----

void moe_route_null(const nm_routing *r, const float *z, int T, const nm_moe_config *mc) {
    const int N = mc->num_experts, M = mc->null_copies, K = mc->top_k;
    const int copy = mc->null_kind == NM_NULL_COPY;
    int order[K]; // selected real experts in descending logit, ties to the lower id
    for (int t = 0; t < T; t++) {
        const float *zt = z + (size_t)t * (N + 1);
        const float zn = zt[N];
        // logsumexp over the expanded logits: N reals + M copies of the null logit
        float mx = -INFINITY;
        for (int i = 0; i < N; i++) mx = zt[i] > mx ? zt[i] : mx;
        if (M > 0 && zn > mx) mx = zn;
        double s = 0.0;
        for (int i = 0; i < N; i++) s += exp((double)zt[i] - mx);
        if (M > 0) s += M * exp((double)zn - mx);
        const double lse = mx + log(s);

        // Top-K reals by insertion into a sorted list (one pass, K small). Strict > keeps an
        // earlier (lower) id ahead of a later one with an equal logit.
        int kr = K < N ? K : N, nsel = 0;
        for (int i = 0; i < N; i++) {
            if (nsel == kr && !(zt[i] > zt[order[kr - 1]])) continue;
            int j = nsel < kr ? nsel++ : kr - 1;
            while (j > 0 && zt[i] > zt[order[j - 1]]) {
                order[j] = order[j - 1];
                j--;
            }
            order[j] = i;
        }
        // Merge: a real expert goes first while its logit >= the null logit (a real expert
        // has a lower slot index than every null copy, so it wins ties).
        int ir = 0, nulls_left = M, nr = 0;
        int16_t *slot = r->slot + (size_t)t * K;
        float *prob = r->prob + (size_t)t * K, *gate = r->gate + (size_t)t * K;
        for (int k = 0; k < K; k++) {
            int take_real = ir < kr && (nulls_left == 0 || zt[order[ir]] >= zn);
            if (take_real) {
                slot[k] = (int16_t)order[ir];
                prob[k] = (float)exp((double)zt[order[ir]] - lse);
                ir++;
                nr++;
            } else {
                slot[k] = -1;
                prob[k] = (float)exp((double)zn - lse);
                nulls_left--;
            }
        }
        r->n_real[t] = (uint8_t)nr;
        r->lse[t] = (float)lse;
        r->null_mass[t] = M > 0 ? (float)(M * exp((double)zn - lse)) : 0.0f;
        // Gates: a softmax over the selected logits (real ones only for zero kind; all K for
        // copy kind). Ratios of p would be 0/0 once the null logit dominates by ~88.
        float gm = -INFINITY;
        for (int k = 0; k < K; k++)
            if (slot[k] >= 0 || copy) gm = fmaxf(gm, slot[k] >= 0 ? zt[slot[k]] : zn);
        double gs = 0.0;
        for (int k = 0; k < K; k++)
            if (slot[k] >= 0 || copy) gs += exp((double)(slot[k] >= 0 ? zt[slot[k]] : zn) - gm);
        for (int k = 0; k < K; k++)
            gate[k] = (slot[k] >= 0 || copy) ? (float)(exp((double)(slot[k] >= 0 ? zt[slot[k]] : zn) - gm) / gs) : 0.0f;
    }
}

// ---- workspace ----

void nm_moe_workspace_free(nm_moe_workspace *ws) {
    if (!ws) return;
    free(ws->logits); free(ws->xin); free(ws->hidden); free(ws->yout); free(ws->shared_h);
    free(ws->perm_token); free(ws->slot_row); free(ws->counts); free(ws->offsets); free(ws->cursor);
    free(ws->n_real); free(ws->slot); free(ws->prob); free(ws->gate); free(ws->null_mass); free(ws->lse);
    memset(ws, 0, sizeof *ws);
}

static nm_status workspace_reserve(nm_moe_workspace *ws, const nm_moe_config *mc, int T, int D, nm_error *err) {
    if ((size_t)T <= ws->cap_tokens && ws->logits) return NM_OK;
    nm_moe_workspace_free(ws);
    const size_t N = (size_t)mc->num_experts, K = (size_t)mc->top_k, H = (size_t)mc->expert_hidden,
                 Hs = (size_t)mc->shared_expert_hidden, t = (size_t)T;
    ws->logits = malloc(t * (N + 1) * sizeof(float));
    ws->xin = malloc(t * K * D * sizeof(float));
    ws->hidden = malloc(t * K * 2 * H * sizeof(float));
    ws->yout = malloc(t * K * D * sizeof(float));
    ws->shared_h = malloc((Hs ? 2 * t * Hs : 1) * sizeof(float));
    ws->perm_token = malloc(t * K * sizeof(int32_t));
    ws->slot_row = malloc(t * K * sizeof(int32_t));
    ws->counts = malloc((N + 1) * sizeof(int32_t));
    ws->offsets = malloc((N + 1) * sizeof(int32_t));
    ws->cursor = malloc(N * sizeof(int32_t));
    ws->n_real = malloc(t);
    ws->slot = malloc(t * K * sizeof(int16_t));
    ws->prob = malloc(t * K * sizeof(float));
    ws->gate = malloc(t * K * sizeof(float));
    ws->null_mass = malloc(t * sizeof(float));
    ws->lse = malloc(t * sizeof(float));
    if (!ws->logits || !ws->xin || !ws->hidden || !ws->yout || !ws->shared_h || !ws->perm_token || !ws->slot_row ||
        !ws->counts || !ws->offsets || !ws->cursor || !ws->n_real || !ws->slot || !ws->prob || !ws->gate ||
        !ws->null_mass || !ws->lse) {
        nm_moe_workspace_free(ws);
        return nm_fail(err, NM_ERR_NOMEM, "out of memory for the MoE workspace (%d tokens)", T);
    }
    ws->cap_tokens = t;
    return NM_OK;
}

// ---- the layer ----

nm_status nm_moe_forward(float *out, const float *y, const nm_moe_weights *w, const nm_moe_config *mc, int T, int D,
                         nm_moe_workspace *ws, const nm_routing *routing, nm_error *err) {
    // y: (T, D)  out: (T, D)
    nm_status s = workspace_reserve(ws, mc, T, D, err);
    if (s != NM_OK) return s;
    const int N = mc->num_experts, K = mc->top_k, H = mc->expert_hidden, Hs = mc->shared_expert_hidden;
    nm_routing local = {ws->n_real, ws->slot, ws->prob, ws->gate, ws->null_mass, ws->lse};
    const nm_routing *r = routing ? routing : &local;

    // 1. router logits z = y Wr^T: (T, N+1), then the routing decision
    nm_matmul_forward(ws->logits, y, w->router, T, D, N + 1, 0.0f);
    moe_route_null(r, ws->logits, T, mc);

    // 2. dispatch: count rows per expert, prefix sum, then place each real slot; tokens keep
    //    their order inside an expert's block. Null slots get no row: they are cut here.
    int32_t *counts = ws->counts, *offsets = ws->offsets, *cursor = ws->cursor;
    memset(counts, 0, (size_t)N * sizeof *counts);
    for (size_t i = 0; i < (size_t)T * K; i++)
        if (r->slot[i] >= 0) counts[r->slot[i]]++;
    offsets[0] = 0;
    for (int e = 0; e < N; e++) offsets[e + 1] = offsets[e] + counts[e];
    const int n_rows = offsets[N];
    memcpy(cursor, offsets, (size_t)N * sizeof *cursor);
    for (int t = 0; t < T; t++)
        for (int k = 0; k < K; k++) {
            int e = r->slot[(size_t)t * K + k];
            if (e < 0) {
                ws->slot_row[(size_t)t * K + k] = -1;
                continue;
            }
            int row = cursor[e]++;
            ws->perm_token[row] = t;
            ws->slot_row[(size_t)t * K + k] = row;
        }

    // 3. experts: gather each block, SwiGLU FFN as three GEMMs. Experts run in parallel with
    //    single-threaded BLAS inside (the OpenMP OpenBLAS build does this inside a parallel
    //    region), which beats BLAS threading on these small per-expert shapes (FINDINGS.md).
    #pragma omp parallel for schedule(dynamic, 1)
    for (int e = 0; e < N; e++) {
        int c = counts[e], o = offsets[e];
        if (c == 0) continue;
        float *xe = ws->xin + (size_t)o * D;
        for (int i = 0; i < c; i++) memcpy(xe + (size_t)i * D, y + (size_t)ws->perm_token[o + i] * D, (size_t)D * sizeof(float));
        float *g = ws->hidden + (size_t)o * 2 * H, *u = g + (size_t)c * H;
        nm_matmul_forward(g, xe, w->gate + (size_t)e * H * D, c, D, H, 0.0f);
        nm_matmul_forward(u, xe, w->up + (size_t)e * H * D, c, D, H, 0.0f);
        nm_swiglu_forward(g, g, u, (size_t)c * H);
        nm_matmul_forward(ws->yout + (size_t)o * D, g, w->down + (size_t)e * D * H, c, H, D, 0.0f);
    }
    (void)n_rows;

    // 4. shared expert over every token (multi-threaded BLAS), or zeros
    if (Hs > 0) nm_ffn_forward(out, y, w->sh_gate, w->sh_up, w->sh_down, T, D, Hs, ws->shared_h, 0.0f);
    else memset(out, 0, (size_t)T * D * sizeof(float));

    // 5. combine: per token, in slot order, out += g * E(y) (copy kind: a null slot adds g * y)
    const int copy = mc->null_kind == NM_NULL_COPY;
    #pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        float *o = out + (size_t)t * D;
        for (int k = 0; k < K; k++) {
            size_t i = (size_t)t * K + k;
            float g = r->gate[i];
            int row = ws->slot_row[i];
            const float *src = row >= 0 ? ws->yout + (size_t)row * D : (copy ? y + (size_t)t * D : NULL);
            if (!src) continue;
            for (int d = 0; d < D; d++) o[d] += g * src[d];
        }
    }
    return NM_OK;
}

// ---- float64 reference ----

static void expert_naive(double *acc, double g, const float *x, const float *wg, const float *wu, const float *wd, int D,
                         int H) {
    // acc (D) += g * wd (silu(wg x) * wu x)
    for (int j = 0; j < H; j++) {
        double a = 0, b = 0;
        for (int d = 0; d < D; d++) {
            a += (double)wg[(size_t)j * D + d] * x[d];
            b += (double)wu[(size_t)j * D + d] * x[d];
        }
        double h = a / (1.0 + exp(-a)) * b;
        for (int d = 0; d < D; d++) acc[d] += g * (double)wd[(size_t)d * H + j] * h;
    }
}

void nm_moe_forward_naive(double *out, const float *y, const nm_moe_weights *w, const nm_moe_config *mc, int T, int D) {
    const int N = mc->num_experts, M = mc->null_copies, K = mc->top_k, H = mc->expert_hidden,
              Hs = mc->shared_expert_hidden, S = N + M;
    double *z = malloc((size_t)S * sizeof *z);
    int *sel = malloc((size_t)S * sizeof *sel);
    if (!z || !sel) {
        free(z);
        free(sel);
        for (size_t i = 0; i < (size_t)T * D; i++) out[i] = NAN;
        return;
    }
    for (int t = 0; t < T; t++) {
        const float *x = y + (size_t)t * D;
        double *o = out + (size_t)t * D;
        for (int d = 0; d < D; d++) o[d] = 0;
        // expanded logits, materialised (the reference may be slow and obvious)
        for (int i = 0; i <= N; i++) {
            double a = 0;
            for (int d = 0; d < D; d++) a += (double)w->router[(size_t)i * D + d] * x[d];
            if (i < N) z[i] = a;
            else for (int j = 0; j < M; j++) z[N + j] = a;
        }
        // top-K by a stable selection: largest first, lower index on ties
        for (int i = 0; i < S; i++) sel[i] = 0;
        int chosen[256], nch = 0;
        for (int k = 0; k < K; k++) {
            int best = -1;
            for (int i = 0; i < S; i++)
                if (!sel[i] && (best < 0 || z[i] > z[best])) best = i;
            sel[best] = 1;
            chosen[nch++] = best;
        }
        double mx = -INFINITY, s = 0;
        for (int k = 0; k < K; k++)
            if (chosen[k] < N || mc->null_kind == NM_NULL_COPY) mx = fmax(mx, z[chosen[k]]);
        for (int k = 0; k < K; k++)
            if (chosen[k] < N || mc->null_kind == NM_NULL_COPY) s += exp(z[chosen[k]] - mx);
        for (int k = 0; k < K; k++) {
            int e = chosen[k];
            if (e >= N && mc->null_kind != NM_NULL_COPY) continue;
            double g = exp(z[e] - mx) / s;
            if (e < N)
                expert_naive(o, g, x, w->gate + (size_t)e * H * D, w->up + (size_t)e * H * D, w->down + (size_t)e * D * H, D, H);
            else
                for (int d = 0; d < D; d++) o[d] += g * x[d];
        }
        if (Hs > 0) expert_naive(o, 1.0, x, w->sh_gate, w->sh_up, w->sh_down, D, Hs);
    }
    free(z);
    free(sel);
}
