"""One pure-ASGI middleware, so it spans the whole response (streams included):

1. API keys: `Authorization: Bearer <key>` (or Anthropic's `x-api-key: <key>`) on every path but /health, /metrics,
   the docs and the web page (an admin key passes too). Control endpoints are guarded further inside, by
   auth.ControlGuard.
2. Request bodies: at most --max-request-body-bytes (413; POST /update_weights is exempt), received within
   --body-read-timeout seconds (408). The body is read whole here, before admission, so a client that sends
   its body slowly holds a connection but never an admission slot.
3. Bounded admission for generation requests: --max-concurrent-requests in flight, --max-queued-requests
   waiting; beyond that 429 with Retry-After. While terminating, 503.
4. Clean-up: when the HTTP exchange ends however it ends, engine requests it started that are still running
   (a client gone before its stream began) are aborted and the sessions it held are released.
"""
from __future__ import annotations

import asyncio
import logging

from lmserve.server.auth import AccessPolicy
from lmserve.server.errors import error_response
from lmserve.server.request_body import BodyTooLarge, read_body, replay, too_large
from lmserve.server.state import ServerState
from lmserve.web import is_web_path

logger = logging.getLogger(__name__)

GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/generate", "/v1/chat/interactive",
                              "/v1/embeddings", "/pooling", "/v1/encode", "/v1/responses", "/v1/messages",
                              "/v1/rerank", "/rerank", "/v2/rerank", "/v1/score", "/score"})
UNBOUNDED_BODY_PATHS = frozenset({"/update_weights"})    # weights: an admin request, as large as the model
OPEN_PATHS = frozenset({"/health", "/metrics", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"})
RETRY_AFTER_S = 1


class ServerMiddleware:
    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state
        self.policy = AccessPolicy(state.config.api_keys, state.config.admin_api_keys)
        self.api_keys = self.policy.api_keys

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        if (self.api_keys and path not in OPEN_PATHS and not is_web_path(path) and method != "OPTIONS"
                and not self.policy.client_ok(scope)):
            response = error_response(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                      code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        if method != "POST":
            return await self.app(scope, receive, send)
        if path not in UNBOUNDED_BODY_PATHS:
            body = await self._read_body(scope, receive)
            if not isinstance(body, bytes):
                return await body(scope, receive, send)
            receive = replay(body, receive)
        if path not in GENERATION_PATHS:
            return await self.app(scope, receive, send)

        state = self.state
        if state.is_terminating:
            return await error_response(503, "the server is shutting down", code="terminating")(scope, receive, send)
        if not await state.admission.acquire():
            state.metrics.rejected.inc()
            response = error_response(
                429, f"too many requests: {state.admission.max_running} in flight and "
                     f"{state.admission.max_queued} queued; retry later", code="rate_limit_exceeded",
                headers={"Retry-After": str(RETRY_AFTER_S)})
            return await response(scope, receive, send)
        request_ids: list[str] = []
        scope.setdefault("state", {})["lmserve_request_ids"] = request_ids
        try:
            await self.app(scope, receive, send)
        finally:
            state.admission.release()
            try:
                await state.end_http_request(request_ids)
            except Exception:   # noqa: BLE001 - clean-up must not mask the response's own outcome
                logger.exception("clean-up after %s failed", path)

    async def _read_body(self, scope, receive):
        """The whole body, or the error response to send instead (413 too large, 408 too slow)."""
        config = self.state.config
        try:
            async with asyncio.timeout(config.body_read_timeout):
                body = await read_body(scope, receive, config.max_request_body_bytes)
            return _Gone() if body is None else body
        except BodyTooLarge:
            return too_large(config.max_request_body_bytes)
        except TimeoutError:
            logger.info("%s %s: body not received within %.0f s", scope["method"], scope["path"],
                        config.body_read_timeout)
            return error_response(408, f"the request body was not received within {config.body_read_timeout:g} s "
                                       "(--body-read-timeout)", code="request_timeout",
                                  headers={"Connection": "close"})


class _Gone:
    """The client left while sending its body: nothing to answer."""

    async def __call__(self, scope, receive, send):
        return None
