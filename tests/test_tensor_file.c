// test_tensor_file.c — float32 tensor files (nm_tensor_file.h): the exact bytes of the Hugging
// Face writer, a round trip of random tensors with the layout parsed independently, the read
// errors, argument errors, and atomicity (an existing file survives a failed write).
#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "nm_fileutil.h"
#include "nm_safetensors.h"
#include "nm_tensor_file.h"
#include "test_util.h"

// The file safetensors' `serialize` writes for one F32 tensor of values 0..5 named `name` (its
// own test vectors: test_serialization, test_serialization_forced_alignement): header length
// 64 for "attn.0" [1,2,3], 72 for "attn0" [1,1,2,3] (7 spaces of padding).
static void check_hf_bytes(const char *dir, const char *name, int ndim, const int64_t *shape, const char *json,
                           uint64_t hlen) {
    const float vals[6] = {0, 1, 2, 3, 4, 5};
    const char *names[1] = {name};
    const int ndims[1] = {ndim};
    const int64_t *shapes[1] = {shape};
    const float *data[1] = {vals};
    const char *path = nm_test_path(dir, "hf.safetensors");
    nm_error err = {0};
    ck_assert_msg(nm_tensor_file_write(path, 1, names, ndims, shapes, data, NULL, &err) == NM_OK, "%s", err.msg);
    uint8_t want[256] = {0};
    for (int i = 0; i < 8; i++) want[i] = (uint8_t)(hlen >> (8 * i));
    memset(want + 8, ' ', hlen);
    memcpy(want + 8, json, strlen(json));
    memcpy(want + 8 + hlen, vals, sizeof vals);
    size_t size;
    char *got = nm_test_read_file(path, &size);
    ck_assert_uint_eq(size, 8 + hlen + sizeof vals);
    ck_assert_msg(memcmp(got, want, size) == 0, "%s: bytes differ from the safetensors writer's", name);
    free(got);
}

