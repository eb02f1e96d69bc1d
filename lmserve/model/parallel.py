"""Megatron-style tensor parallelism on torch.distributed: which slice of each weight a rank holds, and the two
collectives the model needs (an all-reduce after each row-parallel matmul and the vocab-parallel embedding, an
all-gather of the output projection's logits).

Layout for a rank r of tp ranks (one process group: the whole world):
  - fused q/k/v and gate/up projections are column-parallel: rank r holds heads [r*H/tp, (r+1)*H/tp) and
    intermediate rows [r*I/tp, (r+1)*I/tp); nothing is communicated.
  - o_proj and down_proj are row-parallel: rank r holds the matching input columns and produces a partial sum;
    one all-reduce each (layers.RowParallelLinear).
  - KV heads are split like query heads; when tp > num_kv_heads each rank holds the one KV head its query heads
    use (tp / num_kv_heads ranks replicate it), so attention needs no communication.
  - the embedding and the output projection are split over the vocabulary (padded to a multiple of tp): lookup
    rows outside the shard are zero and summed by an all-reduce; logits are all-gathered, only for the rows that
    are scored.
Norms and everything else are replicated. The ArchConfig keeps the full model's sizes plus tp_rank / tp_size;
the functions here derive the per-rank ones.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from lmserve.config import TPConfigError
from lmserve.model.layers import deferring
from lmserve.ops.linear_method import FloatLinear, LinearMethod


# NOTE: an architecture joins once a tp=2 == tp=1 test covers it (tests/test_tensor_parallel.py): its weight names
# must be ones shard_spec knows, and anything it adds must be per head or replicated.
TP_ARCHITECTURES = ("llama", "qwen2", "mistral", "qwen3")


def validate_tp(cfg, tp_size: int) -> None:
    """One clear error when this model cannot be split tp_size ways."""
    if tp_size < 1:
        raise ValueError("tp must be >= 1")
    if tp_size == 1:
        return
    if cfg.architecture not in TP_ARCHITECTURES or getattr(cfg, "num_experts", 0):
        raise TPConfigError(f"tp: {cfg.architecture} models are not split yet (tensor parallelism supports "
                            f"{', '.join(TP_ARCHITECTURES)}); use --tp 1")
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    if heads % tp_size:
        raise TPConfigError(f"tp: {tp_size} does not divide the model's {heads} attention heads")
    if kv >= tp_size and kv % tp_size:
        raise TPConfigError(f"tp: {tp_size} does not divide the model's {kv} key/value heads")
    if kv < tp_size and tp_size % kv:
        raise TPConfigError(f"tp: {tp_size} is not a multiple of the model's {kv} key/value heads")
    if cfg.intermediate_size % tp_size:
        raise TPConfigError(f"tp: {tp_size} does not divide the MLP size {cfg.intermediate_size}")


def num_local_heads(cfg) -> int:
    return cfg.num_attention_heads // cfg.tp_size


def num_local_kv_heads(cfg) -> int:
    return max(1, cfg.num_key_value_heads // cfg.tp_size)


def kv_head_start(cfg) -> int:
    """First KV head of this rank: its query heads' group (several ranks share one head when tp > kv heads)."""
    if cfg.num_key_value_heads >= cfg.tp_size:
        return cfg.tp_rank * num_local_kv_heads(cfg)
    return cfg.tp_rank * cfg.num_key_value_heads // cfg.tp_size


def local_intermediate(cfg) -> int:
    return cfg.intermediate_size // cfg.tp_size


def vocab_shard(cfg) -> tuple[int, int]:
    """(first vocabulary row, padded rows per rank)."""
    per_rank = -(-cfg.vocab_size // cfg.tp_size)
    return cfg.tp_rank * per_rank, per_rank


def shard_spec(name: str, cfg) -> tuple[int, int, int] | None:
    """HF parameter name -> (dim, start, size) of this rank's slice of the full tensor; None = replicated.
    `size` may run past the end of the full tensor (padded vocabulary): the slice is zero-padded."""
    if cfg.tp_size == 1:
        return None
    parts = name.split(".")
    module, kind = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", "")
    hd = cfg.head_dim
    if module == "q_proj":
        return 0, cfg.tp_rank * num_local_heads(cfg) * hd, num_local_heads(cfg) * hd
    if module in ("k_proj", "v_proj"):
        return 0, kv_head_start(cfg) * hd, num_local_kv_heads(cfg) * hd
    if module in ("gate_proj", "up_proj"):
        return 0, cfg.tp_rank * local_intermediate(cfg), local_intermediate(cfg)
    if module == "o_proj" and kind == "weight":
        return 1, cfg.tp_rank * num_local_heads(cfg) * hd, num_local_heads(cfg) * hd
    if module == "down_proj" and kind == "weight":
        return 1, cfg.tp_rank * local_intermediate(cfg), local_intermediate(cfg)
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        start, size = vocab_shard(cfg)
        return 0, start, size
    return None


def shard_tensor(name: str, tensor: torch.Tensor, cfg) -> torch.Tensor:
    """This rank's slice of a full HF tensor (a tensor already of the local shape is returned as is)."""
    spec = shard_spec(name, cfg)
    if spec is None:
        return tensor
    dim, start, size = spec
    if tensor.shape[dim] == size:   # NOTE: full == local only when the slice is the whole tensor
        return tensor
    return slice_padded(tensor, dim, start, size)


def slice_padded(tensor: torch.Tensor, dim: int, start: int, size: int) -> torch.Tensor:
    avail = max(0, min(size, tensor.shape[dim] - start))
    part = tensor.narrow(dim, start, avail) if avail else tensor.narrow(dim, 0, 0)
    if avail == size:
        return part
    pad_shape = list(tensor.shape)
    pad_shape[dim] = size - avail
    return torch.cat([part, tensor.new_zeros(pad_shape)], dim=dim)


# ---- collectives --------------------------------------------------------------------------------------------
def all_reduce(x: torch.Tensor, tp_size: int) -> torch.Tensor:
    if tp_size > 1:
        dist.all_reduce(x)
    return x


def gather_vocab(logits: torch.Tensor, cfg) -> torch.Tensor:
    """[n, vocab / tp] on each rank -> [n, vocab] on every rank (padding columns dropped)."""
    if cfg.tp_size == 1:
        return logits
    logits = logits.contiguous()
    parts = [torch.empty_like(logits) for _ in range(cfg.tp_size)]
    dist.all_gather(parts, logits)
    return torch.cat(parts, dim=-1)[:, :cfg.vocab_size]


class VocabParallelEmbedding(nn.Module):
    """nn.Embedding split over the vocabulary; `weight` is this rank's (padded) rows, so a tied output projection
    uses it unchanged. Rows are looked up through the LinearMethod (ops/linear_method.py): from the float weight
    or from the GGUF blocks (then `weight` is a meta tensor), and a tied head multiplies with the same method."""

    def __init__(self, cfg):
        super().__init__()
        self.tp_size = cfg.tp_size
        self.vocab_start, per_rank = vocab_shard(cfg)
        self.weight = nn.Parameter(torch.empty(per_rank, cfg.hidden_size, device="meta" if deferring() else None))
        self.linear_method: LinearMethod = FloatLinear(self.weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:   # [num_tokens] -> [num_tokens, hidden]
        if self.tp_size == 1:
            return self.linear_method.embed(input_ids)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = self.linear_method.embed(local.masked_fill(outside, 0))
        x.masked_fill_(outside.unsqueeze(-1), 0)
        return all_reduce(x, self.tp_size)
