// test_report.c — lib/nm_report (report.md / .json / .csv) and `nullmap report`:
// - a trace written by another program (tests/fixtures/foreign_trace.h5, h5py defaults, made by
//   tests/gen_foreign_trace.py) loads, and its metrics equal values computed by hand;
// - the three files: JSON parsed back with jansson, CSV rows and header, md tables and the
//   "n/a"/"undefined" cells (never 0);
// - two traces (the foreign one + one written by nm_trace_file_* with random routing): the
//   comparison section, K padding in the CSV, metrics recomputed from the samples;
// - bad traces (truncated, a bad dataset) name the file (and dataset) and leave no report files;
//   all-or-nothing writing of the three files; the command line.
#include <errno.h>
#include <hdf5.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "nm_fileutil.h"
#include "nm_report.h"
#include "nm_trace.h"
#include "test_util.h"

// ---------------------------------------------------------------------------------------------
// Helpers

static const char *foreign_path(void) {
    static char p[4096];
    snprintf(p, sizeof p, "%s/fixtures/foreign_trace.h5", nm_test_dir());
    return p;
}

static void near(double got, double want, const char *what) {
    ck_assert_msg(fabs(got - want) <= 1e-12 * fmax(1.0, fabs(want)), "%s: got %.17g, want %.17g", what, got, want);
}

static void near_json(const json_t *v, double want, const char *what) { // JSON has 10 significant digits
    ck_assert_msg(json_is_number(v), "%s: not a number", what);
    double got = json_number_value(v);
    ck_assert_msg(fabs(got - want) <= 1e-9 * fmax(1e-3, fabs(want)), "%s: got %.17g, want %.17g", what, got, want);
}

static int count_lines(const char *s) {
    int n = 0;
    for (; *s; s++) n += *s == '\n';
    return n;
}

// The n-th line (0-based) of text, copied into buf.
static const char *line_of(const char *s, int n, char *buf, size_t cap) {
    for (int i = 0; i < n && s; i++) {
        s = strchr(s, '\n');
        if (s) s++;
    }
    ck_assert_ptr_nonnull(s);
    const char *e = strchr(s, '\n');
    size_t len = e ? (size_t)(e - s) : strlen(s);
    ck_assert_uint_lt(len, cap);
    memcpy(buf, s, len);
    buf[len] = '\0';
    return buf;
}

// The CSV line whose first fields are "trace,sample,...,layer,modality" (matched by its prefix
// and its layer/modality columns 9 and 10).
static const char *csv_row(const char *csv, const char *trace, const char *sample, const char *layer,
                           const char *mod, char *buf, size_t cap) {
    int n = count_lines(csv);
    for (int i = 1; i < n; i++) {
        line_of(csv, i, buf, cap);
        char copy[4096];
        snprintf(copy, sizeof copy, "%s", buf);
        char *f[64] = {0};
        int nf = 0;
        for (char *p = copy, *q; nf < 64 && p; p = q) {
            q = strchr(p, ',');
            if (q) *q++ = '\0';
            f[nf++] = p;
        }
        if (nf > 10 && !strcmp(f[0], trace) && !strcmp(f[1], sample) && !strcmp(f[8], layer) && !strcmp(f[9], mod))
            return buf;
    }
    ck_abort_msg("no CSV row %s,%s,layer %s,%s", trace, sample, layer, mod);
    return NULL;
}

// Field i (0-based) of one CSV line without quotes, copied.
static const char *csv_field(const char *line, int i, char *buf, size_t cap) {
    const char *p = line;
    for (int k = 0; k < i; k++) {
        p = strchr(p, ',');
        ck_assert_ptr_nonnull(p);
        p++;
    }
    const char *e = strchr(p, ',');
    size_t len = e ? (size_t)(e - p) : strlen(p);
    ck_assert_uint_lt(len, cap);
    memcpy(buf, p, len);
    buf[len] = '\0';
    return buf;
}

static json_t *load_json(const char *path) {
    json_error_t je;
    json_t *root = json_load_file(path, 0, &je);
    ck_assert_msg(root != NULL, "%s: line %d: %s", path, je.line, je.text);
    return root;
}

static json_t *jpath(json_t *v, const char *dotted) { // "a.b.2.c": object keys and array indices
    char buf[512];
    snprintf(buf, sizeof buf, "%s", dotted);
    for (char *tok = strtok(buf, "."); tok && v; tok = strtok(NULL, ".")) {
        if (json_is_array(v)) v = json_array_get(v, (size_t)atoi(tok));
        else v = json_object_get(v, tok);
    }
    ck_assert_msg(v != NULL, "JSON has no %s", dotted);
    return v;
}

static int file_exists(const char *dir, const char *name) { return nm_path_exists(nm_test_path(dir, name)); }

static int dir_entries(const char *dir) {
    int n = 0;
    char cmd[4200];
    snprintf(cmd, sizeof cmd, "ls -A '%s' | wc -l", dir);
    FILE *p = popen(cmd, "r");
    ck_assert_ptr_nonnull(p);
    ck_assert_int_eq(fscanf(p, "%d", &n), 1);
    pclose(p);
    return n;
}

static void copy_file(const char *from, const char *to, long keep) { // keep < 0: all bytes
    char *buf = NULL;
    size_t n = 0;
    nm_error err = {0};
    ck_assert_msg(nm_read_file(from, 64u << 20, &buf, &n, &err) == NM_OK, "%s", err.msg);
    if (keep >= 0 && (size_t)keep < n) n = (size_t)keep;
    ck_assert_int_eq(nm_test_write_file(to, buf, n), 0);
    free(buf);
}

// ---------------------------------------------------------------------------------------------
// A trace written by nullmap's own writer, with random routing (text-only samples).

typedef struct {
    nm_config cfg;
    nm_trace_sample s[4];
    int n;
} c_trace;

static int rint_(nm_test_rng *r, int lo, int hi) { return lo + (int)(nm_test_rng_next(r) % (uint64_t)(hi - lo + 1)); }

