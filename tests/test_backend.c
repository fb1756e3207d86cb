// test_backend.c — every backend of nm_backend.h against a reference (ggml's test-backend-ops
// pattern): one table of op cases at several sizes with fresh random inputs (never zeros), run
// on each available backend; and whole-model traces of several random models on each non-CPU
// backend against the CPU engine.
//
//   op cases:     the backend's op vs a float64 evaluation of the definition, written here
//                 (the CPU backend runs them too, so the reference itself is checked against
//                 the shipped CPU code). NaN/Inf fail before any error measure.
//   routing:      on given logits (integer-valued ties included) slots and n_real must be
//                 identical: the tie rule of DESIGN.md §2 leaves nothing to rounding there.
//   whole model:  routing identical except reported near-ties (the two competing logits within
//                 NEAR_TIE), logits within 1e-3 relative (F32) / 3e-2 (BF16).
//
// A backend that is not available (CUDA not built, or no device) has its cases reported as
// SKIPPED — printed, counted by check_main, and never added to Check as passed tests.
// CUDA must not be initialised in Check's parent process (a CUDA context does not survive
// fork), so availability is probed in a child process.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "nm_backend.h"
#include "nm_engine.h"
#include "nm_moe.h"
#include "nm_tokenizer.h"
#include "test_util.h"

// ---- backend memory helpers ----

static void *bput(nm_backend *b, const void *src, size_t bytes) {
    void *p = NULL;
    nm_error err = {0};
    ck_assert_msg(b->ops->alloc(b, &p, bytes, &err) == NM_OK, "%s", err.msg);
    if (src) ck_assert_msg(b->ops->to_backend(b, p, src, bytes, &err) == NM_OK, "%s", err.msg);
    return p;
}

static void bget(nm_backend *b, void *dst, const void *src, size_t bytes) {
    nm_error err = {0};
    ck_assert_msg(b->ops->to_host(b, dst, src, bytes, &err) == NM_OK, "%s", err.msg);
}

static float *randn(nm_test_rng *r, size_t n, float std) {
    float *x = malloc((n ? n : 1) * sizeof *x);
    ck_assert_ptr_nonnull(x);
    nm_test_fill_normal(r, x, n, std);
    for (size_t i = 0; i < n; i++)
        if (x[i] == 0.0f) x[i] = 1e-3f; // never zeros
    return x;
}

// max |got - want| / max(1, |want|); a NaN or Inf in got fails at once.
static double rel_err(const float *got, const double *want, size_t n, const char *what) {
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        ck_assert_msg(isfinite(got[i]), "%s: element %zu is %g", what, i, (double)got[i]);
        double e = fabs(got[i] - want[i]) / fmax(1.0, fabs(want[i]));
        if (e > worst) worst = e;
    }
    return worst;
}

// ---- which backends run ----

typedef struct {
    const char *name;
    int bf16;
} backend_variant;

static const backend_variant VARIANTS[] = {{"cpu", 0}, {"cuda", 0}, {"cuda", 1}};
#define N_VARIANTS 3

static nm_backend *open_variant(int v) {
    nm_backend *b = NULL;
    nm_error err = {0};
    const nm_backend_options o = {.bf16 = VARIANTS[v].bf16};
    ck_assert_msg(nm_backend_open(&b, VARIANTS[v].name, &o, &err) == NM_OK, "%s", err.msg);
    return b;
}

// Tolerance of op results against the float64 reference: F32 ops, and BF16 GEMM inputs
// (8 significant bits: relative rounding 2^-9 per input, accumulated over the dot product).
static double op_tol(int v) { return VARIANTS[v].bf16 ? 3e-2 : 2e-4; }

// ---- op cases ----

typedef enum { OP_LINEAR, OP_RMSNORM, OP_ROPE, OP_ATTENTION, OP_ADD, OP_EMBED, OP_ROUTE, OP_MOE } op_kind;

typedef struct {
    op_kind op;
    const char *name;
    int a, b, c, d, e, f; // sizes, meaning per op (see run_case)
} op_case;

