// nm_tensor_file.c — float32 tensor files (safetensors, Hugging Face layout): atomic writer,
// checked reader, metadata.
//
// The model writer (nm_safetensors_write, used by nm_model_save) stays as it is: it writes the
// tensors in the model's own order with fixed metadata, and model files must not change. This
// writer produces what safetensors' own `serialize` produces for the same F32 tensors, so a
// checkpoint is byte-identical to one written from Python.
#include "nm_tensor_file.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nm_fileutil.h"
#include "nm_limits.h"
#include "nm_safetensors.h"
#include "nm_tokenizer.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "nm_tensor_file writes the host's floats as they are: safetensors data is little-endian"
#endif

typedef struct {
    const char *name;
    int index;   // into the caller's arrays
    size_t bytes; // numel * 4
} entry;

static int cmp_entry_name(const void *a, const void *b) {
    // strcmp compares as unsigned char: the byte order of Rust's String::cmp
    return strcmp(((const entry *)a)->name, ((const entry *)b)->name);
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(const char *const *)a, *(const char *const *)b); }

// Checks tensor i's arguments and sets *bytes to its data size.
static nm_status check_tensor(const char *path, int i, const char *name, int ndim, const int64_t *shape,
                              const float *data, size_t *bytes, nm_error *err) {
    if (!name || !*name) return nm_fail(err, NM_ERR_INVALID, "%s: tensor %d has no name", path, i);
    if (!nm_utf8_valid(name, strlen(name), NULL))
        return nm_fail(err, NM_ERR_INVALID, "%s: tensor name \"%s\" is not valid UTF-8", path, name);
    if (strcmp(name, "__metadata__") == 0)
        return nm_fail(err, NM_ERR_INVALID, "%s: \"__metadata__\" is reserved and cannot name a tensor", path);
    if (ndim < 0 || ndim > NM_ST_MAX_NDIM)
        return nm_fail(err, NM_ERR_INVALID, "%s: tensor \"%s\" has %d dimensions (0 to %d allowed)", path, name, ndim,
                       NM_ST_MAX_NDIM);
    if (ndim > 0 && !shape) return nm_fail(err, NM_ERR_INVALID, "%s: tensor \"%s\" has no shape", path, name);
    size_t numel = 1;
    for (int d = 0; d < ndim; d++) {
        if (shape[d] < 0)
            return nm_fail(err, NM_ERR_INVALID, "%s: tensor \"%s\" has a negative size %lld", path, name,
                           (long long)shape[d]);
        if (shape[d] != 0 && numel > SIZE_MAX / 4 / (uint64_t)shape[d])
            return nm_fail(err, NM_ERR_LIMIT, "%s: tensor \"%s\" is too large", path, name);
        numel *= (size_t)shape[d];
    }
    if (numel > 0 && !data) return nm_fail(err, NM_ERR_INVALID, "%s: tensor \"%s\" has no data", path, name);
    *bytes = numel * 4;
    return NM_OK;
}

// Parses the caller's metadata into a new object with the keys in sorted order (*out; NULL
// when metadata_json is NULL).
static nm_status metadata_sorted(const char *path, const char *metadata_json, json_t **out, nm_error *err) {
    *out = NULL;
    if (!metadata_json) return NM_OK;
    json_error_t jerr;
    json_t *in = json_loads(metadata_json, JSON_REJECT_DUPLICATES, &jerr);
    if (!in) return nm_fail(err, NM_ERR_INVALID, "%s: metadata is not valid JSON (%s)", path, jerr.text);
    nm_status s = NM_OK;
    const char **keys = NULL;
    json_t *sorted = NULL;
    if (!json_is_object(in)) {
        s = nm_fail(err, NM_ERR_INVALID, "%s: metadata must be a JSON object of strings", path);
        goto out;
    }
    const size_t nk = json_object_size(in);
    keys = malloc((nk ? nk : 1) * sizeof *keys);
    sorted = json_object();
    if (!keys || !sorted) {
        s = NM_NOMEM(err, "metadata");
        goto out;
    }
    size_t k = 0;
    const char *key;
    json_t *v;
    json_object_foreach(in, key, v) {
        if (!json_is_string(v)) {
            s = nm_fail(err, NM_ERR_INVALID, "%s: metadata value of \"%s\" is not a string (safetensors allows only strings)",
                        path, key);
            goto out;
        }
        keys[k++] = key;
    }
    qsort(keys, k, sizeof *keys, cmp_str);
    for (size_t i = 0; i < k; i++)
        if (json_object_set(sorted, keys[i], json_object_get(in, keys[i])) != 0) {
            s = NM_NOMEM(err, "metadata");
            goto out;
        }
out:
    free(keys);
    json_decref(in);
    if (s != NM_OK) json_decref(sorted);
    else *out = sorted;
    return s;
}

