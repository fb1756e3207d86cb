// nm_optim.c — AdamW, the WSD schedule, the gradient norm and the weight-decay rule.
#include "nm_optim.h"

#include <math.h>
#include <string.h>

// The gradient norm is summed in this many chunks whatever the thread count, so its rounding
// (and with it every clipped step) is the same on any machine. 64 chunks keep both threads
// busy with an even split and cost nothing to combine.
#define NORM_CHUNKS 64
// Below these sizes a parallel region costs more than it saves (the result is the same).
#define NORM_PARALLEL_MIN ((size_t)1 << 16)
#define ADAMW_PARALLEL_MIN ((size_t)1 << 15)

void nm_optim_config_default(nm_optim_config *c) {
    memset(c, 0, sizeof *c);
    c->lr = 1e-3;
    c->beta1 = 0.9;
    c->beta2 = 0.95;
    c->eps = 1e-8;
    c->weight_decay = 0.1;
    c->grad_clip = 1.0;
    c->warmup_steps = 0;
    c->total_steps = 0;
    c->decay_frac = 0.1;
    c->final_lr_frac = 0.1;
}

long nm_wsd_decay_steps(const nm_optim_config *c) {
    if (c->total_steps <= 0 || !(c->decay_frac > 0)) return 0;
    if (c->decay_frac >= 1) return c->total_steps;
    // round half up; decay_frac * total_steps is exact enough that 0.1 * 1000 gives 100
    long d = (long)floor(c->decay_frac * (double)c->total_steps + 0.5);
    return d < 0 ? 0 : d > c->total_steps ? c->total_steps : d;
}

nm_status nm_optim_config_check(const nm_optim_config *c, nm_error *err) {
    // written as !(ok) so that NaN fails every check
    if (!(c->lr > 0 && isfinite(c->lr))) return nm_fail(err, NM_ERR_INVALID, "optimizer: lr must be > 0 (got %g)", c->lr);
    if (!(c->beta1 >= 0 && c->beta1 < 1))
        return nm_fail(err, NM_ERR_INVALID, "optimizer: beta1 must be in [0, 1) (got %g)", c->beta1);
    if (!(c->beta2 >= 0 && c->beta2 < 1))
        return nm_fail(err, NM_ERR_INVALID, "optimizer: beta2 must be in [0, 1) (got %g)", c->beta2);
    if (!(c->eps > 0 && isfinite(c->eps)))
        return nm_fail(err, NM_ERR_INVALID, "optimizer: eps must be > 0 (got %g)", c->eps);
    if (!(c->weight_decay >= 0 && c->lr * c->weight_decay < 1))
        return nm_fail(err, NM_ERR_INVALID,
                       "optimizer: weight_decay must be >= 0 with lr * weight_decay < 1 (got %g, lr %g)",
                       c->weight_decay, c->lr);
    if (!(c->grad_clip >= 0 && isfinite(c->grad_clip)))
        return nm_fail(err, NM_ERR_INVALID, "optimizer: grad_clip must be >= 0 (0 = off; got %g)", c->grad_clip);
    if (c->total_steps < 1)
        return nm_fail(err, NM_ERR_INVALID, "optimizer: total_steps must be >= 1 (got %ld)", c->total_steps);
    if (c->warmup_steps < 0)
        return nm_fail(err, NM_ERR_INVALID, "optimizer: warmup_steps must be >= 0 (got %ld)", c->warmup_steps);
    if (!(c->decay_frac >= 0 && c->decay_frac <= 1))
        return nm_fail(err, NM_ERR_INVALID, "optimizer: decay_frac must be in [0, 1] (got %g)", c->decay_frac);
    if (!(c->final_lr_frac >= 0 && c->final_lr_frac <= 1))
        return nm_fail(err, NM_ERR_INVALID, "optimizer: final_lr_frac must be in [0, 1] (got %g)", c->final_lr_frac);
    const long decay = nm_wsd_decay_steps(c);
    if (c->warmup_steps > c->total_steps - decay)
        return nm_fail(err, NM_ERR_INVALID,
                       "optimizer: warmup (%ld steps) overlaps the decay (the last %ld of %ld steps)", c->warmup_steps,
                       decay, c->total_steps);
    return NM_OK;
}

