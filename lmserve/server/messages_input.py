"""Anthropic Messages request -> a chat completions request: `system` and content blocks (text, tool_use,
tool_result, thinking) -> chat messages, `tools` (input_schema) and `tool_choice` (auto/any/tool/none) -> chat
tools, `thinking` -> the template's enable_thinking, `stop_sequences` -> stop."""
from __future__ import annotations

import json
from typing import Any

from lmserve.server.errors import APIError, not_supported
from lmserve.server.mm_input import chat_image_part
from lmserve.server.protocol import ChatCompletionRequest
from lmserve.server.protocol.anthropic import UNSUPPORTED_FIELDS, MessagesCountTokensRequest, MessagesRequest
from lmserve.server.serving_common import reject_if_set


def _text(blocks: Any, param: str) -> str:
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise APIError(400, f"{param} must be a string or a list of content blocks", param=param)
    texts = []
    for j, b in enumerate(blocks):
        kind = b.get("type") if isinstance(b, dict) else None
        if kind != "text":
            raise not_supported(f"{param}[{j}]", f"a content block of type {kind!r} here")
        texts.append(str(b.get("text", "")))
    return "\n".join(texts)


def image_block(block: dict[str, Any], where: str) -> dict[str, Any]:
    """An Anthropic image block (source base64 or url) -> a chat image_url part."""
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64":
        if not isinstance(source.get("data"), str) or not isinstance(source.get("media_type"), str):
            raise APIError(400, f"{where}.source needs media_type and data", param=f"{where}.source")
        url = f"data:{source['media_type']};base64,{source['data']}"
    elif kind == "url":
        url = source.get("url")
    else:
        raise not_supported(f"{where}.source.type", f"an image source of type {kind!r}")
    return chat_image_part(url, None, where, "source")


def _messages(req: MessagesCountTokensRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if req.system:
        out.append({"role": "system", "content": _text(req.system, "system")})
    if not req.messages:
        raise APIError(400, "messages: at least one message is required", param="messages")
    for i, msg in enumerate(req.messages):
        param = f"messages[{i}]"
        role = msg.get("role")
        if role not in ("user", "assistant"):
            raise APIError(400, f"{param}.role must be user or assistant, got {role!r}", param=f"{param}.role")
        content = msg.get("content", "")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise APIError(400, f"{param}.content must be a string or a list of content blocks",
                           param=f"{param}.content")
        texts, calls, results, parts = [], [], [], []
        for j, b in enumerate(content):
            kind = b.get("type") if isinstance(b, dict) else None
            where = f"{param}.content[{j}]"
            if kind == "text":
                texts.append(str(b.get("text", "")))
                parts.append({"type": "text", "text": texts[-1]})
            elif kind == "image" and role == "user":
                parts.append(image_block(b, where))
            elif kind in ("thinking", "redacted_thinking") and role == "assistant":
                continue      # earlier thinking is not shown to the model again, as chat templates drop it too
            elif kind == "tool_use" and role == "assistant":
                if not isinstance(b.get("id"), str) or not isinstance(b.get("name"), str):
                    raise APIError(400, f"{where}: a tool_use block needs id and name", param=where)
                calls.append({"id": b["id"], "type": "function",
                              "function": {"name": b["name"], "arguments": json.dumps(b.get("input", {}))}})
            elif kind == "tool_result" and role == "user":
                if not isinstance(b.get("tool_use_id"), str):
                    raise APIError(400, f"{where}.tool_use_id is required", param=f"{where}.tool_use_id")
                text = _text(b.get("content", ""), f"{where}.content")
                if b.get("is_error"):
                    text = f"Error: {text}"
                results.append({"role": "tool", "tool_call_id": b["tool_use_id"], "content": text})
            else:
                raise not_supported(where, f"a content block of type {kind!r} in a {role} message")
        out += results
        if role == "assistant":
            turn: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts)}
            if calls:
                turn["tool_calls"] = calls
            out.append(turn)
        elif len(parts) > len(texts):       # images: the parts in order
            out.append({"role": "user", "content": parts})
        elif texts or not results:
            out.append({"role": "user", "content": "\n".join(texts)})
    return out


def _tools(req: MessagesCountTokensRequest) -> tuple[list[dict] | None, Any, bool | None]:
    tools = None
    if req.tools:
        tools = []
        for i, t in enumerate(req.tools):
            if t.get("type") not in (None, "custom"):
                raise not_supported(f"tools[{i}].type", f"the server tool {t.get('type')!r}")
            if not isinstance(t.get("name"), str):
                raise APIError(400, f"tools[{i}].name is required", param=f"tools[{i}].name")
            tools.append({"type": "function", "function": {"name": t["name"], "description": t.get("description"),
                                                           "parameters": t.get("input_schema")}})
    choice, parallel = req.tool_choice or {"type": "auto"}, None
    kind = choice.get("type")
    if choice.get("disable_parallel_tool_use"):
        parallel = False
    if kind == "auto":
        return tools, "auto", parallel
    if kind == "none":
        return tools, "none", parallel
    if kind == "any":
        return tools, "required", parallel
    if kind == "tool" and isinstance(choice.get("name"), str):
        return tools, {"type": "function", "function": {"name": choice["name"]}}, parallel
    raise APIError(400, f"tool_choice.type must be auto, any, tool or none, got {kind!r}", param="tool_choice")


def _thinking(req: MessagesCountTokensRequest) -> bool | None:
    if not req.thinking:
        return None
    kind = req.thinking.get("type")
    if kind in ("enabled", "adaptive"):
        return True
    if kind == "disabled":
        return False
    raise APIError(400, f"thinking.type must be enabled or disabled, got {kind!r}", param="thinking.type")


def to_chat_request(req: MessagesCountTokensRequest, model: str) -> ChatCompletionRequest:
    body: dict[str, Any] = {"model": model, "messages": _messages(req)}
    body["tools"], body["tool_choice"], body["parallel_tool_calls"] = _tools(req)
    body["enable_thinking"] = _thinking(req)
    if isinstance(req, MessagesRequest):
        reject_if_set(req, UNSUPPORTED_FIELDS)
        if req.max_tokens < 1:
            raise APIError(400, "max_tokens: must be at least 1", param="max_tokens")
        body.update(max_completion_tokens=req.max_tokens, stop=req.stop_sequences)
        for name in ("temperature", "top_p", "top_k", "priority", "guided_json", "guided_regex", "guided_choice",
                     "guided_grammar", "structured_outputs"):
            if getattr(req, name) is not None:
                body[name] = getattr(req, name)
        if req.metadata and isinstance(req.metadata.get("user_id"), str):
            body["user"] = req.metadata["user_id"]
    return ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})
