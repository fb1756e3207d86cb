// test_data.c — the synthetic VLM data set (lib/nm_data.c): `nullmap data` generation and the
// trainer's reader.
//
// Small data sets are generated into fresh temporary directories. Answers are checked against
// the recorded ground truth and the ground truth against the decoded pixels (nm_image_load):
// the named colour sits at a shape's bbox centre, bar heights are exact columns of the bar's
// colour, no object colour appears outside the object boxes. Reproducibility is byte-exact.
#include <dirent.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "nm_data.h"
#include "nm_image.h"
#include "test_util.h"

// ---------------------------------------------------------------------------------------------
// Helpers

static char *slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    ck_assert_msg(f != NULL, "cannot open %s", path);
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    rewind(f);
    char *p = malloc((size_t)len + 1);
    ck_assert_ptr_nonnull(p);
    ck_assert_uint_eq(fread(p, 1, (size_t)len, f), (size_t)len);
    p[len] = '\0';
    fclose(f);
    if (n) *n = (size_t)len;
    return p;
}

static void generate(const char *dir, int n_train, int n_eval, uint64_t seed, int size) {
    nm_error err = {0};
    nm_status st = nm_data_generate(dir, n_train, n_eval, seed, size, 0, NULL, NULL, &err);
    ck_assert_msg(st == NM_OK, "generate %s: %s", dir, err.msg);
}

// Parses DIR/<split>.jsonl into a JSON array of records.
static json_t *load_lines(const char *dir, const char *split) {
    char name[32];
    snprintf(name, sizeof name, "%s.jsonl", split);
    char *text = slurp(nm_test_path(dir, name), NULL);
    json_t *arr = json_array();
    char *save = NULL;
    int lineno = 0;
    for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        json_error_t je;
        json_t *j = json_loads(line, JSON_REJECT_DUPLICATES, &je);
        ck_assert_msg(j != NULL, "%s line %d: %s", name, ++lineno, je.text);
        json_array_append_new(arr, j);
    }
    free(text);
    return arr;
}

static const char *sget(json_t *o, const char *k) {
    json_t *v = json_object_get(o, k);
    ck_assert_msg(json_is_string(v), "field %s missing or not a string", k);
    return json_string_value(v);
}

static const uint8_t *colour_rgb(const char *name) {
    for (int i = 0; i < NM_DATA_N_COLOURS; i++)
        if (!strcmp(nm_data_colours[i].name, name)) return nm_data_colours[i].rgb;
    ck_abort_msg("unknown colour name '%s'", name);
    return NULL;
}

static int near(const uint8_t *px, const uint8_t *c, int tol) {
    for (int k = 0; k < 3; k++)
        if (abs((int)px[k] - (int)c[k]) > tol) return 0;
    return 1;
}

static void bbox_of(json_t *obj, int b[4]) {
    json_t *bb = json_object_get(obj, "bbox");
    ck_assert(json_is_array(bb) && json_array_size(bb) == 4);
    for (int k = 0; k < 4; k++) b[k] = (int)json_integer_value(json_array_get(bb, k));
}

// ---------------------------------------------------------------------------------------------
// Generation

START_TEST(test_reproducible) {
    char *tmp = nm_test_tmpdir();
    char a[512], b[512], c[512];
    snprintf(a, sizeof a, "%s/a", tmp);
    snprintf(b, sizeof b, "%s/b", tmp);
    snprintf(c, sizeof c, "%s/c", tmp);
    generate(a, 40, 10, 5, 48);
    generate(b, 40, 10, 5, 48);
    generate(c, 40, 10, 6, 48);
    static const char *files[] = {"train.jsonl", "eval.jsonl", "info.json"};
    for (int i = 0; i < 3; i++) {
        size_t na, nb;
        char *x = slurp(nm_test_path(a, files[i]), &na), *y = slurp(nm_test_path(b, files[i]), &nb);
        ck_assert_msg(na == nb && !memcmp(x, y, na), "%s differs between two runs with one seed", files[i]);
        free(x);
        free(y);
    }
    int n_png = 0;
    static const char *splits[] = {"train", "eval"};
    for (int s = 0; s < 2; s++) {
        json_t *ra = load_lines(a, splits[s]);
        size_t i;
        json_t *r;
        json_array_foreach(ra, i, r) {
            json_t *im = json_object_get(r, "image");
            if (json_is_null(im)) continue;
            size_t na, nb;
            char pa[600], pb[600];
            snprintf(pa, sizeof pa, "%s/%s", a, json_string_value(im));
            snprintf(pb, sizeof pb, "%s/%s", b, json_string_value(im));
            char *x = slurp(pa, &na), *y = slurp(pb, &nb);
            ck_assert_msg(na == nb && !memcmp(x, y, na), "%s differs between two runs", json_string_value(im));
            free(x);
            free(y);
            n_png++;
        }
        json_decref(ra);
    }
    ck_assert_int_gt(n_png, 20);
    char *x = slurp(nm_test_path(a, "train.jsonl"), NULL), *y = slurp(nm_test_path(c, "train.jsonl"), NULL);
    ck_assert_msg(strcmp(x, y) != 0, "a different seed gave the same data");
    free(x);
    free(y);
    nm_test_rmtree(tmp);
    free(tmp);
}
END_TEST

