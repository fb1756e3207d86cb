// nm_charts.c — modality chart (figure 4), polarization histograms (figure 7a), zero-compute vs
// null slot ratio (figure 7b), per-layer intensity strip (figure 10). See nm_charts.h.
//
// Every renderer is layout → canvas → draw; the layout functions compute every position the
// drawing code uses, so tests can look at the pixels where the layout says a bar or a cell is.
// Coordinates of bars and cells are whole numbers so that PNG edges are crisp.
#include "nm_charts.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nm_viz.h"

// ---------------------------------------------------------------------------------------------
// Colours, labels, number formats

// Okabe–Ito colour-blind-safe palette.
static const double MOD_RGB[NM_MOD_ALL + 1][3] = {
    [NM_MOD_TEXT] = {0xE6 / 255.0, 0x9F / 255.0, 0x00 / 255.0},
    [NM_MOD_VISION] = {0x00 / 255.0, 0x72 / 255.0, 0xB2 / 255.0},
    [NM_MOD_SPECIAL] = {0x99 / 255.0, 0x99 / 255.0, 0x99 / 255.0},
    [NM_MOD_ALL] = {0x33 / 255.0, 0x33 / 255.0, 0x33 / 255.0},
};

static const double GRID_GREY = 0.87;  // gridlines
static const double AXIS_GREY = 0.25;  // axis lines, tick labels
static const double NOTE_GREY = 0.35;  // notes, "n/a", "undefined"
static const double NA_CELL = 0.91;    // strip cells without tokens

void nm_chart_modality_rgb(int mod, double rgb[3]) {
    if (mod < 0 || mod > NM_MOD_ALL) mod = NM_MOD_ALL;
    for (int i = 0; i < 3; i++) rgb[i] = MOD_RGB[mod][i];
}

void nm_chart_series_rgb(int mod, int series, int n_series, double rgb[3]) {
    nm_chart_modality_rgb(mod, rgb);
    double t = n_series > 1 ? 0.55 * (double)series / (double)(n_series - 1) : 0.0;
    if (t < 0) t = 0;
    if (t > 0.55) t = 0.55;
    for (int i = 0; i < 3; i++) rgb[i] = rgb[i] * (1 - t) + t;
}

static const char *mod_label(int mod) {
    return mod == NM_MOD_ALL ? "all tokens" : nm_modality_name(mod);
}

void nm_chart_label(char *buf, size_t n, const nm_config *cfg) {
    if (!buf || n == 0) return;
    buf[0] = 0;
    if (!cfg) return;
    int N = cfg->moe.num_experts, M = cfg->moe.null_copies;
    char full[128];
    if (N > 0 && M >= 0)
        snprintf(full, sizeof full, "K=%d, \xcf\x81=%.2f (N=%d, M=%d%s)", cfg->moe.top_k, nm_config_rho(cfg), N, M,
                 cfg->moe.null_kind == NM_NULL_COPY ? ", copy nulls" : "");
    else
        snprintf(full, sizeof full, "K=%d", cfg->moe.top_k);
    // cut at a character boundary (ρ is two bytes), never inside one
    size_t len = strlen(full);
    if (len >= n) {
        len = n - 1;
        while (len > 0 && ((unsigned char)full[len] & 0xC0) == 0x80) len--;
    }
    memcpy(buf, full, len);
    buf[len] = 0;
}

// "0.74"; "<0.01" / ">0.99" where rounding would hide that a value is not exactly 0 or 1.
static void fmt_value(char *buf, size_t n, double v) {
    if (isnan(v)) snprintf(buf, n, "n/a");
    else if (v > 0 && v < 0.005) snprintf(buf, n, "<0.01");
    else if (v < 1 && v >= 0.995) snprintf(buf, n, ">0.99");
    else snprintf(buf, n, "%.2f", v);
}

// 1234567 → "1,234,567".
static void fmt_count(char *buf, size_t n, long long v) {
    char raw[32];
    snprintf(raw, sizeof raw, "%lld", v < 0 ? -v : v);
    size_t len = strlen(raw), o = 0;
    char out[48];
    if (v < 0) out[o++] = '-';
    for (size_t i = 0; i < len; i++) {
        if (i > 0 && (len - i) % 3 == 0) out[o++] = ',';
        out[o++] = raw[i];
    }
    out[o] = 0;
    snprintf(buf, n, "%s", out);
}

static double rnd(double v) { return floor(v + 0.5); }

static void set_grey(cairo_t *cr, double g) { cairo_set_source_rgb(cr, g, g, g); }

// The heading every chart starts with: a bold title at y = 30 and, when given, a grey
// explanatory line at sub_y.
static void draw_heading(cairo_t *cr, double x, const char *title, const char *subtitle, double sub_y) {
    cairo_set_source_rgb(cr, 0, 0, 0);
    nm_viz_font(cr, 18, 1);
    nm_viz_text(cr, x, 30, 0, title);
    if (!subtitle) return;
    set_grey(cr, NOTE_GREY);
    nm_viz_font(cr, 12, 0);
    nm_viz_text(cr, x, sub_y, 0, subtitle);
}
static void set_rgb(cairo_t *cr, const double rgb[3]) { cairo_set_source_rgb(cr, rgb[0], rgb[1], rgb[2]); }

// ---------------------------------------------------------------------------------------------
// Series checks

static nm_status check_series(const nm_chart_series *s, int n, nm_error *err) {
    if (!s || n < 1) return nm_fail(err, NM_ERR_INVALID, "chart: no traces to draw");
    if (n > NM_CHART_MAX_SERIES)
        return nm_fail(err, NM_ERR_LIMIT, "chart: %d traces; at most %d fit in one chart", n, NM_CHART_MAX_SERIES);
    for (int i = 0; i < n; i++) {
        const nm_metrics *m = s[i].m;
        if (!m || !m->polarization || !m->layer_intensity || m->n_layers < 1 || m->top_k < 1)
            return nm_fail(err, NM_ERR_INVALID, "chart: trace %d has no metrics (not initialised)", i + 1);
        if (s[i].top_k != 0 && s[i].top_k != m->top_k)
            return nm_fail(err, NM_ERR_INVALID, "chart: trace %d is labelled K=%d but its metrics have K=%d",
                           i + 1, s[i].top_k, m->top_k);
    }
    return NM_OK;
}

// Copies UTF-8 text into buf (n ≥ 4), replacing every byte that starts no valid character by '?'
// (cairo refuses to draw invalid UTF-8 and would fail the whole picture), cut at a character
// boundary with "…" when it does not fit.
static void utf8_clean(char *buf, size_t n, const char *src) {
    size_t o = 0;
    const unsigned char *p = (const unsigned char *)src;
    while (*p) {
        size_t len = *p < 0x80 ? 1 : (*p & 0xE0) == 0xC0 ? 2 : (*p & 0xF0) == 0xE0 ? 3 : (*p & 0xF8) == 0xF0 ? 4 : 0;
        for (size_t k = 1; k < len; k++)
            if ((p[k] & 0xC0) != 0x80) len = 0;
        if (len == 2 && *p < 0xC2) len = 0;                       // overlong
        if (len == 3 && *p == 0xE0 && p[1] < 0xA0) len = 0;       // overlong
        if (len == 3 && *p == 0xED && p[1] >= 0xA0) len = 0;      // surrogate
        if (len == 4 && ((*p == 0xF0 && p[1] < 0x90) || *p > 0xF4 || (*p == 0xF4 && p[1] >= 0x90))) len = 0;
        size_t out_len = len ? len : 1;
        if (o + out_len + 4 > n) { // no room for this character and a closing ellipsis
            if (o + 4 <= n) memcpy(buf + o, "\xe2\x80\xa6", 3), o += 3;
            break;
        }
        if (len) memcpy(buf + o, p, len);
        else buf[o] = '?';
        o += out_len;
        p += len ? len : 1;
    }
    buf[o] = 0;
}

#define LABEL_MAX 256
static const char *series_label(const nm_chart_series *s, int i, char *buf, size_t n) {
    if (s[i].label && s[i].label[0]) utf8_clean(buf, n, s[i].label);
    else snprintf(buf, n, "trace %d", i + 1);
    return buf;
}

static int rho_known(double rho) { return !isnan(rho) && rho > 0 && rho <= 1; }

static int any_tokens(const nm_chart_series *s, int n, int mod) {
    for (int i = 0; i < n; i++)
        if (s[i].m->n_tokens[mod] > 0) return 1;
    return 0;
}

