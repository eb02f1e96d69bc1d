"""LLaVA-1.5: a CLIP vision tower, a 2-layer MLP projector and a Llama decoder. The image's patch features (from
`vision_feature_layer`, the class token dropped under the "default" strategy) are projected to the decoder's width
and take the place of the image tokens' embeddings in prefill; the engine places them (engine/mm_runner.py).

Checkpoints come in two namings (the hub's `language_model.model.*` / `vision_tower.vision_model.*` and
transformers 5's `model.language_model.*` / `model.vision_tower.*`); `map_weight` reads both."""
from __future__ import annotations

import torch
from torch import nn

from lmserve.model.attention import AttentionMetadata
from lmserve.model.clip_vision import ACTIVATIONS, VisionConfig, VisionTower
from lmserve.model.llama import KVCache, LlamaForCausalLM


class LlavaProjector(nn.Module):
    def __init__(self, vision_hidden: int, text_hidden: int, act: str, bias: bool):
        super().__init__()
        self.linear_1 = nn.Linear(vision_hidden, text_hidden, bias=bias)
        self.act = ACTIVATIONS[act]
        self.linear_2 = nn.Linear(text_hidden, text_hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


def text_weight_name(name: str) -> str:
    """Either checkpoint naming -> the decoder's (model.* / lm_head.*)."""
    for old, new in (("model.language_model.", "model."), ("language_model.model.", "model."),
                     ("language_model.lm_head.", "lm_head."), ("language_model.", "")):
        if name.startswith(old):
            return new + name[len(old):]
    return name


class LlavaForCausalLM(LlamaForCausalLM):
    def __init__(self, cfg):
        super().__init__(cfg)
        mm = cfg.vision
        layer = mm.get("vision_feature_layer", -2)
        if not isinstance(layer, int):
            raise NotImplementedError("vision_feature_layer: a list of layers is not supported")
        self.feature_layer = layer
        self.drop_cls = mm.get("vision_feature_select_strategy", "default") == "default"
        vcfg = VisionConfig.from_hf(mm["vision_config"])
        self.vision_tower = VisionTower(vcfg)
        self.multi_modal_projector = LlavaProjector(vcfg.hidden_size, cfg.hidden_size,
                                                    mm.get("projector_hidden_act", "gelu"),
                                                    mm.get("multimodal_projector_bias", True))

    def encode_images(self, items: list[dict]) -> list[torch.Tensor]:
        """Each image's processor output -> its image-token embeddings [tokens, hidden], in one batched pass."""
        dtype = self.multi_modal_projector.linear_1.weight.dtype
        pixels = torch.cat([it["pixel_values"] for it in items]).to(dtype)
        feats = self.vision_tower(pixels, self.feature_layer)       # [n, 1 + patches, vision_hidden]
        if self.drop_cls:
            feats = feats[:, 1:]
        return list(self.multi_modal_projector(feats).unbind(0))

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
        name = name.removeprefix("model.") if name.startswith(("model.vision_tower.", "model.multi_modal_projector.")) \
            else name
        if name.startswith("vision_tower."):
            sub = self.vision_tower.vision_weight(name[len("vision_tower."):])
            return None if sub is None else (params["vision_tower." + sub], tensor)
        if name.startswith("multi_modal_projector."):
            return params[name], tensor
        return super().map_weight(text_weight_name(name), tensor, params)
