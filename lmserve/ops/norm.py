"""rms_norm, add_rms_norm (the residual add fused into the norm) and rms_norm_heads (per-head q/k norms)."""
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


@register
class RMSNormHeadsOp(CustomOp):
    """In place on a fused qkv row: every q head rms-normed with q_weight, every k head with k_weight."""
    name = "rms_norm_heads"

    def forward_native(self, qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, num_heads: int,
                       num_kv_heads: int, head_dim: int, eps: float) -> torch.Tensor:
        n, q, kv = qkv.shape[0], num_heads * head_dim, num_kv_heads * head_dim
        qkv[:, :q] = F.rms_norm(qkv[:, :q].reshape(n, num_heads, head_dim), (head_dim,), q_weight, eps).view(n, q)
        qkv[:, q:q + kv] = F.rms_norm(qkv[:, q:q + kv].reshape(n, num_kv_heads, head_dim), (head_dim,), k_weight,
                                      eps).view(n, kv)
        return qkv

    def forward_cpu(self, qkv, q_weight, k_weight, num_heads, num_kv_heads, head_dim, eps):
        cpu_lib().rms_norm_heads(qkv, q_weight, k_weight, num_heads, num_kv_heads, head_dim, eps)
        return qkv
