"""Architecture name -> model class. Adding an architecture is one file plus one line here."""
from __future__ import annotations

from torch import nn

from lmserve.model.llama import LlamaForCausalLM

_REGISTRY: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,     # + q/k/v bias (ArchConfig.attention_bias)
    "mistral": LlamaForCausalLM,   # + sliding window (ArchConfig.sliding_window, applied in the attention mask)
}


def get_model_class(architecture: str) -> type[nn.Module]:
    try:
        return _REGISTRY[architecture]
    except KeyError:
        raise ValueError(f"architecture {architecture!r} is not supported; supported: {sorted(_REGISTRY)}") from None
