#!/usr/bin/env python3
"""gen_grad_fixtures.py -- float64 PyTorch autograd reference for the dense training ops.

Writes tests/fixtures/grad_torch/expected.safetensors, which tests/test_grad_torch.c compares
with the forward/backward pairs of lib/nm_train_ops.h (the `_f64` ops elementwise to 1e-9
relative, the `_f32` ops to 1e-4 of each tensor's largest value).

    /usr/bin/python3 tests/gen_grad_fixtures.py --out tests/fixtures/grad_torch

Each op is written here from DESIGN.md section 3, without reference to the C code, with torch's
own building blocks where they exist (F.linear, F.embedding, F.silu, softmax, F.cross_entropy).
Its gradients come from autograd on the scalar L = sum(out * dout) for a random upstream
gradient dout (for cross-entropy, whose output is the loss: L = dloss * loss).

Inputs are random float32 values (numpy PCG64, fixed seed) widened to float64, so that the
float32 ops of the C test see exactly the inputs the reference saw.

Tensors, per case "<case>.<name>" (F64 unless noted; shapes as the C ops take them):
  linear        x [T, in], w [out, in], b [out], dout [T, out] -> out, dx, dw, db
  embedding     ids I32 [T] (-1: an image patch, no row; repeated ids accumulate), E [V, D],
                dout [T, D] -> out (zero rows at ids -1), dE
  rmsnorm       x [T, D] (row 0 scaled by 1e-3, so eps matters there), w [D], eps [1],
                dout -> out = x / sqrt(mean(x^2) + eps) * w, rstd [T], dx, dw
  rope          x [T, nh, hd], theta [1], pos0 I32 [1], dout -> out, dx. Half-split: pairs
                (i, i + hd/2) rotated by (pos0 + t) * inv_freq[i], inv_freq = theta^(-2i/hd)
  swiglu        g, u [T, H], dout -> out = silu(g) * u, dg, du
  attn_gqa, attn_mqa, attn_mha
                q [T, nh, hd], k, v [T, nkv, hd], dout [T, nh, hd] -> out [T, nh, hd],
                att [nh, T, T] (softmax probabilities, 0 above the diagonal), dq, dk, dv.
                Causal, scale 1/sqrt(hd); query head h reads kv head h / (nh / nkv).
  crossentropy  logits [T, V], targets I32 [T] (-1: no loss), dloss [1] -> loss [1]
                (mean over targets >= 0), probs [T, V] (softmax of every row), dlogits

No safetensors package is needed: the writer of tests/gen_fixtures.py is reused.
"""

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_fixtures import np, torch, st_bytes, st_parse, raw_from_numpy  # noqa: E402

F = torch.nn.functional
F64 = torch.float64
GENERATOR = "tests/gen_grad_fixtures.py"
VERSION = "1"
SEED = 20260502


class Case:
    def __init__(self, name, rng):
        self.name, self.rng, self.tensors = name, rng, []

    def rand(self, *shape, std=1.0, row0=1.0):
        """float32 normals widened to float64, as a leaf that wants its gradient. row0 scales
        the first row (before the rounding to float32)."""
        a = std * self.rng.standard_normal(shape)
        a[0] *= row0
        return torch.tensor(a.astype(np.float32).astype(np.float64), dtype=F64, requires_grad=True)

    def put(self, name, t, dtype="F64"):
        a = t.detach().numpy() if torch.is_tensor(t) else np.asarray(t)
        self.tensors.append((f"{self.name}.{name}", dtype, list(a.shape), raw_from_numpy(a, dtype)))

    def backward(self, out, dout, inputs):
        """L = sum(out * dout); saves out, dout and the gradient of every input."""
        (out * dout).sum().backward()
        self.put("dout", dout)
        self.put("out", out)
        for name, t in inputs.items():
            self.put(name, t)
            self.put("d" + name, t.grad)


def case_linear(c, T=5, n_in=6, n_out=7):
    x, w, b = c.rand(T, n_in), c.rand(n_out, n_in), c.rand(n_out)
    out = F.linear(x, w, b)
    c.backward(out, c.rand(T, n_out).detach(), {"x": x, "w": w, "b": b})


