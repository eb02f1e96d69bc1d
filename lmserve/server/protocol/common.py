"""Shared pieces of the wire models: the `_Model` base, errors, /v1/models, usage, stream options and
response_format (used by chat, completions and /generate)."""
from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

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
    # OpenRouter's shape: {"modality": "text+image->text", "input_modalities": [...], "output_modalities": [...]}
    architecture: dict[str, str | list[str]] | None = None


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


# ---- response_format (chat, completions, /generate) ------------------------------------------------
class JsonSchema(_Model):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = False


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema", "regex_schema"]
    json_schema: JsonSchema | None = None
    regex_schema: str | None = None
