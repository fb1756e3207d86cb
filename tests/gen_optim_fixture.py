#!/usr/bin/env python3
"""gen_optim_fixture.py -- torch.optim.AdamW + clip_grad_norm_ reference for nm_optim.

Writes tests/fixtures/adamw_torch/expected.safetensors, which tests/test_optim.c replays with
nm_grad_norm, nm_clip_scale, nm_wsd_lr and nm_adamw_update.

    /usr/bin/python3 tests/gen_optim_fixture.py --out tests/fixtures/adamw_torch

What it does (float32 parameters, as the trainer trains):
  two tensors, as the trainer's two parameter groups:
    "w"           [16, 20]  weight_decay 0.1   (a matrix: decays)
    "norm.weight" [24]      weight_decay 0     (a norm weight: no decay)
  torch.optim.AdamW(lr per step, betas (0.9, 0.95), eps 1e-8, foreach=False), 5 steps. Before
  each step: the given gradients, then torch.nn.utils.clip_grad_norm_(max_norm = 1.0) over both
  tensors. The gradient scale differs per step so that clipping is active at every step but
  step 1, where the norm is below 1 and the factor is 1.
  The learning rate of each step is the WSD schedule (warmup 2, total 5, decay_frac 0.4,
  final_lr_frac 0.1, peak 0.01), written out here independently of the C code:
    step 0: 0.005 (warmup 1/2)   1: 0.01   2: 0.01   3: 0.0055 (decay 1/2)   4: 0.001 (final)

Tensors (F32 unless noted):
  lr              F64 [5]      learning rate of each step
  grad_norm       F64 [5]      torch's total norm before clipping (float32 arithmetic, widened)
  clip_coef       F64 [5]      the factor the gradients were multiplied by (clamped to 1)
  <name>.init     [shape]      parameters before step 0
  <name>.grad     [5, shape]   gradients given at each step (before clipping)
  <name>.after    [5, shape]   parameters after each step
  <name>.exp_avg, <name>.exp_avg_sq  [shape]   optimizer state after the last step

No safetensors package is needed: the writer of tests/gen_fixtures.py is reused.
Deterministic: numpy PCG64 with a fixed seed.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_fixtures import np, torch, st_bytes, st_parse, raw_from_numpy  # noqa: E402

GENERATOR = "tests/gen_optim_fixture.py"
VERSION = "1"
SEED = 20260501
STEPS = 5
PEAK_LR, WARMUP, TOTAL, DECAY_FRAC, FINAL_FRAC = 0.01, 2, 5, 0.4, 0.1
BETAS, EPS, WD, MAX_NORM = (0.9, 0.95), 1e-8, 0.1, 1.0
GRAD_STD = [1.0, 0.02, 3.0, 0.5, 1.0]   # step 1: norm ~0.37 < MAX_NORM, no clipping
TENSORS = [("w", (16, 20), WD), ("norm.weight", (24,), 0.0)]


def wsd_lr(step):
    """Warmup (step+1)/W, then stable, then the last round(DECAY_FRAC*TOTAL) steps decay
    linearly so that the last step trains at FINAL_FRAC * peak."""
    n_decay = int(round(DECAY_FRAC * TOTAL))
    start = TOTAL - n_decay
    f = 1.0
    if step < WARMUP:
        f = min(f, (step + 1) / WARMUP)
    if step >= start:
        f = min(f, 1.0 - (1.0 - FINAL_FRAC) * (min(step, TOTAL - 1) - start + 1) / n_decay)
    return PEAK_LR * f


def generate(out_dir):
    rng = np.random.Generator(np.random.PCG64(SEED))
    params, grads = [], {}
    for name, shape, _ in TENSORS:
        params.append(torch.nn.Parameter(torch.from_numpy(rng.standard_normal(shape).astype(np.float32))))
    init = {name: p.detach().numpy().copy() for (name, _, _), p in zip(TENSORS, params)}
    for name, shape, _ in TENSORS:
        grads[name] = np.stack([(GRAD_STD[s] * rng.standard_normal(shape)).astype(np.float32) for s in range(STEPS)])
    groups = [{"params": [p], "weight_decay": wd} for p, (_, _, wd) in zip(params, TENSORS)]
    opt = torch.optim.AdamW(groups, lr=PEAK_LR, betas=BETAS, eps=EPS, amsgrad=False, foreach=False)
    lrs, norms, coefs = [], [], []
    after = {name: [] for name, _, _ in TENSORS}
    for s in range(STEPS):
        lr = wsd_lr(s)
        for g in opt.param_groups:
            g["lr"] = lr
        for (name, _, _), p in zip(TENSORS, params):
            p.grad = torch.from_numpy(grads[name][s].copy())
        total = torch.nn.utils.clip_grad_norm_(params, max_norm=MAX_NORM)
        coef = min(1.0, float(torch.tensor(MAX_NORM, dtype=torch.float32) / (total + 1e-6)))
        opt.step()
        lrs.append(lr)
        norms.append(float(total))
        coefs.append(coef)
        for (name, _, _), p in zip(TENSORS, params):
            after[name].append(p.detach().numpy().copy())
    assert coefs[1] == 1.0 and all(c < 1.0 for i, c in enumerate(coefs) if i != 1), coefs

    out = [("lr", "F64", [STEPS], raw_from_numpy(lrs, "F64")),
           ("grad_norm", "F64", [STEPS], raw_from_numpy(norms, "F64")),
           ("clip_coef", "F64", [STEPS], raw_from_numpy(coefs, "F64"))]
    for (name, shape, _), p in zip(TENSORS, params):
        st = opt.state[p]
        out += [(name + ".init", "F32", list(shape), raw_from_numpy(init[name], "F32")),
                (name + ".grad", "F32", [STEPS] + list(shape), raw_from_numpy(grads[name], "F32")),
                (name + ".after", "F32", [STEPS] + list(shape), raw_from_numpy(np.stack(after[name]), "F32")),
                (name + ".exp_avg", "F32", list(shape), raw_from_numpy(st["exp_avg"].numpy(), "F32")),
                (name + ".exp_avg_sq", "F32", list(shape), raw_from_numpy(st["exp_avg_sq"].numpy(), "F32"))]
    meta = {"generator": GENERATOR, "version": VERSION, "torch": torch.__version__, "seed": SEED,
            "lr_peak": PEAK_LR, "warmup_steps": WARMUP, "total_steps": TOTAL, "decay_frac": DECAY_FRAC,
            "final_lr_frac": FINAL_FRAC, "beta1": BETAS[0], "beta2": BETAS[1], "eps": EPS,
            "weight_decay": WD, "grad_clip": MAX_NORM}
    blob = st_bytes(out, meta)
    st_parse(blob, "adamw fixture")  # layout self-check
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "expected.safetensors")
    with open(path, "wb") as f:
        f.write(blob)
    print(f"{path}: {len(blob)} bytes; lr {lrs}; grad_norm {['%.4g' % n for n in norms]}; "
          f"clip {['%.4g' % c for c in coefs]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "adamw_torch"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    generate(a.out)


if __name__ == "__main__":
    main()
