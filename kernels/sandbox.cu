// sandbox.cu — the CUDA kernel sandbox (../shared/STYLE.md, after llm.c's dev/cuda): every
// shipped kernel (included through cuda_common.cuh, not copied) against the CPU reference at
// several sizes, with its time and achieved GB/s or TFLOP/s.
//
//   make sandbox && build/sandbox            checks + per-kernel timings
//   build/sandbox --bench                    + the paper-scale MoE layer (D=2048, N=64, H=768,
//                                              K=8, rho 0.5 vs 1.0, T=16384), grouped vs per-expert GEMMs
//
// Exit codes: 0 all checks passed, 1 a check failed, 77 no CUDA device (skip).
// Timings: mean over REPS launches after one warm-up, cudaEvent on the backend's stream; the
// L2 cache is not flushed between repetitions (the inputs here are mostly larger than L2).
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_common.cuh"

extern "C" {
#include "nm_moe.h"
#include "nm_ops.h"
}

#define REPS 20

static int failures = 0;

static void check(const char *what, double err, double tol) {
    const int ok = err <= tol;
    failures += !ok;
    printf("  %-46s max rel err %-9.2g %s\n", what, err, ok ? "ok" : "FAIL");
}

static double rel_err(const float *got, const float *want, size_t n) {
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i])) return INFINITY;
        worst = fmax(worst, fabs((double)got[i] - want[i]) / fmax(1.0, fabs((double)want[i])));
    }
    return worst;
}

static float *host_randn(size_t n, float std, uint64_t seed) {
    float *x = (float *)malloc(n * sizeof *x);
    uint64_t s = seed * 0x9e3779b97f4a7c15ULL + 1;
    for (size_t i = 0; i < n; i += 2) { // Box-Muller on a xorshift stream
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        double u1 = ((s >> 11) + 1.0) * 0x1.0p-53;
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        double u2 = (s >> 11) * 0x1.0p-53, r = sqrt(-2 * log(u1));
        x[i] = (float)(std * r * cos(6.283185307179586 * u2));
        if (i + 1 < n) x[i + 1] = (float)(std * r * sin(6.283185307179586 * u2));
    }
    return x;
}

static void *dev_copy(const void *h, size_t bytes) {
    void *d = NULL;
    if (cudaMalloc(&d, bytes) != cudaSuccess) {
        fprintf(stderr, "sandbox: cudaMalloc of %zu bytes failed\n", bytes);
        exit(1);
    }
    if (h) cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice);
    return d;
}

#define DIE_IF(s)                                                                                                    \
    do {                                                                                                             \
        if ((s) != NM_OK) {                                                                                          \
            fprintf(stderr, "sandbox: %s\n", err.msg);                                                               \
            exit(1);                                                                                                 \
        }                                                                                                            \
    } while (0)

// Times `body` (a statement launching work on stream st): mean ms over REPS after a warm-up.
#define TIME_MS(st, out_ms, body)                                                                                    \
    do {                                                                                                             \
        cudaEvent_t a_, b_;                                                                                          \
        cudaEventCreate(&a_);                                                                                        \
        cudaEventCreate(&b_);                                                                                        \
        body;                                                                                                        \
        cudaEventRecord(a_, st);                                                                                     \
        for (int r_ = 0; r_ < REPS; r_++) body;                                                                      \
        cudaEventRecord(b_, st);                                                                                     \
        cudaEventSynchronize(b_);                                                                                    \
        float ms_ = 0;                                                                                               \
        cudaEventElapsedTime(&ms_, a_, b_);                                                                          \
        out_ms = ms_ / REPS;                                                                                         \
        cudaEventDestroy(a_);                                                                                        \
        cudaEventDestroy(b_);                                                                                        \
    } while (0)

