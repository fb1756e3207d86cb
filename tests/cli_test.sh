#!/usr/bin/env bash
# cli_test.sh — end-to-end test of the `nullmap` command line.
#
#   NULLMAP=build/nullmap tests/cli_test.sh
#
# Runs the real binary in a temporary directory: help and version, init (determinism), info,
# run (with and without an image, --append), batch, and checks the trace with h5dump and, where
# h5py is available, with a short Python script. Stops at the first failure; the last line is
# "N passed, 0 failed". Malformed inputs are covered by the bad_inputs Check suite.
set -euo pipefail

NULLMAP=${NULLMAP:-build/nullmap}
case "$NULLMAP" in /*) ;; *) NULLMAP="$PWD/$NULLMAP" ;; esac
[ -x "$NULLMAP" ] || { echo "cli_test: $NULLMAP is not an executable (build it with make)" >&2; exit 1; }
SRC=$(cd "$(dirname "$0")/.." && pwd)
T=$(mktemp -d "${TMPDIR:-/tmp}/nmcli-XXXXXX")
trap 'rm -rf "$T"' EXIT
cd "$T"

passed=0
LAST_OUT="$T/last.out"
LAST_ERR="$T/last.err"

fail() {
    echo "FAIL: $*" >&2
    if [ -s "$LAST_OUT" ]; then echo "--- stdout of the last command:" >&2; tail -n 40 "$LAST_OUT" >&2; fi
    if [ -s "$LAST_ERR" ]; then echo "--- stderr of the last command:" >&2; tail -n 40 "$LAST_ERR" >&2; fi
    echo "$passed passed, 1 failed" >&2
    exit 1
}
ok() {
    passed=$((passed + 1))
    echo "ok $passed - $*"
}
# expect CODE CMD...: runs the command, output to last.out/last.err, checks its exit code.
expect() {
    local want=$1
    shift
    local got=0
    "$@" >"$LAST_OUT" 2>"$LAST_ERR" || got=$?
    [ "$got" -eq "$want" ] || fail "exit code $got, expected $want: $*"
}
# contains FILE TEXT...: every TEXT occurs in FILE.
contains() {
    local f=$1
    shift
    for t in "$@"; do grep -qF -- "$t" "$f" || fail "$(basename "$f") lacks \"$t\""; done
}
# n_samples TRACE: the sample count printed by `nullmap info`.
n_samples() {
    "$NULLMAP" info "$1" >"$LAST_OUT" 2>"$LAST_ERR" || fail "nullmap info $1"
    sed -n 's/^  \([0-9][0-9]*\) samples\{0,1\}$/\1/p' "$LAST_OUT"
}

echo "# cli_test: $NULLMAP in $T"

# ---- help and version ----
expect 0 "$NULLMAP" --help
contains "$LAST_OUT" "usage: nullmap" run batch info init "exit codes"
ok "nullmap --help"
expect 0 "$NULLMAP" --version
grep -qE '^nullmap [0-9]+\.[0-9]+\.[0-9]+' "$LAST_OUT" || fail "--version does not print 'nullmap X.Y.Z'"
ok "nullmap --version: $(head -n 1 "$LAST_OUT")"
expect 2 "$NULLMAP"
contains "$LAST_ERR" "usage: nullmap"
ok "nullmap without a command: usage on stderr, exit 2"

expect 0 "$NULLMAP" run --help
contains "$LAST_OUT" --model --prompt --image --out --max-new-tokens --append --force --quiet
ok "run --help lists its options"
expect 0 "$NULLMAP" batch --help
contains "$LAST_OUT" --model --pairs --out --max-new-tokens --append --force --skip-bad --resume --verbose
ok "batch --help lists its options"
expect 0 "$NULLMAP" info --help
contains "$LAST_OUT" "usage: nullmap info" --samples
ok "info --help lists its options"
expect 0 "$NULLMAP" init --help
contains "$LAST_OUT" --config --out --seed --dtype --force
ok "init --help lists its options"

# ---- init: a small vision model, deterministic in the seed ----
cat >config.json <<'EOF'
{ "model_type": "nullmap-moe", "format_version": 1,
  "hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16,
  "vocab_size": 261, "max_positions": 256, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
  "tie_embeddings": false,
  "moe": { "num_experts": 4, "null_copies": 4, "top_k": 2, "expert_hidden": 16,
           "shared_expert_hidden": 0, "null_kind": "zero" },
  "vision": { "image_size": 16, "patch_size": 4, "channels": 3 },
  "tokenizer": { "type": "byte", "bos": 256, "eos": 257, "image_start": 258, "image_end": 259, "pad": 260 } }
EOF
N=4
expect 0 "$NULLMAP" init --config config.json --out model --seed 7
contains "$LAST_OUT" "parameters"
[ -s model/config.json ] && [ -s model/model.safetensors ] || fail "init did not write config.json and model.safetensors"
ok "init writes a model"
expect 0 "$NULLMAP" init --config config.json --out model_same --seed 7
cmp -s model/model.safetensors model_same/model.safetensors || fail "same seed, different model.safetensors"
cmp -s model/config.json model_same/config.json || fail "same seed, different config.json"
ok "init with the same seed gives identical bytes"
expect 0 "$NULLMAP" init --config config.json --out model_other --seed 8
! cmp -s model/model.safetensors model_other/model.safetensors || fail "seeds 7 and 8 gave the same weights"
ok "init with another seed gives other weights"
cp model/model.safetensors before.safetensors
expect 3 "$NULLMAP" init --config config.json --out model --seed 9
contains "$LAST_ERR" "--force"
cmp -s model/model.safetensors before.safetensors || fail "a refused init changed the model"
ok "init over an existing model without --force is refused (exit 3), model untouched"
expect 0 "$NULLMAP" init --config config.json --out model_bf16 --seed 7 --dtype bf16
expect 0 "$NULLMAP" info model_bf16
contains "$LAST_OUT" BF16
ok "init --dtype bf16 loads back (info says BF16)"

# ---- info on the model ----
expect 0 "$NULLMAP" info model
contains "$LAST_OUT" "model" "N=4" "M=4" "top-K=2" "vision" "parameters"
ok "info MODEL describes it"

# ---- run with an image ----
IMAGE=$SRC/samples/images/shapes.png
if [ ! -f "$IMAGE" ]; then
    # No sample images in this checkout: a 40x30 gradient PNG from the Python standard library.
    IMAGE=$T/gen.png
    python3 - "$IMAGE" <<'EOF' || fail "cannot generate a test PNG"
import struct, sys, zlib
w, h = 40, 30
raw = b"".join(b"\0" + bytes(v for x in range(w) for v in (x * 6, y * 8, 128)) for y in range(h))
def chunk(t, d):
    return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)
png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) \
    + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
open(sys.argv[1], "wb").write(png)
EOF
fi
expect 0 "$NULLMAP" run --model model --image "$IMAGE" --prompt "What colour is the circle?" --max-new-tokens 5 --out out
contains "$LAST_OUT" answer vision text layer mean "trace"
for l in 0 1; do grep -qE "^ +$l +" "$LAST_OUT" || fail "no row for layer $l in the per-layer table"; done
[ -s out/trace.h5 ] || fail "run did not write out/trace.h5"
ls out | grep -q 'tmp' && fail "temporary files left in out/: $(ls out)"
ok "run with an image: answer, vision/text, per-layer table, out/trace.h5"
for f in overlay/layer_00.png overlay/layer_01.png overlay/mean.png report.md report.json report.csv \
         modality.png polarization.png polarization_layers.png zero_vs_null.png layer_strip.png; do
    [ -s "out/$f" ] || fail "run did not write out/$f"
    case $f in *.png) head -c 8 "out/$f" | od -An -tx1 | grep -q "89 50 4e 47" || fail "out/$f is not a PNG";; esac
done
contains out/report.md "## Trace 1" "By modality" "By layer" "By segment" "Polarization"
ok "run draws the overlays (per layer + mean), the charts and report.md/.json/.csv by default"
expect 0 "$NULLMAP" run --model model --image "$IMAGE" --prompt "x" --max-new-tokens 1 --out plain --no-render
[ "$(ls plain)" = trace.h5 ] || fail "--no-render wrote more than the trace: $(ls plain)"
ok "run --no-render writes the trace only"
[ "$(n_samples out/trace.h5)" = 1 ] || fail "info out/trace.h5 does not list 1 sample"
ok "info TRACE lists 1 sample"

expect 0 "$NULLMAP" run --model model --image "$IMAGE" --prompt "Where is the square?" --max-new-tokens 5 --out out --append
[ "$(n_samples out/trace.h5)" = 2 ] || fail "after --append the trace does not hold 2 samples"
ok "run --append: 2 samples"
expect 0 "$NULLMAP" run --model model --prompt "Text only, no image." --max-new-tokens 0 --out out --append
contains "$LAST_OUT" answer
[ "$(n_samples out/trace.h5)" = 3 ] || fail "after a text-only --append the trace does not hold 3 samples"
ok "run text-only with --max-new-tokens 0 --append: 3 samples"
expect 0 "$NULLMAP" run --model model --prompt "quiet please" --max-new-tokens 2 --out out_quiet --quiet
[ -s "$LAST_OUT" ] || fail "--quiet printed nothing"
grep -qE '^(model|prompt|answer|tokens|trace) ' "$LAST_OUT" && fail "--quiet printed more than the answer"
ok "run --quiet prints only the answer"
# ---- compute devices: --device cpu|cuda, --precision; --version lists the backends ----
expect 0 "$NULLMAP" --version
contains "$LAST_OUT" "backends: cpu"
HAVE_GPU=0
if grep -q "cuda (built with CUDA" "$LAST_OUT" && ! grep -q "no device:" "$LAST_OUT"; then HAVE_GPU=1; fi
ok "--version lists the backends: $(sed -n 's/^backends: //p' "$LAST_OUT")"
expect 0 "$NULLMAP" run --model model --image "$IMAGE" --prompt "device" --max-new-tokens 2 --out dev_cpu --no-render --device cpu
[ -s dev_cpu/trace.h5 ] || fail "run --device cpu wrote no trace"
ok "run --device cpu"
if [ "$HAVE_GPU" = 1 ]; then
    expect 0 "$NULLMAP" run --model model --image "$IMAGE" --prompt "device" --max-new-tokens 2 --out dev_cuda --no-render --device cuda
    [ "$(n_samples dev_cuda/trace.h5)" = 1 ] || fail "run --device cuda: no readable trace"
    ok "run --device cuda (a CUDA device is present)"
else
    expect 1 "$NULLMAP" run --model model --image "$IMAGE" --prompt "device" --max-new-tokens 2 --out dev_cuda --device cuda
    grep -qE "run: error: --device cuda: (no CUDA device found: |CUDA backend not built)" "$LAST_ERR" ||
        fail "run --device cuda without a device: unclear message: $(cat "$LAST_ERR")"
    [ -e dev_cuda ] && fail "run --device cuda without a device left dev_cuda/ behind"
    printf -- '-\tx\n' >dev_pairs.tsv
    expect 1 "$NULLMAP" batch --model model --pairs dev_pairs.tsv --out dev.h5 --device cuda
    contains "$LAST_ERR" "--device cuda"
    [ -e dev.h5 ] && fail "batch --device cuda without a device wrote dev.h5"
    ok "--device cuda without a CUDA device: one clear error line, exit 1, nothing written"
fi
expect 2 "$NULLMAP" run --model model --prompt "x" --device tpu --out dev_bad
expect 2 "$NULLMAP" run --model model --prompt "x" --device cpu --precision bf16 --out dev_bad
contains "$LAST_ERR" "--precision bf16 needs the cuda device"
ok "--device tpu and --precision bf16 on the CPU are usage errors (exit 2)"
cp out/trace.h5 kept.h5
expect 3 "$NULLMAP" run --model model --prompt "again" --max-new-tokens 1 --out out
cmp -s out/trace.h5 kept.h5 || fail "a refused run changed the trace"
ok "run onto an existing trace without --append/--force is refused (exit 3), trace untouched"

# ---- the trace with h5dump ----
if command -v h5dump >/dev/null 2>&1; then
    expect 0 h5dump -H out/trace.h5
    contains "$LAST_OUT" '"samples"' '"routing"' '"slot"' '"n_real"' '"tokens"' '"id"'
    ok "h5dump -H reads the trace (routing/slot present)"
    for s in 000000 000001 000002; do
        expect 0 h5dump -y -w 0 -A 0 -d "/samples/$s/tokens/id" out/trace.h5
        T_id=$(sed -n 's/.*DATASPACE  SIMPLE { ( \([0-9]*\) ).*/\1/p' "$LAST_OUT" | head -n 1)
        n_vals=$(sed -n '/DATA {/,/}/p' "$LAST_OUT" | sed '1d;$d' | tr ',' '\n' | grep -cE '^ *-?[0-9]+ *$' || true)
        [ -n "$T_id" ] && [ "$n_vals" -eq "$T_id" ] || fail "sample $s: tokens/id has $n_vals values, dataspace says '$T_id'"
        expect 0 h5dump -a "/samples/$s/n_tokens" out/trace.h5
        n_tok=$(sed -n 's/.*(0): *\([0-9]*\).*/\1/p' "$LAST_OUT" | head -n 1)
        [ "$n_tok" = "$n_vals" ] || fail "sample $s: attribute n_tokens = '$n_tok' but tokens/id has $n_vals entries"
        expect 0 h5dump -H -d "/samples/$s/routing/slot" out/trace.h5
        dims=$(sed -n 's/.*DATASPACE  SIMPLE { ( \([0-9, ]*\) ).*/\1/p' "$LAST_OUT" | head -n 1)
        IFS=', ' read -r dL dT dK <<<"$dims"
        [ "$dL" = 2 ] && [ "$dT" = "$T_id" ] && [ "$dK" = 2 ] ||
            fail "sample $s: routing/slot is [$dims], expected [2, $T_id, 2]"
    done
    ok "h5dump: tokens/id has n_tokens entries; routing/slot is [L, n_tokens, K] for all 3 samples"
