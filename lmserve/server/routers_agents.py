"""Routers for the APIs agents speak besides chat completions: OpenAI Responses (/v1/responses...), Anthropic
Messages (/v1/messages, /v1/messages/count_tokens) and vLLM's /tokenize and /detokenize (also under /v1/).
build_app includes them; each only translates and calls a serving module."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from lmserve.server.protocol.anthropic import MessagesCountTokensRequest, MessagesRequest
from lmserve.server.protocol.responses import ResponsesRequest
from lmserve.server.protocol.tokenize import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from lmserve.server import serving_messages, serving_responses, serving_tokenize
from lmserve.server.state import ServerState

_SSE = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
              "description": "JSON, or typed server-sent events with stream=true"}}


def get_state(request: Request) -> ServerState:
    return request.app.state.server


def responses_router() -> APIRouter:
    router = APIRouter(tags=["OpenAI Responses"])

    @router.post("/v1/responses", responses=_SSE)
    async def create(req: ResponsesRequest, raw: Request, state: ServerState = Depends(get_state)):
        """OpenAI Responses API: text, function tools, json_schema, reasoning items; store + previous_response_id."""
        return await serving_responses.create_response(state, req, raw)

    @router.get("/v1/responses/{response_id}")
    async def retrieve(response_id: str, state: ServerState = Depends(get_state)):
        return JSONResponse(serving_responses.get_response(state, response_id))

    @router.delete("/v1/responses/{response_id}")
    async def delete(response_id: str, state: ServerState = Depends(get_state)):
        return JSONResponse(serving_responses.delete_response(state, response_id))

    @router.get("/v1/responses/{response_id}/input_items")
    async def input_items(response_id: str, order: str = Query("desc"), limit: int = Query(20),
                          after: str | None = Query(None), state: ServerState = Depends(get_state)):
        return JSONResponse(serving_responses.input_items(state, response_id, order, limit, after))

    @router.post("/v1/responses/{response_id}/cancel")
    async def cancel(response_id: str, state: ServerState = Depends(get_state)):
        """Abort a response that is still generating."""
        return JSONResponse(await serving_responses.cancel_response(state, response_id))

    return router


def messages_router() -> APIRouter:
    router = APIRouter(tags=["Anthropic Messages"])

    @router.post("/v1/messages", responses=_SSE)
    async def create(req: MessagesRequest, raw: Request, state: ServerState = Depends(get_state)):
        """Anthropic Messages API: text, tool_use / tool_result, thinking blocks; errors in Anthropic's shape."""
        return await serving_messages.create_message(state, req, raw)

    @router.post("/v1/messages/count_tokens")
    async def count_tokens(req: MessagesCountTokensRequest, state: ServerState = Depends(get_state)):
        return JSONResponse(await serving_messages.count_tokens(state, req))

    return router


def tokenize_router() -> APIRouter:
    router = APIRouter(tags=["Tokenizer"])
    for prefix in ("", "/v1"):
        @router.post(f"{prefix}/tokenize", response_model=TokenizeResponse)
        async def tokenize(req: TokenizeRequest, state: ServerState = Depends(get_state)):
            """Text or chat messages -> token ids, as the chat path would tokenize them (vLLM's shape)."""
            return JSONResponse((await serving_tokenize.tokenize(state, req)).model_dump(exclude_none=True))

        @router.post(f"{prefix}/detokenize", response_model=DetokenizeResponse)
        async def detokenize(req: DetokenizeRequest, state: ServerState = Depends(get_state)):
            return JSONResponse((await serving_tokenize.detokenize(state, req)).model_dump())
    return router


def agent_routers() -> list[APIRouter]:
    return [responses_router(), messages_router(), tokenize_router()]
