"""Anthropic Messages API (/v1/messages, /v1/messages/count_tokens): request models and the builders of its
response objects. The `anthropic` package's types are the contract."""
from __future__ import annotations

from typing import Any

from pydantic import Field

from lmserve.server.protocol.common import _Model
from lmserve.server.protocol.openai import GuidedFields

# Anthropic's error types by HTTP status
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 408: "timeout_error", 413: "request_too_large", 429: "rate_limit_error",
               503: "overloaded_error", 529: "overloaded_error"}


class MessagesCountTokensRequest(_Model):
    model: str | None = None
    messages: list[dict[str, Any]]
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None


class MessagesRequest(MessagesCountTokensRequest, GuidedFields):
    """GuidedFields: vLLM's structured-output extras are accepted here too (e.g. to force a reasoning block)."""
    max_tokens: int = Field(description="required, as Anthropic requires it")
    stop_sequences: list[str] | None = None
    stream: bool | None = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    priority: int | None = Field(default=None, description="--scheduling-policy priority: lower is served first")
    # Anthropic fields lmserve does not support: 400 when set
    container: str | dict[str, Any] | None = None
    mcp_servers: list[dict[str, Any]] | None = None
    context_management: dict[str, Any] | None = None


UNSUPPORTED_FIELDS = ("container", "mcp_servers", "context_management")


def error_body(status: int, message: str) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def usage(num_input: int, num_output: int, num_cached: int = 0) -> dict[str, Any]:
    return {"input_tokens": num_input - num_cached, "output_tokens": num_output,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": num_cached}


def message_object(message_id: str, model: str, content: list[dict[str, Any]], stop_reason: str | None,
                   stop_sequence: str | None, usage_: dict[str, Any]) -> dict[str, Any]:
    return {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop_reason, "stop_sequence": stop_sequence, "usage": usage_}


def text_block(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def thinking_block(text: str) -> dict[str, Any]:
    # NOTE: no signature to give (the thinking is not encrypted); clients that send it back are not checked
    return {"type": "thinking", "thinking": text, "signature": ""}


def tool_use_block(block_id: str, name: str, input_: Any) -> dict[str, Any]:
    return {"type": "tool_use", "id": block_id, "name": name, "input": input_}
