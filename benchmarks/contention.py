"""Throughput with and without a busy neighbour process (`python -c 'while True: pass'`) on the same CPUs.

For each server configuration: start an api_server (bundled SmolLM2), then for 0 and 1 busy neighbours measure
  - single stream: one greedy request of --output-len tokens, output tokens/s
  - c=16: 16 concurrent short requests (prompt ~16 tokens, --short-len output tokens), requests/s
and print busy/idle ratios. Each configuration is measured idle and busy back to back, so the ratio is what to
read on a shared machine.

    python benchmarks/contention.py                                   # default, --num-threads 2, --num-threads 1
    python benchmarks/contention.py --configs "" "--num-threads 1"
"""
from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import os
import shlex
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(extra: list[str], log) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lmserve", "serve", "api_server", "--server-name", "127.0.0.1",
                             "--server-port", str(port), "--log-level", "WARNING", "--session-len", "1024",
                             "--cache-block-count", "512", *extra], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900     # a first start may compile the CPU kernels
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise TimeoutError("api_server did not start")


@functools.lru_cache
def model_of(url: str) -> str:
    return httpx.get(f"{url}/v1/models").json()["data"][0]["id"]


def completion(url: str, prompt: str, max_tokens: int) -> int:
    model = model_of(url)
    r = httpx.post(f"{url}/v1/completions", timeout=600, json={
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"]


def measure(url: str, output_len: int, short_len: int, num_requests: int) -> dict:
    completion(url, "Warm up.", 4)
    t0 = time.perf_counter()
    tokens = completion(url, "Tell me a long story about a lighthouse keeper.", output_len)
    single = tokens / (time.perf_counter() - t0)
    prompts = [f"Question {i}: what is {i} plus {i}? Answer briefly." for i in range(num_requests)]
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda p: completion(url, p, short_len), prompts))
    return {"single_tok_s": single, "c16_req_s": num_requests / (time.perf_counter() - t0)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="*", default=["", "--num-threads 2", "--num-threads 1"],
                    help="api_server argument strings, one per configuration ('' = defaults)")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--short-len", type=int, default=4)
    ap.add_argument("--num-requests", type=int, default=48)
    ap.add_argument("--settle", type=float, default=3.0, help="seconds after starting the neighbour")
    ap.add_argument("--save-result", default=None)
    ap.add_argument("--server-log", default=os.devnull, help="api_server output goes here")
    args = ap.parse_args()
    log = open(args.server_log, "a")
    rows = []
    for cfg in args.configs:
        proc, url = start_server(shlex.split(cfg), log)
        try:
            idle = measure(url, args.output_len, args.short_len, args.num_requests)
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            try:
                time.sleep(args.settle)
                busy = measure(url, args.output_len, args.short_len, args.num_requests)
            finally:
                hog.kill()
                hog.wait()
        finally:
            proc.terminate()
            proc.wait(60)
        row = {"config": cfg or "(default)", "idle": idle, "busy": busy}
        rows.append(row)
        print(f"{row['config']:>16}: single {idle['single_tok_s']:6.1f} -> {busy['single_tok_s']:6.1f} tok/s "
              f"({busy['single_tok_s'] / idle['single_tok_s']:4.0%}); c=16 {idle['c16_req_s']:5.2f} -> "
              f"{busy['c16_req_s']:5.2f} req/s ({busy['c16_req_s'] / idle['c16_req_s']:4.0%})", flush=True)
    if args.save_result:
        with open(args.save_result, "w") as f:
            json.dump({"cpus": len(os.sched_getaffinity(0)), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
