// test_model.c — safetensors parsing and writing, dtype conversions, model init/save/load
// and the validation pass that names every missing or misshapen tensor.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nm_fileutil.h"
#include "nm_model.h"
#include "nm_safetensors.h"
#include "test_util.h"

// Every finite f16 value survives f16 -> f32 -> f16 exactly; f32 -> f16 rounds to nearest even.
START_TEST(test_f16_conversion) {
    for (uint32_t h = 0; h < 65536; h++) {
        float f = nm_f16_to_f32((uint16_t)h);
        if (isnan(f)) continue;
        ck_assert_msg(nm_f32_to_f16(f) == h, "f16 0x%04x -> %g -> 0x%04x", h, f, nm_f32_to_f16(f));
    }
    ck_assert(nm_f16_to_f32(0x3c00) == 1.0f);
    ck_assert(nm_f16_to_f32(0x0001) == ldexpf(1.0f, -24)); // smallest subnormal
    ck_assert(nm_f32_to_f16(1.0f + ldexpf(1.0f, -11)) == 0x3c00); // halfway: to even
    ck_assert(nm_f32_to_f16(1.0f + 3 * ldexpf(1.0f, -11)) == 0x3c02);
    ck_assert(nm_f32_to_f16(1e6f) == 0x7c00); // overflow -> inf
    ck_assert(nm_f32_to_f16(-1e-9f) == 0x8000);
}
END_TEST

START_TEST(test_bf16_conversion) {
    ck_assert(nm_f32_to_bf16(1.0f) == 0x3f80);
    ck_assert(nm_bf16_to_f32(0x3f80) == 1.0f);
    float halfway = nm_bf16_to_f32(0x3f80) + ldexpf(1.0f, -8); // between 0x3f80 and 0x3f81
    ck_assert(nm_f32_to_bf16(halfway) == 0x3f80);             // ties to even
    float above = nm_bf16_to_f32(0x3f81) + ldexpf(1.0f, -8);  // between 0x3f81 and 0x3f82
    ck_assert(nm_f32_to_bf16(above) == 0x3f82);
    ck_assert(isnan(nm_bf16_to_f32(nm_f32_to_bf16(NAN))));
    nm_test_rng r = {4};
    for (int i = 0; i < 10000; i++) {
        float f = (float)(nm_test_rng_normal(&r) * 100);
        float b = nm_bf16_to_f32(nm_f32_to_bf16(f));
        ck_assert(fabsf(b - f) <= fabsf(f) * 0x1p-8f);
    }
}
END_TEST

