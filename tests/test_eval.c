// test_eval.c — `nullmap eval` (lib/nm_eval.c): patch classification against pixel counting,
// a whole evaluation of a random model on tiny generated data sets cross-checked against
// independent recomputations (nm_generate + nm_metrics + brute-force patch classes), the JSON,
// the answer loss recomputed from nm_engine_forward logits, the majority baseline and the
// exact-match rule on a rigged model, and the errors.
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nm_data.h"
#include "nm_engine.h"
#include "nm_eval.h"
#include "nm_generate.h"
#include "nm_image.h"
#include "nm_metrics.h"
#include "nm_model.h"
#include "nm_tokenizer.h"
#include "test_util.h"

// ---------------------------------------------------------------------------------------------
// Helpers

static nm_config tiny_config(int vision, int max_positions) {
    nm_config c;
    nm_config_init_byte(&c);
    c.hidden_size = 32;
    c.num_layers = 2;
    c.num_heads = 2;
    c.num_kv_heads = 1;
    c.head_dim = 16;
    c.max_positions = max_positions;
    c.moe = (nm_moe_config){.num_experts = 4, .null_copies = 4, .top_k = 3, .expert_hidden = 16,
                            .shared_expert_hidden = 8, .null_kind = NM_NULL_ZERO};
    c.has_vision = vision;
    c.image_size = vision ? 32 : 0;
    c.patch_size = vision ? 8 : 0;
    c.channels = 3;
    return c;
}

static void make_model(nm_model *m, int vision, int max_positions, uint64_t seed) {
    nm_config c = tiny_config(vision, max_positions);
    nm_error err = {0};
    ck_assert_msg(nm_model_init_random(m, &c, seed, &err) == NM_OK, "%s", err.msg);
}

static void generate(const char *dir, int n_train, int n_eval, uint64_t seed, int size) {
    nm_error err = {0};
    ck_assert_msg(nm_data_generate(dir, n_train, n_eval, seed, size, 0, NULL, NULL, &err) == NM_OK, "%s", err.msg);
}

static nm_eval_opts opts(int limit, int sample, uint64_t seed) {
    nm_eval_opts o;
    nm_eval_opts_default(&o);
    o.limit = limit;
    o.sample = sample;
    o.seed = seed;
    o.model_name = "tiny";
    return o;
}

static void run_ok(nm_eval_result *r, const nm_model *m, const char *dir, const nm_eval_opts *o) {
    nm_error err = {0};
    ck_assert_msg(nm_eval_run(r, m, dir, o, &err) == NM_OK, "%s", err.msg);
}

static void write_text(const char *dir, const char *name, const char *text) {
    ck_assert_int_eq(nm_test_write_file(nm_test_path(dir, name), text, strlen(text)), 0);
}

static int same_double(double a, double b) { return (isnan(a) && isnan(b)) || a == b; }

// ---------------------------------------------------------------------------------------------
// Patch classification

// Boxes in model pixels (data image = model image, 32 x 32, patches of 8).
static int cls32(const int (*b)[4], int n, int row, int col, double *cov) {
    return nm_eval_patch_class(b, n, 32, 32, 8, row, col, cov);
}

START_TEST(test_patch_class_hand) {
    double cov;
    // no boxes: every patch is background
    ck_assert_int_eq(cls32(NULL, 0, 1, 2, &cov), NM_PATCH_BACKGROUND);
    ck_assert(cov == 0);
    // a box covering exactly patch (1, 2): that patch is object, its neighbours (sharing an
    // edge only) background
    const int one[1][4] = {{16, 8, 24, 16}};
    ck_assert_int_eq(cls32(one, 1, 1, 2, &cov), NM_PATCH_OBJECT);
    ck_assert(cov == 1);
    const int nb[4][2] = {{0, 2}, {2, 2}, {1, 1}, {1, 3}};
    for (int i = 0; i < 4; i++) {
        ck_assert_int_eq(cls32(one, 1, nb[i][0], nb[i][1], &cov), NM_PATCH_BACKGROUND);
        ck_assert(cov == 0);
    }
    ck_assert_int_eq(cls32(one, 1, 3, 3, NULL), NM_PATCH_BACKGROUND);
    // exactly half a patch: object (at least half)
    const int half[1][4] = {{16, 8, 20, 16}};
    ck_assert_int_eq(cls32(half, 1, 1, 2, &cov), NM_PATCH_OBJECT);
    ck_assert(cov == 0.5);
    // just under half, and a single pixel: neither (it overlaps, so not background either)
    const int under[1][4] = {{16, 8, 20, 15}}, pixel[1][4] = {{23, 15, 24, 16}};
    ck_assert_int_eq(cls32(under, 1, 1, 2, &cov), NM_PATCH_NEITHER);
    ck_assert(cov == 28.0 / 64);
    ck_assert_int_eq(cls32(pixel, 1, 1, 2, &cov), NM_PATCH_NEITHER);
    ck_assert(cov == 1.0 / 64);
    // the union counts, not the sum: two copies of a 3/8 box stay 3/8; two 3/8 boxes that
    // overlap in 2/8 cover 4/8
    const int twice[2][4] = {{16, 8, 19, 16}, {16, 8, 19, 16}}, shifted[2][4] = {{16, 8, 19, 16}, {17, 8, 20, 16}};
    ck_assert_int_eq(cls32(twice, 2, 1, 2, &cov), NM_PATCH_NEITHER);
    ck_assert(cov == 3.0 / 8);
    ck_assert_int_eq(cls32(shifted, 2, 1, 2, &cov), NM_PATCH_OBJECT);
    ck_assert(cov == 0.5);
    // a box larger than the patch covers it once
    const int big[1][4] = {{0, 0, 32, 32}};
    ck_assert_int_eq(cls32(big, 1, 2, 3, &cov), NM_PATCH_OBJECT);
    ck_assert(cov == 1);
    // refused: a patch outside the image, sizes out of range
    ck_assert_int_eq(cls32(one, 1, 4, 0, NULL), -1);
    ck_assert_int_eq(nm_eval_patch_class(one, 1, 0, 32, 8, 0, 0, NULL), -1);
    ck_assert_int_eq(nm_eval_patch_class(one, 1, 32, NM_EVAL_MAX_SIDE + 8, 8, 0, 0, NULL), -1);
}
END_TEST

