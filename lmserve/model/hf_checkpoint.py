"""Hugging Face model directories: config.json (+ generation_config.json) -> ArchConfig, safetensors (single or
sharded; tensor-parallel slices read with get_slice) -> state dict."""
from __future__ import annotations

import glob
import json
import os
from dataclasses import replace

import torch

from lmserve.model.arch_config import SUPPORTED_ARCHS, ArchConfig
from lmserve.model.arch_extras import hf_arch_extras
from lmserve.model.parallel import shard_spec, slice_padded
from lmserve.model.vlm_config import split_vlm_config, vlm_arch_name


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def as_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def hf_arch_config(path: str) -> ArchConfig:
    cfg = read_json(os.path.join(path, "config.json"))
    if not cfg:
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory or a GGUF file)")
    cfg, vision = split_vlm_config(cfg)
    arch = {"gemma3_text": "gemma3"}.get(cfg.get("model_type"), cfg.get("model_type"))
    if arch not in SUPPORTED_ARCHS:
        raise NotImplementedError(f"{path}: model_type {arch!r} is not supported; supported: {SUPPORTED_ARCHS}")
    if cfg.get("mlp_bias"):
        raise NotImplementedError(f"{path}: mlp_bias=true is not supported")
    # transformers >= 5 writes `rope_parameters` (theta + scaling); older files have rope_theta + rope_scaling.
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope_theta = float(cfg.get("rope_theta", rope.pop("rope_theta", 10000.0)))
    rope.pop("rope_theta", None)
    if "type" in rope:
        rope.setdefault("rope_type", rope.pop("type"))
    rope_scaling = rope if rope.get("rope_type", "default") != "default" else None
    gen = read_json(os.path.join(path, "generation_config.json"))
    bos = gen.get("bos_token_id", cfg.get("bos_token_id"))
    sliding = cfg.get("sliding_window")
    if arch in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe") and not cfg.get("use_sliding_window", False):
        sliding = None
    hidden, num_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    return replace(ArchConfig(
        architecture=arch,
        hidden_size=hidden,
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=num_heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=cfg.get("head_dim") or hidden // num_heads,
        intermediate_size=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"],
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=True if arch == "qwen2" else bool(cfg.get("qkv_bias", True)) if arch == "qwen2_moe" else
        bool(cfg.get("attention_bias", False)),
        sliding_window=sliding,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=hf_eos_token_ids(path) or tuple(as_ids(cfg.get("eos_token_id"))),
    ), **hf_arch_extras(arch, cfg), **({} if vision is None else {"architecture": vlm_arch_name(vision),
                                                                   "vision": vision}))


def safetensors_files(path: str) -> list[str]:
    index = read_json(os.path.join(path, "model.safetensors.index.json"))
    if index:
        return [os.path.join(path, f) for f in sorted(set(index["weight_map"].values()))]
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights (other weight formats are not supported)")
    return files


def hf_state_dict(path: str, cfg: ArchConfig, dtype: torch.dtype, skip=frozenset()) -> dict[str, torch.Tensor]:
    """HF name -> tensor of `dtype`, for every tensor not named in `skip`."""
    from safetensors import safe_open
    state = {}
    for file in safetensors_files(path):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if name.endswith("rotary_emb.inv_freq") or name in skip:
                    continue
                spec = shard_spec(name, cfg)
                state[name] = (f.get_tensor(name) if spec is None else safetensors_slice(f, name, spec)).to(dtype)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def safetensors_slice(f, name: str, spec: tuple[int, int, int]) -> torch.Tensor:
    """Read only a tensor-parallel rank's slice from the file."""
    dim, start, size = spec
    sl = f.get_slice(name)
    full = sl.get_shape()[dim]
    index = [slice(None)] * len(sl.get_shape())
    index[dim] = slice(min(start, full), min(start + size, full))
    return slice_padded(sl[tuple(index)], dim, 0, size)


def hf_eos_token_ids(path: str) -> tuple[int, ...]:
    gen = read_json(os.path.join(path, "generation_config.json"))
    cfg = read_json(os.path.join(path, "config.json"))
    return tuple(dict.fromkeys(as_ids(gen.get("eos_token_id")) + as_ids(cfg.get("eos_token_id"))))
