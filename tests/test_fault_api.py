"""Issue 25 over HTTP: a request that makes the engine raise fails alone (a 500 naming the error, or an SSE error
event once its stream started), the others finish as if alone, a dead engine loop restarts, /health tells the
truth and /metrics counts it all. Faults come from the test-only injector (engine/fault.py)."""
from __future__ import annotations

import concurrent.futures
import os
import re
import time

import httpx
import openai
import pytest
from conftest import start_api_server

pytestmark = pytest.mark.timeout(900)

# the sampler fault fires once the request has 2 tokens (mid-stream); the others at its first step
FAULTS = "sampler:ZQSAMPLE@2,forward:ZQFORWARD,loop:ZQLOOP"
PROMPTS = ["Name three colours.", "Count from 1 to 5.", "What is 2+2?", "Say hello in French.",
           "Name a fruit.", "What is the capital of Italy?", "Spell cat.", "Name a planet."]


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_path):
    env_before = os.environ.get("LMSERVE_ENABLE_TEST_HOOKS")
    os.environ["LMSERVE_ENABLE_TEST_HOOKS"] = "1"       # start_api_server hands the environment on
    try:
        s = start_api_server(tmp_path_factory.mktemp("faults"), "--cache-block-count", "256", "--session-len", "512",
                             "--max-concurrent-requests", "16", "--test-fault-injection", FAULTS,
                             "--kernel-build-timeout", "60", timeout=600)
    finally:
        if env_before is None:
            os.environ.pop("LMSERVE_ENABLE_TEST_HOOKS", None)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=180)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def stream_text(client, prompt: str, max_tokens: int = 6) -> str:
    chunks = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=max_tokens,
                                            messages=[{"role": "user", "content": prompt}], temperature=0.0,
                                            stream=True)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    m = re.search(rf"^lmserve:{name} ([0-9.e+]+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def test_a_sampler_fault_in_one_of_8_streams_fails_only_it(server, client):
    solo = {p: stream_text(client, p) for p in PROMPTS}
    bad = 3
    prompts = [p + (" ZQSAMPLE" if i == bad else "") for i, p in enumerate(PROMPTS)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(stream_text, client, p) for p in prompts]
        results = [f.exception() or f.result() for f in futures]
    err = results[bad]
    assert isinstance(err, openai.APIError), err
    assert "injected sampler fault" in str(err), err       # the SSE error event names the error
    for i, p in enumerate(PROMPTS):
        if i != bad:
            assert results[i] == solo[p], (p, results[i], solo[p])
    assert metric(server.url, "engine_isolated_requests_total") >= 1
    assert metric(server.url, "engine_faults_total") >= 1
    assert "failed: the engine step raised RuntimeError: injected sampler fault" in server.log_tail(100000)


def test_a_forward_fault_fails_its_request_and_the_next_is_served(server, client, model):
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": "Hi ZQFORWARD"}], "max_tokens": 4})
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert err["code"] == "engine_fault" and "injected forward fault" in err["message"], err
    assert stream_text(client, PROMPTS[0], 4)
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_an_engine_loop_death_restarts_the_engine_and_nothing_hangs(server, client, model):
    restarts = metric(server.url, "engine_restarts_total")
    running = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Write a long story about a dragon."}], max_tokens=200,
        temperature=0.0, stream=True, extra_body={"ignore_eos": True})
    first = next(iter(running))                     # in flight: it has a token
    assert first.choices
    # queued behind the fault: the restart keeps it, and it is answered
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": "Hi ZQLOOP"}], "max_tokens": 4})
    assert r.status_code == 200, r.text
    with pytest.raises(openai.APIError, match="restarted"):
        for _ in running:                           # the in-flight stream ends with an error event, not a hang
            pass
    deadline = time.monotonic() + 30
    while httpx.get(f"{server.url}/health", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the engine did not come back"
        time.sleep(0.2)
    assert metric(server.url, "engine_restarts_total") == restarts + 1
    assert stream_text(client, PROMPTS[1], 4)
    assert metric(server.url, "num_requests_running") == 0