START_TEST(test_box_scale) {
    const int b[4] = {10, 20, 30, 64};
    nm_eval_box s = nm_eval_box_scale(b, 64, 32);
    ck_assert(s.x0 == 5 && s.y0 == 10 && s.x1 == 15 && s.y1 == 32);
    s = nm_eval_box_scale(b, 64, 64);
    ck_assert(s.x0 == 10 && s.y0 == 20 && s.x1 == 30 && s.y1 == 64);
    s = nm_eval_box_scale(b, 32, 96);
    ck_assert(s.x0 == 30 && s.y0 == 60 && s.x1 == 90 && s.y1 == 192);
    const int t[4] = {12, 3, 36, 48}; // x 4/3 lands on integers where the result is one
    s = nm_eval_box_scale(t, 48, 64);
    ck_assert(s.x0 == 16 && s.y0 == 4 && s.x1 == 48 && s.y1 == 64);
    // a data box on a 128-pixel image that maps exactly onto patch (1, 2) of a 64-pixel model
    const int d[1][4] = {{32, 16, 48, 32}};
    double cov;
    ck_assert_int_eq(nm_eval_patch_class(d, 1, 128, 64, 8, 1, 2, &cov), NM_PATCH_OBJECT);
    ck_assert(cov == 1);
    ck_assert_int_eq(nm_eval_patch_class(d, 1, 128, 64, 8, 1, 3, &cov), NM_PATCH_BACKGROUND);
    ck_assert_int_eq(nm_eval_patch_class(d, 1, 128, 64, 8, 2, 2, &cov), NM_PATCH_BACKGROUND);
    // half of it in the data is half a patch in the model; one data pixel less is not
    const int h[1][4] = {{32, 16, 40, 32}}, h1[1][4] = {{32, 16, 39, 32}};
    ck_assert_int_eq(nm_eval_patch_class(h, 1, 128, 64, 8, 1, 2, &cov), NM_PATCH_OBJECT);
    ck_assert(cov == 0.5);
    ck_assert_int_eq(nm_eval_patch_class(h1, 1, 128, 64, 8, 1, 2, &cov), NM_PATCH_NEITHER);
    // enlarging: a 16-pixel image on a 64-pixel model, one data pixel is a 4x4 block
    const int e[1][4] = {{4, 2, 6, 4}};
    ck_assert_int_eq(nm_eval_patch_class(e, 1, 16, 64, 8, 1, 2, &cov), NM_PATCH_OBJECT);
    ck_assert(cov == 1);
    ck_assert_int_eq(nm_eval_patch_class(e, 1, 16, 64, 8, 1, 1, &cov), NM_PATCH_BACKGROUND);
}
END_TEST

// Random boxes on a 48-pixel data image seen by a 64-pixel model (scale 4/3: edges fall between
// pixels), against counting cells of a third of a model pixel (exact: every scaled edge is a
// multiple of 1/3); exact halves come up and must count as object.
START_TEST(test_patch_class_random) {
    nm_test_rng rng = {0x5eed0001ULL + (uint64_t)_i};
    enum { D = 48, S = 64, P = 8, G = S / P, SUB = 3 };
    static unsigned char cell[S * SUB][S * SUB];
    int halves = 0;
    for (int trial = 0; trial < 40; trial++) {
        int n = (int)(nm_test_rng_next(&rng) % 7), bb[8][4];
        memset(cell, 0, sizeof cell);
        for (int i = 0; i < n; i++) {
            int x0 = (int)(nm_test_rng_next(&rng) % (D - 1)), y0 = (int)(nm_test_rng_next(&rng) % (D - 1));
            int x1 = x0 + 1 + (int)(nm_test_rng_next(&rng) % (uint64_t)(D - x0));
            int y1 = y0 + 1 + (int)(nm_test_rng_next(&rng) % (uint64_t)(D - y0));
            if (x1 > D) x1 = D;
            if (y1 > D) y1 = D;
            bb[i][0] = x0, bb[i][1] = y0, bb[i][2] = x1, bb[i][3] = y1;
            // sub-cell k covers [k/3, (k+1)/3) model pixels; it is inside when 4·x0 <= k < 4·x1
            for (int y = 4 * y0; y < 4 * y1; y++)
                for (int x = 4 * x0; x < 4 * x1; x++) cell[y][x] = 1;
        }
        for (int r = 0; r < G; r++)
            for (int c = 0; c < G; c++) {
                int cnt = 0;
                for (int y = r * P * SUB; y < (r + 1) * P * SUB; y++)
                    for (int x = c * P * SUB; x < (c + 1) * P * SUB; x++) cnt += cell[y][x];
                const int total = P * SUB * P * SUB;
                const int want = cnt == 0 ? NM_PATCH_BACKGROUND : 2 * cnt >= total ? NM_PATCH_OBJECT : NM_PATCH_NEITHER;
                halves += 2 * cnt == total;
                double cov;
                const int got = nm_eval_patch_class((const int(*)[4])bb, n, D, S, P, r, c, &cov);
                ck_assert_msg(got == want, "trial %d patch (%d,%d): class %d, pixel count says %d (%d/%d)", trial, r, c, got,
                              want, cnt, total);
                ck_assert_msg(cov == (double)cnt / total, "coverage %.17g vs %d/%d", cov, cnt, total);
            }
    }
    ck_assert_msg(halves > 0, "no exactly-half patch came up: the boundary was not tested");
}
END_TEST

// More boxes on one patch than the function's stack buffer holds.
START_TEST(test_patch_class_many) {
    enum { N = 100 };
    int b[N][4];
    for (int i = 0; i < N; i++) {
        b[i][0] = 8 + (i % 8), b[i][1] = 8, b[i][2] = 9 + (i % 8), b[i][3] = 8 + (i < 8 ? 4 : 3);
    }
    double cov;
    ck_assert_int_eq(cls32((const int(*)[4])b, N, 1, 1, &cov), NM_PATCH_OBJECT);
    ck_assert(cov == 0.5);
}
END_TEST

// ---------------------------------------------------------------------------------------------
// A whole evaluation, cross-checked

