"""Tool-call and reasoning parsers on hand-written model outputs, malformed ones included: text that is not a
well-formed call stays content, nothing is lost, and streaming (parsing every prefix) adds up to the final parse."""
from __future__ import annotations

import json

import pytest

from lmserve.server.chat_output import ChatOutput
from lmserve.server.chat_tools import ToolCalls
from lmserve.server.protocol import ChatCompletionRequest
from lmserve.server.reasoning_parsers import get_reasoning_parser
from lmserve.server.tool_parsers import get_tool_parser, pick_tool_parser

W = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}
T = {"name": "get_time", "arguments": {"tz": "UTC"}}


def _args(call: dict) -> str:
    return json.dumps(call["arguments"])


CASES = {
    "hermes": [
        (f'<tool_call>\n{json.dumps(W)}\n</tool_call>', "", [W]),
        (f'Let me check.<tool_call>{json.dumps(W)}</tool_call>\n<tool_call>{json.dumps(T)}</tool_call>',
         "Let me check.\n", [W, T]),
        ('<tool_call>{"name": "f", "arguments": {"x": 1</tool_call> tail', '<tool_call>{"name": "f", "arguments": '
         '{"x": 1</tool_call> tail', []),                                   # broken JSON stays text
        ('Hi <tool_call>{"name": "f"', 'Hi <tool_call>{"name": "f"', []),   # never closed
        ("plain answer with < and <tool but no call", "plain answer with < and <tool but no call", []),
        ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),  # no name
    ],
    "mistral": [
        (f'[TOOL_CALLS][{json.dumps(W)}, {json.dumps(T)}]', "", [W, T]),
        (f'Sure. [TOOL_CALLS]{json.dumps(W)}', "Sure. ", [W]),
        ('[TOOL_CALLS][{"name": "f", "arguments": ', '[TOOL_CALLS][{"name": "f", "arguments": ', []),
        ("no calls here", "no calls here", []),
    ],
    "llama3": [
        (json.dumps({"name": W["name"], "parameters": W["arguments"]}), "", [W]),
        ("<|python_tag|>" + json.dumps({"name": T["name"], "parameters": T["arguments"]}), "", [T]),
        (json.dumps({"name": W["name"], "parameters": W["arguments"]}) + "; " +
         json.dumps({"name": T["name"], "parameters": T["arguments"]}), "", [W, T]),
        ('{"name": "f", "parameters": {"x": ', '{"name": "f", "parameters": {"x": ', []),
        ('{"not": "a call"}', '{"not": "a call"}', []),
        ("The weather is nice.", "The weather is nice.", []),
    ],
    "internlm2": [
        (f'I will search.<|action_start|><|plugin|>\n{json.dumps({"name": W["name"], "parameters": W["arguments"]})}'
         '<|action_end|>', "I will search.", [W]),
        ('<|action_start|><|plugin|>\n{"name": "f"', '<|action_start|><|plugin|>\n{"name": "f"', []),
        ("just text", "just text", []),
    ],
}


@pytest.mark.parametrize("name, text, content, calls",
                         [(n, *case) for n, cases in CASES.items() for case in cases])
def test_parser_final_and_every_prefix(name, text, content, calls):
    parser = get_tool_parser(name)
    result = parser.parse(text, final=True)
    assert result.content == content
    assert [(c.name, json.loads(c.arguments)) for c in result.calls] == [(c["name"], c["arguments"]) for c in calls]
    # streaming: what a prefix shows must be a prefix of the final content, and its calls a prefix of the calls
    for k in range(len(text) + 1):
        partial = parser.parse(text[:k], final=False)
        assert content.startswith(partial.content), (k, partial.content)
        assert [c.name for c in partial.calls] == [c.name for c in result.calls][:len(partial.calls)]


def test_pick_parser_from_template():
    assert pick_tool_parser("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert pick_tool_parser("<tool_call>{{ tool_call }}</tool_call>") == "hermes"
    assert pick_tool_parser("<|python_tag|>") == "llama3"
    assert pick_tool_parser(None) == "hermes"
    with pytest.raises(ValueError):
        get_tool_parser("nope")


@pytest.mark.parametrize("text, starts, reasoning, content", [
    ("<think>Let me think.</think>\n\nThe answer is 4.", False, "Let me think.", "The answer is 4."),
    ("Let me think.</think>The answer.", True, "Let me think.", "The answer."),       # R1: <think> in the prompt
    ("No reasoning here.", False, None, "No reasoning here."),
    ("<think>never closed", False, "never closed", ""),
    ("<think></think>{\"a\": 1}", False, "", '{"a": 1}'),
])
def test_think_reasoning_parser(text, starts, reasoning, content):
    parser = get_reasoning_parser("think")
    r = parser.split(text, True, starts)
    assert (r.reasoning, r.content) == (reasoning, content)
    for k in range(len(text) + 1):
        p = parser.split(text[:k], False, starts)
        assert (reasoning or "").startswith(p.reasoning or "") and content.startswith(p.content), k


def _req(**kw) -> ChatCompletionRequest:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=tools, **kw)


@pytest.mark.parametrize("text", [
    "<think>Should I call it? Yes.</think>Calling.<tool_call>" + json.dumps(
        {"name": "get_weather", "arguments": {"city": "Oslo"}}) + "</tool_call>",
    "<think>no tools needed</think>It is sunny.",
])
def test_streamed_deltas_add_up_to_the_message(text):
    out = ChatOutput(ToolCalls(_req(), get_tool_parser("hermes")), get_reasoning_parser("think"), False)
    message = out.message(text)
    streamer, reasoning, content, calls = out.streamer(), "", "", {}
    for k in range(0, len(text) + 1, 3):
        final = k >= len(text)
        for d in streamer.deltas(text[:k] if not final else text, final):
            reasoning += d.reasoning_content or ""
            content += d.content or ""
            for tc in d.tool_calls or []:
                entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                entry["name"] += tc.function.name or ""
                entry["arguments"] += tc.function.arguments or ""
    if len(text) % 3:
        for d in streamer.deltas(text, True):
            reasoning += d.reasoning_content or ""
            content += d.content or ""
            for tc in d.tool_calls or []:
                entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                entry["name"] += tc.function.name or ""
                entry["arguments"] += tc.function.arguments or ""
    assert reasoning == message.reasoning_content
    assert content == (message.content or "")
    assert [calls[i] for i in sorted(calls)] == [{"name": c.function.name, "arguments": c.function.arguments}
                                                 for c in message.tool_calls or []]


def test_required_and_named_grammars():
    required = ToolCalls(_req(tool_choice="required", parallel_tool_calls=False), get_tool_parser("hermes"))
    schema = json.loads(required.guided().json)
    assert schema["maxItems"] == 1 and schema["items"]["anyOf"][0]["properties"]["name"] == {"const": "get_weather"}
    parsed = required.parse('[{"name":"get_weather","parameters":{"city":"Rome"}}]')
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == [("get_weather", {"city": "Rome"})]
    named = ToolCalls(_req(tool_choice={"type": "function", "function": {"name": "get_weather"}}),
                      get_tool_parser("hermes"))
    assert json.loads(named.guided().json)["required"] == ["city"]
    assert named.parse('{"city":"Rome"}').calls[0].arguments == '{"city":"Rome"}'
