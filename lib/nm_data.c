// nm_data.c — the synthetic VLM data set of `nullmap data`: cairo-drawn images with flat or
// textured backgrounds and informative objects (shapes, words, bar charts), varied questions,
// text-only questions; PNG + JSONL, written atomically; and the reader of the trainer.
// Format and guarantees: nm_data.h.
#define _GNU_SOURCE // syncfs
#include "nm_data.h"

#include <cairo.h>
#include <errno.h>
#include <dirent.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "nm_fileutil.h"
#include "nm_limits.h"
#include "nm_rng.h"

// ---------------------------------------------------------------------------------------------
// Vocabulary

const nm_data_colour nm_data_colours[NM_DATA_N_COLOURS] = {
    {"red", {220, 40, 40}},     {"green", {40, 175, 70}},   {"blue", {40, 90, 230}},
    {"yellow", {245, 215, 30}}, {"purple", {150, 60, 200}}, {"orange", {250, 140, 20}},
};

// Background tones: neutral, far from every object colour (a texture adds a second tone a
// little lighter or darker than the first).
static const uint8_t BG_TONES[][3] = {
    {250, 250, 250}, {205, 205, 205}, {232, 222, 196}, {190, 204, 216},
    {200, 212, 196}, {120, 120, 120}, {70, 70, 70},    {35, 38, 45},
};
#define N_BG ((int)(sizeof BG_TONES / sizeof BG_TONES[0]))
#define N_LIGHT_BG 5 // BG_TONES[0..4] are light (luma >= 190): the pages words are printed on
static const uint8_t WORD_INK_RGB[3] = {25, 25, 25};
#define MIN_CONTRAST 100.0 // RGB distance between an object colour and every background tone

static const char *TEXTURES[] = {"hstripes", "vstripes", "dstripes", "checks", "dots"};
static const char *KINDS[] = {"circle", "square", "triangle"};
static const char *KINDS_PL[] = {"circles", "squares", "triangles"};

// Words drawn in "word" images: three letters, each word with its own first letter (none is a
// colour or shape name). Why so few and so short: with 32 words of 2–5 letters in colours of
// any contrast on textured backgrounds, the shipped model (8x8 patches, D = 128) never learned
// to read in 5000 steps — its word answers stayed at chance. See README "The data set".
static const char *WORDS[] = {"CAT", "DOG", "SUN", "BOX", "MAP", "HAT", "KEY", "PEN",
                              "FOX", "OWL", "JAR", "EGG", "LOG", "RUG", "NET", "VAN"};
#define N_WORDS ((int)(sizeof WORDS / sizeof WORDS[0]))

#define N_OF(a) ((int)(sizeof(a) / sizeof((a)[0])))

static int ri(nm_rng *r, int n) { return n <= 1 ? 0 : (int)(nm_rng_next(r) % (uint64_t)n); }
static int chance(nm_rng *r, int permille) { return ri(r, 1000) < permille; }
static double ru(nm_rng *r, double lo, double hi) { return lo + (hi - lo) * nm_rng_uniform(r); }
#define PICK(r, arr) ((arr)[ri((r), N_OF(arr))])

static void shuffle_int(nm_rng *r, int *a, int n) {
    for (int i = n - 1; i > 0; i--) {
        int j = ri(r, i + 1), t = a[i];
        a[i] = a[j];
        a[j] = t;
    }
}

// Fills `tmpl`, replacing {a} {b} {c} {d} with the given strings, into out (cap bytes).
static void fill(char *out, size_t cap, const char *tmpl, const char *a, const char *b, const char *c, const char *d) {
    size_t n = 0;
    for (const char *p = tmpl; *p && n + 1 < cap; p++) {
        const char *sub = NULL;
        if (p[0] == '{' && p[1] && p[2] == '}') {
            if (p[1] == 'a') sub = a;
            else if (p[1] == 'b') sub = b;
            else if (p[1] == 'c') sub = c;
            else if (p[1] == 'd') sub = d;
        }
        if (sub) {
            for (; *sub && n + 1 < cap; sub++) out[n++] = *sub;
            p += 2;
        } else {
            out[n++] = *p;
        }
    }
    out[n] = '\0';
}

static const char *article(const char *w) { return strchr("aeiou", w[0]) ? "an" : "a"; }

static void cap_first(char *s) {
    if (s[0] >= 'a' && s[0] <= 'z') s[0] = (char)(s[0] - 'a' + 'A');
}

// ---------------------------------------------------------------------------------------------
// Prompt decoration: optional context sentences before and answer-format hints after, so that
// no fixed byte pattern starts or ends every prompt.

enum { ANS_WORD, ANS_NUMBER, ANS_NAME };

static const char *PRE_IMAGE[] = {
    "Look at the picture. ", "Look at the image. ", "Here is a picture. ", "Here is an image. ",
    "Please look carefully. ", "Question: ", "Quick question: ", "I drew this. ", "This is a small test. ",
    "Study the image. ", "See the picture? ", "About this image: ", "Check the picture. ",
    "One question about the picture. ", "Have a look. ", "Take a look at this. ",
};
static const char *PRE_TEXT[] = {
    "Question: ", "Quick question: ", "Here is a puzzle. ", "Please answer: ", "Try this one. ",
    "A small quiz. ", "Think about it. ", "No picture this time. ", "Here is a question. ", "Easy one: ",
    "Tell me something. ", "Next question. ",
};
static const char *SUF_WORD[] = {" Answer with one word.", " Reply with a single word.", " One word, please.",
                                 " Give just the word.", " Keep it short.", " Answer briefly.", " Be brief."};
static const char *SUF_NUMBER[] = {" Answer with a number.", " Give a number.", " Reply with digits only.",
                                   " Just the number, please.", " Answer briefly.", " Use digits."};
static const char *SUF_NAME[] = {" Answer with a name.", " Give just the name.", " One word, please.",
                                 " Answer briefly."};

static void decorate(nm_rng *r, char *prompt, size_t cap, int image, int ans) {
    char buf[1024];
    const char *pre = "", *suf = "";
    if (chance(r, 400)) pre = image ? PICK(r, PRE_IMAGE) : PICK(r, PRE_TEXT);
    if (chance(r, 350)) suf = ans == ANS_NUMBER ? PICK(r, SUF_NUMBER) : ans == ANS_NAME ? PICK(r, SUF_NAME) : PICK(r, SUF_WORD);
    snprintf(buf, sizeof buf, "%s%s%s", pre, prompt, suf);
    snprintf(prompt, cap, "%s", buf);
}

// ---------------------------------------------------------------------------------------------
// Drawing

typedef struct {
    int S;
    cairo_surface_t *surf;
    cairo_font_face_t *face;
    cairo_font_options_t *fopt;
} gen_ctx;

typedef struct {
    double x0, y0, x1, y1;
} box;

static void set_rgb(cairo_t *cr, const uint8_t c[3]) { cairo_set_source_rgb(cr, c[0] / 255.0, c[1] / 255.0, c[2] / 255.0); }

static double rgb_dist(const uint8_t a[3], const uint8_t b[3]) {
    double d0 = a[0] - b[0], d1 = a[1] - b[1], d2 = a[2] - b[2];
    return sqrt(d0 * d0 + d1 * d1 + d2 * d2);
}

static json_t *rgb_json(const uint8_t c[3]) { return json_pack("[iii]", c[0], c[1], c[2]); }

static json_t *bbox_json(int x0, int y0, int x1, int y1) { return json_pack("[iiii]", x0, y0, x1, y1); }

