"""The Anthropic Messages API (/v1/messages, /v1/messages/count_tokens) through the real `anthropic` SDK on the
bundled SmolLM2: create, streams of text and of tool use, count_tokens, a tool_use -> tool_result round trip,
thinking blocks from the reasoning parser, errors parsed by the SDK, and x-api-key. `agent_url` runs the suite
directly and through the proxy; `thinking_url` is a server with --reasoning-parser think and an API key."""
from __future__ import annotations

import json

import httpx
import pytest

anthropic = pytest.importorskip("anthropic")

CLIENT_TIMEOUT = 600
WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
                            "required": ["city"], "additionalProperties": False}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# NOTE: this anthropic SDK has no temperature / top_p / top_k arguments; the wire fields still work, in extra_body
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def claude(agent_url):
    return anthropic.Anthropic(base_url=agent_url, api_key="unused", max_retries=0, timeout=CLIENT_TIMEOUT)


@pytest.fixture(scope="module")
def model(agent_url) -> str:
    return httpx.get(f"{agent_url}/v1/models").json()["data"][0]["id"]


def test_create_text(claude, model):
    m = claude.messages.create(model=model, max_tokens=12, system="You are terse.", extra_body=GREEDY,
                               messages=[{"role": "user", "content": "Say hello."}])
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_")
    assert m.content[0].type == "text" and m.content[0].text
    assert m.stop_reason in ("end_turn", "max_tokens") and 0 < m.usage.output_tokens <= 12
    short = claude.messages.create(model=model, max_tokens=2, messages=[{"role": "user", "content": "Count."}])
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 2
    stopped = claude.messages.create(model=model, max_tokens=40, extra_body=GREEDY, stop_sequences=["e"],
                                     messages=[{"role": "user", "content": "Describe the sea."}])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "e"


def test_count_tokens_matches_usage(claude, model):
    kw = dict(model=model, system=[{"type": "text", "text": "Be brief."}],
              messages=[{"role": "user", "content": [{"type": "text", "text": "Hi there"}]}])
    counted = claude.messages.count_tokens(**kw).input_tokens
    used = claude.messages.create(max_tokens=1, **kw).usage
    assert counted == used.input_tokens + used.cache_read_input_tokens > 0
    with_tools = claude.messages.count_tokens(tools=[WEATHER], **kw).input_tokens
    assert with_tools > counted      # the tool schemas are part of the prompt


def test_stream_text_matches_create(claude, model):
    kw = dict(model=model, max_tokens=20, extra_body=GREEDY,
              messages=[{"role": "user", "content": "Tell me a fact."}])
    whole = claude.messages.create(**kw)
    kinds, text = [], ""
    with claude.messages.stream(**kw) as stream:
        for ev in stream:
            kinds.append(ev.type)
        text = stream.get_final_text()
        final = stream.get_final_message()
    assert text == whole.content[0].text
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens
    raw = [e.type for e in claude.messages.create(stream=True, **kw)]
    assert raw[:3] == ["message_start", "content_block_start", "content_block_delta"] or \
        raw[:2] == ["message_start", "ping"]
    assert raw[-3:] == ["content_block_stop", "message_delta", "message_stop"]


def test_tool_use_stream_and_round_trip(claude, model):
    kw = dict(model=model, max_tokens=60, extra_body=GREEDY, tools=[WEATHER], messages=ASK,
              tool_choice={"type": "any", "disable_parallel_tool_use": True})
    m = claude.messages.create(**kw)
    assert m.stop_reason == "tool_use"
    use = [b for b in m.content if b.type == "tool_use"]
    assert len(use) == 1 and use[0].name == "get_weather" and isinstance(use[0].input["city"], str)
    with claude.messages.stream(**kw) as stream:
        final = stream.get_final_message()
    assert [b.input for b in final.content if b.type == "tool_use"] == [use[0].input]
    named = claude.messages.create(**dict(kw, tool_choice={"type": "tool", "name": "get_weather"}))
    assert named.content[-1].type == "tool_use" and named.content[-1].name == "get_weather"
    # the result goes back as a tool_result block
    answer = claude.messages.create(model=model, max_tokens=16, extra_body=GREEDY, tools=[WEATHER], messages=[
        *ASK, {"role": "assistant", "content": [b.model_dump() for b in m.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use[0].id,
                                      "content": json.dumps({"temperature_c": 21})}]}])
    assert answer.content[0].type == "text" and answer.stop_reason in ("end_turn", "max_tokens")


def test_errors_are_anthropic_shaped(claude, model, agent_url):
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model=model, max_tokens=0, messages=ASK)
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model=model, max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "http://127.0.0.1/x.png"}}]}])
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="claude-nope", max_tokens=5, messages=ASK)
    r = httpx.post(f"{agent_url}/v1/messages", json={"model": model, "messages": ASK}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in r.json()["error"]["message"]       # required, as Anthropic requires it


def test_thinking_blocks_and_x_api_key(thinking_url):
    client = anthropic.Anthropic(base_url=thinking_url, api_key="sk-i22", max_retries=0, timeout=CLIENT_TIMEOUT)
    model = httpx.get(f"{thinking_url}/v1/models", headers={"x-api-key": "sk-i22"}).json()["data"][0]["id"]
    # the prompt ends inside <think>: what the model writes is reasoning until it closes the block (a 135M model
    # does not, within a few tokens), so it comes back as a thinking block
    kw = dict(model=model, max_tokens=12, extra_body=GREEDY, messages=ASK,
              thinking={"type": "enabled", "budget_tokens": 1024})
    m = client.messages.create(**kw)
    assert m.content[0].type == "thinking" and m.content[0].thinking and m.stop_reason == "max_tokens"
    thinking, kinds = "", []
    with client.messages.stream(**kw) as stream:
        for ev in stream:
            kinds.append(ev.type)
            if ev.type == "thinking":
                thinking += ev.thinking
    assert thinking == m.content[0].thinking
    plain = client.messages.create(**dict(kw, thinking={"type": "disabled"}))
    assert [b.type for b in plain.content] == ["text"] and plain.content[0].text
    bad = anthropic.Anthropic(base_url=thinking_url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as e:
        bad.messages.create(model=model, max_tokens=5, messages=ASK)
    assert e.value.body["error"]["type"] == "authentication_error"
