"""A second api_server with API keys, a tiny admission limit and client termination enabled: auth, 429 with
Retry-After, live weight updates, sleep level 2, and /terminate (finish in-flight, then exit)."""
from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import threading
import time

import httpx
import openai
import pytest
import torch
from conftest import start_api_server
from safetensors.torch import save

KEY = "sk-lmserve-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_path):
    server = start_api_server(tmp_path_factory.mktemp("api_server_admin"), "--cache-block-count", "256",
                              "--session-len", "1024", "--api-keys", KEY, "other-key",
                              "--max-concurrent-requests", "1", "--max-queued-requests", "1",
                              "--allow-terminate-by-client", "--model-name", "smol",
                              "--weights", "float",   # /update_weights writes float weights
                              "--allow-origins", "http://example.com")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def url(server) -> str:
    return server.url


def _complete(url: str, prompt: str = "The sky is", max_tokens: int = 8, **kw) -> httpx.Response:
    body = {"model": "smol", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **kw}
    return httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=120)


def test_api_keys(url):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        resp = httpx.get(f"{url}/v1/models", headers=headers)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/v1/models", headers=AUTH).json()["data"][0]["id"] == "smol"
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer other-key"}).status_code == 200
    assert httpx.get(f"{url}/health").status_code == 200 and httpx.get(f"{url}/metrics").status_code == 200
    assert httpx.post(f"{url}/generate", json={"prompt": "hi"}).status_code == 401
    assert httpx.get(f"{url}/terminate").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    out = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0).chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert out.choices[0].message.content is not None


def test_cors_preflight_and_headers(url):
    pre = httpx.options(f"{url}/v1/chat/completions", headers={
        "Origin": "http://example.com", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://example.com"
    resp = httpx.get(f"{url}/v1/models", headers={**AUTH, "Origin": "http://example.com"})
    assert resp.headers["access-control-allow-origin"] == "http://example.com"
    other = httpx.options(f"{url}/v1/models", headers={"Origin": "http://evil.example",
                                                        "Access-Control-Request-Method": "GET"})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers


def test_beyond_running_and_queued_limits_is_429_with_retry_after(url):
    def one(_):
        return _complete(url, "Count to ten:", max_tokens=24, ignore_eos=True)

    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        responses = list(pool.map(one, range(5)))
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 2 and codes.count(429) >= 1, codes    # 1 running + 1 queued always get in
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["Retry-After"] == "1" and refused.json()["error"]["type"] == "rate_limit_error"
    assert all(r.json()["usage"]["completion_tokens"] == 24 for r in responses if r.status_code == 200)
    metrics = httpx.get(f"{url}/metrics").text
    assert "lmserve:api_requests_rejected_total" in metrics


def _safetensors_b64(tensors: dict[str, torch.Tensor]) -> str:
    return base64.b64encode(save(tensors)).decode()


def test_update_weights_changes_outputs_and_sleep_level_2_restores_them(url):
    before = _complete(url).json()["choices"][0]["text"]
    g = torch.Generator().manual_seed(0)
    norm = torch.rand(576, generator=g) * 4 - 2
    resp = httpx.post(f"{url}/update_weights", headers=AUTH, timeout=120,
                      json={"serialized_named_tensors": _safetensors_b64({"model.norm.weight": norm})})
    assert resp.status_code == 200 and resp.json() == {"status": "success", "num_tensors": 1}
    changed = _complete(url).json()["choices"][0]["text"]
    assert changed != before
    # the torch.save form, as a list of blobs
    buf = io.BytesIO()
    torch.save({"model.norm.weight": torch.ones(576)}, buf)
    resp = httpx.post(f"{url}/update_weights", headers=AUTH, timeout=120,
                      json={"serialized_named_tensors": [base64.b64encode(buf.getvalue()).decode()],
                            "load_format": "torch", "finished": True})
    assert resp.status_code == 200
    assert _complete(url).json()["choices"][0]["text"] not in (changed,)
    for bad, param in (({"serialized_named_tensors": "not base64!"}, "serialized_named_tensors"),
                       ({"serialized_named_tensors": _safetensors_b64({"x": torch.ones(1)}), "load_format": "gguf"},
                        "load_format"),
                       ({"serialized_named_tensors": _safetensors_b64({"model.nope.weight": torch.ones(1)})},
                        "serialized_named_tensors")):
        r = httpx.post(f"{url}/update_weights", headers=AUTH, json=bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == param
    # level 2 drops the weights; waking up reloads them from disk: the original outputs are back
    assert httpx.post(f"{url}/sleep", params={"level": 2}, headers=AUTH, timeout=120).status_code == 200
    assert _complete(url).status_code == 503
    assert httpx.post(f"{url}/wakeup", headers=AUTH, timeout=300).status_code == 200
    assert _complete(url).json()["choices"][0]["text"] == before


def test_terminate_finishes_in_flight_requests_then_exits(server, url):
    events: list[dict] = []
    started = threading.Event()

    def stream():
        body = {"model": "smol", "prompt": "Count to ten:", "max_tokens": 16, "ignore_eos": True, "temperature": 0,
                "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH, timeout=120) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    started.set()
                    events.append(line[6:])

    queued: list[httpx.Response] = []
    t = threading.Thread(target=stream)
    t.start()
    assert started.wait(120)
    q = threading.Thread(target=lambda: queued.append(_complete(url, "Count to ten:", max_tokens=4)))
    q.start()    # waits in the admission queue behind the stream (--max-concurrent-requests 1)
    deadline = time.monotonic() + 30
    while "lmserve:api_requests_queued 1.0" not in httpx.get(f"{url}/metrics").text:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert httpx.get(f"{url}/terminate", headers=AUTH).json() == {"status": "success"}
    try:
        late = _complete(url)
        assert late.status_code == 503 and late.json()["error"]["code"] == "terminating"
    except httpx.TransportError:
        pass    # already gone: also fine
    t.join(120)
    q.join(120)
    assert queued[0].status_code == 200 and queued[0].json()["usage"]["completion_tokens"] == 4
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["choices"][0]["finish_reason"] == "length"
    assert server.proc.wait(60) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=2)

