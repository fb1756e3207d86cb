// nm_overlay.c — the compute-map overlay (nm_overlay.h; DESIGN.md §6, the paper's figure 5).
//
// Two passes: a layout pass that places every element with measured text (a 1x1 cairo image
// surface, metrics unhinted so that PNG, SVG and PDF place text identically), and a drawing pass
// onto an nm_canvas. Everything on the picture is drawn by this file from the layout, so the
// boxes nm_overlay_layout_compute() reports are exactly where the pixels land.
#include "nm_overlay.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nm_metrics.h"

// ---- geometry (px; points for SVG/PDF) ----
#define MARGIN 24.0
#define GAP 40.0          // between the two panels
#define TITLE_H 34.0      // title row
#define HEAD_H 24.0       // panel header row
#define INSET_H 24.0      // one row of inset chips
#define LINE_H 22.0       // one line of tokens
#define CELL_H 18.0       // a token cell inside its line
#define CELL_BASE 14.0    // text baseline below the cell top
#define LABEL_H 22.0      // a segment label
#define NOTE_H 18.0       // a truncation note
#define BLOCK_GAP 6.0     // before a segment label
#define TOKEN_FONT 14.0   // token text (DejaVu Sans Mono)
#define CHIP_FONT 10.0    // special-token chips (DejaVu Sans)
#define CTRL_FONT 9.0     // control-character abbreviations (DejaVu Sans Bold)
#define CHIP_PAD 4.0      // chip text padding each side
#define CHIP_GAP 2.0      // space around a chip
#define BAR_W 320.0
#define BAR_H 14.0
#define LEGEND_FONT 11.0
#define LEGEND_LINE 16.0
#define MAX_CONTENT_H 9000.0 // beyond this every further token is left out (malformed samples)
#define MIN_TEXT_W 4.0       // a token whose glyph has no advance still gets a visible cell

enum { TK_NONE = 0, TK_TEXT, TK_CHIP };
enum { MARK_LABEL, MARK_ELLIPSIS, MARK_NOTE };
enum { IMG_NONE = 0, IMG_PHOTO, IMG_MISSING };

typedef struct {
    int type, seg;
    double x, y;        // panel-relative x, absolute y (top)
    long long n_hidden; // MARK_NOTE: tokens left out
} ov_mark;

typedef struct {
    nm_overlay_layout pub;
    int W, H;
    double pw, lx, rx; // panel width, left and right panel x
    double head_y, inset_y, content_y, content_end, legend_y;
    int inset_rows, legend_stacked, bar_label_lines, legend_lines[3];
    double legend_text_x, legend_text_top, bar_y;
    // image block
    int img_kind;          // IMG_*
    int img_up;            // 1 or 2: the image surface is painted at this integer scale
    int base_w, base_h;    // size of the image surface (the original, or scaled down to fit)
    // tokens
    const char **disp;     // [n] display string of each token
    char **owned;          // [n] fallback strings made here (NULL where disp points into the sample)
    int n;                 // entries of disp, owned, kind
    uint8_t *kind;         // [n] TK_*
    long long seg_tokens[NM_SEG_COUNT];
    ov_mark *marks;
    int n_marks, cap_marks;
    int n_vision;
} ov_layout;

static const char NEWLINE_PIC[] = "\xe2\x90\x8a"; // ␊ U+240A
static const char ELLIPSIS[] = "\xe2\x80\xa6";    // …
static const char DASH[] = "\xe2\x80\x93";        // –

void nm_overlay_opts_default(nm_overlay_opts *o) {
    o->cmap = NM_CMAP_GRAY;
    o->alpha = 1.0;
    o->width = 1400;
}

void nm_overlay_layout_free(nm_overlay_layout *lay) {
    if (!lay) return;
    free(lay->token_box);
    free(lay->token_box_left);
    memset(lay, 0, sizeof *lay);
}

static void ov_free(ov_layout *L) {
    if (L->owned)
        for (int t = 0; t < L->n; t++) free(L->owned[t]);
    free(L->owned);
    free(L->disp);
    free(L->kind);
    free(L->marks);
    nm_overlay_layout_free(&L->pub);
    memset(L, 0, sizeof *L);
}

static int add_mark(ov_layout *L, int type, int seg, double x, double y, long long n) {
    if (L->n_marks == L->cap_marks) {
        int cap = L->cap_marks ? 2 * L->cap_marks : 16;
        ov_mark *m = realloc(L->marks, (size_t)cap * sizeof *m);
        if (!m) return -1;
        L->marks = m;
        L->cap_marks = cap;
    }
    L->marks[L->n_marks++] = (ov_mark){type, seg, x, y, n};
    return 0;
}

// ---- text helpers ----

static void set_font_options(cairo_t *cr) {
    cairo_font_options_t *fo = cairo_font_options_create();
    cairo_font_options_set_hint_metrics(fo, CAIRO_HINT_METRICS_OFF);
    cairo_font_options_set_hint_style(fo, CAIRO_HINT_STYLE_NONE);
    cairo_set_font_options(cr, fo);
    cairo_font_options_destroy(fo);
}

static size_t utf8_prev(const char *s, size_t i) { // start of the character before byte i
    while (i > 0) {
        i--;
        if (((unsigned char)s[i] & 0xc0) != 0x80) break;
    }
    return i;
}

// Copies s into buf, cut at a character boundary with "…" appended so that it fits maxw.
static void fit_text(cairo_t *cr, const char *s, double maxw, char *buf, size_t bufsz) {
    size_t len = strlen(s), n = len < bufsz ? len : bufsz - 1;
    if (n < len)
        while (n > 0 && ((unsigned char)s[n] & 0xc0) == 0x80) n--;
    memcpy(buf, s, n);
    buf[n] = '\0';
    if (n == len && nm_viz_text_width(cr, buf) <= maxw) return;
    while (n > 0) {
        n = utf8_prev(s, n);
        if (n + sizeof ELLIPSIS > bufsz) continue;
        memcpy(buf, s, n);
        memcpy(buf + n, ELLIPSIS, sizeof ELLIPSIS);
        if (nm_viz_text_width(cr, buf) <= maxw) return;
    }
    snprintf(buf, bufsz, "%s", ELLIPSIS);
}

// Draws s (when draw is set) wrapped into lines of at most maxw in the current font, breaking
// after spaces or '/' where possible, at most max_lines lines (the last ends in "…" when cut).
// Returns the number of lines.
static int wrap_text(cairo_t *cr, const char *s, double x, double y, double maxw, double line_h, int max_lines, int draw) {
    size_t len = strlen(s), start = 0;
    int lines = 0;
    char buf[1024];
    while (start < len && lines < max_lines) {
        while (start < len && s[start] == ' ') start++;
        size_t end = start, good = start;
        while (end < len) {
            size_t next = end + 1;
            while (next < len && ((unsigned char)s[next] & 0xc0) == 0x80) next++;
            if (next - start >= sizeof buf) break;
            memcpy(buf, s + start, next - start);
            buf[next - start] = '\0';
            if (nm_viz_text_width(cr, buf) > maxw) break;
            end = next;
            if (s[end - 1] == ' ' || s[end - 1] == '/') good = end;
        }
        if (end == start) { // not even one character fits: take one anyway
            end = start + 1;
            while (end < len && ((unsigned char)s[end] & 0xc0) == 0x80) end++;
        }
        if (end < len && good > start) end = good;
        size_t n = end - start < sizeof buf ? end - start : sizeof buf - 1;
        memcpy(buf, s + start, n);
        buf[n] = '\0';
        if (lines == max_lines - 1 && end < len) {
            char cut[1200];
            snprintf(cut, sizeof cut, "%s%s", buf, ELLIPSIS);
            fit_text(cr, cut, maxw, buf, sizeof buf);
        }
        if (draw) nm_viz_text(cr, x, y + lines * line_h, 0, buf);
        lines++;
        start = end;
    }
    return lines;
}

