// nm_train_ops.c — the training ops (nm_train_ops.h) in float64 and float32, both built from
// nm_ops_generic.h: one source, so the f64 reference the gradient checks run on and the f32
// path training runs cannot drift apart.
#include "nm_train_ops.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

#define R double
#define FN(name) name##_f64
#define GEMM cblas_dgemm
#define EXP exp
#include "nm_ops_generic.h"
#undef R
#undef FN
#undef GEMM
#undef EXP

#define R float
#define FN(name) name##_f32
#define GEMM cblas_sgemm
#define EXP expf
#include "nm_ops_generic.h"
#undef R
#undef FN
#undef GEMM
#undef EXP