else
    echo "# skip: h5dump not found (install hdf5-tools) — h5dump checks skipped"
fi

# ---- batch ----
cp "$IMAGE" pic.png
{
    printf '# image\tprompt (a comment line)\n'
    printf 'pic.png\tWhat is in the picture?\n'
    printf '\n'
    printf -- '-\tA text-only line\\twith an escaped tab.\n'
    printf '%s\tAbsolute path.\n' "$T/pic.png"
} >pairs.tsv
expect 0 "$NULLMAP" batch --model model --pairs pairs.tsv --out batch.h5 --max-new-tokens 3
contains "$LAST_ERR" "3/3"
contains "$LAST_OUT" "3 samples"
[ "$(n_samples batch.h5)" = 3 ] || fail "batch trace does not hold 3 samples"
ok "batch: 3 pairs (comment, blank and text-only lines), progress on stderr, 3 samples"
expect 0 "$NULLMAP" batch --model model --pairs pairs.tsv --out batch.h5 --max-new-tokens 0 --append
[ "$(n_samples batch.h5)" = 6 ] || fail "batch --append --max-new-tokens 0 does not give 6 samples"
ok "batch --append with --max-new-tokens 0: 6 samples"

# ---- batch: crash safety, --resume, concurrent readers (the long version: tests/kill_test.sh) ----
HAVE_H5PY=0
/usr/bin/python3 -c "import h5py, numpy" >/dev/null 2>&1 && HAVE_H5PY=1
CHECK="/usr/bin/python3 $SRC/tests/trace_check.py"
for i in $(seq 0 39); do
    if [ $((i % 3)) = 2 ]; then printf -- '-\tText question number %d?\n' "$i"; else printf 'pic.png\tPicture question %d?\n' "$i"; fi
