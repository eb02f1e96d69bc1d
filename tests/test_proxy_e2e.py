"""Acceptance tests: three real api_server processes (bundled SmolLM2, small KV cache) behind the proxy on
127.0.0.1. Registration via --proxy-url, routing per strategy, session affinity, killing a node under a load of
streaming requests, the node coming back, 404/503 errors, and `lmserve serve launch`."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
from test_proxy_fakes import ServerThread, free_port, free_port_run

from lmserve.proxy.app import build_app
from lmserve.proxy.config import STRATEGIES, ProxyConfig

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

NODE_ARGS = ("--cache-block-count", "256", "--session-len", "2048", "--max-concurrent-requests", "32")
NUM_NODES = 3


def popen_lmserve(args: list[str], log_path: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lmserve", *args], stdout=open(log_path, "w"),
                            stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def tail(path: str, n: int = 3000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-n:]


def wait_for(predicate, timeout: float, what: str, procs=(), logs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p, log in zip(procs, logs):
            if p.poll() is not None:
                raise RuntimeError(f"{what}: process exited {p.returncode}:\n{tail(log)}")
        try:
            if predicate():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{what}: not within {timeout}s")


def start_node(port: int, proxy_url: str, log_dir) -> subprocess.Popen:
    return popen_lmserve(["serve", "api_server", "--server-name", "127.0.0.1", "--server-port", str(port),
                          "--proxy-url", proxy_url, "--log-level", "WARNING", *NODE_ARGS],
                         str(log_dir / f"node_{port}.log"))


def healthy_nodes(proxy_url: str, headers: dict | None = None) -> set[str]:
    status = httpx.get(f"{proxy_url}/nodes/status", headers=headers).json()
    return {u for u, s in status.items() if s["is_healthy"]}


class Cluster:
    def __init__(self, log_dir):
        self.log_dir = log_dir
        self.proxy_port = free_port()
        self.proxy_url = f"http://127.0.0.1:{self.proxy_port}"
        self.proxy = popen_lmserve(["serve", "proxy", "--server-name", "127.0.0.1", "--server-port",
                                    str(self.proxy_port), "--strategy", "min_expected_latency",
                                    "--health-check-interval", "1", "--node-file", str(log_dir / "nodes.json")],
                                   str(log_dir / "proxy.log"))
        self.ports = [free_port() for _ in range(NUM_NODES)]
        self.nodes = {}
        wait_for(lambda: httpx.get(f"{self.proxy_url}/health").status_code == 200, 60, "proxy", [self.proxy],
                 [str(log_dir / "proxy.log")])
        for port in self.ports:
            self.nodes[port] = start_node(port, self.proxy_url, log_dir)
        self.wait_healthy(NUM_NODES)
        self.urls = [f"http://127.0.0.1:{p}" for p in self.ports]
        self.model = httpx.get(f"{self.proxy_url}/v1/models").json()["data"][0]["id"]

    def wait_healthy(self, n: int, timeout: float = 400):
        wait_for(lambda: len(healthy_nodes(self.proxy_url)) >= n, timeout, f"{n} healthy nodes",
                 [self.proxy, *self.nodes.values()],
                 [str(self.log_dir / "proxy.log")] + [str(self.log_dir / f"node_{p}.log") for p in self.nodes])

    def stop(self):
        for p in [*self.nodes.values(), self.proxy]:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in [*self.nodes.values(), self.proxy]:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, smollm2_path):
    c = Cluster(tmp_path_factory.mktemp("proxy_e2e"))
    yield c
    c.stop()


@pytest.fixture
def local_proxy(cluster):
    """An in-process proxy with the given strategy, over the cluster's nodes."""
    started = []

    def start(strategy: str, with_nodes: bool = True, **kw) -> str:
        proxy = ServerThread(build_app(ProxyConfig(server_name="127.0.0.1", strategy=strategy,
                                                   health_check_interval=1.0, **kw))).start()
        started.append(proxy)
        for url in cluster.urls if with_nodes else ():
            assert httpx.post(f"{proxy.url}/nodes/add", json={"url": url}).status_code == 200
        return proxy.url

    yield start
    for p in started:
        p.stop(force=True)


