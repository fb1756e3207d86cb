// nm_safetensors.c — safetensors reader (mmap + full header validation) and atomic writer.
#include "nm_safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "nm_fileutil.h"
#include "nm_limits.h"

static const struct { const char *name; size_t size; } DTYPES[NM_DT_COUNT] = {
    [NM_DT_F32] = {"F32", 4}, [NM_DT_F16] = {"F16", 2}, [NM_DT_BF16] = {"BF16", 2}, [NM_DT_F64] = {"F64", 8},
    [NM_DT_I64] = {"I64", 8}, [NM_DT_I32] = {"I32", 4}, [NM_DT_I16] = {"I16", 2},  [NM_DT_I8] = {"I8", 1},
    [NM_DT_U8] = {"U8", 1},   [NM_DT_BOOL] = {"BOOL", 1},
};

const char *nm_dtype_name(nm_dtype d) { return (unsigned)d < NM_DT_COUNT ? DTYPES[d].name : "?"; }
size_t nm_dtype_size(nm_dtype d) { return (unsigned)d < NM_DT_COUNT ? DTYPES[d].size : 0; }
int nm_dtype_from_name(const char *s) {
    for (int i = 0; i < NM_DT_COUNT; i++)
        if (strcmp(s, DTYPES[i].name) == 0) return i;
    return -1;
}

void nm_safetensors_close(nm_safetensors *st) {
    if (!st) return;
    for (int i = 0; i < st->n_tensors; i++) free(st->tensors[i].name);
    free(st->tensors);
    if (st->map) munmap(st->map, st->map_size);
    memset(st, 0, sizeof *st);
}

static int cmp_begin(const void *a, const void *b) {
    const nm_st_tensor *x = *(const nm_st_tensor *const *)a, *y = *(const nm_st_tensor *const *)b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    return x->nbytes < y->nbytes ? -1 : x->nbytes > y->nbytes;
}

// Parses one header entry into t. Returns NM_OK or an error naming the tensor.
static nm_status parse_entry(nm_st_tensor *t, const char *key, json_t *v, size_t data_size, const char *name,
                             nm_error *err) {
    if (!json_is_object(v)) return nm_fail(err, NM_ERR_FORMAT, "%s: header entry \"%s\" is not an object", name, key);
    json_t *dt = json_object_get(v, "dtype"), *sh = json_object_get(v, "shape"), *off = json_object_get(v, "data_offsets");
    if (!json_is_string(dt) || !json_is_array(sh) || !json_is_array(off))
        return nm_fail(err, NM_ERR_FORMAT, "%s: tensor \"%s\" needs string \"dtype\", array \"shape\" and array \"data_offsets\"",
                       name, key);
    int d = nm_dtype_from_name(json_string_value(dt));
    if (d < 0)
        return nm_fail(err, NM_ERR_UNSUPPORTED, "%s: tensor \"%s\" has unknown dtype \"%.32s\"", name, key,
                       json_string_value(dt));
    t->dtype = (nm_dtype)d;
    size_t nd = json_array_size(sh);
    if (nd > NM_ST_MAX_NDIM)
        return nm_fail(err, NM_ERR_LIMIT, "%s: tensor \"%s\" has %zu dimensions (at most %d)", name, key, nd, NM_ST_MAX_NDIM);
    t->ndim = (int)nd;
    size_t numel = 1;
    int overflow = 0;
    for (size_t i = 0; i < nd; i++) {
        json_t *x = json_array_get(sh, i);
        if (!json_is_integer(x) || json_integer_value(x) < 0)
            return nm_fail(err, NM_ERR_FORMAT, "%s: tensor \"%s\" has a shape entry that is not a non-negative integer",
                           name, key);
        json_int_t v64 = json_integer_value(x);
        t->shape[i] = v64;
        if (v64 != 0 && numel > SIZE_MAX / (size_t)v64) overflow = 1;
        else numel *= (size_t)v64;
    }
    if (overflow || numel > SIZE_MAX / DTYPES[d].size)
        return nm_fail(err, NM_ERR_LIMIT, "%s: tensor \"%s\" shape overflows the address space", name, key);
    t->numel = numel;
    if (json_array_size(off) != 2 || !json_is_integer(json_array_get(off, 0)) || !json_is_integer(json_array_get(off, 1)))
        return nm_fail(err, NM_ERR_FORMAT, "%s: tensor \"%s\" data_offsets must be [begin, end]", name, key);
    json_int_t b = json_integer_value(json_array_get(off, 0)), e = json_integer_value(json_array_get(off, 1));
    if (b < 0 || e < b)
        return nm_fail(err, NM_ERR_FORMAT, "%s: tensor \"%s\" has invalid data_offsets [%lld, %lld]", name, key,
                       (long long)b, (long long)e);
    if ((unsigned long long)e > data_size)
        return nm_fail(err, NM_ERR_FORMAT,
                       "%s: tensor \"%s\" data_offsets [%lld, %lld] run past the end of the data (%zu bytes); file truncated?",
                       name, key, (long long)b, (long long)e, data_size);
    t->begin = (size_t)b;
    t->nbytes = (size_t)(e - b);
    if (t->nbytes != numel * DTYPES[d].size)
        return nm_fail(err, NM_ERR_FORMAT, "%s: tensor \"%s\" occupies %zu bytes but its shape and dtype %s need %zu", name,
                       key, t->nbytes, DTYPES[d].name, numel * DTYPES[d].size);
    return NM_OK;
}

