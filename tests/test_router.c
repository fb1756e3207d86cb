// test_router.c — moe_route_null on hand-worked cases (DESIGN.md §2), and the whole MoE
// layer (sorted, grouped, null slots cut) against the float64 definition computed token by
// token (nm_moe_forward_naive).
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "nm_moe.h"
#include "test_util.h"

typedef struct {
    uint8_t n_real[8];
    int16_t slot[256];
    float prob[256], gate[256], null_mass[8], lse[8];
    nm_routing r;
} route_buf;

static void route(route_buf *b, const float *z, int T, int N, int M, int K, nm_null_kind kind) {
    memset(b, 0x5a, sizeof *b); // poison: every output must be written
    b->r = (nm_routing){b->n_real, b->slot, b->prob, b->gate, b->null_mass, b->lse};
    nm_moe_config mc = {.num_experts = N, .null_copies = M, .top_k = K, .expert_hidden = 1, .null_kind = kind};
    moe_route_null(&b->r, z, T, &mc);
}

static double lse_of(const double *z, int n) {
    double m = -INFINITY, s = 0;
    for (int i = 0; i < n; i++) m = fmax(m, z[i]);
    for (int i = 0; i < n; i++) s += exp(z[i] - m);
    return m + log(s);
}

#define EQF(a, b) ck_assert_msg(fabs((double)(a) - (double)(b)) <= 1e-6 * fmax(1.0, fabs((double)(b))), \
                                "%s = %.9g, expected %.9g", #a, (double)(a), (double)(b))

// M = 0: plain top-K over the N real logits; the null column is ignored entirely.
START_TEST(test_plain_topk) {
    const float z[5] = {1.0f, 3.0f, 2.0f, 0.5f, 100.0f}; // null logit 100 must not matter
    route_buf b;
    route(&b, z, 1, 4, 0, 2, NM_NULL_ZERO);
    ck_assert_int_eq(b.n_real[0], 2);
    ck_assert_int_eq(b.slot[0], 1);
    ck_assert_int_eq(b.slot[1], 2);
    const double zd[4] = {1, 3, 2, 0.5};
    double lse = lse_of(zd, 4);
    EQF(b.lse[0], lse);
    EQF(b.prob[0], exp(3 - lse));
    EQF(b.prob[1], exp(2 - lse));
    EQF(b.gate[0], 1.0 / (1.0 + exp(-1.0))); // softmax(3, 2)
    EQF(b.gate[1], 1.0 / (1.0 + exp(1.0)));
    EQF(b.null_mass[0], 0.0);
}
END_TEST

// The null logit beats every real one: all K slots go to null copies, no work, gates 0.
START_TEST(test_all_null) {
    const float z[4] = {0.0f, 0.5f, -1.0f, 10.0f};
    route_buf b;
    route(&b, z, 1, 3, 4, 3, NM_NULL_ZERO);
    ck_assert_int_eq(b.n_real[0], 0);
    for (int k = 0; k < 3; k++) {
        ck_assert_int_eq(b.slot[k], -1);
        ck_assert(b.gate[k] == 0.0f);
    }
    const double zd[7] = {0, 0.5, -1, 10, 10, 10, 10};
    double lse = lse_of(zd, 7);
    EQF(b.lse[0], lse);
    EQF(b.prob[0], exp(10 - lse));
    EQF(b.null_mass[0], 4 * exp(10 - lse));
}
END_TEST

// Ties: a real expert with the same logit as the null copies wins (lower slot index), and
// equal real logits keep the lower expert id first.
START_TEST(test_ties) {
    const float z[4] = {2.0f, 0.0f, 2.0f, 2.0f}; // expanded (M=2): [2, 0, 2, 2, 2]
    route_buf b;
    route(&b, z, 1, 3, 2, 3, NM_NULL_ZERO);
    ck_assert_int_eq(b.n_real[0], 2);
    ck_assert_int_eq(b.slot[0], 0);
    ck_assert_int_eq(b.slot[1], 2);
    ck_assert_int_eq(b.slot[2], -1);
    EQF(b.gate[0], 0.5);
    EQF(b.gate[1], 0.5);
    ck_assert(b.gate[2] == 0.0f);
    // K = 2: both reals, no null even though the null copies tie with them
    route(&b, z, 1, 3, 2, 2, NM_NULL_ZERO);
    ck_assert_int_eq(b.n_real[0], 2);
    ck_assert_int_eq(b.slot[0], 0);
    ck_assert_int_eq(b.slot[1], 2);
}
END_TEST

START_TEST(test_k1) {
    float z[5] = {0.5f, 1.5f, -1.0f, 0.0f, 1.0f};
    route_buf b;
    route(&b, z, 1, 4, 4, 1, NM_NULL_ZERO);
    ck_assert_int_eq(b.n_real[0], 1);
    ck_assert_int_eq(b.slot[0], 1);
    EQF(b.gate[0], 1.0);
    z[4] = 2.0f; // now the null logit wins the single slot
    route(&b, z, 1, 4, 4, 1, NM_NULL_ZERO);
    ck_assert_int_eq(b.n_real[0], 0);
    ck_assert_int_eq(b.slot[0], -1);
    ck_assert(b.gate[0] == 0.0f);
}
END_TEST

