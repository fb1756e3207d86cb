// test_metrics.c — the metrics of DESIGN.md §5 on hand-made samples with hand-computed answers,
// and against a straightforward float64 recomputation from the definitions on random samples.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "nm_metrics.h"
#include "test_util.h"

#define TOL 1e-12

// ---- test samples: only the fields the metrics read, allocated here (no nm_trace.c needed) ----

static void sample_alloc(nm_trace_sample *s, int L, int K, int capacity, int n_tokens) {
    memset(s, 0, sizeof *s);
    s->n_layers = L;
    s->top_k = K;
    s->capacity = capacity;
    s->n_tokens = n_tokens;
    size_t cap = capacity > 0 ? (size_t)capacity : 1;
    s->modality = calloc(cap, 1);
    s->segment = calloc(cap, 1);
    s->n_real = calloc((size_t)L * cap, 1);
    ck_assert_ptr_nonnull(s->modality);
    ck_assert_ptr_nonnull(s->segment);
    ck_assert_ptr_nonnull(s->n_real);
}

static void sample_release(nm_trace_sample *s) {
    free(s->modality);
    free(s->segment);
    free(s->n_real);
    memset(s, 0, sizeof *s);
}

// Fills unused capacity with values that would be errors if read: stride bugs fail loudly.
static void poison_tail(nm_trace_sample *s) {
    for (int t = s->n_tokens; t < s->capacity; t++) {
        s->modality[t] = 200;
        s->segment[t] = 200;
        for (int l = 0; l < s->n_layers; l++) s->n_real[(size_t)l * s->capacity + t] = 255;
    }
}

typedef struct { int mod, seg; int n_real[8]; } tok;

static void sample_from_table(nm_trace_sample *s, int L, int K, int capacity, const tok *toks, int n) {
    sample_alloc(s, L, K, capacity, n);
    for (int t = 0; t < n; t++) {
        s->modality[t] = (uint8_t)toks[t].mod;
        s->segment[t] = (uint8_t)toks[t].seg;
        for (int l = 0; l < L; l++) s->n_real[(size_t)l * capacity + t] = (uint8_t)toks[t].n_real[l];
    }
    poison_tail(s);
}

static void init_ok(nm_metrics *m, int L, int K) {
    nm_error err = {0};
    nm_status st = nm_metrics_init(m, L, K, &err);
    ck_assert_msg(st == NM_OK, "init: %s", err.msg);
}

static void add_ok(nm_metrics *m, const nm_trace_sample *s) {
    nm_error err = {0};
    nm_status st = nm_metrics_add_sample(m, s, &err);
    ck_assert_msg(st == NM_OK, "add_sample: %s", err.msg);
}

#define ASSERT_NEAR(a, b)                                                                     \
    do {                                                                                      \
        double a_ = (a), b_ = (b);                                                            \
        ck_assert_msg(fabs(a_ - b_) <= TOL * (1.0 + fabs(b_)), "%s = %.17g, expected %.17g", #a, \
                      a_, b_);                                                                \
    } while (0)
#define ASSERT_NAN(a) ck_assert_msg(isnan(a), "%s = %.17g, expected NAN", #a, (double)(a))

// Same value, NAN included (bit-level for non-NAN: exact reproducibility).
static int same_double(double a, double b) { return (isnan(a) && isnan(b)) || a == b; }

static void assert_metrics_equal(const nm_metrics *a, const nm_metrics *b) {
    ck_assert_int_eq(a->n_layers, b->n_layers);
    ck_assert_int_eq(a->top_k, b->top_k);
    int L = a->n_layers, K = a->top_k;
    for (int g = 0; g <= NM_MOD_ALL; g++) {
        ck_assert_int_eq(a->n_tokens[g], b->n_tokens[g]);
        ck_assert(same_double(a->token_share[g], b->token_share[g]));
        ck_assert(same_double(a->compute_sum[g], b->compute_sum[g]));
        ck_assert(same_double(a->compute_share[g], b->compute_share[g]));
        ck_assert(same_double(a->intensity[g], b->intensity[g]));
    }
    for (int g = 0; g <= NM_SEG_ALL; g++) {
        ck_assert_int_eq(a->n_seg_tokens[g], b->n_seg_tokens[g]);
        ck_assert(same_double(a->seg_intensity[g], b->seg_intensity[g]));
    }
    ck_assert_int_eq(a->compute_share_defined, b->compute_share_defined);
    ck_assert(same_double(a->null_slot_ratio, b->null_slot_ratio));
    ck_assert(same_double(a->zero_compute_ratio, b->zero_compute_ratio));
    for (int l = 0; l <= L; l++) {
        for (int g = 0; g <= NM_MOD_ALL; g++) {
            ck_assert(same_double(nm_metrics_layer_intensity(a, l, g), nm_metrics_layer_intensity(b, l, g)));
            for (int k = 0; k <= K; k++)
                ck_assert_int_eq(nm_metrics_polarization(a, l, g, k), nm_metrics_polarization(b, l, g, k));
        }
        for (int g = 0; g <= NM_SEG_ALL; g++) {
            ck_assert(same_double(nm_metrics_layer_seg_intensity(a, l, g),
                                  nm_metrics_layer_seg_intensity(b, l, g)));
            for (int k = 0; k <= K; k++)
                ck_assert_int_eq(nm_metrics_seg_polarization(a, l, g, k),
                                 nm_metrics_seg_polarization(b, l, g, k));
        }
    }
}