static const char *base_name(const char *path) {
    const char *b = strrchr(path, '/');
    return b ? b + 1 : path;
}

// ---- display strings ----

// Fallback display of token t when the trace has no tokens/text (other writers may omit it):
// the same rules as the tokenizer's, from the ids alone.
static char *fallback_display(const nm_trace_sample *s, int t, int *is_continuation) {
    char buf[32];
    int32_t id = s->token_id ? s->token_id[t] : -1;
    *is_continuation = 0;
    if (s->modality[t] == NM_MOD_VISION) {
        snprintf(buf, sizeof buf, "<patch %d,%d>", s->patch[2 * t], s->patch[2 * t + 1]);
        return strdup(buf);
    }
    if (s->modality[t] == NM_MOD_SPECIAL || id >= 256 || id < 0) {
        if (s->segment[t] == NM_SEG_BOS) return strdup("<bos>");
        if (s->segment[t] == NM_SEG_IMAGE) {
            int before = 1; // before the patches?
            for (int u = t - 1; u >= 0; u--)
                if (s->modality[u] == NM_MOD_VISION) {
                    before = 0;
                    break;
                }
            return strdup(before ? "<img>" : "</img>");
        }
        snprintf(buf, sizeof buf, "<id %d>", (int)id);
        return strdup(buf);
    }
    unsigned c = (unsigned)id;
    if (c < 0x20 || c == 0x7f) {
        unsigned cp = c == 0x7f ? 0x2421 : 0x2400 + c;
        buf[0] = (char)(0xe0 | (cp >> 12));
        buf[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        buf[2] = (char)(0x80 | (cp & 0x3f));
        buf[3] = '\0';
        return strdup(buf);
    }
    if (c < 0x80) {
        buf[0] = (char)c;
        buf[1] = '\0';
        return strdup(buf);
    }
    int need = c >= 0xf0 && c < 0xf5 ? 4 : c >= 0xe0 && c < 0xf0 ? 3 : c >= 0xc2 && c < 0xe0 ? 2 : 0;
    if ((c & 0xc0) == 0x80) { // continuation: empty when a valid lead byte covers it
        for (int back = 1; back <= 3 && t - back >= 0; back++) {
            int32_t b = s->token_id[t - back];
            if (b < 0x80 || b >= 256 || s->modality[t - back] != NM_MOD_TEXT) break;
            if ((b & 0xc0) != 0x80) {
                int n = b >= 0xf0 && b < 0xf5 ? 4 : b >= 0xe0 ? 3 : b >= 0xc2 ? 2 : 0;
                int ok = n > back;
                for (int k = 1; ok && k < n; k++)
                    ok = t - back + k < s->n_tokens && s->modality[t - back + k] == NM_MOD_TEXT &&
                         (s->token_id[t - back + k] & 0xc0) == 0x80 && s->token_id[t - back + k] < 256;
                if (ok) {
                    *is_continuation = 1;
                    return strdup("");
                }
                break;
            }
        }
    } else if (need && t + need <= s->n_tokens) {
        int ok = 1;
        for (int k = 1; k < need && ok; k++)
            ok = s->modality[t + k] == NM_MOD_TEXT && s->token_id[t + k] >= 0x80 && s->token_id[t + k] < 0xc0;
        if (ok) {
            for (int k = 0; k < need; k++) buf[k] = (char)s->token_id[t + k];
            buf[need] = '\0';
            return strdup(buf);
        }
    }
    snprintf(buf, sizeof buf, "\\x%02x", c);
    return strdup(buf);
}

// ---- validation ----

static nm_status check_sample(const nm_trace_sample *s, nm_error *err) {
    if (!s) return nm_fail(err, NM_ERR_INVALID, "overlay: no sample");
    if (s->n_layers < 1 || s->top_k < 1 || s->n_tokens < 0 || s->n_tokens > s->capacity)
        return nm_fail(err, NM_ERR_INVALID, "overlay: sample has %d layers, top-K %d, %d of %d tokens", s->n_layers,
                       s->top_k, s->n_tokens, s->capacity);
    if (s->n_tokens > 0 && (!s->token_id || !s->modality || !s->segment || !s->patch || !s->n_real))
        return nm_fail(err, NM_ERR_INVALID, "overlay: sample arrays are missing");
    if (s->grid_rows < 0 || s->grid_cols < 0 || s->grid_rows > 4096 || s->grid_cols > 4096 ||
        (s->grid_rows == 0) != (s->grid_cols == 0))
        return nm_fail(err, NM_ERR_INVALID, "overlay: patch grid %dx%d is invalid", s->grid_rows, s->grid_cols);
    for (int t = 0; t < s->n_tokens; t++) {
        if (s->modality[t] >= NM_MOD_COUNT || s->segment[t] >= NM_SEG_COUNT)
            return nm_fail(err, NM_ERR_INVALID, "overlay: token %d has modality %d, segment %d", t, s->modality[t],
                           s->segment[t]);
        if (s->modality[t] == NM_MOD_VISION) {
            int r = s->patch[2 * t], c = s->patch[2 * t + 1];
            if (r < 0 || c < 0 || r >= s->grid_rows || c >= s->grid_cols)
                return nm_fail(err, NM_ERR_INVALID, "overlay: patch token %d at (%d, %d) is outside the %dx%d grid", t, r,
                               c, s->grid_rows, s->grid_cols);
        }
    }
    return NM_OK;
}

static nm_status check_opts(const nm_overlay_opts *o, nm_error *err) {
    if (o->cmap != NM_CMAP_GRAY && o->cmap != NM_CMAP_VIRIDIS && o->cmap != NM_CMAP_MAGMA)
        return nm_fail(err, NM_ERR_INVALID, "overlay: unknown colour map %d", (int)o->cmap);
    if (!(o->alpha > 0 && o->alpha <= 1))
        return nm_fail(err, NM_ERR_INVALID, "overlay: alpha %g is outside (0, 1]", o->alpha);
    if (o->width < NM_OVERLAY_MIN_WIDTH || o->width > NM_OVERLAY_MAX_WIDTH)
        return nm_fail(err, NM_ERR_INVALID, "overlay: width %d is outside %d..%d", o->width, NM_OVERLAY_MIN_WIDTH,
                       NM_OVERLAY_MAX_WIDTH);
    return NM_OK;
}

// ---- layout ----

// Display size of a w x h image in a panel pw wide: the original when it fits, scaled down to fit,
// or 2x when it fits twice over. Sets the surface size (*bw, *bh) and the integer scale *up.
static void image_fit(int w, int h, double pw, int *bw, int *bh, int *up) {
    double sc = 1;
    if (w > pw) sc = pw / w;
    if (h * sc > NM_OVERLAY_MAX_IMAGE_H) sc = (double)NM_OVERLAY_MAX_IMAGE_H / h;
    *up = 1;
    if (sc >= 1) {
        *bw = w;
        *bh = h;
        if (2.0 * w <= pw && 2.0 * h <= NM_OVERLAY_MAX_IMAGE_H) *up = 2;
    } else {
        *bw = (int)floor(w * sc);
        *bh = (int)floor(h * sc);
        if (*bw < 1) *bw = 1;
        if (*bh < 1) *bh = 1;
    }
}

// A special token's chip: room for "<bos> 0.00" (the right panel shows the score in the chip).
static double chip_width(cairo_t *cr, const char *text) {
    char buf[128];
    snprintf(buf, sizeof buf, "%s 0.00", text);
    nm_viz_font(cr, CHIP_FONT, 0);
    return nm_viz_text_width(cr, buf) + 2 * CHIP_PAD;
}

static const char *legend_line(int i, const nm_overlay_opts *o, int layer, int L, int K, char *buf, size_t n) {
    switch (i) {
    case 0:
        if (o->cmap == NM_CMAP_GRAY)
            snprintf(buf, n, "image (right): each patch's brightness multiplied by its score: dark = its slots went to null experts%s",
                     o->alpha < 1 ? " (overlay strength < 1)" : "");
        else
            snprintf(buf, n, "image (right): each patch tinted with its score's colour over a grey copy of the image%s",
                     o->alpha < 1 ? " (overlay strength < 1)" : "");
        return buf;
    case 1:
        snprintf(buf, n, "text (right): each token's cell shaded by its score; chips = special tokens (<bos>, <img>, <eos>, \xe2\x80\xa6); boxed LF, CR, \xe2\x80\xa6 = control characters");
        return buf;
    default:
        if (layer >= L)
            snprintf(buf, n, "score of a token = mean over the %d MoE layers of n_real/K (K = %d)", L, K);
        else
            snprintf(buf, n, "score of a token = n_real/K in MoE layer %d (K = %d)", layer, K);
        return buf;
    }
}
#define LEGEND_LINES 3
#define BAR_LABEL "compute score n_real/K:  0 = all slots null (no expert compute),  1 = all K slots real"

typedef struct {
    ov_layout *L;
    const nm_trace_sample *s;
    double x, y;             // panel-relative x; top of the current line
    int line_in_block, pending_nl, trunc, stop, cur_seg, any_in_line;
    long long hidden, hidden_stop;
    double ell_w;
} flow_state;

static void flow_newline(flow_state *f) {
    f->y += LINE_H;
    f->x = 0;
    f->line_in_block++;
    f->any_in_line = 0;
    f->pending_nl = 0;
}

static int flow_end_block(flow_state *f) {
    if (f->any_in_line || f->trunc) f->y += LINE_H;
    f->x = 0;
    f->any_in_line = 0;
    if (f->trunc && f->hidden > 0) {
        if (add_mark(f->L, MARK_NOTE, f->cur_seg, 0, f->y, f->hidden)) return -1;
        f->y += NOTE_H;
    }
    f->trunc = 0;
    f->hidden = 0;
    f->pending_nl = 0;
    f->line_in_block = 0;
    return 0;
}

static int flow_start_block(flow_state *f, int seg) {
    if (f->cur_seg >= 0 && flow_end_block(f)) return -1;
    f->cur_seg = seg;
    if (f->y - f->L->content_y > MAX_CONTENT_H) f->stop = 1;
    if (f->stop) return 0;
    if (f->cur_seg >= 0 && f->y > f->L->content_y) f->y += BLOCK_GAP;
    if (seg != NM_SEG_BOS) {
        if (add_mark(f->L, MARK_LABEL, seg, 0, f->y, 0)) return -1;
        f->y += LABEL_H;
    }
    return 0;
}

static int is_space(const char *d) { return d[0] == ' ' && d[1] == '\0'; }
static int is_newline(const char *d) { return !strcmp(d, NEWLINE_PIC); }

// Unicode control pictures (U+2400-U+2421, U+2424) are in no DejaVu font and often in no font at
// all, so they are drawn here as their boxed abbreviation ("LF", "HT", "DC3"), which is what the
// control picture glyphs show.
static const char *control_abbrev(const char *d) {
    static const char *const names[0x22] = {"NUL", "SOH", "STX", "ETX", "EOT", "ENQ", "ACK", "BEL", "BS",  "HT",  "LF", "VT",
                                            "FF",  "CR",  "SO",  "SI",  "DLE", "DC1", "DC2", "DC3", "DC4", "NAK", "SYN", "ETB",
                                            "CAN", "EM",  "SUB", "ESC", "FS",  "GS",  "RS",  "US",  "SP",  "DEL"};
    const unsigned char *u = (const unsigned char *)d;
    if (u[0] != 0xe2 || u[1] != 0x90 || !u[2] || u[3]) return NULL;
    if (u[2] >= 0x80 && u[2] <= 0xa1) return names[u[2] - 0x80];
    if (u[2] == 0xa4) return "NL";
    return NULL;
}

// A byte that is no UTF-8 character on its own, shown as "\xNN".
static int is_byte_escape(const char *d) { return d[0] == '\\' && d[1] == 'x' && strlen(d) == 4; }

static nm_status layout_build(ov_layout *L, const nm_trace_sample *s, const nm_image *image, const nm_overlay_opts *o,
                              nm_error *err) {
    memset(L, 0, sizeof *L);
    nm_status st = check_sample(s, err);
    if (st != NM_OK) return st;
    nm_overlay_opts def;
    if (!o) {
        nm_overlay_opts_default(&def);
        o = &def;
    }
    st = check_opts(o, err);
    if (st != NM_OK) return st;
    if (image && (!image->rgb || image->width < 1 || image->height < 1))
        return nm_fail(err, NM_ERR_INVALID, "overlay: the image is empty");

    int n = s->n_tokens;
    size_t cap = n > 0 ? (size_t)n : 1;
    L->pub.n_tokens = L->n = n;
    L->pub.token_box = calloc(cap, sizeof *L->pub.token_box);
    L->pub.token_box_left = calloc(cap, sizeof *L->pub.token_box_left);
    L->disp = calloc(cap, sizeof *L->disp);
    L->owned = calloc(cap, sizeof *L->owned);
    L->kind = calloc(cap, 1);
    double *width = calloc(cap, sizeof *width);
    cairo_surface_t *surf = cairo_image_surface_create(CAIRO_FORMAT_RGB24, 1, 1);
    cairo_t *cr = cairo_create(surf);
    if (!L->pub.token_box || !L->pub.token_box_left || !L->disp || !L->owned || !L->kind || !width ||
        cairo_status(cr) != CAIRO_STATUS_SUCCESS) {
        st = NM_NOMEM(err, "the overlay layout");
        goto out;
    }
    set_font_options(cr);

    // ---- display strings, kinds, widths ----
    int have_text = 0;
    for (int t = 0; t < n && !have_text; t++) have_text = s->token_text && s->token_text[t] && s->token_text[t][0];
    for (int t = 0; t < n; t++) {
        L->seg_tokens[s->segment[t]]++;
        if (s->modality[t] == NM_MOD_VISION) {
            L->n_vision++;
            L->disp[t] = "";
            continue;
        }
        const char *d = s->token_text ? s->token_text[t] : NULL;
        int cont = d && !d[0];
        if (!have_text || !d) {
            L->owned[t] = fallback_display(s, t, &cont);
            if (!L->owned[t]) {
                st = NM_NOMEM(err, "token text");
                goto out;
            }
            d = L->owned[t];
        }
        L->disp[t] = d;
        if (cont || !d[0]) continue; // a UTF-8 continuation byte: its character sits on the lead byte
        if (s->modality[t] == NM_MOD_SPECIAL) {
            L->kind[t] = TK_CHIP;
            width[t] = chip_width(cr, d);
        } else {
            L->kind[t] = TK_TEXT;
            nm_viz_font_mono(cr, TOKEN_FONT);
            const char *ab = control_abbrev(d);
            if (ab) {
                double mw = nm_viz_text_width(cr, "M");
                nm_viz_font(cr, CTRL_FONT, 1);
                width[t] = nm_viz_text_width(cr, ab) + 6;
                if (width[t] < mw) width[t] = mw;
            } else {
                width[t] = nm_viz_text_width(cr, d);
            }
            if (width[t] < MIN_TEXT_W) width[t] = MIN_TEXT_W;
        }
    }

    // ---- panels and header rows ----
    L->W = o->width;
    L->pw = floor((L->W - 2 * MARGIN - GAP) / 2);
    L->lx = MARGIN;
    L->rx = MARGIN + L->pw + GAP;
    L->head_y = MARGIN + TITLE_H;
    L->inset_y = L->head_y + HEAD_H;
    {   // the insets: "mean compute:" and four chips "image 0.00"; wrap to a second row if needed
        nm_viz_font(cr, 12, 0);
        double x = nm_viz_text_width(cr, "mean compute n_real/K:") + 8;
        static const char *const names[4] = {"image 0.00", "prompt 0.00", "answer 0.00", "overall 0.00"};
        L->inset_rows = 1;
        for (int i = 0; i < 4; i++) {
            nm_viz_font(cr, 12, 1);
            double w = nm_viz_text_width(cr, names[i]) + 12 + 10;
            if (x + w > L->pw) {
                L->inset_rows++;
                x = 0;
            }
            x += w;
        }
    }
    L->content_y = L->inset_y + L->inset_rows * INSET_H + 10;

    // ---- the image block ----
    int img_w = 0, img_h = 0;
    if (L->n_vision > 0) {
        if (image) {
            L->img_kind = IMG_PHOTO;
            img_w = image->width;
            img_h = image->height;
        } else {
            L->img_kind = IMG_MISSING;
            if (s->image_width > 0 && s->image_height > 0) {
                img_w = s->image_width;
                img_h = s->image_height;
            } else {
                img_w = s->grid_cols * 32;
                img_h = s->grid_rows * 32;
            }
        }
        image_fit(img_w, img_h, L->pw, &L->base_w, &L->base_h, &L->img_up);
        if (L->img_kind == IMG_MISSING && L->base_w < 160 && L->pw >= 160 &&
            L->base_h * 160.0 / L->base_w <= NM_OVERLAY_MAX_IMAGE_H) { // room for the note
            L->base_h = (int)ceil(L->base_h * 160.0 / L->base_w);
            L->base_w = 160;
        }
    }

    // ---- the token flow ----
    flow_state f = {.L = L, .s = s, .y = L->content_y, .cur_seg = -1};
    nm_viz_font_mono(cr, TOKEN_FONT);
    f.ell_w = nm_viz_text_width(cr, ELLIPSIS) + 2;
    int image_placed = 0, in_word = 0;
    for (int t = 0; t < n; t++) {
        int seg = s->segment[t];
        if (seg != f.cur_seg) {
            if (flow_start_block(&f, seg)) goto nomem;
            in_word = 0;
        }
        if (s->modality[t] == NM_MOD_VISION) {
            in_word = 0;
            if (image_placed || f.stop || f.trunc) continue;
            if (f.any_in_line) flow_newline(&f);
            f.y += 4;
            double dw = (double)L->base_w * L->img_up, dh = (double)L->base_h * L->img_up;
            L->pub.left_image = (nm_box){L->lx, f.y, dw, dh};
            L->pub.right_image = (nm_box){L->rx, f.y, dw, dh};
            f.y += dh + 8;
            f.x = 0;
            f.any_in_line = 0;
            f.pending_nl = 0;
            image_placed = 1;
            continue;
        }
        int k = L->kind[t];
        if (k == TK_NONE) continue;
        if (f.stop) {
            f.hidden_stop++;
            continue;
        }
        if (f.trunc) {
            f.hidden++;
            continue;
        }
        const char *d = L->disp[t];
        double w = width[t], adv = w;
        double need = w;
        if (k == TK_CHIP) {
            adv = w + 2 * CHIP_GAP;
            need = adv;
            in_word = 0;
        } else if (is_space(d) || is_newline(d)) {
            in_word = 0;
        } else if (!in_word) { // a word starts: keep it on one line if it fits on one
            in_word = 1;
            double ww = 0;
            for (int u = t; u < n; u++) {
                if (s->segment[u] != seg || s->modality[u] != NM_MOD_TEXT) break;
                if (L->kind[u] == TK_NONE) continue;
                if (is_space(L->disp[u]) || is_newline(L->disp[u])) break;
                ww += width[u];
                if (ww > L->pw) break;
            }
            need = ww;
        }
        double avail = L->pw - (f.line_in_block >= NM_OVERLAY_MAX_LINES - 1 ? f.ell_w : 0);
        if (need > avail) need = avail;
        if (f.pending_nl || (f.any_in_line && f.x + need > avail)) {
            if (f.line_in_block + 1 >= NM_OVERLAY_MAX_LINES) { // out of lines: "…" where the next token would go
                if (add_mark(L, MARK_ELLIPSIS, seg, f.x, f.y, 0)) goto nomem;
                f.trunc = 1;
                f.hidden++;
                continue;
            }
            flow_newline(&f);
            avail = L->pw - (f.line_in_block >= NM_OVERLAY_MAX_LINES - 1 ? f.ell_w : 0);
        }
        if (adv > avail) { // a single token wider than the panel (only a pathological display string)
            w = adv = avail - (k == TK_CHIP ? 2 * CHIP_GAP : 0);
            if (k == TK_CHIP) adv = avail;
        }
        double bx = f.x + (k == TK_CHIP ? CHIP_GAP : 0), by = f.y + (LINE_H - CELL_H) / 2;
        L->pub.token_box[t] = (nm_box){L->rx + bx, by, w, CELL_H};
        L->pub.token_box_left[t] = (nm_box){L->lx + bx, by, w, CELL_H};
        f.x += adv;
        f.any_in_line = 1;
        if (k == TK_TEXT && is_newline(d)) f.pending_nl = 1;
    }
    if (f.cur_seg >= 0 && flow_end_block(&f)) goto nomem;
    if (f.hidden_stop > 0) {
        if (add_mark(L, MARK_NOTE, -1, 0, f.y, f.hidden_stop)) goto nomem;
        f.y += NOTE_H;
    }
    for (int i = 0; i < L->n_marks; i++)
        if (L->marks[i].type == MARK_NOTE) L->pub.truncated += (int)L->marks[i].n_hidden;
    L->content_end = f.y;
    L->pub.left_panel = (nm_box){L->lx, L->content_y, L->pw, L->content_end - L->content_y};
    L->pub.right_panel = (nm_box){L->rx, L->content_y, L->pw, L->content_end - L->content_y};

    // ---- the legend ----
    L->legend_y = L->content_end + 18;
    {
        // the colour bar's label above the bar (wrapped on narrow pictures), the explanation
        // beside the bar or, when it does not fit there, below it (wrapped)
        nm_viz_font(cr, LEGEND_FONT, 0);
        double full = L->W - 2 * MARGIN, lw = nm_viz_text_width(cr, BAR_LABEL), maxw = 0;
        L->bar_label_lines = wrap_text(cr, BAR_LABEL, 0, 0, full, LEGEND_LINE, 4, 0);
        char buf[256];
        nm_overlay_opts wide = *o;
        wide.alpha = 0.5; // the longest variants
        for (int i = 0; i < LEGEND_LINES; i++) {
            double w = nm_viz_text_width(cr, legend_line(i, &wide, s->n_layers, s->n_layers, s->top_k, buf, sizeof buf));
            if (w > maxw) maxw = w;
        }
        L->legend_text_x = MARGIN + (L->bar_label_lines == 1 && lw > BAR_W ? lw : BAR_W) + 30;
        L->legend_stacked = L->legend_text_x + maxw > L->W - MARGIN;
        if (L->legend_stacked) L->legend_text_x = MARGIN;
        int n_text = 0;
        for (int i = 0; i < LEGEND_LINES; i++) {
            L->legend_lines[i] = wrap_text(cr, legend_line(i, &wide, s->n_layers, s->n_layers, s->top_k, buf, sizeof buf), 0, 0,
                                           L->W - MARGIN - L->legend_text_x, LEGEND_LINE, 4, 0);
            n_text += L->legend_lines[i];
        }
        L->bar_y = L->legend_y + L->bar_label_lines * LEGEND_LINE + 2;
        double bar_block = L->bar_y + BAR_H + 20 - L->legend_y, text_block = n_text * LEGEND_LINE + 4, h;
        if (L->legend_stacked) {
            L->legend_text_top = L->legend_y + bar_block + 8;
            h = bar_block + 8 + text_block;
        } else {
            L->legend_text_top = L->legend_y;
            h = bar_block > text_block ? bar_block : text_block;
        }
        L->H = (int)ceil(L->legend_y + h + MARGIN);
    }
    L->pub.width = L->W;
    L->pub.height = L->H;
    st = NM_OK;
    goto out;
nomem:
    st = NM_NOMEM(err, "the overlay layout");
out:
    cairo_destroy(cr);
    cairo_surface_destroy(surf);
    free(width);
    return st;
}

nm_status nm_overlay_layout_compute(nm_overlay_layout *lay, const nm_trace_sample *s, const nm_image *image,
                                    const nm_overlay_opts *o, nm_error *err) {
    if (!lay) return nm_fail(err, NM_ERR_INVALID, "overlay: no layout");
    memset(lay, 0, sizeof *lay);
    ov_layout L;
    nm_status st = layout_build(&L, s, image, o, err);
    if (st == NM_OK) {
        *lay = L.pub;
        memset(&L.pub, 0, sizeof L.pub);
    }
    ov_free(&L);
    return st;
}

// ---- drawing ----

static double luminance(const double rgb[3]) { return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]; }