// Draws the background and records it in rec; returns in allowed[] the colour indices that
// contrast with every tone drawn (at least 4 for every tone pair: checked by a test).
// texture_permille: the chance of a texture; the first tone is one of BG_TONES[0, n_tones).
static int draw_background_textured(gen_ctx *g, cairo_t *cr, nm_rng *r, json_t *rec, int *allowed, int texture_permille,
                                    int n_tones) {
    int S = g->S;
    uint8_t t0[3], t1[3];
    memcpy(t0, BG_TONES[ri(r, n_tones)], 3);
    int textured = chance(r, texture_permille);
    set_rgb(cr, t0);
    cairo_paint(cr);
    json_t *tones = json_array();
    json_array_append_new(tones, rgb_json(t0));
    json_object_set_new(rec, "background", json_string(textured ? "texture" : "flat"));
    if (textured) {
        int lum = (t0[0] + t0[1] + t0[2]) / 3, delta = (int)ru(r, 22, 40) * (lum > 128 ? -1 : 1);
        for (int k = 0; k < 3; k++) {
            int v = t0[k] + delta;
            t1[k] = (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
        }
        json_array_append_new(tones, rgb_json(t1));
        int tex = ri(r, N_OF(TEXTURES));
        json_object_set_new(rec, "texture", json_string(TEXTURES[tex]));
        int period = (int)floor(ru(r, S / 10.0, S / 5.0));
        if (period < 2) period = 2;
        set_rgb(cr, t1);
        cairo_set_antialias(cr, CAIRO_ANTIALIAS_NONE);
        switch (tex) {
        case 0: // horizontal stripes
            for (int y = ri(r, period); y < S; y += period) cairo_rectangle(cr, 0, y, S, period / 2 > 0 ? period / 2 : 1);
            cairo_fill(cr);
            break;
        case 1: // vertical stripes
            for (int x = ri(r, period); x < S; x += period) cairo_rectangle(cr, x, 0, period / 2 > 0 ? period / 2 : 1, S);
            cairo_fill(cr);
            break;
        case 2: // diagonal stripes
            cairo_set_antialias(cr, CAIRO_ANTIALIAS_DEFAULT);
            cairo_set_line_width(cr, period / 2.0);
            for (int k = -S; k < 2 * S; k += period) { // lines run past the edges: no cap shows
                cairo_move_to(cr, k - S, -S);
                cairo_line_to(cr, k + 2 * S, 2 * S);
            }
            if (chance(r, 500)) { // the other diagonal
                cairo_new_path(cr);
                for (int k = -S; k < 2 * S; k += period) {
                    cairo_move_to(cr, 2 * S - k, -S);
                    cairo_line_to(cr, -S - k, 2 * S);
                }
            }
            cairo_stroke(cr);
            break;
        case 3: { // checks
            int c = period / 2 > 0 ? period / 2 : 1;
            for (int y = 0; y < S; y += c)
                for (int x = 0; x < S; x += c)
                    if (((x / c) + (y / c)) % 2) cairo_rectangle(cr, x, y, c, c);
            cairo_fill(cr);
            break;
        }
        default: { // dots
            cairo_set_antialias(cr, CAIRO_ANTIALIAS_DEFAULT);
            double rad = period * 0.22 < 0.6 ? 0.6 : period * 0.22;
            int off = ri(r, period);
            for (int y = off; y < S + period; y += period)
                for (int x = off; x < S + period; x += period) {
                    cairo_new_sub_path(cr);
                    cairo_arc(cr, x + 0.5, y + 0.5, rad, 0, 2 * M_PI);
                }
            cairo_fill(cr);
            break;
        }
        }
        cairo_set_antialias(cr, CAIRO_ANTIALIAS_DEFAULT);
    }
    json_object_set_new(rec, "background_rgb", tones);
    int n = 0;
    for (int i = 0; i < NM_DATA_N_COLOURS; i++) {
        const uint8_t *c = nm_data_colours[i].rgb;
        if (rgb_dist(c, t0) >= MIN_CONTRAST && (!textured || rgb_dist(c, t1) >= MIN_CONTRAST)) allowed[n++] = i;
    }
    return n;
}

static int draw_background(gen_ctx *g, cairo_t *cr, nm_rng *r, json_t *rec, int *allowed) {
    return draw_background_textured(g, cr, r, rec, allowed, NM_DATA_TEXTURE_PERMILLE, N_BG);
}

// Shapes live in the cells of a 3 x 3 grid (one per cell: boxes never overlap); size and
// position jitter inside the cell. Geometry is pixel-aligned: the bbox is exact.
#define GRID 3
typedef struct {
    int kind, colour;
    int x, y, sz;
} shape;

static void place_shapes(gen_ctx *g, nm_rng *r, shape *sh, int n, const box *avoid) {
    int cells[GRID * GRID], nc = 0;
    double cs = g->S / (double)GRID;
    for (int i = 0; i < GRID * GRID; i++) {
        if (avoid) { // skip cells that touch the avoided box
            double cx0 = (i % GRID) * cs, cy0 = (i / GRID) * cs;
            if (cx0 < avoid->x1 && cx0 + cs > avoid->x0 && cy0 < avoid->y1 && cy0 + cs > avoid->y0) continue;
        }
        cells[nc++] = i;
    }
    shuffle_int(r, cells, nc);
    for (int i = 0; i < n && i < nc; i++) {
        int c = cells[i];
        // a 1-pixel margin inside the cell (once there is room): neighbours never touch
        int m = cs >= 8 ? 1 : 0;
        int cx0 = (int)ceil((c % GRID) * cs) + m, cy0 = (int)ceil((c / GRID) * cs) + m;
        int cx1 = (int)floor((c % GRID + 1) * cs) - m, cy1 = (int)floor((c / GRID + 1) * cs) - m;
        int sz = (int)floor((cx1 - cx0 < cy1 - cy0 ? cx1 - cx0 : cy1 - cy0) * ru(r, 0.6, 1.0));
        if (sz < 3) sz = 3;
        int room = cx1 - cx0 - sz, roomy = cy1 - cy0 - sz;
        sh[i].sz = sz;
        sh[i].x = cx0 + (room > 0 ? ri(r, room + 1) : 0);
        sh[i].y = cy0 + (roomy > 0 ? ri(r, roomy + 1) : 0);
    }
}

static int free_cells(gen_ctx *g, const box *avoid) {
    double cs = g->S / (double)GRID;
    int nc = 0;
    for (int i = 0; i < GRID * GRID; i++) {
        double cx0 = (i % GRID) * cs, cy0 = (i / GRID) * cs;
        if (!(cx0 < avoid->x1 && cx0 + cs > avoid->x0 && cy0 < avoid->y1 && cy0 + cs > avoid->y0)) nc++;
    }
    return nc;
}

static void draw_shapes(cairo_t *cr, const shape *sh, int n, json_t *objects) {
    for (int i = 0; i < n; i++) {
        const shape *s = &sh[i];
        set_rgb(cr, nm_data_colours[s->colour].rgb);
        double x = s->x, y = s->y, z = s->sz;
        switch (s->kind) {
        case 0:
            cairo_new_sub_path(cr);
            cairo_arc(cr, x + z / 2, y + z / 2, z / 2, 0, 2 * M_PI);
            break;
        case 1: cairo_rectangle(cr, x, y, z, z); break;
        default:
            cairo_move_to(cr, x + z / 2, y);
            cairo_line_to(cr, x + z, y + z);
            cairo_line_to(cr, x, y + z);
            cairo_close_path(cr);
            break;
        }
        cairo_fill(cr);
        json_array_append_new(objects, json_pack("{s:s, s:s, s:o}", "kind", KINDS[s->kind], "colour",
                                                 nm_data_colours[s->colour].name, "bbox",
                                                 bbox_json(s->x, s->y, s->x + s->sz, s->y + s->sz)));
    }
}

typedef struct {
    char prompt[1024], answer[64];
    const char *task;
    int has_image;
} sample;

static const char *COL_WORD[] = {"colour", "color"};

// "What colour is the triangle?" — exactly one object of the asked kind.
static void task_colour(gen_ctx *g, cairo_t *cr, nm_rng *r, json_t *rec, sample *s) {
    int allowed[NM_DATA_N_COLOURS], na = draw_background(g, cr, r, rec, allowed);
    int n = 1 + ri(r, 4), target = ri(r, 3);
    shape sh[GRID * GRID];
    int ti = ri(r, n); // where the target sits in objects[]
    for (int i = 0; i < n; i++) {
        sh[i].kind = i == ti ? target : (target + 1 + ri(r, 2)) % 3;
        sh[i].colour = allowed[ri(r, na)];
    }
    place_shapes(g, r, sh, n, NULL);
    json_t *objects = json_array();
    draw_shapes(cr, sh, n, objects);
    json_object_set_new(rec, "objects", objects);
    json_object_set_new(rec, "target", json_pack("{s:s}", "kind", KINDS[target]));
    static const char *T[] = {
        "What {a} is the {b}?", "Which {a} is the {b}?", "What is the {a} of the {b}?", "The {b} is what {a}?",
        "Tell me the {a} of the {b}.", "Name the {a} of the {b}.", "What {a} does the {b} have?",
        "There is a {b} in the image. What {a} is it?", "Which {a} was used for the {b}?",
        "Can you tell me what {a} the {b} is?", "Look at the {b}. What {a} is it?", "I see a {b}. Which {a} is it?",
        "In which {a} is the {b} drawn?", "The {b}: what {a}?", "Say the {a} of the {b}.",
        "What {a} has the {b} got?", "Find the {b}. What is its {a}?", "Of what {a} is the {b}?",
    };
    const char *t = PICK(r, T), *cw = PICK(r, COL_WORD);
    fill(s->prompt, sizeof s->prompt, t, cw, KINDS[target], NULL, NULL);
    cap_first(s->prompt);
    decorate(r, s->prompt, sizeof s->prompt, 1, ANS_WORD);
    snprintf(s->answer, sizeof s->answer, "%s", nm_data_colours[sh[ti].colour].name);
    s->task = "colour";
}

// "How many circles are there?" — by kind, by colour, or every shape; 1–5 shapes.
// "How many circles / red shapes / shapes are there?" The answer is drawn first and the scene
// built to match it, so that every answer is about as common as the others. Drawing the scene
// first (as this set did before 2026-11-22) made "1" the answer to 69% of the by-colour and 42%
// of the by-kind questions, and a trained model learned to say "1" instead of counting.
static void task_count(gen_ctx *g, cairo_t *cr, nm_rng *r, json_t *rec, sample *s) {
    int allowed[NM_DATA_N_COLOURS], na = draw_background(g, cr, r, rec, allowed);
    int mode = ri(r, 10) < 4 ? 0 : ri(r, 10) < 5 ? 1 : 2;
    // the count asked for: 0 one time in ten, else 1..5 alike; then 0..2 other shapes beside
    int want = chance(r, 100) ? 0 : 1 + ri(r, 5), others = ri(r, 3);
    if (mode == 2) want = 1 + ri(r, 5), others = 0;
    if (want == 0 && others == 0) others = 1 + ri(r, 2);
    int k = ri(r, 3), c = allowed[ri(r, na)];
    int other_colours[NM_DATA_N_COLOURS], no = 0;
    for (int i = 0; i < na; i++)
        if (allowed[i] != c) other_colours[no++] = allowed[i];
    if (mode == 1 && no == 0) { // one colour on this background: every shape has it
        want += others;
        others = 0;
        if (want == 0) want = 1;
    }
    int n = want + others; // <= 7 <= GRID * GRID cells
    shape sh[GRID * GRID];
    for (int i = 0; i < n; i++) {
        int match = i < want;
        if (mode == 0) {
            sh[i].kind = match ? k : (k + 1 + ri(r, 2)) % 3;
            sh[i].colour = allowed[ri(r, na)];
        } else if (mode == 1) {
            sh[i].kind = ri(r, 3);
            sh[i].colour = match ? c : other_colours[ri(r, no)];
        } else {
            sh[i].kind = ri(r, 3);
            sh[i].colour = allowed[ri(r, na)];
        }
    }
    // place_shapes shuffles the cells: the matching shapes land anywhere
    place_shapes(g, r, sh, n, NULL);
    json_t *objects = json_array();
    draw_shapes(cr, sh, n, objects);
    json_object_set_new(rec, "objects", objects);
    int count = 0;
    char tmpl[256];
    if (mode == 0) { // by kind
        for (int i = 0; i < n; i++) count += sh[i].kind == k;
        static const char *T[] = {
            "How many {a} are there?", "How many {a} can you see?", "Count the {a}.", "How many {a} are in the picture?",
            "What is the number of {a} in the image?", "Count the {a} in this image. How many are there?",
            "The picture shows some shapes. How many of them are {a}?", "How many {a} do you see?",
            "Number of {a}?", "How many {a} does the image contain?", "Can you count the {a}?",
            "Tell me how many {a} there are.", "In the picture, how many {a} are drawn?",
        };
        fill(tmpl, sizeof tmpl, PICK(r, T), KINDS_PL[k], NULL, NULL, NULL);
        json_object_set_new(rec, "target", json_pack("{s:s}", "kind", KINDS[k]));
    } else if (mode == 1) { // by colour
        for (int i = 0; i < n; i++) count += sh[i].colour == c;
        static const char *T[] = {
            "How many {a} shapes are there?", "How many shapes are {a}?", "Count the {a} objects.",
            "How many things in the image are {a}?", "How many {a} figures can you see?",
            "What is the number of {a} shapes?", "Count everything that is {a}.", "How many of the shapes are {a}?",
            "How many {a} things are in the picture?", "Tell me the number of {a} objects.",
        };
        fill(tmpl, sizeof tmpl, PICK(r, T), nm_data_colours[c].name, NULL, NULL, NULL);
        json_object_set_new(rec, "target", json_pack("{s:s}", "colour", nm_data_colours[c].name));
    } else {
        count = n;
        static const char *T[] = {
            "How many shapes are there?", "How many objects can you see?", "Count all the shapes.",
            "What is the total number of shapes in the picture?", "How many figures are in this image?",
            "How many things are drawn?", "Count the objects in the image.", "How many shapes do you see in total?",
            "Tell me how many shapes there are.", "How many objects does the picture show?",
        };
        snprintf(tmpl, sizeof tmpl, "%s", PICK(r, T));
        json_object_set_new(rec, "target", json_object());
    }
    json_object_set_new(rec, "count", json_integer(count));
    snprintf(s->prompt, sizeof s->prompt, "%s", tmpl);
    decorate(r, s->prompt, sizeof s->prompt, 1, ANS_NUMBER);
    snprintf(s->answer, sizeof s->answer, "%d", count);
    s->task = "count";
}

// "What word is written?" — one upper-case word in bold DejaVu Sans, sometimes a shape beside.
static void task_word(gen_ctx *g, cairo_t *cr, nm_rng *r, json_t *rec, sample *s) {
    int S = g->S;
    // Printed text: near-black ink on a flat, light page. Why not coloured ink: a patch's pixels
    // are background + stroke mask x (ink - background), so with free colours the letter shapes
    // reach the model multiplied by a colour that changes from image to image; a small model
    // learned no word in 5000 steps that way (README "The data set").
    int allowed[NM_DATA_N_COLOURS];
    int na = draw_background_textured(g, cr, r, rec, allowed, 0, N_LIGHT_BG);
    const char *w = WORDS[ri(r, N_WORDS)];
    cairo_set_font_face(cr, g->face);
    cairo_set_font_options(cr, g->fopt);
    cairo_set_font_size(cr, 100);
    cairo_text_extents_t e;
    cairo_text_extents(cr, w, &e);
    // One font size, and the ink's top-left corner one pixel inside a cell of an 8 x 8 grid (the
    // shipped model's patches at 64 x 64): a word then looks the same wherever it lies, up to
    // whole patches, so a small model can learn its letters from few samples.
    double fs = S * 0.36;
    if (e.width * fs / 100 > S * 0.88) fs = S * 0.88 * 100 / e.width;
    cairo_set_font_size(cr, fs);
    cairo_text_extents(cr, w, &e);
    double cell = S / 8.0;
    int nx = (int)floor((S - e.width - 2) / cell) + 1, ny = (int)floor((S - e.height - 2) / cell) + 1;
    double ix = 1 + cell * ri(r, nx < 1 ? 1 : nx), iy = 1 + cell * ri(r, ny < 1 ? 1 : ny); // ink top-left
    double ox = ix - e.x_bearing, oy = iy - e.y_bearing;
    set_rgb(cr, WORD_INK_RGB);
    cairo_move_to(cr, ox, oy);
    cairo_show_text(cr, w);
    cairo_new_path(cr);
    int bx0 = (int)floor(ix) - 1, by0 = (int)floor(iy) - 1, bx1 = (int)ceil(ix + e.width) + 1, by1 = (int)ceil(iy + e.height) + 1;
    if (bx0 < 0) bx0 = 0;
    if (by0 < 0) by0 = 0;
    if (bx1 > S) bx1 = S;
    if (by1 > S) by1 = S;
    json_t *objects = json_array();
    json_array_append_new(objects, json_pack("{s:s, s:s, s:o, s:s}", "kind", "word", "colour", NM_DATA_WORD_INK,
                                             "bbox", bbox_json(bx0, by0, bx1, by1), "text", w));
    box avoid = {bx0, by0, bx1, by1};
    if (chance(r, 500) && free_cells(g, &avoid) > 0) { // a distractor shape away from the word
        shape sh[1] = {{ri(r, 3), allowed[ri(r, na)], 0, 0, 0}};
        place_shapes(g, r, sh, 1, &avoid);
        draw_shapes(cr, sh, 1, objects);
    }
    json_object_set_new(rec, "objects", objects);
    json_object_set_new(rec, "word", json_string(w));
    static const char *T[] = {
        "What word is written?", "What word is written in the image?", "Read the word in the picture.",
        "Which word do you see?", "What does the text say?", "What is written here?", "Read the text in this image.",
        "There is a word in the picture. What is it?", "What word appears in the image?",
        "Can you read the word? What is it?", "Which word is shown?", "Write down the word you see.",
        "What does it say in the picture?", "The image contains a word. Which one?", "Read it: what is the word?",
        "Which word is printed on the image?", "Copy the word from the picture.",
    };
    snprintf(s->prompt, sizeof s->prompt, "%s", PICK(r, T));
    decorate(r, s->prompt, sizeof s->prompt, 1, ANS_WORD);
    snprintf(s->answer, sizeof s->answer, "%s", w);
    s->task = "word";
}

// "Which bar is tallest?" — 3–4 pixel-aligned bars of distinct colours and distinct heights,
// answered by colour or by position (1 = leftmost).
static void task_bar(gen_ctx *g, cairo_t *cr, nm_rng *r, json_t *rec, sample *s) {
    int S = g->S;
    int allowed[NM_DATA_N_COLOURS], na = draw_background(g, cr, r, rec, allowed);
    int n = 3 + ri(r, 2);
    if (n > na) n = na;
    int W = (int)lround(S * ru(r, 0.5, 0.8)), H = (int)lround(S * ru(r, 0.5, 0.75));
    int gap = (int)lround(W * ru(r, 0.05, 0.12));
    if (gap < 1) gap = 1;
    int bw = (W - (n - 1) * gap) / n;
    if (bw < 2) bw = 2;
    W = n * bw + (n - 1) * gap;
    int x0 = 1 + ri(r, S - W - 1 > 0 ? S - W - 1 : 1), y0 = 1 + ri(r, S - H - 1 > 0 ? S - H - 1 : 1), base = y0 + H;
    if (base > S) base = S;
    int hmin = (int)lround(H * 0.2);
    if (hmin < 2) hmin = 2;
    int levels[5], pick[5] = {0, 1, 2, 3, 4};
    for (int k = 0; k <= n; k++) levels[k] = hmin + (int)floor(k * (double)(H - hmin) / n + 0.5);
    shuffle_int(r, pick, n + 1); // n distinct levels of the n + 1
    int cols[NM_DATA_N_COLOURS];
    memcpy(cols, allowed, sizeof cols);
    shuffle_int(r, cols, na);
    json_t *objects = json_array();
    int tall = 0, shortest = 0, h[4];
    for (int i = 0; i < n; i++) {
        h[i] = levels[pick[i]];
        if (h[i] > h[tall]) tall = i;
        if (h[i] < h[shortest]) shortest = i;
        int bx = x0 + i * (bw + gap);
        set_rgb(cr, nm_data_colours[cols[i]].rgb);
        cairo_rectangle(cr, bx, base - h[i], bw, h[i]);
        cairo_fill(cr);
        json_array_append_new(objects, json_pack("{s:s, s:s, s:o, s:i, s:i}", "kind", "bar", "colour",
                                                 nm_data_colours[cols[i]].name, "bbox",
                                                 bbox_json(bx, base - h[i], bx + bw, base), "height", h[i], "position", i + 1));
    }
    json_object_set_new(rec, "objects", objects);
    int ask_tall = chance(r, 700), by_pos = chance(r, 400), ans = ask_tall ? tall : shortest;
    static const char *SUP_T[] = {"tallest", "highest", "biggest"}, *SUP_S[] = {"shortest", "lowest", "smallest"};
    const char *sup = ask_tall ? PICK(r, SUP_T) : PICK(r, SUP_S);
    json_object_set_new(rec, "ask", json_string(ask_tall ? "tallest" : "shortest"));
    json_object_set_new(rec, "answer_by", json_string(by_pos ? "position" : "colour"));
    char nb[16];
    snprintf(nb, sizeof nb, "%d", n);
    if (!by_pos) {
        static const char *T[] = {
            "Which bar is the {a}?", "Which bar is {a}?", "What {c} is the {a} bar?", "The {a} bar is which {c}?",
            "In this chart, which bar is the {a}?", "Name the {c} of the {a} bar.",
            "Of the bars, which one is the {a}? Give its {c}.", "Tell me the {c} of the {a} bar in the chart.",
            "Look at the bar chart. Which bar is the {a}?", "Which {c} is the {a} bar?",
            "There are {b} bars. Which one is the {a}?", "What is the {c} of the {a} bar?",
        };
        const char *t = PICK(r, T);
        fill(s->prompt, sizeof s->prompt, t, sup, nb, PICK(r, COL_WORD), NULL);
        snprintf(s->answer, sizeof s->answer, "%s", nm_data_colours[cols[ans]].name);
    } else {
        static const char *T[] = {
            "Counting from the left, which bar is the {a}?",
            "Which bar is the {a}? Give its position from the left (1 is leftmost).",
            "Number the bars 1 to {b} from left to right. Which one is the {a}?",
            "What is the position of the {a} bar, counting from the left?",
            "From left to right, which bar is the {a}? Answer with a number.",
            "The bars are numbered from 1 on the left. Which number has the {a} bar?",
            "Which of the {b} bars is the {a}? Count from the left.",
            "Bar number? The {a} one, counting from the left.",
        };
        fill(s->prompt, sizeof s->prompt, PICK(r, T), sup, nb, NULL, NULL);
        snprintf(s->answer, sizeof s->answer, "%d", ans + 1);
    }
    cap_first(s->prompt);
    decorate(r, s->prompt, sizeof s->prompt, 1, by_pos ? ANS_NUMBER : ANS_WORD);
    s->task = "bar";
}

// ---------------------------------------------------------------------------------------------
// Text-only questions: each family draws its content and one of several phrasings.

static const char *DAYS[] = {"Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"};
static const char *MONTHS[] = {"January", "February", "March",     "April",   "May",      "June",
                               "July",    "August",   "September", "October", "November", "December"};
static const char *NUMW[] = {"zero",  "one",    "two",    "three",    "four",     "five",    "six",
                             "seven", "eight",  "nine",   "ten",      "eleven",   "twelve",  "thirteen",
                             "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"};
static const char *TWORDS[] = {"cat",   "dog",   "sun",   "tree",  "house", "apple", "river", "stone", "green",
                               "bread", "chair", "music", "light", "water", "plant", "clock", "horse", "paper",
                               "smile", "cloud", "train", "glass", "lemon", "tiger", "ocean", "pencil", "garden",
                               "window", "rabbit", "butter", "rain",  "snow",  "fish",  "bird",  "milk",  "road"};
static const char *OPP[][2] = {{"hot", "cold"},   {"big", "small"},  {"up", "down"},     {"day", "night"},
                               {"fast", "slow"},  {"open", "closed"}, {"light", "dark"},  {"wet", "dry"},
                               {"full", "empty"}, {"high", "low"},   {"left", "right"},  {"early", "late"},
                               {"happy", "sad"},  {"in", "out"},     {"on", "off"},      {"black", "white"},
                               {"top", "bottom"}, {"hard", "soft"},  {"long", "short"},  {"old", "young"},
                               {"rich", "poor"},  {"thick", "thin"}, {"loud", "quiet"},  {"strong", "weak"}};
static const char *NAMES[] = {"Tom", "Ann", "Mia", "Leo", "Sam",  "Eva",  "Ben",  "Zoe", "Max", "Ida",
                              "Omar", "Lena", "Raj", "Yuki", "Noah", "Lucy", "Ali", "Nina", "Paul", "Rosa"};
static const char *THINGS[] = {"ball", "kite", "hat", "cup", "bike", "car", "box", "book", "coat", "shoe", "bag", "pen"};
static const char *FRUITS[] = {"apples", "pears", "plums", "eggs", "cards", "coins", "shells", "marbles", "stamps", "sweets"};
static const char *SCOL[] = {"red", "green", "blue", "yellow", "purple", "orange", "black", "white", "brown", "pink"};
static const char *PLACES[] = {"park", "school", "beach", "market", "library", "zoo", "river", "farm", "station", "garden"};
static const char *LOCS[] = {"box", "table", "shelf", "bed", "bag", "car", "chair", "drawer", "basket", "sofa"};

static void two_distinct(nm_rng *r, int n, int *a, int *b) {
    *a = ri(r, n);
    *b = (*a + 1 + ri(r, n - 1)) % n;
}

static void task_text(nm_rng *r, json_t *rec, sample *s) {
    char A[64], B[64], C[64], D[64];
    const char *fam;
    int ans = ANS_WORD;
    switch (ri(r, 14)) {
    case 0: { // weekdays
        fam = "weekday";
        int d = ri(r, 7), next = chance(r, 600);
        static const char *TN[] = {"What comes after {a}?", "Which day follows {a}?", "What day comes after {a}?",
                                   "If today is {a}, what day is tomorrow?", "Name the day after {a}.",
                                   "{a} is followed by which day?", "The day after {a} is"};
        static const char *TP[] = {"What day comes before {a}?", "If today is {a}, what day was yesterday?",
                                   "Which day precedes {a}?", "Name the day before {a}.", "The day before {a} is"};
        fill(s->prompt, sizeof s->prompt, next ? PICK(r, TN) : PICK(r, TP), DAYS[d], NULL, NULL, NULL);
        snprintf(s->answer, sizeof s->answer, "%s", DAYS[(d + (next ? 1 : 6)) % 7]);
        break;
    }
    case 1: { // months
        fam = "month";
        int m = ri(r, 12), next = chance(r, 600);
        static const char *TN[] = {"What month comes after {a}?", "Which month follows {a}?", "After {a} comes which month?",
                                   "Name the month after {a}.", "The month after {a} is"};
        static const char *TP[] = {"What month comes before {a}?", "Which month precedes {a}?",
                                   "Name the month before {a}.", "The month before {a} is"};
        fill(s->prompt, sizeof s->prompt, next ? PICK(r, TN) : PICK(r, TP), MONTHS[m], NULL, NULL, NULL);
        snprintf(s->answer, sizeof s->answer, "%s", MONTHS[(m + (next ? 1 : 11)) % 12]);
        break;
    }
    case 2:
    case 3: { // arithmetic (twice as likely: a large space of distinct prompts)
        fam = "arithmetic";
        ans = ANS_NUMBER;
        int op = ri(r, 3), a, b, v;
        if (op == 0) a = ri(r, 51), b = ri(r, 51), v = a + b;
        else if (op == 1) a = ri(r, 60), b = ri(r, a + 1), v = a - b;
        else a = 1 + ri(r, 10), b = 1 + ri(r, 10), v = a * b;
        int words = a <= 20 && b <= 20 && chance(r, 250);
        snprintf(A, sizeof A, "%s", words ? NUMW[a] : ""), snprintf(B, sizeof B, "%s", words ? NUMW[b] : "");
        if (!words) snprintf(A, sizeof A, "%d", a), snprintf(B, sizeof B, "%d", b);
        static const char *T0[] = {"{a} + {b} =", "What is {a} plus {b}?", "Add {a} and {b}.", "{a} plus {b} equals",
                                   "How much is {a} + {b}?", "Compute {a} + {b}.", "What do you get if you add {b} to {a}?",
                                   "The sum of {a} and {b} is"};
        static const char *T1[] = {"{a} - {b} =", "What is {a} minus {b}?", "Subtract {b} from {a}.",
                                   "How much is {a} - {b}?", "Take {b} away from {a}. What is left?", "{a} minus {b} equals",
                                   "Compute {a} - {b}."};
        static const char *T2[] = {"{a} x {b} =", "What is {a} times {b}?", "Multiply {a} by {b}.", "{a} * {b} =",
                                   "How much is {a} times {b}?", "The product of {a} and {b} is"};
        fill(s->prompt, sizeof s->prompt, op == 0 ? PICK(r, T0) : op == 1 ? PICK(r, T1) : PICK(r, T2), A, B, NULL, NULL);
        snprintf(s->answer, sizeof s->answer, "%d", v);
        break;
    }
    case 4: { // spelling backwards
        fam = "reverse";
        const char *w = PICK(r, TWORDS);
        size_t n = strlen(w);
        for (size_t i = 0; i < n; i++) s->answer[i] = w[n - 1 - i];
        s->answer[n] = '\0';
        static const char *T[] = {"Spell '{a}' backwards.", "Write {a} in reverse.", "Reverse the letters of \"{a}\".",
                                  "What is '{a}' spelled backwards?", "Write the word {a} from right to left.",
                                  "Turn '{a}' around, letter by letter."};
        fill(s->prompt, sizeof s->prompt, PICK(r, T), w, NULL, NULL, NULL);
        break;
    }
    case 5: { // number sequences
        fam = "sequence";
        ans = ANS_NUMBER;
        int a = ri(r, 30), d = 1 + ri(r, 9), len = 3 + ri(r, 3);
        char seq[128] = "";
        for (int i = 0; i < len; i++) {
            char x[16];
            snprintf(x, sizeof x, i ? ", %d" : "%d", a + i * d);
            strncat(seq, x, sizeof seq - strlen(seq) - 1);
        }
        static const char *T[] = {"What number comes next: {a}?", "Continue the sequence: {a}, ...", "{a}, ?",
                                  "Which number follows in {a}?", "Next in the series {a}:", "Find the next number: {a}."};
        fill(s->prompt, sizeof s->prompt, PICK(r, T), seq, NULL, NULL, NULL);
        snprintf(s->answer, sizeof s->answer, "%d", a + len * d);
        break;
    }
    case 6: { // letters of the alphabet
        fam = "alphabet";
        int next = chance(r, 600), l = next ? ri(r, 25) : 1 + ri(r, 25);
        snprintf(A, sizeof A, "%c", 'a' + l);
        static const char *TN[] = {"What letter comes after {a}?", "Which letter follows '{a}' in the alphabet?",
                                   "In the alphabet, what comes after {a}?", "Name the letter after {a}."};
        static const char *TP[] = {"What letter comes before {a}?", "Which letter precedes '{a}' in the alphabet?",
                                   "In the alphabet, what comes just before {a}?"};
        fill(s->prompt, sizeof s->prompt, next ? PICK(r, TN) : PICK(r, TP), A, NULL, NULL, NULL);
        snprintf(s->answer, sizeof s->answer, "%c", 'a' + l + (next ? 1 : -1));
        break;
    }
    case 7: { // letters of a word
        fam = "letters";
        const char *w = PICK(r, TWORDS);
        int q = ri(r, 3);
        static const char *TC[] = {"How many letters are in the word '{a}'?", "Count the letters in {a}.",
                                   "How long is the word \"{a}\", in letters?", "The word {a} has how many letters?"};
        static const char *TF[] = {"What is the first letter of '{a}'?", "Which letter does {a} start with?",
                                   "The word \"{a}\" begins with which letter?"};
        static const char *TL[] = {"What is the last letter of '{a}'?", "Which letter does {a} end with?",
                                   "The word \"{a}\" ends with which letter?"};
        fill(s->prompt, sizeof s->prompt, q == 0 ? PICK(r, TC) : q == 1 ? PICK(r, TF) : PICK(r, TL), w, NULL, NULL, NULL);
        if (q == 0) snprintf(s->answer, sizeof s->answer, "%zu", strlen(w)), ans = ANS_NUMBER;
        else snprintf(s->answer, sizeof s->answer, "%c", q == 1 ? w[0] : w[strlen(w) - 1]);
        break;
    }
    case 8: { // comparisons, parity
        fam = "compare";
        int a, b;
        do a = ri(r, 100), b = ri(r, 100);
        while (a == b);
        snprintf(A, sizeof A, "%d", a), snprintf(B, sizeof B, "%d", b);
        int q = ri(r, 4);
        if (q == 0) {
            static const char *T[] = {"Which is larger, {a} or {b}?", "Which number is bigger: {a} or {b}?",
                                      "{a} or {b}: which is greater?", "Pick the larger number: {a}, {b}."};
            fill(s->prompt, sizeof s->prompt, PICK(r, T), A, B, NULL, NULL);
            snprintf(s->answer, sizeof s->answer, "%d", a > b ? a : b);
            ans = ANS_NUMBER;
        } else if (q == 1) {
            static const char *T[] = {"Which is smaller, {a} or {b}?", "Which number is less: {a} or {b}?",
                                      "{a} or {b}: which is smaller?", "Pick the smaller number: {a}, {b}."};
            fill(s->prompt, sizeof s->prompt, PICK(r, T), A, B, NULL, NULL);
            snprintf(s->answer, sizeof s->answer, "%d", a < b ? a : b);
            ans = ANS_NUMBER;
        } else if (q == 2) {
            static const char *T[] = {"Is {a} bigger than {b}? Answer yes or no.", "Is {a} greater than {b}?",
                                      "True or not: {a} is more than {b}. Say yes or no."};
            fill(s->prompt, sizeof s->prompt, PICK(r, T), A, B, NULL, NULL);
            snprintf(s->answer, sizeof s->answer, "%s", a > b ? "yes" : "no");
        } else {
            static const char *T[] = {"Is {a} odd or even?", "Is the number {a} even or odd?", "{a}: odd or even?"};
            fill(s->prompt, sizeof s->prompt, PICK(r, T), A, NULL, NULL, NULL);
            snprintf(s->answer, sizeof s->answer, "%s", a % 2 ? "odd" : "even");
        }
        break;
    }
    case 9: { // number words
        fam = "numbers";
        int v = ri(r, 21), to_word = chance(r, 500);
        snprintf(A, sizeof A, "%d", v);
        if (to_word) {
            static const char *T[] = {"Write {a} as a word.", "How do you spell the number {a}?", "Spell out {a}.",
                                      "What is {a} in words?"};
            fill(s->prompt, sizeof s->prompt, PICK(r, T), A, NULL, NULL, NULL);
            snprintf(s->answer, sizeof s->answer, "%s", NUMW[v]);
        } else {
            static const char *T[] = {"What number is '{a}'?", "Write {a} with digits.", "Which number is \"{a}\"?",
                                      "Turn the word {a} into a number."};
            fill(s->prompt, sizeof s->prompt, PICK(r, T), NUMW[v], NULL, NULL, NULL);
            snprintf(s->answer, sizeof s->answer, "%d", v);
            ans = ANS_NUMBER;
        }
        break;
    }
    case 10: { // opposites
        fam = "opposite";
        int p = ri(r, N_OF(OPP)), side = ri(r, 2);
        static const char *T[] = {"What is the opposite of {a}?", "The opposite of {a} is", "Give the antonym of {a}.",
                                  "What word means the opposite of '{a}'?", "Opposite of {a}?", "Not {a} but ..."};
        fill(s->prompt, sizeof s->prompt, PICK(r, T), OPP[p][side], NULL, NULL, NULL);
        snprintf(s->answer, sizeof s->answer, "%s", OPP[p][1 - side]);
        break;
    }
    case 11: { // letter case
        fam = "case";
        const char *w = PICK(r, TWORDS);
        int up = chance(r, 600);
        size_t n = strlen(w);
        for (size_t i = 0; i <= n; i++) A[i] = (char)(w[i] >= 'a' && w[i] <= 'z' ? w[i] - 32 : w[i]);
        static const char *TU[] = {"Write '{a}' in capital letters.", "Make {a} upper case.", "Write \"{a}\" in capitals."};
        static const char *TL[] = {"Write '{a}' in small letters.", "Make {a} lower case.", "Write \"{a}\" without capitals."};
        fill(s->prompt, sizeof s->prompt, up ? PICK(r, TU) : PICK(r, TL), up ? w : A, NULL, NULL, NULL);
        snprintf(s->answer, sizeof s->answer, "%s", up ? A : w);
        break;
    }
    default: { // short stories: the answer is a fact stated in the prose
        fam = "story";
        int a, b;
        two_distinct(r, N_OF(NAMES), &a, &b);
        int q = ri(r, 6);
        if (q == 0 || q == 1) { // who has what colour
            int t1, t2, c1, c2;
            two_distinct(r, N_OF(THINGS), &t1, &t2);
            two_distinct(r, N_OF(SCOL), &c1, &c2);
            static const char *T[] = {"{a} has {d} {b} {c} and ", "{a} owns {d} {b} {c}, while ", "{a} bought {d} {b} {c}; "};
            fill(C, sizeof C, PICK(r, T), NAMES[a], SCOL[c1], THINGS[t1], article(SCOL[c1]));
            snprintf(D, sizeof D, "%s has %s %s %s.", NAMES[b], article(SCOL[c2]), SCOL[c2], THINGS[t2]);
            char q2[160];
            int ask_first = ri(r, 2);
            if (q == 0) {
                snprintf(q2, sizeof q2, " What colour is %s's %s?", ask_first ? NAMES[a] : NAMES[b], ask_first ? THINGS[t1] : THINGS[t2]);
                snprintf(s->answer, sizeof s->answer, "%s", ask_first ? SCOL[c1] : SCOL[c2]);
            } else {
                snprintf(q2, sizeof q2, " Who has the %s %s?", ask_first ? SCOL[c1] : SCOL[c2], ask_first ? THINGS[t1] : THINGS[t2]);
                snprintf(s->answer, sizeof s->answer, "%s", ask_first ? NAMES[a] : NAMES[b]);
                ans = ANS_NAME;
            }
            snprintf(s->prompt, sizeof s->prompt, "%s%s%s", C, D, q2);
        } else if (q == 2) { // counting
            int f = ri(r, N_OF(FRUITS)), n = 1 + ri(r, 12), m = 1 + ri(r, 9), gain = chance(r, 600);
            if (!gain && m > n) m = n;
            if (gain)
                snprintf(s->prompt, sizeof s->prompt, "%s has %d %s. %s gives %s %d more. How many %s does %s have now?",
                         NAMES[a], n, FRUITS[f], NAMES[b], NAMES[a], m, FRUITS[f], NAMES[a]);
            else
                snprintf(s->prompt, sizeof s->prompt, "%s had %d %s and gave %d to %s. How many %s does %s have left?",
                         NAMES[a], n, FRUITS[f], m, NAMES[b], FRUITS[f], NAMES[a]);
            snprintf(s->answer, sizeof s->answer, "%d", gain ? n + m : n - m);
            ans = ANS_NUMBER;
        } else if (q == 3) { // places
            int p1, p2;
            two_distinct(r, N_OF(PLACES), &p1, &p2);
            int first = ri(r, 2);
            snprintf(s->prompt, sizeof s->prompt, "On %s, %s went to the %s and %s went to the %s. Where did %s go?",
                     DAYS[ri(r, 7)], NAMES[a], PLACES[p1], NAMES[b], PLACES[p2], first ? NAMES[a] : NAMES[b]);
            snprintf(s->answer, sizeof s->answer, "%s", first ? PLACES[p1] : PLACES[p2]);
        } else if (q == 4) { // heights
            int taller = ri(r, 2);
            static const char *T[] = {"{a} is taller than {b}. Who is {c}?", "{b} is shorter than {a}. Who is {c}?"};
            fill(s->prompt, sizeof s->prompt, PICK(r, T), NAMES[a], NAMES[b], taller ? "taller" : "shorter", NULL);
            snprintf(s->answer, sizeof s->answer, "%s", taller ? NAMES[a] : NAMES[b]);
            ans = ANS_NAME;
        } else { // where is it
            int t1, t2, l1, l2;
            two_distinct(r, N_OF(THINGS), &t1, &t2);
            two_distinct(r, N_OF(LOCS), &l1, &l2);
            int first = ri(r, 2);
            snprintf(s->prompt, sizeof s->prompt, "The %s is in the %s. The %s is on the %s. Where is the %s?", THINGS[t1],
                     LOCS[l1], THINGS[t2], LOCS[l2], first ? THINGS[t1] : THINGS[t2]);
            snprintf(s->answer, sizeof s->answer, "%s", first ? LOCS[l1] : LOCS[l2]);
        }
        break;
    }
    }
    cap_first(s->prompt);
    decorate(r, s->prompt, sizeof s->prompt, 0, ans);
    json_object_set_new(rec, "family", json_string(fam));
    s->task = "text";
    s->has_image = 0;
}

// ---------------------------------------------------------------------------------------------
// One sample: its own random stream, seeded from (seed, split, index, attempt).

enum { SPLIT_TRAIN = 0, SPLIT_EVAL = 1 };
static const char *SPLIT_NAME[] = {"train", "eval"};

static uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static uint64_t sample_seed(uint64_t seed, int split, long index, int attempt) {
    uint64_t h = mix64(seed + 0x6e756c6c6d617001ULL);
    h = mix64(h ^ (0x9e3779b97f4a7c15ULL * (uint64_t)(split + 1)));
    h = mix64(h + (uint64_t)index);
    return mix64(h ^ ((uint64_t)attempt * 0xd1b54a32d192ed03ULL));
}

// Draws sample (split, index, attempt): the image into g->surf (image tasks), the record into
// rec (whose first keys id/split/image/prompt/answer/task exist already). Returns the content
// hash used to keep eval apart from train: the pixels, or for text the prompt.
static uint64_t draw_sample(gen_ctx *g, uint64_t seed, int split, long index, int attempt, json_t *rec, sample *s) {
    nm_rng r;
    nm_rng_seed(&r, sample_seed(seed, split, index, attempt));
    memset(s, 0, sizeof *s);
    s->has_image = 1;
    int task = chance(&r, NM_DATA_TEXT_PERMILLE) ? 4 : ri(&r, 4);
    if (task == 4) {
        task_text(&r, rec, s);
        uint64_t h = nm_fnv1a64(1469598103934665603ULL, "text", 5);
        return nm_fnv1a64(h, s->prompt, strlen(s->prompt));
    }
    cairo_t *cr = cairo_create(g->surf);
    cairo_set_font_options(cr, g->fopt);
    switch (task) {
    case 0: task_colour(g, cr, &r, rec, s); break;
    case 1: task_word(g, cr, &r, rec, s); break;
    case 2: task_count(g, cr, &r, rec, s); break;
    default: task_bar(g, cr, &r, rec, s); break;
    }
    cairo_destroy(cr);
    cairo_surface_flush(g->surf);
    const uint8_t *data = cairo_image_surface_get_data(g->surf);
    int stride = cairo_image_surface_get_stride(g->surf);
    uint64_t h = nm_fnv1a64(1469598103934665603ULL, "image", 6);
    for (int y = 0; y < g->S; y++) {
        const uint32_t *row = (const uint32_t *)(const void *)(data + (size_t)y * stride);
        for (int x = 0; x < g->S; x++) {
            uint32_t px = row[x] & 0xFFFFFFu; // RGB24: the top byte is unused
            h = nm_fnv1a64(h, &px, 4);
        }
    }
    return h;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static int in_sorted(const uint64_t *v, size_t n, uint64_t x) { return n && bsearch(&x, v, n, sizeof x, cmp_u64) != NULL; }

#define MAX_ATTEMPTS 1000

// PNGs are encoded into memory and written with one write(): a third of the time otherwise
// went to libpng's many small writes.
typedef struct {
    unsigned char *p;
    size_t n, cap;
} membuf;

static cairo_status_t png_sink(void *closure, const unsigned char *data, unsigned int len) {
    membuf *b = closure;
    if (b->n + len > b->cap) {
        size_t nc = b->cap ? b->cap : 4096;
        while (nc < b->n + len) nc *= 2;
        unsigned char *np = realloc(b->p, nc);
        if (!np) return CAIRO_STATUS_NO_MEMORY;
        b->p = np;
        b->cap = nc;
    }
    memcpy(b->p + b->n, data, len);
    b->n += len;
    return CAIRO_STATUS_SUCCESS;
}

static int write_whole(const char *path, const void *data, size_t n) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
    if (fd < 0) return -1;
    const char *p = data;
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
            int e = errno;
            close(fd);
            errno = w < 0 ? e : ENOSPC;
            return -1;
        }
        p += w, n -= (size_t)w;
    }
    return close(fd);
}

