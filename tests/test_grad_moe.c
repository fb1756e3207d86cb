// test_grad_moe.c — the training MoE layer (nm_train_moe.h): forward, backward, L_bal and L_z.
//
// Methodology as test_grad.c (read its header): a scalar loss of the layer's output,
//     L = sum(w * out) + w_bal * L_bal + w_z * L_z,   w: seeded normals, w_bal = 0.5, w_z = 0.25,
// and for every case
// 1. float64 analytic gradient vs 5-point central differences (h = 1e-3) for every element of
//    y, the router and every expert and shared weight; per element |a - f| / max(|a|, |f|,
//    noise / 1e-6), noise = 16 eps (sum |w out| + |w_bal L_bal| + |w_z L_z|) / h. Bar 1e-6.
//    The top-K selection is piecewise constant: inputs are drawn (and redrawn) so that every
//    selection boundary and the order of the selected slots is at least 1e-2 plus the largest
//    logit change a difference step can make away from a tie, and every step is checked not to
//    change the selection (pairs of null copies are interchangeable and never count as ties).
// 2. the gradient rule: parameter gradients +=, dy = over NaN.
// 3. float32 vs float64 on the same (float32-rounded) inputs: identical routing, norm-relative
//    max |a32 - a64| / max |a64| <= 1e-4 for out and every gradient, the losses within 1e-4.
// 4. the float64 output against nm_moe_forward_naive, inference's token-by-token definition
//    (a forward wrong in a way its backward follows passes the finite differences).
// Then: the f32 training forward against the inference layer (nm_moe_forward: identical routing,
// out within 1e-5); bit-identical results across runs, thread counts and a reused cache; hand-
// worked L_bal / L_z values (uniform routing gives L_bal = 1); and the float64 path against the
// independent PyTorch reference (tests/gen_moe_grad_fixtures.py, tests/fixtures/moe_grad_*).
#include <float.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nm_moe.h"
#include "nm_rng.h"
#include "nm_safetensors.h"
#include "nm_train_moe.h"
#include "test_util.h"

#define FD_H 1e-3
#define FD_TOL 1e-6
#define F32_TOL 1e-4
#define FD_MARGIN 1e-2   // selection margin beyond what a difference step can move a logit
#define F32_MARGIN 1e-4  // where only float32 vs float64 / inference logits must route alike
#define W_BAL 0.5
#define W_Z 0.25

// The layer's inputs: y and the parameters, in both precisions (v/fv values, g/fg gradients).
enum { P_Y, P_ROUTER, P_GATE, P_UP, P_DOWN, P_SH_GATE, P_SH_UP, P_SH_DOWN, P_COUNT };
static const char *const P_NAME[P_COUNT] = {"y", "router", "gate", "up", "down", "sh_gate", "sh_up", "sh_down"};

typedef struct {
    const char *name;
    int N, M, K, H, Hs;
    nm_null_kind kind;
    int T, D;
    uint64_t seed;
} spec;

typedef struct {
    const char *name;
    nm_moe_config mc;
    int T, D;
    double w_bal, w_z;
    size_t n[P_COUNT];
    double *v[P_COUNT], *g[P_COUNT];
    float *fv[P_COUNT], *fg[P_COUNT];
    double *wout, *out; // (T, D) dL/dout and the float64 output
    float *fwout, *fout;
    nm_moe_cache_f64 c64;
    nm_moe_cache_f32 c32;
    uint8_t *sel_n_real; // the base point's selection, which no difference step may change
    int16_t *sel_slot;
} mcase;

static int present(const mcase *c, int i) { return i < P_SH_GATE || c->mc.shared_expert_hidden > 0; }

static void *xcalloc(size_t n, size_t size) {
    void *p = calloc(n ? n : 1, size);
    ck_assert_ptr_nonnull(p);
    return p;
}

static void case_init(mcase *c, const spec *s) {
    memset(c, 0, sizeof *c);
    c->name = s->name;
    c->mc = (nm_moe_config){.num_experts = s->N, .null_copies = s->M, .top_k = s->K, .expert_hidden = s->H,
                            .shared_expert_hidden = s->Hs, .null_kind = s->kind};
    c->T = s->T;
    c->D = s->D;
    c->w_bal = W_BAL;
    c->w_z = W_Z;
    const size_t T = (size_t)s->T, D = (size_t)s->D, N = (size_t)s->N, H = (size_t)s->H, Hs = (size_t)s->Hs;
    const size_t n[P_COUNT] = {T * D, (N + 1) * D, N * H * D, N * H * D, N * D * H, Hs * D, Hs * D, D * Hs};
    for (int i = 0; i < P_COUNT; i++) {
        c->n[i] = n[i];
        c->v[i] = xcalloc(n[i], sizeof(double));
        c->g[i] = xcalloc(n[i], sizeof(double));
        c->fv[i] = xcalloc(n[i], sizeof(float));
        c->fg[i] = xcalloc(n[i], sizeof(float));
    }
    c->wout = xcalloc(T * D, sizeof(double));
    c->out = xcalloc(T * D, sizeof(double));
    c->fwout = xcalloc(T * D, sizeof(float));
    c->fout = xcalloc(T * D, sizeof(float));
}

static void case_free(mcase *c) {
    for (int i = 0; i < P_COUNT; i++) free(c->v[i]), free(c->g[i]), free(c->fv[i]), free(c->fg[i]);
    free(c->wout), free(c->out), free(c->fwout), free(c->fout), free(c->sel_n_real), free(c->sel_slot);
    nm_moe_cache_free_f64(&c->c64);
    nm_moe_cache_free_f32(&c->c32);
}

static nm_moe_params_f64 params64(const mcase *c, double *const *a) {
    const int sh = c->mc.shared_expert_hidden > 0;
    return (nm_moe_params_f64){a[P_ROUTER], a[P_GATE], a[P_UP], a[P_DOWN], sh ? a[P_SH_GATE] : NULL,
                               sh ? a[P_SH_UP] : NULL, sh ? a[P_SH_DOWN] : NULL};
}

