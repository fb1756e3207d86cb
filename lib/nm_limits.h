// nm_limits.h — the input limits: every size read from a file (image pixels, header lengths,
// tensor counts, trace dimensions, line lengths…) is checked against one of these before
// anything is allocated from it. Each limit has a name, a documented default and a hard
// ceiling (the largest value the code is built for: past it sizes could overflow); it can be
// raised (or lowered) up to that ceiling.
//
// How to change a limit (README.md, "Limits"): the nullmap tool reads NULLMAP_LIMIT_<NAME>
// from the environment (nm_limits_from_env) and then any number of `--set-limit name=value`
// options on any command (nm_limit_set_from_string). Programs using the library call
// nm_limit_set. Limits are process-wide; set them before any other thread uses the library.
#ifndef NM_LIMITS_H
#define NM_LIMITS_H

#include <stdint.h>

#include "nm_error.h"

// X(ID, name, default, ceiling, what the value counts)
#define NM_LIMIT_LIST(X)                                                                                     \
    X(IMAGE_PIXELS, "image_pixels", (uint64_t)64 << 20, (uint64_t)1 << 31, "pixels of a decoded image")       \
    X(IMAGE_FILE_BYTES, "image_file_bytes", (uint64_t)512 << 20, (uint64_t)1 << 36, "bytes of an image file")  \
    X(JSON_FILE_BYTES, "json_file_bytes", (uint64_t)1 << 20, (uint64_t)1 << 30,                               \
      "bytes of a config.json, info.json or state.json")                                                     \
    X(SAFETENSORS_HEADER_BYTES, "safetensors_header_bytes", (uint64_t)100 << 20, (uint64_t)1 << 32,           \
      "bytes of a safetensors JSON header")                                                                  \
    X(SAFETENSORS_TENSORS, "safetensors_tensors", 1000000, (uint64_t)1 << 26, "entries of a safetensors header") \
    X(MODEL_PARAMS, "model_params", (uint64_t)1 << 32, (uint64_t)1 << 32, "float parameters of a model")       \
    X(TRACE_SAMPLES, "trace_samples", 1000000, 1000000, "samples of a trace file")                            \
    X(TRACE_ENTRIES, "trace_entries", (uint64_t)1 << 28, (uint64_t)1 << 31,                                   \
      "routing entries of a trace sample (layers x tokens x top_k)")                                         \
    X(TRACE_STRING_BYTES, "trace_string_bytes", (uint64_t)1 << 24, (uint64_t)1 << 30,                         \
      "bytes of a string in a trace (attribute or token text)")                                              \
    X(DATA_LINE_BYTES, "data_line_bytes", (uint64_t)1 << 20, (uint64_t)1 << 30, "bytes of a data-set JSONL line") \
    X(DATA_RECORDS, "data_records", 10000000, (uint64_t)1 << 30, "records of a data-set split")               \
    X(PAIRS_FILE_BYTES, "pairs_file_bytes", (uint64_t)256 << 20, (uint64_t)1 << 34,                           \
      "bytes of a `nullmap batch` pairs list")

typedef enum {
#define NM_LIMIT_ENUM_(id, name, dflt, ceil, what) NM_LIMIT_##id,
    NM_LIMIT_LIST(NM_LIMIT_ENUM_)
#undef NM_LIMIT_ENUM_
    NM_LIMIT_COUNT
} nm_limit_id;

// The current value of a limit (its default until changed).
uint64_t nm_limit(nm_limit_id id);
uint64_t nm_limit_default(nm_limit_id id);
uint64_t nm_limit_ceiling(nm_limit_id id);
const char *nm_limit_name(nm_limit_id id);  // "image_pixels"
const char *nm_limit_what(nm_limit_id id);  // "pixels of a decoded image"
// The environment variable of a limit: "NULLMAP_LIMIT_IMAGE_PIXELS" (static storage).
const char *nm_limit_env_name(nm_limit_id id);
// Looks a limit up by name; -1 when there is none.
int nm_limit_find(const char *name);

// Sets a limit: value in 1..ceiling, else NM_ERR_INVALID with a message naming the limit.
nm_status nm_limit_set(nm_limit_id id, uint64_t value, nm_error *err);
// Parses "name=value" (value: a decimal integer, optionally with a K, M, G or T suffix meaning
// 2^10, 2^20, 2^30, 2^40) and sets it. NM_ERR_INVALID, naming what is wrong, otherwise.
nm_status nm_limit_set_from_string(const char *assignment, nm_error *err);
// Applies every NULLMAP_LIMIT_<NAME> set in the environment; a malformed value fails naming
// the variable.
nm_status nm_limits_from_env(nm_error *err);
// Restores every default (tests).
void nm_limits_reset(void);

// Fails with NM_ERR_LIMIT: "<message> over the limit of N <what> (<name>; raise it with
// --set-limit <name>=N or NULLMAP_LIMIT_<NAME>)". fmt describes the value found, e.g.
// "%s: image is %ux%u pixels,".
nm_status nm_limit_fail(nm_error *err, nm_limit_id id, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

#endif
