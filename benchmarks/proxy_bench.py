"""Proxy benchmarks on one machine (the numbers in docs/benchmarks.md, "Proxy"):

  python benchmarks/proxy_bench.py prefix   # prefix_aware vs random: nodes' prefix-cache hit rate, throughput
  python benchmarks/proxy_bench.py scale    # throughput of 1 vs 2 api_servers behind the proxy
  python benchmarks/proxy_bench.py ttft     # TTFT direct vs through the proxy, one api_server, paired requests
  python benchmarks/proxy_bench.py overhead # the same against a no-model SSE node: the proxy's own added latency

Starts real api_servers (`lmserve serve api_server`, bundled SmolLM2) and proxies (`lmserve serve proxy`) on free
127.0.0.1 ports, drives them with `lmserve bench serve`, and reads each node's `lmserve:prefix_cache_*` counters
from /metrics before and after a run. Each run uses its own prompts (its own --seed), so no run starts with the
previous run's prefixes cached.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

PY = [sys.executable, "-m", "lmserve"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(url: str, timeout: float = 600.0, check=lambda r: True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url, timeout=2)
            if r.status_code == 200 and check(r):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def start(args: list[str], log: str, core: int | None = None) -> subprocess.Popen:
    """`lmserve ARGS`; with `core`, pinned to that CPU core with one intra-op thread."""
    if core is None:
        return subprocess.Popen(PY + args, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    return subprocess.Popen(["taskset", "-c", str(core), *PY, *args], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))


def start_nodes(n: int, cache_blocks: int, logdir: str, pin: bool = False) -> tuple[list[subprocess.Popen], list[str]]:
    ports = [free_port() for _ in range(n)]
    procs = [start(["serve", "api_server", "--server-name", "127.0.0.1", "--server-port", str(p),
                    "--cache-block-count", str(cache_blocks), "--log-level", "WARNING"], f"{logdir}/node_{p}.log",
                   core=i if pin else None)
             for i, p in enumerate(ports)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    for u in urls:
        wait(f"{u}/health")
    return procs, urls


def start_proxy(strategy: str, urls: list[str], logdir: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = start(["serve", "proxy", "--server-name", "127.0.0.1", "--server-port", str(port), "--strategy", strategy,
                  "--log-level", "WARNING"], f"{logdir}/proxy_{strategy}_{port}.log")
    url = f"http://127.0.0.1:{port}"
    wait(f"{url}/health")
    for u in urls:
        httpx.post(f"{url}/nodes/add", json={"url": u}).raise_for_status()
    wait(f"{url}/health", check=lambda r: r.json()["num_healthy_nodes"] == len(urls))
    return proc, url


def cache_counters(urls: list[str]) -> tuple[float, float]:
    hits = queries = 0.0
    for u in urls:
        text = httpx.get(f"{u}/metrics").text
        hits += float(re.search(r"^lmserve:prefix_cache_hits_total (\S+)", text, re.MULTILINE).group(1))
        queries += float(re.search(r"^lmserve:prefix_cache_queries_total (\S+)", text, re.MULTILINE).group(1))
    return hits, queries


def bench(base_url: str, bench_args: list[str], logdir: str, label: str) -> dict:
    out = f"{logdir}/{label}.json"
    cmd = PY + ["bench", "serve", "--base-url", base_url, "--save-result", out, "--num-warmups", "0",
                "--disable-tqdm", "--label", label, *bench_args]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(out) as f:
        return json.load(f)["runs"][0]["metrics"]


def row(label: str, m: dict, hit_rate: float | None = None) -> str:
    hit = f"{hit_rate:6.1%}" if hit_rate is not None else "     -"
    return (f"| {label} | {m['completed']}/{m['num_prompts']} | {m['request_throughput']:.2f} | "
            f"{m['output_throughput']:.1f} | {m['ttft_ms']['mean']:.0f} | {m['ttft_ms']['median']:.0f} | "
            f"{m['e2e_ms']['mean']:.0f} | {hit} |")


HEADER = ("| run | ok | req/s | out tok/s | TTFT mean ms | TTFT p50 ms | E2E mean ms | prefix hit rate |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- |")


STUB_NODE = """
import asyncio, sys, uvicorn
from fastapi import FastAPI
from starlette.responses import StreamingResponse
app = FastAPI()
@app.get("/health")
async def health(): return {}
@app.get("/v1/models")
async def models(): return {"object": "list", "data": [{"id": "stub"}]}
@app.post("/v1/completions")
async def chat():
    async def events():
        for i in range(8):
            yield 'data: {"choices": [{"index": 0, "delta": {"content": "x"}}]}\\n\\n'
            await asyncio.sleep(0.002)
        yield "data: [DONE]\\n\\n"
    return StreamingResponse(events(), media_type="text/event-stream")
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def paired_ttft(node_url: str, proxy_url: str, model: str, num: int, prompt_words: int) -> list[str]:
    """TTFT of the same kind of request direct and through the proxy, interleaved request by request (order
    alternating), so that load from anything else on the machine hits both sides alike. Fresh random prompts:
    no prefix-cache hits."""
    rng = random.Random(0)
    words = ["apple", "river", "stone", "cloud", "green", "seven", "table", "light", "north", "paper"]
    ttft: dict[str, list[float]] = {"direct": [], "proxy": []}
    with httpx.Client(timeout=120) as client:
        for i in range(num):
            pair = [("direct", node_url), ("proxy", proxy_url)]
            for label, base in pair if i % 2 else pair[::-1]:
                body = {"model": model, "prompt": " ".join(rng.choice(words) for _ in range(prompt_words)),
                        "max_tokens": 4, "ignore_eos": True, "stream": True}
                t0 = time.perf_counter()
                with client.stream("POST", f"{base}/v1/completions", json=body) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: {") and len(ttft[label]) == i:
                            ttft[label].append((time.perf_counter() - t0) * 1000)
    diffs = sorted(p - d for d, p in zip(ttft["direct"], ttft["proxy"]))
    out = [f"| {k} | {num} | {statistics.median(v):.2f} | {statistics.fmean(v):.2f} |" for k, v in ttft.items()]
    out.append(f"| proxy - direct, paired | {num} | {statistics.median(diffs):.2f} | {statistics.fmean(diffs):.2f} |")
    return out


def overhead(logdir: str, num: int = 300) -> list[str]:
    """TTFT direct vs through the proxy against a node with no model: the proxy's own added latency."""
    port = free_port()
    node = subprocess.Popen([sys.executable, "-c", STUB_NODE, str(port)])
    node_url = f"http://127.0.0.1:{port}"
    procs = [node]
    try:
        wait(f"{node_url}/health")
        proxy, proxy_url = start_proxy("min_expected_latency", [node_url], logdir)
        procs.append(proxy)
        return paired_ttft(node_url, proxy_url, "stub", num, 8)
    finally:
        stop(procs)


def stop(procs) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["prefix", "scale", "ttft", "overhead"])
    ap.add_argument("--cache-block-count", type=int, default=256)
    ap.add_argument("--num-prompts", type=int, default=96)
    ap.add_argument("--max-concurrency", type=int, default=8)
    ap.add_argument("--num-prefixes", type=int, default=16)
    ap.add_argument("--prefix-len", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--pin", action="store_true", help="scale: node i on CPU core i, one thread (taskset)")
    args = ap.parse_args()
    logdir = tempfile.mkdtemp(prefix="proxy_bench_")
    print(f"logs in {logdir}", flush=True)
    workload = ["--dataset", "prefix-repetition", "--num-prefixes", str(args.num_prefixes),
                "--prefix-len", str(args.prefix_len), "--input-len", str(args.input_len),
                "--output-len", str(args.output_len), "--ignore-eos", "--num-prompts", str(args.num_prompts),
                "--max-concurrency", str(args.max_concurrency)]
    rows, procs = [], []
    try:
        if args.mode == "prefix":
            nodes, urls = start_nodes(2, args.cache_block_count, logdir)
            procs += nodes
            for seed, strategy in enumerate(["random", "prefix_aware", "random", "prefix_aware"]):
                proxy, url = start_proxy(strategy, urls, logdir)
                before = cache_counters(urls)
                m = bench(url, workload + ["--seed", str(100 + seed)], logdir, f"{strategy}-{seed}")
                after = cache_counters(urls)
                stop([proxy])
                rows.append(row(f"2 nodes, {strategy}", m, (after[0] - before[0]) / max(after[1] - before[1], 1)))
        elif args.mode == "scale":
            for n in (1, 2):
                nodes, urls = start_nodes(n, args.cache_block_count, logdir, pin=args.pin)
                proxy, url = start_proxy("min_expected_latency", urls, logdir)
                m = bench(url, ["--dataset", "random", "--input-len", str(args.input_len), "--output-len",
                                str(args.output_len * 4), "--ignore-eos", "--num-prompts", str(args.num_prompts),
                                "--max-concurrency", str(args.max_concurrency)], logdir, f"scale-{n}")
                stop([proxy, *nodes])
                rows.append(row(f"{n} node(s) behind the proxy{', one core each' if args.pin else ''}", m))
        elif args.mode == "overhead":
            rows = overhead(logdir)
        else:
            nodes, urls = start_nodes(1, args.cache_block_count, logdir)
            procs += nodes
            proxy, url = start_proxy("min_expected_latency", urls, logdir)
            procs.append(proxy)
            model = httpx.get(f"{urls[0]}/v1/models").json()["data"][0]["id"]
            rows = paired_ttft(urls[0], url, model, 40, 48)
    finally:
        stop([p for p in procs if p.poll() is None])
    print(HEADER if args.mode in ("prefix", "scale") else
          "| path | requests | TTFT p50 ms | TTFT mean ms |\n| --- | --- | --- | --- |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
