// test_optim.c — the optimizer (nm_optim.h): the WSD schedule at hand-computed steps, the
// gradient norm against a long-double loop and across thread counts, AdamW against a float64
// reference in this file and against torch.optim.AdamW (tests/gen_optim_fixture.py, fixture in
// tests/fixtures/adamw_torch/), and the weight-decay rule over a real model's tensor table.
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nm_model.h"
#include "nm_optim.h"
#include "nm_safetensors.h"
#include "nm_tensor_file.h"
#include "test_util.h"

static nm_optim_config cfg_with(double lr, long warmup, long total, double decay_frac, double final_frac) {
    nm_optim_config c;
    nm_optim_config_default(&c);
    c.lr = lr;
    c.warmup_steps = warmup;
    c.total_steps = total;
    c.decay_frac = decay_frac;
    c.final_lr_frac = final_frac;
    return c;
}

static void assert_close(double got, double want, double rel, const char *what) {
    ck_assert_msg(fabs(got - want) <= rel * fmax(fabs(want), 1e-300), "%s: got %.17g, want %.17g", what, got, want);
}

START_TEST(test_defaults_and_check) {
    nm_optim_config c;
    memset(&c, 0x55, sizeof c); // the defaults must set every field
    nm_optim_config_default(&c);
    ck_assert(c.beta1 == 0.9 && c.beta2 == 0.95 && c.eps == 1e-8 && c.weight_decay == 0.1 && c.grad_clip == 1.0);
    ck_assert(c.decay_frac == 0.1 && c.final_lr_frac == 0.1 && c.lr > 0 && c.warmup_steps == 0);
    nm_error err = {0};
    // total_steps is the caller's to set
    ck_assert_int_eq(nm_optim_config_check(&c, &err), NM_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(err.msg, "total_steps"));
    c.total_steps = 1000;
    c.warmup_steps = 900; // the last 100 steps decay: warmup may reach step 899
    ck_assert_msg(nm_optim_config_check(&c, &err) == NM_OK, "%s", err.msg);

    // one spoilt field at a time; the message names it
    static const struct { const char *field; int which; double value; } cases[] = {
        {"lr", 0, 0.0},          {"lr", 0, NAN},          {"beta1", 1, 1.0},      {"beta1", 1, -0.1},
        {"beta2", 2, 1.0},       {"eps", 3, 0.0},         {"weight_decay", 4, -1}, {"weight_decay", 4, 2000},
        {"grad_clip", 5, -1},    {"warmup", 6, 901},      {"warmup_steps", 6, -1}, {"decay_frac", 7, 1.5},
        {"final_lr_frac", 8, -0.5}, {"total_steps", 9, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        nm_optim_config b = c;
        double v = cases[i].value;
        switch (cases[i].which) {
        case 0: b.lr = v; break;
        case 1: b.beta1 = v; break;
        case 2: b.beta2 = v; break;
        case 3: b.eps = v; break;
        case 4: b.weight_decay = v; break;
        case 5: b.grad_clip = v; break;
        case 6: b.warmup_steps = (long)v; break;
        case 7: b.decay_frac = v; break;
        case 8: b.final_lr_frac = v; break;
        case 9: b.total_steps = (long)v; break;
        }
        nm_error_clear(&err);
        ck_assert_msg(nm_optim_config_check(&b, &err) == NM_ERR_INVALID, "case %zu (%s = %g) accepted", i,
                      cases[i].field, v);
        ck_assert_msg(strstr(err.msg, cases[i].field) != NULL, "case %zu: message \"%s\" does not name %s", i, err.msg,
                      cases[i].field);
    }
}
END_TEST

START_TEST(test_schedule) {
    // peak 2, warmup 4, 100 steps, the last 10 decay to 0.2. Hand-computed:
    //   warmup: 2 * (step+1)/4;  decay: 2 * (1 - 0.9 * (step - 90 + 1) / 10)
    const nm_optim_config c = cfg_with(2.0, 4, 100, 0.1, 0.1);
    ck_assert_int_eq(nm_wsd_decay_steps(&c), 10);
    static const struct { long step; double lr; } want[] = {
        {-5, 0.5}, {0, 0.5}, {1, 1.0}, {2, 1.5}, {3, 2.0}, {4, 2.0}, {50, 2.0}, {89, 2.0},
        {90, 1.82}, {94, 1.1}, {98, 0.38}, {99, 0.2}, {100, 0.2}, {12345, 0.2},
    };
    char what[64];
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        snprintf(what, sizeof what, "lr(step %ld)", want[i].step);
        assert_close(nm_wsd_lr(&c, want[i].step), want[i].lr, 1e-15, what);
    }
    // no warmup: the first step is at the peak
    nm_optim_config c2 = cfg_with(3e-4, 0, 10, 0.5, 0.0);
    assert_close(nm_wsd_lr(&c2, 0), 3e-4, 1e-15, "no warmup, step 0");
    assert_close(nm_wsd_lr(&c2, 5), 3e-4 * 0.8, 1e-15, "decay to 0, first decay step");
    ck_assert(nm_wsd_lr(&c2, 9) == 0.0 && nm_wsd_lr(&c2, 10) == 0.0);
    // no decay: stays at the peak for ever
    nm_optim_config c3 = cfg_with(1e-3, 2, 10, 0.0, 0.1);
    assert_close(nm_wsd_lr(&c3, 0), 5e-4, 1e-15, "warmup 1/2");
    ck_assert(nm_wsd_lr(&c3, 9) == 1e-3 && nm_wsd_lr(&c3, 50) == 1e-3);
    // the decay length rounds half up: 1.5 -> 2, 1.4 -> 1, 100.0 stays 100
    ck_assert_int_eq(nm_wsd_decay_steps(&(nm_optim_config){.total_steps = 15, .decay_frac = 0.1}), 2);
    ck_assert_int_eq(nm_wsd_decay_steps(&(nm_optim_config){.total_steps = 14, .decay_frac = 0.1}), 1);
    ck_assert_int_eq(nm_wsd_decay_steps(&(nm_optim_config){.total_steps = 1000, .decay_frac = 0.1}), 100);
    ck_assert_int_eq(nm_wsd_decay_steps(&(nm_optim_config){.total_steps = 7, .decay_frac = 1.0}), 7);
    // shape: rises during warmup, flat, then falls, never below the final value
    const nm_optim_config c4 = cfg_with(1.0, 37, 1000, 0.2, 0.1);
    double prev = 0.0;
    for (long s = 0; s < 1100; s++) {
        double lr = nm_wsd_lr(&c4, s);
        if (s < 37) ck_assert(lr > prev);
        else if (s < 800) ck_assert(lr == 1.0);
        else ck_assert(lr < prev || (s >= 999 && lr == prev));
        if (s >= 37) ck_assert(lr >= 0.1 - 1e-15);
        prev = lr;
    }
}
END_TEST

