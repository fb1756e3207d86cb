// nm_viz.h — shared drawing helpers of the cairo renderers: canvases written atomically as
// PNG, SVG or PDF (chosen by the file name), colour maps, fonts and text, colour bars.
#ifndef NM_VIZ_H
#define NM_VIZ_H

#include <cairo.h>

#include "nm_error.h"

typedef enum { NM_FMT_PNG, NM_FMT_SVG, NM_FMT_PDF } nm_viz_format;

// The format named by the file's extension (.png, .svg, .pdf; case-insensitive).
nm_status nm_viz_format_from_path(const char *path, nm_viz_format *fmt, nm_error *err);
const char *nm_viz_format_ext(nm_viz_format fmt); // "png", "svg", "pdf"

// A drawing surface of width x height (points for SVG/PDF, pixels for PNG) that becomes the
// file `path` only on commit: the picture is drawn into `path`.tmp-<pid> and renamed over
// `path`, so a failure never leaves a half-written picture.
typedef struct {
    cairo_surface_t *surface;
    cairo_t *cr;
    nm_viz_format fmt;
    char *path, *tmp_path;
    int width, height;
} nm_canvas;

// Opens a canvas filled with white. Sizes over 16384 x 16384 are refused.
nm_status nm_canvas_open(nm_canvas *c, const char *path, int width, int height, nm_error *err);
nm_status nm_canvas_commit(nm_canvas *c, nm_error *err); // writes, renames, frees
void nm_canvas_abort(nm_canvas *c);                       // frees, removes the temp file

// Colour maps over v in [0, 1] (clamped; NaN draws as mid grey).
typedef enum {
    NM_CMAP_GRAY,    // black (0, routed to null) .. white (1, every slot real)
    NM_CMAP_VIRIDIS, // perceptually uniform, colour-blind safe
    NM_CMAP_MAGMA,
} nm_colormap;
void nm_colormap_rgb(nm_colormap cm, double v, double rgb[3]);
const char *nm_colormap_name(nm_colormap cm);
// Parses "gray", "viridis", "magma"; returns -1 for an unknown name.
int nm_colormap_from_name(const char *name);

// Fonts: DejaVu Sans (regular/bold) or DejaVu Sans Mono, at `size` user units.
void nm_viz_font(cairo_t *cr, double size, int bold);
void nm_viz_font_mono(cairo_t *cr, double size);
// Text with its left (align 0), centre (0.5) or right (1) edge at x and its baseline at y.
void nm_viz_text(cairo_t *cr, double x, double y, double align, const char *s);
// Width of s in the current font.
double nm_viz_text_width(cairo_t *cr, const char *s);
// A horizontal colour bar for `cm` in the box (x, y, w, h) with ticks 0, 0.5, 1 and a label
// above it.
void nm_viz_colorbar(cairo_t *cr, double x, double y, double w, double h, nm_colormap cm, const char *label);

// Frees cairo's and fontconfig's process-wide caches (font configuration, scaled fonts). Call
// once at exit, after the last picture, so leak checkers see no library allocations left.
void nm_viz_release_static(void);

#endif