typedef struct {
    gen_ctx *g;
    const char *tmp;
    uint64_t seed;
    void (*progress)(void *, int, int);
    void *ctx;
    int done, total;
    long redraws; // eval samples drawn again because they repeated a train sample
    membuf png;   // the encoded PNG of the current sample
} gen_run;

// Writes split `split` (n samples) into run->tmp: the PNGs and <split>.jsonl. For train, the
// content hashes go to hashes_out (n entries); for eval, samples whose hash is in the sorted
// train hashes are redrawn.
static nm_status gen_split(gen_run *run, int split, int n, uint64_t *hashes_out, const uint64_t *train_h, size_t n_train_h,
                           nm_error *err) {
    const char *name = SPLIT_NAME[split];
    char *imgdir = nm_path_join(run->tmp, name), jname[16];
    snprintf(jname, sizeof jname, "%s.jsonl", name);
    char *jpath = nm_path_join(run->tmp, jname);
    FILE *jf = NULL;
    nm_status st = NM_OK;
    if (!imgdir || !jpath) {
        st = NM_NOMEM(err, "paths");
        goto done;
    }
    if (mkdir(imgdir, 0777) != 0) {
        st = nm_fail(err, NM_ERR_IO, "cannot create %s: %s", imgdir, strerror(errno));
        goto done;
    }
    if (!(jf = fopen(jpath, "wb"))) {
        st = nm_fail(err, NM_ERR_IO, "cannot create %s: %s", jpath, strerror(errno));
        goto done;
    }
    int digits = n > 1000000 ? 7 : 6; // n <= NM_DATA_MAX_SAMPLES: indices have at most 7 digits
    for (int i = 0; i < n; i++) {
        char rel[64], idbuf[64];
        if (digits > 7) digits = 7;
        snprintf(rel, sizeof rel, "%s/%0*d.png", name, digits, i);
        snprintf(idbuf, sizeof idbuf, "%s-%0*d", name, digits, i);
        sample s;
        json_t *rec = NULL;
        uint64_t h = 0;
        for (int attempt = 0;; attempt++) {
            if (attempt == MAX_ATTEMPTS) {
                st = nm_fail(err, NM_ERR_LIMIT, "cannot draw %s sample %d apart from the train split in %d attempts", name, i,
                             MAX_ATTEMPTS);
                goto done;
            }
            json_decref(rec);
            rec = json_pack("{s:s, s:s, s:n, s:s, s:s, s:s}", "id", idbuf, "split", name, "image", "prompt", "", "answer", "",
                            "task", "");
            if (!rec) {
                st = NM_NOMEM(err, "a record");
                goto done;
            }
            h = draw_sample(run->g, run->seed, split, i, attempt, rec, &s);
            if (!in_sorted(train_h, n_train_h, h)) break;
            run->redraws++;
        }
        if (hashes_out) hashes_out[i] = h;
        json_object_set_new(rec, "prompt", json_string(s.prompt));
        json_object_set_new(rec, "answer", json_string(s.answer));
        json_object_set_new(rec, "task", json_string(s.task));
        if (s.has_image) {
            json_object_set_new(rec, "image", json_string(rel));
            char *png = nm_path_join(run->tmp, rel);
            run->png.n = 0;
            cairo_status_t cs = png ? cairo_surface_write_to_png_stream(run->g->surf, png_sink, &run->png) : CAIRO_STATUS_NO_MEMORY;
            if (cs == CAIRO_STATUS_SUCCESS && write_whole(png, run->png.p, run->png.n) != 0) cs = CAIRO_STATUS_WRITE_ERROR;
            if (cs != CAIRO_STATUS_SUCCESS) {
                st = nm_fail(err, cs == CAIRO_STATUS_NO_MEMORY ? NM_ERR_NOMEM : NM_ERR_IO, "cannot write %s: %s",
                             png ? png : rel, cs == CAIRO_STATUS_WRITE_ERROR ? strerror(errno) : cairo_status_to_string(cs));
                free(png);
                json_decref(rec);
                goto done;
            }
            free(png);
        }
        char *line = json_dumps(rec, JSON_COMPACT | JSON_PRESERVE_ORDER);
        json_decref(rec);
        if (!line) {
            st = NM_NOMEM(err, "a JSON line");
            goto done;
        }
        int bad = fputs(line, jf) < 0 || fputc('\n', jf) == EOF;
        free(line);
        if (bad) {
            st = nm_fail(err, NM_ERR_IO, "cannot write %s: %s", jpath, strerror(errno));
            goto done;
        }
        run->done++;
        if (run->progress && (run->done % 64 == 0 || run->done == run->total)) run->progress(run->ctx, run->done, run->total);
    }
    if (fflush(jf) != 0 || ferror(jf)) st = nm_fail(err, NM_ERR_IO, "cannot write %s: %s", jpath, strerror(errno));
done:
    if (jf && fclose(jf) != 0 && st == NM_OK) st = nm_fail(err, NM_ERR_IO, "cannot write %s: %s", jpath, strerror(errno));
    free(imgdir);
    free(jpath);
    return st;
}

