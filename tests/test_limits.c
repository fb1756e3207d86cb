// test_limits.c — every input limit (nm_limits.h) at its value (accepted) and one over
// (refused with NM_ERR_LIMIT and a message naming the file, the value and the limit), and the
// ways to set a limit: by name, from a "name=value" string, from the environment.
// Inputs are the small committed fuzz seeds (tests/fuzz/corpus/).
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nm_config.h"
#include "nm_data.h"
#include "nm_image.h"
#include "nm_limits.h"
#include "nm_model.h"
#include "nm_safetensors.h"
#include "nm_trace.h"
#include "test_util.h"

static const char *seed(const char *harness, const char *name) {
    static char buf[4][1024];
    static int k;
    char *p = buf[k++ % 4];
    snprintf(p, 1024, "%s/fuzz/corpus/%s/%s", nm_test_dir(), harness, name);
    return p;
}

static void set_limit(nm_limit_id id, uint64_t v) {
    nm_error err;
    ck_assert_msg(nm_limit_set(id, v, &err) == NM_OK, "%s", err.msg);
}

// The refusal names the limit, its value and how to raise it.
static void assert_limit_error(nm_status s, const nm_error *err, nm_limit_id id, const char *file) {
    ck_assert_msg(s == NM_ERR_LIMIT, "expected a limit error, got %s: %s", nm_status_name(s), err->msg);
    char value[64];
    snprintf(value, sizeof value, "over the limit of %llu", (unsigned long long)nm_limit(id));
    ck_assert_msg(strstr(err->msg, value), "message lacks '%s': %s", value, err->msg);
    ck_assert_msg(strstr(err->msg, nm_limit_name(id)), "message lacks the limit's name: %s", err->msg);
    ck_assert_msg(strstr(err->msg, nm_limit_env_name(id)), "message lacks the variable: %s", err->msg);
    if (file) ck_assert_msg(strstr(err->msg, file), "message lacks the file '%s': %s", file, err->msg);
}

START_TEST(limit_set_and_parse) {
    nm_limits_reset();
    nm_error err;
    ck_assert_uint_eq(nm_limit(NM_LIMIT_IMAGE_PIXELS), (uint64_t)64 << 20);
    ck_assert_int_eq(nm_limit_set_from_string("image_pixels=3M", &err), NM_OK);
    ck_assert_uint_eq(nm_limit(NM_LIMIT_IMAGE_PIXELS), (uint64_t)3 << 20);
    ck_assert_int_eq(nm_limit_set_from_string("data_records=17", &err), NM_OK);
    ck_assert_uint_eq(nm_limit(NM_LIMIT_DATA_RECORDS), 17);
    ck_assert_int_eq(nm_limit_set_from_string("nonsense=1", &err), NM_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(err.msg, "unknown limit 'nonsense'"));
    ck_assert_int_eq(nm_limit_set_from_string("image_pixels", &err), NM_ERR_INVALID);
    ck_assert_int_eq(nm_limit_set_from_string("image_pixels=0", &err), NM_ERR_INVALID);
    ck_assert_int_eq(nm_limit_set_from_string("image_pixels=12Q", &err), NM_ERR_INVALID);
    ck_assert_int_eq(nm_limit_set_from_string("image_pixels=-5", &err), NM_ERR_INVALID);
    ck_assert_int_eq(nm_limit_set_from_string("image_pixels=99999999999999999999999", &err), NM_ERR_INVALID);
    ck_assert_int_eq(nm_limit_set_from_string("image_pixels=20000000T", &err), NM_ERR_INVALID);
    // at the ceiling, and one over
    char at[96], over[96];
    snprintf(at, sizeof at, "trace_entries=%llu", (unsigned long long)nm_limit_ceiling(NM_LIMIT_TRACE_ENTRIES));
    snprintf(over, sizeof over, "trace_entries=%llu", (unsigned long long)nm_limit_ceiling(NM_LIMIT_TRACE_ENTRIES) + 1);
    ck_assert_int_eq(nm_limit_set_from_string(at, &err), NM_OK);
    ck_assert_int_eq(nm_limit_set_from_string(over, &err), NM_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(err.msg, "trace_entries"));
    ck_assert_uint_eq(nm_limit(NM_LIMIT_TRACE_ENTRIES), nm_limit_ceiling(NM_LIMIT_TRACE_ENTRIES)); // unchanged
    // every limit: a name, a variable, a default within its ceiling
    for (int i = 0; i < NM_LIMIT_COUNT; i++) {
        ck_assert_int_eq(nm_limit_find(nm_limit_name(i)), i);
        ck_assert_uint_le(nm_limit_default(i), nm_limit_ceiling(i));
        ck_assert_ptr_nonnull(strstr(nm_limit_env_name(i), "NULLMAP_LIMIT_"));
    }
    nm_limits_reset();
    ck_assert_uint_eq(nm_limit(NM_LIMIT_DATA_RECORDS), 10000000);
}
END_TEST