static nm_moe_params_f32 params32(const mcase *c, float *const *a) {
    const int sh = c->mc.shared_expert_hidden > 0;
    return (nm_moe_params_f32){a[P_ROUTER], a[P_GATE], a[P_UP], a[P_DOWN], sh ? a[P_SH_GATE] : NULL,
                               sh ? a[P_SH_UP] : NULL, sh ? a[P_SH_DOWN] : NULL};
}

// ---------------------------------------------------------------------------------------------
// Inputs

// x = std * normal, rounded to float32 so that both precisions see the same values.
static void fill(nm_rng *r, double *v, float *fv, size_t n, double std) {
    for (size_t j = 0; j < n; j++) {
        fv[j] = (float)(std * nm_rng_normal(r));
        v[j] = fv[j];
    }
}

// Unit-variance logits with the null row 1.5 times as wide (so that some tokens route
// everything to null, some nothing); experts scaled for O(1) outputs; dL/dout normal.
static void draw(mcase *c, uint64_t seed) {
    nm_rng r;
    nm_rng_seed(&r, seed);
    const int D = c->D, N = c->mc.num_experts, H = c->mc.expert_hidden, Hs = c->mc.shared_expert_hidden;
    const double sd = 1.0 / sqrt(D);
    fill(&r, c->v[P_Y], c->fv[P_Y], c->n[P_Y], 1.0);
    fill(&r, c->v[P_ROUTER], c->fv[P_ROUTER], (size_t)N * D, sd);
    fill(&r, c->v[P_ROUTER] + (size_t)N * D, c->fv[P_ROUTER] + (size_t)N * D, (size_t)D, 1.5 * sd);
    fill(&r, c->v[P_GATE], c->fv[P_GATE], c->n[P_GATE], sd);
    fill(&r, c->v[P_UP], c->fv[P_UP], c->n[P_UP], sd);
    fill(&r, c->v[P_DOWN], c->fv[P_DOWN], c->n[P_DOWN], 1.0 / sqrt(H));
    if (Hs > 0) {
        fill(&r, c->v[P_SH_GATE], c->fv[P_SH_GATE], c->n[P_SH_GATE], sd);
        fill(&r, c->v[P_SH_UP], c->fv[P_SH_UP], c->n[P_SH_UP], sd);
        fill(&r, c->v[P_SH_DOWN], c->fv[P_SH_DOWN], c->n[P_SH_DOWN], 1.0 / sqrt(Hs));
    }
    fill(&r, c->wout, c->fwout, (size_t)c->T * D, 1.0);
}

// Margins of one token's expanded logits zt (N+M): the smallest gap between a selected and an
// unselected slot, and between two selected slots in order, pairs of null copies left out.
// Returns the smaller; *n_real = the real experts selected.
static double token_margin(const double *zt, int N, int M, int K, int *n_real) {
    const int S = N + M;
    int idx[S];
    for (int i = 0; i < S; i++) { // insertion sort, descending, ties to the lower slot (stable)
        int j = i;
        while (j > 0 && zt[i] > zt[idx[j - 1]]) idx[j] = idx[j - 1], j--;
        idx[j] = i;
    }
    double m = INFINITY;
    *n_real = 0;
    for (int a = 0; a < K; a++) {
        *n_real += idx[a] < N;
        for (int b = a + 1; b < S; b++)
            if (idx[a] < N || idx[b] < N) m = fmin(m, zt[idx[a]] - zt[idx[b]]);
    }
    return m;
}

// Whether the drawn inputs route clear of ties by `margin` (for finite differences: plus the
// largest logit change a step of 2h in y or in the router can make, 2h * max(2 max|Wr|, max|y_t|))
// and cover the n_real values the case is about.
static int acceptable(const mcase *c, double margin, int for_fd) {
    const int N = c->mc.num_experts, M = c->mc.null_copies, K = c->mc.top_k, D = c->D, S = N + M;
    double wmax = 0.0, zt[S];
    for (size_t j = 0; j < c->n[P_ROUTER]; j++) wmax = fmax(wmax, fabs(c->v[P_ROUTER][j]));
    int seen[K + 1];
    memset(seen, 0, sizeof seen);
    for (int t = 0; t < c->T; t++) {
        const double *y = c->v[P_Y] + (size_t)t * D;
        double ymax = 0.0;
        for (int d = 0; d < D; d++) ymax = fmax(ymax, fabs(y[d]));
        for (int i = 0; i <= N; i++) {
            double z = 0.0;
            for (int d = 0; d < D; d++) z += c->v[P_ROUTER][(size_t)i * D + d] * y[d];
            if (i < N) zt[i] = z;
            else for (int j = 0; j < M; j++) zt[N + j] = z;
        }
        int nr;
        const double need = margin + (for_fd ? 2 * FD_H * fmax(2 * wmax, ymax) : 0.0);
        if (token_margin(zt, N, M, K, &nr) < need) return 0;
        seen[nr] = 1;
    }
    if (M >= K && (!seen[0] || !seen[K < N ? K : N])) return 0; // all-null and all-real tokens
    int mixed = 0;
    for (int n = 1; n < K; n++) mixed |= seen[n];
    return !(M > 0 && K > 1 && !mixed); // and a token with reals and nulls mixed
}

static void draw_acceptable(mcase *c, uint64_t seed, double margin, int for_fd) {
    for (int attempt = 0; attempt < 500; attempt++) {
        draw(c, seed + 7919 * (uint64_t)attempt);
        if (acceptable(c, margin, for_fd)) return;
    }
    ck_abort_msg("%s: no input draw routes clear of ties", c->name);
}

// ---------------------------------------------------------------------------------------------
// Running the layer

static void forward64(mcase *c) {
    nm_error err;
    const nm_moe_params_f64 w = params64(c, c->v);
    ck_assert_int_eq(nm_moe_train_forward_f64(c->out, &c->c64, c->v[P_Y], &w, &c->mc, c->T, c->D, &err), NM_OK);
}

static void forward32(mcase *c) {
    nm_error err;
    const nm_moe_params_f32 w = params32(c, c->fv);
    ck_assert_int_eq(nm_moe_train_forward_f32(c->fout, &c->c32, c->fv[P_Y], &w, &c->mc, c->T, c->D, &err), NM_OK);
}

