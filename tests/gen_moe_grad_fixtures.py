#!/usr/bin/env python3
"""gen_moe_grad_fixtures.py -- float64 PyTorch reference of the training MoE layer and its gradients.

Writes tests/fixtures/moe_grad_<case>.safetensors, which the C suite `grad_moe`
(tests/test_grad_moe.c) compares its float64 path (nm_moe_train_forward_f64 / _backward_f64)
against, and checks them (--verify).  Independent of the C code: it implements DESIGN.md
section 2 and the losses directly, token by token, and takes every gradient from torch autograd.

    /usr/bin/python3 tests/gen_moe_grad_fixtures.py --out tests/fixtures      # generate
    /usr/bin/python3 tests/gen_moe_grad_fixtures.py --verify tests/fixtures   # re-read and check

The loss differentiated is
    L = sum(w_out * out) + w_bal * L_bal + w_z * L_z
    L_bal = (N+M) sum_{i<N+M} f_i P_i   (f_i: share of the T*K selections in slot i, no gradient;
                                          every null copy is its own slot here)
    L_z   = mean_t logsumexp(z~_t)^2
Selection: a stable sort of -z~ (ties to the lower slot; a real expert beats a null copy), the
first K.  Zero kind: gates = softmax of the selected real logits, out = sum g_i E_i(y) (0 when
no real expert is selected); copy kind: gates = softmax of all K selected logits, a null copy
adds g * y.  Plus the shared expert when Hs > 0.  E(y) = Wd (silu(Wg y) * Wu y).

Inputs are drawn so that no selection boundary or order among the selected slots is within
MIN_MARGIN of a tie (pairs of null copies excepted: they are interchangeable), and so that the
cases with M >= K contain tokens with n_real = 0 and tokens with n_real = K (and every M > 0 case
with K > 1 a token with 0 < n_real < K); a seed that fails
is re-seeded.  Deterministic: numpy PCG64 for every random number, torch for the float64
arithmetic.

File layout (all F64 unless noted; shapes row-major):
  config        I32 [8]   T, D, N, M, K, H, Hs, null_kind (0 zero, 1 copy)
  loss_weights  F64 [2]   w_bal, w_z
  y (T,D); router (N+1,D); gate, up (N,H,D); down (N,D,H); sh_gate, sh_up (Hs,D), sh_down (D,Hs)
                          (the shared tensors only when Hs > 0); w_out (T,D)
  out (T,D); l_bal [1]; l_z [1]
  n_real I32 [T]; slot I32 [T,K] (-1 = null copy, descending p); route_prob, route_gate (T,K);
  route_lse [T]
  d_y, d_router, d_gate, d_up, d_down, d_sh_gate, d_sh_up, d_sh_down: dL/d of each input
__metadata__: generator, version, case.
"""

import os
import sys

try:
    import numpy as np
    import torch
except ImportError:  # the pyenv python3 on PATH has no torch: retry with Debian's interpreter
    if os.path.exists("/usr/bin/python3") and os.path.realpath(sys.executable) != os.path.realpath("/usr/bin/python3") \
            and not os.environ.get("NM_GEN_FIXTURES_REEXEC"):
        os.environ["NM_GEN_FIXTURES_REEXEC"] = "1"
        os.execv("/usr/bin/python3", ["/usr/bin/python3"] + sys.argv)
    raise

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_fixtures import generator_main, raw_from_numpy, st_bytes, st_parse  # noqa: E402  (the one safetensors writer)

GENERATOR = "tests/gen_moe_grad_fixtures.py"
VERSION = "1"
F64 = torch.float64
MIN_MARGIN = 1e-2
MAX_RESEEDS = 200

CASES = [
    dict(name="zero_shared", seed=11, T=8, D=6, N=4, M=4, K=3, H=5, Hs=4, kind="zero", w_bal=0.5, w_z=0.25,
         covers="zero kind, N=4 M=4 K=3, shared expert Hs=4; tokens with n_real = 0 and = K"),
    dict(name="m0", seed=22, T=8, D=6, N=5, M=0, K=2, H=4, Hs=0, kind="zero", w_bal=0.5, w_z=0.25,
         covers="plain top-K (M = 0), N=5 K=2, no shared expert: the null row gets no gradient"),
    dict(name="copy", seed=33, T=8, D=6, N=4, M=3, K=3, H=5, Hs=0, kind="copy", w_bal=0.5, w_z=0.25,
         covers="copy kind (MoE++), N=4 M=3 K=3: gates over all K slots, null copies add g*y"),
]

PARAMS = ["y", "router", "gate", "up", "down", "sh_gate", "sh_up", "sh_down"]


def shapes(c):
    T, D, N, H, Hs = c["T"], c["D"], c["N"], c["H"], c["Hs"]
    s = {"y": (T, D), "router": (N + 1, D), "gate": (N, H, D), "up": (N, H, D), "down": (N, D, H)}
    if Hs > 0:
        s.update({"sh_gate": (Hs, D), "sh_up": (Hs, D), "sh_down": (D, Hs)})
    return s