static void make_c_trace(c_trace *ct, const char *path, uint64_t seed) {
    memset(ct, 0, sizeof *ct);
    nm_config *c = &ct->cfg;
    nm_config_init_byte(c);
    c->hidden_size = 64;
    c->num_layers = 3;
    c->num_heads = 4;
    c->num_kv_heads = 4;
    c->head_dim = 16;
    c->max_positions = 1024;
    c->moe = (nm_moe_config){.num_experts = 8, .null_copies = 8, .top_k = 8, .expert_hidden = 32,
                             .shared_expert_hidden = 0, .null_kind = NM_NULL_ZERO};
    int L = c->num_layers, K = c->moe.top_k, N = c->moe.num_experts;
    nm_test_rng r = {seed};
    nm_error err = {0};
    ct->n = 4;
    for (int i = 0; i < ct->n; i++) {
        nm_trace_sample *s = &ct->s[i];
        int T = rint_(&r, 2, 40);
        ck_assert_int_eq(nm_trace_sample_init(s, L, K, T, &err), NM_OK);
        s->n_tokens = T;
        s->n_prompt_tokens = rint_(&r, 1, T);
        s->prompt = strdup("random prompt");
        s->answer = strdup("random answer");
        for (int t = 0; t < T; t++) {
            s->token_id[t] = t == 0 ? 256 : rint_(&r, 0, 255);
            s->token_text[t] = strdup("x");
            s->modality[t] = t == 0 ? NM_MOD_SPECIAL : NM_MOD_TEXT;
            s->segment[t] = t == 0 ? NM_SEG_BOS : t < s->n_prompt_tokens ? NM_SEG_PROMPT : NM_SEG_ANSWER;
            s->patch[2 * t] = s->patch[2 * t + 1] = -1;
        }
        for (int l = 0; l < L; l++)
            for (int t = 0; t < T; t++) {
                size_t lt = (size_t)l * (size_t)T + (size_t)t;
                int nr = rint_(&r, 0, K);
                s->n_real[lt] = (uint8_t)nr;
                int16_t *sl = s->slot + lt * (size_t)K;
                for (int k = 0; k < K; k++) sl[k] = (int16_t)(k < nr ? k % N : -1); // K = N: distinct ids
            }
        size_t LT = (size_t)L * (size_t)T;
        nm_test_fill_normal(&r, s->prob, LT * (size_t)K, 0.1f);
        nm_test_fill_normal(&r, s->gate, LT * (size_t)K, 0.1f);
        nm_test_fill_normal(&r, s->null_mass, LT, 0.1f);
        nm_test_fill_normal(&r, s->lse, LT, 1.0f);
    }
    nm_trace_file *f = NULL;
    ck_assert_msg(nm_trace_file_open(&f, path, c, "random-model", 0, 1, &err) == NM_OK, "%s", err.msg);
    for (int i = 0; i < ct->n; i++) {
        int idx;
        ck_assert_msg(nm_trace_file_write_sample(f, &ct->s[i], &idx, &err) == NM_OK, "%s", err.msg);
    }
    ck_assert_msg(nm_trace_file_commit(f, &err) == NM_OK, "%s", err.msg);
}

static void free_c_trace(c_trace *ct) {
    for (int i = 0; i < ct->n; i++) nm_trace_sample_free(&ct->s[i]);
}

// Metrics of a c_trace straight from the definitions: Σ n_real, zero pairs, text tokens.
static void c_trace_expect(const c_trace *ct, double *null_slot, double *zero, double *text_int, long long *tokens) {
    int L = ct->cfg.num_layers, K = ct->cfg.moe.top_k;
    long long real = 0, zeros = 0, T = 0, text_real = 0, text_T = 0;
    for (int i = 0; i < ct->n; i++) {
        const nm_trace_sample *s = &ct->s[i];
        T += s->n_tokens;
        for (int t = 0; t < s->n_tokens; t++) text_T += s->modality[t] == NM_MOD_TEXT;
        for (int l = 0; l < L; l++)
            for (int t = 0; t < s->n_tokens; t++) {
                int nr = s->n_real[(size_t)l * s->capacity + t];
                real += nr;
                zeros += nr == 0;
                if (s->modality[t] == NM_MOD_TEXT) text_real += nr;
            }
    }
    *null_slot = 1.0 - (double)real / ((double)T * L * K);
    *zero = (double)zeros / ((double)T * L);
    *text_int = (double)text_real / ((double)text_T * L * K);
    *tokens = T;
}

// ---------------------------------------------------------------------------------------------
// The foreign trace: metrics by hand
//
// tests/gen_foreign_trace.py: L = 2, K = 4, N = M = 4. n_real (layer 0 / layer 1) per token:
//   sample 0: BOS 4/4, IMG_START 0/1, patch 0/0, patch 1/0, IMG_END 2/2, 'h' 3/4, 'i' 4/4,
//             answer 'o' 2/3, EOS 0/1
//   sample 1 (no image): BOS 4/3, 'a' 2/2, 'b' 1/0, answer 'c' 0/0
//   sample 2 (no image, every slot null): BOS 0/0, 'x' 0/0
// Tokens: vision 2, text 7, special 6 = 15. Σ n_real over both layers: vision 1, text 25,
// special 21 = 47; intensity = Σ / (8 · tokens). Zero pairs: vision 3/4, text 5/14, special 4/12
// = 12/30. Segments: bos 15/24, image 6/32, prompt 20/40, answer 6/24.
// Polarization (all 30 pairs): n_real 0..4 = 12, 4, 5, 3, 6.