static double loss64(mcase *c) {
    forward64(c);
    if (c->sel_slot) {
        ck_assert_msg(memcmp(c->sel_n_real, c->c64.n_real, (size_t)c->T) == 0 &&
                          memcmp(c->sel_slot, c->c64.slot, (size_t)c->T * c->mc.top_k * sizeof(int16_t)) == 0,
                      "%s: a finite-difference step changed the selection (margin too small)", c->name);
    }
    double L = c->w_bal * c->c64.l_bal + c->w_z * c->c64.l_z;
    for (size_t j = 0; j < (size_t)c->T * c->D; j++) L += c->wout[j] * c->out[j];
    return L;
}

// f64 analytic gradients into g (parameter gradients start at zero).
static void grad64(mcase *c) {
    for (int i = P_ROUTER; i < P_COUNT; i++) memset(c->g[i], 0, c->n[i] * sizeof(double));
    forward64(c);
    nm_moe_params_f64 w = params64(c, c->v), dw = params64(c, c->g);
    nm_moe_train_backward_f64(c->g[P_Y], &dw, c->wout, c->w_bal, c->w_z, &c->c64, c->v[P_Y], &w, &c->mc, c->T, c->D);
}

static void grad32(mcase *c) {
    for (int i = P_ROUTER; i < P_COUNT; i++) memset(c->fg[i], 0, c->n[i] * sizeof(float));
    forward32(c);
    nm_moe_params_f32 w = params32(c, c->fv), dw = params32(c, c->fg);
    nm_moe_train_backward_f32(c->fg[P_Y], &dw, c->fwout, c->w_bal, c->w_z, &c->c32, c->fv[P_Y], &w, &c->mc, c->T, c->D);
}

// ---------------------------------------------------------------------------------------------
// The three checks

// Check 1 over the tensors in `which` (bit mask of P_*); returns the worst error.
static double check_fd(mcase *c, unsigned which) {
    grad64(c);
    free(c->sel_n_real), free(c->sel_slot);
    c->sel_n_real = xcalloc((size_t)c->T, 1);
    c->sel_slot = xcalloc((size_t)c->T * c->mc.top_k, sizeof(int16_t));
    memcpy(c->sel_n_real, c->c64.n_real, (size_t)c->T);
    memcpy(c->sel_slot, c->c64.slot, (size_t)c->T * c->mc.top_k * sizeof(int16_t));
    double Lmag = fabs(c->w_bal * c->c64.l_bal) + fabs(c->w_z * c->c64.l_z);
    for (size_t j = 0; j < (size_t)c->T * c->D; j++) Lmag += fabs(c->wout[j] * c->out[j]);
    const double noise = 16 * DBL_EPSILON * Lmag / FD_H, floor = noise / FD_TOL;
    double worst = 0.0;
    for (int i = 0; i < P_COUNT; i++) {
        if (!present(c, i) || !(which >> i & 1)) continue;
        const size_t n = c->n[i];
        double *v = c->v[i], *a = xcalloc(n, sizeof *a), *f = xcalloc(n, sizeof *f);
        memcpy(a, c->g[i], n * sizeof *a);
        double fmaxabs = 0.0;
        for (size_t j = 0; j < n; j++) {
            const double x0 = v[j], off[4] = {2, 1, -1, -2};
            double l[4];
            for (int s = 0; s < 4; s++) {
                v[j] = x0 + off[s] * FD_H;
                l[s] = loss64(c);
            }
            v[j] = x0;
            f[j] = (-l[0] + 8 * l[1] - 8 * l[2] + l[3]) / (12 * FD_H);
            fmaxabs = fmax(fmaxabs, fabs(f[j]));
        }
        double err = 0.0;
        size_t at = 0;
        for (size_t j = 0; j < n; j++) {
            ck_assert_msg(isfinite(a[j]), "%s: d%s[%zu] = %g", c->name, P_NAME[i], j, a[j]);
            const double e = fabs(a[j] - f[j]) / fmax(fmax(fabs(a[j]), fabs(f[j])), floor);
            if (e > err) err = e, at = j;
        }
        printf("grad_moe %-12s d%-8s n=%-4zu max|g|=%-9.3g floor %.1e  fd rel err %.2e (at %zu: %.12g vs %.12g)\n",
               c->name, P_NAME[i], n, fmaxabs, floor, err, at, a[at], f[at]);
        ck_assert_msg(fmaxabs > 1e-3, "%s: d%s is trivially small (%g)", c->name, P_NAME[i], fmaxabs);
        ck_assert_msg(err <= FD_TOL, "%s: d%s differs from finite differences by %.3e at %zu (%.12g vs %.12g)", c->name,
                      P_NAME[i], err, at, a[at], f[at]);
        worst = fmax(worst, err);
        free(a);
        free(f);
    }
    free(c->sel_n_real), free(c->sel_slot);
    c->sel_n_real = NULL, c->sel_slot = NULL;
    return worst;
}

// Check 2: the backward adds to parameter gradients (from 0.5) and writes dy (over NaN).
static void check_rule(mcase *c) {
    grad64(c);
    double *ref[P_COUNT];
    for (int i = 0; i < P_COUNT; i++) {
        ref[i] = xcalloc(c->n[i], sizeof(double));
        memcpy(ref[i], c->g[i], c->n[i] * sizeof(double));
        for (size_t j = 0; j < c->n[i]; j++) c->g[i][j] = i == P_Y ? NAN : 0.5;
    }
    forward64(c);
    nm_moe_params_f64 w = params64(c, c->v), dw = params64(c, c->g);
    nm_moe_train_backward_f64(c->g[P_Y], &dw, c->wout, c->w_bal, c->w_z, &c->c64, c->v[P_Y], &w, &c->mc, c->T, c->D);
    for (int i = 0; i < P_COUNT; i++) {
        for (size_t j = 0; present(c, i) && j < c->n[i]; j++) {
            const double want = i == P_Y ? ref[i][j] : 0.5 + ref[i][j];
            ck_assert_msg(fabs(c->g[i][j] - want) <= 1e-12 * fmax(1.0, fabs(want)), "%s: d%s[%zu] = %g, want %g (%s)",
                          c->name, P_NAME[i], j, c->g[i][j], want, i == P_Y ? "=" : "+=");
        }
        free(ref[i]);
    }
}

