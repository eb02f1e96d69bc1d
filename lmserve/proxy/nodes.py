"""Node registry: the api_servers behind the proxy, their models, load and health; saved to a JSON file.

A node is in rotation when it is healthy and its model list is known. Nodes added without a model list (e.g. by
an api_server registering itself before it listens) stay out of rotation until the health checker has reached
them and read their `/v1/models`.
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from lmserve.proxy.breaker import STATE_CODES, CircuitBreaker

logger = logging.getLogger("lmserve.proxy")

LATENCY_WINDOW = 32  # recent request latencies kept per node
# Soft failures (a health check that timed out, a pooled keep-alive connection the node had closed) in a row
# before a node leaves the rotation. A busy node answers /health late but still serves; a served request
# resets the count. Hard failures (connection refused, an error status) take a node out at once.
SOFT_FAILURE_LIMIT = 3


def normalize_url(url: str) -> str:
    """'127.0.0.1:23333/' -> 'http://127.0.0.1:23333'. Raises ValueError for anything that is not host[:port]."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"url: not an http(s) url: {url!r}")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


@dataclass(eq=False)  # identity: a node is the same node whatever its load
class Node:
    url: str
    models: list[str] = field(default_factory=list)
    speed: float | None = None          # relative throughput (LMDeploy: RPM or any metric shared by all nodes)
    role: int = 1                       # LMDeploy EngineRole: 1 hybrid, 2 prefill, 3 decode (proxy/distserve.py)
    is_healthy: bool = False
    num_unfinished: int = 0             # requests this proxy has in flight on the node
    num_served: int = 0
    num_failures: int = 0               # consecutive failed health checks or requests
    num_soft_failures: int = 0          # consecutive soft failures (see SOFT_FAILURE_LIMIT)
    last_error: str | None = None
    latency: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))  # seconds, recent requests
    # NOTE: the key the proxy shows this node (given at /nodes/add); never a client's key, never echoed
    api_key: str | None = field(default=None, repr=False)
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)

    @property
    def is_routable(self) -> bool:
        return self.is_healthy and bool(self.models) and self.breaker.allows()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @property
    def breaker_state(self) -> int:
        return STATE_CODES[self.breaker.state]

    @property
    def breaker_opens(self) -> int:
        return self.breaker.num_opened

    @property
    def mean_latency(self) -> float | None:
        return statistics.fmean(self.latency) if self.latency else None

    def mark_failed(self, error: str, soft: bool = False) -> None:
        if soft:
            self.num_soft_failures += 1
            if self.num_soft_failures < SOFT_FAILURE_LIMIT:
                self.last_error = error
                logger.info("node %s: %s (%d/%d before it leaves the rotation)", self.url, error,
                            self.num_soft_failures, SOFT_FAILURE_LIMIT)
                return
        if self.is_healthy:
            logger.warning("node %s leaves the rotation: %s", self.url, error)
        self.is_healthy = False
        self.num_failures += 1
        self.last_error = error

    def mark_healthy(self) -> None:
        if not self.is_healthy:
            logger.info("node %s is in rotation (models: %s)", self.url, ", ".join(self.models) or "unknown")
        self.is_healthy = True
        self.num_failures = 0
        self.num_soft_failures = 0
        self.last_error = None

    def status(self) -> dict:
        """LMDeploy's `Status` fields (models, speed, unfinished, latency, role) plus our health fields."""
        return {"models": list(self.models), "speed": self.speed, "unfinished": self.num_unfinished,
                "latency": list(self.latency), "role": self.role, "is_healthy": self.is_healthy,
                "num_served": self.num_served, "num_failures": self.num_failures, "last_error": self.last_error,
                "breaker": self.breaker.status(), "has_api_key": self.api_key is not None}


class NodeRegistry:
    """url -> Node. Every add/remove is written to `node_file` (atomically) when one is given."""

    def __init__(self, node_file: str | None = None, breaker_threshold: int = 3, breaker_cooldown: float = 5.0):
        self.node_file = node_file
        self.breaker_args = (breaker_threshold, breaker_cooldown)
        self.nodes: dict[str, Node] = {}
        self.removal_listeners: list = []  # callables(url) told when a node leaves (strategy tables, sessions)
        if node_file and os.path.exists(node_file):
            self._load()

    def __len__(self) -> int:
        return len(self.nodes)

    def get(self, url: str) -> Node | None:
        return self.nodes.get(url)

    def _new_node(self, url: str, **kw) -> Node:
        return Node(url=url, breaker=CircuitBreaker(*self.breaker_args), **kw)

    def add(self, url: str, models: list[str] | None = None, speed: float | None = None, role: int = 1,
            api_key: str | None = None) -> Node:
        url = normalize_url(url)
        node = self.nodes.get(url)
        if node is None:
            node = self.nodes[url] = self._new_node(url)
        # NOTE: re-adding a node replaces its key (an admin-only call); a node restarted with a new key re-registers
        node.api_key = api_key
        if models:
            node.models = list(models)
        if speed is not None:
            node.speed = float(speed)
        node.role = role
        self._save()
        return node

    def remove(self, url: str) -> Node | None:
        node = self.nodes.pop(normalize_url(url), None)
        if node is not None:
            for listener in self.removal_listeners:
                listener(node.url)
            self._save()
        return node

    def known_models(self) -> set[str]:
        return {m for node in self.nodes.values() for m in node.models}

    def routable_models(self) -> list[str]:
        return sorted({m for node in self.nodes.values() if node.is_routable for m in node.models})

    def candidates(self, model: str | None) -> list[Node]:
        """Healthy nodes serving `model` (any model when None)."""
        return [n for n in self.nodes.values() if n.is_routable and (model is None or model in n.models)]

    def status(self) -> dict[str, dict]:
        return {url: node.status() for url, node in self.nodes.items()}

    # ---- persistence ----------------------------------------------------------------------------------------
    def _load(self) -> None:
        try:
            with open(self.node_file) as f:
                entries = json.load(f).get("nodes", [])
            for e in entries:
                url = normalize_url(e["url"])
                self.nodes[url] = self._new_node(url, models=e.get("models", []), speed=e.get("speed"),
                                                 role=e.get("role", 1), api_key=e.get("api_key"))
            logger.info("restored %d node(s) from %s", len(self.nodes), self.node_file)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            logger.error("could not read node file %s (%s); starting with no nodes", self.node_file, e)

    def _save(self) -> None:
        if not self.node_file:
            return
        data = {"saved_at": time.time(),
                "nodes": [{"url": n.url, "models": n.models, "speed": n.speed, "role": n.role, "api_key": n.api_key}
                          for n in self.nodes.values()]}
        directory = os.path.dirname(os.path.abspath(self.node_file))
        os.makedirs(directory, exist_ok=True)
        # NOTE: write-then-rename so a crash mid-write never leaves a truncated node file behind. mkstemp makes
        # the file 0600: it holds the nodes' keys.
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".nodes-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=2)
            os.replace(tmp, self.node_file)
        except OSError as e:
            logger.error("could not save node file %s: %s", self.node_file, e)
            if os.path.exists(tmp):
                os.unlink(tmp)
