"""Prefill-decode disaggregation vs two hybrid servers, one CPU core per server, behind our proxy (issue 21).

  distserve: a prefill server on core 0 and a decode server on core 1 (`taskset`), the proxy in DistServe mode
  hybrid:    two hybrid servers, one on core 0 and one on core 1, the proxy in Hybrid mode

Mixed workload for --duration seconds: --chats closed-loop streams of short chats (a one-line question,
--chat-tokens output tokens) plus one long prompt (~--long-tokens tokens, 8 output tokens) every --long-every
seconds. Reported: TTFT p99 and ITL p99 (and p50) of the short chats, the long prompts' TTFT, and, for DistServe,
the decode server's migration counters: bytes/s while migrating and the migration time per 1k prompt tokens.
The load average is printed beside each run: this machine is shared, and figures are contended above ~2.

    python benchmarks/distserve.py                 # both topologies, bundled SmolLM2
    python benchmarks/distserve.py --modes distserve --duration 30
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time

import httpx

from lmserve.bench.datasets import _usable_ids, get_tokenizer, random_text
from lmserve.bench.metrics import percentile
from lmserve.bench.serve import RequestInput, send_request

SERVER_ARGS = ("--dtype", "float32", "--num-threads", "1", "--cache-block-count", "768", "--session-len", "4096",
               "--max-concurrent-requests", "32", "--log-level", "WARNING")
QUESTIONS = ["What is sourdough?", "Why does bread rise?", "Name three flours.", "How hot is a bread oven?",
             "What is a baguette?", "Is rye bread healthy?", "What does kneading do?", "What is a levain?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not healthy after {timeout} s")


def start(cmd: list[str], log: str, core: int | None) -> subprocess.Popen:
    prefix = ["taskset", "-c", str(core)] if core is not None else []
    return subprocess.Popen(prefix + cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


def start_topology(mode: str, extra: list[str], logdir: str) -> tuple[str, list[tuple[str, int]], list]:
    """-> (proxy url, [(server url, role)], processes)."""
    roles = [("prefill", 2), ("decode", 3)] if mode == "distserve" else [("hybrid", 1), ("hybrid", 1)]
    procs, servers = [], []
    for core, (role, role_id) in enumerate(roles):
        port = free_port()
        cmd = [sys.executable, "-m", "lmserve", "serve", "api_server", "--server-name", "127.0.0.1",
               "--server-port", str(port), "--role", role, *SERVER_ARGS, *extra]
        procs.append(start(cmd, os.path.join(logdir, f"{mode}_{role}_{core}.log"), core))
        servers.append((f"http://127.0.0.1:{port}", role_id))
    port = free_port()
    strategy = "DistServe" if mode == "distserve" else "Hybrid"
    procs.append(start([sys.executable, "-m", "lmserve", "serve", "proxy", "--server-name", "127.0.0.1",
                        "--server-port", str(port), "--serving-strategy", strategy, "--log-level", "WARNING"],
                       os.path.join(logdir, f"{mode}_proxy.log"), None))
    proxy = f"http://127.0.0.1:{port}"
    for (url, _), proc in zip(servers, procs):
        wait_up(url, proc)
    wait_up(proxy, procs[-1])
    for url, role_id in servers:
        r = httpx.post(f"{proxy}/nodes/add", json={"url": url, "status": {"role": role_id}})
        r.raise_for_status()
    if mode == "distserve":
        httpx.post(f"{proxy}/distserve/connection_warmup", timeout=60).raise_for_status()
    return proxy, servers, procs


async def workload(proxy: str, model: str, args, long_prompts: list[str]) -> dict:
    url = f"{proxy}/v1/chat/completions"
    chats, longs = [], []
    stop = time.monotonic() + args.duration

    async def chat_stream(client, k: int):
        i = k
        while time.monotonic() < stop:
            req = RequestInput(url, "/v1/chat/completions", model, QUESTIONS[i % len(QUESTIONS)], 0,
                               args.chat_tokens, ignore_eos=True)
            chats.append(await send_request(client, req))
            i += args.chats

    async def long_stream(client):
        i = 0
        while time.monotonic() < stop:
            t0 = time.monotonic()
            req = RequestInput(url, "/v1/chat/completions", model, long_prompts[i % len(long_prompts)], 0, 8,
                               ignore_eos=True)
            task = asyncio.ensure_future(send_request(client, req))
            task.add_done_callback(lambda t: longs.append(t.result()))
            i += 1
            await asyncio.sleep(max(0.0, args.long_every - (time.monotonic() - t0)))

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        await asyncio.gather(long_stream(client), *(chat_stream(client, k) for k in range(args.chats)))
        while len(longs) < -(-args.duration // args.long_every):
            await asyncio.sleep(0.2)
    ok = [r for r in chats if r.success]
    ttft = [r.ttft * 1000 for r in ok]
    itl = [x * 1000 for r in ok for x in r.itl]
    long_ok = [r for r in longs if r.success]
    errors = [r.error for r in chats + longs if not r.success]
    return {"chats": len(ok), "chat_errors": len(chats) - len(ok), "long": len(long_ok),
            "long_errors": len(longs) - len(long_ok), "first_error": errors[0][:200] if errors else None,
            "chat_ttft_p50_ms": percentile(ttft, 50), "chat_ttft_p99_ms": percentile(ttft, 99),
            "chat_itl_p50_ms": percentile(itl, 50), "chat_itl_p99_ms": percentile(itl, 99),
            "chat_itl_max_ms": max(itl, default=0.0),
            "long_ttft_p50_ms": percentile([r.ttft * 1000 for r in long_ok], 50),
            "long_prompt_tokens": round(sum(r.prompt_len for r in long_ok) / max(1, len(long_ok)))}


def run_mode(mode: str, args, long_prompts: list[str]) -> dict:
    proxy, servers, procs = start_topology(mode, args.server_args.split(), args.logdir)
    try:
        model = httpx.get(f"{servers[0][0]}/v1/models").json()["data"][0]["id"]
        # warm both servers (and, for DistServe, one migration) outside the measured window
        asyncio.run(workload(proxy, model, argparse.Namespace(**{**vars(args), "duration": 4, "long_every": 4}),
                             long_prompts[:1]))
        before = [httpx.get(f"{u}/distserve/stats").json() for u, _ in servers]
        load0 = os.getloadavg()
        t0 = time.monotonic()
        res = asyncio.run(workload(proxy, model, args, long_prompts))
        res["wall_s"] = round(time.monotonic() - t0, 1)
        res["loadavg_before"], res["loadavg_after"] = [round(x, 2) for x in load0], \
            [round(x, 2) for x in os.getloadavg()]
        if mode == "distserve":
            after = httpx.get(f"{servers[1][0]}/distserve/stats").json()
            d = {k: after[k] - before[1][k] for k in ("num_migrations", "num_migrated_tokens", "num_migrated_bytes",
                                                       "migration_seconds")}
            res["migrations"] = d["num_migrations"]
            res["migration_MB_per_s"] = d["num_migrated_bytes"] / 1e6 / max(d["migration_seconds"], 1e-9)
            res["migration_ms_per_1k_tokens"] = 1e6 * d["migration_seconds"] / max(d["num_migrated_tokens"], 1)
        return res
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", default=["distserve", "hybrid"], choices=["distserve", "hybrid"])
    ap.add_argument("--duration", type=int, default=45, help="measured seconds per topology")
    ap.add_argument("--chats", type=int, default=4, help="closed-loop short-chat streams")
    ap.add_argument("--chat-tokens", type=int, default=32)
    ap.add_argument("--long-tokens", type=int, default=2000)
    ap.add_argument("--long-every", type=float, default=5.0, help="seconds between long prompts")
    ap.add_argument("--server-args", default="", help="extra api_server flags for every server")
    ap.add_argument("--logdir", default="/tmp/lmserve_distserve_bench")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    os.makedirs(args.logdir, exist_ok=True)
    tok = get_tokenizer(None)
    rng = random.Random(0)
    ids = _usable_ids(tok)
    long_prompts = [random_text(tok, args.long_tokens, rng, ids)[0] for _ in range(4)]
    results = {}
    for mode in args.modes:
        results[mode] = run_mode(mode, args, long_prompts)
        print(mode, json.dumps(results[mode], indent=1), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
