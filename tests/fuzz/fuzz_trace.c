// fuzz_trace.c — the HDF5 trace reader as `nullmap report` and `render` use it: root
// attributes and sample count (nm_trace_read_info), every sample (nm_trace_read_sample, through
// nm_report_trace_load), the metrics and report texts, and the per-token scores of the overlays.
#define _GNU_SOURCE // memmem
#include <hdf5.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_util.h"
#include "nm_metrics.h"
#include "nm_report.h"
#include "nm_trace.h"

static uint64_t le64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

// 1 when a global heap collection ("GCOL", version 1, 8-byte lengths) holds an object whose
// size runs past the collection, or a free-space object smaller than its own 16-byte header.
// HDF5 1.10.8 (Debian 12) trusts those sizes when it reads a variable-length string: it
// memcpy's 2^51 bytes (a segfault) or loops forever in H5HG__cache_heap_deserialize (a hang) —
// inside libhdf5, where no caller can prevent it (tests/fuzz/known-upstream/trace/, and the
// known_bug row "report_trace_corrupt_global_heap" in test_bad_inputs.c). Such inputs are
// skipped so that the fuzzer keeps exploring nullmap's code.
static int has_corrupt_global_heap(const uint8_t *d, size_t n) {
    for (const uint8_t *p = d; (p = memmem(p, n - (size_t)(p - d), "GCOL", 4)) != NULL; p += 4) {
        size_t at = (size_t)(p - d);
        if (at + 16 > n || p[4] != 1) continue;
        uint64_t coll = le64(p + 8), off = 16;
        while (off + 16 <= coll && at + off + 16 <= n) {
            unsigned idx = (unsigned)(p[off] | p[off + 1] << 8);
            uint64_t obj = le64(p + off + 8);
            if (idx == 0) return obj < 16 || obj > coll - off; // free space, its own header included
            if (obj > coll - off - 16) return 1;
            off += 16 + ((obj + 7) & ~(uint64_t)7);
        }
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (has_corrupt_global_heap(data, size)) return 0;
    static int limited;
    if (!limited) {
        // Small enough that one input stays within libFuzzer's time and memory budget.
        fuzz_limit("trace_samples=16");
        fuzz_limit("trace_entries=1M");
        fuzz_limit("trace_string_bytes=64K");
        limited = 1;
    }
    const char *path = fuzz_file_put(data, size);
    nm_error err;
    nm_report_trace r;
    if (nm_report_trace_load(&r, path, 1, NULL, NULL, &err) == NM_OK) {
        char *md = nm_report_md(&r, 1, &err), *json = nm_report_json(&r, 1, &err), *csv = nm_report_csv(&r, 1, &err);
        free(md);
        free(json);
        free(csv);
    }
    nm_report_trace_free(&r);
    nm_trace_sample s;
    if (nm_trace_read_sample(&s, path, 0, &err) == NM_OK) { // what render draws
        double *scores = malloc((size_t)s.n_tokens * sizeof *scores);
        for (int l = 0; scores && l <= s.n_layers; l++) (void)nm_metrics_token_scores(&s, l, scores, &err);
        free(scores);
        nm_trace_sample_free(&s);
    }
    // Every HDF5 handle the reader opened must be closed again, on every path (tests/fuzz/
    // lsan-fuzz.supp has to let HDF5's own leaks on corrupt files pass, so this is the check).
    if (H5Fget_obj_count((hid_t)H5F_OBJ_ALL, H5F_OBJ_ALL) != 0) abort();
    return 0;
}
