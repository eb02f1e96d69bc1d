"""Qwen3-MoE: Qwen3 (q/k norm) with a sparse MoE MLP in the layers the config makes sparse."""
from __future__ import annotations

from lmserve.model.llama import LlamaForCausalLM
from lmserve.model.moe import moe_block
from lmserve.model.qwen3 import Qwen3DecoderLayer

_EXPERT_NAMES = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


class Qwen3MoeDecoderLayer(Qwen3DecoderLayer):
    def make_mlp(self, cfg, layer_idx: int):
        return super().make_mlp(cfg, layer_idx) if layer_idx in cfg.dense_layers else moe_block(cfg)


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    layer_cls = Qwen3MoeDecoderLayer
    expert_names = _EXPERT_NAMES
