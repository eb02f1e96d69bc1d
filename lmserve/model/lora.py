"""LoRA adapters in peft's format (`adapter_config.json` + `adapter_model.safetensors`) and the grouped delta.

A step may mix rows of several adapters and of the base model. With the rows sorted by adapter, each linear layer
adds, per adapter present, one pair of small matmuls on that adapter's contiguous rows (as model/moe.py groups
rows by expert): out[rows] += scaling * (x[rows] @ A.T) @ B.T. Rows of the base model get nothing added.

The serving side (which adapters exist, which rows use which) is engine/lora_manager.py: it installs a LoraHook
on every linear layer peft can target (Linear.forward calls it after its LinearMethod, so float and GGUF layers
alike) and sets the step's row groups with `lora_step` around the forward pass.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
from dataclasses import dataclass, field

import torch

# peft's module names in the decoders of model/llama.py and their kin
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


class LoraError(ValueError):
    """A bad adapter (missing files, a rank over the limit, shapes that do not fit the base model)."""


@dataclass
class LoraAdapter:
    name: str
    rank: int
    scaling: float
    # (layer index, module name) -> (A [rank, in_features], B [out_features, rank])
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def load_peft_adapter(name: str, path: str, max_rank: int, dtype: torch.dtype = torch.float32) -> LoraAdapter:
    from safetensors.torch import load_file
    config_path = os.path.join(path, "adapter_config.json")
    weights_path = os.path.join(path, "adapter_model.safetensors")
    for f in (config_path, weights_path):
        if not os.path.isfile(f):
            raise LoraError(f"adapter {name!r}: {f} not found (peft's format is adapter_config.json + "
                            "adapter_model.safetensors)")
    with open(config_path) as f:
        cfg = json.load(f)
    rank, alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    if rank > max_rank:
        raise LoraError(f"adapter {name!r}: rank {rank} is over --max-lora-rank {max_rank}")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern") or cfg.get("use_dora"):
        raise LoraError(f"adapter {name!r}: per-module ranks/alphas and DoRA are not supported")
    scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    pieces: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(weights_path).items():
        m = _KEY.search(key)
        if m is None or m.group(2) not in TARGETS:
            raise LoraError(f"adapter {name!r}: weight {key!r} is not a LoRA A/B of a supported linear layer "
                            f"({', '.join(TARGETS)})")
        pieces.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = tensor.to(dtype)
    adapter = LoraAdapter(name, rank, scaling)
    for where, ab in pieces.items():
        if set(ab) != {"A", "B"}:
            raise LoraError(f"adapter {name!r}: layer {where[0]} {where[1]} lacks lora_A or lora_B")
        a, b = ab["A"], ab["B"]
        if a.shape[0] != rank or b.shape[1] != rank:
            raise LoraError(f"adapter {name!r}: layer {where[0]} {where[1]} has rank {a.shape[0]}, config says {rank}")
        adapter.weights[where] = (a.contiguous(), b.contiguous())
    return adapter


def check_shapes(adapter: LoraAdapter, shapes: dict[tuple[int, str], tuple[int, int]]) -> None:
    """shapes: (layer, module) -> the base layer's (out_features, in_features)."""
    for where, (a, b) in adapter.weights.items():
        if where not in shapes:
            raise LoraError(f"adapter {adapter.name!r}: the base model has no layer {where[0]} {where[1]}")
        out_f, in_f = shapes[where]
        if a.shape[1] != in_f or b.shape[0] != out_f:
            raise LoraError(f"adapter {adapter.name!r}: layer {where[0]} {where[1]} is {b.shape[0]}x{a.shape[1]}, "
                            f"the base model's is {out_f}x{in_f}")


def add_grouped_delta(x: torch.Tensor, out: torch.Tensor,
                      groups: list[tuple[int, int, torch.Tensor, torch.Tensor, float]]) -> torch.Tensor:
    """x: [rows, in], out: [rows, out] (the base layer's output, added to in place). groups: (first row, end row,
    A, B, scaling) per adapter present, rows sorted by adapter; rows outside every group are the base model's."""
    for start, end, a, b, scaling in groups:
        if end > start:
            out[start:end].addmm_(x[start:end] @ a.T, b.T, alpha=scaling)
    return out


# The current forward pass's row groups: (adapter, rows), rows a slice or an index tensor. Set by the model runner
# around one forward (lora_step); empty when no row of the step uses an adapter, so the hooks then cost nothing.
_step: list[tuple[LoraAdapter, slice | torch.Tensor]] = []


@contextlib.contextmanager
def lora_step(groups: list[tuple[LoraAdapter, slice | torch.Tensor]]):
    global _step
    _step = groups
    try:
        yield
    finally:
        _step = []


class LoraHook:
    """The grouped delta after one base linear layer. `parts`: the peft modules the layer holds, as (module name,
    first output column, columns): q/k/v share the fused qkv_proj, gate/up the fused gate_up_proj."""

    def __init__(self, layer: int, parts: list[tuple[str, int, int]]):
        self.layer, self.parts = layer, parts

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        for adapter, rows in _step:
            xs = x[rows]
            for module, col, size in self.parts:
                ab = adapter.weights.get((self.layer, module))
                if ab is None:
                    continue
                a, b = ab
                cols = out[:, col:col + size]          # a view: the adds land in `out`
                if isinstance(rows, slice):
                    cols[rows].addmm_(xs @ a.T, b.T, alpha=adapter.scaling)
                else:
                    cols.index_add_(0, rows, (xs @ a.T) @ b.T, alpha=adapter.scaling)
        return out


def install_hooks(model) -> dict[tuple[int, str], tuple[int, int]]:
    """A LoraHook on every linear layer of `model` (a model/llama.py decoder) that a peft module maps to.
    -> (layer, peft module) -> the base layer's (out_features, in_features), for check_shapes."""
    fused = model.fused_slices()
    shapes: dict[tuple[int, str], tuple[int, int]] = {}
    for i, layer in enumerate(model.model.layers):
        homes = {"qkv_proj": layer.self_attn, "o_proj": layer.self_attn,
                 "gate_up_proj": getattr(layer, "mlp", None), "down_proj": getattr(layer, "mlp", None)}
        by_linear: dict[str, tuple[torch.nn.Module, list]] = {}
        for module in TARGETS:
            home_name, start, size = fused.get(module, (module, 0, None))
            linear = getattr(homes.get(home_name), home_name, None)
            if not isinstance(getattr(linear, "out_features", None), int):
                continue                               # e.g. a mixture-of-experts MLP: not a target here
            size = size or linear.out_features
            by_linear.setdefault(home_name, (linear, []))[1].append((module, start, size))
            shapes[(i, module)] = (size, linear.in_features)
        for linear, parts in by_linear.values():
            linear.lora = LoraHook(i, parts)
    return shapes
