// cmd_report.c — `nullmap report`: report.md / report.json / report.csv from one or more traces.
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "nm_charts.h"
#include "nm_render.h"
#include "nm_fileutil.h"
#include "nm_report.h"

static const char *HELP =
    "usage: nullmap report TRACE.h5 [TRACE2.h5 ...] --out DIR [--per-sample] [--force]\n"
    "\n"
    "Computes the compute metrics of every trace (over all its samples, token-weighted: every token\n"
    "counts once) and writes them to DIR (created if missing):\n"
    "  report.md    tables to read: by modality, by layer, by segment, polarization; with several\n"
    "               traces (e.g. a sparsity sweep) a comparison table, one row per trace\n"
    "  report.json  the same numbers for programs, with a \"definitions\" object\n"
    "  report.csv   one row per trace x layer x modality (columns described in report.md)\n"
    "Prints the comparison table. Traces written by other programs are read too, if they follow the\n"
    "schema in README.md.\n"
    "\n"
    "  --out DIR       output directory                                   (required)\n"
    "  --per-sample    add per-sample sections (md), entries (json) and rows (csv)\n"
    "  --force         replace existing DIR/report.* files (other files in DIR are never touched)\n"
    "\n"
    "Values that do not exist (a mean over no tokens, the compute distribution when every token\n"
    "has compute 0) are written as n/a or undefined (md), null (json), an empty cell (csv), never 0.\n"
    "The three files are written together: on any error none of them is left behind.\n";

static const char *REPORT_FILES[] = {"report.md", "report.json", "report.csv"};

// The charts of DESIGN.md §6 that belong with the report (modality chart, polarization
// histograms, zero-compute vs null-slot ratio across traces, per-layer strip), written into
// `dir` next to report.*; nm_render_trace_charts removes them again if it fails.
static nm_status render_charts(const nm_report_trace *r, int n, const char *dir, nm_error *err) {
    if (n > NM_CHART_MAX_SERIES) {
        fprintf(stderr, "nullmap report: note: charts compare at most %d traces; %d given, charts skipped\n",
                NM_CHART_MAX_SERIES, n);
        return NM_OK;
    }
    nm_render_opts ro;
    nm_render_opts_default(&ro);
    return nm_render_trace_charts(r, n, dir, &ro, err);
}

// The load reports (done, total) from its one open of the trace; the bar starts at the first
// report, and only for traces of 50 samples or more (small ones load in a blink).
typedef struct {
    cli_progress bar;
    int started;
} load_progress;

static void progress_cb(void *ctx, int done, int total) {
    load_progress *p = ctx;
    if (!p->started) {
        if (total < 50) return;
        cli_progress_start(&p->bar, total, "samples");
        p->started = 1;
    }
    cli_progress_step(&p->bar, done);
}

static void cell(double v, const char *undef) {
    if (isnan(v)) printf(" %10s", undef);
    else printf(" %10.4f", v);
}

// The comparison table (one row per trace) on stdout.
static void print_summary(const nm_report_trace *r, int n) {
    printf("%3s %4s %7s %8s %8s %10s %10s %10s %10s %10s %10s  %s\n", "#", "K", "rho", "samples", "tokens",
           "null-slot", "zero-comp", "vision-i", "text-i", "vision-c", "text-c", "trace");
    for (int i = 0; i < n; i++) {
        const nm_metrics *m = &r[i].agg;
        const nm_config *c = &r[i].info.cfg;
        printf("%3d %4d %7.4f %8d %8lld", i + 1, c->moe.top_k, nm_config_rho(c), r[i].n_samples,
               m->n_tokens[NM_MOD_ALL]);
        cell(m->null_slot_ratio, "-");
        cell(m->zero_compute_ratio, "-");
        cell(m->intensity[NM_MOD_VISION], "-");
        cell(m->intensity[NM_MOD_TEXT], "-");
        const char *undef = m->n_tokens[NM_MOD_ALL] ? "undefined" : "-";
        cell(m->compute_share[NM_MOD_VISION], undef);
        cell(m->compute_share[NM_MOD_TEXT], undef);
        printf("  ");
        cli_print_text(stdout, r[i].path);
        printf("\n");
    }
    printf("null-slot = null slot ratio, zero-comp = zero-compute ratio, -i = compute intensity, -c = compute\n"
           "share ('-' = no such tokens; undefined = every token has compute 0)\n");
}

int cmd_report(int argc, char **argv) {
    const char *out = NULL;
    int per_sample = 0, force = 0;
    static const struct option opts[] = {{"out", 1, 0, 'o'},
                                         {"per-sample", 0, 0, 's'},
                                         {"force", 0, 0, 'f'},
                                         {"help", 0, 0, 'h'},
                                         {0, 0, 0, 0}};
    optind = 1;
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 'o': out = optarg; break;
        case 's': per_sample = 1; break;
        case 'f': force = 1; break;
        case 'h': fputs(HELP, stdout); return EXIT_OK;
        default: return cli_usage_error("report", "unknown or incomplete option '%s'", argv[optind - 1]);
        }
    }
    int n = argc - optind;
    char **paths = argv + optind;
    if (n < 1) return cli_usage_error("report", "at least one TRACE.h5 is required");
    if (!out || !*out) return cli_usage_error("report", "--out DIR is required");

    // Cheap checks first, so that a mistake fails before any trace is read.
    for (int i = 0; i < n; i++)
        if (!nm_path_exists(paths[i])) {
            fprintf(stderr, "nullmap report: error: %s: no such file or directory\n", paths[i]);
            return EXIT_IO;
        }
    if (nm_path_exists(out) && !nm_is_dir(out)) {
        fprintf(stderr, "nullmap report: error: %s: exists and is not a directory\n", out);
        return EXIT_IO;
    }
    if (!force)
        for (size_t i = 0; i < sizeof REPORT_FILES / sizeof REPORT_FILES[0]; i++) {
            char *p = nm_path_join(out, REPORT_FILES[i]);
            int exists = p && nm_path_exists(p);
            if (exists) fprintf(stderr, "nullmap report: error: %s already exists (use --force to replace it)\n", p);
            free(p);
            if (exists) return EXIT_IO;
        }

    nm_error err = {0};
    nm_report_trace *r = calloc((size_t)n, sizeof *r);
    char *created_top = NULL;
    int rc = EXIT_OK, loaded = 0;
    if (!r) {
        fprintf(stderr, "nullmap report: error: out of memory\n");
        return EXIT_INTERNAL;
    }
    for (; loaded < n; loaded++) {
        load_progress prog = {.started = 0};
        nm_status s = nm_report_trace_load(&r[loaded], paths[loaded], per_sample, progress_cb, &prog, &err);
        if (prog.started) cli_progress_end(&prog.bar);
        if (s != NM_OK) goto fail;
    }
    created_top = nm_first_missing_dir(out);
    if (nm_mkdir_p(out, &err) != NM_OK) goto fail;
    if (render_charts(r, n, out, &err) != NM_OK) goto fail;
    if (nm_report_write_dir(r, n, out, force, &err) != NM_OK) goto fail;

    print_summary(r, n);
    printf("wrote %s/report.md, report.json, report.csv\n", out);
    goto done;
fail:
    rc = cli_report("report", &err);
    if (created_top) nm_rmdir_up_to(out, created_top); // only the empty directories this run made
done:
    for (int i = 0; i < loaded && i < n; i++) nm_report_trace_free(&r[i]);
    free(r);
    free(created_top);
    return rc;
}
