"""The api_server's side of the proxy contract: register on start-up, stay registered, deregister on shutdown.

LMDeploy contract: `POST {proxy}/nodes/add {"url": "http://host:port", "status": {"models": [...]}}` and
`POST {proxy}/nodes/remove {"url": ...}`. The proxy accepts a registration before the node listens (it probes the
node until it answers), so the server may register from its start-up hook. `ProxyRegistration.start()` also
re-registers every `refresh_interval` seconds (an idempotent add), so a proxy that restarted without its node
file learns about the node again.
"""
from __future__ import annotations

import asyncio
import logging
import socket

import httpx

logger = logging.getLogger("lmserve.proxy")


def host_ip() -> str:
    """This machine's address on its default route, for a server bound to 0.0.0.0 (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def node_url(server_name: str, server_port: int) -> str:
    """The url other machines reach this api_server at."""
    host = host_ip() if server_name in ("0.0.0.0", "", "::") else server_name
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    return f"http://{host}:{server_port}"


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def register_node(proxy_url: str, url: str, models: list[str] | None = None, api_key: str | None = None,
                        timeout: float = 5.0) -> bool:
    body = {"url": url, "status": {"models": models}} if models else {"url": url}
    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            r = await client.post(f"{proxy_url.rstrip('/')}/nodes/add", json=body, headers=_headers(api_key))
        if r.status_code == 200:
            return True
        logger.error("proxy %s refused the registration of %s: %s %s", proxy_url, url, r.status_code, r.text)
    except httpx.HTTPError as e:
        logger.error("could not register %s with proxy %s: %s", url, proxy_url, e)
    return False


async def deregister_node(proxy_url: str, url: str, api_key: str | None = None, timeout: float = 5.0) -> bool:
    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            r = await client.post(f"{proxy_url.rstrip('/')}/nodes/remove", json={"url": url},
                                  headers=_headers(api_key))
        return r.status_code in (200, 404)  # 404: the proxy had already forgotten it
    except httpx.HTTPError as e:
        logger.error("could not deregister %s from proxy %s: %s", url, proxy_url, e)
        return False


class ProxyRegistration:
    """Use from the api_server's lifespan: `await reg.start()` after start-up, `await reg.stop()` on shutdown."""

    def __init__(self, proxy_url: str, url: str, models: list[str] | None = None, api_key: str | None = None,
                 refresh_interval: float = 30.0):
        self.proxy_url, self.url, self.models, self.api_key = proxy_url, url, models, api_key
        self.refresh_interval = refresh_interval
        self._task: asyncio.Task | None = None

    async def start(self) -> bool:
        ok = await register_node(self.proxy_url, self.url, self.models, self.api_key)
        if ok:
            logger.info("registered %s with proxy %s", self.url, self.proxy_url)
        if self.refresh_interval > 0:
            self._task = asyncio.get_running_loop().create_task(self._refresh())
        return ok

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_interval)
            await register_node(self.proxy_url, self.url, self.models, self.api_key)

    async def stop(self) -> bool:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        ok = await deregister_node(self.proxy_url, self.url, self.api_key)
        if ok:
            logger.info("deregistered %s from proxy %s", self.url, self.proxy_url)
        return ok
