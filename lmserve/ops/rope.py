"""Rotary embedding and the KV-cache write: apply_rope, write_kv, and rope_write_kv (both fused over a qkv row)."""
from __future__ import annotations

import torch

from lmserve.ops.base import CustomOp, cpu_lib, register


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot = 2 * cos.shape[-1]                  # < head_dim with partial rotary (phi-4-mini): the rest passes through
    if rot == x.shape[-1]:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    x1, x2 = x[..., :rot].chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rot:]), dim=-1)


@register
class ApplyRopeOp(CustomOp):
    name = "apply_rope"

    def forward_native(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        # HF rotate_half convention; q: [T, heads, head_dim], k: [T, kv_heads, head_dim], cos/sin: [T, 1, rot/2]
        # with rot = head_dim, or less for partial rotary (the dims past rot pass through)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _write_kv(k_cache, v_cache, k, v, slot_mapping) -> None:
    k_cache.index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.index_copy_(0, slot_mapping, v.to(v_cache.dtype))


@register
class WriteKVOp(CustomOp):
    name = "write_kv"

    def forward_native(self, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
        # k, v: [T, kv_heads, head_dim] -> cache rows slot_mapping [T] (cast to the cache's dtype)
        _write_kv(k_cache, v_cache, k, v, slot_mapping)


@register
class RopeWriteKVOp(CustomOp):
    name = "rope_write_kv"

    def forward_native(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int,
                       head_dim: int) -> torch.Tensor:
        t = qkv.shape[0]
        q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
        q, k = _rotate(q.view(t, num_heads, head_dim), cos, sin), _rotate(k.view(t, num_kv_heads, head_dim), cos, sin)
        _write_kv(k_cache, v_cache, k, v.view(t, num_kv_heads, head_dim), slot_mapping)
        return q

    def forward_cpu(self, qkv, cos, sin, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads, head_dim):
        q = torch.empty(qkv.shape[0], num_heads, head_dim, dtype=qkv.dtype)
        cpu_lib().rope_write_kv(q, qkv, cos, sin, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads, head_dim)
        return q
