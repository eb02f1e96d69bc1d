"""ServerState: everything a request handler needs, kept on `app.state.server` (no module-level globals).

Its one job is the bridge to the engine: `open_generation` starts an engine request, surfaces the engine's
refusals (its one input check, a sleeping engine) as HTTP errors before any response byte is sent, keeps the
request registered as in flight (for /abort_request and for the disconnect clean-up) and records the Prometheus
metrics when it ends; `pool` does the same for embeddings and scores. Admission lives in admission.py, the body
reading in request_body.py, the per-request bounds in limits.py.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from fastapi import Request

from lmserve.config import ServerConfig
from lmserve.engine.async_engine import AsyncEngine, EngineDeadError, EngineSleepingError
from lmserve.engine.fault import RequestFailedError
from lmserve.outputs import InvalidRequestError, RequestOutput
from lmserve.sampling_params import SamplingParams, SamplingParamsError
from lmserve.server.admission import Admission
from lmserve.server.errors import APIError
from lmserve.server.limits import check_text
from lmserve.server.metrics import ServerMetrics
from lmserve.server.reasoning_parsers import get_reasoning_parser
from lmserve.server.responses_store import ResponsesStore
from lmserve.server.serving_lora import request_lora, select_model, served_names
from lmserve.server.sessions import SessionManager
from lmserve.server.tool_parsers import get_tool_parser, pick_tool_parser

logger = logging.getLogger(__name__)

OFFLOAD_CHARS = 16_384     # texts at least this long are tokenized in a worker thread


class ServerState:
    def __init__(self, engine: AsyncEngine, config: ServerConfig, *, allow_terminate: bool = False):
        self.engine = engine
        self.config = config
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.generation_defaults = engine.generation_defaults    # --generation-config; request fields win
        self.base_model_name = config.model_name or _default_model_name(engine.model_path)
        self.created = int(time.time())
        self.start_time = time.monotonic()
        self.allow_terminate = allow_terminate
        self.admission = Admission(config.max_concurrent_requests, config.max_queued_requests)
        self.sessions = SessionManager(engine)
        self.responses = ResponsesStore(config.responses_store_size)   # /v1/responses with store=true
        self.inflight: dict[str, int | None] = {}     # request_id -> session_id (None: no session)
        self.metrics = ServerMetrics(engine, lambda: (self.admission.num_running, self.admission.num_queued,
                                                      len(self.sessions)))
        self.is_terminating = False
        self.request_shutdown = None                   # set by launch.py: asks uvicorn to exit gracefully
        self.background_tasks: set[asyncio.Task] = set()
        self._session_ids = itertools.count(1 << 40)   # server-assigned ids, far above what clients pick
        self._token_str = lru_cache(maxsize=1 << 16)(self._decode_token)
        self.tool_parser = get_tool_parser(config.tool_call_parser or pick_tool_parser(self.tokenizer.chat_template))
        self.reasoning_parser = get_reasoning_parser(config.reasoning_parser) if config.reasoning_parser else None

    @property
    def model_name(self) -> str:
        """The name responses carry: the LoRA adapter this request's `model` named (as vLLM echoes it), else the
        base model's."""
        lora = request_lora()
        return self.base_model_name if lora is None else lora.name

    # ---- checks --------------------------------------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name is not None:
            check_text(name, "model")
        if name is not None and not select_model(self, name):     # the base model or a LoRA adapter
            raise APIError(404, f"The model '{name}' does not exist; this server serves "
                                f"{', '.join(repr(n) for n in served_names(self))}", param="model",
                           code="model_not_found")

    def check_available(self) -> None:
        # NOTE: no check for is_terminating here: the middleware refuses new arrivals, while requests admitted
        # (or queued) before /terminate must still be served. A sleeping engine refuses new work itself
        # (AsyncEngine._check_accepting -> EngineSleepingError -> 503 `sleeping`, engine_error below).
        if not self.engine.is_healthy:
            raise APIError(503, "the engine is unhealthy", code="engine_unhealthy")

    def new_session_id(self) -> int:
        return next(self._session_ids)

    # ---- tokens --------------------------------------------------------------------------------------------
    def _decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def token_str(self, token_id: int) -> str:
        return self._token_str(int(token_id))

    async def encode(self, text: str, param: str, add_special_tokens: bool = True, *, checked: bool = False
                     ) -> list[int]:
        """Client text -> token ids. Refused before tokenizing when it cannot be text or cannot fit the session
        (unless the caller ran check_text_fits already); a long text is tokenized off the event loop (the fast
        tokenizer releases the GIL), so one big prompt does not stall every other client."""
        if not checked:
            self.check_text_fits(text, param)
        if len(text) < OFFLOAD_CHARS:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens)

    def check_text_fits(self, text: str, param: str) -> None:
        check_text(text, param)
        if len(text) > self.max_model_len * self.tokenizer.max_token_chars:
            raise APIError(400, f"{param} has {len(text)} characters, more than any text that fits the session "
                                f"length of {self.max_model_len} tokens (--session-len)", param=param,
                           code="context_length_exceeded")

    def clip_max_tokens(self, max_tokens: int | None, num_prompt_tokens: int) -> int:
        """Output budget: what was asked, at most what is left of the session length.
        NOTE: at least 1: a prompt with no room left is the engine's check to refuse (engine/request_checks.py)."""
        room = max(1, self.max_model_len - num_prompt_tokens)
        return room if max_tokens is None else min(max_tokens, room)

    # ---- generation ----------------------------------------------------------------------------------------
    async def open_generation(self, request: Request | None, request_id: str, prompt_token_ids: list[int],
                              params: SamplingParams, *, session_id: int | None = None,
                              abort_key: int | None = None, prompt_param: str = "prompt",
                              images: list | None = None, prompt_text: str | None = None
                              ) -> AsyncIterator[RequestOutput]:
        """Start an engine request and wait for its first output, so that bad input is an HTTP error rather than
        a broken stream. Returns an iterator over all outputs (the first included). With `images`, `prompt_text`
        is what the engine gets (`prompt_token_ids` still sized the request).

        `session_id` pins the request's KV blocks for the session in the engine; `abort_key` (default: the
        session id) is the id POST /abort_request {"session_id": ...} finds it by."""
        params.lora = request_lora()      # the adapter this request's `model` named (server/serving_lora.py)
        # NOTE: with images the engine gets the prompt text (its processor expands each image placeholder into the
        # image's tokens); `images` only when there are some, so a text-only engine is called as before
        prompt, extra = (prompt_text, {"images": images}) if images else (prompt_token_ids, {})
        stream = self.engine.generate(request_id, prompt, params, session_id=session_id, **extra)
        self.inflight[request_id] = session_id if session_id is not None else abort_key
        self.register(request, request_id)
        try:
            # NOTE: a client that leaves while the request is queued or prefilling aborts it then, not at the
            # first token
            first = await (stream.__anext__() if request is None else
                           run_until_disconnect(request, stream.__anext__()))
        except SamplingParamsError:
            self.inflight.pop(request_id, None)
            raise
        except StopAsyncIteration:
            self.inflight.pop(request_id, None)
            raise APIError(500, "the engine ended the request without output")
        except InvalidRequestError as exc:      # the engine's input checks (engine/request_checks.py)
            self.inflight.pop(request_id, None)
            param = prompt_param if exc.param in ("prompt", "input") else exc.param
            raise APIError(400, str(exc), param=param, code=exc.code) from exc
        except ValueError as exc:       # a duplicate request id
            self.inflight.pop(request_id, None)
            raise APIError(400, str(exc), param=prompt_param) from exc
        except EngineDeadError as exc:  # asleep, or died
            self.inflight.pop(request_id, None)
            raise engine_error(exc) from exc
        except RequestFailedError as exc:   # the engine isolated this request after an internal error
            self.inflight.pop(request_id, None)
            self.metrics.observe_aborted()
            raise APIError(500, str(exc), code="engine_fault") from exc
        except BaseException:           # the client left (APIError 499) or the task was cancelled
            self.inflight.pop(request_id, None)
            self.metrics.observe_aborted()
            await stream.aclose()
            raise
        return self._follow(request_id, stream, first)

    async def _follow(self, request_id: str, stream, first: RequestOutput) -> AsyncIterator[RequestOutput]:
        out = first
        try:
            yield out
            while not out.finished:
                try:
                    out = await stream.__anext__()
                except EngineDeadError as exc:
                    raise engine_error(exc) from exc
                except RequestFailedError as exc:
                    raise APIError(500, str(exc), code="engine_fault") from exc
                yield out
        finally:
            self.inflight.pop(request_id, None)
            if out.finished:
                self.metrics.observe_finished(out)
            else:
                # NOTE: closing the engine's iterator aborts the request and frees its KV blocks; the explicit
                # abort covers an engine that has not noticed yet.
                self.metrics.observe_aborted()
                with contextlib.suppress(Exception):
                    await stream.aclose()
                with contextlib.suppress(Exception):
                    await self.engine.abort(request_id)

    async def pool(self, request: Request, inputs: list[list[int]], params: list[str]) -> list[list[float]]:
        """Pooling outputs (embeddings, scores) for `inputs`, which the engine checks (all before any is queued);
        params[i] names input i in errors."""
        try:
            return await run_until_disconnect(request, self.engine.encode_all(inputs))
        except InvalidRequestError as exc:
            raise APIError(400, str(exc), param=params[getattr(exc, "index", 0)], code=exc.code) from exc
        except EngineDeadError as exc:
            raise engine_error(exc) from exc

    @staticmethod
    def register(request: Request | None, request_id: str) -> None:
        """Tie an engine request to the HTTP request, so `end_http_request` can clean up after it."""
        ids = getattr(request.state, "lmserve_request_ids", None) if request is not None else None
        if ids is not None:
            ids.append(request_id)

    async def abort_leftovers(self, request_ids: list[str]) -> None:
        """Anything in `request_ids` still in flight and not being consumed is aborted."""
        for rid in request_ids:
            if self.inflight.pop(rid, "gone") != "gone":
                with contextlib.suppress(Exception):
                    await self.engine.abort(rid)

    async def end_http_request(self, request_ids: list[str]) -> None:
        """Called by the middleware when an HTTP request has ended, however it ended (a client that went away
        before its stream started included): abort what it left running and free the sessions it held."""
        await self.abort_leftovers(request_ids)
        for rid in request_ids:
            self.sessions.release_request(rid)

    async def abort_session(self, session_id: int) -> int:
        rids = [rid for rid, sid in self.inflight.items() if sid == session_id]
        return sum([bool(await self.engine.abort(rid)) for rid in rids])

    async def abort_all(self) -> int:
        return sum([bool(await self.engine.abort(rid)) for rid in list(self.inflight)])


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_until_disconnect(request: Request, coro) -> Any:
    """Run `coro` (which consumes engine outputs) unless the client goes away first; then cancel it, which
    aborts the engine requests it was reading."""
    task = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise APIError(499, "client disconnected", code="client_disconnected")


def engine_error(exc: EngineDeadError) -> APIError:
    if isinstance(exc, EngineSleepingError):
        return APIError(503, str(exc), code="sleeping")
    return APIError(503, str(exc), code="engine_unavailable")


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _default_model_name(model_path: str | None) -> str:
    if not model_path:
        return "lmserve-model"
    p = Path(model_path)
    return p.stem if p.suffix == ".gguf" else p.name
