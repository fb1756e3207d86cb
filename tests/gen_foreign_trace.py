#!/usr/bin/python3
"""gen_foreign_trace.py -- writes tests/fixtures/foreign_trace.h5, a trace written the way another
program would write one (for example a PyTorch training run saving its router decisions with h5py),
following only the schema documented in README.md ("Trace file format"), without any nullmap code.

    /usr/bin/python3 tests/gen_foreign_trace.py [--out tests/fixtures/foreign_trace.h5]

Needs h5py and numpy (Debian: python3-h5py, python3-numpy). CI does not have them, so the output
is committed; rerun this only to change the fixture, then update tests/test_report.c.

What makes it "foreign" (each differs from nullmap's own writer, all allowed by the schema):
- h5py defaults everywhere: integer arrays and attributes are int64, floats float64, string
  attributes variable-length UTF-8; datasets contiguous (one gzip-compressed, as a training script
  might ask for), no `description` attributes;
- only the required root attributes plus a few optional ones (no hidden_size, vocab_size, ...);
- no tokens/text; samples named "sample_0000", "sample_0001", ... (they sort by name);
- sample attributes partly missing (sample_0002 has no image_path, no answer).

The routing is hand-chosen so that every metric can be computed by hand (see the tables below and
tests/test_report.c): L = 2 layers, K = 4, N = 4 real experts, M = 4 null copies (rho = 0.5).
"""
import argparse
import os

import h5py
import numpy as np

L, K, N, M = 2, 4, 4, 4
TEXT, VISION, SPECIAL = 0, 1, 2
BOS_SEG, IMAGE_SEG, PROMPT_SEG, ANSWER_SEG = 0, 1, 2, 3
BOS, EOS, IMG_START, IMG_END = 256, 257, 258, 259

# One row per token: (id, modality, segment, patch row, patch col, n_real layer 0, n_real layer 1)
SAMPLES = [
    dict(  # image (a 1x2 patch grid), prompt "hi", answer "o" + EOS
        attrs=dict(image_path="images/two_patches.png", prompt="hi", answer="o",
                   image_width=32, image_height=16, grid_rows=1, grid_cols=2, n_prompt_tokens=7),
        tokens=[
            (BOS, SPECIAL, BOS_SEG, -1, -1, 4, 4),
            (IMG_START, SPECIAL, IMAGE_SEG, -1, -1, 0, 1),
            (-1, VISION, IMAGE_SEG, 0, 0, 0, 0),
            (-1, VISION, IMAGE_SEG, 0, 1, 1, 0),
            (IMG_END, SPECIAL, IMAGE_SEG, -1, -1, 2, 2),
            (ord("h"), TEXT, PROMPT_SEG, -1, -1, 3, 4),
            (ord("i"), TEXT, PROMPT_SEG, -1, -1, 4, 4),
            (ord("o"), TEXT, ANSWER_SEG, -1, -1, 2, 3),
            (EOS, SPECIAL, ANSWER_SEG, -1, -1, 0, 1),
        ]),
    dict(  # text only: prompt "ab", answer "c" (no vision tokens)
        attrs=dict(image_path="", prompt="ab | *c*", answer="c", n_prompt_tokens=3),
        tokens=[
            (BOS, SPECIAL, BOS_SEG, -1, -1, 4, 3),
            (ord("a"), TEXT, PROMPT_SEG, -1, -1, 2, 2),
            (ord("b"), TEXT, PROMPT_SEG, -1, -1, 1, 0),
            (ord("c"), TEXT, ANSWER_SEG, -1, -1, 0, 0),
        ]),
    dict(  # text only, every slot null: its compute distribution is undefined
        attrs=dict(prompt="x", n_prompt_tokens=2),
        tokens=[
            (BOS, SPECIAL, BOS_SEG, -1, -1, 0, 0),
            (ord("x"), TEXT, PROMPT_SEG, -1, -1, 0, 0),
        ]),
]


def routing(n_real, rng):
    """slot/prob/gate/null_mass/lse for an [L, T] n_real table, consistent with the schema:
    n_real real experts (distinct ids) and K - n_real null copies, in descending probability."""
    Lr, T = n_real.shape
    slot = np.full((Lr, T, K), -1, dtype=np.int64)
    prob = np.zeros((Lr, T, K))
    gate = np.zeros((Lr, T, K))
    null_mass = np.zeros((Lr, T))
    lse = np.zeros((Lr, T))
    for l in range(Lr):
        for t in range(T):
            r = int(n_real[l, t])
            logits = rng.normal(size=N + 1)
            # force exactly r real experts into the top K: real logits above/below the null one
            order = rng.permutation(N)
            logits[N] = 0.0
            for j, e in enumerate(order):
                logits[e] = 1.0 + rng.random() if j < r else -1.0 - rng.random()
            z = np.concatenate([logits[:N], np.full(M, logits[N])])
            p = np.exp(z - z.max())
            p /= p.sum()
            top = sorted(range(N + M), key=lambda i: (-z[i], i))[:K]
            assert sum(i < N for i in top) == r
            real = [i for i in top if i < N]
            g = np.exp(z[real] - z[real].max()) if real else np.zeros(0)
            g = g / g.sum() if real else g
            for k, i in enumerate(top):
                slot[l, t, k] = i if i < N else -1
                prob[l, t, k] = p[i]
                gate[l, t, k] = g[real.index(i)] if i < N else 0.0
            null_mass[l, t] = p[N:].sum()
            lse[l, t] = z.max() + np.log(np.exp(z - z.max()).sum())
    return slot, prob, gate, null_mass, lse


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "fixtures", "foreign_trace.h5"))
    args = ap.parse_args()
    rng = np.random.default_rng(20260115)
    tmp = args.out + ".tmp"
    with h5py.File(tmp, "w") as f:
        f.attrs["format"] = "nullmap-trace"
        f.attrs["format_version"] = 1
        f.attrs["created_by"] = "gen_foreign_trace.py (h5py %s)" % h5py.__version__
        f.attrs["model"] = "toy-router-run-17"
        f.attrs["num_layers"] = L
        f.attrs["top_k"] = K
        f.attrs["num_experts"] = N
        f.attrs["null_copies"] = M
        f.attrs["rho"] = N / (N + M)
        f.attrs["null_kind"] = "zero"
        for i, smp in enumerate(SAMPLES):
            toks = np.array(smp["tokens"], dtype=np.int64)
            T = len(toks)
            g = f.create_group("samples/sample_%04d" % i)
            for k, v in smp["attrs"].items():
                g.attrs[k] = v
            g.attrs["n_tokens"] = T
            g["tokens/id"] = toks[:, 0]
            g["tokens/modality"] = toks[:, 1]
            g["tokens/segment"] = toks[:, 2]
            g["tokens/patch"] = toks[:, 3:5]
            n_real = toks[:, 5:7].T.copy()  # [L, T]
            slot, prob, gate, null_mass, lse = routing(n_real, rng)
            g["routing/n_real"] = n_real
            g.create_dataset("routing/slot", data=slot, compression="gzip")
            g["routing/prob"] = prob
            g["routing/gate"] = gate
            g["routing/null_mass"] = null_mass
            g["routing/lse"] = lse
    os.replace(tmp, args.out)
    print("wrote %s (%d bytes)" % (args.out, os.path.getsize(args.out)))


if __name__ == "__main__":
    main()