// ---- (a) a small mixed sample, every number by hand ----
//
// L = 2, K = 4, 7 tokens (image-first layout: BOS, IMG_START, 2 patches, IMG_END, prompt, answer):
//   t  modality  segment   n_real(l0, l1)   c_t = (n0 + n1) / 8
//   0  special   bos       4, 2             0.75
//   1  special   image     0, 0             0
//   2  vision    image     1, 3             0.5
//   3  vision    image     0, 0             0
//   4  special   image     2, 0             0.25
//   5  text      prompt    4, 4             1
//   6  text      answer    3, 1             0.5
// Tokens: text 2, vision 2, special 3, total 7 → token share 2/7, 2/7, 3/7.
// Σ_t c_t: text 1.5, vision 0.5, special 1.0, all 3.0 → compute share 1/2, 1/6, 1/3.
// Intensity: text 1.5/2 = 0.75, vision 0.5/2 = 0.25, special 1/3, overall 3/7.
// Layer 0: text (4+3)/8 = 7/8, vision (1+0)/8 = 1/8, special (4+0+2)/12 = 1/2, all 14/28 = 1/2.
// Layer 1: text (4+1)/8 = 5/8, vision (3+0)/8 = 3/8, special (2+0+0)/12 = 1/6, all 10/28 = 5/14.
// Segments: bos 0.75; image (0 + 0.5 + 0 + 0.25)/4 = 0.1875; prompt 1; answer 0.5; all 3/7.
// Layer 0 segments: bos 4/4 = 1, image (0+1+0+2)/16 = 3/16; layer 1: bos 2/4, image 3/16.
// Null slot ratio 1 − 3/7 = 4/7. Zero pairs: layer 0 {t1, t3}, layer 1 {t1, t3, t4} → 5/14.
// Polarization (all modalities), k = 0…4: layer 0: 2 1 1 1 2; layer 1: 3 1 1 1 1; all: 5 2 2 2 3.
// Vision, all layers: 2 1 0 1 0; special, layer 0: 1 0 1 0 1. Image segment, all layers: 5 1 1 1 0.
static const tok mixed[] = {
    {NM_MOD_SPECIAL, NM_SEG_BOS, {4, 2}},    {NM_MOD_SPECIAL, NM_SEG_IMAGE, {0, 0}},
    {NM_MOD_VISION, NM_SEG_IMAGE, {1, 3}},   {NM_MOD_VISION, NM_SEG_IMAGE, {0, 0}},
    {NM_MOD_SPECIAL, NM_SEG_IMAGE, {2, 0}},  {NM_MOD_TEXT, NM_SEG_PROMPT, {4, 4}},
    {NM_MOD_TEXT, NM_SEG_ANSWER, {3, 1}},
};
#define N_MIXED ((int)(sizeof mixed / sizeof mixed[0]))

