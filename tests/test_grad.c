// test_grad.c — gradient checks of the dense training ops (nm_train_ops.h).
//
// Each case is an op (or a composition of ops) with random inputs (fresh seeded normals, never
// zeros), outputs `out` and a scalar loss L = sum(w * out) with random w (for cross-entropy,
// whose output is the loss itself, L = w * loss). Three checks per case:
//
// 1. float64 analytic gradient vs finite differences of L, for every element of every input
//    and parameter. The difference is the 5-point central stencil
//        (-L(x+2h) + 8 L(x+h) - 8 L(x-h) + L(x-2h)) / 12h,   h = 1e-3
//    whose truncation error is h^4/30 * L''''' (~1e-13 here) and whose rounding error is about
//    1.5 eps |L| / h (~1e-12): far below what second-order differences at h = 1e-6 reach
//    (~1e-9). Metric, per element: |a - f| / max(|a|, |f|, noise / 1e-6), where
//        noise = 16 eps sum_j |w_j out_j| / h
//    bounds the rounding error of the difference itself (1.5 eps |L| / h for the stencil, with
//    a factor 10 of room for the rounding inside the forward). That is the relative error
//    wherever the difference can resolve it; a gradient too small for that (exact zeros, like
//    dq of the first token, which sees one key) is held to |a - f| <= noise instead of a
//    meaningless ratio of rounding noises. Bar: <= 1e-6.
// 2. float32 forward and backward vs float64 on the same (rounded) inputs: max |a32 - a64| /
//    max |a64| over each tensor (norm-relative: float32 cannot give elementwise relative
//    accuracy on elements that cancel). Bar: <= 1e-4.
// 3. The f32 training forwards compute what inference computes: rmsnorm/rope/swiglu vs the
//    nm_ops.c ops, and a whole one-layer model (embeddings, patches, attention block, final norm,
//    LM head) vs nm_engine_forward's logits, the MoE silenced by zero down projections.
#include <float.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nm_engine.h"
#include "nm_model.h"
#include "nm_ops.h"
#include "nm_train_ops.h"
#include "test_util.h"

#define FD_H 1e-3
#define FD_TOL 1e-6
#define F32_TOL 1e-4

// A tensor of a case in both precisions: v/fv values, g/fg gradients (for an output: dL/dout).
typedef enum { IN, PARAM, DATA, OUT, TMP } role;
typedef struct {
    const char *name;
    role kind; // gradient-checked: IN, an activation (gradient =), PARAM, a parameter (+=);
               // DATA: input without gradient; OUT: output (g = dL/dout); TMP: saved/scratch
    size_t n;
    double *v, *g;
    float *fv, *fg;
} tensor;

static int checked(const tensor *t) { return t->kind == IN || t->kind == PARAM; }

enum { MAX_TENSORS = 40, MAX_T = 16 };
typedef struct gcase gcase;
struct gcase {
    const char *name;
    int T, D, H, V, nh, nkv, hd, pos0, S, p, n_patch;
    double eps;
    int32_t ids[MAX_T], targets[MAX_T], patch_tok[MAX_T], patch_idx[MAX_T];
    tensor t[MAX_TENSORS];
    int n_t;
    double loss; // the cross-entropy value where the case has one
    void (*run)(gcase *c, int f32, int backward);
};

static int add(gcase *c, const char *name, role kind, size_t n) {
    ck_assert_int_lt(c->n_t, MAX_TENSORS);
    tensor *t = &c->t[c->n_t];
    *t = (tensor){name, kind, n, calloc(n, sizeof(double)), calloc(n, sizeof(double)), calloc(n, sizeof(float)),
                  calloc(n, sizeof(float))};
    ck_assert(t->v && t->g && t->fv && t->fg);
    return c->n_t++;
}

static void case_free(gcase *c) {
    for (int i = 0; i < c->n_t; i++) {
        free(c->t[i].v);
        free(c->t[i].g);
        free(c->t[i].fv);
        free(c->t[i].fg);
    }
}

// Inputs and output weights: seeded normals (std 1).
static void fill_random(gcase *c, uint64_t seed) {
    nm_test_rng r = {seed};
    for (int i = 0; i < c->n_t; i++) {
        tensor *t = &c->t[i];
        double *dst = t->kind == OUT ? t->g : t->kind == TMP ? NULL : t->v;
        if (dst)
            for (size_t j = 0; j < t->n; j++) dst[j] = nm_test_rng_normal(&r);
    }
}

static double loss64(gcase *c) {
    c->run(c, 0, 0);
    double L = 0.0;
    for (int i = 0; i < c->n_t; i++)
        if (c->t[i].kind == OUT)
            for (size_t j = 0; j < c->t[i].n; j++) L += c->t[i].g[j] * c->t[i].v[j];
    return L;
}

// f64 analytic gradients into the inputs' g (parameter gradients start at zero).
static void grad64(gcase *c) {
    for (int i = 0; i < c->n_t; i++)
        if (c->t[i].kind != OUT) memset(c->t[i].g, 0, c->t[i].n * sizeof(double));
    c->run(c, 0, 0);
    c->run(c, 0, 1);
}

