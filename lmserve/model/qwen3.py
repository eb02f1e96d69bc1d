"""Qwen3: the Llama decoder plus an RMSNorm over each query and key head before RoPE (and no q/k/v bias)."""
from __future__ import annotations

import torch

from lmserve import ops
from lmserve.model.layers import RMSNorm
from lmserve.model.llama import Attention, DecoderLayer, LlamaForCausalLM


class QKNormAttention(Attention):
    """Attention whose q and k heads are RMS-normalised (own weights, over head_dim) before RoPE."""

    def __init__(self, cfg, layer_idx: int = 0):
        super().__init__(cfg, layer_idx)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def norm_qk(self, qkv: torch.Tensor) -> None:
        # in place, so the fused RoPE + KV-write kernel still reads one [num_tokens, q + k + v] tensor
        ops.rms_norm_heads(qkv, self.q_norm.weight, self.k_norm.weight, self.num_heads, self.num_kv_heads,
                           self.head_dim, self.q_norm.eps)


class Qwen3DecoderLayer(DecoderLayer):
    attn_cls = QKNormAttention


class Qwen3ForCausalLM(LlamaForCausalLM):
    layer_cls = Qwen3DecoderLayer