static void check_mixed(const nm_metrics *m) {
    ck_assert_int_eq(m->n_tokens[NM_MOD_TEXT], 2);
    ck_assert_int_eq(m->n_tokens[NM_MOD_VISION], 2);
    ck_assert_int_eq(m->n_tokens[NM_MOD_SPECIAL], 3);
    ck_assert_int_eq(m->n_tokens[NM_MOD_ALL], 7);
    ck_assert_int_eq(m->n_seg_tokens[NM_SEG_BOS], 1);
    ck_assert_int_eq(m->n_seg_tokens[NM_SEG_IMAGE], 4);
    ck_assert_int_eq(m->n_seg_tokens[NM_SEG_PROMPT], 1);
    ck_assert_int_eq(m->n_seg_tokens[NM_SEG_ANSWER], 1);
    ck_assert_int_eq(m->n_seg_tokens[NM_SEG_ALL], 7);

    ASSERT_NEAR(m->token_share[NM_MOD_TEXT], 2.0 / 7);
    ASSERT_NEAR(m->token_share[NM_MOD_VISION], 2.0 / 7);
    ASSERT_NEAR(m->token_share[NM_MOD_SPECIAL], 3.0 / 7);
    ASSERT_NEAR(m->token_share[NM_MOD_ALL], 1.0);

    ASSERT_NEAR(m->compute_sum[NM_MOD_TEXT], 1.5);
    ASSERT_NEAR(m->compute_sum[NM_MOD_VISION], 0.5);
    ASSERT_NEAR(m->compute_sum[NM_MOD_SPECIAL], 1.0);
    ASSERT_NEAR(m->compute_sum[NM_MOD_ALL], 3.0);
    ck_assert_int_eq(m->compute_share_defined, 1);
    ASSERT_NEAR(m->compute_share[NM_MOD_TEXT], 0.5);
    ASSERT_NEAR(m->compute_share[NM_MOD_VISION], 1.0 / 6);
    ASSERT_NEAR(m->compute_share[NM_MOD_SPECIAL], 1.0 / 3);
    ASSERT_NEAR(m->compute_share[NM_MOD_ALL], 1.0);

    ASSERT_NEAR(m->intensity[NM_MOD_TEXT], 0.75);
    ASSERT_NEAR(m->intensity[NM_MOD_VISION], 0.25);
    ASSERT_NEAR(m->intensity[NM_MOD_SPECIAL], 1.0 / 3);
    ASSERT_NEAR(m->intensity[NM_MOD_ALL], 3.0 / 7);

    ASSERT_NEAR(nm_metrics_layer_intensity(m, 0, NM_MOD_TEXT), 7.0 / 8);
    ASSERT_NEAR(nm_metrics_layer_intensity(m, 0, NM_MOD_VISION), 1.0 / 8);
    ASSERT_NEAR(nm_metrics_layer_intensity(m, 0, NM_MOD_SPECIAL), 0.5);
    ASSERT_NEAR(nm_metrics_layer_intensity(m, 0, NM_MOD_ALL), 0.5);
    ASSERT_NEAR(nm_metrics_layer_intensity(m, 1, NM_MOD_TEXT), 5.0 / 8);
    ASSERT_NEAR(nm_metrics_layer_intensity(m, 1, NM_MOD_VISION), 3.0 / 8);
    ASSERT_NEAR(nm_metrics_layer_intensity(m, 1, NM_MOD_SPECIAL), 1.0 / 6);
    ASSERT_NEAR(nm_metrics_layer_intensity(m, 1, NM_MOD_ALL), 5.0 / 14);
    for (int g = 0; g <= NM_MOD_ALL; g++) // the all-layers row is the intensity
        ck_assert(same_double(nm_metrics_layer_intensity(m, NM_LAYER_ALL(m), g), m->intensity[g]));

    ASSERT_NEAR(m->seg_intensity[NM_SEG_BOS], 0.75);
    ASSERT_NEAR(m->seg_intensity[NM_SEG_IMAGE], 0.1875);
    ASSERT_NEAR(m->seg_intensity[NM_SEG_PROMPT], 1.0);
    ASSERT_NEAR(m->seg_intensity[NM_SEG_ANSWER], 0.5);
    ASSERT_NEAR(m->seg_intensity[NM_SEG_ALL], 3.0 / 7);
    ASSERT_NEAR(nm_metrics_layer_seg_intensity(m, 0, NM_SEG_BOS), 1.0);
    ASSERT_NEAR(nm_metrics_layer_seg_intensity(m, 0, NM_SEG_IMAGE), 3.0 / 16);
    ASSERT_NEAR(nm_metrics_layer_seg_intensity(m, 1, NM_SEG_BOS), 0.5);
    ASSERT_NEAR(nm_metrics_layer_seg_intensity(m, 1, NM_SEG_IMAGE), 3.0 / 16);
    ASSERT_NEAR(nm_metrics_layer_seg_intensity(m, 2, NM_SEG_IMAGE), 0.1875);

    ASSERT_NEAR(m->null_slot_ratio, 4.0 / 7);
    ASSERT_NEAR(m->zero_compute_ratio, 5.0 / 14);
    ASSERT_NEAR(nm_metrics_zero_compute(m, 0, NM_MOD_ALL), 2.0 / 7);
    ASSERT_NEAR(nm_metrics_zero_compute(m, 1, NM_MOD_ALL), 3.0 / 7);
    ASSERT_NEAR(nm_metrics_zero_compute(m, 2, NM_MOD_VISION), 0.5);

    const long long l0[] = {2, 1, 1, 1, 2}, l1[] = {3, 1, 1, 1, 1}, all[] = {5, 2, 2, 2, 3};
    const long long vis_all[] = {2, 1, 0, 1, 0}, spec_l0[] = {1, 0, 1, 0, 1};
    const long long img_all[] = {5, 1, 1, 1, 0};
    for (int k = 0; k <= 4; k++) {
        ck_assert_int_eq(nm_metrics_polarization(m, 0, NM_MOD_ALL, k), l0[k]);
        ck_assert_int_eq(nm_metrics_polarization(m, 1, NM_MOD_ALL, k), l1[k]);
        ck_assert_int_eq(nm_metrics_polarization(m, 2, NM_MOD_ALL, k), all[k]);
        ck_assert_int_eq(nm_metrics_polarization(m, 2, NM_MOD_VISION, k), vis_all[k]);
        ck_assert_int_eq(nm_metrics_polarization(m, 0, NM_MOD_SPECIAL, k), spec_l0[k]);
        ck_assert_int_eq(nm_metrics_seg_polarization(m, 2, NM_SEG_IMAGE, k), img_all[k]);
        ck_assert_int_eq(nm_metrics_seg_polarization(m, 2, NM_SEG_ALL, k), all[k]);
    }
    ck_assert_int_eq(nm_metrics_pairs(m, 2, NM_MOD_ALL), 14);
    ck_assert_int_eq(nm_metrics_pairs(m, 0, NM_MOD_SPECIAL), 3);
}

START_TEST(test_mixed_by_hand) {
    nm_trace_sample s;
    sample_from_table(&s, 2, 4, N_MIXED, mixed, N_MIXED);
    nm_metrics m;
    init_ok(&m, 2, 4);
    add_ok(&m, &s);
    nm_metrics_finish(&m);
    ck_assert_int_eq(m.n_samples, 1);
    check_mixed(&m);
    nm_metrics_finish(&m); // idempotent
    check_mixed(&m);

    // per-token scores for overlays: c_t (layer = L) and c_{l,t}
    double c[N_MIXED];
    const double c_mean[N_MIXED] = {0.75, 0, 0.5, 0, 0.25, 1, 0.5};
    const double c_l1[N_MIXED] = {0.5, 0, 0.75, 0, 0, 1, 0.25};
    nm_error err = {0};
    ck_assert_int_eq(nm_metrics_token_scores(&s, 2, c, &err), NM_OK);
    for (int t = 0; t < N_MIXED; t++) ASSERT_NEAR(c[t], c_mean[t]);
    ck_assert_int_eq(nm_metrics_token_scores(&s, 1, c, &err), NM_OK);
    for (int t = 0; t < N_MIXED; t++) ASSERT_NEAR(c[t], c_l1[t]);
    ck_assert_int_eq(nm_metrics_token_scores(&s, 3, c, &err), NM_ERR_INVALID);
    ck_assert_int_eq(nm_metrics_token_scores(&s, -1, c, &err), NM_ERR_INVALID);

    nm_metrics_free(&m);
    ck_assert_ptr_null(m.polarization);
    nm_metrics_free(&m); // safe twice
    sample_release(&s);
}
END_TEST

