"""The vision transformer of Qwen3-VL: Qwen2-VL's tower (model/qwen2_vl_vision.py: 2D rotary over each patch's row
and column, attention within one image, LayerNorm blocks with a GELU MLP, a 2x2 patch merger) with these
differences:
- Patches of 16 pixels (2 frames x 16 x 16 x 3), and the patch embedding has a bias.
- Learned absolute positions: a square table (num_position_embeddings = side^2) resampled bilinearly
  (align_corners, as HF) to each image's patch grid and added to the patch embeddings.
- DeepStack: the outputs of the blocks in `deepstack_visual_indexes` each go through their own merger (LayerNorm
  after the 2x2 concatenation, not before); the decoder adds them to its hidden states at the image positions
  after its first layers (model/qwen3_vl.py).

The tower returns, per merged token, the main merger's output and the DeepStack features side by side on the last
dimension ([tokens, out_size * (1 + len(deepstack))]): the engine caches and slices an image's embeddings by rows
(engine/mm_runner.py), so the DeepStack features travel with the rows they belong to."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.model.qwen2_vl_vision import (PatchEmbed, PatchMerger, QwenVisionConfig, QwenVisionTower, frame_seqlens,
                                           patch_positions)

# checkpoint names -> ours (the blocks' MLP is Qwen2-VL's fc1/fc2; a merger's layers are ln_q + mlp.0 / mlp.2)
_RENAMES = ((".mlp.linear_fc1.", ".mlp.fc1."), (".mlp.linear_fc2.", ".mlp.fc2."))
_MERGER_RENAMES = ((".norm.", ".ln_q."), (".linear_fc1.", ".mlp.0."), (".linear_fc2.", ".mlp.2."))


@dataclass(frozen=True)
class Qwen3VisionConfig(QwenVisionConfig):
    num_position_embeddings: int = 2304
    deepstack: tuple[int, ...] = ()     # blocks whose outputs feed the DeepStack mergers, in their order

    @classmethod
    def from_hf(cls, v: dict, model_type: str = "qwen3_vl") -> "Qwen3VisionConfig":
        theta = float((v.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        return cls(width=v["hidden_size"], depth=v["depth"], num_heads=v["num_heads"],
                   intermediate_size=v["intermediate_size"], out_size=v["out_hidden_size"],
                   hidden_act=v.get("hidden_act", "gelu_pytorch_tanh"), gated=False,
                   patch_size=v.get("patch_size", 16), temporal_patch_size=v.get("temporal_patch_size", 2),
                   in_channels=v.get("in_channels", 3), merge=v.get("spatial_merge_size", 2), rope_theta=theta,
                   window_size=None, full_attention_blocks=(),
                   num_position_embeddings=v.get("num_position_embeddings", 2304),
                   deepstack=tuple(v.get("deepstack_visual_indexes", (8, 16, 24))))


class BiasedPatchEmbed(PatchEmbed):
    def __init__(self, cfg: QwenVisionConfig):
        super().__init__(cfg)
        self.proj = nn.Linear(cfg.patch_dim, cfg.width, bias=True)


class PostShuffleMerger(PatchMerger):
    """A DeepStack merger: the LayerNorm runs over the concatenated 2x2 square (merged width), not each patch."""

    def __init__(self, cfg: QwenVisionConfig):
        super().__init__(cfg)
        self.ln_q = nn.LayerNorm(self.merged, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # [patches, width] -> [patches / merge^2, out_size]
        return self.mlp(self.ln_q(x.view(-1, self.merged)))


class Qwen3VisionTower(QwenVisionTower):
    def __init__(self, cfg: Qwen3VisionConfig):
        super().__init__(cfg)
        self.patch_embed = BiasedPatchEmbed(cfg)
        self.side = int(cfg.num_position_embeddings ** 0.5)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.width)
        self.deepstack_mergers = nn.ModuleList(PostShuffleMerger(cfg) for _ in cfg.deepstack)

    def forward(self, patches: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """patches [sum of t*h*w, patch_dim], images back to back. -> [merged tokens, out_size * (1 + deepstack)]:
        the merger's output, then each DeepStack merger's."""
        cfg = self.cfg
        x = self.patch_embed(patches)                                     # [patches, width]
        x = x + self.position_embeddings(grids).to(x.dtype)
        emb = self.rotary_angles(grids)
        cos, sin, cu = emb.cos(), emb.sin(), frame_seqlens(grids)
        deep = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cu)
            if i in cfg.deepstack:
                deep.append(self.deepstack_mergers[cfg.deepstack.index(i)](x))
        return torch.cat([self.merger(x), *deep], dim=-1)

    def position_embeddings(self, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """The learned position table resampled to each image's grid, in the processor's patch order (merge x merge
        squares contiguous). -> [patches, width] float32"""
        table = self.pos_embed.weight.float().view(self.side, self.side, -1).permute(2, 0, 1)[None]   # [1, C, S, S]
        out = []
        for t, h, w in grids:
            grid = F.interpolate(table, size=(h, w), mode="bilinear", align_corners=True)[0]          # [C, h, w]
            rc = patch_positions([(t, h, w)], self.cfg.merge)
            out.append(grid[:, rc[:, 0], rc[:, 1]].T)
        return torch.cat(out)

    @staticmethod
    def weight_name(name: str) -> str:
        """A checkpoint name under the tower -> ours."""
        name = name.replace("deepstack_merger_list.", "deepstack_mergers.")
        for old, new in _RENAMES + (_MERGER_RENAMES if "merger" in name else ()):
            name = name.replace(old, new)
        return name
