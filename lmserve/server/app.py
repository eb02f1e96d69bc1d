"""build_app(engine, config): the FastAPI app, one router per endpoint group, state on `app.state.server`.

Routers: OpenAI (/v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings), LMDeploy (/generate,
/v1/chat/interactive, /v1/encode, /pooling, /abort_request), rerank and score (/v1/rerank, /rerank, /v2/rerank,
/v1/score, /score), MLC (/stats, /verbose_stats, /chat/reset) and
operations (/health, /metrics, /sleep, /wakeup, /is_sleeping, /update_weights, /terminate); the web page at /.
"""
from __future__ import annotations

import asyncio

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import APIRouter, Body, Depends, FastAPI, Query, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from lmserve.config import ServerConfig
from lmserve.engine.disagg import DisaggEngine
from lmserve.server import serving_admin, serving_embedding, serving_score
from lmserve.server.auth import AccessPolicy, ControlGuard
from lmserve.server.errors import APIError, install_error_handlers
from lmserve.server.middleware import ServerMiddleware
from lmserve.server.anthropic_errors import AnthropicErrors
from lmserve.server.mm_input import model_architecture
from lmserve.server.protocol import (AbortRequest, ChatCompletionRequest, ChatCompletionResponse,
                                     ChatInteractiveRequest, ChatInteractiveResponse, CompletionRequest,
                                     CompletionResponse, EmbeddingsRequest, EmbeddingsResponse, EncodeRequest,
                                     EncodeResponse, ErrorResponse, GenerateRequest, GenerateResponse, ModelCard,
                                     ModelList, ModelPermission, PoolingRequest, PoolingResponse, ResetRequest,
                                     UpdateParamsRequest)
from lmserve.server.protocol.score import RerankRequest, RerankResponse, ScoreRequest, ScoreResponse
from lmserve.server.serving_chat import create_chat_completion
from lmserve.server.serving_completion import create_completion
from lmserve.server.serving_distserve import distserve_router, with_distserve
from lmserve.server.serving_generate import generate
from lmserve.server.serving_interactive import chat_interactive
from lmserve.server.serving_lora import adapter_cards, lora_router
from lmserve.server.routers_agents import agent_routers
from lmserve.server.state import ServerState
from lmserve.web import mount_web

if TYPE_CHECKING:
    from lmserve.engine.async_engine import AsyncEngine

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 429, 503)}
_SSE = {"text/event-stream": {"schema": {"type": "string"}}}


def get_state(request: Request) -> ServerState:
    return request.app.state.server


def _json(model) -> JSONResponse:
    return JSONResponse(model.model_dump(exclude_none=True))


def openai_router() -> APIRouter:
    router = APIRouter(tags=["OpenAI"], responses=_ERRORS)

    @router.get("/v1/models", response_model=ModelList)
    async def available_models(state: ServerState = Depends(get_state)):
        """Show available models."""
        card = ModelCard(id=state.model_name, created=state.created, root=state.engine.model_path,
                         max_model_len=state.max_model_len, tp=state.engine.config.tp,
                         permission=[ModelPermission()], generation_defaults=state.generation_defaults,
                         architecture=model_architecture(state.engine))
        return _json(ModelList(data=[card, *adapter_cards(state)]))

    @router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
                 responses={200: {"content": _SSE, "description": "JSON, or SSE chunks with stream=true"}})
    async def chat_completions_v1(req: ChatCompletionRequest, raw: Request, state: ServerState = Depends(get_state)):
        """OpenAI chat completions; `session_id` keeps the conversation's KV cache on the server."""
        return await with_distserve(state, req, lambda: create_chat_completion(state, req, raw))

    @router.post("/v1/completions", response_model=CompletionResponse,
                 responses={200: {"content": _SSE, "description": "JSON, or SSE chunks with stream=true"}})
    async def completions_v1(req: CompletionRequest, raw: Request, state: ServerState = Depends(get_state)):
        """OpenAI (legacy) completions, with echo and prompt-token logprobs."""
        return await with_distserve(state, req, lambda: create_completion(state, req, raw))

    @router.post("/v1/embeddings", response_model=EmbeddingsResponse)
    async def create_embeddings(req: EmbeddingsRequest, raw: Request, state: ServerState = Depends(get_state)):
        """Embeddings: mean of the final hidden states, L2-normalised."""
        return _json(await serving_embedding.create_embeddings(state, req, raw))

    return router


def lmdeploy_router() -> APIRouter:
    router = APIRouter(tags=["LMDeploy"], responses=_ERRORS)

    @router.post("/generate", response_model=GenerateResponse,
                 responses={200: {"content": _SSE, "description": "JSON, or SSE events with stream=true"}})
    async def generate_(req: GenerateRequest, raw: Request, state: ServerState = Depends(get_state)):
        """LMDeploy-native generation from text or token ids; sessions via session_id + sequence_start/end."""
        return await generate(state, req, raw)

    @router.post("/v1/chat/interactive", response_model=ChatInteractiveResponse)
    async def chat_interactive_v1(req: ChatInteractiveRequest, raw: Request,
                                  state: ServerState = Depends(get_state)):
        """Multi-turn chat with the history kept on the server (interactive_mode=true)."""
        return await chat_interactive(state, req, raw)

    @router.post("/v1/encode", response_model=EncodeResponse)
    async def encode(req: EncodeRequest, state: ServerState = Depends(get_state)):
        """Tokenize: text -> input_ids."""
        return _json(await serving_embedding.encode(state, req))

    @router.post("/pooling", response_model=PoolingResponse)
    async def pooling(req: PoolingRequest, raw: Request, state: ServerState = Depends(get_state)):
        """Pooled hidden states (same pooling as /v1/embeddings)."""
        state.check_model(req.model)
        return _json(await serving_embedding.create_pooling(state, req, raw))

    @router.post("/abort_request")
    async def abort_request(req: AbortRequest, state: ServerState = Depends(get_state)):
        """Abort the running request of one session, or every request with abort_all."""
        if req.abort_all:
            return {"num_aborted": await state.abort_all()}
        if req.session_id is None or req.session_id < 0:
            raise APIError(400, "give a session_id, or abort_all: true", param="session_id")
        return {"num_aborted": await state.abort_session(req.session_id)}

    return router


