#!/usr/bin/python3
"""PyTorch eager baseline for nullmap's bench: Algorithm 1 of the paper (arXiv 2601.15370,
appendix B, "Token-Choice MoE with Null Experts") as a researcher would write it in PyTorch 1.13
on a CPU: one router GEMM, expand the null logit M times, softmax, top-k, a stable argsort of the
slots by expert, truncate the null slots, renormalise the gates over the real slots per token,
then a loop over experts standing in for grouped_mm (1.13 has none), and scatter_add_ back.

One deliberate difference from the pseudocode, as DESIGN.md §2 says: the gate scales each
expert's OUTPUT (equations 1 and 3 of the paper), not its input (line 11). A self-check against
a float64 per-token reference runs first.

Settings: torch.set_num_threads(2) (this Debian build defaults to 1), inference under
torch.no_grad(). Run it with OMP_WAIT_POLICY=PASSIVE (bench_moe does): with the default
spinning policy PyTorch's OpenMP pool and its BLAS contend for the two cores (FINDINGS.md).

Inputs mirror bench_moe.c: x ~ N(0, 1) with a constant feature x[:, D-1] = 1 that only the
null row of the router reads (weight --null-bias), so that the share of null slots is ~1 - rho.

Prints one line per T:  RESULT T=<T> ms=<median ms> null_share=<achieved share of null slots>
Prints "SKIP: ..." and exits 0 where torch is not installed.

--serve (how bench_moe runs it): after the self-check prints "READY", then for every line
"<T>" read from stdin runs one forward over the first T tokens and prints
"TIME T=<T> ms=<ms> null_share=<share>" — so the bench can alternate PyTorch and nullmap runs
one by one and both sides see the same machine.
"""
import argparse
import os
import statistics
import sys
import time

try:
    import torch
    import torch.nn.functional as F
except ImportError as exc:  # python3-torch not installed
    print(f"SKIP: PyTorch is not available for {sys.executable} ({exc})")
    sys.exit(0)


def moe_alg1(x, Wr, Wg, Wu, Wd, K, M):
    """Algorithm 1. x: (T, D); Wr: (N+1, D); Wg, Wu: (N, H, D); Wd: (N, D, H)."""
    T, D = x.shape
    N = Wg.shape[0]
    # Router
    logits = x @ Wr.T                                                        # (T, N+1)
    logits = torch.cat([logits[:, :N], logits[:, N:].expand(-1, M)], dim=1)  # (T, N+M)
    scores = torch.softmax(logits, dim=1)
    top_scores, top_idx = torch.topk(scores, K, dim=1)                       # (T, K)
    # Reorder tokens by expert (standard token-choice)
    order = torch.argsort(top_idx.flatten(), stable=True)
    sorted_scores = top_scores.flatten()[order]
    sorted_tokens = order // K
    num_per_expert = torch.histc(top_idx.float(), bins=N + M, min=0, max=N + M - 1).long()
    # Truncate to real experts (null experts sort last)
    num_real = int(num_per_expert[:N].sum())
    tokens = sorted_tokens[:num_real]
    real_scores = sorted_scores[:num_real]
    per_token = torch.zeros(T, dtype=x.dtype).index_add_(0, tokens, real_scores)  # renorm
    gates = real_scores / per_token[tokens]
    # Expert computation: grouped_mm as a loop over experts' contiguous blocks
    x_in = x[tokens]
    x_out = torch.empty(num_real, D, dtype=x.dtype)
    start = 0
    for e, c in enumerate(num_per_expert[:N].tolist()):
        if c == 0:
            continue
        xe = x_in[start:start + c]
        h = F.silu(xe @ Wg[e].T) * (xe @ Wu[e].T)
        x_out[start:start + c] = h @ Wd[e].T
        start += c
    x_out *= gates[:, None]  # gate on the expert output (DESIGN.md §2), not on its input
    # Scatter back
    y = torch.zeros(T, D, dtype=x.dtype)
    y.scatter_add_(0, tokens[:, None].expand(-1, D), x_out)
    return y, num_real


def reference(x, Wr, Wg, Wu, Wd, K, M):
    """float64, token by token, straight from DESIGN.md §2."""
    x, Wr, Wg, Wu, Wd = (t.double() for t in (x, Wr, Wg, Wu, Wd))
    N = Wg.shape[0]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        z = Wr @ x[t]
        zt = torch.cat([z[:N], z[N:].expand(M)])
        sel = sorted(range(N + M), key=lambda i: (-float(zt[i]), i))[:K]
        real = [i for i in sel if i < N]
        if not real:
            continue
        g = torch.softmax(zt[real], dim=0)
        for gi, e in zip(g, real):
            out[t] += gi * (Wd[e] @ (F.silu(Wg[e] @ x[t]) * (Wu[e] @ x[t])))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, action="append")
    ap.add_argument("--D", type=int, default=512)
    ap.add_argument("--H", type=int, default=256)
    ap.add_argument("--N", type=int, default=64)
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--M", type=int, default=192)
    ap.add_argument("--null-bias", type=float, default=0.0)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--serve", action="store_true")
    a = ap.parse_args()
    Ts = a.T or [2048, 256]
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}")
    g = torch.Generator().manual_seed(0)
    D, H, N = a.D, a.H, a.N
    Wr = torch.randn(N + 1, D, generator=g) / (D - 1) ** 0.5
    Wr[:N, D - 1] = 0.0
    Wr[N] = 0.0
    Wr[N, D - 1] = a.null_bias
    Wg = torch.randn(N, H, D, generator=g) / D ** 0.5
    Wu = torch.randn(N, H, D, generator=g) / D ** 0.5
    Wd = torch.randn(N, D, H, generator=g) / H ** 0.5
    x_all = torch.randn(max(Ts), D, generator=g)
    x_all[:, D - 1] = 1.0

    with torch.no_grad():
        y, _ = moe_alg1(x_all[:48], Wr, Wg, Wu, Wd, a.K, a.M)
        ref = reference(x_all[:48], Wr, Wg, Wu, Wd, a.K, a.M)
        err = float((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        print(f"self-check vs float64 reference (48 tokens): max rel err {err:.2e}")
        if err > 1e-4:
            print("torch_alg1.py: self-check FAILED")
            sys.exit(1)
        if a.serve:
            print("READY", flush=True)
            for line in sys.stdin:
                T = int(line)
                x = x_all[:T].contiguous()
                t0 = time.perf_counter()
                _, num_real = moe_alg1(x, Wr, Wg, Wu, Wd, a.K, a.M)
                dt = time.perf_counter() - t0
                print(f"TIME T={T} ms={1e3 * dt:.4f} null_share={1.0 - num_real / (T * a.K):.4f}", flush=True)
            return
        for T in Ts:
            x = x_all[:T].contiguous()
            times = []
            for r in range(a.reps + 2):
                t0 = time.perf_counter()
                _, num_real = moe_alg1(x, Wr, Wg, Wu, Wd, a.K, a.M)
                dt = time.perf_counter() - t0
                if r >= 2:
                    times.append(dt)
            share = 1.0 - num_real / (T * a.K)
            print(f"RESULT T={T} ms={1e3 * statistics.median(times):.3f} null_share={share:.4f}")


if __name__ == "__main__":
    main()
