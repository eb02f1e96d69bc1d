"""Attention over a paged KV cache.

`AttentionMetadata` is built by the model runner from plain scheduler data and passed explicitly to every
layer. `paged_attention` is the pure-PyTorch reference: it runs on any device and is the test oracle; a faster
backend can replace it behind the same signature.

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
    """Sequences attended together: queries padded to q_len, keys gathered to kv_len."""
    token_index: torch.Tensor   # [num_seqs, q_len] rows of the flat token batch (padding repeats a valid row)
    q_valid: torch.Tensor | None  # [num_seqs, q_len] bool; None when every row is valid
    kv_slots: torch.Tensor      # [num_seqs, kv_len] cache slots (padding points at the null block)
    mask: torch.Tensor          # [num_seqs, 1, q_len, kv_len] bool, True = may attend


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor          # [num_tokens] where each new token's K/V is written
    groups: list[AttentionGroup]


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    k_cache.index_copy_(0, slot_mapping, k)
    v_cache.index_copy_(0, slot_mapping, v)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [num_tokens, num_heads, head_dim] -> [num_tokens, num_heads, head_dim]."""
    out = torch.empty_like(q)
    for g in meta.groups:
        qg = q[g.token_index].transpose(1, 2)            # [num_seqs, num_heads, q_len, head_dim]
        kg = k_cache[g.kv_slots].transpose(1, 2)         # [num_seqs, num_kv_heads, kv_len, head_dim]
        vg = v_cache[g.kv_slots].transpose(1, 2)
        og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask, scale=scale,
                                            enable_gqa=qg.shape[1] != kg.shape[1])
        og = og.transpose(1, 2)                          # [num_seqs, q_len, num_heads, head_dim]
        if g.q_valid is None:
            out[g.token_index.reshape(-1)] = og.reshape(-1, *q.shape[1:])
        else:
            out[g.token_index[g.q_valid]] = og[g.q_valid]
    return out
