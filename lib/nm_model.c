// nm_model.c — load, validate, save and randomly initialise models.
#include "nm_model.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nm_fileutil.h"
#include "nm_limits.h"
#include "nm_rng.h"

static void spec(nm_tensor_spec *s, int *n, float **dest, int init, float std, int ndim, int64_t a, int64_t b,
                 int64_t c, const char *fmt, int layer) {
    if (s) {
        nm_tensor_spec *t = &s[*n];
        memset(t, 0, sizeof *t);
        snprintf(t->name, sizeof t->name, fmt, layer);
        t->ndim = ndim;
        t->shape[0] = a;
        t->shape[1] = b;
        t->shape[2] = c;
        t->numel = (size_t)a * (ndim > 1 ? (size_t)b : 1) * (ndim > 2 ? (size_t)c : 1);
        t->dest = dest;
        t->init = init;
        t->std = std;
    }
    (*n)++;
}

int nm_model_tensor_specs(nm_model *m, nm_tensor_spec *s) {
    const nm_config *c = &m->cfg;
    int n = 0;
    const int64_t D = c->hidden_size, V = c->vocab_size, q = (int64_t)c->num_heads * c->head_dim,
                  kv = (int64_t)c->num_kv_heads * c->head_dim, N = c->moe.num_experts, H = c->moe.expert_hidden,
                  Hs = c->moe.shared_expert_hidden;
    // Init scales: unit-variance embeddings, 1/sqrt(fan_in) for projections, residual outputs
    // scaled down by sqrt(2L) so the random model's activations stay O(1) through depth.
    const float res = 1.0f / sqrtf(2.0f * (float)c->num_layers);
    spec(s, &n, &m->embed, NM_INIT_NORMAL, 1.0f, 2, V, D, 0, "embed_tokens.weight", 0);
    if (c->has_vision) {
        int64_t pp = 3LL * c->patch_size * c->patch_size, np = nm_config_num_patches(c);
        spec(s, &n, &m->patch_w, NM_INIT_NORMAL, 1.0f / sqrtf((float)pp), 2, D, pp, 0, "vision.patch_embed.weight", 0);
        spec(s, &n, &m->patch_b, NM_INIT_ZERO, 0, 1, D, 0, 0, "vision.patch_embed.bias", 0);
        spec(s, &n, &m->pos_embed, NM_INIT_NORMAL, 0.5f, 2, np, D, 0, "vision.pos_embed", 0);
    }
    for (int i = 0; i < c->num_layers; i++) {
        nm_layer_weights *l = m->layers ? &m->layers[i] : NULL;
#define DST(f) (l ? &l->f : NULL)
        float sd = 1.0f / sqrtf((float)D);
        spec(s, &n, DST(attn_norm), NM_INIT_ONE, 0, 1, D, 0, 0, "layers.%d.attn_norm.weight", i);
        spec(s, &n, DST(wq), NM_INIT_NORMAL, sd, 2, q, D, 0, "layers.%d.attn.q_proj.weight", i);
        spec(s, &n, DST(wk), NM_INIT_NORMAL, sd, 2, kv, D, 0, "layers.%d.attn.k_proj.weight", i);
        spec(s, &n, DST(wv), NM_INIT_NORMAL, sd, 2, kv, D, 0, "layers.%d.attn.v_proj.weight", i);
        spec(s, &n, DST(wo), NM_INIT_NORMAL, res / sqrtf((float)q), 2, D, q, 0, "layers.%d.attn.o_proj.weight", i);
        spec(s, &n, DST(moe_norm), NM_INIT_ONE, 0, 1, D, 0, 0, "layers.%d.moe_norm.weight", i);
        spec(s, &n, DST(moe.router), NM_INIT_NORMAL, sd, 2, N + 1, D, 0, "layers.%d.moe.router.weight", i);
        spec(s, &n, DST(moe.gate), NM_INIT_NORMAL, sd, 3, N, H, D, "layers.%d.moe.experts.gate_proj", i);
        spec(s, &n, DST(moe.up), NM_INIT_NORMAL, sd, 3, N, H, D, "layers.%d.moe.experts.up_proj", i);
        spec(s, &n, DST(moe.down), NM_INIT_NORMAL, res / sqrtf((float)H), 3, N, D, H, "layers.%d.moe.experts.down_proj", i);
        if (Hs > 0) {
            spec(s, &n, DST(moe.sh_gate), NM_INIT_NORMAL, sd, 2, Hs, D, 0, "layers.%d.moe.shared.gate_proj.weight", i);
            spec(s, &n, DST(moe.sh_up), NM_INIT_NORMAL, sd, 2, Hs, D, 0, "layers.%d.moe.shared.up_proj.weight", i);
            spec(s, &n, DST(moe.sh_down), NM_INIT_NORMAL, res / sqrtf((float)Hs), 2, D, Hs, 0,
                 "layers.%d.moe.shared.down_proj.weight", i);
        }
#undef DST
    }
    spec(s, &n, &m->norm, NM_INIT_ONE, 0, 1, D, 0, 0, "norm.weight", 0);
    if (!c->tie_embeddings) spec(s, &n, &m->lm_head, NM_INIT_NORMAL, 1.0f / sqrtf((float)D), 2, V, D, 0, "lm_head.weight", 0);
    return n;
}