// Brute-force class of patch (row, col) for data images f = D/S times the model's size (f >= 1
// integer): count the data pixels of the patch's square that lie inside some bbox.
static int brute_class(const nm_data_record *rec, int D, int S, int p, int row, int col) {
    const int f = D / S, side = p * f;
    int cnt = 0;
    for (int y = row * side; y < (row + 1) * side; y++)
        for (int x = col * side; x < (col + 1) * side; x++)
            for (int i = 0; i < rec->n_objects; i++) {
                const int *b = rec->objects[i].bbox;
                if (x >= b[0] && x < b[2] && y >= b[1] && y < b[3]) {
                    cnt++;
                    break;
                }
            }
    return cnt == 0 ? NM_PATCH_BACKGROUND : 2 * cnt >= side * side ? NM_PATCH_OBJECT : NM_PATCH_NEITHER;
}

static void check_compute_json(json_t *j, const nm_eval_compute *c, int L, const char *what) {
    ck_assert_msg(json_is_object(j), "%s missing", what);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "n")), c->n);
    json_t *s = json_object_get(j, "score");
    ck_assert_msg(isnan(c->score) ? json_is_null(s) : json_real_value(s) == c->score, "%s score", what);
    json_t *layers = json_object_get(j, "layers");
    ck_assert_int_eq((int)json_array_size(layers), L);
    for (int l = 0; l < L; l++) {
        json_t *v = json_array_get(layers, (size_t)l);
        ck_assert_msg(isnan(c->layer_score[l]) ? json_is_null(v) : json_real_value(v) == c->layer_score[l], "%s layer %d", what, l);
    }
}

static void check_task_json(json_t *j, const nm_eval_task *t) {
    ck_assert_str_eq(json_string_value(json_object_get(j, "task")), t->name);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "n")), t->n);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "correct")), t->n_correct);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "majority_hits")), t->n_majority);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "answer_tokens")), t->answer_tokens);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "prompt_tokens")), t->prompt_tokens);
    const char *keys[4] = {"accuracy", "chance", "answer_loss", "prompt_loss"};
    const double vals[4] = {t->accuracy, t->chance, t->answer_loss, t->prompt_loss};
    for (int k = 0; k < 4; k++) {
        json_t *v = json_object_get(j, keys[k]);
        ck_assert_msg(isnan(vals[k]) ? json_is_null(v) : json_real_value(v) == vals[k], "%s.%s", t->name, keys[k]);
    }
    json_t *maj = json_object_get(j, "majority_answer");
    if (t->majority) ck_assert_str_eq(json_string_value(maj), t->majority);
    else ck_assert(json_is_null(maj));
}

// The JSON parses (jansson) and holds exactly the struct's numbers.
static void check_json(const nm_eval_result *r) {
    char *text;
    nm_error err = {0};
    ck_assert_msg(nm_eval_json(r, &text, &err) == NM_OK, "%s", err.msg);
    json_error_t je;
    json_t *j = json_loads(text, JSON_REJECT_DUPLICATES, &je);
    ck_assert_msg(j != NULL, "JSON does not parse: %s (line %d)", je.text, je.line);
    free(text);
    ck_assert_str_eq(json_string_value(json_object_get(j, "format")), "nullmap-eval");
    ck_assert_str_eq(json_string_value(json_object_get(j, "split")), r->split);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "n")), r->n);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "n_split")), r->n_split);
    check_task_json(json_object_get(j, "overall"), &r->all);
    json_t *tasks = json_object_get(j, "tasks");
    ck_assert_int_eq((int)json_array_size(tasks), r->n_tasks);
    for (int k = 0; k < r->n_tasks; k++) check_task_json(json_array_get(tasks, (size_t)k), &r->tasks[k]);
    json_t *pt = json_object_get(j, "patches");
    ck_assert_int_eq(json_integer_value(json_object_get(pt, "image_records")), r->n_image_records);
    ck_assert_int_eq(json_integer_value(json_object_get(pt, "classified_records")), r->n_truth_records);
    ck_assert_int_eq(json_integer_value(json_object_get(pt, "neither")), r->n_neither);
    const char *groups[3] = {"all", "flat", "texture"};
    for (int g = 0; g < 3; g++) {
        json_t *gj = json_object_get(json_object_get(pt, "groups"), groups[g]);
        check_compute_json(json_object_get(gj, "background"), &r->background[g], r->n_layers, groups[g]);
        check_compute_json(json_object_get(gj, "object"), &r->object[g], r->n_layers, groups[g]);
    }
    check_compute_json(json_object_get(json_object_get(j, "modality"), "vision"), &r->vision, r->n_layers, "vision");
    check_compute_json(json_object_get(json_object_get(j, "modality"), "text"), &r->text, r->n_layers, "text");
    json_t *recs = json_object_get(j, "records");
    ck_assert_int_eq((int)json_array_size(recs), r->n);
    for (int i = 0; i < r->n; i++) {
        json_t *e = json_array_get(recs, (size_t)i);
        const nm_eval_record *x = &r->records[i];
        ck_assert_str_eq(json_string_value(json_object_get(e, "id")), x->id);
        ck_assert_str_eq(json_string_value(json_object_get(e, "task")), r->tasks[x->task].name);
        ck_assert_str_eq(json_string_value(json_object_get(e, "answer")), x->answer);
        ck_assert_str_eq(json_string_value(json_object_get(e, "generated")), x->generated);
        ck_assert_int_eq(json_is_true(json_object_get(e, "correct")), x->correct);
        ck_assert_int_eq(json_is_true(json_object_get(e, "stopped")), x->stopped);
        ck_assert(same_double(json_is_null(json_object_get(e, "answer_loss")) ? NAN : json_real_value(json_object_get(e, "answer_loss")),
                              x->answer_loss));
        ck_assert(same_double(json_is_null(json_object_get(e, "prompt_loss")) ? NAN : json_real_value(json_object_get(e, "prompt_loss")),
                              x->prompt_loss));
    }
    json_decref(j);
}

