"""Control endpoints: runtime stats (MLC style), sleep/wakeup, live weight updates and terminate.

/update_weights payload: `serialized_named_tensors` is base64 of a safetensors file (`load_format`
"safetensors", the default) or of `torch.save({name: tensor})` bytes (`load_format` "torch", loaded with
weights_only=True). Names are Hugging Face parameter names (model.layers.0.self_attn.q_proj.weight, ...). A list
of such strings is applied as one update; a dict maps each name to a blob holding that one tensor. Every call is
applied at once: `finished` is accepted for LMDeploy compatibility and changes nothing. This is the only place
the API layer touches tensors.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import logging
import os
import signal
import time
from typing import Any

from lmserve.server.errors import APIError, not_supported
from lmserve.server.protocol import UpdateParamsRequest
from lmserve.server.state import ServerState

logger = logging.getLogger(__name__)


def _load_blob(blob: str, load_format: str) -> dict[str, Any]:
    try:
        data = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise APIError(400, f"serialized_named_tensors is not valid base64: {exc}",
                       param="serialized_named_tensors") from exc
    try:
        if load_format == "safetensors":
            from safetensors.torch import load
            return dict(load(data))
        import torch
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:     # noqa: BLE001 - any decoding failure is the client's payload
        raise APIError(400, f"cannot decode serialized_named_tensors as {load_format}: {exc}",
                       param="serialized_named_tensors") from exc
    if not isinstance(obj, dict):
        raise APIError(400, "a torch payload must be a dict of name -> tensor", param="serialized_named_tensors")
    for name, value in obj.items():
        # NOTE: weights_only still admits ints, strings, lists and nested dicts; only tensors may reach the model
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise APIError(400, f"a torch payload must map names (strings) to tensors; {name!r} holds a "
                                f"{type(value).__name__}", param="serialized_named_tensors")
    return obj


def decode_named_tensors(req: UpdateParamsRequest) -> dict[str, Any]:
    load_format = req.load_format or "safetensors"
    if load_format not in ("safetensors", "torch"):
        raise not_supported("load_format", f"load_format {load_format!r} (use 'safetensors' or 'torch')")
    payload = req.serialized_named_tensors
    named: dict[str, Any] = {}
    if isinstance(payload, dict):
        for name, blob in payload.items():
            tensors = _load_blob(str(blob), load_format)
            if len(tensors) != 1:
                raise APIError(400, f"the blob for {name!r} must hold exactly one tensor",
                               param="serialized_named_tensors")
            named[name] = next(iter(tensors.values()))
    else:
        for blob in [payload] if isinstance(payload, str) else payload:
            named.update(_load_blob(blob, load_format))
    if not named:
        raise APIError(400, "no tensors in serialized_named_tensors", param="serialized_named_tensors")
    return named


async def update_weights(state: ServerState, req: UpdateParamsRequest) -> dict:
    if state.engine.weights_released:
        raise APIError(409, "the weights were released by POST /sleep?level=2; POST /wakeup before "
                            "/update_weights (or sleep with level=1, which keeps them)", code="weights_released")
    named = await asyncio.to_thread(decode_named_tensors, req)
    try:
        await state.engine.update_weights(named)
    except (KeyError, ValueError, TypeError, RuntimeError, AttributeError, IndexError) as exc:
        raise APIError(400, f"cannot update the weights: {exc}", param="serialized_named_tensors") from exc
    return {"status": "success", "num_tensors": len(named)}


async def sleep(state: ServerState, level: int) -> dict:
    if level not in (1, 2):
        raise APIError(400, "level must be 1 (free the KV cache) or 2 (also the weights)", param="level")
    num_aborted = await state.abort_all()    # NOTE: requests in flight cannot outlive their KV cache
    await state.sessions.end_all()
    await state.engine.sleep(level)
    return {"status": "success", "level": level, "num_aborted": num_aborted}


async def wakeup(state: ServerState) -> dict:
    await state.engine.wakeup()
    return {"status": "success"}


def stats(state: ServerState) -> str:
    s = state.engine.get_stats()
    return f"prefill: {s.prefill_throughput:.1f} tok/s, decode: {s.decode_throughput:.1f} tok/s, " \
        f"tp: {state.engine.config.tp}"


def verbose_stats(state: ServerState) -> dict:
    s = state.engine.get_stats()
    return {
        "prefill_throughput": s.prefill_throughput,       # tokens/s, recent window
        "decode_throughput": s.decode_throughput,
        "num_prompt_tokens_total": s.num_prompt_tokens_total,
        "num_generation_tokens_total": s.num_generation_tokens_total,
        "num_running": s.num_running,
        "num_waiting": s.num_waiting,
        "running_by_priority": {str(k): v for k, v in sorted(s.running_by_priority.items())},
        "waiting_by_priority": {str(k): v for k, v in sorted(s.waiting_by_priority.items())},
        "kv_cache_usage": s.kv_cache_usage,
        "num_total_blocks": s.num_total_blocks,
        "num_free_blocks": s.num_free_blocks,
        "prefix_cache_queries": s.prefix_cache_queries,
        "prefix_cache_hits": s.prefix_cache_hits,
        "prefix_cache_hit_rate": s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0,
        "num_preemptions_total": s.num_preemptions_total,
        "num_sessions": len(state.sessions),
        "api_requests_in_flight": state.admission.num_running,
        "api_requests_queued": state.admission.num_queued,
        "uptime_s": time.monotonic() - state.start_time,
        "tp": state.engine.config.tp,                     # tensor-parallel ranks
    }


def terminate(state: ServerState) -> dict:
    """Stop admitting generation requests, let those admitted (running or queued) finish, then exit."""
    if not state.allow_terminate:
        raise APIError(403, "this server cannot be terminated by a client; start it with "
                            "--allow-terminate-by-client", code="terminate_not_allowed")
    if not state.is_terminating:
        state.is_terminating = True
        task = asyncio.ensure_future(_exit_when_idle(state))
        state.background_tasks.add(task)
        task.add_done_callback(state.background_tasks.discard)
    return {"status": "success"}


async def _exit_when_idle(state: ServerState) -> None:
    # NOTE: a prefill server (engine/disagg.py) also waits for its kept KV sessions to be pulled or to expire:
    # a decode server may be pulling one right now
    while state.admission.num_running or state.admission.num_queued or \
            getattr(state.engine, "num_pinned_sessions", 0):
        await asyncio.sleep(0.05)
    logger.info("terminate: in-flight requests finished; shutting down")
    if state.request_shutdown is not None:
        state.request_shutdown()
    else:
        with contextlib.suppress(ProcessLookupError):
            os.kill(os.getpid(), signal.SIGTERM)