nm_status nm_safetensors_parse(nm_safetensors *st, const uint8_t *buf, size_t size, const char *name, nm_error *err) {
    memset(st, 0, sizeof *st);
    if (size < 8) return nm_fail(err, NM_ERR_FORMAT, "%s: too short for a safetensors file (%zu bytes)", name, size);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | buf[i];
    if (hlen > nm_limit(NM_LIMIT_SAFETENSORS_HEADER_BYTES))
        return nm_limit_fail(err, NM_LIMIT_SAFETENSORS_HEADER_BYTES, "%s: header length %llu is", name,
                             (unsigned long long)hlen);
    if (hlen > size - 8)
        return nm_fail(err, NM_ERR_FORMAT, "%s: header length %llu runs past the end of the file (%zu bytes); truncated?",
                       name, (unsigned long long)hlen, size);
    if (hlen < 2) return nm_fail(err, NM_ERR_FORMAT, "%s: empty safetensors header", name);
    json_error_t jerr;
    json_t *root = json_loadb((const char *)buf + 8, (size_t)hlen, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return nm_fail(err, NM_ERR_FORMAT, "%s: safetensors header is not valid JSON (at byte %d: %s)", name,
                       jerr.position, jerr.text);
    nm_status s = NM_OK;
    nm_st_tensor **order = NULL;
    if (!json_is_object(root)) {
        s = nm_fail(err, NM_ERR_FORMAT, "%s: safetensors header is not a JSON object", name);
        goto out;
    }
    st->data = buf + 8 + hlen;
    st->data_size = size - 8 - (size_t)hlen;
    size_t n = json_object_size(root);
    if (n > nm_limit(NM_LIMIT_SAFETENSORS_TENSORS)) {
        s = nm_limit_fail(err, NM_LIMIT_SAFETENSORS_TENSORS, "%s: %zu header entries are", name, n);
        goto out;
    }
    st->tensors = calloc(n ? n : 1, sizeof *st->tensors);
    if (!st->tensors) {
        s = NM_NOMEM(err, "tensor table");
        goto out;
    }
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v) {
        if (strcmp(key, "__metadata__") == 0) continue;
        nm_st_tensor *t = &st->tensors[st->n_tensors];
        t->name = strdup(key);
        if (!t->name) {
            s = NM_NOMEM(err, "tensor name");
            goto out;
        }
        st->n_tensors++;
        if ((s = parse_entry(t, key, v, st->data_size, name, err)) != NM_OK) goto out;
        t->data = st->data + t->begin;
    }
    // Overlap check: sorted by start, each tensor must begin at or after the previous end.
    order = malloc((st->n_tensors ? st->n_tensors : 1) * sizeof *order);
    if (!order) {
        s = NM_NOMEM(err, "tensor order");
        goto out;
    }
    for (int i = 0; i < st->n_tensors; i++) order[i] = &st->tensors[i];
    qsort(order, st->n_tensors, sizeof *order, cmp_begin);
    for (int i = 1; i < st->n_tensors; i++) {
        const nm_st_tensor *a = order[i - 1], *b = order[i];
        if (b->begin < a->begin + a->nbytes && b->nbytes > 0 && a->nbytes > 0) {
            s = nm_fail(err, NM_ERR_FORMAT, "%s: tensors \"%s\" and \"%s\" overlap in the data section", name, a->name,
                        b->name);
            goto out;
        }
    }
out:
    free(order);
    json_decref(root);
    if (s != NM_OK) nm_safetensors_close(st);
    return s;
}

