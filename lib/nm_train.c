// nm_train.c — the training loop (nm_train.h): data order, batches, AdamW with the WSD
// schedule, the per-step log, checkpoints and resume.
#include "nm_train.h"

#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "nm_data.h"
#include "nm_fileutil.h"
#include "nm_limits.h"
#include "nm_model.h"
#include "nm_optim.h"
#include "nm_rng.h"
#include "nm_sample.h"
#include "nm_tensor_file.h"
#include "nm_trace.h"
#include "nm_train_ops.h"

#define CKPT_PREFIX "ckpt-"
#define CKPT_KEEP 2

// ---- config ----

void nm_train_config_defaults(nm_train_config *tc) {
    *tc = (nm_train_config){.steps = 2000,
                            .batch_size = 32,
                            .lr = 2e-3,
                            .weight_decay = 0.1,
                            .grad_clip = 1.0,
                            .decay_frac = 0.1,
                            .final_lr_frac = 0.1,
                            .warmup_steps = 100,
                            .balance_weight = 2e-2,
                            .z_weight = 1e-3,
                            .prompt_loss_weight = 0.1,
                            .data_seed = 1,
                            .init_seed = 1,
                            .checkpoint_every = 250};
}

// Every key of the "train" object: where it lives in nm_train_config, its type and range. One
// table drives the parser (unknown keys, types, ranges) and the JSON kept in checkpoints.
typedef enum { TK_LONG, TK_INT, TK_U64, TK_DOUBLE } train_key_type;
static const struct {
    const char *key;
    size_t off;
    train_key_type type;
    double lo, hi;
} TRAIN_KEYS[] = {
    {"steps", offsetof(nm_train_config, steps), TK_LONG, 1, 1e9},
    {"batch_size", offsetof(nm_train_config, batch_size), TK_INT, 1, 65536},
    {"lr", offsetof(nm_train_config, lr), TK_DOUBLE, 0, 1e6},
    {"warmup_steps", offsetof(nm_train_config, warmup_steps), TK_LONG, 0, 1e9},
    {"weight_decay", offsetof(nm_train_config, weight_decay), TK_DOUBLE, 0, 10},
    {"grad_clip", offsetof(nm_train_config, grad_clip), TK_DOUBLE, 0, 1e9},
    {"balance_weight", offsetof(nm_train_config, balance_weight), TK_DOUBLE, 0, 1e3},
    {"z_weight", offsetof(nm_train_config, z_weight), TK_DOUBLE, 0, 1e3},
    {"prompt_loss_weight", offsetof(nm_train_config, prompt_loss_weight), TK_DOUBLE, 0, 1e3},
    {"data_seed", offsetof(nm_train_config, data_seed), TK_U64, 0, 9007199254740992.0},
    {"init_seed", offsetof(nm_train_config, init_seed), TK_U64, 0, 9007199254740992.0},
    {"checkpoint_every", offsetof(nm_train_config, checkpoint_every), TK_LONG, 1, 1e9},
    {"decay_frac", offsetof(nm_train_config, decay_frac), TK_DOUBLE, 0, 1},
    {"final_lr_frac", offsetof(nm_train_config, final_lr_frac), TK_DOUBLE, 0, 1},
};
enum { N_TRAIN_KEYS = sizeof TRAIN_KEYS / sizeof *TRAIN_KEYS };

static void train_key_set(nm_train_config *tc, int k, double x) {
    char *f = (char *)tc + TRAIN_KEYS[k].off;
    switch (TRAIN_KEYS[k].type) {
    case TK_LONG: *(long *)f = (long)x; break;
    case TK_INT: *(int *)f = (int)x; break;
    case TK_U64: *(uint64_t *)f = (uint64_t)x; break;
    case TK_DOUBLE: *(double *)f = x; break;
    }
}

