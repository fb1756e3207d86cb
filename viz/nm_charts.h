// nm_charts.h — the summary charts of one or several traces (DESIGN.md §6; paper figures 4, 7, 10):
// compute by modality, polarization histograms (overall and per layer), zero-compute ratio against
// null slot ratio, and the per-layer compute-intensity strip.
//
// Every renderer takes the finished metrics (nm_metrics_finish) of each trace, aggregated over its
// samples, with a label, and writes `path` atomically through nm_canvas: .png (pixels), .svg or
// .pdf (the same numbers in points), chosen by the extension (anything else: NM_ERR_INVALID; an
// unwritable place: NM_ERR_IO, and no file is left behind). At most NM_CHART_MAX_SERIES series
// (NM_ERR_LIMIT beyond). The picture size is the width × height its layout function reports.
//
// Colours are the same in every chart and colour-blind safe (Okabe–Ito): vision #0072B2 (blue),
// text #E69F00 (orange), special #999999 (grey), all tokens #333333. Where several series share a
// modality colour (the modality chart) they are told apart by a number under each bar that the
// legend names, and by lighter tints for later series. A modality without tokens in a trace is
// drawn as "n/a", never as a zero bar; a compute distribution that is undefined (no real-expert
// compute at all) is drawn as "undefined".
//
// The layout functions expose where things are drawn so that tests (and callers placing
// annotations) can find them; they are the same code the renderers use.
#ifndef NM_CHARTS_H
#define NM_CHARTS_H

#include <stddef.h>

#include "nm_config.h"
#include "nm_error.h"
#include "nm_metrics.h"

#define NM_CHART_MAX_SERIES 12

typedef struct {
    const nm_metrics *m; // finished metrics of one trace (aggregated over its samples)
    const char *label;   // e.g. from nm_chart_label(); NULL: "trace 1", "trace 2", …
    int top_k;           // K of the trace; 0: take m->top_k (otherwise it must equal m->top_k)
    double rho;          // ρ = N/(N+M) of the trace, in (0, 1]; 0 or NAN: unknown (1−ρ not marked)
} nm_chart_series;

// "K=8, ρ=0.50 (N=16, M=16)" from a model config (or nm_trace_info.cfg). Without N and M (a trace
// that did not record them): "K=8". Always NUL-terminated; truncated to fit n bytes.
void nm_chart_label(char *buf, size_t n, const nm_config *cfg);

// The colour of a modality (NM_MOD_TEXT/VISION/SPECIAL/ALL), and the bar fill of series i of
// n_series in the modality chart (series 0 in the full colour, later ones lighter tints).
void nm_chart_modality_rgb(int mod, double rgb[3]);
void nm_chart_series_rgb(int mod, int series, int n_series, double rgb[3]);

// A rectangle in picture units (pixels for PNG), y downwards. w = 0: nothing drawn there.
typedef struct {
    double x, y, w, h;
} nm_chart_box;

// ---- Figure 4: compute by modality ----
// Three panels side by side (stacked, one per row, when side by side would be wider than 2000,
// i.e. with many traces): token distribution, compute distribution, compute intensity; in each,
// groups of bars by modality (vision, text, special when any trace has special tokens; the
// intensity panel adds "all"), one bar per series (numbered under the bar, named in the legend
// with its token, sample and layer counts), its value printed above it. y axes run 0 to 1.
enum { NM_CHART_TOKENS = 0, NM_CHART_COMPUTE = 1, NM_CHART_INTENSITY = 2, NM_CHART_PANELS = 3 };
typedef struct {
    int width, height;
    nm_chart_box plot[NM_CHART_PANELS]; // plot area: value 0 at its bottom edge, 1 at its top edge
    // bar[panel][mod][i]: the column where series i's bar for modality `mod` stands (full plot
    // height: a bar of value v covers plot.y + plot.h·(1 − v) … plot.y + plot.h). w = 0 for a
    // modality the panel does not show.
    nm_chart_box bar[NM_CHART_PANELS][NM_MOD_ALL + 1][NM_CHART_MAX_SERIES];
} nm_modality_layout;
nm_status nm_modality_chart_layout(const nm_chart_series *s, int n, nm_modality_layout *lay, nm_error *err);
nm_status nm_render_modality_chart(const nm_chart_series *s, int n, const char *path, nm_error *err);

