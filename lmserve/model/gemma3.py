"""Gemma 3 (text): embeddings scaled by sqrt(hidden), GeGLU MLP, RMSNorm scaling by (1 + weight), norms before
and after both attention and MLP, q/k norms, and sliding-window (local) layers interleaved with global ones, each
kind with its own RoPE base.

NOTE: checkpoints store a norm's weight as w with the multiplier 1 + w; the parameters here hold 1 + w, so the
shared RMSNorm (ops.rms_norm, reference or kernel) runs unchanged. `map_weight` adds the 1.
"""
from __future__ import annotations

import torch

from lmserve.model.attention import AttentionMetadata
from lmserve.model.layers import GatedMLP, RMSNorm, RotaryEmbedding
from lmserve.model.llama import LlamaForCausalLM
from lmserve.model.qwen3 import QKNormAttention


class Gemma3DecoderLayer(torch.nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        hidden, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.is_sliding = cfg.layer_window(layer_idx) is not None
        self.input_layernorm = RMSNorm(hidden, eps)
        self.self_attn = QKNormAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps)
        self.mlp = GatedMLP(hidden, cfg.intermediate_size, cfg.hidden_act)
        self.post_feedforward_layernorm = RMSNorm(hidden, eps)

    def forward(self, positions, x, residual, meta, kv_cache):
        """-> (this layer's normed MLP output, residual stream before it), like the Llama layer."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.post_attention_layernorm(self.self_attn(positions, x, meta, kv_cache))
        x, residual = self.pre_feedforward_layernorm(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class Gemma3ForCausalLM(LlamaForCausalLM):
    layer_cls = Gemma3DecoderLayer

    def __init__(self, cfg):
        super().__init__(cfg)
        self.local_rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_local_theta)
        # transformers multiplies by sqrt(hidden) rounded to the weights' dtype
        self.embed_scale = cfg.hidden_size ** 0.5

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches, mm_embeds: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """mm_embeds: (rows, image embeddings) replacing those rows after the scaling (Gemma 3 vision)."""
        x = self.embed(input_ids)
        if mm_embeds is not None:
            x[mm_embeds[0]] = mm_embeds[1].to(x.dtype)
        return self.run_layers(x, positions, meta, kv_caches)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        emb = self.model.embed_tokens(input_ids)
        return emb * torch.tensor(self.embed_scale, dtype=emb.dtype)

    def rope_tables(self, positions, dtype):
        """global layers' RoPE, then the sliding (local) layers' own base"""
        return [self.model.rotary.lookup(positions, dtype), self.local_rotary.lookup(positions, dtype)]

    def layer_rope(self, layer) -> int:
        return int(layer.is_sliding)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        cap = self.cfg.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def map_weight(self, name, tensor, params):
        if name.endswith("norm.weight"):
            tensor = tensor + 1
        return super().map_weight(name, tensor, params)