static json_t *train_key_json(const nm_train_config *tc, int k) {
    const char *f = (const char *)tc + TRAIN_KEYS[k].off;
    switch (TRAIN_KEYS[k].type) {
    case TK_LONG: return json_integer((json_int_t) * (const long *)f);
    case TK_INT: return json_integer(*(const int *)f);
    case TK_U64: return json_integer((json_int_t) * (const uint64_t *)f);
    case TK_DOUBLE: break;
    }
    return json_real(*(const double *)f);
}

// Reads train.* of t into tc (absent keys keep their defaults).
static nm_status parse_train_object(nm_train_config *tc, json_t *t, const char *path, nm_error *err) {
    if (!json_is_object(t)) return nm_fail(err, NM_ERR_FORMAT, "%s: \"train\" must be an object", path);
    const char *key;
    json_t *v;
    json_object_foreach(t, key, v) {
        int k = 0;
        while (k < N_TRAIN_KEYS && strcmp(TRAIN_KEYS[k].key, key)) k++;
        if (k == N_TRAIN_KEYS) return nm_fail(err, NM_ERR_FORMAT, "%s: unknown key train.%s", path, key);
    }
    for (int k = 0; k < N_TRAIN_KEYS; k++) {
        if (!(v = json_object_get(t, TRAIN_KEYS[k].key))) continue;
        if (!json_is_number(v))
            return nm_fail(err, NM_ERR_FORMAT, "%s: train.%s must be a number", path, TRAIN_KEYS[k].key);
        double x = json_number_value(v);
        if (!(x >= TRAIN_KEYS[k].lo && x <= TRAIN_KEYS[k].hi))
            return nm_fail(err, NM_ERR_INVALID, "%s: train.%s = %g is outside %g..%g", path, TRAIN_KEYS[k].key, x,
                           TRAIN_KEYS[k].lo, TRAIN_KEYS[k].hi);
        train_key_set(tc, k, x);
    }
    return NM_OK;
}

nm_status nm_train_config_load(nm_config *mc, nm_train_config *tc, const char *path, nm_error *err) {
    nm_train_config_defaults(tc);
    char *text = NULL;
    size_t size = 0;
    nm_status s = nm_read_file(path, (size_t)nm_limit(NM_LIMIT_JSON_FILE_BYTES), &text, &size, err);
    if (s == NM_OK && strlen(text) != size) s = nm_fail(err, NM_ERR_FORMAT, "%s: config contains a NUL byte", path);
    if (s == NM_OK) s = nm_config_parse(mc, text, path, err); // the model part, as nm_config_load reads it
    json_error_t je;
    json_t *root = s == NM_OK ? json_loadb(text, size, 0, &je) : NULL;
    free(text);
    if (s != NM_OK) return s;
    if (!root) return nm_fail(err, NM_ERR_FORMAT, "%s:%d: %s", path, je.line, je.text);
    json_t *t = json_object_get(root, "train");
    if (t) s = parse_train_object(tc, t, path, err);
    json_decref(root);
    return s;
}

static json_t *train_config_json(const nm_train_config *tc) {
    json_t *o = json_object();
    for (int k = 0; o && k < N_TRAIN_KEYS; k++)
        if (json_object_set_new(o, TRAIN_KEYS[k].key, train_key_json(tc, k)) != 0) {
            json_decref(o);
            return NULL;
        }
    return o;
}

// ---- the trainer's state ----

typedef struct {
    const nm_train_options *o;
    nm_config cfg;
    nm_train_config tc;
    nm_optim_config oc;
    nm_dataset data;
    nm_model params, grads, exp_avg, exp_avg_sq; // one layout (nm_param_layout); grads etc. are zeros
    nm_param_layout pl;
    nm_tensor_spec *specs;
    int n_specs;
    uint8_t *decays; // [n_specs]
    nm_train_batch_f32 batch;
    nm_train_acts_f32 acts;
    nm_sample *samples; // [batch_size]
    long step;          // steps done
    // data order: the permutation of the epoch in use
    long perm_epoch;
    int *perm;
    FILE *log;
} trainer;

