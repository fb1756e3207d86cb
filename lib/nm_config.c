// nm_config.c — config.json parsing (jansson), validation and writing.
#include "nm_config.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nm_fileutil.h"
#include "nm_limits.h"

// Reads a required integer key; NM_OK or an error naming the key.
static nm_status get_int(const json_t *obj, const char *objname, const char *key, int required, int dflt,
                         int *out, const char *path, nm_error *err) {
    json_t *v = json_object_get(obj, key);
    if (!v) {
        if (!required) {
            *out = dflt;
            return NM_OK;
        }
        return nm_fail(err, NM_ERR_FORMAT, "%s: missing key \"%s%s\"", path, objname, key);
    }
    if (!json_is_integer(v))
        return nm_fail(err, NM_ERR_FORMAT, "%s: key \"%s%s\" must be an integer", path, objname, key);
    json_int_t x = json_integer_value(v);
    if (x < -1000000000LL || x > 1000000000LL)
        return nm_fail(err, NM_ERR_LIMIT, "%s: key \"%s%s\" = %lld is out of range", path, objname, key, (long long)x);
    *out = (int)x;
    return NM_OK;
}

static nm_status get_real(const json_t *obj, const char *key, double dflt, double *out, const char *path,
                          nm_error *err) {
    json_t *v = json_object_get(obj, key);
    if (!v) {
        *out = dflt;
        return NM_OK;
    }
    if (!json_is_number(v)) return nm_fail(err, NM_ERR_FORMAT, "%s: key \"%s\" must be a number", path, key);
    *out = json_number_value(v);
    return NM_OK;
}

#define TRY(x)                                                                                    \
    do {                                                                                          \
        nm_status st_ = (x);                                                                      \
        if (st_ != NM_OK) {                                                                       \
            json_decref(root);                                                                    \
            return st_;                                                                           \
        }                                                                                         \
    } while (0)

