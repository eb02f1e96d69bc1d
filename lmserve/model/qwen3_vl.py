"""Qwen3-VL (dense): Qwen2.5-VL's layout (model/qwen2_vl.py) with
- the Qwen3 decoder (q/k RMSNorm per head; model/qwen3.py),
- interleaved M-RoPE: the frequency pairs cycle through the (temporal, height, width) streams instead of running
  in contiguous `mrope_section` chunks (the image position rules are Qwen2-VL's for a single frame: engine/mrope.py),
- its vision tower (model/qwen3_vl_vision.py) and DeepStack: the tower's DeepStack features k = 0, 1, ... are added
  to the decoder's hidden states at the image-token rows after decoder layer k. They ride in `mm_embeds` beside the
  image embeddings (the last dimension holds both), so a chunk that holds part of an image adds just its rows."""
from __future__ import annotations

import torch

from lmserve.model.attention import AttentionMetadata
from lmserve.model.llama import KVCache
from lmserve.model.qwen2_vl import Qwen2VLForCausalLM
from lmserve.model.qwen3 import Qwen3DecoderLayer
from lmserve.model.qwen3_vl_vision import Qwen3VisionConfig, Qwen3VisionTower


class Qwen3VLForCausalLM(Qwen2VLForCausalLM):
    layer_cls = Qwen3DecoderLayer
    interleaved_mrope = True

    def make_tower(self, mm: dict) -> Qwen3VisionTower:
        return Qwen3VisionTower(Qwen3VisionConfig.from_hf(mm["vision_config"]))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[KVCache], mm_embeds: tuple[torch.Tensor, torch.Tensor] | None = None):
        """mm_embeds: (rows, [len(rows), hidden * (1 + DeepStack levels)]): the image embeddings replace those
        rows' token embeddings; DeepStack level k is added to them after layer k."""
        x = self.model.embed_tokens(input_ids)
        deep: list[torch.Tensor] = []
        if mm_embeds is not None:
            rows, embeds = mm_embeds
            first, *deep = embeds.to(x.dtype).split(x.shape[-1], dim=-1)
            x[rows] = first
        meta.rope_cos, meta.rope_sin = self.model.rotary.lookup(positions, x.dtype)
        residual = None
        for k, (layer, kv_cache) in enumerate(zip(self.model.layers, kv_caches)):
            x, residual = layer(positions, x, residual, meta, kv_cache)
            if k < len(deep):
                # NOTE: the layer's output is split in two (x + residual, summed by the next norm); adding to x
                # adds to their sum, as HF adds to its hidden states
                x[rows] += deep[k]
        return self.model.norm(x, residual)[0]

    def map_weight(self, name: str, tensor: torch.Tensor, params: dict):
        if any(name.startswith(p) for p in self.vision_prefixes):
            name = Qwen3VisionTower.weight_name(name)
        return super().map_weight(name, tensor, params)