static void trainer_free(trainer *tr) {
    nm_dataset_free(&tr->data);
    nm_model_free(&tr->params);
    nm_model_free(&tr->grads);
    nm_model_free(&tr->exp_avg);
    nm_model_free(&tr->exp_avg_sq);
    nm_param_layout_free(&tr->pl);
    free(tr->specs);
    free(tr->decays);
    nm_train_batch_free_f32(&tr->batch);
    nm_train_acts_free_f32(&tr->acts);
    if (tr->samples)
        for (int i = 0; i < tr->tc.batch_size; i++) nm_sample_free(&tr->samples[i]);
    free(tr->samples);
    free(tr->perm);
    if (tr->log) fclose(tr->log);
}

// The record at position g of the endless data stream: epoch g / n in the order of a
// permutation drawn from (data_seed, epoch). Depends on nothing else, so a resumed run sees
// exactly the batches an uninterrupted one would.
static int stream_record(trainer *tr, long g) {
    const int n = tr->data.n;
    const long epoch = g / n;
    if (epoch != tr->perm_epoch) {
        nm_rng r;
        nm_rng_seed(&r, tr->tc.data_seed * 0x9E3779B97F4A7C15ull + (uint64_t)epoch * 0xD1B54A32D192ED03ull + 1);
        for (int i = 0; i < n; i++) tr->perm[i] = i;
        for (int i = n - 1; i > 0; i--) {
            int j = (int)(nm_rng_next(&r) % (uint64_t)(i + 1));
            int t = tr->perm[i];
            tr->perm[i] = tr->perm[j];
            tr->perm[j] = t;
        }
        tr->perm_epoch = epoch;
    }
    return tr->perm[g % n];
}

// Builds the batch of step `step` (0-based).
static nm_status build_batch(trainer *tr, long step, nm_error *err) {
    const nm_config *c = &tr->cfg;
    const int B = tr->tc.batch_size, p = c->patch_size;
    int T = 0, n_patch = 0;
    for (int i = 0; i < B; i++) {
        nm_sample_free(&tr->samples[i]);
        const nm_data_record *r = &tr->data.rec[stream_record(tr, step * (long)B + i)];
        nm_status s = nm_sample_build(&tr->samples[i], c, r, err);
        if (s != NM_OK) return s;
        T += tr->samples[i].seq.n;
        if (tr->samples[i].pixels) n_patch += nm_config_num_patches(c);
    }
    nm_train_batch_f32 *b = &tr->batch;
    nm_status s = nm_train_batch_reserve_f32(b, B, T, n_patch, c->has_vision ? p : 1, err);
    if (s != NM_OK) return s;
    b->B = B;
    b->T = T;
    b->n_patch = n_patch;
    double wsum = 0;
    int t = 0, r = 0;
    const int pp = 3 * p * p;
    for (int i = 0; i < B; i++) {
        const nm_sample *sm = &tr->samples[i];
        b->start[i] = t;
        for (int j = 0; j < sm->seq.n; j++, t++) {
            b->id[t] = sm->seq.id[j];
            b->patch[t] = sm->seq.patch[j];
            b->target[t] = sm->target[j];
            b->loss_kind[t] = sm->loss_kind[j];
            b->modality[t] = sm->seq.modality[j];
            double w = sm->loss_kind[j] == NM_LOSS_ANSWER   ? 1.0
                       : sm->loss_kind[j] == NM_LOSS_PROMPT ? tr->tc.prompt_loss_weight
                                                             : 0.0;
            if (w == 0.0) b->target[t] = -1; // no row in the LM head for it
            b->loss_w[t] = (float)w;
            wsum += w;
            if (sm->seq.id[j] < 0) // patch token: its pixels as a row, (channel, row, col)
                nm_patch_gather_f32(b->patch_rows + (size_t)r++ * pp, sm->pixels, &sm->seq.patch[j], 1,
                                    c->image_size, p);
        }
    }
    b->start[B] = T;
    if (wsum <= 0) return nm_fail(err, NM_ERR_INVALID, "step %ld: the batch has no token to learn from", step + 1);
    for (int k = 0; k < T; k++) b->loss_w[k] = (float)(b->loss_w[k] / wsum);
    return NM_OK;
}