static double normrel_f32(const float *a, const double *b, size_t n) {
    double m = 0.0, d = 0.0;
    for (size_t j = 0; j < n; j++) {
        ck_assert_msg(isfinite(a[j]), "non-finite float32 value at %zu", j);
        m = fmax(m, fabs(b[j]));
        d = fmax(d, fabs(a[j] - b[j]));
    }
    return d / fmax(m, 1e-30);
}

// Check 3: float32 forward and backward vs float64 (the inputs are float32 values already).
static double check_f32(mcase *c) {
    grad64(c);
    grad32(c);
    const int T = c->T, K = c->mc.top_k;
    ck_assert_msg(memcmp(c->c32.n_real, c->c64.n_real, (size_t)T) == 0 &&
                      memcmp(c->c32.slot, c->c64.slot, (size_t)T * K * sizeof(int16_t)) == 0,
                  "%s: float32 and float64 route differently", c->name);
    double worst = normrel_f32(c->fout, c->out, (size_t)T * c->D);
    printf("grad_moe %-12s out       f32 vs f64 %.2e\n", c->name, worst);
    for (int i = 0; i < P_COUNT; i++) {
        if (!present(c, i)) continue;
        const double e = normrel_f32(c->fg[i], c->g[i], c->n[i]);
        printf("grad_moe %-12s d%-8s f32 vs f64 %.2e\n", c->name, P_NAME[i], e);
        worst = fmax(worst, e);
    }
    const double eg = normrel_f32(c->c32.gate, c->c64.gate, (size_t)T * K);
    const double eb = fabs(c->c32.l_bal - c->c64.l_bal) / fabs(c->c64.l_bal);
    const double ez = fabs(c->c32.l_z - c->c64.l_z) / fmax(fabs(c->c64.l_z), 1e-30);
    printf("grad_moe %-12s gates %.2e  L_bal %.2e  L_z %.2e  f32 vs f64\n", c->name, eg, eb, ez);
    ck_assert_msg(worst <= F32_TOL && eg <= F32_TOL && eb <= F32_TOL && ez <= F32_TOL,
                  "%s: float32 differs from float64 (worst tensor %.3e, gates %.3e, L_bal %.3e, L_z %.3e)", c->name,
                  worst, eg, eb, ez);
    ck_assert_int_eq(c->c32.real_slots, c->c64.real_slots);
    return worst;
}

// The float64 forward against the inference's float64 definition, computed token by token
// (nm_moe_forward_naive: no sorting, no grouping), on the same float32 inputs. Finite
// differences cannot see a forward that is wrong in a way its backward follows.
static void check_naive(mcase *c) {
    forward64(c);
    const int sh = c->mc.shared_expert_hidden > 0;
    const nm_moe_weights w = {c->fv[P_ROUTER], c->fv[P_GATE], c->fv[P_UP], c->fv[P_DOWN], sh ? c->fv[P_SH_GATE] : NULL,
                              sh ? c->fv[P_SH_UP] : NULL, sh ? c->fv[P_SH_DOWN] : NULL};
    const size_t n = (size_t)c->T * c->D;
    double *ref = xcalloc(n, sizeof *ref), e = 0.0;
    nm_moe_forward_naive(ref, c->fv[P_Y], &w, &c->mc, c->T, c->D);
    for (size_t j = 0; j < n; j++) e = fmax(e, fabs(c->out[j] - ref[j]) / fmax(1.0, fabs(ref[j])));
    printf("grad_moe %-12s out vs nm_moe_forward_naive %.2e\n", c->name, e);
    ck_assert_msg(e <= 1e-12, "%s: float64 forward differs from nm_moe_forward_naive by %.3e", c->name, e);
    free(ref);
}

// ---------------------------------------------------------------------------------------------
// Finite-difference cases (T tokens, D features; sizes small enough for ~2000 forwards each)

static const spec FD_CASES[] = {
    {"zero", 4, 3, 3, 5, 0, NM_NULL_ZERO, 10, 6, 1001},     // M > 0: tokens with n_real = 0, = K, mixed
    {"m0", 5, 0, 2, 4, 0, NM_NULL_ZERO, 10, 6, 1002},       // plain top-K: the null row unused
    {"k1", 4, 2, 1, 5, 0, NM_NULL_ZERO, 10, 6, 1003},       // K = 1: n_real 0 or 1, gate 1
    {"all_slots", 3, 2, 5, 4, 0, NM_NULL_ZERO, 8, 6, 1004}, // K = N+M: every slot, L_bal constant
    {"copy", 4, 4, 3, 5, 3, NM_NULL_COPY, 10, 6, 1005},     // copy kind (+ shared expert)
    {"shared", 4, 4, 2, 5, 5, NM_NULL_ZERO, 10, 6, 1006},   // shared expert, n_real = 0 tokens
};
#define N_FD_CASES ((int)(sizeof FD_CASES / sizeof FD_CASES[0]))

START_TEST(test_fd) {
    mcase c;
    case_init(&c, &FD_CASES[_i]);
    draw_acceptable(&c, FD_CASES[_i].seed, FD_MARGIN, 1);
    int hist[8] = {0};
    forward64(&c);
    for (int t = 0; t < c.T; t++) hist[c.c64.n_real[t]]++;
    printf("grad_moe %-12s N=%d M=%d K=%d Hs=%d %s: n_real histogram", c.name, c.mc.num_experts, c.mc.null_copies,
           c.mc.top_k, c.mc.shared_expert_hidden, c.mc.null_kind == NM_NULL_COPY ? "copy" : "zero");
    for (int k = 0; k <= c.mc.top_k; k++) printf(" %d", hist[k]);
    printf(", L_bal %.4f L_z %.4f\n", c.c64.l_bal, c.c64.l_z);
    check_naive(&c);
    check_rule(&c);
    const double e1 = check_fd(&c, ~0u), e2 = check_f32(&c);
    printf("grad_moe %-12s worst: fd %.2e, f32 %.2e\n", c.name, e1, e2);
    case_free(&c);
}
END_TEST

