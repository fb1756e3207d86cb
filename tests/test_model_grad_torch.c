// test_model_grad_torch.c — the whole model's training loss and gradients (nm_train_model.h)
// against an independent float64 PyTorch implementation of DESIGN.md §2–§3
// (tests/gen_model_grad_fixtures.py; fixtures tests/fixtures/model_grad_<case>.safetensors).
//
// test_train_model.c checks nm_train_backward against finite differences of nm_train_forward:
// a forward that is wrong in a way its backward follows passes there. Here the forward (loss,
// its parts, the routing of every layer, the CE of every target row) and the backward (the
// gradient of every parameter tensor) are compared with torch autograd on the same packed batch
// of two sequences (one with an image where the model has vision).
//
// For every case the config comes from the fixture (config.json text, parsed by nm_config_parse),
// the parameters are placed by their model-file names (DESIGN.md §3) at nm_param_layout's offsets
// (and that table is checked against nm_model_tensor_specs), then:
// - f64: routing identical (n_real and slot of every layer and token); route prob / gate / lse
//   elementwise within 1e-10 relative (floor 1e-3 of the tensor's largest value); loss, CE,
//   mean L_bal, mean L_z, each layer's L_bal and L_z and the CE of every target row within
//   1e-10 relative; every gradient tensor within 1e-9 of its largest element; padding untouched.
// - f32 on the same parameters (the fixture's are float32-exact) and the batch rounded: routing
//   identical, loss and parts within 1e-4 relative, every gradient norm-relative within 1e-4.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nm_config.h"
#include "nm_model.h"
#include "nm_safetensors.h"
#include "nm_sample.h"
#include "nm_trace.h"
#include "nm_train_model.h"
#include "test_util.h"

#define TOL_PARTS 1e-10
#define TOL_GRAD 1e-9
#define TOL_F32 1e-4
#define REGEN "regenerate: /usr/bin/python3 tests/gen_model_grad_fixtures.py --out tests/fixtures"
#define MAX_TENSORS 128

static const char *const CASES[] = {"zero_shared", "copy_gqa", "m0_text"};
#define N_CASES ((int)(sizeof CASES / sizeof CASES[0]))

// Tensors of a fixture that are not parameters or their gradients.
static const char *const OTHER[] = {"config_json", "loss_weights", "batch.start", "batch.id", "batch.patch",
                                    "batch.target", "batch.loss_w", "batch.patch_rows", "loss", "ce", "l_bal", "l_z",
                                    "l_bal_layers", "l_z_layers", "ce_rows", "n_real", "slot", "route_prob",
                                    "route_gate", "route_lse"};

// One parameter tensor: its model-file name, shape and place in the nm_param_layout array.
typedef struct {
    char name[96];
    int ndim;
    int64_t shape[3];
    size_t off, n;
} ptensor;

static void add(ptensor *t, int *n, const char *name, size_t off, int ndim, int64_t a, int64_t b, int64_t c) {
    ck_assert_int_lt(*n, MAX_TENSORS);
    ck_assert_msg(off != NM_NO_TENSOR, "%s: no offset in the layout", name);
    ptensor *p = &t[(*n)++];
    snprintf(p->name, sizeof p->name, "%s", name);
    p->ndim = ndim;
    p->shape[0] = a, p->shape[1] = b, p->shape[2] = c;
    p->off = off;
    p->n = (size_t)a * (ndim > 1 ? (size_t)b : 1) * (ndim > 2 ? (size_t)c : 1);
}

