#!/bin/sh
# run_sweep.sh — the small-scale reproduction of the paper (README "Training and the shipped
# model"): trains every config of samples/configs/sweep/ on one data set with the same steps and
# seeds, evaluates each on the held-out split, traces a fixed set of eval images through each, and
# writes the comparison (tables + nullmap's own charts) to OUT/.
#
#   samples/run_sweep.sh DATA OUT [STEPS]
#
# DATA: a `nullmap data` set (e.g. --train 20000 --eval 1000 --seed 1). STEPS overrides the
# configs' train.steps. Long: about 6 minutes per config on one core at 1000 steps.
set -eu
DATA=${1:?usage: run_sweep.sh DATA OUT [STEPS]}
OUT=${2:?usage: run_sweep.sh DATA OUT [STEPS]}
STEPS=${3:-}
NULLMAP=${NULLMAP:-build/nullmap}
EVAL_N=${EVAL_N:-500}
mkdir -p "$OUT"
# the same 100 eval samples (image + prompt) traced through every model
python3 - "$DATA" "$OUT/pairs.tsv" <<'PY'
import json, os, sys
data, out = sys.argv[1], sys.argv[2]
rows = [json.loads(l) for l in open(os.path.join(data, "eval.jsonl"))]
with open(out, "w") as f:
    for r in [r for r in rows if r["image"]][:100]:
        p = r["prompt"].replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
        f.write(os.path.abspath(os.path.join(data, r["image"])) + "\t" + p + "\n")
PY
for cfg in samples/configs/sweep/*.json; do
    name=$(basename "$cfg" .json)
    run="$OUT/$name"
    if [ ! -f "$run/final/model.safetensors" ]; then
        if [ -d "$run" ]; then resume=--resume; else resume=; fi
        echo "== training $name"
        $NULLMAP train --config "$cfg" --data "$DATA" --out "$run" $resume ${STEPS:+--steps "$STEPS"}
    fi
    echo "== evaluating $name"
    $NULLMAP eval --model "$run/final" --data "$DATA" --split eval --limit "$EVAL_N" --json "$run/eval.json" --force \
        > "$run/eval.txt"
    $NULLMAP batch --model "$run/final" --pairs "$OUT/pairs.tsv" --out "$run/trace.h5" --force --max-new-tokens 0
done
$NULLMAP report $(for c in samples/configs/sweep/*.json; do echo "$OUT/$(basename "$c" .json)/trace.h5"; done) \
    --out "$OUT/report" --force
python3 samples/sweep_table.py "$OUT" > "$OUT/sweep.md"
echo "wrote $OUT/sweep.md and $OUT/report/"
