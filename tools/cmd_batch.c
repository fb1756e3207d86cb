// cmd_batch.c — `nullmap batch`: many image/prompt pairs into one trace.
#include <errno.h>
#include <getopt.h>
#include <stdint.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "nm_fileutil.h"
#include "nm_limits.h"
#include "nm_rng.h"
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
    "  --force                replace an existing trace (when the first sample is committed)\n"
    "  --resume               continue the interrupted batch recorded in TRACE.h5: the pairs whose\n"
    "                         samples it holds are skipped, the others are run (same --model,\n"
    "                         --pairs and --max-new-tokens; checked)\n"
    "  --skip-bad             report a bad pair and go on (default: the first bad pair stops the\n"
    "                         batch; the samples committed before it stay)\n"
    "  --verbose              print a line on stdout as each sample is committed\n"
    "%s"
    "\n"
    "Every sample is committed to TRACE.h5 as soon as it is done: an interrupted batch (a crash, a\n"
    "kill, a bad pair) leaves a complete trace holding every sample committed before, and --resume\n"
    "finishes it with the same result as an uninterrupted run. Pair i of the list (counting pairs,\n"
    "not lines) is sample /samples/<first + i>, first = 0 for a new trace and the next free index\n"
    "with --append; a skipped pair leaves its index unused. Readers (nullmap report, h5py) may read\n"
    "TRACE.h5 while the batch writes it: each sees one committed state. The writer keeps\n"
    "TRACE.h5.shadow and TRACE.h5.lock beside it while it runs.\n";

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

// The batch key hashes with FNV-1a (nm_fnv1a64): it identifies the model files and the pair
// list (a resumed batch must use the same ones; this guards against mistakes, not tampering).
static nm_status hash_file(uint64_t *h, const char *path, nm_error *err) {
    FILE *f = fopen(path, "rb");
    if (!f) return nm_fail(err, NM_ERR_IO, "%s: %s", path, strerror(errno));
    unsigned char buf[1 << 16];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) *h = nm_fnv1a64(*h, buf, n);
    int bad = ferror(f);
    fclose(f);
    return bad ? nm_fail(err, NM_ERR_IO, "%s: read error", path) : NM_OK;
}

// The batch key: the model's config.json and model.safetensors, the pairs (image paths as
// resolved and prompts as decoded: comments, blank lines and a list read from a pipe do not
// matter), max_new_tokens.
static nm_status batch_key(char *key, size_t size, const char *model_dir, const pair *pairs, int n_pairs, int max_new,
                           nm_error *err) {
    uint64_t h = 14695981039346656037ULL;
    static const char *files[] = {"config.json", "model.safetensors"};
    nm_status s = NM_OK;
    for (size_t i = 0; s == NM_OK && i < sizeof files / sizeof files[0]; i++) {
        char *p = nm_path_join(model_dir, files[i]);
        s = p ? hash_file(&h, p, err) : NM_NOMEM(err, "a path");
        free(p);
    }
    if (s != NM_OK) return s;
    for (int i = 0; i < n_pairs; i++) {
        const char *image = pairs[i].image ? pairs[i].image : "";
        h = nm_fnv1a64(h, image, strlen(image) + 1);
        h = nm_fnv1a64(h, pairs[i].prompt, strlen(pairs[i].prompt) + 1);
    }
    h = nm_fnv1a64(h, &max_new, sizeof max_new);
    snprintf(key, size, "fnv1a64:%016llx", (unsigned long long)h);
    return NM_OK;
}

// Where this batch's samples go: recorded in a new or appended-to trace; on --resume read from
// the trace and checked against this batch.
static nm_status batch_start(nm_trace_file *tf, const char *out, int resume, const nm_trace_batch *mine,
                             int *first, nm_error *err) {
    if (resume) {
        nm_trace_batch b;
        nm_status s = nm_trace_file_get_batch(tf, &b, err);
        if (s != NM_OK) return s;
        if (!b.key[0])
            return nm_fail(err, NM_ERR_INVALID, "%s: records no batch to resume (written by nullmap run or an older "
                           "nullmap); add samples with --append", out);
        if (strcmp(b.key, mine->key) != 0 || b.n_pairs != mine->n_pairs)
            return nm_fail(err, NM_ERR_INVALID,
                           "%s: its last batch used another model, pair list or --max-new-tokens (batch_key %s, %d "
                           "pairs; this batch: %s, %d pairs); --resume needs the same ones (if this batch committed no "
                           "sample yet, start it again with --append or --force)",
                           out, b.key, b.n_pairs, mine->key, mine->n_pairs);
        *first = b.first_sample;
        return NM_OK;
    }
    nm_trace_batch b = *mine;
    b.first_sample = nm_trace_file_next_index(tf);
    *first = b.first_sample;
    return nm_trace_file_set_batch(tf, &b, err);
}

