// cmd_eval.c — `nullmap eval`: accuracy, losses and background/object compute of a model on a
// data set split (lib/nm_eval.h does the work; this file parses, prints and writes).
#include <getopt.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "nm_data.h"
#include "nm_eval.h"
#include "nm_fileutil.h"
#include "nm_model.h"

static const char *HELP =
    "usage: nullmap eval --model DIR --data DATADIR [--split eval|train] [--limit N [--seed S]]\n"
    "                    [--json FILE [--force]] [--max-new-tokens N] [--threads N]\n"
    "\n"
    "Evaluates a model on a data set written by `nullmap data` (with a progress bar on stderr).\n"
    "For every record: the teacher-forced cross-entropy (natural log) of the answer and of the\n"
    "prompt bytes, one forward pass over BOS, [image], prompt, \" \" answer, EOS (the sample the\n"
    "trainer builds); the greedy answer generated from the prompt as `nullmap run` does, correct\n"
    "when the bytes before EOS, leading spaces removed, equal the record's answer; and from the\n"
    "prefill's routing the compute (mean n_real/K over MoE layers) of image patches that lie on\n"
    "the background (overlap no object bbox) or on an object (at least half inside the bboxes),\n"
    "and of vision vs prompt-text tokens.\n"
    "Prints per task (colour, word, count, bar, text) the records, accuracy, the chance level —\n"
    "the majority baseline: the accuracy of always answering the task's most frequent answer in\n"
    "the TRAIN split — and the mean answer loss; then the background vs object compute overall,\n"
    "per layer and per background kind (flat / texture), and vision vs text intensity.\n"
    "\n"
    "  --model DIR            model directory                                      (required)\n"
    "  --data DIR             data set directory (train.jsonl, eval.jsonl,         (required)\n"
    "                         info.json, images)\n"
    "  --split NAME           eval or train                                         (default eval)\n"
    "  --limit N              evaluate only N records: the first N, or with --seed a random N\n"
    "  --seed S               with --limit: draw the N records at random with this seed (kept\n"
    "                         in file order; the same seed gives the same records)\n"
    "  --json FILE            also write every number (and each record's answer) as JSON\n"
    "  --force                replace an existing --json FILE\n"
    "  --max-new-tokens N     answer budget of the greedy generation, >= 1          (default 16)\n"
    "  --threads N            worker threads               (default: OMP_NUM_THREADS, else all cores)\n"
    "\n"
    "The JSON file is written beside FILE and renamed over it when complete; a failed run writes\n"
    "nothing. Losses are token means over all records; compute scores are pooled over the patches\n"
    "(tokens) of all records; '-' marks a value that does not exist (no such patches, a task\n"
    "missing from the train split).\n";

typedef struct {
    cli_progress bar;
    int started;
} progress_state;

// The bar starts once the data set is loaded, so a refused run prints only its error.
static void progress_cb(void *ctx, int done, int total) {
    progress_state *p = ctx;
    if (!p->started) {
        cli_progress_start(&p->bar, total, "records");
        p->started = 1;
    }
    cli_progress_step(&p->bar, done);
}

static void fmt(char *buf, size_t cap, const char *f, double v) {
    if (isnan(v)) snprintf(buf, cap, "-");
    else snprintf(buf, cap, f, v);
}

static void print_task(const nm_eval_task *t, FILE *out) {
    char acc[32], ch[32], al[32], pl[32];
    fmt(acc, sizeof acc, "%.3f", t->accuracy);
    fmt(ch, sizeof ch, "%.3f", t->chance);
    fmt(al, sizeof al, "%.3f", t->answer_loss);
    fmt(pl, sizeof pl, "%.3f", t->prompt_loss);
    fprintf(out, "  %-9s %7d %9s %8s %12s %12s", t->name, t->n, acc, ch, al, pl);
    if (t->majority) {
        fprintf(out, "   \"");
        cli_print_text(out, t->majority);
        fputc('"', out);
    }
    fputc('\n', out);
}

// "background patches 0.412 vs object patches 0.781  (n = 640 / 180)"
static void print_bg_obj(const char *label, double bg, double obj, long long nb, long long no, FILE *out) {
    char b[32], o[32];
    fmt(b, sizeof b, "%.3f", bg);
    fmt(o, sizeof o, "%.3f", obj);
    fprintf(out, "  %-17s background patches %s vs object patches %s  (n = %lld / %lld)\n", label, b, o, nb, no);
}

