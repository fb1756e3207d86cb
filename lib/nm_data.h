// nm_data.h — a synthetic vision-language data set (generator + reader) for training small
// null-expert MoE models: `nullmap data`.
//
// Layout of a data set directory DIR:
//   DIR/info.json          what made it: generator, format version, seed, counts, image size, task mix
//   DIR/train.jsonl        one JSON object per line (UTF-8, '\n'-terminated)
//   DIR/eval.jsonl         the held-out split, same format
//   DIR/train/000017.png   8-bit RGB PNG, image_size x image_size (eval images under DIR/eval/)
//
// One record per line, keys in this order:
//   "id"       "train-000017" (split + index; unique within the data set)
//   "split"    "train" | "eval"
//   "image"    path relative to DIR ("train/000017.png"), or null for text-only samples
//   "prompt"   the question (ASCII; phrasing varies widely on purpose, see below)
//   "answer"   a word or a number, compared exactly ("red", "CAT", "3", "Wednesday")
//   "task"     "colour" | "word" | "count" | "bar" | "text"
// and for evaluation / for measuring background vs object compute:
//   image tasks: "background": "flat" | "texture"; "texture": "hstripes" | "vstripes" |
//     "dstripes" | "checks" | "dots" (texture only); "background_rgb": [[r,g,b], ...] (1 or 2 tones);
//     "objects": [{"kind": "circle"|"square"|"triangle"|"word"|"bar", "colour": NAME,
//                  "bbox": [x0, y0, x1, y1], ...}] in image pixels, x1/y1 exclusive, rounded
//     outward so that every pixel drawn for the object lies inside. Every pixel outside all
//     bboxes is background. Words add "text"; bars add "height" (pixels, exact: bars are
//     pixel-aligned rectangles standing on one baseline) and "position" (1 = leftmost).
//   "colour": "target": {"kind": K}        the one object of kind K (unique in the image)
//   "count":  "target": {} | {"kind": K} | {"colour": C}   ({} counts every shape); "count": n
//   "word":   "word": the text drawn (upper case; the answer)
//   "bar":    "ask": "tallest" | "shortest", "answer_by": "colour" | "position"
//   "text":   "family": what kind of text question ("weekday", "arithmetic", "story", ...)
//
// Determinism: sample i of a split is drawn from its own nm_rng stream, seeded from
// (seed, split, i, attempt), so the same seed gives the same bytes (JSONL and PNG) on a
// machine; train and eval use different streams. Held out: an eval sample is redrawn (next
// attempt) while its image pixels, or for text-only samples its prompt, equal a train sample's.
//
// Why the text varies: a router learns to null predictable bytes (FINDINGS.md, "Training a tiny
// null-expert VLM"), so prompts come from many templates with synonyms, word orders, optional
// context sentences and answer-format hints, and ~20% of samples are text-only questions
// (arithmetic, sequences, spelling, short stories) whose answers need the prompt's content.
#ifndef NM_DATA_H
#define NM_DATA_H

#include <stdint.h>

#include "nm_error.h"

#define NM_DATA_FORMAT_VERSION 1
#define NM_DATA_MAX_SAMPLES 10000000 // per split
#define NM_DATA_MIN_IMAGE 16
#define NM_DATA_MAX_IMAGE 1024
#define NM_DATA_DEFAULT_IMAGE 64

// Task mix: a sample is text-only with probability NM_DATA_TEXT_PERMILLE / 1000; otherwise its
// image task is colour, word, count or bar with equal probability.
#define NM_DATA_TEXT_PERMILLE 200
// Image backgrounds: a repeated texture with this probability, else one flat colour.
#define NM_DATA_TEXTURE_PERMILLE 500
// Reader limits: lines, records per split and info.json's size are checked against the
// data_line_bytes, data_records and json_file_bytes limits (nm_limits.h).

// The named object colours (answers of "colour" questions), well separated in RGB and from
// every background tone.
typedef struct {
    const char *name;
    uint8_t rgb[3];
} nm_data_colour;
#define NM_DATA_N_COLOURS 6
extern const nm_data_colour nm_data_colours[NM_DATA_N_COLOURS];

// The colour name recorded for words: they are printed in near-black ink (25, 25, 25).
#define NM_DATA_WORD_INK "black"

// Background kind of an image record ("background"); UNKNOWN when the record has none.
enum { NM_DATA_BG_UNKNOWN = 0, NM_DATA_BG_FLAT = 1, NM_DATA_BG_TEXTURE = 2 };
// Largest bbox coordinate the reader accepts (the image itself is checked by its user).
#define NM_DATA_MAX_COORD (1 << 24)

// One entry of a record's "objects".
typedef struct {
    char *kind;   // "circle", "square", "triangle", "word", "bar" (any non-empty string is read)
    char *colour; // NULL when the object has no "colour"
    int bbox[4];  // x0, y0, x1, y1 in the data image's pixels, x1/y1 exclusive; 0 <= x0 < x1, 0 <= y0 < y1
} nm_data_object;

typedef struct {
    char *id;
    char *image; // DIR joined with the record's relative path (or the path as is if absolute); NULL: text-only
    char *prompt, *answer, *task;
    // Ground truth for evaluation; all optional (text records have none).
    int background;          // NM_DATA_BG_*
    int has_objects;         // 1 when the record has "objects" (possibly empty): every pixel outside
                             // the bboxes is background; 0: unknown, the image cannot be split
    int n_objects;
    nm_data_object *objects; // [n_objects]
} nm_data_record;

typedef struct {
    nm_data_record *rec;
    int n;
    char *dir;
    int image_size; // "image_size" of DIR/info.json (images are square); 0 when there is no info.json
} nm_dataset;

// Loads DIR/<split>.jsonl (split "train" or "eval"). A malformed line (bad JSON, not an object,
// a missing or mistyped field, an empty prompt/answer, invalid UTF-8, a line over
// the data_line_bytes limit) fails with NM_ERR_FORMAT and a message "FILE:LINE: what is wrong".
// The optional fields are checked when present: "background" must be "flat" or "texture";
// "objects" an array of objects, each with a non-empty string "kind", an optional string
// "colour" and a "bbox" of 4 integers 0 <= x0 < x1 <= NM_DATA_MAX_COORD (likewise y).
// DIR/info.json is read when present (a malformed one, or one without a positive integer
// "image_size", fails naming it). Other keys are ignored. d is zeroed on failure.
nm_status nm_dataset_load(nm_dataset *d, const char *dir, const char *split, nm_error *err);
void nm_dataset_free(nm_dataset *d); // safe on a zeroed d

// Writes a data set into DIR (layout above): n_train and n_eval in 0..NM_DATA_MAX_SAMPLES (not
// both 0), image_size in NM_DATA_MIN_IMAGE..NM_DATA_MAX_IMAGE.
//
// Atomic as a whole: everything is written into DIR.tmp-<pid> (a sibling), flushed to disk
// (syncfs), and renamed to DIR at the end; a failure removes the temporary directory, and an
// interrupted run leaves at most DIR.tmp-<pid>, never a DIR that looks complete.
// An existing DIR must be empty, unless force; force replaces only a directory that holds a
// nullmap data set (info.json with "format": "nullmap-data"), never any other directory.
// progress(ctx, done, total), if given, is called now and then with total = n_train + n_eval.
nm_status nm_data_generate(const char *dir, int n_train, int n_eval, uint64_t seed, int image_size, int force,
                           void (*progress)(void *, int, int), void *ctx, nm_error *err);

#endif