// ---------------------------------------------------------------------------------------------
// The data set directory, written atomically

// Best effort: a leftover temporary directory is harmless (its name says what it is).
static void rmtree(const char *path) {
    nm_error ignored;
    nm_remove_tree(path, &ignored);
}

static int dir_is_empty(const char *path) {
    DIR *d = opendir(path);
    if (!d) return 0;
    struct dirent *e;
    int empty = 1;
    while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) {
            empty = 0;
            break;
        }
    closedir(d);
    return empty;
}

static int is_dataset(const char *dir) {
    char *p = nm_path_join(dir, "info.json"), *text = NULL;
    size_t n;
    nm_error e = {0};
    int ok = 0;
    if (p && nm_read_file(p, (size_t)nm_limit(NM_LIMIT_JSON_FILE_BYTES), &text, &n, &e) == NM_OK) {
        json_t *j = json_loads(text, 0, NULL);
        const char *f = json_string_value(json_object_get(j, "format"));
        ok = f && !strcmp(f, "nullmap-data");
        json_decref(j);
    }
    free(text);
    free(p);
    return ok;
}

static nm_status write_info(const char *tmp, int n_train, int n_eval, uint64_t seed, int S, long redraws, nm_error *err) {
#ifndef NM_VERSION
#define NM_VERSION "dev"
#endif
    json_t *cols = json_object(), *words = json_array();
    for (int i = 0; i < NM_DATA_N_COLOURS; i++) json_object_set_new(cols, nm_data_colours[i].name, rgb_json(nm_data_colours[i].rgb));
    for (int i = 0; i < N_WORDS; i++) json_array_append_new(words, json_string(WORDS[i]));
    json_t *info = json_pack("{s:s, s:i, s:s, s:o, s:i, s:i, s:i, s:[sssss], s:i, s:i, s:o, s:o}", "format", "nullmap-data",
                             "format_version", NM_DATA_FORMAT_VERSION, "generator", "nullmap data " NM_VERSION, "seed",
                             seed <= (uint64_t)INT64_MAX ? json_integer((json_int_t)seed) : json_real((double)seed), "train",
                             n_train, "eval", n_eval, "image_size", S, "tasks", "colour", "word", "count", "bar", "text",
                             "text_permille", NM_DATA_TEXT_PERMILLE, "texture_permille", NM_DATA_TEXTURE_PERMILLE, "colours",
                             cols, "words", words);
    if (info) json_object_set_new(info, "eval_redraws", json_integer(redraws));
    char *text = info ? json_dumps(info, JSON_INDENT(2) | JSON_PRESERVE_ORDER) : NULL;
    json_decref(info);
    char *path = nm_path_join(tmp, "info.json");
    nm_status st;
    if (!text || !path) st = NM_NOMEM(err, "info.json");
    else {
        size_t n = strlen(text);
        text[n] = '\0';
        FILE *f = fopen(path, "wb");
        st = f && fwrite(text, 1, n, f) == n && fputc('\n', f) != EOF && fclose(f) == 0
                 ? NM_OK
                 : nm_fail(err, NM_ERR_IO, "cannot write %s: %s", path, strerror(errno));
    }
    free(text);
    free(path);
    return st;
}