// ---- checkpoints ----

static char *ckpt_name(long step) {
    char buf[64];
    snprintf(buf, sizeof buf, CKPT_PREFIX "%07ld", step);
    return strdup(buf);
}

// The largest step < below with a whole checkpoint in dir (-1: none). ".tmp-<pid>"
// directories (unfinished) do not count.
static long checkpoint_below(const char *dir, long below) {
    DIR *d = opendir(dir);
    if (!d) return -1;
    long best = -1;
    struct dirent *e;
    while ((e = readdir(d))) {
        char *end;
        if (strncmp(e->d_name, CKPT_PREFIX, strlen(CKPT_PREFIX))) continue;
        long st = strtol(e->d_name + strlen(CKPT_PREFIX), &end, 10);
        if (!*end && st >= 0 && st < below && st > best) best = st;
    }
    closedir(d);
    return best;
}

// What a killed run leaves in its directory: unfinished checkpoints (ckpt-NNNNNNN.tmp-<pid>) and
// log rewrites (log.csv.tmp-<pid>). A run never reads them; --resume removes them (best effort).
static void remove_stale_temporaries(const char *dir) {
    for (int found = 1; found;) { // one entry per pass: the directory changes under readdir
        found = 0;
        DIR *d = opendir(dir);
        if (!d) return;
        struct dirent *e;
        char *victim = NULL;
        while (!victim && (e = readdir(d)))
            if ((!strncmp(e->d_name, CKPT_PREFIX, strlen(CKPT_PREFIX)) || !strncmp(e->d_name, "log.csv", 7)) &&
                strstr(e->d_name, ".tmp-"))
                victim = nm_path_join(dir, e->d_name);
        closedir(d);
        nm_error ignored;
        if (victim && nm_remove_tree(victim, &ignored) == NM_OK) found = 1;
        free(victim);
    }
}

static nm_status write_state(const char *path, const trainer *tr, double loss, nm_error *err) {
    json_t *j = json_pack("{sssisIsosfss}", "format", "nullmap-train-state", "format_version", 1, "step",
                          (json_int_t)tr->step, "train", train_config_json(&tr->tc), "loss", loss, "data",
                          tr->o->data_dir);
    char *text = j ? json_dumps(j, JSON_INDENT(2) | JSON_SORT_KEYS) : NULL;
    json_decref(j);
    if (!text) return NM_NOMEM(err, "train state");
    nm_status s = nm_write_file_atomic(path, text, strlen(text), err);
    free(text);
    return s;
}

// Optimizer moments as "exp_avg.<tensor>" / "exp_avg_sq.<tensor>".
static nm_status moments_io(trainer *tr, const char *path, int write, nm_error *err) {
    const int n = tr->n_specs;
    char **names = calloc((size_t)2 * n, sizeof *names);
    int *ndims = calloc((size_t)2 * n, sizeof *ndims);
    const int64_t **shapes = calloc((size_t)2 * n, sizeof *shapes);
    int64_t *numel = calloc((size_t)2 * n, sizeof *numel);
    float **data = calloc((size_t)2 * n, sizeof *data);
    nm_status s = NM_OK;
    if (!names || !ndims || !shapes || !numel || !data) s = NM_NOMEM(err, "optimizer state");
    for (int i = 0; s == NM_OK && i < n; i++) {
        const nm_tensor_spec *sp = &tr->specs[i];
        const size_t off = (size_t)(*sp->dest - tr->params.arena);
        for (int k = 0; k < 2; k++) {
            const int j = 2 * i + k;
            size_t len = strlen(sp->name) + 16;
            if (!(names[j] = malloc(len))) {
                s = NM_NOMEM(err, "optimizer state");
                break;
            }
            snprintf(names[j], len, "%s.%s", k ? "exp_avg_sq" : "exp_avg", sp->name);
            ndims[j] = sp->ndim;
            shapes[j] = sp->shape;
            numel[j] = (int64_t)sp->numel;
            data[j] = (k ? tr->exp_avg_sq.arena : tr->exp_avg.arena) + off;
        }
    }
    if (s == NM_OK)
        s = write ? nm_tensor_file_write(path, 2 * n, (const char *const *)names, ndims, shapes,
                                         (const float *const *)data, NULL, err)
                  : nm_tensor_file_read(path, 2 * n, (const char *const *)names, numel, data, err);
    if (names)
        for (int i = 0; i < 2 * n; i++) free(names[i]);
    free(names);
    free(ndims);
    free(shapes);
    free(numel);
    free(data);
    return s;
}

