"""CLIP / SigLIP vision tower (a ViT over image patches): the image encoder of LLaVA (CLIP) and of SmolVLM, Gemma 3
(SigLIP). The two differ in small ways, all read from the HF vision config: CLIP has a class token and a LayerNorm
before the encoder (`pre_layrnorm`) and uses quick_gelu; SigLIP has neither and uses gelu_pytorch_tanh.

Parameters use the HF names below `vision_model.`, so checkpoints load by stripping that prefix. Plain
torch.nn layers: the tower runs once per image in prefill, so the decoder's packed GEMMs and paged attention buy
nothing here (and SDPA without a mask is the fast path PyTorch has)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


@dataclass(frozen=True)
class VisionConfig:
    kind: str                 # "clip" | "siglip"
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int
    layer_norm_eps: float
    hidden_act: str

    @classmethod
    def from_hf(cls, v: dict) -> "VisionConfig":
        kind = "clip" if v.get("model_type", "clip_vision_model").startswith("clip") else "siglip"
        act = v.get("hidden_act", "quick_gelu" if kind == "clip" else "gelu_pytorch_tanh")
        if act not in ACTIVATIONS:
            raise NotImplementedError(f"vision_config.hidden_act {act!r} is not supported")
        return cls(kind, v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"], v["num_attention_heads"],
                   v["image_size"], v["patch_size"], v.get("num_channels", 3),
                   float(v.get("layer_norm_eps", 1e-5 if kind == "clip" else 1e-6)),   # transformers' defaults
                   act)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cls = cfg.kind == "clip"
        if self.cls:
            self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size,
                                         bias=not self.cls)
        self.position_embedding = nn.Embedding(cfg.num_patches + self.cls, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[n, 3, H, W] -> [n, patches (+1), hidden]. patch_mask [n, H/p, W/p]: the real (unpadded) patches."""
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        if self.cls:
            x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
        if patch_mask is None:
            return x + self.position_embedding.weight[:x.shape[1]]
        return x + self.position_embedding(bucket_positions(patch_mask, self.position_embedding.weight.shape[0]))


def bucket_positions(patch_mask: torch.Tensor, num_positions: int) -> torch.Tensor:
    """Idefics3's variable-resolution positions (HF's fractional bucketing): a tile of h x w real patches spreads
    them over the full position grid; padded patches take position 0. -> [n, H/p * W/p]"""
    side = int(num_positions ** 0.5)
    n, mh, mw = patch_mask.shape
    bounds = torch.arange(1 / side, 1.0, 1 / side)
    coords = []
    for m, count in ((mh, patch_mask[:, :, 0].sum(1)), (mw, patch_mask[:, 0, :].sum(1))):
        frac = (torch.arange(m, dtype=torch.float32)[None, :] * (1.0 / count)[:, None]).clamp(max=1.0 - 1e-6)
        coords.append(torch.bucketize(frac, bounds, right=True))
    pos = (coords[0][:, :, None] * side + coords[1][:, None, :]).reshape(n, -1)
    return torch.where(patch_mask.reshape(n, -1), pos, torch.zeros_like(pos))


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(h, h) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """[n, tokens, hidden]: every token sees every token (mask [n, 1, 1, tokens]: the real ones only)."""
        n, t, h = x.shape

        def heads(p):
            return p(x).view(n, t, self.num_heads, -1).transpose(1, 2)
        o = F.scaled_dot_product_attention(heads(self.q_proj), heads(self.k_proj), heads(self.v_proj),
                                           attn_mask=mask)
        return self.out_proj(o.transpose(1, 2).reshape(n, t, h))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_hidden_layers))


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        if cfg.kind == "clip":
            self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = VisionEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, feature_layer: int | None = None,
                patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        """-> [n, tokens, hidden]: HF's hidden_states[feature_layer] (index 0 = the embeddings; negative counts
        from the end, so -2 skips the last layer: LLaVA's choice), or the post-LayerNorm output when None.
        patch_mask [n, H/p, W/p]: padded tiles' real patches (Idefics3); None = all real."""
        x = self.embeddings(pixel_values, patch_mask)
        mask = None if patch_mask is None else patch_mask.reshape(x.shape[0], 1, 1, -1)
        if self.cfg.kind == "clip":
            x = self.pre_layrnorm(x)
        num_layers = len(self.encoder.layers)
        run = num_layers if feature_layer is None else \
            (feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer)
        for layer in self.encoder.layers[:run]:   # layers past the chosen one would be thrown away
            x = layer(x, mask)
        return self.post_layernorm(x) if feature_layer is None else x