done >pairs40.tsv
expect 0 "$NULLMAP" batch --model model --pairs pairs40.tsv --out whole.h5 --max-new-tokens 3
"$NULLMAP" batch --model model --pairs pairs40.tsv --out cut.h5 --max-new-tokens 3 --verbose >cut.log 2>/dev/null &
pid=$!
for _ in $(seq 1 500); do # kill it once it has committed 5 samples (at most ~5 s)
    [ "$(grep -c '^committed sample' cut.log)" -ge 5 ] && break
    kill -0 $pid 2>/dev/null || break
    sleep 0.01
done
kill -9 $pid 2>/dev/null || fail "the batch finished before it could be killed"
{ wait $pid; } 2>/dev/null || true
mapfile -t committed < <(sed -n 's/^committed sample \([0-9]\{6\}\) .*/\1/p' cut.log)
n_cut=$(n_samples cut.h5)
[ "${#committed[@]}" -ge 5 ] && [ "$n_cut" -ge "${#committed[@]}" ] && [ "$n_cut" -le $((${#committed[@]} + 1)) ] ||
    fail "after the kill cut.h5 holds $n_cut samples; ${#committed[@]} were reported committed"
if [ $HAVE_H5PY = 1 ]; then
    $CHECK intact cut.h5 "${committed[@]}" >"$LAST_OUT" 2>"$LAST_ERR" || fail "h5py: samples lost or damaged by the kill"
fi
expect 0 "$NULLMAP" report cut.h5 --out cut_report
ok "batch killed (SIGKILL) after ${#committed[@]} commits: every committed sample reads back (info, report$([ $HAVE_H5PY = 1 ] && echo ', h5py'))"
cp pairs40.tsv pairs40_edited.tsv
printf -- '-\tOne more.\n' >>pairs40_edited.tsv
expect 1 "$NULLMAP" batch --model model --pairs pairs40_edited.tsv --out cut.h5 --max-new-tokens 3 --resume
contains "$LAST_ERR" "cut.h5" "another model, pair list or --max-new-tokens"
expect 1 "$NULLMAP" batch --model model --pairs pairs40.tsv --out cut.h5 --max-new-tokens 4 --resume
expect 1 "$NULLMAP" batch --model model_other --pairs pairs40.tsv --out cut.h5 --max-new-tokens 3 --resume
[ "$(n_samples cut.h5)" = "$n_cut" ] || fail "a refused --resume changed the trace"
ok "batch --resume with another pair list, --max-new-tokens or model is refused (exit 1), trace untouched"
expect 0 "$NULLMAP" batch --model model --pairs pairs40.tsv --out cut.h5 --max-new-tokens 3 --resume
contains "$LAST_OUT" "$n_cut committed by the interrupted run" "(40 in the file"
ls cut.h5.* >/dev/null 2>&1 && fail "leftovers beside cut.h5: $(ls cut.h5.*)"
if [ $HAVE_H5PY = 1 ]; then
    $CHECK equal cut.h5 whole.h5 >"$LAST_OUT" 2>"$LAST_ERR" || fail "the resumed trace differs from an uninterrupted run"
    ok "batch --resume finishes the trace: equal (h5py, bit for bit) to an uninterrupted run, no leftovers"
else
    [ "$(n_samples cut.h5)" = 40 ] || fail "the resumed trace does not hold 40 samples"
    ok "batch --resume finishes the trace: 40 samples, no leftovers"
fi
sed 's/^pic.png\tPicture question 7?$/missing.png\tPicture question 7?/' pairs40.tsv >pairs40_bad.tsv
expect 3 "$NULLMAP" batch --model model --pairs pairs40_bad.tsv --out bad.h5 --max-new-tokens 3
contains "$LAST_ERR" "pairs40_bad.tsv:8" "missing.png" "kept in bad.h5: 7 samples committed before the error" "--resume"
[ "$(n_samples bad.h5)" = 7 ] || fail "the samples before the bad pair were not kept"
cp pic.png missing.png
expect 0 "$NULLMAP" batch --model model --pairs pairs40_bad.tsv --out bad.h5 --max-new-tokens 3 --resume
[ "$(n_samples bad.h5)" = 40 ] || fail "--resume after fixing the bad pair does not give 40 samples"
ok "batch: a bad pair stops the batch (exit 3), the 7 samples before it stay; --resume after the fix completes it"
# A reader while the batch writes: every read is one committed state (or a clear refusal).
cat pairs40.tsv pairs40.tsv >pairs80.tsv
"$NULLMAP" batch --model model --pairs pairs80.tsv --out live.h5 --max-new-tokens 3 >live.out 2>live.err &
pid=$!
reads=0
while kill -0 $pid 2>/dev/null; do
    [ -e live.h5 ] || continue
    got=0
    "$NULLMAP" info live.h5 >"$LAST_OUT" 2>"$LAST_ERR" || got=$?
    [ $got = 0 ] || { [ $got = 3 ] && grep -q "locked by a process that is changing it" "$LAST_ERR"; } ||
        fail "nullmap info on a trace being written: exit $got"
    if [ $HAVE_H5PY = 1 ] && [ $((reads % 4)) = 0 ]; then
        /usr/bin/python3 -c "
import sys, h5py
try:
    f = h5py.File('live.h5', 'r')
except OSError as e:
    sys.exit(0 if 'unable to lock' in str(e) else 1)
with f:
    names = sorted(f['samples'])
    assert names == ['%06d' % i for i in range(len(names))], names[:5]
    for n in names: f['samples'][n]['routing/slot'][()]
" >>"$LAST_OUT" 2>"$LAST_ERR" || fail "h5py on a trace being written"
    fi
    reads=$((reads + 1))
done
wait $pid || fail "the batch under readers failed"
[ "$(n_samples live.h5)" = 80 ] || fail "the batch under readers does not hold 80 samples"
ok "readers of a trace being written ($reads reads by nullmap info$([ $HAVE_H5PY = 1 ] && echo ' and h5py')) see one committed state"

# ---- the trace's invariants with h5py ----
if /usr/bin/python3 -c "import h5py, numpy" >/dev/null 2>&1; then
    /usr/bin/python3 - out/trace.h5 batch.h5 "$N" >"$LAST_OUT" 2>"$LAST_ERR" <<'EOF' || fail "h5py check of the traces"
import sys
import h5py
import numpy as np

n_exp = int(sys.argv[3])
for path in sys.argv[1:3]:
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] in ("nullmap-trace", b"nullmap-trace"), f.attrs["format"]
        L, K = int(f.attrs["num_layers"]), int(f.attrs["top_k"])
        assert int(f.attrs["num_experts"]) == n_exp
        names = sorted(f["samples"])
        assert names, path + ": no samples"
        for name in names:
            s = f["samples"][name]
            tid = s["tokens/id"][()]
            T = len(tid)
            where = "%s /samples/%s" % (path, name)
            assert int(s.attrs["n_tokens"]) == T, where + ": n_tokens != len(tokens/id)"
            for ds, shape in (("n_real", (L, T)), ("null_mass", (L, T)), ("lse", (L, T)),
                              ("slot", (L, T, K)), ("prob", (L, T, K)), ("gate", (L, T, K))):
                got = s["routing/" + ds].shape
                assert got == shape, "%s: routing/%s has shape %s, expected %s" % (where, ds, got, shape)
            for ds in ("modality", "segment"):
                assert s["tokens/" + ds].shape == (T,), where + ": tokens/" + ds
            assert s["tokens/patch"].shape == (T, 2), where + ": tokens/patch"
            slot = s["routing/slot"][()]
            assert slot.min() >= -1 and slot.max() <= n_exp - 1, where + ": slot outside [-1, N-1]"
            n_real = s["routing/n_real"][()]
            assert (n_real == (slot >= 0).sum(-1)).all(), where + ": n_real != (slot >= 0).sum(-1)"
            gate = s["routing/gate"][()]
            assert np.all(gate[slot < 0] == 0), where + ": a null slot has a non-zero gate"
            rows = n_real > 0
            assert np.allclose(gate.sum(-1)[rows], 1, atol=1e-4), where + ": gates of real slots do not sum to 1"
            assert ((tid == -1) == (s["tokens/modality"][()] == 1)).all(), where + ": id -1 <=> vision"
        print("%s: %d samples ok" % (path, len(names)))
EOF
    cat "$LAST_OUT"
    ok "h5py: routing shapes are [L, T(, K)] with T = len(tokens/id); slot in [-1, N-1]; n_real = (slot >= 0).sum(-1)"
else
    echo "# skip: /usr/bin/python3 with h5py and numpy not available — h5py checks skipped"
fi

# ---- input limits: --set-limit NAME=VALUE on any command, NULLMAP_LIMIT_<NAME> ----
expect 0 "$NULLMAP" --list-limits
contains "$LAST_OUT" image_pixels NULLMAP_LIMIT_IMAGE_PIXELS safetensors_header_bytes trace_entries data_line_bytes
ok "--list-limits lists every limit with its variable"
expect 1 "$NULLMAP" run --model model --image "$IMAGE" --prompt "x" --out lim_out --set-limit image_pixels=100
contains "$LAST_ERR" "$(basename "$IMAGE")" "over the limit of 100 pixels" "--set-limit image_pixels=" NULLMAP_LIMIT_IMAGE_PIXELS
[ ! -e lim_out ] || fail "a run refused for a limit left lim_out/"
ok "run: an image over --set-limit image_pixels is refused (exit 1) naming the file, the limit and how to raise it"
NULLMAP_LIMIT_IMAGE_PIXELS=100 expect 1 "$NULLMAP" run --model model --image "$IMAGE" --prompt "x" --out lim_out
contains "$LAST_ERR" "over the limit of 100 pixels"
NULLMAP_LIMIT_IMAGE_PIXELS=100 expect 0 "$NULLMAP" run --set-limit=image_pixels=64M --model model --image "$IMAGE" \
    --prompt "x" --max-new-tokens 1 --out lim_out --no-render
ok "NULLMAP_LIMIT_IMAGE_PIXELS lowers the limit; --set-limit raises it again (the option wins)"
expect 0 "$NULLMAP" run --model model --image "$IMAGE" --prompt "x" --max-new-tokens 1 --out lim_out --force \
    --no-render --set-limit image_pixels=2G
expect 2 "$NULLMAP" run --model model --image "$IMAGE" --prompt "x" --out lim_out --force --set-limit image_pixels=3G
contains "$LAST_ERR" "image_pixels" "1..2147483648"
ok "a limit can be raised up to its ceiling; past it is a usage error (exit 2)"
expect 2 "$NULLMAP" info model --set-limit no_such_limit=5
contains "$LAST_ERR" "unknown limit 'no_such_limit'" image_pixels
NULLMAP_LIMIT_TRACE_SAMPLES=many expect 2 "$NULLMAP" info batch.h5
contains "$LAST_ERR" NULLMAP_LIMIT_TRACE_SAMPLES
expect 2 "$NULLMAP" info batch.h5 --set-limit
ok "an unknown limit, a malformed variable, a missing value: usage errors (exit 2)"
expect 1 "$NULLMAP" info batch.h5 --set-limit trace_samples=1
contains "$LAST_ERR" batch.h5 "over the limit of 1 samples" trace_samples
expect 1 "$NULLMAP" report batch.h5 --out lim_report --set-limit trace_entries=10
contains "$LAST_ERR" batch.h5 "over the limit of 10 routing entries" trace_entries
[ ! -e lim_report ] || fail "a refused report left lim_report/"
expect 1 "$NULLMAP" batch --model model --pairs pairs.tsv --out lim.h5 --set-limit pairs_file_bytes=5
contains "$LAST_ERR" pairs.tsv "limit of 5"
[ ! -e lim.h5 ] || fail "a refused batch left lim.h5"
NULLMAP_LIMIT_SAFETENSORS_TENSORS=3 expect 1 "$NULLMAP" info model
contains "$LAST_ERR" model.safetensors "over the limit of 3" safetensors_tensors
ok "trace, pairs-list and safetensors limits refuse with exit 1 and name the file and the limit"

# ---- render and report ----
expect 0 "$NULLMAP" render out/trace.h5 --sample 0 --out again --format svg --cmap viridis --alpha 0.7
for f in overlay/layer_00.svg overlay/mean.svg modality.svg layer_strip.svg; do
    [ -s "again/$f" ] || fail "render did not write again/$f"
done
ok "render TRACE --sample 0 --format svg --cmap viridis: overlays and charts from an existing trace"
expect 1 "$NULLMAP" render out/trace.h5 --sample 99 --out again2
contains "$LAST_ERR" "--sample 99"
[ ! -e again2 ] || fail "a failed render left again2/ behind"
ok "render --sample out of range: clear error, nothing written"
FOREIGN=$SRC/tests/fixtures/foreign_trace.h5
expect 0 "$NULLMAP" render "$FOREIGN" --out foreign
[ -s foreign/overlay/mean.png ] && [ -s foreign/modality.png ] || fail "render of the h5py-written trace is incomplete"
ok "render a trace written by another program (h5py fixture)"
expect 0 "$NULLMAP" report out/trace.h5 "$FOREIGN" --out cmp
for f in report.md report.json report.csv modality.png zero_vs_null.png; do [ -s "cmp/$f" ] || fail "report did not write cmp/$f"; done
contains cmp/report.md "## Comparison"
ok "report over two traces: comparison tables and charts"

# ---- data ----
expect 0 "$NULLMAP" data --out dset --train 12 --eval 4 --seed 3 --image-size 32
[ "$(wc -l < dset/train.jsonl)" = 12 ] && [ "$(wc -l < dset/eval.jsonl)" = 4 ] || fail "data: wrong record counts"
ls dset/train | grep -q '\.png$' || fail "data: no training images"
expect 0 "$NULLMAP" data --out dset2 --train 12 --eval 4 --seed 3 --image-size 32
cmp -s dset/train.jsonl dset2/train.jsonl || fail "data: the same seed gave different records"
expect 2 "$NULLMAP" data --out dset3 --train 12 --eval 4 --image-size 8
ok "data: PNG + JSONL train/eval split, reproducible for a seed, limits checked"

# ---- eval ----
expect 0 "$NULLMAP" eval --help
contains "$LAST_OUT" "usage: nullmap eval" --model --data --split --limit --seed --json --force --max-new-tokens \
    --threads "majority baseline"
ok "eval --help lists its options"
expect 0 "$NULLMAP" eval --model model --data dset --json ev.json --threads 1
contains "$LAST_ERR" "4/4 records"
contains "$LAST_OUT" "eval split: 4 of 4 records" "majority baseline" "answer loss" "background patches" \
    "vs object patches" "flat background" "texture backgr." "vision " " vs text "
grep -qE '^  all +4 ' "$LAST_OUT" || fail "eval: no 'all' row with n = 4"
[ -s ev.json ] || fail "eval --json wrote nothing"
if /usr/bin/python3 -c "import json" >/dev/null 2>&1; then
    /usr/bin/python3 - ev.json >"$LAST_OUT" 2>"$LAST_ERR" <<'EOF2' || fail "eval JSON check"
import json, sys
d = json.load(open(sys.argv[1]))
assert d["format"] == "nullmap-eval" and d["split"] == "eval", d["format"]
o = d["overall"]
assert o["n"] == 4 == len(d["records"]) == sum(t["n"] for t in d["tasks"]), o
assert 0 <= o["accuracy"] <= 1 and o["correct"] == sum(r["correct"] for r in d["records"])
p = d["patches"]
g = p["groups"]["all"]
assert g["background"]["n"] + g["object"]["n"] + p["neither"] == 16 * p["classified_records"], p
assert len(d["modality"]["vision"]["layers"]) == d["num_layers"] == 2
EOF2
fi
cp ev.json ev_first.json
expect 3 "$NULLMAP" eval --model model --data dset --json ev.json
contains "$LAST_ERR" "ev.json already exists" "--force"
expect 0 "$NULLMAP" eval --model model --data dset --json ev.json --force
cmp -s ev.json ev_first.json || fail "eval: two runs gave different JSON"
ok "eval: tables on stdout, progress on stderr, JSON (atomic, --force to replace) identical on a second run"
expect 0 "$NULLMAP" eval --model model --data dset --split train --limit 5 --seed 3
contains "$LAST_OUT" "train split: 5 of 12 records (a random subset)"
expect 2 "$NULLMAP" eval --model model --data dset --seed 3
contains "$LAST_ERR" "--limit"
ok "eval --split train --limit 5 --seed 3: a random subset; --seed without --limit is a usage error"
expect 3 "$NULLMAP" eval --model model --data no_such_dir --json ev_missing.json
contains "$LAST_ERR" "no_such_dir" "no such data set directory"
[ ! -e ev_missing.json ] || fail "a failed eval wrote its JSON"
sed '/"vision"/d' config.json >config_text.json
expect 0 "$NULLMAP" init --config config_text.json --out model_text --seed 7
expect 1 "$NULLMAP" eval --model model_text --data dset --json ev_text.json
contains "$LAST_ERR" "eval.jsonl:" "text-only"
[ ! -e ev_text.json ] && ! ls ev_text.json.tmp-* >/dev/null 2>&1 || fail "a failed eval left a JSON file behind"
ok "eval errors: a missing data directory (exit 3), image records for a text-only model (exit 1), nothing written"

# ---- train ----
expect 0 "$NULLMAP" train --help
contains "$LAST_OUT" "usage: nullmap train" --config --data --out --resume --steps --stop-after --final-dtype "exit codes"
ok "train --help lists its options"
expect 2 "$NULLMAP" train --config config.json --data dset
contains "$LAST_ERR" "--out"
sed 's/"tokenizer"/"train": { "steps": 6, "batch_size": 4, "lr": 1e-2, "warmup_steps": 1, "checkpoint_every": 3 },\n  "tokenizer"/' \
    config.json >train.json
expect 0 "$NULLMAP" train --config train.json --data dset --out run --stop-after 4
contains "$LAST_OUT" "stopped after step 4"
[ -d run/ckpt-0000004 ] && [ ! -e run/final ] || fail "train --stop-after: wrong checkpoints"
[ "$(wc -l < run/log.csv)" = 5 ] || fail "train: log.csv should hold a header and 4 rows"
expect 1 "$NULLMAP" train --config train.json --data dset --out run
contains "$LAST_ERR" "already holds a training run" "--resume"
mkdir run/ckpt-0000005.tmp-99999 # what a killed run leaves: an unfinished checkpoint, a log rewrite
touch run/ckpt-0000005.tmp-99999/model.safetensors run/log.csv.tmp-99999
expect 0 "$NULLMAP" train --config train.json --data dset --out run --resume --final-dtype bf16
contains "$LAST_OUT" "trained: run/final"
ls run | grep -q 'tmp-' && fail "train --resume left temporaries of a killed run: $(ls run)"
[ "$(wc -l < run/log.csv)" = 7 ] || fail "train --resume: log.csv should hold a header and 6 rows"
head -1 run/log.csv | grep -q '^step,lr,loss,ce,ce_answer,ce_prompt,l_bal,l_z,null_slot_ratio,zero_compute_ratio,' ||
    fail "train: log.csv header"
expect 0 "$NULLMAP" info run/final
contains "$LAST_OUT" "BF16"
expect 0 "$NULLMAP" run --model run/final --image "$IMAGE" --prompt "What colour?" --max-new-tokens 3 --out out_trained --no-render
ok "train: --stop-after, refusal without --resume, --resume to the end (removing a killed run's temporaries), log.csv, a final model that runs"
sed 's/"steps": 6/"stepz": 6/' train.json >train_typo.json
expect 1 "$NULLMAP" train --config train_typo.json --data dset --out run_typo
contains "$LAST_ERR" "train_typo.json" "unknown key train.stepz"
[ ! -e run_typo ] || fail "a refused training run left a directory"
ok "train: an unknown train key is refused before anything is written"

# ---- the shipped, trained model ----
SHIPPED=$SRC/samples/models/k8-trained
expect 0 "$NULLMAP" run --model "$SHIPPED" --image "$SRC/samples/images/synthetic-colour.png" \
    --prompt "Name the colour of the circle." --max-new-tokens 8 --out shipped --no-render
contains "$LAST_OUT" 'answer     " red"'
ok "the shipped model answers a held-out colour question (\" red\")"

echo "$passed passed, 0 failed"
