// nm_train.h — training a null-expert MoE model on a nullmap data set (`nullmap train`).
//
// The config file is a model config (DESIGN.md §3) with one more object, "train":
//   "train": { "steps": 2000, "batch_size": 32, "lr": 2e-3, "warmup_steps": 100,
//              "weight_decay": 0.1, "grad_clip": 1.0, "balance_weight": 2e-2, "z_weight": 1e-3,
//              "prompt_loss_weight": 0.1, "data_seed": 1, "init_seed": 1,
//              "checkpoint_every": 250, "decay_frac": 0.1, "final_lr_frac": 0.1 }
// Every key is optional (defaults above); an unknown key is an error (a typo would otherwise
// train something else silently).
//
// A run directory OUT holds:
//   OUT/log.csv                one row per step (columns: NM_TRAIN_LOG_COLUMNS)
//   OUT/ckpt-NNNNNNN/          a checkpoint after step N: config.json + model.safetensors
//                              (the model format), optimizer.safetensors (AdamW moments,
//                              "exp_avg.<tensor>", "exp_avg_sq.<tensor>"), state.json (step,
//                              train settings, data set). Written as ckpt-NNNNNNN.tmp-<pid> and
//                              renamed when complete: a directory without ".tmp" is whole. The
//                              last two are kept.
//   OUT/final/                 the trained model (config.json + model.safetensors) and
//                              train_summary.json, written at the end.
// --resume continues from the newest whole checkpoint and reaches bit-identical weights: the
// data order is a function of (data_seed, step) only, and every kernel is deterministic.
// A step whose loss or gradient norm is not finite stops the run (NM_ERR_DIVERGED) before any
// weight changes; the checkpoints on disk are untouched.
#ifndef NM_TRAIN_H
#define NM_TRAIN_H

#include <stdint.h>

#include "nm_config.h"
#include "nm_error.h"
#include "nm_safetensors.h"
#include "nm_train_model.h"

typedef struct {
    long steps;
    int batch_size;
    double lr, weight_decay, grad_clip, decay_frac, final_lr_frac;
    long warmup_steps;
    double balance_weight, z_weight, prompt_loss_weight;
    uint64_t data_seed, init_seed;
    long checkpoint_every;
} nm_train_config;

void nm_train_config_defaults(nm_train_config *tc);
// Reads the model config and its "train" object from one file.
nm_status nm_train_config_load(nm_config *mc, nm_train_config *tc, const char *path, nm_error *err);

typedef struct {
    long step;                // steps done (1-based after the first)
    long total;
    nm_train_stats st;
    double lr, grad_norm, tokens_per_s, elapsed_s;
    double null_ratio, zero_ratio, vision_int, text_int; // derived from st
} nm_train_progress;

typedef struct {
    const char *config_path, *data_dir, *out_dir;
    int resume;               // continue from the newest checkpoint in out_dir
    long stop_after;          // > 0: checkpoint and stop after this step (as a kill would)
    long steps_override;      // > 0: replaces train.steps
    nm_dtype final_dtype;     // storage dtype of OUT/final (checkpoints are always F32); 0 = F32
    void (*progress)(void *ctx, const nm_train_progress *p);
    void *ctx;
} nm_train_options;

#define NM_TRAIN_LOG_COLUMNS                                                                                    \
    "step,lr,loss,ce,ce_answer,ce_prompt,l_bal,l_z,null_slot_ratio,zero_compute_ratio,vision_intensity,"         \
    "text_intensity,grad_norm,tokens,tokens_per_s,elapsed_s"

nm_status nm_train_run(const nm_train_options *o, nm_error *err);

#endif
