// nm_backend.c — the backend registry: "cpu" always, "cuda" when built with nvcc (NM_HAVE_CUDA)
// and a device is present.
#include "nm_backend.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef NM_HAVE_CUDA
#include "nm_cuda.h"
#endif

int nm_backend_cuda_built(void) {
#ifdef NM_HAVE_CUDA
    return 1;
#else
    return 0;
#endif
}

nm_status nm_backend_get(const char *name, const nm_backend_ops **ops, nm_error *err) {
    *ops = NULL;
    if (!name || !strcmp(name, "cpu")) {
        *ops = nm_backend_cpu_ops();
        return NM_OK;
    }
    if (strcmp(name, "cuda") != 0)
        return nm_fail(err, NM_ERR_INVALID, "unknown device '%s' (expected cpu or cuda)", name);
#ifdef NM_HAVE_CUDA
    char why[256];
    if (nm_cuda_device_count(why, sizeof why) < 1)
        return nm_fail(err, NM_ERR_UNSUPPORTED, "no CUDA device found: %s", why);
    *ops = nm_cuda_backend_ops();
    return NM_OK;
#else
    return nm_fail(err, NM_ERR_UNSUPPORTED,
                   "CUDA backend not built (nvcc was not found when nullmap was compiled; rebuild with NVCC=/path/to/nvcc)");
#endif
}

nm_status nm_backend_open(nm_backend **out, const char *name, const nm_backend_options *opt, nm_error *err) {
    *out = NULL;
    const nm_backend_ops *ops;
    nm_status s = nm_backend_get(name, &ops, err);
    if (s != NM_OK) return s;
    nm_backend *b = calloc(1, sizeof *b);
    if (!b) return NM_NOMEM(err, "backend");
    b->ops = ops;
    if (opt) b->opt = *opt;
    if (b->opt.bf16 && ops->host_memory) {
        free(b);
        return nm_fail(err, NM_ERR_UNSUPPORTED, "BF16 compute is a CUDA backend option; the CPU backend computes in F32");
    }
    if ((s = ops->open(b, err)) != NM_OK) {
        free(b);
        return s;
    }
    *out = b;
    return NM_OK;
}

void nm_backend_close(nm_backend *b) {
    if (!b) return;
    b->ops->close(b);
    free(b);
}

const char *nm_backend_default_name(void) {
#ifdef NM_HAVE_CUDA
    char why[256];
    if (nm_cuda_device_count(why, sizeof why) > 0) return "cuda";
#endif
    return "cpu";
}

void nm_backend_describe(char *buf, size_t n) {
#ifdef NM_HAVE_CUDA
    char why[256], dev[256];
    int count = nm_cuda_device_count(why, sizeof why);
    if (count > 0) nm_cuda_device_name(dev, sizeof dev);
    snprintf(buf, n, "cpu (OpenBLAS), cuda (built with CUDA %s; %s%s)", nm_cuda_build_version(),
             count > 0 ? "device: " : "no device: ", count > 0 ? dev : why);
#else
    snprintf(buf, n, "cpu (OpenBLAS); cuda not built");
#endif
}
