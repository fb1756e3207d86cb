#!/usr/bin/env bash
# valgrind_run.sh NULLMAP — runs nullmap under valgrind memcheck and fails on any memory error
# or any definite/indirect leak (make valgrind).
#
# Covers the whole life of a run: init a small vision model, `run` with an image and
# --max-new-tokens 4, `run --append` text-only, `batch` (stopped by a bad pair, resumed),
# `info` on the model and on the trace, `report`, failing runs (a corrupt image, a bad model)
# whose error paths must free everything too, and
# training (data, a stopped and a resumed run, a refused start) and eval.
# OMP_NUM_THREADS=1 and OMP_WAIT_POLICY=PASSIVE keep the OpenMP/OpenBLAS pools small and quiet.
# Suppressions: tests/valgrind.supp, for third-party one-time allocations only (see the file).
set -euo pipefail

NULLMAP=${1:-build/nullmap}
case "$NULLMAP" in /*) ;; *) NULLMAP="$PWD/$NULLMAP" ;; esac
SRC=$(cd "$(dirname "$0")/.." && pwd)
[ -x "$NULLMAP" ] || { echo "valgrind_run: $NULLMAP is not an executable (run make first)" >&2; exit 1; }
command -v valgrind >/dev/null 2>&1 ||
    { echo "valgrind_run: valgrind not found (tools/install-deps.sh installs it)" >&2; exit 1; }

T=$(mktemp -d "${TMPDIR:-/tmp}/nmvg-XXXXXX")
trap 'rm -rf "$T"' EXIT
cd "$T"
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE

VG=(valgrind --tool=memcheck --leak-check=full --errors-for-leak-kinds=definite,indirect
    --show-leak-kinds=definite,indirect --error-exitcode=99 --track-origins=yes
    --suppressions="$SRC/tests/valgrind.supp" --num-callers=30)
n=0

# vg WANT_EXIT NAME ARGS...: runs nullmap ARGS under valgrind; the exit code must be WANT_EXIT
# (99 = valgrind found an error or a leak) and the log must report no errors.
vg() {
    local want=$1 name=$2
    shift 2
    n=$((n + 1))
    local log="$T/vg-$n-$name.log" rc=0
    "${VG[@]}" --log-file="$log" "$NULLMAP" "$@" >"$T/out-$n.txt" 2>"$T/err-$n.txt" || rc=$?
    if [ "$rc" -ne "$want" ] || ! grep -q "ERROR SUMMARY: 0 errors" "$log"; then
        echo "FAIL: valgrind $name: exit $rc (expected $want): nullmap $*" >&2
        echo "--- stderr:" >&2
        tail -n 20 "$T/err-$n.txt" >&2
        echo "--- valgrind log ($log):" >&2
        grep -v '^==[0-9]*== *$' "$log" | tail -n 120 >&2
        exit 1
    fi
    local leaks
    leaks=$(grep -E "definitely lost:|indirectly lost:" "$log" | tr -s ' ' | sed 's/^==[0-9]*== //' | paste -sd';' -)
    echo "ok $n - valgrind $name (exit $rc; ${leaks:-no leaks: all heap blocks freed})"
}

cat >config.json <<'EOF'
{ "model_type": "nullmap-moe", "format_version": 1,
  "hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16,
  "vocab_size": 261, "max_positions": 256, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
  "tie_embeddings": false,
  "moe": { "num_experts": 4, "null_copies": 4, "top_k": 2, "expert_hidden": 16,
           "shared_expert_hidden": 8, "null_kind": "zero" },
  "vision": { "image_size": 16, "patch_size": 4, "channels": 3 },
  "tokenizer": { "type": "byte", "bos": 256, "eos": 257, "image_start": 258, "image_end": 259, "pad": 260 } }
EOF
IMAGE=$SRC/samples/images/shapes.png
JPEG=$SRC/samples/images/photo.jpg
[ -f "$IMAGE" ] || { echo "valgrind_run: $IMAGE is missing" >&2; exit 1; }

vg 0 init init --config config.json --out model --seed 3
vg 0 run-image run --model model --image "$IMAGE" --prompt "What colour is the circle?" --max-new-tokens 4 --out out
vg 0 run-text-append run --model model --prompt "text only" --max-new-tokens 2 --out out --append
if [ -f "$JPEG" ]; then
    vg 0 run-jpeg-force run --model model --image "$JPEG" --prompt "jpeg" --max-new-tokens 1 --out out2 --force
fi
printf 'img.png\tfirst\n-\tsecond\n' >pairs.tsv
cp "$IMAGE" img.png
vg 0 batch batch --model model --pairs pairs.tsv --out batch.h5 --max-new-tokens 2
vg 0 info-model info model
vg 0 info-trace info out/trace.h5 --samples

# Error paths: everything allocated before the failure must be freed as well.
printf 'not an image\n' >bad.png
vg 1 run-bad-image run --model model --image bad.png --prompt "x" --max-new-tokens 4 --out out-bad
head -c 2000 "$IMAGE" >cut.png
vg 1 run-truncated-png run --model model --image cut.png --prompt "x" --max-new-tokens 4 --out out-bad
printf 'img.png\tok\nbad.png\tbroken\n' >bad_pairs.tsv
vg 1 batch-bad-image batch --model model --pairs bad_pairs.tsv --out bad.h5 --max-new-tokens 1
vg 0 batch-skip-bad batch --model model --pairs bad_pairs.tsv --out skip.h5 --max-new-tokens 1 --skip-bad --force
# The CUDA registry's failure path (no device, or the backend not built): a clear error, all freed.
if "$NULLMAP" --version | grep -qE "no device:|cuda not built"; then
    vg 1 run-device-cuda-missing run --model model --prompt "x" --max-new-tokens 1 --out out-cuda --device cuda
fi
mkdir -p notrace
printf 'not a trace\n' >notrace/trace.h5
vg 1 run-append-non-hdf5 run --model model --prompt "x" --out notrace --append --max-new-tokens 1
mkdir -p broken
cp model/config.json broken/
head -c 5000 model/model.safetensors >broken/model.safetensors
vg 1 info-bad-model info broken
printf 'not hdf5\n' >not.h5
vg 1 info-not-hdf5 info not.h5
# Corrupt global heaps that crash / hang libhdf5 1.10.8: refused by the pre-open check.
vg 1 info-corrupt-heap info "$SRC/tests/fuzz/crashes/trace/hdf5-H5HG_read-corrupt-global-heap-object-size.h5"
vg 1 info-heap-free-space-0 info "$SRC/tests/fuzz/crashes/trace/hdf5-H5HG-zero-free-space-hang.h5"

# Durable batches: the bad pair above left bad.h5 with its first sample; --resume after the fix
# finishes it; --resume of a finished batch has nothing to do; report reads with one open file.
cp img.png bad.png
vg 0 batch-resume batch --model model --pairs bad_pairs.tsv --out bad.h5 --max-new-tokens 1 --resume --verbose
vg 0 batch-resume-done batch --model model --pairs bad_pairs.tsv --out bad.h5 --max-new-tokens 1 --resume
vg 1 batch-resume-other batch --model model --pairs pairs.tsv --out bad.h5 --max-new-tokens 1 --resume
vg 0 report report bad.h5 batch.h5 --out rep

# Training and evaluation: a tiny data set, a run stopped after step 2, resumed to the end,
# a diverging resume, an eval with its JSON.
vg 0 data data --out dset --train 8 --eval 4 --seed 2 --image-size 16
sed 's/"tokenizer"/"train": { "steps": 3, "batch_size": 3, "checkpoint_every": 2 },\n  "tokenizer"/' config.json >train.json
vg 0 train-stop train --config train.json --data dset --out run --stop-after 2 --quiet
vg 0 train-resume train --config train.json --data dset --out run --resume --quiet
vg 1 train-exists train --config train.json --data dset --out run --quiet
vg 0 eval eval --model run/final --data dset --json ev.json --max-new-tokens 3

echo "valgrind: $n runs, 0 errors, no definite or indirect leaks"