// K = N + M: every slot is selected; order by descending logit with the nulls in between.
START_TEST(test_k_all) {
    const float z[3] = {1.0f, -1.0f, 0.0f}; // expanded (M=2): [1, -1, 0, 0]
    route_buf b;
    route(&b, z, 1, 2, 2, 4, NM_NULL_ZERO);
    ck_assert_int_eq(b.n_real[0], 2);
    const int16_t want[4] = {0, -1, -1, 1};
    for (int k = 0; k < 4; k++) ck_assert_int_eq(b.slot[k], want[k]);
    EQF(b.gate[0], 1.0 / (1.0 + exp(-2.0))); // softmax(1, -1) over the two real experts
    EQF(b.gate[3], 1.0 / (1.0 + exp(2.0)));
    ck_assert(b.gate[1] == 0.0f && b.gate[2] == 0.0f);
    double s = 0;
    for (int k = 0; k < 4; k++) s += b.prob[k] * (b.slot[k] < 0 ? 1 : 1);
    EQF(s, 1.0); // all N+M slots selected: probabilities sum to 1
}
END_TEST

// The null logit beats the real ones by > 88: p of the real expert underflows in float32,
// but its gate (a softmax over the selected real logits) must still be exactly 1, not NaN.
START_TEST(test_dominant_null) {
    const float z[5] = {0.0f, -1.0f, -2.0f, -3.0f, 100.0f};
    route_buf b;
    route(&b, z, 1, 4, 4, 5, NM_NULL_ZERO);
    ck_assert_int_eq(b.n_real[0], 1);
    for (int k = 0; k < 4; k++) ck_assert_int_eq(b.slot[k], -1);
    ck_assert_int_eq(b.slot[4], 0);
    ck_assert(b.gate[4] == 1.0f);
    ck_assert(isfinite(b.prob[4]) && b.prob[4] >= 0.0f && b.prob[4] < 1e-40f);
    EQF(b.null_mass[0], 1.0);
    EQF(b.lse[0], 100.0 + log(4.0 + exp(-100.0)));
}
END_TEST

// Copy experts (MoE++): gates renormalised over all K selected slots, nulls included.
START_TEST(test_copy_gates) {
    const float z[3] = {1.0f, 0.0f, 1.0f}; // expanded (M=2): [1, 0, 1, 1]
    route_buf b;
    route(&b, z, 1, 2, 2, 2, NM_NULL_COPY);
    ck_assert_int_eq(b.n_real[0], 1);
    ck_assert_int_eq(b.slot[0], 0);
    ck_assert_int_eq(b.slot[1], -1);
    EQF(b.gate[0], 0.5);
    EQF(b.gate[1], 0.5);
}
END_TEST

// Random logits: invariants on many tokens and shapes (fresh inputs per seed).
START_TEST(test_random_invariants) {
    nm_test_rng rng = {1000 + (uint64_t)_i};
    int N = 1 + (int)(nm_test_rng_next(&rng) % 12), M = (int)(nm_test_rng_next(&rng) % 12);
    int K = 1 + (int)(nm_test_rng_next(&rng) % (unsigned)(N + M));
    if (K > 16) K = 16;
    enum { T = 8 };
    float z[T * 32];
    route_buf b;
    for (int t = 0; t < T; t++)
        for (int i = 0; i <= N; i++) z[t * (N + 1) + i] = (float)(2.0 * nm_test_rng_normal(&rng));
    route(&b, z, T, N, M, K, NM_NULL_ZERO);
    for (int t = 0; t < T; t++) {
        const float *zt = z + t * (N + 1);
        int nr = 0;
        double gs = 0;
        for (int k = 0; k < K; k++) {
            int e = b.slot[t * K + k];
            ck_assert(e >= -1 && e < N);
            double zk = e >= 0 ? zt[e] : zt[N];
            if (k > 0) { // descending logits
                int ep = b.slot[t * K + k - 1];
                ck_assert(zk <= (ep >= 0 ? zt[ep] : zt[N]));
            }
            if (e >= 0) {
                nr++;
                gs += b.gate[t * K + k];
                for (int q = 0; q < k; q++) ck_assert_int_ne(b.slot[t * K + q], e); // no expert twice
            } else ck_assert(b.gate[t * K + k] == 0.0f);
            EQF(b.prob[t * K + k], exp(zk - b.lse[t]));
        }
        ck_assert_int_eq(b.n_real[t], nr);
        ck_assert_int_le(K - nr, M); // never more null slots than copies
        if (nr > 0) EQF(gs, 1.0);    // gates sum to 1 over the selected real experts
        // every unselected real expert has a logit <= the smallest selected one
        double zmin = INFINITY;
        for (int k = 0; k < K; k++) zmin = fmin(zmin, b.slot[t * K + k] >= 0 ? zt[b.slot[t * K + k]] : zt[N]);
        for (int i = 0; i < N; i++) {
            int sel = 0;
            for (int k = 0; k < K; k++) sel |= b.slot[t * K + k] == i;
            if (!sel) ck_assert(zt[i] <= zmin);
        }
    }
}
END_TEST

