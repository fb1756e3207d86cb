// test_fixtures.c — the whole forward pass against the float64 PyTorch reference
// (tests/gen_fixtures.py; fixtures in tests/fixtures/<case>/, see the README there).
//
// The C engine prefills the prompt as one batch, then feeds the remaining tokens one at a
// time through its KV cache, tracing every MoE layer. Checked per position and layer:
//   routing (n_real, slot) identical, except where the reference's top-K boundary or order
//   is a near-tie (min(margin, order_margin) < 1e-5): counted and printed, never hidden;
//   prob, gate, null_mass, lse and logits within 1e-4 relative: |got - want| <= 1e-4 * max(1, |want|).
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nm_engine.h"
#include "nm_model.h"
#include "nm_safetensors.h"
#include "nm_trace.h"
#include "test_util.h"

#define TOL 1e-4
#define NEAR_TIE 1e-5

static const char *CASES[] = {"text_m0_mha", "vlm_null_shared_gqa", "vlm_bf16",
                              "text_copy",   "text_tied_f16_k1",    "text_all_slots"};
#define N_CASES ((int)(sizeof CASES / sizeof CASES[0]))

static float *get_f32(const nm_safetensors *st, const char *name, size_t numel) {
    const nm_st_tensor *t = nm_safetensors_find(st, name);
    ck_assert_msg(t != NULL, "fixture tensor %s missing (regenerate: /usr/bin/python3 tests/gen_fixtures.py --out tests/fixtures)", name);
    ck_assert_msg(t->numel == numel, "fixture tensor %s has %zu values, expected %zu", name, t->numel, numel);
    float *x = malloc(numel * sizeof *x);
    ck_assert_ptr_nonnull(x);
    nm_error err;
    ck_assert_int_eq(nm_st_tensor_to_f32(x, t, &err), NM_OK);
    return x;
}

static int32_t *get_i32(const nm_safetensors *st, const char *name, size_t numel) {
    const nm_st_tensor *t = nm_safetensors_find(st, name);
    ck_assert_msg(t != NULL, "fixture tensor %s missing", name);
    ck_assert_msg(t->numel == numel, "fixture tensor %s has %zu values, expected %zu", name, t->numel, numel);
    int32_t *x = malloc((numel ? numel : 1) * sizeof *x);
    ck_assert_ptr_nonnull(x);
    nm_error err;
    ck_assert_int_eq(nm_st_tensor_to_i32(x, t, &err), NM_OK);
    return x;
}

typedef struct {
    double max_err;
    long bad;
    const char *name;
} cmp;

static void cmp_val(cmp *c, double got, double want, int l, int t, int k) {
    double e = fabs(got - want) / fmax(1.0, fabs(want));
    if (!(e <= TOL)) { // NaN fails too
        if (c->bad < 5)
            fprintf(stderr, "  %s mismatch at layer %d token %d slot %d: got %.8g want %.8g\n", c->name, l, t, k, got, want);
        c->bad++;
    }
    if (e > c->max_err || isnan(e)) c->max_err = isnan(e) ? INFINITY : e;
}

