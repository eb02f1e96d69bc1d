"""Tool calling for /v1/chat/completions: `tools` + `tool_choice` -> what the chat template sees and what the
engine is constrained to; model text -> `message.tool_calls`, whole or as OpenAI's streamed deltas.

- `none`: tools are not shown to the model; plain text comes back.
- `auto`: the template renders the tools (or, for templates that cannot, DEFAULT_TOOL_PROMPT is injected as a
  system message) and the tool-call parser picks calls out of what the model wrote.
- `required` / a named function: the output is constrained by a grammar built from the tools' JSON schemas, so it
  always parses and validates. `required` writes `[{"name": ..., "parameters": {...}}, ...]`; a named call
  writes the arguments object itself.
"""
from __future__ import annotations

import json
import random
import string
from typing import Any

from lmserve.sampling_params import GuidedDecodingParams
from lmserve.server.errors import APIError
from lmserve.server.protocol import ChatCompletionRequest
from lmserve.server.tool_parsers import ParsedCall, ParseResult, ToolParser

DEFAULT_TOOL_PROMPT = (
    "You can call these functions (JSON schemas of their parameters):\n{tools}\n"
    "To call a function, reply with one line per call, exactly like this:\n"
    '<tool_call>{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}</tool_call>')


def tool_call_id() -> str:
    return "call_" + "".join(random.choices(string.ascii_letters + string.digits, k=24))


def template_renders_tools(chat_template: str | None) -> bool:
    return bool(chat_template) and "tools" in chat_template


class ToolCalls:
    """The tool-calling side of one chat request."""

    def __init__(self, req: ChatCompletionRequest, parser: ToolParser, max_calls: int = 16):
        self.tools = {t.function.name: t for t in (req.tools or [])}
        choice = req.tool_choice if req.tools else "none"
        self.named: str | None = None
        if choice is None:
            choice = "auto"
        elif not isinstance(choice, str):
            self.named, choice = choice.function.name, "named"
            if self.named not in self.tools:
                raise APIError(400, f"tool_choice names function {self.named!r}, which is not in tools",
                               param="tool_choice")
        self.mode = choice                                 # none | auto | required | named
        self.parallel = req.parallel_tool_calls is not False
        self.max_calls = max_calls if self.parallel else 1
        self.parser = parser
        self._check_schemas()

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def _check_schemas(self) -> None:
        for i, t in enumerate(self.tools.values()):
            params = t.function.parameters
            if params is not None and not isinstance(params, dict):
                raise APIError(400, "a function's parameters must be a JSON schema object",
                               param=f"tools[{i}].function.parameters")

    def _schema(self, name: str) -> dict[str, Any]:
        return self.tools[name].function.parameters or {"type": "object", "properties": {}}

    # ---- request side -----------------------------------------------------------------------------------
    def guided(self) -> GuidedDecodingParams | None:
        if self.mode == "named":
            return GuidedDecodingParams(json=json.dumps(self._schema(self.named), sort_keys=True), param="tools")
        if self.mode != "required":
            return None
        one_of = [{"type": "object", "properties": {"name": {"const": name}, "parameters": self._schema(name)},
                   "required": ["name", "parameters"], "additionalProperties": False} for name in self.tools]
        schema = {"type": "array", "minItems": 1, "maxItems": self.max_calls, "items": {"anyOf": one_of}}
        return GuidedDecodingParams(json=json.dumps(schema, sort_keys=True), param="tools")

    def prepare_messages(self, messages: list[dict[str, Any]], chat_template: str | None
                         ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """-> (messages, extra template kwargs). Tools are rendered by the template when it can."""
        if not self.active or self.mode == "named":
            return messages, {}
        specs = [t.model_dump(exclude_none=True) for t in self.tools.values()]
        if template_renders_tools(chat_template):
            return messages, {"tools": specs}
        prompt = DEFAULT_TOOL_PROMPT.format(tools="\n".join(json.dumps(s["function"]) for s in specs))
        if messages and messages[0]["role"] == "system":
            first = dict(messages[0], content=messages[0]["content"] + "\n\n" + prompt)
            return [first] + messages[1:], {}
        return [{"role": "system", "content": prompt}] + messages, {}

    # ---- response side ----------------------------------------------------------------------------------
    def parse(self, text: str, final: bool = True) -> ParseResult:
        if self.mode == "named":     # the whole output is the arguments, streamed as they come
            return ParseResult("", [ParsedCall(self.named, text)])
        if self.mode == "required":
            return ParseResult("", _complete_array_items(text))
        calls = self.parser.parse(text, final)
        if not self.parallel and len(calls.calls) > 1:
            calls.calls = calls.calls[:1]
        return calls


def _complete_array_items(text: str) -> list[ParsedCall]:
    """The items of `[{"name": ..., "parameters": {...}}, ...` that are complete so far."""
    decoder, calls = json.JSONDecoder(), []
    pos = text.find("[")
    if pos < 0:
        return calls
    pos += 1
    while pos < len(text):
        while pos < len(text) and text[pos] in " \n\t,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            break
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break
        if isinstance(obj, dict) and isinstance(obj.get("name"), str):
            calls.append(ParsedCall(obj["name"], json.dumps(obj.get("parameters", {}), ensure_ascii=False)))
    return calls


def message_for_template(msg: dict[str, Any], renders_tools: bool) -> dict[str, Any]:
    """An assistant message with tool_calls or a `tool` message -> what the template can render. Templates
    that know tools get them as they are (arguments as objects, as HF templates expect); others get text in
    the default prompt's format."""
    role = msg["role"]
    if role == "assistant" and msg.get("tool_calls"):
        calls = []
        for c in msg["tool_calls"]:
            fn = c.get("function") or {}
            args = fn.get("arguments") or "{}"
            try:
                args = json.loads(args) if isinstance(args, str) else args
            except json.JSONDecodeError:
                pass
            calls.append({"id": c.get("id"), "type": "function",
                          "function": {"name": fn.get("name"), "arguments": args}})
        if renders_tools:
            return dict(msg, tool_calls=calls)
        text = "".join("<tool_call>" + json.dumps({"name": c["function"]["name"],
                                                   "arguments": c["function"]["arguments"]}) + "</tool_call>"
                       for c in calls)
        return {"role": "assistant", "content": (msg.get("content") or "") + text}
    if role == "tool":
        if renders_tools:
            return msg
        return {"role": "user", "content": f"<tool_response>\n{msg.get('content', '')}\n</tool_response>"}
    return msg