// Modalities shown: vision, text always; special when any trace has special tokens; all if asked.
static int shown_mods(const nm_chart_series *s, int n, int with_all, int mods[4]) {
    int k = 0;
    mods[k++] = NM_MOD_VISION;
    mods[k++] = NM_MOD_TEXT;
    if (any_tokens(s, n, NM_MOD_SPECIAL)) mods[k++] = NM_MOD_SPECIAL;
    if (with_all) mods[k++] = NM_MOD_ALL;
    return k;
}

// "1,234 tokens in 5 samples, 4 layers"
static void series_stats(const nm_metrics *m, char *buf, size_t n) {
    char tok[48];
    fmt_count(tok, sizeof tok, m->n_tokens[NM_MOD_ALL]);
    snprintf(buf, n, "%s tokens in %lld sample%s, %d layer%s", tok, m->n_samples, m->n_samples == 1 ? "" : "s",
             m->n_layers, m->n_layers == 1 ? "" : "s");
}

// ---------------------------------------------------------------------------------------------
// Text measurement outside a canvas (layouts are computed before the canvas exists)

typedef struct {
    cairo_surface_t *sf;
    cairo_t *cr;
} scratch;

static nm_status scratch_open(scratch *sc, nm_error *err) {
    sc->sf = cairo_image_surface_create(CAIRO_FORMAT_ARGB32, 4, 4);
    sc->cr = cairo_create(sc->sf);
    if (cairo_status(sc->cr) != CAIRO_STATUS_SUCCESS) {
        cairo_destroy(sc->cr);
        cairo_surface_destroy(sc->sf);
        sc->cr = NULL;
        sc->sf = NULL;
        return NM_NOMEM(err, "chart layout");
    }
    return NM_OK;
}

static void scratch_close(scratch *sc) {
    if (sc->cr) cairo_destroy(sc->cr);
    if (sc->sf) cairo_surface_destroy(sc->sf);
    sc->cr = NULL;
    sc->sf = NULL;
}

static double text_w(cairo_t *cr, double size, int bold, const char *s) {
    nm_viz_font(cr, size, bold);
    return nm_viz_text_width(cr, s);
}

// ---------------------------------------------------------------------------------------------
// Drawing helpers

// Text rotated to read bottom-to-top; (x, y) is on its baseline, `align` along the text.
static void text_up(cairo_t *cr, double x, double y, double align, const char *s) {
    double w = nm_viz_text_width(cr, s);
    cairo_save(cr);
    cairo_translate(cr, x, y);
    cairo_rotate(cr, -M_PI / 2);
    cairo_move_to(cr, -align * w, 0);
    cairo_show_text(cr, s);
    cairo_restore(cr);
}

// "base" followed by a raised, smaller "sup"; returns the width drawn.
static double text_sup(cairo_t *cr, double x, double y, double size, const char *base, const char *sup) {
    nm_viz_font(cr, size, 0);
    nm_viz_text(cr, x, y, 0, base);
    double w = nm_viz_text_width(cr, base);
    nm_viz_font(cr, size * 0.75, 0);
    nm_viz_text(cr, x + w + 1, y - size * 0.4, 0, sup);
    double w2 = nm_viz_text_width(cr, sup);
    nm_viz_font(cr, size, 0);
    return w + 1 + w2;
}

static void hline(cairo_t *cr, double x0, double x1, double y) {
    cairo_move_to(cr, x0, rnd(y) + 0.5);
    cairo_line_to(cr, x1, rnd(y) + 0.5);
    cairo_stroke(cr);
}

static void vline(cairo_t *cr, double x, double y0, double y1) {
    cairo_move_to(cr, rnd(x) + 0.5, y0);
    cairo_line_to(cr, rnd(x) + 0.5, y1);
    cairo_stroke(cr);
}

// A 0..1 value axis at the left of plot p: gridlines at every `step`, labels on each gridline, the
// frame's left and bottom edge, and `ylabel` rotated at x = label_x (centred on the plot).
static void value_axis(cairo_t *cr, nm_chart_box p, double step, const char *ylabel, double label_x) {
    cairo_set_line_width(cr, 1);
    int nt = (int)rnd(1.0 / step);
    for (int i = 0; i <= nt; i++) {
        double v = i * step, y = p.y + p.h * (1 - v);
        if (i > 0) {
            set_grey(cr, GRID_GREY);
            hline(cr, p.x, p.x + p.w, y);
        }
        set_grey(cr, AXIS_GREY);
        hline(cr, p.x - 4, p.x, y);
        char t[16];
        if (i == 0) snprintf(t, sizeof t, "0");
        else if (i == nt) snprintf(t, sizeof t, "1");
        else snprintf(t, sizeof t, "%g", v);
        nm_viz_font(cr, 11, 0);
        nm_viz_text(cr, p.x - 7, y + 4, 1, t);
    }
    set_grey(cr, AXIS_GREY);
    vline(cr, p.x - 1, p.y, p.y + p.h);
    hline(cr, p.x - 1, p.x + p.w, p.y + p.h);
    if (ylabel) {
        cairo_set_source_rgb(cr, 0, 0, 0);
        nm_viz_font(cr, 12, 0);
        text_up(cr, label_x, p.y + p.h / 2, 0.5, ylabel);
    }
}

// A bar of value v (0..1) in column b (full plot height); NAN draws nothing.
static void value_bar(cairo_t *cr, nm_chart_box b, double v, const double rgb[3]) {
    if (isnan(v) || b.w <= 0) return;
    if (v < 0) v = 0;
    if (v > 1) v = 1;
    double top = rnd(b.y + b.h * (1 - v)), bottom = b.y + b.h;
    if (bottom - top <= 0) return;
    set_rgb(cr, rgb);
    cairo_rectangle(cr, b.x, top, b.w, bottom - top);
    cairo_fill(cr);
}

static void value_label(cairo_t *cr, nm_chart_box b, double v) {
    char t[16];
    fmt_value(t, sizeof t, v);
    double top = isnan(v) ? b.y + b.h : rnd(b.y + b.h * (1 - (v < 0 ? 0 : v > 1 ? 1 : v)));
    if (isnan(v)) set_grey(cr, NOTE_GREY);
    else cairo_set_source_rgb(cr, 0, 0, 0);
    nm_viz_font(cr, 11, 0);
    nm_viz_text(cr, b.x + b.w / 2, top - 4, 0.5, t);
}

static void swatch(cairo_t *cr, double x, double y, double w, double h, const double rgb[3]) {
    set_rgb(cr, rgb);
    cairo_rectangle(cr, x, y, w, h);
    cairo_fill(cr);
}

static void notes(cairo_t *cr, double x, double y, const char **lines, int n) {
    set_grey(cr, NOTE_GREY);
    nm_viz_font(cr, 11, 0);
    for (int i = 0; i < n; i++) nm_viz_text(cr, x, y + 16 * i, 0, lines[i]);
}

// ---------------------------------------------------------------------------------------------
// Figure 4: compute by modality

#define MC_MARGIN 24.0
#define MC_YAXIS 70.0      // room left of each plot for tick labels and the rotated axis label
#define MC_PANEL_GAP 28.0
#define MC_PLOT_H 300.0
#define MC_MIN_PLOT_W 250.0
#define MC_PAD 14.0        // inside the plot, left and right of the bar groups
#define MC_BAR_GAP 3.0
#define MC_GROUP_GAP 26.0
#define MC_BAR_MIN 36.0
#define MC_BAR_MAX 64.0
#define MC_LEGEND_ROW 20.0
#define MC_MAX_SIDE_BY_SIDE 2000.0 // wider than this (many traces): panels stacked
#define MC_STACK_GAP 100.0         // plot bottom to the next plot top when stacked

static const char *MC_TITLE = "MoE compute by modality";
static const char *MC_PANEL_TITLE[NM_CHART_PANELS] = {"Token distribution", "Compute distribution",
                                                     "Compute intensity"};
static const char *MC_YLABEL[NM_CHART_PANELS] = {"share of tokens", "share of MoE compute (\xce\xa3 c_t)",
                                                "mean compute score n_real/K"};

static int mc_notes(const nm_chart_series *s, int n, const char *out[4]) {
    int k = 0;
    out[k++] = "compute score c_t = mean over the MoE layers of n_real/K, the share of a token's top-K slots "
               "that went to real (not null) experts";
    out[k++] = "compute distribution = each modality's share of \xce\xa3 c_t over all tokens";
    int undef = 0, na = 0;
    for (int i = 0; i < n; i++) {
        if (!s[i].m->compute_share_defined) undef = 1;
        for (int j = 0; j <= NM_MOD_ALL; j++)
            if (isnan(s[i].m->intensity[j])) na = 1;
    }
    if (undef) out[k++] = "undefined: that trace has no real-expert compute at all (every slot went to a null expert)";
    if (na) out[k++] = "n/a: the trace has no tokens of that modality";
    return k;
}