// Each loss alone (dL/dout = 0): their gradients are a small part of the mixed loss above, so
// check them on their own too, through y and the router (the only inputs they depend on).
START_TEST(test_fd_losses_alone) {
    for (int which = 0; which < 2; which++) {
        const spec *s = &FD_CASES[which ? 4 : 0]; // zero kind with nulls; copy kind
        mcase c;
        case_init(&c, s);
        c.name = which ? "copy:losses" : "zero:losses";
        draw_acceptable(&c, s->seed, FD_MARGIN, 1);
        memset(c.wout, 0, (size_t)c.T * c.D * sizeof(double));
        c.w_bal = 1.0, c.w_z = 0.0;
        check_fd(&c, 1u << P_Y | 1u << P_ROUTER);
        c.w_bal = 0.0, c.w_z = 1.0;
        check_fd(&c, 1u << P_Y | 1u << P_ROUTER);
        // the expert weights get nothing from the losses
        grad64(&c);
        for (int i = P_GATE; i < P_COUNT; i++)
            for (size_t j = 0; present(&c, i) && j < c.n[i]; j++) ck_assert(c.g[i][j] == 0.0);
        case_free(&c);
    }
}
END_TEST

// ---------------------------------------------------------------------------------------------
// The f32 training forward computes what inference computes

static double maxrel_ff(const float *a, const float *b, size_t n) {
    double e = 0.0;
    for (size_t i = 0; i < n; i++) e = fmax(e, fabs((double)a[i] - b[i]) / fmax(1.0, fabs((double)b[i])));
    return e;
}

static const spec BIG_CASES[] = {
    {"big-zero", 8, 8, 4, 16, 8, NM_NULL_ZERO, 150, 32, 2001},
    {"big-m0", 8, 0, 2, 16, 0, NM_NULL_ZERO, 150, 32, 2002},
    {"big-copy", 6, 6, 3, 16, 0, NM_NULL_COPY, 150, 32, 2003},
};
#define N_BIG_CASES ((int)(sizeof BIG_CASES / sizeof BIG_CASES[0]))

START_TEST(test_matches_inference) {
    const spec *s = &BIG_CASES[_i];
    mcase c;
    case_init(&c, s);
    draw_acceptable(&c, s->seed, F32_MARGIN, 0);
    forward32(&c);
    const int T = c.T, K = c.mc.top_k, D = c.D;
    float *out = xcalloc((size_t)T * D, sizeof(float)), *prob = xcalloc((size_t)T * K, sizeof(float)),
          *gate = xcalloc((size_t)T * K, sizeof(float)), *null_mass = xcalloc((size_t)T, sizeof(float)),
          *lse = xcalloc((size_t)T, sizeof(float));
    uint8_t *n_real = xcalloc((size_t)T, 1);
    int16_t *slot = xcalloc((size_t)T * K, sizeof(int16_t));
    const nm_routing r = {n_real, slot, prob, gate, null_mass, lse};
    const int sh = s->Hs > 0;
    const nm_moe_weights w = {c.fv[P_ROUTER], c.fv[P_GATE], c.fv[P_UP], c.fv[P_DOWN], sh ? c.fv[P_SH_GATE] : NULL,
                              sh ? c.fv[P_SH_UP] : NULL, sh ? c.fv[P_SH_DOWN] : NULL};
    nm_moe_workspace ws = {0};
    nm_error err;
    ck_assert_int_eq(nm_moe_forward(out, c.fv[P_Y], &w, &c.mc, T, D, &ws, &r, &err), NM_OK);
    ck_assert_msg(memcmp(n_real, c.c32.n_real, (size_t)T) == 0 && memcmp(slot, c.c32.slot, (size_t)T * K * 2) == 0,
                  "%s: training and inference route differently", c.name);
    long real = 0, nulls = 0;
    for (int t = 0; t < T; t++) real += n_real[t], nulls += n_real[t] == 0;
    ck_assert_int_eq(c.c32.real_slots, real);
    const double e_logits = maxrel_ff(c.c32.logits, ws.logits, (size_t)T * (s->N + 1)),
                 e_prob = maxrel_ff(c.c32.prob, prob, (size_t)T * K), e_gate = maxrel_ff(c.c32.gate, gate, (size_t)T * K),
                 e_lse = maxrel_ff(c.c32.lse, lse, (size_t)T), e_out = maxrel_ff(c.fout, out, (size_t)T * D);
    printf("grad_moe %-12s vs nm_moe_forward (%ld real slots, %ld all-null tokens): logits %.2e prob %.2e gate %.2e "
           "lse %.2e out %.2e\n", c.name, real, nulls, e_logits, e_prob, e_gate, e_lse, e_out);
    ck_assert_msg(e_logits <= 1e-5 && e_prob <= 1e-5 && e_gate <= 1e-5 && e_lse <= 1e-5 && e_out <= 1e-5,
                  "%s: training forward differs from inference", c.name);
    nm_moe_workspace_free(&ws);
    free(out), free(prob), free(gate), free(null_mass), free(lse), free(n_real), free(slot);
    case_free(&c);
}
END_TEST

// ---------------------------------------------------------------------------------------------
// Deterministic: bit-identical outputs and gradients across runs, thread counts and a cache
// reused after a bigger call; and float32 still agrees with float64 at this size (where the
// per-token loops run in parallel).

typedef struct {
    float *out, *g[P_COUNT];
    double l_bal, l_z;
} f32_result;

static void take(f32_result *r, const mcase *c) {
    r->out = xcalloc((size_t)c->T * c->D, sizeof(float));
    memcpy(r->out, c->fout, (size_t)c->T * c->D * sizeof(float));
    for (int i = 0; i < P_COUNT; i++) {
        r->g[i] = xcalloc(c->n[i], sizeof(float));
        memcpy(r->g[i], c->fg[i], c->n[i] * sizeof(float));
    }
    r->l_bal = c->c32.l_bal, r->l_z = c->c32.l_z;
}

