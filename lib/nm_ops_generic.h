// nm_ops_generic.h — internal: the training ops (nm_train_ops.h) written once for a real type.
//
// Included by nm_train_ops.c once per precision, with these defined:
//   R        the real type (double or float)
//   FN(name) the name with the precision suffix (name##_f64 / name##_f32)
//   GEMM     cblas_dgemm / cblas_sgemm
//   EXP      exp / expf
// Sums that decide accuracy (RMSNorm's sum of squares, softmax normalisers, the loss) are
// accumulated in double in both precisions, as the inference engine does.
// Not a public header: it defines functions and must be included only from nm_train_ops.c.

#if !defined(R) || !defined(FN) || !defined(GEMM) || !defined(EXP)
#error "nm_ops_generic.h is included from nm_train_ops.c only"
#endif

// ---------------------------------------------------------------------------------------------
// linear: out = x W^T (+ b)

void FN(nm_linear_forward)(R *out, const R *x, const R *w, const R *b, int T, int in, int out_dim) {
    // x: (T, in)  w: (out_dim, in)  b: (out_dim)  out: (T, out_dim)
    if (T <= 0 || out_dim <= 0) return;
    GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, T, out_dim, in, 1, x, in, w, in, 0, out, out_dim);
    if (b)
        for (int t = 0; t < T; t++)
            for (int o = 0; o < out_dim; o++) out[(size_t)t * out_dim + o] += b[o];
}

void FN(nm_linear_backward)(R *dx, R *dw, R *db, const R *dout, const R *x, const R *w, int T, int in, int out_dim) {
    // dout: (T, out_dim)  x, dx: (T, in)  w, dw: (out_dim, in)  db: (out_dim)
    if (T <= 0 || out_dim <= 0) return;
    if (dx) // dx (T, in) = dout (T, out_dim) W (out_dim, in)
        GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, in, out_dim, 1, dout, out_dim, w, in, 0, dx, in);
    // dw (out_dim, in) += dout^T (out_dim, T) x (T, in)
    GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, out_dim, in, T, 1, dout, out_dim, x, in, 1, dw, in);
    if (db)
        for (int t = 0; t < T; t++)
            for (int o = 0; o < out_dim; o++) db[o] += dout[(size_t)t * out_dim + o];
}

// ---------------------------------------------------------------------------------------------
// embeddings (token table, and the patch grid's pos_embed with ids = patch index)

void FN(nm_embedding_forward)(R *out, const int32_t *ids, const R *E, int T, int D) {
    // ids: (T)  E: (V, D)  out: (T, D)
    for (int t = 0; t < T; t++)
        if (ids[t] >= 0) memcpy(out + (size_t)t * D, E + (size_t)ids[t] * D, (size_t)D * sizeof(R));
}

void FN(nm_embedding_backward)(R *dE, const R *dout, const int32_t *ids, int T, int D) {
    // dout: (T, D)  dE: (V, D)
    for (int t = 0; t < T; t++) {
        if (ids[t] < 0) continue;
        R *d = dE + (size_t)ids[t] * D;
        const R *g = dout + (size_t)t * D;
        for (int i = 0; i < D; i++) d[i] += g[i];
    }
}

void FN(nm_patch_gather)(R *rows, const R *pixels, const int32_t *patch_idx, int n, int S, int p) {
    // pixels: (3, S, S)  rows: (n, 3*p*p) with (channel, row, col) order
    const int g = S / p, pp = 3 * p * p;
    for (int r = 0; r < n; r++) {
        const int gr = patch_idx[r] / g, gc = patch_idx[r] % g;
        R *dst = rows + (size_t)r * pp;
        for (int ch = 0; ch < 3; ch++)
            for (int y = 0; y < p; y++)
                memcpy(dst + (ch * p + y) * p, pixels + ((size_t)ch * S + gr * p + y) * S + gc * p, (size_t)p * sizeof(R));
    }
}

// ---------------------------------------------------------------------------------------------
// RMSNorm: out = x * rstd * w,  rstd = 1 / sqrt(mean(x^2) + eps)
//   dx_i = rstd * w_i dout_i - rstd^3 / D * x_i * sum_j (w_j dout_j x_j),  dw_i += dout_i x_i rstd

void FN(nm_rmsnorm_forward)(R *out, R *rstd, const R *x, const R *w, int T, int D, double eps) {
    // x, out: (T, D)  w: (D)  rstd: (T)
    #pragma omp parallel for schedule(static) if ((size_t)T * D >= 65536)
    for (int t = 0; t < T; t++) {
        const R *xr = x + (size_t)t * D;
        R *o = out + (size_t)t * D;
        double ss = 0.0;
        for (int i = 0; i < D; i++) ss += (double)xr[i] * xr[i];
        R r = (R)(1.0 / sqrt(ss / D + eps));
        rstd[t] = r;
        for (int i = 0; i < D; i++) o[i] = xr[i] * r * w[i];
    }
}