static void bench_rmsnorm(nm_cuda_ctx *c) {
    nm_error err = {NM_OK, ""};
    printf("rmsnorm (bytes: read x, w; write out)\n");
    const int sizes[][2] = {{512, 2048}, {4096, 2048}, {16384, 2048}};
    for (int i = 0; i < 3; i++) {
        const int T = sizes[i][0], D = sizes[i][1];
        const size_t n = (size_t)T * D;
        float *x = host_randn(n, 2, 1 + i), *w = host_randn(D, 1, 9), *want = (float *)malloc(n * 4), *got = (float *)malloc(n * 4);
        nm_rmsnorm_forward(want, x, w, T, D, 1e-6f);
        float *dx = (float *)dev_copy(x, n * 4), *dw = (float *)dev_copy(w, D * 4), *dout = (float *)dev_copy(NULL, n * 4);
        DIE_IF(nm_cuda_rmsnorm(c->stream, dout, dx, dw, T, D, 1e-6f, &err));
        cudaMemcpy(got, dout, n * 4, cudaMemcpyDeviceToHost);
        char what[96];
        snprintf(what, sizeof what, "T=%d D=%d", T, D);
        check(what, rel_err(got, want, n), 1e-5);
        float ms;
        TIME_MS(c->stream, ms, nm_cuda_rmsnorm(c->stream, dout, dx, dw, T, D, 1e-6f, &err));
        printf("    %.4f ms  %.0f GB/s\n", ms, 2.0 * n * 4 / (ms * 1e6));
        cudaFree(dx); cudaFree(dw); cudaFree(dout);
        free(x); free(w); free(want); free(got);
    }
}

static void bench_attention(nm_backend *cpu, nm_cuda_ctx *c) {
    nm_error err = {NM_OK, ""};
    printf("attention (FLOP: 4 * visible keys * hd per query and head)\n");
    const int cases[][5] = {{1, 0, 8, 8, 64}, {256, 0, 16, 4, 128}, {1, 4095, 16, 4, 128}, {1024, 1024, 16, 4, 128}};
    for (int i = 0; i < 4; i++) {
        const int T = cases[i][0], pos0 = cases[i][1], nh = cases[i][2], nkv = cases[i][3], hd = cases[i][4], ctx = pos0 + T;
        const size_t qn = (size_t)T * nh * hd, kn = (size_t)ctx * nkv * hd;
        float *q = host_randn(qn, 1, 2 + i), *k = host_randn(kn, 1, 3 + i), *v = host_randn(kn, 1, 4 + i);
        float *want = (float *)malloc(qn * 4), *got = (float *)malloc(qn * 4);
        DIE_IF(cpu->ops->attention(cpu, want, q, k, v, T, pos0, nh, nkv, hd, &err));
        float *dq = (float *)dev_copy(q, qn * 4), *dk = (float *)dev_copy(k, kn * 4), *dv = (float *)dev_copy(v, kn * 4),
              *da = (float *)dev_copy(NULL, qn * 4);
        DIE_IF(nm_cuda_attention(c->stream, da, dq, dk, dv, T, pos0, nh, nkv, hd, &err));
        cudaMemcpy(got, da, qn * 4, cudaMemcpyDeviceToHost);
        char what[96];
        snprintf(what, sizeof what, "T=%d pos0=%d nh=%d nkv=%d hd=%d", T, pos0, nh, nkv, hd);
        check(what, rel_err(got, want, qn), 1e-4);
        float ms;
        TIME_MS(c->stream, ms, nm_cuda_attention(c->stream, da, dq, dk, dv, T, pos0, nh, nkv, hd, &err));
        double flop = 0;
        for (int t = 0; t < T; t++) flop += 4.0 * (pos0 + t + 1) * hd * nh;
        printf("    %.4f ms  %.2f TFLOP/s\n", ms, flop / (ms * 1e9));
        cudaFree(dq); cudaFree(dk); cudaFree(dv); cudaFree(da);
        free(q); free(k); free(v); free(want); free(got);
    }
}