// ---- (b) no vision tokens: vision intensity NAN, token share 0, compute share 0 ----
//   text (2, 2) c = 1/2; text (1, 0) c = 1/8; special (0, 0) c = 0. L = 2, K = 4.
START_TEST(test_no_vision) {
    const tok toks[] = {
        {NM_MOD_TEXT, NM_SEG_PROMPT, {2, 2}},
        {NM_MOD_TEXT, NM_SEG_ANSWER, {1, 0}},
        {NM_MOD_SPECIAL, NM_SEG_BOS, {0, 0}},
    };
    nm_trace_sample s;
    sample_from_table(&s, 2, 4, 3, toks, 3);
    nm_metrics m;
    init_ok(&m, 2, 4);
    add_ok(&m, &s);
    nm_metrics_finish(&m);
    ck_assert_int_eq(m.n_tokens[NM_MOD_VISION], 0);
    ASSERT_NEAR(m.token_share[NM_MOD_VISION], 0.0);
    ASSERT_NEAR(m.token_share[NM_MOD_TEXT], 2.0 / 3);
    ASSERT_NAN(m.intensity[NM_MOD_VISION]);
    ASSERT_NAN(nm_metrics_layer_intensity(&m, 0, NM_MOD_VISION));
    ASSERT_NAN(nm_metrics_zero_compute(&m, 0, NM_MOD_VISION));
    ASSERT_NAN(m.seg_intensity[NM_SEG_IMAGE]);
    ck_assert_int_eq(m.compute_share_defined, 1);
    ASSERT_NEAR(m.compute_share[NM_MOD_VISION], 0.0);
    ASSERT_NEAR(m.compute_sum[NM_MOD_VISION], 0.0);
    ASSERT_NEAR(m.compute_share[NM_MOD_TEXT], 1.0);
    ASSERT_NEAR(m.compute_share[NM_MOD_SPECIAL], 0.0);
    ASSERT_NEAR(m.intensity[NM_MOD_TEXT], 5.0 / 16);
    ASSERT_NEAR(m.intensity[NM_MOD_SPECIAL], 0.0);
    ASSERT_NEAR(m.intensity[NM_MOD_ALL], 5.0 / 24);
    for (int k = 0; k <= 4; k++) ck_assert_int_eq(nm_metrics_polarization(&m, 2, NM_MOD_VISION, k), 0);
    nm_metrics_free(&m);
    sample_release(&s);
}
END_TEST

// ---- (c) every n_real = 0: compute share undefined, ratios 1 ----
START_TEST(test_all_null) {
    nm_trace_sample s;
    sample_alloc(&s, 3, 4, 5, 5);
    const uint8_t mods[5] = {NM_MOD_SPECIAL, NM_MOD_VISION, NM_MOD_VISION, NM_MOD_TEXT, NM_MOD_TEXT};
    for (int t = 0; t < 5; t++) {
        s.modality[t] = mods[t];
        s.segment[t] = (uint8_t)(t == 0 ? NM_SEG_BOS : t < 3 ? NM_SEG_IMAGE : NM_SEG_PROMPT);
    }
    nm_metrics m;
    init_ok(&m, 3, 4);
    add_ok(&m, &s);
    nm_metrics_finish(&m);
    ck_assert_int_eq(m.compute_share_defined, 0);
    for (int g = 0; g <= NM_MOD_ALL; g++) {
        ASSERT_NAN(m.compute_share[g]);
        ASSERT_NEAR(m.compute_sum[g], 0.0);
        ASSERT_NEAR(m.intensity[g], 0.0); // defined (tokens exist) and 0, unlike the share
    }
    ASSERT_NEAR(m.token_share[NM_MOD_VISION], 0.4);
    ASSERT_NEAR(m.zero_compute_ratio, 1.0);
    ASSERT_NEAR(m.null_slot_ratio, 1.0);
    ck_assert_int_eq(nm_metrics_polarization(&m, 3, NM_MOD_ALL, 0), 15);
    for (int k = 1; k <= 4; k++) ck_assert_int_eq(nm_metrics_polarization(&m, 3, NM_MOD_ALL, k), 0);
    nm_metrics_free(&m);
    sample_release(&s);
}
END_TEST

