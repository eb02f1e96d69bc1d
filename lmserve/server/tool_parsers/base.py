"""The tool-parser interface. `parse(text, final)` is called on the whole text so far: while a call is still being
written (`final=False`) the text from its start marker on is held back (`pending`), so that the content seen so
far is always a prefix of the final content and streamed deltas add up to the non-streamed message. A call that
never closes or does not parse stays content: nothing the model wrote is lost."""
from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass
class ParsedCall:
    name: str
    arguments: str          # JSON text


@dataclass
class ParseResult:
    content: str
    calls: list[ParsedCall] = field(default_factory=list)


def call_from_json(obj, args_keys: tuple[str, ...] = ("arguments", "parameters")) -> ParsedCall | None:
    """{"name": ..., "arguments"|"parameters": {...}} -> ParsedCall, or None if it is not that shape."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = next((obj[k] for k in args_keys if k in obj), {})
    if isinstance(args, str):         # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))


def held_back(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker` (may still become it)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ToolParser:
    """Base for parsers whose calls sit between a start and an end marker, each holding one JSON call."""
    start: str = ""
    end: str = ""
    keeps_special_tokens = False     # the markers are special tokens: detokenize with skip_special_tokens=False

    def decode_call(self, body: str) -> list[ParsedCall] | None:
        try:
            call = call_from_json(json.loads(body))
        except json.JSONDecodeError:
            return None
        return None if call is None else [call]

    def parse(self, text: str, final: bool = True) -> ParseResult:
        content, calls, pos = [], [], 0
        while True:
            i = text.find(self.start, pos)
            if i < 0:
                rest = text[pos:]
                if not final:
                    rest = rest[:len(rest) - held_back(rest, self.start)]
                content.append(rest)
                break
            content.append(text[pos:i])
            j = text.find(self.end, i + len(self.start)) if self.end else -1
            if j < 0:
                body_end = len(text) if final and not self.end else -1
                if body_end < 0:
                    if final:           # never closed: it stays text
                        content.append(text[i:])
                    break
                j = body_end
            decoded = self.decode_call(text[i + len(self.start):j])
            if decoded is None:
                content.append(text[i:j + len(self.end)])
            else:
                calls.extend(decoded)
            pos = j + len(self.end)
        return ParseResult("".join(content), calls)
