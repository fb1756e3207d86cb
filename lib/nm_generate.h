// nm_generate.h — one sample end to end: image and prompt in, greedy answer and a complete
// trace out. Prefill runs the whole prompt as one batch; each generated token (the last one
// and an EOS included) is then fed through the model, so the trace has exactly one record
// per token of the sequence.
#ifndef NM_GENERATE_H
#define NM_GENERATE_H

#include "nm_engine.h"
#include "nm_error.h"
#include "nm_model.h"
#include "nm_trace.h"

typedef struct {
    const char *prompt;     // UTF-8
    const char *image_path; // PNG or JPEG; NULL for a text-only prompt
    int max_new_tokens;     // 0: prefill only
    nm_engine_options engine; // backend of the engine created here (zero: the CPU)
} nm_request;

// Runs one request. *engine is created (on req->engine's backend) or grown as needed and reused
// across calls (pass a pointer to NULL the first time; free with nm_engine_free). `trace` is initialised here and
// owned by the caller afterwards (nm_trace_sample_free), also on failure.
nm_status nm_generate(const nm_model *m, nm_engine **engine, const nm_request *req, nm_trace_sample *trace,
                      nm_error *err);

// Index of the largest logit; ties go to the lowest id.
int nm_argmax(const float *x, int n);

#endif
