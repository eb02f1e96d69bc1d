"""Executors: the seam between LLMEngine and the model. The engine calls execute(scheduler output) and the control
calls; it does not know whether the model runs in this process or in N tensor-parallel processes.

- UniProcExecutor: one ModelRunner in this process (tp 1): exactly the direct call it always was.
- MultiProcExecutor: rank 0 of tp ranks on torch.distributed (gloo on CPU, NCCL on CUDA). This process keeps
  its own shard and the scheduler; per step it broadcasts the batch as ints (engine/distributed.py), runs its
  forward pass alongside the workers and samples alone (the seeded generators live only here).
  A worker that dies or raises marks the executor failed: `on_failure` is told at once (the server answers
  /health 503 and fails in-flight requests even if the engine thread is stuck in a collective), the next
  execute raises, and the remaining local workers are stopped.
"""
from __future__ import annotations

import atexit
import logging
import threading
import time
from multiprocessing.connection import wait as wait_sentinels
from typing import Callable

import torch
import torch.distributed as dist

from lmserve.config import EngineConfig, TPConfigError
from lmserve.engine.distributed import (HEARTBEAT_S, OP_EXECUTE, OP_HEARTBEAT, OP_SHUTDOWN, OP_SLEEP,
                                        OP_UPDATE_WEIGHTS, OP_WAKEUP, Channel, encode_batch, free_port,
                                        init_process_group, rank_device, rank_model_config, ranks_per_node)
from lmserve.engine.encoder_runner import EncoderRunner
from lmserve.engine.model_runner import ModelRunner, RunnerOutput, sleep_runner, wakeup_runner
from lmserve.engine.scheduler import SchedulerOutput
from lmserve.engine.worker import spawn_workers
from lmserve.model.loader import load_arch_config
from lmserve.model.parallel import validate_tp
from lmserve.model.registry import is_encoder

logger = logging.getLogger(__name__)


class ExecutorFailed(RuntimeError):
    pass


class UniProcExecutor:
    tp_size = 1

    def __init__(self, config: EngineConfig, model_path: str):
        mc = config.model
        runner_cls = EncoderRunner if is_encoder(model_path) else ModelRunner
        self.runner = runner_cls(mc, config.cache, model_path, config.scheduler.max_num_seqs, mc.max_model_len)
        if config.lora.enabled:
            from lmserve.engine.lora_manager import LoraManager
            self.runner.lora = LoraManager(config.lora, self.runner)
        self.on_failure: Callable[[str], None] | None = None
        self.error: str | None = None

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        return self.runner.execute(sched)

    def sleep(self, level: int) -> None:
        sleep_runner(self.runner, level)

    def wakeup(self) -> bool:
        """-> True when the KV cache was reallocated (every block is free again)."""
        return wakeup_runner(self.runner)

    def update_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.runner.update_weights(weights)

    def shutdown(self) -> None:
        pass