static void set_rgb(cairo_t *cr, const double c[3]) { cairo_set_source_rgb(cr, c[0], c[1], c[2]); }

// Text colour that reads on background c.
static void set_contrast(cairo_t *cr, const double c[3]) {
    if (luminance(c) < 0.5) cairo_set_source_rgb(cr, 1, 1, 1);
    else cairo_set_source_rgb(cr, 0, 0, 0);
}

static void score_rgb(const nm_overlay_opts *o, double v, double rgb[3]) {
    if (isnan(v)) rgb[0] = rgb[1] = rgb[2] = 0.8;
    else nm_colormap_rgb(o->cmap, v, rgb);
}

static void rounded_rect(cairo_t *cr, double x, double y, double w, double h, double r) {
    cairo_new_sub_path(cr);
    cairo_arc(cr, x + w - r, y + r, r, -M_PI / 2, 0);
    cairo_arc(cr, x + w - r, y + h - r, r, 0, M_PI / 2);
    cairo_arc(cr, x + r, y + h - r, r, M_PI / 2, M_PI);
    cairo_arc(cr, x + r, y + r, r, M_PI, 3 * M_PI / 2);
    cairo_close_path(cr);
}

// A chip with text, background bg (NULL: light grey) and a thin border.
static void draw_chip(cairo_t *cr, double x, double y, double w, double h, const char *text, const double *bg, int bold) {
    double light[3] = {0.90, 0.90, 0.92};
    const double *c = bg ? bg : light;
    rounded_rect(cr, x, y, w, h, 3);
    set_rgb(cr, c);
    cairo_fill_preserve(cr);
    cairo_set_source_rgb(cr, 0.45, 0.45, 0.5);
    cairo_set_line_width(cr, 0.8);
    cairo_stroke(cr);
    if (bg) set_contrast(cr, c);
    else cairo_set_source_rgb(cr, 0.25, 0.25, 0.3);
    nm_viz_font(cr, bold ? 12 : CHIP_FONT, bold);
    nm_viz_text(cr, x + w / 2, y + h / 2 + (bold ? 4.2 : 3.6), 0.5, text);
}