// Every record has every field, with the right types and ranges, and its answer follows from
// its ground truth; the ground truth is checked against the pixels.
static void check_record(const char *dir, json_t *r, const char *split, int S, int counts[5]) {
    const char *id = sget(r, "id"), *prompt = sget(r, "prompt"), *answer = sget(r, "answer"), *task = sget(r, "task");
    ck_assert_str_eq(sget(r, "split"), split);
    ck_assert_msg(!strncmp(id, split, strlen(split)) && id[strlen(split)] == '-', "id %s", id);
    ck_assert_msg(strlen(prompt) > 3 && strlen(answer) >= 1 && strlen(answer) < 16, "%s: prompt/answer", id);
    ck_assert_msg(!strchr(answer, ' '), "%s: answer '%s' is not one word", id, answer);
    json_t *im = json_object_get(r, "image");
    ck_assert_msg(im != NULL, "%s: no image field", id);
    static const char *tasks[] = {"colour", "word", "count", "bar", "text"};
    int t = -1;
    for (int k = 0; k < 5; k++)
        if (!strcmp(task, tasks[k])) t = k;
    ck_assert_msg(t >= 0, "%s: unknown task %s", id, task);
    counts[t]++;
    if (t == 4) {
        ck_assert_msg(json_is_null(im), "%s: text sample with an image", id);
        ck_assert_ptr_nonnull(json_object_get(r, "family"));
        ck_assert_ptr_null(json_object_get(r, "objects"));
        return;
    }
    ck_assert_msg(json_is_string(im), "%s: image task without an image", id);
    char path[600];
    snprintf(path, sizeof path, "%s/%s", dir, json_string_value(im));
    nm_image img;
    nm_error err = {0};
    ck_assert_msg(nm_image_load(&img, path, &err) == NM_OK, "%s", err.msg);
    ck_assert_int_eq(img.width, S);
    ck_assert_int_eq(img.height, S);
    const char *bg = sget(r, "background");
    ck_assert_msg(!strcmp(bg, "flat") || !strcmp(bg, "texture"), "%s: background %s", id, bg);
    ck_assert_int_eq(json_array_size(json_object_get(r, "background_rgb")), !strcmp(bg, "flat") ? 1 : 2);
    ck_assert_int_eq(json_object_get(r, "texture") != NULL, !strcmp(bg, "texture"));
    json_t *objs = json_object_get(r, "objects");
    ck_assert_msg(json_is_array(objs) && json_array_size(objs) >= 1, "%s: objects", id);
    size_t n = json_array_size(objs);
    int boxes[16][4];
    ck_assert_uint_le(n, 16);
    for (size_t i = 0; i < n; i++) {
        json_t *o = json_array_get(objs, i);
        if (!strcmp(sget(o, "kind"), "word")) ck_assert_str_eq(sget(o, "colour"), NM_DATA_WORD_INK);
        else colour_rgb(sget(o, "colour"));
        bbox_of(o, boxes[i]);
        ck_assert_msg(boxes[i][0] >= 0 && boxes[i][1] >= 0 && boxes[i][2] <= S && boxes[i][3] <= S &&
                          boxes[i][0] < boxes[i][2] && boxes[i][1] < boxes[i][3],
                      "%s: bbox out of the image", id);
    }
    // Outside every box there is only background: no pixel near an object colour.
    for (int y = 0; y < S; y++)
        for (int x = 0; x < S; x++) {
            int inside = 0;
            for (size_t i = 0; i < n && !inside; i++)
                inside = x >= boxes[i][0] && x < boxes[i][2] && y >= boxes[i][1] && y < boxes[i][3];
            if (inside) continue;
            const uint8_t *px = img.rgb + ((size_t)y * S + x) * 3;
            for (int c = 0; c < NM_DATA_N_COLOURS; c++)
                ck_assert_msg(!near(px, nm_data_colours[c].rgb, 40), "%s: %s pixel at (%d,%d) outside every bbox", id,
                              nm_data_colours[c].name, x, y);
        }
    if (t == 0) { // colour: exactly one object of the target kind; its centre has the answer's colour
        const char *kind = sget(json_object_get(r, "target"), "kind");
        int found = -1, nk = 0;
        for (size_t i = 0; i < n; i++)
            if (!strcmp(sget(json_array_get(objs, i), "kind"), kind)) found = (int)i, nk++;
        ck_assert_msg(nk == 1, "%s: %d objects of the asked kind", id, nk);
        ck_assert_msg(strstr(prompt, kind) != NULL, "%s: prompt does not name the %s", id, kind);
        ck_assert_str_eq(answer, sget(json_array_get(objs, found), "colour"));
        int *b = boxes[found], cx = (b[0] + b[2]) / 2, cy = (b[1] + b[3]) / 2;
        const uint8_t *px = img.rgb + ((size_t)cy * S + cx) * 3;
        ck_assert_msg(near(px, colour_rgb(answer), 4), "%s: pixel (%d,%d) = %d,%d,%d is not %s", id, cx, cy, px[0], px[1],
                      px[2], answer);
    } else if (t == 2) { // count: consistent with objects[]
        json_t *tg = json_object_get(r, "target");
        const char *kind = json_string_value(json_object_get(tg, "kind")), *col = json_string_value(json_object_get(tg, "colour"));
        int cnt = 0;
        for (size_t i = 0; i < n; i++) {
            json_t *o = json_array_get(objs, i);
            cnt += (!kind || !strcmp(kind, sget(o, "kind"))) && (!col || !strcmp(col, sget(o, "colour")));
            int *b = boxes[i], cx = (b[0] + b[2]) / 2, cy = (b[1] + b[3]) / 2;
            ck_assert(near(img.rgb + ((size_t)cy * S + cx) * 3, colour_rgb(sget(o, "colour")), 4));
        }
        char want[16];
        snprintf(want, sizeof want, "%d", cnt);
        ck_assert_str_eq(answer, want);
        ck_assert_int_eq(json_integer_value(json_object_get(r, "count")), cnt);
    } else if (t == 3) { // bar: answer is the tallest / shortest, heights exact in pixels
        int tall = 0, shortest = 0;
        ck_assert_msg(n >= 3 && n <= 4, "%s: %zu bars", id, n);
        for (size_t i = 0; i < n; i++) {
            json_t *o = json_array_get(objs, i);
            ck_assert_str_eq(sget(o, "kind"), "bar");
            int h = (int)json_integer_value(json_object_get(o, "height"));
            ck_assert_int_eq(h, boxes[i][3] - boxes[i][1]);
            ck_assert_int_eq(json_integer_value(json_object_get(o, "position")), (int)i + 1);
            if (i) ck_assert_int_gt(boxes[i][0], boxes[i - 1][2] - 1); // left to right
            int hj = (int)json_integer_value(json_object_get(json_array_get(objs, tall), "height"));
            int hs = (int)json_integer_value(json_object_get(json_array_get(objs, shortest), "height"));
            ck_assert_msg(h != hj || i == 0, "%s: equal bar heights", id);
            if (h > hj) tall = (int)i;
            if (h < hs) shortest = (int)i;
            // the bar's column at its centre: exactly h pixels of its colour above the baseline
            int cx = (boxes[i][0] + boxes[i][2]) / 2, run = 0;
            for (int y = boxes[i][3] - 1; y >= 0 && near(img.rgb + ((size_t)y * S + cx) * 3, colour_rgb(sget(o, "colour")), 4); y--)
                run++;
            ck_assert_msg(run == h, "%s: bar %zu is %d pixels tall in the image, %d recorded", id, i + 1, run, h);
        }
        int ans = !strcmp(sget(r, "ask"), "tallest") ? tall : shortest;
        if (!strcmp(sget(r, "answer_by"), "colour")) {
            ck_assert_str_eq(answer, sget(json_array_get(objs, ans), "colour"));
        } else {
            char want[16];
            snprintf(want, sizeof want, "%d", ans + 1);
            ck_assert_str_eq(answer, want);
        }
    } else { // word: the answer is the word drawn, and its box holds pixels of its colour
        json_t *w = json_array_get(objs, 0);
        ck_assert_str_eq(sget(w, "kind"), "word");
        ck_assert_str_eq(answer, sget(w, "text"));
        ck_assert_str_eq(answer, sget(r, "word"));
        // Printed text: near-black ink (25, 25, 25) on a flat page of luma >= 190.
        static const uint8_t ink_rgb[3] = {25, 25, 25};
        ck_assert_str_eq(sget(w, "colour"), NM_DATA_WORD_INK);
        int ink = 0, *b = boxes[0];
        for (int y = b[1]; y < b[3]; y++)
            for (int x = b[0]; x < b[2]; x++) ink += near(img.rgb + ((size_t)y * S + x) * 3, ink_rgb, 6);
        ck_assert_msg(ink >= 20, "%s: only %d pixels of the word's ink", id, ink);
        ck_assert_str_eq(sget(r, "background"), "flat");
        json_t *tone = json_array_get(json_object_get(r, "background_rgb"), 0);
        double luma_bg = 0.299 * (double)json_integer_value(json_array_get(tone, 0)) +
                         0.587 * (double)json_integer_value(json_array_get(tone, 1)) +
                         0.114 * (double)json_integer_value(json_array_get(tone, 2));
        ck_assert_msg(luma_bg >= 190.0, "%s: word on a background of luma %.0f", id, luma_bg);
        // The ink's top-left corner lies one pixel inside a cell of the 8 x 8 grid.
        ck_assert_msg(b[0] % (S / 8) == 0 && b[1] % (S / 8) == 0, "%s: word box (%d, %d) off the grid", id, b[0], b[1]);
        ck_assert_msg(strlen(answer) == 3, "%s: word '%s' is not 3 letters", id, answer);
    }
    nm_image_free(&img);
}