static const op_case CASES[] = {
    // linear: T, in, out, beta
    {OP_LINEAR, "linear T=1 16->8", 1, 16, 8, 0, 0, 0},
    {OP_LINEAR, "linear T=37 48->65 +=", 37, 48, 65, 1, 0, 0},
    {OP_LINEAR, "linear T=130 96->33", 130, 96, 33, 0, 0, 0},
    // rmsnorm: T, D
    {OP_RMSNORM, "rmsnorm T=1 D=8", 1, 8, 0, 0, 0, 0},
    {OP_RMSNORM, "rmsnorm T=17 D=48", 17, 48, 0, 0, 0, 0},
    {OP_RMSNORM, "rmsnorm T=64 D=300", 64, 300, 0, 0, 0, 0},
    // rope: T, heads, hd, pos0
    {OP_ROPE, "rope T=1 h=2 hd=8 pos=5", 1, 2, 8, 5, 0, 0},
    {OP_ROPE, "rope T=19 h=4 hd=12", 19, 4, 12, 0, 0, 0},
    {OP_ROPE, "rope T=70 h=3 hd=64 pos=100", 70, 3, 64, 100, 0, 0},
    // attention: T, pos0, nh, nkv, hd
    {OP_ATTENTION, "attention decode pos=0", 1, 0, 2, 2, 8, 0},
    {OP_ATTENTION, "attention decode pos=37 GQA", 1, 37, 4, 2, 16, 0},
    {OP_ATTENTION, "attention prefill T=20 MQA", 20, 0, 4, 1, 12, 0},
    {OP_ATTENTION, "attention T=70 pos=5 GQA hd=64", 70, 5, 4, 2, 64, 0},
    {OP_ATTENTION, "attention T=3 pos=2 hd=256", 3, 2, 2, 1, 256, 0},
    // add: n
    {OP_ADD, "add n=1", 1, 0, 0, 0, 0, 0},
    {OP_ADD, "add n=70001", 70001, 0, 0, 0, 0, 0},
    // embed: T, with patches (1/0), D, patch, image size
    {OP_EMBED, "embed tokens T=9", 9, 0, 24, 0, 0, 0},
    {OP_EMBED, "embed tokens+patches T=21", 21, 1, 24, 4, 16, 0},
    // route: T, N, M, K, copy, ties (integer logits)
    {OP_ROUTE, "route M=0 K=2", 33, 8, 0, 2, 0, 0},
    {OP_ROUTE, "route M=N K=4 ties", 40, 6, 6, 4, 0, 1},
    {OP_ROUTE, "route copy M=3 K=5 ties", 40, 5, 3, 5, 1, 1},
    {OP_ROUTE, "route K=1 M=16", 25, 16, 16, 1, 0, 0},
    {OP_ROUTE, "route K=N+M", 12, 3, 2, 5, 0, 1},
    {OP_ROUTE, "route N=100 K=8 M=100", 70, 100, 100, 8, 0, 0},
    // moe: T, N, M, K, Hs, copy
    {OP_MOE, "moe T=1 N=4 M=4 K=2", 1, 4, 4, 2, 0, 0},
    {OP_MOE, "moe T=37 N=6 M=6 K=4 shared", 37, 6, 6, 4, 12, 0},
    {OP_MOE, "moe T=50 N=8 M=0 K=2", 50, 8, 0, 2, 0, 0},
    {OP_MOE, "moe T=45 N=5 M=3 K=3 copy shared", 45, 5, 3, 3, 8, 1},
    {OP_MOE, "moe T=129 N=16 M=16 K=8", 129, 16, 16, 8, 0, 0},
    {OP_MOE, "moe T=1200 N=8 M=8 K=4 (>1 permutation chunk)", 1200, 8, 8, 4, 0, 0},
};
#define N_CASES ((int)(sizeof CASES / sizeof CASES[0]))

// ---- float64 references ----

static void linear_ref(double *out, const float *x, const float *W, int T, int in, int od) {
    for (int t = 0; t < T; t++)
        for (int o = 0; o < od; o++) {
            double s = 0;
            for (int i = 0; i < in; i++) s += (double)x[(size_t)t * in + i] * W[(size_t)o * in + i];
            out[(size_t)t * od + o] += s;
        }
}

// Expanded-logit routing by the definition (DESIGN.md §2): materialised N+M logits, stable top-K.
typedef struct {
    int n_real[4096];
    int slot[4096 * 8];
    double prob[4096 * 8], gate[4096 * 8], null_mass[4096], lse[4096];
    double margin[4096]; // smallest logit gap at the top-K boundary or between adjacent picks
} route_ref_t;

static void route_ref(route_ref_t *o, const float *z, int T, int N, int M, int K, int copy) {
    const int S = N + M;
    double *zz = malloc((size_t)S * sizeof *zz);
    int *sel = malloc((size_t)S * sizeof *sel), *chosen = malloc((size_t)K * sizeof *chosen);
    ck_assert(zz && sel && chosen && T <= 4096 && K <= 8);
    for (int t = 0; t < T; t++) {
        const float *zt = z + (size_t)t * (N + 1);
        for (int i = 0; i < S; i++) zz[i] = i < N ? zt[i] : zt[N];
        double mx = -INFINITY, s = 0;
        for (int i = 0; i < S; i++) mx = fmax(mx, zz[i]);
        for (int i = 0; i < S; i++) s += exp(zz[i] - mx);
        o->lse[t] = mx + log(s);
        memset(sel, 0, (size_t)S * sizeof *sel);
        double margin = INFINITY;
        for (int k = 0; k < K; k++) {
            int best = -1;
            for (int i = 0; i < S; i++)
                if (!sel[i] && (best < 0 || zz[i] > zz[best])) best = i;
            sel[best] = 1;
            chosen[k] = best;
            if (k > 0 && (chosen[k - 1] < N || best < N)) margin = fmin(margin, zz[chosen[k - 1]] - zz[best]);
        }
        for (int i = 0; i < S; i++) // the best unselected against the last pick (real involved)
            if (!sel[i] && (i < N || chosen[K - 1] < N)) margin = fmin(margin, zz[chosen[K - 1]] - zz[i]);
        o->margin[t] = margin;
        double gm = -INFINITY, gs = 0;
        int nr = 0;
        for (int k = 0; k < K; k++)
            if (chosen[k] < N || copy) gm = fmax(gm, zz[chosen[k]]);
        for (int k = 0; k < K; k++)
            if (chosen[k] < N || copy) gs += exp(zz[chosen[k]] - gm);
        for (int k = 0; k < K; k++) {
            const int c = chosen[k], i = t * K + k;
            o->slot[i] = c < N ? c : -1;
            nr += c < N;
            o->prob[i] = exp(zz[c] - o->lse[t]);
            o->gate[i] = (c < N || copy) ? exp(zz[c] - gm) / gs : 0.0;
        }
        o->n_real[t] = nr;
        o->null_mass[t] = M > 0 ? M * exp(zt[N] - o->lse[t]) : 0.0;
    }
    free(zz);
    free(sel);
    free(chosen);
}

