// nm_viz.c — canvases (PNG/SVG/PDF, atomic), colour maps, fonts, colour bars.
#include "nm_viz.h"

#include "nm_fileutil.h"

#include <cairo-pdf.h>
#include <cairo-svg.h>
#include <fontconfig/fontconfig.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

nm_status nm_viz_format_from_path(const char *path, nm_viz_format *fmt, nm_error *err) {
    const char *dot = strrchr(path, '.');
    if (dot && !strcasecmp(dot, ".png")) *fmt = NM_FMT_PNG;
    else if (dot && !strcasecmp(dot, ".svg")) *fmt = NM_FMT_SVG;
    else if (dot && !strcasecmp(dot, ".pdf")) *fmt = NM_FMT_PDF;
    else return nm_fail(err, NM_ERR_INVALID, "%s: picture files must end in .png, .svg or .pdf", path);
    return NM_OK;
}

const char *nm_viz_format_ext(nm_viz_format fmt) {
    return fmt == NM_FMT_SVG ? "svg" : fmt == NM_FMT_PDF ? "pdf" : "png";
}

void nm_canvas_abort(nm_canvas *c) {
    if (!c) return;
    if (c->cr) cairo_destroy(c->cr);
    if (c->surface) {
        cairo_surface_finish(c->surface);
        cairo_surface_destroy(c->surface);
    }
    if (c->tmp_path) unlink(c->tmp_path);
    free(c->tmp_path);
    free(c->path);
    memset(c, 0, sizeof *c);
}

nm_status nm_canvas_open(nm_canvas *c, const char *path, int width, int height, nm_error *err) {
    memset(c, 0, sizeof *c);
    nm_status s = nm_viz_format_from_path(path, &c->fmt, err);
    if (s != NM_OK) return s;
    if (width < 1 || height < 1 || width > 16384 || height > 16384)
        return nm_fail(err, NM_ERR_LIMIT, "%s: picture size %dx%d is outside 1..16384", path, width, height);
    c->width = width;
    c->height = height;
    c->path = strdup(path);
    c->tmp_path = nm_tmp_path(path);
    if (!c->path || !c->tmp_path) {
        nm_canvas_abort(c);
        return NM_NOMEM(err, "canvas");
    }
    switch (c->fmt) {
    case NM_FMT_PNG: c->surface = cairo_image_surface_create(CAIRO_FORMAT_RGB24, width, height); break;
    case NM_FMT_SVG: c->surface = cairo_svg_surface_create(c->tmp_path, width, height); break;
    case NM_FMT_PDF: c->surface = cairo_pdf_surface_create(c->tmp_path, width, height); break;
    }
    if (cairo_surface_status(c->surface) != CAIRO_STATUS_SUCCESS) {
        s = nm_fail(err, NM_ERR_IO, "%s: cannot create the picture: %s", path,
                    cairo_status_to_string(cairo_surface_status(c->surface)));
        nm_canvas_abort(c);
        return s;
    }
    c->cr = cairo_create(c->surface);
    if (cairo_status(c->cr) != CAIRO_STATUS_SUCCESS) {
        nm_canvas_abort(c);
        return NM_NOMEM(err, "cairo context");
    }
    cairo_set_source_rgb(c->cr, 1, 1, 1);
    cairo_paint(c->cr);
    return NM_OK;
}

nm_status nm_canvas_commit(nm_canvas *c, nm_error *err) {
    nm_status s = NM_OK;
    cairo_status_t cs = cairo_status(c->cr);
    if (cs != CAIRO_STATUS_SUCCESS) s = nm_fail(err, NM_ERR_INTERNAL, "%s: drawing failed: %s", c->path, cairo_status_to_string(cs));
    cairo_destroy(c->cr);
    c->cr = NULL;
    if (s == NM_OK && c->fmt == NM_FMT_PNG) {
        cs = cairo_surface_write_to_png(c->surface, c->tmp_path);
        if (cs != CAIRO_STATUS_SUCCESS)
            s = nm_fail(err, NM_ERR_IO, "%s: cannot write PNG: %s", c->path, cairo_status_to_string(cs));
    }
    cairo_surface_finish(c->surface);
    cs = cairo_surface_status(c->surface);
    if (s == NM_OK && cs != CAIRO_STATUS_SUCCESS)
        s = nm_fail(err, NM_ERR_IO, "%s: cannot write: %s", c->path, cairo_status_to_string(cs));
    cairo_surface_destroy(c->surface);
    c->surface = NULL;
    if (s == NM_OK && rename(c->tmp_path, c->path) != 0)
        s = nm_fail(err, NM_ERR_IO, "%s: cannot move the picture into place", c->path);
    if (s == NM_OK) {
        free(c->tmp_path);
        c->tmp_path = NULL;
    }
    nm_canvas_abort(c);
    return s;
}

