// cmd_init.c — `nullmap init`: a seeded random model from a config.json.
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "nm_fileutil.h"
#include "nm_model.h"

static const char *HELP =
    "usage: nullmap init --config CONFIG.json --out DIR [--seed S] [--dtype f32|bf16|f16] [--force]\n"
    "\n"
    "Writes DIR/config.json and DIR/model.safetensors: a model with the shape of CONFIG.json and\n"
    "weights drawn from a seeded generator (the same seed gives the same bytes on every machine).\n"
    "\n"
    "  --config FILE   model config (DESIGN.md §3 format)            (required)\n"
    "  --out DIR       output model directory, created if missing     (required)\n"
    "  --seed S        random seed                                     (default 0)\n"
    "  --dtype T       storage dtype: f32, bf16 or f16                 (default f32)\n"
    "  --force         overwrite an existing model in DIR\n";

int cmd_init(int argc, char **argv) {
    const char *config = NULL, *out = NULL;
    unsigned long long seed = 0;
    nm_dtype dtype = NM_DT_F32;
    int force = 0;
    static const struct option opts[] = {{"config", 1, 0, 'c'}, {"out", 1, 0, 'o'},   {"seed", 1, 0, 's'},
                                         {"dtype", 1, 0, 'd'},  {"force", 0, 0, 'f'}, {"help", 0, 0, 'h'},
                                         {0, 0, 0, 0}};
    optind = 1;
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 'c': config = optarg; break;
        case 'o': out = optarg; break;
        case 's': {
            char *end;
            seed = strtoull(optarg, &end, 10);
            if (!*optarg || *end) return cli_usage_error("init", "--seed needs a non-negative integer, got '%s'", optarg);
            break;
        }
        case 'd':
            if (cli_parse_storage_dtype(optarg, &dtype))
                return cli_usage_error("init", "--dtype must be f32, bf16 or f16, got '%s'", optarg);
            break;
        case 'f': force = 1; break;
        case 'h': fputs(HELP, stdout); return EXIT_OK;
        default: return cli_usage_error("init", "unknown or incomplete option '%s'", argv[optind - 1]);
        }
    }
    if (optind < argc) return cli_usage_error("init", "unexpected argument '%s'", argv[optind]);
    if (!config || !out) return cli_usage_error("init", "--config and --out are required");

    nm_error err = {0};
    nm_config cfg;
    nm_model m = {0};
    if (nm_config_load(&cfg, config, &err) != NM_OK) return cli_report("init", &err);
    char *st = nm_path_join(out, "model.safetensors"), *cj = nm_path_join(out, "config.json");
    int rc = EXIT_OK;
    if (!st || !cj) {
        fprintf(stderr, "nullmap init: error: out of memory\n");
        rc = EXIT_INTERNAL;
    } else if (!force && (nm_path_exists(st) || nm_path_exists(cj))) {
        fprintf(stderr, "nullmap init: error: %s already holds a model (use --force to overwrite)\n", out);
        rc = EXIT_IO;
    } else if (nm_model_init_random(&m, &cfg, seed, &err) != NM_OK || nm_model_save(&m, out, dtype, &err) != NM_OK) {
        rc = cli_report("init", &err);
    } else {
        printf("wrote %s: %zu parameters (%s), seed %llu\n", out, m.n_params, nm_dtype_name(dtype), seed);
    }
    nm_model_free(&m);
    free(st);
    free(cj);
    return rc;
}