START_TEST(test_records_and_answers) {
    char *tmp = nm_test_tmpdir();
    char d[512];
    snprintf(d, sizeof d, "%s/data", tmp);
    int S = 64;
    generate(d, 300, 60, 11, S);
    int counts[5] = {0}, subset_answers[10] = {0}, n_subset = 0;
    static const char *splits[] = {"train", "eval"};
    for (int s = 0; s < 2; s++) {
        json_t *arr = load_lines(d, splits[s]);
        ck_assert_int_eq(json_array_size(arr), s == 0 ? 300 : 60);
        size_t i;
        json_t *r;
        json_array_foreach(arr, i, r) {
            char want[32];
            snprintf(want, sizeof want, "%s-%06zu", splits[s], i);
            ck_assert_str_eq(sget(r, "id"), want);
            check_record(d, r, splits[s], S, counts);
            json_t *tg = json_object_get(r, "target");
            if (!strcmp(sget(r, "task"), "count") && json_object_size(tg) > 0) { // by kind / colour
                long a = json_integer_value(json_object_get(r, "count"));
                ck_assert(a >= 0 && a < 10);
                subset_answers[a]++;
                n_subset++;
            }
        }
        json_decref(arr);
    }
    // The answers to "how many circles / red shapes" are balanced (the scene is built to the
    // drawn answer), not mostly "1" (README "Why counting questions look the way they do").
    int top = 0, distinct = 0;
    for (int a = 0; a < 10; a++) {
        top = subset_answers[a] > top ? subset_answers[a] : top;
        distinct += subset_answers[a] > 0;
    }
    ck_assert_msg(n_subset >= 30, "only %d by-kind / by-colour count questions", n_subset);
    ck_assert_msg(top <= 0.4 * n_subset && distinct >= 5, "count answers unbalanced: top %d of %d, %d distinct", top,
                  n_subset, distinct);
    for (int t = 0; t < 5; t++) ck_assert_msg(counts[t] >= 30, "task %d appears only %d times in 360", t, counts[t]);
    ck_assert_msg(counts[4] < 360 * 0.3, "text-only share %d / 360", counts[4]);
    // info.json describes the set
    char *info = slurp(nm_test_path(d, "info.json"), NULL);
    json_t *j = json_loads(info, 0, NULL);
    ck_assert_str_eq(sget(j, "format"), "nullmap-data");
    ck_assert_int_eq(json_integer_value(json_object_get(j, "train")), 300);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "image_size")), S);
    json_decref(j);
    free(info);
    nm_test_rmtree(tmp);
    free(tmp);
}
END_TEST

