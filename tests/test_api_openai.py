"""OpenAI-compatible endpoints of a real api_server process, driven by the `openai` SDK (sync and async) and httpx.

Generation tests use temperature 0 so that texts compare exactly. The server is the session-scoped `api_server`
from conftest (bundled SmolLM2 on CPU).
"""
from __future__ import annotations

import asyncio
import base64
import json
import math
import struct

import httpx
import openai

MESSAGES = [{"role": "user", "content": "Name three colours."}]


def _sse_events(resp: httpx.Response) -> list[str]:
    return [line[len("data: "):] for line in resp.iter_lines() if line.startswith("data: ")]


def test_models_lists_the_served_model(url, client, model):
    card = httpx.get(f"{url}/v1/models").json()["data"][0]
    assert card["id"] == model and card["object"] == "model" and card["owned_by"] == "lmserve"
    assert card["root"].endswith(".gguf") and card["max_model_len"] == 2048
    assert card["permission"][0]["object"] == "model_permission" and isinstance(card["created"], int)


def test_chat_stream_equals_non_stream(client, model):
    plain = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=16)
    assert plain.object == "chat.completion" and plain.choices[0].message.role == "assistant"
    assert plain.usage.completion_tokens == 16 and plain.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=16,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_stream_ends_with_done_and_usage_chunk_last(url, model):
    body = {"model": model, "messages": MESSAGES, "temperature": 0, "max_tokens": 8, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(resp)
    assert events[-1] == "[DONE]"
    usage_chunk = json.loads(events[-2])
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 8
    assert all("usage" not in json.loads(e) for e in events[:-2])


def test_async_client_streams_with_include_usage(url, model):
    async def run():
        aclient = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        plain = await aclient.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=8)
        stream = await aclient.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=8,
                                                       stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        await aclient.close()
        return plain, chunks

    plain, chunks = asyncio.run(run())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens == 8


def test_stop_string_spanning_tokens(client, model):
    prompt = "One, two, three, four,"
    ref = client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=16, logprobs=0)
    text, tokens = ref.choices[0].text, ref.choices[0].logprobs.tokens
    assert "".join(tokens) == text
    # a stop string that starts inside one token and ends inside the next
    k = next(i for i in range(1, len(tokens) - 1) if len(tokens[i]) >= 2 and tokens[i + 1])
    start = len("".join(tokens[:k])) + 1
    stop = text[start:start + len(tokens[k])]
    assert text.find(stop) == start
    out = client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=16, stop=[stop])
    assert out.choices[0].text == text[:start] and out.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=16, stop=stop,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text[:start]
    assert chunks[-1].choices[0].finish_reason == "stop"
    kept = client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=16, stop=[stop],
                                     extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == text[:start] + stop


def test_chat_logprobs(client, model):
    out = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=6,
                                         logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 6
    assert "".join(t.token for t in content) == out.choices[0].message.content
    for t in content:
        tops = [x.logprob for x in t.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert t.logprob <= 0 and math.isclose(t.logprob, tops[0], abs_tol=1e-4)   # greedy: the best one
        assert t.bytes == list(t.token.encode())


def test_n_choices_and_seed(client, model):
    kwargs = dict(model=model, messages=MESSAGES, temperature=1.0, max_tokens=8, n=3, seed=1234)
    first = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    assert sorted(c.index for c in first.choices) == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert 3 <= first.usage.completion_tokens <= 24
    other = client.chat.completions.create(**{**kwargs, "seed": 99})
    assert [c.message.content for c in other.choices] != [c.message.content for c in first.choices]


def test_completion_prompt_forms(url, client, model):
    text = "The capital of France is"
    ids = httpx.post(f"{url}/v1/encode", json={"input": text}).json()["input_ids"]
    by_text = client.completions.create(model=model, prompt=text, temperature=0, max_tokens=6)
    by_ids = client.completions.create(model=model, prompt=ids, temperature=0, max_tokens=6)
    assert by_text.object == "text_completion" and by_text.choices[0].text == by_ids.choices[0].text
    batch = client.completions.create(model=model, prompt=[text, "Once upon a time"], temperature=0, max_tokens=6)
    assert [c.index for c in batch.choices] == [0, 1] and batch.choices[0].text == by_text.choices[0].text
    id_batch = client.completions.create(model=model, prompt=[ids, ids[:3]], temperature=0, max_tokens=6, n=2)
    assert [c.index for c in id_batch.choices] == [0, 1, 2, 3]
    assert id_batch.choices[0].text == id_batch.choices[1].text == by_text.choices[0].text
    assert id_batch.usage.prompt_tokens == len(ids) + 3


def test_completion_stream_equals_non_stream_with_echo(client, model):
    kwargs = dict(model=model, prompt="Once upon a time", temperature=0, max_tokens=10, echo=True)
    plain = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert plain.choices[0].text.startswith("Once upon a time")


def test_echo_logprobs_score_the_prompt_like_lm_eval(url, client, model):
    """lm-evaluation-harness local-completions: token-id prompts, echo, logprobs=1, max_tokens=1 (or 0)."""
    ctx = httpx.post(f"{url}/v1/encode", json={"input": "The capital of France is"}).json()["input_ids"]
    greedy = client.completions.create(model=model, prompt=ctx, temperature=0, max_tokens=1, logprobs=1)
    next_id = httpx.post(f"{url}/v1/encode", json={"input": greedy.choices[0].text, "add_bos": False}).json()
    full = ctx + next_id["input_ids"][:1]
    out = client.completions.create(model=model, prompt=[full], temperature=0, max_tokens=1, echo=True, logprobs=1)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(full) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # the continuation token's prompt logprob is what greedy decoding gave it, and it is the top choice
    cont = lp.token_logprobs[len(ctx)]
    assert math.isclose(cont, greedy.choices[0].logprobs.token_logprobs[0], abs_tol=1e-3)
    assert cont == max(lp.top_logprobs[len(ctx)].values())
    # max_tokens=0 scores the prompt only
    scored = client.completions.create(model=model, prompt=[full], max_tokens=0, echo=True, logprobs=1)
    slp = scored.choices[0].logprobs
    assert len(slp.tokens) == len(full) and scored.usage.completion_tokens == 0
    assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(slp.token_logprobs[1:], lp.token_logprobs[1:-1]))


