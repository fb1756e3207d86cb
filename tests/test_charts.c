// test_charts.c — the summary charts (viz/nm_charts.c) on hand-made metrics: each chart is rendered
// to PNG, decoded with libpng, and its pixels are checked where the layout functions say a bar,
// a cell or a marker is: bar heights follow the values, absent bars stay absent, strip cells have
// the colour map's colour. Plus SVG/PDF output, error codes, and no file left after a failure.
#include <dirent.h>
#include <math.h>
#include <png.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nm_charts.h"
#include "nm_metrics.h"
#include "nm_viz.h"
#include "test_util.h"

// ---- hand-made samples (only the fields nm_metrics reads) ----

// A sample with count[mod] tokens of each modality, in a random order; n_real left 0.
static void sample_make(nm_trace_sample *s, nm_test_rng *r, int L, int K, const int count[NM_MOD_COUNT]) {
    memset(s, 0, sizeof *s);
    int T = count[0] + count[1] + count[2];
    s->n_layers = L;
    s->top_k = K;
    s->capacity = T > 0 ? T : 1;
    s->n_tokens = T;
    s->modality = calloc((size_t)s->capacity, 1);
    s->segment = calloc((size_t)s->capacity, 1);
    s->n_real = calloc((size_t)L * (size_t)s->capacity, 1);
    ck_assert_ptr_nonnull(s->modality);
    ck_assert_ptr_nonnull(s->segment);
    ck_assert_ptr_nonnull(s->n_real);
    int t = 0;
    for (int mod = 0; mod < NM_MOD_COUNT; mod++)
        for (int i = 0; i < count[mod]; i++) s->modality[t++] = (uint8_t)mod;
    for (int i = T - 1; i > 0; i--) { // shuffle: modalities interleave as in a real sequence
        int j = (int)(nm_test_rng_next(r) % (uint64_t)(i + 1));
        uint8_t tmp = s->modality[i];
        s->modality[i] = s->modality[j];
        s->modality[j] = tmp;
    }
    for (t = 0; t < T; t++)
        s->segment[t] = s->modality[t] == NM_MOD_VISION ? NM_SEG_IMAGE
                      : s->modality[t] == NM_MOD_TEXT   ? NM_SEG_PROMPT
                                                        : NM_SEG_BOS;
}

static void sample_release(nm_trace_sample *s) {
    free(s->modality);
    free(s->segment);
    free(s->n_real);
    memset(s, 0, sizeof *s);
}

static uint8_t *nreal_at(nm_trace_sample *s, int l, int t) { return &s->n_real[(size_t)l * s->capacity + t]; }

// n_real ~ Binomial(K, p[mod]) for every (layer, token).
static void fill_binomial(nm_trace_sample *s, nm_test_rng *r, const double p[NM_MOD_COUNT]) {
    for (int l = 0; l < s->n_layers; l++)
        for (int t = 0; t < s->n_tokens; t++) {
            int k = 0;
            for (int j = 0; j < s->top_k; j++) k += nm_test_rng_uniform(r) < p[s->modality[t]];
            *nreal_at(s, l, t) = (uint8_t)k;
        }
}

static void metrics_init_ok(nm_metrics *m, int L, int K) {
    nm_error err = {0};
    ck_assert_msg(nm_metrics_init(m, L, K, &err) == NM_OK, "init: %s", err.msg);
}

static void metrics_add_ok(nm_metrics *m, const nm_trace_sample *s) {
    nm_error err = {0};
    ck_assert_msg(nm_metrics_add_sample(m, s, &err) == NM_OK, "add_sample: %s", err.msg);
}

// Metrics of `n_samples` random samples with Binomial(K, p[mod]) routing.
static void metrics_random(nm_metrics *m, nm_test_rng *r, int L, int K, const int count[NM_MOD_COUNT],
                           const double p[NM_MOD_COUNT], int n_samples) {
    metrics_init_ok(m, L, K);
    for (int i = 0; i < n_samples; i++) {
        nm_trace_sample s;
        int c[NM_MOD_COUNT];
        for (int j = 0; j < NM_MOD_COUNT; j++) // vary the sample lengths a little
            c[j] = count[j] > 0 ? count[j] + (int)(nm_test_rng_next(r) % 5) : 0;
        sample_make(&s, r, L, K, c);
        fill_binomial(&s, r, p);
        metrics_add_ok(m, &s);
        sample_release(&s);
    }
    nm_metrics_finish(m);
}

// ---- decoded pictures ----

typedef struct {
    int w, h;
    uint8_t *px; // RGB, row-major
} picture;

static picture picture_read(const char *path) {
    png_image img;
    memset(&img, 0, sizeof img);
    img.version = PNG_IMAGE_VERSION;
    ck_assert_msg(png_image_begin_read_from_file(&img, path), "%s: %s", path, img.message);
    img.format = PNG_FORMAT_RGB;
    picture p = {(int)img.width, (int)img.height, malloc(PNG_IMAGE_SIZE(img))};
    ck_assert_ptr_nonnull(p.px);
    ck_assert_msg(png_image_finish_read(&img, NULL, p.px, 0, NULL), "%s: %s", path, img.message);
    return p;
}

static void picture_free(picture *p) {
    free(p->px);
    p->px = NULL;
}

static const uint8_t *pixel(const picture *p, int x, int y) {
    ck_assert_msg(x >= 0 && y >= 0 && x < p->w && y < p->h, "pixel (%d, %d) outside %dx%d", x, y, p->w, p->h);
    return p->px + ((size_t)y * p->w + x) * 3;
}

static int near_rgb(const uint8_t *px, const double rgb[3], int tol) {
    for (int i = 0; i < 3; i++)
        if (abs((int)px[i] - (int)lround(rgb[i] * 255)) > tol) return 0;
    return 1;
}

static int is_white(const uint8_t *px) { return px[0] > 250 && px[1] > 250 && px[2] > 250; }

// Height of the run of `rgb` pixels going up from the bottom of column box b (its centre).
static int bar_height(const picture *p, nm_chart_box b, const double rgb[3]) {
    int x = (int)floor(b.x + b.w / 2), h = 0;
    for (int y = (int)lround(b.y + b.h) - 1; y >= (int)b.y - 1 && near_rgb(pixel(p, x, y), rgb, 3); y--) h++;
    return h;
}

