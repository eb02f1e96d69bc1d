"""Hermes / Qwen2.5 / Qwen3: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one per call."""
from __future__ import annotations

from lmserve.server.tool_parsers.base import ToolParser


class HermesToolParser(ToolParser):
    start = "<tool_call>"
    end = "</tool_call>"