nm_status nm_data_generate(const char *dir_in, int n_train, int n_eval, uint64_t seed, int image_size, int force,
                           void (*progress)(void *, int, int), void *ctx, nm_error *err) {
    if (n_train < 0 || n_train > NM_DATA_MAX_SAMPLES || n_eval < 0 || n_eval > NM_DATA_MAX_SAMPLES)
        return nm_fail(err, NM_ERR_LIMIT, "sample counts must be 0..%d per split, got train %d, eval %d", NM_DATA_MAX_SAMPLES,
                       n_train, n_eval);
    if (n_train + n_eval == 0) return nm_fail(err, NM_ERR_INVALID, "nothing to generate: train and eval counts are both 0");
    if (image_size < NM_DATA_MIN_IMAGE || image_size > NM_DATA_MAX_IMAGE)
        return nm_fail(err, NM_ERR_LIMIT, "image size must be %d..%d pixels, got %d", NM_DATA_MIN_IMAGE, NM_DATA_MAX_IMAGE,
                       image_size);
    if (!dir_in || !*dir_in) return nm_fail(err, NM_ERR_INVALID, "no output directory given");
    // DIR without trailing slashes; its last component must be a real name.
    char *dir = strdup(dir_in);
    if (!dir) return NM_NOMEM(err, "a path");
    size_t len = strlen(dir);
    while (len > 1 && dir[len - 1] == '/') dir[--len] = '\0';
    const char *base = strrchr(dir, '/') ? strrchr(dir, '/') + 1 : dir;
    if (!*base || !strcmp(base, ".") || !strcmp(base, "..")) {
        nm_status st = nm_fail(err, NM_ERR_INVALID, "%s: the output must name a directory (not '.', '..' or '/')", dir_in);
        free(dir);
        return st;
    }
    char *parent = strdup(dir), *tmp = nm_tmp_path(dir), *old = malloc(len + 32), *first_missing = NULL;
    gen_ctx g = {0};
    uint64_t *train_h = NULL;
    gen_run run = {0};
    int made_tmp = 0;
    nm_status st = NM_OK;
    if (!parent || !tmp || !old) {
        st = NM_NOMEM(err, "paths");
        goto done;
    }
    {
        char *slash = strrchr(parent, '/');
        if (!slash) strcpy(parent, ".");
        else if (slash == parent) parent[1] = '\0';
        else *slash = '\0';
    }
    snprintf(old, len + 32, "%s.old-%ld", dir, (long)getpid());
    int exists = nm_path_exists(dir), replace = 0;
    if (exists) {
        if (!nm_is_dir(dir)) {
            st = nm_fail(err, NM_ERR_IO, "%s exists and is not a directory", dir);
            goto done;
        }
        if (!dir_is_empty(dir)) {
            if (!force) {
                st = nm_fail(err, NM_ERR_IO, "%s exists and is not empty (use --force to replace a data set)", dir);
                goto done;
            }
            if (!is_dataset(dir)) {
                st = nm_fail(err, NM_ERR_IO, "%s is not empty and holds no nullmap data set (no info.json); not replacing it", dir);
                goto done;
            }
            replace = 1;
        }
    }
    first_missing = nm_first_missing_dir(parent);
    if ((st = nm_mkdir_p(parent, err)) != NM_OK) goto done;
    if (nm_path_exists(tmp)) rmtree(tmp); // left by an earlier process with our pid
    if (mkdir(tmp, 0777) != 0) {
        st = nm_fail(err, NM_ERR_IO, "cannot create %s: %s", tmp, strerror(errno));
        goto done;
    }
    made_tmp = 1;

    g.S = image_size;
    g.surf = cairo_image_surface_create(CAIRO_FORMAT_RGB24, image_size, image_size);
    g.face = cairo_toy_font_face_create("DejaVu Sans", CAIRO_FONT_SLANT_NORMAL, CAIRO_FONT_WEIGHT_BOLD);
    g.fopt = cairo_font_options_create();
    if (cairo_surface_status(g.surf) || cairo_font_face_status(g.face) || cairo_font_options_status(g.fopt)) {
        st = NM_NOMEM(err, "a drawing surface");
        goto done;
    }
    // Fixed rendering options: the bytes must not depend on the desktop's font settings.
    cairo_font_options_set_antialias(g.fopt, CAIRO_ANTIALIAS_GRAY);
    cairo_font_options_set_hint_style(g.fopt, CAIRO_HINT_STYLE_NONE);
    cairo_font_options_set_hint_metrics(g.fopt, CAIRO_HINT_METRICS_OFF);

    train_h = malloc(sizeof *train_h * (size_t)(n_train > 0 ? n_train : 1));
    if (!train_h) {
        st = NM_NOMEM(err, "the train hashes");
        goto done;
    }
    run = (gen_run){&g, tmp, seed, progress, ctx, 0, n_train + n_eval, 0, {NULL, 0, 0}};
    if (progress) progress(ctx, 0, run.total);
    if ((st = gen_split(&run, SPLIT_TRAIN, n_train, train_h, NULL, 0, err)) != NM_OK) goto done;
    qsort(train_h, (size_t)n_train, sizeof *train_h, cmp_u64);
    if ((st = gen_split(&run, SPLIT_EVAL, n_eval, NULL, train_h, (size_t)n_train, err)) != NM_OK) goto done;
    if ((st = write_info(tmp, n_train, n_eval, seed, image_size, run.redraws, err)) != NM_OK) goto done;

    // Everything on disk before the rename makes it visible.
    int fd = open(tmp, O_RDONLY | O_DIRECTORY);
    if (fd < 0 || syncfs(fd) != 0) {
        st = nm_fail(err, NM_ERR_IO, "cannot flush %s to disk: %s", tmp, strerror(errno));
        if (fd >= 0) close(fd);
        goto done;
    }
    close(fd);
    if (replace && rename(dir, old) != 0) {
        st = nm_fail(err, NM_ERR_IO, "cannot move the old data set %s aside: %s", dir, strerror(errno));
        goto done;
    }
    if (rename(tmp, dir) != 0) { // an empty DIR is replaced by the rename
        st = nm_fail(err, NM_ERR_IO, "cannot rename %s to %s: %s", tmp, dir, strerror(errno));
        if (replace) rename(old, dir);
        goto done;
    }
    made_tmp = 0;
    nm_fsync_path(parent, 1, NULL); // best effort, as for every rename into a directory
    if (replace) rmtree(old);

done:
    if (made_tmp) rmtree(tmp);
    if (st != NM_OK && first_missing) nm_rmdir_up_to(parent, first_missing);
    if (g.surf) cairo_surface_destroy(g.surf);
    if (g.face) cairo_font_face_destroy(g.face);
    if (g.fopt) cairo_font_options_destroy(g.fopt);
    free(train_h);
    free(run.png.p);
    free(first_missing);
    free(parent);
    free(tmp);
    free(old);
    free(dir);
    return st;
}