static void print_result(const nm_eval_result *r, const nm_config *cfg, const char *model_dir, const char *data_dir,
                         FILE *out) {
    fprintf(out, "model      %s  (L=%d, D=%d, N=%d, M=%d, K=%d, rho=%.2f)\n", model_dir, cfg->num_layers, cfg->hidden_size,
            cfg->moe.num_experts, cfg->moe.null_copies, cfg->moe.top_k, nm_config_rho(cfg));
    fprintf(out, "data       %s  %s split: %d of %d records%s\n", data_dir, r->split, r->n, r->n_split,
            r->sample ? " (a random subset)" : r->n < r->n_split ? " (the first ones)" : "");
    if (r->n_image_records) {
        fprintf(out, "images     %d records with an image (", r->n_image_records);
        if (r->data_image_size) fprintf(out, "%dx%d in the data, ", r->data_image_size, r->data_image_size);
        fprintf(out, "the model sees %dx%d in %dx%d patches)\n", r->model_image_size, r->model_image_size,
                r->model_image_size / r->patch_size, r->model_image_size / r->patch_size);
    }
    fprintf(out, "answers    greedy, at most %d new tokens; correct = the text before EOS, leading spaces removed,\n"
                 "           equals the record's answer\n\n",
            r->max_new_tokens);

    fprintf(out, "  %-9s %7s %9s %8s %12s %12s   %s\n", "task", "n", "accuracy", "chance", "answer loss", "prompt loss",
            "majority answer (train)");
    for (int k = 0; k < r->n_tasks; k++) print_task(&r->tasks[k], out);
    print_task(&r->all, out);
    fprintf(out, "chance = majority baseline: the accuracy of always giving the task's most frequent answer\n"
                 "         in the TRAIN split. Losses: cross-entropy (nats) per token, teacher-forced.\n\n");

    const int L = r->n_layers;
    const nm_eval_compute *bg = r->background, *ob = r->object;
    fprintf(out, "compute on image patches (mean n_real/K over MoE layers, prefill routing; %d image%s with ground\n"
                 "truth, %lld patch%s partly on an object counted in neither class)\n",
            r->n_truth_records, r->n_truth_records == 1 ? "" : "s", r->n_neither, r->n_neither == 1 ? "" : "es");
    if (r->n_truth_records == 0) fprintf(out, "  (no image records with objects: nothing to compare)\n");
    else {
        print_bg_obj("all layers", bg[NM_EVAL_BG_ALL].score, ob[NM_EVAL_BG_ALL].score, bg[NM_EVAL_BG_ALL].n,
                     ob[NM_EVAL_BG_ALL].n, out);
        for (int l = 0; l < L; l++) {
            char label[32];
            snprintf(label, sizeof label, "layer %d", l);
            print_bg_obj(label, bg[NM_EVAL_BG_ALL].layer_score[l], ob[NM_EVAL_BG_ALL].layer_score[l],
                         bg[NM_EVAL_BG_ALL].n, ob[NM_EVAL_BG_ALL].n, out);
        }
        print_bg_obj("flat background", bg[NM_EVAL_BG_FLAT].score, ob[NM_EVAL_BG_FLAT].score, bg[NM_EVAL_BG_FLAT].n,
                     ob[NM_EVAL_BG_FLAT].n, out);
        print_bg_obj("texture backgr.", bg[NM_EVAL_BG_TEXTURE].score, ob[NM_EVAL_BG_TEXTURE].score,
                     bg[NM_EVAL_BG_TEXTURE].n, ob[NM_EVAL_BG_TEXTURE].n, out);
    }
    fprintf(out, "\ncompute intensity by modality (mean n_real/K, prefill; text = prompt bytes)\n");
    for (int l = -1; l < L; l++) {
        char label[32], v[32], t[32];
        if (l < 0) snprintf(label, sizeof label, "all layers");
        else snprintf(label, sizeof label, "layer %d", l);
        fmt(v, sizeof v, "%.3f", l < 0 ? r->vision.score : r->vision.layer_score[l]);
        fmt(t, sizeof t, "%.3f", l < 0 ? r->text.score : r->text.layer_score[l]);
        fprintf(out, "  %-17s vision %s vs text %s  (n = %lld / %lld tokens)\n", label, v, t, r->vision.n, r->text.n);
    }
}