// Reference: a plain loop in long double (64-bit mantissa on x86-64).
static double sumsq_ref(const float *g, size_t n) {
    long double s = 0;
    for (size_t i = 0; i < n; i++) s += (long double)g[i] * g[i];
    return (double)s;
}

START_TEST(test_grad_norm) {
    const float small[2] = {3.0f, -4.0f};
    ck_assert(nm_grad_norm(small, 2) == 5.0);
    ck_assert(nm_grad_norm(small, 0) == 0.0);
    const int threads0 = omp_get_max_threads();
    static const size_t sizes[] = {1, 7, 63, 64, 65, 1000, 65535, 65536, 200003};
    nm_test_rng r = {301};
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        const size_t n = sizes[k];
        float *g = malloc(n * sizeof *g);
        ck_assert_ptr_nonnull(g);
        nm_test_fill_normal(&r, g, n, 0.01f + (float)k);
        const double want = sumsq_ref(g, n);
        omp_set_num_threads(2);
        const double got = nm_grad_sumsq(g, n);
        assert_close(got, want, 1e-13, "sum of squares vs long double");
        assert_close(nm_grad_norm(g, n), sqrt(want), 1e-13, "norm vs long double");
        // the same bits with any thread count
        for (int th = 1; th <= 4; th++) {
            omp_set_num_threads(th);
            const double again = nm_grad_sumsq(g, n);
            ck_assert_msg(memcmp(&again, &got, sizeof got) == 0, "n=%zu: %d threads give %.17g, 2 threads %.17g", n, th,
                          again, got);
        }
        free(g);
    }
    omp_set_num_threads(threads0);
    // PyTorch's clip factor
    ck_assert(nm_clip_scale(0.5, 1.0) == 1.0);
    ck_assert(nm_clip_scale(4.0, 1.0) == 1.0 / (4.0 + 1e-6));
    ck_assert(nm_clip_scale(1e9, 0.0) == 1.0);
    ck_assert(nm_clip_scale(INFINITY, 1.0) == 0.0);
    ck_assert(isnan(nm_clip_scale(NAN, 1.0)));
}
END_TEST