class MultiProcExecutor(UniProcExecutor):
    def __init__(self, config: EngineConfig, model_path: str):
        d = config.distributed
        self.tp_size = config.tp
        self.on_failure = None
        self.error = None
        self._closed = False
        self._lock = threading.Lock()          # one collective sequence at a time (engine thread vs heartbeat)
        self._last_send = time.monotonic()
        if is_encoder(model_path):
            raise TPConfigError("tp: encoder (embedding) models run in one process; use --tp 1")
        if load_arch_config(model_path).vision is not None:   # image embeddings are computed on rank 0 only
            raise TPConfigError("tp: vision-language models run in one process for now; use --tp 1")
        validate_tp(load_arch_config(model_path), config.tp)    # one clear line before any process starts
        port = d.master_port or free_port()
        self.workers = []
        if d.rank is None and ranks_per_node(config) > 1:
            self.workers = spawn_workers(config, model_path, range(1, ranks_per_node(config)), port)
        atexit.register(self.shutdown)
        threading.Thread(target=self._watch_workers, name="lmserve-tp-watchdog", daemon=True).start()
        try:
            init_process_group(config, 0, port)
            device = rank_device(config, 0)
            self.runner = ModelRunner(rank_model_config(config), config.cache, model_path,
                                      config.scheduler.max_num_seqs, config.model.max_model_len,
                                      tp_rank=0, tp_size=config.tp, device=device)
        except BaseException:
            self._closed = True
            self._stop_workers()
            raise
        self.channel = Channel(device)
        threading.Thread(target=self._heartbeat, name="lmserve-tp-heartbeat", daemon=True).start()
        logger.info("tensor parallelism: %d ranks (%s), %d threads per rank", config.tp,
                    dist.get_backend(), torch.get_num_threads())

    # ---- the step and control messages ---------------------------------------------------------------------
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        batch, plan = self.runner.prepare(sched)
        hidden, logits = self._collective(lambda: (self.channel.send(OP_EXECUTE, encode_batch(batch)),
                                                   self.runner.forward(batch))[1], fatal=True)
        return self.runner.sample(plan, hidden, logits)

    def sleep(self, level: int) -> None:
        self._collective(lambda: (self.channel.send(OP_SLEEP, arg=level), sleep_runner(self.runner, level)))

    def wakeup(self) -> bool:
        return self._collective(lambda: (self.channel.send(OP_WAKEUP), wakeup_runner(self.runner))[1])

    def update_weights(self, weights: dict[str, torch.Tensor]) -> None:
        def send_and_apply():
            self.channel.send(OP_UPDATE_WEIGHTS)
            self.channel.send_weights(weights)
            self.runner.update_weights(weights)
        self._collective(send_and_apply)

    def _collective(self, fn, fatal: bool = False):
        """Run fn (a send plus this rank's share of the work) under the lock. Any error in a step, or a
        communication error anywhere, is fatal; other errors of control calls (a bad weight name) are the
        caller's, and every rank saw the same input and the same error."""
        if self.error is not None:
            raise ExecutorFailed(self.error)
        with self._lock:
            try:
                result = fn()
            except Exception as e:
                if not fatal and not _is_comm_error(e):
                    raise
                self._fail(f"tensor-parallel step failed: {str(e).splitlines()[0] if str(e) else repr(e)}")
                raise ExecutorFailed(self.error) from e
            self._last_send = time.monotonic()
            return result

    # ---- failure handling -----------------------------------------------------------------------------------
    def _fail(self, message: str) -> None:
        if self.error is not None:
            return
        self.error = message
        logger.error("%s; the engine cannot continue", message)
        self._stop_workers()
        if self.on_failure is not None:
            self.on_failure(message)

    def _watch_workers(self) -> None:
        alive = {p.sentinel: p for p in self.workers}
        while alive and not self._closed:
            for sentinel in wait_sentinels(list(alive), timeout=1.0):
                p = alive.pop(sentinel)
                if not self._closed:
                    self._fail(f"tensor-parallel worker {p.name} exited (exit code {p.exitcode})")

    def _heartbeat(self) -> None:
        """Idle workers wait inside a broadcast, which times out (PG_TIMEOUT); keep them fed. A failed heartbeat
        also finds dead remote ranks while nothing runs."""
        while not self._closed and self.error is None:
            time.sleep(1.0)
            if time.monotonic() - self._last_send < HEARTBEAT_S or not self._lock.acquire(blocking=False):
                continue
            try:
                if not self._closed and self.error is None:
                    self.channel.send(OP_HEARTBEAT)
                    self._last_send = time.monotonic()
            except RuntimeError as e:
                self._fail(f"tensor-parallel heartbeat failed: {str(e).splitlines()[0] if str(e) else e!r}")
            finally:
                self._lock.release()

    def _stop_workers(self, grace: float = 0.0) -> None:
        for p in self.workers:
            p.join(grace)
            if p.is_alive():
                p.terminate()
        for p in self.workers:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(1)

    def shutdown(self) -> None:
        """Stop every rank (also on SIGTERM / Ctrl-C via the server's shutdown, and at exit)."""
        if self._closed:
            return
        self._closed = True
        if self.error is None and self._lock.acquire(timeout=5):
            try:
                self.channel.send(OP_SHUTDOWN)
            except (RuntimeError, AttributeError):
                pass
            finally:
                self._lock.release()
        self._stop_workers(grace=5.0)
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except RuntimeError:
                pass


def _is_comm_error(e: BaseException) -> bool:
    text = str(e).lower()
    return any(w in text for w in ("gloo", "nccl", "connection", "peer", "timed out", "broken pipe", "closed"))


def make_executor(config: EngineConfig, model_path: str) -> UniProcExecutor:
    return MultiProcExecutor(config, model_path) if config.tp > 1 else UniProcExecutor(config, model_path)