// ---- running one case on one backend ----

typedef struct {
    double err;     // largest relative error of the values checked
    long ties;      // routing differences at reported near-ties
} case_result;

static void check_routing(nm_backend *b, const nm_routing *dr, const route_ref_t *ref, int T, int K, double near,
                          const char *name, case_result *res) {
    uint8_t *n_real = malloc((size_t)T);
    int16_t *slot = malloc((size_t)T * K * sizeof *slot);
    float *prob = malloc((size_t)T * K * sizeof *prob), *gate = malloc((size_t)T * K * sizeof *gate);
    float *nm = malloc((size_t)T * sizeof *nm), *lse = malloc((size_t)T * sizeof *lse);
    ck_assert(n_real && slot && prob && gate && nm && lse);
    bget(b, n_real, dr->n_real, (size_t)T);
    bget(b, slot, dr->slot, (size_t)T * K * sizeof *slot);
    bget(b, prob, dr->prob, (size_t)T * K * sizeof *prob);
    bget(b, gate, dr->gate, (size_t)T * K * sizeof *gate);
    bget(b, nm, dr->null_mass, (size_t)T * sizeof *nm);
    bget(b, lse, dr->lse, (size_t)T * sizeof *lse);
    for (int t = 0; t < T; t++) {
        int same = n_real[t] == ref->n_real[t];
        for (int k = 0; k < K; k++) same &= slot[t * K + k] == ref->slot[t * K + k];
        if (!same) {
            ck_assert_msg(ref->margin[t] < near, "%s: routing of token %d differs (margin %.3g)", name, t, ref->margin[t]);
            fprintf(stderr, "  %s: near-tie at token %d (margin %.3g): routing differs, reported\n", name, t, ref->margin[t]);
            res->ties++;
            continue;
        }
        res->err = fmax(res->err, rel_err(&lse[t], &ref->lse[t], 1, "lse"));
        res->err = fmax(res->err, rel_err(&nm[t], &ref->null_mass[t], 1, "null_mass"));
        res->err = fmax(res->err, rel_err(prob + (size_t)t * K, ref->prob + (size_t)t * K, (size_t)K, "prob"));
        res->err = fmax(res->err, rel_err(gate + (size_t)t * K, ref->gate + (size_t)t * K, (size_t)K, "gate"));
    }
    free(n_real); free(slot); free(prob); free(gate); free(nm); free(lse);
}

static nm_routing routing_alloc(nm_backend *b, int T, int K) {
    const size_t t = (size_t)T, tk = t * K;
    return (nm_routing){bput(b, NULL, t), bput(b, NULL, tk * sizeof(int16_t)), bput(b, NULL, tk * sizeof(float)),
                        bput(b, NULL, tk * sizeof(float)), bput(b, NULL, t * sizeof(float)), bput(b, NULL, t * sizeof(float))};
}

static void routing_release(nm_backend *b, nm_routing *r) {
    b->ops->release(b, r->n_real); b->ops->release(b, r->slot); b->ops->release(b, r->prob);
    b->ops->release(b, r->gate); b->ops->release(b, r->null_mass); b->ops->release(b, r->lse);
}

