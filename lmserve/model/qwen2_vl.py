"""Qwen2-VL and Qwen2.5-VL: the Qwen2 decoder (model/llama.py) with M-RoPE, fed by their vision transformer
(model/qwen2_vl_vision.py).

M-RoPE: each token has three positions (temporal, height, width); the rotary frequency pairs are split into
`mrope_section` runs, run i turning with stream i % 3. A text token's three positions are equal (plain RoPE); an
image token's are the image's start position plus (0, its row, its column) in the merged grid, and the text after
an image continues from the largest position + 1. The engine computes the streams (engine/mrope.py) and passes
positions as [3, num_tokens]; a [num_tokens] tensor means all three equal."""
from __future__ import annotations

import torch

from lmserve.model.layers import RotaryEmbedding
from lmserve.model.qwen2_vl_vision import QwenVisionConfig, QwenVisionTower
from lmserve.model.vlm_base import VLMForCausalLM


class MRotaryEmbedding(RotaryEmbedding):
    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict | None, section: list[int],
                 interleaved: bool = False):
        super().__init__(head_dim, max_position, theta, scaling)
        if sum(section) != head_dim // 2:
            raise ValueError(f"mrope_section {section} must sum to head_dim / 2 = {head_dim // 2}")
        # the position stream each frequency pair turns with  [head_dim / 2]
        stream = [i % 3 for i, n in enumerate(section) for _ in range(n)]
        if interleaved:   # Qwen3-VL: pairs cycle t, h, w; h and w stop after 3 * their section (then t, as HF)
            stream = [j % 3 if j % 3 and j < 3 * section[j % 3] else 0 for j in range(head_dim // 2)]
        self.register_buffer("stream", torch.tensor(stream), persistent=False)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [3, num_tokens] (or [num_tokens]) -> cos, sin [num_tokens, 1, head_dim / 2]."""
        if positions.dim() == 1:
            return super().lookup(positions, dtype)
        self.cover(positions)
        index = positions[self.stream].T                         # [num_tokens, head_dim / 2]
        return (self.cos.gather(0, index).unsqueeze(1).to(dtype),
                self.sin.gather(0, index).unsqueeze(1).to(dtype))


class Qwen2VLForCausalLM(VLMForCausalLM):
    uses_mrope = True      # the runner passes [3, num_tokens] positions (engine/mrope.py)
    interleaved_mrope = False
    vision_prefixes = {"visual.": "visual.", "model.visual.": "visual."}

    def __init__(self, cfg):
        super().__init__(cfg)
        mm = cfg.vision
        self.model.rotary = MRotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta,
                                             cfg.rope_scaling, list(mm["mrope_section"]), self.interleaved_mrope)
        self.visual = self.make_tower(mm)

    def make_tower(self, mm: dict) -> QwenVisionTower:
        return QwenVisionTower(QwenVisionConfig.from_hf(mm["vision_config"], mm["model_type"]))

    def encode_images(self, items: list[dict]) -> list[torch.Tensor]:
        """Each item is one image: pixel_values [t*h*w, patch_dim] and image_grid_thw (t, h, w) in patches."""
        dtype = self.visual.patch_embed.proj.weight.dtype
        grids = [tuple(it["image_grid_thw"]) for it in items]
        merged = self.visual(torch.cat([it["pixel_values"] for it in items]).to(dtype), grids)
        unit = self.visual.cfg.merge ** 2
        return list(merged.split([t * h * w // unit for t, h, w in grids]))

    def map_weight(self, name: str, tensor: torch.Tensor, params: dict):
        if name.endswith("patch_embed.proj.weight"):
            tensor = self.visual.load_patch_embed(tensor)
        return super().map_weight(name, tensor, params)