static nm_status save_checkpoint(trainer *tr, double loss, nm_error *err) {
    char *name = ckpt_name(tr->step), *final_dir = name ? nm_path_join(tr->o->out_dir, name) : NULL;
    char *tmp = final_dir ? nm_tmp_path(final_dir) : NULL, *opt = tmp ? nm_path_join(tmp, "optimizer.safetensors") : NULL,
         *state = tmp ? nm_path_join(tmp, "state.json") : NULL;
    nm_status s = NM_OK;
    if (!opt || !state) s = NM_NOMEM(err, "checkpoint path");
    if (s == NM_OK && nm_path_exists(tmp)) s = nm_remove_tree(tmp, err);
    if (s == NM_OK) s = nm_model_save(&tr->params, tmp, NM_DT_F32, err);
    if (s == NM_OK) s = moments_io(tr, opt, 1, err);
    if (s == NM_OK) s = write_state(state, tr, loss, err);
    if (s == NM_OK && nm_path_exists(final_dir)) s = nm_remove_tree(final_dir, err); // an older run's same step
    if (s == NM_OK && rename(tmp, final_dir) != 0)
        s = nm_fail(err, NM_ERR_IO, "cannot rename %s to %s: %s", tmp, final_dir, strerror(errno));
    if (s == NM_OK) nm_fsync_parent(final_dir);
    if (s != NM_OK && tmp && nm_path_exists(tmp)) {
        nm_error ignored;
        nm_remove_tree(tmp, &ignored);
    }
    // keep the newest CKPT_KEEP: walk down from the one just written, remove what lies below
    if (s == NM_OK) {
        long keep = tr->step, old;
        for (int k = 1; k < CKPT_KEEP && keep >= 0; k++) keep = checkpoint_below(tr->o->out_dir, keep);
        while (keep >= 0 && (old = checkpoint_below(tr->o->out_dir, keep)) >= 0) {
            char *nm = ckpt_name(old), *dir = nm ? nm_path_join(tr->o->out_dir, nm) : NULL;
            nm_error ignored;
            if (!dir || nm_remove_tree(dir, &ignored) != NM_OK) keep = -1; // cannot remove: stop trying
            free(nm);
            free(dir);
        }
    }
    free(name);
    free(final_dir);
    free(tmp);
    free(opt);
    free(state);
    return s;
}