static void same(const f32_result *a, const mcase *c, const char *what) {
    ck_assert_msg(memcmp(a->out, c->fout, (size_t)c->T * c->D * sizeof(float)) == 0, "%s: out differs %s", c->name, what);
    for (int i = 0; i < P_COUNT; i++)
        ck_assert_msg(memcmp(a->g[i], c->fg[i], c->n[i] * sizeof(float)) == 0, "%s: d%s differs %s", c->name, P_NAME[i],
                      what);
    ck_assert_msg(a->l_bal == c->c32.l_bal && a->l_z == c->c32.l_z, "%s: losses differ %s", c->name, what);
}

static void drop(f32_result *r) {
    free(r->out);
    for (int i = 0; i < P_COUNT; i++) free(r->g[i]);
}

START_TEST(test_deterministic) {
    static const spec big[] = {{"det-zero", 8, 8, 4, 24, 16, NM_NULL_ZERO, 400, 48, 3001},
                               {"det-copy", 8, 4, 3, 24, 0, NM_NULL_COPY, 400, 48, 3002}};
    const spec *s = &big[_i];
    mcase c;
    case_init(&c, s);
    ck_assert((size_t)c.T * c.D >= 16384); // the per-token loops run in parallel
    draw_acceptable(&c, s->seed, F32_MARGIN, 0);
    grad32(&c);
    f32_result first;
    take(&first, &c);
    grad32(&c);
    same(&first, &c, "between two runs");
    const int nt = omp_get_max_threads();
    omp_set_num_threads(1);
    grad32(&c);
    omp_set_num_threads(nt > 1 ? nt : 2);
    same(&first, &c, "between 1 and several threads");
    // a cache grown by a bigger call (other T, other config) and then reused
    nm_moe_cache_free_f32(&c.c32);
    {
        mcase b;
        spec sb = *s;
        sb.T = 2 * s->T, sb.K = s->K - 1, sb.name = "det-grow";
        case_init(&b, &sb);
        draw(&b, s->seed + 17);
        forward32(&b);
        c.c32 = b.c32; // hand the grown cache over
        memset(&b.c32, 0, sizeof b.c32);
        case_free(&b);
    }
    grad32(&c);
    same(&first, &c, "with a reused cache");
    omp_set_num_threads(nt);
    grad64(&c);
    double worst = normrel_f32(c.fout, c.out, (size_t)c.T * c.D);
    for (int i = 0; i < P_COUNT; i++)
        if (present(&c, i)) worst = fmax(worst, normrel_f32(c.fg[i], c.g[i], c.n[i]));
    printf("grad_moe %-12s bit-identical: 2 runs, 1 vs %d threads, reused cache (%zu priv bytes); f32 vs f64 %.2e\n",
           c.name, nt > 1 ? nt : 2, c.c32.priv_bytes, worst);
    ck_assert_msg(worst <= F32_TOL, "%s: float32 differs from float64 by %.3e", c.name, worst);
    drop(&first);
    case_free(&c);
}
END_TEST

// ---------------------------------------------------------------------------------------------
// Hand-worked losses. The router is the identity (D = N+1) so that y is the logits.

typedef struct {
    nm_moe_cache_f64 c64;
    nm_moe_cache_f32 c32;
} hand;

// Forward of T tokens with logits z (T, N+1) in both precisions; the f32 losses must match.
static void hand_forward(hand *h, int N, int M, int K, nm_null_kind kind, int T, const double *z) {
    const int D = N + 1, H = 2;
    nm_moe_config mc = {.num_experts = N, .null_copies = M, .top_k = K, .expert_hidden = H, .null_kind = kind};
    double *y = xcalloc((size_t)T * D, sizeof(double)), *wr = xcalloc((size_t)D * D, sizeof(double)),
           *we = xcalloc((size_t)N * H * D, sizeof(double)), *out = xcalloc((size_t)T * D, sizeof(double));
    float *fy = xcalloc((size_t)T * D, sizeof(float)), *fwr = xcalloc((size_t)D * D, sizeof(float)),
          *fwe = xcalloc((size_t)N * H * D, sizeof(float)), *fout = xcalloc((size_t)T * D, sizeof(float));
    for (int i = 0; i < D; i++) wr[(size_t)i * D + i] = fwr[(size_t)i * D + i] = 1.0f;
    for (size_t j = 0; j < (size_t)T * D; j++) y[j] = fy[j] = (float)z[j]; // the values here are floats exactly
    for (size_t j = 0; j < (size_t)N * H * D; j++) we[j] = fwe[j] = 0.25f * (float)((j % 7) - 3); // any experts
    nm_moe_params_f64 w = {wr, we, we, we, NULL, NULL, NULL};
    nm_moe_params_f32 fw = {fwr, fwe, fwe, fwe, NULL, NULL, NULL};
    nm_error err;
    ck_assert_int_eq(nm_moe_train_forward_f64(out, &h->c64, y, &w, &mc, T, D, &err), NM_OK);
    ck_assert_int_eq(nm_moe_train_forward_f32(fout, &h->c32, fy, &fw, &mc, T, D, &err), NM_OK);
    ck_assert_msg(fabs(h->c32.l_bal - h->c64.l_bal) <= 1e-6 * h->c64.l_bal &&
                      fabs(h->c32.l_z - h->c64.l_z) <= 1e-6 * h->c64.l_z,
                  "f32 losses %.9g %.9g vs f64 %.9g %.9g", h->c32.l_bal, h->c32.l_z, h->c64.l_bal, h->c64.l_z);
    free(y), free(wr), free(we), free(out), free(fy), free(fwr), free(fwe), free(fout);
}

static void hand_free(hand *h) {
    nm_moe_cache_free_f64(&h->c64);
    nm_moe_cache_free_f32(&h->c32);
}

#define NEAR(a, b, tol) ck_assert_msg(fabs((a) - (b)) <= (tol) * fmax(1.0, fabs(b)), "%s = %.15g, want %.15g", #a, \
                                      (double)(a), (double)(b))

