"""Prefill-decode disaggregation end to end: one prefill and one decode api_server (bundled SmolLM2) on 127.0.0.1
behind our proxy in DistServe mode; the KV cache migrates over TCP (ZeroMQ) between them.

The hybrid reference is the prefill server itself serving whole requests (same weights, same precision)."""
from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from conftest import start_api_server
from test_proxy_fakes import ServerThread, free_port

from lmserve.proxy.app import build_app
from lmserve.proxy.config import ProxyConfig

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]

# both servers (and so the reference) run what a user's do: the C++ kernels on the quantized weights
ARGS = ("--cache-block-count", "256", "--session-len", "2048", "--max-concurrent-requests", "16",
        "--migration-timeout", "4")
SYSTEM = ("You are a patient assistant in a bakery. You answer questions about bread, flour, yeast, ovens and "
          "the history of baking in short and friendly sentences, and you never make up facts. ") * 2
MODEL = "x"    # the served model's name, set by the fixture
# test hook (engine/disagg.py): each KV block read of a prompt containing SLOW waits 1 s, so a test can act while
# a migration is in flight (a SLOW prompt needs ~5 reads of 4 blocks)
SLOW = "Slowly"
HOOKS = {"LMSERVE_ENABLE_TEST_HOOKS": "1", "LMSERVE_TEST_KV_SLOW_READS": f"{SLOW}:1.0"}
QUESTIONS = ["What is sourdough?", "Why does bread rise?", "Name three flours.", "How hot is a bread oven?",
             "What is a baguette?", "Is rye bread healthy?", "What does kneading do?", "What is a levain?"]


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(f"lmserve:{name}") and not line.startswith("#"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


@pytest.fixture(scope="module")
def topology(tmp_path_factory, smollm2_path):
    logs = tmp_path_factory.mktemp("distserve")
    prefill = start_api_server(logs, "--role", "prefill", *ARGS, "--allow-terminate-by-client", env=HOOKS)
    try:
        decode = start_api_server(logs, "--role", "decode", *ARGS)
    except BaseException:
        prefill.stop()
        raise
    proxy = ServerThread(build_app(ProxyConfig(serving_strategy="DistServe", health_check_interval=1.0))).start()
    for url, role in ((prefill.url, 2), (decode.url, 3)):
        r = httpx.post(f"{proxy.url}/nodes/add", json={"url": url, "status": {"role": role}})
        assert r.status_code == 200, r.text
    deadline = time.monotonic() + 60
    while len(httpx.get(f"{proxy.url}/v1/models").json()["data"]) < 1 or \
            sum(n["is_healthy"] for n in httpx.get(f"{proxy.url}/nodes/status").json().values()) < 2:
        assert time.monotonic() < deadline, "nodes did not become healthy"
        time.sleep(0.2)
    global MODEL
    MODEL = httpx.get(f"{prefill.url}/v1/models").json()["data"][0]["id"]
    yield prefill, decode, proxy
    proxy.stop()
    decode.stop()
    prefill.stop()


def _wait_freed(url: str, timeout: float = 10) -> None:
    """The prefill server keeps no block: the decode server's free message is handled between engine steps."""
    deadline = time.monotonic() + timeout
    while httpx.get(f"{url}/distserve/stats").json()["num_pinned_sessions"] or \
            metric(url, "kv_cache_usage_perc") != 0.0:
        assert time.monotonic() < deadline, "the prefill server still keeps KV blocks"
        time.sleep(0.1)


def _messages(i: int) -> list[dict]:
    q = QUESTIONS[i % len(QUESTIONS)]
    if i % 2:   # short prompts (within one block) and long ones sharing a system prompt (prefix-cache hits)
        return [{"role": "user", "content": q}]
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]


def _chat(client: openai.OpenAI, i: int, stream: bool) -> str:
    kwargs = dict(model=MODEL, messages=_messages(i), max_tokens=16, temperature=0)
    if not stream:
        return client.chat.completions.create(**kwargs).choices[0].message.content
    return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs)
                   if c.choices)