// ---- no tokens at all: everything undefined, nothing crashes ----
// ---- one layer with every token at n_real = 0, the other layer not ----
//   L = 2, K = 2. Layer 0: all null. Layer 1: n_real = 2, 1, 2 (vision, text, text).
//   c_t = (0 + 1)/2, (0 + 1/2)/2, (0 + 1)/2 = 0.5, 0.25, 0.5; intensity all = 1.25/3.
//   zero-compute: layer 0 ratio 1, layer 1 ratio 0, overall 3/6.
START_TEST(test_one_layer_all_null) {
    static const tok toks[] = {{NM_MOD_VISION, NM_SEG_IMAGE, {0, 2}},
                               {NM_MOD_TEXT, NM_SEG_PROMPT, {0, 1}},
                               {NM_MOD_TEXT, NM_SEG_PROMPT, {0, 2}}};
    nm_trace_sample s;
    sample_from_table(&s, 2, 2, 3, toks, 3);
    nm_metrics m;
    init_ok(&m, 2, 2);
    add_ok(&m, &s);
    nm_metrics_finish(&m);
    ASSERT_NEAR(nm_metrics_layer_intensity(&m, 0, NM_MOD_ALL), 0.0);
    ASSERT_NEAR(nm_metrics_layer_intensity(&m, 0, NM_MOD_VISION), 0.0);
    ASSERT_NEAR(nm_metrics_zero_compute(&m, 0, NM_MOD_ALL), 1.0);
    ASSERT_NEAR(nm_metrics_layer_intensity(&m, 1, NM_MOD_ALL), 2.5 / 3);
    ASSERT_NEAR(nm_metrics_layer_intensity(&m, 1, NM_MOD_TEXT), 0.75);
    ASSERT_NEAR(nm_metrics_zero_compute(&m, 1, NM_MOD_ALL), 0.0);
    ASSERT_NEAR(m.intensity[NM_MOD_ALL], 1.25 / 3);
    ASSERT_NEAR(m.intensity[NM_MOD_VISION], 0.5);
    ASSERT_NEAR(m.zero_compute_ratio, 0.5);
    ASSERT_NEAR(m.null_slot_ratio, 1.0 - 1.25 / 3);
    ck_assert(m.compute_share_defined);
    ASSERT_NEAR(m.compute_share[NM_MOD_VISION], 0.5 / 1.25);
    ck_assert_int_eq(nm_metrics_polarization(&m, 0, NM_MOD_ALL, 0), 3);
    ck_assert_int_eq(nm_metrics_polarization(&m, 1, NM_MOD_ALL, 2), 2);
    nm_metrics_free(&m);
    sample_release(&s);
}
END_TEST

START_TEST(test_empty) {
    nm_metrics m;
    init_ok(&m, 2, 3);
    nm_trace_sample s;
    sample_alloc(&s, 2, 3, 4, 0);
    poison_tail(&s);
    add_ok(&m, &s);
    nm_metrics_finish(&m);
    ck_assert_int_eq(m.n_samples, 1);
    ck_assert_int_eq(m.n_tokens[NM_MOD_ALL], 0);
    ck_assert_int_eq(m.compute_share_defined, 0);
    for (int g = 0; g <= NM_MOD_ALL; g++) {
        ASSERT_NAN(m.token_share[g]);
        ASSERT_NAN(m.compute_share[g]);
        ASSERT_NAN(m.intensity[g]);
    }
    ASSERT_NAN(m.null_slot_ratio);
    ASSERT_NAN(m.zero_compute_ratio);
    nm_metrics_free(&m);
    sample_release(&s);
}
END_TEST

// ---- (d) K = 1: c_{l,t} ∈ {0, 1}; the null slot ratio equals the zero-compute ratio ----
//   L = 3: text (1,1,1) c = 1; text (0,1,0) c = 1/3; text (0,0,0) c = 0; vision (1,0,0) c = 1/3.
//   text intensity 4/9, vision 1/3, overall 5/12; zero pairs 0 + 2 + 3 + 2 = 7 of 12.
START_TEST(test_top1) {
    const tok toks[] = {
        {NM_MOD_TEXT, NM_SEG_PROMPT, {1, 1, 1}},
        {NM_MOD_TEXT, NM_SEG_PROMPT, {0, 1, 0}},
        {NM_MOD_TEXT, NM_SEG_ANSWER, {0, 0, 0}},
        {NM_MOD_VISION, NM_SEG_IMAGE, {1, 0, 0}},
    };
    nm_trace_sample s;
    sample_from_table(&s, 3, 1, 4, toks, 4);
    nm_metrics m;
    init_ok(&m, 3, 1);
    add_ok(&m, &s);
    nm_metrics_finish(&m);
    ASSERT_NEAR(m.intensity[NM_MOD_TEXT], 4.0 / 9);
    ASSERT_NEAR(m.intensity[NM_MOD_VISION], 1.0 / 3);
    ASSERT_NEAR(m.intensity[NM_MOD_ALL], 5.0 / 12);
    ASSERT_NEAR(m.compute_share[NM_MOD_TEXT], 0.8);
    ASSERT_NEAR(m.compute_share[NM_MOD_VISION], 0.2);
    ASSERT_NEAR(m.zero_compute_ratio, 7.0 / 12);
    ASSERT_NEAR(m.null_slot_ratio, 7.0 / 12);
    ck_assert_int_eq(nm_metrics_polarization(&m, 3, NM_MOD_ALL, 0), 7);
    ck_assert_int_eq(nm_metrics_polarization(&m, 3, NM_MOD_ALL, 1), 5);
    ck_assert_int_eq(nm_metrics_polarization(&m, 3, NM_MOD_ALL, 2), 0); // out of range
    ASSERT_NEAR(nm_metrics_layer_intensity(&m, 0, NM_MOD_TEXT), 1.0 / 3);
    ASSERT_NEAR(nm_metrics_layer_intensity(&m, 1, NM_MOD_TEXT), 2.0 / 3);
    ASSERT_NEAR(nm_metrics_layer_intensity(&m, 2, NM_MOD_TEXT), 1.0 / 3);
    nm_metrics_free(&m);
    sample_release(&s);
}
END_TEST

