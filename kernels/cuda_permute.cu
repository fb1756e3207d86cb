// cuda_permute.cu — the expert permutation: counts, prefix sum, scatter; null slots are cut.
//
// The T*K slots are cut into chunks of NM_CUDA_PERMUTE_CHUNK, one warp each:
//   1. chunk_hist:   per chunk, rows per expert              -> chunk_counts (chunks, N)
//   2. column_scan:  per expert, exclusive scan over chunks  -> chunk_counts (offsets in the expert), totals (N)
//   3. expert_scan:  exclusive scan over experts             -> offsets (N+1)
//   4. scatter:      each chunk walks its slots in order, 32 at a time; lanes with the same expert
//                    find each other with __match_any_sync and take consecutive rows.
// The result is the CPU's (lib/nm_moe.c): each expert's rows hold its tokens in slot order, so it
// is the same on every run (integer arithmetic only, no order-dependent atomics).
#include "cuda_common.cuh"

static __global__ void chunk_hist_kernel(int32_t *chunk_counts, const int16_t *slot, size_t TK, int N) {
    extern __shared__ int32_t hist[]; // (N)
    const int lane = threadIdx.x;
    for (int e = lane; e < N; e += 32) hist[e] = 0;
    __syncwarp();
    const size_t c0 = (size_t)blockIdx.x * NM_CUDA_PERMUTE_CHUNK;
    for (size_t i = c0 + lane; i < c0 + NM_CUDA_PERMUTE_CHUNK && i < TK; i += 32)
        if (slot[i] >= 0) atomicAdd(&hist[slot[i]], 1); // integer counts: the same whatever the order
    __syncwarp();
    for (int e = lane; e < N; e += 32) chunk_counts[(size_t)blockIdx.x * N + e] = hist[e];
}

static __global__ void column_scan_kernel(int32_t *chunk_counts, int32_t *totals, int n_chunks, int N) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= N) return;
    int32_t run = 0;
    for (int c = 0; c < n_chunks; c++) {
        const int32_t v = chunk_counts[(size_t)c * N + e];
        chunk_counts[(size_t)c * N + e] = run;
        run += v;
    }
    totals[e] = run;
}

static __global__ void expert_scan_kernel(int32_t *offsets, const int32_t *totals, int N) {
    // one warp: offsets[0] = 0, offsets[e+1] = totals[0] + ... + totals[e]
    const int lane = threadIdx.x;
    int32_t carry = 0;
    if (lane == 0) offsets[0] = 0;
    for (int base = 0; base < N; base += 32) {
        int32_t v = base + lane < N ? totals[base + lane] : 0;
        for (int o = 1; o < 32; o *= 2) {
            const int32_t u = __shfl_up_sync(0xffffffffu, v, o);
            if (lane >= o) v += u;
        }
        if (base + lane < N) offsets[base + lane + 1] = carry + v;
        carry += __shfl_sync(0xffffffffu, v, 31);
    }
}

static __global__ void scatter_kernel(int32_t *row_slot, int32_t *slot_row, const int32_t *chunk_counts,
                                      const int32_t *offsets, const int16_t *slot, size_t TK, int N) {
    extern __shared__ int32_t cursor[]; // (N) next free row of each expert for this chunk
    const int lane = threadIdx.x;
    for (int e = lane; e < N; e += 32) cursor[e] = offsets[e] + chunk_counts[(size_t)blockIdx.x * N + e];
    __syncwarp();
    const size_t c0 = (size_t)blockIdx.x * NM_CUDA_PERMUTE_CHUNK;
    const unsigned below = (1u << lane) - 1u;
    for (size_t g = c0; g < c0 + NM_CUDA_PERMUTE_CHUNK && g < TK; g += 32) {
        const size_t i = g + lane;
        const int e = i < TK ? slot[i] : -1;
        const unsigned peers = __match_any_sync(0xffffffffu, e);
        if (e >= 0) {
            const int row = cursor[e] + __popc(peers & below);
            row_slot[row] = (int32_t)i;
            slot_row[i] = row;
        } else if (i < TK) {
            slot_row[i] = -1;
        }
        __syncwarp();
        if (e >= 0 && (peers & below) == 0) cursor[e] += __popc(peers); // the lowest lane of the group
        __syncwarp();
    }
}

nm_status nm_cuda_permute(cudaStream_t st, int32_t *offsets, int32_t *row_slot, int32_t *slot_row,
                          int32_t *chunk_counts, int32_t *totals, const int16_t *slot, int T, int K, int N,
                          nm_error *err) {
    const size_t TK = (size_t)T * K;
    const int n_chunks = (int)((TK + NM_CUDA_PERMUTE_CHUNK - 1) / NM_CUDA_PERMUTE_CHUNK);
    const size_t shared = (size_t)N * sizeof(int32_t);
    if (n_chunks > 0) {
        chunk_hist_kernel<<<n_chunks, 32, shared, st>>>(chunk_counts, slot, TK, N);
        NM_LAUNCH_CHECK();
    }
    column_scan_kernel<<<(N + 127) / 128, 128, 0, st>>>(chunk_counts, totals, n_chunks, N);
    NM_LAUNCH_CHECK();
    expert_scan_kernel<<<1, 32, 0, st>>>(offsets, totals, N);
    NM_LAUNCH_CHECK();
    if (n_chunks > 0) {
        scatter_kernel<<<n_chunks, 32, shared, st>>>(row_slot, slot_row, chunk_counts, offsets, slot, TK, N);
        NM_LAUNCH_CHECK();
    }
    return NM_OK;
}