// ---------------------------------------------------------------------------------------------
// Reader

// Strict UTF-8: no overlong forms, no surrogates, nothing above U+10FFFF. Returns the byte
// offset of the first invalid sequence, or -1.
static long utf8_invalid_at(const unsigned char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        int k;
        unsigned cp;
        if (c >= 0xC2 && c <= 0xDF) k = 1, cp = c & 0x1F;
        else if (c >= 0xE0 && c <= 0xEF) k = 2, cp = c & 0x0F;
        else if (c >= 0xF0 && c <= 0xF4) k = 3, cp = c & 0x07;
        else return (long)i;
        for (int j = 1; j <= k; j++) {
            if (i + (size_t)j >= n || (s[i + j] & 0xC0) != 0x80) return (long)i;
            cp = cp << 6 | (s[i + j] & 0x3F);
        }
        if ((k == 2 && cp < 0x800) || (k == 3 && (cp < 0x10000 || cp > 0x10FFFF)) || (cp >= 0xD800 && cp <= 0xDFFF))
            return (long)i;
        i += (size_t)k + 1;
    }
    return -1;
}

static char *dupstr(const char *s) {
    size_t n = strlen(s) + 1;
    char *p = malloc(n);
    if (p) memcpy(p, s, n);
    return p;
}

static void rec_free(nm_data_record *r) {
    free(r->id);
    free(r->image);
    free(r->prompt);
    free(r->answer);
    free(r->task);
    for (int i = 0; i < r->n_objects; i++) {
        free(r->objects[i].kind);
        free(r->objects[i].colour);
    }
    free(r->objects);
}