// Check 1: returns the worst error over all inputs; prints one line per tensor.
static double check_fd(gcase *c) {
    grad64(c);
    double Lmag = 0.0; // sum |w out| at the base point (grad64 ran the forward there)
    for (int i = 0; i < c->n_t; i++)
        if (c->t[i].kind == OUT)
            for (size_t j = 0; j < c->t[i].n; j++) Lmag += fabs(c->t[i].g[j] * c->t[i].v[j]);
    const double noise = 16 * DBL_EPSILON * Lmag / FD_H, floor = noise / FD_TOL;
    double worst = 0.0;
    for (int i = 0; i < c->n_t; i++) {
        tensor *t = &c->t[i];
        if (!checked(t)) continue;
        double *a = malloc(t->n * sizeof *a), *f = malloc(t->n * sizeof *f);
        memcpy(a, t->g, t->n * sizeof *a);
        double fmaxabs = 0.0;
        for (size_t j = 0; j < t->n; j++) {
            const double x0 = t->v[j];
            double l[4];
            const double off[4] = {2, 1, -1, -2};
            for (int s = 0; s < 4; s++) {
                t->v[j] = x0 + off[s] * FD_H;
                l[s] = loss64(c);
            }
            t->v[j] = x0;
            f[j] = (-l[0] + 8 * l[1] - 8 * l[2] + l[3]) / (12 * FD_H);
            fmaxabs = fmax(fmaxabs, fabs(f[j]));
        }
        double err = 0.0;
        size_t at = 0;
        for (size_t j = 0; j < t->n; j++) {
            double e = fabs(a[j] - f[j]) / fmax(fmax(fabs(a[j]), fabs(f[j])), floor);
            ck_assert_msg(isfinite(a[j]), "%s: d%s[%zu] = %g", c->name, t->name, j, a[j]);
            if (e > err) err = e, at = j;
        }
        printf("grad %-10s d%-9s n=%-4zu max|g|=%-9.3g floor %.1e  fd rel err %.2e (at %zu: %.12g vs %.12g)\n", c->name,
               t->name, t->n, fmaxabs, floor, err, at, a[at], f[at]);
        ck_assert_msg(fmaxabs > 1e-3, "%s: d%s is trivially small (%g)", c->name, t->name, fmaxabs);
        ck_assert_msg(err <= FD_TOL, "%s: d%s differs from finite differences by %.3e at %zu (%.12g vs %.12g)",
                      c->name, t->name, err, at, a[at], f[at]);
        worst = fmax(worst, err);
        free(a);
        free(f);
    }
    return worst;
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

// Check 2: float32 forward + backward vs float64 on the float32-rounded inputs.
static double check_f32(gcase *c) {
    for (int i = 0; i < c->n_t; i++) { // round the inputs, so both precisions see the same values
        tensor *t = &c->t[i];
        for (size_t j = 0; j < t->n; j++) {
            if (checked(t) || t->kind == DATA) t->v[j] = t->fv[j] = (float)t->v[j];
            if (t->kind == OUT) t->g[j] = t->fg[j] = (float)t->g[j];
            if (t->kind != OUT) t->fg[j] = 0.0f;
        }
    }
    grad64(c);
    const double loss_ref = c->loss;
    c->run(c, 1, 0);
    const double loss32 = c->loss;
    c->run(c, 1, 1);
    double worst = 0.0;
    for (int i = 0; i < c->n_t; i++) {
        tensor *t = &c->t[i];
        double e;
        if (t->kind == OUT) e = normrel_f32(t->fv, t->v, t->n);
        else if (checked(t)) e = normrel_f32(t->fg, t->g, t->n);
        else continue;
        printf("f32  %-10s %s%-9s f32 vs f64 %.2e\n", c->name, checked(t) ? "d" : "", t->name, e);
        ck_assert_msg(e <= F32_TOL, "%s: float32 %s%s differs from float64 by %.3e", c->name,
                      checked(t) ? "d" : "", t->name, e);
        worst = fmax(worst, e);
    }
    ck_assert_msg(fabs(loss32 - loss_ref) <= F32_TOL * fmax(1.0, fabs(loss_ref)), "%s: loss %g vs %g", c->name, loss32,
                  loss_ref);
    return worst;
}

// The gradient rule: a backward adds to parameter gradients (+=) and writes activation
// gradients (=), whatever they held (NaN here), scratch included.
static void check_rule(gcase *c) {
    grad64(c);
    double *ref[MAX_TENSORS] = {0};
    for (int i = 0; i < c->n_t; i++) {
        tensor *t = &c->t[i];
        if (t->kind == OUT || t->kind == DATA) continue;
        if (checked(t)) ref[i] = malloc(t->n * sizeof(double)), memcpy(ref[i], t->g, t->n * sizeof(double));
        for (size_t j = 0; j < t->n; j++) t->g[j] = t->kind == PARAM ? 0.5 : NAN;
    }
    c->run(c, 0, 0);
    c->run(c, 0, 1);
    for (int i = 0; i < c->n_t; i++) {
        if (!ref[i]) continue;
        tensor *t = &c->t[i];
        for (size_t j = 0; j < t->n; j++) {
            double want = t->kind == PARAM ? 0.5 + ref[i][j] : ref[i][j];
            ck_assert_msg(fabs(t->g[j] - want) <= 1e-12 * fmax(1.0, fabs(want)), "%s: d%s[%zu] = %g, want %g (%s)",
                          c->name, t->name, j, t->g[j], want, t->kind == PARAM ? "+=" : "=");
        }
        free(ref[i]);
    }
}

static void check_case(gcase *c, uint64_t seed) {
    fill_random(c, seed);
    check_rule(c);
    double e1 = check_fd(c), e2 = check_f32(c);
    printf("grad %-10s worst: fd %.2e, f32 %.2e\n", c->name, e1, e2);
    case_free(c);
}

// ---------------------------------------------------------------------------------------------
// Single ops. Shapes: T = 5 tokens, D = 6, H = 7, nh = 4, nkv = 2, hd = 4, V = 9.

#define T_(i) (&c->t[i])

static void run_linear(gcase *c, int f32, int bwd) {
    tensor *x = T_(0), *w = T_(1), *b = T_(2), *out = T_(3);
    if (f32) {
        if (!bwd) nm_linear_forward_f32(out->fv, x->fv, w->fv, b->fv, c->T, c->D, c->H);
        else nm_linear_backward_f32(x->fg, w->fg, b->fg, out->fg, x->fv, w->fv, c->T, c->D, c->H);
    } else {
        if (!bwd) nm_linear_forward_f64(out->v, x->v, w->v, b->v, c->T, c->D, c->H);
        else nm_linear_backward_f64(x->g, w->g, b->g, out->g, x->v, w->v, c->T, c->D, c->H);
    }
}

START_TEST(test_linear) {
    gcase c = {.name = "linear", .T = 5, .D = 6, .H = 7, .run = run_linear};
    add(&c, "x", IN, 5 * 6);
    add(&c, "W", PARAM, 7 * 6);
    add(&c, "b", PARAM, 7);
    add(&c, "out", OUT, 5 * 7);
    check_case(&c, 101);
}
END_TEST

static void run_embedding(gcase *c, int f32, int bwd) {
    tensor *E = T_(0), *out = T_(1);
    if (f32) {
        if (!bwd) {
            memset(out->fv, 0, out->n * sizeof(float)); // rows of patches (id -1) stay zero
            nm_embedding_forward_f32(out->fv, c->ids, E->fv, c->T, c->D);
        } else nm_embedding_backward_f32(E->fg, out->fg, c->ids, c->T, c->D);
    } else {
        if (!bwd) {
            memset(out->v, 0, out->n * sizeof(double));
            nm_embedding_forward_f64(out->v, c->ids, E->v, c->T, c->D);
        } else nm_embedding_backward_f64(E->g, out->g, c->ids, c->T, c->D);
    }
}

START_TEST(test_embedding) {
    gcase c = {.name = "embedding", .T = 6, .D = 6, .V = 5, .run = run_embedding,
               .ids = {3, 0, -1, 3, 4, 1}}; // a repeated id accumulates; -1 is skipped
    add(&c, "E", PARAM, 5 * 6);
    add(&c, "out", OUT, 6 * 6);
    check_case(&c, 102);
}
END_TEST

static void run_rmsnorm(gcase *c, int f32, int bwd) {
    tensor *x = T_(0), *w = T_(1), *out = T_(2), *rstd = T_(3);
    if (f32) {
        if (!bwd) nm_rmsnorm_forward_f32(out->fv, rstd->fv, x->fv, w->fv, c->T, c->D, c->eps);
        else nm_rmsnorm_backward_f32(x->fg, w->fg, out->fg, x->fv, w->fv, rstd->fv, c->T, c->D);
    } else {
        if (!bwd) nm_rmsnorm_forward_f64(out->v, rstd->v, x->v, w->v, c->T, c->D, c->eps);
        else nm_rmsnorm_backward_f64(x->g, w->g, out->g, x->v, w->v, rstd->v, c->T, c->D);
    }
}

START_TEST(test_rmsnorm) {
    gcase c = {.name = "rmsnorm", .T = 5, .D = 6, .eps = 1e-6, .run = run_rmsnorm};
    add(&c, "x", IN, 5 * 6);
    add(&c, "w", PARAM, 6);
    add(&c, "out", OUT, 5 * 6);
    add(&c, "rstd", TMP, 5);
    check_case(&c, 103);
}
END_TEST

static void run_rope(gcase *c, int f32, int bwd) {
    tensor *x = T_(0), *out = T_(1), *fr = T_(2);
    const int nh = c->nh, hd = c->hd;
    if (f32) {
        nm_rope_freqs_f32(fr->fv, hd, 10000.0);
        if (!bwd) nm_rope_forward_f32(out->fv, x->fv, c->T, nh, hd, c->pos0, fr->fv);
        else nm_rope_backward_f32(x->fg, out->fg, c->T, nh, hd, c->pos0, fr->fv);
    } else {
        nm_rope_freqs_f64(fr->v, hd, 10000.0);
        if (!bwd) nm_rope_forward_f64(out->v, x->v, c->T, nh, hd, c->pos0, fr->v);
        else nm_rope_backward_f64(x->g, out->g, c->T, nh, hd, c->pos0, fr->v);
    }
}

START_TEST(test_rope) {
    gcase c = {.name = "rope", .T = 5, .nh = 3, .hd = 8, .pos0 = 3, .run = run_rope};
    add(&c, "x", IN, 5 * 3 * 8);
    add(&c, "out", OUT, 5 * 3 * 8);
    add(&c, "inv_freq", TMP, 4);
    check_case(&c, 104);
}
END_TEST

static void run_swiglu(gcase *c, int f32, int bwd) {
    tensor *g = T_(0), *u = T_(1), *out = T_(2);
    if (f32) {
        if (!bwd) nm_swiglu_forward_f32(out->fv, g->fv, u->fv, out->n);
        else nm_swiglu_backward_f32(g->fg, u->fg, out->fg, g->fv, u->fv, out->n);
    } else {
        if (!bwd) nm_swiglu_forward_f64(out->v, g->v, u->v, out->n);
        else nm_swiglu_backward_f64(g->g, u->g, out->g, g->v, u->v, out->n);
    }
}

START_TEST(test_swiglu) {
    gcase c = {.name = "swiglu", .run = run_swiglu};
    add(&c, "g", IN, 5 * 7);
    add(&c, "u", IN, 5 * 7);
    add(&c, "out", OUT, 5 * 7);
    check_case(&c, 105);
}
END_TEST

static void run_attention(gcase *c, int f32, int bwd) {
    tensor *q = T_(0), *k = T_(1), *v = T_(2), *out = T_(3), *att = T_(4), *datt = T_(5);
    const int T = c->T, nh = c->nh, nkv = c->nkv, hd = c->hd;
    if (f32) {
        if (!bwd) nm_attention_forward_f32(out->fv, att->fv, q->fv, k->fv, v->fv, T, nh, nkv, hd);
        else nm_attention_backward_f32(q->fg, k->fg, v->fg, datt->fv, out->fg, q->fv, k->fv, v->fv, att->fv, T, nh, nkv, hd);
    } else {
        if (!bwd) nm_attention_forward_f64(out->v, att->v, q->v, k->v, v->v, T, nh, nkv, hd);
        else nm_attention_backward_f64(q->g, k->g, v->g, datt->v, out->g, q->v, k->v, v->v, att->v, T, nh, nkv, hd);
    }
}

static void attention_case(const char *name, int T, int nh, int nkv, int hd, uint64_t seed) {
    gcase c = {.name = name, .T = T, .nh = nh, .nkv = nkv, .hd = hd, .run = run_attention};
    add(&c, "q", IN, (size_t)T * nh * hd);
    add(&c, "k", IN, (size_t)T * nkv * hd);
    add(&c, "v", IN, (size_t)T * nkv * hd);
    add(&c, "out", OUT, (size_t)T * nh * hd);
    add(&c, "att", TMP, (size_t)nh * T * T);
    add(&c, "datt", TMP, (size_t)nh * T * T);
    check_case(&c, seed);
}

START_TEST(test_attention) {
    attention_case("attn-gqa", 5, 4, 2, 4, 106); // two query heads per kv head
    attention_case("attn-mha", 4, 2, 2, 6, 107);
    attention_case("attn-mqa", 6, 3, 1, 4, 108);
}
END_TEST

static void run_crossentropy(gcase *c, int f32, int bwd) {
    tensor *logits = T_(0), *loss = T_(1), *probs = T_(2);
    if (f32) {
        if (!bwd) loss->fv[0] = (float)(c->loss = nm_crossentropy_forward_f32(probs->fv, logits->fv, c->targets, c->T, c->V));
        else nm_crossentropy_backward_f32(logits->fg, probs->fv, c->targets, c->T, c->V, loss->fg[0]);
    } else {
        if (!bwd) loss->v[0] = c->loss = nm_crossentropy_forward_f64(probs->v, logits->v, c->targets, c->T, c->V);
        else nm_crossentropy_backward_f64(logits->g, probs->v, c->targets, c->T, c->V, loss->g[0]);
    }
}

START_TEST(test_crossentropy) {
    gcase c = {.name = "xent", .T = 6, .V = 9, .run = run_crossentropy, .targets = {-1, 4, 0, -1, 8, 4}};
    add(&c, "logits", IN, 6 * 9);
    add(&c, "loss", OUT, 1);
    add(&c, "probs", TMP, 6 * 9);
    fill_random(&c, 109);
    // rows without a target get no gradient; the loss is the mean over the counted rows
    grad64(&c);
    for (int j = 0; j < 9; j++) ck_assert(c.t[0].g[j] == 0.0 && c.t[0].g[3 * 9 + j] == 0.0);
    double ref = 0.0;
    for (int t = 0; t < 6; t++) {
        if (c.targets[t] < 0) continue;
        double s = 0.0;
        for (int j = 0; j < 9; j++) s += exp(c.t[0].v[t * 9 + j]);
        ref += log(s) - c.t[0].v[t * 9 + c.targets[t]];
    }
    ck_assert_msg(fabs(c.loss - ref / 4) < 1e-12, "loss %.15g vs %.15g", c.loss, ref / 4);
    check_case(&c, 109);
    // no counted token: loss 0, gradient 0
    double logits[2 * 3] = {1, 2, 3, 4, 5, 6}, probs[6], d[6];
    int32_t none[2] = {-1, -1};
    ck_assert(nm_crossentropy_forward_f64(probs, logits, none, 2, 3) == 0.0);
    nm_crossentropy_backward_f64(d, probs, none, 2, 3, 1.0);
    for (int j = 0; j < 6; j++) ck_assert(d[j] == 0.0);
}
END_TEST

// Above the size where attention splits its heads over threads: the threaded result equals the
// one-thread result bit for bit (heads and kv groups are independent work items), and f32
// still agrees with f64. The finite-difference cases above are too small to take that path.
START_TEST(test_attention_threads) {
    enum { T = 72, nh = 4, nkv = 2, hd = 16 };
    gcase c = {.name = "attn-big", .T = T, .nh = nh, .nkv = nkv, .hd = hd, .run = run_attention};
    ck_assert((size_t)T * T * hd >= 65536);
    add(&c, "q", IN, (size_t)T * nh * hd);
    add(&c, "k", IN, (size_t)T * nkv * hd);
    add(&c, "v", IN, (size_t)T * nkv * hd);
    add(&c, "out", OUT, (size_t)T * nh * hd);
    add(&c, "att", TMP, (size_t)nh * T * T);
    add(&c, "datt", TMP, (size_t)nh * T * T);
    fill_random(&c, 113);
    double *one[3];
    const int nt = omp_get_max_threads();
    omp_set_num_threads(1);
    grad64(&c);
    for (int i = 0; i < 3; i++) one[i] = malloc(c.t[i].n * sizeof(double)), memcpy(one[i], c.t[i].g, c.t[i].n * sizeof(double));
    omp_set_num_threads(nt > 1 ? nt : 2);
    grad64(&c);
    for (int i = 0; i < 3; i++) {
        ck_assert_msg(memcmp(one[i], c.t[i].g, c.t[i].n * sizeof(double)) == 0, "d%s depends on the thread count", c.t[i].name);
        free(one[i]);
    }
    omp_set_num_threads(nt);
    printf("grad attn-big   threads 1 vs %d: identical; f32 vs f64 %.2e\n", nt > 1 ? nt : 2, check_f32(&c));
    case_free(&c);
}
END_TEST

// ---------------------------------------------------------------------------------------------
// A whole one-layer model without its MoE, end to end:
//   x = embed(ids) | patch_embed(patch pixels) + pos_embed     (T, D)
//   h = x + o_proj(attention(rope(q_proj(xn)), rope(k_proj(xn)), v_proj(xn))),  xn = rmsnorm(x)
//   loss = crossentropy(lm_head(rmsnorm(h)), targets)
// Written once for both precisions (SFX: suffix, RT: real type, VAL/GRD: the value/gradient members).

enum {
    MD_E, MD_PW, MD_PB, MD_POS, MD_N1, MD_WQ, MD_WK, MD_WV, MD_WO, MD_NF, MD_HEAD, // PARAM
    MD_PIX, MD_FREQ,                                                    // DATA
    MD_LOSS,                                                           // OUT
    MD_X, MD_ROWS, MD_EMB, MD_RSTD1, MD_XN, MD_Q, MD_K, MD_V, MD_QR, MD_KR, MD_ATT, MD_AO, MD_H, MD_RSTDF, MD_HN, MD_LOGITS,
    MD_PROBS, MD_DTMP, MD_COUNT
};

#define MODEL_RUN(SFX, RT, VAL, GRD)                                                                                     \
    static void model_run##SFX(gcase *c, int bwd) {                                                                 \
        const int T = c->T, D = c->D, nh = c->nh, nkv = c->nkv, hd = c->hd, qd = nh * hd, kvd = nkv * hd;        \
        const int np = c->n_patch, pp = 3 * c->p * c->p, Vv = c->V;                                              \
        tensor *t = c->t;                                                                                         \
        if (!bwd) {                                                                                               \
            nm_rope_freqs##SFX(t[MD_FREQ].VAL, hd, 10000.0);                                                           \
            nm_embedding_forward##SFX(t[MD_X].VAL, c->ids, t[MD_E].VAL, T, D);                                            \
            if (np) {                                                                                             \
                nm_patch_gather##SFX(t[MD_ROWS].VAL, t[MD_PIX].VAL, c->patch_idx, np, c->S, c->p);                        \
                nm_linear_forward##SFX(t[MD_EMB].VAL, t[MD_ROWS].VAL, t[MD_PW].VAL, t[MD_PB].VAL, np, pp, D);                   \
                for (int r = 0; r < np; r++)                                                                      \
                    for (int i = 0; i < D; i++)                                                                   \
                        t[MD_X].VAL[(size_t)c->patch_tok[r] * D + i] =                                               \
                            t[MD_EMB].VAL[(size_t)r * D + i] + t[MD_POS].VAL[(size_t)c->patch_idx[r] * D + i];          \
            }                                                                                                     \
            nm_rmsnorm_forward##SFX(t[MD_XN].VAL, t[MD_RSTD1].VAL, t[MD_X].VAL, t[MD_N1].VAL, T, D, c->eps);                    \
            nm_linear_forward##SFX(t[MD_Q].VAL, t[MD_XN].VAL, t[MD_WQ].VAL, NULL, T, D, qd);                                 \
            nm_linear_forward##SFX(t[MD_K].VAL, t[MD_XN].VAL, t[MD_WK].VAL, NULL, T, D, kvd);                                \
            nm_linear_forward##SFX(t[MD_V].VAL, t[MD_XN].VAL, t[MD_WV].VAL, NULL, T, D, kvd);                                \
            nm_rope_forward##SFX(t[MD_QR].VAL, t[MD_Q].VAL, T, nh, hd, 0, t[MD_FREQ].VAL);                                   \
            nm_rope_forward##SFX(t[MD_KR].VAL, t[MD_K].VAL, T, nkv, hd, 0, t[MD_FREQ].VAL);                                  \
            nm_attention_forward##SFX(t[MD_AO].VAL, t[MD_ATT].VAL, t[MD_QR].VAL, t[MD_KR].VAL, t[MD_V].VAL, T, nh, nkv, hd);       \
            nm_linear_forward##SFX(t[MD_H].VAL, t[MD_AO].VAL, t[MD_WO].VAL, NULL, T, qd, D);                                 \
            for (int i = 0; i < T * D; i++) t[MD_H].VAL[i] += t[MD_X].VAL[i];                                           \
            nm_rmsnorm_forward##SFX(t[MD_HN].VAL, t[MD_RSTDF].VAL, t[MD_H].VAL, t[MD_NF].VAL, T, D, c->eps);                    \
            nm_linear_forward##SFX(t[MD_LOGITS].VAL, t[MD_HN].VAL, t[MD_HEAD].VAL, NULL, T, D, Vv);                          \
            c->loss = nm_crossentropy_forward##SFX(t[MD_PROBS].VAL, t[MD_LOGITS].VAL, c->targets, T, Vv);                 \
            t[MD_LOSS].VAL[0] = (RT)c->loss;                                                                          \
            return;                                                                                               \
        }                                                                                                         \
        nm_crossentropy_backward##SFX(t[MD_LOGITS].GRD, t[MD_PROBS].VAL, c->targets, T, Vv, t[MD_LOSS].GRD[0]);              \
        nm_linear_backward##SFX(t[MD_HN].GRD, t[MD_HEAD].GRD, NULL, t[MD_LOGITS].GRD, t[MD_HN].VAL, t[MD_HEAD].VAL, T, D, Vv);     \
        nm_rmsnorm_backward##SFX(t[MD_H].GRD, t[MD_NF].GRD, t[MD_HN].GRD, t[MD_H].VAL, t[MD_NF].VAL, t[MD_RSTDF].VAL, T, D);          \
        nm_linear_backward##SFX(t[MD_AO].GRD, t[MD_WO].GRD, NULL, t[MD_H].GRD, t[MD_AO].VAL, t[MD_WO].VAL, T, qd, D);              \
        nm_attention_backward##SFX(t[MD_QR].GRD, t[MD_KR].GRD, t[MD_V].GRD, t[MD_ATT].GRD, t[MD_AO].GRD, t[MD_QR].VAL, t[MD_KR].VAL,     \
                                 t[MD_V].VAL, t[MD_ATT].VAL, T, nh, nkv, hd);                                           \
        nm_rope_backward##SFX(t[MD_Q].GRD, t[MD_QR].GRD, T, nh, hd, 0, t[MD_FREQ].VAL);                                      \
        nm_rope_backward##SFX(t[MD_K].GRD, t[MD_KR].GRD, T, nkv, hd, 0, t[MD_FREQ].VAL);                                     \
        nm_linear_backward##SFX(t[MD_XN].GRD, t[MD_WQ].GRD, NULL, t[MD_Q].GRD, t[MD_XN].VAL, t[MD_WQ].VAL, T, D, qd);              \
        nm_linear_backward##SFX(t[MD_DTMP].GRD, t[MD_WK].GRD, NULL, t[MD_K].GRD, t[MD_XN].VAL, t[MD_WK].VAL, T, D, kvd);           \
        for (int i = 0; i < T * D; i++) t[MD_XN].GRD[i] += t[MD_DTMP].GRD[i];                                           \
        nm_linear_backward##SFX(t[MD_DTMP].GRD, t[MD_WV].GRD, NULL, t[MD_V].GRD, t[MD_XN].VAL, t[MD_WV].VAL, T, D, kvd);           \
        for (int i = 0; i < T * D; i++) t[MD_XN].GRD[i] += t[MD_DTMP].GRD[i];                                           \
        nm_rmsnorm_backward##SFX(t[MD_X].GRD, t[MD_N1].GRD, t[MD_XN].GRD, t[MD_X].VAL, t[MD_N1].VAL, t[MD_RSTD1].VAL, T, D);          \
        for (int i = 0; i < T * D; i++) t[MD_X].GRD[i] += t[MD_H].GRD[i]; /* residual */                                \
        nm_embedding_backward##SFX(t[MD_E].GRD, t[MD_X].GRD, c->ids, T, D);                                               \
        if (np) {                                                                                                 \
            for (int r = 0; r < np; r++)                                                                          \
                memcpy(t[MD_EMB].GRD + (size_t)r * D, t[MD_X].GRD + (size_t)c->patch_tok[r] * D, (size_t)D * sizeof(RT)); \
            nm_linear_backward##SFX(NULL, t[MD_PW].GRD, t[MD_PB].GRD, t[MD_EMB].GRD, t[MD_ROWS].VAL, t[MD_PW].VAL, np, pp, D);     \
            nm_embedding_backward##SFX(t[MD_POS].GRD, t[MD_EMB].GRD, c->patch_idx, np, D);                                \
        }                                                                                                         \
    }