// Runs op case c on backend b; returns the largest relative error against the reference.
static case_result run_case(nm_backend *b, const op_case *c, nm_test_rng *rng, double tol) {
    case_result res = {0, 0};
    nm_error err = {0};
    const nm_backend_ops *o = b->ops;
    switch (c->op) {
    case OP_LINEAR: {
        const int T = c->a, in = c->b, od = c->c;
        const float beta = (float)c->d;
        float *x = randn(rng, (size_t)T * in, 1), *W = randn(rng, (size_t)od * in, 0.3f), *y0 = randn(rng, (size_t)T * od, 1);
        double *want = calloc((size_t)T * od, sizeof *want);
        for (size_t i = 0; i < (size_t)T * od; i++) want[i] = beta * y0[i];
        linear_ref(want, x, W, T, in, od);
        // weights as the backend holds them: through a one-tensor model would be heavy; a BF16
        // backend takes its GEMM weights in BF16, so round them here the same way
        float *dx = bput(b, x, (size_t)T * in * 4), *dy = bput(b, y0, (size_t)T * od * 4), *dW;
        if (b->opt.bf16) {
            uint16_t *wb = malloc((size_t)od * in * 2);
            for (size_t i = 0; i < (size_t)od * in; i++) wb[i] = nm_f32_to_bf16(W[i]);
            dW = bput(b, wb, (size_t)od * in * 2);
            free(wb);
        } else dW = bput(b, W, (size_t)od * in * 4);
        ck_assert_msg(o->linear(b, dy, dx, dW, T, in, od, beta, &err) == NM_OK, "%s", err.msg);
        float *got = malloc((size_t)T * od * 4);
        bget(b, got, dy, (size_t)T * od * 4);
        res.err = rel_err(got, want, (size_t)T * od, c->name);
        free(got); free(x); free(W); free(y0); free(want);
        o->release(b, dx); o->release(b, dy); o->release(b, dW);
        break;
    }
    case OP_RMSNORM: {
        const int T = c->a, D = c->b;
        float *x = randn(rng, (size_t)T * D, 2), *w = randn(rng, (size_t)D, 1);
        double *want = malloc((size_t)T * D * sizeof *want);
        for (int t = 0; t < T; t++) {
            double ss = 0;
            for (int i = 0; i < D; i++) ss += (double)x[t * D + i] * x[t * D + i];
            double r = 1.0 / sqrt(ss / D + 1e-6);
            for (int i = 0; i < D; i++) want[t * D + i] = x[t * D + i] * r * w[i];
        }
        float *dx = bput(b, x, (size_t)T * D * 4), *dw = bput(b, w, (size_t)D * 4);
        ck_assert_msg(o->rmsnorm(b, dx, dx, dw, T, D, 1e-6f, &err) == NM_OK, "%s", err.msg); // in place
        bget(b, x, dx, (size_t)T * D * 4);
        res.err = rel_err(x, want, (size_t)T * D, c->name);
        free(x); free(w); free(want);
        o->release(b, dx); o->release(b, dw);
        break;
    }
    case OP_ROPE: {
        const int T = c->a, nh = c->b, hd = c->c, pos0 = c->d, half = hd / 2;
        float *x = randn(rng, (size_t)T * nh * hd, 1), *cs = malloc((size_t)T * hd * 4);
        double *want = malloc((size_t)T * nh * hd * sizeof *want);
        for (int t = 0; t < T; t++)
            for (int i = 0; i < half; i++) {
                double a = (double)(pos0 + t) * (float)pow(10000.0, -2.0 * i / hd);
                cs[t * hd + i] = (float)cos(a);
                cs[t * hd + half + i] = (float)sin(a);
            }
        for (int t = 0; t < T; t++)
            for (int h = 0; h < nh; h++)
                for (int i = 0; i < half; i++) {
                    const float *v = x + ((size_t)t * nh + h) * hd;
                    double cc = cs[t * hd + i], ss = cs[t * hd + half + i];
                    want[((size_t)t * nh + h) * hd + i] = v[i] * cc - v[i + half] * ss;
                    want[((size_t)t * nh + h) * hd + half + i] = v[i + half] * cc + v[i] * ss;
                }
        float *dx = bput(b, x, (size_t)T * nh * hd * 4), *dcs = bput(b, cs, (size_t)T * hd * 4);
        ck_assert_msg(o->rope(b, dx, dcs, T, nh, hd, &err) == NM_OK, "%s", err.msg);
        bget(b, x, dx, (size_t)T * nh * hd * 4);
        res.err = rel_err(x, want, (size_t)T * nh * hd, c->name);
        free(x); free(cs); free(want);
        o->release(b, dx); o->release(b, dcs);
        break;
    }
    case OP_ATTENTION: {
        const int T = c->a, pos0 = c->b, nh = c->c, nkv = c->d, hd = c->e, ctx = pos0 + T;
        const size_t qd = (size_t)nh * hd, kvd = (size_t)nkv * hd;
        float *q = randn(rng, T * qd, 1), *k = randn(rng, ctx * kvd, 1), *v = randn(rng, ctx * kvd, 1);
        double *want = calloc(T * qd, sizeof *want), *p = malloc((size_t)ctx * sizeof *p);
        const double scale = 1.0 / sqrt((double)hd);
        for (int t = 0; t < T; t++)
            for (int h = 0; h < nh; h++) {
                const int kh = h / (nh / nkv), n = pos0 + t + 1;
                double mx = -INFINITY, s = 0;
                for (int j = 0; j < n; j++) {
                    double d = 0;
                    for (int i = 0; i < hd; i++) d += (double)q[t * qd + h * hd + i] * k[j * kvd + kh * hd + i];
                    p[j] = d * scale;
                    mx = fmax(mx, p[j]);
                }
                for (int j = 0; j < n; j++) s += (p[j] = exp(p[j] - mx));
                for (int j = 0; j < n; j++)
                    for (int i = 0; i < hd; i++) want[t * qd + h * hd + i] += p[j] / s * v[j * kvd + kh * hd + i];
            }
        float *dq = bput(b, q, T * qd * 4), *dk = bput(b, k, ctx * kvd * 4), *dv = bput(b, v, ctx * kvd * 4),
              *da = bput(b, NULL, T * qd * 4);
        ck_assert_msg(o->attention(b, da, dq, dk, dv, T, pos0, nh, nkv, hd, &err) == NM_OK, "%s", err.msg);
        bget(b, q, da, T * qd * 4);
        res.err = rel_err(q, want, T * qd, c->name);
        free(q); free(k); free(v); free(want); free(p);
        o->release(b, dq); o->release(b, dk); o->release(b, dv); o->release(b, da);
        break;
    }
    case OP_ADD: {
        const size_t n = (size_t)c->a;
        float *x = randn(rng, n, 1), *y = randn(rng, n, 1);
        double *want = malloc(n * sizeof *want);
        for (size_t i = 0; i < n; i++) want[i] = (double)x[i] + y[i];
        float *dx = bput(b, x, n * 4), *dy = bput(b, y, n * 4);
        ck_assert_msg(o->add(b, dx, dy, n, &err) == NM_OK, "%s", err.msg);
        bget(b, x, dx, n * 4);
        res.err = rel_err(x, want, n, c->name);
        free(x); free(y); free(want);
        o->release(b, dx); o->release(b, dy);
        break;
    }
    case OP_EMBED: {
        const int T = c->a, vision = c->b;
        nm_config cfg;
        nm_config_init_byte(&cfg);
        cfg.hidden_size = c->c, cfg.num_layers = 1, cfg.num_heads = 2, cfg.num_kv_heads = 1, cfg.head_dim = 8;
        cfg.max_positions = 64;
        cfg.moe = (nm_moe_config){.num_experts = 2, .null_copies = 0, .top_k = 1, .expert_hidden = 4};
        cfg.has_vision = vision, cfg.patch_size = vision ? c->d : 0, cfg.image_size = vision ? c->e : 0, cfg.channels = 3;
        nm_model m;
        ck_assert_msg(nm_model_init_random(&m, &cfg, 7 + T, &err) == NM_OK, "%s", err.msg);
        for (int i = 0; vision && i < cfg.hidden_size; i++) m.patch_b[i] = (float)(0.1 * nm_test_rng_normal(rng) + 0.01);
        const int D = cfg.hidden_size, S = cfg.image_size, p = cfg.patch_size, np = nm_config_num_patches(&cfg);
        int32_t ids[64], pidx[64];
        float *pixels = vision ? randn(rng, (size_t)3 * S * S, 0.5f) : NULL;
        double *want = malloc((size_t)T * D * sizeof *want);
        for (int t = 0; t < T; t++) {
            const int patch = vision && t >= 2 && t < 2 + np;
            ids[t] = patch ? -1 : (int32_t)(nm_test_rng_next(rng) % 256);
            pidx[t] = patch ? t - 2 : -1;
            for (int d = 0; d < D; d++) {
                if (!patch) {
                    want[t * D + d] = m.embed[(size_t)ids[t] * D + d];
                    continue;
                }
                const int gr = pidx[t] / (S / p), gc = pidx[t] % (S / p);
                double s = 0;
                for (int ch = 0; ch < 3; ch++)
                    for (int y = 0; y < p; y++)
                        for (int xx = 0; xx < p; xx++)
                            s += (double)m.patch_w[(size_t)d * 3 * p * p + (ch * p + y) * p + xx] *
                                 pixels[((size_t)ch * S + gr * p + y) * S + gc * p + xx];
                want[t * D + d] = s + m.patch_b[d] + m.pos_embed[(size_t)pidx[t] * D + d];
            }
        }
        const nm_model *w;
        ck_assert_msg(o->model_upload(b, &m, &w, &err) == NM_OK, "%s", err.msg);
        float *dx = bput(b, NULL, (size_t)T * D * 4), *got = malloc((size_t)T * D * 4);
        ck_assert_msg(o->embed(b, dx, w, ids, pidx, pixels, T, &err) == NM_OK, "%s", err.msg);
        bget(b, got, dx, (size_t)T * D * 4);
        res.err = rel_err(got, want, (size_t)T * D, c->name);
        o->release(b, dx);
        o->model_release(b, w);
        free(got); free(want); free(pixels);
        nm_model_free(&m);
        break;
    }
    case OP_ROUTE: {
        const int T = c->a, N = c->b, M = c->c, K = c->d, copy = c->e, ties = c->f;
        float *z = randn(rng, (size_t)T * (N + 1), 1.5f);
        if (ties) // small integers: many exact ties between reals and with the null logit
            for (size_t i = 0; i < (size_t)T * (N + 1); i++) z[i] = (float)(nm_test_rng_next(rng) % 4);
        route_ref_t *ref = malloc(sizeof *ref);
        ck_assert_ptr_nonnull(ref);
        route_ref(ref, z, T, N, M, K, copy);
        const nm_moe_config mc = {.num_experts = N, .null_copies = M, .top_k = K, .expert_hidden = 1,
                                  .null_kind = copy ? NM_NULL_COPY : NM_NULL_ZERO};
        float *dz = bput(b, z, (size_t)T * (N + 1) * 4);
        nm_routing dr = routing_alloc(b, T, K);
        ck_assert_msg(o->moe_route(b, &dr, dz, T, &mc, &err) == NM_OK, "%s", err.msg);
        for (int t = 0; t < T; t++) ref->margin[t] = INFINITY; // exact logits: no near-tie excuse
        check_routing(b, &dr, ref, T, K, 0.0, c->name, &res);
        routing_release(b, &dr);
        o->release(b, dz);
        free(ref);
        free(z);
        break;
    }
    case OP_MOE: {
        const int T = c->a, N = c->b, M = c->c, K = c->d, Hs = c->e, copy = c->f, D = 24, H = 16;
        nm_config cfg;
        nm_config_init_byte(&cfg);
        cfg.hidden_size = D, cfg.num_layers = 1, cfg.num_heads = 2, cfg.num_kv_heads = 1, cfg.head_dim = 8;
        cfg.max_positions = 64;
        cfg.moe = (nm_moe_config){.num_experts = N, .null_copies = M, .top_k = K, .expert_hidden = H,
                                  .shared_expert_hidden = Hs, .null_kind = copy ? NM_NULL_COPY : NM_NULL_ZERO};
        nm_model m;
        ck_assert_msg(nm_model_init_random(&m, &cfg, 100 + T, &err) == NM_OK, "%s", err.msg);
        const nm_moe_weights *hw = &m.layers[0].moe;
        float *y = randn(rng, (size_t)T * D, 1);
        double *want = malloc((size_t)T * D * sizeof *want);
        nm_moe_forward_naive(want, y, hw, &cfg.moe, T, D);
        // the routing reference from float64 logits of the same y
        float *z = malloc((size_t)T * (N + 1) * 4);
        double *zd = calloc((size_t)T * (N + 1), sizeof *zd);
        linear_ref(zd, y, hw->router, T, D, N + 1);
        for (size_t i = 0; i < (size_t)T * (N + 1); i++) z[i] = (float)zd[i];
        route_ref_t *ref = malloc(sizeof *ref);
        route_ref(ref, z, T, N, M, K, copy);
        const nm_model *w;
        ck_assert_msg(o->model_upload(b, &m, &w, &err) == NM_OK, "%s", err.msg);
        float *dy = bput(b, y, (size_t)T * D * 4), *dout = bput(b, NULL, (size_t)T * D * 4), *got = malloc((size_t)T * D * 4);
        nm_routing dr = routing_alloc(b, T, K);
        ck_assert_msg(o->moe(b, dout, dy, &w->layers[0].moe, &cfg.moe, T, D, &dr, &err) == NM_OK, "%s", err.msg);
        check_routing(b, &dr, ref, T, K, 1e-4, c->name, &res);
        bget(b, got, dout, (size_t)T * D * 4);
        if (res.ties == 0) res.err = fmax(res.err, rel_err(got, want, (size_t)T * D, c->name));
        else fprintf(stderr, "  %s: output not compared (routing near-ties)\n", c->name);
        routing_release(b, &dr);
        o->release(b, dy); o->release(b, dout);
        o->model_release(b, w);
        free(got); free(y); free(want); free(z); free(zd); free(ref);
        nm_model_free(&m);
        break;
    }
    }
    ck_assert_msg(res.err <= tol, "%s on %s%s: max relative error %.3g over %.3g", c->name, b->ops->name,
                  b->opt.bf16 ? " (bf16)" : "", res.err, tol);
    return res;
}