// AdamW as PyTorch defines it, entirely in double (state included), for the comparison.
static void adamw_ref(double *p, const double *g, double *m, double *v, size_t n, long step, double lr, double gs,
                      int decay, const nm_optim_config *c) {
    const double t = (double)step + 1;
    for (size_t i = 0; i < n; i++) {
        const double gi = g[i] * gs;
        if (decay) p[i] *= 1 - lr * c->weight_decay;
        m[i] = c->beta1 * m[i] + (1 - c->beta1) * gi;
        v[i] = c->beta2 * v[i] + (1 - c->beta2) * gi * gi;
        const double mhat = m[i] / (1 - pow(c->beta1, t)), vhat = v[i] / (1 - pow(c->beta2, t));
        p[i] -= lr * mhat / (sqrt(vhat) + c->eps);
    }
}

// max over i of |a - b| / max(|b|, floor); infinite when a holds a NaN or Inf. (No ck_assert in
// these loops: Check records every assertion it passes, which would dominate the run time.)
static double max_rel_f(const float *a, const double *b, size_t n, double floor) {
    double e = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(a[i])) return INFINITY;
        e = fmax(e, fabs((double)a[i] - b[i]) / fmax(fabs(b[i]), floor));
    }
    return e;
}

// max |a - b| / max |b|; infinite when a holds a NaN or Inf
static double norm_rel_f(const float *a, const double *b, size_t n) {
    double d = 0.0, mx = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(a[i])) return INFINITY;
        d = fmax(d, fabs((double)a[i] - b[i]));
        mx = fmax(mx, fabs(b[i]));
    }
    return d / fmax(mx, 1e-300);
}

// Two comparisons with the float64 reference, 8 steps of random gradients of changing scale,
// grad_scale 1 and 0.3, decay on and off:
// - one step: the reference starts from our float32 state (widened) and takes the same step in
//   double. The only differences are the final rounding of p, m, v to float32 (2^-24 = 6e-8 of
//   each) and our step using the rounded m and v (another 6e-8 of the step): elementwise bar
//   2e-7, p relative to max(|p|, lr) (a p near zero carries a step of size lr).
// - the trajectory: the reference runs all 8 steps in double from the same start. The float32
//   storage of p, m, v then adds up to 8 x 2 roundings of ~6e-8: bar 2e-6. m is compared
//   relative to its largest value here: it cancels through zero and keeps the rounding of its
//   larger past; v (a sum of squares) elementwise.
START_TEST(test_adamw_vs_f64) {
    const nm_optim_config c = cfg_with(0.02, 2, 8, 0.25, 0.1);
    enum { STEPS = 8 };
    static const size_t sizes[] = {1000, 70001}; // the second runs the parallel path
    nm_test_rng r = {302};
    const int threads0 = omp_get_max_threads();
    for (size_t k = 0; k < 2; k++) {
        const size_t n = sizes[k];
        float *p = malloc(n * sizeof *p), *m = calloc(n, sizeof *m), *v = calloc(n, sizeof *v), *g = malloc(n * sizeof *g);
        double *pd = malloc(n * sizeof *pd), *md = calloc(n, sizeof *md), *vd = calloc(n, sizeof *vd),
               *gd = malloc(n * sizeof *gd);
        double *ps = malloc(n * sizeof *ps), *ms = malloc(n * sizeof *ms), *vs = malloc(n * sizeof *vs);
        float *p1 = malloc(n * sizeof *p1), *m1 = malloc(n * sizeof *m1), *v1 = malloc(n * sizeof *v1);
        ck_assert(p && m && v && g && pd && md && vd && gd && ps && ms && vs && p1 && m1 && v1);
        nm_test_fill_normal(&r, p, n, 1.0f);
        for (size_t i = 0; i < n; i++) pd[i] = p[i];
        double step_p = 0, step_m = 0, step_v = 0, traj_p = 0, traj_m = 0, traj_v = 0;
        for (long s = 0; s < STEPS; s++) {
            nm_test_fill_normal(&r, g, n, 0.5f + (float)s); // a different scale each step
            for (size_t i = 0; i < n; i++) gd[i] = g[i], ps[i] = p[i], ms[i] = m[i], vs[i] = v[i];
            const double lr = nm_wsd_lr(&c, s), gs = s % 3 == 0 ? 1.0 : 0.3;
            const int decay = (int)((s + k) % 2); // both kinds of step on both paths
            // the same step with one thread must give the same bits
            memcpy(p1, p, n * sizeof *p);
            memcpy(m1, m, n * sizeof *m);
            memcpy(v1, v, n * sizeof *v);
            omp_set_num_threads(1);
            nm_adamw_update(p1, g, m1, v1, n, s, lr, gs, decay, &c);
            omp_set_num_threads(2);
            nm_adamw_update(p, g, m, v, n, s, lr, gs, decay, &c);
            ck_assert(memcmp(p1, p, n * sizeof *p) == 0 && memcmp(m1, m, n * sizeof *m) == 0 &&
                      memcmp(v1, v, n * sizeof *v) == 0);
            adamw_ref(ps, gd, ms, vs, n, s, lr, gs, decay, &c);
            step_p = fmax(step_p, max_rel_f(p, ps, n, c.lr));
            step_m = fmax(step_m, max_rel_f(m, ms, n, 1e-30));
            step_v = fmax(step_v, max_rel_f(v, vs, n, 1e-30));
            adamw_ref(pd, gd, md, vd, n, s, lr, gs, decay, &c);
            traj_p = fmax(traj_p, max_rel_f(p, pd, n, c.lr));
            traj_m = fmax(traj_m, norm_rel_f(m, md, n));
            traj_v = fmax(traj_v, max_rel_f(v, vd, n, 1e-30));
        }
        printf("adamw  n=%-6zu vs float64, one step: max rel err p %.2e m %.2e v %.2e; %d steps: p %.2e m %.2e v %.2e\n",
               n, step_p, step_m, step_v, STEPS, traj_p, traj_m, traj_v);
        ck_assert_msg(step_p <= 2e-7 && step_m <= 2e-7 && step_v <= 2e-7, "one step: p %g m %g v %g", step_p, step_m,
                      step_v);
        ck_assert_msg(traj_p <= 2e-6 && traj_m <= 2e-6 && traj_v <= 2e-6, "trajectory: p %g m %g v %g", traj_p, traj_m,
                      traj_v);
        free(p); free(m); free(v); free(g); free(pd); free(md); free(vd); free(gd); free(ps); free(ms); free(vs);
        free(p1); free(m1); free(v1);
    }
    omp_set_num_threads(threads0);
}
END_TEST