// Pixels of colour rgb anywhere in box b.
static int count_rgb(const picture *p, nm_chart_box b, const double rgb[3]) {
    int n = 0;
    for (int y = (int)b.y; y < (int)(b.y + b.h); y++)
        for (int x = (int)b.x; x < (int)(b.x + b.w); x++) n += near_rgb(pixel(p, x, y), rgb, 3);
    return n;
}

// Dark (text) pixels in box b.
static int count_dark(const picture *p, nm_chart_box b) {
    int n = 0;
    for (int y = (int)b.y; y < (int)(b.y + b.h); y++)
        for (int x = (int)b.x; x < (int)(b.x + b.w); x++) {
            const uint8_t *q = pixel(p, x, y);
            n += q[0] < 160 && q[1] < 160 && q[2] < 160;
        }
    return n;
}

static void assert_bar(const picture *p, nm_chart_box b, double v, const double rgb[3], const char *what) {
    int h = bar_height(p, b, rgb);
    double want = v * b.h;
    ck_assert_msg(fabs(h - want) <= 2.0, "%s: bar %d px high, value %.4f wants %.1f px", what, h, v, want);
}

// No bar in column b: nothing of the bar colour stands on the axis, and fewer pixels of that colour
// in the whole column than one row of a bar would have (anti-aliased grey text may hit the special
// tokens' grey here and there).
static void assert_no_bar(const picture *p, nm_chart_box b, const double rgb[3], const char *what) {
    ck_assert_msg(bar_height(p, b, rgb) == 0, "%s: a bar stands on the axis", what);
    int n = count_rgb(p, b, rgb);
    ck_assert_msg(n < b.w / 2, "%s: %d pixels of the bar colour", what, n);
}

// Width of a modality name as the modality chart writes it under its group (bold 12).
static double group_name_w(const char *s) {
    cairo_surface_t *sf = cairo_image_surface_create(CAIRO_FORMAT_ARGB32, 4, 4);
    cairo_t *cr = cairo_create(sf);
    nm_viz_font(cr, 12, 1);
    double w = nm_viz_text_width(cr, s);
    cairo_destroy(cr);
    cairo_surface_destroy(sf);
    return w;
}

// The names centred under two neighbouring groups of the intensity panel stay a word space apart.
static void assert_group_names_apart(const nm_modality_layout *lay, int mod_a, int mod_b) {
    nm_chart_box a = lay->bar[NM_CHART_INTENSITY][mod_a][0], b = lay->bar[NM_CHART_INTENSITY][mod_b][0];
    double pitch = b.x + b.w / 2 - (a.x + a.w / 2);
    double need = (group_name_w(mod_a == NM_MOD_ALL ? "all tokens" : nm_modality_name(mod_a)) +
                   group_name_w(mod_b == NM_MOD_ALL ? "all tokens" : nm_modality_name(mod_b))) / 2 + 12;
    ck_assert_msg(pitch >= need, "group names %s, %s: centres %.0f apart, need %.0f", nm_modality_name(mod_a),
                  nm_modality_name(mod_b), pitch, need);
}

static int file_count(const char *dir) {
    DIR *d = opendir(dir);
    ck_assert_ptr_nonnull(d);
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) n++;
    closedir(d);
    return n;
}

static const int MODS3[3] = {NM_MOD_VISION, NM_MOD_TEXT, NM_MOD_SPECIAL};

// ---------------------------------------------------------------------------------------------

START_TEST(test_modality_bars) {
    nm_test_rng r = {0xc4a7 + 1};
    nm_metrics m[2];
    const int count[3] = {[NM_MOD_VISION] = 40, [NM_MOD_TEXT] = 14, [NM_MOD_SPECIAL] = 3};
    const double p0[3] = {[NM_MOD_VISION] = 0.8, [NM_MOD_TEXT] = 0.3, [NM_MOD_SPECIAL] = 0.5};
    const double p1[3] = {[NM_MOD_VISION] = 0.2, [NM_MOD_TEXT] = 0.7, [NM_MOD_SPECIAL] = 0.6};
    metrics_random(&m[0], &r, 3, 8, count, p0, 4);
    metrics_random(&m[1], &r, 3, 4, count, p1, 3);
    nm_chart_series s[2] = {{&m[0], "first", 8, 0.5}, {&m[1], "second", 4, 0.25}};
    char *dir = nm_test_tmpdir();
    const char *path = nm_test_path(dir, "modality.png");
    nm_error err = {0};
    ck_assert_msg(nm_render_modality_chart(s, 2, path, &err) == NM_OK, "%s", err.msg);
    nm_modality_layout lay;
    ck_assert_int_eq(nm_modality_chart_layout(s, 2, &lay, &err), NM_OK);
    picture p = picture_read(path);
    ck_assert_int_eq(p.w, lay.width);
    ck_assert_int_eq(p.h, lay.height);

    for (int panel = 0; panel < NM_CHART_PANELS; panel++)
        for (int mod = 0; mod <= NM_MOD_ALL; mod++) {
            int drawn = lay.bar[panel][mod][0].w > 0;
            ck_assert_int_eq(drawn, mod != NM_MOD_ALL || panel == NM_CHART_INTENSITY);
            for (int i = 0; drawn && i < 2; i++) {
                double v = panel == NM_CHART_TOKENS ? m[i].token_share[mod]
                         : panel == NM_CHART_COMPUTE ? m[i].compute_share[mod] : m[i].intensity[mod];
                double rgb[3];
                nm_chart_series_rgb(mod, i, 2, rgb);
                char what[64];
                snprintf(what, sizeof what, "panel %d %s series %d", panel, nm_modality_name(mod), i);
                assert_bar(&p, lay.bar[panel][mod][i], v, rgb, what);
            }
        }
    // the point of figure 4: 0.8 against 0.2 is visibly taller
    double rgb0[3], rgb1[3];
    nm_chart_series_rgb(NM_MOD_VISION, 0, 2, rgb0);
    nm_chart_series_rgb(NM_MOD_VISION, 1, 2, rgb1);
    int h0 = bar_height(&p, lay.bar[NM_CHART_INTENSITY][NM_MOD_VISION][0], rgb0);
    int h1 = bar_height(&p, lay.bar[NM_CHART_INTENSITY][NM_MOD_VISION][1], rgb1);
    ck_assert_msg(h0 > h1 + 0.4 * lay.plot[NM_CHART_INTENSITY].h, "vision bars %d vs %d px", h0, h1);
    // bar slots never overlap and stay inside the picture
    for (int panel = 0; panel < NM_CHART_PANELS; panel++) {
        nm_chart_box pl = lay.plot[panel];
        ck_assert(pl.x > 0 && pl.x + pl.w < lay.width && pl.y > 0 && pl.y + pl.h < lay.height);
        double last = -1;
        for (int g = 0; g < 4; g++) {
            int mod = g < 3 ? MODS3[g] : NM_MOD_ALL;
            for (int i = 0; i < 2; i++) {
                nm_chart_box b = lay.bar[panel][mod][i];
                if (b.w <= 0) continue;
                ck_assert(b.x >= pl.x && b.x + b.w <= pl.x + pl.w);
                ck_assert(b.x >= last);
                last = b.x + b.w;
            }
        }
    }
    picture_free(&p);
    nm_test_rmtree(dir);
    free(dir);
    nm_metrics_free(&m[0]);
    nm_metrics_free(&m[1]);
}
END_TEST

