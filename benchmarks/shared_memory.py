"""Memory of N servers of one GGUF file on one host: what the host gives them together, not each one's RSS.

Starts N servers of MODEL one after another (lmserve with a repack-cache setting, or llama.cpp's llama-server),
sends each one short chat request (every weight read once), then reads each process's RSS and PSS
(/proc/PID/smaps_rollup: PSS splits a shared page between the processes that map it) and the host's
MemAvailable before the first start and after the last answer. Shared weight pages count once in the PSS sum and
in the MemAvailable drop, twice in the RSS sum. Not a test; talks to 127.0.0.1 only.

  python benchmarks/shared_memory.py MODEL.gguf --servers 2 --arm lmserve:none --arm lmserve:/tmp/rc \\
      --arm llama-server:/work/peers/llama-server
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2 ** 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def meminfo(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def rollup(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def start(arm: str, model: str, port: int, threads: int) -> subprocess.Popen:
    kind, _, arg = arm.partition(":")
    if kind == "lmserve":
        env = dict(os.environ, LMSERVE_REPACK_CACHE=arg, PYTHONPATH=ROOT)
        cmd = [sys.executable, "-m", "lmserve", "serve", "api_server", model, "--server-name", "127.0.0.1",
               "--server-port", str(port), "--num-threads", str(threads)]
    else:
        env = dict(os.environ)
        cmd = [arg, "-m", model, "--host", "127.0.0.1", "--port", str(port), "-t", str(threads), "-c", "4096"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"server on port {port} not ready")


def ask(port: int) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30) as r:
        model = json.load(r)["data"][0]["id"]
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8,
                       "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body,
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        r.read()


def run_arm(arm: str, model: str, n: int, threads: int) -> dict:
    before = meminfo("MemAvailable")
    procs = []
    try:
        for _ in range(n):
            port = free_port()
            procs.append((port, start(arm, model, port, threads)))
            wait_ready(port, procs[-1][1])
        for port, _ in procs:
            ask(port)
        time.sleep(1)
        stats = [rollup(p.pid) for _, p in procs]
        after = meminfo("MemAvailable")
    finally:
        for _, p in procs:
            os.killpg(p.pid, signal.SIGTERM)
        for _, p in procs:
            p.wait(timeout=60)
    return {"arm": arm, "servers": n, "rss_sum_gib": sum(s["Rss"] for s in stats) / GiB,
            "pss_sum_gib": sum(s["Pss"] for s in stats) / GiB,
            "rss_each_gib": [round(s["Rss"] / GiB, 3) for s in stats],
            "mem_available_drop_gib": (before - after) / GiB}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="compute threads per server")
    p.add_argument("--arm", action="append", required=True,
                   help="lmserve:REPACK_CACHE (a directory or none) or llama-server:PATH; repeat")
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args()
    for _ in range(args.rounds):
        for arm in args.arm:
            r = run_arm(arm, args.model, args.servers, args.threads)
            print(f"{r['arm']:40s} x{r['servers']}: RSS sum {r['rss_sum_gib']:.2f} GiB (each {r['rss_each_gib']}), "
                  f"PSS sum {r['pss_sum_gib']:.2f} GiB, MemAvailable -{r['mem_available_drop_gib']:.2f} GiB",
                  flush=True)


if __name__ == "__main__":
    main()
