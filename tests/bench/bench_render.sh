#!/usr/bin/env bash
# Rendering cost against forward cost, on a batch of 500 samples (issue bar: under a second of
# rendering per sample; report the ratio of render time to forward time). Wall-clock times of
# whole commands, measured in this one run on this machine.
#   forward  = `nullmap batch` over the 500 pairs (model load, forward passes, trace writing)
#   report   = `nullmap report` over the whole trace (reads all 500 samples; md/json/csv + charts)
#   overlays = `nullmap render --sample i` for OVERLAY_SAMPLES samples (5 PNGs each for the
#              4-layer model: one per layer and the mean), less the time of its charts, which
#              are measured once on their own
set -euo pipefail
NULLMAP=${NULLMAP:-build/nullmap}
N=${BENCH_RENDER_SAMPLES:-500}
OVERLAY_SAMPLES=${BENCH_OVERLAY_SAMPLES:-20}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
now() { date +%s.%N; }

"$NULLMAP" init --config samples/configs/random-k8.json --seed 3 --out "$work/model" >/dev/null
imgs=(shapes.png document.png chart.png blank.png photo.jpg)
prompts=("What colour is the circle?" "What is written here?" "Which bar is tallest?" "Is there anything here?" "Describe the picture.")
for ((i = 0; i < N; i++)); do
    printf '%s\t%s\n' "$PWD/samples/images/${imgs[i % 5]}" "${prompts[(i / 5) % 5]} (#$i)"
done > "$work/pairs.tsv"

t0=$(now)
"$NULLMAP" batch --model "$work/model" --pairs "$work/pairs.tsv" --out "$work/trace.h5" --max-new-tokens 4 >/dev/null 2>&1
t1=$(now)
"$NULLMAP" report "$work/trace.h5" --out "$work/report" >/dev/null
t2=$(now)
for ((i = 0; i < OVERLAY_SAMPLES; i++)); do
    "$NULLMAP" render "$work/trace.h5" --sample $((i * N / OVERLAY_SAMPLES)) --out "$work/render_$i" >/dev/null 2>&1
done
t3=$(now)
# one render of the charts alone, to take them out of the per-sample overlay time
"$NULLMAP" render "$work/trace.h5" --no-overlays --out "$work/charts_only" >/dev/null 2>&1
t4=$(now)

awk -v n="$N" -v ov="$OVERLAY_SAMPLES" -v t0="$t0" -v t1="$t1" -v t2="$t2" -v t3="$t3" -v t4="$t4" 'BEGIN {
    fwd = (t1 - t0) / n; rep = (t2 - t1) / n; charts = t4 - t3;
    ovl = ((t3 - t2) - ov * charts) / ov; if (ovl < 0) ovl = (t3 - t2) / ov;
    per = rep + ovl;
    printf "\nrendering vs forward, %d samples (4-layer sample-model shape, image + prompt, 4 new tokens)\n", n;
    printf "  forward (nullmap batch)               %8.1f ms per sample  (%.1f s in all)\n", 1000 * fwd, t1 - t0;
    printf "  report over the whole trace           %8.1f ms per sample  (%.2f s for %d samples, md/json/csv + charts)\n", 1000 * rep, t2 - t1, n;
    printf "  overlays (5 PNGs: 4 layers + mean)    %8.1f ms per sample  (measured on %d samples)\n", 1000 * ovl, ov;
    printf "  rendering per sample                  %8.1f ms             bar: < 1000 ms  %s\n", 1000 * per, per < 1 ? "PASS" : "FAIL";
    printf "  ratio render / forward                %8.2f\n", per / fwd;
}'
