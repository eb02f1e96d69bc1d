"""LoRA adapters at the API edge: a request picks an adapter by `model` (or LMDeploy's `adapter_name`), each
adapter is a model in /v1/models (vLLM's card: `parent` = the base model, `root` = its path), and vLLM's
runtime endpoints POST /v1/load_lora_adapter {lora_name, lora_path} and /v1/unload_lora_adapter {lora_name}
(--enable-lora-runtime-updates; admin endpoints, server/auth.py).

The adapter a request named travels in a context variable from the model check to `open_generation`, which puts
it on the request's SamplingParams: every generation endpoint checks `model` first, so none needs its own code.
Unloading an adapter that requests still use is not refused: new requests get 404 at once, and the ones already
admitted finish with it (they hold its weights, freed when the last one ends).
"""
from __future__ import annotations

import asyncio
import contextvars
from typing import TYPE_CHECKING

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import PlainTextResponse

from lmserve.server.errors import APIError
from lmserve.server.protocol import ModelCard, ModelPermission

if TYPE_CHECKING:
    from lmserve.server.state import ServerState

_request_lora: contextvars.ContextVar = contextvars.ContextVar("lmserve_request_lora", default=None)


def lora_manager(state: ServerState):
    """The engine's LoraManager (engine/lora_manager.py), or None when the server serves no adapters."""
    engine = state.engine
    runner = getattr(engine, "runner", None) or getattr(getattr(engine, "engine", None), "runner", None)
    return getattr(runner, "lora", None)


def select_model(state: ServerState, name: str) -> bool:
    """True when `name` is the base model or a loaded adapter; the adapter (or None) is then this request's."""
    if name == state.base_model_name:
        _request_lora.set(None)
        return True
    manager = lora_manager(state)
    lora = manager.get(name) if manager is not None else None
    if lora is not None:
        _request_lora.set(lora)
    return lora is not None


def request_lora():
    """The LoraRequest the current request's `model` named (None: the base model)."""
    return _request_lora.get()


def served_names(state: ServerState) -> list[str]:
    manager = lora_manager(state)
    return [state.base_model_name] + (sorted(manager.adapters) if manager is not None else [])


def adapter_cards(state: ServerState) -> list[ModelCard]:
    manager = lora_manager(state)
    if manager is None:
        return []
    return [ModelCard(id=lora.name, created=state.created, root=lora.path,
                      parent=lora.base_model_name or state.base_model_name, max_model_len=state.max_model_len,
                      permission=[ModelPermission()]) for lora in list(manager.adapters.values())]


def _get_state(request: Request):
    return request.app.state.server


def _runtime_manager(state: ServerState):
    manager = lora_manager(state)
    if manager is None or not manager.config.runtime_updates:
        raise APIError(404, "runtime LoRA updates are off: start the server with --enable-lora-runtime-updates "
                            "(or VLLM_ALLOW_RUNTIME_LORA_UPDATING=1)", code="lora_runtime_updates_disabled")
    return manager


def _field(body, name: str) -> str:
    value = body.get(name) if isinstance(body, dict) else None
    if not isinstance(value, str) or not value.strip():
        raise APIError(400, f"{name} must be a non-empty string", param=name)
    return value


def lora_router() -> APIRouter:
    router = APIRouter(tags=["LoRA"])

    @router.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
    async def load_lora_adapter(body: dict = Body(...), state=Depends(_get_state)):
        """Load a peft adapter (adapter_config.json + adapter_model.safetensors) as a new model name."""
        manager = _runtime_manager(state)
        name, path = _field(body, "lora_name"), _field(body, "lora_path")
        if name == state.base_model_name or manager.get(name) is not None:
            raise APIError(400, f"The lora adapter '{name}' has already been loaded.", param="lora_name")
        try:
            await asyncio.to_thread(manager.load, name, path, body.get("base_model_name"))
        except KeyError:
            raise APIError(400, f"The lora adapter '{name}' has already been loaded.", param="lora_name") from None
        except ValueError as e:       # LoraError: missing files, rank over the limit, shapes, --max-loras
            raise APIError(400, str(e), param="lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
    async def unload_lora_adapter(body: dict = Body(...), state=Depends(_get_state)):
        """Remove an adapter's name; requests already using it finish with it."""
        manager = _runtime_manager(state)
        name = _field(body, "lora_name")
        if manager.unload(name) is None:
            raise APIError(404, f"The lora adapter '{name}' cannot be found.", param="lora_name",
                           code="model_not_found")
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    return router