// A text token's glyphs in box b in the current colour (a control character as its boxed name).
static void draw_token_text(cairo_t *cr, const nm_box *b, const char *d) {
    const char *ab = control_abbrev(d);
    if (!ab) {
        nm_viz_font_mono(cr, TOKEN_FONT);
        nm_viz_text(cr, b->x, b->y + CELL_BASE, 0, d);
        return;
    }
    nm_viz_font(cr, CTRL_FONT, 1);
    nm_viz_text(cr, b->x + b->w / 2, b->y + b->h / 2 + 3.3, 0.5, ab);
    cairo_set_line_width(cr, 0.7);
    rounded_rect(cr, b->x + 1, b->y + 3, b->w - 2, b->h - 6, 1.5);
    cairo_stroke(cr);
}

static nm_status new_surface(cairo_surface_t **out, int w, int h, nm_error *err) {
    *out = cairo_image_surface_create(CAIRO_FORMAT_RGB24, w, h);
    if (cairo_surface_status(*out) != CAIRO_STATUS_SUCCESS) {
        cairo_surface_destroy(*out);
        *out = NULL;
        return NM_NOMEM(err, "an image surface");
    }
    return NM_OK;
}

// The image surfaces: the original (left) and the lit copy (right), both base_w x base_h.
static nm_status make_image_surfaces(const ov_layout *L, const nm_trace_sample *s, const nm_image *image,
                                     const double *cell, const nm_overlay_opts *o, cairo_surface_t **orig,
                                     cairo_surface_t **lit, nm_error *err) {
    nm_image scaled = {0};
    const nm_image *src = image;
    nm_status st = NM_OK;
    *orig = *lit = NULL;
    if (image->width != L->base_w || image->height != L->base_h) {
        st = nm_image_resize(&scaled, image, L->base_w, L->base_h, err);
        if (st != NM_OK) return st;
        src = &scaled;
    }
    if ((st = new_surface(orig, L->base_w, L->base_h, err)) != NM_OK) goto out;
    if ((st = new_surface(lit, L->base_w, L->base_h, err)) != NM_OK) goto out;
    cairo_surface_flush(*orig);
    cairo_surface_flush(*lit);
    {
        unsigned char *d0 = cairo_image_surface_get_data(*orig), *d1 = cairo_image_surface_get_data(*lit);
        int stride = cairo_image_surface_get_stride(*orig);
        int gr = s->grid_rows, gc = s->grid_cols, w = L->base_w, h = L->base_h;
        double a = o->alpha;
        for (int y = 0; y < h; y++) {
            uint32_t *r0 = (uint32_t *)(void *)(d0 + (size_t)y * stride), *r1 = (uint32_t *)(void *)(d1 + (size_t)y * stride);
            const uint8_t *p = src->rgb + (size_t)y * w * 3;
            int row = (int)((y + 0.5) * gr / h);
            if (row >= gr) row = gr - 1;
            for (int x = 0; x < w; x++, p += 3) {
                int col = (int)((x + 0.5) * gc / w);
                if (col >= gc) col = gc - 1;
                double v = cell[(size_t)row * gc + col], c[3], out[3];
                r0[x] = (uint32_t)p[0] << 16 | (uint32_t)p[1] << 8 | p[2];
                if (o->cmap == NM_CMAP_GRAY) {
                    double m = isnan(v) ? 0.5 : v < 0 ? 0 : v > 1 ? 1 : v;
                    for (int k = 0; k < 3; k++) out[k] = (1 - a) * p[k] + a * p[k] * m;
                } else {
                    score_rgb(o, v, c);
                    double g = 0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2];
                    for (int k = 0; k < 3; k++) out[k] = (1 - a) * p[k] + a * (0.4 * g + 0.6 * 255 * c[k]);
                }
                uint32_t px = 0;
                for (int k = 0; k < 3; k++) {
                    long q = lround(out[k]);
                    px = px << 8 | (uint32_t)(q < 0 ? 0 : q > 255 ? 255 : q);
                }
                r1[x] = px;
            }
        }
    }
    cairo_surface_mark_dirty(*orig);
    cairo_surface_mark_dirty(*lit);
