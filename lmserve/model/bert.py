"""BERT-family encoders (BERT, MiniLM, BGE, E5; RoBERTa and XLM-RoBERTa, e.g. multilingual E5) for embeddings.

An encoder differs from the decoders in three ways that matter to the engine: attention is bidirectional, so a
sequence is computed whole in one step (no chunked prefill, no KV cache); positions are learned embeddings; and
norms are post-residual LayerNorms. The batch arrives packed ([num_tokens, hidden], sequences back to back);
attention runs on a padded [num_seqs, heads, max_len, head_dim] copy with a key-padding mask.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.model.layers import Linear
from lmserve.ops.linear_method import packed_method, unpacked_method

_ROBERTA = ("roberta", "xlm-roberta")
_ACTIVATIONS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}


@dataclass(frozen=True)
class EncoderConfig:
    architecture: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    gelu_approximate: str               # torch's F.gelu(approximate=...): "none" (erf) or "tanh"
    # RoBERTa numbers positions from padding_idx + 1 (its position table has rows for the pad slots)
    position_offset: int = 0
    eos_token_ids: tuple[int, ...] = ()  # encoders generate nothing; here for the engine's common checks

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_len(self) -> int:
        """The longest input the position table covers."""
        return self.max_position_embeddings - self.position_offset


def load_encoder_config(path: str) -> EncoderConfig:
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    act = cfg.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"{path}: hidden_act {act!r} is not supported; supported: {sorted(_ACTIVATIONS)}")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{path}: only absolute position embeddings are supported")
    return EncoderConfig(
        architecture=cfg["model_type"], hidden_size=cfg["hidden_size"], num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"], intermediate_size=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"], max_position_embeddings=cfg.get("max_position_embeddings", 512),
        type_vocab_size=cfg.get("type_vocab_size", 2), layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
        gelu_approximate=_ACTIVATIONS[act],
        position_offset=cfg.get("pad_token_id", 1) + 1 if cfg["model_type"] in _ROBERTA else 0)


class PaddedLayout:
    """Index maps between the packed token rows and a padded [num_seqs * max_len] grid, built once per step."""

    def __init__(self, seq_lens: list[int], device: torch.device):
        self.num_seqs, self.max_len = len(seq_lens), max(seq_lens)
        lens = torch.tensor(seq_lens, device=device)
        seq = torch.repeat_interleave(torch.arange(self.num_seqs, device=device), lens)       # [num_tokens]
        offset = torch.arange(int(lens.sum()), device=device) - (lens.cumsum(0) - lens)[seq]
        self.rows = seq * self.max_len + offset                                               # [num_tokens]
        valid = torch.arange(self.max_len, device=device).unsqueeze(0) < lens.unsqueeze(1)    # [num_seqs, max_len]
        self.mask = None if self.num_seqs == 1 else valid[:, None, None, :]

    def pad(self, x: torch.Tensor) -> torch.Tensor:       # [num_tokens, width] -> [num_seqs, max_len, width]
        if self.num_seqs == 1:
            return x.unsqueeze(0)
        grid = x.new_zeros(self.num_seqs * self.max_len, x.shape[1]).index_copy_(0, self.rows, x)
        return grid.view(self.num_seqs, self.max_len, x.shape[1])

    def unpad(self, x: torch.Tensor) -> torch.Tensor:     # [num_seqs, heads, max_len, d] -> [num_tokens, heads * d]
        x = x.transpose(1, 2).reshape(self.num_seqs * self.max_len, -1)
        return x if self.num_seqs == 1 else x[self.rows]


class EncoderLayer(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.qkv = Linear(h, 3 * h)
        self.attn_out = Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.up = Linear(h, cfg.intermediate_size)
        self.down = Linear(cfg.intermediate_size, h)
        self.mlp_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.gelu_approximate = cfg.gelu_approximate

    def forward(self, x: torch.Tensor, layout: PaddedLayout) -> torch.Tensor:   # [num_tokens, hidden]
        qkv = layout.pad(self.qkv(x))                                       # [num_seqs, max_len, 3 * hidden]
        qkv = qkv.view(*qkv.shape[:2], 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=layout.mask)
        x = self.attn_norm(x + self.attn_out(layout.unpad(attn)))
        return self.mlp_norm(x + self.down(F.gelu(self.up(x), approximate=self.gelu_approximate)))


class BertModel(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.word_embeddings = nn.Embedding(cfg.vocab_size, h)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, h)
        self.embed_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, seq_lens: list[int],
                token_types: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions: [num_tokens] (sequences packed back to back) -> [num_tokens, hidden]."""
        # NOTE: without token_types every token has segment 0, as sentence-transformers encodes a single text;
        # a cross-encoder's text pairs give theirs (model/classifier.py)
        pos = positions + self.cfg.position_offset if self.cfg.position_offset else positions
        types = self.token_type_embeddings.weight[0] if token_types is None else self.token_type_embeddings(token_types)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos) + types
        x = self.embed_norm(x)
        layout = PaddedLayout(seq_lens, x.device)
        for layer in self.layers:
            x = layer(x, layout)
        return x

    def attach_fast(self, dtype: torch.dtype) -> None:
        for module in self.modules():
            if isinstance(module, Linear):
                module.linear_method = packed_method(module.linear_method, dtype)

    def detach_fast(self) -> None:
        for module in self.modules():
            if isinstance(module, Linear):
                module.linear_method = unpacked_method(module.linear_method)

    # ---- weights -------------------------------------------------------------------------------------
    def _hf_names(self) -> dict[str, tuple[str, int | None]]:
        """HF name -> (our parameter, row offset in a fused parameter or None)."""
        h = self.cfg.hidden_size
        names = {"embeddings.word_embeddings.weight": ("word_embeddings.weight", None),
                 "embeddings.position_embeddings.weight": ("position_embeddings.weight", None),
                 "embeddings.token_type_embeddings.weight": ("token_type_embeddings.weight", None),
                 "embeddings.LayerNorm.weight": ("embed_norm.weight", None),
                 "embeddings.LayerNorm.bias": ("embed_norm.bias", None)}
        ours = {"attention.output.dense": "attn_out", "attention.output.LayerNorm": "attn_norm",
                "intermediate.dense": "up", "output.dense": "down", "output.LayerNorm": "mlp_norm"}
        for i in range(self.cfg.num_hidden_layers):
            p = f"encoder.layer.{i}."
            for j, part in enumerate(("query", "key", "value")):
                for kind in ("weight", "bias"):
                    names[f"{p}attention.self.{part}.{kind}"] = (f"layers.{i}.qkv.{kind}", j * h)
            for theirs, mine in ours.items():
                for kind in ("weight", "bias"):
                    names[f"{p}{theirs}.{kind}"] = (f"layers.{i}.{mine}.{kind}", None)
        return names

    def load_weights(self, weights: dict[str, torch.Tensor], strict: bool = False) -> list[str]:
        """HF-named tensors (bare names or with a `bert.` / `roberta.` prefix) -> parameters; all checked before
        anything is copied. Heads a checkpoint may carry (pooler, MLM/NSP) are not used for embeddings: skipped.
        `strict`: every parameter must be given (loading a checkpoint, not a partial update)."""
        params = dict(self.named_parameters())
        names = self._hf_names()
        h = self.cfg.hidden_size
        plan = []
        for name, tensor in weights.items():
            bare = name.removeprefix("bert.").removeprefix("roberta.").removeprefix("model.")
            if bare not in names:
                if bare.startswith(("pooler.", "cls.", "classifier.", "lm_head.", "embeddings.position_ids")):
                    continue
                raise KeyError(f"unexpected weight {name!r}")
            target, start = names[bare]
            dst = params[target] if start is None else params[target].narrow(0, start, h)
            if dst.shape != tensor.shape:
                raise ValueError(f"weight {name!r}: shape {tuple(tensor.shape)} != expected {tuple(dst.shape)}")
            plan.append((bare, dst, tensor))
        missing = set(names) - {bare for bare, _, _ in plan}
        if strict and missing:
            raise KeyError(f"missing weights: {sorted(missing)[:5]}")
        with torch.no_grad():
            for _, dst, tensor in plan:
                dst.copy_(tensor)
        return [name for name, _, _ in plan]


def load_encoder_weights(path: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory's safetensors files (or pytorch_model.bin), as `dtype`."""
    from safetensors.torch import load_file
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(os.path.join(path, f)))
    if not files and os.path.isfile(os.path.join(path, "pytorch_model.bin")):
        weights = torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    if not weights:
        raise FileNotFoundError(f"{path}: no safetensors or pytorch_model.bin weights")
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