START_TEST(test_fixture_case) {
    const char *name = CASES[_i];
    char dir[4096], exp_path[4200];
    snprintf(dir, sizeof dir, "%s/fixtures/%s", nm_test_dir(), name);
    snprintf(exp_path, sizeof exp_path, "%s/expected.safetensors", dir);
    nm_error err = {0};
    nm_model m;
    ck_assert_msg(nm_model_load(&m, dir, &err) == NM_OK, "%s: %s", name, err.msg);
    nm_safetensors st;
    ck_assert_msg(nm_safetensors_open(&st, exp_path, &err) == NM_OK, "%s", err.msg);
    const nm_config *c = &m.cfg;
    const nm_st_tensor *ids_t = nm_safetensors_find(&st, "input_ids");
    ck_assert_ptr_nonnull(ids_t);
    const int T = (int)ids_t->numel, L = c->num_layers, K = c->moe.top_k, V = c->vocab_size;
    int32_t *ids = get_i32(&st, "input_ids", T), *patch = get_i32(&st, "patch_index", T), *np = get_i32(&st, "n_prompt", 1);
    int32_t *n_real = get_i32(&st, "n_real", (size_t)L * T), *slot = get_i32(&st, "slot", (size_t)L * T * K);
    float *want_logits = get_f32(&st, "logits", (size_t)T * V), *prob = get_f32(&st, "prob", (size_t)L * T * K),
          *gate = get_f32(&st, "gate", (size_t)L * T * K), *null_mass = get_f32(&st, "null_mass", (size_t)L * T),
          *lse = get_f32(&st, "lse", (size_t)L * T), *margin = get_f32(&st, "margin", (size_t)L * T);
    float *order_margin = nm_safetensors_find(&st, "order_margin") ? get_f32(&st, "order_margin", (size_t)L * T) : NULL;
    float *pixels = c->has_vision ? get_f32(&st, "pixels", (size_t)3 * c->image_size * c->image_size) : NULL;
    const int n_prompt = np[0];
    ck_assert(n_prompt >= 1 && n_prompt <= T);

    nm_engine *e;
    nm_trace_sample tr;
    ck_assert_int_eq(nm_engine_create(&e, &m, T, &err), NM_OK);
    ck_assert_int_eq(nm_trace_sample_init(&tr, L, K, T + 3, &err), NM_OK); // capacity > T: stride check
    float *logits = malloc((size_t)T * V * sizeof *logits);
    ck_assert_ptr_nonnull(logits);
    ck_assert_msg(nm_engine_forward(e, ids, patch, pixels, n_prompt, logits, 1, &tr, &err) == NM_OK, "%s", err.msg);
    for (int t = n_prompt; t < T; t++)
        ck_assert_msg(nm_engine_forward(e, ids + t, patch + t, pixels, 1, logits + (size_t)t * V, 1, &tr, &err) == NM_OK,
                      "%s", err.msg);
    ck_assert_int_eq(tr.n_tokens, T);

    long route_diff = 0, near_ties = 0;
    cmp cp = {0, 0, "prob"}, cg = {0, 0, "gate"}, cn = {0, 0, "null_mass"}, cl = {0, 0, "lse"}, cz = {0, 0, "logits"};
    for (int l = 0; l < L; l++)
        for (int t = 0; t < T; t++) {
            size_t i = (size_t)l * T + t, it = (size_t)l * tr.capacity + t;
            int same = tr.n_real[it] == n_real[i];
            for (int k = 0; k < K; k++) same &= tr.slot[it * K + k] == slot[i * K + k];
            double mg = margin[i];
            if (order_margin && order_margin[i] < mg) mg = order_margin[i];
            if (!same) {
                if (mg < NEAR_TIE) {
                    near_ties++;
                    fprintf(stderr, "  %s: near-tie at layer %d token %d (margin %.3g): routing differs, reported\n", name,
                            l, t, mg);
                    continue;
                }
                route_diff++;
                if (route_diff <= 5)
                    fprintf(stderr, "  %s: routing differs at layer %d token %d (n_real %d vs %d, margin %.3g)\n", name, l,
                            t, tr.n_real[it], n_real[i], mg);
                continue;
            }
            for (int k = 0; k < K; k++) {
                cmp_val(&cp, tr.prob[it * K + k], prob[i * K + k], l, t, k);
                cmp_val(&cg, tr.gate[it * K + k], gate[i * K + k], l, t, k);
            }
            cmp_val(&cn, tr.null_mass[it], null_mass[i], l, t, -1);
            cmp_val(&cl, tr.lse[it], lse[i], l, t, -1);
        }
    for (int t = 0; t < T; t++)
        for (int v = 0; v < V; v++) cmp_val(&cz, logits[(size_t)t * V + v], want_logits[(size_t)t * V + v], -1, t, v);
    fprintf(stderr, "fixture %-20s T=%d L=%d K=%d: routing diffs %ld, near-ties %ld; max rel err prob %.2g gate %.2g "
                    "null_mass %.2g lse %.2g logits %.2g\n",
            name, T, L, K, route_diff, near_ties, cp.max_err, cg.max_err, cn.max_err, cl.max_err, cz.max_err);
    ck_assert_msg(route_diff == 0, "%s: %ld routing differences beyond near-ties", name, route_diff);
    ck_assert_msg(cp.bad + cg.bad + cn.bad + cl.bad + cz.bad == 0, "%s: values outside tolerance", name);

    free(logits);
    nm_trace_sample_free(&tr);
    nm_engine_free(e);
    free(ids); free(patch); free(np); free(n_real); free(slot); free(want_logits); free(prob); free(gate);
    free(null_mass); free(lse); free(margin); free(order_margin); free(pixels);
    nm_safetensors_close(&st);
    nm_model_free(&m);
}
END_TEST

NM_TEST_SUITE(fixtures) {
    Suite *s = suite_create("fixtures");
    TCase *tc = tcase_create("pytorch_reference");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, test_fixture_case, 0, N_CASES);
    suite_add_tcase(s, tc);
    return s;
}
