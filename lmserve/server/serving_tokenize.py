"""POST /tokenize and /detokenize (vLLM's shapes, also under /v1/)."""
from __future__ import annotations

from lmserve.server.chat_tools import ToolCalls, template_renders_tools
from lmserve.server.errors import APIError
from lmserve.server.protocol import ChatCompletionRequest
from lmserve.server.protocol.tokenize import (DetokenizeRequest, DetokenizeResponse, TokenizeRequest,
                                              TokenizeResponse)
from lmserve.server.serving_chat import normalize_messages
from lmserve.server.state import ServerState


async def tokenize(state: ServerState, req: TokenizeRequest) -> TokenizeResponse:
    state.check_model(req.model)
    if req.prompt is not None:
        ids = await state.encode(req.prompt, "prompt", add_special_tokens=req.add_special_tokens is not False)
    else:
        if req.continue_final_message and req.add_generation_prompt:
            raise APIError(400, "continue_final_message and add_generation_prompt cannot both be true",
                           param="continue_final_message")
        chat = ChatCompletionRequest(model=state.model_name, messages=req.messages, tools=req.tools,
                                     chat_template_kwargs=req.chat_template_kwargs)
        ids = await chat_prompt_ids(state, chat, req.add_generation_prompt, req.continue_final_message,
                                    bool(req.add_special_tokens))
    strs = [state.token_str(t) for t in ids] if req.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=state.max_model_len, tokens=ids, token_strs=strs)


async def detokenize(state: ServerState, req: DetokenizeRequest) -> DetokenizeResponse:
    state.check_model(req.model)
    vocab = state.engine.vocab_size
    for i, t in enumerate(req.tokens):
        if not 0 <= t < vocab:
            raise APIError(400, f"tokens[{i}] = {t} is not a token id (the vocabulary has {vocab})",
                           param=f"tokens[{i}]")
    return DetokenizeResponse(prompt=state.tokenizer.decode(req.tokens, skip_special_tokens=False))


async def chat_prompt_ids(state: ServerState, chat: ChatCompletionRequest, add_generation_prompt: bool = True,
                          continue_final_message: bool = False, add_special_tokens: bool = False) -> list[int]:
    """The prompt tokens /v1/chat/completions would give the model for `chat` (tools and thinking switches
    included), without generating: /tokenize and Anthropic's count_tokens."""
    template = state.tokenizer.chat_template
    tools = ToolCalls(chat, state.tool_parser, state.config.max_tool_calls)
    messages = normalize_messages(chat.messages, renders_tools=template_renders_tools(template))
    messages, tool_kwargs = tools.prepare_messages(messages, template)
    kwargs = {**(chat.chat_template_kwargs or {}), **tool_kwargs}
    if chat.enable_thinking is not None:
        kwargs.setdefault("enable_thinking", chat.enable_thinking)
    if continue_final_message:
        kwargs["continue_final_message"] = True
    try:
        text = state.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
    except Exception as exc:    # jinja errors: the conversation does not fit the template
        raise APIError(400, f"the chat template rejected the conversation: {exc}", param="messages") from exc
    return await state.encode(text, "messages", add_special_tokens=add_special_tokens)