def test_streamed_echo_logprobs_of_a_long_prompt_match(client, model):
    """A prompt longer than one step's token budget (512) is prefilled in chunks; the stream still carries every
    prompt token's logprob."""
    prompt = "the sea and the ships " * 130
    kwargs = dict(model=model, prompt=prompt, max_tokens=2, temperature=0, echo=True, logprobs=1)
    plain = client.completions.create(**kwargs).choices[0].logprobs
    chunks = [c.choices[0].logprobs for c in client.completions.create(**kwargs, stream=True) if c.choices]
    streamed = sum((lp.token_logprobs for lp in chunks), [])
    assert len(plain.tokens) > 600 and sum((lp.tokens for lp in chunks), []) == plain.tokens
    assert streamed[0] is None and all(abs(a - b) < 1e-4 for a, b in zip(streamed[1:], plain.token_logprobs[1:]))


def test_response_format_text_and_tool_choice_none(client, model):
    out = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=4,
                                         response_format={"type": "text"}, tool_choice="none",
                                         tools=[{"type": "function", "function": {"name": "f"}}])
    assert out.choices[0].message.content


def test_return_token_ids(url, model):
    body = {"model": model, "messages": MESSAGES, "temperature": 0, "max_tokens": 4, "return_token_ids": True}
    out = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
    assert len(out["choices"][0]["token_ids"]) == 4 and len(out["prompt_token_ids"]) == out["usage"]["prompt_tokens"]


def test_embeddings_and_pooling(url, client, model):
    # NOTE: the SDK asks for base64 by default and decodes it; the float form is checked through httpx below
    out = client.embeddings.create(model=model, input=["hello world", "goodbye"])
    assert [d.index for d in out.data] == [0, 1] and out.usage.prompt_tokens > 0
    vec = out.data[0].embedding
    assert len(vec) == 576 and math.isclose(sum(x * x for x in vec), 1.0, rel_tol=1e-4)
    floats = httpx.post(f"{url}/v1/embeddings", json={"model": model, "input": "hello world"}).json()
    assert all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(floats["data"][0]["embedding"], vec))
    b64 = client.embeddings.create(model=model, input="hello world", encoding_format="base64").data[0].embedding
    decoded = struct.unpack(f"<{len(vec)}f", base64.b64decode(b64))
    assert all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(decoded, vec))
    pooled = httpx.post(f"{url}/pooling", json={"model": model, "input": "hello world"}).json()
    assert pooled["data"][0]["object"] == "pooling"
    assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(pooled["data"][0]["data"], vec))
    other = client.embeddings.create(model=model, input="goodbye").data[0].embedding
    assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(other, out.data[1].embedding))


def test_openapi_is_valid_and_docs_are_served(url):
    from openapi_spec_validator import validate
    spec = httpx.get(f"{url}/openapi.json").json()
    validate(spec)
    for path in ("/v1/chat/completions", "/v1/completions", "/generate", "/v1/chat/interactive", "/v1/embeddings",
                 "/pooling", "/v1/encode", "/abort_request", "/health", "/metrics", "/sleep", "/wakeup",
                 "/is_sleeping", "/update_weights", "/terminate", "/stats", "/verbose_stats", "/chat/reset"):
        assert path in spec["paths"], path
    docs = httpx.get(f"{url}/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_metrics_memory_by_kind_is_read_at_scrape_time(url, client, model):
    """/metrics gives memory by kind, read when scraped (engine steps no longer take the snapshot: walking
    /proc/self/smaps there halved decode speed on a 1B model)."""
    client.completions.create(model=model, prompt="Hello", max_tokens=2, temperature=0)
    text = httpx.get(f"{url}/metrics", timeout=30).text
    mem = {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
           if line.startswith("lmserve:memory_bytes{")}
    assert {"weights_gguf", "weights_gguf_resident", "weights_float", "kv_cache", "process_rss"} <= set(mem), mem
    assert 0 < mem["weights_gguf_resident"] <= mem["weights_gguf"] * 1.01 + (1 << 20)
    assert mem["kv_cache"] > 0 and mem["process_rss"] > mem["weights_float"]
