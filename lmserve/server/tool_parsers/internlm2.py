"""InternLM2 / 2.5 (as LMDeploy documents): `<|action_start|><|plugin|>\n{"name": ..., "parameters": {...}}
<|action_end|>`."""
from __future__ import annotations

from lmserve.server.tool_parsers.base import ToolParser


class InternLM2ToolParser(ToolParser):
    start = "<|action_start|><|plugin|>"
    end = "<|action_end|>"
    keeps_special_tokens = True
