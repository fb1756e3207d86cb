// nm_metrics.h — compute metrics of null-expert routing (DESIGN.md §5; paper section 6).
//
// Definitions (exactly DESIGN.md §5):
//   c_{l,t} = n_real_{l,t} / K                 compute score of token t in layer l
//   c_t     = (1/L) Σ_l c_{l,t}                compute score of token t
//   intensity of a modality / segment          mean of c_t over its tokens
//   token distribution                         each modality's share of the tokens
//   compute distribution                       each modality's share of Σ_t c_t; undefined (NAN,
//                                              compute_share_defined = 0) when every c_t = 0
//   null slot ratio                            1 − mean c (over all layer-token pairs)
//   zero-compute ratio                         share of (layer, token) pairs with n_real = 0
//   polarization histogram                     counts of n_real = 0…K per layer, per modality, overall
//
// Aggregation over samples is token-weighted: every token of every added sample counts once,
// exactly as if all samples were concatenated into one (a long sample weighs more than a short
// one). For per-sample values (the overlay insets) use one nm_metrics per sample.
//
// Only integer counts are accumulated (the polarization histograms, token counts); every double
// is derived from them by nm_metrics_finish(), so results are exact functions of the multiset of
// tokens and do not depend on the order in which samples are added.
//
// Index conventions, used by every array and accessor below:
//   layer  0 … L−1 one MoE layer,       L (NM_LAYER_ALL(m)) = all layers together;
//   mod    NM_MOD_TEXT/VISION/SPECIAL,  NM_MOD_ALL = all tokens;
//   seg    NM_SEG_BOS/IMAGE/PROMPT/ANSWER, NM_SEG_ALL = all tokens;
//   k      0 … K (n_real).
// Because every layer sees the same tokens, "all layers" of a mean is the mean of c_t:
// layer_intensity[L][mod] == intensity[mod].
//
// Use:  nm_metrics_init → nm_metrics_add_sample (any number) → nm_metrics_finish → read fields
//       → nm_metrics_free. More samples may be added after finish; call finish again.
#ifndef NM_METRICS_H
#define NM_METRICS_H

#include "nm_error.h"
#include "nm_trace.h"

enum { NM_MOD_ALL = NM_MOD_COUNT };     // "all modalities" column
enum { NM_SEG_ALL = NM_SEG_COUNT };     // "all segments" column
#define NM_LAYER_ALL(m) ((m)->n_layers) // "all layers" row

// n_real is stored as uint8 in a trace, so K above 255 cannot be traced.
#define NM_METRICS_MAX_TOP_K 255

typedef struct {
    int n_layers, top_k; // L, K: every added sample must match
    long long n_samples; // samples added

    // ---- accumulated exact counts (written by nm_metrics_add_sample / finish) ----
    long long n_tokens[NM_MOD_COUNT + 1];     // tokens by modality; [NM_MOD_ALL] = all (set by finish)
    long long n_seg_tokens[NM_SEG_COUNT + 1]; // tokens by segment; [NM_SEG_ALL] = all (set by finish)
    // Polarization histograms: number of (layer, token) pairs with n_real = k.
    // Row L and column NM_MOD_ALL / NM_SEG_ALL are filled by nm_metrics_finish().
    long long *polarization;     // [L + 1][NM_MOD_COUNT + 1][K + 1]
    long long *seg_polarization; // [L + 1][NM_SEG_COUNT + 1][K + 1]

    // ---- derived by nm_metrics_finish (NAN where the group has no tokens) ----
    double token_share[NM_MOD_COUNT + 1];   // n_tokens[mod] / n_tokens[ALL]; [ALL] = 1
    double compute_sum[NM_MOD_COUNT + 1];   // Σ_t c_t over the modality's tokens (0 when none)
    int compute_share_defined;              // 0 when every token has c_t = 0 (or there are none)
    double compute_share[NM_MOD_COUNT + 1]; // compute_sum[mod] / compute_sum[ALL]; all NAN when undefined
    double intensity[NM_MOD_COUNT + 1];     // mean c_t over the modality's tokens; [ALL] = overall
    double seg_intensity[NM_SEG_COUNT + 1]; // mean c_t per segment (figure 5 insets); [ALL] = overall
    double *layer_intensity;                // [L + 1][NM_MOD_COUNT + 1] mean c_{l,t}; row L = intensity
    double *layer_seg_intensity;            // [L + 1][NM_SEG_COUNT + 1] mean c_{l,t}; row L = seg_intensity
    double null_slot_ratio;                 // 1 − intensity[NM_MOD_ALL]
    double zero_compute_ratio;              // share of (layer, token) pairs with n_real = 0
} nm_metrics;

// Prepares an empty accumulator for L layers and top-K (1 ≤ L ≤ NM_MAX_LAYERS,
// 1 ≤ K ≤ NM_METRICS_MAX_TOP_K). Derived fields start as for no tokens (NANs). On failure *m is
// left zeroed (nm_metrics_free is safe on it).
nm_status nm_metrics_init(nm_metrics *m, int n_layers, int top_k, nm_error *err);

// Adds the first n_tokens tokens of a sample (arrays read with the sample's capacity as token
// stride; only n_layers, top_k, capacity, n_tokens, modality, segment, n_real are used).
// Checks that L and K match, 0 ≤ n_tokens ≤ capacity, modality and segment codes are known and
// n_real ≤ K; on any error nothing is added (NM_ERR_INVALID).
nm_status nm_metrics_add_sample(nm_metrics *m, const nm_trace_sample *s, nm_error *err);

// Fills the summary rows/columns of the counts and every derived field. Idempotent.
void nm_metrics_finish(nm_metrics *m);

// Frees the arrays and zeroes *m. Safe on a zeroed struct and on NULL.
void nm_metrics_free(nm_metrics *m);

// ---- accessors (indices as above; out-of-range indices give 0 or NAN) ----

// Polarization count: (layer, token) pairs of modality `mod` in `layer` with n_real = k.
long long nm_metrics_polarization(const nm_metrics *m, int layer, int mod, int k);
long long nm_metrics_seg_polarization(const nm_metrics *m, int layer, int seg, int k);
// Pairs counted in a histogram row (= tokens of the group, times L for the all-layers row).
long long nm_metrics_pairs(const nm_metrics *m, int layer, int mod);
// Mean c_{l,t} of the modality's tokens in `layer` (layer L: mean c_t). NAN when none.
double nm_metrics_layer_intensity(const nm_metrics *m, int layer, int mod);
double nm_metrics_layer_seg_intensity(const nm_metrics *m, int layer, int seg);
// Share of the modality's (layer, token) pairs with n_real = 0 (layer L: over all layers).
// nm_metrics_zero_compute(m, NM_LAYER_ALL(m), NM_MOD_ALL) == m->zero_compute_ratio. NAN when none.
double nm_metrics_zero_compute(const nm_metrics *m, int layer, int mod);

// Per-token compute scores of one sample, for overlays: out[t] = c_{layer,t} for
// 0 ≤ layer < L, or c_t for layer = L (the mean over layers), t < n_tokens. Computed from
// integer sums like the metrics above. Checks layer and n_real ≤ K (NM_ERR_INVALID).
nm_status nm_metrics_token_scores(const nm_trace_sample *s, int layer, double *out, nm_error *err);

// Display names: "text", "vision", "special" / "bos", "image", "prompt", "answer";
// "all" for NM_MOD_ALL / NM_SEG_ALL; "?" for anything else.
const char *nm_modality_name(int mod);
const char *nm_segment_name(int seg);

#endif
