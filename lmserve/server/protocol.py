"""The ONLY request/response models of the HTTP API: OpenAI-compatible, LMDeploy-native and the proxy's node
registration. Imported by the server, the proxy and the client; never copy a model elsewhere.

Field names and defaults follow LMDeploy's OpenAPI schema (docs: shared/reference/lmdeploy-openapi-endpoints.txt).
Fields that exist on the wire but are not supported yet are declared here (so /docs shows them) and rejected
with a 400 by the serving layer when set; they are never ignored silently.
"""
from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_serializer

FinishReasonStr = Literal["stop", "length", "abort", "tool_calls"]


class _Model(BaseModel):
    """Base: unknown fields are ignored (clients send vendor extras); responses are dumped with exclude_none,
    except the keys in `_keep_none`, which OpenAI clients expect to see as null."""
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    _keep_none: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _serialize(self, handler):
        data = handler(self)
        for key in self._keep_none:
            data.setdefault(key, None)
        return data


# ---- errors ------------------------------------------------------------------------------------------------
class ErrorInfo(_Model):
    _keep_none = ("param", "code")
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(_Model):
    error: ErrorInfo


# ---- /v1/models ----------------------------------------------------------------------------------------------
class ModelPermission(_Model):
    _keep_none = ("group",)
    id: str = Field(default_factory=lambda: f"modelperm-{time.time_ns():x}")
    object: str = "model_permission"
    created: int = Field(default_factory=lambda: int(time.time()))
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = True
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


class ModelCard(_Model):
    _keep_none = ("parent",)
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "lmserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    tp: int | None = None              # tensor-parallel ranks serving it (lmserve extension)
    permission: list[ModelPermission] = Field(default_factory=list)
    # lmserve: the sampling settings requests get for fields they leave out (--generation-config)
    generation_defaults: dict[str, float | int] | None = None


class ModelList(_Model):
    object: str = "list"
    data: list[ModelCard] = Field(default_factory=list)


# ---- shared pieces ------------------------------------------------------------------------------------------
class PromptTokensDetails(_Model):
    cached_tokens: int = 0


class UsageInfo(_Model):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class StreamOptions(_Model):
    include_usage: bool | None = False


# ---- /v1/chat/completions -----------------------------------------------------------------------------------
class JsonSchema(_Model):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = False


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema", "regex_schema"]
    json_schema: JsonSchema | None = None
    regex_schema: str | None = None


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


class ChatCompletionRequest(GuidedFields):
    model: str
    messages: str | list[dict[str, Any]] = Field(examples=[[{"role": "user", "content": "hi"}]])
    temperature: float | None = 0.7
    top_p: float | None = 1.0
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
    # LMDeploy extensions
    repetition_penalty: float | None = 1.0
    session_id: int | None = Field(default=-1, description="keep this conversation's KV cache on the server")
    ignore_eos: bool | None = False
    skip_special_tokens: bool | None = True
    spaces_between_special_tokens: bool | None = True
    top_k: int | None = 40
    min_new_tokens: int | None = None
    min_p: float = 0.0
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
class CompletionRequest(GuidedFields):
    model: str
    prompt: str | list[Any] = Field(description="a string, a list of strings, token ids or a list of token-id lists")
    suffix: str | None = None
    max_completion_tokens: int | None = None
    max_tokens: int | None = Field(default=16, description="deprecated: use max_completion_tokens; 0 with echo "
                                   "scores the prompt only")
    temperature: float | None = 0.7
    top_p: float | None = 1.0
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
    # LMDeploy extensions
    repetition_penalty: float | None = 1.0
    session_id: int | None = -1
    ignore_eos: bool | None = False
    skip_special_tokens: bool | None = True
    spaces_between_special_tokens: bool | None = True
    top_k: int | None = 40
    min_p: float = 0.0
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


