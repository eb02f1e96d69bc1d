"""torch.distributed plumbing for tensor parallelism: process-group setup (gloo on CPU, NCCL on CUDA), the device
and thread count of a rank, and the driver -> ranks channel.

The channel is a broadcast from rank 0 of a fixed int64 header [op, payload length, arg] and then, if any, an
int64 payload: a step's input is the StepBatch flattened to ints (no pickling on the hot path). Only weight
updates, which are rare, broadcast their names with broadcast_object_list.
"""
from __future__ import annotations

import dataclasses
import datetime
import socket

import torch
import torch.distributed as dist

from lmserve.config import EngineConfig, resolve_device
from lmserve.engine.cpu_threads import available_cpus
from lmserve.engine.model_runner import StepBatch

OP_EXECUTE, OP_SLEEP, OP_WAKEUP, OP_UPDATE_WEIGHTS, OP_HEARTBEAT, OP_SHUTDOWN = range(1, 7)
_HEADER = 3
# NOTE: idle ranks wait inside a broadcast; the driver sends a heartbeat well within this timeout.
PG_TIMEOUT = datetime.timedelta(minutes=30)
HEARTBEAT_S = 20.0


class DistributedInitError(RuntimeError):
    """A rank could not join the process group (port in use, unreachable master): one line for the user."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ranks_per_node(config: EngineConfig) -> int:
    return config.tp // config.distributed.nnodes


def rank_device(config: EngineConfig, rank: int) -> torch.device:
    """CPU ranks share the CPU; CUDA ranks get one GPU each: cuda:<local rank> (of the visible devices)."""
    dev = resolve_device(config.model.device)
    if dev.type != "cuda" or config.tp == 1:
        return dev
    return torch.device("cuda", (dev.index or 0) + rank % ranks_per_node(config))


def rank_model_config(config: EngineConfig):
    """The model config a rank runs with: on CPU, ranks x threads <= the CPUs this process may use, unless
    --num-threads (which is per rank) says otherwise. NOTE: a fixed count also keeps rank 0 off the adaptive
    ThreadGovernor: ranks must not drift apart in speed, the slowest one sets the pace of every collective."""
    mc = config.model
    if config.tp == 1 or mc.num_threads:
        return mc
    return dataclasses.replace(mc, num_threads=max(1, available_cpus() // ranks_per_node(config)))


def init_process_group(config: EngineConfig, rank: int, master_port: int) -> None:
    backend = "nccl" if rank_device(config, rank).type == "cuda" else "gloo"
    addr = config.distributed.master_addr
    # NOTE: under a launcher (torchrun) its agent may already host the store on MASTER_PORT; env:// joins it
    init = "env://" if config.distributed.rank is not None else f"tcp://{addr}:{master_port}"
    try:
        dist.init_process_group(backend, init_method=init, world_size=config.tp, rank=rank, timeout=PG_TIMEOUT)
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedInitError(f"tensor parallelism: rank {rank} cannot join {addr}:{master_port} ({backend}): "
                           f"{first}") from None


# ---- the StepBatch as ints ----------------------------------------------------------------------------------
def encode_batch(b: StepBatch) -> list[int]:
    flat = [len(b.input_ids), len(b.decode_rows), len(b.prefill), len(b.logit_rows)]
    flat += b.input_ids + b.positions + b.slot_mapping + b.decode_rows + b.decode_ctx
    flat += [len(t) for t in b.decode_tables]
    for t in b.decode_tables:
        flat += t
    for row, n, start, bt in b.prefill:
        flat += [row, n, start, len(bt), *bt]
    return flat + b.logit_rows


def decode_batch(flat: list[int]) -> StepBatch:
    num_tokens, num_decode, num_prefill, num_logits = flat[:4]
    pos = 4

    def take(n):
        nonlocal pos
        pos += n
        return flat[pos - n:pos]
    # by name: StepBatch grows fields (M-RoPE, images, LoRA) that do not travel on this wire
    b = StepBatch(input_ids=take(num_tokens), positions=take(num_tokens), slot_mapping=take(num_tokens),
                  decode_rows=take(num_decode), decode_ctx=take(num_decode))
    b.decode_tables = [take(n) for n in take(num_decode)]
    for _ in range(num_prefill):
        row, n, start, length = take(4)
        b.prefill.append((row, n, start, take(length)))
    b.logit_rows = take(num_logits)
    return b


class Channel:
    """Rank 0 -> all ranks. Every rank must call recv() once for each send() of the driver, in order."""

    def __init__(self, device: torch.device):
        self.device = device     # NCCL broadcasts device tensors

    def send(self, op: int, payload: list[int] | None = None, arg: int = 0) -> None:
        payload = payload or []
        dist.broadcast(torch.tensor([op, len(payload), arg], dtype=torch.long, device=self.device), src=0)
        if payload:
            dist.broadcast(torch.tensor(payload, dtype=torch.long, device=self.device), src=0)

    def recv(self) -> tuple[int, int, list[int]]:
        header = torch.empty(_HEADER, dtype=torch.long, device=self.device)
        dist.broadcast(header, src=0)
        op, length, arg = header.tolist()
        if not length:
            return op, arg, []
        payload = torch.empty(length, dtype=torch.long, device=self.device)
        dist.broadcast(payload, src=0)
        return op, arg, payload.tolist()

    def send_weights(self, weights: dict[str, torch.Tensor]) -> None:
        meta = [[(name, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in weights.items()]]
        dist.broadcast_object_list(meta, src=0)
        for t in weights.values():
            dist.broadcast(t.detach().to(self.device).contiguous(), src=0)

    def recv_weights(self) -> dict[str, torch.Tensor]:
        meta = [None]
        dist.broadcast_object_list(meta, src=0)
        out = {}
        for name, shape, dtype in meta[0]:
            t = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
            dist.broadcast(t, src=0)
            out[name] = t
        return out