static nm_status load_checkpoint(trainer *tr, long step, nm_error *err) {
    char *name = ckpt_name(step), *dir = name ? nm_path_join(tr->o->out_dir, name) : NULL;
    char *opt = dir ? nm_path_join(dir, "optimizer.safetensors") : NULL, *state = dir ? nm_path_join(dir, "state.json") : NULL;
    nm_status s = opt && state ? NM_OK : NM_NOMEM(err, "checkpoint path");
    nm_model m = {0};
    char *text = NULL;
    size_t size;
    if (s == NM_OK) s = nm_model_load(&m, dir, err);
    if (s == NM_OK) { // the checkpoint must be of this config
        char *a = nm_config_to_json(&m.cfg), *b = nm_config_to_json(&tr->cfg);
        if (!a || !b) s = NM_NOMEM(err, "config");
        else if (strcmp(a, b))
            s = nm_fail(err, NM_ERR_INVALID, "%s: its config.json differs from the training config; resume with the "
                        "same config", dir);
        free(a);
        free(b);
    }
    if (s == NM_OK) memcpy(tr->params.arena, m.arena, m.arena_len * sizeof(float));
    if (s == NM_OK) s = moments_io(tr, opt, 0, err);
    if (s == NM_OK) s = nm_read_file(state, (size_t)nm_limit(NM_LIMIT_JSON_FILE_BYTES), &text, &size, err);
    if (s == NM_OK) {
        json_error_t je;
        json_t *j = json_loadb(text, size, 0, &je), *st = j ? json_object_get(j, "step") : NULL,
               *t = j ? json_object_get(j, "train") : NULL, *mine = train_config_json(&tr->tc);
        if (!j || !json_is_integer(st) || json_integer_value(st) != step || !json_is_object(t))
            s = nm_fail(err, NM_ERR_FORMAT, "%s: not a nullmap training state for step %ld", state, step);
        else if (!mine)
            s = NM_NOMEM(err, "train state");
        else { // steps may change (to train longer); everything else must match
            json_object_del(t, "steps");
            json_object_del(mine, "steps");
            if (!json_equal(t, mine))
                s = nm_fail(err, NM_ERR_INVALID, "%s: the checkpoint was trained with other \"train\" settings; resume "
                            "with the same config", state);
        }
        json_decref(mine);
        json_decref(j);
    }
    if (s == NM_OK) tr->step = step;
    nm_model_free(&m);
    free(text);
    free(name);
    free(dir);
    free(opt);
    free(state);
    return s;
}

// ---- the log ----

// Opens OUT/log.csv: fresh (header) or, on resume, keeping the rows of steps <= tr->step, so
// that the log of a resumed run reads like an uninterrupted one.
static nm_status open_log(trainer *tr, nm_error *err) {
    char *path = nm_path_join(tr->o->out_dir, "log.csv");
    if (!path) return NM_NOMEM(err, "log path");
    nm_status s = NM_OK;
    char *old = NULL;
    size_t size = 0;
    if (tr->step > 0 && nm_path_exists(path)) s = nm_read_file(path, (size_t)1 << 31, &old, &size, err);
    if (s == NM_OK) {
        size_t keep = 0;
        if (old) { // header, then rows while their step <= tr->step
            char *line = old, *nl;
            int first = 1;
            while ((nl = strchr(line, '\n'))) {
                if (!first && strtol(line, NULL, 10) > tr->step) break;
                first = 0;
                line = nl + 1;
            }
            keep = (size_t)(line - old);
        }
        char *tmp = nm_tmp_path(path);
        FILE *f = tmp ? fopen(tmp, "w") : NULL;
        if (!f) s = nm_fail(err, NM_ERR_IO, "cannot write %s: %s", tmp ? tmp : path, strerror(errno));
        else {
            if (keep) fwrite(old, 1, keep, f);
            else fputs(NM_TRAIN_LOG_COLUMNS "\n", f);
            if (fflush(f) != 0 || rename(tmp, path) != 0) {
                s = nm_fail(err, NM_ERR_IO, "cannot write %s: %s", path, strerror(errno));
                fclose(f);
                f = NULL;
                unlink(tmp);
            }
        }
        tr->log = f;
        free(tmp);
    }
    free(old);
    free(path);
    return s;
}