// ---- (e) two samples aggregated = one concatenated sample, in any order ----
START_TEST(test_aggregate_concat) {
    const tok b_toks[] = {
        {NM_MOD_SPECIAL, NM_SEG_BOS, {1, 1}},
        {NM_MOD_TEXT, NM_SEG_PROMPT, {0, 4}},
        {NM_MOD_TEXT, NM_SEG_PROMPT, {2, 3}},
        {NM_MOD_TEXT, NM_SEG_ANSWER, {0, 0}},
    };
    int nb = (int)(sizeof b_toks / sizeof b_toks[0]);
    tok cat[N_MIXED + 4];
    memcpy(cat, mixed, sizeof mixed);
    memcpy(cat + N_MIXED, b_toks, sizeof b_toks);

    nm_trace_sample a, b, c;
    sample_from_table(&a, 2, 4, N_MIXED + 3, mixed, N_MIXED); // different capacities too
    sample_from_table(&b, 2, 4, nb, b_toks, nb);
    sample_from_table(&c, 2, 4, N_MIXED + nb, cat, N_MIXED + nb);

    nm_metrics ab, ba, one, staged;
    init_ok(&ab, 2, 4);
    init_ok(&ba, 2, 4);
    init_ok(&one, 2, 4);
    init_ok(&staged, 2, 4);
    add_ok(&ab, &a);
    add_ok(&ab, &b);
    add_ok(&ba, &b);
    add_ok(&ba, &a);
    add_ok(&one, &c);
    add_ok(&staged, &a);
    nm_metrics_finish(&staged); // finish, then add more, then finish again
    add_ok(&staged, &b);
    nm_metrics_finish(&ab);
    nm_metrics_finish(&ba);
    nm_metrics_finish(&one);
    nm_metrics_finish(&staged);

    ck_assert_int_eq(ab.n_samples, 2);
    ck_assert_int_eq(one.n_samples, 1);
    assert_metrics_equal(&ab, &one);
    assert_metrics_equal(&ba, &one);
    assert_metrics_equal(&staged, &one);
    // token-weighted, not a mean of per-sample means: text of b (3 tokens) and of a (2) weigh 3:2
    ASSERT_NEAR(one.intensity[NM_MOD_TEXT], (12.0 + 9.0) / 40);

    nm_metrics_free(&ab);
    nm_metrics_free(&ba);
    nm_metrics_free(&one);
    nm_metrics_free(&staged);
    sample_release(&a);
    sample_release(&b);
    sample_release(&c);
}
END_TEST

// ---- (f) capacity > n_tokens: the poisoned tail is never read, results as at capacity = n ----
START_TEST(test_stride) {
    nm_trace_sample tight, wide;
    sample_from_table(&tight, 2, 4, N_MIXED, mixed, N_MIXED);
    sample_from_table(&wide, 2, 4, N_MIXED + 9, mixed, N_MIXED);
    nm_metrics mt, mw;
    init_ok(&mt, 2, 4);
    init_ok(&mw, 2, 4);
    add_ok(&mt, &tight);
    add_ok(&mw, &wide);
    nm_metrics_finish(&mt);
    nm_metrics_finish(&mw);
    check_mixed(&mw);
    assert_metrics_equal(&mt, &mw);
    double c[N_MIXED];
    nm_error err = {0};
    ck_assert_int_eq(nm_metrics_token_scores(&wide, 1, c, &err), NM_OK);
    ASSERT_NEAR(c[2], 0.75);
    nm_metrics_free(&mt);
    nm_metrics_free(&mw);
    sample_release(&tight);
    sample_release(&wide);
}
END_TEST

// ---- (g) errors: returned with a message; a rejected sample adds nothing ----
static void expect_add_error(nm_metrics *m, const nm_trace_sample *s, const char *needle) {
    nm_error err = {0};
    nm_status st = nm_metrics_add_sample(m, s, &err);
    ck_assert_int_eq(st, NM_ERR_INVALID);
    ck_assert_int_eq(err.code, NM_ERR_INVALID);
    ck_assert_msg(strstr(err.msg, needle) != NULL, "message '%s' lacks '%s'", err.msg, needle);
}

