// test_grad_torch.c — the dense training ops (nm_train_ops.h) against PyTorch float64 autograd
// (tests/gen_grad_fixtures.py; fixture tests/fixtures/grad_torch/expected.safetensors).
//
// test_grad.c checks the same ops against finite differences of themselves; this suite checks
// them against an independent implementation of DESIGN.md §3 (torch's F.linear, F.embedding,
// F.silu, softmax and F.cross_entropy, RMSNorm, half-split RoPE and causal GQA attention written
// out in the generator), forward outputs and every gradient, with the fixture's upstream
// gradient dout. Parameter gradients start at zero (the += rule is test_grad.c's).
//
// Bars:
// - `_f64` ops, per element: |got - want| <= 1e-9 * max(|want|, 1e-6 * max|want|). The floor
//   (a millionth of the tensor's largest value) is there for elements that cancel to near zero,
//   where a ratio of two rounding noises means nothing; on this fixture it changes nothing: the
//   plain elementwise relative error is at most 7e-14 (attention), 0 for linear and embedding.
// - `_f32` ops on the same (float32-exact) inputs: max |got - want| <= 1e-4 * max |want| over each
//   tensor (float32 cannot give elementwise relative accuracy where values cancel).
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nm_safetensors.h"
#include "nm_tensor_file.h"
#include "nm_train_ops.h"
#include "test_util.h"

#define TOL64 1e-9
#define FLOOR64 1e-6
#define TOL32 1e-4
#define REGEN "regenerate: /usr/bin/python3 tests/gen_grad_fixtures.py"

typedef struct {
    nm_safetensors st;
    const char *cas;   // the case, the prefix of its tensors' names
    void *owned[64];   // buffers freed by ctx_close
    int n_owned;
    double worst64, worst32;
} ctx;

static const char *fixture_path(void) {
    static char path[4096];
    snprintf(path, sizeof path, "%s/fixtures/grad_torch/expected.safetensors", nm_test_dir());
    return path;
}

static void ctx_open(ctx *c, const char *cas) {
    memset(c, 0, sizeof *c);
    c->cas = cas;
    nm_error err = {0};
    ck_assert_msg(nm_safetensors_open(&c->st, fixture_path(), &err) == NM_OK, "%s (" REGEN ")", err.msg);
}

static void ctx_close(ctx *c) {
    printf("torch  %-12s f64 max rel err %.2e   f32 max norm-rel err %.2e\n", c->cas, c->worst64, c->worst32);
    for (int i = 0; i < c->n_owned; i++) free(c->owned[i]);
    nm_safetensors_close(&c->st);
}

static void *own(ctx *c, void *p) {
    ck_assert_ptr_nonnull(p);
    ck_assert_int_lt(c->n_owned, 64);
    return c->owned[c->n_owned++] = p;
}

static const nm_st_tensor *fx(ctx *c, const char *name, nm_dtype dtype) {
    char full[128];
    snprintf(full, sizeof full, "%s.%s", c->cas, name);
    const nm_st_tensor *t = nm_safetensors_find(&c->st, full);
    ck_assert_msg(t != NULL, "fixture tensor %s missing (" REGEN ")", full);
    ck_assert_msg(t->dtype == dtype, "fixture tensor %s is %s, expected %s", full, nm_dtype_name(t->dtype),
                  nm_dtype_name(dtype));
    return t;
}

static int dim(ctx *c, const char *name, int d) {
    const nm_st_tensor *t = fx(c, name, NM_DT_F64);
    ck_assert_int_lt(d, t->ndim);
    return (int)t->shape[d];
}

static size_t numel(ctx *c, const char *name) { return fx(c, name, NM_DT_F64)->numel; }

static double *in64(ctx *c, const char *name) {
    const nm_st_tensor *t = fx(c, name, NM_DT_F64);
    double *x = own(c, malloc((t->numel ? t->numel : 1) * sizeof *x));
    memcpy(x, t->data, t->numel * sizeof *x); // little-endian host, as the reader assumes
    return x;
}

// The same input in float32: exact, since the generator drew float32 values.
static float *in32(ctx *c, const char *name) {
    const double *d = in64(c, name);
    const size_t n = numel(c, name);
    float *x = own(c, malloc((n ? n : 1) * sizeof *x));
    for (size_t i = 0; i < n; i++) {
        x[i] = (float)d[i];
        ck_assert_msg((double)x[i] == d[i], "%s.%s[%zu] is not a float32 value", c->cas, name, i);
    }
    return x;
}

static double scalar(ctx *c, const char *name) {
    ck_assert_int_eq((int)numel(c, name), 1);
    return in64(c, name)[0];
}