START_TEST(test_adamw_hand) {
    // First step from zero state: m_hat = g', sqrt(v_hat) = |g'|, so p -= lr * g' / (|g'| + eps),
    // i.e. a step of lr against the sign of the gradient, whatever its size or grad_scale.
    nm_optim_config c = cfg_with(0.1, 0, 10, 0.1, 0.1);
    float p[4] = {1.0f, -2.0f, 0.5f, 3.0f}, g[4] = {0.3f, -7.0f, 1e-3f, 0.0f}, m[4] = {0}, v[4] = {0};
    nm_adamw_update(p, g, m, v, 4, 0, 0.1, 0.25, 0, &c);
    assert_close(p[0], 0.9, 1e-6, "p0");
    assert_close(p[1], -1.9, 1e-6, "p1");
    assert_close(p[2], 0.4, 1e-5, "p2"); // eps / |g'| = 4e-5 of the step
    ck_assert(p[3] == 3.0f);              // zero gradient, no decay: untouched
    assert_close(m[0], 0.1 * 0.3 * 0.25, 1e-6, "m0");
    assert_close(v[1], 0.05 * (7.0 * 0.25) * (7.0 * 0.25), 1e-6, "v1");
    // decoupled decay alone: zero gradient and state, p *= 1 - lr * wd
    float q[2] = {1.0f, -4.0f}, z[2] = {0}, mz[2] = {0}, vz[2] = {0};
    nm_adamw_update(q, z, mz, vz, 2, 0, 0.1, 1.0, 1, &c);
    ck_assert(q[0] == (float)(1.0 - 0.1 * 0.1) && q[1] == (float)(-4.0 * (1.0 - 0.1 * 0.1)));
}
END_TEST

// ---- torch.optim.AdamW fixture