out:
    if (st != NM_OK) {
        if (*orig) cairo_surface_destroy(*orig);
        if (*lit) cairo_surface_destroy(*lit);
        *orig = *lit = NULL;
    }
    nm_image_free(&scaled);
    return st;
}

static void paint_surface(cairo_t *cr, cairo_surface_t *surf, double x, double y, int up) {
    cairo_save(cr);
    cairo_translate(cr, x, y);
    cairo_scale(cr, up, up);
    cairo_set_source_surface(cr, surf, 0, 0);
    cairo_pattern_set_filter(cairo_get_source(cr), CAIRO_FILTER_NEAREST);
    cairo_rectangle(cr, 0, 0, cairo_image_surface_get_width(surf), cairo_image_surface_get_height(surf));
    cairo_fill(cr);
    cairo_restore(cr);
}

static void frame(cairo_t *cr, const nm_box *b) {
    cairo_set_source_rgb(cr, 0.6, 0.6, 0.6);
    cairo_set_line_width(cr, 1);
    cairo_rectangle(cr, b->x - 0.5, b->y - 0.5, b->w + 1, b->h + 1);
    cairo_stroke(cr);
}

// Faint lines between the patch cells of box b (only when the cells are big enough to need them).
static void grid_lines(cairo_t *cr, const nm_box *b, int gr, int gc) {
    if (b->w / gc < 12 || b->h / gr < 12) return;
    cairo_set_source_rgba(cr, 0.5, 0.5, 0.5, 0.35);
    cairo_set_line_width(cr, 1);
    for (int c = 1; c < gc; c++) {
        double x = floor(b->x + b->w * c / gc) + 0.5;
        cairo_move_to(cr, x, b->y);
        cairo_line_to(cr, x, b->y + b->h);
    }
    for (int r = 1; r < gr; r++) {
        double y = floor(b->y + b->h * r / gr) + 0.5;
        cairo_move_to(cr, b->x, y);
        cairo_line_to(cr, b->x + b->w, y);
    }
    cairo_stroke(cr);
}

