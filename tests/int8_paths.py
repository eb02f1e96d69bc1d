"""Scores of one text on a GGUF's three paths: int8 activations on repacked weights ("auto"), int8 on the file's
layout ("none"), and the exact float path ("float"). The repacked-vs-file-layout tests compare the first two by
their distance to the third."""
from __future__ import annotations

import torch

from lmserve.config import CacheConfig, EngineConfig, ModelConfig
from lmserve.engine.llm_engine import LLMEngine
from lmserve.sampling_params import SamplingParams

TEXT = ("The capital of France is Paris. The quick brown fox jumps over the lazy dog, and then it runs away into "
        "the forest where")
PATHS = {"auto": dict(gguf_repack="auto", quant_activations="int8"),
         "none": dict(gguf_repack="none", quant_activations="int8"),
         "float": dict(dtype="float32", quant_activations="float")}


def score_paths(model: str, text: str = TEXT) -> tuple[dict[str, torch.Tensor], dict[str, set[str]]]:
    """-> (path -> prompt logprobs of `text`, path -> the GGUF types its linear layers hold)."""
    scores, qtypes = {}, {}
    for mode, kw in PATHS.items():
        engine = LLMEngine(EngineConfig(model=ModelConfig(model=model, **kw), cache=CacheConfig(num_blocks=128)))
        qtypes[mode] = {p.qtype for m in engine.runner.model.modules() if hasattr(m, "linear_method")
                        for p in getattr(m.linear_method, "parts", [])}
        ids = engine.tokenizer.encode(text)
        out = engine.generate([ids], SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0))[0]
        scores[mode] = torch.tensor([lp.logprob for lp in out.prompt_logprobs[1:]])
        del engine
    return scores, qtypes


def distances_to_float(scores: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """|repacked - float| and |file layout - float| per token."""
    return (scores["auto"] - scores["float"]).abs(), (scores["none"] - scores["float"]).abs()
