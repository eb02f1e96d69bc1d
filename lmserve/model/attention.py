"""Attention over a paged KV cache.

`AttentionMetadata` is built by the model runner from plain scheduler data and passed explicitly to every
layer. `paged_attention` splits a mixed batch into its decode rows (ops.decode_attention) and its prefill groups
(ops.prefill_attention); lmserve.ops picks the reference or a kernel for each.

KV cache layout per layer: [num_blocks * block_size, num_kv_heads, head_dim]; token t of a sequence lives at
slot `block_table[t // block_size] * block_size + t % block_size`. Block 0 is the null block (zeros), used as
the padding target of gathers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lmserve import ops


@dataclass
class AttentionGroup:
    """Sequences attended together (prefill): queries padded to q_len, keys gathered to kv_len."""
    token_index: torch.Tensor   # [num_seqs, q_len] rows of the flat token batch
    kv_slots: torch.Tensor      # [num_seqs, kv_len] cache slots (padding points at the null block)
    # [num_seqs, 1, q_len, kv_len] bool, True = may attend; None = plain causal with q_len == kv_len (whole
    # prompts of one length from position 0, no window): SDPA's is_causal path, a fused kernel, no mask tensor
    mask: torch.Tensor | None
    # the same without the sliding window, for full-attention layers of models that mix both (gemma3)
    full_mask: torch.Tensor | None = None
    # set where `mask` is plain causal (no window, no image span) for one sequence whose queries sit at positions
    # causal_start.. of its kv_len keys (a later chunk, a prefix-cache hit): the causal kernel's offset
    causal_start: int | None = None


@dataclass
class DecodeBatch:
    """Sequences with one new token each."""
    token_rows: torch.Tensor | None   # [num_seqs] rows of the flat batch; None = all rows, in order
    block_tables: torch.Tensor        # [num_seqs, max_blocks] int64
    context_lens: torch.Tensor        # [num_seqs] int64, including the new token


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor          # [num_tokens] where each new token's K/V is written
    groups: list[AttentionGroup]        # ops.prefill_attention
    decode: DecodeBatch | None = None   # ops.decode_attention
    block_size: int = 16
    sliding_window: int | None = None     # the window of sliding layers; `mask` applies it already
    rope_cos: torch.Tensor | None = None   # [num_tokens, 1, head_dim / 2], set by the model once per step
    rope_sin: torch.Tensor | None = None


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float, full_attention: bool = False) -> torch.Tensor:
    """q: [num_tokens, num_heads, head_dim] -> [num_tokens, num_heads, head_dim].

    full_attention: this layer ignores meta.sliding_window (the global layers of gemma3)."""
    d = meta.decode
    window = None if full_attention else meta.sliding_window
    if d is not None and d.token_rows is None and not meta.groups:
        return ops.decode_attention(q, k_cache, v_cache, d, meta.block_size, scale, window)
    out = torch.empty_like(q)
    if d is not None:
        out[d.token_rows] = ops.decode_attention(q[d.token_rows], k_cache, v_cache, d, meta.block_size, scale, window)
    for g in meta.groups:
        group = g
        if full_attention and g.full_mask is not None:
            group = AttentionGroup(g.token_index, g.kv_slots, g.full_mask)
        out[g.token_index.reshape(-1)] = ops.prefill_attention(q, k_cache, v_cache, group, scale)
    return out
