"""Tool-call parsers: model text -> (content, tool calls). One small class per model family behind a registry;
`--tool-call-parser NAME` picks one, or `pick_tool_parser` guesses from the chat template."""
from __future__ import annotations

from lmserve.server.tool_parsers.base import ParsedCall, ParseResult, ToolParser
from lmserve.server.tool_parsers.hermes import HermesToolParser
from lmserve.server.tool_parsers.internlm2 import InternLM2ToolParser
from lmserve.server.tool_parsers.llama3 import Llama3JsonToolParser
from lmserve.server.tool_parsers.mistral import MistralToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "qwen": HermesToolParser,
    "llama3": Llama3JsonToolParser,
    "mistral": MistralToolParser,
    "internlm2": InternLM2ToolParser,
}


def get_tool_parser(name: str) -> ToolParser:
    try:
        return TOOL_PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown tool-call parser {name!r}; choose from {', '.join(TOOL_PARSERS)}") from None


def pick_tool_parser(chat_template: str | None) -> str:
    """The parser whose markers the chat template uses; hermes otherwise (the format of the default tool
    prompt injected for templates that cannot render tools)."""
    template = chat_template or ""
    for marker, name in (("[TOOL_CALLS]", "mistral"), ("<|plugin|>", "internlm2"), ("<|python_tag|>", "llama3"),
                         ("<tool_call>", "hermes")):
        if marker in template:
            return name
    return "hermes"


__all__ = ["TOOL_PARSERS", "ParsedCall", "ParseResult", "ToolParser", "get_tool_parser", "pick_tool_parser"]
