// nm_trace_h5.c — routing traces in HDF5: writing (temporary file + atomic rename) and reading
// with validation. The schema is DESIGN.md §4 as documented in README.md ("Trace file format").
//
// Crash safety: the target file is never opened for writing. nm_trace_file_open() builds the new
// contents in `<path>.tmp-<pid>` beside it (for --append, starting from a byte copy of the
// target); nm_trace_file_commit() flushes, fsyncs and rename()s it over the target, then fsyncs
// the directory. A crash at any point leaves either the old file or the new one, never a mix;
// at worst a stale temporary file remains.
//
// HDF5's automatic error printing is switched off inside every public function (and restored
// on the way out); HDF5 failures become nm_error messages naming the file and the object, with
// the innermost HDF5 error description appended.
#include "nm_trace.h"

#include "nm_fileutil.h"
#include "nm_h5_guard.h"
#include "nm_limits.h"

#include <hdf5.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define NM_TRACE_FORMAT "nullmap-trace"
#define NM_TRACE_FORMAT_VERSION 1
#ifdef NM_VERSION
#define NM_TRACE_CREATED_BY "nullmap " NM_VERSION
#else
#define NM_TRACE_CREATED_BY "nullmap"
#endif
#define NM_TRACE_MAX_SAMPLES 1000000               // names are 6 digits: 000000 … 999999
// Reading: sample counts, L·T·K and string sizes are checked against the trace_samples,
// trace_entries and trace_string_bytes limits (nm_limits.h).
#define NM_TRACE_DEFLATE 4
#define NM_TRACE_LOCK_RETRIES 50                   // 10 ms apart: a reader waits out a commit

// ---------------------------------------------------------------------------------------------
// HDF5 error handling: quiet the library, remember the innermost message of the first failure.

typedef struct {
    H5E_auto2_t func;
    void *data;
} h5_quiet;

static char g_detail[400]; // innermost HDF5 error description of the first failure since reset

static void quiet_begin(h5_quiet *q) {
    q->func = NULL;
    q->data = NULL;
    H5Eget_auto2(H5E_DEFAULT, &q->func, &q->data);
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    g_detail[0] = '\0';
}

static void quiet_end(const h5_quiet *q) {
    H5Eclear2(H5E_DEFAULT);
    H5Eset_auto2(H5E_DEFAULT, q->func, q->data);
}

static herr_t detail_cb(unsigned n, const H5E_error2_t *e, void *data) {
    (void)data;
    if (n == 0 && e && e->desc && e->desc[0]) snprintf(g_detail, sizeof g_detail, "%s", e->desc);
    return 0;
}

// Records the innermost description on the current HDF5 error stack (once: the first failure
// is the cause; later failures are usually consequences). Call right after the failing call,
// before any other HDF5 call clears the stack.
static void h5_note(void) {
    if (g_detail[0]) return;
    hid_t st = H5Eget_current_stack();
    if (st < 0) return;
    H5Ewalk2(st, H5E_WALK_UPWARD, detail_cb, NULL); // n = 0: where it was detected
    H5Eclose_stack(st);
}

// nm_fail with " (HDF5: …)" appended when a failure was noted.
__attribute__((format(printf, 3, 4))) static nm_status h5_fail(nm_error *err, nm_status code, const char *fmt,
                                                                ...) {
    char msg[700];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    nm_status st;
    if (g_detail[0])
        st = nm_fail(err, code, "%s (HDF5: %s)", msg, g_detail);
    else
        st = nm_fail(err, code, "%s", msg);
    g_detail[0] = '\0';
    return st;
}

#define H5OK(expr) ((expr) >= 0 ? 1 : (h5_note(), 0))

static void close_id(hid_t *id) {
    if (*id < 0) return;
    switch (H5Iget_type(*id)) {
    case H5I_FILE: H5Fclose(*id); break;
    case H5I_GROUP: H5Gclose(*id); break;
    case H5I_DATASET: H5Dclose(*id); break;
    case H5I_DATASPACE: H5Sclose(*id); break;
    case H5I_DATATYPE: H5Tclose(*id); break;
    case H5I_ATTR: H5Aclose(*id); break;
    case H5I_GENPROP_LST: H5Pclose(*id); break;
    default: break;
    }
    *id = -1;
}

// File access properties: newest file format (checksummed metadata), and file locking that is
// used where the file system supports it and silently skipped where it does not (NFS, …).
static hid_t make_fapl(void) {
    hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
    if (fapl < 0) return h5_note(), -1;
    if (!H5OK(H5Pset_libver_bounds(fapl, H5F_LIBVER_V110, H5F_LIBVER_LATEST))) goto fail;
#if H5_VERSION_GE(1, 10, 7)
    if (!H5OK(H5Pset_file_locking(fapl, 1, 1))) goto fail;
#endif
    return fapl;
fail:
    H5Pclose(fapl);
    return -1;
}

// ---------------------------------------------------------------------------------------------
// Attribute writing

static hid_t make_str_type(void) { // variable-length UTF-8 string
    hid_t t = H5Tcopy(H5T_C_S1);
    if (t < 0) return h5_note(), -1;
    if (!H5OK(H5Tset_size(t, H5T_VARIABLE)) || !H5OK(H5Tset_cset(t, H5T_CSET_UTF8))) {
        H5Tclose(t);
        return -1;
    }
    return t;
}

static int put_attr(hid_t obj, const char *name, hid_t ftype, hid_t mtype, const void *buf) {
    hid_t sp = -1, a = -1;
    int ok = H5OK(sp = H5Screate(H5S_SCALAR)) && H5OK(a = H5Acreate2(obj, name, ftype, sp, H5P_DEFAULT, H5P_DEFAULT)) &&
             H5OK(H5Awrite(a, mtype, buf));
    close_id(&a);
    close_id(&sp);
    return ok ? 0 : -1;
}

static int put_attr_int(hid_t obj, const char *name, int v) {
    return put_attr(obj, name, H5T_STD_I32LE, H5T_NATIVE_INT, &v);
}

static int put_attr_double(hid_t obj, const char *name, double v) {
    return put_attr(obj, name, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, &v);
}

static int put_attr_str(hid_t obj, const char *name, const char *v) {
    hid_t t = make_str_type();
    if (t < 0) return -1;
    const char *s = v ? v : "";
    int rc = put_attr(obj, name, t, t, &s);
    H5Tclose(t);
    return rc;
}

// ---------------------------------------------------------------------------------------------
// Attribute reading (tolerant of integer width and of fixed- or variable-length strings).
// Each returns 1 when read, 0 when absent, -1 on error (err filled; `where` names the object).

static int attr_open(hid_t obj, const char *name, hid_t *a, const char *where, nm_error *err) {
    htri_t ex = H5Aexists(obj, name);
    if (ex < 0) {
        h5_note();
        h5_fail(err, NM_ERR_FORMAT, "%s: cannot read attribute '%s'", where, name);
        return -1;
    }
    if (ex == 0) return 0;
    hid_t sp = -1;
    *a = H5Aopen(obj, name, H5P_DEFAULT);
    if (*a < 0 || !H5OK(sp = H5Aget_space(*a))) {
        if (*a < 0) h5_note();
        close_id(a);
        h5_fail(err, NM_ERR_FORMAT, "%s: cannot read attribute '%s'", where, name);
        return -1;
    }
    hssize_t npts = H5Sget_simple_extent_npoints(sp);
    close_id(&sp);
    if (npts != 1) {
        close_id(a);
        nm_fail(err, NM_ERR_FORMAT, "%s: attribute '%s' must hold one value, not %lld", where, name, (long long)npts);
        return -1;
    }
    return 1;
}

static int get_attr_int(hid_t obj, const char *name, int *out, const char *where, nm_error *err) {
    hid_t a = -1, t = -1;
    int r = attr_open(obj, name, &a, where, err);
    if (r <= 0) return r;
    long long v = 0;
    r = -1;
    if (!H5OK(t = H5Aget_type(a)))
        h5_fail(err, NM_ERR_FORMAT, "%s: cannot read attribute '%s'", where, name);
    else if (H5Tget_class(t) != H5T_INTEGER)
        nm_fail(err, NM_ERR_FORMAT, "%s: attribute '%s' must be an integer", where, name);
    else if (!H5OK(H5Aread(a, H5T_NATIVE_LLONG, &v)))
        h5_fail(err, NM_ERR_FORMAT, "%s: cannot read attribute '%s'", where, name);
    else if (v < INT_MIN || v > INT_MAX)
        nm_fail(err, NM_ERR_INVALID, "%s: attribute '%s' = %lld is out of range", where, name, v);
    else {
        *out = (int)v;
        r = 1;
    }
    close_id(&t);
    close_id(&a);
    return r;
}

static int get_attr_double(hid_t obj, const char *name, double *out, const char *where, nm_error *err) {
    hid_t a = -1, t = -1;
    int r = attr_open(obj, name, &a, where, err);
    if (r <= 0) return r;
    r = -1;
    H5T_class_t c = H5T_NO_CLASS;
    if (!H5OK(t = H5Aget_type(a)))
        h5_fail(err, NM_ERR_FORMAT, "%s: cannot read attribute '%s'", where, name);
    else if ((c = H5Tget_class(t)) != H5T_INTEGER && c != H5T_FLOAT)
        nm_fail(err, NM_ERR_FORMAT, "%s: attribute '%s' must be a number", where, name);
    else if (!H5OK(H5Aread(a, H5T_NATIVE_DOUBLE, out)))
        h5_fail(err, NM_ERR_FORMAT, "%s: cannot read attribute '%s'", where, name);
    else
        r = 1;
    close_id(&t);
    close_id(&a);
    return r;
}

// *out is a malloc'd NUL-terminated string (caller frees) when 1 is returned.
static int get_attr_str(hid_t obj, const char *name, char **out, const char *where, nm_error *err) {
    hid_t a = -1, t = -1, mt = -1;
    *out = NULL;
    int r = attr_open(obj, name, &a, where, err);
    if (r <= 0) return r;
    r = -1;
    H5T_cset_t cset;
    htri_t var;
    if (!H5OK(t = H5Aget_type(a))) {
        h5_fail(err, NM_ERR_FORMAT, "%s: cannot read attribute '%s'", where, name);
        goto out;
    }
    if (H5Tget_class(t) != H5T_STRING) {
        nm_fail(err, NM_ERR_FORMAT, "%s: attribute '%s' must be a string", where, name);
        goto out;
    }
    if (!H5OK(cset = H5Tget_cset(t)) || !H5OK(var = H5Tis_variable_str(t)) || !H5OK(mt = H5Tcopy(H5T_C_S1)) ||
        !H5OK(H5Tset_cset(mt, cset))) {
        h5_fail(err, NM_ERR_FORMAT, "%s: cannot read attribute '%s'", where, name);
        goto out;
    }
    if (var) {
        char *p = NULL;
        if (!H5OK(H5Tset_size(mt, H5T_VARIABLE)) || !H5OK(H5Aread(a, mt, &p))) {
            h5_fail(err, NM_ERR_FORMAT, "%s: cannot read attribute '%s'", where, name);
            goto out;
        }
        *out = strdup(p ? p : "");
        if (p) H5free_memory(p);
    } else {
        size_t n = H5Tget_size(t);
        if (n == 0 || n > nm_limit(NM_LIMIT_TRACE_STRING_BYTES)) {
            nm_limit_fail(err, NM_LIMIT_TRACE_STRING_BYTES, "%s: attribute '%s' has a string size of %zu bytes,", where,
                          name, n);
            goto out;
        }
        char *buf = calloc(n + 1, 1);
        if (!buf) {
            NM_NOMEM(err, "a string attribute");
            goto out;
        }
        if (!H5OK(H5Tset_size(mt, n + 1)) || !H5OK(H5Tset_strpad(mt, H5T_STR_NULLTERM)) ||
            !H5OK(H5Aread(a, mt, buf))) {
            free(buf);
            h5_fail(err, NM_ERR_FORMAT, "%s: cannot read attribute '%s'", where, name);
            goto out;
        }
        buf[n] = '\0';
        *out = buf;
    }
    if (!*out) {
        NM_NOMEM(err, "a string attribute");
        goto out;
    }
    r = 1;
out:
    close_id(&mt);
    close_id(&t);
    close_id(&a);
    return r;
}

