"""POST /v1/chat/interactive (LMDeploy): multi-turn chat where the server keeps the history.

`interactive_mode: true` keeps the session: send only the new user text each turn; the history's KV cache is
reused, so only the new tokens are prefilled. `interactive_mode: false` ends the session (if any) and answers
the prompt on its own. When history + prompt reach --session-len the answer is empty with finish_reason
"length": renew with `interactive_mode: false` or POST /chat/reset {"session_id": N}. `cancel: true` aborts the
session's running turn. Streaming answers are JSON lines, one per chunk: {text (new), tokens, input_tokens,
history_tokens, finish_reason}.
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from lmserve.outputs import RequestOutput
from lmserve.server.errors import APIError, error_body
from lmserve.server.limits import check_limits
from lmserve.server.protocol import ChatInteractiveRequest, ChatInteractiveResponse
from lmserve.server.serving_chat import normalize_messages, render_chat
from lmserve.server.serving_common import last_output, make_params, reject_if_set, with_generation_defaults
from lmserve.server.state import ServerState, random_id, run_until_disconnect

_NDJSON = "application/x-ndjson"


def _line(resp: ChatInteractiveResponse) -> str:
    return json.dumps(resp.model_dump(exclude_none=True)) + "\n"


def _reply(req: ChatInteractiveRequest, resp: ChatInteractiveResponse):
    if req.stream:
        return StreamingResponse(iter([_line(resp)]), media_type=_NDJSON)
    return JSONResponse(resp.model_dump(exclude_none=True))


async def chat_interactive(state: ServerState, req: ChatInteractiveRequest, raw: Request):
    req = with_generation_defaults(req, state.generation_defaults)
    reject_if_set(req, ("image_url", "adapter_name"))
    check_limits(state.config, stop=req.stop)
    if req.cancel:
        if req.session_id >= 0:
            await state.abort_session(req.session_id)
        session = state.sessions.get(req.session_id)
        history = session.num_history_tokens if session else 0
        return _reply(req, ChatInteractiveResponse(text="", tokens=0, input_tokens=0, history_tokens=history,
                                                   finish_reason="abort"))
    state.check_available()
    session_id = req.session_id if req.session_id >= 0 else state.new_session_id()
    if not req.interactive_mode:
        await state.sessions.end(session_id)
        if req.request_output_len == 0:    # LMDeploy's way to end a session: nothing to generate
            return _reply(req, ChatInteractiveResponse(text="", tokens=0, input_tokens=0, history_tokens=0,
                                                       finish_reason="stop"))
    new = [{"role": "user", "content": req.prompt}] if isinstance(req.prompt, str) else req.prompt
    new = normalize_messages(new, "prompt")

    request_id = random_id("interactive")
    session = state.sessions.begin(session_id, request_id) if req.interactive_mode else None
    state.register(raw, request_id)
    try:
        history = session.token_ids if session else []
        messages = (session.messages if session else []) + new
        prompt_text = render_chat(state, messages, {}, "prompt")
        state.check_text_fits(prompt_text, "prompt")
        prompt_ids = state.sessions.continue_chat(session, prompt_text) or \
            await state.encode(prompt_text, "prompt", add_special_tokens=False, checked=True)
        num_input = max(0, len(prompt_ids) - len(history))
        if session is not None and history and len(prompt_ids) + 1 > state.max_model_len:
            state.sessions.release(session)
            return _reply(req, ChatInteractiveResponse(text="", tokens=0, input_tokens=num_input,
                                                       history_tokens=len(history), finish_reason="length"))
        params = make_params(
            {"max_tokens": "request_output_len", "min_tokens": "min_new_tokens"},
            max_tokens=state.clip_max_tokens(req.request_output_len, len(prompt_ids)), top_p=req.top_p,
            top_k=req.top_k, temperature=req.temperature, repetition_penalty=req.repetition_penalty,
            ignore_eos=req.ignore_eos, skip_special_tokens=req.skip_special_tokens, stop=req.stop, seed=req.seed,
            priority=req.priority,
            min_tokens=req.min_new_tokens, min_p=req.min_p)
        stream = await state.open_generation(raw, request_id, prompt_ids, params,
                                             session_id=session_id if session else None, abort_key=session_id,
                                             prompt_param="prompt")
    except BaseException:
        if session is not None:
            state.sessions.release(session)
        raise
    if session is not None:
        stream = state.sessions.track(session, stream, prompt_ids, prompt_text=prompt_text, messages=messages)

    def body(out: RequestOutput, sent_chars: int = 0) -> ChatInteractiveResponse:
        o = out.outputs[0]
        return ChatInteractiveResponse(text=o.text[sent_chars:], tokens=len(o.token_ids), input_tokens=num_input,
                                       history_tokens=len(history),
                                       finish_reason=o.finish_reason.value if o.finish_reason else None)

    if req.stream:
        async def lines(outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
            sent = 0
            try:
                async for out in outputs:
                    o = out.outputs[0]
                    if len(o.text) > sent or o.finished:
                        yield _line(body(out, sent))
                        sent = len(o.text)
            except APIError as exc:   # the stream has started: report in-band, as the SSE doors do
                yield json.dumps(error_body(exc.status, exc.message, exc.param, exc.code)) + "\n"
        return StreamingResponse(lines(stream), media_type=_NDJSON)
    final = await run_until_disconnect(raw, last_output(stream))
    return JSONResponse(body(final).model_dump(exclude_none=True))