// Prompts vary: many distinct phrasings, no one prefix dominating.
START_TEST(test_prompt_variety) {
    char *tmp = nm_test_tmpdir();
    char d[512];
    snprintf(d, sizeof d, "%s/data", tmp);
    generate(d, 400, 0, 3, 32);
    json_t *arr = load_lines(d, "train");
    size_t i, n = json_array_size(arr), distinct = 0, same_start = 0;
    json_t *r;
    const char *first = sget(json_array_get(arr, 0), "prompt");
    json_array_foreach(arr, i, r) {
        const char *p = sget(r, "prompt");
        int seen = 0;
        for (size_t k = 0; k < i && !seen; k++) seen = !strcmp(p, sget(json_array_get(arr, k), "prompt"));
        distinct += !seen;
        same_start += !strncmp(p, first, 8);
    }
    ck_assert_msg(distinct > n * 0.7, "only %zu distinct prompts in %zu", distinct, n);
    ck_assert_msg(same_start < n * 0.1, "%zu prompts start like the first", same_start);
    json_decref(arr);
    nm_test_rmtree(tmp);
    free(tmp);
}
END_TEST

// No eval image (pixel for pixel) or text prompt equals a train one; ids differ. At 16 pixels
// and 5000 train samples repeats happen (info.json counts the redrawn eval samples), so the
// redraw path runs.
static uint64_t hash_bytes(const uint8_t *p, size_t n) {
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ULL;
    return h;
}

typedef struct {
    uint64_t h;
    size_t i;
} hashed;

static int cmp_hashed(const void *a, const void *b) {
    uint64_t x = ((const hashed *)a)->h, y = ((const hashed *)b)->h;
    return x < y ? -1 : x > y;
}

