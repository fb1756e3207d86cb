// cmd_data.c — `nullmap data`: write the synthetic VLM data set (lib/nm_data.h).
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "nm_data.h"

static const char *HELP =
    "usage: nullmap data --out DIR [--train N] [--eval N] [--seed S] [--image-size S] [--force]\n"
    "\n"
    "Writes a synthetic vision-language data set for training: cairo-drawn PNG images (flat or\n"
    "textured backgrounds; coloured shapes, words, small bar charts) with varied questions whose\n"
    "answers need the informative regions, plus ~20% text-only questions. DIR gets train.jsonl,\n"
    "eval.jsonl (a held-out split: no eval image or text prompt repeats one of train), train/ and\n"
    "eval/ PNGs, and info.json. The same seed gives the same bytes. The directory appears only\n"
    "when complete (written as DIR.tmp-<pid>, then renamed). Format: lib/nm_data.h.\n"
    "\n"
    "  --out DIR         output directory; must be empty or absent          (required)\n"
    "  --train N         training samples, 0..10000000                       (default 20000)\n"
    "  --eval N          held-out samples, 0..10000000                       (default 1000)\n"
    "  --seed S          random seed                                         (default 1)\n"
    "  --image-size S    image side in pixels, 16..1024                      (default 64)\n"
    "  --force           replace DIR if it holds a nullmap data set\n";

typedef struct {
    cli_progress bar;
    int started;
} progress_state;

// The bar starts at the library's first call, after the output directory was accepted, so a
// refused run prints only its error.
static void progress_cb(void *ctx, int done, int total) {
    progress_state *p = ctx;
    if (!p->started) {
        cli_progress_start(&p->bar, total, "samples");
        p->started = 1;
    }
    cli_progress_step(&p->bar, done);
}

int cmd_data(int argc, char **argv) {
    const char *out = NULL;
    int n_train = 20000, n_eval = 1000, size = NM_DATA_DEFAULT_IMAGE, force = 0;
    unsigned long long seed = 1;
    static const struct option opts[] = {{"out", 1, 0, 'o'},        {"train", 1, 0, 't'}, {"eval", 1, 0, 'e'},
                                         {"seed", 1, 0, 's'},       {"image-size", 1, 0, 'i'},
                                         {"force", 0, 0, 'f'},      {"help", 0, 0, 'h'},  {0, 0, 0, 0}};
    optind = 1;
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 'o': out = optarg; break;
        case 't':
            if (cli_parse_int(optarg, 0, NM_DATA_MAX_SAMPLES, &n_train))
                return cli_usage_error("data", "--train needs an integer 0..%d, got '%s'", NM_DATA_MAX_SAMPLES, optarg);
            break;
        case 'e':
            if (cli_parse_int(optarg, 0, NM_DATA_MAX_SAMPLES, &n_eval))
                return cli_usage_error("data", "--eval needs an integer 0..%d, got '%s'", NM_DATA_MAX_SAMPLES, optarg);
            break;
        case 'i':
            if (cli_parse_int(optarg, NM_DATA_MIN_IMAGE, NM_DATA_MAX_IMAGE, &size))
                return cli_usage_error("data", "--image-size needs an integer %d..%d (pixels), got '%s'", NM_DATA_MIN_IMAGE,
                                       NM_DATA_MAX_IMAGE, optarg);
            break;
        case 's': {
            char *end;
            seed = strtoull(optarg, &end, 10);
            if (!*optarg || *end || optarg[0] == '-')
                return cli_usage_error("data", "--seed needs a non-negative integer, got '%s'", optarg);
            break;
        }
        case 'f': force = 1; break;
        case 'h': fputs(HELP, stdout); return EXIT_OK;
        default: return cli_usage_error("data", "unknown or incomplete option '%s'", argv[optind - 1]);
        }
    }
    if (optind < argc) return cli_usage_error("data", "unexpected argument '%s'", argv[optind]);
    if (!out) return cli_usage_error("data", "--out is required");
    if (n_train + n_eval == 0) return cli_usage_error("data", "--train and --eval are both 0: nothing to write");

    nm_error err = {0};
    progress_state p = {0};
    double t0 = cli_now();
    nm_status st = nm_data_generate(out, n_train, n_eval, seed, size, force, progress_cb, &p, &err);
    if (p.started) cli_progress_end(&p.bar);
    if (st != NM_OK) return cli_report("data", &err);
    double el = cli_now() - t0;
    printf("wrote %s: %d train + %d eval samples, %dx%d images, seed %llu (%.1f s, %.0f samples/s)\n", out, n_train, n_eval,
           size, size, seed, el, el > 0 ? (n_train + n_eval) / el : 0.0);
    return EXIT_OK;
}
