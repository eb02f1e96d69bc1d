"""Mixtral: the Llama decoder with a sparse MoE MLP (softmax router, top-k renormalised) in every layer."""
from __future__ import annotations

from lmserve.model.llama import DecoderLayer, LlamaForCausalLM
from lmserve.model.moe import moe_block

# Mixtral checkpoints' names, and those GGUF files' experts are given (model/gguf.py)
_EXPERT_NAMES = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


class MixtralDecoderLayer(DecoderLayer):
    def make_mlp(self, cfg, layer_idx: int):
        return moe_block(cfg)


class MixtralForCausalLM(LlamaForCausalLM):
    layer_cls = MixtralDecoderLayer
    expert_names = _EXPERT_NAMES

    def map_weight(self, name, tensor, params):
        name = name.replace(".block_sparse_moe.", ".mlp.")     # the pre-transformers-5 module name
        return super().map_weight(name, tensor, params)