START_TEST(test_foreign_metrics) {
    nm_report_trace r;
    nm_error err = {0};
    ck_assert_msg(nm_report_trace_load(&r, foreign_path(), 1, NULL, NULL, &err) == NM_OK, "%s", err.msg);
    const nm_metrics *m = &r.agg;
    ck_assert_int_eq(r.n_samples, 3);
    ck_assert_int_eq(r.info.cfg.num_layers, 2);
    ck_assert_int_eq(r.info.cfg.moe.top_k, 4);
    ck_assert_int_eq(r.info.cfg.moe.num_experts, 4);
    ck_assert_int_eq(r.info.cfg.moe.null_copies, 4);
    ck_assert_str_eq(r.info.model_name, "toy-router-run-17");
    ck_assert_int_eq(m->n_tokens[NM_MOD_VISION], 2);
    ck_assert_int_eq(m->n_tokens[NM_MOD_TEXT], 7);
    ck_assert_int_eq(m->n_tokens[NM_MOD_SPECIAL], 6);
    ck_assert_int_eq(m->n_tokens[NM_MOD_ALL], 15);
    near(m->intensity[NM_MOD_VISION], 1.0 / 16, "vision intensity");
    near(m->intensity[NM_MOD_TEXT], 25.0 / 56, "text intensity");
    near(m->intensity[NM_MOD_SPECIAL], 21.0 / 48, "special intensity");
    near(m->intensity[NM_MOD_ALL], 47.0 / 120, "overall intensity");
    near(m->null_slot_ratio, 73.0 / 120, "null slot ratio");
    near(m->zero_compute_ratio, 12.0 / 30, "zero-compute ratio");
    near(m->token_share[NM_MOD_VISION], 2.0 / 15, "vision token share");
    near(m->compute_share[NM_MOD_VISION], 1.0 / 47, "vision compute share");
    near(m->compute_share[NM_MOD_TEXT], 25.0 / 47, "text compute share");
    near(m->compute_share[NM_MOD_SPECIAL], 21.0 / 47, "special compute share");
    near(nm_metrics_zero_compute(m, 2, NM_MOD_VISION), 3.0 / 4, "vision zero-compute");
    near(nm_metrics_zero_compute(m, 2, NM_MOD_TEXT), 5.0 / 14, "text zero-compute");
    near(nm_metrics_zero_compute(m, 2, NM_MOD_SPECIAL), 4.0 / 12, "special zero-compute");
    near(m->seg_intensity[NM_SEG_BOS], 15.0 / 24, "bos");
    near(m->seg_intensity[NM_SEG_IMAGE], 6.0 / 32, "image");
    near(m->seg_intensity[NM_SEG_PROMPT], 20.0 / 40, "prompt");
    near(m->seg_intensity[NM_SEG_ANSWER], 6.0 / 24, "answer");
    near(nm_metrics_layer_intensity(m, 0, NM_MOD_ALL), 23.0 / 60, "layer 0");
    near(nm_metrics_layer_intensity(m, 1, NM_MOD_ALL), 24.0 / 60, "layer 1");
    near(nm_metrics_layer_intensity(m, 0, NM_MOD_VISION), 1.0 / 8, "layer 0 vision");
    near(nm_metrics_layer_intensity(m, 1, NM_MOD_VISION), 0.0, "layer 1 vision");
    const long long pol[5] = {12, 4, 5, 3, 6};
    for (int k = 0; k <= 4; k++) ck_assert_int_eq(nm_metrics_polarization(m, 2, NM_MOD_ALL, k), pol[k]);

    // per sample: identifiers and the absent / all-null cases
    ck_assert_ptr_nonnull(r.samples);
    ck_assert_str_eq(r.samples[0].image_path, "images/two_patches.png");
    ck_assert_ptr_null(r.samples[1].image_path);
    ck_assert_ptr_null(r.samples[2].image_path);
    ck_assert_str_eq(r.samples[1].prompt, "ab | *c*");
    ck_assert_str_eq(r.samples[2].answer, ""); // absent attribute
    ck_assert_int_eq(r.samples[0].n_tokens, 9);
    ck_assert_int_eq(r.samples[0].n_prompt_tokens, 7);
    const nm_metrics *s0 = &r.per_sample_metrics[0], *s1 = &r.per_sample_metrics[1], *s2 = &r.per_sample_metrics[2];
    near(s0->intensity[NM_MOD_ALL], 35.0 / 72, "sample 0 overall"); // 8+1+0+1+4+7+8+5+1 = 35 over 9 tokens
    near(s0->intensity[NM_MOD_TEXT], 20.0 / 24, "sample 0 text");
    ck_assert(isnan(s1->intensity[NM_MOD_VISION]));
    near(s1->intensity[NM_MOD_TEXT], 5.0 / 24, "sample 1 text");
    ck_assert_int_eq(s2->compute_share_defined, 0);
    ck_assert(isnan(s2->compute_share[NM_MOD_TEXT]));
    near(s2->zero_compute_ratio, 1.0, "sample 2 zero-compute");
    nm_report_trace_free(&r);

    // without per-sample: nothing per sample is kept
    ck_assert_msg(nm_report_trace_load(&r, foreign_path(), 0, NULL, NULL, &err) == NM_OK, "%s", err.msg);
    ck_assert_ptr_null(r.samples);
    ck_assert_ptr_null(r.per_sample_metrics);
    near(r.agg.null_slot_ratio, 73.0 / 120, "null slot ratio (aggregate only)");
    nm_report_trace_free(&r);
}
END_TEST

static void progress_count(void *ctx, int done, int total) {
    int *calls = ctx;
    ck_assert_int_eq(done, calls[0] + 1);
    ck_assert_int_eq(total, 3);
    calls[0]++;
}

START_TEST(test_progress_callback) {
    nm_report_trace r;
    nm_error err = {0};
    int calls[1] = {0};
    ck_assert_msg(nm_report_trace_load(&r, foreign_path(), 0, progress_count, calls, &err) == NM_OK, "%s", err.msg);
    ck_assert_int_eq(calls[0], 3);
    nm_report_trace_free(&r);
}
END_TEST

// ---------------------------------------------------------------------------------------------
// The files of one trace