def draw(c, seed):
    """Random inputs (float64 numpy): unit-variance logits, a null row 1.5 times as wide so that some
    tokens route everything to null and some nothing; experts scaled for O(1) outputs."""
    rng = np.random.Generator(np.random.PCG64(seed))
    T, D, N, H, Hs = c["T"], c["D"], c["N"], c["H"], c["Hs"]
    x = {"y": rng.standard_normal((T, D))}
    router = rng.standard_normal((N + 1, D)) / np.sqrt(D)
    router[N] *= 1.5
    x["router"] = router
    x["gate"] = rng.standard_normal((N, H, D)) / np.sqrt(D)
    x["up"] = rng.standard_normal((N, H, D)) / np.sqrt(D)
    x["down"] = rng.standard_normal((N, D, H)) / np.sqrt(H)
    if Hs > 0:
        x["sh_gate"] = rng.standard_normal((Hs, D)) / np.sqrt(D)
        x["sh_up"] = rng.standard_normal((Hs, D)) / np.sqrt(D)
        x["sh_down"] = rng.standard_normal((D, Hs)) / np.sqrt(Hs)
    x["w_out"] = rng.standard_normal((T, D))
    return x


def expanded_logits(y, router, N, M):
    z = y @ router.T
    return torch.cat([z[:, :N], z[:, N:N + 1].expand(-1, M)], 1)


def select(zt, K):
    """The K selected slots of each token, descending z~, ties to the lower slot."""
    return torch.sort(-zt.detach(), dim=1, stable=True).indices[:, :K]


def margins(zt, K, N):
    """(selection margin, order margin) per token, leaving out pairs of null copies."""
    out = []
    for t in range(zt.shape[0]):
        z = zt[t].tolist()
        order = torch.sort(-zt[t], stable=True).indices.tolist()
        sel, rest = order[:K], order[K:]
        pair = [(a, b) for a in sel for b in rest if a < N or b < N]
        m_sel = min((z[a] - z[b] for a, b in pair), default=float("inf"))
        pair = [(sel[i], sel[j]) for i in range(K) for j in range(i + 1, K) if sel[i] < N or sel[j] < N]
        m_ord = min((z[a] - z[b] for a, b in pair), default=float("inf"))
        out.append((m_sel, m_ord))
    return out


def swiglu_ffn(x, wg, wu, wd):
    a, b = wg @ x, wu @ x
    return wd @ (torch.nn.functional.silu(a) * b)


def reference(c, x):
    """The layer and both losses in float64 with autograd. Returns (tensors to store, routing)."""
    N, M, K, Hs, copy = c["N"], c["M"], c["K"], c["Hs"], c["kind"] == "copy"
    inp = {k: torch.tensor(v, dtype=F64, requires_grad=True) for k, v in x.items() if k != "w_out"}
    y, router = inp["y"], inp["router"]
    T, D = y.shape
    zt = expanded_logits(y, router, N, M)
    p = torch.softmax(zt, 1)
    lse = torch.logsumexp(zt, 1)
    sel = select(zt, K)
    rows = []
    route_gate = torch.zeros(T, K, dtype=F64)
    for t in range(T):
        s = sel[t].tolist()
        use = [k for k in range(K) if s[k] < N or copy]  # positions in the selection that get a gate
        o = torch.zeros(D, dtype=F64)
        if use:
            g = torch.softmax(zt[t, [s[k] for k in use]], 0)
            for j, k in enumerate(use):
                i = s[k]
                e = swiglu_ffn(y[t], inp["gate"][i], inp["up"][i], inp["down"][i]) if i < N else y[t]
                o = o + g[j] * e
                route_gate[t, k] = g[j].detach()
        if Hs > 0:
            o = o + swiglu_ffn(y[t], inp["sh_gate"], inp["sh_up"], inp["sh_down"])
        rows.append(o)
    out = torch.stack(rows)
    counts = torch.zeros(N + M, dtype=F64)
    for i in sel.flatten().tolist():
        counts[i] += 1
    f = counts / (T * K)
    l_bal = (N + M) * (f * p.mean(0)).sum()
    l_z = (lse ** 2).mean()
    w_out = torch.tensor(x["w_out"], dtype=F64)
    loss = (w_out * out).sum() + c["w_bal"] * l_bal + c["w_z"] * l_z
    loss.backward()
    res = {"out": out.detach(), "l_bal": l_bal.detach().reshape(1), "l_z": l_z.detach().reshape(1)}
    res["n_real"] = (sel < N).sum(1).to(torch.int32)
    res["slot"] = torch.where(sel < N, sel, torch.full_like(sel, -1)).to(torch.int32)
    res["route_prob"] = torch.gather(p.detach(), 1, sel)
    res["route_gate"] = route_gate
    res["route_lse"] = lse.detach()
    for k in PARAMS:
        if k in inp:
            res["d_" + k] = inp[k].grad
    return res, zt.detach()