// ---- the whole layer vs the float64 definition ----

typedef struct { int N, M, K, H, Hs, T, D; nm_null_kind kind; float null_shift; } moe_case;
static const moe_case MOE_CASES[] = {
    {8, 0, 2, 16, 0, 37, 24, NM_NULL_ZERO, 0},    // plain top-K
    {8, 8, 4, 16, 12, 64, 32, NM_NULL_ZERO, 0.5f}, // null experts + shared expert
    {6, 3, 3, 8, 0, 50, 16, NM_NULL_ZERO, 3.0f},  // mostly null (many tokens with n_real = 0)
    {4, 4, 2, 8, 0, 33, 16, NM_NULL_COPY, 0.5f},  // copy experts
    {5, 2, 7, 8, 8, 20, 16, NM_NULL_ZERO, 0},     // K = N + M
    {16, 16, 1, 8, 0, 70, 16, NM_NULL_ZERO, 0},   // K = 1
};

START_TEST(test_moe_vs_naive) {
    const moe_case *c = &MOE_CASES[_i];
    nm_test_rng rng = {77 + (uint64_t)_i};
    const int N = c->N, H = c->H, D = c->D, T = c->T, Hs = c->Hs;
    nm_moe_config mc = {N, c->M, c->K, H, Hs, c->kind};
    nm_moe_weights w = {0};
    size_t nw = (size_t)(N + 1) * D + 3 * (size_t)N * H * D + 3 * (size_t)(Hs ? Hs : 1) * D;
    float *buf = malloc(nw * sizeof(float)), *y = malloc((size_t)T * D * sizeof(float)),
          *out = malloc((size_t)T * D * sizeof(float));
    double *ref = malloc((size_t)T * D * sizeof(double));
    ck_assert(buf && y && out && ref);
    nm_test_fill_normal(&rng, buf, nw, 0.3f);
    w.router = buf;
    w.gate = w.router + (size_t)(N + 1) * D;
    w.up = w.gate + (size_t)N * H * D;
    w.down = w.up + (size_t)N * H * D;
    if (Hs) {
        w.sh_gate = w.down + (size_t)N * D * H;
        w.sh_up = w.sh_gate + (size_t)Hs * D;
        w.sh_down = w.sh_up + (size_t)Hs * D;
    }
    nm_test_fill_normal(&rng, y, (size_t)T * D, 1.0f);
    // shift the null row along the mean input so a share of tokens routes to null
    for (int d = 0; d < D; d++) w.router[(size_t)N * D + d] += c->null_shift / D * (y[d] > 0 ? 1.0f : -1.0f) * 4;
    nm_moe_workspace ws = {0};
    nm_error err;
    ck_assert_int_eq(nm_moe_forward(out, y, &w, &mc, T, D, &ws, NULL, &err), NM_OK);
    nm_moe_forward_naive(ref, y, &w, &mc, T, D);
    double max_err = 0, scale = 0;
    for (size_t i = 0; i < (size_t)T * D; i++) scale = fmax(scale, fabs(ref[i]));
    for (size_t i = 0; i < (size_t)T * D; i++) max_err = fmax(max_err, fabs(out[i] - ref[i]));
    int zero_tokens = 0;
    for (int t = 0; t < T; t++) zero_tokens += ws.n_real[t] == 0;
    ck_assert_msg(scale > 0.01, "degenerate case: output scale %g", scale);
    ck_assert_msg(max_err <= 1e-5 * fmax(1.0, scale), "case %d: max err %g (scale %g)", _i, max_err, scale);
    if (c->null_shift >= 3.0f) ck_assert_msg(zero_tokens > 0, "case %d meant to have n_real = 0 tokens", _i);
    // run again into a second output: bit-identical (fixed combine order, no atomics)
    float *out2 = malloc((size_t)T * D * sizeof(float));
    ck_assert_ptr_nonnull(out2);
    ck_assert_int_eq(nm_moe_forward(out2, y, &w, &mc, T, D, &ws, NULL, &err), NM_OK);
    ck_assert(memcmp(out, out2, (size_t)T * D * sizeof(float)) == 0);
    free(out2);
    nm_moe_workspace_free(&ws);
    free(buf); free(y); free(out); free(ref);
}
END_TEST

NM_TEST_SUITE(router) {
    Suite *s = suite_create("router");
    TCase *tc = tcase_create("hand_worked");
    tcase_add_test(tc, test_plain_topk);
    tcase_add_test(tc, test_all_null);
    tcase_add_test(tc, test_ties);
    tcase_add_test(tc, test_k1);
    tcase_add_test(tc, test_k_all);
    tcase_add_test(tc, test_dominant_null);
    tcase_add_test(tc, test_copy_gates);
    tcase_add_loop_test(tc, test_random_invariants, 0, 40);
    suite_add_tcase(s, tc);
    TCase *tl = tcase_create("layer_vs_float64");
    tcase_add_loop_test(tl, test_moe_vs_naive, 0, (int)(sizeof MOE_CASES / sizeof MOE_CASES[0]));
    suite_add_tcase(s, tl);
    return s;
}
