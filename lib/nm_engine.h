// nm_engine.h — the forward engine: one model, one sequence at a time, with a KV cache, on a
// compute backend (nm_backend.h: "cpu", or "cuda" when built and a GPU is present).
//
// nm_engine_forward() runs T new tokens at positions pos..pos+T-1 as one batch (a prefill
// when T > 1, a decode step when T = 1) and continues the cache. When a trace sample is given,
// the routing of every MoE layer for those tokens is written into it (at token offset pos);
// tracing never changes a computed value (the same buffers, only copied out).
#ifndef NM_ENGINE_H
#define NM_ENGINE_H

#include <stdint.h>

#include "nm_backend.h"
#include "nm_error.h"
#include "nm_model.h"
#include "nm_trace.h"

typedef struct nm_engine nm_engine;

typedef struct {
    const char *device;       // "cpu" (also when NULL) or "cuda"
    int bf16;                 // CUDA only: BF16 GEMM weights and inputs, F32 accumulation
    nm_gemm_mode expert_gemm; // CUDA only: grouped or per-expert expert GEMMs
} nm_engine_options;

// max_tokens: the longest sequence this engine will hold (<= max_positions). CPU backend.
nm_status nm_engine_create(nm_engine **out, const nm_model *m, int max_tokens, nm_error *err);
// The same on the backend named in opt (NULL: CPU). The model must outlive the engine.
nm_status nm_engine_create_on(nm_engine **out, const nm_model *m, int max_tokens, const nm_engine_options *opt,
                              nm_error *err);
void nm_engine_free(nm_engine *e);
// Forgets the sequence (position back to 0); keeps the buffers.
void nm_engine_reset(nm_engine *e);
// The longest sequence this engine holds.
int nm_engine_capacity(const nm_engine *e);
// The options the engine was created with (device never NULL: "cpu" or "cuda").
const nm_engine_options *nm_engine_get_options(const nm_engine *e);

// ids: [T] token ids, -1 for an image patch; patch_idx: [T] patch index where ids = -1.
// pixels: (3, S, S) normalised image (needed when any patch is present). All host memory.
// logits: (T, V) when all_logits, else (V) for the last token; may be NULL.
// trace: may be NULL; else its capacity must cover pos + T.
nm_status nm_engine_forward(nm_engine *e, const int32_t *ids, const int32_t *patch_idx, const float *pixels, int T,
                            float *logits, int all_logits, nm_trace_sample *trace, nm_error *err);

#endif
