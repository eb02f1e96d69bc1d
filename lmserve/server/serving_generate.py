"""POST /generate (LMDeploy native): raw text or token ids in, {text, output_ids, meta_info} out.

Sessions follow LMDeploy's older sequence_start/sequence_end semantics: with a `session_id`, the turn's tokens
stay on the server; `sequence_start: false` continues the session (send only the new text or tokens);
`sequence_end: true` ends it after this turn. A continued session that reaches --session-len answers
finish_reason {"type": "length"} without generating; start over with `sequence_start: true`.
"""
from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from lmserve.outputs import CompletionOutput, RequestOutput
from lmserve.server.errors import APIError
from lmserve.server.limits import check_limits
from lmserve.server.mm_input import generate_images
from lmserve.server.protocol import GenerateMetaInfo, GenerateRequest, GenerateResponse
from lmserve.server.serving_common import (SSE_DONE, clamp_logprob, last_output, make_params, reject_if_set, sse,
                                           sse_error, with_generation_defaults)
from lmserve.server.state import ServerState, random_id, run_until_disconnect
from lmserve.server.structured import guided_from_request


def finish_reason_dict(o: CompletionOutput) -> dict | None:
    if o.finish_reason is None:
        return None
    reason: dict = {"type": o.finish_reason.value}
    if o.finish_reason.value == "length":
        reason["length"] = len(o.token_ids)
    elif o.stop_reason is not None:
        reason["matched"] = o.stop_reason
    return reason


async def generate(state: ServerState, req: GenerateRequest, raw: Request):
    req = with_generation_defaults(req, state.generation_defaults)
    reject_if_set(req, ("mm_processor_kwargs", "return_routed_experts"))
    if (req.prompt is None) == (req.input_ids is None):
        raise APIError(400, "give exactly one of prompt or input_ids", param="prompt")
    check_limits(state.config, stop=req.stop, stop_token_ids=req.stop_token_ids)
    state.check_available()
    if req.adapter_name is not None or req.model is not None:
        state.check_model(req.adapter_name or req.model)     # LMDeploy picks a LoRA adapter by adapter_name
    use_session = req.session_id is not None and req.session_id >= 0
    continuing = use_session and req.sequence_start is False
    prompt, images = await generate_images(state.engine, state.config.media, req.image_data, req.prompt,
                                           use_session)
    if req.input_ids is not None:
        new_ids = list(req.input_ids)
    else:
        new_ids = await state.encode(prompt, "prompt", add_special_tokens=not continuing)
    prompt_param = "input_ids" if req.input_ids is not None else "prompt"

    request_id = random_id("gen")
    session = state.sessions.begin(req.session_id, request_id) if use_session else None
    state.register(raw, request_id)
    try:
        history = session.token_ids if continuing else []
        prompt_ids = history + new_ids
        if continuing and history and len(prompt_ids) + 1 > state.max_model_len:
            state.sessions.release(session)
            meta = GenerateMetaInfo(prompt_tokens=len(prompt_ids), completion_tokens=0,
                                    finish_reason={"type": "length", "length": 0})
            body = GenerateResponse(text="", output_ids=[], meta_info=meta)
            if req.stream:
                return StreamingResponse(iter([sse(body), SSE_DONE]), media_type="text/event-stream")
            return JSONResponse(body.model_dump(exclude_none=True))
        params = make_params(
            None, max_tokens=state.clip_max_tokens(req.max_tokens, len(prompt_ids)), temperature=req.temperature,
            top_p=req.top_p, top_k=req.top_k, min_p=req.min_p, repetition_penalty=req.repetition_penalty,
            ignore_eos=req.ignore_eos, stop=req.stop, stop_token_ids=req.stop_token_ids, seed=req.seed,
            priority=req.priority,
            include_stop_str_in_output=req.include_stop_str_in_output, logprobs=0 if req.return_logprob else None,
            skip_special_tokens=req.skip_special_tokens,
            spaces_between_special_tokens=req.spaces_between_special_tokens, guided=guided_from_request(req))
        keep = use_session and not req.sequence_end
        stream = await state.open_generation(raw, request_id, prompt_ids, params,
                                             session_id=req.session_id if keep else None,
                                             abort_key=req.session_id if use_session else None,
                                             prompt_param=prompt_param, images=images, prompt_text=prompt)
    except BaseException:
        if session is not None:
            state.sessions.release(session)
        raise
    if session is not None:
        stream = state.sessions.track(session, stream, prompt_ids, end_after=bool(req.sequence_end))
    if req.stream:
        return StreamingResponse(_stream(req, stream), media_type="text/event-stream")
    final = await run_until_disconnect(raw, last_output(stream))
    return JSONResponse(_response(req, final, final.outputs[0], 0).model_dump(exclude_none=True))


def _response(req: GenerateRequest, out: RequestOutput, o: CompletionOutput, sent_tokens: int,
              sent_chars: int = 0) -> GenerateResponse:
    logprobs = None
    if req.return_logprob:
        logprobs = [(clamp_logprob(lp.logprob), lp.token_id) for lp in (o.logprobs or [])[sent_tokens:]]
    meta = GenerateMetaInfo(prompt_tokens=len(out.prompt_token_ids), completion_tokens=len(o.token_ids),
                            finish_reason=finish_reason_dict(o), output_token_logprobs=logprobs)
    return GenerateResponse(text=o.text[sent_chars:], output_ids=list(o.token_ids[sent_tokens:]), meta_info=meta)


async def _stream(req: GenerateRequest, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
    """SSE: each event carries the new text and token ids; the last one the finish reason."""
    sent_chars = sent_tokens = 0
    try:
        async for out in outputs:
            o = out.outputs[0]
            if len(o.text) == sent_chars and len(o.token_ids) == sent_tokens and not o.finished:
                continue
            yield sse(_response(req, out, o, sent_tokens, sent_chars))
            sent_chars, sent_tokens = len(o.text), len(o.token_ids)
    except Exception as exc:   # noqa: BLE001 - the stream has started: report in-band
        yield sse_error(exc)
    yield SSE_DONE
