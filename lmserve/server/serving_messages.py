"""POST /v1/messages and /v1/messages/count_tokens: the Anthropic Messages API over the chat path. The request
becomes a chat request (server/messages_input.py); the chat output parsers split the engine's text into thinking,
text and tool calls, rendered as content blocks, whole or as Anthropic's stream events. Errors on these paths
leave in Anthropic's shape (server/anthropic_errors.py)."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from lmserve.outputs import RequestOutput
from lmserve.server.chat_output import Split
from lmserve.server.errors import APIError
from lmserve.server.messages_input import to_chat_request
from lmserve.server.protocol.anthropic import (MessagesCountTokensRequest, MessagesRequest, error_body,
                                               message_object, text_block, thinking_block, tool_use_block, usage)
from lmserve.server.protocol.responses import new_id
from lmserve.server.serving_chat import ChatJob, start_chat
from lmserve.server.serving_common import last_output, with_generation_defaults
from lmserve.server.serving_tokenize import chat_prompt_ids
from lmserve.server.state import ServerState, run_until_disconnect


def _input(arguments: str) -> Any:
    try:
        return json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        return {"_raw": arguments}      # a malformed call still reaches the client, visibly


def _stop(o, s: Split) -> tuple[str, str | None]:
    reason = o.finish_reason.value if o.finish_reason is not None else None
    if s.calls and reason == "stop":
        return "tool_use", None
    if reason == "length":
        return "max_tokens", None
    if isinstance(o.stop_reason, str):
        return "stop_sequence", o.stop_reason
    return "end_turn", None


class _MessageView:
    def __init__(self, state: ServerState, req: MessagesRequest, job: ChatJob):
        self.state, self.req, self.job = state, req, job
        self.id = job.request_id
        self.tool_ids: dict[int, str] = {}

    def tool_id(self, i: int) -> str:
        return self.tool_ids.setdefault(i, new_id("toolu"))

    def blocks(self, s: Split) -> list[dict[str, Any]]:
        out = [thinking_block(s.reasoning)] if s.reasoning else []
        if s.content or not s.calls:
            out.append(text_block(s.content))
        out += [tool_use_block(self.tool_id(i), c.name, _input(c.arguments)) for i, c in enumerate(s.calls)]
        return out

    def message(self, out: RequestOutput) -> dict[str, Any]:
        o = out.outputs[0]
        s = self.job.output.split(o.text, final=True)
        reason, seq = _stop(o, s)
        return message_object(self.id, self.state.model_name, self.blocks(s), reason, seq,
                              usage(self.job.num_prompt_tokens, len(o.token_ids), out.num_cached_tokens))

    async def stream(self) -> AsyncIterator[str]:
        def event(kind: str, **fields: Any) -> str:
            return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields}, ensure_ascii=False)}\n\n"

        start = message_object(self.id, self.state.model_name, [], None, None,
                               usage(self.job.num_prompt_tokens, 0))
        yield event("message_start", message=start)
        yield event("ping")
        index, open_kind = -1, None
        sent = {"thinking": 0, "text": 0}
        args_sent: list[int] = []
        o = s = None
        try:
            async for out in self.job.stream:
                o = out.outputs[0]
                s = self.job.output.split(o.text, o.finished)
                chunks: list[str] = []
                for kind, text in (("thinking", s.reasoning or ""), ("text", s.content)):
                    more = text[sent[kind]:]
                    if not more:
                        continue
                    if open_kind != kind:
                        if open_kind is not None:
                            chunks.append(event("content_block_stop", index=index))
                        index, open_kind = index + 1, kind
                        block = thinking_block("") if kind == "thinking" else text_block("")
                        chunks.append(event("content_block_start", index=index, content_block=block))
                    delta = {"type": "thinking_delta", "thinking": more} if kind == "thinking" else \
                        {"type": "text_delta", "text": more}
                    chunks.append(event("content_block_delta", index=index, delta=delta))
                    sent[kind] += len(more)
                for i, call in enumerate(s.calls):
                    if i == len(args_sent):
                        if open_kind is not None:
                            chunks.append(event("content_block_stop", index=index))
                        index, open_kind = index + 1, f"call{i}"
                        chunks.append(event("content_block_start", index=index,
                                            content_block=tool_use_block(self.tool_id(i), call.name, {})))
                        args_sent.append(0)
                    more = call.arguments[args_sent[i]:]
                    if more and open_kind == f"call{i}":
                        chunks.append(event("content_block_delta", index=index,
                                            delta={"type": "input_json_delta", "partial_json": more}))
                        args_sent[i] += len(more)
                for c in chunks:
                    yield c
            if o is None:
                raise APIError(500, "the engine ended the request without output")
            if open_kind is None and not s.calls:       # the non-streamed message has a (maybe empty) text block
                index, open_kind = index + 1, "text"
                yield event("content_block_start", index=index, content_block=text_block(""))
            if open_kind is not None:
                yield event("content_block_stop", index=index)
            reason, seq = _stop(o, s)
            yield event("message_delta", delta={"stop_reason": reason, "stop_sequence": seq},
                        usage={"output_tokens": len(o.token_ids)})
            yield event("message_stop")
        except Exception as exc:   # noqa: BLE001 - the stream has started: report in-band
            status = exc.status if isinstance(exc, APIError) else 500
            message = exc.message if isinstance(exc, APIError) else f"{type(exc).__name__}: {exc}"
            yield event("error", error=error_body(status, message)["error"])


async def create_message(state: ServerState, req: MessagesRequest, raw: Request):
    state.check_model(req.model)
    chat = with_generation_defaults(to_chat_request(req, state.model_name), state.generation_defaults)
    job = await start_chat(state, chat, raw, new_id("msg"))
    view = _MessageView(state, req, job)
    if req.stream:
        return StreamingResponse(view.stream(), media_type="text/event-stream")
    final = await run_until_disconnect(raw, last_output(job.stream))
    return JSONResponse(view.message(final))


async def count_tokens(state: ServerState, req: MessagesCountTokensRequest) -> dict[str, int]:
    state.check_model(req.model)
    chat = to_chat_request(req, state.model_name)
    return {"input_tokens": len(await chat_prompt_ids(state, chat))}
