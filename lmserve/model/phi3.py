"""Phi-3 / Phi-4-mini: the Llama decoder. Its checkpoints already fuse q/k/v (`qkv_proj`) and gate/up
(`gate_up_proj`) the way our parameters do, so they load as they are; LongRoPE ("longrope", formerly "su") and
a partial rotary factor come from ArchConfig (model/layers.py)."""
from __future__ import annotations

from lmserve.model.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    pass
