"""LLaVA-1.5: a CLIP vision tower, a 2-layer MLP projector and a Llama decoder. The image's patch features (from
`vision_feature_layer`, the class token dropped under the "default" strategy) are projected to the decoder's width
and take the place of the image tokens' embeddings in prefill (model/vlm_base.py)."""
from __future__ import annotations

import torch
from torch import nn

from lmserve.model.clip_vision import ACTIVATIONS, VisionConfig, VisionTower
from lmserve.model.vlm_base import VLMForCausalLM


class LlavaProjector(nn.Module):
    def __init__(self, vision_hidden: int, text_hidden: int, act: str, bias: bool):
        super().__init__()
        self.linear_1 = nn.Linear(vision_hidden, text_hidden, bias=bias)
        self.act = ACTIVATIONS[act]
        self.linear_2 = nn.Linear(text_hidden, text_hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaForCausalLM(VLMForCausalLM):
    vision_prefixes = {"vision_tower.vision_model.": "vision_tower.", "model.vision_tower.": "vision_tower.",
                       "vision_tower.": "vision_tower.", "model.vision_tower.vision_model.": "vision_tower.",
                       "multi_modal_projector.": "multi_modal_projector.",
                       "model.multi_modal_projector.": "multi_modal_projector."}

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

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] -> the projected patch features [n, (1 +) patches, hidden]."""
        pixels = pixels.to(self.multi_modal_projector.linear_1.weight.dtype)
        feats = self.vision_tower(pixels, feature_layer=self.feature_layer)   # [n, (1 +) patches, vision_hidden]
        if self.drop_cls and self.vision_tower.cfg.kind == "clip":
            feats = feats[:, 1:]
        return self.multi_modal_projector(feats)

    def encode_images(self, items: list[dict]) -> list[torch.Tensor]:
        return list(self.image_features(torch.cat([it["pixel_values"] for it in items])).unbind(0))
