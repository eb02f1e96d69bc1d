"""How an embedding model turns its final hidden states into one vector: the pooling mode and normalisation
its sentence-transformers files declare (`modules.json`, `1_Pooling/config.json`, `sentence_bert_config.json`),
and the pooling itself over a packed batch.

NOTE: the defaults for a checkpoint without sentence-transformers files follow vLLM's for BERT: the CLS vector,
L2-normalised.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

POOLING_MODES = ("mean", "cls", "max", "lasttoken")
# sentence-transformers' Pooling config keys -> our mode names
_ST_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
             "pooling_mode_max_tokens": "max", "pooling_mode_lasttoken": "lasttoken"}


@dataclass(frozen=True)
class PoolingConfig:
    mode: str = "cls"
    normalize: bool = True
    max_seq_length: int | None = None          # sentence-transformers' truncation length; None = the model's
    # `dimensions` (truncate + renormalise) is only meaningful for Matryoshka-trained models: None = not allowed,
    # () = any size up to the full one, else the sizes the model was trained for
    matryoshka_dimensions: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.mode not in POOLING_MODES:
            raise ValueError(f"pooling mode {self.mode!r} is not supported; supported: {', '.join(POOLING_MODES)}")


def _read_json(path: str) -> dict | list:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def load_pooling_config(path: str) -> PoolingConfig:
    """The pooling an HF directory declares (sentence-transformers layout), else the CLS default."""
    modules = _read_json(os.path.join(path, "modules.json")) or []
    types = {m.get("type", "").rsplit(".", 1)[-1]: m for m in modules}
    mode, normalize = "cls", True
    if "Pooling" in types:
        cfg = _read_json(os.path.join(path, types["Pooling"].get("path", ""), "config.json"))
        chosen = [name for key, name in _ST_MODES.items() if cfg.get(key)]
        others = [k for k, v in cfg.items() if k.startswith("pooling_mode") and v and k not in _ST_MODES]
        if len(chosen) != 1 or others:
            raise ValueError(f"{path}: pooling {sorted(chosen + others)} is not supported; one of "
                             f"{', '.join(POOLING_MODES)} is")
        mode, normalize = chosen[0], "Normalize" in types
    st = _read_json(os.path.join(path, "sentence_bert_config.json"))
    hf = _read_json(os.path.join(path, "config.json"))
    dims = hf.get("matryoshka_dimensions")
    matryoshka = tuple(int(d) for d in dims) if dims else (() if hf.get("is_matryoshka") else None)
    return PoolingConfig(mode, normalize, st.get("max_seq_length"), matryoshka)


def pool(hidden: torch.Tensor, seq_lens: list[int], config: PoolingConfig) -> torch.Tensor:
    """hidden: [num_tokens, hidden] for sequences packed back to back -> [num_seqs, hidden] float32."""
    hidden = hidden.float()
    lens = torch.tensor(seq_lens, device=hidden.device)
    ends = lens.cumsum(0)
    starts = ends - lens
    if config.mode == "cls":
        out = hidden[starts]
    elif config.mode == "lasttoken":
        out = hidden[ends - 1]
    elif config.mode == "mean":
        seg = torch.repeat_interleave(torch.arange(len(seq_lens), device=hidden.device), lens)   # [num_tokens]
        out = torch.zeros(len(seq_lens), hidden.shape[1], device=hidden.device).index_add_(0, seg, hidden)
        out = out / lens.unsqueeze(1)
    else:   # max
        seg = torch.repeat_interleave(torch.arange(len(seq_lens), device=hidden.device), lens)
        out = torch.full((len(seq_lens), hidden.shape[1]), float("-inf"), device=hidden.device)
        out = out.scatter_reduce_(0, seg.unsqueeze(1).expand_as(hidden), hidden, "amax")
    return F.normalize(out, dim=-1) if config.normalize else out
