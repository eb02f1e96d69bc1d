"""Attention metadata for one step: what the paged attention backend (model/attention.py) needs, built from the
plain ints the model runner prepared. Kept apart from the runner: one job, and the mask rules in one place."""
from __future__ import annotations

import torch

from lmserve.model.attention import AttentionGroup, AttentionMetadata, DecodeBatch


def build_attention_metadata(arch, block_size: int, dev: torch.device, slot_mapping: list[int],
                             decode_rows: list[int], decode_ctx: list[int], decode_tables: list[list[int]],
                             prefill: list[tuple[int, int, int, list[int]]], num_tokens: int,
                             image_spans: list[list[tuple[int, int]]] = ()) -> AttentionMetadata:
    """A step's plain-int layout (ModelRunner.prepare's StepBatch fields) -> the attention backend's tensors:
    the decode batch (block tables, context lengths), and per prefill chunk its KV slots and causal (sliding-window)
    mask; whole prompts of one length share one maskless group. image_spans (per prefill chunk, or empty): the
    (first, end) positions of bidirectional images, inside which the causal mask is lifted; the window still
    applies (transformers' Gemma 3 masks: full = causal | same image, sliding = that & window)."""
    bs = block_size
    windows = {arch.layer_window(i) for i in range(arch.num_hidden_layers)}
    window = max((w for w in windows if w is not None), default=None)
    mixed = window is not None and None in windows      # some layers slide, some attend to everything
    groups: list[AttentionGroup] = []
    decode = None

    def masks(mask, q_pos, kv_pos):
        """(mask with the window where there is one, the full causal mask when layers differ)"""
        if window is None:
            return mask, None
        return mask & (kv_pos > q_pos - window), (mask if mixed else None)
    if decode_rows:
        max_blocks = max(len(t) for t in decode_tables)
        decode = DecodeBatch(
            token_rows=None if len(decode_rows) == num_tokens else torch.tensor(decode_rows, device=dev),
            block_tables=torch.tensor([t + [0] * (max_blocks - len(t)) for t in decode_tables],
                                      dtype=torch.long, device=dev),
            context_lens=torch.tensor(decode_ctx, dtype=torch.long, device=dev))
    whole: dict[int, list[tuple[int, list[int]]]] = {}   # prompt length -> (row, block table)
    for i, (row, n, start, bt) in enumerate(prefill):
        spans = image_spans[i] if image_spans else []
        if start == 0 and window is None and not spans:
            whole.setdefault(n, []).append((row, bt))
            continue
        kv_len = start + n
        pos = torch.arange(kv_len, device=dev)
        table = torch.tensor(bt, dtype=torch.long, device=dev)
        slots = table[pos // bs] * bs + pos % bs
        q_pos = torch.arange(start, kv_len, device=dev).unsqueeze(1)   # [n, 1]
        causal = pos.unsqueeze(0) <= q_pos                                       # [n, kv_len]
        for lo, hi in spans:
            causal |= ((q_pos >= lo) & (q_pos < hi)) & ((pos >= lo) & (pos < hi)).unsqueeze(0)
        mask, full = masks(causal, q_pos, pos.unsqueeze(0))
        groups.append(AttentionGroup(token_index=torch.arange(row, row + n, device=dev).unsqueeze(0),
                                     kv_slots=slots.unsqueeze(0), mask=mask[None, None],
                                     full_mask=None if full is None else full[None, None],
                                     causal_start=start if window is None and not spans else None))
    for n, members in whole.items():   # NOTE: a burst's prompts of one length: one causal call, no mask
        pos = torch.arange(n, device=dev)
        tables = torch.tensor([bt[:(n + bs - 1) // bs] for _, bt in members], dtype=torch.long, device=dev)
        groups.append(AttentionGroup(torch.tensor([r for r, _ in members], device=dev).unsqueeze(1) + pos,
                                     tables[:, pos // bs] * bs + pos % bs, mask=None))
    return AttentionMetadata(torch.tensor(slot_mapping, dtype=torch.long, device=dev), groups, decode,
                             block_size=bs, sliding_window=window)
