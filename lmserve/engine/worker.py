"""Tensor-parallel ranks other than 0: each owns its ModelRunner (its shard of the weights and of the KV cache) and
runs what the driver broadcasts: the forward pass of every step (its collectives pair with the driver's), sleep,
wakeup and weight updates. Workers hold no per-request state: the driver schedules and samples, so an abort
never needs to reach them.

Started by the engine (one process per extra local rank), by `lmserve serve api_server --node-rank K` on the
other nodes, or by a launcher such as torchrun (one process per rank).
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time

import torch.distributed as dist

from lmserve.config import EngineConfig
from lmserve.engine.distributed import (OP_EXECUTE, OP_HEARTBEAT, OP_SHUTDOWN, OP_SLEEP, OP_UPDATE_WEIGHTS,
                                        OP_WAKEUP, Channel, decode_batch, free_port, init_process_group,
                                        rank_device, rank_model_config, ranks_per_node)
from lmserve.engine.model_runner import ModelRunner, sleep_runner, wakeup_runner
from lmserve.model.gguf import release_readers
from lmserve.startup import trim_heap

logger = logging.getLogger(__name__)


def _exit_with_parent(parent_pid: int) -> None:
    """No orphans: a worker whose parent is gone (even SIGKILLed) exits within a second."""
    def watch():
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(0.5)
    threading.Thread(target=watch, name="lmserve-parent-watch", daemon=True).start()


def run_worker(config: EngineConfig, model_path: str, rank: int, master_port: int,
               parent_pid: int | None = None) -> None:
    """A worker process's whole life: join the group, load this rank's shard, serve the driver until shutdown."""
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s %(levelname)s tp{rank} %(name)s: %(message)s")
    if parent_pid is not None:
        _exit_with_parent(parent_pid)
    try:
        init_process_group(config, rank, master_port)
        device = rank_device(config, rank)
        runner = ModelRunner(rank_model_config(config), config.cache, model_path, config.scheduler.max_num_seqs,
                             config.model.max_model_len, tp_rank=rank, tp_size=config.tp, device=device)
        release_readers()
        trim_heap()
        serve(runner, Channel(device))
    except KeyboardInterrupt:
        pass
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def serve(runner: ModelRunner, channel: Channel) -> None:
    while True:
        op, arg, payload = channel.recv()
        if op == OP_EXECUTE:
            runner.forward(decode_batch(payload))    # an error here is fatal: the driver sees this rank die
        elif op == OP_SHUTDOWN:
            return
        elif op == OP_HEARTBEAT:
            continue
        else:
            try:
                if op == OP_SLEEP:
                    sleep_runner(runner, arg)
                elif op == OP_WAKEUP:
                    wakeup_runner(runner)
                elif op == OP_UPDATE_WEIGHTS:
                    runner.update_weights(channel.recv_weights())
                else:
                    raise RuntimeError(f"unknown op {op}")
            except Exception:   # noqa: BLE001 - the driver ran the same call on the same input and reports it
                logger.exception("control op %d failed", op)


def spawn_workers(config: EngineConfig, model_path: str, ranks: range, master_port: int) -> list:
    """Start one worker process per rank (spawn: a fresh interpreter, no forked torch state)."""
    ctx = multiprocessing.get_context("spawn")
    procs = []
    for rank in ranks:
        p = ctx.Process(target=run_worker, args=(config, model_path, rank, master_port, os.getpid()),
                        name=f"lmserve-tp{rank}", daemon=True)
        p.start()
        procs.append(p)
    return procs


def run_worker_node(config: EngineConfig, model_path: str) -> int:
    """A process that is not rank 0 (another node, or a launcher's rank): run this process's rank(s) until the
    driver shuts them down."""
    d = config.distributed
    if d.rank is not None:                       # launcher mode: exactly one rank per process
        run_worker(config, model_path, d.rank, d.master_port or free_port())
        return 0
    per_node = ranks_per_node(config)
    first = d.node_rank * per_node
    procs = spawn_workers(config, model_path, range(first + 1, first + per_node), d.master_port)
    try:
        run_worker(config, model_path, first, d.master_port)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    return 0
