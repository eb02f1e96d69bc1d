"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen2 (q/k/v bias) whose sparse layers add an always-on shared
expert, scaled by a sigmoid gate, to the routed experts."""
from __future__ import annotations

import torch

from lmserve.model.layers import GatedMLP, Linear
from lmserve.model.llama import DecoderLayer, LlamaForCausalLM
from lmserve.model.moe import SparseMoeBlock

_EXPERT_NAMES = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


class SharedExpertMoeBlock(SparseMoeBlock):
    """routed experts + sigmoid(x @ g) * shared_expert(x); the kernel, where one runs, computes both."""

    def __init__(self, cfg):
        super().__init__(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok,
                         cfg.norm_topk_prob, cfg.hidden_act)
        self.shared_expert = GatedMLP(cfg.hidden_size, cfg.shared_expert_intermediate_size, cfg.hidden_act)
        self.shared_expert_gate = Linear(cfg.hidden_size, 1, bias=False)
        self.shared_expert_gate.packable = False     # like the router: plain F.linear, as the kernel multiplies it

    def modules_forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return super().modules_forward(x) + shared


class Qwen2MoeDecoderLayer(DecoderLayer):
    def make_mlp(self, cfg, layer_idx: int):
        return super().make_mlp(cfg, layer_idx) if layer_idx in cfg.dense_layers else SharedExpertMoeBlock(cfg)


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    layer_cls = Qwen2MoeDecoderLayer
    expert_names = _EXPERT_NAMES

    def map_weight(self, name, tensor, params):
        if name.endswith("shared_expert_gate.weight") and tensor.dim() == 1:
            tensor = tensor.unsqueeze(0)            # a GGUF file's [hidden] vector: HF's [1, hidden] Linear
        return super().map_weight(name, tensor, params)