def chat(model: str, system: str = "You are a helpful assistant.", user: str = "Say hi.", **kw) -> dict:
    return {"model": model, "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "max_tokens": 4, "temperature": 0.0, **kw}


def test_api_servers_register_with_proxy_url(cluster):
    status = httpx.get(f"{cluster.proxy_url}/nodes/status").json()
    assert set(status) == set(cluster.urls)
    assert all(s["is_healthy"] and s["models"] == [cluster.model] for s in status.values())
    models = httpx.get(f"{cluster.proxy_url}/v1/models").json()["data"]
    assert [m["id"] for m in models] == [cluster.model]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_routing_per_strategy(cluster, local_proxy, strategy):
    proxy = local_proxy(strategy)
    served = []
    for i in range(9):
        system = "You are a helpful assistant. " * 20 if strategy == "prefix_aware" else "Be brief."
        r = httpx.post(f"{proxy}/v1/chat/completions", json=chat(cluster.model, system, f"Question {i}?"), timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"]
        served.append(r.headers["x-lmserve-node"])
    if strategy == "prefix_aware":
        assert len(set(served)) == 1, served          # one shared system prompt: one node holds it
        others = {httpx.post(f"{proxy}/v1/chat/completions", json=chat(cluster.model, f"{k} " * 80, "Hi"),
                             timeout=60).headers["x-lmserve-node"] for k in range(10)}
        assert len(others) >= 2                       # different prefixes spread over the nodes
    else:
        assert len(set(served)) >= 2, served          # idle nodes: requests spread


def test_every_endpoint_through_the_proxy(cluster):
    base = cluster.proxy_url
    r = httpx.post(f"{base}/v1/completions", json={"model": cluster.model, "prompt": "1, 2, 3,", "max_tokens": 3},
                   timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"]
    r = httpx.post(f"{base}/generate", json={"prompt": "Hello", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200, r.text
    for path, body in (("/v1/embeddings", {"model": cluster.model, "input": "hello"}),
                       ("/v1/encode", {"input": "hello"}), ("/pooling", {"model": cluster.model, "input": "hi"})):
        r = httpx.post(f"{base}{path}", json=body, timeout=60)
        assert r.status_code in (200, 400), (path, r.text)    # routed: the node answered, in the OpenAI shape
        assert r.status_code == 200 or "error" in r.json()


def test_streaming_matches_direct(cluster):
    direct = openai.OpenAI(base_url=f"{cluster.urls[0]}/v1", api_key="x")
    proxied = openai.OpenAI(base_url=f"{cluster.proxy_url}/v1", api_key="x")
    kw = {"model": cluster.model, "messages": [{"role": "user", "content": "Count to five."}], "max_tokens": 16,
          "temperature": 0.0}
    expected = direct.chat.completions.create(**kw).choices[0].message.content
    chunks = [c.choices[0].delta.content or "" for c in proxied.chat.completions.create(stream=True, **kw)
              if c.choices]
    assert "".join(chunks) == expected and len([c for c in chunks if c]) > 1


def test_session_affinity(cluster, local_proxy):
    proxy = local_proxy("random")
    for session_id in (101, 102, 103):
        nodes = {httpx.post(f"{proxy}/v1/chat/completions", json=chat(cluster.model, session_id=session_id),
                            timeout=60).headers["x-lmserve-node"] for _ in range(5)}
        assert len(nodes) == 1
        r = httpx.post(f"{proxy}/generate", json={"prompt": "hi", "max_tokens": 2, "session_id": session_id},
                       timeout=60)
        assert r.headers["x-lmserve-node"] in nodes


def test_interactive_session_through_the_proxy(cluster, local_proxy):
    """/v1/chat/interactive keeps a session's history on one node: every turn must reach it."""
    proxy = local_proxy("random")
    turns = []
    for i, prompt in enumerate(["Hi, my name is Ann.", "What is my name?", "Thanks!"]):
        body = {"prompt": prompt, "session_id": 555, "interactive_mode": True, "request_output_len": 4,
                "temperature": 0.0, "stream": i == 1}
        r = httpx.post(f"{proxy}/v1/chat/interactive", json=body, timeout=60)
        assert r.status_code == 200, r.text
        last = json.loads(r.text.strip().splitlines()[-1])
        turns.append((r.headers["x-lmserve-node"], last["history_tokens"]))
    assert len({node for node, _ in turns}) == 1
    assert turns[0][1] == 0 and turns[1][1] > 0 and turns[2][1] > turns[1][1]   # the history grew on that node


def test_unknown_model_404_and_no_nodes_503(cluster, local_proxy):
    r = httpx.post(f"{cluster.proxy_url}/v1/chat/completions", json=chat("no-such-model"))
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    empty = local_proxy("random", with_nodes=False)
    r = httpx.post(f"{empty}/v1/chat/completions", json=chat(cluster.model))
    assert r.status_code == 503 and r.json()["error"]["message"]


async def _stream_one(client: httpx.AsyncClient, url: str, body: dict, kill_time: list) -> dict:
    out = {"first_at": None, "ok": False, "error": None, "text": ""}
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                out["error"] = f"status {r.status_code}: {(await r.aread())[:200]!r}"
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if out["first_at"] is None:
                    out["first_at"] = time.monotonic()
                if line == "data: [DONE]":
                    out["ok"] = True
                    break
                data = json.loads(line[6:])
                if "error" in data:
                    out["error"] = data["error"]["message"]
                    break
                out["text"] += "".join(c["delta"].get("content") or "" for c in data.get("choices", []))
    except httpx.HTTPError as e:
        out["error"] = repr(e)
    out["started_before_kill"] = out["first_at"] is not None and kill_time and out["first_at"] < kill_time[0]
    return out


def test_kill_a_node_under_streaming_load_then_it_returns(cluster):
    victim_port = cluster.ports[1]
    victim_url = f"http://127.0.0.1:{victim_port}"
    body = chat(cluster.model, user="Write a long story about a cat.", max_tokens=48, stream=True, ignore_eos=True)
    kill_time: list[float] = []

    async def run():
        async with httpx.AsyncClient(timeout=httpx.Timeout(120.0)) as client:
            tasks = [asyncio.create_task(_stream_one(client, cluster.proxy_url, body, kill_time)) for _ in range(18)]
            await asyncio.sleep(2.0)                     # some streams are running, others still queued
            cluster.nodes[victim_port].kill()            # SIGKILL: no deregistration, connections reset
            kill_time.append(time.monotonic())
            tasks += [asyncio.create_task(_stream_one(client, cluster.proxy_url, body, kill_time)) for _ in range(6)]
            return await asyncio.wait_for(asyncio.gather(*tasks), 300)   # none hangs

    results = asyncio.run(run())
    cluster.nodes[victim_port].wait()
    not_started = [r for r in results if not r["started_before_kill"]]
    assert not_started and all(r["ok"] and r["text"] for r in not_started), \
        [r["error"] for r in not_started if not r["ok"]]
    for r in results:                                   # streams cut by the kill end with an error event
        assert r["ok"] or r["error"]
    assert victim_url not in healthy_nodes(cluster.proxy_url)
    # the node comes back on the same port, registers again and gets traffic
    cluster.nodes[victim_port] = start_node(victim_port, cluster.proxy_url, cluster.log_dir)
    cluster.wait_healthy(NUM_NODES)
    served = set()
    for i in range(30):
        r = httpx.post(f"{cluster.proxy_url}/v1/chat/completions", json=chat(cluster.model, user=f"q{i}"),
                       timeout=60)
        assert r.status_code == 200
        served.add(r.headers["x-lmserve-node"])
        if victim_url in served:
            break
    assert victim_url in served


def test_launch_starts_servers_behind_a_proxy(tmp_path, smollm2_path):
    port, base = free_port(), free_port_run(2)
    log = str(tmp_path / "launch.log")
    proc = popen_lmserve(["serve", "launch", "--num-servers", "2", "--server-name", "127.0.0.1",
                          "--server-port", str(port), "--base-port", str(base), "--cache-block-count", "128",
                          "--strategy", "prefix_aware", "--health-check-interval", "1", "--api-keys", "sk-test"], log)
    url = f"http://127.0.0.1:{port}"
    auth = {"Authorization": "Bearer sk-test"}   # the api_servers get the proxy's keys: registration, checks
    try:
        wait_for(lambda: len(healthy_nodes(url, auth)) == 2, 400, "launch", [proc], [log])
        assert healthy_nodes(url, auth) == {f"http://127.0.0.1:{base}", f"http://127.0.0.1:{base + 1}"}
        model = httpx.get(f"{url}/v1/models", headers=auth).json()["data"][0]["id"]
        assert httpx.post(f"{url}/v1/chat/completions", json=chat(model), timeout=60).status_code == 401
        r = httpx.post(f"{url}/v1/chat/completions", json=chat(model), timeout=60, headers=auth)
        assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)                  # as `docker stop` would: children stop too
        assert proc.wait(60) == 0, tail(log)
    for p in (port, base, base + 1):                     # every process is gone
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{p}/health", timeout=2)
