"""`lmserve serve api_server`: load the engine, serve the app with uvicorn, register with a proxy (--proxy-url)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading

import httpx
import uvicorn

from lmserve.config import EngineConfig, ServerConfig
from lmserve.server.protocol import NodeRequest, NodeStatus
from lmserve.startup import process_age_s

logger = logging.getLogger(__name__)


def _host_ip() -> str:
    """An address other machines can reach us at (what a proxy should call back), when bound to 0.0.0.0."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))     # no packet is sent; this only picks the outgoing interface
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def public_url(config: ServerConfig) -> str:
    host = _host_ip() if config.server_name in ("0.0.0.0", "::", "") else config.server_name
    scheme = "https" if config.ssl_keyfile and config.ssl_certfile else "http"
    return f"{scheme}://{host}:{config.server_port}"


def _proxy_headers(config: ServerConfig) -> dict[str, str]:
    """What we show the proxy's control endpoints: its admin key (--proxy-admin-key, else our first admin key),
    else our first client key (a proxy without admin keys takes loopback callers that pass its client gate)."""
    key = config.proxy_admin_key or (config.admin_api_keys[0] if config.admin_api_keys else None) or \
        (config.api_keys[0] if config.api_keys else None)
    return {"Authorization": f"Bearer {key}"} if key else {}


def _proxy_client(config: ServerConfig, timeout: float) -> httpx.AsyncClient:
    # NOTE: an https proxy is verified against --ssl-ca-certs (one CA for the whole deployment), else the
    # system store; our certificate is shown as a client certificate when we have one.
    from lmserve.server.tls import client_context
    verify = client_context(config.ssl_ca_certs, config.ssl_certfile, config.ssl_keyfile) \
        if config.proxy_url and config.proxy_url.startswith("https") else True
    return httpx.AsyncClient(timeout=timeout, verify=verify)


async def register_with_proxy(config: ServerConfig, model_name: str, server: uvicorn.Server) -> None:
    """POST {proxy}/nodes/add once the server accepts connections; retried while the proxy is not up."""
    while not server.started:
        await asyncio.sleep(0.1)
    role = {"hybrid": 1, "prefill": 2, "decode": 3}[config.role]     # LMDeploy's EngineRole values
    # the proxy authenticates to us with our own first client key, given here (never echoed by the proxy)
    node = NodeRequest(url=public_url(config), status=NodeStatus(models=[model_name], role=role),
                       api_key=config.api_keys[0] if config.api_keys else None)
    headers = _proxy_headers(config)
    delay = 1.0
    async with _proxy_client(config, 10) as client:
        while True:
            try:
                r = await client.post(f"{config.proxy_url.rstrip('/')}/nodes/add", json=node.model_dump(),
                                      headers=headers)
                if r.status_code < 300:
                    logger.info("registered %s with the proxy at %s", node.url, config.proxy_url)
                    return
                logger.warning("proxy refused the registration (%d): %s", r.status_code, r.text[:200])
            except httpx.HTTPError as e:
                logger.warning("cannot reach the proxy at %s: %s; retrying", config.proxy_url, e)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)


async def deregister_from_proxy(config: ServerConfig) -> None:
    headers = _proxy_headers(config)
    try:
        async with _proxy_client(config, 5) as client:
            await client.post(f"{config.proxy_url.rstrip('/')}/nodes/remove", json={"url": public_url(config)},
                              headers=headers)
    except httpx.HTTPError as e:
        logger.warning("could not deregister from the proxy: %s", e)


class _Server(uvicorn.Server):
    """uvicorn's Server, except that SIGINT/SIGTERM only ask for a graceful stop.

    NOTE: uvicorn re-raises the captured signal once serve() returns; for SIGTERM that kills the process before
    our clean-up (deregistering from the proxy) runs, and the exit status says "killed". A signal here means
    "stop": serve() returns, the clean-up runs, and the process exits with 0."""

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


async def announce_ready(config: ServerConfig, model_name: str, server: uvicorn.Server) -> None:
    """The last start-up line: where to send requests, and how long the whole start took (imports included)."""
    while not server.started:
        await asyncio.sleep(0.05)
    host = "localhost" if config.server_name in ("0.0.0.0", "::", "") else config.server_name
    scheme = "https" if config.ssl_certfile else "http"
    logger.info("ready at %s://%s:%d (model %s; API docs at /docs); start-up took %.1f s", scheme, host,
                config.server_port, model_name, process_age_s())


async def serve(app, config: ServerConfig) -> None:
    from lmserve.server.tls import TLSFiles, uvicorn_ssl_kwargs
    tls = TLSFiles(config.ssl_keyfile, config.ssl_certfile, config.ssl_ca_certs)
    uv_config = uvicorn.Config(app, host=config.server_name, port=config.server_port,
                               log_level=config.log_level.lower(), timeout_keep_alive=config.keep_alive_timeout,
                               **uvicorn_ssl_kwargs(tls))
    server = _Server(uv_config)
    state = app.state.server
    state.request_shutdown = lambda: setattr(server, "should_exit", True)
    ready = asyncio.ensure_future(announce_ready(config, state.model_name, server))
    registration = None
    if config.proxy_url:
        registration = asyncio.ensure_future(register_with_proxy(config, state.model_name, server))
    try:
        await server.serve()
    finally:
        ready.cancel()
        if registration is not None:
            registration.cancel()
            await deregister_from_proxy(config)


def run_api_server(engine_config: EngineConfig, server_config: ServerConfig, *,
                   allow_terminate_by_client: bool = False) -> int:
    logging.basicConfig(level=server_config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from lmserve.engine.async_engine import AsyncEngine
    from lmserve.server.app import build_app

    try:
        engine = AsyncEngine.from_config(engine_config)  # blocking: weights + tokenizer, before binding the port
    except (ValueError, FileNotFoundError) as e:           # bad settings or paths: one line, not a traceback
        raise SystemExit(f"api_server: {e}") from None
    app = build_app(engine, server_config, allow_terminate_by_client=allow_terminate_by_client)
    logger.info("starting the HTTP%s server on %s:%d", "S" if server_config.ssl_certfile else "",
                server_config.server_name, server_config.server_port)
    logger.info("%s", app.state.access.startup_message())
    asyncio.run(serve(app, server_config))
    return 0
