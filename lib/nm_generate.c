// nm_generate.c — image + prompt → sequence → prefill → greedy decode, traced.
#include "nm_generate.h"

#include <stdlib.h>
#include <string.h>

#include "nm_image.h"
#include "nm_tokenizer.h"

int nm_argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

static char *dup_or_null(const char *s) { return s ? strdup(s) : NULL; }

// An engine made with options a serves a request asking for b.
static int same_backend(const nm_engine_options *a, const nm_engine_options *b) {
    const char *da = a->device ? a->device : "cpu", *db = b->device ? b->device : "cpu";
    return !strcmp(da, db) && a->bf16 == b->bf16 && a->expert_gemm == b->expert_gemm;
}

// Copies the sequence's token table (ids, display text, modality, segment, patch) into the trace.
static nm_status fill_tokens(nm_trace_sample *tr, const nm_config *cfg, const nm_sequence *seq, nm_error *err) {
    const int g = nm_config_grid(cfg);
    for (int i = 0; i < seq->n; i++) {
        tr->token_id[i] = seq->id[i];
        tr->modality[i] = seq->modality[i];
        tr->segment[i] = seq->segment[i];
        tr->patch[2 * i] = (int16_t)(seq->id[i] < 0 ? seq->patch[i] / g : -1);
        tr->patch[2 * i + 1] = (int16_t)(seq->id[i] < 0 ? seq->patch[i] % g : -1);
        free(tr->token_text[i]);
        tr->token_text[i] = nm_token_display(cfg, seq, i);
        if (!tr->token_text[i]) return NM_NOMEM(err, "token text");
    }
    tr->n_tokens = seq->n;
    return NM_OK;
}

nm_status nm_generate(const nm_model *m, nm_engine **engine, const nm_request *req, nm_trace_sample *trace,
                      nm_error *err) {
    const nm_config *cfg = &m->cfg;
    nm_status s = NM_OK;
    int img_w = 0, img_h = 0; // the image file's own size, for the trace
    nm_sequence seq = {0};
    float *pixels = NULL, *logits = NULL;
    memset(trace, 0, sizeof *trace);

    if (req->max_new_tokens < 0) return nm_fail(err, NM_ERR_INVALID, "max_new_tokens must be >= 0");
    if (req->image_path) {
        if (!cfg->has_vision)
            return nm_fail(err, NM_ERR_INVALID, "%s: the model is text-only and cannot take an image", req->image_path);
        if ((s = nm_image_load_pixels(&pixels, req->image_path, cfg->image_size, &img_w, &img_h, err)) != NM_OK)
            goto out;
    }
    if ((s = nm_sequence_build(&seq, cfg, req->prompt, req->image_path != NULL, req->max_new_tokens, err)) != NM_OK)
        goto out;
    if ((s = nm_trace_sample_init(trace, cfg->num_layers, cfg->moe.top_k, seq.cap, err)) != NM_OK) goto out;
    trace->image_path = dup_or_null(req->image_path);
    trace->prompt = strdup(req->prompt);
    if ((req->image_path && !trace->image_path) || !trace->prompt) {
        s = NM_NOMEM(err, "sample text");
        goto out;
    }
    trace->image_width = img_w;
    trace->image_height = img_h;
    trace->grid_rows = trace->grid_cols = req->image_path ? nm_config_grid(cfg) : 0;
    trace->n_prompt_tokens = seq.n;

    if (!*engine || nm_engine_capacity(*engine) < seq.cap || !same_backend(nm_engine_get_options(*engine), &req->engine)) {
        // Size the cache for this sequence, at least 1024 tokens (capped by max_positions) so
        // that a batch of similar samples reuses one engine and its warm buffers.
        int want = seq.cap > 1024 ? seq.cap : (cfg->max_positions < 1024 ? cfg->max_positions : 1024);
        nm_engine_free(*engine);
        *engine = NULL;
        if ((s = nm_engine_create_on(engine, m, want, &req->engine, err)) != NM_OK) goto out;
    }
    nm_engine_reset(*engine);
    logits = malloc((size_t)cfg->vocab_size * sizeof(float));
    if (!logits) {
        s = NM_NOMEM(err, "logits");
        goto out;
    }
    // Prefill: the whole prompt in one batch.
    if ((s = nm_engine_forward(*engine, seq.id, seq.patch, pixels, seq.n, logits, 0, trace, err)) != NM_OK) goto out;
    for (int gen = 0; gen < req->max_new_tokens && seq.n < seq.cap; gen++) {
        int next = nm_argmax(logits, cfg->vocab_size);
        if ((s = nm_sequence_push(&seq, cfg, next, err)) != NM_OK) goto out;
        // Feed the token so it has its own routing record, the last one included.
        if ((s = nm_engine_forward(*engine, &seq.id[seq.n - 1], &seq.patch[seq.n - 1], pixels, 1, logits, 0, trace, err)) !=
            NM_OK)
            goto out;
        if (next == cfg->tok.eos) break;
    }
    if ((s = fill_tokens(trace, cfg, &seq, err)) != NM_OK) goto out;
    trace->answer = nm_sequence_answer(cfg, &seq);
    if (!trace->answer) s = NM_NOMEM(err, "answer");
out:
    free(logits);
    free(pixels);
    nm_sequence_free(&seq);
    return s;
}
