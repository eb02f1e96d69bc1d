"""Idefics3 / SmolVLM: a SigLIP tower over image tiles (the HF processor splits an image into a grid of tiles plus a
downscaled global view; each tile is one run of image tokens in the prompt), pixel shuffle (each `scale_factor` x
`scale_factor` patch square becomes one token of scale_factor^2 times the width), one linear projection, a Llama
decoder. Tiles padded by the processor carry a pixel mask: padded patches are masked out of attention and their
positions follow HF's fractional bucketing (model/clip_vision.py)."""
from __future__ import annotations

import torch
from torch import nn

from lmserve.model.clip_vision import VisionConfig, VisionTower
from lmserve.model.vlm_base import VLMForCausalLM


def pixel_shuffle(x: torch.Tensor, scale: int) -> torch.Tensor:
    """[n, side*side, d] -> [n, side*side / scale^2, d * scale^2], HF's order."""
    n, seq, d = x.shape
    side = int(seq ** 0.5)
    x = x.view(n, side, side // scale, d * scale).permute(0, 2, 1, 3)
    x = x.reshape(n, side // scale, side // scale, d * scale * scale).permute(0, 2, 1, 3)
    return x.reshape(n, seq // (scale * scale), d * scale * scale)


class Idefics3ForCausalLM(VLMForCausalLM):
    vision_prefixes = {"model.vision_model.": "vision_model.", "vision_model.": "vision_model.",
                       "model.connector.": "connector.", "connector.": "connector."}

    def __init__(self, cfg):
        super().__init__(cfg)
        mm = cfg.vision
        vcfg = VisionConfig.from_hf(mm["vision_config"])
        self.scale = int(mm.get("scale_factor", 2))
        self.vision_model = VisionTower(vcfg)
        self.connector = nn.Module()
        self.connector.modality_projection = nn.Module()
        self.connector.modality_projection.proj = nn.Linear(vcfg.hidden_size * self.scale ** 2, cfg.hidden_size,
                                                            bias=False)

    def encode_images(self, items: list[dict]) -> list[torch.Tensor]:
        """Each item is one tile: pixel_values [1, 3, H, W] (+ pixel_attention_mask [1, H, W])."""
        proj = self.connector.modality_projection.proj
        pixels = torch.cat([it["pixel_values"] for it in items]).to(proj.weight.dtype)
        p = self.vision_model.cfg.patch_size
        masks = [it.get("pixel_attention_mask") for it in items]
        patch_mask = None
        if any(m is not None and not bool(m.all()) for m in masks):
            pm = torch.cat([m if m is not None else torch.ones(1, *pixels.shape[2:], dtype=torch.bool)
                            for m in masks]).bool()
            patch_mask = pm.unfold(1, p, p).unfold(2, p, p).sum(dim=(-1, -2)) > 0    # [n, H/p, W/p]
        feats = self.vision_model(pixels, patch_mask=patch_mask)
        return list(proj(pixel_shuffle(feats, self.scale)).unbind(0))