nm_status nm_safetensors_open(nm_safetensors *st, const char *path, nm_error *err) {
    memset(st, 0, sizeof *st);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return nm_fail(err, NM_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        close(fd);
        return nm_fail(err, NM_ERR_IO, "%s: not a regular file", path);
    }
    size_t size = (size_t)sb.st_size;
    if (size < 8) {
        close(fd);
        return nm_fail(err, NM_ERR_FORMAT, "%s: too short for a safetensors file (%zu bytes)", path, size);
    }
    void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) return nm_fail(err, NM_ERR_IO, "%s: cannot mmap: %s", path, strerror(errno));
    nm_status s = nm_safetensors_parse(st, map, size, path, err);
    if (s != NM_OK) {
        munmap(map, size);
        return s;
    }
    st->map = map;
    st->map_size = size;
    return NM_OK;
}

const nm_st_tensor *nm_safetensors_find(const nm_safetensors *st, const char *name) {
    for (int i = 0; i < st->n_tensors; i++)
        if (strcmp(st->tensors[i].name, name) == 0) return &st->tensors[i];
    return NULL;
}

float nm_bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

float nm_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, u;
    if (exp == 0) {
        if (mant == 0) u = sign;
        else { // subnormal: normalise
            int e = -1;
            do {
                mant <<= 1;
                e++;
            } while (!(mant & 0x400));
            u = sign | ((uint32_t)(127 - 15 - e) << 23) | ((mant & 0x3ff) << 13);
        }
    } else if (exp == 31) u = sign | 0x7f800000u | (mant << 13);
    else u = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t nm_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1);                                        // round to nearest even
    return (uint16_t)(u >> 16);
}

uint16_t nm_f32_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t au = u & 0x7fffffffu;
    if (au > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);
    if (au >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); // rounds to >= 65520: inf
    if (au < 0x38800000u) {                                    // subnormal or zero in f16
        float af;
        memcpy(&af, &au, 4);
        // value / 2^-24, rounded to nearest even by the FPU
        float scaled = af * 16777216.0f;
        return (uint16_t)(sign | (uint32_t)nearbyintf(scaled));
    }
    uint32_t mant = au & 0x7fffffu;
    uint32_t exp = (au >> 23) - 127 + 15;
    uint32_t h = (exp << 10) | (mant >> 13);
    uint32_t rest = mant & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1))) h++;
    return (uint16_t)(sign | h);
}

static inline uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

nm_status nm_st_tensor_to_f32(float *out, const nm_st_tensor *t, nm_error *err) {
    const uint8_t *p = t->data;
    switch (t->dtype) {
    case NM_DT_F32: memcpy(out, p, t->numel * 4); break; // little-endian host assumed (x86-64, arm64)
    case NM_DT_F16:
        for (size_t i = 0; i < t->numel; i++) out[i] = nm_f16_to_f32(rd16(p + 2 * i));
        break;
    case NM_DT_BF16:
        for (size_t i = 0; i < t->numel; i++) out[i] = nm_bf16_to_f32(rd16(p + 2 * i));
        break;
    case NM_DT_F64:
        for (size_t i = 0; i < t->numel; i++) {
            double d;
            memcpy(&d, p + 8 * i, 8);
            out[i] = (float)d;
        }
        break;
    default:
        return nm_fail(err, NM_ERR_UNSUPPORTED, "tensor \"%s\" has dtype %s; expected F32, F16 or BF16", t->name,
                       nm_dtype_name(t->dtype));
    }
    return NM_OK;
}

nm_status nm_st_tensor_to_i32(int32_t *out, const nm_st_tensor *t, nm_error *err) {
    const uint8_t *p = t->data;
    for (size_t i = 0; i < t->numel; i++) {
        int64_t v;
        switch (t->dtype) {
        case NM_DT_I64: { int64_t x; memcpy(&x, p + 8 * i, 8); v = x; break; }
        case NM_DT_I32: { int32_t x; memcpy(&x, p + 4 * i, 4); v = x; break; }
        case NM_DT_I16: { int16_t x; memcpy(&x, p + 2 * i, 2); v = x; break; }
        case NM_DT_I8: v = (int8_t)p[i]; break;
        case NM_DT_U8: case NM_DT_BOOL: v = p[i]; break;
        default:
            return nm_fail(err, NM_ERR_UNSUPPORTED, "tensor \"%s\" has dtype %s; expected an integer dtype", t->name,
                           nm_dtype_name(t->dtype));
        }
        if (v < INT32_MIN || v > INT32_MAX)
            return nm_fail(err, NM_ERR_INVALID, "tensor \"%s\": value %lld does not fit in int32", t->name, (long long)v);
        out[i] = (int32_t)v;
    }
    return NM_OK;
}

