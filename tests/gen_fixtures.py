#!/usr/bin/env python3
"""gen_fixtures.py -- float64 PyTorch reference of the nullmap model forward pass.

Writes the committed fixtures under tests/fixtures/<case>/ that the C test suite compares
against (config.json, model.safetensors, expected.safetensors; see tests/fixtures/README.md),
and checks them (--verify).  Independent of the C code: it implements DESIGN.md sections 2
and 3 directly, in float64.

    /usr/bin/python3 tests/gen_fixtures.py --out tests/fixtures      # generate
    /usr/bin/python3 tests/gen_fixtures.py --verify tests/fixtures   # re-read and check

Needs PyTorch (Debian's python3-torch) and numpy; no safetensors package (the files are
written and parsed by hand).  Deterministic: fixed seeds, numpy's PCG64 generator for all
random numbers, torch only for the float16/bfloat16 rounding and the float64 arithmetic.
"""

import argparse
import json
import math
import os
import struct
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

GENERATOR = "tests/gen_fixtures.py"
VERSION = "1"
F64 = torch.float64

TOKENIZER = {"type": "byte", "bos": 256, "eos": 257, "image_start": 258, "image_end": 259, "pad": 260}

# ----------------------------------------------------------------------------------------------
# Cases.  Sizes: D hidden, L layers, nh/nkv heads, hd head dim, V vocab, N experts, M null
# copies, K top-k, H expert hidden, Hs shared expert hidden (0: none).
# null_bias shifts the router's null row along the direction shared by all embeddings, so that
# a good share of slots goes to null; null_std is the extra spread of the null row.
# ----------------------------------------------------------------------------------------------
CASES = [
    dict(name="text_m0_mha", seed=101, D=32, L=2, nh=4, nkv=4, hd=8, V=261, N=4, M=0, K=2,
         H=16, Hs=0, null_kind="zero", vision=None, dtype="F32", tie=False,
         prompt="hello moe", n_gen=5, null_bias=0.0, null_std=1.0,
         covers="text-only; plain top-K (M = 0), N=4 K=2; MHA (nh = nkv = 4); no shared expert; F32"),
    dict(name="vlm_null_shared_gqa", seed=202, D=48, L=3, nh=4, nkv=2, hd=12, V=264, N=8, M=8, K=4,
         H=32, Hs=24, null_kind="zero", vision=(16, 4), dtype="F32", tie=False,
         prompt="what is it?", n_gen=6, null_bias=0.0, null_std=1.5,
         covers="vision 16x16/4 (16 patches); null experts N=8 M=8 K=4 (zero kind); shared expert; "
                "GQA nh=4 nkv=2; F32"),
    dict(name="vlm_bf16", seed=303, D=40, L=2, nh=4, nkv=1, hd=10, V=261, N=6, M=3, K=3,
         H=24, Hs=16, null_kind="zero", vision=(12, 4), dtype="BF16", tie=False,
         prompt="colour?", n_gen=4, null_bias=0.0, null_std=1.5, eos_boost=0.3, expect_eos=True,
         covers="vision 12x12/4 (9 patches); N=6 M=3 K=3 (zero kind); shared expert; MQA nh=4 nkv=1; "
                "BF16 weights; greedy generation stops at EOS (EOS is the last token)"),
    dict(name="text_copy", seed=404, D=32, L=2, nh=2, nkv=2, hd=16, V=262, N=4, M=4, K=2,
         H=20, Hs=0, null_kind="copy", vision=None, dtype="F32", tie=False,
         prompt="copy experts", n_gen=5, null_bias=0.0, null_std=1.5,
         covers="text-only; null_kind copy (MoE++): gates over all K slots, null copies add g*y; "
                "N=4 M=4 K=2; F32"),
    dict(name="text_tied_f16_k1", seed=505, D=32, L=3, nh=2, nkv=1, hd=16, V=261, N=4, M=2, K=1,
         H=16, Hs=24, null_kind="zero", vision=None, dtype="F16", tie=True,
         prompt="tied k1", n_gen=5, null_bias=1.0, null_std=1.5,
         covers="text-only; tie_embeddings (no lm_head tensor); F16 weights; K=1 with N=4 M=2 "
                "(n_real 0 or 1); shared expert; MQA nh=2 nkv=1"),
    dict(name="text_all_slots", seed=606, D=32, L=2, nh=4, nkv=2, hd=8, V=263, N=3, M=2, K=5,
         H=16, Hs=0, null_kind="zero", vision=None, dtype="F32", tie=False,
         prompt="all five", n_gen=4, null_bias=0.0, null_std=1.0,
         covers="text-only; K = N+M (every slot selected, margin +inf, n_real always N); "
                "N=3 M=2; GQA nh=4 nkv=2; F32"),
]

MAX_POSITIONS = 128
ROPE_THETA = 10000.0
RMS_EPS = 1e-6
MIN_MARGIN = 1e-4   # a case whose smallest routing / greedy margin is below this is re-seeded
MAX_RESEEDS = 50


# ----------------------------------------------------------------------------------------------
# safetensors: hand-written writer and parser
# ----------------------------------------------------------------------------------------------
ST_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "F64": 8, "I64": 8, "U8": 1, "I16": 2}