nm_status nm_tensor_file_write(const char *path, int n, const char *const *names, const int *ndims,
                               const int64_t *const *shapes, const float *const *data,
                               const char *metadata_json, nm_error *err) {
    if (n < 0 || (uint64_t)n > nm_limit(NM_LIMIT_SAFETENSORS_TENSORS))
        return nm_fail(err, NM_ERR_INVALID, "%s: %d tensors (0 to %llu allowed)", path, n,
                       (unsigned long long)nm_limit(NM_LIMIT_SAFETENSORS_TENSORS));
    if (n > 0 && (!names || !ndims)) return nm_fail(err, NM_ERR_INVALID, "%s: no tensor names or dimensions", path);
    nm_status s = NM_OK;
    entry *order = malloc((size_t)(n ? n : 1) * sizeof *order);
    json_t *hdr = json_object(), *meta = NULL;
    char *htext = NULL;
    nm_atomic_file af;
    int af_open = 0;
    if (!order || !hdr) {
        s = NM_NOMEM(err, "tensor file header");
        goto out;
    }
    for (int i = 0; i < n; i++) {
        order[i] = (entry){names[i], i, 0};
        if ((s = check_tensor(path, i, order[i].name, ndims[i], shapes ? shapes[i] : NULL, data ? data[i] : NULL,
                              &order[i].bytes, err)) != NM_OK)
            goto out;
    }
    size_t total = 0;
    for (int i = 0; i < n; i++) {
        if (order[i].bytes > SIZE_MAX - total) {
            s = nm_fail(err, NM_ERR_LIMIT, "%s: the tensors' total size overflows", path);
            goto out;
        }
        total += order[i].bytes;
    }
    qsort(order, (size_t)n, sizeof *order, cmp_entry_name);
    for (int i = 1; i < n; i++)
        if (strcmp(order[i - 1].name, order[i].name) == 0) {
            s = nm_fail(err, NM_ERR_INVALID, "%s: tensor name \"%s\" appears twice", path, order[i].name);
            goto out;
        }
    if ((s = metadata_sorted(path, metadata_json, &meta, err)) != NM_OK) goto out;
    // "__metadata__" first, then the tensors in data order, as safetensors serialises its header
    if (meta && json_object_set(hdr, "__metadata__", meta) != 0) {
        s = NM_NOMEM(err, "tensor file header");
        goto out;
    }
    size_t off = 0;
    for (int i = 0; i < n; i++) {
        const int src = order[i].index;
        json_t *e = json_object(), *shape = json_array(), *offsets = json_array();
        int bad = !e || !shape || !offsets;
        for (int d = 0; !bad && d < ndims[src]; d++) bad |= json_array_append_new(shape, json_integer(shapes[src][d]));
        bad = bad || json_array_append_new(offsets, json_integer((json_int_t)off)) ||
              json_array_append_new(offsets, json_integer((json_int_t)(off + order[i].bytes)));
        // set_new takes its value's reference even on failure; NULL values are refused there
        bad = bad || json_object_set_new(e, "dtype", json_string("F32")) || json_object_set(e, "shape", shape) ||
              json_object_set(e, "data_offsets", offsets) || json_object_set(hdr, order[i].name, e);
        json_decref(e);
        json_decref(shape);
        json_decref(offsets);
        if (bad) {
            s = NM_NOMEM(err, "tensor file header");
            goto out;
        }
        off += order[i].bytes;
    }
    htext = json_dumps(hdr, JSON_COMPACT | JSON_PRESERVE_ORDER);
    if (!htext) {
        s = NM_NOMEM(err, "tensor file header text");
        goto out;
    }
    const size_t hlen = strlen(htext), padded = hlen + (8 - hlen % 8) % 8;
    if ((s = nm_atomic_open(&af, path, err)) != NM_OK) goto out;
    af_open = 1;
    uint8_t len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (uint8_t)((uint64_t)padded >> (8 * i));
    static const char spaces[] = "       "; // at most 7 are needed
    if ((s = nm_atomic_write(&af, len8, 8, err)) != NM_OK || (s = nm_atomic_write(&af, htext, hlen, err)) != NM_OK ||
        (s = nm_atomic_write(&af, spaces, padded - hlen, err)) != NM_OK)
        goto out;
    for (int i = 0; i < n; i++)
        if (order[i].bytes && (s = nm_atomic_write(&af, data[order[i].index], order[i].bytes, err)) != NM_OK) goto out;
    af_open = 0; // commit closes the file and removes the temporary on failure
    s = nm_atomic_commit(&af, err);
out:
    if (af_open) nm_atomic_abort(&af);
    free(htext);
    json_decref(meta);
    json_decref(hdr);
    free(order);
    return s;
}