START_TEST(test_safetensors_roundtrip) {
    char *dir = nm_test_tmpdir();
    const char *path = nm_test_path(dir, "t.safetensors");
    nm_test_rng r = {8};
    float a[24], b[5];
    nm_test_fill_normal(&r, a, 24, 1.0f);
    nm_test_fill_normal(&r, b, 5, 1.0f);
    nm_st_write_tensor ws[3] = {{"a", NM_DT_F32, 3, {2, 3, 4}, a}, {"b16", NM_DT_BF16, 1, {5}, b}, {"h", NM_DT_F16, 1, {5}, b}};
    nm_error err;
    ck_assert_int_eq(nm_safetensors_write(path, ws, 3, &err), NM_OK);
    nm_safetensors st;
    ck_assert_msg(nm_safetensors_open(&st, path, &err) == NM_OK, "%s", err.msg);
    ck_assert_int_eq(st.n_tensors, 3);
    const nm_st_tensor *ta = nm_safetensors_find(&st, "a"), *tb = nm_safetensors_find(&st, "b16"),
                       *th = nm_safetensors_find(&st, "h");
    ck_assert(ta && tb && th);
    ck_assert_int_eq(ta->ndim, 3);
    ck_assert_int_eq(ta->shape[2], 4);
    ck_assert_int_eq((long)((st.data - (const uint8_t *)st.map) % 8), 0); // data 8-byte aligned
    float got[24];
    ck_assert_int_eq(nm_st_tensor_to_f32(got, ta, &err), NM_OK);
    ck_assert(memcmp(got, a, sizeof a) == 0);
    ck_assert_int_eq(nm_st_tensor_to_f32(got, tb, &err), NM_OK);
    for (int i = 0; i < 5; i++) ck_assert(got[i] == nm_bf16_to_f32(nm_f32_to_bf16(b[i])));
    ck_assert_int_eq(nm_st_tensor_to_f32(got, th, &err), NM_OK);
    for (int i = 0; i < 5; i++) ck_assert(got[i] == nm_f16_to_f32(nm_f32_to_f16(b[i])));
    ck_assert_ptr_null(nm_safetensors_find(&st, "__metadata__"));
    nm_safetensors_close(&st);
    ck_assert(!nm_path_exists(nm_test_path(dir, "t.safetensors.tmp")));
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

// Builds a safetensors buffer from a header text and a data size.
static uint8_t *make_st(const char *header, size_t data, size_t *size) {
    size_t hl = strlen(header);
    *size = 8 + hl + data;
    uint8_t *buf = calloc(1, *size);
    for (int i = 0; i < 8; i++) buf[i] = (uint8_t)((uint64_t)hl >> (8 * i));
    memcpy(buf + 8, header, hl);
    for (size_t i = 0; i < data; i++) buf[8 + hl + i] = (uint8_t)(i * 37 + 1);
    return buf;
}

typedef struct { const char *header; size_t data; nm_status code; const char *msg; } st_case;
static const st_case ST_CASES[] = {
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 8, NM_ERR_FORMAT, "past the end"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 16, NM_ERR_FORMAT, "overlap"},
    {"{\"a\":{\"dtype\":\"F8_E9\",\"shape\":[2],\"data_offsets\":[0,2]}}", 2, NM_ERR_UNSUPPORTED, "unknown dtype"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 8, NM_ERR_FORMAT, "need 12"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4, NM_ERR_FORMAT, "non-negative"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", 8, NM_ERR_FORMAT, "invalid data_offsets"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[4611686018427387904,8],\"data_offsets\":[0,4]}}", 4, NM_ERR_LIMIT, "overflow"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, NM_ERR_FORMAT, "JSON"},
    {"not json at all", 0, NM_ERR_FORMAT, "not valid JSON"},
    {"[1,2,3]", 0, NM_ERR_FORMAT, "not a JSON object"},
    {"{\"a\":{\"dtype\":\"F32\"}}", 0, NM_ERR_FORMAT, "needs string"},
};

START_TEST(test_safetensors_malformed) {
    const st_case *c = &ST_CASES[_i];
    size_t size;
    uint8_t *buf = make_st(c->header, c->data, &size);
    nm_safetensors st;
    nm_error err = {0};
    nm_status s = nm_safetensors_parse(&st, buf, size, "bad.safetensors", &err);
    ck_assert_msg(s == c->code, "case %d: status %d (%s), expected %d", _i, s, err.msg, c->code);
    ck_assert_msg(strstr(err.msg, c->msg) && strstr(err.msg, "bad.safetensors"), "case %d message: %s", _i, err.msg);
    ck_assert_ptr_null(st.tensors);
    free(buf);
}
END_TEST

START_TEST(test_safetensors_header_lies) {
    nm_safetensors st;
    nm_error err;
    uint8_t small[4] = {1, 2, 3, 4};
    ck_assert_int_eq(nm_safetensors_parse(&st, small, 4, "x", &err), NM_ERR_FORMAT); // shorter than 8
    uint8_t hdr[16] = {0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, '{', '}'};                // 4 GiB header claim
    ck_assert_int_eq(nm_safetensors_parse(&st, hdr, 16, "x", &err), NM_ERR_LIMIT);
    uint8_t past[16] = {100, 0, 0, 0, 0, 0, 0, 0, '{', '}'};                          // 100 bytes claimed, 8 present
    ck_assert_int_eq(nm_safetensors_parse(&st, past, 16, "x", &err), NM_ERR_FORMAT);
    ck_assert_ptr_nonnull(strstr(err.msg, "past the end"));
    ck_assert_int_eq(nm_safetensors_open(&st, "/nonexistent/m.safetensors", &err), NM_ERR_IO);
    ck_assert_ptr_nonnull(strstr(err.msg, "/nonexistent/m.safetensors"));
}
END_TEST