static int32_t *ints(ctx *c, const char *name) {
    const nm_st_tensor *t = fx(c, name, NM_DT_I32);
    int32_t *x = own(c, malloc((t->numel ? t->numel : 1) * sizeof *x));
    nm_error err;
    ck_assert_int_eq(nm_st_tensor_to_i32(x, t, &err), NM_OK);
    return x;
}

static double *z64(ctx *c, size_t n) { return own(c, calloc(n ? n : 1, sizeof(double))); }
static float *z32(ctx *c, size_t n) { return own(c, calloc(n ? n : 1, sizeof(float))); }

static void check64(ctx *c, const char *name, const double *got) {
    const double *want = in64(c, name);
    const size_t n = numel(c, name);
    double mx = 0, err = 0;
    size_t at = 0;
    for (size_t i = 0; i < n; i++) mx = fmax(mx, fabs(want[i]));
    ck_assert_msg(mx > 0, "%s.%s is all zeros: the check could not fail", c->cas, name);
    for (size_t i = 0; i < n; i++) {
        ck_assert_msg(isfinite(got[i]), "%s.%s[%zu] = %g", c->cas, name, i, got[i]);
        const double e = fabs(got[i] - want[i]) / fmax(fabs(want[i]), FLOOR64 * mx);
        if (e > err) err = e, at = i;
    }
    ck_assert_msg(err <= TOL64, "%s.%s (f64) differs from torch by %.3e relative at %zu: %.17g vs %.17g", c->cas, name,
                  err, at, got[at], want[at]);
    c->worst64 = fmax(c->worst64, err);
}

static void check32(ctx *c, const char *name, const float *got) {
    const double *want = in64(c, name);
    const size_t n = numel(c, name);
    double mx = 0, d = 0;
    size_t at = 0;
    for (size_t i = 0; i < n; i++) {
        ck_assert_msg(isfinite(got[i]), "%s.%s[%zu] = %g", c->cas, name, i, got[i]);
        mx = fmax(mx, fabs(want[i]));
        if (fabs(got[i] - want[i]) > d) d = fabs(got[i] - want[i]), at = i;
    }
    const double err = d / mx;
    ck_assert_msg(err <= TOL32, "%s.%s (f32) differs from torch by %.3e of its largest value at %zu: %.9g vs %.17g",
                  c->cas, name, err, at, got[at], want[at]);
    c->worst32 = fmax(c->worst32, err);
}

START_TEST(test_linear) {
    ctx c;
    ctx_open(&c, "linear");
    const int T = dim(&c, "x", 0), in = dim(&c, "x", 1), out = dim(&c, "w", 0);
    {
        double *x = in64(&c, "x"), *w = in64(&c, "w"), *b = in64(&c, "b"), *dout = in64(&c, "dout");
        double *y = z64(&c, (size_t)T * out), *dx = z64(&c, (size_t)T * in), *dw = z64(&c, (size_t)out * in),
               *db = z64(&c, out);
        nm_linear_forward_f64(y, x, w, b, T, in, out);
        nm_linear_backward_f64(dx, dw, db, dout, x, w, T, in, out);
        check64(&c, "out", y), check64(&c, "dx", dx), check64(&c, "dw", dw), check64(&c, "db", db);
    }
    {
        float *x = in32(&c, "x"), *w = in32(&c, "w"), *b = in32(&c, "b"), *dout = in32(&c, "dout");
        float *y = z32(&c, (size_t)T * out), *dx = z32(&c, (size_t)T * in), *dw = z32(&c, (size_t)out * in),
              *db = z32(&c, out);
        nm_linear_forward_f32(y, x, w, b, T, in, out);
        nm_linear_backward_f32(dx, dw, db, dout, x, w, T, in, out);
        check32(&c, "out", y), check32(&c, "dx", dx), check32(&c, "dw", dw), check32(&c, "db", db);
    }
    ctx_close(&c);
}
END_TEST

START_TEST(test_embedding) {
    ctx c;
    ctx_open(&c, "embedding");
    const int T = dim(&c, "dout", 0), V = dim(&c, "E", 0), D = dim(&c, "E", 1);
    const int32_t *ids = ints(&c, "ids");
    { // rows of ids -1 are left as they are: zero here, as in the reference
        double *E = in64(&c, "E"), *dout = in64(&c, "dout"), *y = z64(&c, (size_t)T * D), *dE = z64(&c, (size_t)V * D);
        nm_embedding_forward_f64(y, ids, E, T, D);
        nm_embedding_backward_f64(dE, dout, ids, T, D);
        check64(&c, "out", y), check64(&c, "dE", dE);
    }
    {
        float *E = in32(&c, "E"), *dout = in32(&c, "dout"), *y = z32(&c, (size_t)T * D), *dE = z32(&c, (size_t)V * D);
        nm_embedding_forward_f32(y, ids, E, T, D);
        nm_embedding_backward_f32(dE, dout, ids, T, D);
        check32(&c, "out", y), check32(&c, "dE", dE);
    }
    ctx_close(&c);
}
END_TEST

