"""Gemma 3 with vision (HF Gemma3ForConditionalGeneration): a SigLIP tower, a projector that average-pools the
patch grid to `mm_tokens_per_image` tokens (256 on the hub), normalises them (Gemma's RMSNorm, multiplier 1 + w)
and projects them to the decoder's width, and the Gemma 3 decoder (model/gemma3.py). Image embeddings replace the
image tokens' embeddings after the decoder's sqrt(hidden) scaling, as in transformers.

The decoder attends bidirectionally inside each image's token span; that lives in the attention mask
(engine/attention_metadata.py, from MMItem.bidirectional), not here."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.model.clip_vision import VisionConfig, VisionTower
from lmserve.model.gemma3 import Gemma3ForCausalLM
from lmserve.model.vlm_base import VLMForCausalLM


class Gemma3Projector(nn.Module):
    def __init__(self, vcfg: VisionConfig, text_hidden: int, tokens_per_image: int):
        super().__init__()
        self.patches_per_side = vcfg.image_size // vcfg.patch_size
        tokens_per_side = int(tokens_per_image ** 0.5)
        if tokens_per_side ** 2 != tokens_per_image or self.patches_per_side % tokens_per_side:
            raise NotImplementedError(f"mm_tokens_per_image {tokens_per_image}: not a square that divides the "
                                      f"{self.patches_per_side}x{self.patches_per_side} patch grid")
        self.kernel = self.patches_per_side // tokens_per_side
        self.eps = vcfg.layer_norm_eps
        self.mm_input_projection_weight = nn.Parameter(torch.zeros(vcfg.hidden_size, text_hidden))
        self.mm_soft_emb_norm = nn.Module()
        self.mm_soft_emb_norm.weight = nn.Parameter(torch.zeros(vcfg.hidden_size))   # the checkpoint's w (1 + w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[n, patches, vision_hidden] -> [n, tokens_per_image, text_hidden]"""
        n, _, d = x.shape
        side = self.patches_per_side
        grid = x.transpose(1, 2).reshape(n, d, side, side)
        pooled = F.avg_pool2d(grid, self.kernel, self.kernel).flatten(2).transpose(1, 2)
        h = pooled.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.mm_soft_emb_norm.weight.float())
        return (h.type_as(x) @ self.mm_input_projection_weight).type_as(x)


class Gemma3VLForCausalLM(VLMForCausalLM, Gemma3ForCausalLM):
    vision_prefixes = {"vision_tower.vision_model.": "vision_tower.", "model.vision_tower.": "vision_tower.",
                       "vision_tower.": "vision_tower.", "model.vision_tower.vision_model.": "vision_tower.",
                       "multi_modal_projector.": "multi_modal_projector.",
                       "model.multi_modal_projector.": "multi_modal_projector."}
    forward = Gemma3ForCausalLM.forward    # Gemma's embedding scale and local/global RoPE; takes mm_embeds

    def __init__(self, cfg):
        super().__init__(cfg)
        mm = cfg.vision
        vcfg = VisionConfig.from_hf({"model_type": "siglip_vision_model", **mm["vision_config"]})
        self.vision_tower = VisionTower(vcfg)
        self.multi_modal_projector = Gemma3Projector(vcfg, cfg.hidden_size, int(mm.get("mm_tokens_per_image", 256)))

    def encode_images(self, items: list[dict]) -> list[torch.Tensor]:
        proj = self.multi_modal_projector
        pixels = torch.cat([it["pixel_values"] for it in items]).to(proj.mm_input_projection_weight.dtype)
        return list(proj(self.vision_tower(pixels)).unbind(0))
