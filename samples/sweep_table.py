#!/usr/bin/env python3
"""sweep_table.py OUT — the Markdown tables of a run_sweep.sh run (stdlib only).

Per run: the training log's last 50 steps (loss, CE, null slot ratio, zero-compute ratio, vision and
text intensity on training batches), eval.json (held-out accuracy per task, answer loss, background
vs object patch compute, vision vs text intensity) and report/report.json (the 100 traced eval
samples: null slot ratio, zero-compute ratio, polarization index = Var(n_real/K) / (c (1 - c)) with
c = mean n_real/K over (layer, token) pairs: 1 when each pair is all-real or all-null, about 1/K when
slots go to null independently; undefined (n/a) when nothing or everything goes to null)."""
import csv, json, os, sys

out = sys.argv[1]
runs = sorted(d for d in os.listdir(out) if os.path.isfile(os.path.join(out, d, "log.csv")))
report = {}
rp = os.path.join(out, "report", "report.json")
if os.path.exists(rp):
    for t in json.load(open(rp))["traces"]:
        report[os.path.basename(os.path.dirname(t["path"]))] = t


def f(x, d=3):
    return "n/a" if x is None else f"{x:.{d}f}"


print("| run | K | M | ρ | kind | w_bal | final loss | final CE | eval acc | colour | word | count | bar | text |"
      " answer loss |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
rows2 = []
for r in runs:
    cfg = json.load(open(os.path.join(out, r, "final", "config.json"))) if os.path.exists(
        os.path.join(out, r, "final", "config.json")) else None
    tr = json.load(open(os.path.join("samples", "configs", "sweep", r + ".json")))["train"] if os.path.exists(
        os.path.join("samples", "configs", "sweep", r + ".json")) else {}
    log = list(csv.DictReader(open(os.path.join(out, r, "log.csv"))))
    tail = log[-50:]
    def mean(k, tail=tail):  # bound now: the second table calls it after the loop
        return sum(float(x[k]) for x in tail) / len(tail)
    ev = json.load(open(os.path.join(out, r, "eval.json"))) if os.path.exists(os.path.join(out, r, "eval.json")) else None
    moe = cfg["moe"] if cfg else {}
    K, M, N = moe.get("top_k"), moe.get("null_copies"), moe.get("num_experts")
    rho = N / (N + M) if cfg else None
    acc = {t["task"]: t["accuracy"] for t in ev["tasks"]} if ev else {}
    print(f"| {r} | {K} | {M} | {f(rho, 2)} | {moe.get('null_kind', 'zero')} | {tr.get('balance_weight', 0.02)} |"
          f" {f(mean('loss'))} | {f(mean('ce'))} | {f(ev['overall']['accuracy'] if ev else None)} |"
          + "".join(f" {f(acc.get(t))} |" for t in ["colour", "word", "count", "bar", "text"])
          + f" {f(ev['overall']['answer_loss'] if ev else None)} |")
    rows2.append((r, mean, ev, report.get(r), K))

print()
print("| run | null slot ratio (train) | zero-compute (train) | vision / text intensity (train) |"
      " vision / text (eval) | background / object patches (eval) | null slot ratio (traces) |"
      " zero-compute (traces) | polarization index (traces) |")
print("|---|---|---|---|---|---|---|---|---|")
for r, mean, ev, rep, K in rows2:
    vis = ev["modality"]["vision"]["score"] if ev else None
    txt = ev["modality"]["text"]["score"] if ev else None
    bg = ev["patches"]["groups"]["all"]["background"]["score"] if ev else None
    ob = ev["patches"]["groups"]["all"]["object"]["score"] if ev else None
    if rep:
        m = rep["metrics"]
        sh = m["modalities"]["all"]["polarization_share"]
        # polarization index: Var(n_real/K) / (c(1-c)), c = mean n_real/K. 1 when every
        # (layer, token) is all-real or all-null; ~1/K when slots fall independently
        K_ = len(sh) - 1
        c = sum(k / K_ * p for k, p in enumerate(sh))
        var = sum((k / K_ - c) ** 2 * p for k, p in enumerate(sh))
        pol = var / (c * (1 - c)) if 0 < c < 1 else None
        nsr, zcr = m["null_slot_ratio"], m["zero_compute_ratio"]
    else:
        pol = nsr = zcr = None
    print(f"| {r} | {f(mean('null_slot_ratio'))} | {f(mean('zero_compute_ratio'))} |"
          f" {f(mean('vision_intensity'))} / {f(mean('text_intensity'))} | {f(vis)} / {f(txt)} | {f(bg)} / {f(ob)} |"
          f" {f(nsr)} | {f(zcr)} | {f(pol)} |")