MODEL_RUN(_f64, double, v, g)
MODEL_RUN(_f32, float, fv, fg)

static void run_model(gcase *c, int f32, int bwd) {
    if (f32) model_run_f32(c, bwd);
    else model_run_f64(c, bwd);
}

// ids: (T) with -1 for the patches, in order; targets: (T).
static void model_case(gcase *c, const char *name, int T, int D, int V, int nh, int nkv, int hd, int S, int p,
                       const int32_t *ids, const int32_t *targets) {
    *c = (gcase){.name = name, .T = T, .D = D, .V = V, .nh = nh, .nkv = nkv, .hd = hd, .S = S, .p = p, .eps = 1e-6,
                 .run = run_model};
    ck_assert_int_le(T, MAX_T);
    for (int t = 0; t < T; t++) {
        c->ids[t] = ids[t];
        c->targets[t] = targets[t];
        if (ids[t] < 0) {
            c->patch_tok[c->n_patch] = t;
            c->patch_idx[c->n_patch] = c->n_patch;
            c->n_patch++;
        }
    }
    const int qd = nh * hd, kvd = nkv * hd, pp = 3 * p * p, np = c->n_patch, grid = S / p;
    static const char *names[MD_COUNT] = {"E", "patch_w", "patch_b", "pos", "norm1", "Wq", "Wk", "Wv", "Wo", "normf",
                                         "lm_head", "pixels", "inv_freq", "loss", "x", "rows", "emb", "rstd1", "xn",
                                         "q", "k", "v", "qr", "kr", "att", "ao", "h", "rstdf", "hn", "logits",
                                         "probs", "dtmp"};
    const size_t sizes[MD_COUNT] = {
        [MD_E] = (size_t)V * D, [MD_PW] = (size_t)D * pp, [MD_PB] = D, [MD_POS] = (size_t)grid * grid * D, [MD_N1] = D,
        [MD_WQ] = (size_t)qd * D, [MD_WK] = (size_t)kvd * D, [MD_WV] = (size_t)kvd * D, [MD_WO] = (size_t)D * qd,
        [MD_NF] = D, [MD_HEAD] = (size_t)V * D, [MD_PIX] = (size_t)3 * S * S, [MD_FREQ] = hd / 2, [MD_LOSS] = 1,
        [MD_X] = (size_t)T * D, [MD_ROWS] = (size_t)(np ? np : 1) * pp, [MD_EMB] = (size_t)(np ? np : 1) * D,
        [MD_RSTD1] = T, [MD_XN] = (size_t)T * D, [MD_Q] = (size_t)T * qd, [MD_K] = (size_t)T * kvd,
        [MD_V] = (size_t)T * kvd, [MD_QR] = (size_t)T * qd, [MD_KR] = (size_t)T * kvd, [MD_ATT] = (size_t)nh * T * T,
        [MD_AO] = (size_t)T * qd, [MD_H] = (size_t)T * D, [MD_RSTDF] = T, [MD_HN] = (size_t)T * D,
        [MD_LOGITS] = (size_t)T * V, [MD_PROBS] = (size_t)T * V, [MD_DTMP] = (size_t)T * D};
    for (int i = 0; i < MD_COUNT; i++) {
        role k = i <= MD_HEAD ? PARAM : i <= MD_FREQ ? DATA : i == MD_LOSS ? OUT : TMP;
        add(c, names[i], k, sizes[i]);
    }
}

