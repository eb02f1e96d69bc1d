"""Tool calling and reasoning through a real server and the openai SDK. The bundled SmolLM2's template cannot render
tools, so these also cover the default tool prompt and the hermes parser; `required` and named calls are
grammar-constrained, so even a 135M model must produce calls that parse and validate."""
from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from conftest import API_SERVER_ARGS, start_api_server

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Time in a zone", "parameters": TIME}}]
SCHEMA_OF = {"get_weather": WEATHER, "get_time": TIME}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


# constrained outputs run to the end of the grammar; on a busy 2-core machine that can take minutes
CLIENT_TIMEOUT = 600


def _check_calls(message) -> None:
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])


def _reassemble(stream):
    content, calls, finish = "", {}, None
    for chunk in stream:
        for ch in chunk.choices:
            content += ch.delta.content or ""
            for tc in ch.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": "", "headers": 0})
                if tc.id:
                    entry["id"] = tc.id
                    entry["headers"] += 1
                if tc.function and tc.function.name:
                    entry["name"] += tc.function.name
                if tc.function and tc.function.arguments:
                    entry["arguments"] += tc.function.arguments
            finish = ch.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_constrained_calls_parse_validate_and_stream_the_same(client, model, tool_choice):
    # NOTE: one call per message here: the 135M model tends to repeat calls up to --max-tool-calls
    kw = dict(model=model, messages=MESSAGES, tools=TOOLS, tool_choice=tool_choice, max_tokens=120,
              parallel_tool_calls=False)
    for seed in (1, 2):
        c = client.chat.completions.create(**kw, temperature=1.0, seed=seed).choices[0]
        assert c.finish_reason == "tool_calls"
        _check_calls(c.message)
        if isinstance(tool_choice, dict):
            assert [t.function.name for t in c.message.tool_calls] == ["get_time"]
    whole = client.chat.completions.create(**kw, temperature=0).choices[0].message
    content, calls, finish = _reassemble(client.chat.completions.create(**kw, temperature=0, stream=True))
    assert finish == "tool_calls" and (whole.content or "") == content
    assert [(c["name"], c["arguments"]) for c in calls] == [(t.function.name, t.function.arguments)
                                                            for t in whole.tool_calls]
    assert all(c["headers"] == 1 for c in calls)       # id and name once per call


def test_parallel_calls_stream_like_the_whole_message(client, model):
    kw = dict(model=model, messages=MESSAGES, tools=TOOLS, tool_choice="required", temperature=1.0, seed=2,
              max_tokens=700)       # room for --max-tool-calls (16) calls
    whole = client.chat.completions.create(**kw).choices[0]
    assert whole.finish_reason == "tool_calls"
    _check_calls(whole.message)
    content, calls, finish = _reassemble(client.chat.completions.create(**kw, stream=True))
    assert finish == "tool_calls" and [(c["name"], c["arguments"]) for c in calls] == [
        (t.function.name, t.function.arguments) for t in whole.message.tool_calls]


def test_parallel_tool_calls_false_gives_one_call(client, model):
    c = client.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                       parallel_tool_calls=False, temperature=1.0, seed=4, max_tokens=80).choices[0]
    _check_calls(c.message)
    assert len(c.message.tool_calls) == 1


def test_multi_turn_with_a_tool_result_continues(client, model):
    first = client.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                           temperature=0, max_tokens=80).choices[0].message
    call = first.tool_calls[0]
    messages = MESSAGES + [first.model_dump(exclude_none=True),
                           {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    c = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice="none",
                                       temperature=0, max_tokens=8).choices[0]
    assert c.message.content and not c.message.tool_calls


def test_auto_lets_the_model_choose(client, model):
    kw = dict(model=model, messages=MESSAGES, tools=TOOLS, tool_choice="auto", temperature=0, max_tokens=60)
    c = client.chat.completions.create(**kw).choices[0]
    content, calls, finish = _reassemble(client.chat.completions.create(**kw, stream=True))
    assert (c.message.content or "") == content and finish == c.finish_reason
    assert [x["arguments"] for x in calls] == [t.function.arguments for t in c.message.tool_calls or []]
    if c.message.tool_calls:
        assert c.finish_reason == "tool_calls"


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objectx"}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
])
def test_bad_tools_are_400_naming_the_field(url, model, extra, param):
    body = {"model": model, "messages": MESSAGES, "max_tokens": 2, **extra}
    resp = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param
    assert httpx.post(f"{url}/v1/chat/completions", json={"model": model, "messages": MESSAGES, "max_tokens": 2},
                      timeout=300).status_code == 200


# ---- reasoning ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reasoning_server(tmp_path_factory, smollm2_path):
    server = start_api_server(tmp_path_factory.mktemp("reasoning"), *API_SERVER_ARGS, "--reasoning-parser", "think")
    yield server
    server.stop()


def test_reasoning_content_is_split_and_streamed(reasoning_server):
    import openai
    client = openai.OpenAI(base_url=f"{reasoning_server.url}/v1", api_key="x", max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    # the 135M model does not think on its own: a regex makes it write a reasoning block, then an answer
    kw = dict(model=model, messages=MESSAGES, temperature=1.0, seed=3, max_tokens=30,
              extra_body={"guided_regex": "<think>[a-z ]{2,12}</think>[A-Z][a-z]{1,6}",
                          "chat_template_kwargs": {"enable_thinking": False}})
    msg = client.chat.completions.create(**kw).choices[0].message
    assert msg.reasoning_content and msg.content and "<think>" not in msg.content + msg.reasoning_content
    reasoning = content = ""
    for chunk in client.chat.completions.create(**kw, stream=True):
        for ch in chunk.choices:
            reasoning += getattr(ch.delta, "reasoning_content", None) or ""
            content += ch.delta.content or ""
    assert (reasoning, content) == (msg.reasoning_content, msg.content)
