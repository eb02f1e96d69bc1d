"""Attention over a paged KV cache.

`AttentionMetadata` is built by the model runner from plain scheduler data and passed explicitly to every
layer. `paged_attention` runs the pure-PyTorch reference (any device; the test oracle) or, for decode rows on
CPU in float32, the C++ kernel from cpu_kernels.py behind the same signature.

KV cache layout per layer: [num_blocks * block_size, num_kv_heads, head_dim]; token t of a sequence lives at
slot `block_table[t // block_size] * block_size + t % block_size`. Block 0 is the null block (zeros), used as
the padding target of gathers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionGroup:
    """Sequences attended together by the reference path: queries padded to q_len, keys gathered to kv_len."""
    token_index: torch.Tensor   # [num_seqs, q_len] rows of the flat token batch
    kv_slots: torch.Tensor      # [num_seqs, kv_len] cache slots (padding points at the null block)
    mask: torch.Tensor          # [num_seqs, 1, q_len, kv_len] bool, True = may attend
    # the same without the sliding window, for full-attention layers of models that mix both (gemma3)
    full_mask: torch.Tensor | None = None


@dataclass
class DecodeBatch:
    """Sequences with one new token each, for the C++ kernel."""
    token_rows: torch.Tensor | None   # [num_seqs] rows of the flat batch; None = all rows, in order
    block_tables: torch.Tensor        # [num_seqs, max_blocks] int64
    context_lens: torch.Tensor        # [num_seqs] int64, including the new token


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor          # [num_tokens] where each new token's K/V is written
    groups: list[AttentionGroup]        # handled by the reference path
    decode: DecodeBatch | None = None   # handled by the kernel
    block_size: int = 16
    sliding_window: int | None = None     # the window of sliding layers; `mask` applies it already
    kernel: object | None = None
    rope_cos: torch.Tensor | None = None   # [num_tokens, 1, head_dim / 2], set by the model once per step
    rope_sin: torch.Tensor | None = None


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    k_cache.index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float, full_attention: bool = False) -> torch.Tensor:
    """q: [num_tokens, num_heads, head_dim] -> [num_tokens, num_heads, head_dim].

    full_attention: this layer ignores meta.sliding_window (the global layers of gemma3)."""
    d = meta.decode
    window = 0 if full_attention else (meta.sliding_window or 0)
    if d is not None and d.token_rows is None and not meta.groups:
        out = torch.empty_like(q)
        meta.kernel.paged_decode_attention(out, q.contiguous(), k_cache, v_cache, d.block_tables, d.context_lens,
                                           meta.block_size, scale, window)
        return out
    out = torch.empty_like(q)
    if d is not None:
        od = torch.empty((d.token_rows.shape[0], *q.shape[1:]), dtype=q.dtype, device=q.device)
        meta.kernel.paged_decode_attention(od, q[d.token_rows].contiguous(), k_cache, v_cache, d.block_tables,
                                           d.context_lens, meta.block_size, scale, window)
        out[d.token_rows] = od
    for g in meta.groups:
        qg = q[g.token_index].transpose(1, 2)            # [num_seqs, num_heads, q_len, head_dim]
        # [num_seqs, num_kv_heads, kv_len, head_dim]; a bfloat16 cache is widened to the query's dtype
        kg = k_cache[g.kv_slots].to(q.dtype).transpose(1, 2)
        vg = v_cache[g.kv_slots].to(q.dtype).transpose(1, 2)
        mask = g.full_mask if full_attention and g.full_mask is not None else g.mask
        og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=scale,
                                            enable_gqa=qg.shape[1] != kg.shape[1])
        out[g.token_index.reshape(-1)] = og.transpose(1, 2).reshape(-1, *q.shape[1:])
    return out
