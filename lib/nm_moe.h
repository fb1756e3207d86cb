// nm_moe.h — the null-expert MoE layer (DESIGN.md §2): router, dispatch, grouped expert
// GEMMs with null slots cut, per-token combine.
#ifndef NM_MOE_H
#define NM_MOE_H

#include <stddef.h>
#include <stdint.h>

#include "nm_config.h"
#include "nm_error.h"
#include "nm_model.h"

// The routing decision for T tokens; arrays are owned by the caller.
typedef struct {
    uint8_t *n_real;  // [T]     selected real experts per token (0..K)
    int16_t *slot;    // [T, K]  expert id per selected slot, descending p; -1 = null copy
    float *prob;      // [T, K]  softmax p over all N+M slots (null slot: one copy's p)
    float *gate;      // [T, K]  renormalised gate weight (zero kind: 0 for null slots)
    float *null_mass; // [T]     total p of the M null copies
    float *lse;       // [T]     logsumexp of the expanded logits
} nm_routing;

// Routes T tokens from their router logits.
// z: (T, N+1), column N is the null logit. The M null copies are never materialised:
// they all share the null logit and sort after every real expert with an equal logit.
void moe_route_null(const nm_routing *r, const float *z, int T, const nm_moe_config *mc);

// Reusable scratch for nm_moe_forward: zero-initialise it, pass it to every call, free it with
// nm_moe_workspace_free. Its arrays grow on demand (any T, any config) and are internal.
typedef struct {
    float *logits;       // (T, N+1) router logits
    float *yout;         // (T*K, D) gated expert outputs, one contiguous block of rows per expert
    float *shared_h;     // (2, T, Hs)
    float *scratch;      // per thread: transposed input, hidden and output tiles of one expert
    int32_t *row_slot;   // [T*K] slot (t*K + k) of each row of yout
    int32_t *slot_row;   // [T*K] row in yout for (t, k); -1 for null slots
    int32_t *counts;     // [N+1] rows per expert
    int32_t *offsets;    // [N+1] first row of each expert
    int32_t *cursor;     // [N]
    int32_t *tasks;      // [6 * (T*K + N)] (expert, first row, rows) work items and a sort buffer
    uint8_t *n_real; int16_t *slot; float *prob, *gate, *null_mass, *lse; // routing, when no trace is kept
    size_t cap[16];      // bytes held by each array above
    int scratch_threads; // threads the scratch was cut for
} nm_moe_workspace;

void nm_moe_workspace_free(nm_moe_workspace *ws);

// out = SharedExpert(y) + Σ_{i ∈ R} g_i E_i(y)   (DESIGN.md §2; gates scale expert outputs)
// y: (T, D) normalised input; out: (T, D) (overwritten). routing: filled for the T tokens;
// pass NULL to use workspace arrays. Cost follows the number of real slots, not K.
nm_status nm_moe_forward(float *out, const float *y, const nm_moe_weights *w, const nm_moe_config *mc, int T, int D,
                         nm_moe_workspace *ws, const nm_routing *routing, nm_error *err);

// The reference: the same layer computed token by token in float64 straight from the
// definition (no sorting, no grouping). Used by tests. out: (T, D)
void nm_moe_forward_naive(double *out, const float *y, const nm_moe_weights *w, const nm_moe_config *mc, int T, int D);

#endif
