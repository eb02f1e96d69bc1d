"""Chaos run for the proxy (docs/benchmarks.md, "Proxy under node failures"): three nodes behind a proxy, 16
concurrent clients for 3 minutes (mixed streaming and not, sessions, prefix-heavy prompts), one node SIGKILLed and
restarted every 20 s in turn.

  python benchmarks/chaos.py                         # real api_servers (bundled SmolLM2), lmserve's proxy
  python benchmarks/chaos.py --nodes fake            # no-model SSE nodes (tests/test_proxy_fakes.py)
  python benchmarks/chaos.py --proxy lmdeploy --proxy-python /tmp/lmd/bin/python   # LMDeploy's proxy

Counts: non-streamed requests served / lost; streamed requests complete / ended by an error event / cut
silently / lost; requests that waited past their timeout; requests the proxy tried on a dead node (failovers);
breaker openings; for each restart, the seconds from the node answering /health to the proxy routing to it again.
Prints one JSON object (and writes it with --out).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(os.path.dirname(HERE), "tests")
REAL_ARGS = ("--dtype", "float32", "--cache-block-count", "256", "--session-len", "2048",
             "--max-concurrent-requests", "16", "--max-queued-requests", "64", "--log-level", "WARNING")
_FAKE = ("import json, sys, uvicorn; sys.path.insert(0, sys.argv[1]); from test_proxy_fakes import fake_node_app; "
         "app = fake_node_app(sys.argv[2]); app.state.behavior.update(json.loads(sys.argv[4])); "
         "uvicorn.run(app, host='127.0.0.1', port=int(sys.argv[3]), log_level='error')")
PREFIXES = [("You are a careful assistant for the team %d. " % i) * 12 for i in range(4)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ok(url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return False


class NodeProc:
    def __init__(self, kind: str, name: str, log_dir: str, fake_behavior: dict):
        self.kind, self.name, self.port = kind, name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(os.path.join(log_dir, f"{name}.log"), "a")
        self.fake_behavior = fake_behavior
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        if self.kind == "fake":
            argv = [sys.executable, "-c", _FAKE, TESTS, self.name, str(self.port), json.dumps(self.fake_behavior)]
        else:
            argv = [sys.executable, "-m", "lmserve", "serve", "api_server", *REAL_ARGS, "--server-name", "127.0.0.1",
                    "--server-port", str(self.port)]
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.c: dict[str, int] = {}
        self.examples: dict[str, str] = {}

    def add(self, key: str, example: str = "") -> None:
        with self.lock:
            self.c[key] = self.c.get(key, 0) + 1
            if example and key not in self.examples:
                self.examples[key] = example[:300]


def client_loop(proxy: str, model: str, stop: float, timeout: float, stats: Stats, seed: int) -> None:
    rng = random.Random(seed)
    with httpx.Client(timeout=httpx.Timeout(timeout, connect=5)) as client:
        while time.monotonic() < stop:
            stream = rng.random() < 0.5
            body = {"model": model, "max_tokens": rng.choice([8, 16, 32]), "stream": stream, "temperature": 0,
                    "messages": [{"role": "user", "content": rng.choice(PREFIXES) + f"Question {rng.randrange(10**6)}"}]}
            if rng.random() < 0.25:
                body["session_id"] = rng.randrange(1, 64) + seed * 1000
            kind = "stream" if stream else "plain"
            t0 = time.monotonic()
            try:
                r = client.post(f"{proxy}/v1/chat/completions", json=body)
                text = r.text
                elapsed = time.monotonic() - t0
                if elapsed > timeout:
                    stats.add("over_timeout", f"{elapsed:.1f}s")
                if r.status_code != 200:
                    stats.add(f"{kind}_lost", f"{r.status_code} {text[:200]}")
                elif not stream:
                    stats.add("plain_ok" if json.loads(text).get("choices") else "plain_lost", text)
                elif "data: [DONE]" in text and '"error"' not in text:
                    stats.add("stream_complete")
                elif '"error"' in text:
                    stats.add("stream_error_event", text[-300:])
                else:
                    stats.add("stream_cut_silently", text[-300:])
            except httpx.TimeoutException as e:
                stats.add("over_timeout", repr(e))
                stats.add(f"{kind}_lost", repr(e))
            except httpx.HTTPError as e:
                stats.add(f"{kind}_lost", repr(e))


def proxy_status(proxy: str) -> dict:
    try:
        return httpx.get(f"{proxy}/nodes/status", timeout=2).json()
    except (httpx.HTTPError, ValueError):
        return {}


def metric(proxy: str, name: str) -> float:
    try:
        text = httpx.get(f"{proxy}/metrics", timeout=2).text
    except httpx.HTTPError:
        return float("nan")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def chaos(args) -> dict:
    log_dir = args.log_dir or os.path.join("/tmp", f"chaos-{os.getpid()}")
    os.makedirs(log_dir, exist_ok=True)
    behavior = {"num_chunks": 8, "chunk_delay": 0.05, "first_delay": 0.05}
    nodes = [NodeProc(args.nodes, f"node{i}", log_dir, behavior) for i in range(args.num_nodes)]
    proxy_port = free_port()
    proxy = f"http://127.0.0.1:{proxy_port}"
    if args.proxy == "lmserve":
        pargv = [sys.executable, "-m", "lmserve", "serve", "proxy", "--server-name", "127.0.0.1", "--server-port",
                 str(proxy_port), "--strategy", args.strategy, "--health-check-interval", str(args.health_interval),
                 "--max-retries", "3", "--log-level", "WARNING"]
    else:   # LMDeploy's proxy, from a separate venv with `pip install --no-deps lmdeploy`
        pargv = [args.proxy_python, "-m", "lmdeploy.serve.proxy.proxy", "--server-name", "127.0.0.1",
                 "--server-port", str(proxy_port), "--routing-strategy", "min_expected_latency",
                 "--log-level", "WARNING"]
    plog = open(os.path.join(log_dir, "proxy.log"), "a")
    procs = [subprocess.Popen(pargv, stdout=plog, stderr=subprocess.STDOUT)]
    stats, restarts, kills = Stats(), [], 0
    try:
        for n in nodes:
            n.start()
        assert wait_ok(f"{proxy}/nodes/status", 300), "the proxy did not start"
        for n in nodes:
            assert wait_ok(f"{n.url}/health", args.start_timeout), f"{n.name} did not start"
            httpx.post(f"{proxy}/nodes/add", json={"url": n.url}, timeout=10).raise_for_status()
        model = httpx.get(f"{nodes[0].url}/v1/models", timeout=10).json()["data"][0]["id"]
        time.sleep(args.health_interval + 0.5)
        failovers0 = metric(proxy, "lmserve_proxy_failovers_total")
        t_start = time.monotonic()
        stop = t_start + args.duration
        threads = [threading.Thread(target=client_loop, args=(proxy, model, stop, args.timeout, stats, i),
                                    daemon=True) for i in range(args.clients)]
        for t in threads:
            t.start()
        i = 0
        while t_start + args.kill_every * (i + 1) < stop - 1.0:     # one kill every kill_every s, on the clock
            time.sleep(max(0.0, t_start + args.kill_every * (i + 1) - time.monotonic()))
            node = nodes[i % len(nodes)]
            i += 1
            node.kill()
            kills += 1
            node.start()
            if not wait_ok(f"{node.url}/health", args.start_timeout):
                restarts.append({"node": node.name, "ready": False})
                continue
            ready = time.monotonic()
            if args.proxy == "lmdeploy":
                # LMDeploy's proxy drops a node that stops answering; its api_server re-registers on restart
                # (--proxy-url), which this stands in for. lmserve's proxy keeps the node and health-checks it.
                with contextlib.suppress(httpx.HTTPError):
                    httpx.post(f"{proxy}/nodes/add", json={"url": node.url}, timeout=10)
            back = None
            while time.monotonic() < ready + max(30.0, 4 * args.health_interval):
                s = proxy_status(proxy).get(node.url, {})
                routable = s.get("is_healthy", bool(s)) and s.get("breaker", {}).get("state", "closed") == "closed"
                if routable:
                    back = time.monotonic() - ready
                    break
                time.sleep(0.05)
            restarts.append({"node": node.name, "restart_s": round(ready - t_start, 1),
                             "back_in_rotation_after_ready_s": None if back is None else round(back, 2)})
        for t in threads:
            t.join(args.timeout + 30)
        status = proxy_status(proxy)
        return {"proxy": args.proxy, "nodes": args.nodes, "duration_s": args.duration, "clients": args.clients,
                "kill_every_s": args.kill_every, "health_interval_s": args.health_interval, "kills": kills,
                "counts": dict(sorted(stats.c.items())), "examples": stats.examples,
                "failovers": metric(proxy, "lmserve_proxy_failovers_total") - failovers0,
                "breaker_opens": metric(proxy, "lmserve_proxy_node_breaker_opens_total"),
                "restarts": restarts,
                "breakers_now": {u: s.get("breaker") for u, s in status.items()}}
    finally:
        for n in nodes:
            n.kill()
        for p in procs:
            p.kill()
            p.wait()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", choices=("real", "fake"), default="real")
    p.add_argument("--proxy", choices=("lmserve", "lmdeploy"), default="lmserve")
    p.add_argument("--proxy-python", default=sys.executable, help="the python that has lmdeploy (--proxy lmdeploy)")
    p.add_argument("--strategy", default="prefix_aware")
    p.add_argument("--num-nodes", type=int, default=3)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--duration", type=float, default=180.0)
    p.add_argument("--kill-every", type=float, default=20.0)
    p.add_argument("--health-interval", type=float, default=5.0)
    p.add_argument("--timeout", type=float, default=120.0, help="per-request client timeout, seconds")
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--log-dir", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    result = chaos(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