// Loop index i = variant * N_CASES + case
static void op_case_on_variant(int v, int i) {
    nm_backend *b = open_variant(v);
    nm_test_rng rng = {1000 + (uint64_t)i};
    case_result r = run_case(b, &CASES[i], &rng, op_tol(v));
    fprintf(stderr, "backend %-4s%s %-48s max rel err %.2g%s\n", VARIANTS[v].name, VARIANTS[v].bf16 ? " bf16" : "     ",
            CASES[i].name, r.err, r.ties ? " (near-ties reported above)" : "");
    nm_backend_close(b);
}

START_TEST(test_op_cpu) { op_case_on_variant(0, _i); }
END_TEST

START_TEST(test_op_cuda) { op_case_on_variant(1 + _i / N_CASES, _i % N_CASES); }
END_TEST

// ---- whole-model traces: a backend's engine against the CPU engine ----

typedef struct {
    const char *name;
    int shared, nkv, copy, M, vision, bf16;
} model_case;

static const model_case MODELS[] = {
    {"zero nulls, shared expert, GQA, vision", 12, 2, 0, 6, 1, 0},
    {"no shared expert, MHA, M=0", 0, 4, 0, 0, 0, 0},
    {"copy nulls, shared expert, MQA", 8, 1, 1, 3, 0, 0},
    {"zero nulls, GQA, vision, BF16", 0, 2, 0, 6, 1, 1},
    {"copy nulls, shared, MHA, BF16", 8, 4, 1, 6, 0, 1},
};
#define N_MODELS ((int)(sizeof MODELS / sizeof MODELS[0]))

