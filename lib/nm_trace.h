// nm_trace.h — routing traces: the in-memory record of one sample and its HDF5 file form
// (DESIGN.md §4; the schema is documented in README.md).
#ifndef NM_TRACE_H
#define NM_TRACE_H

#include <stdint.h>

#include "nm_config.h"
#include "nm_error.h"

// Token modality (tokens/modality) and segment (tokens/segment) codes.
enum { NM_MOD_TEXT = 0, NM_MOD_VISION = 1, NM_MOD_SPECIAL = 2, NM_MOD_COUNT = 3 };
enum { NM_SEG_BOS = 0, NM_SEG_IMAGE = 1, NM_SEG_PROMPT = 2, NM_SEG_ANSWER = 3, NM_SEG_COUNT = 4 };

// One sample: the token table and, for every MoE layer and token, the routing record.
// Per-token arrays have room for `capacity` tokens; `n_tokens` of them are filled.
// Routing arrays are laid out [layer][token][slot] with the token stride = capacity:
// index of (l, t, k) is (l * capacity + t) * top_k + k; of (l, t) is l * capacity + t.
typedef struct {
    char *image_path;  // NULL for a text-only sample
    char *prompt;      // UTF-8 prompt text
    char *answer;      // generated text, valid UTF-8 (U+FFFD for bytes that start no character)
    int image_width, image_height; // original image size (0 when no image)
    int grid_rows, grid_cols;      // patch grid (0 when no image)
    int n_prompt_tokens;           // tokens before the first generated one

    int n_layers, top_k, capacity, n_tokens;
    int32_t *token_id;  // [cap] byte/special id, -1 for an image patch
    char **token_text;  // [cap] owned UTF-8 display strings (never NULL once filled)
    uint8_t *modality;  // [cap] NM_MOD_*
    uint8_t *segment;   // [cap] NM_SEG_*
    int16_t *patch;     // [cap][2] grid row, col; -1, -1 for non-image tokens
    uint8_t *n_real;    // [L][cap]
    int16_t *slot;      // [L][cap][K] expert id, -1 for a null copy; descending p
    float *prob;        // [L][cap][K] softmax p over all N+M slots (null: one copy's p)
    float *gate;        // [L][cap][K] renormalised gate (0 for null slots when null_kind = zero)
    float *null_mass;   // [L][cap] total p on the M null copies
    float *lse;         // [L][cap] logsumexp of the expanded logits
} nm_trace_sample;

nm_status nm_trace_sample_init(nm_trace_sample *s, int n_layers, int top_k, int capacity, nm_error *err);
void nm_trace_sample_free(nm_trace_sample *s);

// ---- HDF5 files ----

typedef struct nm_trace_file nm_trace_file;

// Opens `path` for writing samples. Never modifies an existing file in place: the samples
// go to a temporary file beside it (`path`.tmp-<pid>) and nm_trace_file_commit() atomically
// renames it over `path`. With append = 1 an existing trace is first copied to the temporary
// file (it must be a nullmap trace with the same model shape: num_layers, top_k, num_experts,
// null_copies); with append = 0 an existing `path` is refused unless `overwrite` is set. A file
// that is not a nullmap trace (not HDF5, another HDF5 file, a directory) is always refused.
// It holds the lock file `path`.lock until commit or abort, as the durable writer below does, so
// a second writer (in this process or another) is refused; commit refuses to replace a
// target that changed on disk after open. `model_name` is recorded as an attribute (may be NULL).
nm_status nm_trace_file_open(nm_trace_file **out, const char *path, const nm_config *cfg,
                             const char *model_name, int append, int overwrite, nm_error *err);
// Like nm_trace_file_open, but every sample is committed to `path` before write_sample returns
// (README "Crash safety"): a kill at any moment leaves `path` a complete trace holding every
// sample written before it, and readers of `path` see one committed state. The writer keeps a
// shadow copy `path`.shadow, uses `path`.prev during a commit and holds the lock file
// `path`.lock (a second writer is refused); all three go on commit or abort, and the leftovers of
// a crashed writer are cleaned up by the next one. With append = 1 (also when resuming) an
// existing trace is copied once into the shadow. With overwrite = 1 an existing trace is
// replaced when the first sample (or, if none, the commit) is committed.
nm_status nm_trace_file_open_durable(nm_trace_file **out, const char *path, const nm_config *cfg,
                                     const char *model_name, int append, int overwrite, nm_error *err);
