"""Attention over the paged KV cache: decode_attention (one new token per sequence) and prefill_attention
(a group of sequences with several new tokens each, under a mask).

Cache layout per layer: [num_blocks * block_size, num_kv_heads, head_dim], block 0 the all-zero null block.
The metadata types (DecodeBatch, AttentionGroup) live in lmserve/model/attention.py; ops only read their fields.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lmserve.ops.base import CustomOp, cpu_lib, register


def _sdpa(q, k_cache, v_cache, kv_slots, mask, scale) -> torch.Tensor:
    """q: [S, heads, q_len, hd]; kv_slots: [S, kv_len]; mask: [S, 1, q_len, kv_len] or None
    (causal, q_len == kv_len) -> [S, heads, q_len, hd]."""
    # [S, kv_heads, kv_len, head_dim]; a bfloat16 cache is widened to the query's dtype
    k = k_cache[kv_slots].to(q.dtype).transpose(1, 2)
    v = v_cache[kv_slots].to(q.dtype).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def _decode_gather(decode, block_size: int, window: int | None):
    """(kv_slots [S, max_ctx], mask [S, 1, 1, max_ctx]) of a DecodeBatch; computed once per step and window, not
    per layer (cached on the batch object)."""
    cache = decode.__dict__.setdefault("_gather", {})
    if window in cache:
        return cache[window]
    ctx = decode.context_lens.unsqueeze(1)                                   # [S, 1]
    max_ctx = int(decode.context_lens.max())
    pos = torch.arange(max_ctx, device=ctx.device)
    valid = pos.unsqueeze(0) < ctx                                           # [S, max_ctx]
    slots = decode.block_tables[:, pos // block_size] * block_size + pos % block_size
    mask = valid if window is None else valid & (pos.unsqueeze(0) > ctx - 1 - window)
    cache[window] = (torch.where(valid, slots, 0), mask[:, None, None, :])
    return cache[window]


@register
class DecodeAttentionOp(CustomOp):
    name = "decode_attention"

    def forward_native(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, decode,
                       block_size: int, scale: float, sliding_window: int | None = None) -> torch.Tensor:
        """q: [S, heads, hd], one row per sequence of `decode` -> [S, heads, hd]."""
        slots, mask = _decode_gather(decode, block_size, sliding_window)
        return _sdpa(q.unsqueeze(2), k_cache, v_cache, slots, mask, scale).squeeze(2)

    def forward_cpu(self, q, k_cache, v_cache, decode, block_size, scale, sliding_window=None):
        # reads K/V in place through the block table: no gathered copy of the context per layer
        out = torch.empty_like(q)
        cpu_lib().paged_decode_attention(out, q.contiguous(), k_cache, v_cache, decode.block_tables,
                                         decode.context_lens, block_size, scale, sliding_window or 0)
        return out


PREFILL_KERNEL = True   # False sends every prefill group to SDPA (benchmarks/prefill_attention_ab.py)


@register
class PrefillAttentionOp(CustomOp):
    name = "prefill_attention"

    def forward_native(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group,
                       scale: float) -> torch.Tensor:
        """q: [num_tokens, heads, hd] (the whole flat batch) -> [S * q_len, heads, hd], the rows of
        group.token_index.reshape(-1) in that order."""
        qg = q[group.token_index].transpose(1, 2)                 # [S, heads, q_len, hd]
        og = _sdpa(qg, k_cache, v_cache, group.kv_slots, group.mask, scale)
        return og.transpose(1, 2).reshape(-1, *q.shape[1:])

    def forward_cpu(self, q, k_cache, v_cache, group, scale):
        # every plain causal group (whole prompts, later chunks, the rest after a prefix-cache hit) in the
        # online-softmax kernel: one code path whatever the split, so a prompt's greedy tokens do not depend on
        # what was cached; windows and image spans carry other masks and stay on SDPA
        start = 0 if group.mask is None else group.causal_start
        if start is None or not PREFILL_KERNEL or q.shape[1] % k_cache.shape[1]:
            return self.forward_native(q, k_cache, v_cache, group, scale)
        qg = q[group.token_index]                                  # [S, q_len, heads, hd]
        out = torch.empty_like(qg)
        # K/V read in place through the slots [S, start + q_len]: no gathered float copy of the context
        cpu_lib().causal_prefill_attention(out, qg, k_cache, v_cache, group.kv_slots.contiguous(), scale, start)
        return out.reshape(-1, *q.shape[1:])
