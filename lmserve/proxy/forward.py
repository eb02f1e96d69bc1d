"""Forwarding: pick a node, send the request with httpx, fail over before the first byte, relay chunk by chunk.

Lifecycle of one request through the proxy:
  1. Parse the JSON body; find the nodes serving `model` (404 for a model no node has, 503 when none is healthy).
  2. Pick a node: the session's pinned node if the body has a `session_id`, else the routing strategy's choice.
  3. Send it and wait for the status line and the first body chunk. A connection error, a timeout, a 429/5xx
     or a dropped connection before that first chunk means nothing has reached the client yet: try another node
     (at most `max_retries` more, after a jittered exponential backoff: retry.py). A node that failed to answer
     leaves the rotation until a health check passes; its circuit breaker (breaker.py) counts the failure.
     A connection dropped before any byte may be a pooled keep-alive connection the node had closed, not a dead
     node: that node may be tried once more (on a new connection) and stays in rotation (a soft failure).
  4. Streams (text/event-stream, or LMDeploy's NDJSON lines of /v1/chat/interactive) are relayed chunk by chunk
     as they arrive; other responses are read whole and returned. A node that dies mid-stream ends the client's
     stream with an OpenAI-shaped error event (an SSE `data:` event, or an NDJSON line).
"""
from __future__ import annotations

import json
import logging
import time
from typing import NamedTuple

import anyio
import httpx
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from lmserve.proxy.nodes import Node, NodeRegistry
from lmserve.proxy.retry import sleep_before_retry
from lmserve.proxy.strategies import RouteRequest, RoutingStrategy, SessionTable
from lmserve.server.errors import APIError, error_body

logger = logging.getLogger("lmserve.proxy")

# NOTE: the node answered but could not take the request (500: it crashed on it). Retried on another node, as
# nothing has reached the client yet; a request that fails on every node gets the last node's answer.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
# NOTE: a client's credentials stay at the proxy; each node gets its own key (Node.headers)
_DROP_REQUEST_HEADERS = frozenset({"host", "content-length", "connection", "keep-alive", "transfer-encoding",
                                   "accept-encoding", "upgrade", "te", "proxy-authorization", "authorization",
                                   "x-api-key", "cookie"})
_DROP_RESPONSE_HEADERS = frozenset({"content-length", "connection", "keep-alive", "transfer-encoding",
                                    "content-encoding", "date", "server"})
NODE_HEADER = "x-lmserve-node"  # response header naming the node that served the request
# Dropped before the first byte: a stale pooled connection or a node that just died; a new connection tells which
_SOFT_ERRORS = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


def json_body(raw: bytes) -> dict:
    """A request body as a JSON object, or the 400 the proxy answers for anything else."""
    try:
        body = json.loads(raw) if raw else {}
    except ValueError:
        raise APIError(400, "The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    return body


def node_request_headers(request: Request) -> dict[str, str]:
    """The client's headers as sent on to a node: hop-by-hop and credential headers dropped (the node gets its own
    key, Node.headers), bytes relayed as the node sends them."""
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST_HEADERS}
    headers["accept-encoding"] = "identity"
    return headers


class Failure(NamedTuple):
    message: str
    soft: bool


STREAM_TYPES = ("text/event-stream", "application/x-ndjson")


def stream_error_chunk(content_type: str, message: str, code: str = "node_failed") -> bytes:
    body = json.dumps(error_body(502, message, code=code))
    return f"{body}\n".encode() if content_type.startswith("application/x-ndjson") else f"data: {body}\n\n".encode()


