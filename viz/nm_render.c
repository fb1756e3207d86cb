// nm_render.c — all pictures of a sample (overlays) and of traces (charts).
#include "nm_render.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "nm_charts.h"
#include "nm_fileutil.h"

void nm_render_opts_default(nm_render_opts *o) {
    nm_overlay_opts_default(&o->overlay);
    o->format = NM_FMT_PNG;
}

// Reads the sample's original image; NULL (and a note) when it cannot be read.
static nm_image *load_original(const nm_trace_sample *s, const char *image_dir, char **note) {
    *note = NULL;
    if (!s->image_path || !s->image_path[0]) return NULL;
    nm_image *img = calloc(1, sizeof *img);
    if (!img) return NULL;
    nm_error e;
    if (nm_image_load(img, s->image_path, &e) == NM_OK) return img;
    if (image_dir && s->image_path[0] != '/') {
        char *p = nm_path_join(image_dir, s->image_path);
        nm_status st = p ? nm_image_load(img, p, &e) : NM_ERR_NOMEM;
        free(p);
        if (st == NM_OK) return img;
    }
    *note = strdup(e.msg);
    free(img);
    return NULL;
}

nm_status nm_render_sample_overlays(const nm_trace_sample *s, const char *dir, const char *image_dir,
                                    const nm_render_opts *o, char **image_note, nm_error *err) {
    char *odir = nm_path_join(dir, "overlay");
    if (!odir) return NM_NOMEM(err, "path");
    nm_status st = nm_mkdir_p(odir, err);
    nm_image *img = st == NM_OK ? load_original(s, image_dir, image_note) : NULL;
    const char *ext = nm_viz_format_ext(o->format);
    char name[64];
    for (int l = 0; st == NM_OK && l <= s->n_layers; l++) {
        if (l < s->n_layers) snprintf(name, sizeof name, "layer_%02d.%s", l, ext);
        else snprintf(name, sizeof name, "mean.%s", ext);
        char *path = nm_path_join(odir, name);
        if (!path) {
            st = NM_NOMEM(err, "path");
            break;
        }
        st = nm_render_overlay(s, img, l, &o->overlay, NULL, path, err);
        free(path);
    }
    if (img) {
        nm_image_free(img);
        free(img);
    }
    free(odir);
    return st;
}

// label += " · NAME", NAME = the model directory's last component ("final" and "." skipped:
// runs/k4_copy/final -> k4_copy), cut at a character boundary.
static void append_model_name(char *label, size_t cap, const char *model) {
    if (!model || !*model) return;
    char buf[512];
    snprintf(buf, sizeof buf, "%s", model);
    for (;;) {
        size_t n = strlen(buf);
        while (n > 1 && buf[n - 1] == '/') buf[--n] = 0;
        char *slash = strrchr(buf, '/');
        const char *last = slash ? slash + 1 : buf;
        if ((!strcmp(last, "final") || !strcmp(last, ".")) && slash && slash != buf) *slash = 0;
        else break;
    }
    const char *name = strrchr(buf, '/') ? strrchr(buf, '/') + 1 : buf;
    size_t len = strlen(label), room;
    if (len + 5 >= cap) return;
    memcpy(label + len, " \xc2\xb7 ", 4); // " · "
    len += 4;
    room = cap - 1 - len;
    size_t take = strlen(name) < room ? strlen(name) : room;
    while (take > 0 && take < strlen(name) && ((unsigned char)name[take] & 0xC0) == 0x80) take--; // whole characters
    memcpy(label + len, name, take);
    label[len + take] = 0;
}

nm_status nm_render_trace_charts(const nm_report_trace *r, int n, const char *dir, const nm_render_opts *o,
                                 nm_error *err) {
    if (n < 1 || n > NM_CHART_MAX_SERIES)
        return nm_fail(err, NM_ERR_INVALID, "charts take 1..%d traces, got %d", NM_CHART_MAX_SERIES, n);
    nm_chart_series series[NM_CHART_MAX_SERIES];
    char labels[NM_CHART_MAX_SERIES][96];
    for (int i = 0; i < n; i++) nm_chart_label(labels[i], sizeof labels[i], &r[i].info.cfg);
    // Traces of the same configuration (e.g. the same model trained two ways) would share a
    // label: add the model's name to tell them apart.
    int shared[NM_CHART_MAX_SERIES] = {0}; // decided before any label changes
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) shared[i] |= j != i && !strcmp(labels[i], labels[j]);
    for (int i = 0; i < n; i++)
        if (shared[i]) append_model_name(labels[i], sizeof labels[i], r[i].info.model_name);
    for (int i = 0; i < n; i++)
        series[i] = (nm_chart_series){&r[i].agg, labels[i], r[i].info.cfg.moe.top_k,
                                      r[i].info.cfg.moe.num_experts > 0 ? nm_config_rho(&r[i].info.cfg) : 0.0};
    const char *ext = nm_viz_format_ext(o->format);
    static const char *names[] = {"modality", "polarization", "polarization_layers", "zero_vs_null", "layer_strip"};
    enum { N_CHARTS = sizeof names / sizeof names[0] };
    char *paths[N_CHARTS] = {0};
    nm_status st = NM_OK;
    for (int k = 0; k < N_CHARTS && st == NM_OK; k++) {
        char file[64];
        snprintf(file, sizeof file, "%s.%s", names[k], ext);
        if (!(paths[k] = nm_path_join(dir, file))) {
            st = NM_NOMEM(err, "path");
            break;
        }
        switch (k) {
        case 0: st = nm_render_modality_chart(series, n, paths[k], err); break;
        case 1: st = nm_render_polarization(series, n, paths[k], err); break;
        case 2: st = nm_render_polarization_layers(&series[0], paths[k], err); break; // first trace's layers
        case 3: st = nm_render_zero_vs_null(series, n, paths[k], err); break;
        case 4: st = nm_render_layer_strip(series, n, paths[k], err); break;
        }
    }
    // All or none: a failure removes the charts this call already wrote.
    for (int k = 0; k < N_CHARTS; k++) {
        if (st != NM_OK && paths[k]) unlink(paths[k]);
        free(paths[k]);
    }
    return st;
}
