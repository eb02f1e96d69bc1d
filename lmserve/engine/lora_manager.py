"""LoRA adapters served on the base model: which are loaded (each a model name), and each step's row groups.

A request names an adapter by `model`; the server resolves it to a LoraRequest, which rides on the request's
SamplingParams, so every sequence carries its adapter (and holds it: an adapter unloaded while requests use it
stays in memory until the last of them ends, while new requests get 404 at once). Per step the model runner
collects each sequence's rows; `groups` merges them per adapter (one slice when an adapter's rows are contiguous,
else an index tensor) and model/lora.py adds one pair of small matmuls per adapter present on every targeted
linear layer. The prefix cache is keyed by `lora_id` (Sequence.cache_salt), so two adapters never share KV.
"""
from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field

import torch

from lmserve.config import LoraConfig
from lmserve.model.lora import LoraAdapter, LoraError, check_shapes, install_hooks, load_peft_adapter


@dataclass(frozen=True, eq=False)
class LoraRequest:
    name: str
    lora_id: int                          # unique per load: a reloaded name never meets its old cached KV
    path: str
    base_model_name: str | None = None
    adapter: LoraAdapter | None = field(default=None, repr=False)

    def __deepcopy__(self, memo):         # one copy of the weights, however often params are copied
        return self


class LoraManager:
    def __init__(self, config: LoraConfig, runner):
        """runner: the ModelRunner whose model the adapters apply to (its `model`, `dtype`, `device`)."""
        if getattr(runner, "is_encoder", False):
            raise LoraError("LoRA adapters are served on decoder (generation) models only")
        self.config = config
        self.runner = runner
        self.adapters: dict[str, LoraRequest] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._model = None
        self.shapes: dict[tuple[int, str], tuple[int, int]] = {}
        self._ensure_hooks()
        for name, path, base in config.modules:
            self.load(name, path, base)

    def _ensure_hooks(self) -> None:
        # NOTE: again after a level-2 sleep rebuilt the model
        if self._model is not self.runner.model and self.runner.model is not None:
            self.shapes = install_hooks(self.runner.model)
            self._model = self.runner.model

    def get(self, name: str) -> LoraRequest | None:
        return self.adapters.get(name)

    def load(self, name: str, path: str, base_model_name: str | None = None) -> LoraRequest:
        """Raises LoraError (a bad adapter, or over --max-loras); KeyError if the name is taken."""
        if name in self.adapters:
            raise KeyError(name)
        if len(self.adapters) >= self.config.max_loras:
            raise LoraError(f"{len(self.adapters)} adapters are loaded, the most --max-loras allows; unload one "
                            "first")
        adapter = load_peft_adapter(name, path, self.config.max_lora_rank, dtype=self.runner.dtype)
        check_shapes(adapter, self.shapes)
        dev = self.runner.device
        adapter.weights = {k: (a.to(dev), b.to(dev)) for k, (a, b) in adapter.weights.items()}
        with self._lock:
            if name in self.adapters:
                raise KeyError(name)
            req = LoraRequest(name, next(self._ids), path, base_model_name, adapter)
            self.adapters[name] = req
        return req

    def unload(self, name: str) -> LoraRequest | None:
        with self._lock:
            return self.adapters.pop(name, None)

    def groups(self, lora_rows: list[tuple[LoraRequest, int, int]], device: torch.device):
        """(adapter, first row, rows) per scheduled sequence -> model/lora.py's step groups: (adapter, rows)."""
        self._ensure_hooks()
        spans: dict[int, tuple[LoraAdapter, list[tuple[int, int]]]] = {}
        for req, row, n in lora_rows:
            ranges = spans.setdefault(req.lora_id, (req.adapter, []))[1]
            if ranges and ranges[-1][1] == row:
                ranges[-1] = (ranges[-1][0], row + n)   # the next sequence of the same adapter: one span
            else:
                ranges.append((row, row + n))
        out = []
        for adapter, ranges in spans.values():
            if len(ranges) == 1:
                out.append((adapter, slice(*ranges[0])))
            else:
                rows = list(itertools.chain.from_iterable(range(a, b) for a, b in ranges))
                out.append((adapter, torch.tensor(rows, dtype=torch.long, device=device)))
        return out
