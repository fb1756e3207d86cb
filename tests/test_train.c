// test_train.c — the training loop (nm_train.h) on a tiny model and data set: the loss falls,
// a run stopped and resumed ends bit-identical to an uninterrupted one, a diverging run stops
// cleanly and keeps its checkpoint, and bad configs / run directories are refused.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "nm_data.h"
#include "nm_model.h"
#include "nm_train.h"
#include "test_util.h"

static char *g_data; // one small data set for the whole suite

static const char *CONFIG_FMT =
    "{ \"model_type\": \"nullmap-moe\", \"format_version\": 1, \"hidden_size\": 16, \"num_layers\": 2,\n"
    "  \"num_heads\": 2, \"num_kv_heads\": 1, \"head_dim\": 8, \"vocab_size\": 261, \"max_positions\": 256,\n"
    "  \"rope_theta\": 10000.0, \"rms_norm_eps\": 1e-6, \"tie_embeddings\": false,\n"
    "  \"moe\": { \"num_experts\": 4, \"null_copies\": 4, \"top_k\": 2, \"expert_hidden\": 16,\n"
    "           \"shared_expert_hidden\": 8, \"null_kind\": \"zero\" },\n"
    "  \"vision\": { \"image_size\": 16, \"patch_size\": 8, \"channels\": 3 },\n"
    "  \"tokenizer\": { \"type\": \"byte\", \"bos\": 256, \"eos\": 257, \"image_start\": 258, \"image_end\": 259,\n"
    "                 \"pad\": 260 },\n"
    "  \"train\": { %s } }\n";

static char *write_config(const char *dir, const char *name, const char *train) {
    char text[4096];
    snprintf(text, sizeof text, CONFIG_FMT, train);
    char *path = strdup(nm_test_path(dir, name));
    ck_assert_int_eq(nm_test_write_file(path, text, strlen(text)), 0);
    return path;
}

static void suite_setup(void) {
    g_data = nm_test_tmpdir();
    char *dir = strdup(nm_test_path(g_data, "data"));
    nm_error err = {0};
    ck_assert_msg(nm_data_generate(dir, 64, 8, 5, 16, 0, NULL, NULL, &err) == NM_OK, "%s", err.msg);
    free(g_data);
    g_data = dir;
}

static void suite_teardown(void) {
    char *parent = strdup(g_data);
    *strrchr(parent, '/') = 0;
    nm_test_rmtree(parent);
    free(parent);
    free(g_data);
}

static nm_status train(const char *cfg, const char *out, int resume, long stop_after, nm_error *err) {
    nm_train_options o = {.config_path = cfg, .data_dir = g_data, .out_dir = out, .resume = resume,
                          .stop_after = stop_after};
    return nm_train_run(&o, err);
}

// Column `col` (0-based) of every data row of log.csv.
static int read_log_column(const char *run, int col, double *v, int max) {
    char *text = nm_test_read_file(nm_test_path(run, "log.csv"), NULL);
    int n = 0;
    char *line = strchr(text, '\n');
    while (line && line[1] && n < max) {
        line++;
        const char *f = line;
        for (int i = 0; i < col; i++) f = strchr(f, ',') + 1;
        v[n++] = strtod(f, NULL);
        line = strchr(line, '\n');
    }
    free(text);
    return n;
}

START_TEST(test_loss_falls) {
    char *tmp = nm_test_tmpdir();
    char *cfg = write_config(tmp, "cfg.json",
                             "\"steps\": 40, \"batch_size\": 8, \"lr\": 1e-2, \"warmup_steps\": 4, "
                             "\"checkpoint_every\": 10, \"prompt_loss_weight\": 0.5");
    const char *run = nm_test_path(tmp, "run");
    nm_error err = {0};
    ck_assert_msg(train(cfg, run, 0, 0, &err) == NM_OK, "%s", err.msg);
    double ce[64];
    int n = read_log_column(run, 3, ce, 64);
    ck_assert_int_eq(n, 40);
    double first = 0, last = 0;
    for (int i = 0; i < 5; i++) first += ce[i] / 5, last += ce[n - 5 + i] / 5;
    printf("  tiny training run: CE %.3f over the first 5 steps -> %.3f over the last 5\n", first, last);
    ck_assert_msg(last < 0.8 * first, "loss did not fall: %.4f -> %.4f", first, last);
    // the trained model loads like any model; two checkpoints are kept
    nm_model m;
    ck_assert_msg(nm_model_load(&m, nm_test_path(run, "final"), &err) == NM_OK, "%s", err.msg);
    nm_model_free(&m);
    struct stat st;
    ck_assert_int_eq(stat(nm_test_path(run, "ckpt-0000040"), &st), 0);
    ck_assert_int_eq(stat(nm_test_path(run, "ckpt-0000030"), &st), 0);
    ck_assert_int_ne(stat(nm_test_path(run, "ckpt-0000020"), &st), 0);
    // null slot ratio and intensities are logged and in range
    double nr[64];
    ck_assert_int_eq(read_log_column(run, 8, nr, 64), 40);
    for (int i = 0; i < 40; i++) ck_assert(nr[i] >= 0 && nr[i] <= 1);
    free(cfg);
    nm_test_rmtree(tmp);
    free(tmp);
}
END_TEST