START_TEST(test_model) {
    // BOS, IMG_START, 4 patches, IMG_END, 3 text tokens; loss on the last 3 positions only
    const int32_t ids[10] = {7, 8, -1, -1, -1, -1, 9, 1, 2, 3};
    const int32_t targets[10] = {-1, -1, -1, -1, -1, -1, 1, 2, 3, 0};
    gcase c;
    model_case(&c, "model", 10, 6, 11, 4, 2, 4, 4, 2, ids, targets);
    check_case(&c, 110);
}
END_TEST

// ---------------------------------------------------------------------------------------------
// Check 3: training forwards == inference forwards.

static double maxrel_ff(const float *a, const float *b, size_t n) {
    double e = 0.0;
    for (size_t i = 0; i < n; i++) e = fmax(e, fabs((double)a[i] - b[i]) / fmax(1.0, fabs((double)b[i])));
    return e;
}

START_TEST(test_forward_matches_ops) {
    enum { T = 7, D = 20, nh = 3, hd = 8, N = T * nh * hd };
    nm_test_rng r = {111};
    float x[T * D], w[D], a[T * D], b[T * D], rstd[T];
    nm_test_fill_normal(&r, x, T * D, 1.0f);
    nm_test_fill_normal(&r, w, D, 1.0f);
    nm_rmsnorm_forward(a, x, w, T, D, 1e-6f);
    nm_rmsnorm_forward_f32(b, rstd, x, w, T, D, 1e-6f);
    double e_norm = maxrel_ff(b, a, T * D);

    float q[N], qa[N], qb[N], fr[hd / 2];
    nm_test_fill_normal(&r, q, N, 1.0f);
    nm_rope_freqs_f32(fr, hd, 10000.0);
    memcpy(qa, q, sizeof q);
    nm_rope_forward(qa, T, nh, hd, 5, fr);
    nm_rope_forward_f32(qb, q, T, nh, hd, 5, fr);
    double e_rope = maxrel_ff(qb, qa, N);

    float g[N], u[N], sa[N], sb[N];
    nm_test_fill_normal(&r, g, N, 2.0f);
    nm_test_fill_normal(&r, u, N, 1.0f);
    nm_swiglu_forward(sa, g, u, N);
    nm_swiglu_forward_f32(sb, g, u, N);
    double e_swiglu = maxrel_ff(sb, sa, N);
    printf("fwd  nm_ops vs train f32: rmsnorm %.2e rope %.2e swiglu %.2e\n", e_norm, e_rope, e_swiglu);
    ck_assert_msg(e_norm <= 1e-6 && e_rope <= 1e-6 && e_swiglu <= 1e-5, "rmsnorm %g rope %g swiglu %g", e_norm, e_rope,
                  e_swiglu);
}
END_TEST