// ---- the run ----

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static nm_status setup(trainer *tr, nm_error *err) {
    const nm_train_options *o = tr->o;
    nm_status s = nm_train_config_load(&tr->cfg, &tr->tc, o->config_path, err);
    if (s != NM_OK) return s;
    if (o->steps_override > 0) tr->tc.steps = o->steps_override;
    nm_optim_config_default(&tr->oc);
    tr->oc.lr = tr->tc.lr;
    tr->oc.weight_decay = tr->tc.weight_decay;
    tr->oc.grad_clip = tr->tc.grad_clip;
    tr->oc.warmup_steps = tr->tc.warmup_steps;
    tr->oc.total_steps = tr->tc.steps;
    tr->oc.decay_frac = tr->tc.decay_frac;
    tr->oc.final_lr_frac = tr->tc.final_lr_frac;
    if ((s = nm_dataset_load(&tr->data, o->data_dir, "train", err)) != NM_OK) return s;
    if (tr->data.n == 0) return nm_fail(err, NM_ERR_INVALID, "%s: the train split is empty", o->data_dir);
    if ((s = nm_model_init_random(&tr->params, &tr->cfg, tr->tc.init_seed, err)) != NM_OK) return s;
    if ((s = nm_model_init_zero(&tr->grads, &tr->cfg, err)) != NM_OK) return s;
    if ((s = nm_model_init_zero(&tr->exp_avg, &tr->cfg, err)) != NM_OK) return s;
    if ((s = nm_model_init_zero(&tr->exp_avg_sq, &tr->cfg, err)) != NM_OK) return s;
    if ((s = nm_param_layout_init(&tr->pl, &tr->cfg, err)) != NM_OK) return s;
    tr->n_specs = nm_model_tensor_specs(&tr->params, NULL);
    tr->specs = calloc((size_t)tr->n_specs, sizeof *tr->specs);
    tr->decays = calloc((size_t)tr->n_specs, 1);
    tr->samples = calloc((size_t)tr->tc.batch_size, sizeof *tr->samples);
    tr->perm = malloc((size_t)tr->data.n * sizeof *tr->perm);
    if (!tr->specs || !tr->decays || !tr->samples || !tr->perm) return NM_NOMEM(err, "trainer");
    nm_model_tensor_specs(&tr->params, tr->specs);
    for (int i = 0; i < tr->n_specs; i++) tr->decays[i] = (uint8_t)nm_param_decays(tr->specs[i].name);
    tr->perm_epoch = -1;
    if ((s = nm_mkdir_p(o->out_dir, err)) != NM_OK) return s;
    long newest = checkpoint_below(o->out_dir, LONG_MAX);
    if (o->resume) {
        if (newest < 0)
            return nm_fail(err, NM_ERR_IO, "%s: no checkpoint to resume from (ckpt-NNNNNNN directories)", o->out_dir);
        if ((s = load_checkpoint(tr, newest, err)) != NM_OK) return s;
        remove_stale_temporaries(o->out_dir);
    } else if (newest >= 0) {
        return nm_fail(err, NM_ERR_INVALID, "%s already holds a training run (checkpoint of step %ld); continue it with "
                       "--resume or choose another --out", o->out_dir, newest);
    }
    return open_log(tr, err);
}

// One step: forward, backward, clip, AdamW. Returns NM_ERR_DIVERGED before touching the weights
// when the loss or the gradient is not finite.
static nm_status train_step(trainer *tr, nm_train_progress *pr, nm_error *err) {
    nm_status s = build_batch(tr, tr->step, err);
    if (s != NM_OK) return s;
    const double wb = tr->tc.balance_weight, wz = tr->tc.z_weight;
    if ((s = nm_train_forward_f32(&tr->acts, &pr->st, tr->params.arena, &tr->pl, &tr->batch, wb, wz, err)) != NM_OK)
        return s;
    if (!isfinite(pr->st.loss))
        return nm_fail(err, NM_ERR_DIVERGED, "step %ld: the loss is %g (CE %g, L_bal %g, L_z %g)", tr->step + 1,
                       pr->st.loss, pr->st.ce, pr->st.l_bal, pr->st.l_z);
    memset(tr->grads.arena, 0, tr->grads.arena_len * sizeof(float));
    if ((s = nm_train_backward_f32(&tr->acts, tr->grads.arena, tr->params.arena, &tr->pl, &tr->batch, wb, wz, err)) !=
        NM_OK)
        return s;
    const double gn = nm_grad_norm(tr->grads.arena, tr->grads.arena_len);
    if (!isfinite(gn))
        return nm_fail(err, NM_ERR_DIVERGED, "step %ld: the gradient norm is %g (loss %g)", tr->step + 1, gn,
                       pr->st.loss);
    const double scale = nm_clip_scale(gn, tr->oc.grad_clip);
    const double lr = nm_wsd_lr(&tr->oc, tr->step);
    for (int i = 0; i < tr->n_specs; i++) {
        const size_t off = (size_t)(*tr->specs[i].dest - tr->params.arena);
        nm_adamw_update(tr->params.arena + off, tr->grads.arena + off, tr->exp_avg.arena + off,
                        tr->exp_avg_sq.arena + off, tr->specs[i].numel, tr->step, lr, scale, tr->decays[i], &tr->oc);
    }
    pr->lr = lr;
    pr->grad_norm = gn;
    tr->step++;
    return NM_OK;
}