START_TEST(test_eval_held_out) {
    char *tmp = nm_test_tmpdir();
    char d[512];
    snprintf(d, sizeof d, "%s/data", tmp);
    int S = 16;
    size_t px_bytes = (size_t)S * S * 3;
    generate(d, 5000, 500, 1, S);
    char *info = slurp(nm_test_path(d, "info.json"), NULL);
    json_t *ij = json_loads(info, 0, NULL);
    ck_assert_msg(json_integer_value(json_object_get(ij, "eval_redraws")) > 0, "the redraw path did not run");
    json_decref(ij);
    free(info);
    json_t *tr = load_lines(d, "train"), *ev = load_lines(d, "eval");
    size_t nt = json_array_size(tr), ne = json_array_size(ev), nh = 0;
    uint8_t *pix = malloc(nt * px_bytes);
    hashed *hs = malloc(nt * sizeof *hs);
    for (size_t i = 0; i < nt; i++) {
        json_t *im = json_object_get(json_array_get(tr, i), "image");
        if (json_is_null(im)) continue;
        char p[600];
        snprintf(p, sizeof p, "%s/%s", d, json_string_value(im));
        nm_image img;
        nm_error err = {0};
        ck_assert_msg(nm_image_load(&img, p, &err) == NM_OK, "%s", err.msg);
        memcpy(pix + nh * px_bytes, img.rgb, px_bytes);
        hs[nh].h = hash_bytes(img.rgb, px_bytes);
        hs[nh].i = nh;
        nh++;
        nm_image_free(&img);
    }
    qsort(hs, nh, sizeof *hs, cmp_hashed);
    for (size_t e = 0; e < ne; e++) {
        json_t *r = json_array_get(ev, e), *im = json_object_get(r, "image");
        const char *id = sget(r, "id");
        ck_assert(!strncmp(id, "eval-", 5));
        if (json_is_null(im)) {
            for (size_t i = 0; i < nt; i++)
                if (json_is_null(json_object_get(json_array_get(tr, i), "image")))
                    ck_assert_msg(strcmp(sget(r, "prompt"), sget(json_array_get(tr, i), "prompt")) != 0,
                                  "eval %s repeats a train prompt", id);
            continue;
        }
        ck_assert(!strncmp(json_string_value(im), "eval/", 5));
        char p[600];
        snprintf(p, sizeof p, "%s/%s", d, json_string_value(im));
        nm_image img;
        nm_error err = {0};
        ck_assert_msg(nm_image_load(&img, p, &err) == NM_OK, "%s", err.msg);
        hashed key = {hash_bytes(img.rgb, px_bytes), 0};
        hashed *hit = bsearch(&key, hs, nh, sizeof *hs, cmp_hashed);
        if (hit) { // walk every train image with this hash
            while (hit > hs && hit[-1].h == key.h) hit--;
            for (; hit < hs + nh && hit->h == key.h; hit++)
                ck_assert_msg(memcmp(pix + hit->i * px_bytes, img.rgb, px_bytes) != 0, "eval %s repeats a train image", id);
        }
        nm_image_free(&img);
    }
    free(pix);
    free(hs);
    json_decref(tr);
    json_decref(ev);
    nm_test_rmtree(tmp);
    free(tmp);
}
END_TEST

