// test_trace.c — trace samples and their HDF5 files (lib/nm_trace.h): exact round trips,
// appending, crash safety (temporary file + rename), refusal to damage foreign files, and the
// reader's validation of files written by other programs (built here with the HDF5 C API).
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <hdf5.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "nm_h5_guard.h"
#include "nm_trace.h"
#include "test_util.h"

// ---------------------------------------------------------------------------------------------
// Helpers

static void make_cfg(nm_config *c, int L, int N, int M, int K) {
    nm_config_init_byte(c);
    c->hidden_size = 96;
    c->num_layers = L;
    c->num_heads = 6;
    c->num_kv_heads = 2;
    c->head_dim = 16;
    c->max_positions = 4096;
    c->moe.num_experts = N;
    c->moe.null_copies = M;
    c->moe.top_k = K;
    c->moe.expert_hidden = 48;
    c->moe.shared_expert_hidden = 32;
    c->has_vision = 1;
    c->image_size = 64;
    c->patch_size = 8;
    c->channels = 3;
}

static int rint_(nm_test_rng *r, int lo, int hi) { // uniform in lo..hi
    return lo + (int)(nm_test_rng_next(r) % (uint64_t)(hi - lo + 1));
}

static char *rand_string(nm_test_rng *r, int maxlen) {
    static const char *pieces[] = {"a", "Z", " ", "é", "█", "\xe2\x82\xac", "\xf0\x9f\x99\x82", "<0x80>", "\\n", "7"};
    int n = rint_(r, 0, maxlen);
    char *s = malloc((size_t)n * 8 + 8); // pieces are <= 6 bytes; room for "x.png"
    ck_assert_ptr_nonnull(s);
    s[0] = '\0';
    for (int i = 0; i < n; i++) strcat(s, pieces[rint_(r, 0, 9)]);
    return s;
}

// A sample with fresh random values everywhere, n_tokens = T, room for cap ≥ T tokens. The
// unused tail (T..cap) is filled with values the writer would refuse, so writing it would show.
static void fill_sample(nm_trace_sample *s, nm_test_rng *r, const nm_config *c, int T, int cap, int with_image) {
    nm_error err;
    ck_assert_int_eq(nm_trace_sample_init(s, c->num_layers, c->moe.top_k, cap, &err), NM_OK);
    int L = c->num_layers, K = c->moe.top_k, N = c->moe.num_experts, M = c->moe.null_copies;
    s->n_tokens = T;
    s->image_path = with_image ? rand_string(r, 12) : NULL;
    if (s->image_path && !s->image_path[0]) strcpy(s->image_path, "x.png");
    s->prompt = rand_string(r, 20);
    s->answer = rand_string(r, 8);
    s->image_width = with_image ? rint_(r, 1, 5000) : 0;
    s->image_height = with_image ? rint_(r, 1, 5000) : 0;
    s->grid_rows = with_image ? rint_(r, 1, 9) : 0;
    s->grid_cols = with_image ? rint_(r, 1, 9) : 0;
    s->n_prompt_tokens = rint_(r, 0, T);
    for (int t = 0; t < cap; t++) {
        int live = t < T;
        s->token_id[t] = live ? rint_(r, -1, 260) : -77;
        s->token_text[t] = live ? rand_string(r, 3) : NULL;
        s->modality[t] = (uint8_t)(live ? rint_(r, 0, NM_MOD_COUNT - 1) : 200);
        s->segment[t] = (uint8_t)(live ? rint_(r, 0, NM_SEG_COUNT - 1) : 201);
        int img = live && with_image && rint_(r, 0, 1);
        s->patch[2 * t] = (int16_t)(img ? rint_(r, 0, s->grid_rows - 1) : live ? -1 : -99);
        s->patch[2 * t + 1] = (int16_t)(img ? rint_(r, 0, s->grid_cols - 1) : live ? -1 : -99);
    }
    for (int l = 0; l < L; l++)
        for (int t = 0; t < cap; t++) {
            size_t lt = (size_t)l * (size_t)cap + (size_t)t;
            int16_t *sl = s->slot + lt * (size_t)K;
            if (t >= T) { // garbage beyond n_tokens
                s->n_real[lt] = 250;
                for (int k = 0; k < K; k++) sl[k] = 12345;
            } else {
                int nr = M == 0 ? K : rint_(r, 0, K);
                s->n_real[lt] = (uint8_t)nr;
                for (int k = 0; k < K; k++) sl[k] = -1;
                for (int i = 0; i < nr; i++) { // nr distinct real experts at random positions
                    int pos, e, dup;
                    do pos = rint_(r, 0, K - 1);
                    while (sl[pos] != -1);
                    do {
                        e = rint_(r, 0, N - 1);
                        dup = 0;
                        for (int k = 0; k < K; k++) dup |= sl[k] == e;
                    } while (dup);
                    sl[pos] = (int16_t)e;
                }
            }
        }
    size_t LC = (size_t)L * (size_t)cap, LCK = LC * (size_t)K;
    nm_test_fill_normal(r, s->prob, LCK, 1.0f);
    nm_test_fill_normal(r, s->gate, LCK, 1.0f);
    nm_test_fill_normal(r, s->null_mass, LC, 1.0f);
    nm_test_fill_normal(r, s->lse, LC, 3.0f);
}

static void assert_str_eq_null(const char *a, const char *b, const char *what) {
    if (!a || !b) {
        ck_assert_msg(a == b, "%s: one is NULL (%s vs %s)", what, a ? a : "NULL", b ? b : "NULL");
        return;
    }
    ck_assert_msg(strcmp(a, b) == 0, "%s: '%s' != '%s'", what, a, b);
}

// Every field of the first n_tokens tokens, exactly (floats bitwise); strides may differ.
static void assert_samples_equal(const nm_trace_sample *a, const nm_trace_sample *b) {
    assert_str_eq_null(a->image_path, b->image_path, "image_path");
    assert_str_eq_null(a->prompt ? a->prompt : "", b->prompt ? b->prompt : "", "prompt");
    assert_str_eq_null(a->answer ? a->answer : "", b->answer ? b->answer : "", "answer");
    ck_assert_int_eq(a->image_width, b->image_width);
    ck_assert_int_eq(a->image_height, b->image_height);
    ck_assert_int_eq(a->grid_rows, b->grid_rows);
    ck_assert_int_eq(a->grid_cols, b->grid_cols);
    ck_assert_int_eq(a->n_prompt_tokens, b->n_prompt_tokens);
    ck_assert_int_eq(a->n_layers, b->n_layers);
    ck_assert_int_eq(a->top_k, b->top_k);
    ck_assert_int_eq(a->n_tokens, b->n_tokens);
    int L = a->n_layers, K = a->top_k, T = a->n_tokens;
    for (int t = 0; t < T; t++) {
        ck_assert_int_eq(a->token_id[t], b->token_id[t]);
        assert_str_eq_null(a->token_text[t] ? a->token_text[t] : "", b->token_text[t], "token_text");
        ck_assert_int_eq(a->modality[t], b->modality[t]);
        ck_assert_int_eq(a->segment[t], b->segment[t]);
        ck_assert_int_eq(a->patch[2 * t], b->patch[2 * t]);
        ck_assert_int_eq(a->patch[2 * t + 1], b->patch[2 * t + 1]);
    }
    for (int l = 0; l < L; l++)
        for (int t = 0; t < T; t++) {
            size_t la = (size_t)l * (size_t)a->capacity + (size_t)t, lb = (size_t)l * (size_t)b->capacity + (size_t)t;
            ck_assert_int_eq(a->n_real[la], b->n_real[lb]);
            ck_assert_mem_eq(&a->null_mass[la], &b->null_mass[lb], sizeof(float));
            ck_assert_mem_eq(&a->lse[la], &b->lse[lb], sizeof(float));
            ck_assert_mem_eq(a->slot + la * (size_t)K, b->slot + lb * (size_t)K, (size_t)K * sizeof(int16_t));
            ck_assert_mem_eq(a->prob + la * (size_t)K, b->prob + lb * (size_t)K, (size_t)K * sizeof(float));
            ck_assert_mem_eq(a->gate + la * (size_t)K, b->gate + lb * (size_t)K, (size_t)K * sizeof(float));
        }
}

static void assert_read_equal(const char *path, int index, const nm_trace_sample *want) {
    nm_trace_sample got;
    nm_error err;
    nm_status st = nm_trace_read_sample(&got, path, index, &err);
    ck_assert_msg(st == NM_OK, "read sample %d: %s", index, err.msg);
    ck_assert_int_eq(got.capacity, got.n_tokens);
    assert_samples_equal(want, &got);
    nm_trace_sample_free(&got);
}

static void assert_no_open_ids(void) {
    ck_assert_int_eq(H5Fget_obj_count((hid_t)H5F_OBJ_ALL, H5F_OBJ_ALL), 0);
}

static void assert_file_is(const char *path, const char *bytes, size_t size) {
    size_t n;
    char *now = nm_test_read_file(path, &n);
    ck_assert_uint_eq(n, size);
    ck_assert_msg(memcmp(now, bytes, size) == 0, "%s changed", path);
    free(now);
}

static int count_entries(const char *dir, const char *containing) {
    DIR *d = opendir(dir);
    ck_assert_ptr_nonnull(d);
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..") && (!containing || strstr(e->d_name, containing))) n++;
    closedir(d);
    return n;
}