double nm_wsd_lr(const nm_optim_config *c, long step) {
    if (step < 0) step = 0;
    double warm = 1.0, decay = 1.0;
    if (step < c->warmup_steps) warm = (double)(step + 1) / (double)c->warmup_steps;
    const long n_decay = nm_wsd_decay_steps(c), start = c->total_steps - n_decay;
    if (n_decay > 0 && step >= start) {
        const long done = step >= c->total_steps ? n_decay : step - start + 1; // decay steps taken, 1..Dn
        decay = 1.0 - (1.0 - c->final_lr_frac) * (double)done / (double)n_decay;
    }
    return c->lr * (warm < decay ? warm : decay);
}

double nm_grad_sumsq(const float *g, size_t n) {
    // g: (n). Chunk k covers [lo(k), lo(k+1)) with lo(k) = k*(n/64) + min(k, n%64): bounds depend
    // on n only.
    double part[NORM_CHUNKS];
    const size_t base = n / NORM_CHUNKS, extra = n % NORM_CHUNKS;
    #pragma omp parallel for schedule(static) if (n >= NORM_PARALLEL_MIN)
    for (int k = 0; k < NORM_CHUNKS; k++) {
        const size_t uk = (size_t)k;
        const size_t lo = uk * base + (uk < extra ? uk : extra), len = base + (uk < extra ? 1 : 0);
        const float *x = g + lo;
        // four interleaved sums: independent dependency chains run in parallel in the core,
        // and the combination order below is fixed
        double a0 = 0, a1 = 0, a2 = 0, a3 = 0;
        size_t i = 0;
        for (; i + 4 <= len; i += 4) {
            a0 += (double)x[i] * x[i];
            a1 += (double)x[i + 1] * x[i + 1];
            a2 += (double)x[i + 2] * x[i + 2];
            a3 += (double)x[i + 3] * x[i + 3];
        }
        for (; i < len; i++) a0 += (double)x[i] * x[i];
        part[k] = (a0 + a1) + (a2 + a3);
    }
    double s = 0.0;
    for (int k = 0; k < NORM_CHUNKS; k++) s += part[k];
    return s;
}

double nm_grad_norm(const float *g, size_t n) { return sqrt(nm_grad_sumsq(g, n)); }

double nm_clip_scale(double norm, double max_norm) {
    if (!(max_norm > 0)) return 1.0;
    // PyTorch: clip_coef = max_norm / (total_norm + 1e-6), clamped to 1
    const double s = max_norm / (norm + 1e-6);
    return s < 1.0 ? s : isnan(s) ? s : 1.0;
}

void nm_adamw_update(float *p, const float *g, float *m, float *v, size_t n, long step, double lr,
                     double grad_scale, int decay, const nm_optim_config *c) {
    // p, g, m, v: (n)
    const double t = (double)(step < 0 ? 1 : step + 1); // PyTorch increments its step count first
    const double b1 = c->beta1, b2 = c->beta2, eps = c->eps;
    const double step_size = lr / (1.0 - pow(b1, t));
    const double bc2_sqrt = sqrt(1.0 - pow(b2, t));
    const double keep = decay ? 1.0 - lr * c->weight_decay : 1.0;
    #pragma omp parallel for schedule(static) if (n >= ADAMW_PARALLEL_MIN)
    for (size_t i = 0; i < n; i++) {
        const double gi = (double)g[i] * grad_scale;
        // the moments are stored as float32, and (as in PyTorch) the step uses the stored values
        const float mi = (float)(b1 * m[i] + (1.0 - b1) * gi);
        const float vi = (float)(b2 * v[i] + (1.0 - b2) * gi * gi);
        m[i] = mi;
        v[i] = vi;
        const double denom = sqrt((double)vi) / bc2_sqrt + eps;
        p[i] = (float)((double)p[i] * keep - step_size * (double)mi / denom);
    }
}

static int ends_with(const char *s, const char *suffix) {
    const size_t ls = strlen(s), lx = strlen(suffix);
    return ls >= lx && memcmp(s + ls - lx, suffix, lx) == 0;
}

int nm_param_decays(const char *tensor_name) {
    return !(ends_with(tensor_name, "norm.weight") || ends_with(tensor_name, ".bias"));
}
