"""POST /v1/responses (and GET / DELETE / input_items / cancel): the OpenAI Responses API over the chat path.
The request becomes a chat request (server/responses_input.py), the engine's output is split by the chat output
parsers (reasoning, text, tool calls) and rendered as Response output items, whole or as typed stream events
(server/responses_stream.py). With store=true (the default) the response and its conversation are kept in
server/responses_store.py, so `previous_response_id` continues it."""
from __future__ import annotations

import time
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from lmserve.outputs import RequestOutput
from lmserve.server.chat_output import Split
from lmserve.server.errors import APIError
from lmserve.server.protocol.responses import (ResponsesRequest, function_call_item, message_item, new_id,
                                               reasoning_item, response_object, usage)
from lmserve.server.responses_input import to_chat_request
from lmserve.server.responses_store import StoredResponse
from lmserve.server.responses_stream import stream_events
from lmserve.server.serving_chat import ChatJob, start_chat
from lmserve.server.serving_common import last_output, with_generation_defaults
from lmserve.server.state import ServerState, run_until_disconnect

RESPONSE_ID_HEADER = "x-lmserve-response-id"    # the proxy routes previous_response_id by it


class ResponseRun:
    """One response being generated: its id, request, engine job and the store entry, if stored."""

    def __init__(self, state: ServerState, req: ResponsesRequest, job: ChatJob, conversation: list[dict],
                 response_id: str):
        self.state, self.req, self.job = state, req, job
        self.id = response_id
        self.created_at = time.time()
        self.conversation = conversation
        self.entry: StoredResponse | None = None
        self.tracked: StoredResponse | None = None     # the running entry cancel finds (stored or not)
        self.item_ids: dict[str, str] = {}      # "reasoning" / "message" / "call<i>" -> item id
        self.call_ids: dict[int, str] = {}

    def item_id(self, key: str, prefix: str) -> str:
        return self.item_ids.setdefault(key, new_id(prefix))

    def call_id(self, i: int) -> str:
        return self.call_ids.setdefault(i, new_id("call"))

    def response(self, status: str, output: list | None = None, usage_: dict | None = None,
                 incomplete_reason: str | None = None, error: dict | None = None) -> dict[str, Any]:
        return response_object(self.req, self.id, self.state.model_name, self.created_at, status=status,
                               output=output, usage_=usage_, incomplete_reason=incomplete_reason, error=error)

    def output_items(self, s: Split) -> list[dict[str, Any]]:
        items = []
        if s.reasoning:
            items.append(reasoning_item(self.item_id("reasoning", "rs"), s.reasoning))
        if s.content or not s.calls:
            items.append(message_item(self.item_id("message", "msg"), s.content))
        items += [function_call_item(self.item_id(f"call{i}", "fc"), self.call_id(i), c.name, c.arguments)
                  for i, c in enumerate(s.calls)]
        return items

    def final(self, out: RequestOutput) -> dict[str, Any]:
        """The finished Response; stores it (with the conversation so far) when store is on."""
        o = out.outputs[0]
        s = self.job.output.split(o.text, final=True)
        status, reason, error = "completed", None, None
        if o.finish_reason is not None and o.finish_reason.value == "length":
            status, reason = "incomplete", "max_output_tokens"
        # NOTE: a cancel answered "cancelled" holds even where the last tokens were already out when the abort came
        if (o.finish_reason is not None and o.finish_reason.value == "abort") or \
                (self.tracked is not None and self.tracked.is_cancelled):
            status, reason = "cancelled", None
            error = {"code": "cancelled", "message": "the response was cancelled"}
        num_reasoning = 0
        if s.reasoning:
            num_reasoning = min(len(o.token_ids), len(self.state.tokenizer.encode(s.reasoning,
                                                                                   add_special_tokens=False)))
        u = usage(self.job.num_prompt_tokens, len(o.token_ids), num_reasoning, out.num_cached_tokens)
        response = self.response(status, self.output_items(s), u, reason, error)
        if self.entry is not None:
            self.entry.response = response
            calls = [{"id": self.call_id(i), "type": "function",
                      "function": {"name": c.name, "arguments": c.arguments}} for i, c in enumerate(s.calls)]
            turn: dict[str, Any] = {"role": "assistant", "content": s.content}
            if calls:
                turn["tool_calls"] = calls
            self.entry.history = self.conversation + [turn]
        self.state.responses.finished(self.id)
        return response


def _input_items(req: ResponsesRequest) -> list[dict[str, Any]]:
    items = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": req.input}]}] \
        if isinstance(req.input, str) else [dict(i) for i in req.input]
    for item in items:
        item.setdefault("id", new_id("msg" if item.get("type", "message") == "message" else "item"))
        item.setdefault("type", "message")
    return items


async def create_response(state: ServerState, req: ResponsesRequest, raw: Request):
    state.check_model(req.model)
    history: list[dict] = []
    if req.previous_response_id is not None:
        history = state.responses.get(req.previous_response_id, "previous_response_id").history
    chat_req, conversation = to_chat_request(req, state.model_name, history)
    chat_req = with_generation_defaults(chat_req, state.generation_defaults)
    response_id = new_id("resp")
    job = await start_chat(state, chat_req, raw, response_id)
    run = ResponseRun(state, req, job, conversation, response_id)
    run.entry = StoredResponse(run.response("in_progress"), _input_items(req), conversation, request_id=response_id)
    run.tracked = run.entry
    state.responses.put(response_id, run.entry, keep=req.store is not False)
    if not req.store:
        run.entry = None
    headers = {RESPONSE_ID_HEADER: response_id}
    if req.stream:
        return StreamingResponse(stream_events(run), media_type="text/event-stream", headers=headers)
    try:
        final = await run_until_disconnect(raw, last_output(job.stream))
    finally:
        state.responses.finished(response_id)
    return JSONResponse(run.final(final), headers=headers)


def get_response(state: ServerState, response_id: str) -> dict[str, Any]:
    return state.responses.get(response_id).response


def delete_response(state: ServerState, response_id: str) -> dict[str, Any]:
    state.responses.delete(response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


def input_items(state: ServerState, response_id: str, order: str = "desc", limit: int = 20,
                after: str | None = None) -> dict[str, Any]:
    if order not in ("asc", "desc"):
        raise APIError(400, "order must be asc or desc", param="order")
    if not 1 <= limit <= 100:
        raise APIError(400, "limit must be between 1 and 100", param="limit")
    items = list(state.responses.get(response_id).input_items)
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [i["id"] for i in items]
        if after not in ids:
            raise APIError(400, f"after: no input item {after!r} in this response", param="after")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}


async def cancel_response(state: ServerState, response_id: str) -> dict[str, Any]:
    """Aborts a response still generating; its stream (or the waiting client) ends with status cancelled."""
    running = state.responses.running(response_id)
    if running is None:
        entry = state.responses.get(response_id)
        if entry.response.get("status") == "cancelled":
            return entry.response
        raise APIError(400, f"response {response_id!r} is not in progress (status {entry.response.get('status')})",
                       param="response_id", code="response_not_cancellable")
    running.is_cancelled = True
    await state.engine.abort(running.request_id)
    running.response = dict(running.response, status="cancelled")
    return running.response
