#!/usr/bin/python3
"""GPU PyTorch baseline for the paper-scale MoE layer: Algorithm 1 of arXiv 2601.15370
(appendix B, "Token-Choice MoE with Null Experts") with torch._grouped_mm, as the paper's own
implementation runs it. The GPU counterpart of tests/bench/torch_alg1.py (the CPU baseline).

Written for a session that has a GPU: it has NOT been run yet (no GPU was lent when it was
written). Compare its times with `build/sandbox --bench` (make bench) on the same GPU.

Shape (the issue's bar): D=2048, N=64, H=768, K=8, T=16384, rho 0.5 (M=64) vs rho 1.0 (M=0).
Inputs mirror kernels/sandbox.cu: x ~ N(0, 1) with a constant feature x[:, D-1] = 1 that only the
null row of the router reads (weight --null-bias, found here by bisection when not given), so
that the share of null slots is ~1 - rho.

Differences from the pseudocode, as DESIGN.md §2 says: the gate scales each expert's OUTPUT
(equations 1 and 3), not its input (line 11); experts are SwiGLU FFNs (gate, up, down), so the
grouped GEMM runs three times. The gates are renormalised over the selected real slots.

Prints one line per configuration:
  RESULT rho=<rho> T=<T> dtype=<dtype> ms=<median ms> null_share=<share> impl=<grouped_mm|loop>
and "SKIP: ..." (exit 0) where torch or a CUDA device is missing.
"""
import argparse
import os
import statistics
import sys

try:
    import torch
    import torch.nn.functional as F
except ImportError as exc:
    print(f"SKIP: PyTorch is not available for {sys.executable} ({exc})")
    sys.exit(0)

# The float64 per-token reference of DESIGN.md §2, shared with the CPU baseline.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_alg1 import reference  # noqa: E402


def grouped(x, w, offs, use_grouped):
    """x: (rows, k) sorted by expert; w: (G, n, k) (nn.Linear layout); offs: (G,) int32 end offsets.
    Returns (rows, n) = per expert x_e @ w_e^T."""
    if use_grouped:
        return torch._grouped_mm(x, w.transpose(1, 2), offs=offs)
    out = x.new_empty(x.shape[0], w.shape[1])
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = x[start:end] @ w[e].T
        start = end
    return out


def moe_alg1(x, router, gate, up, down, K, M, use_grouped):
    """Algorithm 1 with null experts. x: (T, D); router: (N+1, D); gate, up: (N, H, D); down: (N, D, H)."""
    T, D = x.shape
    N = gate.shape[0]
    logits = (x.float() @ router.float().T)                                  # 1: (T, N+1), router in F32
    logits = torch.cat([logits[:, :N], logits[:, N:].expand(-1, M)], dim=1)  # 2: (T, N+M)
    scores = torch.softmax(logits, dim=1)                                   # 3
    top_scores, top_idx = torch.topk(scores, K, dim=1)                      # 4: (T, K)
    flat_idx = top_idx.flatten()
    order = torch.argsort(flat_idx, stable=True)                            # 5
    sorted_scores = top_scores.flatten()[order]                             # 6
    sorted_tokens = order // K                                              # 7
    num_per_expert = torch.bincount(flat_idx, minlength=N + M)              # 8
    num_real = int(num_per_expert[:N].sum())                                # 9 (one host sync, as in the paper)
    real = sorted_scores[:num_real]                                         # 10: renormalise per token
    denom = torch.zeros(T, device=x.device, dtype=real.dtype).index_add_(0, sorted_tokens[:num_real], real)
    g = real / denom[sorted_tokens[:num_real]]
    offs = torch.cumsum(num_per_expert[:N], 0).to(torch.int32)
    x_in = x[sorted_tokens[:num_real]]                                      # 11 (gate applied to the output)
    h = F.silu(grouped(x_in, gate, offs, use_grouped)) * grouped(x_in, up, offs, use_grouped)   # 12
    x_out = grouped(h, down, offs, use_grouped) * g[:, None].to(x.dtype)
    y = torch.zeros(T, D, device=x.device, dtype=torch.float32)             # 13
    y.index_add_(0, sorted_tokens[:num_real], x_out.float())                # 14
    return y, 1.0 - num_real / (T * K)


def make_inputs(T, D, N, H, dtype, device, seed):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(T, D, generator=gen)
    x[:, D - 1] = 1.0
    router = torch.randn(N + 1, D, generator=gen) / D ** 0.5
    router[:N, D - 1] = 0.0
    gate = torch.randn(N, H, D, generator=gen) * 0.02
    up = torch.randn(N, H, D, generator=gen) * 0.02
    down = torch.randn(N, D, H, generator=gen) * 0.02
    return (x.to(device, dtype), router.to(device), gate.to(device, dtype), up.to(device, dtype), down.to(device, dtype))


def set_null_bias(x, router, K, M, rho):
    """Bisection on the null row's weight of the constant feature for a null share of 1 - rho."""
    if M == 0:
        return 0.0
    N = router.shape[0] - 1
    base = x[:2048].float() @ router.float().T
    lo, hi = -20.0, 20.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        z = base.clone()
        z[:, N] += mid
        zz = torch.cat([z[:, :N], z[:, N:].expand(-1, M)], dim=1)
        top = torch.topk(zz, K, dim=1).indices
        share = (top >= N).float().mean().item()
        lo, hi = (mid, hi) if share < 1.0 - rho else (lo, mid)
    router[N, x.shape[1] - 1] = 0.5 * (lo + hi)
    return 0.5 * (lo + hi)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", type=int, default=16384)
    ap.add_argument("--D", type=int, default=2048)
    ap.add_argument("--N", type=int, default=64)
    ap.add_argument("--H", type=int, default=768)
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16",
                    help="expert weights and activations (torch._grouped_mm wants bf16 on sm90)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-grouped", action="store_true", help="a loop over experts instead of _grouped_mm")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("SKIP: no CUDA device for PyTorch")
        return 0
    dev = torch.device("cuda")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    use_grouped = not args.no_grouped and hasattr(torch, "_grouped_mm")
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
          f"{'torch._grouped_mm' if use_grouped else 'loop over experts'}")

    # self-check against the float64 definition on a small shape
    with torch.no_grad():
        x, router, gate, up, down = make_inputs(64, 128, 8, 32, dtype, dev, 1)
        for M in (0, 8):
            got, _ = moe_alg1(x, router, gate, up, down, 2, M, use_grouped)
            want = reference(x.cpu(), router.cpu(), gate.cpu(), up.cpu(), down.cpu(), 2, M)
            err = ((got.double().cpu() - want).abs() / want.abs().clamp(min=1.0)).max().item()
            tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
            print(f"# self-check M={M}: max rel err {err:.2e} (bar {tol})")
            if err > tol:
                print("FAIL: self-check")
                return 1

        for rho, M in ((0.5, args.N), (1.0, 0)):
            x, router, gate, up, down = make_inputs(args.T, args.D, args.N, args.H, dtype, dev, 2)
            set_null_bias(x, router, args.K, M, rho)
            times, share = [], 0.0
            for i in range(args.reps + 1):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                _, share = moe_alg1(x, router, gate, up, down, args.K, M, use_grouped)
                end.record()
                torch.cuda.synchronize()
                if i > 0:  # the first run warms up
                    times.append(start.elapsed_time(end))
            print(f"RESULT rho={rho} T={args.T} dtype={args.dtype} ms={statistics.median(times):.3f} "
                  f"null_share={share:.3f} impl={'grouped_mm' if use_grouped else 'loop'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