// A trace whose every slot is null (compute distribution undefined) beside a text-only trace (no
// vision tokens: intensity NAN): neither may draw a bar, both must say why.
START_TEST(test_modality_undefined_and_na) {
    nm_test_rng r = {0xc4a7 + 2};
    nm_metrics m[2];
    const int count0[3] = {[NM_MOD_VISION] = 30, [NM_MOD_TEXT] = 10, [NM_MOD_SPECIAL] = 2};
    const double zero[3] = {0, 0, 0};
    metrics_random(&m[0], &r, 2, 4, count0, zero, 2);
    ck_assert_int_eq(m[0].compute_share_defined, 0);
    const int count1[3] = {[NM_MOD_VISION] = 0, [NM_MOD_TEXT] = 20, [NM_MOD_SPECIAL] = 0};
    const double p1[3] = {[NM_MOD_TEXT] = 0.6};
    metrics_random(&m[1], &r, 2, 4, count1, p1, 2);
    ck_assert(isnan(m[1].intensity[NM_MOD_VISION]));
    nm_chart_series s[2] = {{&m[0], "all null", 0, 0.5}, {&m[1], "text only", 0, 0.5}};
    char *dir = nm_test_tmpdir();
    const char *path = nm_test_path(dir, "undef.png");
    nm_error err = {0};
    ck_assert_msg(nm_render_modality_chart(s, 2, path, &err) == NM_OK, "%s", err.msg);
    nm_modality_layout lay;
    ck_assert_int_eq(nm_modality_chart_layout(s, 2, &lay, &err), NM_OK);
    picture p = picture_read(path);
    ck_assert_int_eq(p.w, lay.width);
    ck_assert_int_eq(p.h, lay.height);
    double rgb[3];
    for (int g = 0; g < 3; g++) { // undefined compute: no bar, but the word "undefined" in the slot
        int mod = MODS3[g];
        nm_chart_box b = lay.bar[NM_CHART_COMPUTE][mod][0];
        nm_chart_series_rgb(mod, 0, 2, rgb);
        assert_no_bar(&p, b, rgb, nm_modality_name(mod));
        ck_assert_msg(count_dark(&p, b) > 20, "no 'undefined' text in the %s slot", nm_modality_name(mod));
    }
    // text only: vision intensity absent ("n/a" just above the axis), text compute share is all of it
    nm_chart_box b = lay.bar[NM_CHART_INTENSITY][NM_MOD_VISION][1];
    nm_chart_series_rgb(NM_MOD_VISION, 1, 2, rgb);
    assert_no_bar(&p, b, rgb, "vision n/a");
    nm_chart_box above_axis = {b.x, b.y + b.h - 16, b.w, 16};
    ck_assert_msg(count_dark(&p, above_axis) > 5, "no 'n/a' label");
    nm_chart_series_rgb(NM_MOD_TEXT, 1, 2, rgb);
    assert_bar(&p, lay.bar[NM_CHART_COMPUTE][NM_MOD_TEXT][1], 1.0, rgb, "text-only compute share");
    assert_bar(&p, lay.bar[NM_CHART_INTENSITY][NM_MOD_TEXT][1], m[1].intensity[NM_MOD_TEXT], rgb, "text intensity");
    picture_free(&p);
    nm_test_rmtree(dir);
    free(dir);
    nm_metrics_free(&m[0]);
    nm_metrics_free(&m[1]);
}
END_TEST

// Without special tokens no chart makes room for them.
START_TEST(test_no_special_tokens) {
    nm_test_rng r = {0xc4a7 + 3};
    nm_metrics m;
    const int count[3] = {[NM_MOD_VISION] = 12, [NM_MOD_TEXT] = 9};
    const double p[3] = {0.5, 0.5, 0.5};
    metrics_random(&m, &r, 2, 2, count, p, 1);
    nm_chart_series s = {&m, NULL, 0, 0};
    nm_error err = {0};
    nm_modality_layout ml;
    ck_assert_int_eq(nm_modality_chart_layout(&s, 1, &ml, &err), NM_OK);
    for (int panel = 0; panel < NM_CHART_PANELS; panel++) ck_assert(ml.bar[panel][NM_MOD_SPECIAL][0].w == 0);
    assert_group_names_apart(&ml, NM_MOD_TEXT, NM_MOD_ALL);
    nm_strip_layout sl;
    ck_assert_int_eq(nm_layer_strip_layout(&s, 1, &sl, &err), NM_OK);
    ck_assert_int_eq(sl.n_rows, 3);
    ck_assert(nm_strip_cell(&sl, 0, NM_MOD_SPECIAL, 0).w == 0);
    nm_polar_layout pl;
    ck_assert_int_eq(nm_polarization_layout(&s, 1, &pl, &err), NM_OK);
    ck_assert_int_eq(pl.n_mods, 3);
    ck_assert(nm_polar_bar(&pl, 0, 2, NM_MOD_SPECIAL, 0).w == 0);
    nm_metrics_free(&m);
}
END_TEST