def case_embedding(c, V=5, D=6):
    ids = torch.tensor([3, 0, -1, 3, 4, 1, -1])
    E = c.rand(V, D)
    keep = (ids >= 0).to(F64)[:, None]
    out = F.embedding(ids.clamp(min=0), E) * keep     # rows of patches (id -1) stay 0
    c.put("ids", ids.numpy(), "I32")
    c.backward(out, c.rand(len(ids), D).detach(), {"E": E})


def case_rmsnorm(c, T=5, D=8, eps=1e-6):
    x = c.rand(T, D, row0=1e-3)                       # mean(x^2) ~ 1e-6 ~ eps in row 0
    w = c.rand(D)
    rstd = torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    out = x * rstd * w
    c.put("eps", np.array([eps]))
    c.put("rstd", rstd.reshape(T))
    c.backward(out, c.rand(T, D).detach(), {"x": x, "w": w})


def case_rope(c, T=6, nh=3, hd=8, theta=1000.0, pos0=5):
    x = c.rand(T, nh, hd)
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=F64) / hd))
    angle = torch.outer(torch.arange(pos0, pos0 + T, dtype=F64), inv_freq)      # [T, hd/2]
    cos, sin = torch.cos(angle)[:, None, :], torch.sin(angle)[:, None, :]
    x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    c.put("theta", np.array([theta]))
    c.put("pos0", np.array([pos0]), "I32")
    c.backward(out, c.rand(T, nh, hd).detach(), {"x": x})


def case_swiglu(c, T=5, H=7):
    g, u = c.rand(T, H, std=2.0), c.rand(T, H)
    out = F.silu(g) * u
    c.backward(out, c.rand(T, H).detach(), {"g": g, "u": u})


def case_attention(c, T, nh, nkv, hd):
    q, k, v = c.rand(T, nh, hd), c.rand(T, nkv, hd), c.rand(T, nkv, hd)
    kk = k.repeat_interleave(nh // nkv, dim=1)        # head h -> kv head h // (nh / nkv)
    vv = v.repeat_interleave(nh // nkv, dim=1)
    scores = torch.einsum("thd,shd->hts", q, kk) / math.sqrt(hd)
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    att = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    out = torch.einsum("hts,shd->thd", att, vv)
    c.put("att", att)
    c.backward(out, c.rand(T, nh, hd).detach(), {"q": q, "k": k, "v": v})


def case_crossentropy(c, T=6, V=11, dloss=0.7):
    logits = c.rand(T, V, std=2.0)
    targets = torch.tensor([3, -1, 10, 0, -1, 7])
    loss = F.cross_entropy(logits, targets, ignore_index=-1, reduction="mean")
    (dloss * loss).backward()
    c.put("logits", logits)
    c.put("targets", targets.numpy(), "I32")
    c.put("dloss", np.array([dloss]))
    c.put("loss", loss.reshape(1))
    c.put("probs", torch.softmax(logits, dim=-1))
    c.put("dlogits", logits.grad)


def generate(out_dir):
    rng = np.random.Generator(np.random.PCG64(SEED))
    cases = [("linear", case_linear, {}), ("embedding", case_embedding, {}), ("rmsnorm", case_rmsnorm, {}),
             ("rope", case_rope, {}), ("swiglu", case_swiglu, {}),
             ("attn_gqa", case_attention, dict(T=7, nh=4, nkv=2, hd=8)),
             ("attn_mqa", case_attention, dict(T=5, nh=3, nkv=1, hd=6)),
             ("attn_mha", case_attention, dict(T=4, nh=2, nkv=2, hd=4)),
             ("crossentropy", case_crossentropy, {})]
    tensors = []
    for name, fn, kw in cases:
        c = Case(name, rng)
        fn(c, **kw)
        tensors += c.tensors
    blob = st_bytes(tensors, {"generator": GENERATOR, "version": VERSION, "torch": torch.__version__, "seed": SEED})
    st_parse(blob, "grad fixture")  # layout self-check
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "expected.safetensors")
    with open(path, "wb") as f:
        f.write(blob)
    print(f"{path}: {len(tensors)} tensors, {len(blob)} bytes")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "grad_torch"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    generate(a.out)


if __name__ == "__main__":
    main()
