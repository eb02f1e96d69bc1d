#!/bin/bash
# Seconds from `lmserve serve api_server` to the first 200 from /health, for two checkouts started alternately
# (a shared host's noise moves both alike). Each checkout uses its own kernel cache (build it first:
# `python -m lmserve.cli build-kernels` with the same LMSERVE_KERNEL_CACHE): one shared cache would rebuild at
# every switch, its build file naming the other checkout's sources. Not a test.
#
#   benchmarks/startup_ab.sh OLD_CHECKOUT NEW_CHECKOUT MODEL.gguf [ROUNDS=3]
# e.g. git worktree add /tmp/old HEAD~1; benchmarks/startup_ab.sh /tmp/old $PWD /tmp/synth2/llama-3.2-1b-q4_k_m.gguf
# OLD_ENV / NEW_ENV: extra environment for one arm, e.g. two settings of one checkout:
#   OLD_ENV=LMSERVE_REPACK_CACHE=none benchmarks/startup_ab.sh $PWD $PWD MODEL.gguf
# COLD=1: a first start of a file never seen, every time: MODEL's mtime is set anew before each start (the repack
# cache keys its entries on it, and so did the tokenizer cache before 2026-12-06) and each start gets an empty
# LMSERVE_TOKENIZER_CACHE; point it at a copy of the file:
#   cp MODEL.gguf /tmp/m.gguf; COLD=1 benchmarks/startup_ab.sh /tmp/old $PWD /tmp/m.gguf
set -u
PY=${PYTHON:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}
start_once() {   # checkout model [VAR=value ...] -> seconds to ready
  local port=$((20000 + RANDOM % 20000)) t0 t1 pid
  t0=$(date +%s.%N)
  (cd "$1" && exec env LMSERVE_KERNEL_CACHE="$1/.kernel-cache" PYTHONPATH="$1" "${@:3}" "$PY" -m lmserve serve api_server "$2" \
      --server-name 127.0.0.1 --server-port $port > "/tmp/startup_ab.$port.log" 2>&1) &
  pid=$!
  until curl -sf "http://127.0.0.1:$port/health" > /dev/null; do
    kill -0 $pid 2> /dev/null || { echo "server exited; see /tmp/startup_ab.$port.log" >&2; exit 1; }
    sleep 0.02
  done
  t1=$(date +%s.%N)
  kill $pid; wait $pid 2> /dev/null
  rm -f "/tmp/startup_ab.$port.log"
  printf "%.2f" "$(echo "$t1 - $t0" | bc)"
}
old="" new=""
for _ in $(seq "${4:-3}"); do
  cold=""; [ "${COLD:-0}" = 1 ] && { touch "$3"; cold="LMSERVE_TOKENIZER_CACHE=$(mktemp -d)"; }
  old="$old $(start_once "$1" "$3" ${OLD_ENV:-} $cold)"
  cold=""; [ "${COLD:-0}" = 1 ] && { touch "$3"; cold="LMSERVE_TOKENIZER_CACHE=$(mktemp -d)"; }
  new="$new $(start_once "$2" "$3" ${NEW_ENV:-} $cold)"
done
echo "$(basename "$3"): old$old | new$new (s)"