// ---- Figure 7a: polarization histograms ----
// Share of (layer, token) pairs with n_real = 0 … K, per modality (vision, text, special when any
// trace has special tokens, all), each modality normalised to its own pairs.
// nm_render_polarization: all layers together, one panel per series (grid of up to 3 columns),
// each headed by its label, zero-compute ratio and null slot ratio; values are printed on the bars
// when they fit (K ≤ 2 with four modalities).
// nm_render_polarization_layers: one series; small multiples, the first panel "all layers", then
// one per layer.
typedef struct {
    int width, height;
    int n_panels, cols;  // panels laid out row-major in `cols` columns
    int n_mods, mods[4]; // modalities drawn, left to right within each n_real group
    // Plot area of panel p: x0 + col·dx, y0 + row·dy, plot_w × plot_h (value 0 at the bottom).
    double x0, y0, dx, dy, plot_w, plot_h;
} nm_polar_layout;
nm_status nm_polarization_layout(const nm_chart_series *s, int n, nm_polar_layout *lay, nm_error *err);
nm_status nm_polarization_layers_layout(const nm_chart_series *s, nm_polar_layout *lay, nm_error *err);
// Plot area of panel p, and the column of the bar of modality `mod` at n_real = k in a panel
// whose series has top-K `top_k` (full plot height, as for the modality chart; w = 0 if `mod` is
// not drawn or k is outside 0..top_k). Panels of the per-layer chart: 0 = all layers, 1 + l = layer l.
nm_chart_box nm_polar_plot(const nm_polar_layout *lay, int panel);
nm_chart_box nm_polar_bar(const nm_polar_layout *lay, int panel, int top_k, int mod, int k);
nm_status nm_render_polarization(const nm_chart_series *s, int n, const char *path, nm_error *err);
nm_status nm_render_polarization_layers(const nm_chart_series *s, const char *path, nm_error *err);

// ---- Figure 7b: zero-compute ratio against null slot ratio ----
// One point per series and modality (vision ●, text ■, all ◆; a thin line joins a series' points,
// its number is printed beside its "all" point), reference lines y = x (fully polarized) and
// y = x^K for every K among the series (independent slots), 1 − ρ marked under the x axis.
typedef struct {
    int width, height;
    nm_chart_box plot; // data (x, y) in [0, 1]² is drawn at (plot.x + x·plot.w, plot.y + (1 − y)·plot.h)
} nm_zero_null_layout;
nm_status nm_zero_vs_null_layout(const nm_chart_series *s, int n, nm_zero_null_layout *lay, nm_error *err);
nm_status nm_render_zero_vs_null(const nm_chart_series *s, int n, const char *path, nm_error *err);

// ---- Figure 10: per-layer compute-intensity strip ----
// A heat map per series, stacked with one colour scale (viridis: 0 dark purple … 1 yellow): rows
// vision, text, special (when any trace has special tokens), all; columns the MoE layers and,
// after a gap, "mean" (all layers). Cells are up to 64 wide and shrink with the number of layers
// (down to 8); values are printed in them when they fit (about 24 layers or fewer: show_values);
// a cell of a modality without tokens is light grey, marked "n/a" when values are printed.
typedef struct {
    int width, height;
    int n_rows, row_mod[4];
    int n_series, n_layers[NM_CHART_MAX_SERIES];
    int max_layers;
    double x0;     // left edge of layer 0's column (every strip)
    double cell_h; // row height
    // Per series: cell width (from its own number of layers: a deep trace does not squeeze a
    // shallow one), left edge of its "mean" column, top edge of its first row, values printed.
    double cell_w[NM_CHART_MAX_SERIES], mean_x[NM_CHART_MAX_SERIES], strip_y[NM_CHART_MAX_SERIES];
    int show_values[NM_CHART_MAX_SERIES];
    nm_chart_box colorbar;
} nm_strip_layout;
nm_status nm_layer_strip_layout(const nm_chart_series *s, int n, nm_strip_layout *lay, nm_error *err);
// The cell of (series, modality, layer); layer = that series' L (NM_LAYER_ALL) is the "mean"
// column. w = 0 where nothing is drawn.
nm_chart_box nm_strip_cell(const nm_strip_layout *lay, int series, int mod, int layer);
nm_status nm_render_layer_strip(const nm_chart_series *s, int n, const char *path, nm_error *err);

#endif
