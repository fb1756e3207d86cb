// test_train_model.c — the whole model's training forward/backward (nm_train_model.h).
//
// 1. float64 gradient of the total loss (weighted CE + w_bal L_bal + w_z L_z) vs finite
//    differences, for elements of every parameter tensor (all of the small ones, a random
//    sample of the big ones), on a batch of two sequences (one with an image, one text-only)
//    through a model with vision, GQA and a shared expert. Same stencil and metric as
//    test_grad.c (5 points, here h = 5e-4: the model's composition has larger high-order
//    derivatives than one op; relative error with a rounding-noise floor), bar 1e-6.
//    The routers are scaled up so that routing is decisive; an element whose perturbation
//    changes any selection would make the difference meaningless, so the test checks the
//    selection at every stencil point and requires it unchanged.
// 2. float32 vs float64 on the same parameters: loss and gradients (norm-relative <= 1e-4).
// 3. The f32 training forward computes the model the inference engine runs: logits of every
//    position of a sequence vs nm_engine_forward(all_logits), and the same routing.
// 4. Two f32 runs give bit-identical losses and gradients.
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nm_engine.h"
#include "nm_model.h"
#include "nm_sample.h"
#include "nm_trace.h"
#include "nm_train_model.h"
#include "test_util.h"

#define FD_H 5e-4
#define FD_TOL 1e-6
#define F32_TOL 1e-4
#define W_BAL 0.3
#define W_Z 0.05

static nm_config small_config(int shared, int copy) {
    nm_config c;
    nm_config_init_byte(&c);
    c.hidden_size = 16;
    c.num_layers = 2;
    c.num_heads = 2;
    c.num_kv_heads = 1;
    c.head_dim = 8;
    c.max_positions = 64;
    c.moe = (nm_moe_config){.num_experts = 4, .null_copies = 4, .top_k = 3, .expert_hidden = 8,
                            .shared_expert_hidden = shared ? 8 : 0, .null_kind = copy ? NM_NULL_COPY : NM_NULL_ZERO};
    c.has_vision = 1;
    c.image_size = 16;
    c.patch_size = 8;
    c.channels = 3;
    return c;
}

// Two sequences: BOS IMG_START 4 patches IMG_END 6 bytes | BOS 8 bytes. Targets on the text.
static void make_batch(nm_train_batch_f64 *b, nm_train_batch_f32 *bf, const nm_config *c, uint64_t seed) {
    nm_test_rng r = {seed};
    nm_error err = {0};
    const int T = 13 + 9, pp = 3 * c->patch_size * c->patch_size;
    ck_assert_int_eq(nm_train_batch_reserve_f64(b, 2, T, 4, c->patch_size, &err), NM_OK);
    ck_assert_int_eq(nm_train_batch_reserve_f32(bf, 2, T, 4, c->patch_size, &err), NM_OK);
    b->B = 2, b->T = T, b->n_patch = 4;
    b->start[0] = 0, b->start[1] = 13, b->start[2] = T;
    int t = 0;
    b->id[t++] = c->tok.bos;
    b->id[t++] = c->tok.image_start;
    for (int i = 0; i < 4; i++) b->id[t++] = -1;
    b->id[t++] = c->tok.image_end;
    for (int i = 0; i < 6; i++) b->id[t++] = 32 + (int)(nm_test_rng_next(&r) % 90);
    b->id[t++] = c->tok.bos;
    for (int i = 0; i < 8; i++) b->id[t++] = 32 + (int)(nm_test_rng_next(&r) % 90);
    double wsum = 0;
    for (t = 0; t < T; t++) {
        b->patch[t] = t >= 2 && t < 6 ? t - 2 : -1;
        b->modality[t] = b->id[t] < 0 ? NM_MOD_VISION : b->id[t] < 256 ? NM_MOD_TEXT : NM_MOD_SPECIAL;
        const int last = t == 12 || t == T - 1, next_text = !last && b->id[t + 1] >= 0 && b->id[t + 1] < 256;
        b->target[t] = next_text ? b->id[t + 1] : -1;
        b->loss_kind[t] = next_text ? (t >= 9 ? NM_LOSS_ANSWER : NM_LOSS_PROMPT) : NM_LOSS_NONE;
        b->loss_w[t] = next_text ? 0.2 + nm_test_rng_uniform(&r) : 0.0;
        wsum += b->loss_w[t];
    }
    for (t = 0; t < T; t++) b->loss_w[t] /= wsum;
    for (int i = 0; i < 4 * pp; i++) b->patch_rows[i] = nm_test_rng_uniform(&r) * 2 - 1;
    // the f32 batch: the same, rounded
    bf->B = b->B, bf->T = b->T, bf->n_patch = b->n_patch;
    memcpy(bf->start, b->start, 3 * sizeof(int));
    memcpy(bf->id, b->id, T * sizeof(int32_t));
    memcpy(bf->patch, b->patch, T * sizeof(int32_t));
    memcpy(bf->target, b->target, T * sizeof(int32_t));
    memcpy(bf->loss_kind, b->loss_kind, T);
    memcpy(bf->modality, b->modality, T);
    for (t = 0; t < T; t++) bf->loss_w[t] = (float)b->loss_w[t];
    for (int i = 0; i < 4 * pp; i++) {
        bf->patch_rows[i] = (float)b->patch_rows[i];
        b->patch_rows[i] = bf->patch_rows[i];
    }
}

