"""Helpers shared by the serving modules: sampling parameters from request fields, logprobs in OpenAI's two
shapes, usage, SSE framing and merging the output streams of several engine requests."""
from __future__ import annotations

import asyncio
import copy
import json
import math
from collections.abc import AsyncIterator, Sequence
from typing import Any

from lmserve.outputs import RequestOutput, TokenLogprob
from lmserve.sampling_params import SamplingParams, SamplingParamsError
from lmserve.server.errors import APIError, error_body, not_supported
from lmserve.server.protocol import (ChatCompletionTokenLogprob, ChoiceLogprobs, CompletionLogprobs,
                                     PromptTokensDetails, TopLogprob, UsageInfo, _Model)

SSE_DONE = "data: [DONE]\n\n"
_MIN_LOGPROB = -9999.0   # JSON has no -inf


def sse(payload: _Model | dict) -> str:
    if isinstance(payload, _Model):
        return f"data: {payload.model_dump_json(exclude_none=True)}\n\n"
    return f"data: {json.dumps(payload)}\n\n"


def sse_error(exc: BaseException) -> str:
    """An error after the stream started: the status line is gone, so it travels as an SSE event."""
    if isinstance(exc, APIError):
        return sse(error_body(exc.status, exc.message, exc.param, exc.code))
    if isinstance(exc, SamplingParamsError):
        return sse(error_body(400, str(exc), exc.param))
    return sse(error_body(500, f"{type(exc).__name__}: {exc}"))


def make_params(rename: dict[str, str] | None = None, **kwargs: Any) -> SamplingParams:
    """SamplingParams from request fields; a bad value is a 400 naming the field as the request spells it."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        return SamplingParams(**kwargs)
    except SamplingParamsError as exc:
        param = (rename or {}).get(exc.param, exc.param)
        message = str(exc)
        if param != exc.param:
            message = message.replace(exc.param, param, 1)
        raise APIError(400, message, param=param) from exc


def with_generation_defaults(req: _Model, defaults: dict[str, Any]) -> _Model:
    """The request with the model's generation defaults in the sampling fields it left out or sent as null;
    a field the client set always wins."""
    fill = {name: value for name, value in defaults.items()
            if name in type(req).model_fields and (name not in req.model_fields_set or getattr(req, name) is None)}
    return req.model_copy(update=fill) if fill else req


def parse_logit_bias(logit_bias: dict[str, float] | None) -> dict[int, float] | None:
    if not logit_bias:
        return None
    try:
        return {int(k): float(v) for k, v in logit_bias.items()}
    except (TypeError, ValueError) as exc:
        raise APIError(400, "logit_bias keys must be token ids (integers as strings)", param="logit_bias") from exc


def reject_if_set(request: _Model, fields: Sequence[str]) -> None:
    for name in fields:
        value = getattr(request, name, None)
        if value not in (None, False, [], {}):
            raise not_supported(name)


def clamp_logprob(x: float) -> float:
    return _MIN_LOGPROB if math.isnan(x) or x < _MIN_LOGPROB else float(x)


def chat_logprobs(state, logprobs: list[TokenLogprob], num_top: int) -> ChoiceLogprobs:
    content = []
    for lp in logprobs:
        tok = state.token_str(lp.token_id)
        top = [TopLogprob(token=(t := state.token_str(tid)), logprob=clamp_logprob(v), bytes=list(t.encode()))
               for tid, v in lp.top[:num_top]]
        content.append(ChatCompletionTokenLogprob(token=tok, logprob=clamp_logprob(lp.logprob),
                                                  bytes=list(tok.encode()), top_logprobs=top))
    return ChoiceLogprobs(content=content)


def completion_logprobs(state, token_ids: Sequence[int], logprobs: Sequence[TokenLogprob | None],
                        num_top: int, text_offset: int = 0) -> tuple[CompletionLogprobs, int]:
    """OpenAI's legacy shape. The chosen token is always in top_logprobs (so lm-eval's greedy check works with
    logprobs=1). Returns the shape and the text offset after the last token."""
    out = CompletionLogprobs()
    for tid, lp in zip(token_ids, logprobs):
        tok = state.token_str(tid)
        out.tokens.append(tok)
        out.text_offset.append(text_offset)
        text_offset += len(tok)
        if lp is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        top = {state.token_str(t): clamp_logprob(v) for t, v in lp.top[:num_top]}
        top.setdefault(tok, clamp_logprob(lp.logprob))
        out.token_logprobs.append(clamp_logprob(lp.logprob))
        out.top_logprobs.append(top)
    return out, text_offset


def usage_of(outputs: Sequence[RequestOutput], num_prompt_tokens: int | None = None) -> UsageInfo:
    prompt = sum(len(o.prompt_token_ids) for o in outputs) if num_prompt_tokens is None else num_prompt_tokens
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    cached = sum(o.num_cached_tokens for o in outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


async def last_output(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    last = None
    async for out in stream:
        last = out
    assert last is not None
    return last


async def merge_streams(streams: Sequence[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave several streams as their items arrive: yields (stream index, item)."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator[Any]) -> None:
        try:
            async for item in stream:
                await queue.put((i, item))
        except Exception as exc:   # noqa: BLE001 - handed to the consumer
            await queue.put((i, exc))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def open_all(state, request, request_ids: list[str], prompts: list[list[int]], params: SamplingParams,
                   prompt_param: str, abort_key: int | None = None) -> list[AsyncIterator[RequestOutput]]:
    """Start one engine request per prompt at once (so their prefills batch); all or none."""
    results = await asyncio.gather(*[
        state.open_generation(request, rid, ids, copy.copy(params), abort_key=abort_key,
                              prompt_param=prompt_param if len(prompts) == 1 else f"{prompt_param}[{i}]")
        for i, (rid, ids) in enumerate(zip(request_ids, prompts))], return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        await state.abort_leftovers(request_ids)
        raise errors[0]
    return results