START_TEST(limit_from_env) {
    nm_limits_reset();
    nm_error err;
    setenv("NULLMAP_LIMIT_SAFETENSORS_TENSORS", "2K", 1);
    ck_assert_int_eq(nm_limits_from_env(&err), NM_OK);
    ck_assert_uint_eq(nm_limit(NM_LIMIT_SAFETENSORS_TENSORS), 2048);
    setenv("NULLMAP_LIMIT_SAFETENSORS_TENSORS", "lots", 1);
    ck_assert_int_eq(nm_limits_from_env(&err), NM_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(err.msg, "NULLMAP_LIMIT_SAFETENSORS_TENSORS"));
    unsetenv("NULLMAP_LIMIT_SAFETENSORS_TENSORS");
    nm_limits_reset();
}
END_TEST

START_TEST(limit_image_pixels) { // rgb8.png is 8 x 6
    nm_image img = {0}, out = {0};
    nm_error err;
    const char *path = seed("png", "rgb8.png");
    set_limit(NM_LIMIT_IMAGE_PIXELS, 48);
    ck_assert_msg(nm_image_load(&img, path, &err) == NM_OK, "%s", err.msg);
    ck_assert_int_eq(nm_image_resize(&out, &img, 6, 8, &err), NM_OK);
    nm_image_free(&out);
    assert_limit_error(nm_image_resize(&out, &img, 7, 7, &err), &err, NM_LIMIT_IMAGE_PIXELS, "7x7");
    nm_image_free(&img);
    set_limit(NM_LIMIT_IMAGE_PIXELS, 47);
    assert_limit_error(nm_image_load(&img, path, &err), &err, NM_LIMIT_IMAGE_PIXELS, "rgb8.png");
    ck_assert_ptr_null(img.rgb);
    // JPEG too (16 x 16)
    const char *jpg = seed("jpeg", "baseline.jpg");
    set_limit(NM_LIMIT_IMAGE_PIXELS, 256);
    ck_assert_msg(nm_image_load(&img, jpg, &err) == NM_OK, "%s", err.msg);
    nm_image_free(&img);
    set_limit(NM_LIMIT_IMAGE_PIXELS, 255);
    assert_limit_error(nm_image_load(&img, jpg, &err), &err, NM_LIMIT_IMAGE_PIXELS, "baseline.jpg");
    nm_limits_reset();
}
END_TEST

START_TEST(limit_image_file_bytes) {
    nm_image img = {0};
    nm_error err;
    const char *path = seed("png", "rgb8.png");
    size_t size;
    free(nm_test_read_file(path, &size));
    set_limit(NM_LIMIT_IMAGE_FILE_BYTES, size);
    ck_assert_msg(nm_image_load(&img, path, &err) == NM_OK, "%s", err.msg);
    nm_image_free(&img);
    set_limit(NM_LIMIT_IMAGE_FILE_BYTES, size - 1);
    ck_assert_int_eq(nm_image_load(&img, path, &err), NM_ERR_LIMIT);
    ck_assert_ptr_nonnull(strstr(err.msg, "rgb8.png"));
    nm_limits_reset();
}
END_TEST