START_TEST(test_strip_colours) {
    nm_test_rng r = {0xc4a7 + 4};
    const int L = 5, K = 4;
    nm_metrics m;
    metrics_init_ok(&m, L, K);
    for (int smp = 0; smp < 2; smp++) {
        nm_trace_sample s;
        const int count[3] = {[NM_MOD_VISION] = 20, [NM_MOD_TEXT] = 7, [NM_MOD_SPECIAL] = 2};
        sample_make(&s, &r, L, K, count);
        const double p[3] = {0.35, 0.65, 0.5};
        fill_binomial(&s, &r, p);
        for (int t = 0; t < s.n_tokens; t++) {
            *nreal_at(&s, 0, t) = (uint8_t)K; // layer 0: every slot real (intensity 1)
            *nreal_at(&s, 1, t) = 0;          // layer 1: every slot null (intensity 0)
        }
        metrics_add_ok(&m, &s);
        sample_release(&s);
    }
    nm_metrics_finish(&m);
    nm_chart_series s = {&m, "strip", K, 0.5};
    nm_modality_layout ml; // one trace with special tokens: the narrowest modality chart
    nm_error merr = {0};
    ck_assert_int_eq(nm_modality_chart_layout(&s, 1, &ml, &merr), NM_OK);
    assert_group_names_apart(&ml, NM_MOD_SPECIAL, NM_MOD_ALL);
    assert_group_names_apart(&ml, NM_MOD_VISION, NM_MOD_TEXT);
    char *dir = nm_test_tmpdir();
    const char *path = nm_test_path(dir, "strip.png");
    nm_error err = {0};
    ck_assert_msg(nm_render_layer_strip(&s, 1, path, &err) == NM_OK, "%s", err.msg);
    nm_strip_layout lay;
    ck_assert_int_eq(nm_layer_strip_layout(&s, 1, &lay, &err), NM_OK);
    ck_assert_int_eq(lay.n_rows, 4);
    ck_assert(lay.show_values[0]);
    picture p = picture_read(path);
    ck_assert_int_eq(p.w, lay.width);
    ck_assert_int_eq(p.h, lay.height);
    for (int row = 0; row < 4; row++) {
        int mod = row < 3 ? MODS3[row] : NM_MOD_ALL;
        for (int l = 0; l <= L; l++) {
            nm_chart_box c = nm_strip_cell(&lay, 0, mod, l);
            ck_assert(c.w >= 30 && c.x + c.w <= p.w && c.y + c.h <= p.h);
            double v = nm_metrics_layer_intensity(&m, l, mod), rgb[3];
            nm_colormap_rgb(NM_CMAP_VIRIDIS, v, rgb);
            const uint8_t *px = pixel(&p, (int)c.x + 2, (int)c.y + 2);
            ck_assert_msg(near_rgb(px, rgb, 2), "%s layer %d (%.3f): pixel %d,%d,%d", nm_modality_name(mod), l, v,
                          px[0], px[1], px[2]);
            // the value is printed in the cell: pixels that are not the cell colour near its middle
            nm_chart_box mid = {c.x + 3, c.y + 6, c.w - 6, c.h - 12};
            ck_assert_int_lt(count_rgb(&p, mid, rgb), (int)(mid.w * mid.h) - 10);
        }
        // intensity 1 (layer 0) is the bright end of viridis, 0 (layer 1) the dark end
        const uint8_t *hi = pixel(&p, (int)nm_strip_cell(&lay, 0, mod, 0).x + 2, (int)nm_strip_cell(&lay, 0, mod, 0).y + 2);
        const uint8_t *lo = pixel(&p, (int)nm_strip_cell(&lay, 0, mod, 1).x + 2, (int)nm_strip_cell(&lay, 0, mod, 1).y + 2);
        ck_assert_int_gt(hi[0] + hi[1] + hi[2], lo[0] + lo[1] + lo[2] + 300);
    }
    // the colour bar is drawn where the layout says, low end dark, high end bright
    double rgb[3];
    nm_colormap_rgb(NM_CMAP_VIRIDIS, 0.95, rgb);
    ck_assert(near_rgb(pixel(&p, (int)(lay.colorbar.x + 0.95 * lay.colorbar.w), (int)(lay.colorbar.y + 7)), rgb, 12));
    nm_colormap_rgb(NM_CMAP_VIRIDIS, 0.05, rgb);
    ck_assert(near_rgb(pixel(&p, (int)(lay.colorbar.x + 0.05 * lay.colorbar.w), (int)(lay.colorbar.y + 7)), rgb, 12));
    picture_free(&p);
    nm_test_rmtree(dir);
    free(dir);
    nm_metrics_free(&m);
}
END_TEST