// Router + permutation against moe_route_null and a sequential counting sort on the host.
static void bench_router(nm_cuda_ctx *c) {
    nm_error err = {NM_OK, ""};
    printf("router (fused: softmax over N+M, top-K, gates) and permutation\n");
    const int cases[][4] = {{4096, 64, 64, 8}, {16384, 64, 64, 8}, {16384, 64, 0, 8}, {2048, 256, 256, 16}};
    for (int i = 0; i < 4; i++) {
        const int T = cases[i][0], N = cases[i][1], M = cases[i][2], K = cases[i][3];
        const size_t TK = (size_t)T * K, zn = (size_t)T * (N + 1);
        float *z = host_randn(zn, 1.5f, 5 + i);
        const nm_moe_config mc = {N, M, K, 1, 0, NM_NULL_ZERO};
        nm_routing h = {(uint8_t *)malloc(T), (int16_t *)malloc(TK * 2), (float *)malloc(TK * 4), (float *)malloc(TK * 4),
                        (float *)malloc(T * 4), (float *)malloc(T * 4)};
        moe_route_null(&h, z, T, &mc);
        nm_routing d = {(uint8_t *)dev_copy(NULL, T), (int16_t *)dev_copy(NULL, TK * 2), (float *)dev_copy(NULL, TK * 4),
                        (float *)dev_copy(NULL, TK * 4), (float *)dev_copy(NULL, T * 4), (float *)dev_copy(NULL, T * 4)};
        float *dz = (float *)dev_copy(z, zn * 4);
        DIE_IF(nm_cuda_route(c->stream, &d, dz, T, &mc, &err));
        int16_t *slot = (int16_t *)malloc(TK * 2);
        float *gate = (float *)malloc(TK * 4);
        cudaMemcpy(slot, d.slot, TK * 2, cudaMemcpyDeviceToHost);
        cudaMemcpy(gate, d.gate, TK * 4, cudaMemcpyDeviceToHost);
        long diff = 0;
        for (size_t j = 0; j < TK; j++) diff += slot[j] != h.slot[j];
        char what[96];
        snprintf(what, sizeof what, "route T=%d N=%d M=%d K=%d (%ld slot diffs)", T, N, M, K, diff);
        check(what, diff ? INFINITY : rel_err(gate, h.gate, TK), 1e-5);
        float ms;
        TIME_MS(c->stream, ms, nm_cuda_route(c->stream, &d, dz, T, &mc, &err));
        printf("    %.4f ms  %.0f GB/s (logits in, records out)\n", ms, (zn * 4 + TK * 10.0 + T * 9.0) / (ms * 1e6));
        // permutation
        const size_t n_chunks = (TK + NM_CUDA_PERMUTE_CHUNK - 1) / NM_CUDA_PERMUTE_CHUNK;
        int32_t *offsets = (int32_t *)dev_copy(NULL, (N + 1) * 4), *row_slot = (int32_t *)dev_copy(NULL, TK * 4),
                *slot_row = (int32_t *)dev_copy(NULL, TK * 4), *cc = (int32_t *)dev_copy(NULL, n_chunks * N * 4),
                *tot = (int32_t *)dev_copy(NULL, N * 4);
        DIE_IF(nm_cuda_permute(c->stream, offsets, row_slot, slot_row, cc, tot, d.slot, T, K, N, &err));
        int32_t *g_rs = (int32_t *)malloc(TK * 4), *w_rs = (int32_t *)malloc(TK * 4), *cnt = (int32_t *)calloc(N + 1, 4);
        cudaMemcpy(g_rs, row_slot, TK * 4, cudaMemcpyDeviceToHost);
        for (size_t j = 0; j < TK; j++)
            if (h.slot[j] >= 0) cnt[h.slot[j] + 1]++;
        for (int e = 0; e < N; e++) cnt[e + 1] += cnt[e];
        long rows = cnt[N], bad = 0;
        for (size_t j = 0; j < TK; j++)
            if (h.slot[j] >= 0) w_rs[cnt[h.slot[j]]++] = (int32_t)j;
        for (long j = 0; j < rows; j++) bad += g_rs[j] != w_rs[j];
        snprintf(what, sizeof what, "permute %ld rows (%ld misplaced)", rows, bad);
        check(what, bad ? INFINITY : 0, 0);
        TIME_MS(c->stream, ms, nm_cuda_permute(c->stream, offsets, row_slot, slot_row, cc, tot, d.slot, T, K, N, &err));
        printf("    %.4f ms\n", ms);
        cudaFree(offsets); cudaFree(row_slot); cudaFree(slot_row); cudaFree(cc); cudaFree(tot); cudaFree(dz);
        cudaFree(d.n_real); cudaFree(d.slot); cudaFree(d.prob); cudaFree(d.gate); cudaFree(d.null_mass); cudaFree(d.lse);
        free(h.n_real); free(h.slot); free(h.prob); free(h.gate); free(h.null_mass); free(h.lse);
        free(z); free(slot); free(gate); free(g_rs); free(w_rs); free(cnt);
    }
}

