// nullmap — see where a null-expert MoE model spends its compute.
// Thin front end: each subcommand lives in its own cmd_*.c and calls libnullmap.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"
#include "nm_backend.h"
#include "nm_limits.h"
#include "nm_viz.h"

#ifndef NM_VERSION
#define NM_VERSION "dev"
#endif

static const char *USAGE =
    "usage: nullmap <command> [options]\n"
    "\n"
    "commands:\n"
    "  run     run a model on an image and a prompt, print the answer and per-layer compute,\n"
    "          write the routing trace (HDF5)\n"
    "  batch   run many image/prompt pairs (a TSV list) into one trace, with a progress bar\n"
    "  info    describe a model directory or a trace file\n"
    "  render  draw the pictures of a trace: per-layer compute-map overlays, modality and\n"
    "          polarization charts, per-layer strip\n"
    "  init    write a seeded random model from a config.json\n"
    "  report  tables of the compute metrics of one or more traces (report.md/.json/.csv)\n"
    "  data    write a synthetic vision-language data set (PNG + JSONL, train and eval splits)\n"
    "  train   train a model on a data set (AdamW + WSD, checkpoints, --resume)\n"
    "  eval    evaluate a model on a data set split: accuracy per task against the majority\n"
    "          baseline, answer/prompt loss, background vs object patch compute\n"
    "\n"
    "  nullmap <command> --help   options of a command\n"
    "  nullmap --version          version and backends\n"
    "  nullmap --list-limits      the input limits: current value, default, ceiling\n"
    "\n"
    "every command also takes --set-limit NAME=VALUE (repeatable; VALUE may end in K, M, G, T)\n"
    "to change an input limit, as does the environment variable NULLMAP_LIMIT_<NAME>;\n"
    "the option wins over the variable (README.md, \"Limits\")\n"
    "\n"
    "exit codes: 0 ok, 1 bad input (malformed/unsupported/over a limit), 2 usage error,\n"
    "            3 file missing/unreadable/unwritable, 4 out of memory or internal error,\n"
    "            5 training diverged (non-finite loss; the last checkpoint is kept)\n";

// OpenMP worker threads spin between parallel regions by default. On a 2-core machine shared
// with other work that made a batch 11x slower (measured; ../shared/FINDINGS.md warns of the
// same trap). libgomp reads its settings when it is loaded, before main(), so when the user
// has chosen no wait policy we set a short spin (then sleep) and execute ourselves once more.
static void tame_openmp_spinning(char **argv) {
    if (getenv("OMP_WAIT_POLICY") || getenv("GOMP_SPINCOUNT") || getenv("NULLMAP_OMP_SET")) return;
    setenv("GOMP_SPINCOUNT", "1000", 1);
    setenv("NULLMAP_OMP_SET", "1", 1);
    execv("/proc/self/exe", argv); // returns only on failure: then run with the defaults
}

static void list_limits(void) {
    printf("%-26s %14s %14s %14s  %s\n", "limit", "value", "default", "ceiling", "environment variable");
    for (int i = 0; i < NM_LIMIT_COUNT; i++)
        printf("%-26s %14llu %14llu %14llu  %s\n", nm_limit_name(i), (unsigned long long)nm_limit(i),
               (unsigned long long)nm_limit_default(i), (unsigned long long)nm_limit_ceiling(i), nm_limit_env_name(i));
}

// Applies NULLMAP_LIMIT_* and then every --set-limit NAME=VALUE (or --set-limit=NAME=VALUE)
// anywhere after the command name, removing those options from argv so that each command's
// own option parser never sees them. Returns EXIT_OK or EXIT_USAGE (message printed).
static int apply_limits(int *argc, char **argv) {
    nm_error err;
    nm_error_clear(&err);
    if (nm_limits_from_env(&err) != NM_OK) {
        fprintf(stderr, "nullmap: error: %s\n", err.msg);
        return EXIT_USAGE;
    }
    int out = 1;
    for (int i = 1; i < *argc; i++) {
        const char *value = NULL;
        if (!strcmp(argv[i], "--")) { // the rest are operands
            while (i < *argc) argv[out++] = argv[i++];
            break;
        }
        if (!strcmp(argv[i], "--set-limit")) {
            if (i + 1 >= *argc) {
                fprintf(stderr, "nullmap: error: --set-limit needs NAME=VALUE\n");
                return EXIT_USAGE;
            }
            value = argv[++i];
        } else if (!strncmp(argv[i], "--set-limit=", 12)) {
            value = argv[i] + 12;
        } else {
            argv[out++] = argv[i];
            continue;
        }
        if (nm_limit_set_from_string(value, &err) != NM_OK) {
            fprintf(stderr, "nullmap: error: --set-limit: %s\n", err.msg);
            return EXIT_USAGE;
        }
    }
    argv[out] = NULL;
    *argc = out;
    return EXIT_OK;
}

int main(int argc, char **argv) {
    tame_openmp_spinning(argv);
    atexit(nm_viz_release_static); // leak checkers then see no font caches left
    int rc = apply_limits(&argc, argv);
    if (rc != EXIT_OK) return rc;
    if (argc < 2) {
        fputs(USAGE, stderr);
        return EXIT_USAGE;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "-h") || !strcmp(cmd, "--help") || !strcmp(cmd, "help")) {
        fputs(USAGE, stdout);
        return EXIT_OK;
    }
    if (!strcmp(cmd, "--list-limits")) {
        list_limits();
        return EXIT_OK;
    }
    if (!strcmp(cmd, "--version") || !strcmp(cmd, "version")) {
        char backends[512];
        nm_backend_describe(backends, sizeof backends);
        printf("nullmap %s\nbackends: %s\n", NM_VERSION, backends);
        return EXIT_OK;
    }
    if (!strcmp(cmd, "run")) return cmd_run(argc - 1, argv + 1);
    if (!strcmp(cmd, "batch")) return cmd_batch(argc - 1, argv + 1);
    if (!strcmp(cmd, "info")) return cmd_info(argc - 1, argv + 1);
    if (!strcmp(cmd, "render")) return cmd_render(argc - 1, argv + 1);
    if (!strcmp(cmd, "init")) return cmd_init(argc - 1, argv + 1);
    if (!strcmp(cmd, "report")) return cmd_report(argc - 1, argv + 1);
    if (!strcmp(cmd, "data")) return cmd_data(argc - 1, argv + 1);
    if (!strcmp(cmd, "train")) return cmd_train(argc - 1, argv + 1);
    if (!strcmp(cmd, "eval")) return cmd_eval(argc - 1, argv + 1);
    fprintf(stderr, "nullmap: unknown command '%s'\n\n%s", cmd, USAGE);
    return EXIT_USAGE;
}
