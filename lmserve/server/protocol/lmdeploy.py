"""LMDeploy-native models: /generate, /v1/chat/interactive, the control endpoints (abort, reset, update_weights)
and the proxy's node registration."""
from __future__ import annotations

from typing import Any

from pydantic import Field, StrictInt

from lmserve.generation_config import API_DEFAULTS

from lmserve.server.protocol.common import FinishReasonStr, ResponseFormat, _Model


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
    temperature: float = API_DEFAULTS["generate"]["temperature"]
    repetition_penalty: float | None = 1.0
    ignore_eos: bool | None = False
    top_p: float = API_DEFAULTS["generate"]["top_p"]
    top_k: int = API_DEFAULTS["generate"]["top_k"]
    min_p: float = 0.0
    seed: int | None = None
    priority: int | None = Field(default=None, description="--scheduling-policy priority: lower is served first")
    skip_special_tokens: bool | None = True
    spaces_between_special_tokens: bool | None = True
    include_stop_str_in_output: bool | None = False
    return_routed_experts: bool | None = False
    response_format: ResponseFormat | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    adapter_name: str | None = Field(default=None, description="a LoRA adapter (--adapters / --lora-modules)")
    model: str | None = Field(default=None, description="the base model or a LoRA adapter (like adapter_name)")


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
    top_p: float = API_DEFAULTS["interactive"]["top_p"]
    top_k: int = API_DEFAULTS["interactive"]["top_k"]
    temperature: float = API_DEFAULTS["interactive"]["temperature"]
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    skip_special_tokens: bool | None = True
    cancel: bool | None = Field(default=False, description="abort the session's running request")
    adapter_name: str | None = None
    seed: int | None = None
    priority: int | None = Field(default=None, description="--scheduling-policy priority: lower is served first")
    min_new_tokens: int | None = None
    min_p: float = 0.0


class ChatInteractiveResponse(_Model):
    _keep_none = ("finish_reason",)
    text: str
    tokens: int
    input_tokens: int
    history_tokens: int
    finish_reason: FinishReasonStr | None = None


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
    role: int = 1      # LMDeploy's EngineRole: 1 hybrid, 2 prefill, 3 decode


class NodeRequest(_Model):
    url: str
    status: NodeStatus | None = None
    api_key: str | None = None      # the key the proxy sends this node; stored, never echoed
