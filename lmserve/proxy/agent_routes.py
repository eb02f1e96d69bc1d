"""The proxy's routes for the Responses API, the Anthropic Messages API and /tokenize, /detokenize.

Messages, count_tokens and the tokenizer endpoints are stateless: forwarded like chat completions (streams relayed
chunk by chunk). A Response lives on the node that generated it, so the proxy remembers response id -> node as
responses pass through (nodes name them in the x-lmserve-response-id header, streamed or not), and sends a
request with `previous_response_id`, and GET / DELETE / input_items / cancel of a stored response, to that node.
If that node has left the proxy or is out of rotation, the answer is a 404 that says so: the conversation is not
silently restarted on another node."""
from __future__ import annotations

import json
from collections import OrderedDict

import httpx
from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from lmserve.proxy.forward import node_request_headers
from lmserve.proxy.nodes import Node
from lmserve.server.errors import APIError

RESPONSE_ID_HEADER = "x-lmserve-response-id"
STATELESS_PATHS = ("/v1/messages", "/v1/messages/count_tokens", "/tokenize", "/detokenize", "/v1/tokenize",
                   "/v1/detokenize")


class ResponseRoutes:
    """response id -> url of the node that stored it (LRU, at most `max_size`). Not cleared when a node leaves:
    a request for one of its responses must hear that its node is gone."""

    def __init__(self, max_size: int = 100_000):
        self.max_size = max_size
        self._urls: OrderedDict[str, str] = OrderedDict()

    def record(self, response_id: str, url: str) -> None:
        self._urls[response_id] = url
        self._urls.move_to_end(response_id)
        while len(self._urls) > self.max_size:
            self._urls.popitem(last=False)

    def lookup(self, response_id: str) -> str | None:
        return self._urls.get(response_id)


def check_api_key(request: Request) -> None:
    """`Authorization: Bearer KEY` or Anthropic's `x-api-key: KEY` (server/auth.py reads both)."""
    if not request.app.state.access.client_ok(request.scope):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")


def _owner(request: Request, response_id: str, param: str) -> Node:
    state = request.app.state
    url = state.response_routes.lookup(response_id)
    if url is None:
        raise APIError(404, f"No response with id '{response_id}' has passed through this proxy.", param,
                       "not_found")
    node = state.registry.get(url)
    if node is None or not node.is_routable:
        why = "has left the proxy" if node is None else "is out of rotation"
        raise APIError(404, f"Response '{response_id}' is stored on node {url}, which {why}; the conversation "
                            "cannot be continued on another node.", param, "response_node_gone")
    return node


def _record(request: Request, response: Response) -> Response:
    response_id = response.headers.get(RESPONSE_ID_HEADER)
    node_url = response.headers.get("x-lmserve-node")
    if response_id and node_url:
        request.app.state.response_routes.record(response_id, node_url)
    return response


def agent_router() -> APIRouter:
    router = APIRouter(dependencies=[Depends(check_api_key)])

    def route(path: str):
        async def handler(request: Request) -> Response:
            return await request.app.state.forwarder.forward(path, request)
        handler.__name__ = "forward_" + path.strip("/").replace("/", "_")
        return handler

    for path in STATELESS_PATHS:
        router.add_api_route(path, route(path), methods=["POST"])

    @router.post("/v1/responses")
    async def create_response(request: Request) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            raise APIError(400, "The request body is not valid JSON.", code="invalid_json") from None
        previous = body.get("previous_response_id") if isinstance(body, dict) else None
        if not isinstance(previous, str):
            return _record(request, await request.app.state.forwarder.forward("/v1/responses", request))
        node = _owner(request, previous, "previous_response_id")
        result = await request.app.state.forwarder._send(node, "/v1/responses", raw, node_request_headers(request))
        if not isinstance(result, Response):
            raise APIError(404, f"Response '{previous}' is stored on node {node.url}, which did not answer "
                                f"({result.message}).", "previous_response_id", "response_node_gone")
        return _record(request, result)

    async def on_owner(request: Request, method: str, response_id: str, suffix: str = "") -> Response:
        node = _owner(request, response_id, "response_id")
        client: httpx.AsyncClient = request.app.state.client
        try:
            r = await client.request(method, f"{node.url}/v1/responses/{response_id}{suffix}",
                                     params=request.query_params, headers={**node_request_headers(request), **node.headers})
        except httpx.HTTPError as e:
            raise APIError(404, f"Response '{response_id}' is stored on node {node.url}, which did not answer "
                                f"({type(e).__name__}).", "response_id", "response_node_gone") from None
        return Response(r.content, status_code=r.status_code, media_type=r.headers.get("content-type"))

    @router.get("/v1/responses/{response_id}")
    async def retrieve(request: Request, response_id: str) -> Response:
        return await on_owner(request, "GET", response_id)

    @router.delete("/v1/responses/{response_id}")
    async def delete(request: Request, response_id: str) -> Response:
        return await on_owner(request, "DELETE", response_id)

    @router.get("/v1/responses/{response_id}/input_items")
    async def input_items(request: Request, response_id: str) -> Response:
        return await on_owner(request, "GET", response_id, "/input_items")

    @router.post("/v1/responses/{response_id}/cancel")
    async def cancel(request: Request, response_id: str) -> Response:
        return await on_owner(request, "POST", response_id, "/cancel")

    return router