static void fmt_value(char *buf, size_t n, double v) {
    if (isnan(v)) snprintf(buf, n, "%s", DASH);
    else snprintf(buf, n, "%.2f", v);
}

static nm_status draw(cairo_t *cr, const ov_layout *L, const nm_trace_sample *s, const nm_image *image, int layer,
                      const nm_overlay_opts *o, const char *title, const double *score, const double *seg_mean,
                      nm_error *err) {
    char buf[1024], buf2[1024];
    const int Ln = s->n_layers;
    set_font_options(cr);

    // ---- title ----
    if (title && *title) {
        snprintf(buf2, sizeof buf2, "%s", title);
    } else {
        char where[64];
        if (layer >= Ln) snprintf(where, sizeof where, "mean over %d layers", Ln);
        else snprintf(where, sizeof where, "layer %d (of 0%s%d)", layer, DASH, Ln - 1);
        snprintf(buf2, sizeof buf2, "Compute map \xc2\xb7 %s \xc2\xb7 top-K = %d%s%s", where, s->top_k,
                 s->image_path && *s->image_path ? " \xc2\xb7 " : "", s->image_path && *s->image_path ? base_name(s->image_path) : "");
    }
    cairo_set_source_rgb(cr, 0, 0, 0);
    nm_viz_font(cr, 18, 1);
    fit_text(cr, buf2, L->W - 2 * MARGIN, buf, sizeof buf);
    nm_viz_text(cr, MARGIN, MARGIN + 20, 0, buf);

    // ---- panel headers ----
    nm_viz_font(cr, 14, 1);
    nm_viz_text(cr, L->lx, L->head_y + 16, 0, "Original input");
    if (layer >= Ln) snprintf(buf2, sizeof buf2, "Compute overlay \xc2\xb7 mean over %d layers", Ln);
    else snprintf(buf2, sizeof buf2, "Compute overlay \xc2\xb7 layer %d", layer);
    fit_text(cr, buf2, L->pw, buf, sizeof buf);
    nm_viz_text(cr, L->rx, L->head_y + 16, 0, buf);

    // left info row: the image file, its size and grid; token count
    {
        char img[600] = "";
        if (s->image_path && *s->image_path) {
            if (image)
                snprintf(img, sizeof img, "%s \xc2\xb7 %d\xc3\x97%d px \xc2\xb7 %d\xc3\x97%d patches \xc2\xb7 ", base_name(s->image_path),
                         image->width, image->height, s->grid_rows, s->grid_cols);
            else
                snprintf(img, sizeof img, "%s (not found) \xc2\xb7 %d\xc3\x97%d patches \xc2\xb7 ", base_name(s->image_path),
                         s->grid_rows, s->grid_cols);
        } else if (L->n_vision == 0) {
            snprintf(img, sizeof img, "text only \xc2\xb7 ");
        }
        snprintf(buf2, sizeof buf2, "%s%d tokens", img, s->n_tokens);
        cairo_set_source_rgb(cr, 0.3, 0.3, 0.3);
        nm_viz_font(cr, 12, 0);
        fit_text(cr, buf2, L->pw, buf, sizeof buf);
        nm_viz_text(cr, L->lx, L->inset_y + 16, 0, buf);
    }
    // right insets
    {
        static const int segs[4] = {NM_SEG_IMAGE, NM_SEG_PROMPT, NM_SEG_ANSWER, NM_SEG_ALL};
        static const char *const names[4] = {"image", "prompt", "answer", "overall"};
        double x = L->rx, y = L->inset_y;
        cairo_set_source_rgb(cr, 0.3, 0.3, 0.3);
        nm_viz_font(cr, 12, 0);
        nm_viz_text(cr, x, y + 16, 0, "mean compute n_real/K:");
        x += nm_viz_text_width(cr, "mean compute n_real/K:") + 8;
        for (int i = 0; i < 4; i++) {
            char v[16];
            fmt_value(v, sizeof v, seg_mean[segs[i]]);
            snprintf(buf, sizeof buf, "%s %s", names[i], v);
            nm_viz_font(cr, 12, 1);
            double w = nm_viz_text_width(cr, buf) + 12;
            if (x + w + 10 > L->rx + L->pw + 0.5) {
                x = L->rx;
                y += INSET_H;
            }
            double bg[3];
            score_rgb(o, seg_mean[segs[i]], bg);
            draw_chip(cr, x, y + 2, w, 19, buf, bg, 1);
            x += w + 10;
        }
    }

    // separator between the panels
    cairo_set_source_rgb(cr, 0.85, 0.85, 0.85);
    cairo_set_line_width(cr, 1);
    cairo_move_to(cr, floor(L->rx - GAP / 2) + 0.5, L->head_y);
    cairo_line_to(cr, floor(L->rx - GAP / 2) + 0.5, L->content_end);
    cairo_stroke(cr);

    // ---- the image (or its placeholder) ----
    if (L->img_kind != IMG_NONE) {
        int gr = s->grid_rows, gc = s->grid_cols;
        double *cell = malloc((size_t)gr * gc * sizeof *cell);
        if (!cell) return NM_NOMEM(err, "patch scores");
        for (size_t i = 0; i < (size_t)gr * gc; i++) cell[i] = NAN;
        for (int t = 0; t < s->n_tokens; t++)
            if (s->modality[t] == NM_MOD_VISION) cell[(size_t)s->patch[2 * t] * gc + s->patch[2 * t + 1]] = score[t];
        const nm_box *lb = &L->pub.left_image, *rb = &L->pub.right_image;
        if (L->img_kind == IMG_PHOTO) {
            cairo_surface_t *orig, *lit;
            nm_status st = make_image_surfaces(L, s, image, cell, o, &orig, &lit, err);
            if (st != NM_OK) {
                free(cell);
                return st;
            }
            paint_surface(cr, orig, lb->x, lb->y, L->img_up);
            paint_surface(cr, lit, rb->x, rb->y, L->img_up);
            cairo_surface_destroy(orig);
            cairo_surface_destroy(lit);
        } else {
            // left: a placeholder that says what is missing
            cairo_set_source_rgb(cr, 0.95, 0.95, 0.95);
            cairo_rectangle(cr, lb->x, lb->y, lb->w, lb->h);
            cairo_fill(cr);
            cairo_set_source_rgb(cr, 0.7, 0.2, 0.1);
            nm_viz_font(cr, 12, 0);
            snprintf(buf, sizeof buf, "original image not found: %s", s->image_path && *s->image_path ? s->image_path : "(no path recorded)");
            int max_lines = (int)((lb->h - 12) / 16) - 2;
            if (max_lines > 4) max_lines = 4;
            double ty = lb->y + (lb->h > 120 ? lb->h / 2 - 16 : 18);
            int nl = wrap_text(cr, buf, lb->x + 8, ty, lb->w - 16, 16, max_lines < 1 ? 1 : max_lines, 1);
            if ((ty - lb->y) + (nl + 1) * 16 < lb->h) {
                cairo_set_source_rgb(cr, 0.35, 0.35, 0.35);
                nm_viz_font(cr, 11, 0);
                wrap_text(cr, "the patch scores are shown on their own on the right", lb->x + 8, ty + (nl + 0.5) * 16,
                          lb->w - 16, 15, 2, 1);
            }
            // right: the patch scores on their own
            for (int r = 0; r < gr; r++)
                for (int c = 0; c < gc; c++) {
                    double rgb[3];
                    score_rgb(o, cell[(size_t)r * gc + c], rgb);
                    set_rgb(cr, rgb);
                    double x0 = round(rb->x + rb->w * c / gc), x1 = round(rb->x + rb->w * (c + 1) / gc);
                    double y0 = round(rb->y + rb->h * r / gr), y1 = round(rb->y + rb->h * (r + 1) / gr);
                    cairo_rectangle(cr, x0, y0, x1 - x0, y1 - y0);
                    cairo_fill(cr);
                }
        }
        free(cell);
        grid_lines(cr, rb, gr, gc);
        frame(cr, lb);
        frame(cr, rb);
    }

    // ---- labels, ellipses, notes ----
    for (int i = 0; i < L->n_marks; i++) {
        const ov_mark *m = &L->marks[i];
        if (m->type == MARK_LABEL) {
            char v[16];
            nm_viz_font(cr, 12, 1);
            cairo_set_source_rgb(cr, 0.15, 0.25, 0.55);
            const char *name = nm_segment_name(m->seg);
            long long nt = L->seg_tokens[m->seg];
            if (m->seg == NM_SEG_IMAGE)
                snprintf(buf, sizeof buf, "image \xc2\xb7 %d patches (%d\xc3\x97%d) + delimiters", L->n_vision, s->grid_rows,
                         s->grid_cols);
            else
                snprintf(buf, sizeof buf, "%s \xc2\xb7 %lld token%s", name, nt, nt == 1 ? "" : "s");
            fit_text(cr, buf, L->pw, buf2, sizeof buf2);
            nm_viz_text(cr, L->lx + m->x, m->y + 15, 0, buf2);
            fmt_value(v, sizeof v, seg_mean[m->seg]);
            snprintf(buf, sizeof buf, "%s \xc2\xb7 mean compute %s", name, v);
            fit_text(cr, buf, L->pw, buf2, sizeof buf2);
            nm_viz_text(cr, L->rx + m->x, m->y + 15, 0, buf2);
        } else if (m->type == MARK_ELLIPSIS) {
            cairo_set_source_rgb(cr, 0.2, 0.2, 0.2);
            nm_viz_font_mono(cr, TOKEN_FONT);
            for (int p = 0; p < 2; p++)
                nm_viz_text(cr, (p ? L->rx : L->lx) + m->x + 1, m->y + (LINE_H - CELL_H) / 2 + CELL_BASE, 0, ELLIPSIS);
        } else {
            cairo_set_source_rgb(cr, 0.45, 0.2, 0.1);
            nm_viz_font(cr, 11, 0);
            if (m->seg >= 0)
                snprintf(buf2, sizeof buf2, "%s %lld more %s token%s not shown (the %s has %lld tokens)", ELLIPSIS, m->n_hidden,
                         nm_segment_name(m->seg), m->n_hidden == 1 ? "" : "s", nm_segment_name(m->seg), L->seg_tokens[m->seg]);
            else
                snprintf(buf2, sizeof buf2, "%s %lld more tokens not shown (the picture would be too tall)", ELLIPSIS, m->n_hidden);
            for (int p = 0; p < 2; p++) {
                fit_text(cr, buf2, L->pw, buf, sizeof buf);
                nm_viz_text(cr, (p ? L->rx : L->lx) + m->x, m->y + 13, 0, buf);
            }
        }
    }

    // ---- tokens ----
    for (int t = 0; t < s->n_tokens; t++) {
        const nm_box *rb = &L->pub.token_box[t], *lb = &L->pub.token_box_left[t];
        if (rb->w <= 0) continue;
        const char *d = L->disp[t];
        double bg[3];
        score_rgb(o, score[t], bg);
        if (L->kind[t] == TK_CHIP) {
            char v[16];
            fmt_value(v, sizeof v, score[t]);
            snprintf(buf, sizeof buf, "%s %s", d, v);
            draw_chip(cr, lb->x, lb->y + 1, lb->w, lb->h - 2, d, NULL, 0);
            draw_chip(cr, rb->x, rb->y + 1, rb->w, rb->h - 2, buf, bg, 0);
        } else {
            set_rgb(cr, bg);
            cairo_rectangle(cr, rb->x, rb->y, rb->w, rb->h);
            cairo_fill(cr);
            for (int p = 0; p < 2; p++) {
                const nm_box *b = p ? rb : lb;
                if (p) set_contrast(cr, bg);
                else if (is_byte_escape(d) || control_abbrev(d)) cairo_set_source_rgb(cr, 0.4, 0.4, 0.4);
                else cairo_set_source_rgb(cr, 0, 0, 0);
                draw_token_text(cr, b, d);
            }
        }
    }

    // ---- legend ----
    {
        double y = L->legend_y;
        cairo_set_source_rgb(cr, 0.85, 0.85, 0.85);
        cairo_move_to(cr, MARGIN, floor(y - 8) + 0.5);
        cairo_line_to(cr, L->W - MARGIN, floor(y - 8) + 0.5);
        cairo_stroke(cr);
        cairo_set_source_rgb(cr, 0, 0, 0);
        nm_viz_font(cr, LEGEND_FONT, 0);
        wrap_text(cr, BAR_LABEL, MARGIN, y + 12, L->W - 2 * MARGIN, LEGEND_LINE, L->bar_label_lines, 1);
        nm_viz_colorbar(cr, MARGIN, L->bar_y, BAR_W, BAR_H, o->cmap, NULL);
        double ty = L->legend_text_top + 12;
        cairo_set_source_rgb(cr, 0.2, 0.2, 0.2);
        nm_viz_font(cr, LEGEND_FONT, 0);
        for (int i = L->n_vision > 0 ? 0 : 1; i < LEGEND_LINES; i++) { // no image line for a text-only sample
            legend_line(i, o, layer, Ln, s->top_k, buf, sizeof buf);
            ty += LEGEND_LINE * wrap_text(cr, buf, L->legend_text_x, ty, L->W - MARGIN - L->legend_text_x, LEGEND_LINE,
                                          L->legend_lines[i], 1);
        }
    }
    return NM_OK;
}