// DESIGN.md §3's tensor table, written out here from the names (not from nm_model's table).
static int param_table(const nm_param_layout *pl, ptensor *t) {
    const nm_config *c = &pl->cfg;
    const int64_t D = c->hidden_size, V = c->vocab_size, qd = (int64_t)c->num_heads * c->head_dim,
                  kvd = (int64_t)c->num_kv_heads * c->head_dim, N = c->moe.num_experts, H = c->moe.expert_hidden,
                  Hs = c->moe.shared_expert_hidden;
    int n = 0;
    char nm[96];
    add(t, &n, "embed_tokens.weight", pl->embed, 2, V, D, 0);
    if (c->has_vision) {
        add(t, &n, "vision.patch_embed.weight", pl->patch_w, 2, D, 3 * (int64_t)c->patch_size * c->patch_size, 0);
        add(t, &n, "vision.patch_embed.bias", pl->patch_b, 1, D, 0, 0);
        add(t, &n, "vision.pos_embed", pl->pos_embed, 2, nm_config_num_patches(c), D, 0);
    }
    for (int l = 0; l < c->num_layers; l++) {
        const nm_layer_offsets *o = &pl->layer[l];
#define LAYER(suffix, off, nd, a, b, cc)                                                                         \
    do {                                                                                                         \
        snprintf(nm, sizeof nm, "layers.%d.%s", l, suffix);                                                      \
        add(t, &n, nm, off, nd, a, b, cc);                                                                       \
    } while (0)
        LAYER("attn_norm.weight", o->attn_norm, 1, D, 0, 0);
        LAYER("attn.q_proj.weight", o->wq, 2, qd, D, 0);
        LAYER("attn.k_proj.weight", o->wk, 2, kvd, D, 0);
        LAYER("attn.v_proj.weight", o->wv, 2, kvd, D, 0);
        LAYER("attn.o_proj.weight", o->wo, 2, D, qd, 0);
        LAYER("moe_norm.weight", o->moe_norm, 1, D, 0, 0);
        LAYER("moe.router.weight", o->router, 2, N + 1, D, 0);
        LAYER("moe.experts.gate_proj", o->gate, 3, N, H, D);
        LAYER("moe.experts.up_proj", o->up, 3, N, H, D);
        LAYER("moe.experts.down_proj", o->down, 3, N, D, H);
        if (Hs > 0) {
            LAYER("moe.shared.gate_proj.weight", o->sh_gate, 2, Hs, D, 0);
            LAYER("moe.shared.up_proj.weight", o->sh_up, 2, Hs, D, 0);
            LAYER("moe.shared.down_proj.weight", o->sh_down, 2, D, Hs, 0);
        }
#undef LAYER
    }
    add(t, &n, "norm.weight", pl->norm, 1, D, 0, 0);
    if (!c->tie_embeddings) add(t, &n, "lm_head.weight", pl->lm_head, 2, V, D, 0);
    else ck_assert(pl->lm_head == pl->embed);
    return n;
}

// The table above agrees with the model loader's (names, sizes, offsets in the arena).
static void check_against_model_specs(const nm_config *c, const ptensor *t, int n) {
    nm_model m;
    nm_error err = {0};
    ck_assert_int_eq(nm_model_init_zero(&m, c, &err), NM_OK);
    const int ns = nm_model_tensor_specs(&m, NULL);
    ck_assert_int_eq(ns, n);
    nm_tensor_spec *s = calloc((size_t)ns, sizeof *s);
    ck_assert_ptr_nonnull(s);
    nm_model_tensor_specs(&m, s);
    for (int i = 0; i < ns; i++) {
        int j = 0;
        while (j < n && strcmp(t[j].name, s[i].name)) j++;
        ck_assert_msg(j < n, "model tensor %s is not in DESIGN.md's table", s[i].name);
        ck_assert_msg(t[j].n == s[i].numel && t[j].off == (size_t)(*s[i].dest - m.arena),
                      "%s: %zu values at %zu in the layout, %zu at %zu in the model", s[i].name, t[j].n, t[j].off,
                      s[i].numel, (size_t)(*s[i].dest - m.arena));
    }
    free(s);
    nm_model_free(&m);
}

static const nm_st_tensor *fx(const nm_safetensors *st, const char *name, nm_dtype dt, size_t numel) {
    const nm_st_tensor *t = nm_safetensors_find(st, name);
    ck_assert_msg(t != NULL, "fixture tensor %s missing (" REGEN ")", name);
    ck_assert_msg(t->dtype == dt && t->numel == numel, "fixture tensor %s: %s, %zu values; expected %s, %zu (" REGEN ")",
                  name, nm_dtype_name(t->dtype), t->numel, nm_dtype_name(dt), numel);
    return t;
}

// A copy of an F64 tensor (the data need not be 8-byte aligned in the file); caller frees.
static double *fx64(const nm_safetensors *st, const char *name, size_t numel) {
    double *v = malloc((numel ? numel : 1) * sizeof *v);
    ck_assert_ptr_nonnull(v);
    memcpy(v, fx(st, name, NM_DT_F64, numel)->data, numel * sizeof *v); // little-endian host
    return v;
}