static void check_same_compute(const nm_eval_compute *a, const nm_eval_compute *b, int L) {
    ck_assert_int_eq(a->n, b->n);
    ck_assert(same_double(a->score, b->score));
    for (int l = 0; l < L; l++) {
        ck_assert_int_eq(a->n_real[l], b->n_real[l]);
        ck_assert(same_double(a->layer_score[l], b->layer_score[l]));
    }
}

// Everything the eval computes on `dir` with model m, recomputed another way.
static void check_whole_eval(const nm_model *m, const char *dir) {
    const nm_config *cfg = &m->cfg;
    const int L = cfg->num_layers, K = cfg->moe.top_k, S = cfg->image_size, p = cfg->patch_size, G = S / p;
    nm_eval_opts o = opts(0, 0, 1);
    nm_eval_result r, r2;
    run_ok(&r, m, dir, &o);
    nm_dataset ds, train;
    nm_error err = {0};
    ck_assert_msg(nm_dataset_load(&ds, dir, "eval", &err) == NM_OK, "%s", err.msg);
    ck_assert_msg(nm_dataset_load(&train, dir, "train", &err) == NM_OK, "%s", err.msg);
    ck_assert_int_eq(r.n, ds.n);
    ck_assert_int_eq(r.n_split, ds.n);

    // counts per task add up, and match the data set
    int sum_n = 0, sum_c = 0, sum_h = 0;
    for (int k = 0; k < r.n_tasks; k++) {
        const nm_eval_task *t = &r.tasks[k];
        int n = 0;
        for (int i = 0; i < ds.n; i++) n += !strcmp(ds.rec[i].task, t->name);
        ck_assert_int_eq(t->n, n);
        ck_assert(t->n > 0);
        ck_assert(t->accuracy >= 0 && t->accuracy <= 1);
        ck_assert(isnan(t->chance) || (t->chance >= 0 && t->chance <= 1));
        sum_n += t->n;
        sum_c += t->n_correct;
        sum_h += t->n_majority;
        // the majority answer, recounted from the train split (ties: smallest)
        const char *best = NULL;
        int best_n = 0;
        for (int i = 0; i < train.n; i++) {
            if (strcmp(train.rec[i].task, t->name)) continue;
            int c = 0;
            for (int q = 0; q < train.n; q++) c += !strcmp(train.rec[q].task, t->name) && !strcmp(train.rec[q].answer, train.rec[i].answer);
            if (c > best_n || (c == best_n && strcmp(train.rec[i].answer, best) < 0)) best = train.rec[i].answer, best_n = c;
        }
        if (best) ck_assert_str_eq(t->majority, best);
        else ck_assert_ptr_null(t->majority);
        int hits = 0;
        for (int i = 0; i < ds.n; i++) hits += best && !strcmp(ds.rec[i].task, t->name) && !strcmp(ds.rec[i].answer, best);
        ck_assert_int_eq(t->n_majority, hits);
    }
    ck_assert_int_eq(sum_n, r.all.n);
    ck_assert_int_eq(sum_n, r.n);
    ck_assert_int_eq(sum_c, r.all.n_correct);
    ck_assert_int_eq(sum_h, r.all.n_majority);
    ck_assert(r.all.accuracy >= 0 && r.all.accuracy <= 1);
    ck_assert(fabs(r.all.chance - (double)sum_h / sum_n) < 1e-15);

    // per record: token counts, correctness rule; the prefill recomputed with nm_generate
    long long bg[NM_EVAL_BG_GROUPS][8] = {{0}}, ob[NM_EVAL_BG_GROUPS][8] = {{0}}, nbg[NM_EVAL_BG_GROUPS] = {0},
              nob[NM_EVAL_BG_GROUPS] = {0}, neither = 0, ans_tok = 0;
    double ans_nll = 0;
    int n_img = 0, n_truth = 0;
    nm_metrics met;
    ck_assert_int_eq(nm_metrics_init(&met, L, K, &err), NM_OK);
    nm_engine *e = NULL;
    for (int i = 0; i < r.n; i++) {
        const nm_data_record *rec = &ds.rec[i];
        const nm_eval_record *x = &r.records[i];
        ck_assert_str_eq(x->id, rec->id);
        ck_assert_str_eq(r.tasks[x->task].name, rec->task);
        ck_assert_int_eq(x->answer_tokens, (int)strlen(rec->answer) + 2); // " " answer EOS
        ck_assert_int_eq(x->prompt_tokens, (int)strlen(rec->prompt));
        ck_assert(isfinite(x->answer_loss) && x->answer_loss > 0);
        if (x->correct) ck_assert_str_eq(x->generated, rec->answer);
        ans_tok += x->answer_tokens;
        ans_nll += x->answer_loss * x->answer_tokens;
        nm_trace_sample tr;
        nm_request req = {.prompt = rec->prompt, .image_path = rec->image, .max_new_tokens = NM_EVAL_DEFAULT_MAX_NEW};
        ck_assert_msg(nm_generate(m, &e, &req, &tr, &err) == NM_OK, "%s", err.msg);
        const char *shown = tr.answer;
        while (*shown == ' ') shown++;
        ck_assert_str_eq(x->generated, shown);
        tr.n_tokens = tr.n_prompt_tokens; // the prefill only
        ck_assert_int_eq(nm_metrics_add_sample(&met, &tr, &err), NM_OK);
        if (rec->image) n_img++;
        if (rec->image && rec->has_objects) {
            n_truth++;
            ck_assert_int_eq(tr.image_width, ds.image_size);
            for (int t = 0; t < tr.n_prompt_tokens; t++) {
                if (tr.modality[t] != NM_MOD_VISION) continue;
                const int cls = brute_class(rec, tr.image_width, S, p, tr.patch[2 * t], tr.patch[2 * t + 1]);
                if (cls == NM_PATCH_NEITHER) {
                    neither++;
                    continue;
                }
                for (int g = 0; g < NM_EVAL_BG_GROUPS; g++) {
                    if (g != NM_EVAL_BG_ALL && g != rec->background) continue;
                    (cls == NM_PATCH_BACKGROUND ? nbg : nob)[g]++;
                    for (int l = 0; l < L; l++)
                        (cls == NM_PATCH_BACKGROUND ? bg : ob)[g][l] += tr.n_real[(size_t)l * tr.capacity + t];
                }
            }
        }
        nm_trace_sample_free(&tr);
    }
    nm_engine_free(e);
    nm_metrics_finish(&met);
    ck_assert_int_eq(ans_tok, r.all.answer_tokens);
    ck_assert(fabs(ans_nll / ans_tok - r.all.answer_loss) < 1e-12);
    // patches: the brute-force classes and their n_real sums, exactly
    ck_assert_int_eq(r.n_image_records, n_img);
    ck_assert_int_eq(r.n_truth_records, n_truth);
    ck_assert(n_truth > 0);
    ck_assert_int_eq(r.n_neither, neither);
    ck_assert_int_eq(r.background[0].n + r.object[0].n + r.n_neither, (long long)n_truth * G * G);
    ck_assert_int_eq(r.background[NM_EVAL_BG_FLAT].n + r.background[NM_EVAL_BG_TEXTURE].n, r.background[0].n);
    ck_assert_int_eq(r.object[NM_EVAL_BG_FLAT].n + r.object[NM_EVAL_BG_TEXTURE].n, r.object[0].n);
    ck_assert(r.background[0].n > 0 && r.object[0].n > 0);
    for (int g = 0; g < NM_EVAL_BG_GROUPS; g++) {
        ck_assert_int_eq(r.background[g].n, nbg[g]);
        ck_assert_int_eq(r.object[g].n, nob[g]);
        long long sb = 0, so = 0;
        for (int l = 0; l < L; l++) {
            ck_assert_int_eq(r.background[g].n_real[l], bg[g][l]);
            ck_assert_int_eq(r.object[g].n_real[l], ob[g][l]);
            sb += bg[g][l];
            so += ob[g][l];
            if (nbg[g]) ck_assert(fabs(r.background[g].layer_score[l] - (double)bg[g][l] / ((double)nbg[g] * K)) < 1e-15);
        }
        if (nbg[g]) ck_assert(fabs(r.background[g].score - (double)sb / ((double)nbg[g] * K * L)) < 1e-15);
        if (nob[g]) ck_assert(fabs(r.object[g].score - (double)so / ((double)nob[g] * K * L)) < 1e-15);
        ck_assert(isnan(r.background[g].score) || (r.background[g].score >= 0 && r.background[g].score <= 1));
    }
    // vision vs text: the same as nm_metrics over the prefills
    ck_assert_int_eq(r.vision.n, met.n_tokens[NM_MOD_VISION]);
    ck_assert_int_eq(r.text.n, met.n_tokens[NM_MOD_TEXT]);
    ck_assert(fabs(r.vision.score - met.intensity[NM_MOD_VISION]) < 1e-12);
    ck_assert(fabs(r.text.score - met.intensity[NM_MOD_TEXT]) < 1e-12);
    for (int l = 0; l < L; l++) {
        ck_assert(fabs(r.vision.layer_score[l] - nm_metrics_layer_intensity(&met, l, NM_MOD_VISION)) < 1e-12);
        ck_assert(fabs(r.text.layer_score[l] - nm_metrics_layer_intensity(&met, l, NM_MOD_TEXT)) < 1e-12);
    }
    nm_metrics_free(&met);

    check_json(&r);

    // twice: identical numbers (and identical JSON)
    run_ok(&r2, m, dir, &o);
    ck_assert_int_eq(r2.n_tasks, r.n_tasks);
    for (int k = 0; k < r.n_tasks; k++) {
        ck_assert_int_eq(r2.tasks[k].n_correct, r.tasks[k].n_correct);
        ck_assert(same_double(r2.tasks[k].answer_loss, r.tasks[k].answer_loss));
        ck_assert(same_double(r2.tasks[k].prompt_loss, r.tasks[k].prompt_loss));
    }
    for (int i = 0; i < r.n; i++) {
        ck_assert(same_double(r2.records[i].answer_loss, r.records[i].answer_loss));
        ck_assert_str_eq(r2.records[i].generated, r.records[i].generated);
    }
    for (int g = 0; g < NM_EVAL_BG_GROUPS; g++) {
        check_same_compute(&r2.background[g], &r.background[g], L);
        check_same_compute(&r2.object[g], &r.object[g], L);
    }
    check_same_compute(&r2.vision, &r.vision, L);
    check_same_compute(&r2.text, &r.text, L);
    char *t1, *t2;
    ck_assert_int_eq(nm_eval_json(&r, &t1, &err), NM_OK);
    ck_assert_int_eq(nm_eval_json(&r2, &t2, &err), NM_OK);
    ck_assert_str_eq(t1, t2);
    free(t1);
    free(t2);
    nm_eval_result_free(&r2);
    nm_eval_result_free(&r);
    nm_eval_result_free(&r); // twice is safe
    nm_dataset_free(&ds);
    nm_dataset_free(&train);
}