// ---------------------------------------------------------------------------------------------
// Root attributes

static const char *null_kind_name(nm_null_kind k) { return k == NM_NULL_COPY ? "copy" : "zero"; }

static int write_root_attrs(hid_t fid, const nm_config *c, const char *model_name) {
    char created[32];
    time_t now = time(NULL);
    struct tm tm;
    if (!gmtime_r(&now, &tm) || strftime(created, sizeof created, "%Y-%m-%dT%H:%M:%SZ", &tm) == 0)
        snprintf(created, sizeof created, "unknown");
    int vision = c->has_vision != 0;
    struct { const char *name; int v; } ints[] = {
        {"format_version", NM_TRACE_FORMAT_VERSION},
        {"num_experts", c->moe.num_experts},
        {"null_copies", c->moe.null_copies},
        {"top_k", c->moe.top_k},
        {"expert_hidden", c->moe.expert_hidden},
        {"shared_expert_hidden", c->moe.shared_expert_hidden},
        {"num_layers", c->num_layers},
        {"hidden_size", c->hidden_size},
        {"num_heads", c->num_heads},
        {"num_kv_heads", c->num_kv_heads},
        {"head_dim", c->head_dim},
        {"vocab_size", c->vocab_size},
        {"max_positions", c->max_positions},
        {"image_size", vision ? c->image_size : 0},
        {"patch_size", vision ? c->patch_size : 0},
        {"bos", c->tok.bos},
        {"eos", c->tok.eos},
        {"image_start", c->tok.image_start},
        {"image_end", c->tok.image_end},
        {"pad", c->tok.pad},
        {"slot_null_value", -1},
    };
    if (put_attr_str(fid, "format", NM_TRACE_FORMAT) < 0 || put_attr_str(fid, "created_by", NM_TRACE_CREATED_BY) < 0 ||
        put_attr_str(fid, "model", model_name ? model_name : "") < 0 || put_attr_str(fid, "created", created) < 0 ||
        put_attr_str(fid, "null_kind", null_kind_name(c->moe.null_kind)) < 0 ||
        put_attr_str(fid, "modality_codes", "0=text,1=vision,2=special") < 0 ||
        put_attr_str(fid, "segment_codes", "0=bos,1=image,2=prompt,3=answer") < 0 ||
        put_attr_double(fid, "rho", nm_config_rho(c)) < 0 || put_attr_double(fid, "rope_theta", c->rope_theta) < 0 ||
        put_attr_double(fid, "rms_norm_eps", c->rms_norm_eps) < 0)
        return -1;
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++)
        if (put_attr_int(fid, ints[i].name, ints[i].v) < 0) return -1;
    return 0;
}

// Checks the root attribute format = "nullmap-trace".
static nm_status check_format(hid_t fid, const char *path, nm_error *err) {
    char *s = NULL;
    int r = get_attr_str(fid, "format", &s, path, err);
    if (r < 0) return err->code;
    if (r == 0) return nm_fail(err, NM_ERR_FORMAT, "%s: not a nullmap trace (no 'format' attribute)", path);
    nm_status rc = NM_OK;
    if (strcmp(s, NM_TRACE_FORMAT) != 0)
        rc = nm_fail(err, NM_ERR_FORMAT, "%s: not a nullmap trace (format = '%.100s', expected '%s')", path, s,
                     NM_TRACE_FORMAT);
    free(s);
    return rc;
}

// Reads and checks the root attributes into info (not num_samples). `path` names the file.
static nm_status read_root(hid_t fid, const char *path, nm_trace_info *info, nm_error *err) {
    memset(info, 0, sizeof *info);
    nm_status rc = check_format(fid, path, err);
    if (rc != NM_OK) return rc;
    char *s = NULL;
    int r;
    nm_config *c = &info->cfg;
    struct { const char *name; int *dst; int required; } ints[] = {
        {"format_version", &info->format_version, 1},
        {"num_layers", &c->num_layers, 1},
        {"top_k", &c->moe.top_k, 1},
        {"num_experts", &c->moe.num_experts, 1},
        {"null_copies", &c->moe.null_copies, 1},
        {"expert_hidden", &c->moe.expert_hidden, 0},
        {"shared_expert_hidden", &c->moe.shared_expert_hidden, 0},
        {"hidden_size", &c->hidden_size, 0},
        {"num_heads", &c->num_heads, 0},
        {"num_kv_heads", &c->num_kv_heads, 0},
        {"head_dim", &c->head_dim, 0},
        {"vocab_size", &c->vocab_size, 0},
        {"max_positions", &c->max_positions, 0},
        {"image_size", &c->image_size, 0},
        {"patch_size", &c->patch_size, 0},
        {"bos", &c->tok.bos, 0},
        {"eos", &c->tok.eos, 0},
        {"image_start", &c->tok.image_start, 0},
        {"image_end", &c->tok.image_end, 0},
        {"pad", &c->tok.pad, 0},
    };
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++) {
        r = get_attr_int(fid, ints[i].name, ints[i].dst, path, err);
        if (r < 0) return err->code;
        if (r == 0 && ints[i].required)
            return nm_fail(err, NM_ERR_FORMAT, "%s: missing root attribute '%s'", path, ints[i].name);
    }
    if (info->format_version != NM_TRACE_FORMAT_VERSION)
        return nm_fail(err, NM_ERR_UNSUPPORTED, "%s: trace format_version %d is not supported (this nullmap reads %d)",
                       path, info->format_version, NM_TRACE_FORMAT_VERSION);
    if (get_attr_double(fid, "rope_theta", &c->rope_theta, path, err) < 0 ||
        get_attr_double(fid, "rms_norm_eps", &c->rms_norm_eps, path, err) < 0)
        return err->code;
    r = get_attr_str(fid, "null_kind", &s, path, err);
    if (r < 0) return err->code;
    if (r > 0) {
        int ok = 1;
        if (strcmp(s, "zero") == 0)
            c->moe.null_kind = NM_NULL_ZERO;
        else if (strcmp(s, "copy") == 0)
            c->moe.null_kind = NM_NULL_COPY;
        else
            ok = 0;
        if (!ok) nm_fail(err, NM_ERR_FORMAT, "%s: root attribute null_kind = '%.100s' (expected 'zero' or 'copy')", path, s);
        free(s);
        if (!ok) return NM_ERR_FORMAT;
    }
    r = get_attr_str(fid, "created_by", &s, path, err);
    if (r < 0) return err->code;
    if (r > 0) {
        snprintf(info->created_by, sizeof info->created_by, "%s", s);
        free(s);
    }
    r = get_attr_str(fid, "model", &s, path, err);
    if (r < 0) return err->code;
    if (r > 0) {
        snprintf(info->model_name, sizeof info->model_name, "%s", s);
        free(s);
    }
    c->has_vision = c->image_size > 0;
    if (c->num_layers < 1 || c->num_layers > NM_MAX_LAYERS || c->moe.num_experts < 1 ||
        c->moe.num_experts > NM_MAX_EXPERTS || c->moe.null_copies < 0 || c->moe.null_copies > NM_MAX_EXPERTS ||
        c->moe.top_k < 1 || c->moe.top_k > c->moe.num_experts + c->moe.null_copies)
        return nm_fail(err, NM_ERR_INVALID,
                       "%s: root attributes describe an impossible model shape: num_layers=%d top_k=%d "
                       "num_experts=%d null_copies=%d",
                       path, c->num_layers, c->moe.top_k, c->moe.num_experts, c->moe.null_copies);
    return NM_OK;
}

// ---------------------------------------------------------------------------------------------
// Opening an existing file for reading

// Opens `path` read-only (fapl as for writing, so file locking quirks behave the same).
static nm_status open_read(hid_t *fid, const char *path, nm_error *err) {
    *fid = -1;
    struct stat st;
    if (stat(path, &st) != 0) return nm_fail(err, NM_ERR_IO, "%s: %s", path, strerror(errno));
    if (!S_ISREG(st.st_mode)) return nm_fail(err, NM_ERR_IO, "%s: not a regular file", path);
    // libhdf5 1.10.8 crashes or hangs on some corrupt global heaps: check them first.
    nm_status guard = nm_h5_check_global_heaps(path, err);
    if (guard != NM_OK) return guard;
    hid_t fapl = make_fapl();
    if (fapl < 0) return h5_fail(err, NM_ERR_INTERNAL, "%s: cannot set up HDF5 file access", path);
    // A durable writer (nullmap batch) locks an inode that it took out of `path` just after this
    // reader opened it: opening `path` again gives the newly committed file.
    for (int attempt = 0; attempt < NM_TRACE_LOCK_RETRIES; attempt++) {
        g_detail[0] = '\0';
        *fid = H5Fopen(path, H5F_ACC_RDONLY, fapl);
        if (*fid >= 0) break;
        h5_note();
        if (!strstr(g_detail, "unable to lock")) break;
        nanosleep(&(struct timespec){.tv_nsec = 10 * 1000 * 1000}, NULL);
    }
    H5Pclose(fapl);
    if (*fid >= 0) return NM_OK;
    if (strstr(g_detail, "unable to lock"))
        return h5_fail(err, NM_ERR_IO, "%s: locked by a process that is changing it; try again", path);
    char saved[sizeof g_detail];
    memcpy(saved, g_detail, sizeof saved);
    htri_t is = H5Fis_hdf5(path);
    memcpy(g_detail, saved, sizeof saved);
    if (is == 0) {
        g_detail[0] = '\0';
        return nm_fail(err, NM_ERR_FORMAT, "%s: not an HDF5 file", path);
    }
    return h5_fail(err, NM_ERR_FORMAT, "%s: cannot open as HDF5 (truncated or damaged?)", path);
}

// Number of links in /samples (opened into *grp).
static nm_status open_samples(hid_t fid, const char *path, hid_t *grp, int *count, nm_error *err) {
    *grp = -1;
    *count = 0;
    htri_t ex = H5Lexists(fid, "samples", H5P_DEFAULT);
    if (ex < 0) {
        h5_note();
        return h5_fail(err, NM_ERR_FORMAT, "%s: cannot read group /samples", path);
    }
    if (ex == 0) return nm_fail(err, NM_ERR_FORMAT, "%s: missing group /samples", path);
    H5G_info_t gi;
    if (!H5OK(*grp = H5Gopen2(fid, "samples", H5P_DEFAULT)) || !H5OK(H5Gget_info(*grp, &gi))) {
        close_id(grp);
        return h5_fail(err, NM_ERR_FORMAT, "%s: cannot read group /samples", path);
    }
    if (gi.nlinks > (hsize_t)nm_limit(NM_LIMIT_TRACE_SAMPLES)) {
        close_id(grp);
        return nm_limit_fail(err, NM_LIMIT_TRACE_SAMPLES, "%s: /samples holds %llu entries,", path,
                             (unsigned long long)gi.nlinks);
    }
    *count = (int)gi.nlinks;
    return NM_OK;
}

// One past the largest 6-digit sample name (000000 …) in /samples; 0 when there is none.
typedef struct {
    long next;
} next_index_data;

static herr_t next_index_cb(hid_t g, const char *name, const H5L_info_t *info, void *data) {
    (void)g;
    (void)info;
    next_index_data *d = data;
    if (strlen(name) != 6) return 0;
    long v = 0;
    for (int i = 0; i < 6; i++) {
        if (name[i] < '0' || name[i] > '9') return 0;
        v = v * 10 + (name[i] - '0');
    }
    if (v + 1 > d->next) d->next = v + 1;
    return 0;
}

// ---------------------------------------------------------------------------------------------
// Writing