// Writes n samples (T from ts[], capacity T + extra[]) into a new trace at path and commits.
static void write_trace(const char *path, const nm_config *c, nm_trace_sample *samples, int n) {
    nm_trace_file *f = NULL;
    nm_error err;
    ck_assert_msg(nm_trace_file_open(&f, path, c, "test-model", 0, 1, &err) == NM_OK, "%s", err.msg);
    for (int i = 0; i < n; i++) {
        int idx = -5;
        ck_assert_msg(nm_trace_file_write_sample(f, &samples[i], &idx, &err) == NM_OK, "%s", err.msg);
        ck_assert_int_eq(idx, i);
    }
    ck_assert_int_eq(nm_trace_file_num_samples(f), n);
    ck_assert_msg(nm_trace_file_commit(f, &err) == NM_OK, "%s", err.msg);
    // Every trace the writer makes passes the reader's pre-open global heap check.
    ck_assert_msg(nm_h5_check_global_heaps(path, &err) == NM_OK, "%s", err.msg);
}

// Three samples of different length on config (L=3, N=6, M=6, K=4); capacity > n_tokens for two.
static void three_samples(nm_trace_sample s[3], nm_config *c, uint64_t seed) {
    make_cfg(c, 3, 6, 6, 4);
    nm_test_rng r = {seed};
    fill_sample(&s[0], &r, c, 5, 9, 1);
    fill_sample(&s[1], &r, c, 37, 37, 1);
    fill_sample(&s[2], &r, c, 1, 4, 0);
}

static void free_samples(nm_trace_sample *s, int n) {
    for (int i = 0; i < n; i++) nm_trace_sample_free(&s[i]);
}

// ---------------------------------------------------------------------------------------------
// Round trips and appending

