// cmd_info.c — `nullmap info`: describe a model directory or a trace file.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "nm_fileutil.h"
#include "nm_metrics.h"
#include "nm_model.h"
#include "nm_trace.h"

static const char *HELP =
    "usage: nullmap info PATH [--samples]\n"
    "\n"
    "PATH a model directory: prints its config, parameter count and storage dtype (every tensor is\n"
    "validated against the config).\n"
    "PATH a trace file (.h5): prints the model shape it was traced with, its samples and the\n"
    "compute summary over all samples.\n"
    "\n"
    "  --samples   list every sample of a trace (default: the first 20)\n";

static void print_config(const nm_config *c) {
    printf("  layers %d, hidden %d, heads %d (kv %d) x %d, vocab %d, max_positions %d\n", c->num_layers,
           c->hidden_size, c->num_heads, c->num_kv_heads, c->head_dim, c->vocab_size, c->max_positions);
    printf("  moe: N=%d real experts (hidden %d), M=%d null copies, top-K=%d, rho=N/(N+M)=%.3f, "
           "expected real experts/token K*rho=%.2f, shared expert hidden %d, null kind %s\n",
           c->moe.num_experts, c->moe.expert_hidden, c->moe.null_copies, c->moe.top_k, nm_config_rho(c),
           c->moe.top_k * nm_config_rho(c), c->moe.shared_expert_hidden,
           c->moe.null_kind == NM_NULL_COPY ? "copy" : "zero");
    if (c->has_vision || c->image_size > 0)
        printf("  vision: %dx%d images, %dx%d patches (%d patch tokens)\n", c->image_size, c->image_size,
               c->patch_size, c->patch_size, nm_config_num_patches(c));
    else printf("  text-only model\n");
}

static int info_model(const char *dir) {
    nm_error err = {0};
    nm_model m = {0};
    if (nm_model_load(&m, dir, &err) != NM_OK) return cli_report("info", &err);
    printf("model %s\n", dir);
    print_config(&m.cfg);
    printf("  tokenizer: bytes 0-255, bos %d, eos %d, image_start %d, image_end %d, pad %d\n", m.cfg.tok.bos,
           m.cfg.tok.eos, m.cfg.tok.image_start, m.cfg.tok.image_end, m.cfg.tok.pad);
    printf("  %zu parameters, stored as %s%s; all tensors present with the shapes the config needs\n", m.n_params,
           nm_dtype_name(m.file_dtype), m.cfg.tie_embeddings ? " (lm_head tied to embed_tokens)" : "");
    nm_model_free(&m);
    return EXIT_OK;
}

static int info_trace(const char *path, int all) {
    nm_error err = {0};
    nm_trace_info ti;
    nm_metrics met = {0};
    int rc = EXIT_OK;
    nm_trace_reader *rd = NULL; // one open file: one committed state, also while a batch writes
    if (nm_trace_reader_open(&rd, path, &ti, &err) != NM_OK) return cli_report("info", &err);
    printf("trace %s  (format version %d, written by %s)\n", path, ti.format_version, ti.created_by);
    printf("  model %s\n", ti.model_name[0] ? ti.model_name : "(not recorded)");
    print_config(&ti.cfg);
    printf("  %d sample%s\n", ti.num_samples, ti.num_samples == 1 ? "" : "s");
    if (nm_metrics_init(&met, ti.cfg.num_layers, ti.cfg.moe.top_k, &err) != NM_OK) {
        nm_trace_reader_close(rd);
        return cli_report("info", &err);
    }
    for (int i = 0; i < ti.num_samples; i++) {
        nm_trace_sample s;
        if (nm_trace_reader_read_sample(rd, &s, i, &err) != NM_OK) {
            rc = cli_report("info", &err);
            break;
        }
        if (all || i < 20) {
            printf("  [%d] %d tokens (%d prompt)  image %s  prompt \"", i, s.n_tokens, s.n_prompt_tokens,
                   s.image_path && s.image_path[0] ? s.image_path : "-");
            cli_print_text(stdout, s.prompt ? s.prompt : "");
            printf("\"  answer \"");
            cli_print_text(stdout, s.answer ? s.answer : "");
            printf("\"\n");
        }
        else if (i == 20) printf("  … (--samples lists all)\n");
        nm_status st = nm_metrics_add_sample(&met, &s, &err);
        nm_trace_sample_free(&s);
        if (st != NM_OK) {
            rc = cli_report("info", &err);
            break;
        }
    }
    if (rc == EXIT_OK && ti.num_samples > 0) {
        nm_metrics_finish(&met);
        printf("summary over all samples (every token counts once)\n");
        cli_print_summary(&met, stdout);
    }
    nm_metrics_free(&met);
    nm_trace_reader_close(rd);
    return rc;
}

int cmd_info(int argc, char **argv) {
    const char *path = NULL;
    int all = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            fputs(HELP, stdout);
            return EXIT_OK;
        } else if (!strcmp(argv[i], "--samples")) all = 1;
        else if (argv[i][0] == '-' && argv[i][1]) return cli_usage_error("info", "unknown option '%s'", argv[i]);
        else if (path) return cli_usage_error("info", "one PATH only");
        else path = argv[i];
    }
    if (!path) return cli_usage_error("info", "PATH (a model directory or a trace file) is required");
    if (nm_is_dir(path)) return info_model(path);
    if (!nm_path_exists(path)) {
        fprintf(stderr, "nullmap info: error: %s: no such file or directory\n", path);
        return EXIT_IO;
    }
    return info_trace(path, all);
}