START_TEST(test_hf_bytes) {
    char *dir = nm_test_tmpdir();
    const int64_t s3[3] = {1, 2, 3}, s4[4] = {1, 1, 2, 3};
    check_hf_bytes(dir, "attn.0", 3, s3, "{\"attn.0\":{\"dtype\":\"F32\",\"shape\":[1,2,3],\"data_offsets\":[0,24]}}", 64);
    check_hf_bytes(dir, "attn0", 4, s4, "{\"attn0\":{\"dtype\":\"F32\",\"shape\":[1,1,2,3],\"data_offsets\":[0,24]}}", 72);
    // no tensors (safetensors' test_empty): "{}" and 6 spaces; with metadata, 35 bytes + 5 spaces
    nm_error err = {0};
    const char *path = nm_test_path(dir, "empty.safetensors");
    ck_assert_msg(nm_tensor_file_write(path, 0, NULL, NULL, NULL, NULL, NULL, &err) == NM_OK, "%s", err.msg);
    size_t size;
    char *got = nm_test_read_file(path, &size);
    ck_assert_uint_eq(size, 16);
    ck_assert(memcmp(got, "\x08\0\0\0\0\0\0\0{}      ", 16) == 0);
    free(got);
    ck_assert_msg(nm_tensor_file_write(path, 0, NULL, NULL, NULL, NULL, "{\"framework\": \"pt\"}", &err) == NM_OK, "%s",
                  err.msg);
    got = nm_test_read_file(path, &size);
    ck_assert_uint_eq(size, 48);
    ck_assert(memcmp(got, "\x28\0\0\0\0\0\0\0{\"__metadata__\":{\"framework\":\"pt\"}}     ", 48) == 0);
    free(got);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

enum { NT = 7 };
// Names in no particular order: capitals sort before lower case, '.' (0x2e) before digits and
// letters, a UTF-8 name after all ASCII; a scalar and an empty tensor.
static const char *RT_NAMES[NT] = {"layers.1.attn.q_proj.weight", "b", "a.bias", "Zeta", "\xc3\xa9t\xc3\xa9", "scalar", "empty"};
static const int RT_NDIM[NT] = {2, 1, 1, 3, 4, 0, 2};
static const int64_t RT_SHAPES[NT][4] = {{12, 5}, {7}, {3}, {2, 3, 4}, {1, 2, 1, 3}, {0}, {0, 3}};
static const char *RT_SORTED[NT] = {"Zeta", "a.bias", "b", "empty", "layers.1.attn.q_proj.weight", "scalar", "\xc3\xa9t\xc3\xa9"};

static int64_t numel_of(int i) {
    int64_t n = 1;
    for (int d = 0; d < RT_NDIM[i]; d++) n *= RT_SHAPES[i][d];
    return n;
}

static int index_of(const char *name) {
    for (int i = 0; i < NT; i++)
        if (strcmp(RT_NAMES[i], name) == 0) return i;
    return -1;
}

START_TEST(test_roundtrip_and_layout) {
    char *dir = nm_test_tmpdir();
    const char *path = nm_test_path(dir, "state.safetensors");
    nm_test_rng r = {401};
    float *vals[NT], *back[NT];
    const int64_t *shapes[NT];
    int64_t numel[NT];
    for (int i = 0; i < NT; i++) {
        numel[i] = numel_of(i);
        shapes[i] = RT_SHAPES[i];
        vals[i] = malloc((size_t)(numel[i] ? numel[i] : 1) * sizeof(float));
        back[i] = malloc((size_t)(numel[i] ? numel[i] : 1) * sizeof(float));
        ck_assert(vals[i] && back[i]);
        nm_test_fill_normal(&r, vals[i], (size_t)numel[i], 1.0f + (float)i);
        for (int64_t j = 0; j < numel[i]; j++) back[i][j] = NAN;
    }
    vals[1][0] = -0.0f; // bits, not values, must survive
    vals[1][1] = INFINITY;
    nm_error err = {0};
    const char *meta = "{\"step\":\"1200\",\"format\":\"nullmap-optim\",\"note\":\"caf\\u00e9 \\\"x\\\"\"}";
    ck_assert_msg(nm_tensor_file_write(path, NT, RT_NAMES, RT_NDIM, shapes, (const float *const *)vals, meta, &err) == NM_OK,
                  "%s", err.msg);
    ck_assert_msg(nm_tensor_file_read(path, NT, RT_NAMES, numel, back, &err) == NM_OK, "%s", err.msg);
    for (int i = 0; i < NT; i++)
        ck_assert_msg(memcmp(vals[i], back[i], (size_t)numel[i] * sizeof(float)) == 0, "%s differs", RT_NAMES[i]);
    // a subset, in another order
    const char *sub[2] = {"b", "Zeta"};
    const int64_t subn[2] = {7, 24};
    float b7[7], z24[24];
    float *subd[2] = {b7, z24};
    ck_assert_msg(nm_tensor_file_read(path, 2, sub, subn, subd, &err) == NM_OK, "%s", err.msg);
    ck_assert(memcmp(b7, vals[1], sizeof b7) == 0 && memcmp(z24, vals[3], sizeof z24) == 0);
    char *mj = NULL;
    ck_assert_msg(nm_tensor_file_metadata(path, &mj, &err) == NM_OK, "%s", err.msg);
    ck_assert_str_eq(mj, "{\"format\":\"nullmap-optim\",\"note\":\"caf\xc3\xa9 \\\"x\\\"\",\"step\":\"1200\"}");
    free(mj);

    // The layout, parsed here with jansson rather than through nm_safetensors.
    size_t size;
    uint8_t *f = (uint8_t *)nm_test_read_file(path, &size);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | f[i];
    ck_assert_msg(hlen % 8 == 0 && 8 + hlen <= size, "header length %llu", (unsigned long long)hlen);
    size_t text_len = hlen;
    while (text_len > 0 && f[8 + text_len - 1] == ' ') text_len--; // the padding is spaces
    ck_assert_uint_lt(hlen - text_len, 8);
    ck_assert_int_eq(f[8 + text_len - 1], '}');
    json_error_t jerr;
    json_t *h = json_loadb((const char *)f + 8, hlen, JSON_REJECT_DUPLICATES, &jerr);
    ck_assert_msg(h != NULL, "header is not JSON: %s", jerr.text);
    ck_assert(json_is_object(h) && json_object_size(h) == NT + 1);
    // key order in the text: __metadata__, then the names in byte order
    const char *prev_pos = NULL;
    for (int k = -1; k < NT; k++) {
        char quoted[128];
        snprintf(quoted, sizeof quoted, "\"%s\":{", k < 0 ? "__metadata__" : RT_SORTED[k]);
        const char *pos = strstr((const char *)f + 8, quoted);
        ck_assert_msg(pos && pos < (const char *)f + 8 + hlen && (!prev_pos || pos > prev_pos), "%s out of order", quoted);
        prev_pos = pos;
    }
    ck_assert_int_eq(memcmp(f + 8, "{\"__metadata__\":{\"format\":\"nullmap-optim\",", 42), 0);
    // data packed in the same order from offset 0 to the end of the file
    uint64_t pos = 0;
    for (int k = 0; k < NT; k++) {
        json_t *e = json_object_get(h, RT_SORTED[k]);
        const int i = index_of(RT_SORTED[k]);
        ck_assert(e && i >= 0 && json_object_size(e) == 3);
        ck_assert_str_eq(json_string_value(json_object_get(e, "dtype")), "F32");
        json_t *sh = json_object_get(e, "shape"), *off = json_object_get(e, "data_offsets");
        ck_assert_int_eq((int)json_array_size(sh), RT_NDIM[i]);
        for (int d = 0; d < RT_NDIM[i]; d++) ck_assert_int_eq(json_integer_value(json_array_get(sh, d)), RT_SHAPES[i][d]);
        const uint64_t b = (uint64_t)json_integer_value(json_array_get(off, 0)), e2 = (uint64_t)json_integer_value(json_array_get(off, 1));
        ck_assert_msg(b == pos && e2 - b == (uint64_t)numel[i] * 4, "%s at [%llu, %llu)", RT_SORTED[k],
                      (unsigned long long)b, (unsigned long long)e2);
        ck_assert(memcmp(f + 8 + hlen + b, vals[i], (size_t)numel[i] * 4) == 0);
        pos = e2;
    }
    ck_assert_uint_eq(8 + hlen + pos, size);
    json_decref(h);
    free(f);
    for (int i = 0; i < NT; i++) {
        free(vals[i]);
        free(back[i]);
    }
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

// Names of leftover temporary files in dir (".tmp-"), 0 when none.
static int count_tmp_files(const char *dir) {
    DIR *d = opendir(dir);
    ck_assert_ptr_nonnull(d);
    int n = 0;
    for (struct dirent *e; (e = readdir(d));) n += strstr(e->d_name, ".tmp-") != NULL;
    closedir(d);
    return n;
}

static void write_small(const char *path, float first) {
    const float v[4] = {first, 2, 3, 4};
    const char *names[2] = {"x", "y"};
    const int nd[2] = {1, 2};
    const int64_t sx[1] = {1}, sy[2] = {3, 1};
    const int64_t *shapes[2] = {sx, sy};
    const float *data[2] = {v, v + 1};
    nm_error err = {0};
    ck_assert_msg(nm_tensor_file_write(path, 2, names, nd, shapes, data, "{\"step\":\"3\"}", &err) == NM_OK, "%s",
                  err.msg);
}

START_TEST(test_read_errors) {
    char *dir = nm_test_tmpdir();
    const char *path = nm_test_path(dir, "s.safetensors");
    write_small(path, 1.5f);
    nm_error err = {0};
    float x[1] = {-7}, y[3] = {-7, -7, -7};
    float *dst[2] = {x, y};
    // missing: the message names the file and the tensor; no buffer is touched
    const char *miss[2] = {"x", "m.y"};
    const int64_t n13[2] = {1, 3};
    ck_assert_int_eq(nm_tensor_file_read(path, 2, miss, n13, dst, &err), NM_ERR_FORMAT);
    ck_assert_msg(strstr(err.msg, path) && strstr(err.msg, "\"m.y\"") && strstr(err.msg, "missing"), "%s", err.msg);
    ck_assert(x[0] == -7);
    // wrong size
    const char *ok[2] = {"x", "y"};
    const int64_t n14[2] = {1, 4};
    ck_assert_int_eq(nm_tensor_file_read(path, 2, ok, n14, dst, &err), NM_ERR_INVALID);
    ck_assert_msg(strstr(err.msg, path) && strstr(err.msg, "\"y\"") && strstr(err.msg, "3 elements"), "%s", err.msg);
    ck_assert(x[0] == -7 && y[0] == -7);
    ck_assert_int_eq(nm_tensor_file_read(path, 2, ok, n13, dst, &err), NM_OK);
    ck_assert(x[0] == 1.5f && y[2] == 4);
    // not F32: a BF16 file from the model writer
    const char *p16 = nm_test_path(dir, "bf16.safetensors");
    nm_st_write_tensor wt = {.name = "x", .dtype = NM_DT_BF16, .ndim = 1, .shape = {1}, .values = x};
    ck_assert_int_eq(nm_safetensors_write(p16, &wt, 1, &err), NM_OK);
    ck_assert_int_eq(nm_tensor_file_read(p16, 1, ok, n13, dst, &err), NM_ERR_UNSUPPORTED);
    ck_assert_msg(strstr(err.msg, p16) && strstr(err.msg, "\"x\"") && strstr(err.msg, "BF16"), "%s", err.msg);
    // truncated: one byte short, and cut inside the header
    size_t size;
    char *bytes = nm_test_read_file(path, &size);
    const char *pt = nm_test_path(dir, "cut.safetensors");
    const size_t cuts[3] = {size - 1, 20, 5};
    for (int k = 0; k < 3; k++) {
        ck_assert_int_eq(nm_test_write_file(pt, bytes, cuts[k]), 0);
        nm_error_clear(&err);
        ck_assert_int_eq(nm_tensor_file_read(pt, 2, ok, n13, dst, &err), NM_ERR_FORMAT);
        ck_assert_msg(strstr(err.msg, pt) != NULL, "cut at %zu: %s", cuts[k], err.msg);
        char *mj = (char *)1;
        ck_assert_int_eq(nm_tensor_file_metadata(pt, &mj, &err), NM_ERR_FORMAT);
        ck_assert_ptr_null(mj);
    }
    free(bytes);
    ck_assert_int_eq(nm_tensor_file_read(nm_test_path(dir, "none"), 2, ok, n13, dst, &err), NM_ERR_IO);
    // a file without metadata reads as {}
    const char *pe = nm_test_path(dir, "nometa.safetensors");
    ck_assert_int_eq(nm_tensor_file_write(pe, 0, NULL, NULL, NULL, NULL, NULL, &err), NM_OK);
    char *mj = NULL;
    ck_assert_int_eq(nm_tensor_file_metadata(pe, &mj, &err), NM_OK);
    ck_assert_str_eq(mj, "{}");
    free(mj);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(test_write_argument_errors) {
    char *dir = nm_test_tmpdir();
    const char *path = nm_test_path(dir, "w.safetensors");
    const float v[6] = {1, 2, 3, 4, 5, 6};
    const int64_t s2[1] = {2}, sneg[2] = {2, -1};
    static const struct { const char *a, *b, *meta; int nd_b; int neg; const char *needle; } cases[] = {
        {"a", "a", NULL, 1, 0, "twice"},
        {"a", "__metadata__", NULL, 1, 0, "reserved"},
        {"a", "", NULL, 1, 0, "no name"},
        {"a", "\xff\xfe", NULL, 1, 0, "UTF-8"},
        {"a", "b", NULL, 9, 0, "dimensions"},
        {"a", "b", NULL, 2, 1, "negative"},
        {"a", "b", "[\"x\"]", 1, 0, "object"},
        {"a", "b", "{\"step\": 3}", 1, 0, "not a string"},
        {"a", "b", "{\"step\": ", 1, 0, "not valid JSON"},
        {"a", "b", "{\"k\":\"1\",\"k\":\"2\"}", 1, 0, "not valid JSON"},
    };
    nm_error err = {0};
    const int64_t s9[9] = {1, 1, 1, 1, 1, 1, 1, 1, 1};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *names[2] = {cases[i].a, cases[i].b};
        const int nd[2] = {1, cases[i].nd_b};
        const int64_t *shapes[2] = {s2, cases[i].neg ? sneg : cases[i].nd_b == 9 ? s9 : s2};
        const float *data[2] = {v, v + 2};
        nm_error_clear(&err);
        ck_assert_msg(nm_tensor_file_write(path, 2, names, nd, shapes, data, cases[i].meta, &err) == NM_ERR_INVALID,
                      "case %zu accepted", i);
        ck_assert_msg(strstr(err.msg, cases[i].needle) && strstr(err.msg, path), "case %zu: \"%s\" lacks \"%s\"", i,
                      err.msg, cases[i].needle);
        ck_assert(!nm_path_exists(path));
    }
    ck_assert_int_eq(count_tmp_files(dir), 0);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

static int file_equals(const char *path, const char *bytes, size_t size) {
    size_t n;
    char *now = nm_test_read_file(path, &n);
    int same = n == size && memcmp(now, bytes, size) == 0;
    free(now);
    return same;
}

START_TEST(test_atomic) {
    char *dir = nm_test_tmpdir();
    const char *path = nm_test_path(dir, "ckpt.safetensors");
    write_small(path, 1.0f);
    size_t size;
    char *old = nm_test_read_file(path, &size);
    nm_error err = {0};
    const char *names[1] = {"big"};
    const int nd[1] = {1};
    enum { BIG = 100000 };
    const int64_t sbig[1] = {BIG};
    const int64_t *shapes[1] = {sbig};
    float *big = malloc(BIG * sizeof *big);
    ck_assert_ptr_nonnull(big);
    nm_test_rng r = {402};
    nm_test_fill_normal(&r, big, BIG, 1.0f);
    const float *data[1] = {big};

    // 1. the directory does not exist: an I/O error naming the path
    const char *nodir = nm_test_path(dir, "missing/sub/ckpt.safetensors");
    ck_assert_int_eq(nm_tensor_file_write(nodir, 1, names, nd, shapes, data, NULL, &err), NM_ERR_IO);
    ck_assert_msg(strstr(err.msg, nodir) != NULL, "%s", err.msg);

    // 2. the path is a directory: the rename fails, the directory and its contents stay
    const char *sub = nm_test_path(dir, "adir");
    ck_assert_int_eq(mkdir(sub, 0755), 0);
    ck_assert_int_eq(nm_test_write_file(nm_test_path(sub, "keep"), "k", 1), 0);
    ck_assert_int_eq(nm_tensor_file_write(sub, 1, names, nd, shapes, data, NULL, &err), NM_ERR_IO);
    ck_assert(nm_is_dir(sub) && nm_path_exists(nm_test_path(sub, "keep")));

    // 3. the disk fills up half-way (a file size limit, in a child process): the write fails,
    //    the old checkpoint is untouched and no temporary file is left
    fflush(NULL);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        signal(SIGXFSZ, SIG_IGN); // write() then fails with EFBIG instead of killing us
        struct rlimit rl = {64 * 1024, 64 * 1024};
        int code = setrlimit(RLIMIT_FSIZE, &rl) != 0 ? 10 : 0;
        nm_error cerr = {0};
        nm_status s = nm_tensor_file_write(path, 1, names, nd, shapes, data, NULL, &cerr);
        if (!code && s != NM_ERR_IO) code = 11;
        if (!code && !strstr(cerr.msg, "write failed")) code = 12;
        _exit(code);
    }
    int status = 0;
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child status %d", status);
    ck_assert_msg(file_equals(path, old, size), "the existing file changed after a failed write");
    ck_assert_int_eq(count_tmp_files(dir), 0);

    // 4. a successful write replaces it as a whole
    ck_assert_int_eq(nm_tensor_file_write(path, 1, names, nd, shapes, data, NULL, &err), NM_OK);
    float *back = malloc(BIG * sizeof *back);
    ck_assert_ptr_nonnull(back);
    const int64_t nb[1] = {BIG};
    ck_assert_int_eq(nm_tensor_file_read(path, 1, names, nb, &back, &err), NM_OK);
    ck_assert(memcmp(back, big, BIG * sizeof *big) == 0);
    const char *gone[1] = {"x"};
    const int64_t n1[1] = {1};
    float x;
    float *px = &x;
    ck_assert_int_eq(nm_tensor_file_read(path, 1, gone, n1, &px, &err), NM_ERR_FORMAT);
    ck_assert_int_eq(count_tmp_files(dir), 0);
    free(back);
    free(big);
    free(old);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

NM_TEST_SUITE(tensor_file) {
    Suite *s = suite_create("tensor_file");
    TCase *tc = tcase_create("tensor_file");
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, test_hf_bytes);
    tcase_add_test(tc, test_roundtrip_and_layout);
    tcase_add_test(tc, test_read_errors);
    tcase_add_test(tc, test_write_argument_errors);
    tcase_add_test(tc, test_atomic);
    suite_add_tcase(s, tc);
    return s;
}