START_TEST(limit_json_file_bytes) {
    nm_config cfg;
    nm_error err;
    const char *path = seed("config", "tiny_text.json");
    size_t size;
    free(nm_test_read_file(path, &size));
    set_limit(NM_LIMIT_JSON_FILE_BYTES, size);
    ck_assert_msg(nm_config_load(&cfg, path, &err) == NM_OK, "%s", err.msg);
    set_limit(NM_LIMIT_JSON_FILE_BYTES, size - 1);
    ck_assert_int_eq(nm_config_load(&cfg, path, &err), NM_ERR_LIMIT);
    ck_assert_ptr_nonnull(strstr(err.msg, "tiny_text.json"));
    nm_limits_reset();
}
END_TEST

START_TEST(limit_safetensors) { // mixed-dtypes.safetensors: 5 entries with __metadata__
    size_t size;
    uint8_t *buf = (uint8_t *)nm_test_read_file(seed("safetensors", "mixed-dtypes.safetensors"), &size);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = hlen << 8 | buf[i];
    nm_safetensors st;
    nm_error err;
    set_limit(NM_LIMIT_SAFETENSORS_HEADER_BYTES, hlen);
    ck_assert_msg(nm_safetensors_parse(&st, buf, size, "m.safetensors", &err) == NM_OK, "%s", err.msg);
    nm_safetensors_close(&st);
    set_limit(NM_LIMIT_SAFETENSORS_HEADER_BYTES, hlen - 1);
    assert_limit_error(nm_safetensors_parse(&st, buf, size, "m.safetensors", &err), &err,
                       NM_LIMIT_SAFETENSORS_HEADER_BYTES, "m.safetensors");
    nm_limits_reset();
    set_limit(NM_LIMIT_SAFETENSORS_TENSORS, 5);
    ck_assert_msg(nm_safetensors_parse(&st, buf, size, "m.safetensors", &err) == NM_OK, "%s", err.msg);
    ck_assert_int_eq(st.n_tensors, 4);
    nm_safetensors_close(&st);
    set_limit(NM_LIMIT_SAFETENSORS_TENSORS, 4);
    assert_limit_error(nm_safetensors_parse(&st, buf, size, "m.safetensors", &err), &err, NM_LIMIT_SAFETENSORS_TENSORS,
                       "m.safetensors");
    nm_limits_reset();
    free(buf);
}
END_TEST

START_TEST(limit_model_params) {
    nm_config cfg;
    nm_error err;
    ck_assert_msg(nm_config_load(&cfg, seed("config", "tiny_text.json"), &err) == NM_OK, "%s", err.msg);
    nm_model m;
    ck_assert_msg(nm_model_init_zero(&m, &cfg, &err) == NM_OK, "%s", err.msg);
    size_t need = m.arena_len;
    nm_model_free(&m);
    set_limit(NM_LIMIT_MODEL_PARAMS, need);
    ck_assert_msg(nm_model_init_zero(&m, &cfg, &err) == NM_OK, "%s", err.msg);
    nm_model_free(&m);
    set_limit(NM_LIMIT_MODEL_PARAMS, need - 1);
    assert_limit_error(nm_model_init_zero(&m, &cfg, &err), &err, NM_LIMIT_MODEL_PARAMS, NULL);
    nm_limits_reset();
}
END_TEST

START_TEST(limit_trace) {
    nm_trace_info info;
    nm_trace_sample s;
    nm_error err;
    const char *two = seed("trace", "vision_two_samples.h5");
    set_limit(NM_LIMIT_TRACE_SAMPLES, 2);
    ck_assert_msg(nm_trace_read_info(&info, two, &err) == NM_OK, "%s", err.msg);
    ck_assert_int_eq(info.num_samples, 2);
    set_limit(NM_LIMIT_TRACE_SAMPLES, 1);
    assert_limit_error(nm_trace_read_info(&info, two, &err), &err, NM_LIMIT_TRACE_SAMPLES, "vision_two_samples.h5");
    nm_limits_reset();
    ck_assert_msg(nm_trace_read_sample(&s, two, 0, &err) == NM_OK, "%s", err.msg);
    uint64_t entries = (uint64_t)s.n_layers * (uint64_t)s.n_tokens * (uint64_t)s.top_k;
    nm_trace_sample_free(&s);
    set_limit(NM_LIMIT_TRACE_ENTRIES, entries);
    ck_assert_msg(nm_trace_read_sample(&s, two, 0, &err) == NM_OK, "%s", err.msg);
    nm_trace_sample_free(&s);
    set_limit(NM_LIMIT_TRACE_ENTRIES, entries - 1);
    assert_limit_error(nm_trace_read_sample(&s, two, 0, &err), &err, NM_LIMIT_TRACE_ENTRIES, "vision_two_samples.h5");
    nm_limits_reset();
}
END_TEST