struct nm_trace_file {
    hid_t fid, samples;
    char *path; // the target (symlinks resolved)
    char *tmp;  // path.tmp-<pid>
    nm_config cfg;
    int count;  // samples in the file
    int next;   // index of the next sample's name
    int broken; // a failed write left the file in an unknown state: commit refuses
    int target_existed;
    struct stat target_st; // the target as it was when opened (commit checks it did not change)
    nm_trace_file *next_open; // list of this process's open writers

    // Durable writers (nm_trace_file_open_durable) publish every sample; see "Durable writing".
    int durable;
    int dirty;            // the shadow holds changes not yet published
    char *prev;           // path.prev: the previous generation's name during a publish
    char *lock_path;      // path.lock: held (flock) by the one writer of the trace
    int lock_fd;          // -1 when not held
    int shadow_lock_fd;   // LOCK_EX on a reused shadow inode while the writer modifies it; -1
    int shadow_copies;    // shadows made by copying the published file (not by reuse)
    int published;        // this writer has published the file now at `path`
    int attrs_changed;    // root attributes changed since the last publish (set_batch)
};

// The writers open in this process: a second writer for the same target is refused with a
// message that names this process (the writer lock alone would blame "another process"). The
// temporary file name is a function of the target, so this also keeps two writers of this
// process from sharing one.
static nm_trace_file *g_open_files;

static int target_in_use(const char *path) {
    for (nm_trace_file *o = g_open_files; o; o = o->next_open)
        if (o->path && strcmp(o->path, path) == 0) return 1;
    return 0;
}

static void file_free(nm_trace_file *f) {
    if (!f) return;
    for (nm_trace_file **pp = &g_open_files; *pp; pp = &(*pp)->next_open)
        if (*pp == f) {
            *pp = f->next_open;
            break;
        }
    close_id(&f->samples);
    close_id(&f->fid);
    if (f->shadow_lock_fd >= 0) close(f->shadow_lock_fd);
    if (f->lock_fd >= 0) { // unlink first: a writer waiting on this inode then sees it is stale
        unlink(f->lock_path);
        close(f->lock_fd);
    }
    free(f->path);
    free(f->tmp);
    free(f->prev);
    free(f->lock_path);
    free(f);
}

static int same_file_state(const struct stat *a, const struct stat *b) {
    return a->st_dev == b->st_dev && a->st_ino == b->st_ino && a->st_size == b->st_size &&
           a->st_mtim.tv_sec == b->st_mtim.tv_sec && a->st_mtim.tv_nsec == b->st_mtim.tv_nsec;
}

static int write_all(int fd, const void *buf, size_t n) {
    const char *p = buf;
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

// Copies the file `src` byte for byte into the open descriptor `dst`; records src's stat.
static nm_status copy_file(const char *src, int dst, const char *dst_name, struct stat *st, nm_error *err) {
    int in = open(src, O_RDONLY | O_CLOEXEC);
    if (in < 0) return nm_fail(err, NM_ERR_IO, "%s: cannot open: %s", src, strerror(errno));
    nm_status rc = NM_OK;
    size_t cap = (size_t)1 << 20;
    char *buf = malloc(cap);
    if (!buf) {
        close(in);
        return NM_NOMEM(err, "a copy buffer");
    }
    if (fstat(in, st) != 0) {
        rc = nm_fail(err, NM_ERR_IO, "%s: %s", src, strerror(errno));
        goto out;
    }
    for (;;) {
        ssize_t n = read(in, buf, cap);
        if (n < 0) {
            if (errno == EINTR) continue;
            rc = nm_fail(err, NM_ERR_IO, "%s: read error: %s", src, strerror(errno));
            goto out;
        }
        if (n == 0) break;
        if (write_all(dst, buf, (size_t)n) != 0) {
            rc = nm_fail(err, NM_ERR_IO, "%s: write error: %s", dst_name, strerror(errno));
            goto out;
        }
    }
out:
    free(buf);
    close(in);
    return rc;
}

// ---------------------------------------------------------------------------------------------
// Durable writing: every sample is published as it is written (README "Crash safety").
//
// The published trace `path` is never modified in place. The writer keeps a shadow `path.shadow`
// with the same contents, opened read-write. To publish sample k it writes k into the shadow,
// closes and fsyncs it, hard-links the published file to `path.prev` (that keeps its inode),
// renames the shadow over `path` (atomic: a reader sees the old or the new file, both complete)
// and fsyncs the directory: k is committed. The old inode, one sample behind, becomes the next
// shadow and gets sample k written a second time. So each sample is written twice and nothing is
// copied whole in the steady state; a kill at any moment leaves `path` complete and closed.
//
// Readers: a reader keeps the inode it opened, and HDF5 readers (ours, h5py, h5dump) hold a
// shared flock on it while the file is open. Before the writer reuses the old inode it takes
// an exclusive flock on it (without waiting); when a reader still holds it, the writer leaves
// that inode to the reader and copies the published file into a fresh shadow instead. A reader
// whose open races with that lock gets an error from HDF5 ("unable to lock file"), never a file
// in the middle of a change; nm_trace_* readers then open `path` again. A reader that switches
// HDF5 file locking off (HDF5_USE_FILE_LOCKING=FALSE) is not protected.

#define NM_TRACE_SHADOW_SUFFIX ".shadow"
#define NM_TRACE_PREV_SUFFIX ".prev"
#define NM_TRACE_LOCK_SUFFIX ".lock"

static char *path_with_suffix(const char *path, const char *suffix) {
    size_t n = strlen(path), m = strlen(suffix);
    char *s = malloc(n + m + 1);
    if (!s) return NULL;
    memcpy(s, path, n);
    memcpy(s + n, suffix, m + 1);
    return s;
}

// Takes `path.lock` (flock, not waiting). The lock file is removed by the writer that holds it
// when it finishes; a waiter that locked a removed file sees that its inode is no longer the
// one at the path and tries again.
static nm_status take_writer_lock(nm_trace_file *f, nm_error *err) {
    if (!(f->lock_path = path_with_suffix(f->path, NM_TRACE_LOCK_SUFFIX)) ||
        !(f->prev = path_with_suffix(f->path, NM_TRACE_PREV_SUFFIX)))
        return NM_NOMEM(err, "a path");
    for (int attempt = 0; attempt < 10; attempt++) {
        int fd = open(f->lock_path, O_RDWR | O_CREAT | O_CLOEXEC, 0666);
        if (fd < 0) return nm_fail(err, NM_ERR_IO, "%s: cannot create the lock file %s: %s", f->path, f->lock_path,
                                   strerror(errno));
        if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
            int e = errno;
            close(fd);
            if (e == EWOULDBLOCK)
                return nm_fail(err, NM_ERR_IO, "%s: another process is writing this trace (it holds %s)", f->path,
                               f->lock_path);
            return nm_fail(err, NM_ERR_IO, "%s: cannot lock %s: %s", f->path, f->lock_path, strerror(e));
        }
        struct stat held, named;
        if (fstat(fd, &held) == 0 && stat(f->lock_path, &named) == 0 && held.st_ino == named.st_ino &&
            held.st_dev == named.st_dev) {
            f->lock_fd = fd;
            return NM_OK;
        }
        close(fd); // the lock file was removed by the writer before us: take the new one
    }
    return nm_fail(err, NM_ERR_IO, "%s: cannot take the lock file %s", f->path, f->lock_path);
}

// The directory holding `path` ("." or "/" included), fsynced after a rename into it.
static nm_status fsync_dir_of(const char *path, nm_error *err) {
    char *dir = strdup(path);
    if (!dir) return NM_NOMEM(err, "a path");
    char *slash = strrchr(dir, '/');
    const char *d = ".";
    if (slash == dir)
        d = "/";
    else if (slash) {
        *slash = '\0';
        d = dir;
    }
    nm_status rc = nm_fsync_path(d, 1, err);
    free(dir);
    return rc;
}

// HDF5 access for a shadow inode whose flock we already hold on another descriptor: HDF5's own
// lock would conflict with ours (where the environment forces it on, the open fails and the
// caller copies instead).
static hid_t make_unlocked_fapl(void) {
    hid_t fapl = make_fapl();
#if H5_VERSION_GE(1, 10, 7)
    if (fapl >= 0 && !H5OK(H5Pset_file_locking(fapl, 0, 1))) {
        H5Pclose(fapl);
        return -1;
    }
#endif
    return fapl;
}

// Opens the shadow read-write (f->fid, f->samples). `unlocked`: we hold its flock ourselves.
static nm_status open_shadow(nm_trace_file *f, int unlocked, nm_error *err) {
    hid_t fapl = unlocked ? make_unlocked_fapl() : make_fapl();
    if (fapl < 0) return h5_fail(err, NM_ERR_INTERNAL, "%s: cannot set up HDF5 file access", f->path);
    f->fid = H5Fopen(f->tmp, H5F_ACC_RDWR, fapl);
    if (f->fid < 0) h5_note();
    H5Pclose(fapl);
    if (f->fid < 0) return h5_fail(err, NM_ERR_IO, "%s: cannot open the shadow copy %s", f->path, f->tmp);
    if (!H5OK(f->samples = H5Gopen2(f->fid, "samples", H5P_DEFAULT))) {
        close_id(&f->fid);
        return h5_fail(err, NM_ERR_IO, "%s: cannot open /samples in the shadow copy %s", f->path, f->tmp);
    }
    return NM_OK;
}

// A fresh shadow: a byte copy of the published file (no reader can know this inode).
static nm_status copy_to_shadow(nm_trace_file *f, nm_error *err) {
    if (unlink(f->tmp) != 0 && errno != ENOENT)
        return nm_fail(err, NM_ERR_IO, "%s: cannot remove %s: %s", f->path, f->tmp, strerror(errno));
    int fd = open(f->tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd < 0) return nm_fail(err, NM_ERR_IO, "%s: cannot create %s: %s", f->path, f->tmp, strerror(errno));
    struct stat st;
    nm_status rc = copy_file(f->path, fd, f->tmp, &st, err);
    if (rc == NM_OK && fchmod(fd, st.st_mode & 07777) != 0)
        rc = nm_fail(err, NM_ERR_IO, "%s: chmod: %s", f->tmp, strerror(errno));
    if (close(fd) != 0 && rc == NM_OK) rc = nm_fail(err, NM_ERR_IO, "%s: write error: %s", f->tmp, strerror(errno));
    return rc;
}

static nm_status check_cfg(const nm_config *c, const char *path, nm_error *err) {
    if (c->num_layers < 1 || c->num_layers > NM_MAX_LAYERS || c->moe.num_experts < 1 ||
        c->moe.num_experts > NM_MAX_EXPERTS || c->moe.null_copies < 0 || c->moe.null_copies > NM_MAX_EXPERTS ||
        c->moe.top_k < 1 || c->moe.top_k > c->moe.num_experts + c->moe.null_copies)
        return nm_fail(err, NM_ERR_INVALID,
                       "%s: invalid model shape for a trace: num_layers=%d top_k=%d num_experts=%d null_copies=%d",
                       path, c->num_layers, c->moe.top_k, c->moe.num_experts, c->moe.null_copies);
    return NM_OK;
}