START_TEST(test_whole_eval) {
    char *tmp = nm_test_tmpdir();
    nm_test_rng rng = {0xe7a1ULL};
    const uint64_t seed = 1 + nm_test_rng_next(&rng) % 1000;
    nm_model m;
    make_model(&m, 1, 512, seed);
    // data images the model's size, and twice its size (bboxes scaled by 1/2)
    const char *d32 = nm_test_path(tmp, "d32");
    generate(d32, 30, 14, seed, 32);
    check_whole_eval(&m, d32);
    char d64[512];
    snprintf(d64, sizeof d64, "%s/d64", tmp);
    generate(d64, 30, 14, seed + 1, 64);
    check_whole_eval(&m, d64);
    nm_model_free(&m);
    nm_test_rmtree(tmp);
    free(tmp);
}
END_TEST

// --limit: the first N, or N drawn with the seed, in file order.
START_TEST(test_limit_and_subset) {
    char *tmp = nm_test_tmpdir();
    nm_model m;
    make_model(&m, 1, 512, 3);
    generate(tmp, 8, 12, 5, 32);
    nm_eval_result a, b, c, d;
    nm_eval_opts o = opts(5, 0, 1);
    run_ok(&a, &m, tmp, &o);
    ck_assert_int_eq(a.n, 5);
    ck_assert_int_eq(a.n_split, 12);
    for (int i = 0; i < 5; i++) {
        char want[32];
        snprintf(want, sizeof want, "eval-%06d", i);
        ck_assert_str_eq(a.records[i].id, want);
    }
    o = opts(5, 1, 7);
    run_ok(&b, &m, tmp, &o);
    run_ok(&c, &m, tmp, &o);
    o = opts(5, 1, 8);
    run_ok(&d, &m, tmp, &o);
    ck_assert_int_eq(b.n, 5);
    int differ = 0;
    for (int i = 0; i < 5; i++) {
        ck_assert_str_eq(b.records[i].id, c.records[i].id);
        if (i) ck_assert(strcmp(b.records[i - 1].id, b.records[i].id) < 0); // file order
        differ |= strcmp(b.records[i].id, d.records[i].id) != 0;
    }
    ck_assert_msg(differ, "seeds 7 and 8 drew the same subset");
    ck_assert_int_eq(b.sample, 1);
    // a limit over the split's size is the whole split
    nm_eval_result e;
    o = opts(100, 1, 7);
    run_ok(&e, &m, tmp, &o);
    ck_assert_int_eq(e.n, 12);
    ck_assert_int_eq(e.sample, 0); // nothing was drawn
    // the train split
    nm_eval_result t;
    o = opts(0, 0, 1);
    o.split = "train";
    run_ok(&t, &m, tmp, &o);
    ck_assert_int_eq(t.n, 8);
    ck_assert_str_eq(t.records[0].id, "train-000000");
    for (int k = 0; k < t.n_tasks; k++) ck_assert_ptr_nonnull(t.tasks[k].majority); // every task is in train
    nm_eval_result_free(&a);
    nm_eval_result_free(&b);
    nm_eval_result_free(&c);
    nm_eval_result_free(&d);
    nm_eval_result_free(&e);
    nm_eval_result_free(&t);
    nm_model_free(&m);
    nm_test_rmtree(tmp);
    free(tmp);
}
END_TEST

