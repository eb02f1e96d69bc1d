"""Routing strategies: which healthy node gets a request. Small classes, pure Python, no I/O.

    random                weighted by node speed
    min_expected_latency  (outstanding requests + 1) / speed, ties broken at random
    min_observed_latency  mean of recent request latencies x (outstanding + 1); nodes with no samples first
    prefix_aware          the node that served the longest shared prompt prefix (its prefix cache holds it),
                          unless it has more than `balance_factor` x the mean outstanding requests or the
                          shared part is short; otherwise the least-loaded node

Session affinity (`session_id` in the body) is applied on top of any strategy by `SessionTable`.
"""
from __future__ import annotations

import random
import statistics
import time
from collections import OrderedDict

from lmserve.proxy.nodes import Node


# ---- what a strategy sees of a request ----------------------------------------------------------------------
def prompt_text(body: dict) -> str:
    """The leading text of a request's prompt, in a form that grows the way the rendered prompt grows.

    Chat messages become 'role\\x1fcontent\\x1e' per message, so conversations sharing a system prompt (and
    earlier turns) share a text prefix. Token id prompts become their ids joined by commas.
    """
    messages = body.get("messages")
    if isinstance(messages, str):
        return messages
    if isinstance(messages, list):
        parts = []
        for m in messages:
            if not isinstance(m, dict):
                continue
            content = m.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}, {"type": "image_url", ...}]
                content = "".join(str(p.get("text") or p.get("image_url") or "") for p in content
                                  if isinstance(p, dict))
            parts.append(f"{m.get('role', '')}\x1f{content or ''}\x1e")
        return "".join(parts)
    for key in ("prompt", "input", "input_ids"):
        value = body.get(key)
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value:
            if all(isinstance(v, int) for v in value):
                return ",".join(map(str, value))
            first = value[0]  # a batch of prompts: route on the first
            if isinstance(first, str):
                return first
            if isinstance(first, list):
                return ",".join(map(str, first))
    return ""


def prefix_block_hashes(text: str, block_chars: int, max_chars: int) -> list[int]:
    """Chained hashes of the full `block_chars` blocks of text[:max_chars]: hashes[i] covers text[:(i+1)*block]."""
    hashes, prev = [], 0
    for start in range(0, min(len(text), max_chars) - block_chars + 1, block_chars):
        prev = hash((prev, text[start:start + block_chars]))
        hashes.append(prev)
    return hashes


class RouteRequest:
    """The parts of a request body that routing looks at; the prefix hashes are computed once, on demand."""

    def __init__(self, body: dict):
        self.body = body
        self.model: str | None = body.get("model") if isinstance(body.get("model"), str) else None
        session_id = body.get("session_id")
        # NOTE: LMDeploy uses session_id -1 for "no session".
        self.session_id: int | str | None = session_id if isinstance(session_id, (int, str)) and \
            session_id not in (-1, "") and not isinstance(session_id, bool) else None
        self._hashes: dict[tuple[int, int], list[int]] = {}

    def block_hashes(self, block_chars: int, max_chars: int) -> list[int]:
        key = (block_chars, max_chars)
        if key not in self._hashes:
            self._hashes[key] = prefix_block_hashes(prompt_text(self.body), block_chars, max_chars)
        return self._hashes[key]


# ---- strategies -----------------------------------------------------------------------------------------------
def _speeds(nodes: list[Node]) -> list[float]:
    """Node speeds, with unknown ones set to the mean of the known ones (1.0 when none is known)."""
    known = [n.speed for n in nodes if n.speed and n.speed > 0]
    default = statistics.fmean(known) if known else 1.0
    return [n.speed if n.speed and n.speed > 0 else default for n in nodes]


def least_loaded(nodes: list[Node], rng: random.Random) -> Node:
    """Minimum expected latency of one more request: (outstanding + 1) / speed; ties broken at random."""
    scores = [(n.num_unfinished + 1) / s for n, s in zip(nodes, _speeds(nodes))]
    best = min(scores)
    return rng.choice([n for n, s in zip(nodes, scores) if s <= best * (1 + 1e-9)])


class RoutingStrategy:
    name = ""

    def __init__(self, rng: random.Random | None = None):
        self.rng = rng or random.Random()

    def select(self, nodes: list[Node], request: RouteRequest) -> Node:
        """Pick one of `nodes` (non-empty, all routable) for `request`."""
        raise NotImplementedError

    def on_routed(self, node: Node, request: RouteRequest) -> None:
        """Told which node got the request (after any failover)."""

    def forget_node(self, url: str) -> None:
        """Told that a node left the registry."""


class RandomStrategy(RoutingStrategy):
    name = "random"

    def select(self, nodes, request):
        return self.rng.choices(nodes, weights=_speeds(nodes), k=1)[0]