static nm_status trace_open(nm_trace_file **out, const char *path, const nm_config *cfg, const char *model_name,
                            int append, int overwrite, int durable, nm_error *err) {
    nm_error local;
    if (!err) err = &local;
    if (out) *out = NULL;
    if (!out || !path || !*path || !cfg) return nm_fail(err, NM_ERR_INTERNAL, "nm_trace_file_open: NULL argument");
    nm_status rc = check_cfg(cfg, path, err);
    if (rc != NM_OK) return rc;

    h5_quiet q;
    quiet_begin(&q);
    nm_trace_file *f = calloc(1, sizeof *f);
    int fd = -1, tmp_made = 0;
    hid_t fapl = -1, probe = -1;
    if (!f) {
        rc = NM_NOMEM(err, "a trace file handle");
        goto out;
    }
    f->fid = f->samples = -1;
    f->lock_fd = f->shadow_lock_fd = -1;
    f->durable = durable;
    f->cfg = *cfg;

    // The target: resolve a symbolic link so that the file it points to is replaced, not the link.
    struct stat lst;
    int exists = 0;
    if (lstat(path, &lst) == 0) {
        exists = 1;
        if (S_ISLNK(lst.st_mode)) {
            f->path = realpath(path, NULL);
            if (!f->path) {
                rc = nm_fail(err, NM_ERR_IO, "%s: cannot resolve symbolic link: %s", path, strerror(errno));
                goto out;
            }
        }
    } else if (errno != ENOENT) {
        rc = nm_fail(err, NM_ERR_IO, "%s: %s", path, strerror(errno));
        goto out;
    }
    if (!f->path) f->path = strdup(path);
    if (!f->path) {
        rc = NM_NOMEM(err, "a path");
        goto out;
    }
    const char *p = f->path;
    // One writer per trace, durable or not: `nullmap run --append` (or --force) on a trace that
    // `nullmap batch` is writing would otherwise rename its copy over samples the batch has
    // committed since. Holding the lock, the leftovers of a crashed durable writer can go.
    if (target_in_use(p)) { // checked first: the lock below cannot tell this process from another
        rc = nm_fail(err, NM_ERR_IO, "%s: already open for writing in this process", p);
        goto out;
    }
    rc = take_writer_lock(f, err);
    if (rc != NM_OK) goto out;
    if (durable) {
        if (unlink(f->prev) != 0 && errno != ENOENT) {
            rc = nm_fail(err, NM_ERR_IO, "%s: cannot remove the leftover %s: %s", p, f->prev, strerror(errno));
            goto out;
        }
        exists = lstat(p, &lst) == 0;
    }
    if (exists) {
        if (stat(p, &f->target_st) != 0) {
            rc = nm_fail(err, NM_ERR_IO, "%s: %s", p, strerror(errno));
            goto out;
        }
        f->target_existed = 1;
        if (!S_ISREG(f->target_st.st_mode)) {
            rc = nm_fail(err, NM_ERR_IO, "%s: exists and is not a regular file; refusing to overwrite it", p);
            goto out;
        }
        if (!append && !overwrite) {
            rc = nm_fail(err, NM_ERR_IO, "%s: exists (use --force to overwrite or --append to add samples)", p);
            goto out;
        }
        htri_t is = H5Fis_hdf5(p);
        if (is < 0) {
            h5_note();
            rc = h5_fail(err, NM_ERR_IO, "%s: exists and cannot be read; refusing to overwrite it", p);
            goto out;
        }
        if (is == 0) {
            rc = nm_fail(err, NM_ERR_FORMAT, "%s: exists and is not an HDF5 file; refusing to overwrite it", p);
            goto out;
        }
        // Appending opens it and overwriting probes it: libhdf5 1.10 crashes or hangs on some
        // corrupt global heaps (lib/nm_h5_guard.h), so check them before either.
        if ((rc = nm_h5_check_global_heaps(p, err)) != NM_OK) goto out;
        if (!append) { // overwrite: only ever replace a nullmap trace (of any version), never other HDF5
            if (!H5OK(fapl = make_fapl()) || !H5OK(probe = H5Fopen(p, H5F_ACC_RDONLY, fapl))) {
                rc = h5_fail(err, NM_ERR_FORMAT,
                             "%s: exists and cannot be opened as a trace; refusing to overwrite it (remove it first)", p);
                goto out;
            }
            nm_error why;
            if (check_format(probe, p, &why) != NM_OK) {
                rc = nm_fail(err, NM_ERR_FORMAT, "%s; refusing to overwrite it", why.msg);
                goto out;
            }
            close_id(&probe);
            close_id(&fapl);
        }
    }

    // The temporary file, created exclusively. One left by an earlier process with this pid
    // (or, for a durable writer, the shadow of a crashed one: we hold the writer lock) can only
    // be a leftover of a crash: it is replaced.
    f->tmp = durable ? path_with_suffix(p, NM_TRACE_SHADOW_SUFFIX) : nm_tmp_path(p);
    if (!f->tmp) {
        rc = NM_NOMEM(err, "a path");
        goto out;
    }
    for (int attempt = 0; attempt < 2; attempt++) {
        fd = open(f->tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        if (fd >= 0 || errno != EEXIST || attempt == 1) break;
        unlink(f->tmp);
    }
    if (fd < 0) {
        rc = nm_fail(err, NM_ERR_IO, "%s: cannot create temporary file %s: %s", p, f->tmp, strerror(errno));
        goto out;
    }
    tmp_made = 1;
    if (exists) {
        if (append) {
            rc = copy_file(p, fd, f->tmp, &f->target_st, err);
            if (rc != NM_OK) goto out;
        }
        if (fchmod(fd, f->target_st.st_mode & 07777) != 0) {
            rc = nm_fail(err, NM_ERR_IO, "%s: chmod: %s", f->tmp, strerror(errno));
            goto out;
        }
    }
    if (close(fd) != 0) {
        fd = -1;
        rc = nm_fail(err, NM_ERR_IO, "%s: write error: %s", f->tmp, strerror(errno));
        goto out;
    }
    fd = -1;

    if (!H5OK(fapl = make_fapl())) {
        rc = h5_fail(err, NM_ERR_INTERNAL, "%s: cannot set up HDF5 file access", p);
        goto out;
    }
    f->dirty = 1; // a durable writer publishes a new trace with its first sample
    if (exists && append) {
        nm_trace_info info;
        f->dirty = 0;
        if (!H5OK(f->fid = H5Fopen(f->tmp, H5F_ACC_RDWR, fapl))) {
            rc = h5_fail(err, NM_ERR_FORMAT, "%s: cannot open the existing trace to append to it", p);
            goto out;
        }
        rc = read_root(f->fid, p, &info, err);
        if (rc != NM_OK) goto out;
        const nm_config *c = &info.cfg;
        if (c->num_layers != cfg->num_layers || c->moe.top_k != cfg->moe.top_k ||
            c->moe.num_experts != cfg->moe.num_experts || c->moe.null_copies != cfg->moe.null_copies) {
            rc = nm_fail(err, NM_ERR_INVALID,
                         "%s: cannot append: the trace has num_layers=%d top_k=%d num_experts=%d null_copies=%d, "
                         "this model has num_layers=%d top_k=%d num_experts=%d null_copies=%d",
                         p, c->num_layers, c->moe.top_k, c->moe.num_experts, c->moe.null_copies, cfg->num_layers,
                         cfg->moe.top_k, cfg->moe.num_experts, cfg->moe.null_copies);
            goto out;
        }
        rc = open_samples(f->fid, p, &f->samples, &f->count, err);
        if (rc != NM_OK) goto out;
        next_index_data d = {0};
        hsize_t idx = 0;
        if (!H5OK(H5Literate(f->samples, H5_INDEX_NAME, H5_ITER_NATIVE, &idx, next_index_cb, &d))) {
            rc = h5_fail(err, NM_ERR_FORMAT, "%s: cannot list /samples", p);
            goto out;
        }
        f->next = (int)d.next;
    } else {
        int ok = H5OK(f->fid = H5Fcreate(f->tmp, H5F_ACC_TRUNC, H5P_DEFAULT, fapl));
        if (ok && write_root_attrs(f->fid, cfg, model_name) < 0) ok = 0;
        if (ok) ok = H5OK(f->samples = H5Gcreate2(f->fid, "samples", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));
        if (!ok) {
            rc = h5_fail(err, NM_ERR_IO, "%s: cannot create trace file %s", p, f->tmp);
            goto out;
        }
    }
    f->next_open = g_open_files;
    g_open_files = f;
    rc = NM_OK;
out:
    close_id(&probe);
    close_id(&fapl);
    if (fd >= 0) close(fd);
    if (rc != NM_OK && f) {
        close_id(&f->samples);
        close_id(&f->fid);
        if (tmp_made) unlink(f->tmp);
        file_free(f);
        f = NULL;
    }
    *out = f;
    quiet_end(&q);
    return rc;
}

int nm_trace_file_num_samples(const nm_trace_file *f) { return f ? f->count : 0; }

// Is s[0..n) one well-formed UTF-8 string (no overlongs, surrogates or code points > U+10FFFF)?
static int utf8_valid(const char *str) {
    const unsigned char *s = (const unsigned char *)str;
    while (*s) {
        unsigned c = *s;
        int len;
        unsigned cp, min;
        if (c < 0x80) {
            s++;
            continue;
        } else if ((c & 0xE0) == 0xC0) {
            len = 2, cp = c & 0x1F, min = 0x80;
        } else if ((c & 0xF0) == 0xE0) {
            len = 3, cp = c & 0x0F, min = 0x800;
        } else if ((c & 0xF8) == 0xF0) {
            len = 4, cp = c & 0x07, min = 0x10000;
        } else {
            return 0;
        }
        for (int i = 1; i < len; i++) {
            if ((s[i] & 0xC0) != 0x80) return 0;
            cp = (cp << 6) | (s[i] & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
        s += len;
    }
    return 1;
}

// Checks a sample before anything is written, so that the file never holds a sample the reader
// would refuse. `who` names the target file.
static nm_status check_sample(const nm_trace_file *f, const nm_trace_sample *s, nm_error *err) {
    const char *p = f->path;
    const nm_config *c = &f->cfg;
    int L = s->n_layers, K = s->top_k, C = s->capacity, T = s->n_tokens, N = c->moe.num_experts;
    if (T == 0) return nm_fail(err, NM_ERR_INVALID, "%s: cannot write a sample with no tokens", p);
    if (T < 0 || T > C)
        return nm_fail(err, NM_ERR_INVALID, "%s: sample has n_tokens = %d outside 1..capacity (%d)", p, T, C);
    if (L != c->num_layers || K != c->moe.top_k)
        return nm_fail(err, NM_ERR_INVALID, "%s: sample has %d layers and top_k = %d; the trace has %d and %d", p, L, K,
                       c->num_layers, c->moe.top_k);
    if (!s->token_id || !s->token_text || !s->modality || !s->segment || !s->patch || !s->n_real || !s->slot ||
        !s->prob || !s->gate || !s->null_mass || !s->lse)
        return nm_fail(err, NM_ERR_INTERNAL, "%s: sample arrays not allocated", p);
    if (s->n_prompt_tokens < 0 || s->n_prompt_tokens > T)
        return nm_fail(err, NM_ERR_INVALID, "%s: n_prompt_tokens = %d outside 0..n_tokens (%d)", p, s->n_prompt_tokens, T);
    if (s->image_width < 0 || s->image_height < 0 || s->grid_rows < 0 || s->grid_cols < 0 || s->grid_rows > INT16_MAX ||
        s->grid_cols > INT16_MAX)
        return nm_fail(err, NM_ERR_INVALID, "%s: sample has negative or huge image size %dx%d or grid %dx%d", p,
                       s->image_width, s->image_height, s->grid_rows, s->grid_cols);
    for (int t = 0; t < T; t++) {
        if (s->token_id[t] < -1)
            return nm_fail(err, NM_ERR_INVALID, "%s: tokens/id[%d] = %d (expected -1 or a token id)", p, t, s->token_id[t]);
        if (s->modality[t] >= NM_MOD_COUNT)
            return nm_fail(err, NM_ERR_INVALID, "%s: tokens/modality[%d] = %d is not a modality code (0..%d)", p, t,
                           s->modality[t], NM_MOD_COUNT - 1);
        if (s->segment[t] >= NM_SEG_COUNT)
            return nm_fail(err, NM_ERR_INVALID, "%s: tokens/segment[%d] = %d is not a segment code (0..%d)", p, t,
                           s->segment[t], NM_SEG_COUNT - 1);
        int pr = s->patch[2 * t], pc = s->patch[2 * t + 1];
        if (pr < -1 || pc < -1 || (pr >= 0 && pr >= s->grid_rows) || (pc >= 0 && pc >= s->grid_cols))
            return nm_fail(err, NM_ERR_INVALID, "%s: tokens/patch[%d] = (%d, %d) is outside the %dx%d grid", p, t, pr,
                           pc, s->grid_rows, s->grid_cols);
        if (s->token_text[t] && !utf8_valid(s->token_text[t]))
            return nm_fail(err, NM_ERR_INVALID,
                           "%s: tokens/text[%d] is not valid UTF-8 (display strings must be; escape raw bytes)", p, t);
    }
    for (int l = 0; l < L; l++)
        for (int t = 0; t < T; t++) {
            size_t lt = (size_t)l * (size_t)C + (size_t)t;
            const int16_t *sl = s->slot + lt * (size_t)K;
            int real = 0;
            for (int k = 0; k < K; k++) {
                if (sl[k] < -1 || sl[k] >= N)
                    return nm_fail(err, NM_ERR_INVALID,
                                   "%s: routing/slot[layer %d, token %d, slot %d] = %d is not -1 or an expert id (0..%d)",
                                   p, l, t, k, sl[k], N - 1);
                real += sl[k] >= 0;
            }
            if (s->n_real[lt] != real)
                return nm_fail(err, NM_ERR_INVALID,
                               "%s: routing/n_real[layer %d, token %d] = %d but %d of its slots are real experts", p, l, t,
                               s->n_real[lt], real);
        }
    return NM_OK;
}

typedef struct {
    const char *name;     // relative to the sample group, e.g. "routing/slot"
    hid_t ftype, mtype;
    int rank;
    hsize_t fdims[3];     // in the file: n_tokens along the token axis
    hsize_t mdims[3];     // in memory: capacity along the token axis
    hsize_t chunk[3];
    const void *buf;
    const char *desc;
} dset_spec;

static int write_dset(hid_t grp, const dset_spec *d) {
    hid_t fs = -1, ms = -1, dcpl = -1, ds = -1;
    hsize_t start[3] = {0, 0, 0};
    int ok = H5OK(fs = H5Screate_simple(d->rank, d->fdims, NULL)) && H5OK(ms = H5Screate_simple(d->rank, d->mdims, NULL)) &&
             H5OK(H5Sselect_hyperslab(ms, H5S_SELECT_SET, start, NULL, d->fdims, NULL)) &&
             H5OK(dcpl = H5Pcreate(H5P_DATASET_CREATE)) && H5OK(H5Pset_chunk(dcpl, d->rank, d->chunk)) &&
             H5OK(H5Pset_shuffle(dcpl)) && H5OK(H5Pset_deflate(dcpl, NM_TRACE_DEFLATE)) &&
             H5OK(ds = H5Dcreate2(grp, d->name, d->ftype, fs, H5P_DEFAULT, dcpl, H5P_DEFAULT)) &&
             H5OK(H5Dwrite(ds, d->mtype, ms, H5S_ALL, H5P_DEFAULT, d->buf)) && put_attr_str(ds, "description", d->desc) == 0;
    close_id(&ds);
    close_id(&dcpl);
    close_id(&ms);
    close_id(&fs);
    return ok ? 0 : -1;
}

static hsize_t min_h(hsize_t a, hsize_t b) { return a < b ? a : b; }

// Writes the checked sample `s` as /samples/<name> into the open file. On failure the group is
// taken out again, or f->broken is set when even that fails.
static nm_status write_sample_group(nm_trace_file *f, const nm_trace_sample *s, const char *name, nm_error *err) {
    nm_status rc = NM_OK;
    const char **text = NULL;
    hid_t g = -1, sub = -1, strt = -1;
    int created = 0;
    const char *failed = NULL; // what could not be written
    const hsize_t T = (hsize_t)s->n_tokens, C = (hsize_t)s->capacity, L = (hsize_t)s->n_layers, K = (hsize_t)s->top_k;

    text = malloc((size_t)T * sizeof *text);
    if (!text) {
        rc = NM_NOMEM(err, "token text pointers");
        goto out;
    }
    int has_image = 0;
    for (hsize_t t = 0; t < T; t++) {
        text[t] = s->token_text[t] ? s->token_text[t] : "";
        has_image |= s->modality[t] == NM_MOD_VISION;
    }

    failed = "the sample group";
    if (!H5OK(g = H5Gcreate2(f->samples, name, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT))) goto h5err;
    created = 1;
    failed = "the sample attributes";
    if (put_attr_str(g, "image_path", s->image_path ? s->image_path : "") < 0 || put_attr_str(g, "prompt", s->prompt) < 0 ||
        put_attr_str(g, "answer", s->answer) < 0 || put_attr_int(g, "image_width", s->image_width) < 0 ||
        put_attr_int(g, "image_height", s->image_height) < 0 || put_attr_int(g, "grid_rows", s->grid_rows) < 0 ||
        put_attr_int(g, "grid_cols", s->grid_cols) < 0 || put_attr_int(g, "n_tokens", s->n_tokens) < 0 ||
        put_attr_int(g, "n_prompt_tokens", s->n_prompt_tokens) < 0 || put_attr_int(g, "has_image", has_image) < 0)
        goto h5err;
    failed = "tokens";
    if (!H5OK(sub = H5Gcreate2(g, "tokens", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT))) goto h5err;
    close_id(&sub);
    failed = "routing";
    if (!H5OK(sub = H5Gcreate2(g, "routing", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT))) goto h5err;
    close_id(&sub);
    failed = "tokens/text";
    if (!H5OK(strt = make_str_type())) goto h5err;

    // Chunks: per-token arrays up to 64 Ki tokens; routing arrays one layer by up to 64 Ki
    // tokens ([L,T]) or one layer by up to 32 Ki/K tokens by K ([L,T,K]: ≤ 128 KiB of float32),
    // so one layer reads without touching the others. Every chunk dimension is ≥ 1 and ≤ the
    // dataset's, valid for any T ≥ 1.
    const hsize_t ct1 = min_h(T, 65536), ctk = min_h(T, K >= 32768 ? 1 : 32768 / K);
    const dset_spec specs[] = {
        {"tokens/id", H5T_STD_I32LE, H5T_NATIVE_INT32, 1, {T}, {C}, {ct1}, s->token_id,
         "Token id per token, shape [T]: a byte value 0-255 or a special id (see the root attributes bos, eos, "
         "image_start, image_end, pad); -1 for an image patch."},
        {"tokens/text", strt, strt, 1, {T}, {T}, {ct1}, text,
         "How each token is displayed (UTF-8 string), shape [T]."},
        {"tokens/modality", H5T_STD_U8LE, H5T_NATIVE_UINT8, 1, {T}, {C}, {ct1}, s->modality,
         "Modality code per token, shape [T]: 0 = text, 1 = vision (image patch), 2 = special (BOS, EOS, image "
         "delimiters)."},
        {"tokens/segment", H5T_STD_U8LE, H5T_NATIVE_UINT8, 1, {T}, {C}, {ct1}, s->segment,
         "Segment code per token, shape [T]: 0 = bos, 1 = image (patches with their delimiters), 2 = prompt, 3 = "
         "answer (generated)."},
        {"tokens/patch", H5T_STD_I16LE, H5T_NATIVE_INT16, 2, {T, 2}, {C, 2}, {min_h(T, 32768), 2}, s->patch,
         "Patch grid position per token, shape [T, 2] = (row, col) in the grid_rows x grid_cols row-major grid; "
         "-1, -1 for tokens that are not image patches."},
        {"routing/n_real", H5T_STD_U8LE, H5T_NATIVE_UINT8, 2, {L, T}, {L, C}, {1, ct1}, s->n_real,
         "Number of the top_k selected slots that went to real experts, shape [L, T] (layer, token), 0..top_k; "
         "the compute score is n_real / top_k."},
        {"routing/slot", H5T_STD_I16LE, H5T_NATIVE_INT16, 3, {L, T, K}, {L, C, K}, {1, ctk, K}, s->slot,
         "Expert id of each selected slot, shape [L, T, K] (layer, token, slot), slots in descending router "
         "probability: 0..num_experts-1 = real expert, -1 = null copy."},
        {"routing/prob", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, 3, {L, T, K}, {L, C, K}, {1, ctk, K}, s->prob,
         "Router softmax probability (over all num_experts + null_copies slots) of each selected slot, shape "
         "[L, T, K] (layer, token, slot); for a null slot it is one copy's probability, null_mass / null_copies."},
        {"routing/gate", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, 3, {L, T, K}, {L, C, K}, {1, ctk, K}, s->gate,
         "Gate weight of each selected slot, shape [L, T, K] (layer, token, slot): renormalised over the selected "
         "real experts, 0 for null slots (null_kind zero), or over all K selected slots (null_kind copy)."},
        {"routing/null_mass", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, 2, {L, T}, {L, C}, {1, ct1}, s->null_mass,
         "Total router softmax probability on the null_copies null slots, shape [L, T] (layer, token); 0 when "
         "null_copies = 0."},
        {"routing/lse", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, 2, {L, T}, {L, C}, {1, ct1}, s->lse,
         "Natural-log log-sum-exp of the expanded router logits (all num_experts + null_copies slots), shape [L, T] "
         "(layer, token)."},
    };
    for (size_t i = 0; i < sizeof specs / sizeof specs[0]; i++) {
        failed = specs[i].name;
        if (write_dset(g, &specs[i]) < 0) goto h5err;
    }
    close_id(&g);
    rc = NM_OK;
    goto out;

h5err:
    rc = h5_fail(err, NM_ERR_IO, "%s: /samples/%s: cannot write %s", f->path, name, failed);
out:
    close_id(&strt);
    close_id(&sub);
    close_id(&g);
    free(text);
    if (rc != NM_OK && created) { // take the half-written sample out again, or refuse to commit
        if (H5Ldelete(f->samples, name, H5P_DEFAULT) < 0) f->broken = 1;
    }
    return rc;
}

// Durable writing, step 1: closes the shadow and renames it over the published file, keeping
// the old inode as f->prev when it can become the next shadow (*reusable): when this writer
// published it and the shadow differs from it by one sample only (not the trace found at open,
// which --force replaces and --append's batch record changes). The published file must be the
// one this writer published last (or found at open).
static nm_status publish_shadow(nm_trace_file *f, int *reusable, nm_error *err) {
    const char *p = f->path;
    *reusable = 0;
    close_id(&f->samples);
    herr_t cl = H5Fclose(f->fid);
    f->fid = -1;
    if (f->shadow_lock_fd >= 0) { // readers may lock it once it is published
        close(f->shadow_lock_fd);
        f->shadow_lock_fd = -1;
    }
    if (cl < 0) {
        h5_note();
        return h5_fail(err, NM_ERR_IO, "%s: cannot close the shadow copy %s", p, f->tmp);
    }
    nm_status rc = nm_fsync_path(f->tmp, 0, err);
    if (rc != NM_OK) return rc;
    struct stat now;
    int now_exists = stat(p, &now) == 0;
    if (!now_exists && errno != ENOENT) return nm_fail(err, NM_ERR_IO, "%s: %s", p, strerror(errno));
    if (now_exists != f->target_existed || (now_exists && !same_file_state(&now, &f->target_st)))
        return nm_fail(err, NM_ERR_IO, "%s: %s since this writer last committed to it (another writer?); not "
                       "replacing it", p, now_exists ? (f->target_existed ? "changed" : "was created") : "was removed");
    const int keep_prev = now_exists && f->published && !f->attrs_changed;
    if (keep_prev) {
        if (unlink(f->prev) != 0 && errno != ENOENT)
            return nm_fail(err, NM_ERR_IO, "%s: cannot remove %s: %s", p, f->prev, strerror(errno));
        if (link(p, f->prev) != 0)
            return nm_fail(err, NM_ERR_IO, "%s: cannot link it to %s: %s", p, f->prev, strerror(errno));
    }
    if (rename(f->tmp, p) != 0) {
        int e = errno;
        if (keep_prev) unlink(f->prev);
        return nm_fail(err, NM_ERR_IO, "%s: cannot rename %s over it: %s", p, f->tmp, strerror(e));
    }
    *reusable = keep_prev;
    f->published = 1;
    f->attrs_changed = 0;
    f->dirty = 0;
    if (stat(p, &f->target_st) != 0) return nm_fail(err, NM_ERR_IO, "%s: %s", p, strerror(errno));
    f->target_existed = 1;
    return fsync_dir_of(p, err);
}

// Durable writing, step 2: the next shadow. The previous generation's inode (f->prev, one
// sample behind) is reused when it is `reusable` and no reader holds it: sample `s` is written
// into it again. Otherwise, or when anything about the reuse fails, the published file is copied.
static nm_status prepare_shadow(nm_trace_file *f, int reusable, const nm_trace_sample *s, const char *name,
                                nm_error *err) {
    if (reusable) {
        int fd = open(f->prev, O_RDWR | O_CLOEXEC);
        if (fd >= 0 && flock(fd, LOCK_EX | LOCK_NB) == 0 && rename(f->prev, f->tmp) == 0) {
            f->shadow_lock_fd = fd;
            nm_error why;
            if (open_shadow(f, 1, &why) == NM_OK && write_sample_group(f, s, name, &why) == NM_OK) return NM_OK;
            close_id(&f->samples);
            close_id(&f->fid);
            f->broken = 0; // the copy below replaces the shadow whatever state it is in
            close(f->shadow_lock_fd);
            f->shadow_lock_fd = -1;
        } else {
            if (fd >= 0) close(fd);
            unlink(f->prev); // a reader keeps it; the name goes
        }
    }
    f->shadow_copies++;
    nm_status rc = copy_to_shadow(f, err);
    if (rc == NM_OK) rc = open_shadow(f, 0, err);
    return rc;
}

nm_status nm_trace_file_write_sample_at(nm_trace_file *f, const nm_trace_sample *s, int index, nm_error *err) {
    nm_error local;
    if (!err) err = &local;
    if (!f || !s) return nm_fail(err, NM_ERR_INTERNAL, "nm_trace_file_write_sample: NULL argument");
    if (f->broken)
        return nm_fail(err, NM_ERR_INVALID, "%s: an earlier write to this trace failed; abort it and start again", f->path);
    if (index < 0 || index >= NM_TRACE_MAX_SAMPLES)
        return nm_fail(err, NM_ERR_LIMIT, "%s: sample index %d is outside 0..%d (a trace holds at most %d samples)",
                       f->path, index, NM_TRACE_MAX_SAMPLES - 1, NM_TRACE_MAX_SAMPLES);
    nm_status rc = check_sample(f, s, err);
    if (rc != NM_OK) return rc;
    h5_quiet q;
    quiet_begin(&q);
    char name[16];
    snprintf(name, sizeof name, "%06d", index);
    htri_t ex = H5Lexists(f->samples, name, H5P_DEFAULT);
    if (ex != 0) {
        if (ex < 0) h5_note();
        rc = ex < 0 ? h5_fail(err, NM_ERR_IO, "%s: cannot look up /samples/%s", f->path, name)
                    : nm_fail(err, NM_ERR_INVALID, "%s: already holds /samples/%s", f->path, name);
        goto out;
    }
    rc = write_sample_group(f, s, name, err);
    if (rc != NM_OK) goto out;
    f->count++;
    if (index >= f->next) f->next = index + 1;
    f->dirty = 1;
    if (f->durable) {
        int reusable = 0;
        rc = publish_shadow(f, &reusable, err);
        if (rc != NM_OK) {
            f->broken = 1;
            nm_error_prefix(err, "sample %d not committed", index);
            goto out;
        }
        rc = prepare_shadow(f, reusable, s, name, err);
        if (rc != NM_OK) {
            f->broken = 1;
            nm_error_prefix(err, "sample %d committed, but the writer cannot go on", index);
        }
    }
out:
    quiet_end(&q);
    return rc;
}

nm_status nm_trace_file_write_sample(nm_trace_file *f, const nm_trace_sample *s, int *index, nm_error *err) {
    nm_error local;
    if (!err) err = &local;
    if (index) *index = -1;
    if (!f) return nm_fail(err, NM_ERR_INTERNAL, "nm_trace_file_write_sample: NULL argument");
    if (f->next >= NM_TRACE_MAX_SAMPLES && !f->broken)
        return nm_fail(err, NM_ERR_LIMIT, "%s: a trace holds at most %d samples", f->path, NM_TRACE_MAX_SAMPLES);
    int at = f->next;
    nm_status rc = nm_trace_file_write_sample_at(f, s, at, err);
    if (rc == NM_OK && index) *index = at;
    return rc;
}

// A durable writer's commit: what is not published yet (a new, still empty trace) is published;
// the shadow and the previous generation's name go.
static nm_status durable_commit(nm_trace_file *f, nm_error *err) {
    nm_status rc = NM_OK;
    if (f->broken) {
        rc = nm_fail(err, NM_ERR_INVALID, "%s: an earlier write failed; the samples before it are committed", f->path);
    } else if (f->dirty) {
        int reusable = 0;
        rc = publish_shadow(f, &reusable, err);
    }
    close_id(&f->samples);
    close_id(&f->fid);
    unlink(f->tmp);
    unlink(f->prev);
    file_free(f);
    return rc;
}

nm_status nm_trace_file_commit(nm_trace_file *f, nm_error *err) {
    nm_error local;
    if (!err) err = &local;
    if (!f) return nm_fail(err, NM_ERR_INTERNAL, "nm_trace_file_commit: NULL file");
    h5_quiet q;
    quiet_begin(&q);
    nm_status rc = NM_OK;
    char *dir = NULL;
    if (f->durable) {
        rc = durable_commit(f, err);
        quiet_end(&q);
        return rc;
    }
    if (f->broken) {
        rc = nm_fail(err, NM_ERR_INVALID, "%s: an earlier write failed; the trace was not replaced", f->path);
        goto out;
    }
    if (!H5OK(H5Fflush(f->fid, H5F_SCOPE_LOCAL))) {
        rc = h5_fail(err, NM_ERR_IO, "%s: cannot flush %s", f->path, f->tmp);
        goto out;
    }
    close_id(&f->samples);
    herr_t cl = H5Fclose(f->fid);
    f->fid = -1;
    if (cl < 0) {
        h5_note();
        rc = h5_fail(err, NM_ERR_IO, "%s: cannot close %s", f->path, f->tmp);
        goto out;
    }
    rc = nm_fsync_path(f->tmp, 0, err);
    if (rc != NM_OK) goto out;

    // Someone else replaced or changed the target since it was opened: do not clobber their work.
    struct stat now;
    int now_exists = stat(f->path, &now) == 0;
    if (!now_exists && errno != ENOENT) {
        rc = nm_fail(err, NM_ERR_IO, "%s: %s", f->path, strerror(errno));
        goto out;
    }
    if (now_exists != f->target_existed || (now_exists && !same_file_state(&now, &f->target_st))) {
        rc = nm_fail(err, NM_ERR_IO, "%s: %s since this trace was opened (another writer?); not replacing it",
                     f->path, now_exists ? (f->target_existed ? "changed" : "was created") : "was removed");
        goto out;
    }
    if (rename(f->tmp, f->path) != 0) {
        rc = nm_fail(err, NM_ERR_IO, "%s: cannot rename %s over it: %s", f->path, f->tmp, strerror(errno));
        goto out;
    }
    dir = strdup(f->path);
    if (!dir) { // renamed already: the trace is in place; only the directory sync is skipped
        rc = NM_NOMEM(err, "a path");
        free(f->tmp);
        f->tmp = NULL;
        goto out;
    }
    char *slash = strrchr(dir, '/');
    const char *d = ".";
    if (slash == dir)
        d = "/";
    else if (slash) {
        *slash = '\0';
        d = dir;
    }
    free(f->tmp);
    f->tmp = NULL; // renamed: nothing to clean up any more
    rc = nm_fsync_path(d, 1, err);
out:
    free(dir);
    close_id(&f->samples);
    close_id(&f->fid);
    if (f->tmp) unlink(f->tmp);
    file_free(f);
    quiet_end(&q);
    return rc;
}

void nm_trace_file_abort(nm_trace_file *f) {
    if (!f) return;
    h5_quiet q;
    quiet_begin(&q);
    close_id(&f->samples);
    close_id(&f->fid);
    if (f->tmp) unlink(f->tmp);
    if (f->prev) unlink(f->prev);
    file_free(f);
    quiet_end(&q);
}

nm_status nm_trace_file_open(nm_trace_file **out, const char *path, const nm_config *cfg, const char *model_name,
                             int append, int overwrite, nm_error *err) {
    return trace_open(out, path, cfg, model_name, append, overwrite, 0, err);
}

nm_status nm_trace_file_open_durable(nm_trace_file **out, const char *path, const nm_config *cfg,
                                     const char *model_name, int append, int overwrite, nm_error *err) {
    return trace_open(out, path, cfg, model_name, append, overwrite, 1, err);
}

int nm_trace_file_next_index(const nm_trace_file *f) { return f ? f->next : 0; }

int nm_trace_file_broken(const nm_trace_file *f) { return f ? f->broken : 0; }

int nm_trace_file_shadow_copies(const nm_trace_file *f) { return f ? f->shadow_copies : 0; }

int nm_trace_file_has_sample(const nm_trace_file *f, int index) {
    if (!f || f->samples < 0 || index < 0 || index >= NM_TRACE_MAX_SAMPLES) return 0;
    char name[16];
    snprintf(name, sizeof name, "%06d", index);
    h5_quiet q;
    quiet_begin(&q);
    htri_t ex = H5Lexists(f->samples, name, H5P_DEFAULT);
    quiet_end(&q);
    return ex > 0;
}

// Replaces a root attribute (deleting an older one of any type first).
static int replace_root_attr(hid_t fid, const char *name) {
    htri_t ex = H5Aexists(fid, name);
    if (ex < 0) return h5_note(), -1;
    if (ex > 0 && !H5OK(H5Adelete(fid, name))) return -1;
    return 0;
}

nm_status nm_trace_file_set_batch(nm_trace_file *f, const nm_trace_batch *b, nm_error *err) {
    nm_error local;
    if (!err) err = &local;
    if (!f || !b) return nm_fail(err, NM_ERR_INTERNAL, "nm_trace_file_set_batch: NULL argument");
    if (f->broken) return nm_fail(err, NM_ERR_INVALID, "%s: an earlier write to this trace failed", f->path);
    h5_quiet q;
    quiet_begin(&q);
    int ok = replace_root_attr(f->fid, "batch_key") == 0 && put_attr_str(f->fid, "batch_key", b->key) == 0 &&
             replace_root_attr(f->fid, "batch_first_sample") == 0 &&
             put_attr_int(f->fid, "batch_first_sample", b->first_sample) == 0 &&
             replace_root_attr(f->fid, "batch_pairs") == 0 && put_attr_int(f->fid, "batch_pairs", b->n_pairs) == 0;
    nm_status rc = NM_OK;
    if (!ok) {
        f->broken = 1;
        rc = h5_fail(err, NM_ERR_IO, "%s: cannot record the batch in the root attributes", f->path);
    }
    f->dirty = 1;
    f->attrs_changed = 1;
    quiet_end(&q);
    return rc;
}

nm_status nm_trace_file_get_batch(const nm_trace_file *f, nm_trace_batch *b, nm_error *err) {
    nm_error local;
    if (!err) err = &local;
    if (!f || !b) return nm_fail(err, NM_ERR_INTERNAL, "nm_trace_file_get_batch: NULL argument");
    memset(b, 0, sizeof *b);
    h5_quiet q;
    quiet_begin(&q);
    char *key = NULL;
    nm_status rc = NM_OK;
    int r = get_attr_str(f->fid, "batch_key", &key, f->path, err);
    if (r > 0) {
        snprintf(b->key, sizeof b->key, "%s", key);
        if (get_attr_int(f->fid, "batch_first_sample", &b->first_sample, f->path, err) <= 0 ||
            get_attr_int(f->fid, "batch_pairs", &b->n_pairs, f->path, err) <= 0 || b->first_sample < 0 ||
            b->n_pairs < 0)
            rc = nm_fail(err, NM_ERR_FORMAT, "%s: root attribute batch_key without valid batch_first_sample and "
                         "batch_pairs", f->path);
    } else if (r < 0) {
        rc = err->code;
    }
    free(key);
    quiet_end(&q);
    return rc;
}

// ---------------------------------------------------------------------------------------------
// Reading

nm_status nm_trace_read_info(nm_trace_info *info, const char *path, nm_error *err) {
    nm_error local;
    if (!err) err = &local;
    if (!info || !path) return nm_fail(err, NM_ERR_INTERNAL, "nm_trace_read_info: NULL argument");
    memset(info, 0, sizeof *info);
    h5_quiet q;
    quiet_begin(&q);
    hid_t fid = -1, grp = -1;
    nm_status rc = open_read(&fid, path, err);
    if (rc == NM_OK) rc = read_root(fid, path, info, err);
    if (rc == NM_OK) rc = open_samples(fid, path, &grp, &info->num_samples, err);
    close_id(&grp);
    close_id(&fid);
    if (rc != NM_OK) memset(info, 0, sizeof *info);
    quiet_end(&q);
    return rc;
}

static H5T_conv_ret_t conv_abort_cb(H5T_conv_except_t type, hid_t src, hid_t dst, void *sbuf, void *dbuf, void *data) {
    (void)type, (void)src, (void)dst, (void)sbuf, (void)dbuf;
    *(int *)data = 1;
    return H5T_CONV_ABORT;
}

typedef struct {
    const char *path;   // the file
    const char *sname;  // the sample's name
    hid_t g;            // the sample group
} sample_ctx;

// Opens a required (or optional) dataset "grp/name" of the sample and checks its rank, class and
// dimensions (dims[i] < 0: any, reported back). 1 = opened, 0 = absent (optional), -1 = error.
static int open_dset(const sample_ctx *x, const char *name, int required, int rank, long long *dims, int numeric,
                     hid_t *out, nm_error *err) {
    *out = -1;
    char grp[16];
    const char *slash = strchr(name, '/');
    snprintf(grp, sizeof grp, "%.*s", (int)(slash - name), name);
    htri_t ex = H5Lexists(x->g, grp, H5P_DEFAULT);
    if (ex > 0) ex = H5Lexists(x->g, name, H5P_DEFAULT);
    if (ex < 0) {
        h5_note();
        h5_fail(err, NM_ERR_FORMAT, "%s: /samples/%s/%s: cannot read", x->path, x->sname, name);
        return -1;
    }
    if (ex == 0) {
        if (!required) return 0;
        nm_fail(err, NM_ERR_FORMAT, "%s: /samples/%s/%s: missing dataset", x->path, x->sname, name);
        return -1;
    }
    hid_t d = -1, sp = -1, t = -1;
    int r = -1;
    if (!H5OK(d = H5Dopen2(x->g, name, H5P_DEFAULT)) || !H5OK(sp = H5Dget_space(d)) || !H5OK(t = H5Dget_type(d))) {
        h5_fail(err, NM_ERR_FORMAT, "%s: /samples/%s/%s: cannot open dataset", x->path, x->sname, name);
        goto out;
    }
    H5T_class_t cls = H5Tget_class(t);
    int class_ok = numeric == 1 ? cls == H5T_INTEGER : numeric == 2 ? (cls == H5T_INTEGER || cls == H5T_FLOAT)
                                                                    : cls == H5T_STRING;
    if (!class_ok) {
        nm_fail(err, NM_ERR_FORMAT, "%s: /samples/%s/%s: wrong element type (expected %s)", x->path, x->sname, name,
                numeric == 1 ? "integers" : numeric == 2 ? "numbers" : "strings");
        goto out;
    }
    int rk = H5Sget_simple_extent_ndims(sp);
    hsize_t hd[H5S_MAX_RANK];
    if (rk != rank || H5Sget_simple_extent_dims(sp, hd, NULL) != rank) {
        nm_fail(err, NM_ERR_FORMAT, "%s: /samples/%s/%s: has %d dimensions, expected %d", x->path, x->sname, name, rk,
                rank);
        goto out;
    }
    for (int i = 0; i < rank; i++) {
        if (dims[i] < 0) {
            dims[i] = hd[i] > (hsize_t)INT_MAX ? (long long)INT_MAX + 1 : (long long)hd[i];
        } else if ((long long)hd[i] != dims[i]) {
            char got[96], want[96];
            int ng = 0, nw = 0;
            for (int j = 0; j < rank; j++) {
                ng += snprintf(got + ng, sizeof got - (size_t)ng, "%s%llu", j ? ", " : "", (unsigned long long)hd[j]);
                nw += snprintf(want + nw, sizeof want - (size_t)nw, "%s%lld", j ? ", " : "", dims[j]);
            }
            nm_fail(err, NM_ERR_INVALID,
                    "%s: /samples/%s/%s: shape [%s] does not match the expected [%s] (from num_layers, "
                    "the length of tokens/id and top_k)",
                    x->path, x->sname, name, got, want);
            goto out;
        }
    }
    *out = d;
    d = -1;
    r = 1;
out:
    close_id(&t);
    close_id(&sp);
    close_id(&d);
    return r;
}

static nm_status read_numeric(const sample_ctx *x, const char *name, hid_t d, hid_t mtype, void *buf, nm_error *err) {
    int overflow = 0;
    hid_t dx = -1;
    int ok = H5OK(dx = H5Pcreate(H5P_DATASET_XFER)) && H5OK(H5Pset_type_conv_cb(dx, conv_abort_cb, &overflow)) &&
             H5OK(H5Dread(d, mtype, H5S_ALL, H5S_ALL, dx, buf));
    close_id(&dx);
    if (ok) return NM_OK;
    if (overflow) {
        g_detail[0] = '\0';
        return nm_fail(err, NM_ERR_INVALID, "%s: /samples/%s/%s: a value is out of range for its type", x->path,
                       x->sname, name);
    }
    return h5_fail(err, NM_ERR_FORMAT, "%s: /samples/%s/%s: cannot read", x->path, x->sname, name);
}

// Reads a [T] string dataset (fixed or variable length, any character set) into owned strings.
static nm_status read_text(const sample_ctx *x, hid_t d, nm_trace_sample *s, nm_error *err) {
    const char *name = "tokens/text";
    size_t T = (size_t)s->n_tokens;
    hid_t ft = -1, mt = -1, sp = -1;
    nm_status rc = NM_OK;
    char **vbuf = NULL;
    char *fbuf = NULL;
    H5T_cset_t cset;
    htri_t var;
    if (!H5OK(ft = H5Dget_type(d)) || !H5OK(cset = H5Tget_cset(ft)) || !H5OK(var = H5Tis_variable_str(ft)) ||
        !H5OK(mt = H5Tcopy(H5T_C_S1)) || !H5OK(H5Tset_cset(mt, cset))) {
        rc = h5_fail(err, NM_ERR_FORMAT, "%s: /samples/%s/%s: cannot read", x->path, x->sname, name);
        goto out;
    }
    if (var) {
        vbuf = calloc(T, sizeof *vbuf);
        if (!vbuf) {
            rc = NM_NOMEM(err, "token text");
            goto out;
        }
        if (!H5OK(H5Tset_size(mt, H5T_VARIABLE)) || !H5OK(sp = H5Dget_space(d))) {
            rc = h5_fail(err, NM_ERR_FORMAT, "%s: /samples/%s/%s: cannot read", x->path, x->sname, name);
            goto out;
        }
        int ok = H5OK(H5Dread(d, mt, H5S_ALL, H5S_ALL, H5P_DEFAULT, vbuf));
        if (!ok) {
            rc = h5_fail(err, NM_ERR_FORMAT, "%s: /samples/%s/%s: cannot read", x->path, x->sname, name);
        } else {
            for (size_t t = 0; t < T && rc == NM_OK; t++)
                if (!(s->token_text[t] = strdup(vbuf[t] ? vbuf[t] : ""))) rc = NM_NOMEM(err, "token text");
        }
        H5Dvlen_reclaim(mt, sp, H5P_DEFAULT, vbuf);
    } else {
        size_t n = H5Tget_size(ft);
        if (n == 0 || n > nm_limit(NM_LIMIT_TRACE_STRING_BYTES) || T > (SIZE_MAX / 2) / (n + 1) ||
            T * (n + 1) > ((size_t)1 << 31)) {
            rc = nm_limit_fail(err, NM_LIMIT_TRACE_STRING_BYTES, "%s: /samples/%s/%s: %zu strings of %zu bytes each are",
                               x->path, x->sname, name, T, n);
            goto out;
        }
        fbuf = malloc(T * (n + 1));
        if (!fbuf) {
            rc = NM_NOMEM(err, "token text");
            goto out;
        }
        if (!H5OK(H5Tset_size(mt, n + 1)) || !H5OK(H5Tset_strpad(mt, H5T_STR_NULLTERM)) ||
            !H5OK(H5Dread(d, mt, H5S_ALL, H5S_ALL, H5P_DEFAULT, fbuf))) {
            rc = h5_fail(err, NM_ERR_FORMAT, "%s: /samples/%s/%s: cannot read", x->path, x->sname, name);
            goto out;
        }
        for (size_t t = 0; t < T && rc == NM_OK; t++) {
            char *e = fbuf + t * (n + 1);
            e[n] = '\0';
            if (!(s->token_text[t] = strdup(e))) rc = NM_NOMEM(err, "token text");
        }
    }
out:
    free(vbuf);
    free(fbuf);
    close_id(&sp);
    close_id(&mt);
    close_id(&ft);
    return rc;
}

// Range and consistency checks of the values read (the writer makes the same checks).
static nm_status validate_sample(const sample_ctx *x, const nm_trace_sample *s, int num_experts, nm_error *err) {
    int L = s->n_layers, K = s->top_k, T = s->n_tokens;
    for (int t = 0; t < T; t++) {
        if (s->token_id[t] < -1)
            return nm_fail(err, NM_ERR_INVALID, "%s: /samples/%s/tokens/id: value %d at token %d is not -1 or a token id",
                           x->path, x->sname, s->token_id[t], t);
        if (s->modality[t] >= NM_MOD_COUNT)
            return nm_fail(err, NM_ERR_INVALID,
                           "%s: /samples/%s/tokens/modality: value %d at token %d is not a modality code (0..%d)",
                           x->path, x->sname, s->modality[t], t, NM_MOD_COUNT - 1);
        if (s->segment[t] >= NM_SEG_COUNT)
            return nm_fail(err, NM_ERR_INVALID,
                           "%s: /samples/%s/tokens/segment: value %d at token %d is not a segment code (0..%d)",
                           x->path, x->sname, s->segment[t], t, NM_SEG_COUNT - 1);
        int pr = s->patch[2 * t], pc = s->patch[2 * t + 1];
        if (pr < -1 || pc < -1 || (pr >= 0 && s->grid_rows > 0 && pr >= s->grid_rows) ||
            (pc >= 0 && s->grid_cols > 0 && pc >= s->grid_cols))
            return nm_fail(err, NM_ERR_INVALID,
                           "%s: /samples/%s/tokens/patch: (%d, %d) at token %d is outside the %dx%d patch grid", x->path,
                           x->sname, pr, pc, t, s->grid_rows, s->grid_cols);
    }
    for (int l = 0; l < L; l++)
        for (int t = 0; t < T; t++) {
            size_t lt = (size_t)l * (size_t)T + (size_t)t;
            const int16_t *sl = s->slot + lt * (size_t)K;
            int real = 0;
            for (int k = 0; k < K; k++) {
                if (sl[k] < -1 || sl[k] >= num_experts)
                    return nm_fail(err, NM_ERR_INVALID,
                                   "%s: /samples/%s/routing/slot: value %d at [layer %d, token %d, slot %d] is not -1 "
                                   "(null copy) or an expert id 0..%d",
                                   x->path, x->sname, sl[k], l, t, k, num_experts - 1);
                real += sl[k] >= 0;
            }
            if (s->n_real[lt] > K)
                return nm_fail(err, NM_ERR_INVALID,
                               "%s: /samples/%s/routing/n_real: value %d at [layer %d, token %d] exceeds top_k = %d",
                               x->path, x->sname, s->n_real[lt], l, t, K);
            if (s->n_real[lt] != real)
                return nm_fail(err, NM_ERR_INVALID,
                               "%s: /samples/%s/routing/n_real: value %d at [layer %d, token %d] differs from the %d "
                               "real experts in routing/slot",
                               x->path, x->sname, s->n_real[lt], l, t, real);
        }
    return NM_OK;
}

// Sample attributes: strings and ints, all optional for other writers (absent: "" / 0).
static nm_status read_sample_attrs(const sample_ctx *x, nm_trace_sample *s, int *n_tokens_attr, nm_error *err) {
    char where[600];
    snprintf(where, sizeof where, "%s: /samples/%s", x->path, x->sname);
    char **strs[] = {&s->image_path, &s->prompt, &s->answer};
    const char *snames[] = {"image_path", "prompt", "answer"};
    for (int i = 0; i < 3; i++) {
        int r = get_attr_str(x->g, snames[i], strs[i], where, err);
        if (r < 0) return err->code;
        if (r == 0 && i > 0 && !(*strs[i] = strdup(""))) return NM_NOMEM(err, "a string");
    }
    if (s->image_path && !s->image_path[0]) { // "" = no image
        free(s->image_path);
        s->image_path = NULL;
    }
    struct { const char *name; int *dst; } ints[] = {
        {"image_width", &s->image_width}, {"image_height", &s->image_height}, {"grid_rows", &s->grid_rows},
        {"grid_cols", &s->grid_cols},     {"n_prompt_tokens", &s->n_prompt_tokens}, {"n_tokens", n_tokens_attr},
    };
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++) {
        int r = get_attr_int(x->g, ints[i].name, ints[i].dst, where, err);
        if (r < 0) return err->code;
        if (*ints[i].dst < 0)
            return nm_fail(err, NM_ERR_INVALID, "%s: attribute %s = %d is negative", where, ints[i].name, *ints[i].dst);
    }
    if (s->grid_rows > INT16_MAX || s->grid_cols > INT16_MAX)
        return nm_fail(err, NM_ERR_INVALID, "%s: patch grid %dx%d is too large", where, s->grid_rows, s->grid_cols);
    return NM_OK;
}

// Reads sample `index` from the open /samples group `grp` of `path` (root attributes in info,
// `count` samples). Called with errors quieted.
static nm_status read_sample_in(nm_trace_sample *s, const char *path, hid_t grp, const nm_trace_info *info, int count,
                                int index, nm_error *err) {
    memset(s, 0, sizeof *s);
    hid_t g = -1;
    enum { D_ID, D_TEXT, D_MOD, D_SEG, D_PATCH, D_NREAL, D_SLOT, D_PROB, D_GATE, D_NULL, D_LSE, D_COUNT };
    hid_t ds[D_COUNT];
    for (int i = 0; i < D_COUNT; i++) ds[i] = -1;
    char sname[256] = "";
    nm_trace_sample tmp;
    memset(&tmp, 0, sizeof tmp);
    nm_status rc = NM_OK;
    if (index < 0 || index >= count) {
        rc = nm_fail(err, NM_ERR_INVALID, "%s: sample %d does not exist (the trace holds %d sample%s)", path, index,
                     count, count == 1 ? "" : "s");
        goto out;
    }
    ssize_t nl = H5Lget_name_by_idx(grp, ".", H5_INDEX_NAME, H5_ITER_INC, (hsize_t)index, sname, sizeof sname,
                                    H5P_DEFAULT);
    if (nl < 0) h5_note();
    if (nl < 0 || (size_t)nl >= sizeof sname) {
        rc = h5_fail(err, NM_ERR_FORMAT, "%s: cannot read the name of sample %d", path, index);
        goto out;
    }
    if (!H5OK(g = H5Gopen2(grp, sname, H5P_DEFAULT))) {
        rc = h5_fail(err, NM_ERR_FORMAT, "%s: cannot open /samples/%s as a group", path, sname);
        goto out;
    }
    const sample_ctx x = {path, sname, g};
    const long long L = info->cfg.num_layers, K = info->cfg.moe.top_k;

    // Shapes first, all of them, before anything is allocated.
    long long dT[1] = {-1};
    if (open_dset(&x, "tokens/id", 1, 1, dT, 1, &ds[D_ID], err) < 0) goto fail;
    const long long T = dT[0];
    if (T < 1) {
        rc = nm_fail(err, NM_ERR_FORMAT, "%s: /samples/%s/tokens/id: the sample has no tokens", path, sname);
        goto out;
    }
    if (T > INT_MAX || (uint64_t)L * (uint64_t)T * (uint64_t)K > nm_limit(NM_LIMIT_TRACE_ENTRIES)) {
        rc = nm_limit_fail(err, NM_LIMIT_TRACE_ENTRIES, "%s: /samples/%s: %lld layers x %lld tokens x %lld slots are", path,
                           sname, L, T, K);
        goto out;
    }
    long long d1[1] = {T}, dT2[2] = {T, 2}, dLT[2] = {L, T}, dLTK[3] = {L, T, K};
    if (open_dset(&x, "tokens/text", 0, 1, d1, 0, &ds[D_TEXT], err) < 0 ||
        open_dset(&x, "tokens/modality", 1, 1, d1, 1, &ds[D_MOD], err) < 0 ||
        open_dset(&x, "tokens/segment", 1, 1, d1, 1, &ds[D_SEG], err) < 0 ||
        open_dset(&x, "tokens/patch", 1, 2, dT2, 1, &ds[D_PATCH], err) < 0 ||
        open_dset(&x, "routing/n_real", 1, 2, dLT, 1, &ds[D_NREAL], err) < 0 ||
        open_dset(&x, "routing/slot", 1, 3, dLTK, 1, &ds[D_SLOT], err) < 0 ||
        open_dset(&x, "routing/prob", 1, 3, dLTK, 2, &ds[D_PROB], err) < 0 ||
        open_dset(&x, "routing/gate", 1, 3, dLTK, 2, &ds[D_GATE], err) < 0 ||
        open_dset(&x, "routing/null_mass", 1, 2, dLT, 2, &ds[D_NULL], err) < 0 ||
        open_dset(&x, "routing/lse", 1, 2, dLT, 2, &ds[D_LSE], err) < 0)
        goto fail;

    rc = nm_trace_sample_init(&tmp, (int)L, (int)K, (int)T, err);
    if (rc != NM_OK) goto out;
    tmp.n_tokens = (int)T;
    int n_tokens_attr = (int)T;
    rc = read_sample_attrs(&x, &tmp, &n_tokens_attr, err);
    if (rc != NM_OK) goto out;
    if (n_tokens_attr != T) {
        rc = nm_fail(err, NM_ERR_INVALID, "%s: /samples/%s: attribute n_tokens = %d but tokens/id holds %lld tokens",
                     path, sname, n_tokens_attr, T);
        goto out;
    }
    if (tmp.n_prompt_tokens > T) {
        rc = nm_fail(err, NM_ERR_INVALID, "%s: /samples/%s: attribute n_prompt_tokens = %d exceeds n_tokens = %lld",
                     path, sname, tmp.n_prompt_tokens, T);
        goto out;
    }
    struct { int d; const char *name; hid_t mt; void *buf; } rd[] = {
        {D_ID, "tokens/id", H5T_NATIVE_INT32, tmp.token_id},
        {D_MOD, "tokens/modality", H5T_NATIVE_UINT8, tmp.modality},
        {D_SEG, "tokens/segment", H5T_NATIVE_UINT8, tmp.segment},
        {D_PATCH, "tokens/patch", H5T_NATIVE_INT16, tmp.patch},
        {D_NREAL, "routing/n_real", H5T_NATIVE_UINT8, tmp.n_real},
        {D_SLOT, "routing/slot", H5T_NATIVE_INT16, tmp.slot},
        {D_PROB, "routing/prob", H5T_NATIVE_FLOAT, tmp.prob},
        {D_GATE, "routing/gate", H5T_NATIVE_FLOAT, tmp.gate},
        {D_NULL, "routing/null_mass", H5T_NATIVE_FLOAT, tmp.null_mass},
        {D_LSE, "routing/lse", H5T_NATIVE_FLOAT, tmp.lse},
    };
    for (size_t i = 0; i < sizeof rd / sizeof rd[0]; i++) {
        rc = read_numeric(&x, rd[i].name, ds[rd[i].d], rd[i].mt, rd[i].buf, err);
        if (rc != NM_OK) goto out;
    }
    if (ds[D_TEXT] >= 0) {
        rc = read_text(&x, ds[D_TEXT], &tmp, err);
        if (rc != NM_OK) goto out;
    } else {
        for (long long t = 0; t < T; t++)
            if (!(tmp.token_text[t] = strdup(""))) {
                rc = NM_NOMEM(err, "token text");
                goto out;
            }
    }
    rc = validate_sample(&x, &tmp, info->cfg.moe.num_experts, err);
    if (rc != NM_OK) goto out;
    *s = tmp;
    memset(&tmp, 0, sizeof tmp);
    goto out;
fail:
    rc = err->code != NM_OK ? err->code : NM_ERR_INTERNAL;
out:
    nm_trace_sample_free(&tmp);
    for (int i = 0; i < D_COUNT; i++) close_id(&ds[i]);
    close_id(&g);
    return rc;
}

// ---------------------------------------------------------------------------------------------
// A reader that keeps one file open: all its reads see one committed state of the trace.

struct nm_trace_reader {
    char *path;
    hid_t fid, samples;
    nm_trace_info info;
};

void nm_trace_reader_close(nm_trace_reader *r) {
    if (!r) return;
    h5_quiet q;
    quiet_begin(&q);
    close_id(&r->samples);
    close_id(&r->fid);
    quiet_end(&q);
    free(r->path);
    free(r);
}

nm_status nm_trace_reader_open(nm_trace_reader **out, const char *path, nm_trace_info *info, nm_error *err) {
    nm_error local;
    if (!err) err = &local;
    if (out) *out = NULL;
    if (!out || !path) return nm_fail(err, NM_ERR_INTERNAL, "nm_trace_reader_open: NULL argument");
    nm_trace_reader *r = calloc(1, sizeof *r);
    if (!r) return NM_NOMEM(err, "a trace reader");
    r->fid = r->samples = -1;
    if (!(r->path = strdup(path))) {
        free(r);
        return NM_NOMEM(err, "a path");
    }
    h5_quiet q;
    quiet_begin(&q);
    nm_status rc = open_read(&r->fid, path, err);
    if (rc == NM_OK) rc = read_root(r->fid, path, &r->info, err);
    if (rc == NM_OK) rc = open_samples(r->fid, path, &r->samples, &r->info.num_samples, err);
    quiet_end(&q);
    if (rc != NM_OK) {
        nm_trace_reader_close(r);
        return rc;
    }
    if (info) *info = r->info;
    *out = r;
    return NM_OK;
}

nm_status nm_trace_reader_read_sample(nm_trace_reader *r, nm_trace_sample *s, int index, nm_error *err) {
    nm_error local;
    if (!err) err = &local;
    if (!r || !s) return nm_fail(err, NM_ERR_INTERNAL, "nm_trace_reader_read_sample: NULL argument");
    h5_quiet q;
    quiet_begin(&q);
    nm_status rc = read_sample_in(s, r->path, r->samples, &r->info, r->info.num_samples, index, err);
    quiet_end(&q);
    return rc;
}

nm_status nm_trace_read_sample(nm_trace_sample *s, const char *path, int index, nm_error *err) {
    nm_error local;
    if (!err) err = &local;
    if (!s || !path) return nm_fail(err, NM_ERR_INTERNAL, "nm_trace_read_sample: NULL argument");
    memset(s, 0, sizeof *s);
    nm_trace_reader *r = NULL;
    nm_status rc = nm_trace_reader_open(&r, path, NULL, err);
    if (rc == NM_OK) rc = nm_trace_reader_read_sample(r, s, index, err);
    nm_trace_reader_close(r);
    return rc;
}
