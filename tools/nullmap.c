// nullmap — see where a null-expert MoE model spends its compute.
// Thin front end: each subcommand lives in its own cmd_*.c and calls libnullmap.
#include <stdio.h>
#include <string.h>

#include "cli.h"

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
    "  init    write a seeded random model from a config.json\n"
    "  report  tables of the compute metrics of one or more traces (report.md/.json/.csv)\n"
    "\n"
    "  nullmap <command> --help   options of a command\n"
    "  nullmap --version          version and backends\n"
    "\n"
    "exit codes: 0 ok, 1 bad input (malformed/unsupported/over a limit), 2 usage error,\n"
    "            3 file missing/unreadable/unwritable, 4 out of memory or internal error\n";

int main(int argc, char **argv) {
    if (argc < 2) {
        fputs(USAGE, stderr);
        return EXIT_USAGE;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "-h") || !strcmp(cmd, "--help") || !strcmp(cmd, "help")) {
        fputs(USAGE, stdout);
        return EXIT_OK;
    }
    if (!strcmp(cmd, "--version") || !strcmp(cmd, "version")) {
        printf("nullmap %s\nbackends: cpu (OpenBLAS)\n", NM_VERSION);
        return EXIT_OK;
    }
    if (!strcmp(cmd, "run")) return cmd_run(argc - 1, argv + 1);
    if (!strcmp(cmd, "batch")) return cmd_batch(argc - 1, argv + 1);
    if (!strcmp(cmd, "info")) return cmd_info(argc - 1, argv + 1);
    if (!strcmp(cmd, "init")) return cmd_init(argc - 1, argv + 1);
    if (!strcmp(cmd, "report")) return cmd_report(argc - 1, argv + 1);
    fprintf(stderr, "nullmap: unknown command '%s'\n\n%s", cmd, USAGE);
    return EXIT_USAGE;
}
