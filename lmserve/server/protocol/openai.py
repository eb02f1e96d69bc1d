"""OpenAI-compatible models: /v1/chat/completions and /v1/completions (requests, responses, stream chunks)."""
from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import Field

from lmserve.generation_config import API_DEFAULTS

from lmserve.server.protocol.common import (FinishReasonStr, ResponseFormat, StreamOptions, UsageInfo,
                                            _Model)
from lmserve.server.protocol.distserve import DistServeFields


# ---- /v1/chat/completions -----------------------------------------------------------------------------------
class FunctionDefinition(_Model):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Model):
    type: str = "function"
    function: FunctionDefinition


class ToolChoiceFuncName(_Model):
    name: str


class ToolChoice(_Model):
    type: Literal["function"] = "function"
    function: ToolChoiceFuncName


class GuidedFields(_Model):
    """Structured-output extras that vLLM users send in the body (server/structured.py reads them)."""
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = Field(default=None, description="EBNF grammar")
    structured_outputs: dict[str, Any] | None = Field(
        default=None, description="vLLM: one of json, regex, choice, grammar, json_object")


class ChatCompletionRequest(GuidedFields, DistServeFields):
    model: str
    messages: str | list[dict[str, Any]] = Field(examples=[[{"role": "user", "content": "hi"}]])
    temperature: float | None = API_DEFAULTS["openai"]["temperature"]
    top_p: float | None = API_DEFAULTS["openai"]["top_p"]
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | Literal["auto", "required", "none"] | None = "auto"
    logprobs: bool | None = False
    top_logprobs: int | None = None
    n: int | None = 1
    logit_bias: dict[str, float] | None = None
    max_completion_tokens: int | None = None
    max_tokens: int | None = Field(default=None, description="deprecated: use max_completion_tokens")
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    user: str | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    response_format: ResponseFormat | None = None
    seed: int | None = None
    priority: int | None = Field(default=None, description="--scheduling-policy priority: lower is served first")
    # LMDeploy extensions
    repetition_penalty: float | None = 1.0
    session_id: int | None = Field(default=-1, description="keep this conversation's KV cache on the server")
    ignore_eos: bool | None = False
    skip_special_tokens: bool | None = True
    spaces_between_special_tokens: bool | None = True
    top_k: int | None = API_DEFAULTS["openai"]["top_k"]
    min_new_tokens: int | None = None
    min_p: float | None = 0.0   # NOTE: null accepted: LMDeploy's proxy forwards its model_dump (min_p: null)
    enable_thinking: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    include_stop_str_in_output: bool | None = False
    return_token_ids: bool | None = False
    do_preprocess: bool | None = True
    mm_processor_kwargs: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # OpenAI fields that are not supported yet: 400 when set
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None


class FunctionCall(_Model):
    name: str
    arguments: str                              # JSON text


class ToolCall(_Model):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Model):
    _keep_none = ("content",)
    role: str
    content: str | None = None
    reasoning_content: str | None = None        # with --reasoning-parser
    tool_calls: list[ToolCall] | None = None


class TopLogprob(_Model):
    _keep_none = ("bytes",)
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatCompletionTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(_Model):
    _keep_none = ("content",)
    content: list[ChatCompletionTokenLogprob] | None = None


class ChatCompletionResponseChoice(_Model):
    _keep_none = ("logprobs", "finish_reason")
    index: int
    message: ChatMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReasonStr | None = None
    token_ids: list[int] | None = None          # with return_token_ids


class ChatCompletionResponse(_Model):
    id: str
    object: str = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo
    prompt_token_ids: list[int] | None = None   # with return_token_ids


class DeltaFunctionCall(_Model):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_Model):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class DeltaMessage(_Model):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatCompletionResponseStreamChoice(_Model):
    _keep_none = ("logprobs", "finish_reason")
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReasonStr | None = None
    token_ids: list[int] | None = None


class ChatCompletionStreamResponse(_Model):
    id: str
    object: str = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseStreamChoice]
    usage: UsageInfo | None = None


# ---- /v1/completions ------------------------------------------------------------------------------------------
class CompletionRequest(GuidedFields, DistServeFields):
    model: str
    prompt: str | list[Any] = Field(description="a string, a list of strings, token ids or a list of token-id lists")
    suffix: str | None = None
    max_completion_tokens: int | None = None
    max_tokens: int | None = Field(default=16, description="deprecated: use max_completion_tokens; 0 with echo "
                                   "scores the prompt only")
    temperature: float | None = API_DEFAULTS["openai"]["temperature"]
    top_p: float | None = API_DEFAULTS["openai"]["top_p"]
    n: int | None = 1
    logprobs: int | None = None
    echo: bool | None = False
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    seed: int | None = None
    priority: int | None = Field(default=None, description="--scheduling-policy priority: lower is served first")
    # LMDeploy extensions
    repetition_penalty: float | None = 1.0
    session_id: int | None = -1
    ignore_eos: bool | None = False
    skip_special_tokens: bool | None = True
    spaces_between_special_tokens: bool | None = True
    top_k: int | None = API_DEFAULTS["openai"]["top_k"]
    min_p: float | None = 0.0
    min_new_tokens: int | None = None
    include_stop_str_in_output: bool | None = False
    return_token_ids: bool | None = False
    response_format: ResponseFormat | None = None


class CompletionLogprobs(_Model):
    """OpenAI's legacy shape; with echo the prompt tokens come first and the first one's logprob is null."""
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionResponseChoice(_Model):
    _keep_none = ("logprobs", "finish_reason")
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReasonStr | None = None
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None


class CompletionResponse(_Model):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo


class CompletionStreamResponse(_Model):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo | None = None