// 48 layers beside 4: cells shrink, values drop out, every cell keeps its colour, the colour bar stays.
START_TEST(test_strip_many_layers) {
    nm_test_rng r = {0xc4a7 + 5};
    nm_metrics m[2];
    const int count[3] = {[NM_MOD_VISION] = 16, [NM_MOD_TEXT] = 6, [NM_MOD_SPECIAL] = 2};
    const double prob[3] = {0.3, 0.6, 0.9};
    metrics_random(&m[0], &r, 48, 12, count, prob, 2);
    metrics_random(&m[1], &r, 4, 2, count, prob, 2);
    nm_chart_series s[2] = {{&m[0], "deep", 12, 1.0 / 6}, {&m[1], "shallow", 2, 1.0}};
    char *dir = nm_test_tmpdir();
    const char *path = nm_test_path(dir, "strip48.png");
    nm_error err = {0};
    ck_assert_msg(nm_render_layer_strip(s, 2, path, &err) == NM_OK, "%s", err.msg);
    nm_strip_layout lay;
    ck_assert_int_eq(nm_layer_strip_layout(s, 2, &lay, &err), NM_OK);
    ck_assert_int_eq(lay.show_values[0], 0); // 48 layers: no room for values
    ck_assert_int_eq(lay.show_values[1], 1); // 4 layers beside it keep theirs
    ck_assert_int_eq(lay.max_layers, 48);
    ck_assert(lay.cell_w[0] >= 8 && lay.cell_w[0] < 30);
    ck_assert_int_le(lay.width, 1400);
    picture p = picture_read(path);
    ck_assert_int_eq(p.w, lay.width);
    ck_assert_int_eq(p.h, lay.height);
    for (int i = 0; i < 2; i++)
        for (int row = 0; row < lay.n_rows; row++) {
            int mod = lay.row_mod[row];
            for (int l = 0; l <= m[i].n_layers; l++) {
                nm_chart_box c = nm_strip_cell(&lay, i, mod, l);
                double rgb[3];
                nm_colormap_rgb(NM_CMAP_VIRIDIS, nm_metrics_layer_intensity(&m[i], l, mod), rgb);
                ck_assert(near_rgb(pixel(&p, (int)c.x + 2, (int)c.y + 2), rgb, 2));
                // no value printed in the deep strip: one colour at its centre too
                if (i == 0) ck_assert(near_rgb(pixel(&p, (int)(c.x + c.w / 2), (int)(c.y + c.h / 2)), rgb, 2));
            }
        }
    // cells of one row do not overlap, the mean column sits right of the last layer
    nm_chart_box a = nm_strip_cell(&lay, 0, NM_MOD_ALL, 46), b = nm_strip_cell(&lay, 0, NM_MOD_ALL, 47);
    ck_assert(a.x + a.w <= b.x);
    ck_assert(nm_strip_cell(&lay, 0, NM_MOD_ALL, 48).x > b.x + b.w);
    nm_chart_box c = nm_strip_cell(&lay, 1, NM_MOD_ALL, 3), mean = nm_strip_cell(&lay, 1, NM_MOD_ALL, 4);
    ck_assert(mean.x > c.x + c.w && mean.w == c.w && c.w >= 30);
    ck_assert(nm_strip_cell(&lay, 1, NM_MOD_ALL, 5).w == 0);
    ck_assert(nm_strip_cell(&lay, 1, NM_MOD_ALL, 0).y > nm_strip_cell(&lay, 0, NM_MOD_VISION, 0).y + 4 * lay.cell_h);
    double rgb[3];
    nm_colormap_rgb(NM_CMAP_VIRIDIS, 0.5, rgb);
    ck_assert(near_rgb(pixel(&p, (int)(lay.colorbar.x + 0.5 * lay.colorbar.w), (int)(lay.colorbar.y + 7)), rgb, 12));
    picture_free(&p);
    nm_test_rmtree(dir);
    free(dir);
    nm_metrics_free(&m[0]);
    nm_metrics_free(&m[1]);
}
END_TEST

START_TEST(test_polarization) {
    nm_test_rng r = {0xc4a7 + 6};
    nm_metrics m[2];
    // trace 0 (K = 4): vision always all-null, text always all-real, special random
    const int K = 4, L = 3;
    metrics_init_ok(&m[0], L, K);
    for (int smp = 0; smp < 3; smp++) {
        nm_trace_sample s;
        const int count[3] = {[NM_MOD_VISION] = 25, [NM_MOD_TEXT] = 11, [NM_MOD_SPECIAL] = 3};
        sample_make(&s, &r, L, K, count);
        const double p[3] = {[NM_MOD_SPECIAL] = 0.5};
        fill_binomial(&s, &r, p);
        for (int l = 0; l < L; l++)
            for (int t = 0; t < s.n_tokens; t++)
                if (s.modality[t] != NM_MOD_SPECIAL) *nreal_at(&s, l, t) = s.modality[t] == NM_MOD_TEXT ? (uint8_t)K : 0;
        metrics_add_ok(&m[0], &s);
        sample_release(&s);
    }
    nm_metrics_finish(&m[0]);
    // trace 1 (K = 1): random
    const int count[3] = {[NM_MOD_VISION] = 20, [NM_MOD_TEXT] = 10, [NM_MOD_SPECIAL] = 2};
    const double p1[3] = {0.7, 0.3, 0.5};
    metrics_random(&m[1], &r, 2, 1, count, p1, 2);
    nm_chart_series s[2] = {{&m[0], "polarized", K, 0.5}, {&m[1], "K=1", 1, 0.5}};
    char *dir = nm_test_tmpdir();
    const char *path = nm_test_path(dir, "polar.png");
    nm_error err = {0};
    ck_assert_msg(nm_render_polarization(s, 2, path, &err) == NM_OK, "%s", err.msg);
    nm_polar_layout lay;
    ck_assert_int_eq(nm_polarization_layout(s, 2, &lay, &err), NM_OK);
    ck_assert_int_eq(lay.n_panels, 2);
    ck_assert_int_eq(lay.n_mods, 4);
    picture p = picture_read(path);
    ck_assert_int_eq(p.w, lay.width);
    ck_assert_int_eq(p.h, lay.height);
    double blue[3], orange[3];
    nm_chart_modality_rgb(NM_MOD_VISION, blue);
    nm_chart_modality_rgb(NM_MOD_TEXT, orange);
    assert_bar(&p, nm_polar_bar(&lay, 0, K, NM_MOD_VISION, 0), 1.0, blue, "vision n_real=0");
    assert_bar(&p, nm_polar_bar(&lay, 0, K, NM_MOD_TEXT, K), 1.0, orange, "text n_real=K");
    for (int k = 1; k <= K; k++) ck_assert_int_eq(count_rgb(&p, nm_polar_bar(&lay, 0, K, NM_MOD_VISION, k), blue), 0);
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < lay.n_mods; j++) {
            int mod = lay.mods[j], Ki = m[i].top_k;
            double rgb[3];
            nm_chart_modality_rgb(mod, rgb);
            for (int k = 0; k <= Ki; k++) {
                double v = (double)nm_metrics_polarization(&m[i], m[i].n_layers, mod, k) /
                           (double)nm_metrics_pairs(&m[i], m[i].n_layers, mod);
                char what[64];
                snprintf(what, sizeof what, "trace %d %s n_real=%d", i, nm_modality_name(mod), k);
                assert_bar(&p, nm_polar_bar(&lay, i, Ki, mod, k), v, rgb, what);
            }
        }
    ck_assert(nm_polar_bar(&lay, 1, 1, NM_MOD_ALL, 2).w == 0); // k beyond K
    picture_free(&p);
    nm_test_rmtree(dir);
    free(dir);
    nm_metrics_free(&m[0]);
    nm_metrics_free(&m[1]);
}
END_TEST