def acceptable(c, zt, n_real):
    N, M, K = c["N"], c["M"], c["K"]
    if min(min(m) for m in margins(zt, K, N)) < MIN_MARGIN:
        return False
    hist = set(n_real.tolist())
    if M >= K and (0 not in hist or min(K, N) not in hist):
        return False
    if M > 0 and K > 1 and not any(0 < n < K for n in hist):  # a token with reals and nulls mixed
        return False
    return True


def build(c):
    for attempt in range(MAX_RESEEDS):
        seed = c["seed"] + 1000 * attempt
        x = draw(c, seed)
        res, zt = reference(c, x)
        if acceptable(c, zt, res["n_real"]):
            return seed, x, res
    raise SystemExit(f"{c['name']}: no acceptable seed in {MAX_RESEEDS} tries")


def file_bytes(c, seed, x, res):
    kind = 1 if c["kind"] == "copy" else 0
    cfg = np.array([c["T"], c["D"], c["N"], c["M"], c["K"], c["H"], c["Hs"], kind])
    ts = [("config", "I32", [8], raw_from_numpy(cfg, "I32")),
          ("loss_weights", "F64", [2], raw_from_numpy(np.array([c["w_bal"], c["w_z"]]), "F64"))]
    for k, shp in shapes(c).items():
        ts.append((k, "F64", list(shp), raw_from_numpy(x[k], "F64")))
    ts.append(("w_out", "F64", [c["T"], c["D"]], raw_from_numpy(x["w_out"], "F64")))
    for k in ["out", "l_bal", "l_z", "n_real", "slot", "route_prob", "route_gate", "route_lse"]:
        v = res[k].numpy()
        ts.append((k, "I32" if v.dtype == np.int32 else "F64", list(v.shape), raw_from_numpy(v, "I32" if v.dtype == np.int32 else "F64")))
    for k, shp in shapes(c).items():
        ts.append(("d_" + k, "F64", list(shp), raw_from_numpy(res["d_" + k].numpy(), "F64")))
    return st_bytes(ts, {"generator": GENERATOR, "version": VERSION, "case": c["name"], "seed": seed})


def path_of(d, c):
    return os.path.join(d, f"moe_grad_{c['name']}.safetensors")


def summary(c, seed, res, zt):
    m = margins(zt, c["K"], c["N"])
    hist = np.bincount(res["n_real"].numpy(), minlength=c["K"] + 1).tolist()
    print(f"{c['name']:12s} seed {seed}: n_real histogram {hist}, min margin {min(min(a) for a in m):.3g}, "
          f"L_bal {res['l_bal'].item():.6f}, L_z {res['l_z'].item():.6f}  ({c['covers']})")


def generate(d):
    os.makedirs(d, exist_ok=True)
    for c in CASES:
        seed, x, res = build(c)
        blob = file_bytes(c, seed, x, res)
        with open(path_of(d, c), "wb") as f:
            f.write(blob)
        summary(c, seed, res, reference(c, x)[1])
        print(f"  wrote {path_of(d, c)} ({len(blob)} bytes)")


def verify(d):
    """Re-reads every file, recomputes the reference from the stored inputs and requires the same
    bytes; checks the margins and the stored seed."""
    for c in CASES:
        blob = open(path_of(d, c), "rb").read()
        ts, meta = st_parse(blob, path_of(d, c))
        assert meta["case"] == c["name"] and meta["version"] == VERSION, meta
        seed = int(meta["seed"])
        x = draw(c, seed)
        stored = {name: np.frombuffer(raw, dtype="<f8").reshape(shape) for name, dt, shape, raw in ts if dt == "F64"}
        for k in list(shapes(c)) + ["w_out"]:
            assert np.array_equal(stored[k], x[k]), f"{c['name']}: input {k} is not the seed's draw"
        res, zt = reference(c, x)
        assert acceptable(c, zt, res["n_real"]), f"{c['name']}: margins or n_real coverage fail"
        assert file_bytes(c, seed, x, res) == blob, f"{c['name']}: regenerated bytes differ"
        # the routing record agrees with the definition: gates sum to 1 over the gated slots
        g = res["route_gate"]
        for t in range(c["T"]):
            if c["kind"] == "copy" or res["n_real"][t] > 0:
                assert abs(g[t].sum().item() - 1) < 1e-12
        summary(c, seed, res, zt)
    print("ok")


def main():
    generator_main(__doc__, "write DIR/moe_grad_<case>.safetensors",
                   "re-read DIR/moe_grad_<case>.safetensors and check them", generate, verify)


if __name__ == "__main__":
    main()
