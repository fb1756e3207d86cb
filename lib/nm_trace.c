// nm_trace.c — the in-memory trace sample: allocation and release (nm_trace.h).
// The HDF5 file form is in nm_trace_h5.c.
#include "nm_trace.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

// Largest number of routing elements (L * capacity * K) one sample may hold; the HDF5 reader
// applies the same bound before it allocates (nm_trace_h5.c).
#define NM_TRACE_MAX_ELEMS ((size_t)1 << 31)

nm_status nm_trace_sample_init(nm_trace_sample *s, int n_layers, int top_k, int capacity, nm_error *err) {
    if (!s) return nm_fail(err, NM_ERR_INTERNAL, "nm_trace_sample_init: NULL sample");
    memset(s, 0, sizeof *s);
    if (n_layers < 1 || top_k < 1 || capacity < 1)
        return nm_fail(err, NM_ERR_INVALID,
                       "trace sample: num_layers (%d), top_k (%d) and capacity (%d) must be >= 1",
                       n_layers, top_k, capacity);
    size_t L = (size_t)n_layers, K = (size_t)top_k, C = (size_t)capacity;
    if (L > NM_TRACE_MAX_ELEMS / C || L * C > NM_TRACE_MAX_ELEMS / K)
        return nm_fail(err, NM_ERR_LIMIT,
                       "trace sample: %d layers x %d tokens x %d slots exceeds the limit of 2^31 routing entries",
                       n_layers, capacity, top_k);
    size_t LC = L * C, LCK = LC * K;

    s->n_layers = n_layers;
    s->top_k = top_k;
    s->capacity = capacity;
    s->n_tokens = 0;
    s->token_id = malloc(C * sizeof *s->token_id);
    s->token_text = calloc(C, sizeof *s->token_text);
    s->modality = malloc(C * sizeof *s->modality);
    s->segment = malloc(C * sizeof *s->segment);
    s->patch = malloc(2 * C * sizeof *s->patch);
    s->n_real = malloc(LC * sizeof *s->n_real);
    s->slot = malloc(LCK * sizeof *s->slot);
    s->prob = malloc(LCK * sizeof *s->prob);
    s->gate = malloc(LCK * sizeof *s->gate);
    s->null_mass = malloc(LC * sizeof *s->null_mass);
    s->lse = malloc(LC * sizeof *s->lse);
    if (!s->token_id || !s->token_text || !s->modality || !s->segment || !s->patch || !s->n_real ||
        !s->slot || !s->prob || !s->gate || !s->null_mass || !s->lse) {
        nm_trace_sample_free(s);
        return NM_NOMEM(err, "a trace sample");
    }
    return NM_OK;
}

void nm_trace_sample_free(nm_trace_sample *s) {
    if (!s) return;
    if (s->token_text)
        for (int t = 0; t < s->capacity; t++) free(s->token_text[t]);
    free(s->image_path);
    free(s->prompt);
    free(s->answer);
    free(s->token_id);
    free(s->token_text);
    free(s->modality);
    free(s->segment);
    free(s->patch);
    free(s->n_real);
    free(s->slot);
    free(s->prob);
    free(s->gate);
    free(s->null_mass);
    free(s->lse);
    memset(s, 0, sizeof *s);
}