class MinExpectedLatency(RoutingStrategy):
    name = "min_expected_latency"

    def select(self, nodes, request):
        return least_loaded(nodes, self.rng)


class MinObservedLatency(RoutingStrategy):
    name = "min_observed_latency"

    def select(self, nodes, request):
        # NOTE: scaling by outstanding requests stops a burst from herding onto the node that was fastest
        # before the burst (latencies only update when requests finish). Unmeasured nodes score 0: tried first.
        scores = [(n.mean_latency or 0.0) * (n.num_unfinished + 1) for n in nodes]
        best = min(scores)
        return self.rng.choice([n for n, s in zip(nodes, scores) if s <= best * (1 + 1e-9)])


class PrefixAware(RoutingStrategy):
    """Route to the node that served the longest shared prompt prefix, within a load bound.

    `table` maps a chained block hash to the nodes that served a prompt containing that block prefix (and the
    time they did), oldest first; it is an approximation of the nodes' prefix caches, bounded as an LRU.
    """
    name = "prefix_aware"

    def __init__(self, block_chars: int = 128, max_chars: int = 8192, table_size: int = 100_000,
                 balance_factor: float = 1.5, min_match_chars: int = 256, rng: random.Random | None = None):
        super().__init__(rng)
        self.block_chars, self.max_chars, self.min_match_chars = block_chars, max_chars, min_match_chars
        self.table_size, self.balance_factor = table_size, balance_factor
        self.table: OrderedDict[int, dict[str, float]] = OrderedDict()
        self.num_prefix_routed = 0   # requests sent to a node holding part of their prefix
        self.num_load_spilled = 0    # requests whose prefix holder was over the load bound

    def matched_blocks(self, node_url: str, hashes: list[int]) -> int:
        num = 0
        for h in hashes:
            holders = self.table.get(h)
            if not holders or node_url not in holders:
                break
            num += 1
        return num

    def select(self, nodes, request):
        hashes = request.block_hashes(self.block_chars, self.max_chars)
        if not hashes:
            return least_loaded(nodes, self.rng)
        bound = self.balance_factor * max(statistics.fmean(n.num_unfinished for n in nodes), 1.0)
        matches = [(self.matched_blocks(n.url, hashes), n) for n in nodes]
        longest = max(m for m, _ in matches)
        # NOTE: a match must be worth it: at least min_match_chars or half the prompt. Otherwise a short common
        # opening ("system: You are a helpful...") would glue every request to one node.
        if longest == 0 or longest * self.block_chars < min(self.min_match_chars, len(hashes) * self.block_chars / 2):
            return least_loaded(nodes, self.rng)
        holders = [n for m, n in matches if m == longest and n.num_unfinished <= bound]
        if not holders:
            self.num_load_spilled += 1
            return least_loaded(nodes, self.rng)
        self.num_prefix_routed += 1
        return least_loaded(holders, self.rng)

    def on_routed(self, node, request):
        now = time.monotonic()
        for h in request.block_hashes(self.block_chars, self.max_chars):
            holders = self.table.get(h)
            if holders is None:
                holders = self.table[h] = {}
            else:
                self.table.move_to_end(h)
            holders[node.url] = now
        while len(self.table) > self.table_size:
            self.table.popitem(last=False)

    def forget_node(self, url):
        for h in [h for h, holders in self.table.items() if url in holders]:
            del self.table[h][url]
            if not self.table[h]:
                del self.table[h]


def make_strategy(name: str, config=None, rng: random.Random | None = None) -> RoutingStrategy:
    if name == "prefix_aware":
        if config is None:
            return PrefixAware(rng=rng)
        return PrefixAware(config.prefix_block_chars, config.prefix_max_chars, config.prefix_table_size,
                           config.balance_factor, config.prefix_min_match_chars, rng=rng)
    classes = {c.name: c for c in (RandomStrategy, MinExpectedLatency, MinObservedLatency)}
    if name not in classes:
        raise ValueError(f"strategy: unknown strategy {name!r}")
    return classes[name](rng)


# ---- session affinity -----------------------------------------------------------------------------------------
class SessionTable:
    """session_id -> node url, LRU-bounded. A pinned node that is down is replaced (and the pin moved)."""

    def __init__(self, max_sessions: int = 100_000):
        self.max_sessions = max_sessions
        self.pins: OrderedDict[int | str, str] = OrderedDict()

    def lookup(self, session_id) -> str | None:
        url = self.pins.get(session_id)
        if url is not None:
            self.pins.move_to_end(session_id)
        return url

    def pin(self, session_id, url: str) -> None:
        self.pins[session_id] = url
        self.pins.move_to_end(session_id)
        while len(self.pins) > self.max_sessions:
            self.pins.popitem(last=False)

    def forget_node(self, url: str) -> None:
        for sid in [s for s, u in self.pins.items() if u == url]:
            del self.pins[sid]