// Appends one sample as /samples/<NNNNNN> (next free index). Returns the index in *index.
nm_status nm_trace_file_write_sample(nm_trace_file *f, const nm_trace_sample *s, int *index, nm_error *err);
// Writes one sample as /samples/<index> (6 digits); an existing sample of that name is refused.
nm_status nm_trace_file_write_sample_at(nm_trace_file *f, const nm_trace_sample *s, int index, nm_error *err);
int nm_trace_file_num_samples(const nm_trace_file *f);
// One past the largest sample index in the file (the index write_sample uses next).
int nm_trace_file_next_index(const nm_trace_file *f);
// 1 when a failed write left the writer unable to go on (only abort remains).
int nm_trace_file_broken(const nm_trace_file *f);
// Durable writer: how many times the shadow was made by copying the whole published file (after
// the first commit, and whenever a reader still held the previous generation) instead of
// reusing the previous generation's file.
int nm_trace_file_shadow_copies(const nm_trace_file *f);
// 1 if the file holds /samples/<index>.
int nm_trace_file_has_sample(const nm_trace_file *f, int index);
// Flushes, closes and renames the temporary file over the target. Frees f. A durable writer
// publishes what is not committed yet (a new trace without samples) and removes its shadow.
nm_status nm_trace_file_commit(nm_trace_file *f, nm_error *err);
// Closes and deletes the temporary file; the target is untouched (a durable writer's committed
// samples stay). Frees f. NULL is a no-op.
void nm_trace_file_abort(nm_trace_file *f);

// The batch (`nullmap batch`) that writes a trace, recorded in the root attributes batch_key,
// batch_first_sample and batch_pairs, so that an interrupted batch can be resumed: pair i of the
// batch is sample first_sample + i.
typedef struct {
    char key[80];      // identifies the model, the pair list and the settings; "" = none recorded
    int first_sample;
    int n_pairs;
} nm_trace_batch;
// Records b (replacing an earlier batch's record); committed with the next sample.
nm_status nm_trace_file_set_batch(nm_trace_file *f, const nm_trace_batch *b, nm_error *err);
// The recorded batch; key = "" when the trace has none.
nm_status nm_trace_file_get_batch(const nm_trace_file *f, nm_trace_batch *b, nm_error *err);

// ---- reading (info, metrics, the picture tools) ----

typedef struct {
    nm_config cfg;        // the model fields recorded in the root attributes (moe.*, num_layers,
                          // hidden_size, …; fields not recorded are 0)
    int num_samples;
    char created_by[128];
    char model_name[512];
    int format_version;
} nm_trace_info;

// Reads the root attributes and counts the samples. Checks format = "nullmap-trace".
nm_status nm_trace_read_info(nm_trace_info *info, const char *path, nm_error *err);
// Reads sample number `index` (0-based, in name order) with capacity = n_tokens.
// Validates shapes and ranges (n_real <= K, slot ids in -1..N-1) and names the bad dataset.
nm_status nm_trace_read_sample(nm_trace_sample *s, const char *path, int index, nm_error *err);

// A trace kept open for several reads: every read sees the one committed state that was there
// when it was opened, also while `nullmap batch` commits new samples to the trace (the writer
// never changes a file a reader holds open).
typedef struct nm_trace_reader nm_trace_reader;
// Opens `path` and reads its root attributes into *info (may be NULL).
nm_status nm_trace_reader_open(nm_trace_reader **r, const char *path, nm_trace_info *info, nm_error *err);
// As nm_trace_read_sample, from the open file.
nm_status nm_trace_reader_read_sample(nm_trace_reader *r, nm_trace_sample *s, int index, nm_error *err);
void nm_trace_reader_close(nm_trace_reader *r); // NULL is a no-op

#endif
