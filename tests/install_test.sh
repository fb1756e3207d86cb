#!/usr/bin/env bash
# `make install PREFIX=…` into a temporary prefix, then build and run a program against the
# installed header, library and pkg-config file.
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=$(mktemp -d)
trap 'rm -rf "$prefix"' EXIT
make --no-print-directory install PREFIX="$prefix" BUILD="${BUILD:-build}" >/dev/null
export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
cat > "$prefix/consumer.c" <<'C'
#include <stdio.h>
#include "nullmap.h"
int main(int argc, char **argv) {
    nm_config c;
    nm_error e;
    if (argc < 2 || nm_config_load(&c, argv[1], &e) != NM_OK) return 1;
    printf("experts %d rho %.2f\n", c.moe.num_experts, nm_config_rho(&c));
    return 0;
}
C
cc -std=c11 "$prefix/consumer.c" $(pkg-config --cflags --libs nullmap) -o "$prefix/consumer"
out=$("$prefix/consumer" samples/configs/random-k8.json)
[[ "$out" == "experts 16 rho 0.50" ]] || { echo "install_test: unexpected output: $out"; exit 1; }
"$prefix/bin/nullmap" --version >/dev/null
echo "install_test: 1 passed, 0 failed"