// A data set directory holding train.jsonl with the given text.
static char *dataset_dir(const char *jsonl) {
    char *dir = nm_test_tmpdir();
    ck_assert_int_eq(nm_test_write_file(nm_test_path(dir, "train.jsonl"), jsonl, strlen(jsonl)), 0);
    return dir;
}

START_TEST(limit_data) {
    static const char *rec = "{\"id\": \"a\", \"image\": null, \"prompt\": \"p\", \"answer\": \"q\", \"task\": \"text\"}";
    size_t len = strlen(rec);
    char *text = malloc(2 * len + 3);
    snprintf(text, 2 * len + 3, "%s\n%s\n", rec, rec);
    char *dir = dataset_dir(text);
    nm_dataset d;
    nm_error err;
    set_limit(NM_LIMIT_DATA_LINE_BYTES, len);
    ck_assert_msg(nm_dataset_load(&d, dir, "train", &err) == NM_OK, "%s", err.msg);
    ck_assert_int_eq(d.n, 2);
    nm_dataset_free(&d);
    set_limit(NM_LIMIT_DATA_LINE_BYTES, len - 1);
    assert_limit_error(nm_dataset_load(&d, dir, "train", &err), &err, NM_LIMIT_DATA_LINE_BYTES, "train.jsonl:1");
    nm_limits_reset();
    set_limit(NM_LIMIT_DATA_RECORDS, 2);
    ck_assert_msg(nm_dataset_load(&d, dir, "train", &err) == NM_OK, "%s", err.msg);
    nm_dataset_free(&d);
    set_limit(NM_LIMIT_DATA_RECORDS, 1);
    assert_limit_error(nm_dataset_load(&d, dir, "train", &err), &err, NM_LIMIT_DATA_RECORDS, "train.jsonl:2");
    nm_limits_reset();
    nm_test_rmtree(dir);
    free(dir);
    free(text);
}
END_TEST

// A line far longer than the limit, without a newline, is refused after reading only the
// limit's worth of it (the reader does not buffer the whole line first).
START_TEST(limit_data_line_without_newline) {
    size_t n = 1 << 20;
    char *text = malloc(n + 1);
    memset(text, 'x', n);
    text[n] = '\0';
    char *dir = dataset_dir(text);
    nm_dataset d;
    nm_error err;
    set_limit(NM_LIMIT_DATA_LINE_BYTES, 100);
    assert_limit_error(nm_dataset_load(&d, dir, "train", &err), &err, NM_LIMIT_DATA_LINE_BYTES, "more than 100 bytes");
    nm_limits_reset();
    nm_test_rmtree(dir);
    free(dir);
    free(text);
}
END_TEST

NM_TEST_SUITE(limits) {
    Suite *s = suite_create("limits");
    TCase *tc = tcase_create("limits");
    tcase_add_test(tc, limit_set_and_parse);
    tcase_add_test(tc, limit_from_env);
    tcase_add_test(tc, limit_image_pixels);
    tcase_add_test(tc, limit_image_file_bytes);
    tcase_add_test(tc, limit_json_file_bytes);
    tcase_add_test(tc, limit_safetensors);
    tcase_add_test(tc, limit_model_params);
    tcase_add_test(tc, limit_trace);
    tcase_add_test(tc, limit_data);
    tcase_add_test(tc, limit_data_line_without_newline);
    suite_add_tcase(s, tc);
    return s;
}
