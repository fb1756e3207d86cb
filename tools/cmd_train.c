// cmd_train.c — `nullmap train`: train a null-expert MoE model on a data set (lib/nm_train.h).
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"
#include "nm_train.h"

static const char *HELP =
    "usage: nullmap train --config CFG.json --data DIR --out RUN [--resume] [--steps N] [--stop-after N]\n"
    "\n"
    "Trains the model described by CFG.json (a model config with a \"train\" object: steps,\n"
    "batch_size, lr, warmup_steps, weight_decay, grad_clip, balance_weight, z_weight,\n"
    "prompt_loss_weight, data_seed, init_seed, checkpoint_every, decay_frac, final_lr_frac; see\n"
    "README.md) on the train split of a `nullmap data` set. AdamW (0.9, 0.95), WSD schedule\n"
    "(warmup, stable, linear decay to final_lr_frac over the last decay_frac of the steps),\n"
    "loss = CE on answer bytes (+ prompt_loss_weight x CE on prompt bytes) + balance_weight x L_bal\n"
    "+ z_weight x L_z (DESIGN.md section 2, averaged over layers).\n"
    "\n"
    "RUN gets log.csv (one row per step), ckpt-NNNNNNN/ checkpoints (the last two) and final/ (the\n"
    "trained model, usable with `nullmap run --model RUN/final`). Deterministic: the same config\n"
    "and data give the same weights, and --resume after a kill continues bit-identically.\n"
    "\n"
    "  --config CFG.json  model + training config                              (required)\n"
    "  --data DIR         data set written by `nullmap data`                   (required)\n"
    "  --out RUN          run directory (created)                              (required)\n"
    "  --resume           continue from the newest checkpoint in RUN\n"
    "  --steps N          train for N steps instead of train.steps (changes the schedule)\n"
    "  --stop-after N     checkpoint and stop after step N (as if killed there; for tests)\n"
    "  --final-dtype T    storage of RUN/final: f32, bf16 or f16 (checkpoints stay f32)  (default f32)\n"
    "  --quiet            no progress line\n"
    "\n"
    "exit codes: 0 done, 1 bad config/data, 2 usage, 3 i/o, 4 internal, 5 diverged (non-finite\n"
    "loss or gradient: stopped before the bad update; the last checkpoint is intact)\n";

typedef struct {
    int tty, quiet;
    long last_line, first_step; // first_step: the step this process started after (resume)
} progress_state;

static void progress_cb(void *ctx, const nm_train_progress *p) {
    progress_state *ps = ctx;
    if (ps->quiet) return;
    char line[256];
    if (ps->first_step < 0) ps->first_step = p->step - 1;
    const long done_here = p->step - ps->first_step;
    double eta = done_here > 0 ? p->elapsed_s / done_here * (p->total - p->step) : 0;
    snprintf(line, sizeof line,
             "step %ld/%ld  loss %.4f  ce %.3f  answer %.3f  null %.2f  vis %.2f txt %.2f  %.0f tok/s  eta %.0fs",
             p->step, p->total, p->st.loss, p->st.ce, p->st.ce_answer, p->null_ratio, p->vision_int, p->text_int,
             p->tokens_per_s, eta);
    if (ps->tty) fprintf(stderr, "\r%-120s", line);
    else if (p->step == 1 || p->step - ps->last_line >= 50 || p->step == p->total) { // a line now and then in a log
        fprintf(stderr, "%s\n", line);
        ps->last_line = p->step;
    }
}

int cmd_train(int argc, char **argv) {
    nm_train_options o = {0};
    progress_state ps = {isatty(2), 0, 0, -1};
    static const struct option opts[] = {{"config", 1, 0, 'c'}, {"data", 1, 0, 'd'},       {"out", 1, 0, 'o'},
                                         {"resume", 0, 0, 'r'}, {"steps", 1, 0, 's'},      {"stop-after", 1, 0, 'a'},
                                         {"quiet", 0, 0, 'q'},  {"help", 0, 0, 'h'}, {"final-dtype", 1, 0, 't'},       {0, 0, 0, 0}};
    optind = 1;
    opterr = 0;
    int c, n;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 'c': o.config_path = optarg; break;
        case 'd': o.data_dir = optarg; break;
        case 'o': o.out_dir = optarg; break;
        case 'r': o.resume = 1; break;
        case 'q': ps.quiet = 1; break;
        case 's':
            if (cli_parse_int(optarg, 1, 1000000000, &n))
                return cli_usage_error("train", "--steps needs an integer 1..1000000000, got '%s'", optarg);
            o.steps_override = n;
            break;
        case 'a':
            if (cli_parse_int(optarg, 1, 1000000000, &n))
                return cli_usage_error("train", "--stop-after needs an integer 1..1000000000, got '%s'", optarg);
            o.stop_after = n;
            break;
        case 't':
            if (cli_parse_storage_dtype(optarg, &o.final_dtype))
                return cli_usage_error("train", "--final-dtype must be f32, bf16 or f16, got '%s'", optarg);
            break;
        case 'h': fputs(HELP, stdout); return EXIT_OK;
        default: return cli_usage_error("train", "unknown or incomplete option '%s'", argv[optind - 1]);
        }
    }
    if (optind < argc) return cli_usage_error("train", "unexpected argument '%s'", argv[optind]);
    if (!o.config_path || !o.data_dir || !o.out_dir)
        return cli_usage_error("train", "--config, --data and --out are required (see nullmap train --help)");
    o.progress = progress_cb;
    o.ctx = &ps;
    nm_error err = {0};
    nm_status s = nm_train_run(&o, &err);
    if (ps.tty && !ps.quiet) fputc('\n', stderr);
    if (s != NM_OK) return cli_report("train", &err);
    if (o.stop_after > 0) printf("stopped after step %ld as asked; continue with --resume\n", o.stop_after);
    else printf("trained: %s/final (log: %s/log.csv)\n", o.out_dir, o.out_dir);
    return EXIT_OK;
}