void nm_dataset_free(nm_dataset *d) {
    if (!d) return;
    for (int i = 0; i < d->n; i++) rec_free(&d->rec[i]);
    free(d->rec);
    free(d->dir);
    memset(d, 0, sizeof *d);
}

// A string field that must be a non-empty string without NUL characters when present.
// Returns 0 when fine (*out = the string, or NULL when absent), else writes why.
static int opt_string(json_t *o, const char *key, const char *where, const char **out, char *why, size_t cap) {
    json_t *v = json_object_get(o, key);
    *out = NULL;
    if (!v) return 0;
    if (!json_is_string(v) || json_string_length(v) == 0 || strlen(json_string_value(v)) != json_string_length(v)) {
        snprintf(why, cap, "%s\"%s\" must be a non-empty string", where, key);
        return -1;
    }
    *out = json_string_value(v);
    return 0;
}

// The optional ground truth: "background" and "objects" (nm_data.h).
static const char *parse_truth(json_t *j, nm_data_record *r, char *why, size_t cap) {
    json_t *bg = json_object_get(j, "background");
    if (bg) {
        const char *b = json_string_value(bg);
        if (b && !strcmp(b, "flat")) r->background = NM_DATA_BG_FLAT;
        else if (b && !strcmp(b, "texture")) r->background = NM_DATA_BG_TEXTURE;
        else return "field \"background\" must be \"flat\" or \"texture\"";
    }
    json_t *objs = json_object_get(j, "objects");
    if (!objs) return NULL;
    if (!json_is_array(objs)) return "field \"objects\" must be an array";
    size_t n = json_array_size(objs);
    r->has_objects = 1;
    if (n == 0) return NULL;
    r->objects = calloc(n, sizeof *r->objects);
    if (!r->objects) return "out of memory";
    for (size_t i = 0; i < n; i++) {
        json_t *o = json_array_get(objs, i);
        char where[64];
        snprintf(where, sizeof where, "objects[%zu]: ", i);
        if (!json_is_object(o)) {
            snprintf(why, cap, "objects[%zu] must be a JSON object", i);
            return why;
        }
        const char *kind, *colour;
        if (opt_string(o, "kind", where, &kind, why, cap) || opt_string(o, "colour", where, &colour, why, cap)) return why;
        if (!kind) {
            snprintf(why, cap, "objects[%zu]: missing field \"kind\"", i);
            return why;
        }
        json_t *b = json_object_get(o, "bbox");
        int ok = json_is_array(b) && json_array_size(b) == 4;
        long long v[4] = {0, 0, 0, 0};
        for (size_t k = 0; ok && k < 4; k++) {
            json_t *e = json_array_get(b, k);
            ok = json_is_integer(e);
            if (ok) v[k] = json_integer_value(e);
            ok = ok && v[k] >= 0 && v[k] <= NM_DATA_MAX_COORD;
        }
        if (!ok || v[0] >= v[2] || v[1] >= v[3]) {
            snprintf(why, cap, "objects[%zu]: \"bbox\" must be 4 integers [x0, y0, x1, y1] with 0 <= x0 < x1 <= %d and 0 <= y0 < y1 <= %d",
                     i, NM_DATA_MAX_COORD, NM_DATA_MAX_COORD);
            return why;
        }
        nm_data_object *d = &r->objects[i];
        r->n_objects = (int)i + 1; // freed by rec_free from here on
        for (int k = 0; k < 4; k++) d->bbox[k] = (int)v[k];
        d->kind = dupstr(kind);
        d->colour = colour ? dupstr(colour) : NULL;
        if (!d->kind || (colour && !d->colour)) return "out of memory";
    }
    return NULL;
}

