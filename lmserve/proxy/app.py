"""build_app(config): the proxy's FastAPI app. One router for node management, one for the OpenAI/LMDeploy
endpoints it routes; all state lives on `app.state` (registry, strategy, sessions, forwarder, health checker).

Wire contract: LMDeploy's "Proxy Server API" (/nodes/add, /nodes/remove, /nodes/status, /nodes/terminate,
/nodes/terminate_all, /v1/models, /v1/chat/completions, /v1/completions) plus /generate, /v1/embeddings,
/v1/encode, /pooling, /health and /metrics; the web page (chat + node dashboard) at /. Errors the proxy makes use the OpenAI error shape.

Trust: /nodes/add|remove|terminate|terminate_all are control endpoints (server/auth.py: the admin key, or loopback
callers when the proxy has no admin keys); nodes must live inside --allowed-node-hosts; each node is called with
its own key (the `api_key` of /nodes/add), never a client's key.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import httpx
from fastapi import APIRouter, Depends, FastAPI, Request
from starlette.responses import PlainTextResponse, Response

from lmserve.proxy.allowlist import NodeHostPolicy
from lmserve.proxy.body_limit import BodyLimit
from lmserve.proxy.agent_routes import ResponseRoutes, agent_router
from lmserve.proxy.config import ProxyConfig
from lmserve.proxy.distserve import DistServe, distserve_router
from lmserve.proxy.forward import Forwarder
from lmserve.proxy.health import HealthChecker
from lmserve.proxy.nodes import NodeRegistry, normalize_url
from lmserve.proxy.strategies import PrefixAware, SessionTable, make_strategy
from lmserve.server.auth import AccessPolicy, ControlGuard
from lmserve.server.anthropic_errors import AnthropicErrors
from lmserve.server.errors import APIError, install_error_handlers
from lmserve.server.tls import client_context
from lmserve.server.protocol import ModelCard, ModelList, NodeRequest
from lmserve.web import mount_web

logger = logging.getLogger("lmserve.proxy")

# NOTE: /v1/chat/interactive is not in LMDeploy's proxy; routed here so interactive sessions (session_id) work
# through the proxy too.
ROUTED_PATHS = ("/v1/chat/completions", "/v1/completions", "/generate", "/v1/embeddings", "/v1/encode",
                "/pooling", "/v1/chat/interactive")


def _check_api_key(request: Request) -> None:
    if not request.app.state.access.client_ok(request.scope):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")


def _node_url(node: NodeRequest | None, node_url: str | None) -> str:
    """The node url from an LMDeploy body `{url}` or, as older LMDeploy proxies took it, `?node_url=`."""
    url = node.url if node is not None else node_url
    if not url:
        raise APIError(400, "Give the node as a JSON body {\"url\": ...} or as ?node_url=.", "url", "missing_url")
    try:
        return normalize_url(url)
    except ValueError as e:
        raise APIError(400, str(e), "url", "invalid_url") from None


# ---- /nodes/* -----------------------------------------------------------------------------------------------
def nodes_router() -> APIRouter:
    router = APIRouter(dependencies=[Depends(_check_api_key)])

    @router.post("/nodes/add")
    async def add_node(request: Request, node: NodeRequest):
        state = request.app.state
        try:
            url = normalize_url(node.url)
        except ValueError as e:
            raise APIError(400, str(e), "url", "invalid_url") from None
        if not await asyncio.to_thread(state.node_hosts.allows, url):
            logger.warning("refused /nodes/add of %s: outside --allowed-node-hosts", url)
            raise APIError(403, f"{url} is outside --allowed-node-hosts", "url", "node_host_not_allowed")
        status = node.status
        entry = state.registry.add(url, models=status.models if status else None,
                                   speed=status.speed if status else None, api_key=node.api_key,
                                   role=status.role if status else 1)
        # NOTE: an api_server registers itself while starting, before it listens: if this first check fails the
        # node is added anyway, out of rotation, and probed every 0.25 s until it answers.
        if not await state.health.check(entry):
            state.health.watch(entry)
        logger.info("node %s added (%s)", url, "in rotation" if entry.is_routable else "waiting for it to answer")
        return {"url": url, "status": entry.status()}

    @router.post("/nodes/remove")
    async def remove_node(request: Request, node: NodeRequest | None = None, node_url: str | None = None):
        url = _node_url(node, node_url)
        if request.app.state.registry.remove(url) is None:
            raise APIError(404, f"Node {url} is not registered.", "url", "node_not_found")
        logger.info("node %s removed", url)
        return {"url": url, "removed": True}

    @router.get("/nodes/status")
    async def node_status(request: Request):
        return request.app.state.registry.status()

    async def terminate(request: Request, url: str) -> bool:
        state = request.app.state
        node = state.registry.remove(url)
        try:  # LMDeploy's api_server exits on GET /terminate
            r = await state.client.get(f"{url}/terminate", headers=node.headers if node else {},
                                       timeout=state.config.health_check_timeout)
            ok = r.status_code == 200
        except httpx.HTTPError as e:
            logger.warning("node %s: /terminate failed: %s", url, e)
            ok = False
        logger.info("node %s terminated (%s)", url, "acknowledged" if ok else "not acknowledged")
        return ok

    @router.post("/nodes/terminate")
    async def terminate_node(request: Request, node: NodeRequest | None = None, node_url: str | None = None):
        url = _node_url(node, node_url)
        if request.app.state.registry.get(url) is None:
            raise APIError(404, f"Node {url} is not registered.", "url", "node_not_found")
        return {"url": url, "terminated": await terminate(request, url)}

    @router.get("/nodes/terminate_all")
    async def terminate_all(request: Request):
        urls = list(request.app.state.registry.nodes)
        results = await asyncio.gather(*(terminate(request, u) for u in urls))
        return {"terminated": {u: ok for u, ok in zip(urls, results)}}

    return router


# ---- OpenAI / LMDeploy endpoints ----------------------------------------------------------------------------
def api_router() -> APIRouter:
    router = APIRouter(dependencies=[Depends(_check_api_key)])

    @router.get("/v1/models")
    async def list_models(request: Request):
        cards = [ModelCard(id=m, root=m, owned_by="lmserve") for m in request.app.state.registry.routable_models()]
        return ModelList(data=cards).model_dump()

    def route(path: str):
        async def handler(request: Request) -> Response:
            state = request.app.state
            if state.config.serving_strategy == "DistServe":
                return await state.distserve.forward(path, request)
            return await state.forwarder.forward(path, request)
        handler.__name__ = "forward_" + path.strip("/").replace("/", "_")
        return handler

    for path in ROUTED_PATHS:
        router.add_api_route(path, route(path), methods=["POST"])
    return router


def health_router() -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health(request: Request):
        registry = request.app.state.registry
        return {"status": "ok", "num_nodes": len(registry),
                "num_healthy_nodes": sum(n.is_routable for n in registry.nodes.values())}

    @router.get("/metrics")
    async def metrics(request: Request):
        state = request.app.state
        lines = ["# TYPE lmserve_proxy_failovers_total counter",
                 f"lmserve_proxy_failovers_total {state.forwarder.num_failovers}",
                 "# TYPE lmserve_proxy_stream_errors_total counter",
                 f"lmserve_proxy_stream_errors_total {state.forwarder.num_stream_errors}"]
        if isinstance(state.strategy, PrefixAware):
            lines += ["# TYPE lmserve_proxy_prefix_routed_total counter",
                      f"lmserve_proxy_prefix_routed_total {state.strategy.num_prefix_routed}",
                      "# TYPE lmserve_proxy_prefix_load_spilled_total counter",
                      f"lmserve_proxy_prefix_load_spilled_total {state.strategy.num_load_spilled}"]
        # breaker_state: 0 closed, 1 half-open, 2 open (proxy/breaker.py)
        for name, kind in (("num_unfinished", "gauge"), ("num_served", "counter"), ("is_healthy", "gauge"),
                           ("breaker_state", "gauge"), ("breaker_opens", "counter")):
            metric = f"lmserve_proxy_node_{name}" + ("_total" if kind == "counter" else "")
            lines.append(f"# TYPE {metric} {kind}")
            lines += [f'{metric}{{node="{n.url}"}} {int(getattr(n, name))}' for n in state.registry.nodes.values()]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    return router


# ---- the app ----------------------------------------------------------------------------------------------
def build_app(config: ProxyConfig | None = None) -> FastAPI:
    config = config or ProxyConfig()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state = app.state
        # NOTE: https nodes are verified (--node-ca-certs, else the system store) and shown our client certificate
        state.client = httpx.AsyncClient(
            timeout=httpx.Timeout(config.request_timeout, connect=config.connect_timeout),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
            verify=client_context(config.node_ca_certs, config.node_ssl_certfile, config.node_ssl_keyfile))
        state.health = HealthChecker(state.registry, state.client, config.health_check_interval,
                                     config.health_check_timeout)
        state.forwarder = Forwarder(state.registry, state.strategy, state.sessions, state.client, config.max_retries,
                                    (config.retry_backoff, config.retry_backoff_max))
        state.distserve = DistServe(state.registry, state.forwarder, state.client, config.max_retries)
        await state.health.check_all()  # nodes restored from the node file rejoin before the first request
        state.health.start()
        state.started_at = time.time()
        try:
            yield
        finally:
            await state.health.stop()
            await state.client.aclose()

    app = FastAPI(title="lmserve proxy", lifespan=lifespan)
    app.state.config = config
    app.state.registry = NodeRegistry(config.node_file, config.breaker_threshold, config.breaker_cooldown_s)
    app.state.node_hosts = NodeHostPolicy(config.allowed_node_hosts)
    for url in [u for u in app.state.registry.nodes if not app.state.node_hosts.allows(u)]:
        logger.warning("node %s from the node file is outside --allowed-node-hosts: dropped", url)
        app.state.registry.nodes.pop(url)
    app.state.strategy = make_strategy(config.strategy, config)
    app.state.sessions = SessionTable(config.max_sessions)
    app.state.registry.removal_listeners += [app.state.strategy.forget_node, app.state.sessions.forget_node]
    app.state.access = AccessPolicy(config.api_keys, config.admin_api_keys, "proxy")
    logger.info("%s", app.state.access.startup_message())

    install_error_handlers(app)
    app.include_router(health_router())
    app.include_router(nodes_router())
    app.include_router(api_router())
    app.include_router(agent_router())      # Responses, Anthropic Messages, /tokenize (proxy/agent_routes.py)
    app.state.response_routes = ResponseRoutes(config.max_response_routes)
    app.add_middleware(AnthropicErrors)
    app.include_router(distserve_router())
    mount_web(app)
    app.add_middleware(ControlGuard, policy=app.state.access)
    app.add_middleware(BodyLimit, limit=config.max_request_body_bytes)
    return app