# ---- /generate (LMDeploy native) -------------------------------------------------------------------------------
class GenerateRequest(_Model):
    prompt: str | None = None
    input_ids: list[StrictInt] | None = None    # NOTE: strict: JSON true/false are not token ids
    image_data: str | dict[str, Any] | list[str | dict[str, Any]] | None = None
    session_id: int | None = Field(default=-1, description="keep the session's KV cache on the server")
    sequence_start: bool | None = Field(default=True, description="false: continue the session; prompt/input_ids "
                                        "hold only the new tokens")
    sequence_end: bool | None = Field(default=False, description="true: end the session after this turn")
    return_logprob: bool | None = None
    max_tokens: int = 128
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stream: bool | None = False
    temperature: float = 1.0
    repetition_penalty: float | None = 1.0
    ignore_eos: bool | None = False
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    skip_special_tokens: bool | None = True
    spaces_between_special_tokens: bool | None = True
    include_stop_str_in_output: bool | None = False
    return_routed_experts: bool | None = False
    response_format: ResponseFormat | None = None
    mm_processor_kwargs: dict[str, Any] | None = None


class GenerateMetaInfo(_Model):
    _keep_none = ("finish_reason",)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: dict[str, Any] | None = None      # {"type": "stop"|"length"|"abort", ...}
    output_token_logprobs: list[tuple[float, int]] | None = None   # (logprob, token_id)


class GenerateResponse(_Model):
    text: str
    output_ids: list[int]
    meta_info: GenerateMetaInfo


# ---- /v1/chat/interactive (LMDeploy) --------------------------------------------------------------------------
class ChatInteractiveRequest(_Model):
    prompt: str | list[dict[str, Any]]
    image_url: str | list[str] | None = None
    session_id: int = -1
    interactive_mode: bool = Field(default=False, description="true: keep the history on the server; false: "
                                   "end the session, then answer this prompt alone")
    stream: bool = False
    stop: str | list[str] | None = None
    request_output_len: int | None = None
    top_p: float = 0.8
    top_k: int = 40
    temperature: float = 0.8
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    skip_special_tokens: bool | None = True
    cancel: bool | None = Field(default=False, description="abort the session's running request")
    adapter_name: str | None = None
    seed: int | None = None
    min_new_tokens: int | None = None
    min_p: float = 0.0


class ChatInteractiveResponse(_Model):
    _keep_none = ("finish_reason",)
    text: str
    tokens: int
    input_tokens: int
    history_tokens: int
    finish_reason: FinishReasonStr | None = None


# ---- embeddings / pooling / encode --------------------------------------------------------------------------
EmbeddingInput = str | list[str] | list[StrictInt] | list[list[StrictInt]]    # strict: no true/false as ids


class EmbeddingsRequest(_Model):
    model: str
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class EmbeddingData(_Model):
    index: int
    object: str = "embedding"
    embedding: list[float] | str


class EmbeddingsResponse(_Model):
    object: str = "list"
    data: list[EmbeddingData]
    model: str
    usage: UsageInfo


class PoolingRequest(_Model):
    model: str | None = None
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class PoolingData(_Model):
    index: int
    object: str = "pooling"
    data: list[float] | str


class PoolingResponse(_Model):
    id: str
    object: str = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[PoolingData]
    usage: UsageInfo


class EncodeRequest(_Model):
    input: str | list[str]
    do_preprocess: bool | None = False
    add_bos: bool | None = True


class EncodeResponse(_Model):
    input_ids: list[int] | list[list[int]]
    length: int | list[int]


# ---- control endpoints ------------------------------------------------------------------------------------
class AbortRequest(_Model):
    session_id: int | None = -1
    abort_all: bool = False
    finished_reason: dict[str, Any] | None = None
    abort_message: str | None = None


class ResetRequest(_Model):
    session_id: int | None = Field(default=None, description="the session to end; none = every session")


class UpdateParamsRequest(_Model):
    serialized_named_tensors: str | list[str] | dict[str, Any] = Field(
        description="base64 of a safetensors file (load_format 'safetensors', the default) or of torch.save of a "
                    "dict name -> tensor (load_format 'torch'); a list of such strings is applied in order")
    load_format: str | None = None
    finished: bool = False


# ---- proxy node registration (api_server --proxy-url -> proxy /nodes/add) --------------------------------
class NodeStatus(_Model):
    models: list[str] | None = Field(default_factory=list)
    unfinished: int = 0
    latency: list[Any] = Field(default_factory=list)
    speed: int | None = None


class NodeRequest(_Model):
    url: str
    status: NodeStatus | None = None