nm_status nm_modality_chart_layout(const nm_chart_series *s, int n, nm_modality_layout *lay, nm_error *err) {
    memset(lay, 0, sizeof *lay);
    nm_status st = check_series(s, n, err);
    if (st != NM_OK) return st;
    scratch sc;
    if ((st = scratch_open(&sc, err)) != NM_OK) return st;

    // Legend: one row per series: swatches, number, label and counts.
    double legend_w = 0;
    for (int i = 0; i < n; i++) {
        char buf[LABEL_MAX], stats[128], line[1024];
        series_stats(s[i].m, stats, sizeof stats);
        snprintf(line, sizeof line, "%s   %s", series_label(s, i, buf, sizeof buf), stats);
        double w = 60 + text_w(sc.cr, 12, 0, line);
        if (w > legend_w) legend_w = w;
    }
    double title_w = text_w(sc.cr, 18, 1, MC_TITLE);
    double group_label_w = 0; // modality names under the groups must not run into each other
    for (int mod = 0; mod <= NM_MOD_ALL; mod++) {
        double w = text_w(sc.cr, 12, 1, mod_label(mod));
        if (w > group_label_w) group_label_w = w;
    }
    const char *nl[4];
    int nn = mc_notes(s, n, nl);
    double notes_w = 0;
    for (int i = 0; i < nn; i++) {
        double w = text_w(sc.cr, 11, 0, nl[i]);
        if (w > notes_w) notes_w = w;
    }
    scratch_close(&sc);

    double legend_y = 52;
    double plot_y = rnd(legend_y + n * MC_LEGEND_ROW + 52);
    // Plot widths first: side by side unless that gets wider than MC_MAX_SIDE_BY_SIDE (many
    // traces), then stacked, one panel per row, so the picture keeps a readable shape.
    double pw[NM_CHART_PANELS], bw[NM_CHART_PANELS], used[NM_CHART_PANELS], total = MC_MARGIN;
    int mods[NM_CHART_PANELS][4], g[NM_CHART_PANELS];
    for (int p = 0; p < NM_CHART_PANELS; p++) {
        g[p] = shown_mods(s, n, p == NM_CHART_INTENSITY, mods[p]);
        double fixed = 2 * MC_PAD + (g[p] - 1) * MC_GROUP_GAP + g[p] * (n - 1) * MC_BAR_GAP;
        bw[p] = floor((MC_MIN_PLOT_W - fixed) / (g[p] * n));
        if (bw[p] < MC_BAR_MIN) bw[p] = MC_BAR_MIN;
        if (bw[p] > MC_BAR_MAX) bw[p] = MC_BAR_MAX;
        double min_bw = ceil((group_label_w + 16 - MC_GROUP_GAP - (n - 1) * MC_BAR_GAP) / n);
        if (bw[p] < min_bw) bw[p] = min_bw;
        used[p] = fixed + g[p] * n * bw[p];
        pw[p] = rnd(used[p] > MC_MIN_PLOT_W ? used[p] : MC_MIN_PLOT_W);
        total += MC_YAXIS + pw[p] + (p < NM_CHART_PANELS - 1 ? MC_PANEL_GAP : MC_MARGIN);
    }
    int stacked = total > MC_MAX_SIDE_BY_SIDE;
    double x = MC_MARGIN, y = plot_y, right = 0, bottom = 0;
    for (int p = 0; p < NM_CHART_PANELS; p++) {
        nm_chart_box plot = {rnd(x + MC_YAXIS), y, pw[p], MC_PLOT_H};
        lay->plot[p] = plot;
        double bx = plot.x + rnd((pw[p] - used[p]) / 2) + MC_PAD;
        for (int j = 0; j < g[p]; j++) {
            for (int i = 0; i < n; i++) {
                lay->bar[p][mods[p][j]][i] = (nm_chart_box){bx, plot.y, bw[p], plot.h};
                bx += bw[p] + (i < n - 1 ? MC_BAR_GAP : 0);
            }
            bx += MC_GROUP_GAP;
        }
        if (plot.x + plot.w + MC_MARGIN > right) right = plot.x + plot.w + MC_MARGIN;
        bottom = plot.y + plot.h;
        if (stacked) y = rnd(plot.y + plot.h + MC_STACK_GAP);
        else x = plot.x + plot.w + MC_PANEL_GAP;
    }
    double need = MC_MARGIN + (legend_w > notes_w ? legend_w : notes_w) + MC_MARGIN;
    if (title_w + 2 * MC_MARGIN > need) need = title_w + 2 * MC_MARGIN;
    lay->width = (int)ceil(right > need ? right : need);
    lay->height = (int)ceil(bottom + 58 + 16 * nn + 8);
    return NM_OK;
}

static void mc_draw(cairo_t *cr, const nm_chart_series *s, int n, const nm_modality_layout *lay) {
    draw_heading(cr, MC_MARGIN, MC_TITLE, NULL, 0);

    // Legend
    for (int i = 0; i < n; i++) {
        double y = 52 + i * MC_LEGEND_ROW;
        double rgb[3];
        nm_chart_series_rgb(NM_MOD_VISION, i, n, rgb);
        swatch(cr, MC_MARGIN, y, 9, 13, rgb);
        nm_chart_series_rgb(NM_MOD_TEXT, i, n, rgb);
        swatch(cr, MC_MARGIN + 10, y, 9, 13, rgb);
        char num[16], buf[LABEL_MAX], stats[128];
        snprintf(num, sizeof num, "%d", i + 1);
        cairo_set_source_rgb(cr, 0, 0, 0);
        nm_viz_font(cr, 12, 1);
        nm_viz_text(cr, MC_MARGIN + 26, y + 11, 0, num);
        const char *label = series_label(s, i, buf, sizeof buf);
        nm_viz_font(cr, 12, 0);
        nm_viz_text(cr, MC_MARGIN + 44, y + 11, 0, label);
        double lw = nm_viz_text_width(cr, label);
        series_stats(s[i].m, stats, sizeof stats);
        set_grey(cr, NOTE_GREY);
        nm_viz_font(cr, 11, 0);
        nm_viz_text(cr, MC_MARGIN + 44 + lw + 14, y + 11, 0, stats);
    }

    for (int p = 0; p < NM_CHART_PANELS; p++) {
        nm_chart_box plot = lay->plot[p];
        cairo_set_source_rgb(cr, 0, 0, 0);
        nm_viz_font(cr, 14, 1);
        nm_viz_text(cr, plot.x + plot.w / 2, plot.y - 26, 0.5, MC_PANEL_TITLE[p]);
        value_axis(cr, plot, 0.25, MC_YLABEL[p], plot.x - 44);
        for (int mod = 0; mod <= NM_MOD_ALL; mod++) {
            if (lay->bar[p][mod][0].w <= 0) continue;
            for (int i = 0; i < n; i++) {
                const nm_metrics *m = s[i].m;
                nm_chart_box b = lay->bar[p][mod][i];
                double v = p == NM_CHART_TOKENS ? m->token_share[mod]
                         : p == NM_CHART_COMPUTE ? m->compute_share[mod] : m->intensity[mod];
                double rgb[3];
                nm_chart_series_rgb(mod, i, n, rgb);
                if (p == NM_CHART_COMPUTE && !m->compute_share_defined) {
                    set_grey(cr, NOTE_GREY);
                    nm_viz_font(cr, 11, 0);
                    text_up(cr, b.x + b.w / 2 + 4, b.y + b.h - 6, 0, "undefined");
                } else if (isnan(v) || (p != NM_CHART_TOKENS && m->n_tokens[mod] == 0)) {
                    // no tokens of this modality: no bar, never a zero bar
                    value_label(cr, b, NAN);
                } else {
                    value_bar(cr, b, v, rgb);
                    value_label(cr, b, v);
                }
                if (n > 1) {
                    char num[16];
                    snprintf(num, sizeof num, "%d", i + 1);
                    set_grey(cr, AXIS_GREY);
                    nm_viz_font(cr, 11, 0);
                    nm_viz_text(cr, b.x + b.w / 2, plot.y + plot.h + 15, 0.5, num);
                }
            }
            nm_chart_box first = lay->bar[p][mod][0], last = lay->bar[p][mod][n - 1];
            set_rgb(cr, MOD_RGB[mod]);
            if (mod == NM_MOD_SPECIAL) set_grey(cr, 0.45); // the grey itself is too light for text
            nm_viz_font(cr, 12, 1);
            nm_viz_text(cr, (first.x + last.x + last.w) / 2, plot.y + plot.h + (n > 1 ? 33 : 18), 0.5,
                        mod_label(mod));
        }
    }
    const char *nl[4];
    int nn = mc_notes(s, n, nl);
    notes(cr, MC_MARGIN, lay->plot[NM_CHART_PANELS - 1].y + MC_PLOT_H + 62, nl, nn);
}

