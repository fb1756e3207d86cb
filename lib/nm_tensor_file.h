// nm_tensor_file.h — named float32 tensors in a safetensors file: training checkpoints and
// optimizer state (the AdamW moments), readable by `safetensors.torch.load_file`.
//
// The file is laid out exactly as the Hugging Face writer (safetensors' `serialize`) lays out an
// all-F32 dict: u64 little-endian header length; the JSON header, compact, with "__metadata__"
// first (when given) and then one entry per tensor {"dtype":"F32","shape":[..],
// "data_offsets":[begin,end]} in byte order of the names (strcmp); spaces pad the header to a
// multiple of 8 bytes, so the data section starts 8-byte aligned; the tensors' data follow in
// the same order, packed, and the file ends with the last one. Metadata values must be strings
// (the format's rule); its keys are written sorted (safetensors writes them in hash order). So the
// bytes equal safetensors' for the same tensors and at most one metadata key (control characters
// in a name, escaped \u00XX in both, are the one other difference: upper- vs lower-case hex).
//
// Writes are atomic (nm_fileutil.h): the file is written to `path`.tmp-<pid>, fsynced and renamed
// over `path`, so a reader or a crash sees the old file or the new one, never a mix; on any
// failure the temporary file is removed and an existing `path` is left as it was.
#ifndef NM_TENSOR_FILE_H
#define NM_TENSOR_FILE_H

#include <stdint.h>

#include "nm_error.h"

// Writes n float32 tensors. names[i]: unique, non-empty UTF-8, not "__metadata__".
// ndims[i]: 0 (a scalar) to NM_ST_MAX_NDIM; shapes[i]: ndims[i] sizes >= 0 (may be NULL for a
// scalar); data[i]: the product of the sizes in floats, row-major (may be NULL when that is 0).
// metadata_json: NULL, or a JSON object whose values are all strings, e.g.
// {"step":"1200","format":"nullmap-optim"}. NM_ERR_INVALID for a bad argument (nothing written),
// NM_ERR_IO for a file that cannot be written, NM_ERR_NOMEM.
nm_status nm_tensor_file_write(const char *path, int n, const char *const *names, const int *ndims,
                               const int64_t *const *shapes, const float *const *data,
                               const char *metadata_json, nm_error *err);

// Reads the named F32 tensors into the caller's buffers: dst[i] receives numel[i] floats. The
// whole file is validated first (nm_safetensors_open), then every requested tensor is checked
// before any buffer is written, so on failure no dst has changed. Errors name the file and the
// tensor: missing (NM_ERR_FORMAT), not F32 (NM_ERR_UNSUPPORTED), another number of elements
// (NM_ERR_INVALID); a truncated or malformed file fails as nm_safetensors_open does. The file
// may hold other tensors too.
nm_status nm_tensor_file_read(const char *path, int n, const char *const *names, const int64_t *numel,
                              float *const *dst, nm_error *err);

// The file's "__metadata__" object as compact JSON text (malloc'd, the caller frees); "{}" when
// the file has none. The file is validated as by nm_tensor_file_read.
nm_status nm_tensor_file_metadata(const char *path, char **metadata_json, nm_error *err);

#endif
