// cmd_run.c — `nullmap run`: one image + prompt through the model, traced to OUT/trace.h5.
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"
#include "nm_fileutil.h"
#include "nm_generate.h"
#include "nm_metrics.h"
#include "nm_model.h"
#include "nm_render.h"
#include "nm_report.h"
#include "nm_trace.h"

static const char *HELP =
    "usage: nullmap run --model DIR --prompt TEXT [--image FILE] [--out DIR] [options]\n"
    "\n"
    "Runs the model on an image (PNG or JPEG; optional) and a prompt, generates a greedy answer,\n"
    "prints the answer, the tokens per modality and each MoE layer's compute intensity, and writes\n"
    "  OUT/trace.h5                       the routing of every token in every MoE layer\n"
    "  OUT/overlay/layer_00.png … mean.png  compute-map overlays of this sample, per layer and mean\n"
    "  OUT/report.md, .json, .csv          the metrics of the whole trace (all its samples)\n"
    "  OUT/modality.png, polarization.png, polarization_layers.png, zero_vs_null.png, layer_strip.png\n"
    "\n"
    "  --model DIR            model directory (config.json + model.safetensors)   (required)\n"
    "  --prompt TEXT          prompt text, UTF-8                                  (required)\n"
    "  --image FILE           PNG or JPEG image; omit for a text-only prompt\n"
    "  --out DIR              output directory, created if missing                (default out)\n"
    "  --max-new-tokens N     tokens to generate, 0 for none; stops at EOS         (default 16)\n"
    "  --append               add this sample to an existing OUT/trace.h5\n"
    "  --force                replace an existing OUT/trace.h5\n"
    "  --quiet                print only the answer\n"
    "  --no-render            write the trace only: no pictures, no report\n"
    "%s"
    "%s"
    "\n"
    "An existing trace is never modified in place: the new file is written beside it and renamed\n"
    "over it only when complete, so an interrupted run leaves the old trace intact.\n";