nm_status nm_tensor_file_read(const char *path, int n, const char *const *names, const int64_t *numel,
                              float *const *dst, nm_error *err) {
    if (n < 0) return nm_fail(err, NM_ERR_INVALID, "%s: %d tensors requested", path, n);
    nm_safetensors st;
    nm_status s = nm_safetensors_open(&st, path, err);
    if (s != NM_OK) return s;
    // every check before the first copy: a failed read leaves the caller's buffers as they were
    for (int i = 0; i < n && s == NM_OK; i++) {
        const nm_st_tensor *t = nm_safetensors_find(&st, names[i]);
        if (!t) s = nm_fail(err, NM_ERR_FORMAT, "%s: tensor \"%s\" is missing", path, names[i]);
        else if (t->dtype != NM_DT_F32)
            s = nm_fail(err, NM_ERR_UNSUPPORTED, "%s: tensor \"%s\" has dtype %s, expected F32", path, names[i],
                        nm_dtype_name(t->dtype));
        else if (numel[i] < 0 || t->numel != (uint64_t)numel[i])
            s = nm_fail(err, NM_ERR_INVALID, "%s: tensor \"%s\" has %zu elements, expected %lld", path, names[i],
                        t->numel, (long long)numel[i]);
    }
    for (int i = 0; i < n && s == NM_OK; i++) {
        const nm_st_tensor *t = nm_safetensors_find(&st, names[i]);
        if (t->numel) memcpy(dst[i], t->data, t->numel * 4); // little-endian host, as the reader assumes
    }
    nm_safetensors_close(&st);
    return s;
}

nm_status nm_tensor_file_metadata(const char *path, char **metadata_json, nm_error *err) {
    *metadata_json = NULL;
    nm_safetensors st;
    nm_status s = nm_safetensors_open(&st, path, err);
    if (s != NM_OK) return s;
    // the header was parsed and checked by the open; parse it once more for "__metadata__"
    const uint8_t *b = st.map;
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | b[i];
    json_error_t jerr;
    json_t *root = json_loadb((const char *)b + 8, (size_t)hlen, 0, &jerr), *meta = NULL;
    if (!root) {
        s = nm_fail(err, NM_ERR_INTERNAL, "%s: header parsed once but not twice (%s)", path, jerr.text);
        goto out;
    }
    meta = json_object_get(root, "__metadata__");
    if (meta && !json_is_object(meta)) {
        s = nm_fail(err, NM_ERR_FORMAT, "%s: \"__metadata__\" is not a JSON object", path);
        goto out;
    }
    *metadata_json = meta ? json_dumps(meta, JSON_COMPACT | JSON_PRESERVE_ORDER) : strdup("{}");
    if (!*metadata_json) s = NM_NOMEM(err, "metadata text");
out:
    json_decref(root);
    nm_safetensors_close(&st);
    return s;
}