nm_status nm_render_overlay(const nm_trace_sample *s, const nm_image *image, int layer, const nm_overlay_opts *o,
                            const char *title, const char *path, nm_error *err) {
    if (!path) return nm_fail(err, NM_ERR_INVALID, "overlay: no output path");
    nm_viz_format fmt;
    nm_status st = nm_viz_format_from_path(path, &fmt, err);
    if (st != NM_OK) return st;
    nm_overlay_opts def;
    if (!o) {
        nm_overlay_opts_default(&def);
        o = &def;
    }
    st = check_sample(s, err);
    if (st != NM_OK) return st;
    if (layer < 0 || layer > s->n_layers)
        return nm_fail(err, NM_ERR_INVALID, "overlay: layer %d is outside 0..%d (%d = the mean over layers)", layer,
                       s->n_layers, s->n_layers);
    double *score = malloc((size_t)(s->n_tokens > 0 ? s->n_tokens : 1) * sizeof *score);
    if (!score) return NM_NOMEM(err, "token scores");
    nm_metrics m = {0};
    ov_layout L;
    int have_layout = 0;
    double seg_mean[NM_SEG_COUNT + 1];
    if (s->n_tokens > 0 && (st = nm_metrics_token_scores(s, layer, score, err)) != NM_OK) goto out;
    if ((st = nm_metrics_init(&m, s->n_layers, s->top_k, err)) != NM_OK) goto out;
    if ((st = nm_metrics_add_sample(&m, s, err)) != NM_OK) goto out;
    nm_metrics_finish(&m);
    for (int g = 0; g <= NM_SEG_COUNT; g++) seg_mean[g] = nm_metrics_layer_seg_intensity(&m, layer, g);
    st = layout_build(&L, s, image, o, err);
    have_layout = 1; // layout_build leaves L freeable also when it fails
    if (st != NM_OK) goto out;
    nm_canvas c;
    if ((st = nm_canvas_open(&c, path, L.W, L.H, err)) != NM_OK) goto out;
    st = draw(c.cr, &L, s, image, layer, o, title, score, seg_mean, err);
    if (st != NM_OK) {
        nm_canvas_abort(&c);
        goto out;
    }
    st = nm_canvas_commit(&c, err);
out:
    if (have_layout) ov_free(&L);
    nm_metrics_free(&m);
    free(score);
    return st;
}
