"""Generated chat text -> the assistant message: reasoning (with --reasoning-parser), content and tool calls;
whole, or as the OpenAI stream's deltas. The parsers hold back what is still undecided, so the deltas of a stream
add up to exactly the non-streamed message. Without tools and a reasoning parser the text is the content."""
from __future__ import annotations

from dataclasses import dataclass, field

from lmserve.server.chat_tools import ToolCalls, tool_call_id
from lmserve.server.protocol import (ChatMessage, DeltaFunctionCall, DeltaMessage, DeltaToolCall, FunctionCall,
                                     ToolCall)
from lmserve.server.reasoning_parsers import ReasoningParser
from lmserve.server.tool_parsers import ParsedCall


@dataclass
class Split:
    reasoning: str | None
    content: str
    calls: list[ParsedCall] = field(default_factory=list)


class ChatOutput:
    def __init__(self, tools: ToolCalls, reasoning: ReasoningParser | None, starts_in_reasoning: bool):
        self.tools = tools
        self.reasoning = reasoning
        self.starts_in_reasoning = starts_in_reasoning
        self.is_plain = not tools.active and reasoning is None

    def split(self, text: str, final: bool) -> Split:
        if self.is_plain:
            return Split(None, text)
        reasoning = None
        if self.reasoning is not None:
            r = self.reasoning.split(text, final, self.starts_in_reasoning)
            reasoning, text = r.reasoning, r.content
        if not self.tools.active:
            return Split(reasoning, text)
        parsed = self.tools.parse(text, final)
        return Split(reasoning, parsed.content, parsed.calls)

    def message(self, text: str) -> ChatMessage:
        s = self.split(text, final=True)
        calls = [ToolCall(id=tool_call_id(), function=FunctionCall(name=c.name, arguments=c.arguments))
                 for c in s.calls] or None
        return ChatMessage(role="assistant", content=None if calls and not s.content else s.content,
                           reasoning_content=s.reasoning, tool_calls=calls)

    def finish_reason(self, text: str, reason: str | None) -> str | None:
        if reason == "stop" and not self.is_plain and self.split(text, final=True).calls:
            return "tool_calls"
        return reason

    def streamer(self) -> ChatStreamer:
        return ChatStreamer(self)


class ChatStreamer:
    """One choice of a stream: call `deltas(text so far, finished)` with each output."""

    def __init__(self, output: ChatOutput):
        self.output = output
        self.num_reasoning = 0
        self.num_content = 0
        self.args_sent: list[int] = []          # per tool call: characters of arguments sent

    def deltas(self, text: str, final: bool) -> list[DeltaMessage]:
        s = self.output.split(text, final)
        out: list[DeltaMessage] = []
        reasoning = (s.reasoning or "")[self.num_reasoning:]
        content = s.content[self.num_content:]
        if reasoning or content:
            out.append(DeltaMessage(reasoning_content=reasoning or None, content=content or None))
        self.num_reasoning += len(reasoning)
        self.num_content += len(content)
        for i, call in enumerate(s.calls):
            if i == len(self.args_sent):
                out.append(DeltaMessage(tool_calls=[DeltaToolCall(
                    index=i, id=tool_call_id(), type="function",
                    function=DeltaFunctionCall(name=call.name, arguments=""))]))
                self.args_sent.append(0)
            more = call.arguments[self.args_sent[i]:]
            if more:
                out.append(DeltaMessage(tool_calls=[DeltaToolCall(index=i,
                                                                  function=DeltaFunctionCall(arguments=more))]))
                self.args_sent[i] += len(more)
        return out