START_TEST(test_errors) {
    nm_metrics m;
    nm_error err = {0};
    ck_assert_int_eq(nm_metrics_init(&m, 0, 4, &err), NM_ERR_INVALID);
    ck_assert_ptr_null(m.polarization);
    ck_assert_int_eq(nm_metrics_init(&m, 2, 0, &err), NM_ERR_INVALID);
    ck_assert_int_eq(nm_metrics_init(&m, 2, NM_METRICS_MAX_TOP_K + 1, &err), NM_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(err.msg, "top_k"));
    nm_metrics_free(&m); // safe after a failed init
    init_ok(&m, 2, 4);

    nm_trace_sample s;
    sample_from_table(&s, 2, 4, N_MIXED, mixed, N_MIXED);
    s.n_layers = 3;
    expect_add_error(&m, &s, "num_layers 3");
    s.n_layers = 2;
    s.top_k = 5;
    expect_add_error(&m, &s, "top_k 5");
    s.top_k = 4;
    s.n_real[1 * N_MIXED + N_MIXED - 1] = 5; // last token of the last layer: after valid ones
    expect_add_error(&m, &s, "n_real[layer 1][token 6] = 5 exceeds top_k 4");
    s.n_real[1 * N_MIXED + N_MIXED - 1] = 1;
    s.modality[3] = NM_MOD_COUNT;
    expect_add_error(&m, &s, "modality 3");
    s.modality[3] = NM_MOD_VISION;
    s.segment[5] = 9;
    expect_add_error(&m, &s, "segment 9");
    s.segment[5] = NM_SEG_PROMPT;
    s.n_tokens = N_MIXED + 1;
    expect_add_error(&m, &s, "capacity");
    s.n_tokens = N_MIXED;

    nm_metrics_finish(&m); // nothing was added by the failures
    ck_assert_int_eq(m.n_samples, 0);
    ck_assert_int_eq(m.n_tokens[NM_MOD_ALL], 0);
    ck_assert_int_eq(nm_metrics_pairs(&m, 2, NM_MOD_ALL), 0);

    s.n_real[0] = 9; // token scores check n_real too
    double c[N_MIXED];
    ck_assert_int_eq(nm_metrics_token_scores(&s, 2, c, &err), NM_ERR_INVALID);
    s.n_real[0] = 4;
    add_ok(&m, &s); // and the repaired sample is fine
    nm_metrics_finish(&m);
    check_mixed(&m);
    nm_metrics_free(&m);
    sample_release(&s);
}
END_TEST

START_TEST(test_names) {
    ck_assert_str_eq(nm_modality_name(NM_MOD_TEXT), "text");
    ck_assert_str_eq(nm_modality_name(NM_MOD_VISION), "vision");
    ck_assert_str_eq(nm_modality_name(NM_MOD_SPECIAL), "special");
    ck_assert_str_eq(nm_modality_name(NM_MOD_ALL), "all");
    ck_assert_str_eq(nm_modality_name(-1), "?");
    ck_assert_str_eq(nm_segment_name(NM_SEG_BOS), "bos");
    ck_assert_str_eq(nm_segment_name(NM_SEG_IMAGE), "image");
    ck_assert_str_eq(nm_segment_name(NM_SEG_PROMPT), "prompt");
    ck_assert_str_eq(nm_segment_name(NM_SEG_ANSWER), "answer");
    ck_assert_str_eq(nm_segment_name(NM_SEG_ALL), "all");
    ck_assert_str_eq(nm_segment_name(7), "?");
}
END_TEST

// ---- randomized: against a float64 recomputation straight from the definitions ----

#define RMAX_L 6
#define RMAX_K 10
typedef struct {
    double n_tok[4], sum_c[4];                  // per modality (3 = all): tokens, Σ_t c_t
    double seg_n[5], seg_c[5];                  // per segment (4 = all)
    double layer_c[RMAX_L + 1][4], layer_n[RMAX_L + 1][4];   // Σ c_{l,t}, tokens; row L = Σ_t c_t
    double layer_seg_c[RMAX_L + 1][5], layer_seg_n[RMAX_L + 1][5];
    long long hist[RMAX_L + 1][4][RMAX_K + 1], seg_hist[RMAX_L + 1][5][RMAX_K + 1];
    double slots_c, slots_n, zero_pairs;        // Σ c_{l,t}, number of (l, t) pairs, pairs with 0
} reference;

static void reference_add(reference *r, const nm_trace_sample *s, double *c_t) {
    int L = s->n_layers, K = s->top_k;
    for (int t = 0; t < s->n_tokens; t++) {
        int mod = s->modality[t], seg = s->segment[t];
        double c = 0;
        for (int l = 0; l < L; l++) {
            int n = s->n_real[(size_t)l * s->capacity + t];
            double cl = (double)n / K;
            c += cl / L;
            int gm[2] = {mod, 3}, gs[2] = {seg, 4};
            for (int i = 0; i < 2; i++) {
                r->layer_c[l][gm[i]] += cl;
                r->layer_n[l][gm[i]] += 1;
                r->layer_seg_c[l][gs[i]] += cl;
                r->layer_seg_n[l][gs[i]] += 1;
                r->hist[l][gm[i]][n]++;
                r->hist[L][gm[i]][n]++;
                r->seg_hist[l][gs[i]][n]++;
                r->seg_hist[L][gs[i]][n]++;
            }
            r->slots_c += cl;
            r->slots_n += 1;
            if (n == 0) r->zero_pairs += 1;
        }
        c_t[t] = c;
        int gm[2] = {mod, 3}, gs[2] = {seg, 4};
        for (int i = 0; i < 2; i++) {
            r->n_tok[gm[i]] += 1;
            r->sum_c[gm[i]] += c;
            r->seg_n[gs[i]] += 1;
            r->seg_c[gs[i]] += c;
            r->layer_c[L][gm[i]] += c;
            r->layer_n[L][gm[i]] += 1;
            r->layer_seg_c[L][gs[i]] += c;
            r->layer_seg_n[L][gs[i]] += 1;
        }
    }
}

static double ratio_or_nan(double a, double b) { return b > 0 ? a / b : NAN; }

#define ASSERT_SAME(a, b)                                                                     \
    do {                                                                                      \
        double a2_ = (a), b2_ = (b);                                                          \
        if (isnan(b2_)) ASSERT_NAN(a2_);                                                      \
        else ASSERT_NEAR(a2_, b2_);                                                           \
    } while (0)