int cmd_eval(int argc, char **argv) {
    const char *model_dir = NULL, *data_dir = NULL, *json_path = NULL;
    int force = 0, threads = 0, seed_given = 0;
    nm_eval_opts o;
    nm_eval_opts_default(&o);
    static const struct option opts[] = {
        {"model", 1, 0, 'm'}, {"data", 1, 0, 'd'},    {"split", 1, 0, 'S'},          {"limit", 1, 0, 'l'},
        {"seed", 1, 0, 's'},  {"json", 1, 0, 'j'},    {"max-new-tokens", 1, 0, 'n'}, {"threads", 1, 0, 't'},
        {"force", 0, 0, 'f'}, {"help", 0, 0, 'h'},    {0, 0, 0, 0}};
    optind = 1;
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 'm': model_dir = optarg; break;
        case 'd': data_dir = optarg; break;
        case 'S':
            if (strcmp(optarg, "eval") && strcmp(optarg, "train"))
                return cli_usage_error("eval", "--split must be eval or train, got '%s'", optarg);
            o.split = optarg;
            break;
        case 'l':
            if (cli_parse_int(optarg, 1, NM_DATA_MAX_SAMPLES, &o.limit))
                return cli_usage_error("eval", "--limit needs an integer 1..%d, got '%s'", NM_DATA_MAX_SAMPLES, optarg);
            break;
        case 's': {
            char *end;
            o.seed = strtoull(optarg, &end, 10);
            if (!*optarg || *end || optarg[0] == '-')
                return cli_usage_error("eval", "--seed needs a non-negative integer, got '%s'", optarg);
            seed_given = 1;
            break;
        }
        case 'j': json_path = optarg; break;
        case 'n':
            if (cli_parse_int(optarg, 1, 1 << 20, &o.max_new_tokens))
                return cli_usage_error("eval", "--max-new-tokens needs an integer >= 1, got '%s'", optarg);
            break;
        case 't':
            if (cli_parse_int(optarg, 1, 1024, &threads))
                return cli_usage_error("eval", "--threads needs an integer 1..1024, got '%s'", optarg);
            break;
        case 'f': force = 1; break;
        case 'h': fputs(HELP, stdout); return EXIT_OK;
        default: return cli_usage_error("eval", "unknown or incomplete option '%s'", argv[optind - 1]);
        }
    }
    if (optind < argc) return cli_usage_error("eval", "unexpected argument '%s'", argv[optind]);
    if (!model_dir || !data_dir) return cli_usage_error("eval", "--model and --data are required");
    if (seed_given && !o.limit)
        return cli_usage_error("eval", "--seed draws the records of --limit at random; give --limit N as well");
    if (force && !json_path) return cli_usage_error("eval", "--force replaces the --json file; give --json FILE");
    o.sample = seed_given;
    o.model_name = model_dir;
    if (threads) omp_set_num_threads(threads);

    if (!nm_is_dir(data_dir)) {
        fprintf(stderr, "nullmap eval: error: %s: %s\n", data_dir,
                nm_path_exists(data_dir) ? "not a directory" : "no such data set directory");
        return EXIT_IO;
    }
    nm_error err = {0};
    if (json_path) { // refuse a bad --json before the long run
        if (!force && nm_path_exists(json_path)) {
            fprintf(stderr, "nullmap eval: error: %s already exists (use --force to replace it)\n", json_path);
            return EXIT_IO;
        }
        if (nm_is_dir(json_path)) {
            fprintf(stderr, "nullmap eval: error: %s is a directory\n", json_path);
            return EXIT_IO;
        }
        nm_atomic_file probe;
        if (nm_atomic_open(&probe, json_path, &err) != NM_OK) return cli_report("eval", &err);
        nm_atomic_abort(&probe);
    }
    nm_model model = {0};
    nm_eval_result res = {0};
    progress_state p = {0};
    int rc = EXIT_OK;
    if (nm_model_load(&model, model_dir, &err) != NM_OK) goto fail;
    o.progress = progress_cb;
    o.progress_ctx = &p;
    nm_status st = nm_eval_run(&res, &model, data_dir, &o, &err);
    if (p.started) cli_progress_end(&p.bar);
    if (st != NM_OK) goto fail;
    if (json_path && nm_eval_write_json(&res, json_path, &err) != NM_OK) goto fail;
    print_result(&res, &model.cfg, model_dir, data_dir, stdout);
    if (json_path) printf("\njson       %s\n", json_path);
    goto done;
fail:
    rc = cli_report("eval", &err);
done:
    nm_eval_result_free(&res);
    nm_model_free(&model);
    return rc;
}
