// nm_report.h — the numbers of DESIGN.md §5 for people and programs: report.md (tables a person
// reads), report.json (the same numbers for programs), report.csv (one row per trace × layer ×
// modality), for one trace or several (a sparsity sweep: one comparison table).
//
// Every number comes from nm_metrics (token-weighted over all samples of a trace: every token of
// every sample counts once). Per-sample numbers on request.
//
// Undefined values are never written as 0:
//   a mean over no tokens (e.g. vision intensity of a text-only trace)   md "n/a", JSON null, CSV empty
//   the compute distribution when every token has c_t = 0               md "undefined", JSON null, CSV empty
// Digits: md 4 significant digits (%#.4g); JSON and CSV 10 significant digits; counts are exact
// integers in JSON.
//
// ---- report.json (format "nullmap-report", format_version 1) ----
//   { "format": "nullmap-report", "format_version": 1, "created_by": "nullmap <version>",
//     "definitions": { "<metric>": "<one-line definition>", … },
//     "traces": [ {
//         "path", "model", "created_by",                       strings from the trace ("" when absent)
//         "config": { "num_layers", "num_experts", "null_copies", "top_k", "rho",
//                     "expected_real_per_token" (= K·ρ), "null_kind" ("zero"/"copy") },
//         "num_samples",
//         "metrics": METRICS,                                  all samples together
//         "samples": [ { "index", "image_path" (null: none), "prompt", "answer", "n_tokens",
//                        "n_prompt_tokens", "metrics": METRICS }, … ]   only with per-sample
//     }, … ] }
//   METRICS = { "tokens", "null_slot_ratio", "zero_compute_ratio", "compute_share_defined" (bool),
//     "modalities": { "vision"|"text"|"special"|"all": { "tokens", "token_share", "compute_sum",
//         "compute_share", "intensity", "zero_compute_ratio", "polarization" [K+1 counts],
//         "polarization_share" [K+1] } },
//     "segments": { "bos"|"image"|"prompt"|"answer"|"all": { "tokens", "intensity",
//         "zero_compute_ratio", "polarization" [K+1 counts] } },
//     "layers": [ L × { "layer", "modalities": { <mod>: { "intensity", "zero_compute_ratio",
//         "polarization" [K+1 counts] } }, "segments": { <seg>: { "intensity" } } } ] }
//   The all-layers values are the top-level "modalities"/"segments"; "layers" holds 0 … L−1.
//
// ---- report.csv (UTF-8, RFC 4180 quoting, LF line ends, header row) ----
//   trace,sample,num_layers,num_experts,null_copies,K,rho,null_kind,layer,modality,tokens,
//   token_share,compute_share,intensity,zero_compute_ratio,n_real_0,…,n_real_<Kmax>
//   One row per trace × layer × modality: layer 0 … L−1 then "all"; modality vision, text,
//   special, all. sample = "all" for the aggregate rows; with per-sample, the same block follows
//   for each sample with its 0-based index. n_real_k = share of the row's (layer, token) pairs with
//   n_real = k; columns beyond a trace's own K (Kmax = the largest K of the traces) are empty.
//   compute_share is defined over Σ_t c_t (all layers), so it is given on layer "all" rows only.
#ifndef NM_REPORT_H
#define NM_REPORT_H

#include "nm_error.h"
#include "nm_metrics.h"
#include "nm_trace.h"

// What the per-sample sections show about a sample (owned copies).
typedef struct {
    int index;          // 0-based, samples in name order (as nm_trace_read_sample)
    char *image_path;   // NULL: no image
    char *prompt;       // never NULL once filled
    char *answer;       // never NULL once filled
    int n_tokens, n_prompt_tokens;
} nm_report_sample;

typedef struct {
    char *path;            // trace file path (shown in the report)
    nm_trace_info info;    // root attributes (model config); info.num_samples = samples added
    nm_metrics agg;        // over all samples (finished after load / nm_report_trace_finish)
    int n_samples;         // samples added
    int per_sample;        // 1: per_sample and samples are kept
    nm_metrics *per_sample_metrics; // [n_samples] (finished) or NULL
    nm_report_sample *samples;      // [n_samples] or NULL
    int cap;               // allocated length of the per-sample arrays
} nm_report_trace;

// Progress callback for loading: called after each sample (done = 1 … total).
typedef void (*nm_report_progress_fn)(void *ctx, int done, int total);

// Loads a trace and computes its metrics over all samples (and per sample with per_sample = 1).
// Errors name the file and, for a bad sample, the dataset (they come from the trace reader).
// progress may be NULL. On failure *r is left empty (nm_report_trace_free is safe on it).
nm_status nm_report_trace_load(nm_report_trace *r, const char *path, int per_sample,
                               nm_report_progress_fn progress, void *progress_ctx, nm_error *err);

// The same from samples held in memory (e.g. by `nullmap run`, without re-reading the file):
// begin (info.cfg gives L and K; info.num_samples is ignored) → add each sample → finish.
nm_status nm_report_trace_begin(nm_report_trace *r, const char *path, const nm_trace_info *info,
                                int per_sample, nm_error *err);
nm_status nm_report_trace_add(nm_report_trace *r, const nm_trace_sample *s, nm_error *err);
void nm_report_trace_finish(nm_report_trace *r);

// Frees everything and zeroes *r. Safe on a zeroed struct.
void nm_report_trace_free(nm_report_trace *r);

// The three documents as malloc'd NUL-terminated text (NULL + err on failure). n ≥ 1 traces;
// per-sample sections/rows are written for traces loaded with per_sample = 1.
char *nm_report_md(const nm_report_trace *r, int n, nm_error *err);
char *nm_report_json(const nm_report_trace *r, int n, nm_error *err);
char *nm_report_csv(const nm_report_trace *r, int n, nm_error *err);

// Each writes one file atomically (temporary file + rename; an existing file is replaced).
nm_status nm_report_write_md(const nm_report_trace *r, int n, const char *path, nm_error *err);
nm_status nm_report_write_json(const nm_report_trace *r, int n, const char *path, nm_error *err);
nm_status nm_report_write_csv(const nm_report_trace *r, int n, const char *path, nm_error *err);

// Writes dir/report.md, dir/report.json and dir/report.csv, all or none: the three documents are
// built and written to temporary files first, then renamed into place. dir must exist. Without
// overwrite, an existing report.* is refused (NM_ERR_IO, naming it) before anything is written.
// If a rename fails midway, the files already renamed are removed, so no mixed set is left (a
// report.* replaced before the failure is then gone, not restored).
nm_status nm_report_write_dir(const nm_report_trace *r, int n, const char *dir, int overwrite, nm_error *err);

#endif
