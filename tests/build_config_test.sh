#!/usr/bin/env bash
# How the Makefile finds the CUDA toolkit. A CI machine once had only /usr/local/bin/nvcc on PATH,
# a wrapper script that execs the real nvcc, and `make` stopped before building anything. This
# checks, with `make -n` (nothing is built), that such a wrapper still finds libcudart, and that
# NVCC=none gives a CPU-only build. Skipped when there is no nvcc on the machine.
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
REAL=$(command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null || true)
if [ -z "$REAL" ]; then echo "# skip: no nvcc here"; exit 0; fi
T=$(mktemp -d); trap 'rm -rf "$T"' EXIT
printf '#!/bin/sh\nexec %s "$@"\n' "$REAL" >"$T/nvcc"; chmod +x "$T/nvcc"
unset MAKEFLAGS MFLAGS MAKELEVEL
out=$(env PATH="$T:/usr/sbin:/usr/bin:/sbin:/bin" make -C "$SRC" -n --no-print-directory \
      NVCC="$T/nvcc" all 2>&1) || { echo "FAIL: make -n with a wrapper nvcc:"; echo "$out" | head -5; exit 1; }
echo "$out" | grep -q "CUDA backend built with $T/nvcc" \
    || { echo "FAIL: a wrapper nvcc did not give a CUDA build:"; echo "$out" | head -5; exit 1; }
echo "ok - a wrapper nvcc (exec $REAL) finds the toolkit's libcudart"
out=$(make -C "$SRC" -n --no-print-directory NVCC=none all 2>&1) || { echo "FAIL: NVCC=none: $out" | head -5; exit 1; }
echo "$out" | grep -q "CPU backend only" || { echo "FAIL: NVCC=none did not give a CPU-only build"; exit 1; }
echo "ok - NVCC=none builds the CPU backend only"