START_TEST(test_polarization_layers) {
    nm_test_rng r = {0xc4a7 + 7};
    const int L = 3, K = 6;
    nm_metrics m;
    metrics_init_ok(&m, L, K);
    nm_trace_sample smp;
    const int count[3] = {[NM_MOD_VISION] = 9, [NM_MOD_TEXT] = 5};
    sample_make(&smp, &r, L, K, count);
    for (int l = 0; l < L; l++)
        for (int t = 0; t < smp.n_tokens; t++) *nreal_at(&smp, l, t) = (uint8_t)(2 * l); // layer l: n_real = 2l
    metrics_add_ok(&m, &smp);
    sample_release(&smp);
    nm_metrics_finish(&m);
    nm_chart_series s = {&m, "layers", K, 0.5};
    char *dir = nm_test_tmpdir();
    const char *path = nm_test_path(dir, "layers.png");
    nm_error err = {0};
    ck_assert_msg(nm_render_polarization_layers(&s, path, &err) == NM_OK, "%s", err.msg);
    nm_polar_layout lay;
    ck_assert_int_eq(nm_polarization_layers_layout(&s, &lay, &err), NM_OK);
    ck_assert_int_eq(lay.n_panels, L + 1);
    picture p = picture_read(path);
    ck_assert_int_eq(p.w, lay.width);
    ck_assert_int_eq(p.h, lay.height);
    double dark[3];
    nm_chart_modality_rgb(NM_MOD_ALL, dark);
    for (int l = 0; l < L; l++)
        for (int k = 0; k <= K; k++) {
            nm_chart_box b = nm_polar_bar(&lay, 1 + l, K, NM_MOD_ALL, k);
            assert_bar(&p, b, k == 2 * l ? 1.0 : 0.0, dark, "layer panel");
            // panel 0 = all layers: a third of the pairs at each of 0, 2, 4
            assert_bar(&p, nm_polar_bar(&lay, 0, K, NM_MOD_ALL, k), (k % 2 == 0 && k < 2 * L) ? 1.0 / 3 : 0.0, dark,
                       "all-layers panel");
        }
    // panels do not overlap
    nm_chart_box a = nm_polar_plot(&lay, 0), b = nm_polar_plot(&lay, 1);
    ck_assert(a.x + a.w < b.x || a.y + a.h < b.y);
    picture_free(&p);
    nm_test_rmtree(dir);
    free(dir);
    nm_metrics_free(&m);
}
END_TEST

START_TEST(test_zero_vs_null) {
    nm_test_rng r = {0xc4a7 + 8};
    nm_metrics m[3];
    // trace 0: vision always all-null (point at (1, 1)), text random
    const int L = 2, K = 4;
    metrics_init_ok(&m[0], L, K);
    nm_trace_sample smp;
    const int count[3] = {[NM_MOD_VISION] = 20, [NM_MOD_TEXT] = 10, [NM_MOD_SPECIAL] = 1};
    sample_make(&smp, &r, L, K, count);
    const double p0[3] = {[NM_MOD_TEXT] = 0.75, [NM_MOD_SPECIAL] = 0.5};
    fill_binomial(&smp, &r, p0);
    metrics_add_ok(&m[0], &smp);
    sample_release(&smp);
    nm_metrics_finish(&m[0]);
    const double p1[3] = {0.5, 0.5, 0.5}, p2[3] = {0.9, 0.2, 0.5};
    metrics_random(&m[1], &r, 3, 8, count, p1, 2);
    metrics_random(&m[2], &r, 3, 1, count, p2, 2);
    nm_chart_series s[3] = {{&m[0], "a", K, 0.5}, {&m[1], "b", 8, 0.25}, {&m[2], "c", 1, 1.0}};
    char *dir = nm_test_tmpdir();
    const char *path = nm_test_path(dir, "zn.png");
    nm_error err = {0};
    ck_assert_msg(nm_render_zero_vs_null(s, 3, path, &err) == NM_OK, "%s", err.msg);
    nm_zero_null_layout lay;
    ck_assert_int_eq(nm_zero_vs_null_layout(s, 3, &lay, &err), NM_OK);
    picture p = picture_read(path);
    ck_assert_int_eq(p.w, lay.width);
    ck_assert_int_eq(p.h, lay.height);
    nm_chart_box pl = lay.plot;
    // every marker with no other point within 16 px shows its modality colour at its centre
    const int mods[3] = {NM_MOD_VISION, NM_MOD_TEXT, NM_MOD_ALL};
    double xs[9], ys[9];
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 3; j++) {
            xs[i * 3 + j] = pl.x + (1 - m[i].intensity[mods[j]]) * pl.w;
            ys[i * 3 + j] = pl.y + (1 - nm_metrics_zero_compute(&m[i], m[i].n_layers, mods[j])) * pl.h;
        }
    int checked = 0;
    for (int q = 0; q < 9; q++) {
        int alone = 1;
        for (int o = 0; o < 9; o++)
            if (o != q && hypot(xs[o] - xs[q], ys[o] - ys[q]) < 16) alone = 0;
        if (!alone) continue;
        double rgb[3];
        nm_chart_modality_rgb(mods[q % 3], rgb);
        const uint8_t *px = pixel(&p, (int)floor(xs[q]), (int)floor(ys[q]));
        ck_assert_msg(near_rgb(px, rgb, 40), "point %d at (%.1f, %.1f): %d,%d,%d", q, xs[q], ys[q], px[0], px[1], px[2]);
        checked++;
    }
    ck_assert_int_ge(checked, 4);
    ck_assert_msg(fabs(xs[0] - (pl.x + pl.w)) < 1e-9 && fabs(ys[0] - pl.y) < 1e-9, "all-null vision at (1, 1)");
    // the y = x line passes through the middle of the plot
    ck_assert(!is_white(pixel(&p, (int)(pl.x + 0.5 * pl.w), (int)(pl.y + 0.5 * pl.h))));
    picture_free(&p);
    nm_test_rmtree(dir);
    free(dir);
    for (int i = 0; i < 3; i++) nm_metrics_free(&m[i]);
}
END_TEST