int cmd_batch(int argc, char **argv) {
    const char *model_dir = NULL, *pairs_path = NULL, *out = NULL;
    int max_new = 16, append = 0, force = 0, skip_bad = 0, resume = 0, verbose = 0;
    static const struct option opts[] = {{"model", 1, 0, 'm'},          {"pairs", 1, 0, 'p'},   {"out", 1, 0, 'o'},
                                         {"max-new-tokens", 1, 0, 'n'}, {"append", 0, 0, 'a'},  {"force", 0, 0, 'f'},
                                         {"skip-bad", 0, 0, 's'},       {"resume", 0, 0, 'r'},  {"verbose", 0, 0, 'v'},
                                         {"help", 0, 0, 'h'},           {"device", 1, 0, 'D'},  {"precision", 1, 0, 'D'},
                                         {0, 0, 0, 0}};
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
        case 'r': resume = 1; break;
        case 'v': verbose = 1; break;
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
    if (append + force + resume > 1) return cli_usage_error("batch", "--append, --force and --resume exclude each other");
    nm_engine_options engine_opts;
    int drc = cli_device_resolve("batch", &dev, &engine_opts);
    if (drc != EXIT_OK) return drc;

    nm_error err = {0};
    nm_model model = {0};
    nm_engine *engine = NULL;
    nm_trace_file *tf = NULL;
    nm_metrics met = {0};
    pair *pairs = NULL;
    int n_pairs = 0, rc = EXIT_OK, n_ok = 0, n_bad = 0, n_had = 0, first = 0;
    nm_trace_batch mine = {.first_sample = 0};
    nm_status s;
    if ((s = read_pairs(pairs_path, &pairs, &n_pairs, &err)) != NM_OK) goto fail;
    mine.n_pairs = n_pairs;
    if ((s = nm_model_load(&model, model_dir, &err)) != NM_OK) goto fail;
    if ((s = batch_key(mine.key, sizeof mine.key, model_dir, pairs, n_pairs, max_new, &err)) != NM_OK) goto fail;
    int resuming = resume && nm_path_exists(out); // nothing to resume: a new trace
    if ((s = nm_trace_file_open_durable(&tf, out, &model.cfg, model_dir, append || resuming, force, &err)) != NM_OK)
        goto fail;
    if ((s = batch_start(tf, out, resuming, &mine, &first, &err)) != NM_OK) goto fail;
    if ((s = nm_metrics_init(&met, model.cfg.num_layers, model.cfg.moe.top_k, &err)) != NM_OK) goto fail;
    cli_progress prog;
    cli_progress_start(&prog, n_pairs, "samples");
    for (int i = 0; i < n_pairs; i++) {
        const int index = first + i;
        if (resuming && nm_trace_file_has_sample(tf, index)) { // committed by the interrupted run
            n_had++;
            cli_progress_step(&prog, i + 1);
            continue;
        }
        nm_trace_sample sample;
        nm_request req = {.prompt = pairs[i].prompt, .image_path = pairs[i].image, .max_new_tokens = max_new,
                          .engine = engine_opts};
        s = nm_generate(&model, &engine, &req, &sample, &err);
        if (s == NM_OK) s = nm_trace_file_write_sample_at(tf, &sample, index, &err);
        if (s == NM_OK) s = nm_metrics_add_sample(&met, &sample, &err);
        nm_trace_sample_free(&sample);
        if (s != NM_OK) {
            nm_error_prefix(&err, "%s:%d", pairs_path, pairs[i].line);
            if (!skip_bad || s == NM_ERR_NOMEM || s == NM_ERR_INTERNAL || nm_trace_file_broken(tf)) {
                cli_progress_end(&prog);
                goto fail;
            }
            cli_progress_end(&prog);
            fprintf(stderr, "nullmap batch: skipped: %s\n", err.msg);
            n_bad++;
        } else {
            n_ok++;
            if (verbose) {
                printf("committed sample %06d (%s:%d)\n", index, pairs_path, pairs[i].line);
                fflush(stdout);
            }
        }
        cli_progress_step(&prog, i + 1);
    }
    cli_progress_end(&prog);
    if (n_ok + n_had == 0) {
        s = nm_fail(&err, NM_ERR_INVALID, "%s: no pair could be run", pairs_path);
        goto fail;
    }
    int total = nm_trace_file_num_samples(tf), copies = nm_trace_file_shadow_copies(tf);
    if ((s = nm_trace_file_commit(tf, &err)) != NM_OK) {
        tf = NULL;
        goto fail;
    }
    tf = NULL;
    nm_metrics_finish(&met);
    printf("wrote %d sample%s to %s (%d in the file", n_ok, n_ok == 1 ? "" : "s", out, total);
    if (n_had) printf("; %d committed by the interrupted run", n_had);
    printf(")%s\n", n_bad ? " — some pairs were skipped, see above" : "");
    if (verbose)
        printf("shadow copies: %d (the first commit, resuming, and commits while a reader held the previous "
               "file)\n", copies);
    if (n_ok) cli_print_summary(&met, stdout);
    goto done;
fail:
    rc = cli_report("batch", &err);
    if (tf && n_ok > 0)
        fprintf(stderr, "nullmap batch: kept in %s: %d sample%s committed before the error; fix the cause and "
                "continue the batch with --resume\n", out, n_ok, n_ok == 1 ? "" : "s");
    nm_trace_file_abort(tf);
done:
    nm_metrics_free(&met);
    nm_engine_free(engine);
    nm_model_free(&model);
    free_pairs(pairs, n_pairs);
    return rc;
}
