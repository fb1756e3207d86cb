#!/usr/bin/env bash
# kill_test.sh — crash safety under SIGKILL at random moments (README "Crash safety").
#
#   NULLMAP=build/nullmap tests/kill_test.sh [--batch-kills N] [--train-kills N] [--seed S]
#                                            [--reader-pairs N] [--keep]
#   make killtest            (the defaults: 120 batch kills, 80 training kills, seed 1)
#
# (a) `nullmap batch` on a tiny random model over 80 pairs, killed after a random delay (uniform
#     in 0 .. the time an uninterrupted run takes), then continued with --resume, again and
#     again until it finishes; then a fresh round. After every kill: every sample the batch
#     reported committed (`--verbose` prints a line after the commit returns, so a line written
#     before the kill signal is a sample committed before it) must be in the trace, and every
#     sample in it must read back whole with h5py and with `nullmap info` / `nullmap report`.
#     Each finished round must equal an uninterrupted run (tests/trace_check.py equal: same
#     samples, attributes and values bit for bit; the creation time aside).
# (b) `nullmap train` on a tiny model and data set with a checkpoint every 3 steps, killed and
#     resumed the same way; each finished round's final/model.safetensors, final/config.json and
#     log.csv (without its timing columns) must equal an uninterrupted run's byte for byte.
# (c) concurrent readers: while a batch writes a fresh trace, an h5py loop and a loop of
#     `nullmap report` and `nullmap info` read it; every read must be one committed state (the
#     first n samples of the finished trace, same values) or a clear refusal, never garbage.
#
# Prints the totals and exits 0 only when no committed sample was lost, every resumed result is
# identical and every read was consistent. Slow (minutes): not part of `make test`; the quick
# version is in tests/cli_test.sh.
set -uo pipefail