START_TEST(test_rmsnorm) {
    ctx c;
    ctx_open(&c, "rmsnorm");
    const int T = dim(&c, "x", 0), D = dim(&c, "x", 1);
    const double eps = scalar(&c, "eps");
    {
        double *x = in64(&c, "x"), *w = in64(&c, "w"), *dout = in64(&c, "dout");
        double *y = z64(&c, (size_t)T * D), *rstd = z64(&c, T), *dx = z64(&c, (size_t)T * D), *dw = z64(&c, D);
        nm_rmsnorm_forward_f64(y, rstd, x, w, T, D, eps);
        nm_rmsnorm_backward_f64(dx, dw, dout, x, w, rstd, T, D);
        check64(&c, "out", y), check64(&c, "rstd", rstd), check64(&c, "dx", dx), check64(&c, "dw", dw);
    }
    {
        float *x = in32(&c, "x"), *w = in32(&c, "w"), *dout = in32(&c, "dout");
        float *y = z32(&c, (size_t)T * D), *rstd = z32(&c, T), *dx = z32(&c, (size_t)T * D), *dw = z32(&c, D);
        nm_rmsnorm_forward_f32(y, rstd, x, w, T, D, eps);
        nm_rmsnorm_backward_f32(dx, dw, dout, x, w, rstd, T, D);
        check32(&c, "out", y), check32(&c, "rstd", rstd), check32(&c, "dx", dx), check32(&c, "dw", dw);
    }
    ctx_close(&c);
}
END_TEST

START_TEST(test_rope) {
    ctx c;
    ctx_open(&c, "rope");
    const int T = dim(&c, "x", 0), nh = dim(&c, "x", 1), hd = dim(&c, "x", 2), pos0 = ints(&c, "pos0")[0];
    const double theta = scalar(&c, "theta");
    const size_t n = (size_t)T * nh * hd;
    {
        double *x = in64(&c, "x"), *dout = in64(&c, "dout"), *fr = z64(&c, hd / 2), *y = z64(&c, n), *dx = z64(&c, n);
        nm_rope_freqs_f64(fr, hd, theta);
        nm_rope_forward_f64(y, x, T, nh, hd, pos0, fr);
        nm_rope_backward_f64(dx, dout, T, nh, hd, pos0, fr);
        check64(&c, "out", y), check64(&c, "dx", dx);
    }
    {
        float *x = in32(&c, "x"), *dout = in32(&c, "dout"), *fr = z32(&c, hd / 2), *y = z32(&c, n), *dx = z32(&c, n);
        nm_rope_freqs_f32(fr, hd, theta);
        nm_rope_forward_f32(y, x, T, nh, hd, pos0, fr);
        nm_rope_backward_f32(dx, dout, T, nh, hd, pos0, fr);
        check32(&c, "out", y), check32(&c, "dx", dx);
    }
    ctx_close(&c);
}
END_TEST

START_TEST(test_swiglu) {
    ctx c;
    ctx_open(&c, "swiglu");
    const size_t n = numel(&c, "g");
    {
        double *g = in64(&c, "g"), *u = in64(&c, "u"), *dout = in64(&c, "dout"), *y = z64(&c, n), *dg = z64(&c, n),
               *du = z64(&c, n);
        nm_swiglu_forward_f64(y, g, u, n);
        nm_swiglu_backward_f64(dg, du, dout, g, u, n);
        check64(&c, "out", y), check64(&c, "dg", dg), check64(&c, "du", du);
    }
    {
        float *g = in32(&c, "g"), *u = in32(&c, "u"), *dout = in32(&c, "dout"), *y = z32(&c, n), *dg = z32(&c, n),
              *du = z32(&c, n);
        nm_swiglu_forward_f32(y, g, u, n);
        nm_swiglu_backward_f32(dg, du, dout, g, u, n);
        check32(&c, "out", y), check32(&c, "dg", dg), check32(&c, "du", du);
    }
    ctx_close(&c);
}
END_TEST

static const char *ATTN_CASES[] = {"attn_gqa", "attn_mqa", "attn_mha"};