// A random model whose routers are scaled so routing is decisive; params in both precisions.
static void make_params(nm_model *m, double **p64, const nm_config *c, const nm_param_layout *pl, uint64_t seed) {
    nm_error err = {0};
    ck_assert_int_eq(nm_model_init_random(m, c, seed, &err), NM_OK);
    nm_test_rng r = {seed + 1};
    for (size_t i = 0; i < m->arena_len; i++) // init stds are small; widen (x2) so every path carries signal
        m->arena[i] *= 2.0f;
    for (int l = 0; l < c->num_layers; l++) {
        float *router = m->arena + pl->layer[l].router;
        for (int i = 0; i < (c->moe.num_experts + 1) * c->hidden_size; i++) router[i] = (float)nm_test_rng_normal(&r);
        float *n1 = m->arena + pl->layer[l].attn_norm, *n2 = m->arena + pl->layer[l].moe_norm;
        for (int i = 0; i < c->hidden_size; i++) {
            n1[i] = (float)(1 + 0.3 * nm_test_rng_normal(&r));
            n2[i] = (float)(1 + 0.3 * nm_test_rng_normal(&r));
        }
    }
    *p64 = malloc(pl->len * sizeof(double));
    ck_assert_ptr_nonnull(*p64);
    for (size_t i = 0; i < pl->len; i++) (*p64)[i] = m->arena[i];
}

// Routing of every layer, concatenated (n_real, then slots), to detect a changed selection.
static size_t routing_key(const nm_train_acts_f64 *a, const nm_config *c, int T, int16_t *key) {
    size_t n = 0;
    for (int l = 0; l < c->num_layers; l++) {
        const nm_moe_cache_f64 *mc = nm_train_moe_cache_f64(a, l);
        for (int t = 0; t < T; t++) key[n++] = mc->n_real[t];
        for (int i = 0; i < T * c->moe.top_k; i++) key[n++] = mc->slot[i];
    }
    return n;
}