nm_status nm_render_modality_chart(const nm_chart_series *s, int n, const char *path, nm_error *err) {
    nm_modality_layout lay;
    nm_status st = nm_modality_chart_layout(s, n, &lay, err);
    if (st != NM_OK) return st;
    nm_canvas c;
    if ((st = nm_canvas_open(&c, path, lay.width, lay.height, err)) != NM_OK) return st;
    mc_draw(c.cr, s, n, &lay);
    return nm_canvas_commit(&c, err);
}

// ---------------------------------------------------------------------------------------------
// Figure 7a: polarization histograms

static nm_chart_box polar_plot(const nm_polar_layout *lay, int panel) {
    int col = panel % lay->cols, row = panel / lay->cols;
    return (nm_chart_box){lay->x0 + col * lay->dx, lay->y0 + row * lay->dy, lay->plot_w, lay->plot_h};
}

nm_chart_box nm_polar_plot(const nm_polar_layout *lay, int panel) {
    if (!lay || panel < 0 || panel >= lay->n_panels || lay->cols < 1) return (nm_chart_box){0, 0, 0, 0};
    return polar_plot(lay, panel);
}

nm_chart_box nm_polar_bar(const nm_polar_layout *lay, int panel, int top_k, int mod, int k) {
    nm_chart_box none = {0, 0, 0, 0};
    if (!lay || panel < 0 || panel >= lay->n_panels || top_k < 1 || k < 0 || k > top_k) return none;
    int j = -1;
    for (int i = 0; i < lay->n_mods; i++)
        if (lay->mods[i] == mod) j = i;
    if (j < 0) return none;
    nm_chart_box p = polar_plot(lay, panel);
    double gw = p.w / (top_k + 1), inner = gw * 0.8, bw = inner / lay->n_mods;
    double x0 = rnd(p.x + k * gw + gw * 0.1 + j * bw), x1 = rnd(p.x + k * gw + gw * 0.1 + (j + 1) * bw);
    if (x1 - x0 < 1) x1 = x0 + 1;
    return (nm_chart_box){x0, p.y, x1 - x0, p.h};
}

// Polarization share of modality `mod` in `layer` with n_real = k (NAN without tokens).
static double polar_share(const nm_metrics *m, int layer, int mod, int k) {
    long long pairs = nm_metrics_pairs(m, layer, mod);
    if (pairs <= 0) return NAN;
    return (double)nm_metrics_polarization(m, layer, mod, k) / (double)pairs;
}

static const char *PL_TITLE = "Polarization: real experts per token, all MoE layers";
static const char *PL_YLABEL = "share of (layer, token) pairs";
static const char *PL_SUBTITLE = "How many of each token's K slots went to real experts, over every (layer, token) pair; "
                                 "each modality's bars sum to 1.";

static void modality_legend(cairo_t *cr, double x, double y, const int *mods, int n_mods) {
    for (int j = 0; j < n_mods; j++) {
        swatch(cr, x, y - 10, 12, 12, MOD_RGB[mods[j]]);
        cairo_set_source_rgb(cr, 0, 0, 0);
        nm_viz_font(cr, 12, 0);
        nm_viz_text(cr, x + 17, y, 0, mod_label(mods[j]));
        x += 17 + nm_viz_text_width(cr, mod_label(mods[j])) + 22;
    }
}

nm_status nm_polarization_layout(const nm_chart_series *s, int n, nm_polar_layout *lay, nm_error *err) {
    memset(lay, 0, sizeof *lay);
    nm_status st = check_series(s, n, err);
    if (st != NM_OK) return st;
    int kmax = 1;
    for (int i = 0; i < n; i++)
        if (s[i].m->top_k > kmax) kmax = s[i].m->top_k;
    lay->n_mods = shown_mods(s, n, 1, lay->mods);
    lay->n_panels = n;
    lay->cols = n < 3 ? n : 3;
    int rows = (n + lay->cols - 1) / lay->cols;
    // wide enough for printed values when K is small (bars of 30 units), else 6 (3 past K = 16)
    double valued = (kmax + 1) * lay->n_mods * 30 / 0.8;
    double per_group = lay->n_mods * (kmax > 16 ? 3.0 : 6.0) / 0.8;
    lay->plot_w = rnd(valued <= 480 ? fmax(340, valued) : fmax(340, (kmax + 1) * per_group));
    lay->plot_h = 260;
    lay->x0 = 24 + 66;
    lay->dx = lay->plot_w + 66 + 34;
    lay->y0 = 96 + 46;
    lay->dy = 46 + lay->plot_h + 64;

    scratch sc;
    if ((st = scratch_open(&sc, err)) != NM_OK) return st;
    double title_w = fmax(text_w(sc.cr, 18, 1, PL_TITLE), text_w(sc.cr, 12, 0, PL_SUBTITLE));
    double label_w = 0;
    for (int i = 0; i < n; i++) {
        char buf[LABEL_MAX];
        double w = text_w(sc.cr, 13, 1, series_label(s, i, buf, sizeof buf));
        if (w > label_w) label_w = w;
    }
    scratch_close(&sc);
    if (label_w + 20 > lay->plot_w) lay->dx += rnd(label_w + 20 - lay->plot_w); // keep titles apart
    double right = lay->x0 + (lay->cols - 1) * lay->dx + lay->plot_w + 24;
    if (title_w + 48 > right) right = title_w + 48;
    lay->width = (int)ceil(right);
    lay->height = (int)ceil(lay->y0 + (rows - 1) * lay->dy + lay->plot_h + 64);
    return NM_OK;
}

// One histogram: bars for every shown modality at n_real = 0..K, x ticks, value labels when the
// bars are wide enough. `small` for the per-layer small multiples.
static void polar_panel(cairo_t *cr, const nm_polar_layout *lay, int panel, const nm_metrics *m, int layer,
                        int small) {
    nm_chart_box p = polar_plot(lay, panel);
    int K = m->top_k;
    value_axis(cr, p, small ? 0.5 : 0.25, NULL, 0);
    for (int j = 0; j < lay->n_mods; j++) {
        int mod = lay->mods[j];
        for (int k = 0; k <= K; k++) {
            nm_chart_box b = nm_polar_bar(lay, panel, K, mod, k);
            double v = polar_share(m, layer, mod, k);
            value_bar(cr, b, v, MOD_RGB[mod]);
            if (!small && b.w >= 28 && !isnan(v)) value_label(cr, b, v);
        }
    }
    // x ticks: every n_real value that has room for its label
    double gw = p.w / (K + 1);
    int every = 1;
    while (gw * every < 18) every++;
    set_grey(cr, AXIS_GREY);
    nm_viz_font(cr, 11, 0);
    for (int k = 0; k <= K; k++) {
        if (k % every && k != K) continue;
        if (k != K && K - k < every && K % every) continue; // keep K itself clear of a neighbour
        char t[16];
        snprintf(t, sizeof t, "%d", k);
        nm_viz_text(cr, p.x + (k + 0.5) * gw, p.y + p.h + 14, 0.5, t);
    }
}

// " · no vision, special tokens" for the modalities shown that have no tokens ("" when none).
static void missing_mods(const nm_polar_layout *lay, const nm_metrics *m, char *buf, size_t n) {
    buf[0] = 0;
    for (int j = 0; j < lay->n_mods; j++)
        if (lay->mods[j] != NM_MOD_ALL && m->n_tokens[lay->mods[j]] == 0) {
            size_t len = strlen(buf);
            snprintf(buf + len, n - len, "%s%s", len ? ", " : " \xc2\xb7 no ", nm_modality_name(lay->mods[j]));
        }
    if (buf[0]) strncat(buf, " tokens", n - strlen(buf) - 1);
}

