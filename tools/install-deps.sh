#!/usr/bin/env bash
# Installs the Debian packages nullmap builds and tests with. Idempotent: does nothing
# when every package is already installed. Needs root (or sudo) only when something is missing.
set -euo pipefail
pkgs=(build-essential pkg-config libhdf5-dev hdf5-tools libcairo2-dev libpng-dev libjpeg-dev
      check libsubunit-dev libopenblas-dev libopenblas0-openmp libjansson-dev valgrind
      fonts-dejavu-core python3-h5py python3-numpy # python3-h5py: the CLI test reads traces back with h5py
      clang libclang-rt-14-dev libomp-14-dev) # make fuzz: clang, libFuzzer (libclang_rt.fuzzer), OpenMP
# Optional extras: the PyTorch fixture generator and the bench's PyTorch baseline.
if [[ "${NULLMAP_WITH_TORCH:-0}" == 1 ]]; then pkgs+=(python3-torch); fi
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]} == 0)); then exit 0; fi
echo "install-deps: installing ${missing[*]}" >&2
SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