static void bench_swiglu(nm_cuda_ctx *c) {
    nm_error err = {NM_OK, ""};
    printf("swiglu (bytes: read g, u; write out)\n");
    const size_t sizes[] = {(size_t)1 << 16, (size_t)8192 * 8 * 768, (size_t)16384 * 8 * 768};
    for (int i = 0; i < 3; i++) {
        const size_t n = sizes[i];
        float *g = host_randn(n, 2, 11 + i), *u = host_randn(n, 1, 12 + i), *want = (float *)malloc(n * 4), *got = (float *)malloc(n * 4);
        nm_swiglu_forward(want, g, u, n);
        float *dg = (float *)dev_copy(g, n * 4), *du = (float *)dev_copy(u, n * 4), *dout = (float *)dev_copy(NULL, n * 4);
        DIE_IF(nm_cuda_swiglu(c->stream, dout, dg, du, n, 0, &err));
        cudaMemcpy(got, dout, n * 4, cudaMemcpyDeviceToHost);
        char what[96];
        snprintf(what, sizeof what, "n=%zu", n);
        check(what, rel_err(got, want, n), 1e-5);
        float ms;
        TIME_MS(c->stream, ms, nm_cuda_swiglu(c->stream, dout, dg, du, n, 0, &err));
        printf("    %.4f ms  %.0f GB/s\n", ms, 3.0 * n * 4 / (ms * 1e6));
        cudaFree(dg); cudaFree(du); cudaFree(dout);
        free(g); free(u); free(want); free(got);
    }
}

// The whole MoE layer on the GPU against nm_moe_forward (small) and timed (large).
typedef struct {
    int T, D, N, H, K, M;
} layer_shape;

// Router weights whose null row reads the constant feature y[:, D-1] = 1 with weight `bias`,
// set by bisection on the CPU router so that the share of null slots is ~1 - rho.
static double set_null_bias(float *router, const float *y, const layer_shape *s, double rho) {
    const int T = s->T < 2048 ? s->T : 2048, N = s->N, D = s->D, K = s->K;
    if (s->M == 0) return 0;
    float *z = (float *)malloc((size_t)T * (N + 1) * 4);
    router[(size_t)N * D + D - 1] = 0.0f;
    nm_matmul_forward(z, y, router, T, D, N + 1, 0.0f);
    nm_routing r = {(uint8_t *)malloc(T), (int16_t *)malloc((size_t)T * K * 2), (float *)malloc((size_t)T * K * 4),
                    (float *)malloc((size_t)T * K * 4), (float *)malloc(T * 4), (float *)malloc(T * 4)};
    const nm_moe_config mc = {N, s->M, K, s->H, 0, NM_NULL_ZERO};
    float *zb = (float *)malloc((size_t)T * (N + 1) * 4);
    double lo = -20, hi = 20;
    for (int it = 0; it < 40; it++) {
        const double mid = 0.5 * (lo + hi);
        memcpy(zb, z, (size_t)T * (N + 1) * 4);
        for (int t = 0; t < T; t++) zb[(size_t)t * (N + 1) + N] += (float)mid;
        moe_route_null(&r, zb, T, &mc);
        long nr = 0;
        for (int t = 0; t < T; t++) nr += r.n_real[t];
        if (1.0 - (double)nr / ((double)T * K) < 1.0 - rho) lo = mid;
        else hi = mid;
    }
    router[(size_t)N * D + D - 1] = (float)(0.5 * (lo + hi));
    free(z); free(zb); free(r.n_real); free(r.slot); free(r.prob); free(r.gate); free(r.null_mass); free(r.lse);
    return 0.5 * (lo + hi);
}