static int32_t *fx_i32(const nm_safetensors *st, const char *name, size_t numel) {
    nm_error err = {0};
    int32_t *v = malloc((numel ? numel : 1) * sizeof *v);
    ck_assert_ptr_nonnull(v);
    ck_assert_int_eq(nm_st_tensor_to_i32(v, fx(st, name, NM_DT_I32, numel), &err), NM_OK);
    return v;
}

static double rel(double got, double want) { return fabs(got - want) / fmax(fabs(want), 1e-300); }

// max over a tensor of |got - want| / max(|want|, 1e-3 max|want|)
static double elem_err(const double *got, const double *want, size_t n) {
    double m = 0, e = 0;
    for (size_t i = 0; i < n; i++) m = fmax(m, fabs(want[i]));
    for (size_t i = 0; i < n; i++) {
        ck_assert(isfinite(got[i]));
        e = fmax(e, fabs(got[i] - want[i]) / fmax(fabs(want[i]), 1e-3 * m));
    }
    return m > 0 ? e : 0;
}

// max |got - want| / max |want| (0/0 = 0: both all zero)
static double norm_err(const double *got, const double *want, size_t n) {
    double m = 0, d = 0;
    for (size_t i = 0; i < n; i++) {
        ck_assert_msg(isfinite(got[i]), "non-finite value at %zu", i);
        m = fmax(m, fabs(want[i]));
        d = fmax(d, fabs(got[i] - want[i]));
    }
    return m > 0 ? d / m : d;
}

typedef struct {
    double parts, route, grad;
    const char *grad_at;
} worst;

// One layer's routing of the last forward (either precision's cache) equals the fixture's.
static void check_routing(const char *cas, const char *what, int l, int T, int K, const uint8_t *got_n,
                          const int16_t *got_slot, const int32_t *n_real, const int32_t *slot) {
    for (int t = 0; t < T; t++) {
        ck_assert_msg(got_n[t] == n_real[l * T + t], "%s %s: layer %d token %d n_real %d, torch %d", cas, what, l, t,
                      got_n[t], n_real[l * T + t]);
        for (int k = 0; k < K; k++)
            ck_assert_msg(got_slot[t * K + k] == slot[((size_t)l * T + t) * K + k],
                          "%s %s: layer %d token %d slot %d is %d, torch %d", cas, what, l, t, k, got_slot[t * K + k],
                          slot[((size_t)l * T + t) * K + k]);
    }
}