// Every chart renders 8 series; SVG and PDF come out as such.
START_TEST(test_formats_and_many_series) {
    nm_test_rng r = {0xc4a7 + 9};
    nm_metrics m[8];
    nm_chart_series s[8];
    char labels[8][64];
    for (int i = 0; i < 8; i++) {
        const int count[3] = {[NM_MOD_VISION] = 10 + i, [NM_MOD_TEXT] = 6, [NM_MOD_SPECIAL] = 2};
        const double p[3] = {0.1 + 0.1 * i, 0.8 - 0.05 * i, 0.5};
        int K = 1 + i;
        metrics_random(&m[i], &r, 2 + i, K, count, p, 1);
        nm_config cfg;
        memset(&cfg, 0, sizeof cfg);
        cfg.moe.top_k = K;
        cfg.moe.num_experts = 16;
        cfg.moe.null_copies = 4 * i;
        nm_chart_label(labels[i], sizeof labels[i], &cfg);
        s[i] = (nm_chart_series){&m[i], labels[i], K, nm_config_rho(&cfg)};
    }
    char *dir = nm_test_tmpdir();
    nm_error err = {0};
    const char *exts[3] = {"png", "svg", "pdf"};
    for (int e = 0; e < 3; e++) {
        char name[5][32];
        snprintf(name[0], 32, "mod.%s", exts[e]);
        snprintf(name[1], 32, "polar.%s", exts[e]);
        snprintf(name[2], 32, "layers.%s", exts[e]);
        snprintf(name[3], 32, "zn.%s", exts[e]);
        snprintf(name[4], 32, "strip.%s", exts[e]);
        ck_assert_msg(nm_render_modality_chart(s, 8, nm_test_path(dir, name[0]), &err) == NM_OK, "%s", err.msg);
        ck_assert_msg(nm_render_polarization(s, 8, nm_test_path(dir, name[1]), &err) == NM_OK, "%s", err.msg);
        ck_assert_msg(nm_render_polarization_layers(&s[7], nm_test_path(dir, name[2]), &err) == NM_OK, "%s", err.msg);
        ck_assert_msg(nm_render_zero_vs_null(s, 8, nm_test_path(dir, name[3]), &err) == NM_OK, "%s", err.msg);
        ck_assert_msg(nm_render_layer_strip(s, 8, nm_test_path(dir, name[4]), &err) == NM_OK, "%s", err.msg);
        for (int k = 0; k < 5; k++) {
            FILE *f = fopen(nm_test_path(dir, name[k]), "rb");
            ck_assert_ptr_nonnull(f);
            char head[16] = {0};
            size_t got = fread(head, 1, sizeof head - 1, f);
            fclose(f);
            ck_assert_int_ge((int)got, 4);
            if (e == 0) ck_assert(!memcmp(head, "\x89PNG", 4));
            else if (e == 1) ck_assert_msg(!strncmp(head, "<?xml", 5) || !strncmp(head, "<svg", 4), "%s", head);
            else ck_assert(!strncmp(head, "%PDF", 4));
        }
    }
    ck_assert_int_eq(file_count(dir), 15); // nothing else (no temporary files) left beside them
    // the 8-series modality chart keeps its bars apart and inside the picture
    nm_modality_layout lay;
    ck_assert_int_eq(nm_modality_chart_layout(s, 8, &lay, &err), NM_OK);
    picture p = picture_read(nm_test_path(dir, "mod.png"));
    ck_assert_int_eq(p.w, lay.width);
    ck_assert_int_eq(p.h, lay.height);
    for (int i = 0; i < 8; i++) {
        nm_chart_box b = lay.bar[NM_CHART_INTENSITY][NM_MOD_VISION][i];
        ck_assert(b.x + b.w <= p.w);
        if (i > 0) ck_assert(b.x >= lay.bar[NM_CHART_INTENSITY][NM_MOD_VISION][i - 1].x + b.w);
        double rgb[3];
        nm_chart_series_rgb(NM_MOD_VISION, i, 8, rgb);
        assert_bar(&p, b, m[i].intensity[NM_MOD_VISION], rgb, "8 series");
    }
    picture_free(&p);
    nm_test_rmtree(dir);
    free(dir);
    for (int i = 0; i < 8; i++) nm_metrics_free(&m[i]);
}
END_TEST

typedef nm_status (*render_fn)(const nm_chart_series *, int, const char *, nm_error *);
static nm_status render_layers1(const nm_chart_series *s, int n, const char *path, nm_error *err) {
    (void)n;
    return nm_render_polarization_layers(s, path, err);
}
static const render_fn RENDERERS[5] = {nm_render_modality_chart, nm_render_polarization, render_layers1,
                                       nm_render_zero_vs_null, nm_render_layer_strip};

START_TEST(test_errors) {
    nm_test_rng r = {0xc4a7 + 10};
    nm_metrics m;
    const int count[3] = {4, 5, 1};
    const double p[3] = {0.4, 0.6, 0.5};
    metrics_random(&m, &r, 2, 3, count, p, 1);
    nm_chart_series s = {&m, "x", 3, 0.5};
    char *dir = nm_test_tmpdir();
    ck_assert_int_eq(nm_test_write_file(nm_test_path(dir, "afile"), "x", 1), 0);
    for (int k = 0; k < 5; k++) {
        nm_error err = {0};
        const char *bad_ext[3] = {"chart.jpg", "chart", "chart.png.txt"};
        for (int e = 0; e < 3; e++) {
            ck_assert_int_eq(RENDERERS[k](&s, 1, nm_test_path(dir, bad_ext[e]), &err), NM_ERR_INVALID);
            ck_assert(strlen(err.msg) > 0);
        }
        // a directory that does not exist, a path through a regular file: I/O errors, nothing left
        ck_assert_int_eq(RENDERERS[k](&s, 1, nm_test_path(dir, "missing/chart.png"), &err), NM_ERR_IO);
        ck_assert_int_eq(RENDERERS[k](&s, 1, nm_test_path(dir, "missing/chart.svg"), &err), NM_ERR_IO);
        ck_assert_int_eq(RENDERERS[k](&s, 1, nm_test_path(dir, "afile/chart.pdf"), &err), NM_ERR_IO);
        ck_assert_int_eq(file_count(dir), 1);
        // bad series
        ck_assert_int_eq(RENDERERS[k](NULL, 1, nm_test_path(dir, "c.png"), &err), NM_ERR_INVALID);
        nm_chart_series wrong_k = {&m, "x", 5, 0.5};
        ck_assert_int_eq(RENDERERS[k](&wrong_k, 1, nm_test_path(dir, "c.png"), &err), NM_ERR_INVALID);
        nm_metrics empty;
        memset(&empty, 0, sizeof empty);
        nm_chart_series none = {&empty, "x", 0, 0.5};
        ck_assert_int_eq(RENDERERS[k](&none, 1, nm_test_path(dir, "c.png"), &err), NM_ERR_INVALID);
        nm_chart_series nom = {NULL, "x", 0, 0.5};
        ck_assert_int_eq(RENDERERS[k](&nom, 1, nm_test_path(dir, "c.png"), &err), NM_ERR_INVALID);
        ck_assert_int_eq(file_count(dir), 1);
    }
    nm_chart_series many[NM_CHART_MAX_SERIES + 1];
    for (int i = 0; i <= NM_CHART_MAX_SERIES; i++) many[i] = s;
    nm_error err = {0};
    ck_assert_int_eq(nm_render_modality_chart(many, 0, nm_test_path(dir, "c.png"), &err), NM_ERR_INVALID);
    ck_assert_int_eq(nm_render_modality_chart(many, NM_CHART_MAX_SERIES + 1, nm_test_path(dir, "c.png"), &err),
                     NM_ERR_LIMIT);
    ck_assert_int_eq(nm_render_layer_strip(many, NM_CHART_MAX_SERIES, nm_test_path(dir, "c.png"), &err), NM_OK);
    ck_assert_int_eq(file_count(dir), 2);
    nm_test_rmtree(dir);
    free(dir);
    nm_metrics_free(&m);
}
END_TEST