static nm_config model_config(const model_case *mc) {
    nm_config c;
    nm_config_init_byte(&c);
    c.hidden_size = 64, c.num_layers = 3, c.num_heads = 4, c.num_kv_heads = mc->nkv, c.head_dim = 16;
    c.vocab_size = 262, c.max_positions = 256;
    c.moe = (nm_moe_config){.num_experts = 8, .null_copies = mc->M, .top_k = 4, .expert_hidden = 32,
                            .shared_expert_hidden = mc->shared, .null_kind = mc->copy ? NM_NULL_COPY : NM_NULL_ZERO};
    c.has_vision = mc->vision, c.image_size = mc->vision ? 16 : 0, c.patch_size = mc->vision ? 4 : 0, c.channels = 3;
    return c;
}

// Prefill the prompt as one batch, then decode `steps` tokens one by one, tracing everything.
static void run_engine(nm_engine *e, const nm_sequence *seq, const float *pixels, int steps, float *logits,
                       nm_trace_sample *tr, int V) {
    nm_error err = {0};
    ck_assert_msg(nm_engine_forward(e, seq->id, seq->patch, pixels, seq->n, logits, 1, tr, &err) == NM_OK, "%s", err.msg);
    for (int i = 0; i < steps; i++) {
        const int32_t id = 'a' + i, p = -1;
        ck_assert_msg(nm_engine_forward(e, &id, &p, pixels, 1, logits + (size_t)(seq->n + i) * V, 1, tr, &err) == NM_OK,
                      "%s", err.msg);
    }
}

