// cmd_batch.c — `nullmap batch`: many image/prompt pairs into one trace.
#include <getopt.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "nm_fileutil.h"
#include "nm_limits.h"
#include "nm_generate.h"
#include "nm_metrics.h"
#include "nm_model.h"
#include "nm_trace.h"

static const char *HELP =
    "usage: nullmap batch --model DIR --pairs LIST.tsv --out TRACE.h5 [options]\n"
    "\n"
    "Runs every image/prompt pair of LIST.tsv and writes all samples to one trace, with a progress\n"
    "bar on stderr. LIST.tsv has one pair per line: IMAGE<TAB>PROMPT. IMAGE may be '-' or empty for a\n"
    "text-only prompt; a relative IMAGE path is taken relative to the directory of LIST.tsv. In\n"
    "PROMPT, \\t, \\n and \\\\ stand for a tab, a newline and a backslash. Blank lines and lines\n"
    "starting with '#' are skipped.\n"
    "\n"
    "  --model DIR            model directory                                      (required)\n"
    "  --pairs FILE           the TSV list                                         (required)\n"
    "  --out FILE             trace file to write                                  (required)\n"
    "  --max-new-tokens N     tokens to generate per sample                        (default 16)\n"
    "  --append               add the samples to an existing trace\n"
    "  --force                replace an existing trace\n"
    "  --skip-bad             report a bad pair and go on (default: stop, write nothing)\n"
    "%s"
    "\n"
    "The trace is written beside OUT and renamed over it when the batch ends, so an interrupted\n"
    "batch leaves an existing OUT as it was.\n";

typedef struct {
    char *image; // NULL for text-only
    char *prompt;
    int line;
} pair;

static void free_pairs(pair *p, int n) {
    for (int i = 0; i < n; i++) {
        free(p[i].image);
        free(p[i].prompt);
    }
    free(p);
}

// Decodes \t \n \\ in place.
static void unescape(char *s) {
    char *o = s;
    for (; *s; s++) {
        if (*s == '\\' && (s[1] == 't' || s[1] == 'n' || s[1] == '\\')) {
            s++;
            *o++ = *s == 't' ? '\t' : *s == 'n' ? '\n' : '\\';
        } else *o++ = *s;
    }
    *o = '\0';
}

static nm_status read_pairs(const char *path, pair **out, int *n_out, nm_error *err) {
    char *text;
    size_t size;
    *out = NULL;
    *n_out = 0;
    nm_status s = nm_read_file(path, (size_t)nm_limit(NM_LIMIT_PAIRS_FILE_BYTES), &text, &size, err);
    if (s != NM_OK) return s;
    if (strlen(text) != size) {
        free(text);
        return nm_fail(err, NM_ERR_FORMAT, "%s: contains a NUL byte", path);
    }
    char *dcopy = strdup(path);
    const char *dir = dcopy ? dirname(dcopy) : ".";
    pair *p = NULL;
    int n = 0, cap = 0, line = 0;
    for (char *ln = text, *next; ln && *ln; ln = next) {
        line++;
        next = strchr(ln, '\n');
        if (next) *next++ = '\0';
        size_t len = strlen(ln);
        if (len && ln[len - 1] == '\r') ln[--len] = '\0';
        if (len == 0 || ln[0] == '#') continue;
        char *tab = strchr(ln, '\t');
        if (!tab) {
            s = nm_fail(err, NM_ERR_FORMAT, "%s:%d: expected IMAGE<TAB>PROMPT", path, line);
            break;
        }
        *tab = '\0';
        if (n == cap) {
            cap = cap ? 2 * cap : 64;
            pair *np = realloc(p, (size_t)cap * sizeof *p);
            if (!np) {
                s = NM_NOMEM(err, "pair list");
                break;
            }
            p = np;
        }
        pair *q = &p[n];
        memset(q, 0, sizeof *q);
        q->line = line;
        if (ln[0] && strcmp(ln, "-") != 0) q->image = ln[0] == '/' ? strdup(ln) : nm_path_join(dir, ln);
        q->prompt = strdup(tab + 1);
        n++;
        if (!q->prompt || (ln[0] && strcmp(ln, "-") != 0 && !q->image)) {
            s = NM_NOMEM(err, "pair list");
            break;
        }
        unescape(q->prompt);
    }
    free(dcopy);
    free(text);
    if (s == NM_OK && n == 0) s = nm_fail(err, NM_ERR_FORMAT, "%s: no pairs in the list", path);
    if (s != NM_OK) {
        free_pairs(p, n);
        return s;
    }
    *out = p;
    *n_out = n;
    return NM_OK;
}