void nm_model_free(nm_model *m) {
    if (!m) return;
    free(m->arena);
    free(m->layers);
    memset(m, 0, sizeof *m);
}

// Allocates the layer table and the arena for cfg and points every tensor into it.
// On success *specs_out holds the table (caller frees).
static nm_status model_alloc(nm_model *m, const nm_config *cfg, nm_tensor_spec **specs_out, int *n_out, nm_error *err) {
    memset(m, 0, sizeof *m);
    m->cfg = *cfg;
    m->file_dtype = NM_DT_F32;
    m->layers = calloc((size_t)cfg->num_layers, sizeof *m->layers);
    if (!m->layers) return NM_NOMEM(err, "layer table");
    int n = nm_model_tensor_specs(m, NULL);
    nm_tensor_spec *specs = calloc((size_t)n, sizeof *specs);
    if (!specs) {
        nm_model_free(m);
        return NM_NOMEM(err, "tensor table");
    }
    nm_model_tensor_specs(m, specs);
    size_t total = 0;
    for (int i = 0; i < n; i++) total += (specs[i].numel + 15) & ~(size_t)15; // 64-byte aligned tensors
    if (total > nm_limit(NM_LIMIT_MODEL_PARAMS)) {
        free(specs);
        nm_model_free(m);
        return nm_limit_fail(err, NM_LIMIT_MODEL_PARAMS, "model has %zu parameters,", total);
    }
    m->arena = aligned_alloc(64, (total * sizeof(float) + 63) & ~(size_t)63);
    if (!m->arena) {
        free(specs);
        nm_model_free(m);
        return nm_fail(err, NM_ERR_NOMEM, "out of memory allocating %zu model parameters (%.1f MiB)", total,
                       total * 4.0 / 1048576.0);
    }
    memset(m->arena, 0, total * sizeof(float)); // padding stays zero: flat loops over the arena are safe
    m->arena_len = total;
    m->n_params = 0;
    size_t off = 0;
    for (int i = 0; i < n; i++) {
        *specs[i].dest = m->arena + off;
        off += (specs[i].numel + 15) & ~(size_t)15;
        m->n_params += specs[i].numel;
    }
    if (cfg->tie_embeddings) m->lm_head = m->embed;
    *specs_out = specs;
    *n_out = n;
    return NM_OK;
}

static void shape_str(char *buf, size_t n, int ndim, const int64_t *shape) {
    size_t o = (size_t)snprintf(buf, n, "[");
    for (int d = 0; d < ndim && o < n; d++) o += (size_t)snprintf(buf + o, n - o, "%s%lld", d ? ", " : "", (long long)shape[d]);
    if (o < n) snprintf(buf + o, n - o, "]");
}