START_TEST(test_model_cuda) {
    const model_case *mc = &MODELS[_i];
    nm_config c = model_config(mc);
    nm_model m;
    nm_error err = {0};
    ck_assert_msg(nm_model_init_random(&m, &c, 40 + (uint64_t)_i, &err) == NM_OK, "%s", err.msg);
    if (mc->bf16) // BF16 weights, as a BF16 file would give: the CPU then computes on the same values
        for (size_t i = 0; i < m.arena_len; i++) m.arena[i] = nm_bf16_to_f32(nm_f32_to_bf16(m.arena[i]));
    nm_sequence seq;
    ck_assert_int_eq(nm_sequence_build(&seq, &c, "Which shape is red, and where is it?", mc->vision, 8, &err), NM_OK);
    nm_test_rng rng = {77};
    float *pixels = mc->vision ? randn(&rng, (size_t)3 * 16 * 16, 0.6f) : NULL;
    const int steps = 6, T = seq.n + steps, V = c.vocab_size, L = c.num_layers, K = c.moe.top_k;
    float *la = malloc((size_t)T * V * 4), *lb = malloc((size_t)T * V * 4);
    nm_engine *ea, *eb;
    nm_trace_sample ta, tb;
    const nm_engine_options cuda = {.device = "cuda", .bf16 = mc->bf16};
    ck_assert_msg(nm_engine_create(&ea, &m, T, &err) == NM_OK, "%s", err.msg);
    ck_assert_msg(nm_engine_create_on(&eb, &m, T, &cuda, &err) == NM_OK, "%s", err.msg);
    ck_assert_int_eq(nm_trace_sample_init(&ta, L, K, T, &err), NM_OK);
    ck_assert_int_eq(nm_trace_sample_init(&tb, L, K, T, &err), NM_OK);
    run_engine(ea, &seq, pixels, steps, la, &ta, V);
    run_engine(eb, &seq, pixels, steps, lb, &tb, V);
    ck_assert_int_eq(tb.n_tokens, T);
    // routing: identical except near-ties (the two competing slots' logits, log p, within NEAR)
    const double near = mc->bf16 ? 5e-2 : 1e-4, tol = mc->bf16 ? 3e-2 : 1e-3;
    long ties = 0;
    int first_tie_token = T;
    double perr = 0;
    for (int l = 0; l < L; l++)
        for (int t = 0; t < T; t++) {
            const size_t i = (size_t)l * T + t;
            for (int k = 0; k < K; k++) {
                const size_t j = i * K + k;
                if (ta.slot[j] == tb.slot[j]) {
                    perr = fmax(perr, fabs(ta.prob[j] - tb.prob[j]) / fmax(1.0, fabs(ta.prob[j])));
                    continue;
                }
                const double gap = fabs(log(ta.prob[j]) - log(tb.prob[j]));
                ck_assert_msg(gap < near, "%s: layer %d token %d slot %d: %d vs %d, not a near-tie (gap %.3g)", mc->name,
                              l, t, k, ta.slot[j], tb.slot[j], gap);
                fprintf(stderr, "  %s: near-tie at layer %d token %d slot %d (gap %.3g): reported\n", mc->name, l, t, k, gap);
                ties++;
                if (t < first_tie_token) first_tie_token = t;
                break;
            }
        }
    // logits of the tokens before the first near-tie (later ones carry its effect)
    double lerr = 0;
    for (int t = 0; t < first_tie_token; t++)
        for (int v = 0; v < V; v++) {
            const double a = la[(size_t)t * V + v], b = lb[(size_t)t * V + v];
            ck_assert_msg(isfinite(b), "%s: logit %d of token %d is %g", mc->name, v, t, b);
            lerr = fmax(lerr, fabs(a - b) / fmax(1.0, fabs(a)));
        }
    fprintf(stderr, "model %-40s T=%d: near-ties %ld; max rel err prob %.2g, logits %.2g (tokens 0..%d)\n", mc->name,
            T, ties, perr, lerr, first_tie_token - 1);
    ck_assert_msg(lerr <= tol, "%s: logits differ by %.3g relative (bar %.3g)", mc->name, lerr, tol);
    ck_assert_msg(perr <= tol, "%s: probabilities differ by %.3g relative (bar %.3g)", mc->name, perr, tol);
    // the same bits on a second run (no float atomics)
    nm_trace_sample tc;
    float *lc = malloc((size_t)T * V * 4);
    ck_assert_int_eq(nm_trace_sample_init(&tc, L, K, T, &err), NM_OK);
    nm_engine_reset(eb);
    run_engine(eb, &seq, pixels, steps, lc, &tc, V);
    ck_assert_msg(memcmp(lb, lc, (size_t)T * V * 4) == 0, "%s: a second run gave other logits", mc->name);
    ck_assert(memcmp(tb.gate, tc.gate, (size_t)L * T * K * 4) == 0);
    nm_trace_sample_free(&ta); nm_trace_sample_free(&tb); nm_trace_sample_free(&tc);
    nm_engine_free(ea); nm_engine_free(eb);
    free(la); free(lb); free(lc); free(pixels);
    nm_sequence_free(&seq);
    nm_model_free(&m);
}
END_TEST

// ---- the registry ----