// An empty trace (no tokens) draws n/a everywhere rather than failing or drawing zero bars.
START_TEST(test_empty_trace) {
    nm_metrics m;
    metrics_init_ok(&m, 2, 4);
    nm_metrics_finish(&m);
    nm_chart_series s = {&m, "empty", 4, 0.5};
    char *dir = nm_test_tmpdir();
    for (int k = 0; k < 5; k++) {
        char name[16];
        snprintf(name, sizeof name, "e%d.png", k);
        nm_error err = {0};
        ck_assert_msg(RENDERERS[k](&s, 1, nm_test_path(dir, name), &err) == NM_OK, "%d: %s", k, err.msg);
    }
    nm_modality_layout lay;
    nm_error err = {0};
    ck_assert_int_eq(nm_modality_chart_layout(&s, 1, &lay, &err), NM_OK);
    picture p = picture_read(nm_test_path(dir, "e0.png"));
    for (int panel = 0; panel < NM_CHART_PANELS; panel++)
        for (int mod = 0; mod <= NM_MOD_ALL; mod++) {
            nm_chart_box b = lay.bar[panel][mod][0];
            if (b.w <= 0) continue;
            double rgb[3];
            nm_chart_series_rgb(mod, 0, 1, rgb);
            assert_no_bar(&p, b, rgb, nm_modality_name(mod));
        }
    picture_free(&p);
    nm_test_rmtree(dir);
    free(dir);
    nm_metrics_free(&m);
}
END_TEST

START_TEST(test_label) {
    nm_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.moe.top_k = 8;
    cfg.moe.num_experts = 16;
    cfg.moe.null_copies = 16;
    char buf[128];
    nm_chart_label(buf, sizeof buf, &cfg);
    ck_assert_str_eq(buf, "K=8, \xcf\x81=0.50 (N=16, M=16)");
    cfg.moe.top_k = 12;
    cfg.moe.null_copies = 80;
    nm_chart_label(buf, sizeof buf, &cfg);
    ck_assert_str_eq(buf, "K=12, \xcf\x81=0.17 (N=16, M=80)");
    cfg.moe.top_k = 2;
    cfg.moe.null_copies = 0;
    nm_chart_label(buf, sizeof buf, &cfg);
    ck_assert_str_eq(buf, "K=2, \xcf\x81=1.00 (N=16, M=0)");
    cfg.moe.num_experts = 0; // a trace that did not record N and M
    nm_chart_label(buf, sizeof buf, &cfg);
    ck_assert_str_eq(buf, "K=2");
    cfg.moe.num_experts = 16;
    memset(buf, 'x', sizeof buf);
    nm_chart_label(buf, 6, &cfg);
    ck_assert_int_le((int)strlen(buf), 5);
    nm_chart_label(buf, 0, &cfg); // no room: no write
    nm_chart_label(buf, sizeof buf, NULL);
    ck_assert_str_eq(buf, "");
}
END_TEST

// Labels are the caller's text: invalid UTF-8 and very long labels still draw (cairo would
// otherwise put the whole picture into an error state).
START_TEST(test_odd_labels) {
    nm_test_rng r = {0xc4a7 + 11};
    nm_metrics m;
    const int count[3] = {6, 4, 1};
    const double p[3] = {0.4, 0.6, 0.5};
    metrics_random(&m, &r, 2, 3, count, p, 1);
    char longl[2000];
    for (size_t i = 0; i < sizeof longl - 1; i++) longl[i] = i % 3 == 2 ? '\xc3' : i % 3 == 0 ? '\xa9' : 'e';
    longl[sizeof longl - 1] = 0;
    nm_chart_series s[2] = {{&m, "bad \xff\xfe utf-8 \xe2\x82", 0, 0.5}, {&m, longl, 0, 0.5}};
    char *dir = nm_test_tmpdir();
    for (int k = 0; k < 5; k++) {
        char name[16];
        snprintf(name, sizeof name, "o%d.png", k);
        nm_error err = {0};
        ck_assert_msg(RENDERERS[k](s, k == 2 ? 1 : 2, nm_test_path(dir, name), &err) == NM_OK, "%d: %s", k, err.msg);
        ck_assert_msg(RENDERERS[k](s + 1, 1, nm_test_path(dir, name), &err) == NM_OK, "%d: %s", k, err.msg);
    }
    nm_test_rmtree(dir);
    free(dir);
    nm_metrics_free(&m);
}
END_TEST

NM_TEST_SUITE(charts) {
    Suite *s = suite_create("charts");
    TCase *tc = tcase_create("charts");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_modality_bars);
    tcase_add_test(tc, test_modality_undefined_and_na);
    tcase_add_test(tc, test_no_special_tokens);
    tcase_add_test(tc, test_strip_colours);
    tcase_add_test(tc, test_strip_many_layers);
    tcase_add_test(tc, test_polarization);
    tcase_add_test(tc, test_polarization_layers);
    tcase_add_test(tc, test_zero_vs_null);
    tcase_add_test(tc, test_formats_and_many_series);
    tcase_add_test(tc, test_errors);
    tcase_add_test(tc, test_empty_trace);
    tcase_add_test(tc, test_label);
    tcase_add_test(tc, test_odd_labels);
    suite_add_tcase(s, tc);
    return s;
}