// Colour maps: 9 control points each (matplotlib's viridis and magma at 0, 1/8, …, 1),
// interpolated linearly in sRGB — close enough to the originals for a legend-backed overlay.
static const double VIRIDIS[9][3] = {{0.267004, 0.004874, 0.329415}, {0.278826, 0.175490, 0.483397},
                                     {0.229739, 0.322361, 0.545706}, {0.172719, 0.448791, 0.557885},
                                     {0.127568, 0.566949, 0.550556}, {0.157851, 0.683765, 0.501686},
                                     {0.369214, 0.788888, 0.382914}, {0.678489, 0.863742, 0.189503},
                                     {0.993248, 0.906157, 0.143936}};
static const double MAGMA[9][3] = {{0.001, 0.000, 0.014}, {0.113, 0.065, 0.277}, {0.317, 0.071, 0.485},
                                   {0.513, 0.148, 0.508}, {0.716, 0.215, 0.475}, {0.904, 0.311, 0.388},
                                   {0.988, 0.536, 0.382}, {0.996, 0.772, 0.544}, {0.987, 0.991, 0.750}};

void nm_colormap_rgb(nm_colormap cm, double v, double rgb[3]) {
    if (isnan(v)) {
        rgb[0] = rgb[1] = rgb[2] = 0.5;
        return;
    }
    v = v < 0 ? 0 : v > 1 ? 1 : v;
    if (cm == NM_CMAP_GRAY) {
        rgb[0] = rgb[1] = rgb[2] = v;
        return;
    }
    const double (*t)[3] = cm == NM_CMAP_MAGMA ? MAGMA : VIRIDIS;
    double x = v * 8;
    int i = (int)x;
    if (i >= 8) i = 7;
    double f = x - i;
    for (int k = 0; k < 3; k++) rgb[k] = t[i][k] * (1 - f) + t[i + 1][k] * f;
}

const char *nm_colormap_name(nm_colormap cm) {
    return cm == NM_CMAP_VIRIDIS ? "viridis" : cm == NM_CMAP_MAGMA ? "magma" : "gray";
}

int nm_colormap_from_name(const char *name) {
    if (!strcmp(name, "gray") || !strcmp(name, "grey")) return NM_CMAP_GRAY;
    if (!strcmp(name, "viridis")) return NM_CMAP_VIRIDIS;
    if (!strcmp(name, "magma")) return NM_CMAP_MAGMA;
    return -1;
}

void nm_viz_font(cairo_t *cr, double size, int bold) {
    cairo_select_font_face(cr, "DejaVu Sans", CAIRO_FONT_SLANT_NORMAL, bold ? CAIRO_FONT_WEIGHT_BOLD : CAIRO_FONT_WEIGHT_NORMAL);
    cairo_set_font_size(cr, size);
}

void nm_viz_font_mono(cairo_t *cr, double size) {
    cairo_select_font_face(cr, "DejaVu Sans Mono", CAIRO_FONT_SLANT_NORMAL, CAIRO_FONT_WEIGHT_NORMAL);
    cairo_set_font_size(cr, size);
}

double nm_viz_text_width(cairo_t *cr, const char *s) {
    cairo_text_extents_t e;
    cairo_text_extents(cr, s, &e);
    return e.x_advance;
}

void nm_viz_text(cairo_t *cr, double x, double y, double align, const char *s) {
    cairo_move_to(cr, x - align * nm_viz_text_width(cr, s), y);
    cairo_show_text(cr, s);
}

void nm_viz_colorbar(cairo_t *cr, double x, double y, double w, double h, nm_colormap cm, const char *label) {
    const int steps = 64;
    for (int i = 0; i < steps; i++) {
        double rgb[3];
        nm_colormap_rgb(cm, (i + 0.5) / steps, rgb);
        cairo_set_source_rgb(cr, rgb[0], rgb[1], rgb[2]);
        cairo_rectangle(cr, x + w * i / steps, y, w / steps + 0.5, h);
        cairo_fill(cr);
    }
    cairo_set_source_rgb(cr, 0.3, 0.3, 0.3);
    cairo_set_line_width(cr, 1);
    cairo_rectangle(cr, x + 0.5, y + 0.5, w - 1, h - 1);
    cairo_stroke(cr);
    cairo_set_source_rgb(cr, 0, 0, 0);
    nm_viz_font(cr, 11, 0);
    const char *ticks[3] = {"0", "0.5", "1"};
    for (int i = 0; i < 3; i++) {
        double tx = x + w * i / 2.0;
        cairo_move_to(cr, tx, y + h);
        cairo_line_to(cr, tx, y + h + 4);
        cairo_stroke(cr);
        nm_viz_text(cr, tx, y + h + 16, 0.5, ticks[i]);
    }
    if (label) nm_viz_text(cr, x, y - 5, 0, label);
}

void nm_viz_release_static(void) {
    cairo_debug_reset_static_data(); // drops cairo's font caches, which hold fontconfig patterns
    FcFini();
}