START_TEST(test_model_vs_torch) {
    const char *cas = CASES[_i];
    char path[1024];
    snprintf(path, sizeof path, "%s/fixtures/model_grad_%s.safetensors", nm_test_dir(), cas);
    nm_safetensors st;
    nm_error err = {0};
    ck_assert_msg(nm_safetensors_open(&st, path, &err) == NM_OK, "%s (" REGEN ")", err.msg);

    // config
    const nm_st_tensor *cj = nm_safetensors_find(&st, "config_json");
    ck_assert_msg(cj && cj->dtype == NM_DT_U8 && cj->ndim == 1, "config_json missing or not U8 (" REGEN ")");
    char *json = malloc(cj->numel + 1);
    ck_assert_ptr_nonnull(json);
    memcpy(json, cj->data, cj->numel);
    json[cj->numel] = 0;
    nm_config c;
    ck_assert_msg(nm_config_parse(&c, json, path, &err) == NM_OK, "%s", err.msg);
    free(json);
    const int L = c.num_layers, K = c.moe.top_k, V = c.vocab_size;
    double *lw = fx64(&st, "loss_weights", 2);
    const double w_bal = lw[0], w_z = lw[1];
    free(lw);

    // parameters, placed by name
    nm_param_layout pl;
    ck_assert_int_eq(nm_param_layout_init(&pl, &c, &err), NM_OK);
    ptensor pt[MAX_TENSORS];
    const int npt = param_table(&pl, pt);
    check_against_model_specs(&c, pt, npt);
    for (int i = 0; i < st.n_tensors; i++) { // nothing in the file that the test does not know
        const char *nm = st.tensors[i].name;
        int known = 0;
        for (size_t j = 0; j < sizeof OTHER / sizeof *OTHER; j++) known |= !strcmp(nm, OTHER[j]);
        for (int j = 0; j < npt; j++)
            known |= !strcmp(nm, pt[j].name) || (!strncmp(nm, "d_", 2) && !strcmp(nm + 2, pt[j].name));
        ck_assert_msg(known, "%s: unexpected fixture tensor %s (a tensor the model lacks?)", cas, nm);
    }
    float *pf = calloc(pl.len, sizeof *pf), *gf = calloc(pl.len, sizeof *gf);
    double *p64 = calloc(pl.len, sizeof *p64), *g64 = calloc(pl.len, sizeof *g64), *gfd = calloc(pl.len, sizeof *gfd);
    uint8_t *covered = calloc(pl.len, 1);
    ck_assert(pf && gf && p64 && g64 && gfd && covered);
    for (int i = 0; i < npt; i++) {
        const nm_st_tensor *t = fx(&st, pt[i].name, NM_DT_F32, pt[i].n);
        ck_assert_int_eq(t->ndim, pt[i].ndim);
        for (int d = 0; d < t->ndim; d++)
            ck_assert_msg(t->shape[d] == pt[i].shape[d], "%s: dim %d is %lld, expected %lld", pt[i].name, d,
                          (long long)t->shape[d], (long long)pt[i].shape[d]);
        ck_assert_int_eq(nm_st_tensor_to_f32(pf + pt[i].off, t, &err), NM_OK);
        for (size_t j = 0; j < pt[i].n; j++) covered[pt[i].off + j] = 1;
    }
    for (size_t j = 0; j < pl.len; j++) p64[j] = pf[j]; // the fixture's parameters are float32-exact

    // the batch
    const nm_st_tensor *ts = nm_safetensors_find(&st, "batch.start"), *ti = nm_safetensors_find(&st, "batch.id");
    ck_assert_msg(ts && ti && ts->numel >= 2, "batch.start / batch.id missing (" REGEN ")");
    const int B = (int)ts->numel - 1, T = (int)ti->numel;
    int32_t *start = fx_i32(&st, "batch.start", (size_t)B + 1), *id = fx_i32(&st, "batch.id", (size_t)T),
            *patch = fx_i32(&st, "batch.patch", (size_t)T), *target = fx_i32(&st, "batch.target", (size_t)T);
    double *loss_w = fx64(&st, "batch.loss_w", (size_t)T);
    int n_patch = 0;
    for (int t = 0; t < T; t++) n_patch += id[t] < 0;
    const int pp = c.has_vision ? 3 * c.patch_size * c.patch_size : 0;
    double *rows = n_patch ? fx64(&st, "batch.patch_rows", (size_t)n_patch * pp) : NULL;
    nm_train_batch_f64 b = {0};
    nm_train_batch_f32 bf = {0};
    ck_assert_int_eq(nm_train_batch_reserve_f64(&b, B, T, n_patch, c.patch_size, &err), NM_OK);
    ck_assert_int_eq(nm_train_batch_reserve_f32(&bf, B, T, n_patch, c.patch_size, &err), NM_OK);
    b.B = bf.B = B, b.T = bf.T = T, b.n_patch = bf.n_patch = n_patch;
    for (int s = 0; s <= B; s++) b.start[s] = bf.start[s] = start[s];
    ck_assert_int_eq(start[0], 0);
    ck_assert_int_eq(start[B], T);
    for (int t = 0; t < T; t++) {
        b.id[t] = bf.id[t] = id[t];
        b.patch[t] = bf.patch[t] = patch[t];
        b.target[t] = bf.target[t] = target[t];
        b.loss_w[t] = loss_w[t];
        bf.loss_w[t] = (float)loss_w[t];
        b.loss_kind[t] = bf.loss_kind[t] = target[t] >= 0 ? NM_LOSS_PROMPT : NM_LOSS_NONE; // statistics only
        b.modality[t] = bf.modality[t] = id[t] < 0 ? NM_MOD_VISION : id[t] < 256 ? NM_MOD_TEXT : NM_MOD_SPECIAL;
    }
    for (size_t j = 0; j < (size_t)n_patch * pp; j++) {
        b.patch_rows[j] = rows[j];
        bf.patch_rows[j] = (float)rows[j];
    }

    // what torch computed
    int32_t *n_real = fx_i32(&st, "n_real", (size_t)L * T), *slot = fx_i32(&st, "slot", (size_t)L * T * K);
    double *want_loss = fx64(&st, "loss", 1), *want_ce = fx64(&st, "ce", 1), *want_bal = fx64(&st, "l_bal", 1),
           *want_z = fx64(&st, "l_z", 1), *bal_l = fx64(&st, "l_bal_layers", (size_t)L),
           *z_l = fx64(&st, "l_z_layers", (size_t)L), *ce_rows = fx64(&st, "ce_rows", (size_t)T),
           *r_prob = fx64(&st, "route_prob", (size_t)L * T * K), *r_gate = fx64(&st, "route_gate", (size_t)L * T * K),
           *r_lse = fx64(&st, "route_lse", (size_t)L * T);

    // ---- f64 ----
    worst w64 = {0}, w32 = {0};
    nm_train_acts_f64 a = {0};
    nm_train_stats s64;
    ck_assert_int_eq(nm_train_forward_f64(&a, &s64, p64, &pl, &b, w_bal, w_z, &err), NM_OK);
    { // CE of every target row, from the logits the forward kept (the backward overwrites them)
        int nl;
        const int32_t *lr;
        const double *lg = nm_train_logits_f64(&a, &nl, &lr);
        int n_tgt = 0;
        for (int t = 0; t < T; t++) n_tgt += target[t] >= 0;
        ck_assert_int_eq(nl, n_tgt);
        for (int r = 0; r < nl; r++) {
            const double *z = lg + (size_t)r * V;
            double mx = z[0], sum = 0;
            for (int i = 1; i < V; i++) mx = fmax(mx, z[i]);
            for (int i = 0; i < V; i++) sum += exp(z[i] - mx);
            const double ce = mx + log(sum) - z[target[lr[r]]], e = rel(ce, ce_rows[lr[r]]);
            ck_assert_msg(e <= TOL_PARTS, "%s f64: CE of row %d %.17g, torch %.17g", cas, lr[r], ce, ce_rows[lr[r]]);
            w64.parts = fmax(w64.parts, e);
        }
    }
    ck_assert_int_eq(nm_train_backward_f64(&a, g64, p64, &pl, &b, w_bal, w_z, &err), NM_OK);
    for (int l = 0; l < L; l++) {
        const nm_moe_cache_f64 *mc = nm_train_moe_cache_f64(&a, l);
        ck_assert_ptr_nonnull(mc);
        check_routing(cas, "f64", l, T, K, mc->n_real, mc->slot, n_real, slot);
    }
    const struct { const char *name; double got, want; } parts[] = {
        {"loss", s64.loss, *want_loss}, {"CE", s64.ce, *want_ce}, {"L_bal", s64.l_bal, *want_bal}, {"L_z", s64.l_z, *want_z}};
    for (size_t i = 0; i < sizeof parts / sizeof *parts; i++) {
        const double e = rel(parts[i].got, parts[i].want);
        ck_assert_msg(e <= TOL_PARTS, "%s f64: %s %.17g, torch %.17g (rel %.2e)", cas, parts[i].name, parts[i].got,
                      parts[i].want, e);
        w64.parts = fmax(w64.parts, e);
    }
    for (int l = 0; l < L; l++) {
        const nm_moe_cache_f64 *mc = nm_train_moe_cache_f64(&a, l);
        const double eb = rel(mc->l_bal, bal_l[l]), ez = rel(mc->l_z, z_l[l]);
        ck_assert_msg(eb <= TOL_PARTS && ez <= TOL_PARTS, "%s f64 layer %d: L_bal %.17g (torch %.17g), L_z %.17g (torch %.17g)",
                      cas, l, mc->l_bal, bal_l[l], mc->l_z, z_l[l]);
        w64.parts = fmax(w64.parts, fmax(eb, ez));
        const struct { const char *name; const double *got, *want; size_t n; } rt[] = {
            {"prob", mc->prob, r_prob + (size_t)l * T * K, (size_t)T * K},
            {"gate", mc->gate, r_gate + (size_t)l * T * K, (size_t)T * K},
            {"lse", mc->lse, r_lse + (size_t)l * T, (size_t)T}};
        for (size_t i = 0; i < sizeof rt / sizeof *rt; i++) {
            const double e = elem_err(rt[i].got, rt[i].want, rt[i].n);
            ck_assert_msg(e <= TOL_PARTS, "%s f64 layer %d: route %s differs from torch by %.3e", cas, l, rt[i].name, e);
            w64.route = fmax(w64.route, e);
        }
    }
    char dn[128];
    for (int i = 0; i < npt; i++) {
        snprintf(dn, sizeof dn, "d_%.95s", pt[i].name);
        double *want = fx64(&st, dn, pt[i].n);
        const double e = norm_err(g64 + pt[i].off, want, pt[i].n);
        free(want);
        ck_assert_msg(e <= TOL_GRAD, "%s f64: gradient of %s differs from torch by %.3e of its largest element", cas,
                      pt[i].name, e);
        if (e >= w64.grad) w64.grad = e, w64.grad_at = pt[i].name;
    }
    size_t stray = 0;
    for (size_t j = 0; j < pl.len; j++) stray += !covered[j] && g64[j] != 0;
    ck_assert_msg(stray == 0, "%s f64: %zu gradient values written into padding", cas, stray);

    // ---- f32 on the same parameters ----
    nm_train_acts_f32 af = {0};
    nm_train_stats s32;
    ck_assert_int_eq(nm_train_forward_f32(&af, &s32, pf, &pl, &bf, w_bal, w_z, &err), NM_OK);
    ck_assert_int_eq(nm_train_backward_f32(&af, gf, pf, &pl, &bf, w_bal, w_z, &err), NM_OK);
    for (int l = 0; l < L; l++) {
        const nm_moe_cache_f32 *mc = nm_train_moe_cache_f32(&af, l);
        ck_assert_ptr_nonnull(mc);
        check_routing(cas, "f32", l, T, K, mc->n_real, mc->slot, n_real, slot);
    }
    const struct { const char *name; double got, want; } parts32[] = {
        {"loss", s32.loss, *want_loss}, {"CE", s32.ce, *want_ce}, {"L_bal", s32.l_bal, *want_bal}, {"L_z", s32.l_z, *want_z}};
    for (size_t i = 0; i < sizeof parts32 / sizeof *parts32; i++) {
        const double e = rel(parts32[i].got, parts32[i].want);
        ck_assert_msg(e <= TOL_F32, "%s f32: %s %.9g, torch %.9g (rel %.2e)", cas, parts32[i].name, parts32[i].got,
                      parts32[i].want, e);
        w32.parts = fmax(w32.parts, e);
    }
    for (size_t j = 0; j < pl.len; j++) gfd[j] = gf[j];
    for (int i = 0; i < npt; i++) {
        snprintf(dn, sizeof dn, "d_%.95s", pt[i].name);
        double *want = fx64(&st, dn, pt[i].n);
        const double e = norm_err(gfd + pt[i].off, want, pt[i].n);
        free(want);
        ck_assert_msg(e <= TOL_F32, "%s f32: gradient of %s differs from torch by %.3e of its largest element", cas,
                      pt[i].name, e);
        if (e >= w32.grad) w32.grad = e, w32.grad_at = pt[i].name;
    }

    char hist[64] = "";
    for (int k = 0, o = 0; k <= K && o < (int)sizeof hist - 12; k++) {
        int cnt = 0;
        for (int j = 0; j < L * T; j++) cnt += n_real[j] == k;
        o += snprintf(hist + o, sizeof hist - (size_t)o, "%s%d", k ? " " : "", cnt);
    }
    printf("model_grad_torch %-11s %d tensors, %d layers x %d tokens (n_real 0..K: %s): routing identical;\n"
           "    f64: loss/parts/CE rows worst rel %.2e, route prob/gate/lse %.2e, gradients %.2e (%s)\n"
           "    f32: loss/parts worst rel %.2e, gradients %.2e (%s)\n",
           cas, npt, L, T, hist, w64.parts, w64.route, w64.grad, w64.grad_at, w32.parts, w32.grad, w32.grad_at);

    nm_train_acts_free_f64(&a);
    nm_train_acts_free_f32(&af);
    nm_train_batch_free_f64(&b);
    nm_train_batch_free_f32(&bf);
    free(start), free(id), free(patch), free(target), free(n_real), free(slot), free(loss_w), free(rows);
    free(want_loss), free(want_ce), free(want_bal), free(want_z), free(bal_l), free(z_l), free(ce_rows);
    free(r_prob), free(r_gate), free(r_lse);
    free(pf), free(gf), free(p64), free(g64), free(gfd), free(covered);
    nm_param_layout_free(&pl);
    nm_safetensors_close(&st);
}
END_TEST

NM_TEST_SUITE(model_grad_torch) {
    Suite *s = suite_create("model_grad_torch");
    TCase *tc = tcase_create("model_torch");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, test_model_vs_torch, 0, N_CASES);
    suite_add_tcase(s, tc);
    return s;
}