START_TEST(test_random_vs_reference) {
    nm_test_rng rng = {.s = 0x5eed0000ULL + (uint64_t)_i * 7919};
    int L = 1 + (int)(nm_test_rng_next(&rng) % RMAX_L);
    int K = 1 + (int)(nm_test_rng_next(&rng) % RMAX_K);
    int n_samples = 1 + (int)(nm_test_rng_next(&rng) % 3);
    int drop_mod = (int)(nm_test_rng_next(&rng) % 5) - 1; // −1 or a modality no token has (≥ 3: none)
    double p_zero = nm_test_rng_uniform(&rng);            // share of tokens fully null in a layer

    nm_metrics m;
    init_ok(&m, L, K);
    reference *r = calloc(1, sizeof *r);
    ck_assert_ptr_nonnull(r);
    for (int i = 0; i < n_samples; i++) {
        int n = (int)(nm_test_rng_next(&rng) % 60);
        int cap = n + (int)(nm_test_rng_next(&rng) % 6);
        nm_trace_sample s;
        sample_alloc(&s, L, K, cap, n);
        for (int t = 0; t < n; t++) {
            int mod;
            do mod = (int)(nm_test_rng_next(&rng) % NM_MOD_COUNT);
            while (mod == drop_mod);
            s.modality[t] = (uint8_t)mod;
            s.segment[t] = (uint8_t)(nm_test_rng_next(&rng) % NM_SEG_COUNT);
            for (int l = 0; l < L; l++)
                s.n_real[(size_t)l * cap + t] = nm_test_rng_uniform(&rng) < p_zero
                                                   ? 0
                                                   : (uint8_t)(nm_test_rng_next(&rng) % (K + 1));
        }
        poison_tail(&s);
        double *c_t = malloc(((size_t)n + 1) * sizeof *c_t), *c_lib = malloc(((size_t)n + 1) * sizeof *c_lib);
        ck_assert(c_t && c_lib);
        reference_add(r, &s, c_t);
        add_ok(&m, &s);
        nm_error err = {0};
        ck_assert_int_eq(nm_metrics_token_scores(&s, L, c_lib, &err), NM_OK);
        for (int t = 0; t < n; t++) ASSERT_NEAR(c_lib[t], c_t[t]);
        free(c_t);
        free(c_lib);
        sample_release(&s);
    }
    nm_metrics_finish(&m);

    ck_assert_int_eq(m.n_samples, n_samples);
    double total_c = r->sum_c[3];
    ck_assert_int_eq(m.compute_share_defined, total_c > 0);
    for (int g = 0; g <= NM_MOD_ALL; g++) {
        ck_assert_int_eq(m.n_tokens[g], (long long)r->n_tok[g]);
        ASSERT_SAME(m.token_share[g], ratio_or_nan(r->n_tok[g], r->n_tok[3]));
        ASSERT_NEAR(m.compute_sum[g], r->sum_c[g]);
        ASSERT_SAME(m.compute_share[g], ratio_or_nan(r->sum_c[g], total_c));
        ASSERT_SAME(m.intensity[g], ratio_or_nan(r->sum_c[g], r->n_tok[g]));
    }
    for (int g = 0; g <= NM_SEG_ALL; g++) {
        ck_assert_int_eq(m.n_seg_tokens[g], (long long)r->seg_n[g]);
        ASSERT_SAME(m.seg_intensity[g], ratio_or_nan(r->seg_c[g], r->seg_n[g]));
    }
    ASSERT_SAME(m.null_slot_ratio, r->slots_n > 0 ? 1.0 - r->slots_c / r->slots_n : NAN);
    ASSERT_SAME(m.zero_compute_ratio, ratio_or_nan(r->zero_pairs, r->slots_n));
    for (int l = 0; l <= L; l++) {
        for (int g = 0; g <= NM_MOD_ALL; g++) {
            ASSERT_SAME(nm_metrics_layer_intensity(&m, l, g), ratio_or_nan(r->layer_c[l][g], r->layer_n[l][g]));
            for (int k = 0; k <= K; k++)
                ck_assert_int_eq(nm_metrics_polarization(&m, l, g, k), r->hist[l][g][k]);
        }
        for (int g = 0; g <= NM_SEG_ALL; g++) {
            ASSERT_SAME(nm_metrics_layer_seg_intensity(&m, l, g),
                        ratio_or_nan(r->layer_seg_c[l][g], r->layer_seg_n[l][g]));
            for (int k = 0; k <= K; k++)
                ck_assert_int_eq(nm_metrics_seg_polarization(&m, l, g, k), r->seg_hist[l][g][k]);
        }
    }
    free(r);
    nm_metrics_free(&m);
}
END_TEST

NM_TEST_SUITE(metrics) {
    Suite *s = suite_create("metrics");
    TCase *tc = tcase_create("hand");
    tcase_add_test(tc, test_mixed_by_hand);
    tcase_add_test(tc, test_no_vision);
    tcase_add_test(tc, test_all_null);
    tcase_add_test(tc, test_one_layer_all_null);
    tcase_add_test(tc, test_empty);
    tcase_add_test(tc, test_top1);
    tcase_add_test(tc, test_aggregate_concat);
    tcase_add_test(tc, test_stride);
    tcase_add_test(tc, test_errors);
    tcase_add_test(tc, test_names);
    suite_add_tcase(s, tc);
    TCase *tr = tcase_create("random");
    tcase_add_loop_test(tr, test_random_vs_reference, 0, 24);
    suite_add_tcase(s, tr);
    return s;
}