def mlc_router() -> APIRouter:
    router = APIRouter(tags=["Runtime stats"], responses=_ERRORS)

    @router.get("/stats")
    async def stats(state: ServerState = Depends(get_state)) -> str:
        """Latest prefill and decode throughput, as one line."""
        return serving_admin.stats(state)

    @router.get("/verbose_stats")
    async def verbose_stats(state: ServerState = Depends(get_state)) -> dict:
        """Throughput, token totals, queue, KV cache and prefix-cache figures."""
        return serving_admin.verbose_stats(state)

    @router.post("/chat/reset")
    async def reset(req: ResetRequest | None = Body(default=None), state: ServerState = Depends(get_state)):
        """End one session (renews it: its history and pinned KV cache are dropped), or all of them."""
        if req is None or req.session_id is None:
            return {"num_sessions_ended": await state.sessions.end_all()}
        return {"num_sessions_ended": int(await state.sessions.end(req.session_id))}

    return router


def operations_router() -> APIRouter:
    router = APIRouter(tags=["Operations"], responses=_ERRORS)

    @router.get("/health")
    async def health(state: ServerState = Depends(get_state)):
        """200 while the engine is healthy, else 503."""
        if not state.engine.is_healthy:
            raise APIError(503, "the engine is unhealthy", code="engine_unhealthy")
        return {}

    @router.get("/metrics", response_class=Response)
    async def metrics(state: ServerState = Depends(get_state)):
        """Prometheus metrics (`lmserve:` names)."""
        # NOTE: in a worker thread: a scrape reads /proc/self/smaps for the weights' residency (18-35 ms for a 1B
        # model), which on the event loop would stall every stream for that long
        return Response(await asyncio.to_thread(state.metrics.render), media_type=CONTENT_TYPE_LATEST)

    @router.post("/sleep")
    async def sleep(level: int = Query(1), state: ServerState = Depends(get_state)):
        """Free the KV cache (level 1) and the weights' memory (level 2); requests get 503 until /wakeup."""
        return await serving_admin.sleep(state, level)

    @router.post("/wakeup")
    async def wakeup(state: ServerState = Depends(get_state)):
        return await serving_admin.wakeup(state)

    @router.get("/is_sleeping")
    async def is_sleeping(state: ServerState = Depends(get_state)):
        return {"is_sleeping": bool(state.engine.is_sleeping)}

    @router.post("/update_weights")
    async def update_weights(req: UpdateParamsRequest, state: ServerState = Depends(get_state)):
        """Replace weights live; see lmserve.server.serving_admin for the serialization."""
        return await serving_admin.update_weights(state, req)

    @router.get("/terminate")
    async def terminate(state: ServerState = Depends(get_state)):
        """Stop admitting requests, finish the admitted ones, exit (needs --allow-terminate-by-client)."""
        return serving_admin.terminate(state)

    return router


def score_router() -> APIRouter:
    router = APIRouter(tags=["Rerank and score"], responses=_ERRORS)

    async def rerank(req: RerankRequest, raw: Request, state: ServerState = Depends(get_state)):
        """Documents sorted by relevance to the query (Jina/Cohere shape): a cross-encoder's score, or the cosine
        of an embedding model's vectors."""
        return _json(await serving_score.rerank(state, req, raw))

    async def score(req: ScoreRequest, raw: Request, state: ServerState = Depends(get_state)):
        """Scores of text_1 x text_2 pairs (1:1, 1:N, N:N)."""
        return _json(await serving_score.score(state, req, raw))

    for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
        router.add_api_route(path, rerank, methods=["POST"], response_model=RerankResponse)
    for path in ("/v1/score", "/score"):
        router.add_api_route(path, score, methods=["POST"], response_model=ScoreResponse)
    return router


def build_app(engine: AsyncEngine, config: ServerConfig | None = None, *,
              allow_terminate_by_client: bool = False) -> FastAPI:
    config = config or ServerConfig()
    engine = DisaggEngine(engine, config.role, config.migration_timeout)
    state = ServerState(engine, config, allow_terminate=allow_terminate_by_client)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        try:
            yield
        finally:
            await engine.shutdown()

    app = FastAPI(title="lmserve", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible and LMDeploy-native REST API")
    app.state.server = state
    install_error_handlers(app)
    for router in (openai_router(), lmdeploy_router(), score_router(), mlc_router(), operations_router(),
                   distserve_router(), lora_router()):
        app.include_router(router)
    for router in agent_routers():      # Responses, Anthropic Messages, /tokenize (server/routers_agents.py)
        app.include_router(router)
    mount_web(app)
    app.state.access = AccessPolicy(config.api_keys, config.admin_api_keys, "api_server")
    app.add_middleware(ControlGuard, policy=app.state.access)     # inside the client-key gate below
    app.add_middleware(ServerMiddleware, state=state)
    app.add_middleware(AnthropicErrors)     # outside ServerMiddleware: its 401/413/429 get reshaped too
    if config.allow_origins:
        # NOTE: added last, so it is the outermost layer and answers CORS preflights before the key check.
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allow_origins),
                           allow_credentials=config.allow_credentials, allow_methods=list(config.allow_methods),
                           allow_headers=list(config.allow_headers))
    return app


def _version() -> str:
    from lmserve import __version__
    return __version__