// The smallest logit change that could alter any selection of the last forward: per token
// and layer, with the expanded logits sorted (null copies after reals on ties), the gap at
// the top-K boundary — or, when a null copy sits at rank K, the gap between the null logit
// and the best unselected real (only a real crossing the nulls changes the selection).
static double routing_margin(const nm_train_acts_f64 *a, const nm_config *c, int T) {
    const int N = c->moe.num_experts, M = c->moe.null_copies, K = c->moe.top_k;
    double worst = INFINITY;
    for (int l = 0; l < c->num_layers; l++) {
        const nm_moe_cache_f64 *mc = nm_train_moe_cache_f64(a, l);
        for (int t = 0; t < T; t++) {
            const double *z = mc->logits + (size_t)t * (N + 1);
            double sel_min = INFINITY, unsel_max = -INFINITY; // over reals
            int is_sel[64] = {0};
            for (int k = 0; k < K; k++)
                if (mc->slot[(size_t)t * K + k] >= 0) is_sel[mc->slot[(size_t)t * K + k]] = 1;
            for (int i = 0; i < N; i++) {
                if (is_sel[i]) sel_min = fmin(sel_min, z[i]);
                else unsel_max = fmax(unsel_max, z[i]);
            }
            double m = INFINITY;
            if (sel_min < INFINITY && unsel_max > -INFINITY) m = fmin(m, sel_min - unsel_max);
            if (M > 0) { // reals against the null logit
                if (sel_min < INFINITY && mc->n_real[t] < K) m = fmin(m, sel_min - z[N]);
                if (unsel_max > -INFINITY && mc->n_real[t] < K) m = fmin(m, z[N] - unsel_max);
                if (mc->n_real[t] == K && K - mc->n_real[t] < M) m = fmin(m, sel_min - z[N]);
            }
            worst = fmin(worst, fabs(m));
        }
    }
    return worst;
}

static double loss_at(nm_train_acts_f64 *a, const double *p, const nm_param_layout *pl, const nm_train_batch_f64 *b) {
    nm_train_stats st;
    nm_error err = {0};
    ck_assert_int_eq(nm_train_forward_f64(a, &st, p, pl, b, W_BAL, W_Z, &err), NM_OK);
    return st.loss;
}

typedef struct {
    const char *name;
    size_t off, n;
} tensor_ref;

static int list_tensors(const nm_param_layout *pl, tensor_ref *t) {
    const nm_config *c = &pl->cfg;
    const size_t D = c->hidden_size, V = c->vocab_size, qd = c->num_heads * c->head_dim,
                 kvd = c->num_kv_heads * c->head_dim, N = c->moe.num_experts, H = c->moe.expert_hidden,
                 Hs = c->moe.shared_expert_hidden, pp = 3 * c->patch_size * c->patch_size,
                 np = (size_t)nm_config_num_patches(c);
    int n = 0;
    t[n++] = (tensor_ref){"embed", pl->embed, V * D};
    t[n++] = (tensor_ref){"patch_w", pl->patch_w, D * pp};
    t[n++] = (tensor_ref){"patch_b", pl->patch_b, D};
    t[n++] = (tensor_ref){"pos_embed", pl->pos_embed, np * D};
    t[n++] = (tensor_ref){"norm", pl->norm, D};
    if (pl->lm_head != pl->embed) t[n++] = (tensor_ref){"lm_head", pl->lm_head, V * D};
    for (int l = 0; l < c->num_layers; l++) {
        const nm_layer_offsets *o = &pl->layer[l];
        t[n++] = (tensor_ref){"attn_norm", o->attn_norm, D};
        t[n++] = (tensor_ref){"wq", o->wq, qd * D};
        t[n++] = (tensor_ref){"wk", o->wk, kvd * D};
        t[n++] = (tensor_ref){"wv", o->wv, kvd * D};
        t[n++] = (tensor_ref){"wo", o->wo, D * qd};
        t[n++] = (tensor_ref){"moe_norm", o->moe_norm, D};
        t[n++] = (tensor_ref){"router", o->router, (N + 1) * D};
        t[n++] = (tensor_ref){"gate", o->gate, N * H * D};
        t[n++] = (tensor_ref){"up", o->up, N * H * D};
        t[n++] = (tensor_ref){"down", o->down, N * D * H};
        if (Hs) {
            t[n++] = (tensor_ref){"sh_gate", o->sh_gate, Hs * D};
            t[n++] = (tensor_ref){"sh_up", o->sh_up, Hs * D};
            t[n++] = (tensor_ref){"sh_down", o->sh_down, D * Hs};
        }
    }
    return n;
}

