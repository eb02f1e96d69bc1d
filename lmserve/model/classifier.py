"""Cross-encoder heads: BertForSequenceClassification / XLMRobertaForSequenceClassification on top of
model/bert.py, with sentence-transformers' CrossEncoder semantics for scores (a sigmoid over a single label).

A pair is encoded as the tokenizer's pair template ([CLS] a [SEP] b [SEP]; <s> a </s></s> b </s>). BERT tells the
two texts apart by token type (segment 1 after the first [SEP]); RoBERTa has one token type and no segments.
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn


def is_cross_encoder(model_path: str) -> bool:
    """True for an HF directory whose config.json names a *ForSequenceClassification architecture."""
    config = os.path.join(model_path, "config.json")
    if not os.path.isfile(config):
        return False
    with open(config) as f:
        archs = json.load(f).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in archs)


class ClassifierHead(nn.Module):
    """CLS hidden state -> one score per label. BERT: pooler (dense + tanh) then classifier; RoBERTa:
    classifier.dense + tanh then classifier.out_proj. Same two matmuls, different names."""

    def __init__(self, hidden_size: int, num_labels: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, num_labels)
        self.num_labels = num_labels

    def forward(self, cls: torch.Tensor) -> torch.Tensor:        # [num_seqs, hidden] -> [num_seqs, num_labels]
        logits = self.out(torch.tanh(self.dense(cls))).float()
        # NOTE: CrossEncoder's default activation: sigmoid for one label, the raw logits otherwise
        return torch.sigmoid(logits) if self.num_labels == 1 else logits


_NAMES = {  # ours -> (BERT name, RoBERTa name), after the `bert.` / `roberta.` prefix is removed
    "dense.weight": ("pooler.dense.weight", "classifier.dense.weight"),
    "dense.bias": ("pooler.dense.bias", "classifier.dense.bias"),
    "out.weight": ("classifier.weight", "classifier.out_proj.weight"),
    "out.bias": ("classifier.bias", "classifier.out_proj.bias"),
}


def load_classifier(weights: dict[str, torch.Tensor], hidden_size: int, roberta: bool,
                    dtype: torch.dtype, device: torch.device) -> ClassifierHead:
    bare = {k.removeprefix("bert.").removeprefix("roberta."): v for k, v in weights.items()}
    picked = {}
    for ours, names in _NAMES.items():
        name = names[1 if roberta else 0]
        if name not in bare:
            raise KeyError(f"cross-encoder checkpoint lacks {name!r} (the classifier head)")
        picked[ours] = bare[name]
    head = ClassifierHead(hidden_size, picked["out.weight"].shape[0])
    head.load_state_dict(picked)
    return head.to(device=device, dtype=dtype).eval().requires_grad_(False)


def pair_token_types(input_ids: torch.Tensor, seq_lens: list[int], sep_id: int) -> torch.Tensor:
    """[num_tokens] packed -> token type per token: 1 after the first separator of its sequence, else 0."""
    out = []
    start = 0
    for n in seq_lens:
        ids = input_ids[start:start + n]
        seps = (ids == sep_id).cumsum(0)
        # the first [SEP] itself belongs to segment 0: shift the count by one position
        out.append(torch.cat([seps.new_zeros(1), seps[:-1]]).clamp(max=1))
        start += n
    return torch.cat(out)
