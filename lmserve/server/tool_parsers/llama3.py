"""Llama 3.1+/3.2 JSON tool calls: the whole message is `{"name": ..., "parameters": {...}}` (several separated
by `;`), optionally after `<|python_tag|>`. Anything that is not such JSON is content."""
from __future__ import annotations

import json

from lmserve.server.tool_parsers.base import ParseResult, ToolParser, call_from_json

_PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    def parse(self, text: str, final: bool = True) -> ParseResult:
        body = text.strip()
        if body.startswith(_PYTHON_TAG):
            body = body[len(_PYTHON_TAG):].lstrip()
        maybe_call = body.startswith("{") or (not body and not final) or _PYTHON_TAG.startswith(body)
        if not maybe_call:
            return ParseResult(text)
        if not final:
            return ParseResult("")                  # held back until the message is complete
        calls, decoder, pos = [], json.JSONDecoder(), 0
        while pos < len(body):
            try:
                obj, end = decoder.raw_decode(body, pos)
            except json.JSONDecodeError:
                return ParseResult(text)
            call = call_from_json(obj)
            if call is None:
                return ParseResult(text)
            calls.append(call)
            pos = end
            while pos < len(body) and body[pos] in " \n;":
                pos += 1
        return ParseResult("", calls) if calls else ParseResult(text)
