"""LMDeploy-native and operational endpoints of a real api_server: /generate, interactive sessions, /abort_request,
disconnects, /metrics, MLC-style stats, sleep/wakeup and many concurrent streams."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest


@pytest.fixture(scope="module")
def url(api_server_url) -> str:
    return api_server_url


@pytest.fixture(scope="module")
def model(url) -> str:
    return httpx.get(f"{url}/v1/models").json()["data"][0]["id"]


def _metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def _wait_idle(url: str, free_blocks: float | None = None, timeout: float = 30) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = _metrics(url)
        idle = m["lmserve:num_requests_running"] == 0 and m["lmserve:num_requests_waiting"] == 0
        if idle and (free_blocks is None or m["lmserve:num_free_blocks"] == free_blocks):
            return m
        if time.monotonic() > deadline:
            pytest.fail(f"the engine did not go idle: {m}")
        time.sleep(0.1)


def _sse(resp: httpx.Response) -> list[dict]:
    events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_generate_text_ids_logprobs_and_stream(url):
    out = httpx.post(f"{url}/generate", json={"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0,
                                             "return_logprob": True}, timeout=120).json()
    meta = out["meta_info"]
    assert len(out["output_ids"]) == meta["completion_tokens"] == 8 and meta["prompt_tokens"] > 0
    assert meta["finish_reason"] == {"type": "length", "length": 8}
    assert [tid for _, tid in meta["output_token_logprobs"]] == out["output_ids"]
    ids = httpx.post(f"{url}/v1/encode", json={"input": "Once upon a time"}).json()["input_ids"]
    by_ids = httpx.post(f"{url}/generate", json={"input_ids": ids, "max_tokens": 8, "temperature": 0},
                        timeout=120).json()
    assert by_ids["text"] == out["text"] and by_ids["output_ids"] == out["output_ids"]
    with httpx.stream("POST", f"{url}/generate", json={"prompt": "Once upon a time", "max_tokens": 8,
                                                       "temperature": 0, "stream": True}, timeout=120) as resp:
        events = _sse(resp)
    assert "".join(e["text"] for e in events) == out["text"]
    assert sum((e["output_ids"] for e in events), []) == out["output_ids"]
    assert events[-1]["meta_info"]["finish_reason"]["type"] == "length"
    stopped = httpx.post(f"{url}/generate", json={"input_ids": ids, "max_tokens": 8, "temperature": 0,
                                                  "stop_token_ids": [out["output_ids"][2]]}, timeout=120).json()
    assert stopped["output_ids"] == out["output_ids"][:3]
    assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": out["output_ids"][2]}


def test_encode_tokenizes(url):
    one = httpx.post(f"{url}/v1/encode", json={"input": "hello world"}).json()
    many = httpx.post(f"{url}/v1/encode", json={"input": ["hello world", "hi"]}).json()
    assert one["length"] == len(one["input_ids"]) and many["input_ids"][0] == one["input_ids"]
    chat = httpx.post(f"{url}/v1/encode", json={"input": "hello world", "do_preprocess": True}).json()
    assert chat["length"] > one["length"]


def _interactive(url: str, **body) -> dict:
    body = {"temperature": 0, "request_output_len": 8, "interactive_mode": True, **body}
    resp = httpx.post(f"{url}/v1/chat/interactive", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_interactive_session_reuses_the_history(url):
    sid = 9001
    try:
        before = _metrics(url)["lmserve:prefix_cache_hits_total"]
        first = _interactive(url, prompt="My name is Alice.", session_id=sid)
        assert first["history_tokens"] == 0 and first["tokens"] > 0
        second = _interactive(url, prompt="What is my name?", session_id=sid)
        assert second["history_tokens"] == first["input_tokens"] + first["tokens"]
        hits = _metrics(url)["lmserve:prefix_cache_hits_total"] - before
        assert hits >= second["history_tokens"] // 16 * 16   # every full block of the history was reused
        # streaming continues the same session: JSON lines with the new text each
        with httpx.stream("POST", f"{url}/v1/chat/interactive", timeout=120,
                          json={"prompt": "Thanks!", "session_id": sid, "interactive_mode": True, "stream": True,
                                "request_output_len": 4, "temperature": 0}) as resp:
            lines = [json.loads(line) for line in resp.iter_lines() if line]
        assert lines[-1]["finish_reason"] in ("stop", "length") and lines[-1]["history_tokens"] > \
            second["history_tokens"]
        # interactive_mode=false answers on its own, without any history
        alone = _interactive(url, prompt="What is my name?", session_id=sid + 1, interactive_mode=False)
        assert alone["history_tokens"] == 0
    finally:
        httpx.post(f"{url}/chat/reset", json={"session_id": sid})


def test_session_length_exceeded_then_renewed(url):
    sid = 9002
    long_text = "word " * 900
    try:
        first = _interactive(url, prompt=long_text, session_id=sid, request_output_len=1, ignore_eos=True)
        assert first["finish_reason"] == "length" and first["tokens"] == 1
        over = _interactive(url, prompt="more " * 1200, session_id=sid)
        assert over["finish_reason"] == "length" and over["text"] == "" and over["tokens"] == 0
        assert over["history_tokens"] == first["input_tokens"] + 1
        # renew: /chat/reset drops the history; interactive_mode=false answers on its own
        assert httpx.post(f"{url}/chat/reset", json={"session_id": sid}).json()["num_sessions_ended"] == 1
        fresh = _interactive(url, prompt="hi", session_id=sid, request_output_len=2)
        assert fresh["history_tokens"] == 0 and fresh["tokens"] > 0
        again = _interactive(url, prompt="hi", session_id=sid, request_output_len=2, interactive_mode=False)
        assert again["history_tokens"] == 0
    finally:
        httpx.post(f"{url}/chat/reset", json={"session_id": sid})


def test_chat_completions_session_hits_the_cache(url, model):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    sid = 9003
    messages = [{"role": "user", "content": "Tell me a fact about the sea."}]
    try:
        first = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=20,
                                               extra_body={"session_id": sid})
        messages += [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "And another one?"}]
        second = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=4,
                                                extra_body={"session_id": sid})
        history = first.usage.prompt_tokens + first.usage.completion_tokens
        assert second.usage.prompt_tokens > history
        assert second.usage.prompt_tokens_details.cached_tokens >= history // 16 * 16
        assert second.usage.prompt_tokens_details.cached_tokens > first.usage.prompt_tokens_details.cached_tokens
    finally:
        httpx.post(f"{url}/chat/reset", json={"session_id": sid})


def test_generate_session_sequence_start_and_end(url):
    sid = 9004
    first = httpx.post(f"{url}/generate", json={"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0,
                                               "session_id": sid}, timeout=120).json()
    cont = httpx.post(f"{url}/generate", json={"prompt": " Then", "max_tokens": 4, "temperature": 0,
                                              "session_id": sid, "sequence_start": False, "sequence_end": True},
                      timeout=120).json()
    history = first["meta_info"]["prompt_tokens"] + first["meta_info"]["completion_tokens"]
    assert cont["meta_info"]["prompt_tokens"] > history
    # the session ended with sequence_end: continuing again starts from nothing
    after = httpx.post(f"{url}/generate", json={"prompt": " Then", "max_tokens": 2, "temperature": 0,
                                               "session_id": sid, "sequence_start": False, "sequence_end": True},
                       timeout=120).json()
    assert after["meta_info"]["prompt_tokens"] < history


def test_abort_request_by_session_and_interactive_cancel(url):
    sid = 9005
    body = {"prompt": "Count to a thousand:", "max_tokens": 1500, "ignore_eos": True, "temperature": 0,
            "session_id": sid, "sequence_end": True, "stream": True}
    with httpx.stream("POST", f"{url}/generate", json=body, timeout=120) as resp:
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")
        aborted = httpx.post(f"{url}/abort_request", json={"session_id": sid}).json()
        assert aborted["num_aborted"] == 1
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert events[-1]["meta_info"]["finish_reason"]["type"] == "abort"
    assert events[-1]["meta_info"]["completion_tokens"] < 1500
    assert httpx.post(f"{url}/abort_request", json={}).status_code == 400
    assert httpx.post(f"{url}/abort_request", json={"abort_all": True}).json()["num_aborted"] == 0
    cancel = _interactive(url, prompt="", session_id=sid, cancel=True)
    assert cancel["finish_reason"] == "abort"
    _wait_idle(url)


def test_one_turn_per_session_at_a_time(url):
    sid = 9006
    body = {"prompt": "Tell me a long story.", "session_id": sid, "interactive_mode": True, "stream": True,
            "request_output_len": 400, "ignore_eos": True, "temperature": 0}
    try:
        with httpx.stream("POST", f"{url}/v1/chat/interactive", json=body, timeout=120) as resp:
            lines = resp.iter_lines()
            next(lines)
            busy = httpx.post(f"{url}/v1/chat/interactive", json={**body, "stream": False})
            assert busy.status_code == 400 and busy.json()["error"]["code"] == "session_busy"
            assert httpx.post(f"{url}/abort_request", json={"session_id": sid}).json()["num_aborted"] == 1
            assert json.loads([line for line in lines if line][-1])["finish_reason"] == "abort"
        # the aborted turn left the session free and its history as it was (empty)
        assert _interactive(url, prompt="hi", session_id=sid, request_output_len=1)["history_tokens"] == 0
    finally:
        httpx.post(f"{url}/chat/reset", json={"session_id": sid})


def test_client_disconnect_aborts_and_frees_kv_blocks(url, model):
    baseline = _wait_idle(url)["lmserve:num_free_blocks"]
    body = {"model": model, "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 1500,
            "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as resp:
        lines = resp.iter_lines()    # NOTE: breaking out of iter_lines() would close the connection here
        for _ in range(8):
            next(lines)
        m = _metrics(url)
        assert m["lmserve:num_requests_running"] == 1 and m["lmserve:num_free_blocks"] < baseline
    # leaving the `with` closed the connection mid-stream
    m = _wait_idle(url, free_blocks=baseline)
    assert m["lmserve:kv_cache_usage_perc"] == pytest.approx(1 - baseline / m["lmserve:num_total_blocks"])
    assert m['lmserve:request_success_total{finished_reason="abort"}'] >= 1
    # a non-streaming request whose client times out is aborted as well
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": False}, timeout=1.5)
    _wait_idle(url, free_blocks=baseline, timeout=15)


def test_health_metrics_and_stats(url):
    assert httpx.get(f"{url}/health").status_code == 200
    text = httpx.get(f"{url}/metrics").text
    for name in ("lmserve:time_to_first_token_seconds_bucket", "lmserve:time_per_output_token_seconds_bucket",
                 "lmserve:e2e_request_latency_seconds_bucket", "lmserve:request_queue_time_seconds_bucket",
                 "lmserve:num_requests_running", "lmserve:num_requests_waiting", "lmserve:kv_cache_usage_perc",
                 "lmserve:prefix_cache_hit_rate", "lmserve:prompt_tokens_total", "lmserve:generation_tokens_total",
                 'lmserve:request_success_total{finished_reason="stop"}'):
        assert name in text, name
    m = _metrics(url)
    assert m["lmserve:time_to_first_token_seconds_count"] > 0 and m["lmserve:generation_tokens_total"] > 0
    stats = httpx.get(f"{url}/stats").json()
    assert stats.startswith("prefill:") and "decode:" in stats
    verbose = httpx.get(f"{url}/verbose_stats").json()
    assert {"prefill_throughput", "decode_throughput", "kv_cache_usage", "prefix_cache_hit_rate"} <= set(verbose)


def test_sleep_and_wakeup(url, model):
    body = {"model": model, "prompt": "The sky is", "max_tokens": 4, "temperature": 0}
    before = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
    assert httpx.post(f"{url}/sleep", params={"level": 1}, timeout=60).status_code == 200
    try:
        assert httpx.get(f"{url}/is_sleeping").json() == {"is_sleeping": True}
        resp = httpx.post(f"{url}/v1/completions", json=body)
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "sleeping"
        assert httpx.get(f"{url}/health").status_code == 200
    finally:
        assert httpx.post(f"{url}/wakeup", timeout=120).status_code == 200
    assert httpx.get(f"{url}/is_sleeping").json() == {"is_sleeping": False}
    assert httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"] == before


def test_64_concurrent_streams_complete_with_correct_text(url, model):
    prompts = [f"Count from {i} to {i + 5}:" for i in range(8)]

    async def run():
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)

        async def one(prompt: str, stream: bool) -> str:
            out = await client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0,
                                                  stream=stream)
            if not stream:
                return out.choices[0].text
            return "".join([c.choices[0].text async for c in out if c.choices])

        expected = await asyncio.gather(*[one(p, False) for p in prompts])
        texts = await asyncio.gather(*[one(prompts[i % 8], True) for i in range(64)])
        await client.close()
        return expected, texts

    expected, texts = asyncio.run(run())
    assert len(texts) == 64 and all(texts)
    assert [t == expected[i % 8] for i, t in enumerate(texts)] == [True] * 64
