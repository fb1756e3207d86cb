// fuzz_trace.c — the HDF5 trace reader as `nullmap report` and `render` use it: root
// attributes and sample count (nm_trace_read_info), every sample (nm_trace_read_sample, through
// nm_report_trace_load), the metrics and report texts, and the per-token scores of the overlays.
// Every input goes through the reader's pre-open global heap check (lib/nm_h5_guard.h), which
// refuses the corrupt heaps that crash or hang libhdf5 1.10.8 (tests/fuzz/crashes/trace/hdf5-H5HG*):
// they are findings again if they get through.
#include <hdf5.h>
#include <stdint.h>
#include <stdlib.h>

#include "fuzz_util.h"
#include "nm_metrics.h"
#include "nm_report.h"
#include "nm_trace.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
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
