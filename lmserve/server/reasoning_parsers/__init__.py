"""Reasoning parsers: model text -> (reasoning_content, content). `--reasoning-parser NAME` picks one."""
from __future__ import annotations

from lmserve.server.reasoning_parsers.think import ReasoningParser, ReasoningResult, ThinkTagParser

REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    "think": ThinkTagParser,
    "qwen3": ThinkTagParser,
    "deepseek_r1": ThinkTagParser,
}


def get_reasoning_parser(name: str) -> ReasoningParser:
    try:
        return REASONING_PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown reasoning parser {name!r}; choose from {', '.join(REASONING_PARSERS)}") from None


__all__ = ["REASONING_PARSERS", "ReasoningParser", "ReasoningResult", "ThinkTagParser", "get_reasoning_parser"]
