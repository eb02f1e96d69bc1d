"""Async health checks: every `interval` seconds, GET /health (and /v1/models) on each node, with a timeout.

A node that fails a check (or a request, see forward.py) leaves the rotation at once, except for soft failures
(a check that timed out: nodes.SOFT_FAILURE_LIMIT in a row, with no request served in between); it returns when a check
passes again. Newly added nodes that are not up yet, and nodes that fail a check, are probed quickly (`watch`) so
they (re)join within a fraction of a second of answering, rather than at the next round.
"""
from __future__ import annotations

import asyncio
import logging

import httpx

from lmserve.proxy.nodes import Node, NodeRegistry

logger = logging.getLogger("lmserve.proxy")


class HealthChecker:
    def __init__(self, registry: NodeRegistry, client: httpx.AsyncClient, interval: float = 5.0,
                 timeout: float = 2.0, headers: dict[str, str] | None = None):
        self.registry = registry
        self.client = client
        self.interval = interval
        self.timeout = timeout
        self.headers = headers or {}
        self._task: asyncio.Task | None = None
        self._watches: dict[str, asyncio.Task] = {}

    async def check(self, node: Node) -> bool:
        """One check of one node; updates its health and model list. Never raises."""
        headers = {**self.headers, **node.headers}     # each node gets its own key (given at /nodes/add)
        try:
            r = await self.client.get(f"{node.url}/health", headers=headers, timeout=self.timeout)
            if r.status_code != 200:
                raise RuntimeError(f"/health answered {r.status_code}")
            r = await self.client.get(f"{node.url}/v1/models", headers=headers, timeout=self.timeout)
            if r.status_code == 200:
                models = [m["id"] for m in r.json().get("data", []) if isinstance(m, dict) and "id" in m]
                if models:
                    node.models = models
            elif not node.models:
                raise RuntimeError(f"/v1/models answered {r.status_code}")
        except Exception as e:  # noqa: BLE001 - any failure means "not healthy"; the reason is kept for /nodes/status
            if self.registry.get(node.url) is node:
                # NOTE: a timeout is soft: a node busy with requests may answer /health late (nodes.py)
                node.mark_failed(f"health check: {type(e).__name__}: {e}".rstrip(": "),
                                 soft=isinstance(e, httpx.TimeoutException) and node.is_healthy)
                if not node.is_healthy:
                    # NOTE: a node out of rotation is probed quickly, so a restarted node is back within a
                    # fraction of a second of answering (once its breaker's cool-down is over), not a round later
                    self.watch(node)
            return False
        if self.registry.get(node.url) is node:  # it may have been removed while we waited
            if node.models:
                node.breaker.on_health_ok()     # the half-open probe; an open breaker waits out its cool-down
                node.mark_healthy()
            else:
                node.mark_failed("health check: node lists no models")
        return node.is_routable

    async def check_all(self) -> None:
        nodes = list(self.registry.nodes.values())
        if nodes:
            await asyncio.gather(*(self.check(n) for n in nodes))

    def watch(self, node: Node, duration: float = 60.0, period: float = 0.25) -> None:
        """Probe a node that is not in rotation every `period` s for up to `duration` s, until it passes."""
        if node.url in self._watches and not self._watches[node.url].done():
            return

        async def _watch():
            for _ in range(max(1, int(duration / period))):
                if self.registry.get(node.url) is not node or await self.check(node):
                    return
                await asyncio.sleep(period)

        self._watches[node.url] = asyncio.get_running_loop().create_task(_watch())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check_all()
            except Exception:
                logger.exception("health check round failed")

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        tasks = [t for t in [self._task, *self._watches.values()] if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None
        self._watches.clear()
