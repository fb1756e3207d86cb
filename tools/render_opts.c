// render_opts.c — the picture options shared by `run`, `render` and `report`.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

const char *CLI_RENDER_HELP =
    "  --format F             picture format: png, svg or pdf                        (default png)\n"
    "  --cmap C               gray (brightness = compute, dark = null), viridis, magma  (default gray)\n"
    "  --alpha A              overlay strength in (0, 1]                                (default 1)\n"
    "  --width W              overlay picture width in pixels                           (default 1400)\n";

int cli_render_option(const char *cmd, const char *name, const char *value, nm_render_opts *o) {
    if (!strcmp(name, "format")) {
        if (!strcmp(value, "png")) o->format = NM_FMT_PNG;
        else if (!strcmp(value, "svg")) o->format = NM_FMT_SVG;
        else if (!strcmp(value, "pdf")) o->format = NM_FMT_PDF;
        else return cli_usage_error(cmd, "--format must be png, svg or pdf, got '%s'", value);
    } else if (!strcmp(name, "cmap")) {
        int c = nm_colormap_from_name(value);
        if (c < 0) return cli_usage_error(cmd, "--cmap must be gray, viridis or magma, got '%s'", value);
        o->overlay.cmap = (nm_colormap)c;
    } else if (!strcmp(name, "alpha")) {
        char *end;
        double a = strtod(value, &end);
        if (!*value || *end || !(a > 0 && a <= 1)) return cli_usage_error(cmd, "--alpha must be in (0, 1], got '%s'", value);
        o->overlay.alpha = a;
    } else if (!strcmp(name, "width")) {
        int w;
        if (cli_parse_int(value, NM_OVERLAY_MIN_WIDTH, NM_OVERLAY_MAX_WIDTH, &w))
            return cli_usage_error(cmd, "--width must be in %d..%d, got '%s'", NM_OVERLAY_MIN_WIDTH, NM_OVERLAY_MAX_WIDTH, value);
        o->overlay.width = w;
    } else return -1;
    return EXIT_OK;
}
