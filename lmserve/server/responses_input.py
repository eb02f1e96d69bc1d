"""Responses API request -> a chat completions request: `input` items and `instructions` -> chat messages, function
tools and `tool_choice` -> chat tools, `text.format` -> response_format, `reasoning` -> the template's thinking
switches. Everything that reaches the engine then goes through the chat path (server/serving_chat.py)."""
from __future__ import annotations

import json
from typing import Any

from lmserve.server.errors import APIError, not_supported
from lmserve.server.mm_input import chat_image_part
from lmserve.server.protocol import ChatCompletionRequest
from lmserve.server.protocol.responses import BUILTIN_TOOLS, UNSUPPORTED_FIELDS, ResponsesRequest
from lmserve.server.serving_common import reject_if_set


def _text_of(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{param} must be a string or a list of content parts", param=param)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text", "summary_text", "reasoning_text"):
            texts.append(str(part.get("text", "")))
        elif kind == "refusal":
            texts.append(str(part.get("refusal", "")))
        else:
            raise not_supported(f"{param}[{j}]", f"a content part of type {kind!r}")
    return "\n".join(texts)


def _content_of(content: Any, param: str) -> str | list[dict[str, Any]]:
    """Message content -> text, or (with input_image parts) chat content parts in order."""
    if not isinstance(content, list) or not any(isinstance(p, dict) and p.get("type") == "input_image"
                                                for p in content):
        return _text_of(content, param)
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        if isinstance(part, dict) and part.get("type") == "input_image":
            if part.get("image_url") is None and part.get("file_id") is not None:
                raise not_supported(f"{param}[{j}].file_id", "input_image with a file_id (send image_url)")
            parts.append(chat_image_part(part.get("image_url"), part.get("detail"), f"{param}[{j}]", "image_url"))
        else:
            parts.append({"type": "text", "text": _text_of([part], f"{param}[{j}]")})
    return parts


def input_messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`input` -> chat messages (OpenAI chat format: assistant tool_calls, role=tool results)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise APIError(400, f"{param} must be an object", param=param)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise APIError(400, f"{param}.role must be user, system, developer or assistant, got {role!r}",
                               param=f"{param}.role")
            out.append({"role": role, "content": _content_of(item.get("content", ""), f"{param}.content")})
        elif kind == "function_call":
            for key in ("call_id", "name"):
                if not isinstance(item.get(key), str):
                    raise APIError(400, f"{param}.{key} is required on a function_call item", param=f"{param}.{key}")
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item.get("arguments") or "{}"}}
            if out and out[-1]["role"] == "assistant" and (out[-1].get("tool_calls") or not out[-1]["content"]):
                out[-1].setdefault("tool_calls", []).append(call)     # parallel calls: one assistant turn
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise APIError(400, f"{param}.call_id is required on a function_call_output item",
                               param=f"{param}.call_id")
            output = item.get("output", "")
            if not isinstance(output, str):
                output = _text_of(output, f"{param}.output") if isinstance(output, list) else json.dumps(output)
            out.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
        elif kind == "reasoning":
            continue        # earlier reasoning is not shown to the model again, as chat templates drop it too
        else:
            raise not_supported(f"{param}.type", f"input items of type {kind!r}")
    return out


def _tools(req: ResponsesRequest) -> list[dict[str, Any]] | None:
    if not req.tools:
        return None
    tools = []
    for i, t in enumerate(req.tools):
        kind = t.get("type")
        if kind != "function":
            what = f"the built-in tool {kind!r}" if kind in BUILTIN_TOOLS else f"tools of type {kind!r}"
            raise not_supported(f"tools[{i}].type", what)
        if not isinstance(t.get("name"), str):
            raise APIError(400, f"tools[{i}].name is required", param=f"tools[{i}].name")
        tools.append({"type": "function", "function": {
            "name": t["name"], "description": t.get("description"), "parameters": t.get("parameters")}})
    return tools


def _tool_choice(choice: str | dict[str, Any] | None) -> Any:
    if choice is None or isinstance(choice, str):
        if choice not in (None, "auto", "none", "required"):
            raise APIError(400, f"tool_choice must be auto, none, required or a function, got {choice!r}",
                           param="tool_choice")
        return choice or "auto"
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise not_supported("tool_choice", f"tool_choice of type {choice.get('type')!r}")


def _response_format(req: ResponsesRequest) -> dict[str, Any] | None:
    fmt = req.text.format if req.text else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.schema_ is None:
        raise APIError(400, "text.format.schema is required for type json_schema", param="text.format.schema")
    return {"type": "json_schema", "json_schema": {"name": fmt.name or "response", "schema": fmt.schema_,
                                                   "strict": fmt.strict}}


def check_request(req: ResponsesRequest) -> None:
    # NOTE: `include` asks for extra output data (logprobs, encrypted reasoning, ...); none is produced, so a
    # non-empty list is refused rather than silently ignored (the Agents SDK sends an empty one)
    reject_if_set(req, (*UNSUPPORTED_FIELDS, "include"))


def to_chat_request(req: ResponsesRequest, model: str, history: list[dict[str, Any]]
                    ) -> tuple[ChatCompletionRequest, list[dict[str, Any]]]:
    """-> (the chat request, the conversation's messages without the instructions, for the store)."""
    check_request(req)
    conversation = history + input_messages(req.input)
    messages = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + conversation
    body: dict[str, Any] = {"model": model, "messages": messages, "tools": _tools(req),
                            "tool_choice": _tool_choice(req.tool_choice),
                            "parallel_tool_calls": req.parallel_tool_calls, "response_format": _response_format(req),
                            "max_completion_tokens": req.max_output_tokens, "user": req.user, "seed": req.seed}
    for name in ("temperature", "top_p", "top_k", "priority"):
        if getattr(req, name) is not None:
            body[name] = getattr(req, name)
    effort = req.reasoning.effort if req.reasoning else None
    if effort in ("low", "medium", "high"):
        body["reasoning_effort"] = effort
    elif effort in ("none", "minimal"):
        body["enable_thinking"] = False
    if body["max_completion_tokens"] is not None and body["max_completion_tokens"] < 1:
        raise APIError(400, "max_output_tokens must be at least 1", param="max_output_tokens")
    return ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None}), conversation
