"""The part every vision-language model shares: a decoder whose token embeddings at image-token rows are replaced
by the vision encoder's output (the engine hands them in as `mm_embeds`; engine/mm_runner.py), and checkpoint
names that nest the decoder under a prefix. A model file adds its tower, its projector and `encode_images`."""
from __future__ import annotations

import torch

from lmserve.model.attention import AttentionMetadata
from lmserve.model.llama import KVCache, LlamaForCausalLM

# checkpoint prefixes of the decoder, in the hub's and transformers 5's namings -> ours
TEXT_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                 ("language_model.lm_head.", "lm_head."), ("model.text_model.", "model."), ("language_model.", ""))


def text_weight_name(name: str) -> str:
    for old, new in TEXT_PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


class VLMForCausalLM(LlamaForCausalLM):
    # checkpoint prefix -> our module for the vision parts (the longest matching prefix wins)
    vision_prefixes: dict[str, str] = {}

    def encode_images(self, items: list[dict]) -> list[torch.Tensor]:
        """Each item's processor tensors -> its image-token embeddings [tokens, hidden]."""
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[KVCache], mm_embeds: tuple[torch.Tensor, torch.Tensor] | None = None):
        """mm_embeds: (rows, embeddings [len(rows), hidden]) replacing those rows' token embeddings."""
        x = self.model.embed_tokens(input_ids)
        if mm_embeds is not None:
            x[mm_embeds[0]] = mm_embeds[1].to(x.dtype)
        meta.rope_cos, meta.rope_sin = self.model.rotary.lookup(positions, x.dtype)
        residual = None
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            x, residual = layer(positions, x, residual, meta, kv_cache)
        return self.model.norm(x, residual)[0]

    def map_weight(self, name: str, tensor: torch.Tensor, params: dict):
        for prefix in sorted(self.vision_prefixes, key=len, reverse=True):
            if name.startswith(prefix):
                sub = self.vision_prefixes[prefix] + name[len(prefix):]
                if "position_ids" in sub or ".head." in sub:
                    return None    # buffers, and SigLIP's pooling head (unused by VLMs)
                if sub not in params:
                    raise KeyError(f"unexpected weight {name!r}")
                return params[sub], tensor
        return super().map_weight(text_weight_name(name), tensor, params)