START_TEST(test_registry) {
    const nm_backend_ops *ops;
    nm_error err = {0};
    ck_assert_int_eq(nm_backend_get("cpu", &ops, &err), NM_OK);
    ck_assert_str_eq(ops->name, "cpu");
    ck_assert_int_eq(nm_backend_get("tpu", &ops, &err), NM_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(err.msg, "unknown device 'tpu'"));
    nm_backend *b = NULL;
    const nm_backend_options bf = {.bf16 = 1};
    ck_assert_int_eq(nm_backend_open(&b, "cpu", &bf, &err), NM_ERR_UNSUPPORTED);
    ck_assert_ptr_null(b);
    nm_status s = nm_backend_get("cuda", &ops, &err);
    if (s == NM_OK) {
        ck_assert_str_eq(ops->name, "cuda");
        ck_assert_str_eq(nm_backend_default_name(), "cuda");
    } else {
        ck_assert_int_eq(s, NM_ERR_UNSUPPORTED);
        ck_assert_msg(strstr(err.msg, nm_backend_cuda_built() ? "no CUDA device found: " : "CUDA backend not built"),
                      "unexpected message: %s", err.msg);
        ck_assert_str_eq(nm_backend_default_name(), "cpu");
        // an engine asked for cuda fails cleanly (nothing leaks: the sanitizer runs say so)
        nm_config c = model_config(&MODELS[1]);
        nm_model m;
        ck_assert_int_eq(nm_model_init_random(&m, &c, 1, &err), NM_OK);
        nm_engine *e = (nm_engine *)&m; // must be reset to NULL on failure
        const nm_engine_options cuda = {.device = "cuda"};
        ck_assert_int_eq(nm_engine_create_on(&e, &m, 16, &cuda, &err), NM_ERR_UNSUPPORTED);
        ck_assert_ptr_null(e);
        nm_model_free(&m);
    }
    char line[512];
    nm_backend_describe(line, sizeof line);
    ck_assert_ptr_nonnull(strstr(line, "cpu"));
}
END_TEST

// The CPU table gives the engine's results: an engine on "cpu" equals nm_engine_create.
START_TEST(test_cpu_engine_same) {
    nm_config c = model_config(&MODELS[0]);
    nm_model m;
    nm_error err = {0};
    ck_assert_int_eq(nm_model_init_random(&m, &c, 5, &err), NM_OK);
    nm_sequence seq;
    ck_assert_int_eq(nm_sequence_build(&seq, &c, "colour?", 1, 4, &err), NM_OK);
    nm_test_rng rng = {3};
    float *pixels = randn(&rng, (size_t)3 * 16 * 16, 0.6f);
    const int T = seq.n + 3, V = c.vocab_size;
    float *la = malloc((size_t)T * V * 4), *lb = malloc((size_t)T * V * 4);
    nm_engine *ea, *eb;
    const nm_engine_options cpu = {.device = "cpu"};
    ck_assert_int_eq(nm_engine_create(&ea, &m, T, &err), NM_OK);
    ck_assert_int_eq(nm_engine_create_on(&eb, &m, T, &cpu, &err), NM_OK);
    ck_assert_str_eq(nm_engine_get_options(eb)->device, "cpu");
    run_engine(ea, &seq, pixels, 3, la, NULL, V);
    run_engine(eb, &seq, pixels, 3, lb, NULL, V);
    ck_assert(memcmp(la, lb, (size_t)T * V * 4) == 0);
    nm_engine_free(ea);
    nm_engine_free(eb);
    free(la); free(lb); free(pixels);
    nm_sequence_free(&seq);
    nm_model_free(&m);
}
END_TEST

// Is a CUDA device usable? Asked in a child process: CUDA must stay uninitialised in Check's
// parent, whose forked test processes would otherwise inherit an unusable context.
static int cuda_usable(char *why, size_t n) {
    if (!nm_backend_cuda_built()) {
        snprintf(why, n, "CUDA backend not built");
        return 0;
    }
    int fd[2];
    if (pipe(fd) != 0) {
        snprintf(why, n, "pipe failed");
        return 0;
    }
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        close(fd[0]);
        const nm_backend_ops *ops;
        nm_error err = {0};
        int ok = nm_backend_get("cuda", &ops, &err) == NM_OK;
        if (!ok && write(fd[1], err.msg, strlen(err.msg)) < 0) ok = 0;
        close(fd[1]);
        _exit(ok ? 0 : 1);
    }
    close(fd[1]);
    ssize_t got = pid > 0 ? read(fd[0], why, n - 1) : -1;
    why[got > 0 ? got : 0] = '\0';
    close(fd[0]);
    int status = 0;
    if (pid < 0 || waitpid(pid, &status, 0) != pid) {
        snprintf(why, n, "could not start the probe process");
        return 0;
    }
    return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

NM_TEST_SUITE(backend) {
    Suite *s = suite_create("backend");
    TCase *tc = tcase_create("cpu");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_registry);
    tcase_add_test(tc, test_cpu_engine_same);
    tcase_add_loop_test(tc, test_op_cpu, 0, N_CASES);
    suite_add_tcase(s, tc);
    const char *only = getenv("CK_RUN_SUITE");
    if (only && strcmp(only, "backend") != 0) return s; // not run: no probe, no skip line
    char why[512];
    const int n_gpu = 2 * N_CASES + N_MODELS;
    if (cuda_usable(why, sizeof why)) {
        TCase *g = tcase_create("cuda");
        tcase_set_timeout(g, 300);
        tcase_add_loop_test(g, test_op_cuda, 0, 2 * N_CASES); // F32, then BF16 GEMMs
        tcase_add_loop_test(g, test_model_cuda, 0, N_MODELS);
        suite_add_tcase(s, g);
    } else {
        nm_test_skip("backend/cuda", n_gpu, why);
    }
    return s;
}
