"""Gated activations on a fused [gate | up] matmul output: silu_mul (SwiGLU), gelu_mul (GeGLU)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lmserve.ops.base import CustomOp, cpu_lib, register


@register
class SiluMulOp(CustomOp):
    name = "silu_mul"

    def forward_native(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def forward_cpu(self, gate_up: torch.Tensor) -> torch.Tensor:
        out = torch.empty(gate_up.shape[0], gate_up.shape[1] // 2, dtype=gate_up.dtype, device=gate_up.device)
        cpu_lib().silu_mul(out, gate_up)
        return out


@register
class GeluMulOp(CustomOp):
    name = "gelu_mul"

    def forward_native(self, gate_up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.gelu(gate, approximate=approximate) * up