nm_status nm_config_parse(nm_config *cfg, const char *json_text, const char *path, nm_error *err) {
    memset(cfg, 0, sizeof *cfg);
    json_error_t jerr;
    json_t *root = json_loads(json_text, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) return nm_fail(err, NM_ERR_FORMAT, "%s: invalid JSON at line %d: %s", path, jerr.line, jerr.text);
    if (!json_is_object(root)) TRY(nm_fail(err, NM_ERR_FORMAT, "%s: top level must be a JSON object", path));

    json_t *mt = json_object_get(root, "model_type");
    if (!mt) TRY(nm_fail(err, NM_ERR_FORMAT, "%s: missing key \"model_type\"", path));
    if (!json_is_string(mt) || strcmp(json_string_value(mt), "nullmap-moe") != 0)
        TRY(nm_fail(err, NM_ERR_UNSUPPORTED, "%s: model_type must be \"nullmap-moe\"", path));
    TRY(get_int(root, "", "format_version", 1, 1, &cfg->format_version, path, err));
    if (cfg->format_version != 1)
        TRY(nm_fail(err, NM_ERR_UNSUPPORTED, "%s: format_version %d is not supported (this build reads 1)", path,
                    cfg->format_version));
    TRY(get_int(root, "", "hidden_size", 1, 0, &cfg->hidden_size, path, err));
    TRY(get_int(root, "", "num_layers", 1, 0, &cfg->num_layers, path, err));
    TRY(get_int(root, "", "num_heads", 1, 0, &cfg->num_heads, path, err));
    TRY(get_int(root, "", "num_kv_heads", 1, 0, &cfg->num_kv_heads, path, err));
    TRY(get_int(root, "", "head_dim", 1, 0, &cfg->head_dim, path, err));
    TRY(get_int(root, "", "vocab_size", 1, 0, &cfg->vocab_size, path, err));
    TRY(get_int(root, "", "max_positions", 1, 0, &cfg->max_positions, path, err));
    TRY(get_real(root, "rope_theta", 10000.0, &cfg->rope_theta, path, err));
    TRY(get_real(root, "rms_norm_eps", 1e-6, &cfg->rms_norm_eps, path, err));
    json_t *tie = json_object_get(root, "tie_embeddings");
    if (tie && !json_is_boolean(tie)) TRY(nm_fail(err, NM_ERR_FORMAT, "%s: \"tie_embeddings\" must be true or false", path));
    cfg->tie_embeddings = tie ? json_is_true(tie) : 0;

    json_t *moe = json_object_get(root, "moe");
    if (!moe) TRY(nm_fail(err, NM_ERR_FORMAT, "%s: missing key \"moe\"", path));
    if (!json_is_object(moe)) TRY(nm_fail(err, NM_ERR_FORMAT, "%s: \"moe\" must be an object", path));
    TRY(get_int(moe, "moe.", "num_experts", 1, 0, &cfg->moe.num_experts, path, err));
    TRY(get_int(moe, "moe.", "null_copies", 1, 0, &cfg->moe.null_copies, path, err));
    TRY(get_int(moe, "moe.", "top_k", 1, 0, &cfg->moe.top_k, path, err));
    TRY(get_int(moe, "moe.", "expert_hidden", 1, 0, &cfg->moe.expert_hidden, path, err));
    TRY(get_int(moe, "moe.", "shared_expert_hidden", 0, 0, &cfg->moe.shared_expert_hidden, path, err));
    json_t *nk = json_object_get(moe, "null_kind");
    cfg->moe.null_kind = NM_NULL_ZERO;
    if (nk) {
        const char *s = json_is_string(nk) ? json_string_value(nk) : NULL;
        if (s && strcmp(s, "zero") == 0) cfg->moe.null_kind = NM_NULL_ZERO;
        else if (s && strcmp(s, "copy") == 0) cfg->moe.null_kind = NM_NULL_COPY;
        else TRY(nm_fail(err, NM_ERR_INVALID, "%s: \"moe.null_kind\" must be \"zero\" or \"copy\"", path));
    }

    json_t *vis = json_object_get(root, "vision");
    if (vis && !json_is_null(vis)) {
        if (!json_is_object(vis)) TRY(nm_fail(err, NM_ERR_FORMAT, "%s: \"vision\" must be an object", path));
        cfg->has_vision = 1;
        TRY(get_int(vis, "vision.", "image_size", 1, 0, &cfg->image_size, path, err));
        TRY(get_int(vis, "vision.", "patch_size", 1, 0, &cfg->patch_size, path, err));
        TRY(get_int(vis, "vision.", "channels", 0, 3, &cfg->channels, path, err));
    }

    json_t *tok = json_object_get(root, "tokenizer");
    if (!tok) TRY(nm_fail(err, NM_ERR_FORMAT, "%s: missing key \"tokenizer\"", path));
    if (!json_is_object(tok)) TRY(nm_fail(err, NM_ERR_FORMAT, "%s: \"tokenizer\" must be an object", path));
    json_t *tt = json_object_get(tok, "type");
    if (!tt || !json_is_string(tt) || strcmp(json_string_value(tt), "byte") != 0)
        TRY(nm_fail(err, NM_ERR_UNSUPPORTED, "%s: \"tokenizer.type\" must be \"byte\"", path));
    TRY(get_int(tok, "tokenizer.", "bos", 1, 0, &cfg->tok.bos, path, err));
    TRY(get_int(tok, "tokenizer.", "eos", 1, 0, &cfg->tok.eos, path, err));
    TRY(get_int(tok, "tokenizer.", "image_start", cfg->has_vision, -1, &cfg->tok.image_start, path, err));
    TRY(get_int(tok, "tokenizer.", "image_end", cfg->has_vision, -1, &cfg->tok.image_end, path, err));
    TRY(get_int(tok, "tokenizer.", "pad", 0, -1, &cfg->tok.pad, path, err));
    json_decref(root);
    return nm_config_validate(cfg, path, err);
}

#define CHECK(cond, code, ...)                                                                    \
    do {                                                                                          \
        if (!(cond)) return nm_fail(err, code, __VA_ARGS__);                                      \
    } while (0)