nm_status nm_render_polarization(const nm_chart_series *s, int n, const char *path, nm_error *err) {
    nm_polar_layout lay;
    nm_status st = nm_polarization_layout(s, n, &lay, err);
    if (st != NM_OK) return st;
    nm_canvas c;
    if ((st = nm_canvas_open(&c, path, lay.width, lay.height, err)) != NM_OK) return st;
    cairo_t *cr = c.cr;
    draw_heading(cr, 24, PL_TITLE, PL_SUBTITLE, 52);
    modality_legend(cr, 24, 80, lay.mods, lay.n_mods);
    for (int i = 0; i < n; i++) {
        const nm_metrics *m = s[i].m;
        nm_chart_box p = polar_plot(&lay, i);
        char buf[LABEL_MAX], line[256], z[16], ns[16], missing[96];
        cairo_set_source_rgb(cr, 0, 0, 0);
        nm_viz_font(cr, 13, 1);
        nm_viz_text(cr, p.x - 60, p.y - 28, 0, series_label(s, i, buf, sizeof buf));
        fmt_value(z, sizeof z, m->zero_compute_ratio);
        fmt_value(ns, sizeof ns, m->null_slot_ratio);
        missing_mods(&lay, m, missing, sizeof missing);
        snprintf(line, sizeof line, "zero-compute ratio %s \xc2\xb7 null slot ratio %s%s", z, ns, missing);
        set_grey(cr, NOTE_GREY);
        nm_viz_font(cr, 11, 0);
        nm_viz_text(cr, p.x - 60, p.y - 11, 0, line);
        polar_panel(cr, &lay, i, m, NM_LAYER_ALL(m), 0);
        cairo_set_source_rgb(cr, 0, 0, 0);
        nm_viz_font(cr, 12, 0);
        snprintf(line, sizeof line, "n_real = real experts among the K=%d slots", m->top_k);
        nm_viz_text(cr, p.x + p.w / 2, p.y + p.h + 34, 0.5, line);
        text_up(cr, p.x - 44, p.y + p.h / 2, 0.5, PL_YLABEL);
    }
    return nm_canvas_commit(&c, err);
}

nm_status nm_polarization_layers_layout(const nm_chart_series *s, nm_polar_layout *lay, nm_error *err) {
    memset(lay, 0, sizeof *lay);
    nm_status st = check_series(s, s ? 1 : 0, err);
    if (st != NM_OK) return st;
    const nm_metrics *m = s->m;
    int L = m->n_layers, K = m->top_k;
    lay->n_mods = shown_mods(s, 1, 1, lay->mods);
    lay->n_panels = L + 1;
    lay->cols = L + 1 <= 5 ? L + 1 : L + 1 <= 12 ? 4 : L + 1 <= 30 ? 6 : 8;
    int rows = (lay->n_panels + lay->cols - 1) / lay->cols;
    lay->plot_w = rnd(fmax(160, (K + 1) * (K <= 16 ? 20.0 : lay->n_mods * 2.0 + 4)));
    lay->plot_h = 90;
    lay->x0 = 24 + 40;
    lay->dx = lay->plot_w + 40 + 18;
    lay->y0 = 96 + 26;
    lay->dy = 26 + lay->plot_h + 30;

    scratch sc;
    if ((st = scratch_open(&sc, err)) != NM_OK) return st;
    char buf[LABEL_MAX], title[600];
    snprintf(title, sizeof title, "Polarization per MoE layer \xe2\x80\x94 %s", series_label(s, 0, buf, sizeof buf));
    double title_w = text_w(sc.cr, 18, 1, title);
    double legend_w = text_w(sc.cr, 12, 0,
                             "x: n_real = real experts among the K=999 slots \xc2\xb7 y: share of the modality's tokens "
                             "(0 to 1) \xc2\xb7 zero: zero-compute ratio (share with n_real = 0)");
    scratch_close(&sc);
    double right = lay->x0 + (lay->cols - 1) * lay->dx + lay->plot_w + 24;
    if (title_w + 48 > right) right = title_w + 48;
    if (legend_w + 48 > right) right = legend_w + 48;
    lay->width = (int)ceil(right);
    lay->height = (int)ceil(lay->y0 + (rows - 1) * lay->dy + lay->plot_h + 30);
    return NM_OK;
}

nm_status nm_render_polarization_layers(const nm_chart_series *s, const char *path, nm_error *err) {
    nm_polar_layout lay;
    nm_status st = nm_polarization_layers_layout(s, &lay, err);
    if (st != NM_OK) return st;
    nm_canvas c;
    if ((st = nm_canvas_open(&c, path, lay.width, lay.height, err)) != NM_OK) return st;
    cairo_t *cr = c.cr;
    const nm_metrics *m = s->m;
    char buf[LABEL_MAX], line[600];
    char title[600];
    snprintf(title, sizeof title, "Polarization per MoE layer \xe2\x80\x94 %s", series_label(s, 0, buf, sizeof buf));
    snprintf(line, sizeof line,
             "x: n_real = real experts among the K=%d slots \xc2\xb7 y: share of the modality's tokens (0 to 1) "
             "\xc2\xb7 zero: zero-compute ratio (share with n_real = 0)",
             m->top_k);
    draw_heading(cr, 24, title, line, 52);
    modality_legend(cr, 24, 80, lay.mods, lay.n_mods);
    for (int panel = 0; panel < lay.n_panels; panel++) {
        int layer = panel == 0 ? m->n_layers : panel - 1;
        nm_chart_box p = polar_plot(&lay, panel);
        char head[64], z[16];
        if (panel == 0) snprintf(head, sizeof head, "all layers");
        else snprintf(head, sizeof head, "layer %d", layer);
        cairo_set_source_rgb(cr, 0, 0, 0);
        nm_viz_font(cr, 12, 1);
        nm_viz_text(cr, p.x, p.y - 8, 0, head);
        double hw = nm_viz_text_width(cr, head);
        fmt_value(z, sizeof z, nm_metrics_zero_compute(m, layer, NM_MOD_ALL));
        snprintf(line, sizeof line, "zero %s", z);
        set_grey(cr, NOTE_GREY);
        nm_viz_font(cr, 11, 0);
        if (hw + 10 + nm_viz_text_width(cr, line) <= p.w) nm_viz_text(cr, p.x + p.w, p.y - 8, 1, line);
        polar_panel(cr, &lay, panel, m, layer, 1);
        if (panel == 0) { // set the summary panel apart
            cairo_set_source_rgb(cr, 0, 0, 0);
            cairo_set_line_width(cr, 1);
            cairo_rectangle(cr, p.x - 36.5, p.y - 22.5, p.w + 44, p.h + 44);
            cairo_stroke(cr);
        }
    }
    return nm_canvas_commit(&c, err);
}

// ---------------------------------------------------------------------------------------------
// Figure 7b: zero-compute ratio against null slot ratio

#define ZN_PLOT 480.0
static const char *ZN_TITLE = "Polarization: zero-compute ratio against null slot ratio";
static const int ZN_MODS[3] = {NM_MOD_VISION, NM_MOD_TEXT, NM_MOD_ALL};

// Distinct K values of the series, ascending.
static int zn_ks(const nm_chart_series *s, int n, int ks[NM_CHART_MAX_SERIES]) {
    int nk = 0;
    for (int i = 0; i < n; i++) {
        int K = s[i].m->top_k, seen = 0;
        for (int j = 0; j < nk; j++) seen |= ks[j] == K;
        if (!seen) ks[nk++] = K;
    }
    for (int a = 0; a < nk; a++)
        for (int b = a + 1; b < nk; b++)
            if (ks[b] < ks[a]) {
                int t = ks[a];
                ks[a] = ks[b];
                ks[b] = t;
            }
    return nk;
}

static void zn_ref_text(char *buf, size_t n, int K) {
    snprintf(buf, n, "independent slots, K=%d: each slot null with probability x%s", K,
             K == 1 ? " (same as y = x)" : "");
}

static void zn_marker(cairo_t *cr, int mod, double x, double y) {
    double r = 6;
    cairo_new_path(cr);
    if (mod == NM_MOD_VISION) cairo_arc(cr, x, y, r, 0, 2 * M_PI);
    else if (mod == NM_MOD_TEXT) cairo_rectangle(cr, x - r * 0.9, y - r * 0.9, 1.8 * r, 1.8 * r);
    else {
        cairo_move_to(cr, x, y - r * 1.5);
        cairo_line_to(cr, x + r * 1.5, y);
        cairo_line_to(cr, x, y + r * 1.5);
        cairo_line_to(cr, x - r * 1.5, y);
        cairo_close_path(cr);
    }
    set_rgb(cr, MOD_RGB[mod]);
    cairo_fill_preserve(cr);
    cairo_set_source_rgb(cr, 1, 1, 1);
    cairo_set_line_width(cr, 1);
    cairo_stroke(cr);
}

