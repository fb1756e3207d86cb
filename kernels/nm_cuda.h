// nm_cuda.h — the C face of the CUDA backend (kernels/*.cu, built when nvcc is found).
// lib/nm_backend.c reaches the backend only through these functions.
#ifndef NM_CUDA_H
#define NM_CUDA_H

#include <stddef.h>

#include "nm_backend.h"

#ifdef __cplusplus
extern "C" {
#endif

// The CUDA table of nm_backend.h.
const nm_backend_ops *nm_cuda_backend_ops(void);
// Number of CUDA devices; 0 with the runtime's reason in `why` when there is none (no driver,
// no device, ...). Never aborts.
int nm_cuda_device_count(char *why, size_t n);
// Name and compute capability of device 0, e.g. "NVIDIA H100 80GB HBM3 (sm_90)".
void nm_cuda_device_name(char *buf, size_t n);
// The CUDA version nullmap was compiled with, e.g. "13.0".
const char *nm_cuda_build_version(void);

#ifdef __cplusplus
}
#endif

#endif