def st_bytes(tensors, metadata):
    """tensors: list of (name, dtype string, shape list, raw little-endian bytes), packed in order."""
    header = {}
    if metadata is not None:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    off = 0
    for name, dtype, shape, raw in tensors:
        n = ST_ITEMSIZE[dtype] * int(np.prod(shape, dtype=np.int64)) if len(shape) else ST_ITEMSIZE[dtype]
        assert len(raw) == n, (name, len(raw), n)
        header[name] = {"dtype": dtype, "shape": [int(s) for s in shape], "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * ((8 - (8 + len(h)) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(raw for _, _, _, raw in tensors)


def st_parse(blob, what="safetensors"):
    """Returns (ordered list of (name, dtype, shape, raw bytes), metadata).  Checks the layout
    strictly: aligned data start, tensors packed in header order from offset 0 with no gaps,
    data section exactly covered."""
    if len(blob) < 8:
        raise ValueError(f"{what}: shorter than 8 bytes")
    (hlen,) = struct.unpack("<Q", blob[:8])
    if 8 + hlen > len(blob):
        raise ValueError(f"{what}: header length {hlen} past end of file")
    if (8 + hlen) % 8:
        raise ValueError(f"{what}: data section not 8-byte aligned")
    header = json.loads(blob[8:8 + hlen].decode("utf-8"))
    data = blob[8 + hlen:]
    meta = header.pop("__metadata__", None)
    entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    out, pos = [], 0
    for name, e in entries:
        b, end = e["data_offsets"]
        n = ST_ITEMSIZE[e["dtype"]] * int(np.prod(e["shape"], dtype=np.int64))
        if b != pos or end - b != n:
            raise ValueError(f"{what}: tensor {name} at [{b},{end}) expected [{pos},{pos + n})")
        out.append((name, e["dtype"], list(e["shape"]), data[b:end]))
        pos = end
    if pos != len(data):
        raise ValueError(f"{what}: {len(data) - pos} trailing bytes after the last tensor")
    return out, meta


def raw_from_numpy(a, dtype):
    npd = {"F32": "<f4", "I32": "<i4", "F64": "<f8"}[dtype]
    return np.ascontiguousarray(np.asarray(a).astype(npd)).tobytes()


def raw_to_float64(raw, dtype, shape):
    """Decodes F32/F16/BF16/I32 little-endian bytes to a float64 (or int64) torch tensor."""
    if dtype == "F32":
        a = np.frombuffer(raw, dtype="<f4").astype(np.float64)
    elif dtype == "F16":
        a = np.frombuffer(raw, dtype="<f2").astype(np.float64)
    elif dtype == "BF16":   # bf16 = the top 16 bits of a float32
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << np.uint32(16)
        a = bits.view(np.float32).astype(np.float64)
    elif dtype == "I32":
        return torch.from_numpy(np.frombuffer(raw, dtype="<i4").astype(np.int64).reshape(shape))
    else:
        raise ValueError(dtype)
    return torch.from_numpy(a.reshape(shape).copy())


def weight_round(w32, dtype):
    """float32 numpy weights -> (stored little-endian bytes, the rounded values as float64 torch)."""
    t = torch.from_numpy(np.ascontiguousarray(w32, dtype=np.float32))
    if dtype == "F32":
        raw = t.numpy().astype("<f4").tobytes()
        ref = t.to(F64)
    elif dtype == "F16":
        h = t.to(torch.float16)
        raw = h.numpy().astype("<f2").tobytes()
        ref = h.to(F64)
    elif dtype == "BF16":
        b = t.to(torch.bfloat16)  # round to nearest even
        raw = b.view(torch.int16).numpy().astype("<i2").tobytes()
        ref = b.to(F64)
    else:
        raise ValueError(dtype)
    if not torch.isfinite(ref).all():
        raise ValueError("weight overflows " + dtype)
    return raw, ref


# ----------------------------------------------------------------------------------------------
# Model: config, weight init
# ----------------------------------------------------------------------------------------------
def make_config(c):
    cfg = {
        "model_type": "nullmap-moe", "format_version": 1,
        "hidden_size": c["D"], "num_layers": c["L"], "num_heads": c["nh"], "num_kv_heads": c["nkv"],
        "head_dim": c["hd"], "vocab_size": c["V"], "max_positions": MAX_POSITIONS,
        "rope_theta": ROPE_THETA, "rms_norm_eps": RMS_EPS, "tie_embeddings": bool(c["tie"]),
        "moe": {"num_experts": c["N"], "null_copies": c["M"], "top_k": c["K"],
                "expert_hidden": c["H"], "shared_expert_hidden": c["Hs"], "null_kind": c["null_kind"]},
    }
    if c["vision"] is not None:
        S, p = c["vision"]
        cfg["vision"] = {"image_size": S, "patch_size": p, "channels": 3}
    cfg["tokenizer"] = dict(TOKENIZER)
    return cfg


def tensor_names(cfg):
    """Every tensor of the model, in the order of DESIGN.md section 3, with its shape."""
    D, L, V = cfg["hidden_size"], cfg["num_layers"], cfg["vocab_size"]
    nh, nkv, hd = cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"]
    m = cfg["moe"]
    N, H, Hs = m["num_experts"], m["expert_hidden"], m["shared_expert_hidden"]
    out = [("embed_tokens.weight", [V, D])]
    if "vision" in cfg:
        S, p = cfg["vision"]["image_size"], cfg["vision"]["patch_size"]
        out += [("vision.patch_embed.weight", [D, 3 * p * p]), ("vision.patch_embed.bias", [D]),
                ("vision.pos_embed", [(S // p) ** 2, D])]
    for i in range(L):
        pre = f"layers.{i}."
        out += [(pre + "attn_norm.weight", [D]),
                (pre + "attn.q_proj.weight", [nh * hd, D]), (pre + "attn.k_proj.weight", [nkv * hd, D]),
                (pre + "attn.v_proj.weight", [nkv * hd, D]), (pre + "attn.o_proj.weight", [D, nh * hd]),
                (pre + "moe_norm.weight", [D]), (pre + "moe.router.weight", [N + 1, D]),
                (pre + "moe.experts.gate_proj", [N, H, D]), (pre + "moe.experts.up_proj", [N, H, D]),
                (pre + "moe.experts.down_proj", [N, D, H])]
        if Hs > 0:
            out += [(pre + "moe.shared.gate_proj.weight", [Hs, D]), (pre + "moe.shared.up_proj.weight", [Hs, D]),
                    (pre + "moe.shared.down_proj.weight", [D, Hs])]
    out.append(("norm.weight", [D]))
    if not cfg["tie_embeddings"]:
        out.append(("lm_head.weight", [V, D]))
    return out


def init_weights(c, cfg, rng):
    """float32 numpy weights, by name."""
    D = c["D"]
    shared_dir = rng.standard_normal(D)
    shared_dir /= np.linalg.norm(shared_dir)
    w = {}
    for name, shape in tensor_names(cfg):
        if name.endswith("norm.weight"):
            a = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name == "embed_tokens.weight":
            a = rng.standard_normal(shape) + 0.5 * math.sqrt(D) * shared_dir
        elif name == "vision.patch_embed.weight":
            a = 0.25 * rng.standard_normal(shape)
        elif name == "vision.patch_embed.bias":
            a = 0.2 * rng.standard_normal(shape) + 0.5 * math.sqrt(D) * shared_dir
        elif name == "vision.pos_embed":
            a = 0.5 * rng.standard_normal(shape)
        elif name.endswith("moe.router.weight"):
            # logits z = y . w with y of RMS ~1: std of w * sqrt(D) ~ 2.5
            a = (2.5 / math.sqrt(D)) * rng.standard_normal(shape)
            a[-1] = c["null_std"] * a[-1] + c["null_bias"] * shared_dir
        elif ".attn." in name:
            a = 0.1 * rng.standard_normal(shape)
        elif name == "lm_head.weight":
            a = 0.1 * rng.standard_normal(shape)
            # eos_boost > 0 pulls the EOS row towards the shared direction, so that greedy
            # generation ends with EOS (exercises the stop rule)
            a[TOKENIZER["eos"]] += c.get("eos_boost", 0.0) * shared_dir
        else:  # expert and shared expert projections
            a = 0.08 * rng.standard_normal(shape)
        w[name] = np.asarray(a, dtype=np.float32)
    return w


# ----------------------------------------------------------------------------------------------
# Reference forward (float64), whole sequence at once
# ----------------------------------------------------------------------------------------------
def rmsnorm(x, w, eps):
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * w


def rope(x, pos, theta):
    """x: [T, heads, hd]; half-split rotation of pairs (i, i + hd/2)."""
    hd = x.shape[-1]
    half = hd // 2
    inv_freq = theta ** (-2.0 * torch.arange(half, dtype=F64) / hd)
    ang = pos.to(F64)[:, None] * inv_freq[None, :]          # [T, half]
    cos, sin = torch.cos(ang)[:, None, :], torch.sin(ang)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def silu(x):
    return x / (1.0 + torch.exp(-x))


def ffn(y, g, u, d):
    return (silu(y @ g.T) * (y @ u.T)) @ d.T


def embed(W, cfg, ids, patch_idx, pixels):
    T, D = len(ids), cfg["hidden_size"]
    x = torch.zeros(T, D, dtype=F64)
    for t in range(T):
        if ids[t] >= 0:
            x[t] = W["embed_tokens.weight"][ids[t]]
        else:
            S, p = cfg["vision"]["image_size"], cfg["vision"]["patch_size"]
            g = S // p
            r, c = divmod(int(patch_idx[t]), g)
            patch = pixels[:, r * p:(r + 1) * p, c * p:(c + 1) * p].reshape(-1)   # (channel, row, col)
            x[t] = W["vision.patch_embed.weight"] @ patch + W["vision.patch_embed.bias"] + \
                W["vision.pos_embed"][patch_idx[t]]
    return x


def route_token(zt, N, K):
    """zt: expanded logits [N+M] (float64 tensor).  Returns the selected slots (descending z,
    ties to the lower index), the margins and the softmax pieces."""
    z = zt.numpy()
    order = np.argsort(-z, kind="stable")   # stable: equal logits keep the lower slot index first
    sel, rest = order[:K], order[K:]
    ident = lambda s: int(s) if s < N else -1   # null copies are interchangeable
    # margin: smallest z[a] - z[b] over selected a, unselected b that are not both null copies
    margin = math.inf
    for a in sel:
        for b in rest:
            if ident(a) != ident(b):
                margin = min(margin, float(z[a] - z[b]))
    # order margin: smallest gap between two selected slots that are not both null copies
    order_margin = math.inf
    for i in range(K):
        for j in range(i + 1, K):
            if ident(sel[i]) != ident(sel[j]):
                order_margin = min(order_margin, float(z[sel[i]] - z[sel[j]]))
    lse = torch.logsumexp(zt, dim=0)
    p = torch.exp(zt - lse)
    return sel, margin, order_margin, p, lse


def moe_layer(y, W, pre, cfg, rec):
    """y: [T, D] normalised input; rec: dict of per-layer routing lists to append to."""
    m = cfg["moe"]
    N, M, K, Hs, kind = m["num_experts"], m["null_copies"], m["top_k"], m["shared_expert_hidden"], m["null_kind"]
    T = y.shape[0]
    z = y @ W[pre + "moe.router.weight"].T                            # [T, N+1]
    zt = torch.cat([z[:, :N], z[:, N:N + 1].expand(T, M)], dim=1)     # [T, N+M]
    out = torch.zeros_like(y)
    G, U, Dn = W[pre + "moe.experts.gate_proj"], W[pre + "moe.experts.up_proj"], W[pre + "moe.experts.down_proj"]
    for t in range(T):
        sel, margin, omargin, p, lse = route_token(zt[t], N, K)
        real = [int(s) for s in sel if s < N]
        if kind == "zero":
            g_sel = torch.zeros(K, dtype=F64)
            if real:
                gr = torch.softmax(zt[t][torch.tensor(real)], dim=0)
                ri = 0
                for i, s in enumerate(sel):
                    if s < N:
                        g_sel[i] = gr[ri]
                        ri += 1
        else:  # copy: softmax over all K selected expanded logits
            g_sel = torch.softmax(zt[t][torch.tensor(sel.astype(np.int64))], dim=0)
        for i, s in enumerate(sel):
            if s < N:
                out[t] += g_sel[i] * ffn(y[t:t + 1], G[s], U[s], Dn[s])[0]
            elif kind == "copy":
                out[t] += g_sel[i] * y[t]
        rec["n_real"].append(len(real))
        rec["slot"].append([int(s) if s < N else -1 for s in sel])
        rec["prob"].append([float(p[s]) for s in sel])
        rec["gate"].append([float(v) for v in g_sel])
        rec["null_mass"].append(float(p[N:].sum()) if M > 0 else 0.0)
        rec["lse"].append(float(lse))
        rec["margin"].append(margin)
        rec["order_margin"].append(omargin)
    if Hs > 0:
        out = out + ffn(y, W[pre + "moe.shared.gate_proj.weight"], W[pre + "moe.shared.up_proj.weight"],
                        W[pre + "moe.shared.down_proj.weight"])
    return out


def forward(W, cfg, ids, patch_idx, pixels):
    """Whole causal sequence.  Returns logits [T, V] (float64) and routing records per layer."""
    L = cfg["num_layers"]
    nh, nkv, hd = cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"]
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    T = len(ids)
    if T > cfg["max_positions"]:
        raise ValueError("sequence longer than max_positions")
    x = embed(W, cfg, ids, patch_idx, pixels)
    pos = torch.arange(T)
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)   # True above the diagonal
    layers = []
    for li in range(L):
        pre = f"layers.{li}."
        xn = rmsnorm(x, W[pre + "attn_norm.weight"], eps)
        q = (xn @ W[pre + "attn.q_proj.weight"].T).view(T, nh, hd)
        k = (xn @ W[pre + "attn.k_proj.weight"].T).view(T, nkv, hd)
        v = (xn @ W[pre + "attn.v_proj.weight"].T).view(T, nkv, hd)
        q, k = rope(q, pos, theta), rope(k, pos, theta)
        heads = []
        for h in range(nh):
            kvh = h // (nh // nkv)
            s = (q[:, h, :] @ k[:, kvh, :].T) / math.sqrt(hd)
            s = s.masked_fill(mask, -math.inf)
            heads.append(torch.softmax(s, dim=-1) @ v[:, kvh, :])
        attn = torch.cat(heads, dim=-1)                                 # [T, nh*hd], head-major
        h_ = x + attn @ W[pre + "attn.o_proj.weight"].T
        rec = {k_: [] for k_ in ("n_real", "slot", "prob", "gate", "null_mass", "lse", "margin", "order_margin")}
        y = rmsnorm(h_, W[pre + "moe_norm.weight"], eps)
        x = h_ + moe_layer(y, W, pre, cfg, rec)
        layers.append(rec)
    head = W["embed_tokens.weight"] if cfg["tie_embeddings"] else W["lm_head.weight"]
    logits = rmsnorm(x, W["norm.weight"], eps) @ head.T
    return logits, layers


def argmax_lowest(v):
    v = v.numpy()
    return int(np.argmax(v))   # numpy returns the first (lowest) index among equal maxima


def top2_gap(v):
    s = np.sort(v.numpy())[::-1]
    return float(s[0] - s[1])


# ----------------------------------------------------------------------------------------------
# Second, structurally different implementation (used by --verify): token-by-token decoding
# with a KV cache, RoPE as explicit 2x2 rotations, MoE in the sorted/grouped form of the
# paper's appendix B (slots sorted by expert, nulls last and cut, per-expert blocks, scatter-add).
# ----------------------------------------------------------------------------------------------
def alt_moe(y, W, pre, cfg):
    m = cfg["moe"]
    N, M, K, Hs, kind = m["num_experts"], m["null_copies"], m["top_k"], m["shared_expert_hidden"], m["null_kind"]
    T = y.shape[0]
    z = y @ W[pre + "moe.router.weight"].T
    zt = torch.cat([z[:, :N], z[:, N:].repeat(1, M)], dim=1)
    top_idx = torch.zeros(T, K, dtype=torch.long)
    for t in range(T):
        ranked = sorted(range(N + M), key=lambda j: (-float(zt[t, j]), j))
        top_idx[t] = torch.tensor(ranked[:K])
    top_z = torch.gather(zt, 1, top_idx)
    is_real = top_idx < N
    if kind == "zero":
        masked = torch.where(is_real, top_z, torch.full_like(top_z, -math.inf))
        mx = masked.max(dim=1, keepdim=True).values
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
        e = torch.exp(masked - mx)
        den = e.sum(dim=1, keepdim=True)
        gates = torch.where(den > 0, e / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(e))
    else:
        e = torch.exp(top_z - top_z.max(dim=1, keepdim=True).values)
        gates = e / e.sum(dim=1, keepdim=True)
    flat = top_idx.flatten()
    order = torch.argsort(flat, stable=True)
    n_real = int((flat < N).sum())
    tok = order // K
    out = torch.zeros_like(y)
    cut, tok_r = order[:n_real], tok[:n_real]
    start = 0
    for ex in range(N):
        cnt = int((flat == ex).sum())
        blk_tok, blk_slot = tok_r[start:start + cnt], cut[start:start + cnt]
        start += cnt
        if cnt == 0:
            continue
        xo = ffn(y[blk_tok], W[pre + "moe.experts.gate_proj"][ex], W[pre + "moe.experts.up_proj"][ex],
                 W[pre + "moe.experts.down_proj"][ex])
        out.index_add_(0, blk_tok, xo * gates.flatten()[blk_slot][:, None])
    if kind == "copy":
        null_g = torch.where(is_real, torch.zeros_like(gates), gates).sum(dim=1, keepdim=True)
        out = out + null_g * y
    if Hs > 0:
        out = out + ffn(y, W[pre + "moe.shared.gate_proj.weight"], W[pre + "moe.shared.up_proj.weight"],
                        W[pre + "moe.shared.down_proj.weight"])
    slots = torch.where(is_real, top_idx, torch.full_like(top_idx, -1))
    p = torch.softmax(zt, dim=1)
    return out, slots, torch.gather(p, 1, top_idx), gates


def alt_forward_incremental(W, cfg, ids, patch_idx, pixels, n_prompt):
    """Prefill of n_prompt tokens, then one token at a time through a KV cache."""
    L, nh, nkv, hd = cfg["num_layers"], cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"]
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    T = len(ids)
    x_all = embed(W, cfg, ids, patch_idx, pixels)
    half = hd // 2

    def rot(vec, posn):   # vec [heads, hd]
        r = vec.clone()
        for i in range(half):
            a = posn * (theta ** (-(2.0 * i) / hd))
            c, s = math.cos(a), math.sin(a)
            r[:, i] = vec[:, i] * c - vec[:, i + half] * s
            r[:, i + half] = vec[:, i] * s + vec[:, i + half] * c
        return r

    kc = [[] for _ in range(L)]
    vc = [[] for _ in range(L)]
    logits, slots, probs, gates = [], [[] for _ in range(L)], [[] for _ in range(L)], [[] for _ in range(L)]
    chunks = [list(range(n_prompt))] + [[t] for t in range(n_prompt, T)]
    for chunk in chunks:
        x = x_all[chunk]
        for li in range(L):
            pre = f"layers.{li}."
            xn = x / torch.sqrt((x ** 2).sum(-1, keepdim=True) / x.shape[1] + eps) * W[pre + "attn_norm.weight"]
            for j, t in enumerate(chunk):
                kc[li].append(rot((W[pre + "attn.k_proj.weight"] @ xn[j]).view(nkv, hd), t))
                vc[li].append((W[pre + "attn.v_proj.weight"] @ xn[j]).view(nkv, hd))
            att = torch.zeros(len(chunk), nh * hd, dtype=F64)
            for j, t in enumerate(chunk):
                q = rot((W[pre + "attn.q_proj.weight"] @ xn[j]).view(nh, hd), t)
                K_ = torch.stack(kc[li][:t + 1])   # causal: positions 0..t
                V_ = torch.stack(vc[li][:t + 1])
                for h in range(nh):
                    g = h // (nh // nkv)
                    sc = (K_[:, g, :] @ q[h]) / math.sqrt(hd)
                    w_ = torch.exp(sc - sc.max())
                    att[j, h * hd:(h + 1) * hd] = (w_ / w_.sum()) @ V_[:, g, :]
            hh = x + att @ W[pre + "attn.o_proj.weight"].T
            y = hh / torch.sqrt((hh ** 2).mean(-1, keepdim=True) + eps) * W[pre + "moe_norm.weight"]
            mo, sl, pr, gt = alt_moe(y, W, pre, cfg)
            slots[li].append(sl)
            probs[li].append(pr)
            gates[li].append(gt)
            x = hh + mo
        head = W["embed_tokens.weight"] if cfg["tie_embeddings"] else W["lm_head.weight"]
        xf = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + eps) * W["norm.weight"]
        logits.append(xf @ head.T)
    cat = lambda xs: torch.stack([torch.cat(v, 0) for v in xs])
    return torch.cat(logits, 0), cat(slots), cat(probs), cat(gates)


# ----------------------------------------------------------------------------------------------
# Case construction
# ----------------------------------------------------------------------------------------------
def prompt_prefix(cfg, prompt, rng):
    tok = cfg["tokenizer"]
    ids, pidx, pixels = [tok["bos"]], [-1], None
    if "vision" in cfg:
        S, p = cfg["vision"]["image_size"], cfg["vision"]["patch_size"]
        g = S // p
        v = rng.integers(0, 256, size=(3, S, S))           # 8-bit pixel values
        pixels = (v / 127.5 - 1.0).astype(np.float32)      # normalised as the C side does
        ids.append(tok["image_start"])
        pidx.append(-1)
        for i in range(g * g):
            ids.append(-1)
            pidx.append(i)
        ids.append(tok["image_end"])
        pidx.append(-1)
    for b in prompt.encode("ascii"):
        ids.append(b)
        pidx.append(-1)
    return ids, pidx, pixels


def model_from_seed(c, seed):
    cfg = make_config(c)
    rng = np.random.default_rng(seed)
    w32 = init_weights(c, cfg, rng)
    raws, W = {}, {}
    for name, shape in tensor_names(cfg):
        raws[name], W[name] = weight_round(w32[name], c["dtype"])
        assert list(W[name].shape) == shape
    ids, pidx, pixels = prompt_prefix(cfg, c["prompt"], rng)
    return cfg, raws, W, ids, pidx, pixels


def run_case(cfg, W, ids, pidx, pixels, n_gen):
    """Greedy generation in float64, then the final forward over the whole sequence."""
    ids, pidx = list(ids), list(pidx)
    n_prompt = len(ids)
    px = torch.from_numpy(pixels.astype(np.float64)) if pixels is not None else None
    for _ in range(n_gen):
        logits, _ = forward(W, cfg, ids, pidx, px)
        nxt = argmax_lowest(logits[-1])
        ids.append(nxt)
        pidx.append(-1)
        if nxt == cfg["tokenizer"]["eos"]:
            break
    logits, layers = forward(W, cfg, ids, pidx, px)
    for t in range(n_prompt, len(ids)):   # the generated tokens are the argmax of the final pass too
        assert ids[t] == argmax_lowest(logits[t - 1]), "greedy token changed between passes"
    greedy_gap = min(top2_gap(logits[t - 1]) for t in range(n_prompt, len(ids)))
    return ids, pidx, n_prompt, logits, layers, greedy_gap


def expected_tensors(cfg, ids, pidx, pixels, n_prompt, logits, layers):
    L, K = cfg["num_layers"], cfg["moe"]["top_k"]
    T = len(ids)
    arr = lambda key, shape: np.array([r[key] for r in layers], dtype=np.float64).reshape(shape)
    t = [("input_ids", "I32", [T], raw_from_numpy(ids, "I32")),
         ("patch_index", "I32", [T], raw_from_numpy(pidx, "I32"))]
    if pixels is not None:
        t.append(("pixels", "F32", list(pixels.shape), raw_from_numpy(pixels, "F32")))
    t += [("n_prompt", "I32", [1], raw_from_numpy([n_prompt], "I32")),
          ("logits", "F32", [T, cfg["vocab_size"]], raw_from_numpy(logits.numpy(), "F32")),
          ("n_real", "I32", [L, T], raw_from_numpy(arr("n_real", (L, T)), "I32")),
          ("slot", "I32", [L, T, K], raw_from_numpy(arr("slot", (L, T, K)), "I32")),
          ("prob", "F32", [L, T, K], raw_from_numpy(arr("prob", (L, T, K)), "F32")),
          ("gate", "F32", [L, T, K], raw_from_numpy(arr("gate", (L, T, K)), "F32")),
          ("null_mass", "F32", [L, T], raw_from_numpy(arr("null_mass", (L, T)), "F32")),
          ("lse", "F32", [L, T], raw_from_numpy(arr("lse", (L, T)), "F32")),
          ("margin", "F32", [L, T], raw_from_numpy(arr("margin", (L, T)), "F32")),
          ("order_margin", "F32", [L, T], raw_from_numpy(arr("order_margin", (L, T)), "F32"))]
    return t


def stats(cfg, layers):
    K = cfg["moe"]["top_k"]
    n_real = np.array([r["n_real"] for r in layers])
    margin = min(min(r["margin"]) for r in layers)
    omargin = min(min(r["order_margin"]) for r in layers)
    return dict(null_share=1.0 - n_real.mean() / K, zero_share=float((n_real == 0).mean()),
                full_share=float((n_real == K).mean()), margin=margin, order_margin=omargin,
                hist=np.bincount(n_real.flatten(), minlength=K + 1).tolist())


def acceptable(c, st, greedy_gap, ids, n_prompt):
    why = []
    if c.get("expect_eos") and (ids[-1] != TOKENIZER["eos"] or len(ids) - n_prompt < 2):
        why.append("generation does not end with EOS after at least one other token")
    if st["margin"] < MIN_MARGIN:
        why.append(f"min margin {st['margin']:.3g}")
    if st["order_margin"] < MIN_MARGIN:
        why.append(f"min order margin {st['order_margin']:.3g}")
    if greedy_gap < MIN_MARGIN:
        why.append(f"greedy top-2 gap {greedy_gap:.3g}")
    if c["M"] > 0 and c["K"] < c["N"] + c["M"]:
        if st["zero_share"] == 0:
            why.append("no token with n_real = 0")
        if st["full_share"] == 0:
            why.append("no token with n_real = K")
        if not 0.15 <= st["null_share"] <= 0.85:
            why.append(f"null share {st['null_share']:.2f} outside [0.15, 0.85]")
    return why


def summary_line(c, T, n_prompt, st, greedy_gap, ids):
    return (f"{c['name']:<20} T={T:<3d} prompt={n_prompt:<3d} L={c['L']} K={c['K']} N={c['N']} M={c['M']} "
            f"null_slots={st['null_share']:.3f} n_real0={st['zero_share']:.3f} n_realK={st['full_share']:.3f} "
            f"hist={st['hist']} min_margin={st['margin']:.4g} min_order_margin={st['order_margin']:.4g} "
            f"greedy_gap={greedy_gap:.4g} gen={ids[n_prompt:]}")


def generate(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    for c in CASES:
        seed = c["seed"]
        for attempt in range(MAX_RESEEDS):
            cfg, raws, W, ids0, pidx0, pixels = model_from_seed(c, seed)
            ids, pidx, n_prompt, logits, layers, greedy_gap = run_case(cfg, W, ids0, pidx0, pixels, c["n_gen"])
            st = stats(cfg, layers)
            why = acceptable(c, st, greedy_gap, ids, n_prompt)
            if not why:
                break
            print(f"{c['name']}: seed {seed} rejected ({'; '.join(why)}), re-seeding with {seed + 1}")
            seed += 1
        else:
            raise SystemExit(f"{c['name']}: no acceptable seed in {MAX_RESEEDS} tries")
        d = os.path.join(out_dir, c["name"])
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
            f.write("\n")
        model = [(name, c["dtype"], shape, raws[name]) for name, shape in tensor_names(cfg)]
        with open(os.path.join(d, "model.safetensors"), "wb") as f:
            f.write(st_bytes(model, {"format": "pt", "generator": GENERATOR, "seed": seed}))
        exp = expected_tensors(cfg, ids, pidx, pixels, n_prompt, logits, layers)
        with open(os.path.join(d, "expected.safetensors"), "wb") as f:
            f.write(st_bytes(exp, {"generator": GENERATOR, "version": VERSION, "case": c["name"]}))
        print(summary_line(c, len(ids), n_prompt, st, greedy_gap, ids))


# ----------------------------------------------------------------------------------------------
# --verify
# ----------------------------------------------------------------------------------------------
CONFIG_KEYS = {"model_type", "format_version", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
               "head_dim", "vocab_size", "max_positions", "rope_theta", "rms_norm_eps", "tie_embeddings",
               "moe", "tokenizer"}


def verify(out_dir):
    ok = True
    for c in CASES:
        try:
            ok &= verify_case(out_dir, c)
        except (AssertionError, ValueError, OSError, KeyError) as e:
            print(f"{c['name']:<20} BAD {type(e).__name__}: {e}")
            ok = False
    if not ok:
        raise SystemExit("verify FAILED")
    print("verify: all cases ok")


def verify_case(out_dir, c):
    d = os.path.join(out_dir, c["name"])
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    keys = CONFIG_KEYS | ({"vision"} if c["vision"] else set())
    assert set(cfg) == keys, f"{c['name']}: config keys {sorted(set(cfg) ^ keys)}"
    assert cfg == make_config(c), f"{c['name']}: config.json differs from the case"
    assert set(cfg["moe"]) == {"num_experts", "null_copies", "top_k", "expert_hidden",
                               "shared_expert_hidden", "null_kind"}
    mblob = open(os.path.join(d, "model.safetensors"), "rb").read()
    model, mmeta = st_parse(mblob, d + "/model.safetensors")
    want = tensor_names(cfg)
    assert [(n, s) for n, _, s, _ in model] == [(n, s) for n, s in want], f"{c['name']}: tensor list"
    assert all(dt == c["dtype"] for _, dt, _, _ in model)
    # round trip: re-serialising the parsed tensors gives the file byte for byte
    assert st_bytes(model, mmeta) == mblob, f"{c['name']}: model.safetensors does not round-trip"
    W = {n: raw_to_float64(raw, dt, s) for n, dt, s, raw in model}
    # the stored weights are the seeded init rounded to the case's dtype
    _, raws_again, _, _, _, _ = model_from_seed(c, int(mmeta["seed"]))
    assert all(raws_again[n] == raw for n, _, _, raw in model), f"{c['name']}: weights not reproducible"

    eblob = open(os.path.join(d, "expected.safetensors"), "rb").read()
    exp, emeta = st_parse(eblob, d + "/expected.safetensors")
    assert emeta == {"generator": GENERATOR, "version": VERSION, "case": c["name"]}, emeta
    E = {n: (dt, s, raw) for n, dt, s, raw in exp}
    get = lambda n: raw_to_float64(E[n][2], E[n][0], E[n][1])
    ids = [int(v) for v in get("input_ids")]
    pidx = [int(v) for v in get("patch_index")]
    n_prompt = int(get("n_prompt")[0])
    pixels = None
    if "pixels" in E:
        pixels = np.frombuffer(E["pixels"][2], dtype="<f4").reshape(E["pixels"][1])
        v = (pixels.astype(np.float64) + 1.0) * 127.5   # the pixels are exact v/127.5 - 1 values
        assert np.abs(v - np.round(v)).max() < 1e-4
    # 1) regenerate from the parsed model and prompt: identical file, byte for byte
    ids2, pidx2, n_prompt2, logits, layers, greedy_gap = run_case(cfg, W, ids[:n_prompt], pidx[:n_prompt],
                                                                    pixels, c["n_gen"])
    assert (ids2, pidx2, n_prompt2) == (ids, pidx, n_prompt), f"{c['name']}: sequence differs"
    again = st_bytes(expected_tensors(cfg, ids2, pidx2, pixels, n_prompt2, logits, layers), emeta)
    round_trip = again == eblob
    # 2) a structurally different implementation (KV-cache decoding, grouped MoE) agrees with
    #    the float64 reference
    px = torch.from_numpy(pixels.astype(np.float64)) if pixels is not None else None
    lg, sl, pr, gt = alt_forward_incremental(W, cfg, ids, pidx, px, n_prompt)
    L, T, K = cfg["num_layers"], len(ids), cfg["moe"]["top_k"]
    ref = lambda key: torch.tensor([r[key] for r in layers], dtype=F64).reshape(L, T, -1)
    rel = ((lg - logits).abs().max() / logits.abs().max()).item()
    slot_ok = torch.equal(sl, ref("slot").long())
    dprob = (pr - ref("prob")).abs().max().item()
    dgate = (gt - ref("gate")).abs().max().item()
    # 3) invariants of the stored routing
    slot, prob, gate, n_real = get("slot"), get("prob"), get("gate"), get("n_real")
    null_mass, margin = get("null_mass"), get("margin")
    N, M = cfg["moe"]["num_experts"], cfg["moe"]["null_copies"]
    inv = bool(torch.equal((slot >= 0).sum(-1), n_real)) and bool((margin >= 0).all())
    inv &= bool((prob[..., :-1] >= prob[..., 1:]).all())            # descending p
    gsum = gate.sum(-1)
    if cfg["moe"]["null_kind"] == "zero":
        inv &= bool((gate[slot < 0] == 0).all())
        inv &= bool(((gsum - 1).abs()[n_real > 0] < 1e-6).all()) and bool((gsum[n_real == 0] == 0).all())
    else:
        inv &= bool(((gsum - 1).abs() < 1e-6).all())
    if M > 0:
        nm = null_mass[..., None].expand_as(prob)[slot < 0]
        inv &= bool(((prob[slot < 0] * M - nm).abs() <= 1e-6 * nm.clamp(min=1e-30) + 1e-37).all())
    else:
        inv &= bool((null_mass == 0).all())
    if K == N + M:
        inv &= bool(torch.isinf(margin).all())
    good = round_trip and rel < 1e-12 and slot_ok and dprob < 1e-12 and dgate < 1e-12 and inv
    print(f"{c['name']:<20} {'ok ' if good else 'BAD'} bytes round-trip={round_trip} invariants={inv} "
          f"alt vs ref: logits rel {rel:.1e}, slots equal {slot_ok}, prob {dprob:.1e}, gate {dgate:.1e}")
    return good


def generator_main(doc, out_help, verify_help, generate, verify):
    """The command line every fixture generator shares: --out DIR writes, --verify DIR re-reads
    and checks (one of the two); torch on one thread, so the bytes do not depend on the machine."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", help=out_help)
    g.add_argument("--verify", help=verify_help)
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.out:
        generate(a.out)
    else:
        verify(a.verify)


def main():
    generator_main(__doc__, "write the fixtures under DIR/<case>/", "re-read DIR/<case>/ and check it", generate, verify)


if __name__ == "__main__":
    main()