nm_status nm_config_validate(const nm_config *c, const char *path, nm_error *err) {
    CHECK(c->hidden_size >= 1 && c->hidden_size <= NM_MAX_DIM, NM_ERR_LIMIT,
          "%s: hidden_size = %d must be in 1..%d", path, c->hidden_size, NM_MAX_DIM);
    CHECK(c->num_layers >= 1 && c->num_layers <= NM_MAX_LAYERS, NM_ERR_LIMIT,
          "%s: num_layers = %d must be in 1..%d", path, c->num_layers, NM_MAX_LAYERS);
    CHECK(c->num_heads >= 1 && c->num_heads <= NM_MAX_HEADS, NM_ERR_LIMIT, "%s: num_heads = %d must be in 1..%d",
          path, c->num_heads, NM_MAX_HEADS);
    CHECK(c->num_kv_heads >= 1 && c->num_kv_heads <= c->num_heads && c->num_heads % c->num_kv_heads == 0,
          NM_ERR_INVALID, "%s: num_kv_heads = %d must divide num_heads = %d", path, c->num_kv_heads, c->num_heads);
    CHECK(c->head_dim >= 2 && c->head_dim <= NM_MAX_DIM && c->head_dim % 2 == 0, NM_ERR_INVALID,
          "%s: head_dim = %d must be even and in 2..%d", path, c->head_dim, NM_MAX_DIM);
    CHECK((long long)c->num_heads * c->head_dim <= NM_MAX_DIM, NM_ERR_LIMIT,
          "%s: num_heads * head_dim = %lld exceeds %d", path, (long long)c->num_heads * c->head_dim, NM_MAX_DIM);
    CHECK(c->vocab_size >= 1 && c->vocab_size <= NM_MAX_VOCAB, NM_ERR_LIMIT, "%s: vocab_size = %d must be in 1..%d",
          path, c->vocab_size, NM_MAX_VOCAB);
    CHECK(c->max_positions >= 1 && c->max_positions <= NM_MAX_POSITIONS, NM_ERR_LIMIT,
          "%s: max_positions = %d must be in 1..%d", path, c->max_positions, NM_MAX_POSITIONS);
    CHECK(isfinite(c->rope_theta) && c->rope_theta > 1.0, NM_ERR_INVALID, "%s: rope_theta must be a number > 1",
          path);
    CHECK(isfinite(c->rms_norm_eps) && c->rms_norm_eps > 0 && c->rms_norm_eps < 1, NM_ERR_INVALID,
          "%s: rms_norm_eps must be in (0, 1)", path);
    const nm_moe_config *m = &c->moe;
    CHECK(m->num_experts >= 1 && m->num_experts <= NM_MAX_EXPERTS, NM_ERR_LIMIT,
          "%s: moe.num_experts = %d must be in 1..%d", path, m->num_experts, NM_MAX_EXPERTS);
    CHECK(m->null_copies >= 0 && m->null_copies <= NM_MAX_EXPERTS, NM_ERR_LIMIT,
          "%s: moe.null_copies = %d must be in 0..%d", path, m->null_copies, NM_MAX_EXPERTS);
    CHECK(m->top_k >= 1 && m->top_k <= m->num_experts + m->null_copies, NM_ERR_INVALID,
          "%s: moe.top_k = %d must be in 1..N+M = %d", path, m->top_k, m->num_experts + m->null_copies);
    CHECK(m->top_k <= 255, NM_ERR_LIMIT, "%s: moe.top_k = %d exceeds 255 (n_real is stored as uint8)", path, m->top_k);
    CHECK(m->expert_hidden >= 1 && m->expert_hidden <= NM_MAX_DIM, NM_ERR_LIMIT,
          "%s: moe.expert_hidden = %d must be in 1..%d", path, m->expert_hidden, NM_MAX_DIM);
    CHECK(m->shared_expert_hidden >= 0 && m->shared_expert_hidden <= NM_MAX_DIM, NM_ERR_LIMIT,
          "%s: moe.shared_expert_hidden = %d must be in 0..%d", path, m->shared_expert_hidden, NM_MAX_DIM);
    if (c->has_vision) {
        CHECK(c->channels == 3, NM_ERR_UNSUPPORTED, "%s: vision.channels = %d; only 3 (RGB) is supported", path,
              c->channels);
        CHECK(c->patch_size >= 1 && c->patch_size <= 1024, NM_ERR_LIMIT, "%s: vision.patch_size = %d must be in 1..1024",
              path, c->patch_size);
        CHECK(c->image_size >= c->patch_size && c->image_size <= 8192 && c->image_size % c->patch_size == 0,
              NM_ERR_INVALID, "%s: vision.image_size = %d must be a multiple of patch_size = %d (at most 8192)", path,
              c->image_size, c->patch_size);
        long long np = (long long)(c->image_size / c->patch_size) * (c->image_size / c->patch_size);
        CHECK(np + 4 <= c->max_positions, NM_ERR_INVALID,
              "%s: %lld image patches + 3 special tokens do not fit in max_positions = %d", path, np, c->max_positions);
    }
    const nm_tokenizer_config *t = &c->tok;
    CHECK(c->vocab_size > 256, NM_ERR_INVALID, "%s: vocab_size = %d must exceed 256 (byte tokenizer)", path,
          c->vocab_size);
    int ids[5] = {t->bos, t->eos, t->image_start, t->image_end, t->pad};
    const char *names[5] = {"bos", "eos", "image_start", "image_end", "pad"};
    for (int i = 0; i < 5; i++) {
        if (ids[i] == -1 && (i >= 4 || (i >= 2 && !c->has_vision))) continue; // optional ids
        CHECK(ids[i] >= 256 && ids[i] < c->vocab_size, NM_ERR_INVALID,
              "%s: tokenizer.%s = %d must be a special id in 256..vocab_size-1 = %d", path, names[i], ids[i],
              c->vocab_size - 1);
        for (int j = 0; j < i; j++)
            CHECK(ids[j] != ids[i], NM_ERR_INVALID, "%s: tokenizer.%s and tokenizer.%s are both %d", path, names[j],
                  names[i], ids[i]);
    }
    return NM_OK;
}