// Appends one problem to the message buffer; counts all, lists as many as fit.
static void add_problem(char *msg, size_t cap, int *count, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static void add_problem(char *msg, size_t cap, int *count, const char *fmt, ...) {
    size_t len = strlen(msg);
    (*count)++;
    if (len + 8 >= cap) return;
    if (*count > 1) len += (size_t)snprintf(msg + len, cap - len, "; ");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg + len, cap - len, fmt, ap);
    va_end(ap);
}

nm_status nm_model_load(nm_model *m, const char *dir, nm_error *err) {
    memset(m, 0, sizeof *m);
    nm_status s;
    nm_config cfg;
    char *cfg_path = nm_path_join(dir, "config.json"), *st_path = nm_path_join(dir, "model.safetensors");
    nm_tensor_spec *specs = NULL;
    int n = 0;
    nm_safetensors st = {0};
    if (!cfg_path || !st_path) {
        s = NM_NOMEM(err, "path");
        goto out;
    }
    if (!nm_is_dir(dir)) {
        s = nm_fail(err, NM_ERR_IO, "%s: %s (a model is a directory with config.json and model.safetensors)", dir,
                    nm_path_exists(dir) ? "not a directory" : "model directory not found");
        goto out;
    }
    if ((s = nm_config_load(&cfg, cfg_path, err)) != NM_OK) goto out;
    if ((s = nm_safetensors_open(&st, st_path, err)) != NM_OK) goto out;
    // Check names and shapes against a table made without allocating, so a config with
    // huge dimensions fails on the mismatch instead of on a giant allocation.
    nm_model shape_only = {.cfg = cfg};
    n = nm_model_tensor_specs(&shape_only, NULL);
    specs = calloc((size_t)n, sizeof *specs);
    if (!specs) {
        s = NM_NOMEM(err, "tensor table");
        goto out;
    }
    nm_model_tensor_specs(&shape_only, specs);

    // Validation pass: every problem is collected and reported together.
    char problems[900] = "";
    int n_problems = 0;
    char *matched = calloc((size_t)st.n_tensors + 1, 1);
    if (!matched) {
        s = NM_NOMEM(err, "tensor flags");
        goto out;
    }
    int dtype_set = 0;
    for (int i = 0; i < n; i++) {
        const nm_st_tensor *t = nm_safetensors_find(&st, specs[i].name);
        if (!t) {
            add_problem(problems, sizeof problems, &n_problems, "missing tensor %s", specs[i].name);
            continue;
        }
        matched[t - st.tensors] = 1;
        int same = t->ndim == specs[i].ndim;
        for (int d = 0; same && d < t->ndim; d++) same = t->shape[d] == specs[i].shape[d];
        if (!same) {
            char got[96], want[96];
            shape_str(got, sizeof got, t->ndim, t->shape);
            shape_str(want, sizeof want, specs[i].ndim, specs[i].shape);
            add_problem(problems, sizeof problems, &n_problems, "tensor %s has shape %s, config needs %s", specs[i].name,
                        got, want);
            continue;
        }
        if (t->dtype != NM_DT_F32 && t->dtype != NM_DT_F16 && t->dtype != NM_DT_BF16) {
            add_problem(problems, sizeof problems, &n_problems, "tensor %s has dtype %s (F32, F16 or BF16 expected)",
                        specs[i].name, nm_dtype_name(t->dtype));
            continue;
        }
        if (!dtype_set) {
            m->file_dtype = t->dtype;
            dtype_set = 1;
        }
    }
    for (int i = 0; i < st.n_tensors; i++)
        if (!matched[i]) {
            if (cfg.tie_embeddings && strcmp(st.tensors[i].name, "lm_head.weight") == 0)
                add_problem(problems, sizeof problems, &n_problems,
                            "unexpected tensor lm_head.weight (config says tie_embeddings = true)");
            else
                add_problem(problems, sizeof problems, &n_problems, "unexpected tensor %s", st.tensors[i].name);
        }
    free(matched);
    if (n_problems > 0) {
        s = nm_fail(err, NM_ERR_INVALID, "%s: %d problem%s with the tensors for %s: %s", st_path, n_problems,
                    n_problems > 1 ? "s" : "", cfg_path, problems);
        goto out;
    }
    free(specs);
    specs = NULL;
    nm_dtype file_dtype = m->file_dtype;
    if ((s = model_alloc(m, &cfg, &specs, &n, err)) != NM_OK) goto out;
    m->file_dtype = file_dtype;
    for (int i = 0; i < n; i++) {
        const nm_st_tensor *t = nm_safetensors_find(&st, specs[i].name);
        if ((s = nm_st_tensor_to_f32(*specs[i].dest, t, err)) != NM_OK) {
            nm_error_prefix(err, "%s", st_path);
            goto out;
        }
    }
out:
    free(specs);
    nm_safetensors_close(&st);
    free(cfg_path);
    free(st_path);
    if (s != NM_OK) nm_model_free(m);
    return s;
}

