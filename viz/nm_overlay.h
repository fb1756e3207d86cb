// nm_overlay.h — the compute-map overlay of one trace sample (DESIGN.md §6; the paper's figures
// 5, 9 and 10): the original input on the left, the same input lit by each token's compute score
// on the right, with per-segment insets and a colour bar. PNG, SVG or PDF by the file name.
//
// What is drawn, and the decisions behind it:
//   - a title line, then the panel headers; over the right panel the insets: mean compute
//     n_real/K per segment (image, prompt, answer) and overall for the chosen layer or the mean
//     over layers, computed with nm_metrics on this one sample ("–" for an empty segment);
//   - the image: at its own resolution, scaled down (area-aware, nm_image_resize) when it is wider
//     than the panel or taller than NM_OVERLAY_MAX_IMAGE_H, and shown 2x (nearest neighbour, so
//     every source pixel is a crisp 2x2 block) when it fits twice over; never any other factor;
//   - on the right every patch cell of the grid_rows x grid_cols grid (the grid the model saw,
//     stretched over the original image) lit by its score: gray map: pixel x score (dark = the
//     token's slots went to null experts); viridis/magma: 60% of the score's colour over a
//     desaturated copy. Then output = (1 - alpha) * original + alpha * lit;
//   - the tokens in sequence order as text (DejaVu Sans Mono), wrapped at the panel width (at
//     spaces where possible; a line break after a newline), each text token a cell whose
//     background on the right is its score's colour (text in black or white, whichever reads);
//     the same cells on the left in plain ink, so the panels correspond token for token. A
//     multi-byte character is one cell on its lead byte. Control pictures (␊, ␉, …; in no DejaVu
//     font) are drawn as their boxed abbreviation (LF, HT, …); "\xNN" bytes in grey on the left.
//     Special tokens (<bos>, <img>, </img>, <eos>) are small chips, on the right coloured by their
//     score with the value printed ("<bos> 0.75"). Each segment is labelled, on the right with its
//     mean. A segment longer than NM_OVERLAY_MAX_LINES lines ends in "…" with a note of how many
//     tokens were left out. Without tokens/text (other writers may omit it) the display strings
//     are rebuilt from the ids;
//   - a sample with an image whose file is missing (image == NULL): a placeholder with
//     "original image not found: <path>" on the left and the patch scores on their own (the
//     colour map's cells) on the right;
//   - the colour bar with its scale explained, and what the brightness means.
#ifndef NM_OVERLAY_H
#define NM_OVERLAY_H

#include "nm_error.h"
#include "nm_image.h"
#include "nm_trace.h"
#include "nm_viz.h"

#define NM_OVERLAY_MAX_LINES 30    // text lines per segment before "…"
#define NM_OVERLAY_MAX_IMAGE_H 800 // image panels are at most this tall (px)
#define NM_OVERLAY_MIN_WIDTH 480   // allowed picture widths
#define NM_OVERLAY_MAX_WIDTH 8000

typedef struct {
    nm_colormap cmap; // NM_CMAP_GRAY (default): brightness = compute score, dark = routed to null
    double alpha;     // overlay strength in (0, 1], default 1: output = (1-alpha)*original + alpha*lit
    int width;        // total picture width in px (default 1400); the height follows the content
} nm_overlay_opts;

void nm_overlay_opts_default(nm_overlay_opts *o);

// Renders the overlay of `layer` (0 … L−1, or L = s->n_layers for the mean over layers) to
// `path` (.png, .svg or .pdf, written atomically through nm_canvas). `image` is the original
// image, or NULL when the sample has none or its file cannot be found. `title` may be NULL:
// then "Compute map · layer l (of 0–L−1) · top-K = K · <image file>" or "… · mean over L layers …".
// o may be NULL (defaults). Errors: NM_ERR_INVALID for a bad extension, layer, option or an
// inconsistent sample; NM_ERR_IO when the file cannot be written (no file is left behind).
nm_status nm_render_overlay(const nm_trace_sample *s, const nm_image *image, int layer, const nm_overlay_opts *o,
                            const char *title, const char *path, nm_error *err);

// The layout, computed without drawing (for tests and for the CLI): where the image panels and
// each text token's box land, in picture coordinates (px; points for SVG/PDF).
typedef struct {
    double x, y, w, h;
} nm_box;

typedef struct {
    int width, height;
    nm_box left_image, right_image; // the image (or its placeholder / patch grid) in each panel; w = h = 0 when none
    nm_box *token_box;              // [n_tokens] each text/special token's cell in the RIGHT panel (w = 0 for tokens
                                    // not drawn: image patches, UTF-8 continuation bytes, tokens cut by "…")
    nm_box *token_box_left;         // the same cells in the left panel (same size, shifted by the panel offset)
    int n_tokens;
    nm_box left_panel, right_panel; // each panel's content area (image and tokens), below the header rows
    int truncated;                  // number of text/special tokens left out after "…" (0 when everything fits)
} nm_overlay_layout;

// Fills *lay (free with nm_overlay_layout_free, also after a failure). o may be NULL. The layout
// does not depend on the layer, the scores or the title.
nm_status nm_overlay_layout_compute(nm_overlay_layout *lay, const nm_trace_sample *s, const nm_image *image,
                                    const nm_overlay_opts *o, nm_error *err);
void nm_overlay_layout_free(nm_overlay_layout *lay);

#endif