// ---------------------------------------------------------------------------------------------
// The answer loss, by hand from nm_engine_forward logits

static double nll(const float *x, int V, int target) {
    double mx = x[0], s = 0;
    for (int i = 1; i < V; i++) mx = x[i] > mx ? x[i] : mx;
    for (int i = 0; i < V; i++) s += exp(x[i] - mx);
    return -(x[target] - mx - log(s));
}

START_TEST(test_loss_by_hand) {
    char *tmp = nm_test_tmpdir();
    nm_model m;
    make_model(&m, 1, 512, 17);
    const nm_config *cfg = &m.cfg;
    const int V = cfg->vocab_size;
    generate(tmp, 6, 10, 12, 64);
    nm_eval_result r;
    nm_eval_opts o = opts(0, 0, 1);
    run_ok(&r, &m, tmp, &o);
    nm_dataset ds;
    nm_error err = {0};
    ck_assert_int_eq(nm_dataset_load(&ds, tmp, "eval", &err), NM_OK);
    int n_text = 0, n_image = 0;
    for (int i = 0; i < ds.n; i++) {
        const nm_data_record *rec = &ds.rec[i];
        // the sequence by hand: BOS, [IMG_START, patches, IMG_END,] prompt, ' ', answer, EOS
        nm_sequence seq;
        const size_t alen = strlen(rec->answer);
        ck_assert_int_eq(nm_sequence_build(&seq, cfg, rec->prompt, rec->image != NULL, (int)alen + 2, &err), NM_OK);
        const int prompt_start = seq.n - (int)strlen(rec->prompt), answer_start = seq.n;
        ck_assert_int_eq(nm_sequence_push(&seq, cfg, ' ', &err), NM_OK);
        for (size_t k = 0; k < alen; k++) ck_assert_int_eq(nm_sequence_push(&seq, cfg, (unsigned char)rec->answer[k], &err), NM_OK);
        ck_assert_int_eq(nm_sequence_push(&seq, cfg, cfg->tok.eos, &err), NM_OK);
        float *pixels = NULL;
        if (rec->image) {
            nm_image img, sized;
            ck_assert_int_eq(nm_image_load(&img, rec->image, &err), NM_OK);
            ck_assert_int_eq(nm_image_resize(&sized, &img, cfg->image_size, cfg->image_size, &err), NM_OK);
            pixels = malloc((size_t)3 * cfg->image_size * cfg->image_size * sizeof *pixels);
            nm_image_normalize(pixels, &sized);
            nm_image_free(&img);
            nm_image_free(&sized);
            n_image++;
        } else n_text++;
        const int T = seq.n;
        float *logits = malloc((size_t)T * V * sizeof *logits);
        nm_engine *e;
        ck_assert_int_eq(nm_engine_create(&e, &m, T, &err), NM_OK);
        ck_assert_int_eq(nm_engine_forward(e, seq.id, seq.patch, pixels, T, logits, 1, NULL, &err), NM_OK);
        // position t predicts token t + 1: answer targets are answer_start .. T-1, prompt targets
        // prompt_start .. answer_start-1
        double a = 0, p = 0;
        for (int t = answer_start - 1; t < T - 1; t++) a += nll(logits + (size_t)t * V, V, seq.id[t + 1]);
        for (int t = prompt_start - 1; t < answer_start - 1; t++) p += nll(logits + (size_t)t * V, V, seq.id[t + 1]);
        a /= (double)(alen + 2);
        p /= (double)strlen(rec->prompt);
        ck_assert_msg(fabs(a - r.records[i].answer_loss) < 1e-9 * a, "record %s: answer loss %.12f, by hand %.12f", rec->id,
                      r.records[i].answer_loss, a);
        ck_assert_msg(fabs(p - r.records[i].prompt_loss) < 1e-9 * p, "record %s: prompt loss %.12f, by hand %.12f", rec->id,
                      r.records[i].prompt_loss, p);
        nm_engine_free(e);
        free(logits);
        free(pixels);
        nm_sequence_free(&seq);
    }
    ck_assert(n_text > 0 && n_image > 0);
    nm_dataset_free(&ds);
    nm_eval_result_free(&r);
    nm_model_free(&m);
    nm_test_rmtree(tmp);
    free(tmp);
}
END_TEST

// ---------------------------------------------------------------------------------------------
// The baseline and the exact-match rule, on a model rigged to answer "aaaa…"

