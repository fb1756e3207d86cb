// cuda_attention.cu — causal GQA attention against the KV cache, prefill and decode alike.
//
// One block per (query, head); its ATT_WARPS warps take the visible keys round-robin, each
// keeping an online softmax (running max, running sum, output accumulator spread over the
// lanes: head_dim <= 256, 8 values per lane). The warps' partial results are merged in warp
// order at the end, so the result does not depend on scheduling (no atomics).
#include <math.h>

#include "cuda_common.cuh"

#define ATT_WARPS 4
#define ATT_PER_LANE (NM_CUDA_MAX_HEAD_DIM / 32)

static __device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

static __global__ void attention_kernel(float *att, const float *q, const float *kc, const float *vc, int pos0, int nh,
                                        int nkv, int hd, float scale) {
    // q, att: (T, nh*hd); kc, vc: (ctx, nkv*hd); query t = blockIdx.x at position pos0 + t, head blockIdx.y
    const int t = blockIdx.x, h = blockIdx.y, kh = h / (nh / nkv), warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const size_t qd = (size_t)nh * hd, kvd = (size_t)nkv * hd;
    const float *qv = q + t * qd + (size_t)h * hd;
    float qr[ATT_PER_LANE], acc[ATT_PER_LANE];
#pragma unroll
    for (int j = 0; j < ATT_PER_LANE; j++) {
        const int d = lane + 32 * j;
        qr[j] = d < hd ? qv[d] : 0.0f;
        acc[j] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    const int n_keys = pos0 + t + 1; // causal: keys 0..pos
    for (int key = warp; key < n_keys; key += ATT_WARPS) {
        const float *kv = kc + key * kvd + (size_t)kh * hd, *vv = vc + key * kvd + (size_t)kh * hd;
        float s = 0.0f;
#pragma unroll
        for (int j = 0; j < ATT_PER_LANE; j++) {
            const int d = lane + 32 * j;
            if (d < hd) s += qr[j] * kv[d];
        }
        s = warp_sum(s) * scale;
        const float mn = fmaxf(m, s), corr = expf(m - mn), p = expf(s - mn);
        l = l * corr + p;
#pragma unroll
        for (int j = 0; j < ATT_PER_LANE; j++) {
            const int d = lane + 32 * j;
            if (d < hd) acc[j] = acc[j] * corr + p * vv[d];
        }
        m = mn;
    }
    __shared__ float sm_m[ATT_WARPS], sm_l[ATT_WARPS], sm_acc[ATT_WARPS][NM_CUDA_MAX_HEAD_DIM];
    if (lane == 0) {
        sm_m[warp] = m;
        sm_l[warp] = l;
    }
#pragma unroll
    for (int j = 0; j < ATT_PER_LANE; j++) {
        const int d = lane + 32 * j;
        if (d < hd) sm_acc[warp][d] = acc[j];
    }
    __syncthreads();
    float M = -INFINITY;
    for (int w = 0; w < ATT_WARPS; w++) M = fmaxf(M, sm_m[w]);
    float L = 0.0f;
    for (int w = 0; w < ATT_WARPS; w++) L += sm_m[w] == -INFINITY ? 0.0f : sm_l[w] * expf(sm_m[w] - M);
    float *out = att + t * qd + (size_t)h * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float o = 0.0f;
        for (int w = 0; w < ATT_WARPS; w++)
            if (sm_m[w] != -INFINITY) o += sm_acc[w][d] * expf(sm_m[w] - M);
        out[d] = o / L;
    }
}

nm_status nm_cuda_attention(cudaStream_t st, float *att, const float *q, const float *kc, const float *vc, int T,
                            int pos0, int nh, int nkv, int hd, nm_error *err) {
    if (T <= 0) return NM_OK;
    if (hd > NM_CUDA_MAX_HEAD_DIM || nkv <= 0 || nh % nkv != 0)
        return nm_fail(err, NM_ERR_UNSUPPORTED, "CUDA attention: head_dim %d (max %d), %d heads over %d kv heads", hd,
                       NM_CUDA_MAX_HEAD_DIM, nh, nkv);
    attention_kernel<<<dim3(T, nh), 32 * ATT_WARPS, 0, st>>>(att, q, kc, vc, pos0, nh, nkv, hd, 1.0f / sqrtf((float)hd));
    NM_LAUNCH_CHECK();
    return NM_OK;
}