static double *read_f64(const nm_safetensors *st, const char *name, size_t numel) {
    const nm_st_tensor *t = nm_safetensors_find(st, name);
    ck_assert_msg(t && t->dtype == NM_DT_F64 && t->numel == numel,
                  "adamw fixture: %s missing or not F64[%zu] (regenerate: /usr/bin/python3 tests/gen_optim_fixture.py)",
                  name, numel);
    double *x = malloc(numel * sizeof *x);
    ck_assert_ptr_nonnull(x);
    memcpy(x, t->data, numel * sizeof *x); // little-endian host, as the reader assumes
    return x;
}

START_TEST(test_adamw_torch) {
    enum { STEPS = 5, NT = 2 };
    const char *names[NT] = {"w", "norm.weight"};
    const size_t numel[NT] = {16 * 20, 24};
    char path[4096];
    snprintf(path, sizeof path, "%s/fixtures/adamw_torch/expected.safetensors", nm_test_dir());
    nm_error err = {0};
    nm_safetensors st;
    ck_assert_msg(nm_safetensors_open(&st, path, &err) == NM_OK, "%s", err.msg);
    double *lr = read_f64(&st, "lr", STEPS), *norm = read_f64(&st, "grad_norm", STEPS),
           *coef = read_f64(&st, "clip_coef", STEPS);
    // the generator's settings (its docstring): WSD warmup 2, 5 steps, decay_frac 0.4, to 0.1
    nm_optim_config c = cfg_with(0.01, 2, 5, 0.4, 0.1);
    ck_assert_msg(nm_optim_config_check(&c, &err) == NM_OK, "%s", err.msg);

    float *p[NT], *m[NT], *v[NT], *grad[NT], *after[NT], *want_m[NT], *want_v[NT];
    for (int i = 0; i < NT; i++) {
        const size_t n = numel[i];
        p[i] = malloc(n * sizeof(float));
        m[i] = calloc(n, sizeof(float));
        v[i] = calloc(n, sizeof(float));
        grad[i] = malloc(STEPS * n * sizeof(float));
        after[i] = malloc(STEPS * n * sizeof(float));
        want_m[i] = malloc(n * sizeof(float));
        want_v[i] = malloc(n * sizeof(float));
        ck_assert(p[i] && m[i] && v[i] && grad[i] && after[i] && want_m[i] && want_v[i]);
        char nm_init[64], nm_grad[64], nm_after[64], nm_m[64], nm_v[64];
        snprintf(nm_init, sizeof nm_init, "%s.init", names[i]);
        snprintf(nm_grad, sizeof nm_grad, "%s.grad", names[i]);
        snprintf(nm_after, sizeof nm_after, "%s.after", names[i]);
        snprintf(nm_m, sizeof nm_m, "%s.exp_avg", names[i]);
        snprintf(nm_v, sizeof nm_v, "%s.exp_avg_sq", names[i]);
        const char *tn[5] = {nm_init, nm_grad, nm_after, nm_m, nm_v};
        const int64_t cnt[5] = {(int64_t)n, (int64_t)(STEPS * n), (int64_t)(STEPS * n), (int64_t)n, (int64_t)n};
        float *dst[5] = {p[i], grad[i], after[i], want_m[i], want_v[i]};
        ck_assert_msg(nm_tensor_file_read(path, 5, tn, cnt, dst, &err) == NM_OK, "%s", err.msg);
    }
    ck_assert(nm_param_decays("w") && !nm_param_decays("norm.weight"));

    double worst_p = 0, worst_norm = 0, worst_coef = 0;
    for (long s = 0; s < STEPS; s++) {
        double ss = 0;
        for (int i = 0; i < NT; i++) ss += nm_grad_sumsq(grad[i] + s * numel[i], numel[i]);
        const double gn = sqrt(ss), scale = nm_clip_scale(gn, c.grad_clip);
        worst_norm = fmax(worst_norm, fabs(gn - norm[s]) / norm[s]);
        worst_coef = fmax(worst_coef, fabs(scale - coef[s]) / coef[s]);
        assert_close(nm_wsd_lr(&c, s), lr[s], 1e-15, "lr vs the generator's schedule");
        for (int i = 0; i < NT; i++) {
            nm_adamw_update(p[i], grad[i] + s * numel[i], m[i], v[i], numel[i], s, nm_wsd_lr(&c, s), scale,
                            nm_param_decays(names[i]), &c);
            const float *want = after[i] + s * numel[i];
            for (size_t j = 0; j < numel[i]; j++) {
                const double e = fabs((double)p[i][j] - want[j]) / fmax(fabs(want[j]), c.lr); // as test_adamw_vs_f64
                ck_assert_msg(e <= 1e-6, "step %ld %s[%zu]: %.9g, torch %.9g", s, names[i], j, p[i][j], want[j]);
                worst_p = fmax(worst_p, e);
            }
        }
    }
    double worst_m = 0, worst_v = 0;
    for (int i = 0; i < NT; i++) {
        double mmax = 0, vmax = 0;
        for (size_t j = 0; j < numel[i]; j++) mmax = fmax(mmax, fabs(want_m[i][j])), vmax = fmax(vmax, want_v[i][j]);
        for (size_t j = 0; j < numel[i]; j++) {
            // m cancels through zero: relative to its largest value (as test_adamw_vs_f64)
            worst_m = fmax(worst_m, fabs(m[i][j] - want_m[i][j]) / mmax);
            worst_v = fmax(worst_v, fabs(v[i][j] - want_v[i][j]) / fmax(want_v[i][j], 1e-30));
        }
    }
    printf("adamw  vs torch.optim.AdamW (5 steps, clip, decay on/off): max rel err p %.2e exp_avg %.2e exp_avg_sq "
           "%.2e grad_norm %.2e clip %.2e\n",
           worst_p, worst_m, worst_v, worst_norm, worst_coef);
    ck_assert_msg(worst_m <= 1e-6 && worst_v <= 1e-6, "exp_avg %g exp_avg_sq %g", worst_m, worst_v);
    // torch sums the norm in float32: agreement to float32 rounding
    ck_assert_msg(worst_norm <= 1e-6 && worst_coef <= 1e-6, "grad norm %g clip %g", worst_norm, worst_coef);
    for (int i = 0; i < NT; i++) {
        free(p[i]); free(m[i]); free(v[i]); free(grad[i]); free(after[i]); free(want_m[i]); free(want_v[i]);
    }
    free(lr); free(norm); free(coef);
    nm_safetensors_close(&st);
}
END_TEST

