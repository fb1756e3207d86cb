#!/usr/bin/env python3
"""count_breakdown.py EVAL_JSON DATA [SPLIT] — counting accuracy per question form (stdlib only).

`nullmap eval` reports one "count" row; the data set's records say what was counted ("target":
{"kind": …}, {"colour": …} or {} for all shapes). This joins `nullmap eval --json` with
DATA/SPLIT.jsonl (default eval) and DATA/train.jsonl and prints, per form, the questions, the
accuracy and the majority baseline (the form's most frequent train answer, as nullmap eval defines
it), as a Markdown table."""
import collections, json, os, sys

if len(sys.argv) < 3 or sys.argv[1] in ("-h", "--help"):
    print(__doc__)
    sys.exit(0 if len(sys.argv) > 1 else 2)
ev = json.load(open(sys.argv[1]))
data, split = sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "eval"


def form(rec):
    t = rec.get("target") or {}
    return "by kind" if "kind" in t else "by colour" if "colour" in t else "all shapes"


def records(name):
    with open(os.path.join(data, name + ".jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


held = {r["id"]: r for r in records(split) if r["task"] == "count"}
train = collections.defaultdict(collections.Counter)
for r in records("train"):
    if r["task"] == "count":
        train[form(r)][r["answer"]] += 1
# ties go to the smallest answer, as in nullmap eval
majority = {f: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for f, c in train.items()}
rows = collections.defaultdict(lambda: [0, 0, 0])  # n, correct, majority hits
for r in ev["records"]:
    if r["task"] != "count" or r["id"] not in held:
        continue
    f = form(held[r["id"]])
    rows[f][0] += 1
    rows[f][1] += bool(r["correct"])
    rows[f][2] += r["answer"] == majority.get(f)
print("| counting question | n | accuracy | majority baseline |")
print("| --- | --- | --- | --- |")
for f in ("all shapes", "by kind", "by colour"):
    n, c, m = rows[f]
    if n:
        print(f"| {f} | {n} | {c / n:.3f} | {m / n:.3f} |")