static nm_config cfg_small(void) {
    nm_config c = {0};
    c.format_version = 1;
    c.hidden_size = 16;
    c.num_layers = 2;
    c.num_heads = 2;
    c.num_kv_heads = 1;
    c.head_dim = 8;
    c.vocab_size = 261;
    c.max_positions = 64;
    c.rope_theta = 10000;
    c.rms_norm_eps = 1e-6;
    c.moe = (nm_moe_config){4, 4, 2, 8, 8, NM_NULL_ZERO};
    c.has_vision = 1;
    c.image_size = 8;
    c.patch_size = 4;
    c.channels = 3;
    c.tok = (nm_tokenizer_config){256, 257, 258, 259, 260};
    return c;
}

START_TEST(test_model_init_save_load) {
    nm_config c = cfg_small();
    nm_model a, b, a2;
    nm_error err;
    ck_assert_int_eq(nm_model_init_random(&a, &c, 42, &err), NM_OK);
    ck_assert_int_eq(nm_model_init_random(&a2, &c, 42, &err), NM_OK);
    ck_assert(memcmp(a.embed, a2.embed, 261 * 16 * sizeof(float)) == 0);
    ck_assert(memcmp(a.layers[1].moe.router, a2.layers[1].moe.router, 5 * 16 * sizeof(float)) == 0);
    nm_model_free(&a2);
    ck_assert_int_eq(nm_model_init_random(&a2, &c, 43, &err), NM_OK);
    ck_assert(memcmp(a.layers[1].moe.router, a2.layers[1].moe.router, 5 * 16 * sizeof(float)) != 0); // seed matters
    nm_model_free(&a2);
    char *dir = nm_test_tmpdir();
    const char *mdir = nm_test_path(dir, "m");
    for (int dt = 0; dt < 3; dt++) {
        nm_dtype d = dt == 0 ? NM_DT_F32 : dt == 1 ? NM_DT_BF16 : NM_DT_F16;
        ck_assert_int_eq(nm_model_save(&a, mdir, d, &err), NM_OK);
        ck_assert_msg(nm_model_load(&b, mdir, &err) == NM_OK, "%s", err.msg);
        ck_assert_int_eq(b.file_dtype, d);
        ck_assert_int_eq(b.n_params, a.n_params);
        ck_assert_int_eq(b.cfg.moe.null_copies, 4);
        ck_assert_int_eq(b.cfg.tok.image_end, 259);
        const float *x = a.layers[1].moe.down, *y = b.layers[1].moe.down;
        for (int i = 0; i < 4 * 16 * 8; i++) {
            float want = d == NM_DT_F32 ? x[i] : d == NM_DT_BF16 ? nm_bf16_to_f32(nm_f32_to_bf16(x[i]))
                                                                  : nm_f16_to_f32(nm_f32_to_f16(x[i]));
            ck_assert(y[i] == want);
        }
        nm_model_free(&b);
    }
    nm_model_free(&a);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

// The validation pass names every problem at once: a missing tensor, a misshapen one and an
// unexpected one.
START_TEST(test_model_validation_lists_all) {
    nm_config c = cfg_small();
    nm_model a;
    nm_error err;
    ck_assert_int_eq(nm_model_init_random(&a, &c, 1, &err), NM_OK);
    char *dir = nm_test_tmpdir();
    ck_assert_int_eq(nm_model_save(&a, dir, NM_DT_F32, &err), NM_OK);
    // rewrite the tensors with one dropped, one misshapen, one extra
    nm_tensor_spec specs[128];
    int n = nm_model_tensor_specs(&a, specs);
    nm_st_write_tensor ws[128];
    int m = 0;
    float extra[3] = {1, 2, 3};
    for (int i = 0; i < n; i++) {
        if (!strcmp(specs[i].name, "layers.1.attn.k_proj.weight")) continue;
        ws[m] = (nm_st_write_tensor){specs[i].name, NM_DT_F32, specs[i].ndim, {specs[i].shape[0], specs[i].shape[1], specs[i].shape[2]}, *specs[i].dest};
        if (!strcmp(specs[i].name, "layers.0.moe.router.weight")) ws[m].shape[0] = 4; // N instead of N+1
        m++;
    }
    ws[m++] = (nm_st_write_tensor){"mystery.weight", NM_DT_F32, 1, {3}, extra};
    const char *st = nm_test_path(dir, "model.safetensors");
    ck_assert_int_eq(nm_safetensors_write(st, ws, m, &err), NM_OK);
    nm_model b;
    ck_assert_int_eq(nm_model_load(&b, dir, &err), NM_ERR_INVALID);
    ck_assert_msg(strstr(err.msg, "3 problems"), "%s", err.msg);
    ck_assert_msg(strstr(err.msg, "missing tensor layers.1.attn.k_proj.weight"), "%s", err.msg);
    ck_assert_msg(strstr(err.msg, "layers.0.moe.router.weight has shape [4, 16], config needs [5, 16]"), "%s", err.msg);
    ck_assert_msg(strstr(err.msg, "unexpected tensor mystery.weight"), "%s", err.msg);
    ck_assert_ptr_null(b.arena);
    nm_model_free(&a);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

typedef struct { const char *edit_from, *edit_to, *msg; } cfg_case;
static const cfg_case CFG_CASES[] = {
    {"\"num_layers\": 2,", "", "missing key \"num_layers\""},
    {"\"top_k\": 2", "\"top_k\": 9", "top_k = 9 must be in 1..N+M = 8"},
    {"\"null_kind\": \"zero\"", "\"null_kind\": \"banana\"", "null_kind"},
    {"\"num_kv_heads\": 1", "\"num_kv_heads\": 3", "must divide"},
    {"\"channels\": 3", "\"channels\": 4", "channels"},
    {"\"eos\": 257", "\"eos\": 300", "tokenizer.eos"},
    {"\"hidden_size\": 16", "\"hidden_size\": \"16\"", "must be an integer"},
    {"\"image_size\": 8", "\"image_size\": 10", "multiple of patch_size"},
    {"{", "{{", "invalid JSON"},
};

START_TEST(test_config_errors) {
    nm_config c = cfg_small(), parsed;
    char *json = nm_config_to_json(&c);
    nm_error err;
    ck_assert_int_eq(nm_config_parse(&parsed, json, "ok.json", &err), NM_OK);
    ck_assert(parsed.hidden_size == 16 && parsed.moe.top_k == 2 && parsed.has_vision && parsed.rms_norm_eps == 1e-6);
    const cfg_case *k = &CFG_CASES[_i];
    char *at = strstr(json, k->edit_from);
    ck_assert_msg(at != NULL, "edit target %s not in %s", k->edit_from, json);
    size_t n = strlen(json) + strlen(k->edit_to) + 1;
    char *edited = malloc(n);
    snprintf(edited, n, "%.*s%s%s", (int)(at - json), json, k->edit_to, at + strlen(k->edit_from));
    ck_assert_int_ne(nm_config_parse(&parsed, edited, "bad.json", &err), NM_OK);
    ck_assert_msg(strstr(err.msg, k->msg) && strstr(err.msg, "bad.json"), "case %d: %s", _i, err.msg);
    free(edited);
    free(json);
}
END_TEST

NM_TEST_SUITE(model) {
    Suite *s = suite_create("model");
    TCase *tc = tcase_create("safetensors");
    tcase_add_test(tc, test_f16_conversion);
    tcase_add_test(tc, test_bf16_conversion);
    tcase_add_test(tc, test_safetensors_roundtrip);
    tcase_add_loop_test(tc, test_safetensors_malformed, 0, (int)(sizeof ST_CASES / sizeof ST_CASES[0]));
    tcase_add_test(tc, test_safetensors_header_lies);
    suite_add_tcase(s, tc);
    TCase *tm = tcase_create("model");
    tcase_add_test(tm, test_model_init_save_load);
    tcase_add_test(tm, test_model_validation_lists_all);
    tcase_add_loop_test(tm, test_config_errors, 0, (int)(sizeof CFG_CASES / sizeof CFG_CASES[0]));
    suite_add_tcase(s, tm);
    return s;
}
