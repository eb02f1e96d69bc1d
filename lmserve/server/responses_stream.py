"""The Responses API stream: engine outputs -> typed server-sent events with sequence numbers, in the order the
openai SDK's ResponseStream accumulates them. The chat output parsers split the text so far into reasoning, text
and tool calls; each new piece becomes a delta of the output item it belongs to, items are opened (`added`) when
their first piece arrives and closed (`done`) when the next item starts or the response ends, so the deltas add
up to exactly the items of the non-streamed response."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from lmserve.server.errors import APIError
from lmserve.server.protocol.responses import function_call_item, message_item, output_text, reasoning_item

if TYPE_CHECKING:
    from lmserve.server.serving_responses import ResponseRun


def _sse(event: dict[str, Any]) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"


class _Events:
    def __init__(self, run: ResponseRun):
        self.run = run
        self.seq = 0
        self.index = -1                      # output_index of the item open now
        self.open: str | None = None         # "reasoning" | "message" | "call<i>"
        self.text = ""                       # the open item's text (or arguments) so far
        self.num_reasoning = self.num_content = 0
        self.args_sent: list[int] = []
        self.items: list[dict[str, Any]] = []

    def event(self, kind: str, **fields: Any) -> str:
        out = _sse({"type": kind, "sequence_number": self.seq, **fields})
        self.seq += 1
        return out

    def _item(self, key: str, status: str, text: str = "") -> dict[str, Any]:
        run = self.run
        if key == "reasoning":
            return reasoning_item(run.item_id("reasoning", "rs"), text, status)
        if key == "message":
            return message_item(run.item_id("message", "msg"), text, status)
        i = int(key[4:])
        call = self.calls[i]
        return function_call_item(run.item_id(key, "fc"), run.call_id(i), call.name, text, status)

    def start(self, key: str) -> list[str]:
        out = self.close()
        self.index += 1
        self.open, self.text = key, ""
        item = self._item(key, "in_progress")
        out.append(self.event("response.output_item.added", output_index=self.index, item=item))
        part = {"reasoning": {"type": "reasoning_text", "text": ""}, "message": output_text("")}.get(key)
        if part is not None:
            out.append(self.event("response.content_part.added", item_id=item["id"], output_index=self.index,
                                  content_index=0, part=part))
        return out

    def delta(self, text: str) -> list[str]:
        self.text += text
        item_id = self._item(self.open, "in_progress")["id"]
        common = dict(item_id=item_id, output_index=self.index, delta=text)
        if self.open == "reasoning":
            return [self.event("response.reasoning_text.delta", content_index=0, **common)]
        if self.open == "message":
            return [self.event("response.output_text.delta", content_index=0, logprobs=[], **common)]
        return [self.event("response.function_call_arguments.delta", **common)]

    def close(self) -> list[str]:
        if self.open is None:
            return []
        item = self._item(self.open, "completed", self.text)
        common = dict(item_id=item["id"], output_index=self.index)
        if self.open == "reasoning":
            out = [self.event("response.reasoning_text.done", content_index=0, text=self.text, **common),
                   self.event("response.content_part.done", content_index=0, part=item["content"][0], **common)]
        elif self.open == "message":
            out = [self.event("response.output_text.done", content_index=0, text=self.text, logprobs=[], **common),
                   self.event("response.content_part.done", content_index=0, part=item["content"][0], **common)]
        else:
            out = [self.event("response.function_call_arguments.done", arguments=self.text,
                              name=item["name"], **common)]
        out.append(self.event("response.output_item.done", output_index=self.index, item=item))
        self.items.append(item)
        self.open = None
        return out

    def update(self, text: str, final: bool) -> list[str]:
        s = self.run.job.output.split(text, final)
        self.calls = s.calls
        out: list[str] = []
        more = (s.reasoning or "")[self.num_reasoning:]
        if more:
            if self.open != "reasoning":
                out += self.start("reasoning")
            out += self.delta(more)
            self.num_reasoning += len(more)
        more = s.content[self.num_content:]
        if more:
            if self.open != "message":
                out += self.start("message")
            out += self.delta(more)
            self.num_content += len(more)
        for i, call in enumerate(s.calls):
            key = f"call{i}"
            if i == len(self.args_sent):
                out += self.start(key)
                self.args_sent.append(0)
            more = call.arguments[self.args_sent[i]:]
            if more and self.open == key:
                out += self.delta(more)
                self.args_sent[i] += len(more)
        if final:
            if not any(it["type"] in ("message", "function_call") for it in self.items) and \
                    self.open not in ("message",) and not s.calls:
                out += self.start("message")      # the non-streamed response has an (empty) message too
            out += self.close()
        return out


async def stream_events(run: ResponseRun) -> AsyncIterator[str]:
    ev = _Events(run)
    ev.calls = []
    yield ev.event("response.created", response=run.response("in_progress"))
    yield ev.event("response.in_progress", response=run.response("in_progress"))
    try:
        last = None
        async for out in run.job.stream:
            last = out
            o = out.outputs[0]
            for chunk in ev.update(o.text, o.finished):
                yield chunk
        if last is None:
            raise APIError(500, "the engine ended the request without output")
        response = run.final(last)
        kind = {"completed": "response.completed", "incomplete": "response.incomplete"}.get(response["status"],
                                                                                            "response.failed")
        yield ev.event(kind, response=response)
    except Exception as exc:   # noqa: BLE001 - the stream has started: report in-band
        message = exc.message if isinstance(exc, APIError) else f"{type(exc).__name__}: {exc}"
        code = (exc.code if isinstance(exc, APIError) else None) or "server_error"
        yield ev.event("error", code=code, message=message, param=None)
        yield ev.event("response.failed", response=run.response("failed", ev.items,
                                                                 error={"code": code, "message": message}))
    finally:      # also when the client went away mid-stream (the generator is closed, not raised into)
        run.state.responses.finished(run.id)