// Dash patterns of the y = x^K curves, one per K (repeating past five).
static const double ZN_DASHES[5][4] = {{6, 4}, {2, 3}, {10, 3}, {10, 3, 2, 3}, {4, 2}};
static const int ZN_NDASH[5] = {2, 2, 2, 4, 2};
static void zn_dash(cairo_t *cr, int j) { cairo_set_dash(cr, ZN_DASHES[j % 5], ZN_NDASH[j % 5], 0); }

// The legend right of the plot, drawn at (lx, ly) when `draw`, else only measured.
// Returns its width; *bottom (if not NULL) gets the last baseline + 8.
static double zn_legend(cairo_t *cr, const nm_chart_series *s, int n, double lx, double ly, int draw,
                        double *bottom) {
    double maxw = 0;
#define ZN_TEXT(x, size, bold, grey, str)                                  \
    do {                                                                 \
        nm_viz_font(cr, (size), (bold));                                 \
        double w_ = (x) - lx + nm_viz_text_width(cr, (str));             \
        if (w_ > maxw) maxw = w_;                                        \
        if (draw) {                                                      \
            set_grey(cr, (grey));                                        \
            nm_viz_text(cr, (x), ly, 0, (str));                          \
        }                                                                \
    } while (0)
    ZN_TEXT(lx, 12, 1, 0, "Points");
    ly += 22;
    for (int j = 0; j < 3; j++) {
        if (draw) zn_marker(cr, ZN_MODS[j], lx + 14, ly - 4);
        ZN_TEXT(lx + 36, 12, 0, 0, j == 0 ? "vision tokens" : j == 1 ? "text tokens" : "all tokens");
        ly += 22;
    }
    ly += 8;
    ZN_TEXT(lx, 12, 1, 0, "Reference lines");
    ly += 22;
    if (draw) {
        cairo_set_source_rgb(cr, 0.2, 0.2, 0.2);
        cairo_set_line_width(cr, 1.5);
        hline(cr, lx, lx + 28, ly - 5);
        cairo_set_source_rgb(cr, 0, 0, 0);
        text_sup(cr, lx + 36, ly, 12, "y = x", "");
    }
    ly += 17;
    ZN_TEXT(lx + 36, 11, 0, NOTE_GREY, "fully polarized: every token all-null or all-real");
    ly += 22;
    int ks[NM_CHART_MAX_SERIES], nk = zn_ks(s, n, ks);
    for (int j = 0; j < nk; j++) {
        if (draw) {
            set_grey(cr, 0.4);
            cairo_set_line_width(cr, 1.3);
            zn_dash(cr, j);
            if (ks[j] != 1) hline(cr, lx, lx + 28, ly - 5);
            cairo_set_dash(cr, NULL, 0, 0);
            cairo_set_source_rgb(cr, 0, 0, 0);
            char sup[16];
            snprintf(sup, sizeof sup, "%d", ks[j]);
            text_sup(cr, lx + 36, ly, 12, "y = x", sup);
        }
        ly += 17;
        char t[160];
        zn_ref_text(t, sizeof t, ks[j]);
        ZN_TEXT(lx + 36, 11, 0, NOTE_GREY, t);
        ly += 22;
    }
    ly += 8;
    if (draw) {
        set_grey(cr, 0.3);
        cairo_move_to(cr, lx + 14, ly - 10);
        cairo_line_to(cr, lx + 19, ly - 2);
        cairo_line_to(cr, lx + 9, ly - 2);
        cairo_close_path(cr);
        cairo_fill(cr);
    }
    ZN_TEXT(lx + 36, 12, 0, 0, "under the x axis: 1 \xe2\x88\x92 \xcf\x81 = M/(N+M),");
    ly += 17;
    ZN_TEXT(lx + 36, 11, 0, NOTE_GREY, "the null share of the N+M router slots");
    ly += 30;
    ZN_TEXT(lx, 12, 1, 0, "Traces");
    ly += 20;
    for (int i = 0; i < n; i++) {
        char num[16], buf[LABEL_MAX];
        snprintf(num, sizeof num, "%d", i + 1);
        if (draw) {
            cairo_set_source_rgb(cr, 0, 0, 0);
            nm_viz_font(cr, 12, 1);
            nm_viz_text(cr, lx + 14, ly, 0.5, num);
        }
        ZN_TEXT(lx + 36, 12, 0, 0, series_label(s, i, buf, sizeof buf));
        ly += 20;
    }
#undef ZN_TEXT
    if (bottom) *bottom = ly;
    return maxw;
}

nm_status nm_zero_vs_null_layout(const nm_chart_series *s, int n, nm_zero_null_layout *lay, nm_error *err) {
    memset(lay, 0, sizeof *lay);
    nm_status st = check_series(s, n, err);
    if (st != NM_OK) return st;
    lay->plot = (nm_chart_box){24 + 76, 76, ZN_PLOT, ZN_PLOT};
    scratch sc;
    if ((st = scratch_open(&sc, err)) != NM_OK) return st;
    double legend_x = lay->plot.x + lay->plot.w + 30, legend_bottom;
    double lw = zn_legend(sc.cr, s, n, legend_x, lay->plot.y + 6, 0, &legend_bottom);
    double title_w = text_w(sc.cr, 18, 1, ZN_TITLE);
    scratch_close(&sc);
    double right = legend_x + lw + 24;
    if (title_w + 48 > right) right = title_w + 48;
    double bottom = lay->plot.y + lay->plot.h + 76;
    if (legend_bottom + 16 > bottom) bottom = legend_bottom + 16;
    lay->width = (int)ceil(right);
    lay->height = (int)ceil(bottom);
    return NM_OK;
}

typedef struct {
    double x0, y0, x1, y1;
} zn_rect;

static int zn_overlap(zn_rect a, zn_rect b) { return a.x0 < b.x1 && b.x0 < a.x1 && a.y0 < b.y1 && b.y0 < a.y1; }