nm_status nm_config_load(nm_config *cfg, const char *path, nm_error *err) {
    char *buf;
    size_t n;
    memset(cfg, 0, sizeof *cfg);
    nm_status st = nm_read_file(path, (size_t)nm_limit(NM_LIMIT_JSON_FILE_BYTES), &buf, &n, err);
    if (st != NM_OK) return st;
    if (strlen(buf) != n) st = nm_fail(err, NM_ERR_FORMAT, "%s: config contains a NUL byte", path);
    else st = nm_config_parse(cfg, buf, path, err);
    free(buf);
    return st;
}

char *nm_config_to_json(const nm_config *c) {
    json_t *root = json_object();
    json_t *moe = json_object();
    json_t *tok = json_object();
    if (!root || !moe || !tok) goto fail;
    json_object_set_new(root, "model_type", json_string("nullmap-moe"));
    json_object_set_new(root, "format_version", json_integer(1));
    json_object_set_new(root, "hidden_size", json_integer(c->hidden_size));
    json_object_set_new(root, "num_layers", json_integer(c->num_layers));
    json_object_set_new(root, "num_heads", json_integer(c->num_heads));
    json_object_set_new(root, "num_kv_heads", json_integer(c->num_kv_heads));
    json_object_set_new(root, "head_dim", json_integer(c->head_dim));
    json_object_set_new(root, "vocab_size", json_integer(c->vocab_size));
    json_object_set_new(root, "max_positions", json_integer(c->max_positions));
    json_object_set_new(root, "rope_theta", json_real(c->rope_theta));
    json_object_set_new(root, "rms_norm_eps", json_real(c->rms_norm_eps));
    json_object_set_new(root, "tie_embeddings", json_boolean(c->tie_embeddings));
    json_object_set_new(moe, "num_experts", json_integer(c->moe.num_experts));
    json_object_set_new(moe, "null_copies", json_integer(c->moe.null_copies));
    json_object_set_new(moe, "top_k", json_integer(c->moe.top_k));
    json_object_set_new(moe, "expert_hidden", json_integer(c->moe.expert_hidden));
    json_object_set_new(moe, "shared_expert_hidden", json_integer(c->moe.shared_expert_hidden));
    json_object_set_new(moe, "null_kind", json_string(c->moe.null_kind == NM_NULL_COPY ? "copy" : "zero"));
    json_object_set_new(root, "moe", moe);
    moe = NULL;
    if (c->has_vision) {
        json_t *vis = json_object();
        if (!vis) goto fail;
        json_object_set_new(vis, "image_size", json_integer(c->image_size));
        json_object_set_new(vis, "patch_size", json_integer(c->patch_size));
        json_object_set_new(vis, "channels", json_integer(c->channels));
        json_object_set_new(root, "vision", vis);
    }
    json_object_set_new(tok, "type", json_string("byte"));
    json_object_set_new(tok, "bos", json_integer(c->tok.bos));
    json_object_set_new(tok, "eos", json_integer(c->tok.eos));
    if (c->tok.image_start >= 0) json_object_set_new(tok, "image_start", json_integer(c->tok.image_start));
    if (c->tok.image_end >= 0) json_object_set_new(tok, "image_end", json_integer(c->tok.image_end));
    if (c->tok.pad >= 0) json_object_set_new(tok, "pad", json_integer(c->tok.pad));
    json_object_set_new(root, "tokenizer", tok);
    tok = NULL;
    char *s = json_dumps(root, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(17));
    json_decref(root);
    return s;
fail:
    json_decref(root);
    json_decref(moe);
    json_decref(tok);
    return NULL;
}

void nm_config_init_byte(nm_config *c) {
    memset(c, 0, sizeof *c);
    c->format_version = 1;
    c->vocab_size = 261;
    c->rope_theta = 10000.0;
    c->rms_norm_eps = 1e-6;
    c->moe.null_kind = NM_NULL_ZERO;
    c->tok = (nm_tokenizer_config){.bos = 256, .eos = 257, .image_start = 258, .image_end = 259, .pad = 260};
}