nm_status nm_model_init_random(nm_model *m, const nm_config *cfg, uint64_t seed, nm_error *err) {
    nm_status s = nm_config_validate(cfg, "config", err);
    if (s != NM_OK) return s;
    nm_tensor_spec *specs;
    int n;
    if ((s = model_alloc(m, cfg, &specs, &n, err)) != NM_OK) return s;
    for (int i = 0; i < n; i++) {
        // Each tensor gets its own stream, derived from the seed and its name, so adding a
        // tensor kind later does not change the others.
        nm_rng r;
        nm_rng_seed(&r, seed ^ nm_hash_str(specs[i].name));
        float *w = *specs[i].dest;
        for (size_t k = 0; k < specs[i].numel; k++) {
            switch (specs[i].init) {
            case NM_INIT_ONE: w[k] = 1.0f; break;
            case NM_INIT_ZERO: w[k] = 0.0f; break;
            case NM_INIT_NORMAL: w[k] = specs[i].std * (float)nm_rng_normal(&r); break;
            }
        }
    }
    free(specs);
    return NM_OK;
}

nm_status nm_model_init_zero(nm_model *m, const nm_config *cfg, nm_error *err) {
    nm_status s = nm_config_validate(cfg, "config", err);
    if (s != NM_OK) return s;
    nm_tensor_spec *specs;
    int n;
    if ((s = model_alloc(m, cfg, &specs, &n, err)) != NM_OK) return s;
    free(specs);
    return NM_OK;
}

nm_status nm_model_save(const nm_model *m, const char *dir, nm_dtype dtype, nm_error *err) {
    nm_status s = nm_mkdir_p(dir, err);
    if (s != NM_OK) return s;
    nm_model tmp = *m; // the spec table wants a mutable model; we only read the pointers
    int n = nm_model_tensor_specs(&tmp, NULL);
    nm_tensor_spec *specs = calloc((size_t)n, sizeof *specs);
    nm_st_write_tensor *ws = calloc((size_t)n, sizeof *ws);
    char *json = nm_config_to_json(&m->cfg);
    char *cfg_path = nm_path_join(dir, "config.json"), *st_path = nm_path_join(dir, "model.safetensors");
    if (!specs || !ws || !json || !cfg_path || !st_path) {
        s = NM_NOMEM(err, "model writer");
        goto out;
    }
    nm_model_tensor_specs(&tmp, specs);
    for (int i = 0; i < n; i++) {
        ws[i].name = specs[i].name;
        ws[i].dtype = dtype;
        ws[i].ndim = specs[i].ndim;
        for (int d = 0; d < 3; d++) ws[i].shape[d] = specs[i].shape[d];
        ws[i].values = *specs[i].dest;
    }
    if ((s = nm_safetensors_write(st_path, ws, n, err)) != NM_OK) goto out;
    size_t jl = strlen(json);
    json[jl] = '\n'; // replace the terminator for the file, restore below
    s = nm_write_file_atomic(cfg_path, json, jl + 1, err);
    json[jl] = '\0';
out:
    free(specs);
    free(ws);
    free(json);
    free(cfg_path);
    free(st_path);
    return s;
}