START_TEST(test_resume_bit_identical) {
    char *tmp = nm_test_tmpdir();
    char *cfg = write_config(tmp, "cfg.json",
                             "\"steps\": 12, \"batch_size\": 6, \"lr\": 5e-3, \"warmup_steps\": 2, "
                             "\"checkpoint_every\": 4");
    char *a = strdup(nm_test_path(tmp, "a")), *b = strdup(nm_test_path(tmp, "b"));
    nm_error err = {0};
    ck_assert_msg(train(cfg, a, 0, 0, &err) == NM_OK, "%s", err.msg);
    ck_assert_msg(train(cfg, b, 0, 7, &err) == NM_OK, "%s", err.msg); // stops after step 7 (checkpoint 7)
    struct stat st;
    ck_assert_int_ne(stat(nm_test_path(b, "final"), &st), 0);
    // a fresh start over a run is refused; --resume continues it
    ck_assert_int_eq(train(cfg, b, 0, 0, &err), NM_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(err.msg, "--resume"));
    ck_assert_msg(train(cfg, b, 1, 0, &err) == NM_OK, "%s", err.msg);
    size_t na, nb;
    char *ma = nm_test_read_file(nm_test_path(a, "final/model.safetensors"), &na);
    char *mb = nm_test_read_file(nm_test_path(b, "final/model.safetensors"), &nb);
    ck_assert_int_eq(na, nb);
    ck_assert_msg(!memcmp(ma, mb, na), "resumed run differs from the uninterrupted one");
    // the logs agree on every loss
    double la[16], lb[16];
    ck_assert_int_eq(read_log_column(a, 2, la, 16), 12);
    ck_assert_int_eq(read_log_column(b, 2, lb, 16), 12);
    for (int i = 0; i < 12; i++) ck_assert(la[i] == lb[i]);
    free(ma);
    free(mb);
    free(a);
    free(b);
    free(cfg);
    nm_test_rmtree(tmp);
    free(tmp);
}
END_TEST

START_TEST(test_diverged_run_stops) {
    // A run whose weights went bad: train 3 steps, put a NaN into the newest checkpoint's
    // weights, resume. The next step's loss is NaN: the run must stop with NM_ERR_DIVERGED
    // naming the step, before any update, leaving the checkpoint as it was and no final model.
    char *tmp = nm_test_tmpdir();
    char *cfg = write_config(tmp, "cfg.json", "\"steps\": 6, \"batch_size\": 4, \"checkpoint_every\": 1");
    char *run = strdup(nm_test_path(tmp, "run")), *ck = strdup(nm_test_path(run, "ckpt-0000003"));
    nm_error err = {0};
    ck_assert_msg(train(cfg, run, 0, 3, &err) == NM_OK, "%s", err.msg);
    nm_model m;
    ck_assert_msg(nm_model_load(&m, ck, &err) == NM_OK, "%s", err.msg);
    m.norm[5] = NAN;
    ck_assert_msg(nm_model_save(&m, ck, NM_DT_F32, &err) == NM_OK, "%s", err.msg);
    nm_model_free(&m);
    size_t n0, n1;
    char *before = nm_test_read_file(nm_test_path(ck, "model.safetensors"), &n0);
    ck_assert_int_eq(train(cfg, run, 1, 0, &err), NM_ERR_DIVERGED);
    printf("  diverging run: %s\n", err.msg);
    ck_assert_ptr_nonnull(strstr(err.msg, "step 4"));
    char *after = nm_test_read_file(nm_test_path(ck, "model.safetensors"), &n1);
    ck_assert(n0 == n1 && !memcmp(before, after, n0));
    struct stat st;
    ck_assert_int_ne(stat(nm_test_path(run, "final"), &st), 0);
    ck_assert_int_ne(stat(nm_test_path(run, "ckpt-0000004"), &st), 0);
    free(before);
    free(after);
    free(ck);
    free(run);
    free(cfg);
    nm_test_rmtree(tmp);
    free(tmp);
}
END_TEST

START_TEST(test_bad_configs) {
    char *tmp = nm_test_tmpdir();
    const char *run = nm_test_path(tmp, "run");
    nm_error err = {0};
    char *cfg = write_config(tmp, "typo.json", "\"step\": 10");
    ck_assert_int_eq(train(cfg, run, 0, 0, &err), NM_ERR_FORMAT);
    ck_assert_ptr_nonnull(strstr(err.msg, "train.step"));
    free(cfg);
    cfg = write_config(tmp, "neg.json", "\"lr\": -1");
    ck_assert_int_eq(train(cfg, run, 0, 0, &err), NM_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(err.msg, "train.lr"));
    free(cfg);
    cfg = write_config(tmp, "ok.json", "\"steps\": 2, \"batch_size\": 2");
    ck_assert_int_eq(train(cfg, run, 1, 0, &err), NM_ERR_IO); // nothing to resume
    ck_assert_ptr_nonnull(strstr(err.msg, "no checkpoint"));
    ck_assert_msg(train(cfg, run, 0, 0, &err) == NM_OK, "%s", err.msg);
    char *other = write_config(tmp, "other.json", "\"steps\": 2, \"batch_size\": 3");
    ck_assert_int_eq(train(other, run, 1, 0, &err), NM_ERR_INVALID); // other settings
    ck_assert_ptr_nonnull(strstr(err.msg, "same config"));
    free(other);
    free(cfg);
    nm_test_rmtree(tmp);
    free(tmp);
}
END_TEST

NM_TEST_SUITE(train) {
    Suite *s = suite_create("train");
    TCase *tc = tcase_create("train");
    tcase_add_unchecked_fixture(tc, suite_setup, suite_teardown);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_loss_falls);
    tcase_add_test(tc, test_resume_bit_identical);
    tcase_add_test(tc, test_diverged_run_stops);
    tcase_add_test(tc, test_bad_configs);
    suite_add_tcase(s, tc);
    return s;
}
