"""Hostile and careless clients against a real api_server with small limits: LMDeploy clients' default payloads,
big bodies, unbounded fan-out, slow bodies, lone surrogates, odd values; and a clean SIGTERM stop that
deregisters from the proxy."""
from __future__ import annotations

import json
import math
import signal
import socket
import threading
import time

import httpx
import pytest
from conftest import start_api_server
from test_api_errors import _error as error_of
from test_proxy_fakes import ServerThread

from lmserve.proxy.app import build_app as build_proxy_app
from lmserve.proxy.config import ProxyConfig

pytestmark = pytest.mark.timeout(300)

SESSION_LEN = 512
LIMIT_ARGS = ("--cache-block-count", "128", "--session-len", str(SESSION_LEN), "--max-concurrent-requests", "2",
              "--max-queued-requests", "2", "--max-request-body-bytes", "1000000", "--body-read-timeout", "2",
              "--max-n", "4", "--max-logprobs", "5", "--max-stop-sequences", "4", "--max-logit-bias", "8",
              "--max-prompts", "4")


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_path):
    s = start_api_server(tmp_path_factory.mktemp("hardening"), *LIMIT_ARGS)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def url(server) -> str:
    return server.url


@pytest.fixture(scope="module")
def model(url) -> str:
    return httpx.get(f"{url}/v1/models").json()["data"][0]["id"]


def post_raw(url: str, path: str, body: dict, timeout: float = 60) -> httpx.Response:
    """JSON with ASCII escapes (so lone surrogates and NaN travel as clients send them)."""
    return httpx.post(f"{url}{path}", content=json.dumps(body).encode(), timeout=timeout,
                      headers={"content-type": "application/json"})


def test_lmdeploy_api_client_default_payloads_are_accepted(url, model):
    """What LMDeploy's APIClient (0.9 / 0.17 lines) sends when called with only model and messages/prompt."""
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "temperature": 0.7, "top_p": 1.0,
            "logprobs": False, "top_logprobs": 0, "n": 1, "max_tokens": 3, "stop": None, "stream": False,
            "presence_penalty": 0.0, "frequency_penalty": 0.0, "user": None, "repetition_penalty": 1.0,
            "session_id": -1, "ignore_eos": False, "skip_special_tokens": True,
            "spaces_between_special_tokens": True, "top_k": 40, "min_new_tokens": None, "min_p": 0.0,
            "logit_bias": None, "seed": None, "stream_options": None, "tools": None, "tool_choice": "auto",
            "response_format": None, "reasoning_effort": None, "enable_thinking": None}
    r = post_raw(url, "/v1/chat/completions", chat)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["logprobs"] is None
    completion = {"model": model, "prompt": "hi", "suffix": None, "temperature": 0.7, "n": 1, "max_tokens": 3,
                  "stream": False, "stop": None, "top_p": 1.0, "top_k": 40, "user": None,
                  "repetition_penalty": 1.0, "session_id": -1, "ignore_eos": False, "skip_special_tokens": True,
                  "spaces_between_special_tokens": True, "logprobs": None, "echo": False, "best_of": None,
                  "min_new_tokens": None, "min_p": 0.0, "seed": None}
    assert post_raw(url, "/v1/completions", completion).status_code == 200
    interactive = {"prompt": "hi", "session_id": -1, "interactive_mode": False, "stream": False, "stop": None,
                   "request_output_len": 3, "top_p": 0.8, "top_k": 40, "temperature": 0.8,
                   "repetition_penalty": 1.0, "ignore_eos": False, "skip_special_tokens": True,
                   "adapter_name": None}
    assert post_raw(url, "/v1/chat/interactive", interactive).status_code == 200
    # a positive top_logprobs still needs logprobs, as in OpenAI and LMDeploy
    error_of(post_raw(url, "/v1/chat/completions", {**chat, "top_logprobs": 2}), 400, "top_logprobs")


def test_oversized_body_is_413_and_never_stalls_health(url, model):
    big = "hello " * 400_000                                   # 2.4 MB: over --max-request-body-bytes
    fits_body = "hello " * 150_000                             # 0.9 MB: under it, but far over the session
    results: list[tuple[int, float]] = []

    def send(path: str, body: dict):
        t0 = time.monotonic()
        r = post_raw(url, path, body)
        results.append((r.status_code, time.monotonic() - t0))

    threads = [threading.Thread(target=send, args=args) for args in [
        ("/v1/completions", {"model": model, "prompt": big}),
        ("/v1/encode", {"input": big}),
        ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": fits_body}]}),
        ("/v1/encode", {"input": fits_body}),
        ("/generate", {"prompt": fits_body})]]
    for t in threads:
        t.start()
    health = []
    while any(t.is_alive() for t in threads):
        t0 = time.monotonic()
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        health.append(time.monotonic() - t0)
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert sorted(code for code, _ in results) == [400, 400, 400, 413, 413], results
    assert max(health, default=0) < 4.0, health     # on a busy shared CI machine; main stalled for 10 s+
    err = error_of(post_raw(url, "/v1/completions", {"model": model, "prompt": big}), 413)
    assert "--max-request-body-bytes" in err["message"]
    err = error_of(post_raw(url, "/v1/encode", {"input": fits_body}), 400, "input")
    assert err["code"] == "context_length_exceeded"


