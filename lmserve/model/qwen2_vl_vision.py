"""The vision transformer of Qwen2-VL and Qwen2.5-VL: dynamic resolution, so each image is its own variable-length
sequence of patches (no padding, no fixed position table).

- Patch embedding: the HF processor already cut the image into 2 (frames) x 14 x 14 x 3 patches, flattened; the
  Conv3d of the checkpoint (kernel = stride = the patch) is one linear layer over that vector.
- Positions: 2D rotary over each patch's (row, column); the processor orders patches so that each
  spatial_merge_size^2 square is contiguous, and the position ids follow that order.
- Attention: within one image only (`cu_seqlens`, as HF). Qwen2.5-VL attends within windows of
  window_size / patch_size patches except in `fullatt_block_indexes`; the patches are reordered window by window
  for the whole tower and put back after the merger.
- Qwen2-VL: LayerNorm + a GELU MLP (fc1/fc2); Qwen2.5-VL: RMSNorm + a SwiGLU MLP with biases.
- Patch merger: each 2x2 square of patches becomes one token (its 4 vectors concatenated), then a 2-layer MLP to
  the decoder's width.

Plain torch.nn with SDPA, as model/clip_vision.py: the tower runs once per image in prefill."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.model.clip_vision import ACTIVATIONS

_ACTS = {**ACTIVATIONS, "silu": F.silu}


@dataclass(frozen=True)
class QwenVisionConfig:
    width: int
    depth: int
    num_heads: int
    intermediate_size: int
    out_size: int                 # the decoder's hidden size
    hidden_act: str
    gated: bool                   # Qwen2.5-VL: RMSNorm + SwiGLU; Qwen2-VL: LayerNorm + fc1/act/fc2
    patch_size: int
    temporal_patch_size: int
    in_channels: int
    merge: int                    # spatial_merge_size
    rope_theta: float
    window_size: int | None       # in pixels (Qwen2.5-VL); None = every block attends over the whole image
    full_attention_blocks: tuple[int, ...]

    @classmethod
    def from_hf(cls, v: dict, model_type: str) -> "QwenVisionConfig":
        theta = float((v.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        common = dict(num_heads=v["num_heads"], depth=v["depth"], patch_size=v.get("patch_size", 14),
                      temporal_patch_size=v.get("temporal_patch_size", 2), in_channels=v.get("in_channels", 3),
                      merge=v.get("spatial_merge_size", 2), rope_theta=theta)
        if model_type == "qwen2_vl":
            act = v.get("hidden_act", "quick_gelu")
            return cls(width=v["embed_dim"], intermediate_size=int(v["embed_dim"] * v.get("mlp_ratio", 4)),
                       out_size=v["hidden_size"], hidden_act=act, gated=False, window_size=None,
                       full_attention_blocks=(), **common)
        return cls(width=v["hidden_size"], intermediate_size=v["intermediate_size"], out_size=v["out_hidden_size"],
                   hidden_act=v.get("hidden_act", "silu"), gated=True, window_size=v.get("window_size", 112),
                   full_attention_blocks=tuple(v.get("fullatt_block_indexes", ())), **common)

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


class VisionRMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def make_norm(cfg: QwenVisionConfig, size: int) -> nn.Module:
    return VisionRMSNorm(size) if cfg.gated else nn.LayerNorm(size, eps=1e-6)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def segment_attention(q, k, v, cu_seqlens: list[int]) -> torch.Tensor:
    """q, k, v [tokens, heads, head_dim]; each [cu[i], cu[i+1]) attends to itself only. Segments of one length
    (an image's full windows) go through one batched SDPA call. -> [tokens, heads, head_dim]"""
    out = torch.empty_like(q)
    by_len: dict[int, list[int]] = {}
    for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        if b > a:
            by_len.setdefault(b - a, []).append(a)
    for length, starts in by_len.items():
        idx = (torch.tensor(starts)[:, None] + torch.arange(length)).reshape(-1)

        def gather(t):   # [segments, heads, length, head_dim]
            return t[idx].view(len(starts), length, *t.shape[1:]).transpose(1, 2)
        o = F.scaled_dot_product_attention(gather(q), gather(k), gather(v))
        out[idx] = o.transpose(1, 2).reshape(-1, *q.shape[1:])
    return out


class VisionAttention(nn.Module):
    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: list[int]):
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, -1).unbind(1)     # [tokens, heads, head_dim] each
        # HF rotates in float32 whatever the model's dtype
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(x.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(x.dtype)
        return self.proj(segment_attention(q, k, v, cu_seqlens).reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        self.act = _ACTS[cfg.hidden_act]
        self.gated = cfg.gated
        if cfg.gated:
            self.gate_proj = nn.Linear(cfg.width, cfg.intermediate_size)
            self.up_proj = nn.Linear(cfg.width, cfg.intermediate_size)
            self.down_proj = nn.Linear(cfg.intermediate_size, cfg.width)
        else:
            self.fc1 = nn.Linear(cfg.width, cfg.intermediate_size)
            self.fc2 = nn.Linear(cfg.intermediate_size, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        self.norm1 = make_norm(cfg, cfg.width)
        self.attn = VisionAttention(cfg)
        self.norm2 = make_norm(cfg, cfg.width)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, cos, sin, cu_seqlens):
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        self.merged = cfg.width * cfg.merge ** 2
        self.ln_q = make_norm(cfg, cfg.width)
        self.mlp = nn.Sequential(nn.Linear(self.merged, self.merged), nn.GELU(), nn.Linear(self.merged, cfg.out_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # [patches, width] -> [patches / merge^2, out_size]
        return self.mlp(self.ln_q(x).view(-1, self.merged))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.patch_dim, cfg.width, bias=False)   # the checkpoint's Conv3d, flattened

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.to(self.proj.weight.dtype))


def patch_positions(grids: list[tuple[int, int, int]], merge: int) -> torch.Tensor:
    """(row, column) of every patch in the processor's order (merge x merge squares contiguous). -> [patches, 2]"""
    out = []
    for t, h, w in grids:
        rows = torch.arange(h)[:, None].expand(h, w)
        cols = torch.arange(w)[None, :].expand(h, w)
        pos = [p.reshape(h // merge, merge, w // merge, merge).transpose(1, 2).reshape(-1) for p in (rows, cols)]
        out.append(torch.stack(pos, dim=-1).repeat(t, 1))
    return torch.cat(out)


def window_order(grids: list[tuple[int, int, int]], merge: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """Qwen2.5-VL's windows: the merged tokens (merge^2 patches each) reordered window by window, and the window
    boundaries in patches. -> (order [merged tokens], cu_window_seqlens)"""
    order, cu, base = [], [0], 0
    for t, h, w in grids:
        gh, gw = h // merge, w // merge
        idx = torch.arange(t * gh * gw).view(t, gh, gw)
        nh, nw = -(-gh // window), -(-gw // window)
        for ti in range(t):
            for i in range(nh):
                for j in range(nw):
                    block = idx[ti, i * window:(i + 1) * window, j * window:(j + 1) * window].reshape(-1)
                    order.append(block + base)
                    cu.append(cu[-1] + block.numel() * merge * merge)
        base += t * gh * gw
    return torch.cat(order), cu


def frame_seqlens(grids: list[tuple[int, int, int]]) -> list[int]:
    """Attention segment boundaries in patches: each frame of each image attends within itself (as HF)."""
    cu = [0]
    for t, h, w in grids:
        cu.extend(cu[-1] + h * w for _ in range(t))
    return cu


class QwenVisionTower(nn.Module):
    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    def forward(self, patches: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """patches [sum of t*h*w, patch_dim] (images back to back), grids: each image's (t, h, w) in patches.
        -> merged tokens [sum of t*h*w / merge^2, out_size], images back to back."""
        cfg, unit = self.cfg, self.cfg.merge ** 2
        x = self.patch_embed(patches)                                     # [patches, width]
        emb, cu_full = self.rotary_angles(grids), frame_seqlens(grids)
        cu_window, order = cu_full, None
        if cfg.window_size is not None:
            order, cu_window = window_order(grids, cfg.merge, cfg.window_size // cfg.merge // cfg.patch_size)
            patch_order = (order[:, None] * unit + torch.arange(unit)).reshape(-1)
            x, emb = x[patch_order], emb[patch_order]
        cos, sin = emb.cos(), emb.sin()
        for i, block in enumerate(self.blocks):
            # NOTE: windows never straddle images, and in window order each image's patches stay together
            full = cfg.window_size is None or i in cfg.full_attention_blocks
            x = block(x, cos, sin, cu_full if full else cu_window)
        merged = self.merger(x)
        if order is not None:
            merged = merged[torch.argsort(order)]
        return merged

    def rotary_angles(self, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """The 2D rotary angles of every patch -> [patches, 1, head_dim]."""
        cfg = self.cfg
        half = cfg.width // cfg.num_heads // 2     # half the rotary pairs turn with the row, half with the column
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half)   # float32 always
        freqs = (patch_positions(grids, cfg.merge)[..., None].float() * inv_freq).flatten(1)   # [patches, hd/2]
        return torch.cat([freqs, freqs], dim=-1)[:, None, :]

    def load_patch_embed(self, weight: torch.Tensor) -> torch.Tensor:
        """The checkpoint's Conv3d weight [width, C, T, P, P] -> our linear's [width, C*T*P*P]."""
        return weight.reshape(weight.shape[0], -1)