int cmd_run(int argc, char **argv) {
    const char *model_dir = NULL, *prompt = NULL, *image = NULL, *out = "out";
    int max_new = 16, append = 0, force = 0, quiet = 0;
    static const struct option opts[] = {
        {"model", 1, 0, 'm'}, {"prompt", 1, 0, 'p'}, {"image", 1, 0, 'i'}, {"out", 1, 0, 'o'},  {"max-new-tokens", 1, 0, 'n'},
        {"append", 0, 0, 'a'}, {"force", 0, 0, 'f'}, {"quiet", 0, 0, 'q'}, {"help", 0, 0, 'h'}, {"no-render", 0, 0, 'N'},
        {"format", 1, 0, 'R'}, {"cmap", 1, 0, 'R'}, {"alpha", 1, 0, 'R'}, {"width", 1, 0, 'R'},
        {"device", 1, 0, 'D'}, {"precision", 1, 0, 'D'}, {0, 0, 0, 0}};
    cli_device dev = {0};
    int render = 1, li;
    nm_render_opts ro;
    nm_render_opts_default(&ro);
    optind = 1;
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, "h", opts, &li)) != -1) {
        switch (c) {
        case 'm': model_dir = optarg; break;
        case 'p': prompt = optarg; break;
        case 'i': image = optarg; break;
        case 'o': out = optarg; break;
        case 'n':
            if (cli_parse_int(optarg, 0, 1 << 20, &max_new))
                return cli_usage_error("run", "--max-new-tokens needs an integer >= 0, got '%s'", optarg);
            break;
        case 'a': append = 1; break;
        case 'f': force = 1; break;
        case 'q': quiet = 1; break;
        case 'N': render = 0; break;
        case 'R': {
            int rr = cli_render_option("run", opts[li].name, optarg, &ro);
            if (rr != EXIT_OK) return rr;
            break;
        }
        case 'D': {
            int rr = cli_device_option("run", opts[li].name, optarg, &dev);
            if (rr != EXIT_OK) return rr;
            break;
        }
        case 'h': printf(HELP, CLI_RENDER_HELP, CLI_DEVICE_HELP); return EXIT_OK;
        default: return cli_usage_error("run", "unknown or incomplete option '%s'", argv[optind - 1]);
        }
    }
    if (optind < argc) return cli_usage_error("run", "unexpected argument '%s'", argv[optind]);
    if (!model_dir || !prompt) return cli_usage_error("run", "--model and --prompt are required");
    if (append && force) return cli_usage_error("run", "--append and --force exclude each other");
    nm_engine_options engine_opts;
    int drc = cli_device_resolve("run", &dev, &engine_opts);
    if (drc != EXIT_OK) return drc;

    nm_error err = {0};
    nm_model model = {0};
    nm_engine *engine = NULL;
    nm_trace_file *tf = NULL;
    nm_trace_sample sample = {0};
    nm_metrics met = {0};
    nm_report_trace rep = {0};
    char *image_note = NULL;
    char *trace_path = nm_path_join(out, "trace.h5");
    int index = 0, rc = EXIT_OK;
    char *created_top = NULL; // the shallowest directory this run creates for --out
    nm_status s;
    if (!trace_path) {
        fprintf(stderr, "nullmap run: error: out of memory\n");
        return EXIT_INTERNAL;
    }
    if ((s = nm_model_load(&model, model_dir, &err)) != NM_OK) goto fail;
    // Open the output before the (long) forward pass so a bad --out fails at once.
    created_top = nm_first_missing_dir(out);
    if ((s = nm_mkdir_p(out, &err)) != NM_OK) goto fail;
    if ((s = nm_trace_file_open(&tf, trace_path, &model.cfg, model_dir, append, force, &err)) != NM_OK) goto fail;
    nm_request req = {.prompt = prompt, .image_path = image, .max_new_tokens = max_new, .engine = engine_opts};
    if ((s = nm_generate(&model, &engine, &req, &sample, &err)) != NM_OK) goto fail;
    if ((s = nm_trace_file_write_sample(tf, &sample, &index, &err)) != NM_OK) goto fail;
    if ((s = nm_trace_file_commit(tf, &err)) != NM_OK) {
        tf = NULL;
        goto fail;
    }
    tf = NULL;
    if ((s = nm_metrics_init(&met, sample.n_layers, sample.top_k, &err)) != NM_OK ||
        (s = nm_metrics_add_sample(&met, &sample, &err)) != NM_OK)
        goto fail;
    nm_metrics_finish(&met);
    // Pictures and report. The trace is already committed: a failure here is reported and
    // gives a non-zero exit, but the trace stays.
    if (render) {
        if ((s = nm_render_sample_overlays(&sample, out, NULL, &ro, &image_note, &err)) != NM_OK ||
            (s = nm_report_trace_load(&rep, trace_path, 0, NULL, NULL, &err)) != NM_OK ||
            (s = nm_report_write_dir(&rep, 1, out, 1, &err)) != NM_OK ||
            (s = nm_render_trace_charts(&rep, 1, out, &ro, &err)) != NM_OK) {
            rc = cli_report("run", &err);
            goto done;
        }
    }
    int n_gen = sample.n_tokens - sample.n_prompt_tokens;
    if (quiet) {
        printf("%s\n", sample.answer);
    } else {
        const nm_config *cfg = &model.cfg;
        printf("model      %s  (L=%d, D=%d, N=%d, M=%d, K=%d, rho=%.2f)\n", model_dir, cfg->num_layers,
               cfg->hidden_size, cfg->moe.num_experts, cfg->moe.null_copies, cfg->moe.top_k, nm_config_rho(cfg));
        if (image)
            printf("image      %s  (%dx%d, resized to %dx%d, %dx%d patches)\n", image, sample.image_width,
                   sample.image_height, cfg->image_size, cfg->image_size, sample.grid_rows, sample.grid_cols);
        printf("prompt     \"");
        cli_print_text(stdout, prompt);
        printf("\"\n");
        int eos = n_gen > 0 && sample.token_id[sample.n_tokens - 1] == cfg->tok.eos;
        printf("answer     \"");
        cli_print_text(stdout, sample.answer);
        printf("\"\n           (%d generated token%s, %s)\n", n_gen, n_gen == 1 ? "" : "s",
               eos ? "stopped at EOS" : (n_gen < max_new ? "stopped at max_positions" : "stopped at --max-new-tokens"));
        cli_print_summary(&met, stdout);
        printf("trace      %s  (sample %d)\n", trace_path, index);
        if (render) {
            const char *ext = nm_viz_format_ext(ro.format);
            printf("pictures   %s/overlay/layer_00.%s … layer_%02d.%s, mean.%s; %s/modality.%s, polarization.%s, "
                   "layer_strip.%s, …\n",
                   out, ext, sample.n_layers - 1, ext, ext, out, ext, ext, ext);
            printf("report     %s/report.md, report.json, report.csv (all %d sample%s of the trace)\n", out,
                   rep.n_samples, rep.n_samples == 1 ? "" : "s");
        }
    }
    goto done;
fail:
    rc = cli_report("run", &err);
    nm_trace_file_abort(tf);
    nm_rmdir_up_to(out, created_top); // leave nothing behind (only empty directories we made)
done:
    if (image_note) fprintf(stderr, "nullmap run: note: overlays drawn without the photo: %s\n", image_note);
    free(image_note);
    nm_report_trace_free(&rep);
    nm_metrics_free(&met);
    nm_trace_sample_free(&sample);
    nm_engine_free(engine);
    nm_model_free(&model);
    free(trace_path);
    free(created_top);
    return rc;
}