// Checks one parsed line; fills r. Returns NULL or what is wrong.
static const char *parse_record(json_t *j, const char *dir, nm_data_record *r, char *why, size_t cap) {
    if (!json_is_object(j)) return "not a JSON object";
    static const char *keys[] = {"id", "prompt", "answer", "task"};
    for (int k = 0; k < 4; k++) {
        json_t *v = json_object_get(j, keys[k]);
        if (!v) {
            snprintf(why, cap, "missing field \"%s\"", keys[k]);
            return why;
        }
        if (!json_is_string(v)) {
            snprintf(why, cap, "field \"%s\" must be a string", keys[k]);
            return why;
        }
        if (json_string_length(v) == 0) {
            snprintf(why, cap, "field \"%s\" is empty", keys[k]);
            return why;
        }
        if (strlen(json_string_value(v)) != json_string_length(v)) {
            snprintf(why, cap, "field \"%s\" contains a NUL character", keys[k]);
            return why;
        }
    }
    json_t *im = json_object_get(j, "image");
    if (!im) return "missing field \"image\" (a path, or null for a text-only sample)";
    if (!json_is_null(im) && !(json_is_string(im) && json_string_length(im) > 0))
        return "field \"image\" must be a non-empty path or null";
    r->id = dupstr(json_string_value(json_object_get(j, "id")));
    r->prompt = dupstr(json_string_value(json_object_get(j, "prompt")));
    r->answer = dupstr(json_string_value(json_object_get(j, "answer")));
    r->task = dupstr(json_string_value(json_object_get(j, "task")));
    if (json_is_string(im)) {
        const char *p = json_string_value(im);
        r->image = p[0] == '/' ? dupstr(p) : nm_path_join(dir, p);
        if (!r->image) return "out of memory";
    }
    if (!r->id || !r->prompt || !r->answer || !r->task) return "out of memory";
    return parse_truth(j, r, why, cap);
}

// Reads one line of f into *buf (NUL-terminated, the '\n' kept), growing *buf only up to
// max + 2 bytes: a longer line stops being read there and *too_long is set, so a file without
// newlines never makes the reader allocate more than the data_line_bytes limit. Returns the
// number of bytes stored, or -1 at the end of the file.
static ssize_t read_line_bounded(FILE *f, char **buf, size_t *cap, size_t max, int *too_long) {
    size_t n = 0;
    *too_long = 0;
    int c = EOF;
    while ((c = getc_unlocked(f)) != EOF) {
        if (n + 2 > *cap) {
            size_t nc = *cap ? *cap * 2 : 4096;
            if (nc > max + 2) nc = max + 2;
            char *p = nc > *cap ? realloc(*buf, nc) : NULL;
            if (!p) return -2;
            *buf = p;
            *cap = nc;
        }
        (*buf)[n++] = (char)c;
        if (c == '\n') break;
        if (n > max) { // max + 1 bytes without the newline: too long
            *too_long = 1;
            break;
        }
    }
    if (n == 0 && c == EOF) return -1;
    (*buf)[n] = '\0';
    return (ssize_t)n;
}

// "image_size" of DIR/info.json into *size; 0 when the file does not exist.
static nm_status read_info_size(const char *dir, int *size, nm_error *err) {
    *size = 0;
    char *path = nm_path_join(dir, "info.json"), *text = NULL;
    if (!path) return NM_NOMEM(err, "a path");
    nm_status st = NM_OK;
    size_t n;
    if (!nm_path_exists(path)) goto done;
    if ((st = nm_read_file(path, (size_t)nm_limit(NM_LIMIT_JSON_FILE_BYTES), &text, &n, err)) != NM_OK) goto done;
    json_error_t je;
    json_t *j = json_loadb(text, n, 0, &je);
    if (!j) {
        st = nm_fail(err, NM_ERR_FORMAT, "%s:%d: bad JSON: %s", path, je.line, je.text);
        goto done;
    }
    json_t *v = json_object_get(j, "image_size");
    if (!json_is_integer(v) || json_integer_value(v) < 1 || json_integer_value(v) > NM_DATA_MAX_COORD)
        st = nm_fail(err, NM_ERR_FORMAT, "%s: \"image_size\" must be an integer 1..%d", path, NM_DATA_MAX_COORD);
    else *size = (int)json_integer_value(v);
    json_decref(j);
done:
    free(text);
    free(path);
    return st;
}

nm_status nm_dataset_load(nm_dataset *d, const char *dir, const char *split, nm_error *err) {
    memset(d, 0, sizeof *d);
    if (!split || (strcmp(split, "train") && strcmp(split, "eval")))
        return nm_fail(err, NM_ERR_INVALID, "split must be \"train\" or \"eval\", got \"%s\"", split ? split : "(null)");
    char name[16];
    snprintf(name, sizeof name, "%s.jsonl", split);
    char *path = nm_path_join(dir, name);
    if (!path) return NM_NOMEM(err, "a path");
    FILE *f = fopen(path, "rb");
    if (!f) {
        nm_status st = nm_fail(err, NM_ERR_IO, "cannot open %s: %s", path, strerror(errno));
        free(path);
        return st;
    }
    nm_status st = NM_OK;
    char *line = NULL;
    size_t cap = 0, rcap = 0;
    ssize_t n;
    long lineno = 0;
    if (!(d->dir = dupstr(dir))) {
        st = NM_NOMEM(err, "a path");
        goto done;
    }
    if ((st = read_info_size(dir, &d->image_size, err)) != NM_OK) goto done;
    const size_t max_line = (size_t)nm_limit(NM_LIMIT_DATA_LINE_BYTES) + 2; // + "\r\n"
    int too_long = 0;
    while ((n = read_line_bounded(f, &line, &cap, max_line, &too_long)) >= 0) {
        lineno++;
        if (n > 0 && line[n - 1] == '\n') line[--n] = '\0';
        if (n > 0 && line[n - 1] == '\r') line[--n] = '\0';
        if (too_long || (uint64_t)n > nm_limit(NM_LIMIT_DATA_LINE_BYTES)) {
            st = nm_limit_fail(err, NM_LIMIT_DATA_LINE_BYTES, "%s:%ld: a line of %s%zd bytes is", path, lineno,
                               too_long ? "more than " : "", too_long ? (ssize_t)nm_limit(NM_LIMIT_DATA_LINE_BYTES) : n);
            goto done;
        }
        if (n == 0) {
            st = nm_fail(err, NM_ERR_FORMAT, "%s:%ld: empty line", path, lineno);
            goto done;
        }
        if (memchr(line, '\0', (size_t)n)) {
            st = nm_fail(err, NM_ERR_FORMAT, "%s:%ld: NUL byte in the line", path, lineno);
            goto done;
        }
        long bad = utf8_invalid_at((const unsigned char *)line, (size_t)n);
        if (bad >= 0) {
            st = nm_fail(err, NM_ERR_FORMAT, "%s:%ld: invalid UTF-8 at byte %ld", path, lineno, bad + 1);
            goto done;
        }
        json_error_t je;
        json_t *j = json_loadb(line, (size_t)n, JSON_REJECT_DUPLICATES, &je);
        if (!j) {
            st = nm_fail(err, NM_ERR_FORMAT, "%s:%ld: bad JSON at column %d: %s", path, lineno, je.column, je.text);
            goto done;
        }
        if ((uint64_t)d->n >= nm_limit(NM_LIMIT_DATA_RECORDS)) {
            json_decref(j);
            st = nm_limit_fail(err, NM_LIMIT_DATA_RECORDS, "%s:%ld: record %d is", path, lineno, d->n + 1);
            goto done;
        }
        if ((size_t)d->n == rcap) {
            size_t nc = rcap ? rcap * 2 : 1024;
            nm_data_record *nr = realloc(d->rec, nc * sizeof *nr);
            if (!nr) {
                json_decref(j);
                st = NM_NOMEM(err, "the records");
                goto done;
            }
            d->rec = nr;
            rcap = nc;
        }
        nm_data_record *r = &d->rec[d->n];
        memset(r, 0, sizeof *r);
        char why[256];
        const char *bad_rec = parse_record(j, dir, r, why, sizeof why);
        json_decref(j);
        if (bad_rec) {
            rec_free(r);
            st = !strcmp(bad_rec, "out of memory") ? NM_NOMEM(err, "a record")
                                                   : nm_fail(err, NM_ERR_FORMAT, "%s:%ld: %s", path, lineno, bad_rec);
            goto done;
        }
        d->n++;
    }
    if (n == -2) st = NM_NOMEM(err, "a line");
    else if (ferror(f)) st = nm_fail(err, NM_ERR_IO, "cannot read %s: %s", path, strerror(errno));
done:
    free(line);
    fclose(f);
    free(path);
    if (st != NM_OK) nm_dataset_free(d);
    return st;
}
