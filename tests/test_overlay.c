// test_overlay.c — the compute-map overlay (viz/nm_overlay.c).
//
// Samples are hand-made (BOS, <img>, a 4x4 patch grid, </img>, a prompt with "é" and a newline,
// an answer, EOS) with chosen n_real for the tokens under test and fresh random values for all
// others; the image is a synthetic mid-grey random texture. Pictures are rendered to PNG in a
// temporary directory and decoded with libpng; the checks read pixels where the layout says an
// element is (no golden files: fonts differ between machines).
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <png.h>

#include "nm_metrics.h"
#include "nm_overlay.h"
#include "test_util.h"

#define L_ 4 // layers
#define K_ 8 // top-K

// ---------------------------------------------------------------------------------------------
// Sample construction

typedef struct {
    int32_t id;
    int mod, seg, r, c;
    char text[32];
} tok_spec;

typedef struct {
    tok_spec *t;
    int n, cap;
} tok_list;

static void push(tok_list *l, int32_t id, int mod, int seg, int r, int c, const char *text) {
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 64;
        l->t = realloc(l->t, (size_t)l->cap * sizeof *l->t);
        ck_assert_ptr_nonnull(l->t);
    }
    tok_spec *t = &l->t[l->n++];
    t->id = id;
    t->mod = mod;
    t->seg = seg;
    t->r = r;
    t->c = c;
    snprintf(t->text, sizeof t->text, "%s", text);
}

// Byte tokens of a UTF-8 string with the tokenizer's display rules: the lead byte carries the
// whole character, continuation bytes "", control characters their Unicode control picture.
static void push_text(tok_list *l, const char *str, int seg) {
    const unsigned char *p = (const unsigned char *)str;
    size_t n = strlen(str);
    for (size_t i = 0; i < n;) {
        unsigned c = p[i];
        char buf[8] = {0};
        int len = c < 0x80 ? 1 : c >= 0xf0 ? 4 : c >= 0xe0 ? 3 : 2;
        if (c < 0x20) {
            unsigned cp = 0x2400 + c;
            buf[0] = (char)(0xe0 | (cp >> 12));
            buf[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
            buf[2] = (char)(0x80 | (cp & 0x3f));
        } else {
            memcpy(buf, p + i, (size_t)len);
        }
        push(l, c, NM_MOD_TEXT, seg, -1, -1, buf);
        for (int k = 1; k < len; k++) push(l, p[i + k], NM_MOD_TEXT, seg, -1, -1, "");
        i += (size_t)len;
    }
}

// The sample: [BOS, <img>, 4x4 patches, </img>,] prompt, answer, EOS; random n_real.
static void make_sample(nm_trace_sample *s, nm_test_rng *rng, int with_image, const char *prompt, const char *answer) {
    tok_list l = {0};
    push(&l, 256, NM_MOD_SPECIAL, NM_SEG_BOS, -1, -1, "<bos>");
    if (with_image) {
        push(&l, 258, NM_MOD_SPECIAL, NM_SEG_IMAGE, -1, -1, "<img>");
        for (int r = 0; r < 4; r++)
            for (int c = 0; c < 4; c++) {
                char b[32];
                snprintf(b, sizeof b, "<patch %d,%d>", r, c);
                push(&l, -1, NM_MOD_VISION, NM_SEG_IMAGE, r, c, b);
            }
        push(&l, 259, NM_MOD_SPECIAL, NM_SEG_IMAGE, -1, -1, "</img>");
    }
    push_text(&l, prompt, NM_SEG_PROMPT);
    int n_prompt = l.n;
    push_text(&l, answer, NM_SEG_ANSWER);
    push(&l, 257, NM_MOD_SPECIAL, NM_SEG_ANSWER, -1, -1, "<eos>");

    nm_error err = {0};
    ck_assert_int_eq(nm_trace_sample_init(s, L_, K_, l.n + 3, &err), NM_OK); // spare capacity: stride check
    s->n_tokens = l.n;
    s->n_prompt_tokens = n_prompt;
    s->prompt = strdup(prompt);
    s->answer = strdup(answer);
    if (with_image) {
        s->image_path = strdup("/nonexistent/dir/texture.png");
        s->image_width = 200;
        s->image_height = 160;
        s->grid_rows = s->grid_cols = 4;
    }
    for (int t = 0; t < l.n; t++) {
        s->token_id[t] = l.t[t].id;
        s->modality[t] = (uint8_t)l.t[t].mod;
        s->segment[t] = (uint8_t)l.t[t].seg;
        s->patch[2 * t] = (int16_t)l.t[t].r;
        s->patch[2 * t + 1] = (int16_t)l.t[t].c;
        s->token_text[t] = strdup(l.t[t].text);
        ck_assert_ptr_nonnull(s->token_text[t]);
    }
    for (int t = l.n; t < s->capacity; t++) s->token_text[t] = NULL;
    for (int ly = 0; ly < L_; ly++)
        for (int t = 0; t < s->capacity; t++) {
            int nr = (int)(nm_test_rng_next(rng) % (K_ + 1));
            s->n_real[ly * s->capacity + t] = (uint8_t)(t < l.n ? nr : 255); // the tail must never be read
            for (int k = 0; k < K_; k++) {
                size_t i = ((size_t)ly * s->capacity + t) * K_ + k;
                s->slot[i] = (int16_t)(k < nr ? k : -1);
                s->prob[i] = 0.1f;
                s->gate[i] = k < nr ? 1.0f / nr : 0;
            }
            s->null_mass[ly * s->capacity + t] = 0.5f;
            s->lse[ly * s->capacity + t] = 1.0f;
        }
    free(l.t);
}

static void set_real(nm_trace_sample *s, int layer, int t, int n) { s->n_real[layer * s->capacity + t] = (uint8_t)n; }

static int find_patch(const nm_trace_sample *s, int r, int c) {
    for (int t = 0; t < s->n_tokens; t++)
        if (s->modality[t] == NM_MOD_VISION && s->patch[2 * t] == r && s->patch[2 * t + 1] == c) return t;
    ck_abort_msg("no patch %d,%d", r, c);
    return -1;
}

// The t-th token (0-based, among those with display text `text`) of segment seg.
static int find_text(const nm_trace_sample *s, int seg, const char *text, int nth) {
    for (int t = 0; t < s->n_tokens; t++)
        if (s->segment[t] == seg && !strcmp(s->token_text[t], text) && nth-- == 0) return t;
    ck_abort_msg("no token '%s' in segment %d", text, seg);
    return -1;
}

static void make_image(nm_image *img, nm_test_rng *rng, int w, int h) {
    img->width = w;
    img->height = h;
    img->rgb = malloc((size_t)w * h * 3);
    ck_assert_ptr_nonnull(img->rgb);
    for (size_t i = 0; i < (size_t)w * h * 3; i++) img->rgb[i] = (uint8_t)(80 + nm_test_rng_next(rng) % 121);
}

// ---------------------------------------------------------------------------------------------
// Decoded pictures

typedef struct {
    int w, h;
    uint8_t *rgb;
} picture;

static void read_png(picture *p, const char *path) {
    png_image im;
    memset(&im, 0, sizeof im);
    im.version = PNG_IMAGE_VERSION;
    ck_assert_msg(png_image_begin_read_from_file(&im, path), "%s: %s", path, im.message);
    im.format = PNG_FORMAT_RGB;
    p->w = (int)im.width;
    p->h = (int)im.height;
    p->rgb = malloc(PNG_IMAGE_SIZE(im));
    ck_assert_ptr_nonnull(p->rgb);
    ck_assert_msg(png_image_finish_read(&im, NULL, p->rgb, 0, NULL), "%s: %s", path, im.message);
}

static const uint8_t *px(const picture *p, int x, int y) {
    ck_assert(x >= 0 && y >= 0 && x < p->w && y < p->h);
    return p->rgb + ((size_t)y * p->w + x) * 3;
}

static double lum(const uint8_t *c) { return (0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]) / 255.0; }

