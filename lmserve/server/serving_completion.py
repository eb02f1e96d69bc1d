"""POST /v1/completions: prompt(s) as text or token ids; `echo` and integer `logprobs` in OpenAI's legacy shape,
prompt tokens included (first one null), which is what lm-evaluation-harness's loglikelihood tasks read.

`max_tokens: 0` with `echo: true` scores the prompt only: the engine samples one token that is not returned.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from lmserve.outputs import CompletionOutput, RequestOutput
from lmserve.server.errors import APIError, not_supported
from lmserve.server.limits import check_limits, check_num_prompts
from lmserve.server.protocol import (CompletionRequest, CompletionResponse, CompletionResponseChoice,
                                     CompletionStreamResponse)
from lmserve.server.serving_common import (SSE_DONE, completion_logprobs, last_output, make_params, merge_streams,
                                           open_all, parse_logit_bias, sse, sse_error, usage_of,
                                           with_generation_defaults)
from lmserve.server.state import ServerState, random_id, run_until_disconnect
from lmserve.server.structured import guided_from_request


async def parse_prompts(state: ServerState, prompt) -> list[tuple[str | None, list[int]]]:
    """str | list[str] | list[int] | list[list[int]] -> [(text or None, token ids)]."""
    async def from_text(text: str, where: str) -> tuple[str, list[int]]:
        return text, await state.encode(text, where, add_special_tokens=True)

    def from_ids(ids: list, where: str) -> tuple[None, list[int]]:
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise APIError(400, f"{where} must hold only integer token ids", param=where)
        bad = [t for t in ids if not 0 <= t < state.engine.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} in {where} is outside the vocabulary [0, "
                                f"{state.engine.vocab_size})", param=where)
        return None, list(ids)

    if isinstance(prompt, str):
        return [await from_text(prompt, "prompt")]
    if not isinstance(prompt, list) or not prompt:
        raise APIError(400, "prompt must be a string, a list of strings, token ids or a list of token-id lists",
                       param="prompt")
    if all(isinstance(p, str) for p in prompt):
        check_num_prompts(state.config, len(prompt), "prompt")
        return [await from_text(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
    if all(isinstance(p, list) for p in prompt):
        check_num_prompts(state.config, len(prompt), "prompt")
        return [from_ids(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
    return [from_ids(prompt, "prompt")]


async def create_completion(state: ServerState, req: CompletionRequest, raw: Request):
    req = with_generation_defaults(req, state.generation_defaults)
    state.check_model(req.model)
    if req.suffix is not None:
        raise not_supported("suffix")
    n = req.n if req.n is not None else 1
    check_limits(state.config, n=req.n, best_of=req.best_of, logprobs=req.logprobs, stop=req.stop,
                 logit_bias=req.logit_bias)
    if req.best_of is not None and req.best_of != n:
        raise not_supported("best_of", "best_of other than n")
    state.check_available()
    prompts = await parse_prompts(state, req.prompt)
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    score_only = requested == 0 and bool(req.echo)     # prompt scoring: sample one token, return none
    longest = max(len(ids) for _, ids in prompts)
    params = make_params(
        {"max_tokens": max_tokens_param, "min_tokens": "min_new_tokens"},
        n=n, max_tokens=1 if score_only else state.clip_max_tokens(requested, longest),
        min_tokens=req.min_new_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
        min_p=req.min_p, repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, logit_bias=parse_logit_bias(req.logit_bias), seed=req.seed,
        priority=req.priority,
        stop=req.stop, include_stop_str_in_output=req.include_stop_str_in_output, ignore_eos=req.ignore_eos,
        logprobs=req.logprobs, prompt_logprobs=req.logprobs if req.echo and req.logprobs is not None else None,
        skip_special_tokens=req.skip_special_tokens, spaces_between_special_tokens=req.spaces_between_special_tokens,
        guided=guided_from_request(req))

    request_id = random_id("cmpl")
    request_ids = [f"{request_id}-{i}" for i in range(len(prompts))]
    abort_key = req.session_id if req.session_id is not None and req.session_id >= 0 else None
    streams = await open_all(state, raw, request_ids, [ids for _, ids in prompts], params, "prompt", abort_key)
    view = _CompletionView(state, req, request_id, prompts, n, score_only)
    if req.stream:
        return StreamingResponse(view.stream(streams), media_type="text/event-stream")
    finals = await run_until_disconnect(raw, asyncio.gather(*[last_output(s) for s in streams]))
    return JSONResponse(view.response(finals).model_dump(exclude_none=True))


class _CompletionView:
    def __init__(self, state: ServerState, req: CompletionRequest, request_id: str,
                 prompts: list[tuple[str | None, list[int]]], n: int, score_only: bool):
        self.state = state
        self.req = req
        self.request_id = request_id
        self.created = int(time.time())
        self.prompts = prompts
        self.n = n
        self.score_only = score_only

    def _prompt_text(self, p: int) -> str:
        text, ids = self.prompts[p]
        return text if text is not None else self.state.tokenizer.decode(ids, skip_special_tokens=False)

    def _output(self, o: CompletionOutput) -> CompletionOutput:
        if self.score_only:    # drop the one sampled token: the caller asked for the prompt only
            return CompletionOutput(index=o.index, text="", token_ids=[], logprobs=[] if o.logprobs is not None
                                    else None, finish_reason=o.finish_reason, stop_reason=o.stop_reason)
        return o

    def _choice(self, p: int, out: RequestOutput, o: CompletionOutput, sent_chars: int, sent_tokens: int,
                offset: int, first: bool) -> tuple[CompletionResponseChoice, int]:
        """Choice for text/tokens past (sent_chars, sent_tokens); `first` adds the echoed prompt."""
        text, token_ids = o.text[sent_chars:], list(o.token_ids[sent_tokens:])
        logprobs = None
        if self.req.logprobs is not None:
            ids, lps = token_ids, list((o.logprobs or [])[sent_tokens:len(o.token_ids)])
            if first and self.req.echo:
                ids = list(out.prompt_token_ids) + ids
                lps = list(out.prompt_logprobs or [None] * len(out.prompt_token_ids)) + lps
            logprobs, offset = completion_logprobs(self.state, ids, lps, self.req.logprobs, offset)
        if first and self.req.echo:
            text = self._prompt_text(p) + text
        choice = CompletionResponseChoice(
            index=p * self.n + o.index, text=text, logprobs=logprobs,
            finish_reason=o.finish_reason.value if o.finish_reason else None,
            token_ids=token_ids if self.req.return_token_ids else None,
            prompt_token_ids=list(out.prompt_token_ids) if self.req.return_token_ids and first else None)
        return choice, offset

    def response(self, finals: list[RequestOutput]) -> CompletionResponse:
        choices = []
        for p, out in enumerate(finals):
            for o in out.outputs:
                choices.append(self._choice(p, out, self._output(o), 0, 0, 0, True)[0])
        usage = usage_of(finals)
        if self.score_only:
            usage.completion_tokens = 0
            usage.total_tokens = usage.prompt_tokens
        return CompletionResponse(id=self.request_id, created=self.created, model=self.state.model_name,
                                  choices=sorted(choices, key=lambda c: c.index), usage=usage)

    async def stream(self, streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[str]:
        state: dict[int, list[int]] = {}     # choice index -> [sent chars, sent tokens, text offset, finished]
        lasts: dict[int, RequestOutput] = {}
        try:
            async for p, out in merge_streams(streams):
                lasts[p] = out
                choices = []
                for o in out.outputs:
                    o = self._output(o)
                    key = p * self.n + o.index
                    first = key not in state
                    sent_chars, sent_tokens, offset, finished = state.get(key, [0, 0, 0, False])
                    if finished or (len(o.text) == sent_chars and len(o.token_ids) == sent_tokens
                                    and not o.finished):
                        continue    # NOTE: also skips prefill-only outputs, whose prompt logprobs are partial
                    choice, offset = self._choice(p, out, o, sent_chars, sent_tokens, offset, first)
                    state[key] = [len(o.text), len(o.token_ids), offset, o.finished]
                    choices.append(choice)
                if choices:
                    yield sse(CompletionStreamResponse(id=self.request_id, created=self.created,
                                                       model=self.state.model_name, choices=choices))
        except Exception as exc:   # noqa: BLE001 - the stream has started: report in-band
            yield sse_error(exc)
        opts = self.req.stream_options
        if opts is not None and opts.include_usage and lasts:
            usage = usage_of(list(lasts.values()))
            yield sse(CompletionStreamResponse(id=self.request_id, created=self.created,
                                               model=self.state.model_name, choices=[], usage=usage))
        yield SSE_DONE