// Text-only model whose greedy output is always 'a': every embedding has +1000 in dimension 0
// (so the final RMSNorm output is positive there) and the LM head reads only that dimension,
// only for 'a'.
static void rig_model(nm_model *m) {
    const int D = m->cfg.hidden_size, V = m->cfg.vocab_size;
    for (int v = 0; v < V; v++) m->embed[(size_t)v * D] += 1000.0f;
    memset(m->lm_head, 0, (size_t)V * D * sizeof(float));
    m->lm_head[(size_t)'a' * D] = 1.0f;
}

START_TEST(test_baseline_and_exact_match) {
    char *tmp = nm_test_tmpdir();
    nm_model m;
    make_model(&m, 0, 256, 5);
    rig_model(&m);
    // train: colour answers red x3, blue x3, green x1 (a tie: "blue" < "red"); count: 2 x2, 3 x1
    const char *train_tasks[][2] = {{"colour", "red"},  {"colour", "blue"}, {"colour", "red"},  {"count", "2"},
                                    {"colour", "blue"}, {"colour", "red"},  {"colour", "blue"}, {"count", "3"},
                                    {"colour", "green"}, {"count", "2"}};
    char buf[8192];
    size_t n = 0;
    for (size_t i = 0; i < sizeof train_tasks / sizeof train_tasks[0]; i++)
        n += (size_t)snprintf(buf + n, sizeof buf - n,
                              "{\"id\":\"train-%zu\",\"image\":null,\"prompt\":\"q%zu?\",\"answer\":\"%s\",\"task\":\"%s\"}\n", i, i,
                              train_tasks[i][1], train_tasks[i][0]);
    write_text(tmp, "train.jsonl", buf);
    // eval: tasks in a scrambled order, a task train lacks ("zeta", then "alpha"), answers
    // that the rigged model gets right ("aaaa" with a budget of 4) or not ("aaa", "aaaaa")
    const char *eval_tasks[][2] = {{"zeta", "aaaa"},  {"count", "2"},     {"colour", "blue"}, {"alpha", "x"},
                                   {"colour", "red"}, {"colour", "blue"}, {"text", "aaaa"},   {"count", "aaa"},
                                   {"colour", "aaaaa"}};
    n = 0;
    for (size_t i = 0; i < sizeof eval_tasks / sizeof eval_tasks[0]; i++)
        n += (size_t)snprintf(buf + n, sizeof buf - n,
                              "{\"id\":\"eval-%zu\",\"image\":null,\"prompt\":\"Say it %zu.\",\"answer\":\"%s\",\"task\":\"%s\"}\n", i,
                              i, eval_tasks[i][1], eval_tasks[i][0]);
    write_text(tmp, "eval.jsonl", buf);
    nm_eval_result r;
    nm_eval_opts o = opts(0, 0, 1);
    o.max_new_tokens = 4;
    run_ok(&r, &m, tmp, &o);
    // known tasks first in their order, then the others as they appear
    const char *order[] = {"colour", "count", "text", "zeta", "alpha"};
    ck_assert_int_eq(r.n_tasks, 5);
    for (int k = 0; k < 5; k++) ck_assert_str_eq(r.tasks[k].name, order[k]);
    const nm_eval_task *colour = &r.tasks[0], *count = &r.tasks[1], *text = &r.tasks[2], *zeta = &r.tasks[3];
    ck_assert_str_eq(colour->majority, "blue");
    ck_assert_int_eq(colour->n, 4);
    ck_assert_int_eq(colour->n_majority, 2);
    ck_assert(colour->chance == 0.5);
    ck_assert_str_eq(count->majority, "2");
    ck_assert(count->chance == 0.5);
    ck_assert_ptr_null(text->majority);
    ck_assert(isnan(text->chance));
    ck_assert(isnan(zeta->chance));
    ck_assert(r.all.chance == 3.0 / 9); // tasks without a baseline count as wrong
    // exact match: "aaaa" right (twice), "aaa" and "aaaaa" wrong; the budget cut the answer
    for (int i = 0; i < r.n; i++) {
        ck_assert_str_eq(r.records[i].generated, "aaaa");
        ck_assert_int_eq(r.records[i].stopped, 0);
        ck_assert_int_eq(r.records[i].correct, !strcmp(eval_tasks[i][1], "aaaa"));
    }
    ck_assert_int_eq(r.all.n_correct, 2);
    ck_assert(r.all.accuracy == 2.0 / 9);
    ck_assert_int_eq(zeta->n_correct, 1);
    ck_assert(zeta->accuracy == 1);
    ck_assert(colour->accuracy == 0);
    // text-only data: no patches, no vision; undefined values are NAN and null in the JSON
    ck_assert_int_eq(r.n_image_records, 0);
    ck_assert_int_eq(r.vision.n, 0);
    ck_assert(isnan(r.vision.score) && isnan(r.background[0].score) && isnan(r.object[0].layer_score[0]));
    ck_assert(r.text.n > 0 && r.text.score >= 0 && r.text.score <= 1);
    check_json(&r);
    nm_eval_result_free(&r);
    // a split without train.jsonl: the baseline cannot be computed, and it says so
    remove(nm_test_path(tmp, "train.jsonl"));
    nm_error err = {0};
    ck_assert_int_eq(nm_eval_run(&r, &m, tmp, &o, &err), NM_ERR_IO);
    ck_assert_msg(strstr(err.msg, "train.jsonl") && strstr(err.msg, "baseline"), "%s", err.msg);
    nm_eval_result_free(&r);
    nm_model_free(&m);
    nm_test_rmtree(tmp);
    free(tmp);
}
END_TEST

// ---------------------------------------------------------------------------------------------
// Errors: every one names the file and what is wrong, and leaves the result zeroed

static void expect_fail(const nm_model *m, const char *dir, nm_status code, const char *what1, const char *what2) {
    nm_eval_result r;
    nm_eval_opts o = opts(0, 0, 1);
    nm_error err = {0};
    nm_status st = nm_eval_run(&r, m, dir, &o, &err);
    ck_assert_msg(st == code, "status %s (expected %s): %s", nm_status_name(st), nm_status_name(code), err.msg);
    ck_assert_msg(strstr(err.msg, what1) != NULL, "'%s' does not say '%s'", err.msg, what1);
    ck_assert_msg(!what2 || strstr(err.msg, what2) != NULL, "'%s' does not say '%s'", err.msg, what2);
    ck_assert_ptr_null(r.records);
    ck_assert_ptr_null(r.tasks);
    ck_assert_int_eq(r.n, 0);
    nm_eval_result_free(&r);
}

