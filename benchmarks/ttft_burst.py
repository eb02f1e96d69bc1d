"""TTFT under bursts: one or more lmserve checkouts, each served and loaded with the same three workloads.

  burst16   16 requests sent at once (max-concurrency 16)
  burst64   64 requests sent at once (max-concurrency 64)
  poisson4  64 requests, Poisson arrivals at 4 req/s, at most 16 in flight
All 128 prompt / 128 output tokens (ignore_eos), `lmserve bench serve` against /v1/completions.

    flock /tmp/lmserve-bench.lock python benchmarks/ttft_burst.py --checkout old=/work/wt/pb-base \\
        --checkout new=. --out-dir benchmarks/results/ttft-burst

Checkouts are measured one workload at a time, alternating (old, new, old, new, ...) so that a change in machine
load hits both alike. Prints a table of TTFT p50/p99, ITL p99 and output tok/s per checkout and workload, and the
load average before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.run_peers import free_port, stop  # noqa: E402

WORKLOADS = {   # name -> (num_prompts, max_concurrency, request_rate)
    "burst16": (16, 16, None),
    "burst64": (64, 64, None),
    "poisson4": (64, 16, 4.0),
}


def start(checkout: str, server_args: list[str], log_path: str) -> tuple[subprocess.Popen, str]:
    from lmserve.bench.serve import wait_for_server
    from lmserve.model.loader import default_model_path

    port = free_port()
    cmd = [sys.executable, "-m", "lmserve", "serve", "api_server", default_model_path(), "--server-name",
           "127.0.0.1", "--server-port", str(port), "--log-level", "WARNING", *server_args]
    with open(log_path, "a") as log:
        log.write(f"\n$ (cd {checkout}) {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=checkout,
                                env={**os.environ, "PYTHONPATH": os.path.abspath(checkout)})
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(base_url, 300.0)
    except SystemExit:
        stop(proc)
        raise RuntimeError(f"server in {checkout} did not start; see {log_path}") from None
    return proc, base_url


def bench(base_url: str, workload: str, label: str, out_json: str, args) -> dict:
    num_prompts, conc, rate = WORKLOADS[workload]
    cmd = [sys.executable, "-m", "lmserve", "bench", "serve", "--base-url", base_url, "--endpoint", "/v1/completions",
           "--dataset", "random", "--input-len", str(args.input_len), "--output-len", str(args.output_len),
           "--ignore-eos", "--seed", str(args.seed), "--max-concurrency", str(conc), "--num-prompts",
           str(num_prompts), "--label", label, "--save-result", out_json]
    if rate:
        cmd += ["--request-rate", str(rate)]
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    with open(out_json) as f:
        return json.load(f)["runs"][0]["metrics"]


def warm(base_url: str, args) -> None:
    """One small request first, so no workload pays for first-call work (thread pools, allocator growth)."""
    cmd = [sys.executable, "-m", "lmserve", "bench", "serve", "--base-url", base_url, "--dataset", "random",
           "--input-len", str(args.input_len), "--output-len", "8", "--num-prompts", "4", "--seed", "99"]
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)


def floor_s(num_prompts: int, input_len: int) -> tuple[float, float]:
    """(bf16 GEMM peak GFLOP/s measured now, compute floor in s of prefilling num_prompts x input_len tokens at
    that peak): matmul FLOPs without the output projection (one logits row per prompt is noise) plus causal
    attention over a mean context of input_len / 2."""
    import torch

    from benchmarks.roofline import flops_per_token, gemm_gflops, model_shape
    from lmserve.model.loader import default_model_path

    shape = model_shape(default_model_path())
    per_token, _ = flops_per_token(shape, input_len // 2)
    per_token -= 2.0 * shape["hidden"] * shape["vocab"]
    peak = max(gemm_gflops(n, n, n, dtype=torch.bfloat16) for n in (1024, 2048))
    return peak, num_prompts * input_len * per_token / (peak * 1e9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkout", action="append", required=True, metavar="LABEL=PATH")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--server-args", default="", help="extra `serve api_server` flags for every checkout")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default="benchmarks/results/ttft-burst")
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    checkouts = [c.split("=", 1) for c in args.checkout]
    load_before = os.getloadavg()
    peak, floor16 = floor_s(16, args.input_len)
    print(f"bf16 GEMM peak {peak:.0f} GFLOP/s: compute floor of a burst of 16 x {args.input_len} = {floor16:.2f} s, "
          f"of 64 = {4 * floor16:.2f} s", flush=True)
    servers = {}
    try:
        for label, path in checkouts:
            servers[label] = start(path, args.server_args.split(), os.path.join(args.out_dir, f"{label}.log"))
            warm(servers[label][1], args)
        rows = []
        for workload in args.workloads.split(","):
            for label, _ in checkouts:
                out = os.path.join(args.out_dir, f"{label}-{workload}.json")
                m = bench(servers[label][1], workload, label, out, args)
                rows.append((workload, label, m))
                print(f"{workload:9} {label:8} TTFT p50 {m['ttft_ms']['median'] / 1e3:6.3f} s  "
                      f"p99 {m['ttft_ms']['p99'] / 1e3:6.3f} s  ITL p99 {m['itl_ms']['p99']:7.1f} ms  "
                      f"out {m['output_throughput']:6.1f} tok/s  load {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        for proc, _ in servers.values():
            stop(proc)
    peak_after, _ = floor_s(16, args.input_len)
    print(f"\nload average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}; bf16 GEMM peak before "
          f"{peak:.0f}, after {peak_after:.0f} GFLOP/s")
    print("\n| workload | checkout | TTFT p50 | TTFT p99 | ITL p99 | output tok/s |\n|---|---|---:|---:|---:|---:|")
    for workload, label, m in rows:
        print(f"| {workload} | {label} | {m['ttft_ms']['median'] / 1e3:.2f} s | {m['ttft_ms']['p99'] / 1e3:.2f} s "
              f"| {m['itl_ms']['p99']:.0f} ms | {m['output_throughput']:.1f} |")


if __name__ == "__main__":
    main()
