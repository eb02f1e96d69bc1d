"""The proxy's DistServe mode (`--serving-strategy DistServe`, LMDeploy's flag): prefill on one node, decode on
another, the KV cache migrated between them by the nodes themselves (server/serving_distserve.py).

Lifecycle of one chat/completion request:
  1. Pick a prefill node (role 2 from /nodes/add) and a decode node (role 3), each the least loaded. With no
     routable prefill or decode node the request takes the hybrid path (every lmserve engine can serve whole).
  2. Send the prefill node the request with `max_tokens=1`, `stream=false`, `with_cache`, `preserve_cache`; its
     answer names the migration session (`id`), the kept blocks (`cache_block_ids`) and the first token
     (`remote_token_ids`). A prefill node that fails is left and the next one tried.
  3. Connect the pair on first use (`engine_info`, `p2p_initialize` and `p2p_connect` on both, once per pair).
  4. Send the decode node the original request plus `migration_request`; stream or not, it is relayed as the
     hybrid forwarder relays. A decode node that fails before its first byte is left and the next one tried
     (the prefill node keeps the blocks until pulled); when none can, `free_cache` on the prefill node and 503.
The proxy never touches the KV cache and never imports torch.
"""
from __future__ import annotations

import asyncio
import json
import logging

import httpx
from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from lmserve.proxy.forward import Failure, Forwarder, json_body, node_request_headers
from lmserve.proxy.nodes import Node, NodeRegistry
from lmserve.server.errors import APIError

logger = logging.getLogger("lmserve.proxy")

DISTSERVE_PATHS = ("/v1/chat/completions", "/v1/completions")
HYBRID, PREFILL, DECODE = 1, 2, 3       # LMDeploy's EngineRole
TCP = 1                                 # LMDeploy's MigrationProtocol.TCP


class PairError(RuntimeError):
    pass


def _node_headers(registry: NodeRegistry, url: str) -> dict:
    """The node's own key (from /nodes/add), never a client's."""
    node = registry.get(url)
    return node.headers if node is not None else {}


class PDConnections:
    """(prefill url, decode url) pairs connected for migration; set up lazily, once per pair."""

    def __init__(self, client: httpx.AsyncClient, registry: NodeRegistry):
        self.client, self.registry = client, registry
        self.connected: set[tuple[str, str]] = set()
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def forget(self, url: str) -> None:
        self.connected = {pair for pair in self.connected if url not in pair}

    async def ensure(self, p_url: str, d_url: str) -> None:
        pair = (p_url, d_url)
        if pair in self.connected:
            return
        async with self._locks.setdefault(pair, asyncio.Lock()):
            if pair in self.connected:
                return
            p_cfg, d_cfg = await asyncio.gather(self._engine_info(p_url), self._engine_info(d_url))
            p_init = await self._post(p_url, "/distserve/p2p_initialize", {
                "local_engine_id": p_url, "local_engine_config": p_cfg, "remote_engine_id": d_url,
                "remote_engine_config": d_cfg, "protocol": TCP})
            d_init = await self._post(d_url, "/distserve/p2p_initialize", {
                "local_engine_id": d_url, "local_engine_config": d_cfg, "remote_engine_id": p_url,
                "remote_engine_config": p_cfg, "protocol": TCP})
            for url, remote, init in ((p_url, d_url, d_init), (d_url, p_url, p_init)):
                await self._post(url, "/distserve/p2p_connect", {
                    "protocol": TCP, "remote_engine_id": remote,
                    "remote_engine_endpoint_info": init["engine_endpoint_info"],
                    "remote_kvtransfer_endpoint_info": init["kvtransfer_endpoint_info"]})
            self.connected.add(pair)
            logger.info("DistServe pair connected: prefill %s -> decode %s", p_url, d_url)

    async def _engine_info(self, url: str) -> dict:
        try:
            r = await self.client.get(f"{url}/distserve/engine_info", headers=_node_headers(self.registry, url))
        except httpx.HTTPError as e:
            raise PairError(f"{url}/distserve/engine_info: {type(e).__name__}: {e}") from None
        if r.status_code != 200:
            raise PairError(f"{url}/distserve/engine_info answered {r.status_code}")
        info = r.json()
        return json.loads(info) if isinstance(info, str) else info   # LMDeploy answers a JSON string

    async def _post(self, url: str, path: str, body: dict) -> dict:
        try:
            r = await self.client.post(url + path, json=body, headers=_node_headers(self.registry, url))
        except httpx.HTTPError as e:
            raise PairError(f"{url}{path}: {type(e).__name__}: {e}") from None
        if r.status_code != 200:
            raise PairError(f"{url}{path} answered {r.status_code}: {r.text[:300]}")
        return r.json()