nm_status nm_safetensors_write(const char *path, const nm_st_write_tensor *ts, int n, nm_error *err) {
    nm_status s = NM_OK;
    json_t *hdr = json_object();
    char *htext = NULL;
    nm_atomic_file af = {0};
    uint8_t *tmp = NULL;
    if (!hdr) return NM_NOMEM(err, "safetensors header");
    size_t off = 0;
    for (int i = 0; i < n; i++) {
        const nm_st_write_tensor *t = &ts[i];
        if (t->dtype != NM_DT_F32 && t->dtype != NM_DT_F16 && t->dtype != NM_DT_BF16) {
            s = nm_fail(err, NM_ERR_UNSUPPORTED, "%s: cannot write dtype %s", path, nm_dtype_name(t->dtype));
            goto out;
        }
        size_t numel = 1;
        json_t *shape = json_array();
        for (int d = 0; d < t->ndim; d++) {
            numel *= (size_t)t->shape[d];
            json_array_append_new(shape, json_integer(t->shape[d]));
        }
        size_t nb = numel * nm_dtype_size(t->dtype);
        json_t *e = json_object();
        json_object_set_new(e, "dtype", json_string(nm_dtype_name(t->dtype)));
        json_object_set_new(e, "shape", shape);
        json_t *o = json_array();
        json_array_append_new(o, json_integer((json_int_t)off));
        json_array_append_new(o, json_integer((json_int_t)(off + nb)));
        json_object_set_new(e, "data_offsets", o);
        if (json_object_set_new(hdr, t->name, e) != 0) {
            s = NM_NOMEM(err, "safetensors header");
            goto out;
        }
        off += nb;
    }
    json_t *meta = json_object();
    json_object_set_new(meta, "format", json_string("pt"));
    json_object_set_new(meta, "writer", json_string("nullmap"));
    json_object_set_new(hdr, "__metadata__", meta);
    htext = json_dumps(hdr, JSON_COMPACT | JSON_PRESERVE_ORDER);
    if (!htext) {
        s = NM_NOMEM(err, "safetensors header text");
        goto out;
    }
    size_t hl = strlen(htext), padded = (hl + 7) & ~(size_t)7; // data starts 8-byte aligned
    if ((s = nm_atomic_open(&af, path, err)) != NM_OK) goto out;
    uint8_t len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (uint8_t)((uint64_t)padded >> (8 * i));
    if ((s = nm_atomic_write(&af, len8, 8, err)) != NM_OK) goto out;
    if ((s = nm_atomic_write(&af, htext, hl, err)) != NM_OK) goto out;
    for (size_t i = hl; i < padded; i++)
        if ((s = nm_atomic_write(&af, " ", 1, err)) != NM_OK) goto out;
    for (int i = 0; i < n; i++) {
        const nm_st_write_tensor *t = &ts[i];
        size_t numel = 1;
        for (int d = 0; d < t->ndim; d++) numel *= (size_t)t->shape[d];
        if (t->dtype == NM_DT_F32) {
            if ((s = nm_atomic_write(&af, t->values, numel * 4, err)) != NM_OK) goto out;
            continue;
        }
        free(tmp);
        tmp = malloc(numel * 2 + 1);
        if (!tmp) {
            s = NM_NOMEM(err, "tensor conversion buffer");
            goto out;
        }
        for (size_t k = 0; k < numel; k++) {
            uint16_t h = t->dtype == NM_DT_BF16 ? nm_f32_to_bf16(t->values[k]) : nm_f32_to_f16(t->values[k]);
            tmp[2 * k] = (uint8_t)h;
            tmp[2 * k + 1] = (uint8_t)(h >> 8);
        }
        if ((s = nm_atomic_write(&af, tmp, numel * 2, err)) != NM_OK) goto out;
    }
    s = nm_atomic_commit(&af, err);
out:
    if (s != NM_OK) nm_atomic_abort(&af);
    free(tmp);
    free(htext);
    json_decref(hdr);
    return s;
}
