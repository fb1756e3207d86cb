// nm_render.h — every picture of a sample or of a set of traces, with the file names the
// tools promise (README "Pictures"):
//   DIR/overlay/layer_00.<ext> … layer_<L-1>.<ext>, DIR/overlay/mean.<ext>   (one sample)
//   DIR/modality.<ext>, DIR/polarization.<ext>, DIR/polarization_layers.<ext>,
//   DIR/zero_vs_null.<ext>, DIR/layer_strip.<ext>                            (one or more traces)
#ifndef NM_RENDER_H
#define NM_RENDER_H

#include "nm_error.h"
#include "nm_overlay.h"
#include "nm_report.h"
#include "nm_trace.h"

typedef struct {
    nm_overlay_opts overlay;
    nm_viz_format format; // PNG (default), SVG or PDF
} nm_render_opts;

void nm_render_opts_default(nm_render_opts *o);

// The overlays of one sample: one per layer and the mean. The original image is read from the
// sample's image_path (relative paths from the current directory, or from `image_dir` if given
// and the path is not found there); when it cannot be read the overlays say so and show the
// patch grid alone. Creates DIR/overlay. *image_note receives a malloc'd note when the image
// could not be read (or NULL).
nm_status nm_render_sample_overlays(const nm_trace_sample *s, const char *dir, const char *image_dir,
                                    const nm_render_opts *o, char **image_note, nm_error *err);

// The charts of one or more traces (the sparsity-sweep view when n > 1). All or none: on a
// failure the charts already written by this call are removed.
nm_status nm_render_trace_charts(const nm_report_trace *r, int n, const char *dir, const nm_render_opts *o,
                                 nm_error *err);

#endif
