// nm_engine.h — the CPU forward engine: one model, one sequence at a time, with a KV cache.
//
// nm_engine_forward() runs T new tokens at positions pos..pos+T-1 as one batch (a prefill
// when T > 1, a decode step when T = 1) and continues the cache. When a trace sample is given,
// the routing of every MoE layer for those tokens is written straight into it (at token
// offset pos); tracing never changes a computed value (the same buffers, only copied out).
#ifndef NM_ENGINE_H
#define NM_ENGINE_H

#include <stdint.h>

#include "nm_error.h"
#include "nm_model.h"
#include "nm_trace.h"

typedef struct nm_engine nm_engine;

// max_tokens: the longest sequence this engine will hold (<= max_positions).
nm_status nm_engine_create(nm_engine **out, const nm_model *m, int max_tokens, nm_error *err);
void nm_engine_free(nm_engine *e);
// Forgets the sequence (position back to 0); keeps the buffers.
void nm_engine_reset(nm_engine *e);
// The longest sequence this engine holds.
int nm_engine_capacity(const nm_engine *e);

// ids: [T] token ids, -1 for an image patch; patch_idx: [T] patch index where ids = -1.
// pixels: (3, S, S) normalised image (needed when any patch is present).
// logits: (T, V) when all_logits, else (V) for the last token; may be NULL.
// trace: may be NULL; else its capacity must cover pos + T.
nm_status nm_engine_forward(nm_engine *e, const int32_t *ids, const int32_t *patch_idx, const float *pixels, int T,
                            float *logits, int all_logits, nm_trace_sample *trace, nm_error *err);

#endif
