"""Mistral: `[TOOL_CALLS]` then a JSON array of {"name": ..., "arguments": {...}} (all calls in one array)."""
from __future__ import annotations

import json

from lmserve.server.tool_parsers.base import ParsedCall, ToolParser, call_from_json


class MistralToolParser(ToolParser):
    start = "[TOOL_CALLS]"
    end = ""                     # the array runs to the end of the message
    keeps_special_tokens = True

    def decode_call(self, body: str) -> list[ParsedCall] | None:
        try:
            value = json.loads(body)
        except json.JSONDecodeError:
            return None
        items = value if isinstance(value, list) else [value]
        calls = [call_from_json(x) for x in items]
        return None if not calls or any(c is None for c in calls) else calls