def test_greedy_identical_to_hybrid(topology):
    prefill, decode, proxy = topology
    hybrid = openai.OpenAI(base_url=f"{prefill.url}/v1", api_key="x", timeout=120)
    via_proxy = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="x", timeout=120)
    hits_before = metric(prefill.url, "prefix_cache_hits_total")
    for i in range(16):
        stream = i >= 8
        want = _chat(hybrid, i, False)
        got = _chat(via_proxy, i, stream)
        assert got == want, f"prompt {i} (stream={stream})"
        _wait_freed(prefill.url)
    assert metric(decode.url, "prompt_tokens_total") == 0      # every prompt came as migrated KV
    assert metric(prefill.url, "prefix_cache_hits_total") > hits_before
    stats = httpx.get(f"{decode.url}/distserve/stats").json()
    assert stats["num_migrations"] == 16 and stats["num_migrated_bytes"] > 0
    # legacy completions go the same way
    comp = dict(model=MODEL, prompt=SYSTEM + "Q: What is rye?\nA:", max_tokens=8, temperature=0)
    assert httpx.post(f"{proxy.url}/v1/completions", json=comp, timeout=120).json()["choices"][0]["text"] == \
        httpx.post(f"{prefill.url}/v1/completions", json=comp, timeout=120).json()["choices"][0]["text"]