static void bench_layer(nm_backend *b, const layer_shape *s, double rho, int check_cpu) {
    nm_error err = {NM_OK, ""};
    nm_cuda_ctx *c = nm_cuda_get(b);
    const int T = s->T, D = s->D, N = s->N, H = s->H, K = s->K, M = s->M;
    const nm_moe_config mc = {N, M, K, H, 0, NM_NULL_ZERO};
    float *y = host_randn((size_t)T * D, 1, 21);
    for (int t = 0; t < T; t++) y[(size_t)t * D + D - 1] = 1.0f;
    nm_moe_weights w = {host_randn((size_t)(N + 1) * D, 1.0f / sqrtf((float)D), 22), host_randn((size_t)N * H * D, 0.02f, 23),
                        host_randn((size_t)N * H * D, 0.02f, 24), host_randn((size_t)N * D * H, 0.02f, 25), NULL, NULL, NULL};
    for (int e = 0; e < N; e++) w.router[(size_t)e * D + D - 1] = 0.0f; // reals ignore the bias feature
    const double bias = set_null_bias(w.router, y, s, rho);
    nm_moe_weights dw = {(float *)dev_copy(w.router, (size_t)(N + 1) * D * 4), (float *)dev_copy(w.gate, (size_t)N * H * D * 4),
                         (float *)dev_copy(w.up, (size_t)N * H * D * 4), (float *)dev_copy(w.down, (size_t)N * D * H * 4),
                         NULL, NULL, NULL};
    float *dy = (float *)dev_copy(y, (size_t)T * D * 4), *dout = (float *)dev_copy(NULL, (size_t)T * D * 4);
    if (check_cpu) {
        float *want = (float *)malloc((size_t)T * D * 4), *got = (float *)malloc((size_t)T * D * 4);
        nm_moe_workspace ws;
        memset(&ws, 0, sizeof ws);
        DIE_IF(nm_moe_forward(want, y, &w, &mc, T, D, &ws, NULL, &err));
        nm_moe_workspace_free(&ws);
        for (int mode = NM_GEMM_GROUPED; mode <= NM_GEMM_PER_EXPERT; mode++) {
            c->expert_gemm = (nm_gemm_mode)mode;
            DIE_IF(nm_cuda_moe(c, dout, dy, &dw, &mc, T, D, NULL, &err));
            cudaMemcpy(got, dout, (size_t)T * D * 4, cudaMemcpyDeviceToHost);
            char what[128];
            snprintf(what, sizeof what, "layer T=%d D=%d N=%d K=%d M=%d %s", T, D, N, K, M,
                     mode == NM_GEMM_GROUPED ? "grouped" : "per-expert");
            check(what, rel_err(got, want, (size_t)T * D), 1e-3);
        }
        free(want);
        free(got);
    } else {
        for (int mode = NM_GEMM_GROUPED; mode <= NM_GEMM_PER_EXPERT; mode++) {
            c->expert_gemm = (nm_gemm_mode)mode;
            float ms;
            TIME_MS(c->stream, ms, nm_cuda_moe(c, dout, dy, &dw, &mc, T, D, NULL, &err));
            DIE_IF(err.code);
            const double real_slots = (double)T * K * rho; // the bias targets this share
            printf("  layer T=%d K=%d rho=%.2f (null bias %.3f) %-10s %8.3f ms  %6.1f TFLOP/s (useful: %.0f real slots)%s\n",
                   T, K, rho, bias, mode == NM_GEMM_GROUPED ? "grouped" : "per-expert", ms,
                   6.0 * real_slots * D * H / (ms * 1e9), real_slots,
                   mode == NM_GEMM_GROUPED && c->grouped_unsupported ? " [grouped refused: ran per expert]" : "");
        }
    }
    c->expert_gemm = NM_GEMM_AUTO;
    cudaFree(dw.router); cudaFree(dw.gate); cudaFree(dw.up); cudaFree(dw.down); cudaFree(dy); cudaFree(dout);
    free(w.router); free(w.gate); free(w.up); free(w.down); free(y);
}

int main(int argc, char **argv) {
    const int bench = argc > 1 && !strcmp(argv[1], "--bench");
    char why[256];
    if (nm_cuda_device_count(why, sizeof why) < 1) {
        printf("sandbox: no CUDA device (%s): nothing to run (skip)\n", why);
        return 77;
    }
    char dev[256];
    nm_cuda_device_name(dev, sizeof dev);
    printf("sandbox: %s, CUDA %s\n", dev, nm_cuda_build_version());
    nm_error err = {NM_OK, ""};
    nm_backend *b = NULL, *cpu = NULL;
    DIE_IF(nm_backend_open(&b, "cuda", NULL, &err));
    DIE_IF(nm_backend_open(&cpu, "cpu", NULL, &err));
    nm_cuda_ctx *c = nm_cuda_get(b);
    bench_rmsnorm(c);
    bench_attention(cpu, c);
    bench_router(c);
    bench_swiglu(c);
    printf("MoE layer against nm_moe_forward (CPU)\n");
    const layer_shape small = {300, 256, 16, 128, 4, 16}, small_m0 = {300, 256, 16, 128, 4, 0};
    bench_layer(b, &small, 0.5, 1);
    bench_layer(b, &small_m0, 1.0, 1);
    if (bench) {
        printf("paper-scale MoE layer: D=2048 N=64 H=768 K=8 T=16384, F32 weights, no shared expert\n");
        const layer_shape half = {16384, 2048, 64, 768, 8, 64}, full = {16384, 2048, 64, 768, 8, 0};
        bench_layer(b, &half, 0.5, 0);
        bench_layer(b, &full, 1.0, 0);
        printf("  (bar: rho 0.5 / rho 1.0 time <= 0.55; PyTorch: tests/bench/torch_moe_alg1_gpu.py)\n");
    }
    nm_backend_close(b);
    nm_backend_close(cpu);
    printf("sandbox: %d check%s failed\n", failures, failures == 1 ? "" : "s");
    return failures ? 1 : 0;
}
