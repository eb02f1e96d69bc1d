#!/bin/bash
# Cold builds of the C++ CPU kernels (what a first start waits for), two checkouts alternating:
#   benchmarks/kernel_build_ab.sh OLD_CHECKOUT NEW_CHECKOUT [ROUNDS]
# Each build starts from an empty kernel cache (/tmp/kernel-build-ab); both run with this checkout's .venv python.
# Prints the seconds `lmserve build-kernels` reports and the wall time around it.
set -euo pipefail
OLD=$1 NEW=$2 ROUNDS=${3:-2}
PY=${PY:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}
CACHE=/tmp/kernel-build-ab
for r in $(seq "$ROUNDS"); do
  for arm in old new; do
    src=$NEW; [ "$arm" = old ] && src=$OLD
    rm -rf "$CACHE"
    s=$(date +%s.%N)
    line=$(cd "$src" && PYTHONPATH=$src LMSERVE_KERNEL_CACHE=$CACHE "$PY" -c \
      'import sys; from lmserve.cli import main; sys.argv = ["lmserve", "build-kernels"]; main()' 2>&1 | tail -1)
    e=$(date +%s.%N)
    echo "round $r $arm ($(git -C "$src" rev-parse --short HEAD)$(git -C "$src" diff --quiet || echo +changes)): wall $(echo "$e - $s" | bc) s; $line"
  done
done
rm -rf "$CACHE"
