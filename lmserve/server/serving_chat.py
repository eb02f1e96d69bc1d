"""POST /v1/chat/completions: messages -> chat template -> prompt tokens + SamplingParams; outputs -> OpenAI JSON
or SSE chunks. With `session_id` the conversation's KV cache stays on the server between turns."""
from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from lmserve.outputs import RequestOutput
from lmserve.sampling_params import GuidedDecodingParams
from lmserve.server.chat_output import ChatOutput
from lmserve.server.chat_tools import ToolCalls, message_for_template, template_renders_tools
from lmserve.server.errors import APIError, not_supported
from lmserve.server.limits import check_limits
from lmserve.server.mm_input import (IMAGE_PART_TYPES, ImageRef, for_template, image_max_tokens, image_placeholder,
                                     image_ref, load_images, takes_images, with_prompt_count)
from lmserve.server.protocol import (ChatCompletionRequest, ChatCompletionResponse, ChatCompletionResponseChoice,
                                     ChatCompletionResponseStreamChoice, ChatCompletionStreamResponse,
                                     DeltaMessage)
from lmserve.server.serving_common import (SSE_DONE, chat_logprobs, last_output, make_params, parse_logit_bias,
                                           reject_if_set, sse, sse_error, usage_of, with_generation_defaults)
from lmserve.server.state import ServerState, random_id, run_until_disconnect
from lmserve.server.structured import guided_from_request

_UNSUPPORTED = ("functions", "function_call", "audio", "prediction", "web_search_options", "mm_processor_kwargs")


def normalize_messages(messages: list[dict[str, Any]], param: str = "messages", renders_tools: bool = True,
                       image_refs: list[ImageRef] | None = None) -> list[dict[str, Any]]:
    """OpenAI messages -> what chat templates expect: text content parts joined; assistant tool calls and `tool`
    results rendered as the template can (server/chat_tools.py). Image parts are refused unless `image_refs`
    collects them (a vision model): such a message keeps a list of text and {"type": "image"} items."""
    out = []
    for i, msg in enumerate(messages):
        role = msg.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            if role == "function":
                raise not_supported(f"{param}[{i}].role", f"messages with role {role!r}")
            raise APIError(400, f"{param}[{i}].role must be system, user, assistant or tool, got {role!r}",
                           param=f"{param}[{i}].role")
        if msg.get("tool_calls") is not None and (role != "assistant" or not isinstance(msg["tool_calls"], list)):
            raise APIError(400, f"{param}[{i}].tool_calls must be a list on an assistant message",
                           param=f"{param}[{i}].tool_calls")
        content = msg.get("content")
        if isinstance(content, list):
            texts, items = [], []
            for j, part in enumerate(content):
                if isinstance(part, str):
                    texts.append(part)
                elif isinstance(part, dict) and part.get("type") == "text":
                    texts.append(str(part.get("text", "")))
                elif isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES and image_refs is not None:
                    image_refs.append(image_ref(part, f"{param}[{i}].content[{j}]"))
                    items += [{"type": "text", "text": "\n".join(texts)}] if texts else []
                    items.append({"type": "image"})
                    texts = []
                    continue
                else:
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    where = (part.get("_where") if isinstance(part, dict) else None) or f"{param}[{i}].content[{j}]"
                    raise not_supported(where, f"a content part of type {kind!r}")
            if items:
                content = items + ([{"type": "text", "text": "\n".join(texts)}] if texts else [])
            else:
                content = "\n".join(texts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise APIError(400, f"{param}[{i}].content must be a string or a list of parts",
                           param=f"{param}[{i}].content")
        norm = {"role": "system" if role == "developer" else role, "content": content}
        if msg.get("tool_calls"):
            norm["tool_calls"] = msg["tool_calls"]
        if role == "tool":
            norm["tool_call_id"] = msg.get("tool_call_id")
        out.append(message_for_template(norm, renders_tools))
    if not out:
        raise APIError(400, f"{param} must not be empty", param=param)
    return out


def render_chat(state: ServerState, messages: list[dict[str, Any]], template_kwargs: dict[str, Any],
                param: str = "messages") -> str:
    try:
        return state.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **template_kwargs)
    except Exception as exc:    # jinja errors: the conversation does not fit the template
        raise APIError(400, f"the chat template rejected the conversation: {exc}", param=param) from exc


def _check_request(state: ServerState, req: ChatCompletionRequest) -> None:
    reject_if_set(req, _UNSUPPORTED)
    if not req.tools and req.tool_choice not in (None, "auto", "none"):
        raise APIError(400, "tool_choice other than 'auto' or 'none' needs tools", param="tool_choice")
    if req.modalities not in (None, ["text"]):
        raise not_supported("modalities", "output modalities other than ['text']")
    # NOTE: only a positive top_logprobs needs logprobs (as in OpenAI and LMDeploy): LMDeploy's APIClient sends
    # "logprobs": false, "top_logprobs": 0 by default
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
    check_limits(state.config, n=req.n, logprobs=req.top_logprobs, logprobs_param="top_logprobs", stop=req.stop,
                 logit_bias=req.logit_bias)


