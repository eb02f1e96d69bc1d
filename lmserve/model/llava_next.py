"""LLaVA-NeXT (llava-v1.6): LLaVA-1.5's tower and projector (model/llava.py) run over "anyres" tiles. The HF processor
picks the grid from `image_grid_pinpoints` that fits the image best, resizes the image into it (aspect kept, padded)
and cuts it into tower-sized tiles, after a base view of the whole image squashed to one tile. The tiles' features
are put back side by side into one feature map, the rows or columns that only cover the padding are cut off, and an
`image_newline` vector ends every row; the base view's features come first. That is HF's `pack_image_features`
("spatial_unpad"), so the token count per image depends on its size (the processor expands each placeholder to it)."""
from __future__ import annotations

import torch
from torch import nn
from transformers.image_processing_utils import select_best_resolution

from lmserve.model.llava import LlavaForCausalLM

# transformers' LlavaNextConfig default (llava-v1.6's grids, (height, width) in pixels)
DEFAULT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def anyres_grid(image_size: tuple[int, int], pinpoints: list, tile: int) -> tuple[int, int]:
    """(rows, columns) of tiles the processor cuts an image of (height, width) into."""
    height, width = select_best_resolution(list(image_size), pinpoints)
    return height // tile, width // tile


def unpad(grid: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """[H, W, d] feature map of the padded image -> the rows or columns that cover the image itself. The float
    arithmetic is HF's, term for term, so the token count is the processor's."""
    height, width = image_size
    cur_h, cur_w = grid.shape[:2]
    if width / height > cur_w / cur_h:       # wider than the grid: padded above and below
        new_h = int(round(height * (cur_w / width), 7))
        pad = (cur_h - new_h) // 2
        return grid[pad:cur_h - pad]
    new_w = int(round(width * (cur_h / height), 7))
    pad = (cur_w - new_w) // 2
    return grid[:, pad:cur_w - pad]


class LlavaNextForCausalLM(LlavaForCausalLM):
    vision_prefixes = {**LlavaForCausalLM.vision_prefixes,
                       "image_newline": "image_newline", "model.image_newline": "image_newline"}

    def __init__(self, cfg):
        super().__init__(cfg)
        if self.drop_cls != (self.vision_tower.cfg.kind == "clip"):
            # the anyres packing needs every tile's features to be its whole patch grid (as transformers' does)
            raise NotImplementedError("LLaVA-NeXT: vision_feature_select_strategy must be \"default\" with a CLIP "
                                      "tower (its class token dropped) and \"full\" with a SigLIP tower")
        self.image_newline = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.pinpoints = [list(p) for p in cfg.vision.get("image_grid_pinpoints") or DEFAULT_PINPOINTS]

    def encode_images(self, items: list[dict]) -> list[torch.Tensor]:
        """Each item is one image: pixel_values [tiles (+ the processor's zero padding), 3, H, W] (the base view
        first) and image_size (height, width) of the original image."""
        grids = [anyres_grid(it["image_size"], self.pinpoints, self.vision_tower.cfg.image_size) for it in items]
        counts = [1 + rows * cols for rows, cols in grids]
        pixels = torch.cat([it["pixel_values"][:n] for it, n in zip(items, counts)])
        feats = self.image_features(pixels).split(counts)          # per image [tiles, patches, hidden]
        return [self.pack(f, grid, it["image_size"]) for f, grid, it in zip(feats, grids, items)]

    def pack(self, feats: torch.Tensor, grid: tuple[int, int], image_size: tuple[int, int]) -> torch.Tensor:
        """[1 + rows * cols, side * side, hidden] -> [base tokens + unpadded rows * (columns + 1), hidden]."""
        base, tiles = feats[0], feats[1:]
        newline = self.image_newline.to(feats.dtype)
        if tiles.shape[0] == 0:     # a grid smaller than one tile: the base view alone (HF's branch for it)
            return torch.cat([base, newline[None]])
        side = self.vision_tower.cfg.image_size // self.vision_tower.cfg.patch_size
        rows, cols = grid
        fmap = tiles.view(rows, cols, side, side, -1).permute(0, 2, 1, 3, 4)   # [rows, side, cols, side, hidden]
        fmap = unpad(fmap.reshape(rows * side, cols * side, -1), image_size)
        fmap = torch.cat([fmap, newline.expand(fmap.shape[0], 1, -1)], dim=1)  # a newline ends each row
        return torch.cat([base, fmap.flatten(0, 1)])
