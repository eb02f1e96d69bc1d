"""rms_norm and add_rms_norm (the residual add fused into the norm)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lmserve.ops.base import CustomOp, cpu_lib, register


@register
class RMSNormOp(CustomOp):
    name = "rms_norm"

    def forward_native(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)

    def forward_cpu(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out = torch.empty_like(x)
        cpu_lib().rms_norm(out, x.contiguous(), weight, eps)
        return out


@register
class AddRMSNormOp(CustomOp):
    name = "add_rms_norm"

    def forward_native(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
        residual = x + residual
        return F.rms_norm(residual, (x.shape[-1],), weight, eps), residual

    def forward_cpu(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
        # in place: x <- rms_norm(x + residual), residual <- x + residual (one pass over both)
        cpu_lib().add_rms_norm(x, residual, weight, eps)
        return x, residual