START_TEST(test_errors) {
    char *tmp = nm_test_tmpdir();
    const char *data = nm_test_path(tmp, "data");
    char dir[512];
    snprintf(dir, sizeof dir, "%s", data);
    generate(dir, 4, 6, 2, 32);
    nm_model vis, txt, shortm;
    make_model(&vis, 1, 512, 1);
    make_model(&txt, 0, 512, 1);
    make_model(&shortm, 1, 40, 1); // 19 tokens of image and specials leave 21 for prompt and answer

    // image records for a text-only model
    expect_fail(&txt, dir, NM_ERR_INVALID, "eval.jsonl:", "text-only");
    // no such directory; no eval split
    char missing[600];
    snprintf(missing, sizeof missing, "%s/nope", tmp);
    expect_fail(&vis, missing, NM_ERR_IO, "nope/eval.jsonl", NULL);

    // hand-written records on the generated images
    const char *img = "eval/000000.png";
    char line[2048];
    // a sequence over max_positions
    snprintf(line, sizeof line,
             "{\"id\":\"long-1\",\"image\":\"%s\",\"prompt\":\"What colour is the square in this picture?\",\"answer\":\"red\","
             "\"task\":\"colour\"}\n",
             img);
    write_text(dir, "eval.jsonl", line);
    expect_fail(&shortm, dir, NM_ERR_LIMIT, "eval.jsonl:1: record long-1", "max_positions");
    // a bbox outside the 32x32 image
    snprintf(line, sizeof line,
             "{\"id\":\"ok-1\",\"image\":null,\"prompt\":\"2+2?\",\"answer\":\"4\",\"task\":\"text\"}\n"
             "{\"id\":\"box-2\",\"image\":\"%s\",\"prompt\":\"Colour?\",\"answer\":\"red\",\"task\":\"colour\","
             "\"background\":\"flat\",\"objects\":[{\"kind\":\"square\",\"bbox\":[0,0,33,10]}]}\n",
             img);
    write_text(dir, "eval.jsonl", line);
    expect_fail(&vis, dir, NM_ERR_INVALID, "eval.jsonl:2: record box-2", "outside the 32x32 image");
    // info.json's image_size differs from the images
    snprintf(line, sizeof line,
             "{\"id\":\"size-1\",\"image\":\"%s\",\"prompt\":\"Colour?\",\"answer\":\"red\",\"task\":\"colour\",\"objects\":[]}\n",
             img);
    write_text(dir, "eval.jsonl", line);
    char *info = nm_test_read_file(nm_test_path(dir, "info.json"), NULL);
    write_text(dir, "info.json", "{\"image_size\": 48}");
    expect_fail(&vis, dir, NM_ERR_INVALID, "record size-1", "info.json gives image_size 48");
    write_text(dir, "info.json", info);
    free(info);
    // a non-square image with objects (the 320x240 sample image)
    char sample[1024];
    snprintf(sample, sizeof sample, "%s/../samples/images/shapes.png", nm_test_dir());
    snprintf(line, sizeof line,
             "{\"id\":\"wide-1\",\"image\":\"%s\",\"prompt\":\"Colour?\",\"answer\":\"red\",\"task\":\"colour\",\"objects\":[]}\n",
             sample);
    write_text(dir, "eval.jsonl", line);
    expect_fail(&vis, dir, NM_ERR_INVALID, "record wide-1", "not square");
    // ... which is fine without objects (nothing to place)
    snprintf(line, sizeof line, "{\"id\":\"wide-2\",\"image\":\"%s\",\"prompt\":\"Colour?\",\"answer\":\"red\",\"task\":\"colour\"}\n",
             sample);
    write_text(dir, "eval.jsonl", line);
    nm_eval_result r;
    nm_eval_opts o = opts(0, 0, 1);
    run_ok(&r, &vis, dir, &o);
    ck_assert_int_eq(r.n_image_records, 1);
    ck_assert_int_eq(r.n_truth_records, 0);
    ck_assert_int_eq(r.background[0].n + r.object[0].n, 0);
    ck_assert_int_eq(r.vision.n, 16);
    nm_eval_result_free(&r);
    // a missing image
    write_text(dir, "eval.jsonl", "{\"id\":\"gone-1\",\"image\":\"eval/none.png\",\"prompt\":\"Colour?\",\"answer\":\"red\",\"task\":\"colour\"}\n");
    expect_fail(&vis, dir, NM_ERR_IO, "eval.jsonl:1: record gone-1", "none.png");
    // an empty split
    write_text(dir, "eval.jsonl", "");
    expect_fail(&vis, dir, NM_ERR_INVALID, "eval.jsonl", "no records");
    // bad options
    nm_error err = {0};
    o.max_new_tokens = 0;
    ck_assert_int_eq(nm_eval_run(&r, &vis, dir, &o, &err), NM_ERR_INVALID);
    o = opts(0, 0, 1);
    o.split = "test";
    ck_assert_int_eq(nm_eval_run(&r, &vis, dir, &o, &err), NM_ERR_INVALID);
    nm_model_free(&vis);
    nm_model_free(&txt);
    nm_model_free(&shortm);
    nm_test_rmtree(tmp);
    free(tmp);
}
END_TEST

NM_TEST_SUITE(eval) {
    Suite *s = suite_create("eval");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_patch_class_hand);
    tcase_add_test(tc, test_box_scale);
    tcase_add_loop_test(tc, test_patch_class_random, 0, 3);
    tcase_add_test(tc, test_patch_class_many);
    tcase_add_test(tc, test_whole_eval);
    tcase_add_test(tc, test_limit_and_subset);
    tcase_add_test(tc, test_loss_by_hand);
    tcase_add_test(tc, test_baseline_and_exact_match);
    tcase_add_test(tc, test_errors);
    suite_add_tcase(s, tc);
    return s;
}
