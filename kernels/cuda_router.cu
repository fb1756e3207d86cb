// cuda_router.cu — the fused null-expert router (DESIGN.md §2), one warp per token, in one pass
// over the token's N+1 logits; the M null copies are never materialised.
//
// Per token, as lib/nm_moe.c (route_token) does:
//   lse   = mx + log(Σ_i exp(z_i − mx) + M·exp(z_N − mx))   (sums in double; mx over the reals and,
//           when M > 0, the null logit)
//   the reals in descending logit order, ties to the lower id: round k picks the first expert in
//           that order after round k−1's pick (stateless: no "taken" flags, any N)
//   merge with the null copies: a real takes slot k while its logit >= the null logit (a real
//           expert has a lower slot index than every null copy, so it wins ties), or when no
//           null copies are left (M of them); otherwise the slot is a null copy (-1)
//   prob  = exp(z − lse) of each slot (a null slot: one copy's), null_mass = M·exp(z_N − lse)
//   gates = softmax over the selected real logits (copy kind: over all K selected slots)
// A NaN logit ranks as −∞ here (the CPU's scalar path leaves such a logit unselected too).
#include <math.h>

#include "cuda_common.cuh"

#define ROUTER_WARPS 4

// a comes before b in the routing order: larger logit first, lower id on ties.
static __device__ __forceinline__ bool before(float za, int a, float zb, int b) { return za > zb || (za == zb && a < b); }

static __device__ __forceinline__ float rank_key(float z) { return z != z ? -INFINITY : z; }

// The first real expert after (pz, pi) in the routing order (pi = -1: from the start); -1 if none.
static __device__ int next_real(const float *zt, int N, float pz, int pi, int lane) {
    float bz = -INFINITY;
    int bi = -1;
    for (int i = lane; i < N; i += 32) {
        const float z = rank_key(zt[i]);
        if (pi >= 0 && !before(pz, pi, z, i)) continue; // not after the previous pick
        if (bi < 0 || before(z, i, bz, bi)) {
            bz = z;
            bi = i;
        }
    }
    for (int o = 16; o > 0; o /= 2) {
        const float oz = __shfl_xor_sync(0xffffffffu, bz, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (oi >= 0 && (bi < 0 || before(oz, oi, bz, bi))) {
            bz = oz;
            bi = oi;
        }
    }
    return bi;
}

static __global__ void route_kernel(nm_routing r, const float *z, int T, int N, int M, int K, int copy) {
    const int lane = threadIdx.x % 32, t = blockIdx.x * ROUTER_WARPS + threadIdx.x / 32;
    if (t >= T) return; // whole warps leave together
    const float *zt = z + (size_t)t * (N + 1);
    const float zn = zt[N];
    // lse over the N + M expanded logits
    float mx = -INFINITY;
    for (int i = lane; i < N; i += 32) mx = fmaxf(mx, zt[i]);
    for (int o = 16; o > 0; o /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    if (M > 0 && zn > mx) mx = zn;
    double s = 0.0;
    for (int i = lane; i < N; i += 32) s += expf(zt[i] - mx);
    for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (M > 0) s += M * exp((double)zn - mx);
    const double lse = mx + log(s);
    // top-K with the null copies merged in
    int16_t *slot = r.slot + (size_t)t * K;
    float *prob = r.prob + (size_t)t * K, *gate = r.gate + (size_t)t * K;
    const int kr = K < N ? K : N;
    int taken = 0, nulls_left = M, nr = 0;
    int cand = kr > 0 ? next_real(zt, N, 0.0f, -1, lane) : -1;
    for (int k = 0; k < K; k++) {
        const bool take_real = cand >= 0 && taken < kr && (nulls_left == 0 || zt[cand] >= zn);
        if (take_real) {
            if (lane == 0) {
                slot[k] = (int16_t)cand;
                prob[k] = (float)exp((double)zt[cand] - lse);
            }
            nr++;
            taken++;
            cand = taken < kr ? next_real(zt, N, rank_key(zt[cand]), cand, lane) : -1;
        } else {
            if (lane == 0) {
                slot[k] = -1;
                prob[k] = (float)exp((double)zn - lse);
            }
            nulls_left--;
        }
    }
    if (lane != 0) return;
    r.n_real[t] = (uint8_t)nr;
    r.lse[t] = (float)lse;
    r.null_mass[t] = M > 0 ? (float)(M * exp((double)zn - lse)) : 0.0f;
    // gates: a softmax over the selected logits (real ones only for zero kind; all K for copy)
    float gm = -INFINITY;
    for (int k = 0; k < K; k++)
        if (slot[k] >= 0 || copy) gm = fmaxf(gm, slot[k] >= 0 ? zt[slot[k]] : zn);
    double gs = 0.0;
    for (int k = 0; k < K; k++)
        if (slot[k] >= 0 || copy) gs += exp((double)(slot[k] >= 0 ? zt[slot[k]] : zn) - gm);
    for (int k = 0; k < K; k++)
        gate[k] = (slot[k] >= 0 || copy) ? (float)(exp((double)(slot[k] >= 0 ? zt[slot[k]] : zn) - gm) / gs) : 0.0f;
}

nm_status nm_cuda_route(cudaStream_t st, const nm_routing *r, const float *z, int T, const nm_moe_config *mc,
                        nm_error *err) {
    if (T <= 0) return NM_OK;
    const int blocks = (T + ROUTER_WARPS - 1) / ROUTER_WARPS;
    route_kernel<<<blocks, 32 * ROUTER_WARPS, 0, st>>>(*r, z, T, mc->num_experts, mc->null_copies, mc->top_k,
                                                       mc->null_kind == NM_NULL_COPY);
    NM_LAUNCH_CHECK();
    return NM_OK;
}