static void derive(nm_train_progress *pr) {
    const nm_train_stats *st = &pr->st;
    pr->null_ratio = st->slots ? 1.0 - (double)st->real_slots / (double)st->slots : 0;
    pr->zero_ratio = st->token_layers ? (double)st->zero_compute / (double)st->token_layers : 0;
    pr->vision_int = st->vision ? st->real_vision / st->vision : NAN;
    pr->text_int = st->text ? st->real_text / st->text : NAN;
}

nm_status nm_train_run(const nm_train_options *o, nm_error *err) {
    trainer tr;
    memset(&tr, 0, sizeof tr);
    tr.o = o;
    nm_status s = setup(&tr, err);
    double t0 = now_s(), last_loss = NAN;
    const long total = tr.tc.steps, stop = o->stop_after > 0 && o->stop_after < total ? o->stop_after : total;
    while (s == NM_OK && tr.step < stop) {
        nm_train_progress pr;
        memset(&pr, 0, sizeof pr);
        double ts = now_s();
        if ((s = train_step(&tr, &pr, err)) != NM_OK) break;
        double dt = now_s() - ts;
        last_loss = pr.st.loss;
        pr.step = tr.step;
        pr.total = total;
        pr.tokens_per_s = dt > 0 ? pr.st.tokens / dt : 0;
        pr.elapsed_s = now_s() - t0;
        derive(&pr);
        const nm_train_stats *st = &pr.st;
        fprintf(tr.log, "%ld,%.6g,%.6f,%.6f,%.6f,%.6f,%.6f,%.6f,%.6f,%.6f,%.6f,%.6f,%.6f,%ld,%.0f,%.2f\n", pr.step, pr.lr,
                st->loss, st->ce, st->ce_answer, st->ce_prompt, st->l_bal, st->l_z, pr.null_ratio, pr.zero_ratio,
                pr.vision_int, pr.text_int, pr.grad_norm, st->tokens, pr.tokens_per_s, pr.elapsed_s);
        if (fflush(tr.log) != 0) s = nm_fail(err, NM_ERR_IO, "%s/log.csv: write failed", o->out_dir);
        if (o->progress) o->progress(o->ctx, &pr);
        if (s == NM_OK && (tr.step % tr.tc.checkpoint_every == 0 || tr.step == stop))
            s = save_checkpoint(&tr, last_loss, err);
    }
    if (s == NM_OK && tr.step == total) { // the trained model, in the model format
        char *dir = nm_path_join(o->out_dir, "final"), *sum = dir ? nm_path_join(dir, "train_summary.json") : NULL;
        if (!sum) s = NM_NOMEM(err, "path");
        if (s == NM_OK) s = nm_model_save(&tr.params, dir, o->final_dtype, err);
        if (s == NM_OK) {
            // final_loss: of the last step this process ran (null when it resumed a finished run)
            json_t *j = json_pack("{sIsosossss}", "steps", (json_int_t)tr.step, "final_loss",
                                  isfinite(last_loss) ? json_real(last_loss) : json_null(), "train",
                                  train_config_json(&tr.tc), "data", o->data_dir, "final_dtype",
                                  nm_dtype_name(o->final_dtype));
            char *text = j ? json_dumps(j, JSON_INDENT(2) | JSON_SORT_KEYS) : NULL;
            json_decref(j);
            s = text ? nm_write_file_atomic(sum, text, strlen(text), err) : NM_NOMEM(err, "summary");
            free(text);
        }
        free(dir);
        free(sum);
    }
    trainer_free(&tr);
    return s;
}