nm_status nm_render_zero_vs_null(const nm_chart_series *s, int n, const char *path, nm_error *err) {
    nm_zero_null_layout lay;
    nm_status st = nm_zero_vs_null_layout(s, n, &lay, err);
    if (st != NM_OK) return st;
    nm_canvas c;
    if ((st = nm_canvas_open(&c, path, lay.width, lay.height, err)) != NM_OK) return st;
    cairo_t *cr = c.cr;
    nm_chart_box p = lay.plot;
#define PX(v) (p.x + (v) * p.w)
#define PY(v) (p.y + (1 - (v)) * p.h)

    draw_heading(cr, 24, ZN_TITLE, "One point per trace and modality; the numbers name the traces (legend).", 50);

    // grid and axes
    cairo_set_line_width(cr, 1);
    for (int i = 0; i <= 10; i++) {
        double v = i / 10.0;
        set_grey(cr, GRID_GREY);
        if (i > 0) hline(cr, p.x, p.x + p.w, PY(v));
        if (i > 0) vline(cr, PX(v), p.y, p.y + p.h);
        if (i % 2) continue;
        char t[16];
        snprintf(t, sizeof t, i == 0 ? "0" : i == 10 ? "1" : "%.1f", v);
        set_grey(cr, AXIS_GREY);
        hline(cr, p.x - 4, p.x, PY(v));
        vline(cr, PX(v), p.y + p.h, p.y + p.h + 4);
        nm_viz_font(cr, 11, 0);
        nm_viz_text(cr, p.x - 7, PY(v) + 4, 1, t);
        nm_viz_text(cr, PX(v), p.y + p.h + 16, 0.5, t);
    }
    set_grey(cr, AXIS_GREY);
    vline(cr, p.x - 1, p.y, p.y + p.h);
    hline(cr, p.x - 1, p.x + p.w, p.y + p.h);
    cairo_set_source_rgb(cr, 0, 0, 0);
    nm_viz_font(cr, 12, 0);
    nm_viz_text(cr, p.x + p.w / 2, p.y + p.h + 58, 0.5,
                "null slot ratio  (1 \xe2\x88\x92 mean n_real/K: share of all top-K slots that went to null experts)");
    text_up(cr, p.x - 44, p.y + p.h / 2, 0.5, "zero-compute ratio  (share of (layer, token) pairs with n_real = 0)");

    // reference lines, clipped to the plot
    cairo_save(cr);
    cairo_rectangle(cr, p.x, p.y, p.w, p.h);
    cairo_clip(cr);
    cairo_set_source_rgb(cr, 0.2, 0.2, 0.2);
    cairo_set_line_width(cr, 1.5);
    cairo_move_to(cr, PX(0), PY(0));
    cairo_line_to(cr, PX(1), PY(1));
    cairo_stroke(cr);
    int ks[NM_CHART_MAX_SERIES], nk = zn_ks(s, n, ks);
    for (int j = 0; j < nk; j++) {
        if (ks[j] == 1) continue; // y = x^1 is the y = x line
        zn_dash(cr, j);
        cairo_set_line_width(cr, 1.3);
        set_grey(cr, 0.4);
        for (int i = 0; i <= 200; i++) {
            double x = i / 200.0, y = pow(x, ks[j]);
            if (i == 0) cairo_move_to(cr, PX(x), PY(y));
            else cairo_line_to(cr, PX(x), PY(y));
        }
        cairo_stroke(cr);
    }
    cairo_set_dash(cr, NULL, 0, 0);
    cairo_restore(cr);
    // curve names where they are easy to read: y = x near its top, x^K near x = 0.93
    nm_viz_font(cr, 11, 0);
    set_grey(cr, 0.2);
    nm_viz_text(cr, PX(0.84) - 8, PY(0.84) - 4, 1, "y = x");
    // each y = x^K named left of its curve, at heights staggered so neighbouring names stay apart
    for (int j = 0; j < nk; j++) {
        if (ks[j] == 1) continue;
        char t[16];
        snprintf(t, sizeof t, "K=%d", ks[j]);
        double y = 0.25 + 0.5 * (j + 1) / (nk + 1), x = pow(y, 1.0 / ks[j]);
        nm_viz_font(cr, 11, 0);
        double tw = nm_viz_text_width(cr, t);
        cairo_set_source_rgb(cr, 1, 1, 1); // a white backing keeps the name readable across other curves
        cairo_rectangle(cr, PX(x) - 6 - tw, PY(y) - 7, tw + 2, 13);
        cairo_fill(cr);
        set_grey(cr, 0.4);
        nm_viz_text(cr, PX(x) - 5, PY(y) + 4, 1, t);
    }

    // 1 − ρ under the x axis
    for (int i = 0; i < n; i++) {
        if (!rho_known(s[i].rho)) continue;
        double x = PX(1 - s[i].rho);
        set_grey(cr, 0.3);
        cairo_move_to(cr, x, p.y + p.h + 20);
        cairo_line_to(cr, x + 5, p.y + p.h + 28);
        cairo_line_to(cr, x - 5, p.y + p.h + 28);
        cairo_close_path(cr);
        cairo_fill(cr);
        char t[16];
        snprintf(t, sizeof t, "%d", i + 1);
        nm_viz_font(cr, 11, 0);
        int dup = 0; // several traces with the same ρ: stack their numbers
        for (int j = 0; j < i; j++) dup += rho_known(s[j].rho) && fabs(s[j].rho - s[i].rho) < 1e-9;
        nm_viz_text(cr, x + 7 + 10 * dup, p.y + p.h + 29, 0, t);
    }

    // points
    zn_rect placed[NM_CHART_MAX_SERIES * 4 + 4];
    int np = 0;
    double pts[NM_CHART_MAX_SERIES][3][2];
    for (int i = 0; i < n; i++) {
        const nm_metrics *m = s[i].m;
        for (int j = 0; j < 3; j++) {
            int mod = ZN_MODS[j];
            double x = 1 - m->intensity[mod], y = nm_metrics_zero_compute(m, m->n_layers, mod);
            pts[i][j][0] = isnan(x) || isnan(y) ? NAN : PX(x);
            pts[i][j][1] = isnan(x) || isnan(y) ? NAN : PY(y);
            if (!isnan(pts[i][j][0]))
                placed[np++] = (zn_rect){pts[i][j][0] - 7, pts[i][j][1] - 7, pts[i][j][0] + 7, pts[i][j][1] + 7};
        }
        // a thin line joins vision - all - text of one trace
        cairo_set_source_rgb(cr, 0.55, 0.55, 0.55);
        cairo_set_line_width(cr, 1);
        int started = 0;
        const int order[3] = {0, 2, 1};
        for (int q = 0; q < 3; q++) {
            double *pt = pts[i][order[q]];
            if (isnan(pt[0])) continue;
            if (!started) cairo_move_to(cr, pt[0], pt[1]);
            else cairo_line_to(cr, pt[0], pt[1]);
            started = 1;
        }
        cairo_stroke(cr);
    }
    // "all" first and largest, so that a vision or text point on top of it still shows
    for (int i = 0; i < n; i++)
        for (int q = 0; q < 3; q++) {
            int j = (q + 2) % 3;
            if (!isnan(pts[i][j][0])) zn_marker(cr, ZN_MODS[j], pts[i][j][0], pts[i][j][1]);
        }
    // trace numbers beside the "all" point (else any point), where they overlap nothing placed so far
    for (int i = 0; i < n; i++) {
        double *pt = NULL;
        for (int j = 2; j >= 0 && !pt; j--)
            if (!isnan(pts[i][j][0])) pt = pts[i][j];
        if (!pt) continue;
        char t[16];
        snprintf(t, sizeof t, "%d", i + 1);
        nm_viz_font(cr, 12, 1);
        double tw = nm_viz_text_width(cr, t), th = 10;
        const double off[8][2] = {{9, -9}, {9, 14}, {-9 - tw, -9}, {-9 - tw, 14}, {-tw / 2, -12}, {-tw / 2, 22},
                                  {12, 4}, {-12 - tw, 4}};
        int best = 0;
        for (int o = 0; o < 8; o++) {
            zn_rect r = {pt[0] + off[o][0], pt[1] + off[o][1] - th, pt[0] + off[o][0] + tw, pt[1] + off[o][1]};
            int bad = 0;
            for (int q = 0; q < np && !bad; q++) bad = zn_overlap(r, placed[q]);
            if (!bad) {
                best = o;
                break;
            }
        }
        zn_rect r = {pt[0] + off[best][0], pt[1] + off[best][1] - th, pt[0] + off[best][0] + tw, pt[1] + off[best][1]};
        if (np < (int)(sizeof placed / sizeof placed[0])) placed[np++] = r;
        cairo_set_source_rgb(cr, 0, 0, 0);
        nm_viz_text(cr, r.x0, r.y1, 0, t);
    }

    zn_legend(cr, s, n, p.x + p.w + 30, p.y + 6, 1, NULL);
#undef PX
#undef PY
    return nm_canvas_commit(&c, err);
}

// ---------------------------------------------------------------------------------------------
// Figure 10: per-layer intensity strip

#define ST_MARGIN 24.0
#define ST_CELL_H 28.0
#define ST_HEAD 30.0   // strip title above each strip
#define ST_FOOT 40.0   // layer numbers and "MoE layer" below each strip
#define ST_GAP 14.0
#define ST_MEAN_GAP 12.0
static const nm_colormap ST_CMAP = NM_CMAP_VIRIDIS;
static const char *ST_TITLE = "Compute intensity per MoE layer";
static const char *ST_CBAR =
    "compute intensity = mean n_real/K of the modality's tokens in the layer (0: every slot null, 1: every slot real)";