// The rule on every tensor of a real model (vision, shared expert, untied head): the name rule
// gives exactly "1-D tensors do not decay".
START_TEST(test_param_decays) {
    nm_config cfg;
    nm_config_init_byte(&cfg);
    cfg.hidden_size = 8;
    cfg.num_layers = 2;
    cfg.num_heads = 2;
    cfg.num_kv_heads = 1;
    cfg.head_dim = 4;
    cfg.vocab_size = 262;
    cfg.max_positions = 32;
    cfg.moe = (nm_moe_config){.num_experts = 2, .null_copies = 2, .top_k = 2, .expert_hidden = 4,
                              .shared_expert_hidden = 4, .null_kind = NM_NULL_ZERO};
    cfg.has_vision = 1;
    cfg.image_size = 8;
    cfg.patch_size = 4;
    cfg.channels = 3;
    nm_model m;
    nm_error err;
    ck_assert_msg(nm_model_init_random(&m, &cfg, 5, &err) == NM_OK, "%s", err.msg);
    const int n = nm_model_tensor_specs(&m, NULL);
    nm_tensor_spec *specs = calloc((size_t)n, sizeof *specs);
    ck_assert_ptr_nonnull(specs);
    nm_model_tensor_specs(&m, specs);
    int n_no = 0;
    for (int i = 0; i < n; i++) {
        ck_assert_msg(nm_param_decays(specs[i].name) == (specs[i].ndim >= 2), "%s (%d-D): decays = %d", specs[i].name,
                      specs[i].ndim, nm_param_decays(specs[i].name));
        n_no += !nm_param_decays(specs[i].name);
    }
    ck_assert_int_eq(n_no, 2 * 2 + 1 + 1); // attn_norm and moe_norm per layer, norm, patch bias
    ck_assert(nm_param_decays("vision.pos_embed") && nm_param_decays("layers.1.moe.experts.down_proj") &&
              nm_param_decays("layers.0.moe.router.weight") && !nm_param_decays("norm.weight"));
    free(specs);
    nm_model_free(&m);
}
END_TEST

NM_TEST_SUITE(optim) {
    Suite *s = suite_create("optim");
    TCase *tc = tcase_create("optim");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_defaults_and_check);
    tcase_add_test(tc, test_schedule);
    tcase_add_test(tc, test_grad_norm);
    tcase_add_test(tc, test_adamw_vs_f64);
    tcase_add_test(tc, test_adamw_hand);
    tcase_add_test(tc, test_adamw_torch);
    tcase_add_test(tc, test_param_decays);
    suite_add_tcase(s, tc);
    return s;
}