class RelayResponse(StreamingResponse):
    """A StreamingResponse that always runs `on_close` once it is done: finished, failed, or cancelled by a client
    that went away, even before the first chunk was sent (when the body generator never started, its own
    `finally` would never run)."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                await self.on_close()


class Forwarder:
    def __init__(self, registry: NodeRegistry, strategy: RoutingStrategy, sessions: SessionTable,
                 client: httpx.AsyncClient, max_retries: int = 3, backoff: tuple[float, float] = (0.05, 1.0)):
        self.registry, self.strategy, self.sessions = registry, strategy, sessions
        self.client = client
        self.max_retries = max_retries
        self.backoff = backoff
        self.num_failovers = 0
        self.num_stream_errors = 0

    # ---- routing --------------------------------------------------------------------------------------------
    def candidates(self, route: RouteRequest) -> list[Node]:
        if not self.registry.nodes:
            raise APIError(503, "No api_server is registered with the proxy.", code="no_available_node")
        if route.model is not None and route.model not in self.registry.known_models():
            raise APIError(404, f"The model `{route.model}` does not exist.", "model", "model_not_found")
        nodes = self.registry.candidates(route.model)
        if not nodes:
            what = f"model `{route.model}`" if route.model else "any model"
            raise APIError(503, f"No healthy api_server is serving {what}.", code="no_available_node")
        return nodes

    def choose(self, nodes: list[Node], route: RouteRequest) -> Node:
        node = None
        if route.session_id is not None:
            url = self.sessions.lookup(route.session_id)
            node = next((n for n in nodes if n.url == url), None)
            if url is not None and node is None:
                logger.warning("session %s: node %s is unavailable; moving the session", route.session_id, url)
        if node is None:
            node = self.strategy.select(nodes, route)
            if route.session_id is not None:
                self.sessions.pin(route.session_id, node.url)
        self.strategy.on_routed(node, route)
        return node

    # ---- forwarding -----------------------------------------------------------------------------------------
    async def forward(self, path: str, request: Request) -> Response:
        raw = await request.body()
        route = RouteRequest(json_body(raw))
        self.candidates(route)
        headers = node_request_headers(request)
        tried: set[str] = set()
        retried: set[str] = set()     # nodes given a second chance after a soft failure
        last_error, last_response = "", None
        for attempt in range(self.max_retries + 2):
            nodes = [n for n in self.registry.candidates(route.model) if n.url not in tried]
            if not nodes or attempt > self.max_retries + len(retried):
                break
            if attempt:
                await sleep_before_retry(attempt, *self.backoff)
                nodes = [n for n in self.registry.candidates(route.model) if n.url not in tried]
                if not nodes:
                    break
            node = self.choose(nodes, route)
            if attempt:
                self.num_failovers += 1
            result = await self._send(node, path, raw, headers)
            if isinstance(result, Failure) and result.soft and node.url not in retried:
                retried.add(node.url)
            else:
                tried.add(node.url)
            if isinstance(result, Response):
                # NOTE: a session's history lives on its node: a busy or failing answer from it goes back to the
                # client rather than moving the session. Only a node that cannot be reached loses its sessions.
                if result.status_code not in RETRY_STATUSES or route.session_id is not None:
                    return result
                last_response, last_error = result, f"{node.url} answered {result.status_code}"
            else:
                last_error = result.message
            logger.warning("request to %s failed before the first byte (%s); %s", node.url, last_error,
                           "trying another node" if attempt < self.max_retries else "giving up")
        if last_response is not None:
            return last_response
        raise APIError(503, f"No api_server could serve the request; last error: {last_error}",
                       code="no_available_node")

    async def _send(self, node: Node, path: str, raw: bytes, headers: dict) -> Response | Failure:
        """Response once the node's first body chunk is here, or why the node failed first."""
        node.num_unfinished += 1
        node.breaker.on_attempt()
        start = time.perf_counter()
        resp = None
        try:
            req = self.client.build_request("POST", node.url + path, content=raw, headers={**headers, **node.headers})
            resp = await self.client.send(req, stream=True)
            chunks = resp.aiter_raw()
            first = await anext(chunks, b"")
            out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in _DROP_RESPONSE_HEADERS}
            out_headers[NODE_HEADER] = node.url
            content_type = resp.headers.get("content-type", "")
            if content_type.startswith(STREAM_TYPES):
                outcome = {"ok": False}
                return RelayResponse(self._relay(node, first, chunks, outcome, content_type),
                                     on_close=lambda: self._finish(node, resp, start, outcome["ok"]),
                                     status_code=resp.status_code, headers=out_headers)
            content = first + b"".join([c async for c in chunks])
        except (httpx.HTTPError, OSError) as e:
            error = f"{type(e).__name__}: {e}".rstrip(": ")
            soft = isinstance(e, _SOFT_ERRORS)
            node.mark_failed(f"request: {error}", soft=soft)
            if not soft:
                self._breaker_failure(node, error)
            await self._finish(node, resp, start, ok=False)
            return Failure(f"{node.url}: {error}", soft)
        await self._finish(node, resp, start, ok=resp.status_code < 400)
        if resp.status_code >= 500:
            self._breaker_failure(node, f"answered {resp.status_code}")
        return Response(content, status_code=resp.status_code, headers=out_headers)

    async def _relay(self, node: Node, first: bytes, chunks, outcome: dict, content_type: str):
        try:
            if first:
                yield first
            async for chunk in chunks:
                yield chunk
            outcome["ok"] = True
        except (httpx.HTTPError, OSError) as e:
            self.num_stream_errors += 1
            error = f"{type(e).__name__}: {e}".rstrip(": ")
            node.mark_failed(f"stream: {error}")
            self._breaker_failure(node, f"stream: {error}")
            logger.warning("node %s failed mid-stream: %s", node.url, error)
            yield stream_error_chunk(content_type,
                                     f"The api_server serving this request failed mid-stream ({error}).")

    @staticmethod
    def _breaker_failure(node: Node, error: str) -> None:
        if node.breaker.record_failure():
            logger.warning("node %s: circuit breaker open after %d consecutive failure(s) (%s); retried in %.1f s",
                           node.url, node.breaker.failures, error, node.breaker.cooldown)

    @staticmethod
    async def _finish(node: Node, resp: httpx.Response | None, start: float, ok: bool) -> None:
        # NOTE: shielded, as this also runs when the client disconnected and the relay was cancelled; closing
        # the upstream response is what tells the node to abort the request.
        with anyio.CancelScope(shield=True):
            if resp is not None:
                await resp.aclose()
        node.num_unfinished -= 1
        node.breaker.on_done()
        if ok:
            node.breaker.record_success()
            node.num_served += 1
            node.num_soft_failures = 0      # served: alive, whatever a late health check said
            node.latency.append(time.perf_counter() - start)