START_TEST(test_attention) {
    ctx c;
    ctx_open(&c, ATTN_CASES[_i]);
    const int T = dim(&c, "q", 0), nh = dim(&c, "q", 1), hd = dim(&c, "q", 2), nkv = dim(&c, "k", 1);
    ck_assert(nh % nkv == 0 && dim(&c, "k", 2) == hd);
    const size_t nq = (size_t)T * nh * hd, nk = (size_t)T * nkv * hd, na = (size_t)nh * T * T;
    {
        double *q = in64(&c, "q"), *k = in64(&c, "k"), *v = in64(&c, "v"), *dout = in64(&c, "dout");
        double *y = z64(&c, nq), *att = z64(&c, na), *datt = z64(&c, na), *dq = z64(&c, nq), *dk = z64(&c, nk),
               *dv = z64(&c, nk);
        nm_attention_forward_f64(y, att, q, k, v, T, nh, nkv, hd);
        nm_attention_backward_f64(dq, dk, dv, datt, dout, q, k, v, att, T, nh, nkv, hd);
        check64(&c, "out", y), check64(&c, "att", att), check64(&c, "dq", dq), check64(&c, "dk", dk);
        check64(&c, "dv", dv);
    }
    {
        float *q = in32(&c, "q"), *k = in32(&c, "k"), *v = in32(&c, "v"), *dout = in32(&c, "dout");
        float *y = z32(&c, nq), *att = z32(&c, na), *datt = z32(&c, na), *dq = z32(&c, nq), *dk = z32(&c, nk),
              *dv = z32(&c, nk);
        nm_attention_forward_f32(y, att, q, k, v, T, nh, nkv, hd);
        nm_attention_backward_f32(dq, dk, dv, datt, dout, q, k, v, att, T, nh, nkv, hd);
        check32(&c, "out", y), check32(&c, "att", att), check32(&c, "dq", dq), check32(&c, "dk", dk);
        check32(&c, "dv", dv);
    }
    ctx_close(&c);
}
END_TEST

START_TEST(test_crossentropy) {
    ctx c;
    ctx_open(&c, "crossentropy");
    const int T = dim(&c, "logits", 0), V = dim(&c, "logits", 1);
    const int32_t *targets = ints(&c, "targets");
    const double dloss = scalar(&c, "dloss");
    const size_t n = (size_t)T * V;
    {
        double *logits = in64(&c, "logits"), *probs = z64(&c, n), *dl = z64(&c, n), *loss = z64(&c, 1);
        loss[0] = nm_crossentropy_forward_f64(probs, logits, targets, T, V);
        nm_crossentropy_backward_f64(dl, probs, targets, T, V, dloss);
        check64(&c, "loss", loss), check64(&c, "probs", probs), check64(&c, "dlogits", dl);
    }
    {
        float *logits = in32(&c, "logits"), *probs = z32(&c, n), *dl = z32(&c, n), *loss = z32(&c, 1);
        loss[0] = (float)nm_crossentropy_forward_f32(probs, logits, targets, T, V);
        nm_crossentropy_backward_f32(dl, probs, targets, T, V, dloss);
        check32(&c, "loss", loss), check32(&c, "probs", probs), check32(&c, "dlogits", dl);
    }
    ctx_close(&c);
}
END_TEST

// The fixture's generator version: a newer generator means new tensors this file must read.
START_TEST(test_fixture_version) {
    char *meta = NULL;
    nm_error err = {0};
    ck_assert_msg(nm_tensor_file_metadata(fixture_path(), &meta, &err) == NM_OK, "%s", err.msg);
    ck_assert_msg(strstr(meta, "\"generator\":\"tests/gen_grad_fixtures.py\"") && strstr(meta, "\"version\":\"1\""),
                  "fixture metadata %s: expected version 1 of tests/gen_grad_fixtures.py (" REGEN ")", meta);
    free(meta);
}
END_TEST

NM_TEST_SUITE(grad_torch) {
    Suite *s = suite_create("grad_torch");
    TCase *tc = tcase_create("pytorch_autograd");
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, test_fixture_version);
    tcase_add_test(tc, test_linear);
    tcase_add_test(tc, test_embedding);
    tcase_add_test(tc, test_rmsnorm);
    tcase_add_test(tc, test_rope);
    tcase_add_test(tc, test_swiglu);
    tcase_add_loop_test(tc, test_attention, 0, (int)(sizeof ATTN_CASES / sizeof ATTN_CASES[0]));
    tcase_add_test(tc, test_crossentropy);
    suite_add_tcase(s, tc);
    return s;
}