static int count_entries(const char *dir) {
    DIR *dd = opendir(dir);
    ck_assert_ptr_nonnull(dd);
    int n = 0;
    struct dirent *e;
    while ((e = readdir(dd)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) n++;
    closedir(dd);
    return n;
}

START_TEST(test_existing_dir) {
    char *tmp = nm_test_tmpdir();
    char d[512];
    snprintf(d, sizeof d, "%s/out", tmp);
    ck_assert_int_eq(mkdir(d, 0777), 0);
    ck_assert_int_eq(nm_test_write_file(nm_test_path(d, "keep.txt"), "mine", 4), 0);
    nm_error err = {0};
    for (int force = 0; force < 2; force++) { // refused with and without --force: not a data set
        ck_assert_int_eq(nm_data_generate(d, 10, 2, 1, 32, force, NULL, NULL, &err), NM_ERR_IO);
        ck_assert_msg(strstr(err.msg, d) != NULL, "message does not name the directory: %s", err.msg);
        ck_assert_int_eq(count_entries(d), 1);
        size_t n;
        char *k = slurp(nm_test_path(d, "keep.txt"), &n);
        ck_assert(n == 4 && !memcmp(k, "mine", 4));
        free(k);
    }
    ck_assert_int_eq(count_entries(tmp), 1); // no temporary directory left behind
    // an empty directory is fine; a data set is replaced only with force
    char e[512];
    snprintf(e, sizeof e, "%s/empty", tmp);
    ck_assert_int_eq(mkdir(e, 0777), 0);
    generate(e, 6, 2, 1, 32);
    ck_assert_int_eq(nm_data_generate(e, 6, 2, 2, 32, 0, NULL, NULL, &err), NM_ERR_IO);
    ck_assert(strstr(err.msg, "--force") != NULL);
    char *before = slurp(nm_test_path(e, "train.jsonl"), NULL);
    ck_assert_int_eq(nm_data_generate(e, 6, 2, 2, 32, 1, NULL, NULL, &err), NM_OK);
    char *after = slurp(nm_test_path(e, "train.jsonl"), NULL);
    ck_assert(strcmp(before, after) != 0);
    free(before);
    free(after);
    ck_assert_int_eq(count_entries(tmp), 2); // out, empty: no .tmp- or .old- left
    // missing parents are created
    char deep[512];
    snprintf(deep, sizeof deep, "%s/a/b/c/", tmp);
    generate(deep, 3, 1, 1, 16);
    ck_assert(nm_test_path(deep, "eval.jsonl") && count_entries(nm_test_path(tmp, "a/b/c")) == 5);
    nm_test_rmtree(tmp);
    free(tmp);
}
END_TEST

START_TEST(test_limits) {
    char *tmp = nm_test_tmpdir();
    char d[512];
    snprintf(d, sizeof d, "%s/x", tmp);
    nm_error err = {0};
    ck_assert_int_eq(nm_data_generate(d, 10, 1, 1, 15, 0, NULL, NULL, &err), NM_ERR_LIMIT);
    ck_assert(strstr(err.msg, "16..1024") != NULL);
    ck_assert_int_eq(nm_data_generate(d, 10, 1, 1, 1025, 0, NULL, NULL, &err), NM_ERR_LIMIT);
    ck_assert_int_eq(nm_data_generate(d, -1, 1, 1, 64, 0, NULL, NULL, &err), NM_ERR_LIMIT);
    ck_assert_int_eq(nm_data_generate(d, 10, NM_DATA_MAX_SAMPLES + 1, 1, 64, 0, NULL, NULL, &err), NM_ERR_LIMIT);
    ck_assert_int_eq(nm_data_generate(d, 0, 0, 1, 64, 0, NULL, NULL, &err), NM_ERR_INVALID);
    ck_assert_int_eq(nm_data_generate(".", 1, 0, 1, 64, 0, NULL, NULL, &err), NM_ERR_INVALID);
    ck_assert(!nm_test_path(d, "") || count_entries(tmp) == 0);
    nm_test_rmtree(tmp);
    free(tmp);
}
END_TEST

// ---------------------------------------------------------------------------------------------
// Reader

START_TEST(test_reader_roundtrip) {
    char *tmp = nm_test_tmpdir();
    char d[512];
    snprintf(d, sizeof d, "%s/data", tmp);
    generate(d, 50, 12, 9, 32);
    static const char *splits[] = {"train", "eval"};
    for (int s = 0; s < 2; s++) {
        nm_dataset ds;
        nm_error err = {0};
        ck_assert_msg(nm_dataset_load(&ds, d, splits[s], &err) == NM_OK, "%s", err.msg);
        json_t *arr = load_lines(d, splits[s]);
        ck_assert_int_eq(ds.n, (int)json_array_size(arr));
        for (int i = 0; i < ds.n; i++) {
            json_t *r = json_array_get(arr, (size_t)i);
            ck_assert_str_eq(ds.rec[i].id, sget(r, "id"));
            ck_assert_str_eq(ds.rec[i].prompt, sget(r, "prompt"));
            ck_assert_str_eq(ds.rec[i].answer, sget(r, "answer"));
            ck_assert_str_eq(ds.rec[i].task, sget(r, "task"));
            json_t *im = json_object_get(r, "image");
            if (json_is_null(im)) {
                ck_assert_ptr_null(ds.rec[i].image);
            } else {
                char want[600];
                snprintf(want, sizeof want, "%s/%s", d, json_string_value(im));
                ck_assert_str_eq(ds.rec[i].image, want);
                struct stat st;
                ck_assert_int_eq(stat(ds.rec[i].image, &st), 0);
            }
            // the ground truth: background kind and every object's kind, colour and bbox
            json_t *bg = json_object_get(r, "background");
            ck_assert_int_eq(ds.rec[i].background, !bg ? NM_DATA_BG_UNKNOWN
                                                   : !strcmp(json_string_value(bg), "flat") ? NM_DATA_BG_FLAT
                                                                                             : NM_DATA_BG_TEXTURE);
            json_t *objs = json_object_get(r, "objects");
            ck_assert_int_eq(ds.rec[i].has_objects, objs != NULL);
            ck_assert_int_eq(ds.rec[i].n_objects, objs ? (int)json_array_size(objs) : 0);
            ck_assert_int_eq(ds.rec[i].has_objects, !json_is_null(im)); // image records have objects, text ones none
            for (int k = 0; k < ds.rec[i].n_objects; k++) {
                json_t *o = json_array_get(objs, (size_t)k);
                const nm_data_object *ob = &ds.rec[i].objects[k];
                ck_assert_str_eq(ob->kind, sget(o, "kind"));
                ck_assert_str_eq(ob->colour, sget(o, "colour"));
                int b[4];
                bbox_of(o, b);
                for (int c = 0; c < 4; c++) ck_assert_int_eq(ob->bbox[c], b[c]);
            }
        }
        ck_assert_int_eq(ds.image_size, 32); // from info.json
        json_decref(arr);
        nm_dataset_free(&ds);
        nm_dataset_free(&ds); // twice is safe
    }
    nm_test_rmtree(tmp);
    free(tmp);
}
END_TEST

static void expect_bad(const char *dir, const char *content, size_t n, const char *where, const char *what) {
    ck_assert_int_eq(nm_test_write_file(nm_test_path(dir, "train.jsonl"), content, n), 0);
    nm_dataset ds;
    nm_error err = {0};
    ck_assert_int_eq(nm_dataset_load(&ds, dir, "train", &err), NM_ERR_FORMAT);
    ck_assert_msg(strstr(err.msg, where) != NULL, "'%s' does not name %s", err.msg, where);
    ck_assert_msg(strstr(err.msg, what) != NULL, "'%s' does not say %s", err.msg, what);
    ck_assert_ptr_null(ds.rec);
    ck_assert_int_eq(ds.n, 0);
}

START_TEST(test_reader_malformed) {
    char *tmp = nm_test_tmpdir();
    const char *good = "{\"id\":\"t-1\",\"split\":\"train\",\"image\":null,\"prompt\":\"2 + 2 =\",\"answer\":\"4\",\"task\":\"text\"}\n";
    char buf[2048];
    snprintf(buf, sizeof buf, "%s%s{\"id\":\"t-3\",\"image\":null,\"prompt\":\"p\",\"task\":\"text\"}\n", good, good);
    expect_bad(tmp, buf, strlen(buf), "train.jsonl:3", "missing field \"answer\"");
    snprintf(buf, sizeof buf, "%s{\"id\":\"t-2\",\"image\":null,\"prompt\":\"p\",\"answer\":\"a\",\"task\":\n", good);
    expect_bad(tmp, buf, strlen(buf), "train.jsonl:2", "bad JSON");
    snprintf(buf, sizeof buf, "%s{\"id\":\"t-2\",\"image\":null,\"prompt\":\"caf\xC3\",\"answer\":\"a\",\"task\":\"text\"}\n", good);
    expect_bad(tmp, buf, strlen(buf), "train.jsonl:2", "invalid UTF-8");
    snprintf(buf, sizeof buf, "{\"id\":\"t-1\",\"image\":null,\"prompt\":\"\xED\xA0\x80\",\"answer\":\"a\",\"task\":\"text\"}\n");
    expect_bad(tmp, buf, strlen(buf), "train.jsonl:1", "invalid UTF-8"); // a surrogate
    snprintf(buf, sizeof buf, "%s[1, 2]\n", good);
    expect_bad(tmp, buf, strlen(buf), "train.jsonl:2", "not a JSON object");
    snprintf(buf, sizeof buf, "%s\n%s", good, good);
    expect_bad(tmp, buf, strlen(buf), "train.jsonl:2", "empty line");
    snprintf(buf, sizeof buf, "%s{\"id\":\"t-2\",\"image\":3,\"prompt\":\"p\",\"answer\":\"a\",\"task\":\"text\"}\n", good);
    expect_bad(tmp, buf, strlen(buf), "train.jsonl:2", "\"image\"");
    snprintf(buf, sizeof buf, "{\"id\":\"t-1\",\"image\":null,\"prompt\":\"p\",\"answer\":\"\",\"task\":\"text\"}\n");
    expect_bad(tmp, buf, strlen(buf), "train.jsonl:1", "\"answer\" is empty");
    snprintf(buf, sizeof buf, "{\"id\":7,\"image\":null,\"prompt\":\"p\",\"answer\":\"a\",\"task\":\"text\"}\n");
    expect_bad(tmp, buf, strlen(buf), "train.jsonl:1", "\"id\" must be a string");
    // the optional ground truth, when present, is checked as strictly
    static const struct {
        const char *extra, *what;
    } truth[] = {
        {"\"background\":\"plaid\"", "\"background\" must be \"flat\" or \"texture\""},
        {"\"background\":1", "\"background\" must be"},
        {"\"objects\":{}", "\"objects\" must be an array"},
        {"\"objects\":[3]", "objects[0] must be a JSON object"},
        {"\"objects\":[{\"bbox\":[0,0,1,1]}]", "objects[0]: missing field \"kind\""},
        {"\"objects\":[{\"kind\":\"\",\"bbox\":[0,0,1,1]}]", "objects[0]: \"kind\" must be a non-empty string"},
        {"\"objects\":[{\"kind\":\"bar\",\"colour\":5,\"bbox\":[0,0,1,1]}]", "objects[0]: \"colour\""},
        {"\"objects\":[{\"kind\":\"bar\",\"bbox\":[0,0,1,1]},{\"kind\":\"bar\"}]", "objects[1]: \"bbox\" must be 4 integers"},
        {"\"objects\":[{\"kind\":\"bar\",\"bbox\":[0,0,1]}]", "objects[0]: \"bbox\" must be 4 integers"},
        {"\"objects\":[{\"kind\":\"bar\",\"bbox\":[0,0,1.5,2]}]", "\"bbox\" must be 4 integers"},
        {"\"objects\":[{\"kind\":\"bar\",\"bbox\":[-1,0,1,2]}]", "\"bbox\" must be 4 integers"},
        {"\"objects\":[{\"kind\":\"bar\",\"bbox\":[4,0,4,2]}]", "x0 < x1"}, // empty box
        {"\"objects\":[{\"kind\":\"bar\",\"bbox\":[0,5,3,2]}]", "y0 < y1"},
        {"\"objects\":[{\"kind\":\"bar\",\"bbox\":[0,0,3,99999999]}]", "\"bbox\" must be 4 integers"},
    };
    for (size_t i = 0; i < sizeof truth / sizeof truth[0]; i++) {
        snprintf(buf, sizeof buf, "%s{\"id\":\"t-2\",\"image\":\"a.png\",\"prompt\":\"p\",\"answer\":\"a\",\"task\":\"x\",%s}\n", good,
                 truth[i].extra);
        expect_bad(tmp, buf, strlen(buf), "train.jsonl:2", truth[i].what);
    }
    // present and well-formed: read back; an empty "objects" says "no object" (all background)
    snprintf(buf, sizeof buf,
             "{\"id\":\"i-1\",\"image\":\"a.png\",\"prompt\":\"p\",\"answer\":\"a\",\"task\":\"x\",\"background\":\"texture\","
             "\"objects\":[{\"kind\":\"word\",\"bbox\":[1,2,30,4],\"text\":\"GO\"},{\"kind\":\"bar\",\"colour\":\"red\",\"bbox\":[0,0,%d,%d]}]}\n"
             "{\"id\":\"i-2\",\"image\":\"b.png\",\"prompt\":\"p\",\"answer\":\"a\",\"task\":\"x\",\"background\":\"flat\",\"objects\":[]}\n%s",
             NM_DATA_MAX_COORD, NM_DATA_MAX_COORD, good);
    ck_assert_int_eq(nm_test_write_file(nm_test_path(tmp, "train.jsonl"), buf, strlen(buf)), 0);
    {
        nm_dataset ds;
        nm_error err = {0};
        ck_assert_msg(nm_dataset_load(&ds, tmp, "train", &err) == NM_OK, "%s", err.msg);
        ck_assert_int_eq(ds.n, 3);
        ck_assert_int_eq(ds.image_size, 0); // no info.json
        ck_assert_int_eq(ds.rec[0].background, NM_DATA_BG_TEXTURE);
        ck_assert_int_eq(ds.rec[0].has_objects, 1);
        ck_assert_int_eq(ds.rec[0].n_objects, 2);
        ck_assert_str_eq(ds.rec[0].objects[0].kind, "word");
        ck_assert_ptr_null(ds.rec[0].objects[0].colour);
        ck_assert_int_eq(ds.rec[0].objects[0].bbox[0], 1);
        ck_assert_int_eq(ds.rec[0].objects[0].bbox[3], 4);
        ck_assert_str_eq(ds.rec[0].objects[1].colour, "red");
        ck_assert_int_eq(ds.rec[0].objects[1].bbox[2], NM_DATA_MAX_COORD);
        ck_assert_int_eq(ds.rec[1].background, NM_DATA_BG_FLAT);
        ck_assert_int_eq(ds.rec[1].has_objects, 1);
        ck_assert_int_eq(ds.rec[1].n_objects, 0);
        ck_assert_int_eq(ds.rec[2].background, NM_DATA_BG_UNKNOWN);
        ck_assert_int_eq(ds.rec[2].has_objects, 0);
        nm_dataset_free(&ds);
        // info.json: read when present, strict when read
        static const struct {
            const char *text, *what;
        } infos[] = {{"{\"image_size\": 48}", NULL},
                     {"{\"image_size\": 0}", "\"image_size\" must be an integer"},
                     {"{\"image_size\": \"64\"}", "\"image_size\" must be an integer"},
                     {"{\"format\": \"nullmap-data\"}", "\"image_size\" must be an integer"},
                     {"{\"image_size\": 64", "bad JSON"}};
        for (size_t i = 0; i < sizeof infos / sizeof infos[0]; i++) {
            ck_assert_int_eq(nm_test_write_file(nm_test_path(tmp, "info.json"), infos[i].text, strlen(infos[i].text)), 0);
            nm_status st = nm_dataset_load(&ds, tmp, "train", &err);
            if (!infos[i].what) {
                ck_assert_msg(st == NM_OK, "%s", err.msg);
                ck_assert_int_eq(ds.image_size, 48);
            } else {
                ck_assert_int_eq(st, NM_ERR_FORMAT);
                ck_assert_msg(strstr(err.msg, "info.json") && strstr(err.msg, infos[i].what), "'%s'", err.msg);
                ck_assert_ptr_null(ds.rec);
                ck_assert_int_eq(ds.image_size, 0);
            }
            nm_dataset_free(&ds);
        }
        remove(nm_test_path(tmp, "info.json"));
    }
    // valid UTF-8 beyond ASCII, CRLF line ends and no final newline are fine
    snprintf(buf, sizeof buf, "{\"id\":\"t-1\",\"image\":\"a.png\",\"prompt\":\"caf\xC3\xA9 \xF0\x9F\x98\x80\",\"answer\":\"\xC3\xA9\",\"task\":\"x\"}\r\n%s",
             good);
    ck_assert_int_eq(nm_test_write_file(nm_test_path(tmp, "train.jsonl"), buf, strlen(buf) - 1), 0);
    nm_dataset ds;
    nm_error err = {0};
    ck_assert_msg(nm_dataset_load(&ds, tmp, "train", &err) == NM_OK, "%s", err.msg);
    ck_assert_int_eq(ds.n, 2);
    ck_assert_str_eq(ds.rec[0].answer, "\xC3\xA9");
    ck_assert_str_eq(ds.rec[0].image, nm_test_path(tmp, "a.png"));
    nm_dataset_free(&ds);
    // a missing file and a bad split name
    ck_assert_int_eq(nm_dataset_load(&ds, tmp, "eval", &err), NM_ERR_IO);
    ck_assert(strstr(err.msg, "eval.jsonl") != NULL);
    ck_assert_int_eq(nm_dataset_load(&ds, tmp, "test", &err), NM_ERR_INVALID);
    nm_test_rmtree(tmp);
    free(tmp);
}
END_TEST

NM_TEST_SUITE(data) {
    Suite *s = suite_create("data");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_reproducible);
    tcase_add_test(tc, test_records_and_answers);
    tcase_add_test(tc, test_prompt_variety);
    tcase_add_test(tc, test_eval_held_out);
    tcase_add_test(tc, test_existing_dir);
    tcase_add_test(tc, test_limits);
    tcase_add_test(tc, test_reader_roundtrip);
    tcase_add_test(tc, test_reader_malformed);
    suite_add_tcase(s, tc);
    return s;
}