START_TEST(test_losses_by_hand) {
    const double e = exp(1.0);
    hand h = {0};
    // 1. Exactly uniform routing, M = 0: token t's logit 1 at expert t, 0 elsewhere, K = 1.
    //    Each expert is chosen once (f_i = 1/4) and P_i = (e + 3)/(e + 3)/4 = 1/4: L_bal = 1.
    //    Every token's lse = log(e + 3). The null column (7) must be ignored: M = 0.
    {
        double z[4 * 5] = {0};
        for (int t = 0; t < 4; t++) z[t * 5 + t] = 1.0, z[t * 5 + 4] = 7.0;
        hand_forward(&h, 4, 0, 1, NM_NULL_ZERO, 4, z);
        NEAR(h.c64.l_bal, 1.0, 1e-14);
        NEAR(h.c64.l_z, pow(log(e + 3), 2), 1e-14);
        for (int t = 0; t < 4; t++) ck_assert(h.c64.slot[t] == t && h.c64.n_real[t] == 1 && h.c64.gate[t] == 1.0);
    }
    // 2. Uniform p with nulls: N = 2, M = 2, every logit 0.75 -> p = 1/4, L_bal = 1 whatever f is;
    //    lse = 0.75 + log 4. Ties go to the reals (lower slots): n_real = 2 of K = 3.
    {
        double z[3 * 3];
        for (int j = 0; j < 9; j++) z[j] = 0.75; // a float exactly
        hand_forward(&h, 2, 2, 3, NM_NULL_ZERO, 3, z);
        NEAR(h.c64.l_bal, 1.0, 1e-14);
        NEAR(h.c64.l_z, pow(0.75 + log(4.0), 2), 1e-14);
        for (int t = 0; t < 3; t++) ck_assert(h.c64.n_real[t] == 2 && h.c64.slot[3 * t + 2] == -1);
    }
    // 3. N = 2, M = 2, K = 2. Token 0: z~ = [2, 0, 1, 1] selects expert 0 and a null copy;
    //    token 1: z~ = [0, 0, 3, 3] selects two null copies (n_real = 0).
    //    f = (1/4, 0) for the experts, 3/4 for the null copies together;
    //    S0 = e^2 + 1 + 2e, S1 = 2 + 2e^3; P_0 = (e^2/S0 + 1/S1)/2, P_copy = (e/S0 + e^3/S1)/2;
    //    L_bal = 4 (P_0/4 + 3/4 P_copy); L_z = (log^2 S0 + log^2 S1)/2.
    {
        const double z[2 * 3] = {2, 0, 1, 0, 0, 3};
        hand_forward(&h, 2, 2, 2, NM_NULL_ZERO, 2, z);
        const double S0 = e * e + 1 + 2 * e, S1 = 2 + 2 * e * e * e;
        const double P0 = (e * e / S0 + 1 / S1) / 2, Pc = (e / S0 + e * e * e / S1) / 2;
        NEAR(h.c64.l_bal, 4 * (P0 / 4 + 0.75 * Pc), 1e-14);
        NEAR(h.c64.l_z, (pow(log(S0), 2) + pow(log(S1), 2)) / 2, 1e-14);
        ck_assert(h.c64.n_real[0] == 1 && h.c64.n_real[1] == 0);
        ck_assert(h.c64.slot[0] == 0 && h.c64.slot[1] == -1 && h.c64.slot[2] == -1 && h.c64.slot[3] == -1);
        ck_assert(h.c64.gate[0] == 1.0 && h.c64.gate[1] == 0.0 && h.c64.gate[2] == 0.0);
        NEAR(h.c64.prob[1], e / S0, 1e-14);
        ck_assert_int_eq(h.c64.real_slots, 1);
    }
    // 4. M = 0, not uniform: N = 3, K = 2; z0 = (1, 0, -1), z1 = (0, 2, 1) (null column -3 and 5,
    //    ignored). Selections {0, 1} and {1, 2}: f = (1/4, 1/2, 1/4).
    {
        const double z[2 * 4] = {1, 0, -1, -3, 0, 2, 1, 5};
        hand_forward(&h, 3, 0, 2, NM_NULL_ZERO, 2, z);
        const double S0 = e + 1 + 1 / e, S1 = 1 + e * e + e;
        const double P[3] = {(e / S0 + 1 / S1) / 2, (1 / S0 + e * e / S1) / 2, (1 / e / S0 + e / S1) / 2};
        NEAR(h.c64.l_bal, 3 * (P[0] / 4 + P[1] / 2 + P[2] / 4), 1e-14);
        NEAR(h.c64.l_z, (pow(log(S0), 2) + pow(log(S1), 2)) / 2, 1e-14);
        NEAR(h.c64.gate[0], e / (e + 1), 1e-14); // softmax(1, 0)
        NEAR(h.c64.gate[2], e / (e + 1), 1e-14); // softmax(2, 1)
    }
    hand_free(&h);
}
END_TEST

// K = N+M: every slot is selected by every token, f_i = 1/K, so L_bal = (N+M)/K sum_i P_i = 1
// for any input and its gradient is exactly zero; L_z alone then reaches the router.
START_TEST(test_all_slots_balance_is_constant) {
    mcase c;
    case_init(&c, &FD_CASES[3]);
    ck_assert_int_eq(c.mc.top_k, c.mc.num_experts + c.mc.null_copies);
    draw(&c, 77);
    memset(c.wout, 0, (size_t)c.T * c.D * sizeof(double));
    c.w_bal = 1.0, c.w_z = 0.0;
    grad64(&c);
    NEAR(c.c64.l_bal, 1.0, 1e-14);
    for (int i = 0; i < P_COUNT; i++)
        for (size_t j = 0; present(&c, i) && j < c.n[i]; j++)
            ck_assert_msg(fabs(c.g[i][j]) <= 1e-15, "d%s[%zu] = %g", P_NAME[i], j, c.g[i][j]);
    case_free(&c);
}
END_TEST

// ---------------------------------------------------------------------------------------------
// The float64 path against the independent PyTorch reference (tests/gen_moe_grad_fixtures.py)

static const char *const TORCH_CASES[] = {"zero_shared", "m0", "copy"};
#define N_TORCH_CASES ((int)(sizeof TORCH_CASES / sizeof TORCH_CASES[0]))
#define TORCH_TOL 1e-10