// The global heap check (nm_h5_guard.h) never refuses a trace the writer made: random model
// shapes, samples with and without images, long and empty texts, appends to an existing file.
START_TEST(test_heap_check_accepts_own_traces) {
    char *dir = nm_test_tmpdir();
    const char *path = nm_test_path(dir, "trace.h5");
    nm_test_rng r = {0x6a09e667f3bcc908ULL};
    nm_error err;
    for (int model = 0; model < 6; model++) {
        nm_config c;
        int N = rint_(&r, 1, 12), M = rint_(&r, 0, 6);
        make_cfg(&c, rint_(&r, 1, 5), N, M, rint_(&r, 1, N)); // K <= N: fill_sample picks up to K distinct experts
        c.has_vision = model % 3 != 2;
        int n = rint_(&r, 1, 4), T[4];
        nm_trace_sample s[4];
        for (int i = 0; i < n; i++) {
            T[i] = model == 5 && i == 0 ? rint_(&r, 3000, 9000) : rint_(&r, 1, 60);
            fill_sample(&s[i], &r, &c, T[i], T[i] + rint_(&r, 0, 3), c.has_vision && rint_(&r, 0, 1));
        }
        write_trace(path, &c, s, n); // checks the file
        nm_trace_file *f = NULL;
        ck_assert_msg(nm_trace_file_open(&f, path, &c, "appended", 1, 0, &err) == NM_OK, "%s", err.msg);
        int idx = -1;
        ck_assert_msg(nm_trace_file_write_sample(f, &s[n - 1], &idx, &err) == NM_OK, "%s", err.msg);
        ck_assert_msg(nm_trace_file_commit(f, &err) == NM_OK, "%s", err.msg);
        ck_assert_msg(nm_h5_check_global_heaps(path, &err) == NM_OK, "model %d after append: %s", model, err.msg);
        for (int i = 0; i < n; i++) assert_read_equal(path, i, &s[i]); // through the reader's check
        assert_read_equal(path, n, &s[n - 1]);
        free_samples(s, n);
    }
    assert_no_open_ids();
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(test_roundtrip) {
    char *dir = nm_test_tmpdir();
    const char *path = nm_test_path(dir, "trace.h5");
    nm_config c;
    nm_trace_sample s[3];
    three_samples(s, &c, 101);
    write_trace(path, &c, s, 3);
    ck_assert_int_eq(count_entries(dir, NULL), 1);

    nm_trace_info info;
    nm_error err;
    ck_assert_msg(nm_trace_read_info(&info, path, &err) == NM_OK, "%s", err.msg);
    ck_assert_int_eq(info.num_samples, 3);
    ck_assert_int_eq(info.format_version, 1);
    ck_assert_str_eq(info.model_name, "test-model");
    ck_assert_msg(strncmp(info.created_by, "nullmap", 7) == 0, "created_by = %s", info.created_by);
    ck_assert_int_eq(info.cfg.num_layers, c.num_layers);
    ck_assert_int_eq(info.cfg.hidden_size, c.hidden_size);
    ck_assert_int_eq(info.cfg.num_heads, c.num_heads);
    ck_assert_int_eq(info.cfg.num_kv_heads, c.num_kv_heads);
    ck_assert_int_eq(info.cfg.head_dim, c.head_dim);
    ck_assert_int_eq(info.cfg.vocab_size, c.vocab_size);
    ck_assert_int_eq(info.cfg.max_positions, c.max_positions);
    ck_assert(info.cfg.rope_theta == c.rope_theta);
    ck_assert(info.cfg.rms_norm_eps == c.rms_norm_eps);
    ck_assert_int_eq(info.cfg.moe.num_experts, c.moe.num_experts);
    ck_assert_int_eq(info.cfg.moe.null_copies, c.moe.null_copies);
    ck_assert_int_eq(info.cfg.moe.top_k, c.moe.top_k);
    ck_assert_int_eq(info.cfg.moe.expert_hidden, c.moe.expert_hidden);
    ck_assert_int_eq(info.cfg.moe.shared_expert_hidden, c.moe.shared_expert_hidden);
    ck_assert_int_eq(info.cfg.moe.null_kind, c.moe.null_kind);
    ck_assert_int_eq(info.cfg.has_vision, 1);
    ck_assert_int_eq(info.cfg.image_size, c.image_size);
    ck_assert_int_eq(info.cfg.patch_size, c.patch_size);
    ck_assert_int_eq(info.cfg.tok.bos, c.tok.bos);
    ck_assert_int_eq(info.cfg.tok.eos, c.tok.eos);
    ck_assert_int_eq(info.cfg.tok.image_start, c.tok.image_start);
    ck_assert_int_eq(info.cfg.tok.image_end, c.tok.image_end);
    ck_assert_int_eq(info.cfg.tok.pad, c.tok.pad);
    for (int i = 0; i < 3; i++) assert_read_equal(path, i, &s[i]);

    nm_trace_sample x;
    ck_assert_int_eq(nm_trace_read_sample(&x, path, 3, &err), NM_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(err.msg, "holds 3 samples"));
    ck_assert_int_eq(nm_trace_read_sample(&x, path, -1, &err), NM_ERR_INVALID);
    ck_assert_ptr_null(x.slot); // a failed read leaves the sample empty (safe to free)
    nm_trace_sample_free(&x);
    assert_no_open_ids();
    free_samples(s, 3);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

// A text-only model (no vision), null_kind copy, M = 0, and a sample long enough for several
// chunks along the token axis.
START_TEST(test_roundtrip_long_text_only) {
    char *dir = nm_test_tmpdir();
    const char *path = nm_test_path(dir, "long.h5");
    nm_config c;
    make_cfg(&c, 2, 5, 0, 3);
    c.has_vision = 0;
    c.moe.null_kind = NM_NULL_COPY;
    nm_test_rng r = {7};
    nm_trace_sample s[2];
    fill_sample(&s[0], &r, &c, 70001, 70010, 0);
    fill_sample(&s[1], &r, &c, 2, 3, 0);
    write_trace(path, &c, s, 2);
    nm_trace_info info;
    nm_error err;
    ck_assert_msg(nm_trace_read_info(&info, path, &err) == NM_OK, "%s", err.msg);
    ck_assert_int_eq(info.cfg.has_vision, 0);
    ck_assert_int_eq(info.cfg.image_size, 0);
    ck_assert_int_eq(info.cfg.patch_size, 0);
    ck_assert_int_eq(info.cfg.moe.null_kind, NM_NULL_COPY);
    ck_assert_int_eq(info.cfg.moe.null_copies, 0);
    assert_read_equal(path, 0, &s[0]);
    assert_read_equal(path, 1, &s[1]);
    assert_no_open_ids();
    free_samples(s, 2);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(test_append) {
    char *dir = nm_test_tmpdir();
    const char *path = nm_test_path(dir, "trace.h5");
    nm_config c;
    nm_trace_sample s[4];
    three_samples(s, &c, 202);
    write_trace(path, &c, s, 3);
    nm_test_rng r = {203};
    fill_sample(&s[3], &r, &c, 11, 20, 1);

    nm_trace_file *f = NULL;
    nm_error err;
    ck_assert_msg(nm_trace_file_open(&f, path, &c, "other-name", 1, 0, &err) == NM_OK, "%s", err.msg);
    ck_assert_int_eq(nm_trace_file_num_samples(f), 3);
    int idx = -1;
    ck_assert_msg(nm_trace_file_write_sample(f, &s[3], &idx, &err) == NM_OK, "%s", err.msg);
    ck_assert_int_eq(idx, 3);
    ck_assert_int_eq(nm_trace_file_num_samples(f), 4);
    ck_assert_msg(nm_trace_file_commit(f, &err) == NM_OK, "%s", err.msg);

    nm_trace_info info;
    ck_assert_msg(nm_trace_read_info(&info, path, &err) == NM_OK, "%s", err.msg);
    ck_assert_int_eq(info.num_samples, 4);
    ck_assert_str_eq(info.model_name, "test-model"); // the root attributes are the original's
    for (int i = 0; i < 4; i++) assert_read_equal(path, i, &s[i]);
    ck_assert_int_eq(count_entries(dir, NULL), 1);

    // --append to a path that does not exist yet: a new trace.
    const char *fresh = nm_test_path(dir, "fresh.h5");
    ck_assert_msg(nm_trace_file_open(&f, fresh, &c, NULL, 1, 0, &err) == NM_OK, "%s", err.msg);
    ck_assert_int_eq(nm_trace_file_num_samples(f), 0);
    ck_assert_msg(nm_trace_file_write_sample(f, &s[1], &idx, &err) == NM_OK, "%s", err.msg);
    ck_assert_int_eq(idx, 0);
    ck_assert_msg(nm_trace_file_commit(f, &err) == NM_OK, "%s", err.msg);
    assert_read_equal(fresh, 0, &s[1]);
    ck_assert_msg(nm_trace_read_info(&info, fresh, &err) == NM_OK, "%s", err.msg);
    ck_assert_str_eq(info.model_name, "");

    assert_no_open_ids();
    free_samples(s, 4);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(test_abort_leaves_file_untouched) {
    char *dir = nm_test_tmpdir();
    const char *path = nm_test_path(dir, "trace.h5");
    nm_config c;
    nm_trace_sample s[3];
    three_samples(s, &c, 303);
    write_trace(path, &c, s, 2);
    size_t size;
    char *before = nm_test_read_file(path, &size);

    for (int mode = 0; mode < 2; mode++) { // append, then overwrite
        nm_trace_file *f = NULL;
        nm_error err;
        ck_assert_msg(nm_trace_file_open(&f, path, &c, "m", mode == 0, mode == 1, &err) == NM_OK, "%s", err.msg);
        ck_assert_int_eq(count_entries(dir, ".tmp-"), 1);
        ck_assert_msg(nm_trace_file_write_sample(f, &s[2], NULL, &err) == NM_OK, "%s", err.msg);
        nm_trace_file_abort(f);
        assert_file_is(path, before, size);
        ck_assert_int_eq(count_entries(dir, ".tmp-"), 0);
        ck_assert_int_eq(count_entries(dir, NULL), 1);
    }
    nm_trace_file_abort(NULL);
    assert_read_equal(path, 1, &s[1]);
    assert_no_open_ids();
    free(before);
    free_samples(s, 3);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(test_existing_target_rules) {
    char *dir = nm_test_tmpdir();
    const char *path = nm_test_path(dir, "trace.h5");
    nm_config c;
    nm_trace_sample s[3];
    three_samples(s, &c, 404);
    write_trace(path, &c, s, 3);
    size_t size;
    char *before = nm_test_read_file(path, &size);
    nm_trace_file *f = (nm_trace_file *)&size; // must be reset to NULL on failure
    nm_error err;

    ck_assert_int_eq(nm_trace_file_open(&f, path, &c, NULL, 0, 0, &err), NM_ERR_IO);
    ck_assert_ptr_null(f);
    ck_assert_msg(strstr(err.msg, path) && strstr(err.msg, "exists (use --force to overwrite or --append"), "%s",
                  err.msg);
    assert_file_is(path, before, size);

    // Overwrite replaces a trace.
    ck_assert_msg(nm_trace_file_open(&f, path, &c, NULL, 0, 1, &err) == NM_OK, "%s", err.msg);
    ck_assert_int_eq(nm_trace_file_num_samples(f), 0);
    ck_assert_msg(nm_trace_file_write_sample(f, &s[2], NULL, &err) == NM_OK, "%s", err.msg);
    ck_assert_msg(nm_trace_file_commit(f, &err) == NM_OK, "%s", err.msg);
    nm_trace_info info;
    ck_assert_msg(nm_trace_read_info(&info, path, &err) == NM_OK, "%s", err.msg);
    ck_assert_int_eq(info.num_samples, 1);
    assert_read_equal(path, 0, &s[2]);

    // A directory at the path.
    const char *sub = nm_test_path(dir, "adir");
    ck_assert_int_eq(mkdir(sub, 0755), 0);
    ck_assert_int_eq(nm_trace_file_open(&f, sub, &c, NULL, 0, 1, &err), NM_ERR_IO);
    ck_assert_int_eq(nm_trace_file_open(&f, sub, &c, NULL, 1, 0, &err), NM_ERR_IO);
    ck_assert_int_eq(count_entries(dir, ".tmp-"), 0);
    assert_no_open_ids();
    free(before);
    free_samples(s, 3);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

// Files that are not nullmap traces are never replaced, whatever the flags.
START_TEST(test_foreign_files_refused) {
    char *dir = nm_test_tmpdir();
    nm_config c;
    make_cfg(&c, 2, 4, 4, 2);
    const char *text = nm_test_path(dir, "notes.h5");
    const char *empty = nm_test_path(dir, "empty.h5");
    const char *plain = nm_test_path(dir, "plain.h5");
    const char *content = "precious notes, not HDF5\n";
    ck_assert_int_eq(nm_test_write_file(text, content, strlen(content)), 0);
    ck_assert_int_eq(nm_test_write_file(empty, "", 0), 0);
    hid_t fid = H5Fcreate(plain, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT); // HDF5, but not a trace
    ck_assert_int_ge(fid, 0);
    ck_assert_int_ge(H5Fclose(fid), 0);
    size_t plain_size;
    char *plain_bytes = nm_test_read_file(plain, &plain_size);

    const char *paths[] = {text, empty, plain};
    for (int i = 0; i < 3; i++) {
        for (int mode = 0; mode < 3; mode++) { // overwrite, append, append + overwrite
            nm_trace_file *f = NULL;
            nm_error err;
            nm_status st = nm_trace_file_open(&f, paths[i], &c, NULL, mode >= 1, mode != 1, &err);
            ck_assert_msg(st == NM_ERR_FORMAT, "%s mode %d: %s (%s)", paths[i], mode, nm_status_name(st), err.msg);
            ck_assert_ptr_null(f);
            ck_assert_msg(strstr(err.msg, paths[i]) != NULL, "%s", err.msg);
            if (i < 2)
                ck_assert_msg(strstr(err.msg, "exists and is not an HDF5 file; refusing to overwrite it"), "%s", err.msg);
            else
                ck_assert_msg(strstr(err.msg, "not a nullmap trace"), "%s", err.msg);
        }
    }
    assert_file_is(text, content, strlen(content));
    assert_file_is(empty, "", 0);
    assert_file_is(plain, plain_bytes, plain_size);
    ck_assert_int_eq(count_entries(dir, ".tmp-"), 0);
    ck_assert_int_eq(count_entries(dir, NULL), 3);
    assert_no_open_ids();
    free(plain_bytes);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(test_append_shape_mismatch) {
    char *dir = nm_test_tmpdir();
    const char *path = nm_test_path(dir, "trace.h5");
    nm_config c;
    nm_trace_sample s[3];
    three_samples(s, &c, 505); // L=3 K=4 N=6 M=6
    write_trace(path, &c, s, 3);
    size_t size;
    char *before = nm_test_read_file(path, &size);
    nm_config other[4];
    for (int i = 0; i < 4; i++) other[i] = c;
    other[0].num_layers = 4;
    other[1].moe.top_k = 3;
    other[2].moe.num_experts = 7;
    other[3].moe.null_copies = 2;
    for (int i = 0; i < 4; i++) {
        nm_trace_file *f = NULL;
        nm_error err;
        ck_assert_int_eq(nm_trace_file_open(&f, path, &other[i], NULL, 1, 0, &err), NM_ERR_INVALID);
        ck_assert_msg(strstr(err.msg, "num_layers=3 top_k=4 num_experts=6 null_copies=6"), "%s", err.msg);
        char want[128];
        snprintf(want, sizeof want, "num_layers=%d top_k=%d num_experts=%d null_copies=%d", other[i].num_layers,
                 other[i].moe.top_k, other[i].moe.num_experts, other[i].moe.null_copies);
        ck_assert_msg(strstr(err.msg, want), "%s", err.msg);
        ck_assert_ptr_null(f);
    }
    // A sample of the wrong shape is refused by an open file too.
    nm_trace_file *f = NULL;
    nm_error err;
    ck_assert_msg(nm_trace_file_open(&f, path, &c, NULL, 1, 0, &err) == NM_OK, "%s", err.msg);
    nm_trace_sample wrong;
    nm_test_rng r = {506};
    fill_sample(&wrong, &r, &other[0], 3, 3, 1);
    ck_assert_int_eq(nm_trace_file_write_sample(f, &wrong, NULL, &err), NM_ERR_INVALID);
    nm_trace_file_abort(f);
    nm_trace_sample_free(&wrong);

    assert_file_is(path, before, size);
    ck_assert_int_eq(count_entries(dir, NULL), 1);
    assert_no_open_ids();
    free(before);
    free_samples(s, 3);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(test_unwritable_directory) {
    char *dir = nm_test_tmpdir();
    nm_config c;
    make_cfg(&c, 2, 4, 4, 2);
    const char *plain = nm_test_path(dir, "plain");
    ck_assert_int_eq(nm_test_write_file(plain, "x", 1), 0);
    const char *bad[] = {nm_test_path(dir, "plain/trace.h5"), nm_test_path(dir, "missing/trace.h5")};
    for (int i = 0; i < 2; i++)
        for (int mode = 0; mode < 2; mode++) {
            nm_trace_file *f = NULL;
            nm_error err;
            ck_assert_int_eq(nm_trace_file_open(&f, bad[i], &c, NULL, mode, 1 - mode, &err), NM_ERR_IO);
            ck_assert_ptr_null(f);
            ck_assert_msg(strstr(err.msg, bad[i]) != NULL, "%s", err.msg);
        }
    ck_assert_int_eq(count_entries(dir, NULL), 1);
    assert_file_is(plain, "x", 1);
    assert_no_open_ids();
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

// A leftover temporary file of a crashed process that had our pid is replaced; files of other
// processes are left alone.
START_TEST(test_stale_temp_file) {
    char *dir = nm_test_tmpdir();
    const char *path = nm_test_path(dir, "trace.h5");
    char stale[4200], other[4200];
    snprintf(stale, sizeof stale, "%s.tmp-%ld", path, (long)getpid());
    snprintf(other, sizeof other, "%s.tmp-999999999", path);
    ck_assert_int_eq(nm_test_write_file(stale, "junk", 4), 0);
    ck_assert_int_eq(nm_test_write_file(other, "junk", 4), 0);
    nm_config c;
    nm_trace_sample s[3];
    three_samples(s, &c, 606);
    write_trace(path, &c, s, 1);
    assert_read_equal(path, 0, &s[0]);
    ck_assert_int_eq(count_entries(dir, NULL), 2);
    assert_file_is(other, "junk", 4);
    free_samples(s, 3);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

// Someone replaced the target while we were appending: commit refuses to clobber it.
START_TEST(test_commit_refuses_changed_target) {
    char *dir = nm_test_tmpdir();
    const char *path = nm_test_path(dir, "trace.h5");
    nm_config c;
    nm_trace_sample s[3];
    three_samples(s, &c, 707);
    write_trace(path, &c, s, 1);
    nm_trace_file *f = NULL;
    nm_error err;
    ck_assert_msg(nm_trace_file_open(&f, path, &c, NULL, 1, 0, &err) == NM_OK, "%s", err.msg);
    ck_assert_msg(nm_trace_file_write_sample(f, &s[1], NULL, &err) == NM_OK, "%s", err.msg);
    // A second writer for the same target in this process is refused (it would share the
    // temporary file); another process's commit is simulated by a rename over the target.
    nm_trace_file *g = NULL;
    ck_assert_int_eq(nm_trace_file_open(&g, path, &c, NULL, 1, 0, &err), NM_ERR_IO);
    ck_assert_msg(strstr(err.msg, "already open for writing"), "%s", err.msg);
    ck_assert_ptr_null(g);
    const char *elsewhere = nm_test_path(dir, "elsewhere.h5");
    write_trace(elsewhere, &c, &s[2], 1);
    ck_assert_int_eq(rename(elsewhere, path), 0);
    size_t size;
    char *theirs = nm_test_read_file(path, &size);
    ck_assert_int_eq(nm_trace_file_commit(f, &err), NM_ERR_IO);
    ck_assert_msg(strstr(err.msg, "changed since this trace was opened"), "%s", err.msg);
    assert_file_is(path, theirs, size);
    ck_assert_int_eq(count_entries(dir, NULL), 1);
    assert_read_equal(path, 0, &s[2]);
    assert_no_open_ids();
    free(theirs);
    free_samples(s, 3);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(test_symlink_target) {
    char *dir = nm_test_tmpdir();
    const char *real = nm_test_path(dir, "real.h5");
    const char *link = nm_test_path(dir, "link.h5");
    nm_config c;
    nm_trace_sample s[3];
    three_samples(s, &c, 808);
    write_trace(real, &c, s, 2);
    ck_assert_int_eq(symlink("real.h5", link), 0);
    nm_trace_file *f = NULL;
    nm_error err;
    ck_assert_msg(nm_trace_file_open(&f, link, &c, NULL, 1, 0, &err) == NM_OK, "%s", err.msg);
    ck_assert_msg(nm_trace_file_write_sample(f, &s[2], NULL, &err) == NM_OK, "%s", err.msg);
    ck_assert_msg(nm_trace_file_commit(f, &err) == NM_OK, "%s", err.msg);
    struct stat st;
    ck_assert_int_eq(lstat(link, &st), 0);
    ck_assert(S_ISLNK(st.st_mode));
    for (int i = 0; i < 3; i++) assert_read_equal(real, i, &s[i]);
    ck_assert_int_eq(count_entries(dir, NULL), 2);
    free_samples(s, 3);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

// ---------------------------------------------------------------------------------------------
// Samples the writer refuses (nothing is written; the file stays usable)

START_TEST(test_write_refuses_bad_samples) {
    char *dir = nm_test_tmpdir();
    const char *path = nm_test_path(dir, "trace.h5");
    nm_config c;
    make_cfg(&c, 2, 5, 3, 3);
    nm_test_rng r = {909};
    nm_trace_file *f = NULL;
    nm_error err;
    ck_assert_msg(nm_trace_file_open(&f, path, &c, NULL, 0, 0, &err) == NM_OK, "%s", err.msg);
    enum { N_CASES = 9 };
    const char *expect[N_CASES] = {"no tokens", "routing/slot", "routing/slot", "routing/n_real", "tokens/modality",
                                   "tokens/segment", "tokens/text", "tokens/patch", "n_tokens"};
    for (int i = 0; i < N_CASES; i++) {
        nm_trace_sample s;
        fill_sample(&s, &r, &c, 6, 8, 1);
        size_t lt = 1 * 8 + 2; // layer 1, token 2
        switch (i) {
        case 0: s.n_tokens = 0; break;
        case 1: s.slot[lt * 3 + 1] = 5; break;  // = N
        case 2: s.slot[lt * 3 + 0] = -2; break;
        case 3: s.n_real[lt] = (uint8_t)(s.n_real[lt] + 1); break;
        case 4: s.modality[4] = NM_MOD_COUNT; break;
        case 5: s.segment[0] = NM_SEG_COUNT; break;
        case 6:
            free(s.token_text[3]);
            s.token_text[3] = strdup("ab\xff");
            ck_assert_ptr_nonnull(s.token_text[3]);
            break;
        case 7: s.patch[2 * 5] = (int16_t)s.grid_rows; break;
        case 8: s.n_tokens = 9; break; // > capacity
        }
        nm_status st = nm_trace_file_write_sample(f, &s, NULL, &err);
        ck_assert_msg(st == NM_ERR_INVALID, "case %d: %s %s", i, nm_status_name(st), err.msg);
        ck_assert_msg(strstr(err.msg, expect[i]) != NULL, "case %d: %s", i, err.msg);
        nm_trace_sample_free(&s);
    }
    ck_assert_int_eq(nm_trace_file_num_samples(f), 0);
    nm_trace_sample ok;
    fill_sample(&ok, &r, &c, 6, 8, 1);
    int idx = -1;
    ck_assert_msg(nm_trace_file_write_sample(f, &ok, &idx, &err) == NM_OK, "%s", err.msg);
    ck_assert_int_eq(idx, 0);
    ck_assert_msg(nm_trace_file_commit(f, &err) == NM_OK, "%s", err.msg);
    nm_trace_info info;
    ck_assert_msg(nm_trace_read_info(&info, path, &err) == NM_OK, "%s", err.msg);
    ck_assert_int_eq(info.num_samples, 1);
    assert_read_equal(path, 0, &ok);
    nm_trace_sample_free(&ok);
    assert_no_open_ids();
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(test_sample_init_limits) {
    nm_trace_sample s;
    nm_error err;
    ck_assert_int_eq(nm_trace_sample_init(&s, 0, 4, 4, &err), NM_ERR_INVALID);
    ck_assert_int_eq(nm_trace_sample_init(&s, 2, 4, 0, &err), NM_ERR_INVALID);
    ck_assert_int_eq(nm_trace_sample_init(&s, 1024, 8192, 1 << 20, &err), NM_ERR_LIMIT);
    ck_assert_int_eq(nm_trace_sample_init(&s, 2, 2, 2, &err), NM_OK);
    ck_assert_int_eq(s.capacity, 2);
    ck_assert_int_eq(s.n_tokens, 0);
    ck_assert_ptr_null(s.token_text[1]);
    nm_trace_sample_free(&s);
    nm_trace_sample_free(&s); // idempotent
    nm_config c;
    make_cfg(&c, 2, 4, 4, 9); // K > N + M
    nm_trace_file *f = NULL;
    char *dir = nm_test_tmpdir();
    ck_assert_int_eq(nm_trace_file_open(&f, nm_test_path(dir, "t.h5"), &c, NULL, 0, 0, &err), NM_ERR_INVALID);
    ck_assert_int_eq(count_entries(dir, NULL), 0);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

// ---------------------------------------------------------------------------------------------
// Damaged files and files written by other programs

START_TEST(test_truncated_file) {
    char *dir = nm_test_tmpdir();
    const char *path = nm_test_path(dir, "trace.h5");
    const char *cut = nm_test_path(dir, "cut.h5");
    nm_config c;
    nm_trace_sample s[3];
    three_samples(s, &c, 1001);
    write_trace(path, &c, s, 3);
    size_t size;
    char *bytes = nm_test_read_file(path, &size);
    size_t cuts[] = {size / 2, size / 4, size * 3 / 4, size - 1, 600, 100, 8};
    for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++) {
        ck_assert_int_eq(nm_test_write_file(cut, bytes, cuts[i]), 0);
        nm_trace_info info;
        nm_trace_sample x;
        nm_error err;
        nm_status st = nm_trace_read_info(&info, cut, &err);
        ck_assert_msg(st == NM_ERR_FORMAT, "cut at %zu: %s %s", cuts[i], nm_status_name(st), err.msg);
        ck_assert_msg(strstr(err.msg, cut) != NULL, "%s", err.msg);
        ck_assert_int_eq(info.num_samples, 0);
        ck_assert_int_ne(nm_trace_read_sample(&x, cut, 0, &err), NM_OK);
        nm_trace_sample_free(&x);
        nm_trace_file *f = NULL;
        ck_assert_int_ne(nm_trace_file_open(&f, cut, &c, NULL, 1, 0, &err), NM_OK);
        ck_assert_int_ne(nm_trace_file_open(&f, cut, &c, NULL, 0, 1, &err), NM_OK);
        ck_assert_ptr_null(f);
        assert_file_is(cut, bytes, cuts[i]);
    }
    ck_assert_int_eq(count_entries(dir, ".tmp-"), 0);
    nm_trace_info info;
    nm_error err;
    ck_assert_int_eq(nm_trace_read_info(&info, nm_test_path(dir, "nonexistent.h5"), &err), NM_ERR_IO);
    assert_no_open_ids();
    free(bytes);
    free_samples(s, 3);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

// Rewrites one element of an integer dataset in place (HDF5 C API, as another program would).
static void poke_int(const char *path, const char *dset, size_t flat_index, int value) {
    hid_t fid = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    ck_assert_int_ge(fid, 0);
    hid_t d = H5Dopen2(fid, dset, H5P_DEFAULT);
    ck_assert_int_ge(d, 0);
    hid_t sp = H5Dget_space(d);
    hssize_t n = H5Sget_simple_extent_npoints(sp);
    ck_assert_int_gt(n, (hssize_t)flat_index);
    int *buf = malloc((size_t)n * sizeof *buf);
    ck_assert_ptr_nonnull(buf);
    ck_assert_int_ge(H5Dread(d, H5T_NATIVE_INT, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf), 0);
    buf[flat_index] = value;
    ck_assert_int_ge(H5Dwrite(d, H5T_NATIVE_INT, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf), 0);
    free(buf);
    H5Sclose(sp);
    H5Dclose(d);
    ck_assert_int_ge(H5Fclose(fid), 0);
}

static void h5_edit(const char *path, const char *what, const char *obj) {
    hid_t fid = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    ck_assert_int_ge(fid, 0);
    if (strcmp(what, "delete") == 0) {
        ck_assert_int_ge(H5Ldelete(fid, obj, H5P_DEFAULT), 0);
    } else if (strcmp(what, "format") == 0) { // replace the root format attribute
        ck_assert_int_ge(H5Adelete(fid, "format"), 0);
        hid_t t = H5Tcopy(H5T_C_S1);
        H5Tset_size(t, strlen(obj) + 1);
        hid_t sp = H5Screate(H5S_SCALAR);
        hid_t a = H5Acreate2(fid, "format", t, sp, H5P_DEFAULT, H5P_DEFAULT);
        ck_assert_int_ge(a, 0);
        ck_assert_int_ge(H5Awrite(a, t, obj), 0);
        H5Aclose(a);
        H5Sclose(sp);
        H5Tclose(t);
    } else if (strcmp(what, "version") == 0) { // set the root format_version
        ck_assert_int_ge(H5Adelete(fid, "format_version"), 0);
        int v = atoi(obj);
        hid_t sp = H5Screate(H5S_SCALAR);
        hid_t a = H5Acreate2(fid, "format_version", H5T_STD_I64LE, sp, H5P_DEFAULT, H5P_DEFAULT);
        ck_assert_int_ge(a, 0);
        ck_assert_int_ge(H5Awrite(a, H5T_NATIVE_INT, &v), 0);
        H5Aclose(a);
        H5Sclose(sp);
    } else if (strcmp(what, "shorten") == 0) { // replace a [L,T] uint8 dataset by a [L,T-1] one
        hid_t d = H5Dopen2(fid, obj, H5P_DEFAULT);
        hid_t sp = H5Dget_space(d);
        hsize_t dims[2];
        ck_assert_int_eq(H5Sget_simple_extent_dims(sp, dims, NULL), 2);
        H5Sclose(sp);
        H5Dclose(d);
        ck_assert_int_ge(H5Ldelete(fid, obj, H5P_DEFAULT), 0);
        dims[1] -= 1;
        sp = H5Screate_simple(2, dims, NULL);
        d = H5Dcreate2(fid, obj, H5T_STD_U8LE, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        ck_assert_int_ge(d, 0);
        H5Dclose(d);
        H5Sclose(sp);
    }
    ck_assert_int_ge(H5Fclose(fid), 0);
}

START_TEST(test_damaged_content) {
    char *dir = nm_test_tmpdir();
    const char *path = nm_test_path(dir, "trace.h5");
    nm_config c;
    nm_trace_sample s[3];
    three_samples(s, &c, 1101); // L=3 T=5,37,1 K=4 N=6
    write_trace(path, &c, s, 3);
    size_t size;
    char *bytes = nm_test_read_file(path, &size);
    const char *bad = nm_test_path(dir, "bad.h5");
    struct {
        int sample;
        nm_status code;
        const char *expect;
    } cases[] = {
        {1, NM_ERR_FORMAT, "/samples/000001/routing/slot: missing dataset"},
        {2, NM_ERR_INVALID, "/samples/000002/routing/n_real: value 5 at [layer 0, token 0] exceeds top_k = 4"},
        {0, NM_ERR_INVALID, "/samples/000000/routing/slot"},
        {0, NM_ERR_INVALID, "/samples/000000/routing/n_real"},
        {1, NM_ERR_INVALID, "/samples/000001/tokens/modality"},
        {1, NM_ERR_INVALID, "/samples/000001/tokens/segment"},
        {1, NM_ERR_INVALID, "/samples/000001/routing/n_real: shape [3, 36]"},
        {0, NM_ERR_FORMAT, "not a nullmap trace (format = 'hdf5-misc'"},
        {2, NM_ERR_FORMAT, "/samples/000002/tokens/id: missing dataset"},
        {1, NM_ERR_FORMAT, "/samples/000001/routing/lse: missing dataset"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        ck_assert_int_eq(nm_test_write_file(bad, bytes, size), 0);
        switch (i) {
        case 0: h5_edit(bad, "delete", "/samples/000001/routing/slot"); break;
        case 1: poke_int(bad, "/samples/000002/routing/n_real", 0, c.moe.top_k + 1); break;
        case 2: poke_int(bad, "/samples/000000/routing/slot", (size_t)(1 * 5 + 2) * 4 + 0, c.moe.num_experts); break;
        case 3: { // n_real one off from the slots (still <= K)
            int v = s[0].n_real[2 * s[0].capacity + 3];
            poke_int(bad, "/samples/000000/routing/n_real", 2 * 5 + 3, v == 0 ? 1 : v - 1);
            break;
        }
        case 4: poke_int(bad, "/samples/000001/tokens/modality", 30, 3); break;
        case 5: poke_int(bad, "/samples/000001/tokens/segment", 36, 9); break;
        case 6: h5_edit(bad, "shorten", "/samples/000001/routing/n_real"); break;
        case 7: h5_edit(bad, "format", "hdf5-misc"); break;
        case 8: h5_edit(bad, "delete", "/samples/000002/tokens"); break;
        case 9: h5_edit(bad, "delete", "/samples/000001/routing/lse"); break;
        }
        nm_trace_sample x;
        nm_error err;
        nm_status st = nm_trace_read_sample(&x, bad, cases[i].sample, &err);
        ck_assert_msg(st == cases[i].code, "case %zu: %s: %s", i, nm_status_name(st), err.msg);
        ck_assert_msg(strstr(err.msg, cases[i].expect) && strstr(err.msg, bad), "case %zu: %s", i, err.msg);
        ck_assert_ptr_null(x.slot);
        if (i != 7) { // the other samples stay readable
            int other = (cases[i].sample + 1) % 3;
            assert_read_equal(bad, other, &s[other]);
        }
        assert_no_open_ids();
    }
    // tokens/text is optional: without it every token reads as "".
    ck_assert_int_eq(nm_test_write_file(bad, bytes, size), 0);
    h5_edit(bad, "delete", "/samples/000001/tokens/text");
    nm_trace_sample x;
    nm_error err;
    ck_assert_msg(nm_trace_read_sample(&x, bad, 1, &err) == NM_OK, "%s", err.msg);
    for (int t = 0; t < x.n_tokens; t++) ck_assert_str_eq(x.token_text[t], "");
    ck_assert_int_eq(x.slot[7], s[1].slot[7]);
    nm_trace_sample_free(&x);
    assert_no_open_ids();
    free(bytes);
    free_samples(s, 3);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

// A newer format_version is not read or appended to, but --force may replace it.
START_TEST(test_future_version) {
    char *dir = nm_test_tmpdir();
    const char *path = nm_test_path(dir, "trace.h5");
    nm_config c;
    nm_trace_sample s[3];
    three_samples(s, &c, 1150);
    write_trace(path, &c, s, 1);
    h5_edit(path, "version", "2");
    size_t size;
    char *before = nm_test_read_file(path, &size);
    nm_trace_info info;
    nm_trace_sample x;
    nm_error err;
    ck_assert_int_eq(nm_trace_read_info(&info, path, &err), NM_ERR_UNSUPPORTED);
    ck_assert_msg(strstr(err.msg, "format_version 2"), "%s", err.msg);
    ck_assert_int_eq(nm_trace_read_sample(&x, path, 0, &err), NM_ERR_UNSUPPORTED);
    nm_trace_file *f = NULL;
    ck_assert_int_eq(nm_trace_file_open(&f, path, &c, NULL, 1, 0, &err), NM_ERR_UNSUPPORTED);
    assert_file_is(path, before, size);
    ck_assert_int_eq(count_entries(dir, NULL), 1);
    write_trace(path, &c, &s[1], 1); // overwrite
    assert_read_equal(path, 0, &s[1]);
    assert_no_open_ids();
    free(before);
    free_samples(s, 3);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

// A trace as another program (e.g. h5py with its defaults) would write it: oldest file format,
// 64-bit integers and doubles, fixed-length and ASCII strings, contiguous datasets, no
// tokens/text, sample names that are not 6 digits. `huge_t` > 0 declares a tokens/id of that
// length (no data) to test the size limit.
static void write_foreign(const char *path, const nm_config *c, const nm_trace_sample *s, const char *name,
                          hsize_t huge_t) {
    hid_t fid = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    ck_assert_int_ge(fid, 0);
    hid_t scalar = H5Screate(H5S_SCALAR);
    hid_t fixed = H5Tcopy(H5T_C_S1);
    H5Tset_size(fixed, 32);
    H5Tset_strpad(fixed, H5T_STR_NULLPAD);
    char fmt[32] = "nullmap-trace";
    hid_t a = H5Acreate2(fid, "format", fixed, scalar, H5P_DEFAULT, H5P_DEFAULT);
    ck_assert_int_ge(H5Awrite(a, fixed, fmt), 0);
    H5Aclose(a);
    struct { const char *n; long long v; } ints[] = {
        {"format_version", 1}, {"num_layers", c->num_layers}, {"top_k", c->moe.top_k},
        {"num_experts", c->moe.num_experts}, {"null_copies", c->moe.null_copies}, {"hidden_size", c->hidden_size},
    };
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++) {
        a = H5Acreate2(fid, ints[i].n, H5T_STD_I64LE, scalar, H5P_DEFAULT, H5P_DEFAULT);
        ck_assert_int_ge(H5Awrite(a, H5T_NATIVE_LLONG, &ints[i].v), 0);
        H5Aclose(a);
    }
    hid_t g = H5Gcreate2(fid, "samples", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    hid_t sg = H5Gcreate2(g, name, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    ck_assert_int_ge(sg, 0);
    hid_t vstr = H5Tcopy(H5T_C_S1); // variable length, ASCII
    H5Tset_size(vstr, H5T_VARIABLE);
    const char *prompt = s->prompt;
    a = H5Acreate2(sg, "prompt", vstr, scalar, H5P_DEFAULT, H5P_DEFAULT);
    ck_assert_int_ge(H5Awrite(a, vstr, &prompt), 0);
    H5Aclose(a);
    long long gr = s->grid_rows, gc = s->grid_cols, npt = s->n_prompt_tokens;
    struct { const char *n; long long *v; } sints[] = {{"grid_rows", &gr}, {"grid_cols", &gc}, {"n_prompt_tokens", &npt}};
    for (size_t i = 0; i < 3; i++) {
        a = H5Acreate2(sg, sints[i].n, H5T_STD_I64LE, scalar, H5P_DEFAULT, H5P_DEFAULT);
        ck_assert_int_ge(H5Awrite(a, H5T_NATIVE_LLONG, sints[i].v), 0);
        H5Aclose(a);
    }
    H5Gclose(H5Gcreate2(sg, "tokens", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));
    H5Gclose(H5Gcreate2(sg, "routing", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));

    hsize_t L = (hsize_t)s->n_layers, T = (hsize_t)s->n_tokens, K = (hsize_t)s->top_k, C = (hsize_t)s->capacity;
    struct { const char *n; int rank; hsize_t d[3]; int is_float; const void *src; int src_kind; } ds[] = {
        {"tokens/id", 1, {huge_t ? huge_t : T}, 0, s->token_id, 32},
        {"tokens/modality", 1, {T}, 0, s->modality, 8},
        {"tokens/segment", 1, {T}, 0, s->segment, 8},
        {"tokens/patch", 2, {T, 2}, 0, s->patch, 16},
        {"routing/n_real", 2, {L, T}, 0, s->n_real, 8},
        {"routing/slot", 3, {L, T, K}, 0, s->slot, 16},
        {"routing/prob", 3, {L, T, K}, 1, s->prob, 0},
        {"routing/gate", 3, {L, T, K}, 1, s->gate, 0},
        {"routing/null_mass", 2, {L, T}, 1, s->null_mass, 0},
        {"routing/lse", 2, {L, T}, 1, s->lse, 0},
    };
    for (size_t i = 0; i < sizeof ds / sizeof ds[0]; i++) {
        hid_t sp = H5Screate_simple(ds[i].rank, ds[i].d, NULL);
        hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
        if (huge_t && i == 0) H5Pset_chunk(dcpl, 1, (hsize_t[]){1024});
        hid_t d = H5Dcreate2(sg, ds[i].n, ds[i].is_float ? H5T_IEEE_F64LE : H5T_STD_I64LE, sp, H5P_DEFAULT, dcpl,
                             H5P_DEFAULT);
        ck_assert_int_ge(d, 0);
        if (!(huge_t && i == 0)) {
            // pack the first T tokens of each layer into 64-bit values (rows of the token stride C)
            int is_patch = strcmp(ds[i].n, "tokens/patch") == 0;
            hsize_t rows = ds[i].rank == 1 || is_patch ? 1 : L;
            hsize_t per_tok = ds[i].rank == 3 ? K : is_patch ? 2 : 1;
            hsize_t n = rows * T * per_tok;
            void *buf = malloc(n * 8);
            ck_assert_ptr_nonnull(buf);
            for (hsize_t rw = 0; rw < rows; rw++)
                for (hsize_t j = 0; j < T * per_tok; j++) {
                    size_t src = (size_t)(rw * C * per_tok + j), dst = (size_t)(rw * T * per_tok + j);
                    if (ds[i].is_float) ((double *)buf)[dst] = ((const float *)ds[i].src)[src];
                    else if (ds[i].src_kind == 32) ((long long *)buf)[dst] = ((const int32_t *)ds[i].src)[src];
                    else if (ds[i].src_kind == 16) ((long long *)buf)[dst] = ((const int16_t *)ds[i].src)[src];
                    else ((long long *)buf)[dst] = ((const uint8_t *)ds[i].src)[src];
                }
            ck_assert_int_ge(H5Dwrite(d, ds[i].is_float ? H5T_NATIVE_DOUBLE : H5T_NATIVE_LLONG, H5S_ALL, H5S_ALL,
                                      H5P_DEFAULT, buf), 0);
            free(buf);
        }
        H5Dclose(d);
        H5Pclose(dcpl);
        H5Sclose(sp);
    }
    H5Tclose(vstr);
    H5Gclose(sg);
    H5Gclose(g);
    H5Tclose(fixed);
    H5Sclose(scalar);
    ck_assert_int_ge(H5Fclose(fid), 0);
}

START_TEST(test_foreign_writer) {
    char *dir = nm_test_tmpdir();
    const char *path = nm_test_path(dir, "foreign.h5");
    nm_config c;
    make_cfg(&c, 2, 300, 40, 5); // N > 255: ids need more than a byte
    nm_test_rng r = {1201};
    nm_trace_sample s[2];
    fill_sample(&s[0], &r, &c, 13, 16, 1);
    fill_sample(&s[1], &r, &c, 4, 6, 0);
    write_foreign(path, &c, &s[0], "first", 0);

    nm_trace_info info;
    nm_error err;
    ck_assert_msg(nm_trace_read_info(&info, path, &err) == NM_OK, "%s", err.msg);
    ck_assert_int_eq(info.num_samples, 1);
    ck_assert_int_eq(info.cfg.moe.num_experts, 300);
    ck_assert_int_eq(info.cfg.hidden_size, c.hidden_size);
    ck_assert_int_eq(info.cfg.vocab_size, 0); // not recorded by this writer
    ck_assert_str_eq(info.created_by, "");
    nm_trace_sample x;
    ck_assert_msg(nm_trace_read_sample(&x, path, 0, &err) == NM_OK, "%s", err.msg);
    // what the foreign writer did not record reads as empty / 0
    ck_assert_ptr_null(x.image_path);
    ck_assert_str_eq(x.answer, "");
    ck_assert_int_eq(x.image_width, 0);
    for (int t = 0; t < x.n_tokens; t++) ck_assert_str_eq(x.token_text[t], "");
    free(s[0].image_path);
    free(s[0].answer);
    s[0].image_path = NULL;
    s[0].answer = NULL;
    s[0].image_width = s[0].image_height = 0;
    for (int t = 0; t < s[0].n_tokens; t++) s[0].token_text[t][0] = '\0';
    assert_samples_equal(&s[0], &x);
    nm_trace_sample_free(&x);

    // Appending to it with nullmap keeps the foreign sample and adds "000000" (names sort first).
    nm_trace_file *f = NULL;
    ck_assert_msg(nm_trace_file_open(&f, path, &c, NULL, 1, 0, &err) == NM_OK, "%s", err.msg);
    int idx = -1;
    ck_assert_msg(nm_trace_file_write_sample(f, &s[1], &idx, &err) == NM_OK, "%s", err.msg);
    ck_assert_int_eq(idx, 0);
    ck_assert_msg(nm_trace_file_commit(f, &err) == NM_OK, "%s", err.msg);
    assert_read_equal(path, 0, &s[1]);
    assert_read_equal(path, 1, &s[0]);

    // A 64-bit value that does not fit the reader's int16 is an error, not a silent clip.
    write_foreign(path, &c, &s[0], "000000", 0);
    poke_int(path, "/samples/000000/routing/slot", 3, 40000);
    ck_assert_int_eq(nm_trace_read_sample(&x, path, 0, &err), NM_ERR_INVALID);
    ck_assert_msg(strstr(err.msg, "/samples/000000/routing/slot") && strstr(err.msg, "out of range"), "%s", err.msg);

    // Absurd dimensions are refused before anything is allocated.
    write_foreign(path, &c, &s[0], "000000", (hsize_t)1 << 30);
    ck_assert_int_eq(nm_trace_read_sample(&x, path, 0, &err), NM_ERR_LIMIT);
    ck_assert_msg(strstr(err.msg, "/samples/000000"), "%s", err.msg);
    assert_no_open_ids();
    free_samples(s, 2);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

// ---------------------------------------------------------------------------------------------
// Durable writing (nm_trace_file_open_durable): every sample committed as it is written

static int trace_count(const char *path) {
    nm_trace_info info;
    nm_error err;
    ck_assert_msg(nm_trace_read_info(&info, path, &err) == NM_OK, "%s", err.msg);
    return info.num_samples;
}

// Each write is committed: the published file holds it before the next write, the writer's
// companions are there while it runs and gone after commit; a reader that keeps the trace open
// keeps its state while the writer goes on (the writer copies instead of reusing that file).
START_TEST(test_durable_commits_each_sample) {
    char *dir = nm_test_tmpdir();
    char path[4096];
    snprintf(path, sizeof path, "%s", nm_test_path(dir, "trace.h5"));
    nm_config c;
    nm_trace_sample s[3];
    three_samples(s, &c, 901);
    nm_trace_file *f = NULL;
    nm_error err;
    ck_assert_msg(nm_trace_file_open_durable(&f, path, &c, "m", 0, 0, &err) == NM_OK, "%s", err.msg);
    ck_assert_int_ne(access(path, F_OK), 0); // nothing committed yet
    ck_assert_msg(nm_trace_file_write_sample(f, &s[0], NULL, &err) == NM_OK, "%s", err.msg);
    ck_assert_int_eq(trace_count(path), 1);
    ck_assert_int_eq(count_entries(dir, NULL), 3); // trace.h5, .shadow, .lock
    ck_assert_int_eq(count_entries(dir, ".shadow"), 1);
    ck_assert_int_eq(nm_trace_file_shadow_copies(f), 1); // the first commit's shadow is a copy

    nm_trace_reader *r = NULL;
    nm_trace_info info;
    ck_assert_msg(nm_trace_reader_open(&r, path, &info, &err) == NM_OK, "%s", err.msg);
    ck_assert_int_eq(info.num_samples, 1);
    ck_assert_msg(nm_trace_file_write_sample(f, &s[1], NULL, &err) == NM_OK, "%s", err.msg);
    ck_assert_int_eq(nm_trace_file_shadow_copies(f), 2); // the reader holds the old file
    ck_assert_msg(nm_trace_file_write_sample(f, &s[2], NULL, &err) == NM_OK, "%s", err.msg);
    ck_assert_int_eq(nm_trace_file_shadow_copies(f), 2); // the previous file is free: reused
    ck_assert_int_eq(trace_count(path), 3);
    nm_trace_sample got;
    ck_assert_msg(nm_trace_reader_read_sample(r, &got, 0, &err) == NM_OK, "%s", err.msg);
    assert_samples_equal(&s[0], &got);
    nm_trace_sample_free(&got);
    ck_assert_int_eq(nm_trace_reader_read_sample(r, &got, 1, &err), NM_ERR_INVALID); // its state: 1 sample
    nm_trace_reader_close(r);

    ck_assert_msg(nm_trace_file_commit(f, &err) == NM_OK, "%s", err.msg);
    ck_assert_int_eq(count_entries(dir, NULL), 1);
    for (int i = 0; i < 3; i++) assert_read_equal(path, i, &s[i]);
    assert_no_open_ids();
    free_samples(s, 3);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

// Abort keeps what is committed; a second writer is refused; the batch record and indices.
START_TEST(test_durable_abort_resume_and_batch) {
    char *dir = nm_test_tmpdir();
    char path[4096];
    snprintf(path, sizeof path, "%s", nm_test_path(dir, "trace.h5"));
    nm_config c;
    nm_trace_sample s[3];
    three_samples(s, &c, 902);
    nm_trace_file *f = NULL, *g = NULL;
    nm_error err;
    ck_assert_msg(nm_trace_file_open_durable(&f, path, &c, "m", 0, 0, &err) == NM_OK, "%s", err.msg);
    ck_assert_int_eq(nm_trace_file_open_durable(&g, path, &c, "m", 1, 0, &err), NM_ERR_IO);
    ck_assert_msg(strstr(err.msg, "already open for writing in this process"), "%s", err.msg);
    ck_assert_ptr_null(g);
    nm_trace_batch b = {.key = "fnv1a64:0123", .first_sample = 0, .n_pairs = 5}, got;
    ck_assert_msg(nm_trace_file_set_batch(f, &b, &err) == NM_OK, "%s", err.msg);
    ck_assert_msg(nm_trace_file_write_sample_at(f, &s[0], 0, &err) == NM_OK, "%s", err.msg);
    ck_assert_msg(nm_trace_file_write_sample_at(f, &s[1], 3, &err) == NM_OK, "%s", err.msg); // 1, 2 skipped
    ck_assert_int_eq(nm_trace_file_write_sample_at(f, &s[2], 3, &err), NM_ERR_INVALID);
    ck_assert_int_eq(nm_trace_file_broken(f), 0);
    nm_trace_file_abort(f); // as a bad pair would: the committed samples stay
    ck_assert_int_eq(count_entries(dir, NULL), 1);
    ck_assert_int_eq(trace_count(path), 2);

    ck_assert_msg(nm_trace_file_open_durable(&f, path, &c, "m", 1, 0, &err) == NM_OK, "%s", err.msg);
    ck_assert_msg(nm_trace_file_get_batch(f, &got, &err) == NM_OK, "%s", err.msg);
    ck_assert_str_eq(got.key, b.key);
    ck_assert_int_eq(got.first_sample, 0);
    ck_assert_int_eq(got.n_pairs, 5);
    ck_assert(nm_trace_file_has_sample(f, 0) && !nm_trace_file_has_sample(f, 1) && nm_trace_file_has_sample(f, 3));
    ck_assert_int_eq(nm_trace_file_next_index(f), 4);
    ck_assert_msg(nm_trace_file_write_sample_at(f, &s[2], 1, &err) == NM_OK, "%s", err.msg);
    ck_assert_msg(nm_trace_file_commit(f, &err) == NM_OK, "%s", err.msg);
    assert_read_equal(path, 0, &s[0]); // name order: 000000, 000001, 000003
    assert_read_equal(path, 1, &s[2]);
    assert_read_equal(path, 2, &s[1]);
    ck_assert_int_eq(count_entries(dir, NULL), 1);
    assert_no_open_ids();
    free_samples(s, 3);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

// `nullmap run --append` (the plain writer) on a trace that another process is writing with
// the durable writer (`nullmap batch`) is refused, instead of renaming its copy over samples the
// batch commits meanwhile; once the batch is done, the append goes through and keeps them.
START_TEST(test_plain_writer_respects_batch_lock) {
    char *dir = nm_test_tmpdir();
    char path[4096];
    snprintf(path, sizeof path, "%s", nm_test_path(dir, "trace.h5"));
    nm_config c;
    nm_trace_sample s[3];
    three_samples(s, &c, 907);
    int to_parent[2], to_child[2];
    ck_assert(pipe(to_parent) == 0 && pipe(to_child) == 0);
    pid_t pid = fork();
    ck_assert(pid >= 0);
    if (pid == 0) { // the batch: two committed samples, then it waits for the parent's try
        nm_trace_file *f = NULL;
        nm_error e;
        char byte = 1;
        int ok = nm_trace_file_open_durable(&f, path, &c, "m", 0, 0, &e) == NM_OK &&
                 nm_trace_file_write_sample(f, &s[0], NULL, &e) == NM_OK &&
                 nm_trace_file_write_sample(f, &s[1], NULL, &e) == NM_OK;
        byte = ok ? 1 : 0;
        if (write(to_parent[1], &byte, 1) != 1 || read(to_child[0], &byte, 1) != 1) ok = 0;
        if (ok && nm_trace_file_commit(f, &e) != NM_OK) ok = 0;
        else if (!ok) nm_trace_file_abort(f);
        _exit(ok ? 0 : 1);
    }
    char byte = 0;
    ck_assert_int_eq(read(to_parent[0], &byte, 1), 1);
    ck_assert_int_eq(byte, 1);
    nm_trace_file *g = NULL;
    nm_error err;
    ck_assert_int_eq(nm_trace_file_open(&g, path, &c, "m", 1, 0, &err), NM_ERR_IO);
    ck_assert_msg(strstr(err.msg, "another process is writing"), "%s", err.msg);
    ck_assert_ptr_null(g);
    ck_assert_int_eq(nm_trace_file_open(&g, path, &c, "m", 0, 1, &err), NM_ERR_IO); // --force too
    ck_assert_ptr_null(g);
    ck_assert_int_eq(write(to_child[1], &byte, 1), 1);
    int status = 0;
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    for (int i = 0; i < 2; i++) {
        close(to_parent[i]);
        close(to_child[i]);
    }
    ck_assert_msg(nm_trace_file_open(&g, path, &c, "m", 1, 0, &err) == NM_OK, "%s", err.msg);
    ck_assert_msg(nm_trace_file_write_sample(g, &s[2], NULL, &err) == NM_OK, "%s", err.msg);
    ck_assert_msg(nm_trace_file_commit(g, &err) == NM_OK, "%s", err.msg);
    ck_assert_int_eq(trace_count(path), 3);
    for (int i = 0; i < 3; i++) assert_read_equal(path, i, &s[i]);
    ck_assert_int_eq(count_entries(dir, NULL), 1); // no lock file, shadow or temporary left
    assert_no_open_ids();
    free_samples(s, 3);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

// --force and --append on an existing trace: the old file is never the next shadow (it is not
// one sample behind), so the batch record and the replaced contents are right after more commits.
START_TEST(test_durable_force_and_append) {
    char *dir = nm_test_tmpdir();
    char path[4096];
    snprintf(path, sizeof path, "%s", nm_test_path(dir, "trace.h5"));
    nm_config c;
    nm_trace_sample s[3];
    three_samples(s, &c, 905);
    write_trace(path, &c, s, 3);
    nm_trace_file *f = NULL;
    nm_error err;
    ck_assert_msg(nm_trace_file_open_durable(&f, path, &c, "m", 0, 1, &err) == NM_OK, "%s", err.msg); // --force
    ck_assert_int_eq(trace_count(path), 3); // replaced at the first commit
    ck_assert_msg(nm_trace_file_write_sample(f, &s[2], NULL, &err) == NM_OK, "%s", err.msg);
    ck_assert_msg(nm_trace_file_write_sample(f, &s[1], NULL, &err) == NM_OK, "%s", err.msg);
    ck_assert_msg(nm_trace_file_write_sample(f, &s[0], NULL, &err) == NM_OK, "%s", err.msg);
    ck_assert_int_eq(trace_count(path), 3);
    ck_assert_msg(nm_trace_file_commit(f, &err) == NM_OK, "%s", err.msg);
    for (int i = 0; i < 3; i++) assert_read_equal(path, i, &s[2 - i]);

    ck_assert_msg(nm_trace_file_open_durable(&f, path, &c, "m", 1, 0, &err) == NM_OK, "%s", err.msg); // --append
    nm_trace_batch b = {.key = "fnv1a64:abcd", .first_sample = 3, .n_pairs = 2}, got;
    ck_assert_msg(nm_trace_file_set_batch(f, &b, &err) == NM_OK, "%s", err.msg);
    ck_assert_msg(nm_trace_file_write_sample(f, &s[0], NULL, &err) == NM_OK, "%s", err.msg);
    ck_assert_msg(nm_trace_file_write_sample(f, &s[1], NULL, &err) == NM_OK, "%s", err.msg);
    ck_assert_msg(nm_trace_file_write_sample(f, &s[2], NULL, &err) == NM_OK, "%s", err.msg);
    ck_assert_int_eq(nm_trace_file_shadow_copies(f), 1); // the first commit's; then reuse
    nm_trace_file_abort(f);
    ck_assert_int_eq(trace_count(path), 6);
    ck_assert_msg(nm_trace_file_open_durable(&f, path, &c, "m", 1, 0, &err) == NM_OK, "%s", err.msg);
    ck_assert_msg(nm_trace_file_get_batch(f, &got, &err) == NM_OK, "%s", err.msg);
    ck_assert_str_eq(got.key, b.key);
    ck_assert_int_eq(got.first_sample, 3);
    nm_trace_file_abort(f);
    for (int i = 0; i < 3; i++) assert_read_equal(path, 3 + i, &s[i]);
    ck_assert_int_eq(count_entries(dir, NULL), 1);
    assert_no_open_ids();
    free_samples(s, 3);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

// What a kill leaves (a torn shadow, a .prev link, a stale lock file) is cleaned up by the next
// writer; the published trace is intact. Empty durable traces are published on commit.
START_TEST(test_durable_crash_leftovers) {
    char *dir = nm_test_tmpdir();
    char path[4096], shadow[4200], prev[4200], lock[4200];
    snprintf(path, sizeof path, "%s", nm_test_path(dir, "trace.h5"));
    snprintf(shadow, sizeof shadow, "%s.shadow", path);
    snprintf(prev, sizeof prev, "%s.prev", path);
    snprintf(lock, sizeof lock, "%s.lock", path);
    nm_config c;
    nm_trace_sample s[3];
    three_samples(s, &c, 903);
    write_trace(path, &c, s, 2);
    ck_assert_int_eq(nm_test_write_file(shadow, "torn", 4), 0);
    ck_assert_int_eq(link(path, prev), 0);
    ck_assert_int_eq(nm_test_write_file(lock, "", 0), 0);
    nm_trace_file *f = NULL;
    nm_error err;
    ck_assert_msg(nm_trace_file_open_durable(&f, path, &c, "m", 1, 0, &err) == NM_OK, "%s", err.msg);
    ck_assert_int_eq(nm_trace_file_num_samples(f), 2);
    ck_assert_msg(nm_trace_file_write_sample(f, &s[2], NULL, &err) == NM_OK, "%s", err.msg);
    ck_assert_msg(nm_trace_file_commit(f, &err) == NM_OK, "%s", err.msg);
    ck_assert_int_eq(count_entries(dir, NULL), 1);
    for (int i = 0; i < 3; i++) assert_read_equal(path, i, &s[i]);

    const char *empty = nm_test_path(dir, "empty.h5");
    ck_assert_msg(nm_trace_file_open_durable(&f, empty, &c, "m", 0, 0, &err) == NM_OK, "%s", err.msg);
    ck_assert_msg(nm_trace_file_commit(f, &err) == NM_OK, "%s", err.msg);
    ck_assert_int_eq(trace_count(empty), 0);
    ck_assert_int_eq(count_entries(dir, NULL), 2);
    assert_no_open_ids();
    free_samples(s, 3);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

// A reader whose open meets the lock of a writer that is changing the file retries, then gives
// a clear message.
START_TEST(test_reader_meets_writer_lock) {
    char *dir = nm_test_tmpdir();
    char path[4096];
    snprintf(path, sizeof path, "%s", nm_test_path(dir, "trace.h5"));
    nm_config c;
    nm_trace_sample s[3];
    three_samples(s, &c, 904);
    write_trace(path, &c, s, 1);
    int fd = open(path, O_RDWR);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(flock(fd, LOCK_EX | LOCK_NB), 0);
    nm_trace_info info;
    nm_error err;
    ck_assert_int_eq(nm_trace_read_info(&info, path, &err), NM_ERR_IO);
    ck_assert_msg(strstr(err.msg, "locked by a process that is changing it"), "%s", err.msg);
    close(fd);
    ck_assert_int_eq(trace_count(path), 1);
    assert_no_open_ids();
    free_samples(s, 3);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

NM_TEST_SUITE(trace) {
    Suite *s = suite_create("trace");
    TCase *tc = tcase_create("write");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_roundtrip);
    tcase_add_test(tc, test_roundtrip_long_text_only);
    tcase_add_test(tc, test_heap_check_accepts_own_traces);
    tcase_add_test(tc, test_append);
    tcase_add_test(tc, test_abort_leaves_file_untouched);
    tcase_add_test(tc, test_existing_target_rules);
    tcase_add_test(tc, test_foreign_files_refused);
    tcase_add_test(tc, test_append_shape_mismatch);
    tcase_add_test(tc, test_unwritable_directory);
    tcase_add_test(tc, test_stale_temp_file);
    tcase_add_test(tc, test_commit_refuses_changed_target);
    tcase_add_test(tc, test_symlink_target);
    tcase_add_test(tc, test_write_refuses_bad_samples);
    tcase_add_test(tc, test_sample_init_limits);
    suite_add_tcase(s, tc);
    TCase *rd = tcase_create("read");
    tcase_set_timeout(rd, 60);
    tcase_add_test(rd, test_truncated_file);
    tcase_add_test(rd, test_damaged_content);
    tcase_add_test(rd, test_future_version);
    tcase_add_test(rd, test_foreign_writer);
    suite_add_tcase(s, rd);
    TCase *du = tcase_create("durable");
    tcase_set_timeout(du, 60);
    tcase_add_test(du, test_durable_commits_each_sample);
    tcase_add_test(du, test_durable_abort_resume_and_batch);
    tcase_add_test(du, test_plain_writer_respects_batch_lock);
    tcase_add_test(du, test_durable_force_and_append);
    tcase_add_test(du, test_durable_crash_leftovers);
    tcase_add_test(du, test_reader_meets_writer_lock);
    suite_add_tcase(s, du);
    return s;
}