// Mean luminance over the pixels of a box (shrunk by `in` px each side).
static double box_lum(const picture *p, const nm_box *b, int in) {
    int x0 = (int)ceil(b->x) + in, x1 = (int)floor(b->x + b->w) - in, y0 = (int)ceil(b->y) + in,
        y1 = (int)floor(b->y + b->h) - in;
    ck_assert(x1 > x0 && y1 > y0);
    double sum = 0;
    for (int y = y0; y < y1; y++)
        for (int x = x0; x < x1; x++) sum += lum(px(p, x, y));
    return sum / ((double)(x1 - x0) * (y1 - y0));
}

// Most frequent grey level (0..255) in a box: a token cell's background.
static int box_mode(const picture *p, const nm_box *b) {
    int hist[256] = {0}, best = 0;
    for (int y = (int)ceil(b->y); y < (int)floor(b->y + b->h); y++)
        for (int x = (int)ceil(b->x); x < (int)floor(b->x + b->w); x++) hist[(int)lround(lum(px(p, x, y)) * 255)]++;
    for (int i = 1; i < 256; i++)
        if (hist[i] > hist[best]) best = i;
    return best;
}

static int box_dark_pixels(const picture *p, const nm_box *b, double below) {
    int n = 0;
    for (int y = (int)ceil(b->y); y < (int)floor(b->y + b->h); y++)
        for (int x = (int)ceil(b->x); x < (int)floor(b->x + b->w); x++) n += lum(px(p, x, y)) < below;
    return n;
}

// The display box of patch cell (r, c) of a 4x4 grid in image box b.
static nm_box cell_box(const nm_box *b, int r, int c) {
    return (nm_box){b->x + b->w * c / 4, b->y + b->h * r / 4, b->w / 4, b->h / 4};
}

// Checks that every pixel inside cell (r, c) of the right image (2 px in from the cell edges,
// where the faint grid lines are) is `score` x the original pixel (gray map, alpha = 1) within 1,
// and that the left image there equals the original.
static void check_cell(const picture *p, const nm_overlay_layout *lay, const nm_image *img, int r, int c, double score) {
    const nm_box *rb = &lay->right_image, *lb = &lay->left_image;
    nm_box cb = cell_box(rb, r, c);
    int bad = 0, n = 0;
    for (int y = (int)ceil(cb.y) + 2; y < (int)floor(cb.y + cb.h) - 2; y++)
        for (int x = (int)ceil(cb.x) + 2; x < (int)floor(cb.x + cb.w) - 2; x++) {
            int sx = (int)((x - rb->x) * img->width / rb->w), sy = (int)((y - rb->y) * img->height / rb->h);
            const uint8_t *o = img->rgb + ((size_t)sy * img->width + sx) * 3;
            const uint8_t *q = px(p, x, y);
            const uint8_t *ql = px(p, (int)(x - rb->x + lb->x), (int)(y - rb->y + lb->y));
            for (int k = 0; k < 3; k++) {
                bad += fabs(q[k] - o[k] * score) > 1.01;
                bad += ql[k] != o[k];
            }
            n++;
        }
    ck_assert_int_gt(n, 100);
    ck_assert_msg(bad == 0, "cell %d,%d (score %.3f): %d of %d pixel values off", r, c, score, bad, n * 6);
}