static void check_model_grad(int shared, int copy, uint64_t seed) {
    nm_config c = small_config(shared, copy);
    nm_error err = {0};
    nm_param_layout pl;
    ck_assert_int_eq(nm_param_layout_init(&pl, &c, &err), NM_OK);
    nm_model m;
    double *p = NULL;
    nm_train_batch_f64 b = {0};
    nm_train_batch_f32 bf = {0};
    nm_train_acts_f64 a = {0};
    // draw cases until no selection is within 0.05 in logit of a tie: finite differences of
    // 2e-3 in a weight then move no boundary (checked at every stencil point below)
    double margin = 0;
    for (int tries = 0; tries < 500; tries++, seed += 1000) {
        if (p) {
            free(p);
            nm_model_free(&m);
        }
        make_params(&m, &p, &c, &pl, seed);
        make_batch(&b, &bf, &c, seed + 7);
        loss_at(&a, p, &pl, &b);
        if ((margin = routing_margin(&a, &c, b.T)) >= 0.05) break;
    }
    ck_assert_msg(margin >= 0.05, "no case without near-ties found");
    double *g = calloc(pl.len, sizeof(double));
    ck_assert_ptr_nonnull(g);
    const double L0 = loss_at(&a, p, &pl, &b);
    ck_assert(isfinite(L0) && L0 > 0);
    ck_assert_int_eq(nm_train_backward_f64(&a, g, p, &pl, &b, W_BAL, W_Z, &err), NM_OK);
    const size_t key_len = (size_t)c.num_layers * b.T * (1 + c.moe.top_k);
    int16_t *key0 = malloc(key_len * sizeof(int16_t)), *key = malloc(key_len * sizeof(int16_t));
    ck_assert(key0 && key);
    loss_at(&a, p, &pl, &b);
    routing_key(&a, &c, b.T, key0);
    { // the case must exercise both: tokens with null slots and tokens with real experts
        long nulls = 0, reals = 0;
        for (int l = 0; l < c.num_layers; l++)
            for (int t = 0; t < b.T; t++) {
                int nr = nm_train_moe_cache_f64(&a, l)->n_real[t];
                reals += nr;
                nulls += c.moe.top_k - nr;
            }
        ck_assert_msg(nulls > 0 && reals > 0, "routing uses only one kind of slot (%ld real, %ld null)", reals, nulls);
    }

    const double noise = 16 * DBL_EPSILON * fabs(L0) * 4 / FD_H; // rounding of the 5-point difference
    tensor_ref t[64];
    int nt = list_tensors(&pl, t);
    nm_test_rng r = {seed + 99};
    double worst = 0;
    long checked = 0;
    for (int i = 0; i < nt; i++) {
        double tw = 0;
        const size_t n_check = t[i].n <= 300 ? t[i].n : 300;
        for (size_t k = 0; k < n_check; k++) {
            size_t j = t[i].off + (t[i].n <= 300 ? k : nm_test_rng_next(&r) % t[i].n);
            const double x = p[j];
            double Lh[4];
            const double steps[4] = {2, 1, -1, -2};
            for (int s = 0; s < 4; s++) {
                p[j] = x + steps[s] * FD_H;
                Lh[s] = loss_at(&a, p, &pl, &b);
                routing_key(&a, &c, b.T, key);
                if (memcmp(key, key0, key_len * sizeof(int16_t)))
                    ck_abort_msg("%s[%zu]: a perturbation of %g changed the routing (seed %llu): redraw the case",
                                 t[i].name, j - t[i].off, steps[s] * FD_H, (unsigned long long)seed);
            }
            p[j] = x;
            const double fd = (-Lh[0] + 8 * Lh[1] - 8 * Lh[2] + Lh[3]) / (12 * FD_H), an = g[j];
            const double diff = fabs(an - fd), scale = fmax(fmax(fabs(an), fabs(fd)), noise / FD_TOL);
            const double e = diff / scale;
            tw = fmax(tw, e);
            checked++;
        }
        if (tw > FD_TOL) printf("  grad_model %s%s: %s worst %.2e\n", shared ? "shared " : "", copy ? "copy" : "zero",
                                t[i].name, tw);
        worst = fmax(worst, tw);
    }
    printf("  whole model (%s expert, %s nulls): %ld gradient elements vs finite differences, worst %.2e\n",
           shared ? "shared" : "no shared", copy ? "copy" : "zero", checked, worst);
    ck_assert_msg(worst <= FD_TOL, "whole-model gradient error %.3e > %.0e", worst, FD_TOL);

    // 2. f32 vs f64
    nm_train_acts_f32 af = {0};
    nm_train_stats sf;
    float *gf = calloc(pl.len, sizeof(float));
    ck_assert_ptr_nonnull(gf);
    ck_assert_int_eq(nm_train_forward_f32(&af, &sf, m.arena, &pl, &bf, W_BAL, W_Z, &err), NM_OK);
    ck_assert_int_eq(nm_train_backward_f32(&af, gf, m.arena, &pl, &bf, W_BAL, W_Z, &err), NM_OK);
    ck_assert_msg(fabs(sf.loss - L0) <= F32_TOL * fabs(L0), "f32 loss %.8g vs f64 %.8g", sf.loss, L0);
    for (int i = 0; i < nt; i++) {
        double mx = 0, md = 0;
        for (size_t k = 0; k < t[i].n; k++) {
            mx = fmax(mx, fabs(g[t[i].off + k]));
            md = fmax(md, fabs(g[t[i].off + k] - gf[t[i].off + k]));
        }
        ck_assert_msg(md <= F32_TOL * fmax(mx, 1e-12), "f32 gradient of %s: max diff %.3e vs max %.3e", t[i].name, md,
                      mx);
    }
    // 4. a second f32 run is bit-identical
    float *gf2 = calloc(pl.len, sizeof(float));
    nm_train_stats sf2;
    ck_assert_ptr_nonnull(gf2);
    ck_assert_int_eq(nm_train_forward_f32(&af, &sf2, m.arena, &pl, &bf, W_BAL, W_Z, &err), NM_OK);
    ck_assert_int_eq(nm_train_backward_f32(&af, gf2, m.arena, &pl, &bf, W_BAL, W_Z, &err), NM_OK);
    ck_assert(sf2.loss == sf.loss);
    ck_assert(!memcmp(gf, gf2, pl.len * sizeof(float)));

    free(gf2);
    free(gf);
    nm_train_acts_free_f32(&af);
    free(key0);
    free(key);
    free(g);
    free(p);
    nm_train_acts_free_f64(&a);
    nm_train_batch_free_f64(&b);
    nm_train_batch_free_f32(&bf);
    nm_model_free(&m);
    nm_param_layout_free(&pl);
}

