"""Small building blocks of decoders: RMSNorm, rotary embedding, Linear (its matmul is a LinearMethod), gated MLP.

Tensor math goes through lmserve.ops, which picks the implementation (reference or kernel) per model."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed
from torch import nn

from lmserve import ops
from lmserve.ops.linear_method import (FloatLinear, LinearMethod, fast_linear,  # noqa: F401  (re-exported)
                                      make_fast_weight)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x: [num_tokens, hidden] -> rms_norm(x); with a residual -> (rms_norm(x + residual), x + residual).

        The residual form may work in place on x and residual (ops.add_rms_norm)."""
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.add_rms_norm(x, residual, self.weight, self.eps)


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low_freq_factor, old_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _longrope_freqs(t: torch.Tensor, inv_freq: torch.Tensor, scaling: dict, max_position: int):
    """LongRoPE (Phi-3): per-frequency divisors, `short_factor` within the original context, `long_factor` beyond,
    and cos/sin scaled by an attention factor.

    NOTE: transformers picks one factor set for the whole forward from its longest position, so a prompt that
    crosses the original length re-rotates every earlier token; with a KV cache the keys already written keep
    theirs, so here the choice is per position (as a cached decode in transformers does it token by token).
    """
    orig = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or max_position / orig
    mscale = scaling.get("attention_factor")
    if mscale is None:
        mscale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    short = torch.outer(t, inv_freq / torch.tensor(scaling["short_factor"], dtype=torch.float64))
    long = torch.outer(t, inv_freq / torch.tensor(scaling["long_factor"], dtype=torch.float64))
    return torch.where((t < orig).unsqueeze(1), short, long), mscale


class RotaryEmbedding(nn.Module):
    """HF-style (rotate_half) RoPE with a precomputed cos/sin table indexed by absolute position.

    The table covers the positions used so far (at least 4096), doubled when a step needs more: a full table of
    a 128k-context model is 32-64 MiB of float32 that a server rarely reads past its first few thousand rows.
    Each row is computed the same way whatever the table's length (LongRoPE, whose factors depend on it, is
    built whole)."""
    INITIAL = 4096

    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict | None = None):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
        if rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        elif rope_type == "linear":
            inv_freq = inv_freq / scaling["factor"]
        elif rope_type not in (None, "default", "longrope"):
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported")
        self.max_position, self.inv_freq = max_position, inv_freq
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        if rope_type == "longrope":
            t = torch.arange(max_position, dtype=torch.float64)
            freqs, mscale = _longrope_freqs(t, inv_freq, scaling, max_position)
            self.cos, self.sin = (freqs.cos() * mscale).float(), (freqs.sin() * mscale).float()
            self.max_position = 0         # built whole: never grows
        else:
            self._grow(min(max_position, self.INITIAL))

    def _grow(self, n: int) -> None:
        freqs = torch.outer(torch.arange(n, dtype=torch.float64), self.inv_freq)   # [n, head_dim / 2]
        self.cos, self.sin = freqs.cos().float().to(self.cos.device), freqs.sin().float().to(self.sin.device)

    def cover(self, positions: torch.Tensor) -> None:
        """Grow the table to hold every position in `positions` (a position past the model's context fails in
        the lookup's indexing, as it always did)."""
        if self.max_position > self.cos.shape[0] and positions.numel():
            if positions.device.type != "cpu":     # no host sync per step on a GPU: the whole table, once
                self._grow(self.max_position)
                return
            need = int(positions.max()) + 1
            if need > self.cos.shape[0]:
                self._grow(min(self.max_position, max(need, 2 * self.cos.shape[0])))

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for these positions: [num_tokens, 1, head_dim / 2]. Done once per step, not per layer."""
        self.cover(positions)
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)

    @staticmethod
    def apply(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        # q: [num_tokens, num_heads, head_dim], k: [num_tokens, num_kv_heads, head_dim]
        return ops.apply_rope(q, k, cos, sin)


_deferred = 0      # > 0 while building a model whose matrices the loader supplies (see deferred_weights)


@contextlib.contextmanager
def deferred_weights():
    """Build a model without allocating its linear and embedding matrices (meta tensors): the loader then gives
    each layer its LinearMethod (GGUF blocks, or a float weight it materializes), so a float copy of a quantized
    matrix never exists, not even zero-filled."""
    global _deferred
    _deferred += 1
    try:
        yield
    finally:
        _deferred -= 1


def deferring() -> bool:
    return _deferred > 0


class Linear(nn.Linear):
    """nn.Linear whose matmul is its LinearMethod (ops/linear_method.py), picked once at load: the float weight,
    a packed copy of it, or GGUF blocks (then `weight` is a meta tensor: shape only)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias, device="meta" if deferring() else None)
        if bias and deferring():
            self.bias = nn.Parameter(torch.zeros(out_features))     # biases are float in every format
        self.linear_method: LinearMethod = FloatLinear(self.weight)

    lora = None     # model/lora.py LoraHook when LoRA adapters are served: adds their grouped delta
    packable = True  # False: keeps FloatLinear (engine/weights.py gives the others packed / bf16 copies)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear_method(x, self.bias)
        return out if self.lora is None else self.lora(x, out)


class RowParallelLinear(Linear):
    """Linear whose input features are split over tensor-parallel ranks (model/parallel.py): each rank computes a
    partial sum, one all-reduce adds them. With tp_size 1 it is a plain Linear.

    NOTE: a bias would be added tp_size times; the architectures here have none on o_proj / down_proj."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp_size: int = 1):
        super().__init__(in_features, out_features, bias=bias)
        if bias and tp_size > 1:
            raise ValueError("RowParallelLinear: a bias is not supported with tensor parallelism")
        self.tp_size = tp_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.tp_size > 1:
            torch.distributed.all_reduce(out)
        return out


_GATED = {"silu": ops.silu_mul, "gelu_pytorch_tanh": lambda gate_up: ops.gelu_mul(gate_up, "tanh")}


def gated_activation(name: str):
    """HF hidden_act name -> fn(gate_up [T, 2I]) = act(gate) * up, through lmserve.ops."""
    try:
        return _GATED[name]
    except KeyError:
        raise NotImplementedError(f"activation {name!r} is not supported; supported: {sorted(_GATED)}") from None


class GatedMLP(nn.Module):
    """Gated MLP (SwiGLU, or GeGLU with act="gelu_pytorch_tanh") with gate and up fused into one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu", tp_size: int = 1):
        """intermediate_size: this tensor-parallel rank's share (the full size / tp_size)."""
        super().__init__()
        self.intermediate_size = intermediate_size
        self.act_name, self.act = act, gated_activation(act)
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=False, tp_size=tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))