START_TEST(test_foreign_files) {
    char *dir = nm_test_tmpdir();
    nm_report_trace r;
    nm_error err = {0};
    ck_assert_msg(nm_report_trace_load(&r, foreign_path(), 1, NULL, NULL, &err) == NM_OK, "%s", err.msg);
    ck_assert_msg(nm_report_write_dir(&r, 1, dir, 0, &err) == NM_OK, "%s", err.msg);
    ck_assert_int_eq(dir_entries(dir), 3); // no temporary files left

    // ---- JSON, parsed back
    json_t *root = load_json(nm_test_path(dir, "report.json"));
    ck_assert_str_eq(json_string_value(jpath(root, "format")), "nullmap-report");
    ck_assert_int_eq(json_integer_value(jpath(root, "format_version")), 1);
    static const char *defs[] = {"compute_score", "intensity", "token_share", "compute_share", "null_slot_ratio",
                                 "zero_compute_ratio", "polarization", "aggregation"};
    for (size_t i = 0; i < sizeof defs / sizeof defs[0]; i++) {
        json_t *d = json_object_get(jpath(root, "definitions"), defs[i]);
        ck_assert_msg(json_is_string(d) && strlen(json_string_value(d)) > 10, "definition of %s", defs[i]);
    }
    ck_assert_int_eq(json_array_size(jpath(root, "traces")), 1);
    json_t *t = jpath(root, "traces.0");
    ck_assert_str_eq(json_string_value(jpath(t, "path")), foreign_path());
    ck_assert_int_eq(json_integer_value(jpath(t, "config.top_k")), 4);
    ck_assert_int_eq(json_integer_value(jpath(t, "config.num_layers")), 2);
    near_json(jpath(t, "config.rho"), 0.5, "rho");
    near_json(jpath(t, "config.expected_real_per_token"), 2.0, "K rho");
    ck_assert_str_eq(json_string_value(jpath(t, "config.null_kind")), "zero");
    ck_assert_int_eq(json_integer_value(jpath(t, "num_samples")), 3);
    ck_assert_int_eq(json_integer_value(jpath(t, "metrics.tokens")), 15);
    near_json(jpath(t, "metrics.null_slot_ratio"), 73.0 / 120, "null slot ratio");
    near_json(jpath(t, "metrics.zero_compute_ratio"), 0.4, "zero-compute ratio");
    ck_assert(json_is_true(jpath(t, "metrics.compute_share_defined")));
    near_json(jpath(t, "metrics.modalities.vision.intensity"), 1.0 / 16, "vision intensity");
    near_json(jpath(t, "metrics.modalities.text.intensity"), 25.0 / 56, "text intensity");
    near_json(jpath(t, "metrics.modalities.text.compute_share"), 25.0 / 47, "text compute share");
    near_json(jpath(t, "metrics.modalities.special.token_share"), 6.0 / 15, "special token share");
    near_json(jpath(t, "metrics.modalities.vision.zero_compute_ratio"), 0.75, "vision zero-compute");
    ck_assert_int_eq(json_integer_value(jpath(t, "metrics.modalities.all.tokens")), 15);
    json_t *pol = jpath(t, "metrics.modalities.all.polarization");
    ck_assert_int_eq(json_array_size(pol), 5);
    const long long want_pol[5] = {12, 4, 5, 3, 6};
    for (int k = 0; k < 5; k++) {
        ck_assert(json_is_integer(json_array_get(pol, (size_t)k)));
        ck_assert_int_eq(json_integer_value(json_array_get(pol, (size_t)k)), want_pol[k]);
    }
    near_json(jpath(t, "metrics.modalities.all.polarization_share.4"), 0.2, "share n_real=4");
    near_json(jpath(t, "metrics.segments.image.intensity"), 6.0 / 32, "image segment");
    near_json(jpath(t, "metrics.segments.bos.intensity"), 15.0 / 24, "bos segment");
    ck_assert_int_eq(json_array_size(jpath(t, "metrics.layers")), 2);
    ck_assert_int_eq(json_integer_value(jpath(t, "metrics.layers.1.layer")), 1);
    near_json(jpath(t, "metrics.layers.0.modalities.vision.intensity"), 0.125, "layer 0 vision");
    near_json(jpath(t, "metrics.layers.1.modalities.all.intensity"), 0.4, "layer 1 all");
    near_json(jpath(t, "metrics.layers.0.segments.answer.intensity"), 2.0 / 12, "layer 0 answer"); // (2+0)/(3·4)
    // per sample: absent vision is null (not 0), the all-null sample's compute share is null
    ck_assert_int_eq(json_array_size(jpath(t, "samples")), 3);
    ck_assert(json_is_null(jpath(t, "samples.1.image_path")));
    ck_assert_str_eq(json_string_value(jpath(t, "samples.1.prompt")), "ab | *c*");
    ck_assert(json_is_null(jpath(t, "samples.1.metrics.modalities.vision.intensity")));
    ck_assert(json_is_null(jpath(t, "samples.1.metrics.modalities.vision.zero_compute_ratio")));
    ck_assert(json_is_null(jpath(t, "samples.1.metrics.segments.image.intensity")));
    ck_assert_int_eq(json_integer_value(jpath(t, "samples.1.metrics.modalities.vision.tokens")), 0);
    ck_assert(json_is_false(jpath(t, "samples.2.metrics.compute_share_defined")));
    ck_assert(json_is_null(jpath(t, "samples.2.metrics.modalities.text.compute_share")));
    ck_assert(json_is_null(jpath(t, "samples.2.metrics.modalities.all.compute_share")));
    near_json(jpath(t, "samples.2.metrics.modalities.text.intensity"), 0.0, "sample 2 text (a real 0)");
    near_json(jpath(t, "samples.0.metrics.modalities.all.intensity"), 35.0 / 72, "sample 0");
    json_decref(root);

    // ---- CSV: header, one row per trace × layer × modality (+ the same per sample)
    char *csv = nm_test_read_file(nm_test_path(dir, "report.csv"), NULL);
    char line[4096], f[256];
    ck_assert_str_eq(line_of(csv, 0, line, sizeof line),
                     "trace,sample,num_layers,num_experts,null_copies,K,rho,null_kind,layer,modality,tokens,"
                     "token_share,compute_share,intensity,zero_compute_ratio,n_real_0,n_real_1,n_real_2,n_real_3,"
                     "n_real_4");
    ck_assert_int_eq(count_lines(csv), 1 + (1 + 3) * (2 + 1) * (3 + 1));
    const char *row = csv_row(csv, foreign_path(), "all", "all", "vision", line, sizeof line);
    ck_assert_str_eq(csv_field(row, 10, f, sizeof f), "2");                  // tokens
    ck_assert_str_eq(csv_field(row, 11, f, sizeof f), "0.1333333333");     // 10 significant digits
    ck_assert_msg(fabs(atof(csv_field(row, 12, f, sizeof f)) - 1.0 / 47) < 1e-11, "csv compute share %s", f);
    ck_assert_str_eq(csv_field(row, 13, f, sizeof f), "0.0625");
    ck_assert_str_eq(csv_field(row, 14, f, sizeof f), "0.75");
    ck_assert_str_eq(csv_field(row, 15, f, sizeof f), "0.75");  // n_real_0
    ck_assert_str_eq(csv_field(row, 16, f, sizeof f), "0.25");  // n_real_1
    ck_assert_str_eq(csv_field(row, 19, f, sizeof f), "0");     // n_real_4: a real 0
    row = csv_row(csv, foreign_path(), "all", "0", "all", line, sizeof line);
    ck_assert_str_eq(csv_field(row, 12, f, sizeof f), ""); // compute share: only on layer "all" rows
    ck_assert_str_eq(csv_field(row, 14, f, sizeof f), "0.4");
    row = csv_row(csv, foreign_path(), "1", "all", "vision", line, sizeof line);
    ck_assert_str_eq(csv_field(row, 10, f, sizeof f), "0");
    ck_assert_str_eq(csv_field(row, 13, f, sizeof f), ""); // intensity of no tokens: empty, not 0
    ck_assert_str_eq(csv_field(row, 14, f, sizeof f), "");
    ck_assert_str_eq(csv_field(row, 15, f, sizeof f), "");
    row = csv_row(csv, foreign_path(), "2", "all", "text", line, sizeof line);
    ck_assert_str_eq(csv_field(row, 12, f, sizeof f), ""); // compute share undefined
    ck_assert_str_eq(csv_field(row, 13, f, sizeof f), "0"); // intensity a real 0
    free(csv);

    // ---- Markdown: the tables, and n/a / undefined where a value does not exist
    char *md = nm_test_read_file(nm_test_path(dir, "report.md"), NULL);
    static const char *want[] = {
        "# nullmap report",
        "| L | N | M | K | ρ = N/(N+M) | K·ρ | null kind | samples | tokens |",
        "| 2 | 4 | 4 | 4 | 0.5000 | 2.000 | zero | 3 | 15 |",
        "**Null slot ratio 0.6083, zero-compute ratio 0.4000**",
        "| modality | tokens | token share | compute share | intensity | zero-compute ratio |",
        "| vision | 2 | 0.1333 | 0.02128 | 0.06250 | 0.7500 |",
        "| all | 15 | 1.000 | 1.000 | 0.3917 | 0.4000 |",
        "| layer | vision | text | special | all | zero-compute ratio |",
        "| 1 | 0.000 | 0.4643 | 0.4583 | 0.4000 | 0.4000 |",
        "| segment | tokens | intensity | zero-compute ratio |",
        "| image | 4 | 0.1875 | 0.5000 |",
        "| modality | pairs | n_real=0 | n_real=1 | n_real=2 | n_real=3 | n_real=4 |",
        "| all | 30 | 0.4000 | 0.1333 | 0.1667 | 0.1000 | 0.2000 |",
        "### Samples of trace 1",
        "| 1 | – | ab \\| \\*c\\* | 4 | n/a | 0.2083 | 0.8750 | 0.3750 | 0.3750 |", // vision absent: n/a
        "| vision | 0 | 0.000 | undefined | n/a | n/a |",                        // sample 2: all null
        "| all | 2 | 1.000 | undefined | 0.000 | 1.000 |",
        "| image | 0 | n/a | n/a |",
        "## Definitions",
        "### report.csv columns",
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++)
        ck_assert_msg(strstr(md, want[i]) != NULL, "report.md lacks \"%s\"", want[i]);
    ck_assert_msg(strstr(md, "## Comparison") == NULL, "one trace: no comparison section");
    free(md);

    // the single-file writers give the same text as the directory writer
    char *md2 = nm_report_md(&r, 1, &err);
    ck_assert_ptr_nonnull(md2);
    md = nm_test_read_file(nm_test_path(dir, "report.md"), NULL);
    ck_assert_str_eq(md, md2);
    free(md);
    free(md2);
    ck_assert_msg(nm_report_write_csv(&r, 1, nm_test_path(dir, "one.csv"), &err) == NM_OK, "%s", err.msg);
    csv = nm_test_read_file(nm_test_path(dir, "one.csv"), NULL);
    char *csv2 = nm_test_read_file(nm_test_path(dir, "report.csv"), NULL);
    ck_assert_str_eq(csv, csv2);
    free(csv);
    free(csv2);
    ck_assert_msg(nm_report_write_json(&r, 1, nm_test_path(dir, "one.json"), &err) == NM_OK, "%s", err.msg);
    ck_assert_msg(nm_report_write_md(&r, 1, nm_test_path(dir, "one.md"), &err) == NM_OK, "%s", err.msg);
    ck_assert_int_eq(dir_entries(dir), 6);

    nm_report_trace_free(&r);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

// ---------------------------------------------------------------------------------------------
// Two traces: the comparison

START_TEST(test_two_traces) {
    char *dir = nm_test_tmpdir();
    const char *cpath = nm_test_path(dir, "c_trace.h5");
    char cpath_copy[4096];
    snprintf(cpath_copy, sizeof cpath_copy, "%s", cpath);
    c_trace ct;
    make_c_trace(&ct, cpath_copy, 42);
    double want_null, want_zero, want_text;
    long long want_tokens;
    c_trace_expect(&ct, &want_null, &want_zero, &want_text, &want_tokens);

    nm_report_trace r[2];
    nm_error err = {0};
    ck_assert_msg(nm_report_trace_load(&r[0], foreign_path(), 0, NULL, NULL, &err) == NM_OK, "%s", err.msg);
    ck_assert_msg(nm_report_trace_load(&r[1], cpath_copy, 0, NULL, NULL, &err) == NM_OK, "%s", err.msg);
    near(r[1].agg.null_slot_ratio, want_null, "C trace null slot ratio");
    near(r[1].agg.zero_compute_ratio, want_zero, "C trace zero-compute ratio");
    near(r[1].agg.intensity[NM_MOD_TEXT], want_text, "C trace text intensity");
    ck_assert_int_eq(r[1].agg.n_tokens[NM_MOD_ALL], want_tokens);
    ck_assert(isnan(r[1].agg.intensity[NM_MOD_VISION]));

    char *out = strdup(nm_test_path(dir, "out"));
    ck_assert_int_eq(mkdir(out, 0777), 0);
    ck_assert_msg(nm_report_write_dir(r, 2, out, 0, &err) == NM_OK, "%s", err.msg);

    // md: the comparison table, one row per trace; the text-only trace has no vision: n/a
    char *md = nm_test_read_file(nm_test_path(out, "report.md"), NULL);
    ck_assert_ptr_nonnull(strstr(md, "## Comparison"));
    ck_assert_ptr_nonnull(strstr(md, "| # | trace | L | K | ρ | K·ρ | samples | tokens | null slot ratio | "
                                     "zero-compute ratio | vision intensity | text intensity | vision compute share "
                                     "| text compute share |"));
    ck_assert_ptr_nonnull(strstr(md, "| 4 | 0.5000 | 2.000 | 3 | 15 | 0.6083 | 0.4000 | 0.06250 | 0.4464 | 0.02128 "
                                     "| 0.5319 |"));
    char want_row[512];
    snprintf(want_row, sizeof want_row, "| 3 | 8 | 0.5000 | 4.000 | 4 | %lld | %#.4g | %#.4g | n/a | %#.4g | 0.000 |",
             want_tokens, want_null, want_zero, want_text);
    ck_assert_msg(strstr(md, want_row) != NULL, "report.md lacks \"%s\"", want_row);
    ck_assert_ptr_nonnull(strstr(md, "## Trace 1: "));
    ck_assert_ptr_nonnull(strstr(md, "## Trace 2: "));
    ck_assert_ptr_nonnull(strstr(md, "| vision | 0 | 0.000 | 0.000 | n/a | n/a |")); // trace 2 by modality
    ck_assert_ptr_nonnull(strstr(md, "columns run to n\\_real\\_8"));
    free(md);

    // CSV: rows of both traces, n_real columns padded to the larger K (8) with empty cells
    char *csv = nm_test_read_file(nm_test_path(out, "report.csv"), NULL);
    char line[4096], f[256];
    line_of(csv, 0, line, sizeof line);
    ck_assert_ptr_nonnull(strstr(line, ",n_real_7,n_real_8"));
    ck_assert_ptr_null(strstr(line, "n_real_9"));
    ck_assert_int_eq(count_lines(csv), 1 + (2 + 1) * 4 + (3 + 1) * 4);
    const char *row = csv_row(csv, foreign_path(), "all", "all", "all", line, sizeof line);
    ck_assert_str_eq(csv_field(row, 19, f, sizeof f), "0.2"); // n_real_4 of K = 4
    for (int k = 5; k <= 8; k++) ck_assert_str_eq(csv_field(row, 15 + k, f, sizeof f), "");
    ck_assert_ptr_nonnull(strstr(row, "0.2,,,,"));
    row = csv_row(csv, cpath_copy, "all", "all", "all", line, sizeof line);
    ck_assert_str_eq(csv_field(row, 5, f, sizeof f), "8");
    ck_assert_msg(fabs(atof(csv_field(row, 14, f, sizeof f)) - want_zero) < 1e-10, "csv zero-compute %s", f);
    row = csv_row(csv, cpath_copy, "all", "2", "vision", line, sizeof line);
    ck_assert_str_eq(csv_field(row, 13, f, sizeof f), "");
    free(csv);

    // JSON: two traces; the text-only one has null vision intensity
    json_t *root = load_json(nm_test_path(out, "report.json"));
    ck_assert_int_eq(json_array_size(jpath(root, "traces")), 2);
    ck_assert_int_eq(json_integer_value(jpath(root, "traces.1.config.top_k")), 8);
    ck_assert_str_eq(json_string_value(jpath(root, "traces.1.model")), "random-model");
    near_json(jpath(root, "traces.1.metrics.null_slot_ratio"), want_null, "json null slot ratio");
    ck_assert(json_is_null(jpath(root, "traces.1.metrics.modalities.vision.intensity")));
    near_json(jpath(root, "traces.1.metrics.modalities.vision.compute_share"), 0.0, "vision share, defined 0");
    ck_assert_int_eq(json_array_size(jpath(root, "traces.1.metrics.layers")), 3);
    ck_assert_int_eq(json_array_size(jpath(root, "traces.1.metrics.layers.2.modalities.text.polarization")), 9);
    ck_assert(json_object_get(jpath(root, "traces.1"), "samples") == NULL);
    json_decref(root);

    // The in-memory builder gives the same report as loading the file.
    nm_report_trace b;
    nm_trace_info info;
    ck_assert_msg(nm_trace_read_info(&info, cpath_copy, &err) == NM_OK, "%s", err.msg);
    ck_assert_msg(nm_report_trace_begin(&b, cpath_copy, &info, 0, &err) == NM_OK, "%s", err.msg);
    for (int i = 0; i < ct.n; i++) ck_assert_msg(nm_report_trace_add(&b, &ct.s[i], &err) == NM_OK, "%s", err.msg);
    nm_report_trace_finish(&b);
    char *j1 = nm_report_json(&r[1], 1, &err), *j2 = nm_report_json(&b, 1, &err);
    ck_assert_ptr_nonnull(j1);
    ck_assert_ptr_nonnull(j2);
    ck_assert_str_eq(j1, j2);
    free(j1);
    free(j2);
    // a sample of another shape is refused and adds nothing
    nm_trace_sample wrong;
    ck_assert_int_eq(nm_trace_sample_init(&wrong, 2, 8, 3, &err), NM_OK);
    wrong.n_tokens = 3;
    ck_assert_int_eq(nm_report_trace_add(&b, &wrong, &err), NM_ERR_INVALID);
    ck_assert_int_eq(b.n_samples, ct.n);
    nm_trace_sample_free(&wrong);
    nm_report_trace_free(&b);

    nm_report_trace_free(&r[0]);
    nm_report_trace_free(&r[1]);
    free_c_trace(&ct);
    free(out);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

// A trace with no samples: everything n/a / null / empty, never 0.
START_TEST(test_empty_trace) {
    char *dir = nm_test_tmpdir();
    char path[4096];
    snprintf(path, sizeof path, "%s/empty.h5", dir);
    c_trace ct;
    memset(&ct, 0, sizeof ct);
    make_c_trace(&ct, path, 1);
    free_c_trace(&ct);
    nm_trace_file *f = NULL;
    nm_error err = {0};
    ck_assert_msg(nm_trace_file_open(&f, path, &ct.cfg, NULL, 0, 1, &err) == NM_OK, "%s", err.msg);
    ck_assert_msg(nm_trace_file_commit(f, &err) == NM_OK, "%s", err.msg);
    nm_report_trace r;
    ck_assert_msg(nm_report_trace_load(&r, path, 1, NULL, NULL, &err) == NM_OK, "%s", err.msg);
    ck_assert_int_eq(r.n_samples, 0);
    char *md = nm_report_md(&r, 1, &err), *csv = nm_report_csv(&r, 1, &err), *js = nm_report_json(&r, 1, &err);
    ck_assert_ptr_nonnull(md);
    ck_assert_ptr_nonnull(csv);
    ck_assert_ptr_nonnull(js);
    ck_assert_ptr_nonnull(strstr(md, "holds no samples"));
    ck_assert_ptr_nonnull(strstr(md, "| all | 0 | n/a | n/a | n/a | n/a |"));
    ck_assert_ptr_nonnull(strstr(csv, ",zero,all,all,0,,,,,,,,,,,,,\n")); // 4 values + n_real_0..8 empty
    ck_assert_int_eq(count_lines(csv), 1 + 4 * 4);
    json_error_t je;
    json_t *root = json_loads(js, 0, &je);
    ck_assert_ptr_nonnull(root);
    ck_assert(json_is_null(jpath(root, "traces.0.metrics.null_slot_ratio")));
    ck_assert(json_is_null(jpath(root, "traces.0.metrics.modalities.all.intensity")));
    ck_assert_int_eq(json_array_size(jpath(root, "traces.0.samples")), 0);
    json_decref(root);
    free(md);
    free(csv);
    free(js);
    nm_report_trace_free(&r);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

// Strings from a trace are text, not markup: escaped in md, valid UTF-8 in JSON, quoted in CSV.
START_TEST(test_strings_escaped) {
    nm_trace_info info;
    nm_error err = {0};
    ck_assert_msg(nm_trace_read_info(&info, foreign_path(), &err) == NM_OK, "%s", err.msg);
    nm_trace_sample s;
    ck_assert_msg(nm_trace_read_sample(&s, foreign_path(), 0, &err) == NM_OK, "%s", err.msg);
    free(s.prompt);
    free(s.answer);
    s.prompt = strdup("line1\nline2 | <b>*x*</b> \xff end\t");
    s.answer = strdup("say \"hi\", ok");
    nm_report_trace r;
    ck_assert_int_eq(nm_report_trace_begin(&r, "odd,name\"x.h5", &info, 1, &err), NM_OK);
    ck_assert_msg(nm_report_trace_add(&r, &s, &err) == NM_OK, "%s", err.msg);
    nm_report_trace_finish(&r);
    nm_trace_sample_free(&s);

    char *md = nm_report_md(&r, 1, &err);
    ck_assert_ptr_nonnull(md);
    ck_assert_msg(strstr(md, "- prompt: line1\\\\nline2 \\| \\<b\\>\\*x\\*\\</b\\> \xef\xbf\xbd end\\\\t\n") != NULL,
                  "escaped prompt missing:\n%s", md);
    ck_assert_ptr_nonnull(strstr(md, "- answer: say \"hi\", ok\n"));
    free(md);

    char *js = nm_report_json(&r, 1, &err);
    ck_assert_ptr_nonnull(js);
    json_error_t je;
    json_t *root = json_loads(js, 0, &je);
    ck_assert_msg(root != NULL, "invalid JSON: %s", je.text);
    ck_assert_str_eq(json_string_value(jpath(root, "traces.0.samples.0.prompt")),
                     "line1\nline2 | <b>*x*</b> \xef\xbf\xbd end\t");
    ck_assert_str_eq(json_string_value(jpath(root, "traces.0.path")), "odd,name\"x.h5");
    json_decref(root);
    free(js);

    char *csv = nm_report_csv(&r, 1, &err);
    ck_assert_ptr_nonnull(csv);
    ck_assert_ptr_nonnull(strstr(csv, "\n\"odd,name\"\"x.h5\",all,"));
    free(csv);
    nm_report_trace_free(&r);
}
END_TEST

// ---------------------------------------------------------------------------------------------
// Bad traces and all-or-nothing writing

START_TEST(test_bad_traces) {
    char *dir = nm_test_tmpdir();
    nm_error err = {0};
    nm_report_trace r;
    // truncated copies of the foreign trace: an error naming the file, r left empty
    const long cuts[] = {0, 100, 2048, 20000, 39000};
    for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++) {
        char bad[4096];
        snprintf(bad, sizeof bad, "%s/cut%ld.h5", dir, cuts[i]);
        copy_file(foreign_path(), bad, cuts[i]);
        memset(&err, 0, sizeof err);
        nm_status st = nm_report_trace_load(&r, bad, 1, NULL, NULL, &err);
        ck_assert_msg(st != NM_OK, "cut at %ld bytes loaded", cuts[i]);
        ck_assert_msg(strstr(err.msg, bad) != NULL, "message does not name the file: %s", err.msg);
        ck_assert_ptr_null(r.path);
        ck_assert_ptr_null(r.agg.polarization);
        nm_report_trace_free(&r);
    }
    // a bad dataset in sample 000001 of a nullmap trace: the message names file and dataset
    char bad[4096];
    snprintf(bad, sizeof bad, "%s/bad_nreal.h5", dir);
    c_trace ct;
    make_c_trace(&ct, bad, 7);
    free_c_trace(&ct);
    hid_t fid = H5Fopen(bad, H5F_ACC_RDWR, H5P_DEFAULT);
    ck_assert_int_ge(fid, 0);
    hid_t d = H5Dopen2(fid, "/samples/000001/routing/n_real", H5P_DEFAULT);
    ck_assert_int_ge(d, 0);
    hsize_t start[2] = {0, 0}, count[2] = {1, 1};
    hid_t fs = H5Dget_space(d), ms = H5Screate_simple(2, count, NULL);
    ck_assert_int_ge(H5Sselect_hyperslab(fs, H5S_SELECT_SET, start, NULL, count, NULL), 0);
    uint8_t v = 9; // > K = 8
    ck_assert_int_ge(H5Dwrite(d, H5T_NATIVE_UINT8, ms, fs, H5P_DEFAULT, &v), 0);
    H5Sclose(ms);
    H5Sclose(fs);
    H5Dclose(d);
    H5Fclose(fid);
    ck_assert_int_eq(nm_report_trace_load(&r, bad, 0, NULL, NULL, &err), NM_ERR_INVALID);
    ck_assert_msg(strstr(err.msg, bad) && strstr(err.msg, "/samples/000001/routing/n_real"),
                  "message does not name file and dataset: %s", err.msg);
    nm_report_trace_free(&r);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(test_write_dir_all_or_nothing) {
    char *dir = nm_test_tmpdir();
    nm_error err = {0};
    nm_report_trace r;
    ck_assert_msg(nm_report_trace_load(&r, foreign_path(), 0, NULL, NULL, &err) == NM_OK, "%s", err.msg);

    // existing report.md without overwrite: refused before anything is written
    ck_assert_int_eq(nm_test_write_file(nm_test_path(dir, "report.md"), "mine", 4), 0);
    ck_assert_int_eq(nm_report_write_dir(&r, 1, dir, 0, &err), NM_ERR_IO);
    ck_assert_ptr_nonnull(strstr(err.msg, "report.md"));
    char *kept = nm_test_read_file(nm_test_path(dir, "report.md"), NULL);
    ck_assert_str_eq(kept, "mine");
    free(kept);
    ck_assert_int_eq(dir_entries(dir), 1);
    // with overwrite: replaced
    ck_assert_msg(nm_report_write_dir(&r, 1, dir, 1, &err) == NM_OK, "%s", err.msg);
    kept = nm_test_read_file(nm_test_path(dir, "report.md"), NULL);
    ck_assert_ptr_nonnull(strstr(kept, "# nullmap report"));
    free(kept);
    ck_assert_int_eq(dir_entries(dir), 3);

    // the last rename fails (report.csv is a non-empty directory): none of the three is left
    ck_assert_int_eq(unlink(nm_test_path(dir, "report.csv")), 0);
    ck_assert_int_eq(mkdir(nm_test_path(dir, "report.csv"), 0777), 0);
    ck_assert_int_eq(nm_test_write_file(nm_test_path(dir, "report.csv/x"), "x", 1), 0);
    ck_assert_int_ne(nm_report_write_dir(&r, 1, dir, 1, &err), NM_OK);
    ck_assert_msg(strstr(err.msg, "report.csv") != NULL, "%s", err.msg);
    ck_assert(!file_exists(dir, "report.md"));
    ck_assert(!file_exists(dir, "report.json"));
    ck_assert_int_eq(dir_entries(dir), 1); // only the directory in the way; no temporary files
    // a missing directory is an error, not created by the library
    ck_assert_int_eq(nm_report_write_dir(&r, 1, nm_test_path(dir, "nope"), 1, &err), NM_ERR_IO);
    nm_report_trace_free(&r);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

// ---------------------------------------------------------------------------------------------
// The command line

static const char *nullmap_bin(void) {
    const char *p = getenv("NULLMAP");
    return p && *p ? p : "build/nullmap";
}

// Runs `nullmap ARGS` (a shell fragment), stdout/stderr to dir/out, dir/err; returns the exit code.
static int run_cli(const char *dir, const char *args) {
    char cmd[16384];
    snprintf(cmd, sizeof cmd, "'%s' %s >'%s/cli.out' 2>'%s/cli.err'", nullmap_bin(), args, dir, dir);
    int st = system(cmd);
    ck_assert_msg(st != -1 && WIFEXITED(st), "could not run %s", cmd);
    return WEXITSTATUS(st);
}

START_TEST(test_cli) {
    ck_assert_msg(access(nullmap_bin(), X_OK) == 0, "%s is not built (make, or set NULLMAP)", nullmap_bin());
    char *dir = nm_test_tmpdir();
    char args[12000], tmp[4096];
    const char *fp = foreign_path();
    ck_assert_int_eq(run_cli(dir, "report --help"), 0);
    char *o = nm_test_read_file(nm_test_path(dir, "cli.out"), NULL);
    ck_assert_ptr_nonnull(strstr(o, "usage: nullmap report"));
    free(o);
    ck_assert_int_eq(run_cli(dir, "report"), 2);
    snprintf(args, sizeof args, "report '%s'", fp);
    ck_assert_int_eq(run_cli(dir, args), 2); // no --out
    snprintf(args, sizeof args, "report '%s' --out '%s/o' --bogus", fp, dir);
    ck_assert_int_eq(run_cli(dir, args), 2);
    snprintf(args, sizeof args, "report '%s/missing.h5' --out '%s/o'", dir, dir);
    ck_assert_int_eq(run_cli(dir, args), 3);
    ck_assert(!file_exists(dir, "o"));

    // two traces (one twice is fine), per sample, into a new nested directory
    snprintf(args, sizeof args, "report '%s' '%s' --out '%s/a/b' --per-sample", fp, fp, dir);
    ck_assert_int_eq(run_cli(dir, args), 0);
    o = nm_test_read_file(nm_test_path(dir, "cli.out"), NULL);
    ck_assert_ptr_nonnull(strstr(o, "null-slot"));
    ck_assert_ptr_nonnull(strstr(o, "0.6083"));
    ck_assert_ptr_nonnull(strstr(o, fp));
    free(o);
    snprintf(tmp, sizeof tmp, "%s/a/b", dir);
    ck_assert_int_eq(dir_entries(tmp), 8); // report.md/.json/.csv and the 5 charts
    ck_assert(file_exists(tmp, "modality.png") && file_exists(tmp, "zero_vs_null.png"));
    char *md = nm_test_read_file(nm_test_path(tmp, "report.md"), NULL);
    ck_assert_ptr_nonnull(strstr(md, "## Comparison"));
    ck_assert_ptr_nonnull(strstr(md, "#### Trace 2, sample 2"));
    free(md);
    // again without --force: refused, files untouched; with --force: fine
    ck_assert_int_eq(run_cli(dir, args), 3);
    o = nm_test_read_file(nm_test_path(dir, "cli.err"), NULL);
    ck_assert_ptr_nonnull(strstr(o, "--force"));
    free(o);
    snprintf(args + strlen(args), sizeof args - strlen(args), " --force");
    ck_assert_int_eq(run_cli(dir, args), 0);

    // a truncated trace after a good one: exit 1, message names it, nothing written, no
    // directory created
    char bad[4096];
    snprintf(bad, sizeof bad, "%s/cut.h5", dir);
    copy_file(fp, bad, 20000);
    snprintf(args, sizeof args, "report '%s' '%s' --out '%s/c/d'", fp, bad, dir);
    ck_assert_int_eq(run_cli(dir, args), 1);
    o = nm_test_read_file(nm_test_path(dir, "cli.err"), NULL);
    ck_assert_msg(strstr(o, "nullmap report: error: ") && strstr(o, bad), "stderr: %s", o);
    free(o);
    ck_assert(!file_exists(dir, "c"));
    // ... and into an existing directory with --force: the old report stays as it was
    snprintf(args, sizeof args, "report '%s' '%s' --out '%s/a/b' --force", fp, bad, dir);
    md = nm_test_read_file(nm_test_path(tmp, "report.md"), NULL);
    ck_assert_int_eq(run_cli(dir, args), 1);
    char *md_after = nm_test_read_file(nm_test_path(tmp, "report.md"), NULL);
    ck_assert_str_eq(md, md_after);
    free(md);
    free(md_after);
    ck_assert_int_eq(dir_entries(tmp), 8);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

NM_TEST_SUITE(report) {
    Suite *s = suite_create("report");
    TCase *tc = tcase_create("report");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_foreign_metrics);
    tcase_add_test(tc, test_progress_callback);
    tcase_add_test(tc, test_foreign_files);
    tcase_add_test(tc, test_two_traces);
    tcase_add_test(tc, test_empty_trace);
    tcase_add_test(tc, test_strings_escaped);
    tcase_add_test(tc, test_bad_traces);
    tcase_add_test(tc, test_write_dir_all_or_nothing);
    tcase_add_test(tc, test_cli);
    suite_add_tcase(s, tc);
    return s;
}