START_TEST(test_model_grad_zero) { check_model_grad(1, 0, 41); }
END_TEST
START_TEST(test_model_grad_noshared) { check_model_grad(0, 0, 52); }
END_TEST
START_TEST(test_model_grad_copy) { check_model_grad(1, 1, 63); }
END_TEST

// 3. The training forward is the inference model: logits at every position and routing.
START_TEST(test_train_matches_engine) {
    nm_config c = small_config(1, 0);
    c.hidden_size = 32;
    c.moe.expert_hidden = 16;
    nm_error err = {0};
    nm_param_layout pl;
    ck_assert_int_eq(nm_param_layout_init(&pl, &c, &err), NM_OK);
    nm_model m;
    double *p;
    make_params(&m, &p, &c, &pl, 77);
    free(p);
    nm_train_batch_f64 b = {0};
    nm_train_batch_f32 bf = {0};
    make_batch(&b, &bf, &c, 78);
    // one sequence (the image one), loss at every position so every logit row is computed
    const int T = bf.start[1];
    bf.B = 1, bf.T = T;
    bf.start[1] = T;
    for (int t = 0; t < T; t++) {
        bf.target[t] = 65;
        bf.loss_w[t] = 1.0f / T;
    }
    nm_train_acts_f32 a = {0};
    nm_train_stats st;
    ck_assert_int_eq(nm_train_forward_f32(&a, &st, m.arena, &pl, &bf, W_BAL, W_Z, &err), NM_OK);
    int n;
    const int32_t *rows;
    const float *lt = nm_train_logits_f32(&a, &n, &rows);
    ck_assert_int_eq(n, T);
    // the engine on the same tokens; pixels rebuilt from the patch rows
    const int S = c.image_size, pz = c.patch_size, g = S / pz;
    float *pixels = malloc((size_t)3 * S * S * sizeof(float)), *le = malloc((size_t)T * c.vocab_size * sizeof(float));
    ck_assert(pixels && le);
    for (int r = 0; r < 4; r++)
        for (int ch = 0; ch < 3; ch++)
            for (int y = 0; y < pz; y++)
                memcpy(pixels + ((size_t)ch * S + (r / g) * pz + y) * S + (r % g) * pz,
                       bf.patch_rows + (size_t)r * 3 * pz * pz + (ch * pz + y) * pz, pz * sizeof(float));
    nm_engine *e = NULL;
    nm_trace_sample tr = {0};
    ck_assert_int_eq(nm_engine_create(&e, &m, 64, &err), NM_OK);
    ck_assert_int_eq(nm_trace_sample_init(&tr, c.num_layers, c.moe.top_k, T, &err), NM_OK);
    ck_assert_int_eq(nm_engine_forward(e, bf.id, bf.patch, pixels, T, le, 1, &tr, &err), NM_OK);
    double worst = 0, mx = 0;
    for (int i = 0; i < T * c.vocab_size; i++) {
        worst = fmax(worst, fabs((double)lt[i] - le[i]));
        mx = fmax(mx, fabs((double)le[i]));
    }
    printf("  training forward vs engine logits: max |diff| %.2e (max |logit| %.2f)\n", worst, mx);
    ck_assert_msg(worst <= 1e-4 * fmax(mx, 1.0), "logits differ by %.3e", worst);
    for (int l = 0; l < c.num_layers; l++) {
        const nm_moe_cache_f32 *mc = nm_train_moe_cache_f32(&a, l);
        for (int t = 0; t < T; t++) {
            ck_assert_int_eq(mc->n_real[t], tr.n_real[(size_t)l * tr.capacity + t]);
            for (int k = 0; k < c.moe.top_k; k++)
                ck_assert_int_eq(mc->slot[(size_t)t * c.moe.top_k + k], tr.slot[((size_t)l * tr.capacity + t) * c.moe.top_k + k]);
        }
    }
    nm_trace_sample_free(&tr);
    nm_engine_free(e);
    free(pixels);
    free(le);
    nm_train_acts_free_f32(&a);
    nm_train_batch_free_f64(&b);
    nm_train_batch_free_f32(&bf);
    nm_model_free(&m);
    nm_param_layout_free(&pl);
}
END_TEST

NM_TEST_SUITE(grad_model) {
    Suite *s = suite_create("grad_model");
    TCase *tc = tcase_create("model");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_model_grad_zero);
    tcase_add_test(tc, test_model_grad_noshared);
    tcase_add_test(tc, test_model_grad_copy);
    tcase_add_test(tc, test_train_matches_engine);
    suite_add_tcase(s, tc);
    return s;
}
