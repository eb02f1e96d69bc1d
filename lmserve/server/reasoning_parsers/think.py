"""`<think>...</think>` reasoning (Qwen3, DeepSeek-R1, QwQ). The reasoning may start in the prompt (R1's template
ends the prompt with `<think>`), so `starts_in_reasoning` says the output begins inside it. Like the tool
parsers, `split(text, final=False)` holds back what may still turn out to be a tag, so streamed pieces add up
to the final split."""
from __future__ import annotations

from dataclasses import dataclass

from lmserve.server.tool_parsers.base import held_back


@dataclass
class ReasoningResult:
    reasoning: str | None
    content: str


class ReasoningParser:
    start = "<think>"
    end = "</think>"

    def split(self, text: str, final: bool = True, starts_in_reasoning: bool = False) -> ReasoningResult:
        raise NotImplementedError


class ThinkTagParser(ReasoningParser):
    def split(self, text: str, final: bool = True, starts_in_reasoning: bool = False) -> ReasoningResult:
        body = text
        if not starts_in_reasoning:
            stripped = body.lstrip()
            if stripped.startswith(self.start):
                body = stripped[len(self.start):]
            elif not final and self.start.startswith(stripped):
                return ReasoningResult(None, "")            # may still become "<think>"
            else:
                return ReasoningResult(None, text)            # no reasoning block: all content
        i = body.find(self.end)
        if i < 0:
            # still reasoning (or it never closed: then it all was reasoning, as in vLLM)
            keep = len(body) - (0 if final else held_back(body, self.end))
            return ReasoningResult(body[:keep], "")
        return ReasoningResult(body[:i], body[i + len(self.end):].lstrip("\n"))