static const nm_st_tensor *fixture_tensor(const nm_safetensors *st, const char *name, nm_dtype dt, size_t numel) {
    const nm_st_tensor *t = nm_safetensors_find(st, name);
    ck_assert_msg(t != NULL, "fixture tensor %s missing (regenerate: /usr/bin/python3 tests/gen_moe_grad_fixtures.py "
                  "--out tests/fixtures)", name);
    ck_assert_msg(t->dtype == dt && t->numel == numel, "fixture tensor %s: dtype %s, %zu values; expected %s, %zu", name,
                  nm_dtype_name(t->dtype), t->numel, nm_dtype_name(dt), numel);
    return t;
}

static void fixture_f64(double *dst, const nm_safetensors *st, const char *name, size_t numel) {
    memcpy(dst, fixture_tensor(st, name, NM_DT_F64, numel)->data, numel * sizeof(double)); // little-endian host
}

// max |a - b| / max |b| over a tensor, and the same elementwise with a floor of 1e-3 max |b|
static double fixture_err(const double *a, const double *b, size_t n) {
    double m = 0.0, e = 0.0;
    for (size_t j = 0; j < n; j++) m = fmax(m, fabs(b[j]));
    for (size_t j = 0; j < n; j++) {
        ck_assert(isfinite(a[j]));
        e = fmax(e, fabs(a[j] - b[j]) / fmax(fabs(b[j]), 1e-3 * m));
    }
    return m > 0 ? e : 0.0;
}

START_TEST(test_torch_fixture) {
    char path[1024];
    snprintf(path, sizeof path, "%s/fixtures/moe_grad_%s.safetensors", nm_test_dir(), TORCH_CASES[_i]);
    nm_safetensors st;
    nm_error err;
    ck_assert_msg(nm_safetensors_open(&st, path, &err) == NM_OK, "%s", err.msg);
    int32_t cfg[8];
    ck_assert_int_eq(nm_st_tensor_to_i32(cfg, fixture_tensor(&st, "config", NM_DT_I32, 8), &err), NM_OK);
    const spec s = {TORCH_CASES[_i], cfg[2], cfg[3], cfg[4], cfg[5], cfg[6], cfg[7] ? NM_NULL_COPY : NM_NULL_ZERO,
                    cfg[0], cfg[1], 0};
    mcase c;
    case_init(&c, &s);
    double lw[2];
    fixture_f64(lw, &st, "loss_weights", 2);
    c.w_bal = lw[0], c.w_z = lw[1];
    for (int i = 0; i < P_COUNT; i++)
        if (present(&c, i)) fixture_f64(c.v[i], &st, P_NAME[i], c.n[i]);
    fixture_f64(c.wout, &st, "w_out", (size_t)c.T * c.D);
    grad64(&c);

    const int T = c.T, K = c.mc.top_k;
    int32_t *n_real = xcalloc((size_t)T, sizeof(int32_t)), *slot = xcalloc((size_t)T * K, sizeof(int32_t));
    ck_assert_int_eq(nm_st_tensor_to_i32(n_real, fixture_tensor(&st, "n_real", NM_DT_I32, (size_t)T), &err), NM_OK);
    ck_assert_int_eq(nm_st_tensor_to_i32(slot, fixture_tensor(&st, "slot", NM_DT_I32, (size_t)T * K), &err), NM_OK);
    for (int t = 0; t < T; t++) {
        ck_assert_msg(c.c64.n_real[t] == n_real[t], "%s: token %d n_real %d, reference %d", c.name, t, c.c64.n_real[t],
                      n_real[t]);
        for (int k = 0; k < K; k++)
            ck_assert_msg(c.c64.slot[t * K + k] == slot[t * K + k], "%s: token %d slot %d is %d, reference %d", c.name,
                          t, k, c.c64.slot[t * K + k], slot[t * K + k]);
    }
    typedef struct { const char *name; const double *got; size_t n; } compared;
    compared cmp[P_COUNT + 6] = {
        {"out", c.out, (size_t)T * c.D}, {"l_bal", &c.c64.l_bal, 1}, {"l_z", &c.c64.l_z, 1},
        {"route_prob", c.c64.prob, (size_t)T * K}, {"route_gate", c.c64.gate, (size_t)T * K},
        {"route_lse", c.c64.lse, (size_t)T}};
    int n_cmp = 6;
    char names[P_COUNT][16];
    for (int i = 0; i < P_COUNT; i++)
        if (present(&c, i)) {
            snprintf(names[i], sizeof names[i], "d_%s", P_NAME[i]);
            cmp[n_cmp++] = (compared){names[i], c.g[i], c.n[i]};
        }
    double worst = 0.0;
    for (int j = 0; j < n_cmp; j++) {
        double *want = xcalloc(cmp[j].n, sizeof(double));
        fixture_f64(want, &st, cmp[j].name, cmp[j].n);
        const double e = fixture_err(cmp[j].got, want, cmp[j].n);
        ck_assert_msg(e <= TORCH_TOL, "%s: %s differs from PyTorch by %.3e", c.name, cmp[j].name, e);
        worst = fmax(worst, e);
        free(want);
    }
    printf("grad_moe torch:%-8s %d tensors vs PyTorch float64: routing identical, worst rel err %.2e\n", c.name, n_cmp,
           worst);
    free(n_real), free(slot);
    case_free(&c);
    nm_safetensors_close(&st);
}
END_TEST

NM_TEST_SUITE(grad_moe) {
    Suite *s = suite_create("grad_moe");
    TCase *tc = tcase_create("moe");
    tcase_set_timeout(tc, 300);
    tcase_add_loop_test(tc, test_fd, 0, N_FD_CASES);
    tcase_add_test(tc, test_fd_losses_alone);
    tcase_add_loop_test(tc, test_matches_inference, 0, N_BIG_CASES);
    tcase_add_loop_test(tc, test_deterministic, 0, 2);
    tcase_add_test(tc, test_losses_by_hand);
    tcase_add_test(tc, test_all_slots_balance_is_constant);
    tcase_add_loop_test(tc, test_torch_fixture, 0, N_TORCH_CASES);
    suite_add_tcase(s, tc);
    return s;
}