@pytest.mark.parametrize("path, extra, param", [
    ("/v1/chat/completions", {"n": 5}, "n"),
    ("/v1/chat/completions", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/chat/completions", {"logit_bias": {str(i): 1.0 for i in range(9)}}, "logit_bias"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 6}, "top_logprobs"),
    ("/v1/completions", {"n": 5}, "n"),
    ("/v1/completions", {"n": 4, "best_of": 5}, "best_of"),
    ("/v1/completions", {"logprobs": 6}, "logprobs"),
    ("/v1/completions", {"prompt": ["a", "b", "c", "d", "e"]}, "prompt"),
    ("/v1/completions", {"prompt": [[1], [2], [3], [4], [5]]}, "prompt"),
    ("/v1/embeddings", {"input": ["a", "b", "c", "d", "e"]}, "input"),
    ("/generate", {"stop_token_ids": [1, 2, 3, 4, 5]}, "stop_token_ids"),
    ("/v1/chat/interactive", {"stop": ["a", "b", "c", "d", "e"]}, "stop")])
def test_fan_out_beyond_the_limits_is_400(url, model, path, extra, param):
    base = {"/v1/chat/completions": {"model": model, "messages": [{"role": "user", "content": "hi"}]},
            "/v1/completions": {"model": model, "prompt": "hi"}, "/v1/embeddings": {"model": model},
            "/generate": {"prompt": "hi"}, "/v1/chat/interactive": {"prompt": "hi"}}[path]
    err = error_of(post_raw(url, path, {**base, "max_tokens": 2, **extra}), 400, param)
    assert err["code"] == "limit_exceeded" and "--max-" in err["message"]


def test_n_at_the_limit_is_served(url, model):
    r = post_raw(url, "/v1/completions", {"model": model, "prompt": "hi", "n": 4, "max_tokens": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == 4


def _stall(url: str) -> socket.socket:
    """Headers and 10% of a body, then silence."""
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 1000\r\n\r\n" + b'{"model": "x", "messages": ' + b" " * 73)
    return s


def test_slow_bodies_hold_no_admission_slot_and_time_out(url, model):
    stalled = [_stall(url) for _ in range(6)]     # more than the 2 running + 2 queued slots
    try:
        time.sleep(0.5)
        r = post_raw(url, "/v1/chat/completions", {"model": model, "max_tokens": 2,
                                                   "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text       # not 429: the stalled clients hold no slot
        for s in stalled:
            s.settimeout(10)
            head = s.recv(4096)
            assert head.startswith(b"HTTP/1.1 408"), head[:100]   # --body-read-timeout 2
    finally:
        for s in stalled:
            s.close()


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages"),
    ("/v1/chat/completions", {"messages": "a\ud800b", "do_preprocess": False}, "messages"),
    ("/v1/completions", {"prompt": "a\ud800b"}, "prompt"),
    ("/v1/completions", {"prompt": ["ok", "a\udc00"]}, "prompt[1]"),
    ("/generate", {"prompt": "a\ud800b"}, "prompt"),
    ("/v1/chat/interactive", {"prompt": "a\ud800b"}, "prompt"),
    ("/v1/embeddings", {"input": "a\ud800b"}, "input"),
    ("/v1/encode", {"input": "a\ud800b"}, "input"),
    ("/v1/encode", {"input": "a\ud800b", "do_preprocess": True}, "input"),
    ("/v1/chat/completions", {"model": "m\ud800", "messages": "hi"}, "model")])
def test_lone_surrogates_are_400_naming_the_field(url, model, path, body, param):
    body = {"model": model, "max_tokens": 2, **body}
    error_of(post_raw(url, path, body), 400, param)
    assert httpx.get(f"{url}/health").status_code == 200


@pytest.mark.parametrize("field, value", [
    ("temperature", math.nan), ("temperature", math.inf), ("repetition_penalty", math.nan),
    ("repetition_penalty", math.inf), ("presence_penalty", math.nan), ("seed", 2**70), ("seed", -(2**64))])
def test_non_finite_and_out_of_range_values_are_400(url, model, field, value):
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, field: value}
    error_of(post_raw(url, "/v1/chat/completions", body), 400, field)


def test_booleans_are_not_token_ids(url, model):
    error_of(post_raw(url, "/v1/embeddings", {"model": model, "input": [True, False]}), 400, "input")
    err = error_of(post_raw(url, "/generate", {"input_ids": [True, False], "max_tokens": 2}), 400)
    assert err["param"].startswith("input_ids"), err


def test_update_weights_after_sleep_level_2_is_409(url):
    assert httpx.post(f"{url}/sleep", params={"level": 2}, timeout=60).status_code == 200
    try:
        r = httpx.post(f"{url}/update_weights", json={"serialized_named_tensors": "AAAA"}, timeout=60)
        assert error_of(r, 409)["code"] == "weights_released"
    finally:
        assert httpx.post(f"{url}/wakeup", timeout=300).status_code == 200


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_deregisters_from_the_proxy_and_exits_0(tmp_path, smollm2_path, sig):
    proxy = ServerThread(build_proxy_app(ProxyConfig(server_name="127.0.0.1", health_check_interval=1.0))).start()
    try:
        node = start_api_server(tmp_path, "--cache-block-count", "64", "--session-len", "256",
                                "--proxy-url", proxy.url)
        deadline = time.monotonic() + 60
        while node.url not in httpx.get(f"{proxy.url}/nodes/status").json():
            assert time.monotonic() < deadline, "the api_server did not register"
            time.sleep(0.2)
        node.proc.send_signal(sig)
        assert node.proc.wait(60) == 0, node.log_tail()
        assert node.url not in httpx.get(f"{proxy.url}/nodes/status").json()
    finally:
        proxy.stop(force=True)
