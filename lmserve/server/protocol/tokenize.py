"""/tokenize and /detokenize in vLLM's shapes (also under /v1/): a `prompt`, or chat `messages` rendered by the chat
template exactly as /v1/chat/completions renders them, so `count` equals that request's usage.prompt_tokens."""
from __future__ import annotations

from typing import Any

from pydantic import model_validator

from lmserve.server.protocol.common import _Model
from lmserve.server.protocol.openai import Tool


class TokenizeRequest(_Model):
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool | None = None          # default: true for a prompt, false for messages (the template
    add_generation_prompt: bool = True              # writes its own special tokens)
    continue_final_message: bool = False
    return_token_strs: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = None

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class TokenizeResponse(_Model):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Model):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(_Model):
    prompt: str
