"""/distserve/* (LMDeploy's prefill-decode disaggregation endpoints) and the DistServe side of chat/completions.

The connection handshake is LMDeploy's: the proxy reads both peers' `engine_info`, calls `p2p_initialize` on
each (which starts this engine's ZeroMQ KV server and returns its address and KV layout), then `p2p_connect` on
each with the other's answer. Block size and layout mismatches are refused there with a 400 naming the field.
`with_distserve` wraps a chat or completion handler: a `preserve_cache` request (prefill) answers with
`cache_block_ids`, `remote_token_ids` and its migration session as `id`; a `migration_request` (decode) pulls
the KV and decodes (engine/disagg.py).
"""
from __future__ import annotations

import asyncio
import json
from typing import Awaitable, Callable
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from lmserve.engine.disagg import CURRENT, DisaggEngine, Migration, PrefillJob
from lmserve.engine.kv_transfer import MigrationError
from lmserve.server.errors import APIError
from lmserve.server.protocol import (DistServeCacheFreeRequest, DistServeConnectionRequest,
                                     DistServeConnectionStatus, DistServeDropConnectionRequest,
                                     DistServeEngineConfig, DistServeEngineEndpointInfo, DistServeInitRequest,
                                     DistServeInitResponse, DistServeKVTransferEndpointInfo, MigrationProtocol)
from lmserve.server.state import ServerState


def get_state(request: Request) -> ServerState:
    return request.app.state.server


def _disagg(state: ServerState) -> DisaggEngine:
    return state.engine


def engine_config(state: ServerState) -> DistServeEngineConfig:
    eng = _disagg(state).engine
    return DistServeEngineConfig(tp_size=eng.config.tp, ep_size=1, dp_size=1, pp_size=1, dp_rank=0,
                                 block_size=eng.config.cache.block_size, num_cpu_blocks=0,
                                 num_gpu_blocks=eng.block_manager.num_usable_blocks)


def _check_tcp(protocol: MigrationProtocol, param: str = "protocol") -> None:
    if protocol != MigrationProtocol.TCP:
        raise APIError(400, f"only the TCP migration protocol ({int(MigrationProtocol.TCP)}) is served here, "
                            f"got {protocol.name}", param=param)