NULLMAP=${NULLMAP:-build/nullmap}
case "$NULLMAP" in /*) ;; *) NULLMAP="$PWD/$NULLMAP" ;; esac
[ -x "$NULLMAP" ] || { echo "kill_test: $NULLMAP is not an executable (build it with make)" >&2; exit 1; }
SRC=$(cd "$(dirname "$0")/.." && pwd)
CHECK="/usr/bin/python3 $SRC/tests/trace_check.py"
/usr/bin/python3 -c "import h5py, numpy" 2>/dev/null || { echo "kill_test: needs /usr/bin/python3 with h5py" >&2; exit 1; }

BATCH_KILLS=120 TRAIN_KILLS=80 SEED=1 READER_PAIRS=600 KEEP=0
while [ $# -gt 0 ]; do
    case $1 in
    --batch-kills) BATCH_KILLS=$2; shift 2 ;;
    --train-kills) TRAIN_KILLS=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --reader-pairs) READER_PAIRS=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h | --help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "kill_test: unknown option $1" >&2; exit 2 ;;
    esac
done
RANDOM=$SEED
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE # small models; the machine may be shared

T=$(mktemp -d "${TMPDIR:-/tmp}/nmkill-XXXXXX")
[ "$KEEP" = 1 ] && echo "# kill_test: working in $T (kept)" || trap 'rm -rf "$T"' EXIT
cd "$T"
PROBLEMS=0
problem() {
    PROBLEMS=$((PROBLEMS + 1))
    echo "PROBLEM: $*" >&2
}
now_ms() { date +%s%3N; }
# random_delay MAX_MS: a sleep argument, uniform in 0 .. MAX_MS milliseconds.
random_delay() {
    local ms=$(((RANDOM * 32768 + RANDOM) % ($1 + 1)))
    printf '%d.%03d' $((ms / 1000)) $((ms % 1000))
}

# ---- the model, the data, the pair lists ----
cat >config.json <<'EOF'
{ "model_type": "nullmap-moe", "format_version": 1,
  "hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16,
  "vocab_size": 261, "max_positions": 256, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
  "tie_embeddings": false,
  "moe": { "num_experts": 4, "null_copies": 4, "top_k": 2, "expert_hidden": 16,
           "shared_expert_hidden": 0, "null_kind": "zero" },
  "vision": { "image_size": 16, "patch_size": 4, "channels": 3 },
  "train": { "steps": 60, "batch_size": 4, "lr": 1e-2, "warmup_steps": 2, "checkpoint_every": 3 },
  "tokenizer": { "type": "byte", "bos": 256, "eos": 257, "image_start": 258, "image_end": 259, "pad": 260 } }
EOF
"$NULLMAP" init --config config.json --out model --seed 7 >/dev/null || { echo "kill_test: init failed" >&2; exit 1; }
"$NULLMAP" data --out data --train 40 --eval 4 --seed 3 --image-size 32 >/dev/null 2>&1 ||
    { echo "kill_test: data failed" >&2; exit 1; }
/usr/bin/python3 - data/train.jsonl "$READER_PAIRS" <<'EOF' || { echo "kill_test: cannot write the pair lists" >&2; exit 1; }
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
def line(r, i):
    img = "data/" + r["image"] if r.get("image") else "-"
    p = r["prompt"].replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
    return "%s\t%s (%d)\n" % (img, p, i)
with open("pairs.tsv", "w") as f:
    f.writelines(line(recs[i % len(recs)], i) for i in range(80))
with open("pairs_reader.tsv", "w") as f:
    f.writelines(line(recs[i % len(recs)], i) for i in range(int(sys.argv[2])))
EOF
BATCH_ARGS=(--model model --pairs pairs.tsv --max-new-tokens 8)

# ================================ (a) batch ================================
t0=$(now_ms)
"$NULLMAP" batch "${BATCH_ARGS[@]}" --out ref.h5 >/dev/null 2>&1 || { echo "kill_test: reference batch failed" >&2; exit 1; }
BATCH_MS=$(($(now_ms) - t0))
echo "# batch: uninterrupted run of 80 pairs takes ${BATCH_MS} ms; killing $BATCH_KILLS times"

b_kills=0 b_resumes=0 b_rounds=0 b_identical=0 b_lost=0 b_claimed=0 b_unlogged=0 b_checks=0
while [ $b_kills -lt "$BATCH_KILLS" ]; do
    b_rounds=$((b_rounds + 1))
    rm -f out.h5 out.h5.*
    mode=()
    attempt=0 round_extra=0
    while :; do
        attempt=$((attempt + 1))
        log=log.$attempt
        : >"$log" # created here: a kill can land before the child has opened its redirection
        "$NULLMAP" batch "${BATCH_ARGS[@]}" --out out.h5 --verbose "${mode[@]}" >"$log" 2>err.txt &
        pid=$!
        killed=0
        if [ $b_kills -lt "$BATCH_KILLS" ]; then
            sleep "$(random_delay "$BATCH_MS")"
            kill -9 "$pid" 2>/dev/null && killed=1
        fi
        { wait "$pid"; } 2>/dev/null # (no "Killed" line from the shell)
        rc=$?
        if [ $killed = 0 ] || [ $rc = 0 ]; then
            [ $rc = 0 ] || { problem "round $b_rounds: batch ${mode[*]} exited $rc: $(tail -c 300 err.txt)"; break; }
            out=$($CHECK equal out.h5 ref.h5 2>&1) && b_identical=$((b_identical + 1)) ||
                problem "round $b_rounds: the finished trace differs from an uninterrupted run: $out"
            ls out.h5.* >/dev/null 2>&1 && problem "round $b_rounds: leftovers after a finished batch: $(ls out.h5.*)"
            break
        fi
        b_kills=$((b_kills + 1))
        # committed before this kill: what this attempt and the earlier ones of the round reported
        n_log=$(grep -c '^committed sample' "$log")
        b_claimed=$((b_claimed + ${n_log:-0}))
        mapfile -t claimed < <(cat log.* | sed -n 's/^committed sample \([0-9]\{6\}\) .*/\1/p')
        if [ -e out.h5 ]; then
            b_checks=$((b_checks + 1))
            if n_h5py=$($CHECK intact out.h5 "${claimed[@]}" 2>check.err); then
                # at most one more per kill of the round: committed, killed before its line was printed
                extra=$((n_h5py - ${#claimed[@]}))
                [ $extra -ge "$round_extra" ] && [ $extra -le $((round_extra + 1)) ] ||
                    problem "kill $b_kills: the trace holds $n_h5py samples, ${#claimed[@]} were reported"
                b_unlogged=$((b_unlogged + extra - round_extra))
                round_extra=$extra
                n_info=$("$NULLMAP" info out.h5 2>/dev/null | sed -n 's/^  \([0-9][0-9]*\) samples\{0,1\}$/\1/p')
                [ "$n_info" = "$n_h5py" ] || problem "kill $b_kills: nullmap info counts '$n_info' samples, h5py $n_h5py"
                "$NULLMAP" report out.h5 --out rep --force >/dev/null 2>rep.err ||
                    problem "kill $b_kills: nullmap report failed: $(head -c 300 rep.err)"
            else
                n_missing=$(sed -n 's/.*: \([0-9]*\) committed sample(s) missing.*/\1/p' check.err)
                b_lost=$((b_lost + ${n_missing:-${#claimed[@]}}))
                problem "kill $b_kills: $(cat check.err)"
            fi
        elif [ ${#claimed[@]} -gt 0 ]; then
            b_lost=$((b_lost + ${#claimed[@]}))
            problem "kill $b_kills: out.h5 is missing but ${#claimed[@]} samples were reported committed"
        fi
        mode=(--resume)
        b_resumes=$((b_resumes + 1))
    done
    rm -f log.*
done
echo "batch: kills $b_kills, rounds $b_rounds, resumes $b_resumes, samples reported committed by the killed" \
    "runs $b_claimed, lost $b_lost, committed but killed before reporting $b_unlogged, traces checked after a" \
    "kill $b_checks, finished rounds identical to an uninterrupted run $b_identical/$b_rounds"

# ================================ (b) train ================================
t0=$(now_ms)
"$NULLMAP" train --config config.json --data data --out ref_run >/dev/null 2>&1 ||
    { echo "kill_test: reference training failed" >&2; exit 1; }
TRAIN_MS=$(($(now_ms) - t0))
echo "# train: uninterrupted run of 60 steps takes ${TRAIN_MS} ms; killing $TRAIN_KILLS times"
cut -d, -f1-14 ref_run/log.csv >ref_log.csv

t_kills=0 t_resumes=0 t_rounds=0 t_identical=0
while [ $t_kills -lt "$TRAIN_KILLS" ]; do
    t_rounds=$((t_rounds + 1))
    rm -rf run
    while :; do
        mode=()
        ls -d run/ckpt-[0-9][0-9][0-9][0-9][0-9][0-9][0-9] >/dev/null 2>&1 && mode=(--resume)
        "$NULLMAP" train --config config.json --data data --out run "${mode[@]}" >train.out 2>train.err &
        pid=$!
        killed=0
        if [ $t_kills -lt "$TRAIN_KILLS" ]; then
            sleep "$(random_delay "$TRAIN_MS")"
            kill -9 "$pid" 2>/dev/null && killed=1
        fi
        { wait "$pid"; } 2>/dev/null # (no "Killed" line from the shell)
        rc=$?
        if [ $killed = 0 ] || [ $rc = 0 ]; then
            [ $rc = 0 ] || { problem "train round $t_rounds: ${mode[*]} exited $rc: $(tail -c 300 train.err)"; break; }
            same=1
            for f in final/model.safetensors final/config.json; do
                cmp -s "run/$f" "ref_run/$f" || { same=0; problem "train round $t_rounds: $f differs"; }
            done
            cut -d, -f1-14 run/log.csv | cmp -s - ref_log.csv || { same=0; problem "train round $t_rounds: log.csv differs"; }
            [ $same = 1 ] && t_identical=$((t_identical + 1))
            break
        fi
        t_kills=$((t_kills + 1))
        [ ${#mode[@]} -gt 0 ] && t_resumes=$((t_resumes + 1))
    done
done
echo "train: kills $t_kills, rounds $t_rounds, resumes from a checkpoint $t_resumes, finished rounds" \
    "byte-identical to an uninterrupted run $t_identical/$t_rounds"

# ========================= (c) concurrent readers =========================
"$NULLMAP" batch --model model --pairs pairs_reader.tsv --max-new-tokens 8 --out ref_reader.h5 >/dev/null 2>&1 ||
    { echo "kill_test: reference batch for the readers failed" >&2; exit 1; }
rm -f live.h5 live.h5.* stop
$CHECK watch live.h5 ref_reader.h5 stop >watch.out 2>watch.err &
watch_pid=$!
"$NULLMAP" batch --model model --pairs pairs_reader.tsv --max-new-tokens 8 --out live.h5 --verbose >live.out 2>live.err &
batch_pid=$!
r_reads=0 r_ok=0 r_refused=0
while kill -0 $batch_pid 2>/dev/null; do
    [ -e live.h5 ] || continue
    for cmd in report info; do
        r_reads=$((r_reads + 1))
        if [ $cmd = report ]; then
            "$NULLMAP" report live.h5 --out live_rep --force >r.out 2>r.err
        else
            "$NULLMAP" info live.h5 >r.out 2>r.err
        fi
        case $? in
        0)
            r_ok=$((r_ok + 1))
            [ $cmd = info ] && n=$(sed -n 's/^  \([0-9][0-9]*\) samples\{0,1\}$/\1/p' r.out) &&
                [ -n "$n" ] && [ "$n" -le "$READER_PAIRS" ] || [ $cmd = report ] ||
                problem "reader: nullmap info printed no plausible sample count"
            ;;
        3) grep -q "locked by a process that is changing it" r.err && r_refused=$((r_refused + 1)) ||
            problem "reader: nullmap $cmd failed: $(head -c 300 r.err)" ;;
        *) problem "reader: nullmap $cmd failed: $(head -c 300 r.err)" ;;
        esac
    done
done
wait $batch_pid || problem "reader: the batch failed: $(tail -c 300 live.err)"
touch stop
wait $watch_pid || problem "reader: h5py: $(cat watch.err)"
$CHECK equal live.h5 ref_reader.h5 >/dev/null 2>&1 || problem "reader: the trace written under readers differs"
copies=$(sed -n 's/^shadow copies: \([0-9]*\).*/\1/p' live.out)
echo "readers: nullmap report/info $r_reads reads, $r_ok consistent, $r_refused refused with a clear message;" \
    "h5py $(cat watch.out); the writer copied instead of reusing the previous file ${copies:-?} times" \
    "($READER_PAIRS commits)"

# ================================ totals ================================
echo "TOTAL: kills tried $((b_kills + t_kills)) (batch $b_kills, train $t_kills), resumes $((b_resumes + t_resumes))," \
    "committed samples lost $b_lost, identical $([ $b_identical = $b_rounds ] && [ $t_identical = $t_rounds ] &&
        echo yes || echo no) (batch $b_identical/$b_rounds, train $t_identical/$t_rounds), problems $PROBLEMS"
# every kill asked for was made and every round finished identical (a round cut short by an
# error in this script would otherwise pass unnoticed)
[ $PROBLEMS = 0 ] && [ $b_kills = "$BATCH_KILLS" ] && [ $t_kills = "$TRAIN_KILLS" ] &&
    [ $b_identical = $b_rounds ] && [ $t_identical = $t_rounds ]