int cmd_batch(int argc, char **argv) {
    const char *model_dir = NULL, *pairs_path = NULL, *out = NULL;
    int max_new = 16, append = 0, force = 0, skip_bad = 0;
    static const struct option opts[] = {{"model", 1, 0, 'm'},          {"pairs", 1, 0, 'p'},   {"out", 1, 0, 'o'},
                                         {"max-new-tokens", 1, 0, 'n'}, {"append", 0, 0, 'a'},  {"force", 0, 0, 'f'},
                                         {"skip-bad", 0, 0, 's'},       {"help", 0, 0, 'h'},    {"device", 1, 0, 'D'},
                                         {"precision", 1, 0, 'D'},      {0, 0, 0, 0}};
    cli_device dev = {0};
    int li;
    optind = 1;
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, "h", opts, &li)) != -1) {
        switch (c) {
        case 'm': model_dir = optarg; break;
        case 'p': pairs_path = optarg; break;
        case 'o': out = optarg; break;
        case 'n':
            if (cli_parse_int(optarg, 0, 1 << 20, &max_new))
                return cli_usage_error("batch", "--max-new-tokens needs an integer >= 0, got '%s'", optarg);
            break;
        case 'a': append = 1; break;
        case 'f': force = 1; break;
        case 's': skip_bad = 1; break;
        case 'D': {
            int rr = cli_device_option("batch", opts[li].name, optarg, &dev);
            if (rr != EXIT_OK) return rr;
            break;
        }
        case 'h': printf(HELP, CLI_DEVICE_HELP); return EXIT_OK;
        default: return cli_usage_error("batch", "unknown or incomplete option '%s'", argv[optind - 1]);
        }
    }
    if (optind < argc) return cli_usage_error("batch", "unexpected argument '%s'", argv[optind]);
    if (!model_dir || !pairs_path || !out) return cli_usage_error("batch", "--model, --pairs and --out are required");
    if (append && force) return cli_usage_error("batch", "--append and --force exclude each other");
    nm_engine_options engine_opts;
    int drc = cli_device_resolve("batch", &dev, &engine_opts);
    if (drc != EXIT_OK) return drc;

    nm_error err = {0};
    nm_model model = {0};
    nm_engine *engine = NULL;
    nm_trace_file *tf = NULL;
    nm_metrics met = {0};
    pair *pairs = NULL;
    int n_pairs = 0, rc = EXIT_OK, n_ok = 0, n_bad = 0;
    nm_status s;
    if ((s = read_pairs(pairs_path, &pairs, &n_pairs, &err)) != NM_OK) goto fail;
    if ((s = nm_model_load(&model, model_dir, &err)) != NM_OK) goto fail;
    if ((s = nm_trace_file_open(&tf, out, &model.cfg, model_dir, append, force, &err)) != NM_OK) goto fail;
    if ((s = nm_metrics_init(&met, model.cfg.num_layers, model.cfg.moe.top_k, &err)) != NM_OK) goto fail;
    cli_progress prog;
    cli_progress_start(&prog, n_pairs, "samples");
    for (int i = 0; i < n_pairs; i++) {
        nm_trace_sample sample;
        nm_request req = {.prompt = pairs[i].prompt, .image_path = pairs[i].image, .max_new_tokens = max_new,
                          .engine = engine_opts};
        int index;
        s = nm_generate(&model, &engine, &req, &sample, &err);
        if (s == NM_OK) s = nm_trace_file_write_sample(tf, &sample, &index, &err);
        if (s == NM_OK) s = nm_metrics_add_sample(&met, &sample, &err);
        nm_trace_sample_free(&sample);
        if (s != NM_OK) {
            nm_error_prefix(&err, "%s:%d", pairs_path, pairs[i].line);
            if (!skip_bad || s == NM_ERR_NOMEM || s == NM_ERR_INTERNAL) {
                cli_progress_end(&prog);
                goto fail;
            }
            cli_progress_end(&prog);
            fprintf(stderr, "nullmap batch: skipped: %s\n", err.msg);
            n_bad++;
        } else n_ok++;
        cli_progress_step(&prog, i + 1);
    }
    cli_progress_end(&prog);
    if (n_ok == 0) {
        s = nm_fail(&err, NM_ERR_INVALID, "%s: no pair could be run", pairs_path);
        goto fail;
    }
    int total = nm_trace_file_num_samples(tf);
    if ((s = nm_trace_file_commit(tf, &err)) != NM_OK) {
        tf = NULL;
        goto fail;
    }
    tf = NULL;
    nm_metrics_finish(&met);
    printf("wrote %d sample%s to %s (%d in the file)%s\n", n_ok, n_ok == 1 ? "" : "s", out, total,
           n_bad ? " — some pairs were skipped, see above" : "");
    cli_print_summary(&met, stdout);
    goto done;
fail:
    rc = cli_report("batch", &err);
    nm_trace_file_abort(tf);
done:
    nm_metrics_free(&met);
    nm_engine_free(engine);
    nm_model_free(&model);
    free_pairs(pairs, n_pairs);
    return rc;
}