def distserve_router() -> APIRouter:
    router = APIRouter(tags=["DistServe"])

    @router.get("/distserve/engine_info")
    async def engine_info(state: ServerState = Depends(get_state)):
        """This engine's DistServeEngineConfig, as a JSON string (what LMDeploy's proxy parses)."""
        return JSONResponse(engine_config(state).model_dump_json())

    @router.post("/distserve/p2p_initialize")
    async def p2p_initialize(req: DistServeInitRequest, state: ServerState = Depends(get_state)):
        """Start this engine's KV server for the remote engine; answer its address and KV layout."""
        _check_tcp(req.protocol)
        mine = engine_config(state)
        if req.remote_engine_config.block_size != mine.block_size:
            raise APIError(400, f"block size mismatch: this engine uses {mine.block_size}-token KV blocks, the "
                                f"remote engine {req.remote_engine_config.block_size}",
                           param="remote_engine_config.block_size")
        if req.remote_engine_config.tp_size != mine.tp_size or mine.tp_size != 1:
            raise APIError(400, f"KV migration needs tp_size 1 on both engines (this: {mine.tp_size}, remote: "
                                f"{req.remote_engine_config.tp_size})", param="remote_engine_config.tp_size")
        engine = _disagg(state)
        engine.engine_id = req.local_engine_id
        host = _host_of(req.local_engine_id) or state.config.server_name
        address = engine.start_server(host)
        info = json.dumps({"address": address, **engine.layout})
        return JSONResponse(DistServeInitResponse(
            status=DistServeConnectionStatus.SUCCESS,
            engine_endpoint_info=DistServeEngineEndpointInfo(zmq_address=address),
            kvtransfer_endpoint_info=[DistServeKVTransferEndpointInfo(protocol=MigrationProtocol.TCP,
                                                                      endpoint_info=info)]).model_dump(mode="json"))

    @router.post("/distserve/p2p_connect")
    async def p2p_connect(req: DistServeConnectionRequest, state: ServerState = Depends(get_state)):
        """Record the remote engine's KV server; refuse a KV layout that differs from ours."""
        _check_tcp(req.protocol)
        tcp = [e for e in req.remote_kvtransfer_endpoint_info if e.protocol == MigrationProtocol.TCP]
        if not tcp:
            raise APIError(400, "no TCP endpoint among the remote engine's KV transfer endpoints",
                           param="remote_kvtransfer_endpoint_info")
        try:
            info = json.loads(tcp[0].endpoint_info)
            address = str(info["address"])
        except (ValueError, KeyError, TypeError):
            raise APIError(400, "endpoint_info must be the JSON object p2p_initialize answered (address and "
                                "KV layout)", param="remote_kvtransfer_endpoint_info") from None
        engine = _disagg(state)
        try:
            # NOTE: the decode side pulls, so it checks now that the prefill engine's KV server answers
            await asyncio.to_thread(engine.connect, req.remote_engine_id, address, info,
                             state.config.role == "decode")
        except MigrationError as e:
            raise APIError(e.status, str(e), param=e.param) from None
        return {"status": int(DistServeConnectionStatus.SUCCESS)}

    @router.post("/distserve/p2p_drop_connect")
    async def p2p_drop_connect(req: DistServeDropConnectionRequest, state: ServerState = Depends(get_state)):
        if not _disagg(state).drop(req.remote_engine_id):
            raise APIError(404, f"engine {req.remote_engine_id!r} is not connected to this one",
                           param="remote_engine_id")
        return {"success": True}

    @router.post("/distserve/free_cache")
    async def free_cache(req: DistServeCacheFreeRequest, state: ServerState = Depends(get_state)):
        """Free the KV blocks kept for a migration that will not come (the proxy's gc)."""
        engine = _disagg(state)
        known = {engine.engine_id, *engine.peers} - {None}
        if known and req.remote_engine_id not in known:
            raise APIError(404, f"unknown engine id {req.remote_engine_id!r}", param="remote_engine_id")
        if not await engine.free_cache(req.remote_session_id):
            raise APIError(404, f"no KV blocks are kept for session {req.remote_session_id}",
                           param="remote_session_id")
        return {"success": True}

    @router.get("/distserve/stats")
    async def stats(state: ServerState = Depends(get_state)):
        """Migration counters (ours, not LMDeploy's): sessions kept, migrations, bytes and seconds."""
        return _disagg(state).stats()

    return router


async def with_distserve(state: ServerState, req, handler: Callable[[], Awaitable[Response]]) -> Response:
    """Run a chat/completion handler with the request's DistServe role (prefill, decode or none)."""
    job = None
    if req.migration_request is not None:
        mig = req.migration_request
        _check_tcp(mig.protocol, "migration_request.protocol")
        if (getattr(req, "n", None) or 1) != 1:
            raise APIError(400, "n must be 1 with a migration_request", param="n")
        if getattr(req, "logprobs", None):
            raise APIError(400, "logprobs are not available with a migration_request (the first token was "
                                "sampled on the prefill engine)", param="logprobs")
        job = Migration(mig.remote_engine_id, mig.remote_session_id, mig.remote_token_id,
                        list(mig.remote_block_ids))
    elif req.preserve_cache:
        if req.stream:
            raise APIError(400, "a preserve_cache (prefill) request cannot stream", param="stream")
        if (getattr(req, "n", None) or 1) != 1:
            raise APIError(400, "n must be 1 with preserve_cache", param="n")
        if isinstance(getattr(req, "prompt", None), list) and req.prompt and not isinstance(req.prompt[0], int):
            raise APIError(400, "preserve_cache takes one prompt", param="prompt")
        job = PrefillJob()
    if job is None:
        return await handler()
    token = CURRENT.set(job)
    try:
        resp = await handler()
    except MigrationError as e:
        raise APIError(e.status, str(e), param=e.param) from None
    finally:
        CURRENT.reset(token)
    if isinstance(job, PrefillJob) and isinstance(resp, JSONResponse) and resp.status_code == 200:
        body = json.loads(resp.body)
        # NOTE: LMDeploy's proxy reads the migration session from `id` (an integer string)
        body.update(id=str(job.session_id), cache_session_id=job.session_id, cache_block_ids=job.block_ids,
                    remote_token_ids=job.token_ids)
        return JSONResponse(body)
    return resp


def _host_of(url: str) -> str | None:
    try:
        return urlsplit(url if "://" in url else f"http://{url}").hostname
    except ValueError:
        return None
