// cmd_render.c — `nullmap render`: the pictures of an existing trace.
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "nm_fileutil.h"
#include "nm_render.h"
#include "nm_report.h"
#include "nm_trace.h"

static void help(void) {
    printf("usage: nullmap render TRACE.h5 [--sample N] [--out DIR] [options]\n"
           "\n"
           "Draws the pictures of a trace (any trace that follows the documented schema, including\n"
           "traces written by other programs):\n"
           "  DIR/overlay/layer_00.png … layer_<L-1>.png, DIR/overlay/mean.png   compute map of sample N\n"
           "  DIR/modality.png, polarization.png, polarization_layers.png,\n"
           "  zero_vs_null.png, layer_strip.png                                   the whole trace\n"
           "\n"
           "  --sample N             sample whose overlays to draw (0-based)               (default 0)\n"
           "  --out DIR              output directory, created if missing                  (default render)\n"
           "  --image-dir DIR        where to look for the sample's image when its recorded path\n"
           "                         does not resolve from the current directory\n"
           "  --no-overlays          only the charts\n"
           "%s",
           CLI_RENDER_HELP);
}

int cmd_render(int argc, char **argv) {
    const char *trace = NULL, *out = "render", *image_dir = NULL;
    int sample_index = 0, overlays = 1;
    nm_render_opts ro;
    nm_render_opts_default(&ro);
    static const struct option opts[] = {{"sample", 1, 0, 's'},    {"out", 1, 0, 'o'},    {"image-dir", 1, 0, 'i'},
                                         {"no-overlays", 0, 0, 'n'}, {"format", 1, 0, 'R'}, {"cmap", 1, 0, 'R'},
                                         {"alpha", 1, 0, 'R'},     {"width", 1, 0, 'R'},  {"help", 0, 0, 'h'},
                                         {0, 0, 0, 0}};
    optind = 1;
    opterr = 0;
    int c, li;
    while ((c = getopt_long(argc, argv, "h", opts, &li)) != -1) {
        switch (c) {
        case 's':
            if (cli_parse_int(optarg, 0, 1 << 30, &sample_index))
                return cli_usage_error("render", "--sample needs an integer >= 0, got '%s'", optarg);
            break;
        case 'o': out = optarg; break;
        case 'i': image_dir = optarg; break;
        case 'n': overlays = 0; break;
        case 'R': {
            int rc = cli_render_option("render", opts[li].name, optarg, &ro);
            if (rc != EXIT_OK) return rc;
            break;
        }
        case 'h': help(); return EXIT_OK;
        default: return cli_usage_error("render", "unknown or incomplete option '%s'", argv[optind - 1]);
        }
    }
    if (optind < argc) trace = argv[optind++];
    if (optind < argc) return cli_usage_error("render", "unexpected argument '%s'", argv[optind]);
    if (!trace) return cli_usage_error("render", "TRACE.h5 is required");

    nm_error err = {0};
    nm_report_trace rep = {0};
    nm_trace_sample s = {0};
    char *note = NULL, *created_top = NULL;
    int rc = EXIT_OK, have_sample = 0;
    if (nm_report_trace_load(&rep, trace, 0, NULL, NULL, &err) != NM_OK) goto fail;
    if (overlays) {
        if (sample_index >= rep.n_samples) {
            nm_fail(&err, NM_ERR_INVALID, "%s: has %d sample%s; --sample %d does not exist", trace, rep.n_samples,
                    rep.n_samples == 1 ? "" : "s", sample_index);
            goto fail;
        }
        if (nm_trace_read_sample(&s, trace, sample_index, &err) != NM_OK) goto fail;
        have_sample = 1;
    }
    created_top = nm_first_missing_dir(out);
    if (nm_mkdir_p(out, &err) != NM_OK) goto fail;
    if (overlays && nm_render_sample_overlays(&s, out, image_dir, &ro, &note, &err) != NM_OK) goto fail;
    if (nm_render_trace_charts(&rep, 1, out, &ro, &err) != NM_OK) goto fail;
    if (note) fprintf(stderr, "nullmap render: note: the overlays show the patch grid without the photo: %s\n", note);
    const char *ext = nm_viz_format_ext(ro.format);
    if (overlays)
        printf("wrote %s/overlay/layer_00.%s … layer_%02d.%s and mean.%s (sample %d)\n", out, ext, s.n_layers - 1, ext,
               ext, sample_index);
    printf("wrote %s/modality.%s, polarization.%s, polarization_layers.%s, zero_vs_null.%s, layer_strip.%s\n", out,
           ext, ext, ext, ext, ext);
    goto done;
fail:
    rc = cli_report("render", &err);
    nm_rmdir_up_to(out, created_top); // only directories this command made and left empty
done:
    if (have_sample) nm_trace_sample_free(&s);
    nm_report_trace_free(&rep);
    free(note);
    free(created_top);
    return rc;
}
