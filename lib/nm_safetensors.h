// nm_safetensors.h — the safetensors file format (Hugging Face layout): read (mmap) and write.
//
// Layout: u64 little-endian header length N, N bytes of JSON header
// {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}},
// then the data section; offsets are relative to its start. Every claim in the header is
// checked against the file before any tensor is touched.
#ifndef NM_SAFETENSORS_H
#define NM_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "nm_error.h"

// Header lengths and entry counts are checked against the safetensors_header_bytes and
// safetensors_tensors limits (nm_limits.h) before anything is allocated from them.
#define NM_ST_MAX_NDIM 8

typedef enum {
    NM_DT_F32, NM_DT_F16, NM_DT_BF16, NM_DT_F64,
    NM_DT_I64, NM_DT_I32, NM_DT_I16, NM_DT_I8, NM_DT_U8, NM_DT_BOOL,
    NM_DT_COUNT
} nm_dtype;

const char *nm_dtype_name(nm_dtype d);
size_t nm_dtype_size(nm_dtype d);
// Parses "F32" etc.; returns -1 for an unknown name.
int nm_dtype_from_name(const char *s);

typedef struct {
    char *name;
    nm_dtype dtype;
    int ndim;
    int64_t shape[NM_ST_MAX_NDIM];
    size_t numel;
    size_t begin, nbytes; // within the data section
    const uint8_t *data;  // points into the mapped file
} nm_st_tensor;

typedef struct {
    void *map;          // mmap of the whole file (NULL when parsed from a borrowed buffer)
    size_t map_size;
    const uint8_t *data; // the data section
    size_t data_size;
    int n_tensors;
    nm_st_tensor *tensors;
} nm_safetensors;

// Maps `path` read-only and parses its header. `st` is zeroed on failure.
nm_status nm_safetensors_open(nm_safetensors *st, const char *path, nm_error *err);
// Parses a buffer that the caller keeps alive (tests, fuzzers). `name` appears in messages.
nm_status nm_safetensors_parse(nm_safetensors *st, const uint8_t *buf, size_t size, const char *name, nm_error *err);
void nm_safetensors_close(nm_safetensors *st);
const nm_st_tensor *nm_safetensors_find(const nm_safetensors *st, const char *name);

// Converts a float tensor (F32, F16, BF16, F64) to float32. out holds t->numel floats.
nm_status nm_st_tensor_to_f32(float *out, const nm_st_tensor *t, nm_error *err);
// Reads an integer tensor (I32, I64, I16, U8…) into int32 (range-checked).
nm_status nm_st_tensor_to_i32(int32_t *out, const nm_st_tensor *t, nm_error *err);

// ---- writing ----
typedef struct {
    const char *name;
    nm_dtype dtype;         // storage dtype: F32, F16 or BF16 (converted from `values`)
    int ndim;
    int64_t shape[NM_ST_MAX_NDIM];
    const float *values;    // numel float32 values
} nm_st_write_tensor;

// Writes atomically: `path`.tmp-<pid> then rename. Tensors are stored in the given order.
nm_status nm_safetensors_write(const char *path, const nm_st_write_tensor *ts, int n, nm_error *err);

// Scalar conversions (round to nearest even when narrowing).
float nm_f16_to_f32(uint16_t h);
float nm_bf16_to_f32(uint16_t b);
uint16_t nm_f32_to_f16(float f);
uint16_t nm_f32_to_bf16(float f);

#endif