void FN(nm_rmsnorm_backward)(R *dx, R *dw, const R *dout, const R *x, const R *w, const R *rstd, int T, int D) {
    // dout, x, dx: (T, D)  w, dw: (D)  rstd: (T). Rows in order: dw is shared.
    for (int t = 0; t < T; t++) {
        const R *xr = x + (size_t)t * D, *g = dout + (size_t)t * D;
        R *d = dx + (size_t)t * D;
        const double r = rstd[t];
        double dot = 0.0;
        for (int i = 0; i < D; i++) dot += (double)g[i] * w[i] * xr[i];
        const double c = r * r * r * dot / D;
        for (int i = 0; i < D; i++) {
            dw[i] += (R)((double)g[i] * xr[i] * r);
            d[i] = (R)(r * w[i] * g[i] - c * xr[i]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// RoPE (half-split): (x0, x1) -> (x0 c - x1 s, x1 c + x0 s); the backward rotates by -angle.

void FN(nm_rope_freqs)(R *inv_freq, int hd, double theta) {
    for (int i = 0; i < hd / 2; i++) inv_freq[i] = (R)pow(theta, -2.0 * i / hd);
}

// sign = +1 forward, -1 backward. out may alias x.
static void FN(rope_rotate)(R *out, const R *x, int T, int n_heads, int hd, int pos0, const R *inv_freq, int sign) {
    const int half = hd / 2;
    #pragma omp parallel for schedule(static) if ((size_t)T * n_heads * hd >= 65536)
    for (int t = 0; t < T; t++) {
        const double pos = pos0 + t;
        for (int i = 0; i < half; i++) {
            const double a = pos * inv_freq[i]; // angle in double, as nm_rope_forward
            const R c = (R)cos(a), s = (R)(sign * sin(a));
            for (int h = 0; h < n_heads; h++) {
                const size_t o = ((size_t)t * n_heads + h) * hd;
                const R x0 = x[o + i], x1 = x[o + i + half];
                out[o + i] = x0 * c - x1 * s;
                out[o + i + half] = x1 * c + x0 * s;
            }
        }
    }
}

void FN(nm_rope_forward)(R *out, const R *x, int T, int n_heads, int hd, int pos0, const R *inv_freq) {
    // x, out: (T, n_heads*hd)  inv_freq: (hd/2)
    FN(rope_rotate)(out, x, T, n_heads, hd, pos0, inv_freq, +1);
}

void FN(nm_rope_backward)(R *dx, const R *dout, int T, int n_heads, int hd, int pos0, const R *inv_freq) {
    // dout, dx: (T, n_heads*hd)
    FN(rope_rotate)(dx, dout, T, n_heads, hd, pos0, inv_freq, -1);
}

// ---------------------------------------------------------------------------------------------
// SwiGLU: out = g sigmoid(g) u
//   dg = dout u s (1 + g (1 - s)),  du = dout g s,  s = sigmoid(g)

void FN(nm_swiglu_forward)(R *out, const R *g, const R *u, size_t n) {
    // g, u, out: (n)
    for (size_t i = 0; i < n; i++) {
        const R a = g[i];
        out[i] = a / (1 + EXP(-a)) * u[i];
    }
}

void FN(nm_swiglu_backward)(R *dg, R *du, const R *dout, const R *g, const R *u, size_t n) {
    // dout, g, u, dg, du: (n)
    for (size_t i = 0; i < n; i++) {
        const R a = g[i], b = u[i], d = dout[i];
        const R s = 1 / (1 + EXP(-a));
        dg[i] = d * b * s * (1 + a * (1 - s));
        du[i] = d * a * s;
    }
}

// ---------------------------------------------------------------------------------------------
// Causal GQA attention, per head h (kv head kh = h / (nh/nkv)):
//   att_h = softmax_causal(Q_h K_kh^T * scale),  out_h = att_h V_kh
// backward:
//   datt = dout_h V_kh^T,  dV_kh += att_h^T dout_h,
//   ds_ij = att_ij (datt_ij - sum_j' att_ij' datt_ij') * scale,
//   dQ_h = ds K_kh,  dK_kh += ds^T Q_h

// Softmax of the first n entries of row in place (max subtracted, sum in double); zeroes the
// rest up to len.
static void FN(softmax_prefix)(R *row, int n, int len) {
    R mx = row[0];
    for (int j = 1; j < n; j++) mx = row[j] > mx ? row[j] : mx;
    double sum = 0.0;
    for (int j = 0; j < n; j++) {
        row[j] = EXP(row[j] - mx);
        sum += row[j];
    }
    const R inv = (R)(1.0 / sum);
    for (int j = 0; j < n; j++) row[j] *= inv;
    for (int j = n; j < len; j++) row[j] = 0;
}

void FN(nm_attention_forward)(R *out, R *att, const R *q, const R *k, const R *v, int T, int nh, int nkv, int hd) {
    // q, out: (T, nh*hd)  k, v: (T, nkv*hd)  att: (nh, T, T)
    const int qd = nh * hd, kvd = nkv * hd, group = nh / nkv;
    const R scale = (R)(1.0 / sqrt((double)hd));
    if (T <= 0) return;
    // heads are independent; BLAS stays single-threaded inside the parallel region
    #pragma omp parallel for schedule(static) if (nh > 1 && (size_t)T * T * hd >= 65536)
    for (int h = 0; h < nh; h++) {
        const int kh = h / group;
        R *a = att + (size_t)h * T * T;
        // a (T, T) = Q_h (T, hd) K_kh^T (hd, T) * scale
        GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, hd, scale, q + h * hd, qd, k + kh * hd, kvd, 0, a, T);
        for (int i = 0; i < T; i++) FN(softmax_prefix)(a + (size_t)i * T, i + 1, T);
        // out_h (T, hd) = a (T, T) V_kh (T, hd)
        GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, hd, T, 1, a, T, v + kh * hd, kvd, 0, out + h * hd, qd);
    }
}

void FN(nm_attention_backward)(R *dq, R *dk, R *dv, R *datt, const R *dout, const R *q, const R *k, const R *v,
                               const R *att, int T, int nh, int nkv, int hd) {
    // dout, q, dq: (T, nh*hd)  k, v, dk, dv: (T, nkv*hd)  att, datt: (nh, T, T)
    const int qd = nh * hd, kvd = nkv * hd, group = nh / nkv;
    const R scale = (R)(1.0 / sqrt((double)hd));
    if (T <= 0) return;
    // kv heads are independent (each owns its columns of dk, dv); its query heads run in order
    #pragma omp parallel for schedule(static) if (nkv > 1 && (size_t)T * T * hd * group >= 65536)
    for (int kh = 0; kh < nkv; kh++) {
        for (int t = 0; t < T; t++)
            for (int i = 0; i < hd; i++) dk[(size_t)t * kvd + kh * hd + i] = dv[(size_t)t * kvd + kh * hd + i] = 0;
        for (int h = kh * group; h < (kh + 1) * group; h++) {
            const R *a = att + (size_t)h * T * T;
            R *ds = datt + (size_t)h * T * T;
            // datt (T, T) = dout_h (T, hd) V_kh^T (hd, T)
            GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, hd, 1, dout + h * hd, qd, v + kh * hd, kvd, 0, ds, T);
            // dV_kh (T, hd) += a^T (T, T) dout_h (T, hd)
            GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, T, hd, T, 1, a, T, dout + h * hd, qd, 1, dv + kh * hd, kvd);
            for (int i = 0; i < T; i++) { // softmax backward over the visible keys 0..i
                const R *ar = a + (size_t)i * T;
                R *dr = ds + (size_t)i * T;
                double dot = 0.0;
                for (int j = 0; j <= i; j++) dot += (double)ar[j] * dr[j];
                for (int j = 0; j <= i; j++) dr[j] = (R)(ar[j] * (dr[j] - dot)) * scale;
                for (int j = i + 1; j < T; j++) dr[j] = 0;
            }
            // dQ_h (T, hd) = ds (T, T) K_kh (T, hd)
            GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, hd, T, 1, ds, T, k + kh * hd, kvd, 0, dq + h * hd, qd);
            // dK_kh (T, hd) += ds^T (T, T) Q_h (T, hd)
            GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, T, hd, T, 1, ds, T, q + h * hd, qd, 1, dk + kh * hd, kvd);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy over the counted tokens: loss = mean_t (logsumexp(logits_t) - logits_t[target_t])

double FN(nm_crossentropy_forward)(R *probs, const R *logits, const int32_t *targets, int T, int V) {
    // logits, probs: (T, V)  targets: (T)
    double loss = 0.0;
    int n = 0;
    for (int t = 0; t < T; t++) {
        const R *l = logits + (size_t)t * V;
        R *p = probs + (size_t)t * V;
        R mx = l[0];
        for (int j = 1; j < V; j++) mx = l[j] > mx ? l[j] : mx;
        double sum = 0.0;
        for (int j = 0; j < V; j++) sum += exp((double)l[j] - mx);
        const double lse = mx + log(sum);
        for (int j = 0; j < V; j++) p[j] = (R)exp((double)l[j] - lse);
        if (targets[t] >= 0) {
            loss += lse - l[targets[t]];
            n++;
        }
    }
    return n ? loss / n : 0.0;
}

void FN(nm_crossentropy_backward)(R *dlogits, const R *probs, const int32_t *targets, int T, int V, double dloss) {
    // probs, dlogits: (T, V)  targets: (T)
    int n = 0;
    for (int t = 0; t < T; t++) n += targets[t] >= 0;
    const R c = n ? (R)(dloss / n) : 0;
    for (int t = 0; t < T; t++) {
        R *d = dlogits + (size_t)t * V;
        const R *p = probs + (size_t)t * V;
        if (targets[t] < 0) {
            memset(d, 0, (size_t)V * sizeof(R));
            continue;
        }
        for (int j = 0; j < V; j++) d[j] = c * p[j];
        d[targets[t]] -= c;
    }
}
