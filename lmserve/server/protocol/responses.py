"""OpenAI Responses API (/v1/responses) request model and the builders of its response objects and stream events.
The `openai` package's `types.responses` models are the contract; output objects are built as plain dicts here, so
the serving layer never spells a wire key."""
from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import Field

from lmserve.server.protocol.common import _Model

# built-in tools the Responses API defines that lmserve does not run: a 400 naming them, never silent acceptance
BUILTIN_TOOLS = ("web_search", "web_search_preview", "file_search", "computer_use_preview", "computer",
                 "code_interpreter", "image_generation", "mcp", "local_shell", "shell", "custom", "apply_patch")


class ResponsesTextFormat(_Model):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class ResponsesText(_Model):
    format: ResponsesTextFormat | None = None
    verbosity: str | None = None


class ResponsesReasoning(_Model):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: str | None = None
    generate_summary: str | None = None


class ResponsesRequest(_Model):
    model: str | None = None
    input: str | list[dict[str, Any]] = Field(examples=["Say hi"])
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: ResponsesText | None = None
    reasoning: ResponsesReasoning | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    store: bool | None = True
    stream: bool | None = False
    previous_response_id: str | None = None
    include: list[str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None
    stream_options: dict[str, Any] | None = None
    # lmserve / vLLM extras
    top_k: int | None = None
    seed: int | None = None
    priority: int | None = Field(default=None, description="--scheduling-policy priority: lower is served first")
    # fields the Responses API has that lmserve does not support: 400 when set
    background: bool | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    max_tool_calls: int | None = None
    top_logprobs: int | None = None


UNSUPPORTED_FIELDS = ("background", "conversation", "prompt", "max_tool_calls", "top_logprobs")


def new_id(prefix: str) -> str:
    import uuid
    return f"{prefix}_{uuid.uuid4().hex}"


def usage(num_input: int, num_output: int, num_reasoning: int, num_cached: int) -> dict[str, Any]:
    return {"input_tokens": num_input, "input_tokens_details": {"cached_tokens": num_cached},
            "output_tokens": num_output, "output_tokens_details": {"reasoning_tokens": num_reasoning},
            "total_tokens": num_input + num_output}


def response_object(req: ResponsesRequest, response_id: str, model: str, created_at: float, *,
                    status: str, output: list[dict[str, Any]] | None = None, usage_: dict | None = None,
                    incomplete_reason: str | None = None, error: dict | None = None) -> dict[str, Any]:
    text = req.text.model_dump(exclude_none=True, by_alias=True) if req.text else {"format": {"type": "text"}}
    return {
        "id": response_id, "object": "response", "created_at": created_at, "model": model, "status": status,
        "completed_at": time.time() if status == "completed" else None,
        "error": error, "incomplete_details": {"reason": incomplete_reason} if incomplete_reason else None,
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
        "metadata": req.metadata or {}, "output": output or [],
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "previous_response_id": req.previous_response_id,
        "reasoning": req.reasoning.model_dump(exclude_none=True) if req.reasoning else None,
        "store": req.store is not False, "temperature": req.temperature, "text": text,
        "tool_choice": req.tool_choice if req.tool_choice is not None else "auto", "tools": req.tools or [],
        "top_p": req.top_p, "truncation": req.truncation or "disabled", "usage": usage_, "user": req.user,
    }


# ---- output items ------------------------------------------------------------------------------------------
def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": [output_text(text)] if status != "in_progress" else []}


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def function_call_item(item_id: str, call_id: str, name: str, arguments: str,
                       status: str = "completed") -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def reasoning_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = [{"type": "reasoning_text", "text": text}] if status != "in_progress" else []
    return {"id": item_id, "type": "reasoning", "summary": [], "content": content, "status": status}