def _guided(state: ServerState, req: ChatCompletionRequest, tools: ToolCalls, template_kwargs: dict[str, Any],
            prompt_text: str | None) -> GuidedDecodingParams | None:
    """The grammar of the answer: tool_choice required/named, else response_format / guided_*. With a reasoning
    parser it starts after the reasoning block, unless thinking is switched off."""
    from_format = guided_from_request(req)
    from_tools = tools.guided()
    if from_format is not None and from_tools is not None:
        raise APIError(400, f"{from_format.param} cannot be combined with tool_choice {tools.mode!r}",
                       param=from_format.param)
    guided = from_tools or from_format
    if guided is not None and state.reasoning_parser is not None and template_kwargs.get("enable_thinking", True) \
            is not False and prompt_text is not None:
        guided = dataclasses.replace(guided, start_after=state.reasoning_parser.end)
    return guided


@dataclasses.dataclass
class ChatJob:
    """A chat request started in the engine: what the Responses and Messages APIs build their answers from."""
    request_id: str
    num_prompt_tokens: int
    output: ChatOutput
    stream: AsyncIterator[RequestOutput]


async def create_chat_completion(state: ServerState, req: ChatCompletionRequest, raw: Request):
    req = with_generation_defaults(req, state.generation_defaults)
    job = await start_chat(state, req, raw, random_id("chatcmpl"))
    view = _ChatView(state, req, job)
    if req.stream:
        return StreamingResponse(view.stream(job.stream), media_type="text/event-stream")
    final = await run_until_disconnect(raw, last_output(job.stream))
    return JSONResponse(view.response(final).model_dump(exclude_none=True))


async def start_chat(state: ServerState, req: ChatCompletionRequest, raw: Request | None,
                     request_id: str) -> ChatJob:
    """Checks, chat template, tokens, SamplingParams; starts the engine request (the first output is in)."""
    state.check_model(req.model)
    _check_request(state, req)
    state.check_available()
    tools = ToolCalls(req, state.tool_parser, state.config.max_tool_calls)
    template_kwargs = dict(req.chat_template_kwargs or {})
    if req.enable_thinking is not None:
        template_kwargs.setdefault("enable_thinking", req.enable_thinking)
    if req.reasoning_effort is not None:
        template_kwargs.setdefault("reasoning_effort", req.reasoning_effort)

    use_session = req.session_id is not None and req.session_id >= 0
    session = state.sessions.get(req.session_id) if use_session else None
    images = None
    if isinstance(req.messages, str) and not req.do_preprocess:
        prompt_text, messages = None, None
        prompt_ids = await state.encode(req.messages, "messages", add_special_tokens=True)
    else:
        if req.do_preprocess is False:
            raise APIError(400, "do_preprocess=false needs messages to be a string (the raw prompt)",
                           param="do_preprocess")
        messages = [{"role": "user", "content": req.messages}] if isinstance(req.messages, str) else req.messages
        template = state.tokenizer.chat_template
        refs: list[ImageRef] | None = [] if takes_images(state.engine) else None
        messages = normalize_messages(messages, renders_tools=template_renders_tools(template), image_refs=refs)
        if refs:
            if use_session:
                raise not_supported("session_id", "session_id with images")
            images = await load_images(refs, state.config.media)
            messages = for_template(messages, template, image_placeholder(state.engine))
        messages, tool_kwargs = tools.prepare_messages(messages, template)
        prompt_text = render_chat(state, messages, {**template_kwargs, **tool_kwargs})
        state.check_text_fits(prompt_text, "messages")
        prompt_ids = state.sessions.continue_chat(session, prompt_text) or \
            await state.encode(prompt_text, "messages", add_special_tokens=False, checked=True)

    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    n = req.n if req.n is not None else 1
    if use_session and n != 1:
        raise APIError(400, "n must be 1 when a session_id is given", param="n")
    params = make_params(
        {"max_tokens": "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens",
         "logprobs": "top_logprobs", "min_tokens": "min_new_tokens"},
        n=n, max_tokens=image_max_tokens(state, requested, len(prompt_ids), images), min_tokens=req.min_new_tokens,
        temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
        repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, logit_bias=parse_logit_bias(req.logit_bias), seed=req.seed,
        priority=req.priority,
        stop=req.stop, include_stop_str_in_output=req.include_stop_str_in_output, ignore_eos=req.ignore_eos,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        skip_special_tokens=False if tools.active and tools.parser.keeps_special_tokens else req.skip_special_tokens,
        spaces_between_special_tokens=req.spaces_between_special_tokens,
        guided=_guided(state, req, tools, template_kwargs, prompt_text))

    if use_session:
        session = state.sessions.begin(req.session_id, request_id)
    try:
        stream = await state.open_generation(raw, request_id, prompt_ids, params,
                                             session_id=req.session_id if use_session else None,
                                             prompt_param="messages", images=images, prompt_text=prompt_text)
    except BaseException:
        if use_session:
            state.sessions.release(session)
        raise
    if use_session:
        stream = state.sessions.track(session, stream, prompt_ids, prompt_text=prompt_text)

    num_prompt_tokens = len(prompt_ids)
    if images:      # the engine's prompt has the image tokens too
        num_prompt_tokens, stream = await with_prompt_count(stream)
    starts_in_reasoning = prompt_text is not None and prompt_text.rstrip().endswith("<think>")
    output = ChatOutput(tools, state.reasoning_parser, starts_in_reasoning)
    return ChatJob(request_id, num_prompt_tokens, output, stream)


