// nm_sample.c — a data-set record as token sequence, pixels and loss targets (nm_sample.h).
#include "nm_sample.h"

#include <stdlib.h>
#include <string.h>

#include "nm_image.h"
#include "nm_trace.h"

void nm_sample_free(nm_sample *s) {
    nm_sequence_free(&s->seq);
    free(s->pixels);
    free(s->target);
    free(s->loss_kind);
    memset(s, 0, sizeof *s);
}

nm_status nm_sample_build(nm_sample *s, const nm_config *cfg, const nm_data_record *r, nm_error *err) {
    memset(s, 0, sizeof *s);
    const size_t alen = strlen(r->answer);
    size_t bad = 0;
    nm_status st;
    if (!nm_utf8_valid(r->answer, alen, &bad)) {
        st = nm_fail(err, NM_ERR_INVALID, "record %s: answer is not valid UTF-8 (byte %zu)", r->id, bad);
        goto fail;
    }
    if (alen + 2 > (size_t)cfg->max_positions) {
        st = nm_fail(err, NM_ERR_LIMIT, "record %s: answer of %zu bytes does not fit max_positions %d", r->id, alen,
                     cfg->max_positions);
        goto fail;
    }
    if (r->image && !cfg->has_vision) {
        st = nm_fail(err, NM_ERR_INVALID, "record %s has an image but the model is text-only", r->id);
        goto fail;
    }
    if (r->image && (st = nm_image_load_pixels(&s->pixels, r->image, cfg->image_size, NULL, NULL, err)) != NM_OK) {
        nm_error_prefix(err, "record %s: ", r->id);
        goto fail;
    }
    if ((st = nm_sequence_build(&s->seq, cfg, r->prompt, r->image != NULL, (int)alen + 2, err)) != NM_OK) {
        nm_error_prefix(err, "record %s: ", r->id);
        goto fail;
    }
    if (s->seq.n + (int)alen + 2 > s->seq.cap) {
        st = nm_fail(err, NM_ERR_LIMIT, "record %s: prompt and answer need %d tokens, over max_positions %d", r->id,
                     s->seq.n + (int)alen + 2, cfg->max_positions);
        goto fail;
    }
    s->answer_start = s->seq.n;
    if ((st = nm_sequence_push(&s->seq, cfg, ' ', err)) != NM_OK) goto fail;
    for (size_t i = 0; i < alen; i++)
        if ((st = nm_sequence_push(&s->seq, cfg, (unsigned char)r->answer[i], err)) != NM_OK) goto fail;
    if ((st = nm_sequence_push(&s->seq, cfg, cfg->tok.eos, err)) != NM_OK) goto fail;
    const int n = s->seq.n;
    s->target = malloc((size_t)n * sizeof *s->target);
    s->loss_kind = malloc((size_t)n);
    if (!s->target || !s->loss_kind) {
        st = NM_NOMEM(err, "sample targets");
        goto fail;
    }
    for (int t = 0; t < n; t++) {
        const int last = t == n - 1;
        s->target[t] = last ? -1 : s->seq.id[t + 1];
        s->loss_kind[t] = last ? NM_LOSS_NONE
                          : s->seq.segment[t + 1] == NM_SEG_ANSWER ? NM_LOSS_ANSWER
                          : s->seq.segment[t + 1] == NM_SEG_PROMPT ? NM_LOSS_PROMPT
                                                                   : NM_LOSS_NONE;
    }
    return NM_OK;
fail:
    nm_sample_free(s);
    return st;
}