nm_status nm_layer_strip_layout(const nm_chart_series *s, int n, nm_strip_layout *lay, nm_error *err) {
    memset(lay, 0, sizeof *lay);
    nm_status st = check_series(s, n, err);
    if (st != NM_OK) return st;
    int mods[4];
    lay->n_rows = shown_mods(s, n, 1, mods);
    // the strip always shows vision and text rows; drop one only when no trace has such tokens
    int k = 0;
    for (int r = 0; r < lay->n_rows; r++)
        if (mods[r] == NM_MOD_ALL || any_tokens(s, n, mods[r])) lay->row_mod[k++] = mods[r];
    lay->n_rows = k;
    lay->n_series = n;
    for (int i = 0; i < n; i++) {
        lay->n_layers[i] = s[i].m->n_layers;
        if (lay->n_layers[i] > lay->max_layers) lay->max_layers = lay->n_layers[i];
    }
    scratch sc;
    if ((st = scratch_open(&sc, err)) != NM_OK) return st;
    double row_w = 0;
    for (int r = 0; r < lay->n_rows; r++) {
        double w = text_w(sc.cr, 12, 1, mod_label(lay->row_mod[r]));
        if (w > row_w) row_w = w;
    }
    double value_w = text_w(sc.cr, 11, 0, "<0.01");
    double cbar_w = text_w(sc.cr, 11, 0, ST_CBAR);
    double title_w = text_w(sc.cr, 18, 1, ST_TITLE);
    double label_w = 0;
    for (int i = 0; i < n; i++) {
        char buf[LABEL_MAX], stats[128], line[1024];
        series_stats(s[i].m, stats, sizeof stats);
        snprintf(line, sizeof line, "%s   %s", series_label(s, i, buf, sizeof buf), stats);
        double w = text_w(sc.cr, 13, 1, line);
        if (w > label_w) label_w = w;
    }
    scratch_close(&sc);

    // Cell width per trace, from its own depth: a deep trace beside shallow ones must not take
    // the values out of theirs.
    lay->cell_h = ST_CELL_H;
    lay->x0 = rnd(ST_MARGIN + row_w + 12);
    double right = 0;
    for (int i = 0; i < n; i++) {
        double cw = floor(960.0 / (lay->n_layers[i] + 1));
        lay->cell_w[i] = cw > 64 ? 64 : cw < 8 ? 8 : cw;
        lay->show_values[i] = lay->cell_w[i] >= value_w + 6;
        lay->mean_x[i] = lay->x0 + lay->n_layers[i] * lay->cell_w[i] + ST_MEAN_GAP;
        if (lay->mean_x[i] + lay->cell_w[i] + 36 > right) right = lay->mean_x[i] + lay->cell_w[i] + 36;
    }
    double y = 66 + ST_HEAD;
    for (int i = 0; i < n; i++) {
        lay->strip_y[i] = y;
        y += lay->n_rows * lay->cell_h + ST_FOOT + ST_GAP + ST_HEAD;
    }
    y -= ST_HEAD + ST_GAP;
    lay->colorbar = (nm_chart_box){lay->x0, rnd(y + 28), 320, 14};
    double need[4] = {lay->x0 + cbar_w, ST_MARGIN + title_w, ST_MARGIN + label_w, lay->x0 + 320};
    for (int i = 0; i < 4; i++)
        if (need[i] + ST_MARGIN > right) right = need[i] + ST_MARGIN;
    lay->width = (int)ceil(right);
    lay->height = (int)ceil(lay->colorbar.y + lay->colorbar.h + 24 + 2 * 16 + 8);
    return NM_OK;
}

nm_chart_box nm_strip_cell(const nm_strip_layout *lay, int series, int mod, int layer) {
    nm_chart_box none = {0, 0, 0, 0};
    if (!lay || series < 0 || series >= lay->n_series || layer < 0 || layer > lay->n_layers[series]) return none;
    int row = -1;
    for (int r = 0; r < lay->n_rows; r++)
        if (lay->row_mod[r] == mod) row = r;
    if (row < 0) return none;
    double cw = lay->cell_w[series];
    double x = layer == lay->n_layers[series] ? lay->mean_x[series] : lay->x0 + layer * cw;
    return (nm_chart_box){x, lay->strip_y[series] + row * lay->cell_h, cw, lay->cell_h};
}

nm_status nm_render_layer_strip(const nm_chart_series *s, int n, const char *path, nm_error *err) {
    nm_strip_layout lay;
    nm_status st = nm_layer_strip_layout(s, n, &lay, err);
    if (st != NM_OK) return st;
    nm_canvas c;
    if ((st = nm_canvas_open(&c, path, lay.width, lay.height, err)) != NM_OK) return st;
    cairo_t *cr = c.cr;
    draw_heading(cr, ST_MARGIN, ST_TITLE,
                 "Each cell: mean compute score n_real/K of that modality's tokens in that layer; "
                 "\"mean\" = all layers.",
                 50);
    int any_na = 0, hidden_layers = 0;
    for (int i = 0; i < n; i++) {
        const nm_metrics *m = s[i].m;
        int L = m->n_layers;
        double top = lay.strip_y[i], cw = lay.cell_w[i];
        if (!lay.show_values[i] && L > hidden_layers) hidden_layers = L;
        char buf[LABEL_MAX], stats[128];
        cairo_set_source_rgb(cr, 0, 0, 0);
        nm_viz_font(cr, 13, 1);
        const char *label = series_label(s, i, buf, sizeof buf);
        nm_viz_text(cr, ST_MARGIN, top - 10, 0, label);
        double lw = nm_viz_text_width(cr, label);
        series_stats(m, stats, sizeof stats);
        set_grey(cr, NOTE_GREY);
        nm_viz_font(cr, 11, 0);
        nm_viz_text(cr, ST_MARGIN + lw + 14, top - 10, 0, stats);
        for (int r = 0; r < lay.n_rows; r++) {
            int mod = lay.row_mod[r];
            set_rgb(cr, MOD_RGB[mod]);
            if (mod == NM_MOD_SPECIAL) set_grey(cr, 0.45);
            nm_viz_font(cr, 12, 1);
            nm_viz_text(cr, lay.x0 - 8, top + r * lay.cell_h + lay.cell_h / 2 + 4, 1, mod_label(mod));
            for (int l = 0; l <= L; l++) {
                nm_chart_box b = nm_strip_cell(&lay, i, mod, l);
                double v = nm_metrics_layer_intensity(m, l, mod), rgb[3];
                if (isnan(v)) {
                    rgb[0] = rgb[1] = rgb[2] = NA_CELL;
                    any_na = 1;
                } else nm_colormap_rgb(ST_CMAP, v, rgb);
                set_rgb(cr, rgb);
                cairo_rectangle(cr, b.x, b.y, b.w, b.h);
                cairo_fill(cr);
                if (!lay.show_values[i]) continue;
                char t[16];
                fmt_value(t, sizeof t, v);
                double lum = 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2];
                if (isnan(v)) set_grey(cr, NOTE_GREY);
                else if (lum > 0.45) cairo_set_source_rgb(cr, 0, 0, 0);
                else cairo_set_source_rgb(cr, 1, 1, 1);
                nm_viz_font(cr, 11, 0);
                nm_viz_text(cr, b.x + b.w / 2, b.y + b.h / 2 + 4, 0.5, t);
            }
        }
        // white separators between cells keep neighbouring equal colours countable
        cairo_set_source_rgb(cr, 1, 1, 1);
        cairo_set_line_width(cr, 1);
        for (int r = 1; r < lay.n_rows; r++) {
            hline(cr, lay.x0, lay.x0 + L * cw, top + r * lay.cell_h - 1);
            hline(cr, lay.mean_x[i], lay.mean_x[i] + cw, top + r * lay.cell_h - 1);
        }
        if (cw >= 12)
            for (int l = 1; l < L; l++) vline(cr, lay.x0 + l * cw - 1, top, top + lay.n_rows * lay.cell_h);
        // layer numbers: every `step` layers where they would collide
        double bottom = top + lay.n_rows * lay.cell_h;
        int step = 1;
        const int steps[] = {1, 2, 4, 5, 10, 20, 50, 100, 200, 500};
        set_grey(cr, AXIS_GREY);
        nm_viz_font(cr, 11, 0);
        char widest[16];
        snprintf(widest, sizeof widest, "%d", L - 1);
        double need = nm_viz_text_width(cr, widest) + 6;
        for (size_t q = 0; q < sizeof steps / sizeof steps[0]; q++) {
            step = steps[q];
            if (step * cw >= need) break;
        }
        for (int l = 0; l < L; l++) {
            if (l % step) continue;
            char t[16];
            snprintf(t, sizeof t, "%d", l);
            nm_viz_text(cr, lay.x0 + (l + 0.5) * cw, bottom + 14, 0.5, t);
        }
        nm_viz_font(cr, 11, 1);
        nm_viz_text(cr, lay.mean_x[i] + cw / 2, bottom + 14, 0.5, "mean");
        nm_viz_font(cr, 12, 0);
        cairo_set_source_rgb(cr, 0, 0, 0);
        nm_viz_text(cr, lay.x0 + L * cw / 2, bottom + 31, 0.5, "MoE layer");
    }
    cairo_set_source_rgb(cr, 0, 0, 0);
    nm_chart_box cb = lay.colorbar;
    nm_viz_colorbar(cr, cb.x, cb.y, cb.w, cb.h, ST_CMAP, ST_CBAR);
    const char *nl[2];
    int nn = 0;
    char hidden[160];
    if (hidden_layers) {
        snprintf(hidden, sizeof hidden,
                 "Values not printed where cells are too narrow (%d layers); read them from the colour bar.",
                 hidden_layers);
        nl[nn++] = hidden;
    }
    if (any_na) nl[nn++] = "Light grey cells: no tokens of that modality in the trace (n/a).";
    notes(cr, ST_MARGIN, cb.y + cb.h + 40, nl, nn);
    return nm_canvas_commit(&c, err);
}