static char *render_png(const nm_trace_sample *s, const nm_image *img, int layer, const nm_overlay_opts *o,
                        const char *dir, const char *name, picture *p) {
    nm_error err = {0};
    const char *path = nm_test_path(dir, name);
    nm_status st = nm_render_overlay(s, img, layer, o, NULL, path, &err);
    ck_assert_msg(st == NM_OK, "render %s: %s", name, err.msg);
    read_png(p, path);
    return strdup(path);
}

static void layout_ok(nm_overlay_layout *lay, const nm_trace_sample *s, const nm_image *img, const nm_overlay_opts *o) {
    nm_error err = {0};
    nm_status st = nm_overlay_layout_compute(lay, s, img, o, &err);
    ck_assert_msg(st == NM_OK, "layout: %s", err.msg);
}

// Every drawn box lies in its panel and inside the picture, left and right agree, and no two
// drawn boxes overlap.
static void check_boxes(const nm_overlay_layout *lay) {
    const nm_box *lp = &lay->left_panel, *rp = &lay->right_panel;
    double dx = rp->x - lp->x;
    ck_assert(lp->x >= 0 && rp->x + rp->w <= lay->width + 1e-9);
    ck_assert(lp->x + lp->w <= rp->x);
    for (int t = 0; t < lay->n_tokens; t++) {
        const nm_box *b = &lay->token_box[t], *bl = &lay->token_box_left[t];
        if (b->w <= 0) {
            ck_assert(bl->w <= 0);
            continue;
        }
        ck_assert_msg(b->x >= rp->x - 1e-9 && b->x + b->w <= rp->x + rp->w + 1e-9, "token %d x %.1f+%.1f outside panel", t,
                      b->x, b->w);
        ck_assert_msg(b->y >= rp->y - 1e-9 && b->y + b->h <= rp->y + rp->h + 1e-9, "token %d y outside panel", t);
        ck_assert(b->y + b->h < lay->height);
        ck_assert(fabs(bl->x + dx - b->x) < 1e-9 && bl->y == b->y && bl->w == b->w && bl->h == b->h);
    }
    // boxes in reading order never overlap: compare each with the next drawn one
    int prev = -1;
    for (int t = 0; t < lay->n_tokens; t++) {
        const nm_box *b = &lay->token_box[t];
        if (b->w <= 0) continue;
        if (prev >= 0) {
            const nm_box *a = &lay->token_box[prev];
            if (a->y == b->y) ck_assert_msg(a->x + a->w <= b->x + 1e-9, "tokens %d and %d overlap", prev, t);
            else ck_assert_msg(b->y >= a->y + a->h, "token %d is above token %d", t, prev);
        }
        prev = t;
    }
    if (lay->right_image.w > 0) {
        ck_assert(lay->right_image.x >= rp->x && lay->right_image.x + lay->right_image.w <= rp->x + rp->w);
        ck_assert(lay->right_image.y + lay->right_image.h < lay->height);
        for (int t = 0; t < lay->n_tokens; t++) { // tokens never cover the image
            const nm_box *b = &lay->token_box[t];
            if (b->w > 0)
                ck_assert(b->y + b->h <= lay->right_image.y || b->y >= lay->right_image.y + lay->right_image.h);
        }
    }
}

static const char PROMPT[] = "Describe the caf\xc3\xa9 scene.\nWhat is on the table?";
static const char ANSWER[] = "a cup and two plates";

// ---------------------------------------------------------------------------------------------
// Tests