// The engine on a one-layer model whose MoE outputs zero (down projections zeroed, no shared
// expert) computes exactly the model case: compare all logits, with an image.
START_TEST(test_forward_matches_engine) {
    nm_config cfg;
    nm_config_init_byte(&cfg);
    cfg.hidden_size = 24;
    cfg.num_layers = 1;
    cfg.num_heads = 4;
    cfg.num_kv_heads = 2;
    cfg.head_dim = 8;
    cfg.vocab_size = 262;
    cfg.max_positions = 64;
    cfg.moe = (nm_moe_config){.num_experts = 4, .null_copies = 4, .top_k = 2, .expert_hidden = 8,
                              .shared_expert_hidden = 0, .null_kind = NM_NULL_ZERO};
    cfg.has_vision = 1;
    cfg.image_size = 8;
    cfg.patch_size = 4;
    cfg.channels = 3;
    nm_model m;
    nm_error err;
    ck_assert_int_eq(nm_model_init_random(&m, &cfg, 21, &err), NM_OK);
    memset(m.layers[0].moe.down, 0, (size_t)4 * 24 * 8 * sizeof(float));
    nm_test_rng r = {112};
    nm_test_fill_normal(&r, m.patch_b, 24, 0.5f); // the init has a zero bias: make it count
    for (int i = 0; i < 24; i++) m.layers[0].attn_norm[i] = 1.0f + 0.3f * (float)nm_test_rng_normal(&r);

    enum { T = 12 };
    const int32_t ids[T] = {256, 258, -1, -1, -1, -1, 259, 'W', 'h', 'a', 't', '?'};
    int32_t targets[T], patch[T];
    for (int t = 0; t < T; t++) targets[t] = -1;
    gcase c;
    model_case(&c, "engine", T, 24, 262, 4, 2, 8, 8, 4, ids, targets);
    for (int t = 0, k = 0; t < T; t++) patch[t] = ids[t] < 0 ? c.patch_idx[k++] : -1;
    struct { int i; const float *src; } w[] = {{MD_E, m.embed}, {MD_PW, m.patch_w}, {MD_PB, m.patch_b},
                                              {MD_POS, m.pos_embed}, {MD_N1, m.layers[0].attn_norm},
                                              {MD_WQ, m.layers[0].wq}, {MD_WK, m.layers[0].wk}, {MD_WV, m.layers[0].wv},
                                              {MD_WO, m.layers[0].wo}, {MD_NF, m.norm}, {MD_HEAD, m.lm_head}};
    for (size_t i = 0; i < sizeof w / sizeof w[0]; i++) memcpy(c.t[w[i].i].fv, w[i].src, c.t[w[i].i].n * sizeof(float));
    float *pix = c.t[MD_PIX].fv;
    for (size_t i = 0; i < c.t[MD_PIX].n; i++) pix[i] = (float)(2 * nm_test_rng_uniform(&r) - 1);
    run_model(&c, 1, 0);

    float *logits = malloc((size_t)T * 262 * sizeof *logits);
    nm_engine *e;
    ck_assert_int_eq(nm_engine_create(&e, &m, T, &err), NM_OK);
    ck_assert_int_eq(nm_engine_forward(e, ids, patch, pix, T, logits, 1, NULL, &err), NM_OK);
    double d = maxrel_ff(c.t[MD_LOGITS].fv, logits, (size_t)T * 262);
    printf("fwd  engine logits vs train f32 model: %.2e\n", d);
    ck_assert_msg(d <= 1e-5, "engine and training forward differ by %g", d);
    nm_engine_free(e);
    free(logits);
    case_free(&c);
    nm_model_free(&m);
}
END_TEST

NM_TEST_SUITE(grad) {
    Suite *s = suite_create("grad");
    TCase *tc = tcase_create("ops");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_linear);
    tcase_add_test(tc, test_embedding);
    tcase_add_test(tc, test_rmsnorm);
    tcase_add_test(tc, test_rope);
    tcase_add_test(tc, test_swiglu);
    tcase_add_test(tc, test_attention);
    tcase_add_test(tc, test_attention_threads);
    tcase_add_test(tc, test_crossentropy);
    tcase_add_test(tc, test_model);
    tcase_add_test(tc, test_forward_matches_ops);
    tcase_add_test(tc, test_forward_matches_engine);
    suite_add_tcase(s, tc);
    return s;
}