class DistServe:
    def __init__(self, registry: NodeRegistry, forwarder: Forwarder, client: httpx.AsyncClient,
                 max_retries: int = 2):
        self.registry, self.forwarder, self.client = registry, forwarder, client
        self.max_retries = max_retries
        self.pairs = PDConnections(client, registry)
        registry.removal_listeners.append(self.pairs.forget)
        # sessions whose blocks wait on a prefill node for a decode node: freed by /distserve/gc
        self.shelf: dict[tuple[str, str], set[int]] = {}
        self.num_disaggregated = 0
        self.num_hybrid_fallbacks = 0

    def _by_role(self, model: str | None, role: int) -> list[Node]:
        nodes = [n for n in self.registry.candidates(model) if n.role == role]
        return sorted(nodes, key=lambda n: n.num_unfinished)[:self.max_retries + 1]

    async def forward(self, path: str, request: Request) -> Response:
        if path not in DISTSERVE_PATHS:
            return await self.forwarder.forward(path, request)
        raw = await request.body()
        body = json_body(raw)
        model = body.get("model")
        prefills, decodes = self._by_role(model, PREFILL), self._by_role(model, DECODE)
        whole = body.get("session_id") not in (None, -1) or (body.get("n") or 1) != 1 or body.get("logprobs")
        if not prefills or not decodes or whole:
            # NOTE: sessions keep their history on one node, and the first token's logprobs stay on the prefill
            # node; these, and a topology without both roles, are served whole
            self.num_hybrid_fallbacks += 1
            return await self.forwarder.forward(path, request)
        headers = node_request_headers(request)
        prefill_node, info = await self._prefill(prefills, path, body, headers)
        if isinstance(info, Response):
            return info        # the prefill node refused the request (bad input): its answer goes back
        session = int(info.get("cache_session_id", info.get("id")))
        migration = {"protocol": TCP, "remote_engine_id": prefill_node.url, "remote_session_id": session,
                     "remote_block_ids": info.get("cache_block_ids") or [],
                     "remote_token_id": (info.get("remote_token_ids") or [0])[-1]}
        decode_raw = json.dumps({**body, "migration_request": migration}).encode()
        last_error = ""
        for node in decodes:
            pair = (prefill_node.url, node.url)
            try:
                await self.pairs.ensure(*pair)
            except PairError as e:
                last_error = str(e)
                logger.warning("cannot connect %s -> %s: %s", *pair, e)
                continue
            self.shelf.setdefault(pair, set()).add(session)
            result = await self.forwarder._send(node, path, decode_raw, headers)
            self.shelf[pair].discard(session)
            if isinstance(result, Failure):
                last_error = result.message
                self.pairs.forget(node.url)
                continue
            if result.status_code >= 400:
                await self.free_cache(prefill_node.url, session)
            self.num_disaggregated += 1
            return result
        await self.free_cache(prefill_node.url, session)
        raise APIError(503, f"No decode node could take the request; last error: {last_error}",
                       code="no_available_node")

    async def _prefill(self, nodes: list[Node], path: str, body: dict, headers: dict):
        prefill = {**body, "stream": False, "with_cache": True, "preserve_cache": True, "max_tokens": 1}
        prefill.pop("stream_options", None)
        if "max_completion_tokens" in prefill:
            prefill["max_completion_tokens"] = 1
        last_error = ""
        for node in nodes:
            node.num_unfinished += 1
            try:
                r = await self.client.post(node.url + path, json=prefill, headers={**headers, **node.headers})
            except httpx.HTTPError as e:
                last_error = f"{node.url}: {type(e).__name__}: {e}"
                node.mark_failed(f"request: {type(e).__name__}: {e}")
                continue
            finally:
                node.num_unfinished -= 1
            if r.status_code == 200:
                node.num_served += 1
                return node, r.json()
            if r.status_code < 500 and r.status_code != 429:
                return node, Response(r.content, status_code=r.status_code,
                                      media_type=r.headers.get("content-type"))
            last_error = f"{node.url} answered {r.status_code}"
        raise APIError(503, f"No prefill node could take the request; last error: {last_error}",
                       code="no_available_node")

    async def free_cache(self, p_url: str, session: int) -> bool:
        try:
            r = await self.client.post(f"{p_url}/distserve/free_cache", headers=_node_headers(self.registry, p_url),
                                       json={"remote_engine_id": p_url, "remote_session_id": session})
            return r.status_code == 200
        except httpx.HTTPError:
            return False

    async def warmup(self) -> dict:
        prefills = [n for n in self.registry.candidates(None) if n.role == PREFILL]
        decodes = [n for n in self.registry.candidates(None) if n.role == DECODE]
        connected, failed = [], {}
        for p in prefills:
            for d in decodes:
                try:
                    await self.pairs.ensure(p.url, d.url)
                    connected.append([p.url, d.url])
                except PairError as e:
                    failed[f"{p.url} -> {d.url}"] = str(e)
        return {"connected": connected, "failed": failed}

    async def gc(self) -> dict:
        num = 0
        for (p_url, _), sessions in list(self.shelf.items()):
            for session in list(sessions):
                num += await self.free_cache(p_url, session)
            sessions.clear()
        return {"num_freed": num}


def distserve_router() -> APIRouter:
    router = APIRouter()

    @router.post("/distserve/connection_warmup")
    async def connection_warmup(request: Request):
        """Connect every prefill/decode pair now rather than at each pair's first request."""
        return JSONResponse(await request.app.state.distserve.warmup())

    @router.post("/distserve/gc")
    async def gc(request: Request):
        """Free the KV blocks prefill nodes keep for migrations still waiting on a decode node."""
        return JSONResponse(await request.app.state.distserve.gc())

    return router
