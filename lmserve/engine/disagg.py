"""Prefill-decode disaggregation (LMDeploy's DistServe) on top of AsyncEngine.

`DisaggEngine` wraps an AsyncEngine and is what the server talks to; everything else is delegated. The serving
layer sets `CURRENT` (a context variable) around a request that carries DistServe fields:

- `PrefillJob` (`preserve_cache`): the prompt is computed as usual (prefix cache included) for one token; when
  the sequence finishes, the `on_finish` hook (engine thread) takes an extra reference on all of its prompt's
  blocks and keeps them under a fresh migration session id until the decode server has pulled them
  (engine/kv_transfer.py), `free_cache` arrives, or `migration_timeout` seconds pass. A decode server that
  dies therefore never leaks the prefill server's cache.
- `Migration` (`migration_request`): the KV blocks are pulled from the named prefill engine in a worker thread
  (the engine keeps stepping its other requests meanwhile), then one command on the engine thread allocates
  blocks, copies the KV in, appends the prefill's first token and puts the sequence straight into the running
  queue: the decode server computes none of the prompt.

A kept session lives `migration_timeout` seconds after its last read. /sleep drops every kept session first (the
KV cache they point into is about to be freed, and after /wakeup their block ids would name other requests'
blocks); a decode server still pulling one gets a 503 that says why. /terminate waits for kept sessions to be
pulled or to expire before the process exits (server/serving_admin.py); shutdown drops what is left.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import dataclasses
import itertools
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from lmserve.engine.kv_transfer import (BlockServer, MigrationError, hello, kv_layout, layout_mismatch, pull_blocks,
                                        write_blocks)
from lmserve.engine.fault import TEST_HOOKS_ENV
from lmserve.engine.output_processor import append_token
from lmserve.engine.sequence import SequenceStatus

logger = logging.getLogger(__name__)

ROLES = ("hybrid", "prefill", "decode")
# TEST ONLY, honoured with LMSERVE_ENABLE_TEST_HOOKS=1: "MARKER:SECONDS" delays every block read of a session whose
# prompt text contains MARKER, so a test can act while a migration is in flight
SLOW_READS_ENV = "LMSERVE_TEST_KV_SLOW_READS"
_NUM_GONE_KEPT = 4096      # reasons remembered for dropped sessions, so a late pull is told why


@dataclass
class PrefillJob:
    """Filled in when the prefill finishes: what the proxy hands to the decode server."""
    session_id: int = -1
    block_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)


@dataclass
class Migration:
    remote_engine_id: str
    remote_session_id: int
    remote_token_id: int
    remote_block_ids: list[int] = field(default_factory=list)


CURRENT: contextvars.ContextVar[PrefillJob | Migration | None] = contextvars.ContextVar("distserve_job",
                                                                                      default=None)


@dataclass
class _Pinned:
    block_ids: list[int]
    deadline: float
    read_delay: float = 0.0     # test hook (SLOW_READS_ENV)


@dataclass
class Peer:
    engine_id: str
    address: str | None = None     # the remote engine's KV server (a decode server pulls from it)
    layout: dict | None = None


class DisaggEngine:
    def __init__(self, engine, role: str = "hybrid", migration_timeout: float = 60.0):
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        self._inner = engine
        self.role = role
        self.migration_timeout = migration_timeout
        self.engine_id: str | None = None         # learned from p2p_initialize (the proxy's url for us)
        self.peers: dict[str, Peer] = {}
        self.server: BlockServer | None = None
        self.pinned: dict[int, _Pinned] = {}      # engine thread writes; the KV server thread reads
        self._to_pin: dict[str, PrefillJob] = {}
        self._session_ids = itertools.count(1)
        self._reaper: asyncio.Task | None = None
        self.num_migrations = 0
        self.num_migrated_tokens = 0
        self.num_migrated_bytes = 0
        self.migration_seconds = 0.0
        self.num_expired = 0
        self.num_dropped = 0
        self.gone: OrderedDict[int, str] = OrderedDict()   # session id -> why its blocks were freed early
        self._slow_reads = _slow_reads_hook()
        engine.engine.on_finish = self._on_finish

    def __getattr__(self, name):
        return getattr(self._inner, name)

    async def shutdown(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        if self.pinned:
            try:
                await self._inner._call(lambda: self._drop_all("the prefill engine shut down"))
            except Exception:  # noqa: BLE001 - a dead engine: its KV cache goes with the process
                pass
        if self.server is not None:
            self.server.close()
        await self._inner.shutdown()

    async def sleep(self, level: int = 1) -> None:
        if level in (1, 2) and self.pinned:
            await self._inner._call(lambda: self._drop_all("the prefill engine went to sleep (/sleep)"))
        await self._inner.sleep(level)

    @property
    def num_pinned_sessions(self) -> int:
        return len(self.pinned)

    @property
    def runner(self):
        return self._inner.engine.runner

    @property
    def layout(self) -> dict:
        return kv_layout(self.runner)

    # ---- connection management (called from the /distserve endpoints) --------------------------------------
    def start_server(self, host: str) -> str:
        if self.server is None:
            self.server = BlockServer(self.runner, host, lambda sid: getattr(self.pinned.get(sid), "block_ids", None),
                                      self._queue_free, on_read=self._on_read, explain=self.gone.get)
        return self.server.address

    def connect(self, remote_engine_id: str, address: str | None, layout: dict, check_reachable: bool) -> None:
        problem = layout_mismatch(self.layout, layout)
        if problem is not None:
            raise MigrationError(problem, status=400, param="remote_kvtransfer_endpoint_info")
        if check_reachable and address:
            remote = hello(address, min(self.migration_timeout, 10.0))
            problem = layout_mismatch(self.layout, remote)
            if problem is not None:
                raise MigrationError(problem, status=400, param="remote_kvtransfer_endpoint_info")
        self.peers[remote_engine_id] = Peer(remote_engine_id, address, layout)

    def drop(self, remote_engine_id: str) -> bool:
        return self.peers.pop(remote_engine_id, None) is not None

    async def free_cache(self, session_id: int) -> bool:
        return await self._inner._call(lambda: self._free(session_id))

    def stats(self) -> dict:
        return {"role": self.role, "num_pinned_sessions": len(self.pinned), "num_migrations": self.num_migrations,
                "num_migrated_tokens": self.num_migrated_tokens, "num_migrated_bytes": self.num_migrated_bytes,
                "migration_seconds": round(self.migration_seconds, 6), "num_expired_sessions": self.num_expired,
                "num_dropped_sessions": self.num_dropped,
                "num_bytes_served": self.server.num_bytes_sent if self.server else 0}

    # ---- generation ----------------------------------------------------------------------------------------
    async def generate(self, request_id, prompt, params, *, session_id=None, images=None):
        job = CURRENT.get()
        if images and isinstance(job, (PrefillJob, Migration)):
            # NOTE: a migrated KV cache would need the images' encoder outputs placed the same way: not done yet
            raise ValueError("images are not supported with prefill-decode disaggregation yet")
        if images:
            gen = self._inner.generate(request_id, prompt, params, session_id=session_id, images=images)
        elif isinstance(job, PrefillJob):
            gen = self._prefill(job, request_id, prompt, params, session_id)
        elif isinstance(job, Migration):
            gen = self._decode(job, request_id, prompt, params)
        else:
            gen = self._inner.generate(request_id, prompt, params, session_id=session_id)
        async for out in gen:
            yield out

    async def _prefill(self, job: PrefillJob, request_id, prompt, params, session_id):
        # NOTE: the decode server resumes after exactly one token, whatever the client asked for
        params = dataclasses.replace(params, max_tokens=1, min_tokens=0)
        job.session_id = next(self._session_ids)
        self._to_pin[request_id] = job
        self._start_reaper()
        try:
            async for out in self._inner.generate(request_id, prompt, params, session_id=session_id):
                if out.finished:
                    job.token_ids = list(out.outputs[0].token_ids)
                yield out
        finally:
            self._to_pin.pop(request_id, None)

    async def _decode(self, mig: Migration, request_id, prompt, params):
        inner = self._inner
        inner._check_accepting()      # refuses a sleeping engine, as generate does
        peer = self.peers.get(mig.remote_engine_id)
        if peer is None or peer.address is None:
            raise MigrationError(f"engine {mig.remote_engine_id!r} is not connected to this one; call "
                                 "/distserve/p2p_initialize and /distserve/p2p_connect first", status=400,
                                 param="migration_request.remote_engine_id")
        prompt_ids = inner.engine.check_request(prompt, params)
        num_blocks = -(-len(prompt_ids) // self.runner.block_size)
        if mig.remote_block_ids and len(mig.remote_block_ids) != num_blocks:
            raise MigrationError(f"the prompt needs {num_blocks} KV blocks; the prefill engine kept "
                                 f"{len(mig.remote_block_ids)}", status=400, param="migration_request.remote_block_ids")
        if params.guided is not None:
            await asyncio.to_thread(inner.engine.grammars.compile, params.guided)
        t0 = time.perf_counter()
        blocks = await asyncio.to_thread(pull_blocks, peer.address, mig.remote_session_id, num_blocks,
                                         self.migration_timeout)
        self.migration_seconds += time.perf_counter() - t0
        self.num_migrations += 1
        self.num_migrated_tokens += len(prompt_ids)
        self.num_migrated_bytes += sum(len(f) for b in blocks for f in b)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        inject = (lambda: self._inject(request_id, prompt_ids, params, mig.remote_token_id, blocks))
        async for out in inner._submit(request_id, ("call", inject, fut)):
            yield out

    # ---- engine thread -------------------------------------------------------------------------------------
    def _on_finish(self, seq) -> None:
        job = self._to_pin.pop(seq.request_id, None)
        if job is None:
            return
        bm = self._inner.engine.block_manager
        blocks = seq.block_table[:bm.num_blocks_needed(seq.num_prompt_tokens)]
        bm.share(blocks)
        delay = 0.0
        if self._slow_reads is not None and self._slow_reads[0] in self._inner.engine.tokenizer.decode(
                seq.prompt_token_ids):
            delay = self._slow_reads[1]
        self.pinned[job.session_id] = _Pinned(list(blocks), time.monotonic() + self.migration_timeout, delay)
        job.block_ids = list(blocks)

    def _on_read(self, session_id: int) -> None:
        """From the KV server thread, before a read: a session being pulled does not expire."""
        pinned = self.pinned.get(session_id)
        if pinned is None:
            return
        if pinned.read_delay:
            time.sleep(pinned.read_delay)
        pinned.deadline = time.monotonic() + self.migration_timeout

    def _drop_all(self, reason: str) -> int:
        """Engine thread: free every kept session (before the KV cache goes away)."""
        sessions = list(self.pinned)
        for sid in sessions:
            self._free(sid)
            self.gone[sid] = reason
        while len(self.gone) > _NUM_GONE_KEPT:
            self.gone.popitem(last=False)
        if sessions:
            logger.warning("dropped %d kept migration session(s): %s", len(sessions), reason)
        self.num_dropped += len(sessions)
        return len(sessions)

    def _free(self, session_id: int) -> bool:
        pinned = self.pinned.pop(session_id, None)
        if pinned is None:
            return False
        self._inner.engine.block_manager.release(pinned.block_ids)
        return True

    def _queue_free(self, session_id: int) -> None:
        """From the KV server thread: free on the engine thread, between steps."""
        self._inner._commands.put(("call", lambda: self._free(session_id), concurrent.futures.Future()))

    def _expire(self) -> int:
        now = time.monotonic()
        expired = [sid for sid, p in self.pinned.items() if p.deadline <= now]
        for sid in expired:
            logger.warning("migration session %d was not pulled within %g s; its KV blocks are freed", sid,
                           self.migration_timeout)
            self._free(sid)
            self.gone[sid] = f"it was not pulled within --migration-timeout ({self.migration_timeout:g} s)"
        while len(self.gone) > _NUM_GONE_KEPT:
            self.gone.popitem(last=False)
        self.num_expired += len(expired)
        return len(expired)

    def _inject(self, request_id, prompt_ids, params, first_token, blocks) -> None:
        inner, eng = self._inner, self._inner.engine
        try:
            eng.enqueue_request(request_id, prompt_ids, params)
            req = eng.requests[request_id]
            seq = req.seqs[0]
            eng.scheduler.waiting.remove(seq)
            if not eng.block_manager.allocate(seq, len(prompt_ids)):
                eng.requests.pop(request_id, None)
                raise MigrationError("no free KV blocks for the migrated prompt", status=503, param=None)
            write_blocks(self.runner, seq.block_table, blocks)
            now = time.monotonic()
            seq.num_computed_tokens = len(prompt_ids)
            eng.block_manager.cache_full_blocks(seq)
            seq.status = SequenceStatus.RUNNING
            seq.first_scheduled_time = seq.first_token_time = now   # NOTE: no prompt tokens computed here
            eng.scheduler.running.append(seq)
            append_token(eng.scheduler, seq, first_token, None)
            out = eng._make_output(req)
            if out.finished:
                del eng.requests[request_id]
            inner._loop.call_soon_threadsafe(inner._dispatch, [out])
        except Exception as e:  # noqa: BLE001 - reported on the request's stream
            inner._loop.call_soon_threadsafe(inner._dispatch_error, request_id, e)

    # ---- timeouts ------------------------------------------------------------------------------------------
    def _start_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.migration_timeout / 4))
            if self.pinned:
                try:
                    await self._inner._call(self._expire)
                except Exception:  # noqa: BLE001 - a dead engine: nothing left to free
                    return


def _slow_reads_hook() -> tuple[str, float] | None:
    spec = os.environ.get(SLOW_READS_ENV)
    if not spec:
        return None
    if os.environ.get(TEST_HOOKS_ENV) != "1":
        raise ValueError(f"{SLOW_READS_ENV} is a test hook: set {TEST_HOOKS_ENV}=1 to use it")
    marker, _, seconds = spec.rpartition(":")
    logger.warning("TEST hook: KV block reads of sessions whose prompt contains %r wait %s s", marker, seconds)
    return marker, float(seconds)