class _ChatView:
    """RequestOutput -> OpenAI chat JSON (one response, or the chunks of a stream)."""

    def __init__(self, state: ServerState, req: ChatCompletionRequest, job: ChatJob):
        self.output = job.output
        self.state = state
        self.req = req
        self.request_id = job.request_id
        self.created = int(time.time())
        self.num_prompt_tokens = job.num_prompt_tokens
        self.num_top = req.top_logprobs or 0

    def response(self, out: RequestOutput) -> ChatCompletionResponse:
        choices = []
        for o in out.outputs:
            choices.append(ChatCompletionResponseChoice(
                index=o.index, message=self.output.message(o.text),
                logprobs=chat_logprobs(self.state, o.logprobs or [], self.num_top) if self.req.logprobs else None,
                finish_reason=self.output.finish_reason(o.text, o.finish_reason.value if o.finish_reason else None),
                token_ids=list(o.token_ids) if self.req.return_token_ids else None))
        return ChatCompletionResponse(
            id=self.request_id, created=self.created, model=self.state.model_name, choices=choices,
            usage=usage_of([out]), prompt_token_ids=list(out.prompt_token_ids) if self.req.return_token_ids else None)

    def _chunk(self, choices, usage=None) -> str:
        return sse(ChatCompletionStreamResponse(id=self.request_id, created=self.created,
                                                model=self.state.model_name, choices=choices, usage=usage))

    async def stream(self, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
        n = self.req.n or 1
        sent_chars, sent_tokens, done = [0] * n, [0] * n, [False] * n
        streamers = [self.output.streamer() for _ in range(n)]
        yield self._chunk([ChatCompletionResponseStreamChoice(index=i, delta=DeltaMessage(role="assistant",
                                                                                         content=""))
                           for i in range(n)])
        last = None
        try:
            async for out in outputs:
                last = out
                choices = []
                for o in out.outputs:
                    i = o.index
                    if done[i]:
                        continue
                    text, new_ids = o.text[sent_chars[i]:], o.token_ids[sent_tokens[i]:]
                    if not text and not new_ids and not o.finished:
                        continue
                    logprobs = None
                    if self.req.logprobs:
                        logprobs = chat_logprobs(self.state, (o.logprobs or [])[sent_tokens[i]:len(o.token_ids)],
                                                 self.num_top)
                    sent_chars[i], sent_tokens[i] = len(o.text), len(o.token_ids)
                    done[i] = o.finished
                    finish = o.finish_reason.value if o.finish_reason else None
                    if self.output.is_plain:
                        deltas = [DeltaMessage(content=text) if text else DeltaMessage()]
                    else:
                        deltas = streamers[i].deltas(o.text, o.finished)
                        finish = self.output.finish_reason(o.text, finish)
                        if not deltas:      # held back by a parser: only worth a chunk if it carries something
                            if not (o.finished or self.req.logprobs or self.req.return_token_ids):
                                continue
                            deltas = [DeltaMessage()]
                    for k, delta in enumerate(deltas):
                        last_one = k == len(deltas) - 1
                        choices.append(ChatCompletionResponseStreamChoice(
                            index=i, delta=delta, logprobs=logprobs if last_one else None,
                            finish_reason=finish if last_one else None,
                            token_ids=list(new_ids) if self.req.return_token_ids and last_one else None))
                # NOTE: one delta per choice per chunk: several deltas of a choice go out as consecutive chunks
                while choices:
                    seen, now, later = set(), [], []
                    for ch in choices:
                        (later if ch.index in seen else now).append(ch)
                        seen.add(ch.index)
                    yield self._chunk(now)
                    choices = later
        except Exception as exc:   # noqa: BLE001 - the stream has started: report in-band
            yield sse_error(exc)
        opts = self.req.stream_options
        if opts is not None and opts.include_usage and last is not None:
            yield self._chunk([], usage=usage_of([last]))
        yield SSE_DONE