START_TEST(t_png_image_cells) {
    nm_test_rng rng = {0x0e71a1};
    nm_trace_sample s;
    nm_image img;
    make_sample(&s, &rng, 1, PROMPT, ANSWER);
    make_image(&img, &rng, 200, 160);
    int t1 = find_patch(&s, 1, 2), t0 = find_patch(&s, 2, 1), th = find_patch(&s, 3, 3);
    set_real(&s, 0, t1, K_);
    set_real(&s, 0, t0, 0);
    set_real(&s, 0, th, 3);
    char *dir = nm_test_tmpdir();
    nm_overlay_layout lay;
    layout_ok(&lay, &s, &img, NULL);
    picture p;
    char *path = render_png(&s, &img, 0, NULL, dir, "ov.png", &p);
    ck_assert_int_eq(p.w, lay.width);
    ck_assert_int_eq(p.h, lay.height);
    ck_assert_int_eq(lay.width, 1400);
    // the image keeps its aspect and is shown 1x or 2x, never cut
    ck_assert(lay.left_image.w == 200 || lay.left_image.w == 400);
    ck_assert(fabs(lay.left_image.h / lay.left_image.w - 0.8) < 1e-9);
    ck_assert(lay.right_image.w == lay.left_image.w && lay.right_image.y == lay.left_image.y);
    check_boxes(&lay);

    nm_box c1 = cell_box(&lay.right_image, 1, 2), c0 = cell_box(&lay.right_image, 2, 1);
    double l1 = box_lum(&p, &c1, 2), l0 = box_lum(&p, &c0, 2);
    ck_assert_msg(l1 > 0.3 && l0 < 0.02, "score 1 cell %.3f, score 0 cell %.3f", l1, l0);
    check_cell(&p, &lay, &img, 1, 2, 1.0);
    check_cell(&p, &lay, &img, 2, 1, 0.0);
    check_cell(&p, &lay, &img, 3, 3, 3.0 / K_);
    // every cell: brightness x score of its own token
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++) check_cell(&p, &lay, &img, r, c, s.n_real[find_patch(&s, r, c)] / (double)K_);

    // the whole left image is the original (within rounding: it is an exact copy)
    int bad = 0;
    for (int y = 0; y < (int)lay.left_image.h; y++)
        for (int x = 0; x < (int)lay.left_image.w; x++) {
            const uint8_t *q = px(&p, (int)lay.left_image.x + x, (int)lay.left_image.y + y);
            const uint8_t *o = img.rgb + ((size_t)(y * 160 / (int)lay.left_image.h) * 200 + x * 200 / (int)lay.left_image.w) * 3;
            for (int k = 0; k < 3; k++) bad += abs(q[k] - o[k]) > 1;
        }
    ck_assert_int_eq(bad, 0);
    free(p.rgb);
    free(path);
    nm_overlay_layout_free(&lay);
    nm_image_free(&img);
    nm_trace_sample_free(&s);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(t_text_tokens) {
    nm_test_rng rng = {0x7e47};
    nm_trace_sample s;
    nm_image img;
    make_sample(&s, &rng, 1, PROMPT, ANSWER);
    make_image(&img, &rng, 200, 160);
    // "W" of "What" lit (score 1), "D" of "Describe" dark (score 0); "t" of "table" at 1, "c" of "cup" at 0
    int tw = find_text(&s, NM_SEG_PROMPT, "W", 0), td = find_text(&s, NM_SEG_PROMPT, "D", 0);
    int ta = find_text(&s, NM_SEG_ANSWER, "p", 0), tc = find_text(&s, NM_SEG_ANSWER, "c", 0);
    int tbos = 0, teos = s.n_tokens - 1;
    set_real(&s, 1, tw, K_);
    set_real(&s, 1, td, 0);
    set_real(&s, 1, ta, K_);
    set_real(&s, 1, tc, 0);
    set_real(&s, 1, tbos, K_);
    set_real(&s, 1, teos, 0);
    char *dir = nm_test_tmpdir();
    nm_overlay_layout lay;
    layout_ok(&lay, &s, &img, NULL);
    check_boxes(&lay);
    picture p;
    char *path = render_png(&s, &img, 1, NULL, dir, "text.png", &p);
    ck_assert_int_eq(p.w, lay.width);
    ck_assert_int_eq(p.h, lay.height);

    // right panel: the lit token's cell is light, the dark one's dark
    struct { int hi, lo; } pairs[3] = {{tw, td}, {ta, tc}, {tbos, teos}};
    for (int i = 0; i < 3; i++) {
        double hi = box_lum(&p, &lay.token_box[pairs[i].hi], 0), lo = box_lum(&p, &lay.token_box[pairs[i].lo], 0);
        ck_assert_msg(hi > 0.6 && lo < 0.4 && hi - lo > 0.4, "pair %d: score 1 box %.3f, score 0 box %.3f", i, hi, lo);
        if (i < 2) { // text cells: the background grey is the score
            ck_assert_int_ge(box_mode(&p, &lay.token_box[pairs[i].hi]), 254);
            ck_assert_int_le(box_mode(&p, &lay.token_box[pairs[i].lo]), 1);
        }
    }
    // left panel: the same text drawn in ink on white, whatever the score
    for (int i = 0; i < 2; i++) {
        const nm_box *a = &lay.token_box_left[pairs[i].hi], *b = &lay.token_box_left[pairs[i].lo];
        ck_assert_int_gt(box_dark_pixels(&p, a, 0.5), 3);
        ck_assert_int_gt(box_dark_pixels(&p, b, 0.5), 3);
        ck_assert(box_lum(&p, a, 0) > 0.6 && box_lum(&p, b, 0) > 0.6);
    }
    // "é": one box on its lead byte, none on the continuation byte
    int te = find_text(&s, NM_SEG_PROMPT, "\xc3\xa9", 0);
    ck_assert(lay.token_box[te].w > 0);
    ck_assert(lay.token_box[te + 1].w == 0);
    ck_assert(!strcmp(s.token_text[te + 1], ""));
    // the newline is shown (␊) and the next token starts a new line at the panel's left edge
    int tn = find_text(&s, NM_SEG_PROMPT, "\xe2\x90\x8a", 0);
    ck_assert(lay.token_box[tn].w > 0);
    ck_assert(lay.token_box[tn + 1].y > lay.token_box[tn].y);
    ck_assert(fabs(lay.token_box[tn + 1].x - lay.right_panel.x) < 1e-9);
    // tokens of one segment are in reading order; patches have no box; segments do not share lines
    for (int t = 0; t < s.n_tokens; t++)
        if (s.modality[t] == NM_MOD_VISION) ck_assert(lay.token_box[t].w == 0);
    ck_assert(lay.token_box[find_text(&s, NM_SEG_ANSWER, "a", 0)].y > lay.token_box[tn + 1].y);
    // the prompt is below the image
    ck_assert(lay.token_box[td].y >= lay.right_image.y + lay.right_image.h);
    free(p.rgb);
    free(path);
    nm_overlay_layout_free(&lay);
    nm_image_free(&img);
    nm_trace_sample_free(&s);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(t_mean_layer) {
    nm_test_rng rng = {0x3ea4};
    nm_trace_sample s;
    nm_image img;
    make_sample(&s, &rng, 1, PROMPT, ANSWER);
    make_image(&img, &rng, 200, 160);
    int tp = find_patch(&s, 0, 0), tq = find_patch(&s, 2, 3), tt = find_text(&s, NM_SEG_PROMPT, "W", 0);
    int pv[L_] = {K_, K_, 0, 0}, qv[L_] = {0, 2, 2, 2}, tv[L_] = {0, 0, 0, K_}; // means 0.5, 0.1875, 0.25
    for (int l = 0; l < L_; l++) {
        set_real(&s, l, tp, pv[l]);
        set_real(&s, l, tq, qv[l]);
        set_real(&s, l, tt, tv[l]);
    }
    char *dir = nm_test_tmpdir();
    nm_overlay_layout lay;
    layout_ok(&lay, &s, &img, NULL);
    picture pm, p3;
    char *a = render_png(&s, &img, L_, NULL, dir, "mean.png", &pm);
    char *b = render_png(&s, &img, 3, NULL, dir, "layer3.png", &p3);
    ck_assert_int_eq(pm.h, lay.height);
    check_cell(&pm, &lay, &img, 0, 0, 0.5);
    check_cell(&pm, &lay, &img, 2, 3, 6.0 / (L_ * K_));
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++) {
            int t = find_patch(&s, r, c), sum = 0;
            for (int l = 0; l < L_; l++) sum += s.n_real[l * s.capacity + t];
            check_cell(&pm, &lay, &img, r, c, sum / (double)(L_ * K_));
            check_cell(&p3, &lay, &img, r, c, s.n_real[3 * s.capacity + t] / (double)K_);
        }
    // the text token: 0.25 in the mean (dark cell), 1 in layer 3 (light cell)
    double lm = box_lum(&pm, &lay.token_box[tt], 0), l3 = box_lum(&p3, &lay.token_box[tt], 0);
    ck_assert_msg(lm < l3 - 0.2, "mean %.3f layer 3 %.3f", lm, l3);
    ck_assert_int_le(abs(box_mode(&pm, &lay.token_box[tt]) - 64), 1); // the cell's grey is the score
    ck_assert_int_ge(box_mode(&p3, &lay.token_box[tt]), 254);
    // nm_metrics agrees with what the cells show
    double sc[256];
    nm_error err = {0};
    ck_assert_int_eq(nm_metrics_token_scores(&s, L_, sc, &err), NM_OK);
    ck_assert(fabs(sc[tp] - 0.5) < 1e-12 && fabs(sc[tt] - 0.25) < 1e-12);
    free(pm.rgb);
    free(p3.rgb);
    free(a);
    free(b);
    nm_overlay_layout_free(&lay);
    nm_image_free(&img);
    nm_trace_sample_free(&s);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

static void check_prefix(const char *path, const char *const *prefixes, int n) {
    FILE *f = fopen(path, "rb");
    ck_assert_msg(f != NULL, "%s missing", path);
    char head[64] = {0};
    size_t got = fread(head, 1, sizeof head - 1, f);
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fclose(f);
    ck_assert_int_gt(got, 4);
    ck_assert_int_gt(size, 1000);
    int ok = 0;
    for (int i = 0; i < n; i++) ok |= !strncmp(head, prefixes[i], strlen(prefixes[i]));
    ck_assert_msg(ok, "%s starts with '%.10s'", path, head);
}

START_TEST(t_svg_pdf) {
    nm_test_rng rng = {0x5e6};
    nm_trace_sample s;
    nm_image img;
    make_sample(&s, &rng, 1, PROMPT, ANSWER);
    make_image(&img, &rng, 200, 160);
    char *dir = nm_test_tmpdir();
    nm_error err = {0};
    nm_overlay_opts o;
    nm_overlay_opts_default(&o);
    o.cmap = NM_CMAP_VIRIDIS;
    o.alpha = 0.7;
    const char *svg = nm_test_path(dir, "ov.svg"), *pdf = nm_test_path(dir, "ov.PDF");
    ck_assert_msg(nm_render_overlay(&s, &img, 2, &o, "custom title", svg, &err) == NM_OK, "%s", err.msg);
    ck_assert_msg(nm_render_overlay(&s, NULL, L_, NULL, NULL, pdf, &err) == NM_OK, "%s", err.msg);
    const char *sv[2] = {"<?xml", "<svg"}, *pd[1] = {"%PDF"};
    check_prefix(svg, sv, 2);
    check_prefix(pdf, pd, 1);
    // nothing else was left in the directory (no temporary files)
    ck_assert_int_ne(access(nm_test_path(dir, "ov.svg.tmp"), F_OK), 0);
    nm_image_free(&img);
    nm_trace_sample_free(&s);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

static int dir_entries(const char *dir) {
    char cmd[4200];
    snprintf(cmd, sizeof cmd, "ls -A '%s' | wc -l", dir);
    FILE *f = popen(cmd, "r");
    ck_assert_ptr_nonnull(f);
    int n = -1;
    ck_assert_int_eq(fscanf(f, "%d", &n), 1);
    pclose(f);
    return n;
}

START_TEST(t_errors) {
    nm_test_rng rng = {0xe1};
    nm_trace_sample s;
    nm_image img;
    make_sample(&s, &rng, 1, PROMPT, ANSWER);
    make_image(&img, &rng, 200, 160);
    char *dir = nm_test_tmpdir();
    nm_error err = {0};
    nm_overlay_opts o;
    // bad extension
    ck_assert_int_eq(nm_render_overlay(&s, &img, 0, NULL, NULL, nm_test_path(dir, "ov.gif"), &err), NM_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(err.msg, "ov.gif"));
    ck_assert_int_eq(nm_render_overlay(&s, &img, 0, NULL, NULL, nm_test_path(dir, "ov"), &err), NM_ERR_INVALID);
    // bad layer and options
    ck_assert_int_eq(nm_render_overlay(&s, &img, -1, NULL, NULL, nm_test_path(dir, "a.png"), &err), NM_ERR_INVALID);
    ck_assert_int_eq(nm_render_overlay(&s, &img, L_ + 1, NULL, NULL, nm_test_path(dir, "a.png"), &err), NM_ERR_INVALID);
    nm_overlay_opts_default(&o);
    o.alpha = 0;
    ck_assert_int_eq(nm_render_overlay(&s, &img, 0, &o, NULL, nm_test_path(dir, "a.png"), &err), NM_ERR_INVALID);
    o.alpha = NAN;
    ck_assert_int_eq(nm_render_overlay(&s, &img, 0, &o, NULL, nm_test_path(dir, "a.png"), &err), NM_ERR_INVALID);
    nm_overlay_opts_default(&o);
    o.width = 10;
    ck_assert_int_eq(nm_render_overlay(&s, &img, 0, &o, NULL, nm_test_path(dir, "a.png"), &err), NM_ERR_INVALID);
    nm_overlay_layout lay;
    ck_assert_int_eq(nm_overlay_layout_compute(&lay, &s, &img, &o, &err), NM_ERR_INVALID);
    nm_overlay_layout_free(&lay);
    nm_overlay_opts_default(&o);
    o.cmap = (nm_colormap)7;
    ck_assert_int_eq(nm_render_overlay(&s, &img, 0, &o, NULL, nm_test_path(dir, "a.png"), &err), NM_ERR_INVALID);
    // an inconsistent sample: a patch outside the grid, n_real above K
    int tp = find_patch(&s, 3, 3);
    s.patch[2 * tp] = 4;
    ck_assert_int_eq(nm_render_overlay(&s, &img, 0, NULL, NULL, nm_test_path(dir, "a.png"), &err), NM_ERR_INVALID);
    s.patch[2 * tp] = 3;
    set_real(&s, 2, 5, K_ + 1);
    ck_assert_int_eq(nm_render_overlay(&s, &img, 2, NULL, NULL, nm_test_path(dir, "a.png"), &err), NM_ERR_INVALID);
    set_real(&s, 2, 5, 1);
    ck_assert_int_eq(dir_entries(dir), 0);
    // unwritable: a directory that does not exist, in every format; nothing is left behind
    const char *names[3] = {"no/such/dir/ov.png", "no/such/dir/ov.svg", "no/such/dir/ov.pdf"};
    for (int i = 0; i < 3; i++) {
        const char *p = nm_test_path(dir, names[i]);
        nm_error_clear(&err);
        ck_assert_int_eq(nm_render_overlay(&s, &img, 0, NULL, NULL, p, &err), NM_ERR_IO);
        ck_assert_ptr_nonnull(strstr(err.msg, "ov."));
        ck_assert_int_ne(access(p, F_OK), 0);
    }
    // a path that is a directory: the picture cannot replace it
    ck_assert_int_eq(mkdir(nm_test_path(dir, "d.png"), 0755), 0);
    ck_assert_int_eq(nm_render_overlay(&s, &img, 0, NULL, NULL, nm_test_path(dir, "d.png"), &err), NM_ERR_IO);
    ck_assert_int_eq(dir_entries(dir), 1); // only d.png itself, no temporary file
    struct stat st;
    ck_assert_int_eq(stat(nm_test_path(dir, "d.png"), &st), 0);
    ck_assert(S_ISDIR(st.st_mode));
    nm_image_free(&img);
    nm_trace_sample_free(&s);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(t_text_only) {
    nm_test_rng rng = {0x7e70};
    nm_trace_sample s;
    make_sample(&s, &rng, 0, PROMPT, ANSWER);
    int tw = find_text(&s, NM_SEG_PROMPT, "W", 0), td = find_text(&s, NM_SEG_PROMPT, "D", 0);
    for (int l = 0; l < L_; l++) {
        set_real(&s, l, tw, K_);
        set_real(&s, l, td, 0);
    }
    char *dir = nm_test_tmpdir();
    nm_overlay_layout lay;
    layout_ok(&lay, &s, NULL, NULL);
    ck_assert(lay.left_image.w == 0 && lay.right_image.w == 0);
    check_boxes(&lay);
    picture p;
    char *path = render_png(&s, NULL, L_, NULL, dir, "text.png", &p);
    ck_assert_int_eq(p.w, lay.width);
    ck_assert_int_eq(p.h, lay.height);
    double hi = box_lum(&p, &lay.token_box[tw], 0), lo = box_lum(&p, &lay.token_box[td], 0);
    ck_assert_msg(hi > 0.6 && lo < 0.4, "%.3f %.3f", hi, lo);
    ck_assert_int_lt(lay.height, 600); // a short sample makes a short picture
    // an image passed for a text-only sample is ignored
    nm_overlay_layout lay2;
    nm_image img;
    make_image(&img, &rng, 50, 40);
    layout_ok(&lay2, &s, &img, NULL);
    ck_assert(lay2.right_image.w == 0 && lay2.height == lay.height);
    nm_overlay_layout_free(&lay2);
    nm_image_free(&img);
    // an empty sample still renders (insets "–")
    int n = s.n_tokens;
    s.n_tokens = 0;
    nm_error err = {0};
    ck_assert_msg(nm_render_overlay(&s, NULL, 0, NULL, NULL, nm_test_path(dir, "empty.png"), &err) == NM_OK, "%s", err.msg);
    s.n_tokens = n;
    free(p.rgb);
    free(path);
    nm_overlay_layout_free(&lay);
    nm_trace_sample_free(&s);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

static char *long_text(nm_test_rng *rng, int n, int spaces) {
    char *p = malloc((size_t)n + 1);
    ck_assert_ptr_nonnull(p);
    for (int i = 0; i < n; i++) p[i] = (spaces && nm_test_rng_next(rng) % 6 == 0) ? ' ' : (char)('a' + nm_test_rng_next(rng) % 26);
    p[n] = '\0';
    return p;
}

START_TEST(t_long_prompt) {
    nm_test_rng rng = {0x10e6};
    nm_image img;
    make_image(&img, &rng, 200, 160);
    char *dir = nm_test_tmpdir();
    int heights[4];
    const int lens[4] = {2000, 2000, 20000, 20000};
    for (int i = 0; i < 4; i++) {
        char *prompt = long_text(&rng, lens[i], i % 2 == 0); // with spaces, and one long word
        nm_trace_sample s;
        make_sample(&s, &rng, 1, prompt, ANSWER);
        nm_overlay_layout lay;
        layout_ok(&lay, &s, &img, NULL);
        check_boxes(&lay);
        heights[i] = lay.height;
        ck_assert_int_le(lay.height, 2600); // image 320 + 2 x 30 lines + headers + legend
        int drawn = 0;
        for (int t = 0; t < s.n_tokens; t++) drawn += s.segment[t] == NM_SEG_PROMPT && lay.token_box[t].w > 0;
        if (lens[i] == 2000) {
            ck_assert_int_eq(drawn, 2000); // fits in 30 lines of ~78 characters: nothing left out
            ck_assert_int_eq(lay.truncated, 0);
        } else {
            ck_assert_int_gt(drawn, 1000);
            ck_assert_int_eq(lay.truncated, 20000 - drawn);
            // the answer and EOS are still shown after the cut prompt
            ck_assert(lay.token_box[s.n_tokens - 1].w > 0);
            ck_assert(lay.token_box[s.n_tokens - 1].y > lay.token_box[s.n_tokens - 2 - (int)strlen(ANSWER)].y);
        }
        if (i == 0 || i == 2) {
            picture p;
            char name[32];
            snprintf(name, sizeof name, "long%d.png", i);
            char *path = render_png(&s, &img, L_, NULL, dir, name, &p);
            ck_assert_int_eq(p.h, lay.height);
            free(path);
            free(p.rgb);
        }
        nm_overlay_layout_free(&lay);
        nm_trace_sample_free(&s);
        free(prompt);
    }
    ck_assert_int_eq(heights[2], heights[3]); // truncation caps the height
    ck_assert_int_ge(heights[2], heights[0]);
    nm_image_free(&img);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(t_missing_image) {
    nm_test_rng rng = {0x1ac};
    nm_trace_sample s;
    make_sample(&s, &rng, 1, PROMPT, ANSWER);
    int t1 = find_patch(&s, 0, 3), t0 = find_patch(&s, 3, 0);
    set_real(&s, 0, t1, K_);
    set_real(&s, 0, t0, 0);
    char *dir = nm_test_tmpdir();
    nm_overlay_layout lay;
    layout_ok(&lay, &s, NULL, NULL);
    check_boxes(&lay);
    ck_assert(lay.right_image.w > 0 && lay.left_image.w > 0);
    ck_assert(fabs(lay.right_image.h / lay.right_image.w - 0.8) < 0.02); // the recorded 200x160 shape
    picture p;
    char *path = render_png(&s, NULL, 0, NULL, dir, "missing.png", &p);
    nm_box c1 = cell_box(&lay.right_image, 0, 3), c0 = cell_box(&lay.right_image, 3, 0);
    ck_assert(box_lum(&p, &c1, 2) > 0.98 && box_lum(&p, &c0, 2) < 0.02);
    // the left placeholder carries a note in red-brown ink
    ck_assert_int_gt(box_dark_pixels(&p, &lay.left_image, 0.6), 20);
    free(p.rgb);
    free(path);
    nm_overlay_layout_free(&lay);
    nm_trace_sample_free(&s);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(t_colormap_and_alpha) {
    nm_test_rng rng = {0xc0105};
    nm_trace_sample s;
    nm_image img;
    make_sample(&s, &rng, 1, PROMPT, ANSWER);
    make_image(&img, &rng, 200, 160);
    int t1 = find_patch(&s, 1, 1), t0 = find_patch(&s, 1, 2);
    set_real(&s, 0, t1, K_);
    set_real(&s, 0, t0, 0);
    char *dir = nm_test_tmpdir();
    nm_overlay_layout lay;
    layout_ok(&lay, &s, &img, NULL);
    nm_overlay_opts o;
    nm_overlay_opts_default(&o);
    o.cmap = NM_CMAP_VIRIDIS;
    picture p;
    char *path = render_png(&s, &img, 0, &o, dir, "viridis.png", &p);
    ck_assert_int_eq(p.h, lay.height);
    // viridis: 1 is yellow (red + green high, blue low), 0 is purple (blue > green)
    nm_box c1 = cell_box(&lay.right_image, 1, 1), c0 = cell_box(&lay.right_image, 1, 2);
    double m1[3] = {0}, m0[3] = {0};
    int n = 0;
    for (int y = (int)c1.y + 3; y < (int)(c1.y + c1.h) - 3; y++)
        for (int x = 3; x < (int)c1.w - 3; x++, n++)
            for (int k = 0; k < 3; k++) {
                m1[k] += px(&p, (int)c1.x + x, y)[k];
                m0[k] += px(&p, (int)c0.x + x, y)[k];
            }
    for (int k = 0; k < 3; k++) {
        m1[k] /= n;
        m0[k] /= n;
    }
    ck_assert_msg(m1[0] > m1[2] + 60 && m1[1] > m1[2] + 60, "score 1: %.0f %.0f %.0f", m1[0], m1[1], m1[2]);
    ck_assert_msg(m0[2] > m0[1] + 30, "score 0: %.0f %.0f %.0f", m0[0], m0[1], m0[2]);
    free(p.rgb);
    free(path);
    // alpha 0.5 on gray: halfway between the original and the lit image
    nm_overlay_opts_default(&o);
    o.alpha = 0.5;
    path = render_png(&s, &img, 0, &o, dir, "half.png", &p);
    nm_box cb = cell_box(&lay.right_image, 1, 2);
    int bad = 0;
    for (int y = (int)cb.y + 2; y < (int)(cb.y + cb.h) - 2; y++)
        for (int x = (int)cb.x + 2; x < (int)(cb.x + cb.w) - 2; x++) {
            int sx = (int)((x - lay.right_image.x) * 200 / lay.right_image.w), sy = (int)((y - lay.right_image.y) * 160 / lay.right_image.h);
            const uint8_t *orig = img.rgb + ((size_t)sy * 200 + sx) * 3;
            for (int k = 0; k < 3; k++) bad += fabs(px(&p, x, y)[k] - 0.5 * orig[k]) > 1.01;
        }
    ck_assert_int_eq(bad, 0);
    free(p.rgb);
    free(path);
    nm_overlay_layout_free(&lay);
    nm_image_free(&img);
    nm_trace_sample_free(&s);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(t_image_sizes) {
    nm_test_rng rng = {0x512e};
    nm_trace_sample s;
    make_sample(&s, &rng, 1, PROMPT, ANSWER);
    const int sizes[4][2] = {{1000, 500}, {300, 3000}, {40, 30}, {500, 400}};
    char *dir = nm_test_tmpdir();
    for (int i = 0; i < 4; i++) {
        nm_image img;
        make_image(&img, &rng, sizes[i][0], sizes[i][1]);
        nm_overlay_layout lay;
        layout_ok(&lay, &s, &img, NULL);
        check_boxes(&lay);
        double w = lay.left_image.w, h = lay.left_image.h;
        ck_assert(w <= lay.left_panel.w && h <= NM_OVERLAY_MAX_IMAGE_H);
        ck_assert_msg(fabs(w / h - (double)img.width / img.height) < 0.02 * img.width / img.height, "%gx%g", w, h);
        if (img.width * 2 <= lay.left_panel.w && img.height * 2 <= NM_OVERLAY_MAX_IMAGE_H)
            ck_assert(w == 2 * img.width); // small: 2x, never more
        else if (img.width <= lay.left_panel.w && img.height <= NM_OVERLAY_MAX_IMAGE_H)
            ck_assert(w == img.width); // fits: its own size
        else
            ck_assert(w < img.width); // too large: scaled down
        picture p;
        char name[32];
        snprintf(name, sizeof name, "size%d.png", i);
        char *path = render_png(&s, &img, 1, NULL, dir, name, &p);
        ck_assert_int_eq(p.h, lay.height);
        // a narrow picture still holds everything
        nm_overlay_opts o;
        nm_overlay_opts_default(&o);
        o.width = NM_OVERLAY_MIN_WIDTH;
        nm_overlay_layout lay2;
        layout_ok(&lay2, &s, &img, &o);
        check_boxes(&lay2);
        ck_assert_int_eq(lay2.width, NM_OVERLAY_MIN_WIDTH);
        nm_overlay_layout_free(&lay2);
        free(p.rgb);
        free(path);
        nm_overlay_layout_free(&lay);
        nm_image_free(&img);
    }
    nm_trace_sample_free(&s);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

// A trace written by another program may lack tokens/text (the reader fills ""): the overlay
// rebuilds the display strings from the ids.
START_TEST(t_no_token_text) {
    nm_test_rng rng = {0x7e7};
    nm_trace_sample s;
    make_sample(&s, &rng, 1, PROMPT, ANSWER);
    nm_overlay_layout ref;
    layout_ok(&ref, &s, NULL, NULL);
    for (int t = 0; t < s.n_tokens; t++) {
        free(s.token_text[t]);
        s.token_text[t] = strdup("");
    }
    nm_overlay_layout lay;
    layout_ok(&lay, &s, NULL, NULL);
    check_boxes(&lay);
    // same boxes as with the tokenizer's display strings: the rebuilt strings are the same
    for (int t = 0; t < s.n_tokens; t++) {
        ck_assert_msg((lay.token_box[t].w > 0) == (ref.token_box[t].w > 0), "token %d", t);
        ck_assert_msg(fabs(lay.token_box[t].x - ref.token_box[t].x) < 1e-9 && lay.token_box[t].y == ref.token_box[t].y,
                      "token %d moved", t);
    }
    char *dir = nm_test_tmpdir();
    nm_error err = {0};
    ck_assert_msg(nm_render_overlay(&s, NULL, 0, NULL, "t", nm_test_path(dir, "x.png"), &err) == NM_OK, "%s", err.msg);
    nm_overlay_layout_free(&lay);
    nm_overlay_layout_free(&ref);
    nm_trace_sample_free(&s);
    nm_test_rmtree(dir);
    free(dir);
}
END_TEST

NM_TEST_SUITE(overlay) {
    Suite *s = suite_create("overlay");
    TCase *tc = tcase_create("overlay");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, t_png_image_cells);
    tcase_add_test(tc, t_text_tokens);
    tcase_add_test(tc, t_mean_layer);
    tcase_add_test(tc, t_svg_pdf);
    tcase_add_test(tc, t_errors);
    tcase_add_test(tc, t_text_only);
    tcase_add_test(tc, t_long_prompt);
    tcase_add_test(tc, t_missing_image);
    tcase_add_test(tc, t_colormap_and_alpha);
    tcase_add_test(tc, t_image_sizes);
    tcase_add_test(tc, t_no_token_text);
    suite_add_tcase(s, tc);
    return s;
}