def test_bad_distserve_input(topology):
    prefill, decode, _ = topology
    info = json.loads(httpx.get(f"{decode.url}/distserve/engine_info").json())
    init = dict(local_engine_id=decode.url, local_engine_config=info, remote_engine_id=prefill.url,
                remote_engine_config={**info, "block_size": info["block_size"] * 2}, protocol=1)
    r = httpx.post(f"{decode.url}/distserve/p2p_initialize", json=init)
    assert r.status_code == 400 and r.json()["error"]["param"] == "remote_engine_config.block_size", r.text
    r = httpx.post(f"{decode.url}/distserve/p2p_initialize", json={**init, "remote_engine_config": info,
                                                                   "protocol": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "protocol"
    layout = json.dumps({"address": "tcp://127.0.0.1:1", "block_size": info["block_size"], "dtype": "bfloat16",
                         "num_layers": 30, "num_kv_heads": 3, "head_dim": 64})
    conn = dict(protocol=1, remote_engine_id="http://elsewhere:1", remote_engine_endpoint_info={"zmq_address": "x"},
                remote_kvtransfer_endpoint_info=[{"protocol": 1, "endpoint_info": layout}])
    r = httpx.post(f"{decode.url}/distserve/p2p_connect", json=conn)
    assert r.status_code == 400 and r.json()["error"]["param"] == "remote_kvtransfer_endpoint_info", r.text
    assert "dtype" in r.json()["error"]["message"]
    r = httpx.post(f"{decode.url}/distserve/p2p_drop_connect",
                   json={"engine_id": decode.url, "remote_engine_id": "http://nobody:1"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "remote_engine_id"
    r = httpx.post(f"{prefill.url}/distserve/free_cache",
                   json={"remote_engine_id": prefill.url, "remote_session_id": 987654})
    assert r.status_code == 404 and r.json()["error"]["param"] == "remote_session_id"
    r = httpx.post(f"{prefill.url}/distserve/free_cache", json={"remote_engine_id": prefill.url})
    assert r.status_code == 400 and r.json()["error"]["param"] == "remote_session_id"
    mig = dict(remote_engine_id="http://nobody:1", remote_session_id=1, remote_token_id=1)
    r = httpx.post(f"{decode.url}/v1/chat/completions",
                   json=dict(model=MODEL, messages="hi", max_tokens=4, migration_request=mig), timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "migration_request.remote_engine_id", r.text
    # both servers keep serving
    assert httpx.get(f"{decode.url}/health").status_code == 200


def test_lmdeploy_proxy_drives_our_servers(topology, tmp_path):
    """LMDeploy's own proxy (PyPI `lmdeploy`, `pip install --no-deps` into a separate venv with only the light
    deps its proxy imports; README, "Prefill-decode disaggregation") in DistServe mode with
    `--migration_protocol TCP` in front of our two servers. Opt-in: LMDEPLOY_PROXY_PYTHON names that venv's
    python (nothing is downloaded by the test)."""
    import os
    import subprocess
    python = os.environ.get("LMDEPLOY_PROXY_PYTHON")
    if not python:
        pytest.skip("set LMDEPLOY_PROXY_PYTHON to a python with lmdeploy installed (--no-deps)")
    prefill, decode, _ = topology
    port = free_port()
    proc = subprocess.Popen([python, "-m", "lmdeploy.serve.proxy.proxy", "--server_name", "127.0.0.1",
                             "--server_port", str(port), "--serving_strategy", "DistServe", "--migration_protocol",
                             "TCP", "--disable_cache_status", "True"],
                            stdout=open(tmp_path / "lmdeploy_proxy.log", "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{url}/nodes/status")
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and proc.poll() is None, "LMDeploy's proxy did not start"
                time.sleep(0.3)
        for node, role in ((prefill.url, 2), (decode.url, 3)):
            r = httpx.post(f"{url}/nodes/add", json={"url": node, "status": {"models": [MODEL], "role": role}})
            assert r.status_code == 200, r.text
        hybrid = openai.OpenAI(base_url=f"{prefill.url}/v1", api_key="x", timeout=120)
        theirs = openai.OpenAI(base_url=f"{url}/v1", api_key="x", timeout=120)
        before = httpx.get(f"{decode.url}/distserve/stats").json()["num_migrations"]
        for i in (0, 2, 5):
            want = _chat(hybrid, i, False)
            assert _chat(theirs, i, False) == want and _chat(theirs, i, True) == want
        assert httpx.get(f"{decode.url}/distserve/stats").json()["num_migrations"] == before + 6
        _wait_freed(prefill.url)
    finally:
        proc.terminate()
        proc.wait(10)


def test_unpulled_kv_is_freed_after_timeout(topology):
    """A decode server that never pulls (it died): the prefill server frees the blocks after --migration-timeout."""
    prefill, _, _ = topology
    body = dict(model=MODEL, messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}],
                max_tokens=1, temperature=0, preserve_cache=True, with_cache=True)
    r = httpx.post(f"{prefill.url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["cache_block_ids"] and len(info["remote_token_ids"]) == 1 and int(info["id"]) > 0
    assert httpx.get(f"{prefill.url}/distserve/stats").json()["num_pinned_sessions"] == 1
    assert metric(prefill.url, "kv_cache_usage_perc") > 0
    _wait_freed(prefill.url, 20)


def _stats(url: str) -> dict:
    return httpx.get(f"{url}/distserve/stats").json()


def _slow_migration(pool, prefill_url: str, proxy_url: str):
    """A request through the proxy whose KV migration is in flight (its first blocks were read) on return."""
    before = _stats(prefill_url)["num_bytes_served"]
    body = dict(model=MODEL, messages=[{"role": "system", "content": SYSTEM * 3},
                                       {"role": "user", "content": f"{SLOW}: what is rye?"}], max_tokens=8,
                temperature=0)
    fut = pool.submit(httpx.post, f"{proxy_url}/v1/chat/completions", json=body, timeout=120)
    deadline = time.monotonic() + 60
    while _stats(prefill_url)["num_bytes_served"] == before:
        assert time.monotonic() < deadline and not fut.done(), "the migration did not start"
        time.sleep(0.05)
    assert _stats(prefill_url)["num_pinned_sessions"] == 1
    return fut


def _wait_healthy(proxy_url: str, n: int) -> None:
    deadline = time.monotonic() + 30
    while sum(n["is_healthy"] for n in httpx.get(f"{proxy_url}/nodes/status").json().values()) < n:
        assert time.monotonic() < deadline, "nodes did not become healthy"
        time.sleep(0.2)


def test_sleep_drops_sessions_mid_migration(topology):
    """/sleep on the prefill server while a decode server pulls: the kept session is dropped before the KV cache
    goes, the client gets a 503 saying why, and after /wakeup migrations work again."""
    import concurrent.futures
    prefill, decode, proxy = topology
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = _slow_migration(pool, prefill.url, proxy.url)
        assert httpx.post(f"{prefill.url}/sleep", timeout=60).status_code == 200
        r = fut.result()
    assert r.status_code == 503 and "sleep" in r.json()["error"]["message"], r.text
    stats = _stats(prefill.url)
    assert stats["num_pinned_sessions"] == 0 and stats["num_dropped_sessions"] == 1
    assert httpx.get(f"{decode.url}/health").status_code == 200
    assert httpx.post(f"{prefill.url}/wakeup", timeout=60).status_code == 200
    assert metric(prefill.url, "kv_cache_usage_perc") == 0.0
    _wait_healthy(proxy.url, 2)
    migrations = _stats(decode.url)["num_migrations"]
    hybrid = openai.OpenAI(base_url=f"{prefill.url}/v1", api_key="x", timeout=120)
    via_proxy = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="x", timeout=120)
    assert _chat(via_proxy, 0, False) == _chat(hybrid, 0, False)
    assert _stats(decode.url)["num_migrations"] == migrations + 1
    _wait_freed(prefill.url)


def test_decode_killed_mid_migration(topology):
    """Kill the decode server while it pulls the KV: the client gets a clean error, the prefill server frees every
    kept block; later requests fall back to hybrid serving."""
    import concurrent.futures
    prefill, decode, proxy = topology
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = _slow_migration(pool, prefill.url, proxy.url)
        decode.proc.kill()
        decode.proc.wait()
        r = fut.result()
    assert r.status_code in (502, 503) and r.json()["error"]["message"], r.text
    _wait_freed(prefill.url, 20)
    # the proxy's health check takes the decode node out; requests are then served whole by the prefill node
    deadline = time.monotonic() + 20
    while True:
        r = httpx.post(f"{proxy.url}/v1/chat/completions", timeout=120,
                       json=dict(model=MODEL, messages="hello", max_tokens=4, temperature=0))
        if r.status_code == 200:
            break
        assert time.monotonic() < deadline, r.text
        time.sleep(0.5)


def test_terminate_waits_for_kept_sessions(topology):
    """(After the decode server is gone.) /terminate on the prefill server keeps the process up while a session
    waits to be pulled, refuses new work, and exits once the session expires (--migration-timeout 4 s)."""
    prefill, _, _ = topology
    body = dict(model=MODEL, messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}],
                max_tokens=1, temperature=0, preserve_cache=True, with_cache=True)
    assert httpx.post(f"{prefill.url}/v1/chat/completions", json=body, timeout=120).status_code == 200
    t0 = time.monotonic()
    assert httpx.get(f"{prefill.url}/terminate").status_code == 200
    time.sleep(1.0)
    assert prefill.proc.poll() is None and _stats(prefill.url)["num_pinned_sessions"] == 1
    assert httpx.post(f"{prefill.url}/v1/chat/completions", json=body, timeout=60).status_code == 503
    prefill.proc.wait(60)
    assert time.monotonic() - t0 > 2.0
    assert "was not pulled within" in prefill.log_tail()


def test_prefill_killed_fails_fast(topology):
    """(Runs last: the decode server is gone, the prefill server has exited above; killed, it looks the same to
    the proxy: connection refused.) A dead prefill node: requests fail at once, no hang."""
    prefill, _, proxy = topology
    prefill.proc.kill()
    prefill.proc.wait()
    t0 = time.monotonic()
    r = httpx.post(f"{proxy.url}/v1/chat/completions", timeout=60,
                   json=dict(model=MODEL, messages="hello", max_tokens=4))
    assert r.status_code in (502, 503), r.text
    assert time.monotonic() - t0 < 15
