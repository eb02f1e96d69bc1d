"""AsyncEngine: runs LLMEngine.step() in a background thread; the asyncio side only queues commands and
reads per-request results. Model work never runs on the event loop.

Outputs are cumulative, so each request keeps only its latest output: a slow consumer skips intermediate
ones instead of building a backlog.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import dataclasses
import itertools
import logging
import queue
import threading
import time
from typing import AsyncIterator, Callable

import torch

from lmserve.config import EngineConfig
from lmserve.engine.cpu_threads import ThreadGovernor
from lmserve.engine.fault import RequestFailedError, recover
from lmserve.engine.llm_engine import EngineStats, LLMEngine
from lmserve.engine.mm_inputs import process_images
from lmserve.engine.weights import memory_stats
from lmserve.outputs import EmbeddingOutput, InvalidRequestError, RequestOutput
from lmserve.sampling_params import SamplingParams
from lmserve.startup import trim_heap

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    pass


class EngineSleepingError(EngineDeadError):
    """New work while the engine sleeps (/sleep): refused here, the one place it is checked; the server answers
    503 `sleeping`."""


def _release_openmp_pool() -> None:
    """Free the calling thread's OpenMP worker pool (built while the model loaded).

    NOTE: libgomp throttles its spin-waiting once it manages more threads than there are CPUs. A second pool
    (the engine thread's) next to the loader's idle one crosses that line on small machines, and every parallel
    region then pays a futex wake-up: single-stream decode ran at half the speed of the same loop on the main
    thread (docs/benchmarks.md). Model work happens on the engine thread only after this."""
    try:
        ctypes.CDLL("libgomp.so.1").omp_pause_resource_all(2)     # omp_pause_hard
    except (OSError, AttributeError):
        pass   # another OpenMP runtime, or none: nothing to release


class _Stream:
    __slots__ = ("latest", "event", "finished")

    def __init__(self):
        self.latest = None
        self.event = asyncio.Event()
        self.finished = False

    def put(self, item) -> None:
        self.latest = item
        self.event.set()


def _engine_attribute(name: str) -> property:
    """Read through to the LLMEngine (never a copy that could go stale)."""
    return property(lambda self: getattr(self.engine, name))


class AsyncEngine:
    config = _engine_attribute("config")
    tokenizer = _engine_attribute("tokenizer")
    model_path = _engine_attribute("model_path")
    max_model_len = _engine_attribute("max_model_len")
    generation_defaults = _engine_attribute("generation_defaults")
    vocab_size = _engine_attribute("vocab_size")
    task = _engine_attribute("task")
    embedding_dimensions = _engine_attribute("embedding_dimensions")
    embedding_size = _engine_attribute("embedding_size")

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.is_sleeping = False
        self._streams: dict[str, _Stream] = {}
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        self._stopping = False
        self._restarting = False
        self._restart_times: list[float] = []
        self._ids = itertools.count()
        self._stats = engine.get_stats(memory=False)
        engine.executor.on_failure = self._on_executor_failure

    @classmethod
    def from_config(cls, config: EngineConfig | None = None) -> "AsyncEngine":
        return cls(LLMEngine(config or EngineConfig()))

    # ---- lifecycle ----------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        _release_openmp_pool()
        self._thread = threading.Thread(target=self._run, name="lmserve-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        self._stopping = True
        self._commands.put(("wake",))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
        await asyncio.to_thread(self.engine.shutdown)      # stops tensor-parallel workers

    @property
    def is_healthy(self) -> bool:
        return self._error is None and self.engine.executor.error is None and not self._restarting and \
            (self._thread is None or self._thread.is_alive())

    def _on_executor_failure(self, message: str) -> None:
        """A tensor-parallel rank died (called from the executor's watchdog thread): fail everything in flight
        now, even if the engine thread is still blocked in a collective."""
        self._error = self._error or RuntimeError(message)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._fail_all, EngineDeadError(f"engine error: {message}"))

    # ---- requests -----------------------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams, *,
                       session_id: int | None = None, images: list | None = None) -> AsyncIterator[RequestOutput]:
        """images: decoded PIL images (RGB) in prompt order; the prompt holds engine.image_placeholder per image."""
        self._check_accepting()
        # NOTE: the one input check (engine/request_checks.py), on the caller's thread; the engine thread trusts it
        # NOTE: the HF processor resizes and normalises: off the event loop and off the engine thread
        mm = await asyncio.to_thread(process_images, self.engine.images, prompt, images) \
            if images or self.engine.images is not None else None
        prompt_ids = self.engine.check_request(prompt if mm is None else mm.token_ids, params)
        if params.guided is not None:
            # compile off the engine thread and the event loop; a bad grammar raises here, before queueing
            await asyncio.to_thread(self.engine.grammars.compile, params.guided)
        async for out in self._submit(request_id, ("add", request_id, prompt_ids, params, session_id, mm)):
            yield out

    async def encode(self, prompt_token_ids: list[int]) -> list[float]:
        return (await self.encode_all([prompt_token_ids]))[0]

    async def encode_all(self, inputs: list[list[int]]) -> list[list[float]]:
        """Pooling (embeddings, classifier scores) for several inputs. Every input gets the one input check
        (engine/request_checks.py) before any is queued; a failing one raises InvalidRequestError with `index`
        set to its position in `inputs`."""
        self._check_accepting()
        checked = []
        for i, ids in enumerate(inputs):
            try:
                checked.append(self.engine.check_request(ids, None))
            except InvalidRequestError as exc:
                exc.index = i
                raise
        return list(await asyncio.gather(*[self._pool(ids) for ids in checked]))

    async def _pool(self, prompt_ids: list[int]) -> list[float]:
        request_id = f"embd-{next(self._ids)}"
        async for out in self._submit(request_id, ("pool", request_id, prompt_ids)):
            assert isinstance(out, EmbeddingOutput)
            return out.embedding
        raise EngineDeadError("encode request ended without a result")

    async def _submit(self, request_id: str, command: tuple):
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = self._streams[request_id] = _Stream()
        self._commands.put(command)
        try:
            while True:
                await stream.event.wait()
                stream.event.clear()
                item = stream.latest
                if isinstance(item, BaseException):
                    raise item
                if getattr(item, "finished", True):
                    stream.finished = True
                yield item
                if stream.finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not stream.finished:   # the consumer left early (disconnect, cancel): free its KV blocks
                self._commands.put(("abort", request_id))

    async def abort(self, request_id: str) -> bool:
        known = request_id in self._streams
        self._commands.put(("abort", request_id))
        return known

    def end_session(self, session_id: int) -> bool:
        return self._call_sync(lambda: self.engine.end_session(session_id))

    def get_stats(self, memory: bool = False) -> EngineStats:
        """The snapshot of the last step; memory=True adds memory by kind, read now (for /metrics scrapes)."""
        if not memory:
            return self._stats
        return dataclasses.replace(self._stats, memory=memory_stats(self.engine.runner))

    # ---- control: run inside the engine thread between steps ---------------------------------------------
    async def sleep(self, level: int = 1) -> None:
        if level not in (1, 2):
            raise ValueError("level must be 1 or 2")

        def _sleep():
            self.engine.abort_all()
            self.engine.block_manager.reset_prefix_cache()
            self.engine.sessions.clear()
            self.engine.executor.sleep(level)
            self.is_sleeping = True
        await self._call(_sleep)

    async def wakeup(self) -> None:
        def _wake():
            if self.engine.executor.wakeup():      # the KV cache was reallocated: every block is free again
                self.engine.block_manager.free_all()
            self.is_sleeping = False
        await self._call(_wake)

    @property
    def modalities(self) -> tuple[str, ...]:
        """("text",) or ("text", "image"): what the model takes (engine/mm_inputs.py)."""
        return self.engine.modalities

    @property
    def image_placeholder(self) -> str | None:
        """The string one image takes in a raw prompt; None for a text model."""
        return self.engine.image_placeholder

    @property
    def weights_released(self) -> bool:
        """True after sleep(level=2) until wakeup(): there is no model to load weights into."""
        return self.engine.runner.model is None

    async def update_weights(self, named_tensors: dict[str, torch.Tensor]) -> None:
        def _update():
            self.engine.executor.update_weights(named_tensors)
            # cached KV was computed with the old weights
            self.engine.block_manager.reset_prefix_cache()
        await self._call(_update)

    async def _call(self, fn: Callable):
        self._check_alive()
        if self._thread is None:
            return fn()
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("call", fn, fut))
        return await asyncio.wrap_future(fut)

    def _call_sync(self, fn: Callable):
        if self._thread is None or threading.current_thread() is self._thread:
            return fn()
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("call", fn, fut))
        return fut.result(timeout=60)

    def _check_alive(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"the engine stopped after an error: {self._error!r}")

    def _check_accepting(self) -> None:
        """New requests (generate, encode); control calls only need _check_alive."""
        self._check_alive()
        if self.is_sleeping:
            raise EngineSleepingError("the engine is sleeping; POST /wakeup first")

    # ---- the engine thread ---------------------------------------------------------------------------------
    def _thread_governor(self) -> ThreadGovernor | None:
        """Adaptive CPU threads (engine/cpu_threads.py), unless --num-threads fixed the count."""
        runner = self.engine.runner
        if runner.device.type != "cpu" or runner.model_config.num_threads:
            return None
        governor = ThreadGovernor()
        governor.start()
        return governor

    def _run(self) -> None:
        governor = None
        while not self._stopping:
            try:
                governor = governor or self._thread_governor()
                self._steps(governor)
            except BaseException as e:   # noqa: BLE001 - restart in place, or report the death everywhere
                if not self._restart(e):
                    return

    def _steps(self, governor: ThreadGovernor | None) -> None:
        engine = self.engine
        stepped = False      # since the heap was last trimmed
        while not self._stopping:
            if governor is not None:
                governor.maybe_adjust()
            block = not engine.has_unfinished()
            while True:
                try:
                    cmd = self._commands.get(block=block, timeout=1.0 if block else None)
                except queue.Empty:
                    if block and stepped:
                        # NOTE: idle for a second after work: glibc keeps the freed activations, logits and
                        # prefill buffers of a burst in its arenas (Gemma 3 270M: ~150 MiB after 16 requests);
                        # hand them back now rather than hold them until the next burst (never mid-burst)
                        trim_heap()
                        stepped = False
                    break
                block = False
                self._handle(cmd)
            if self._stopping:
                break
            stepped = stepped or engine.has_unfinished()
            outputs = engine.step() if engine.has_unfinished() else []
            self._stats = engine.get_stats(memory=False)
            if outputs:
                self._loop.call_soon_threadsafe(self._dispatch, outputs)

    def _restart(self, cause: BaseException) -> bool:
        """The loop died outside a step's isolation (engine/fault.py): reset the engine and go on, unless the
        cause is fatal (a lost tensor-parallel rank, an interpreter exit) or restarts keep coming. -> go on?"""
        now = time.monotonic()
        self._restart_times = [t for t in self._restart_times if now - t < 60]
        if not isinstance(cause, Exception) or self.engine.executor.error is not None or \
                len(self._restart_times) >= self.config.max_engine_restarts:
            logger.exception("engine thread died")
            self._die(cause)
            return False
        logger.exception("engine loop failed; restarting in place (requests in flight fail, queued ones stay)")
        self._restarting = True
        try:
            errors = recover(self.engine, cause)
        except BaseException as e:   # noqa: BLE001 - cannot even reset: the engine is dead
            logger.exception("engine restart failed")
            self._die(e)
            return False
        self._restart_times.append(now)
        self._stats = self.engine.get_stats(memory=False)
        if errors:
            self._loop.call_soon_threadsafe(self._dispatch, errors)
        logger.warning("engine restarted in %.3f s: %d request(s) in flight failed, %d kept",
                       time.monotonic() - now, len(errors), len(self.engine.requests))
        self._restarting = False
        return True

    def _die(self, error: BaseException) -> None:
        self._error = error
        self._loop.call_soon_threadsafe(self._fail_all, EngineDeadError(f"engine error: {error!r}"))

    def _handle(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "add":
            _, request_id, prompt_ids, params, session_id, mm = cmd
            try:
                self.engine.enqueue_request(request_id, prompt_ids, params, session_id=session_id, mm=mm)
            except Exception as e:  # noqa: BLE001 - reported to the caller
                self._loop.call_soon_threadsafe(self._dispatch_error, request_id, e)
        elif kind == "pool":
            _, request_id, prompt_ids = cmd
            self.engine.enqueue_pooling_request(request_id, prompt_ids)
        elif kind == "abort":
            out = self.engine.abort(cmd[1])
            if out is not None:
                self._loop.call_soon_threadsafe(self._dispatch, [out])
        elif kind == "call":
            _, fn, fut = cmd
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - reported to the caller
                fut.set_exception(e)
                return
            # NOTE: stats first, so a caller that reads /metrics after the call returns (POST /chat/reset freed a
            # session's blocks) sees its effect, not the stats of the step before
            self._stats = self.engine.get_stats(memory=False)
            fut.set_result(result)

    # ---- event-loop side -----------------------------------------------------------------------------------
    def _dispatch(self, outputs: list) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put(out)

    def _dispatch_error(self, request_id: str, error: BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put(error)

    def _fail_all(self, error: BaseException) -> None:
        for stream in list(self._streams.values()):
            stream.put(error)
