"""Generation defaults from the model (vLLM's `--generation-config`): the sampling settings a request gets for the
fields it does not set itself.

- `auto`: an HF directory's `generation_config.json` (temperature, top_p, top_k, min_p, repetition_penalty);
  a GGUF's `general.sampling.*` metadata (llama.cpp's keys for the same settings) or, when it has none, the
  settings its model card recommends (`MODEL_CARD_DEFAULTS`, keyed by `general.basename`).
- `none`: no model defaults; requests get the request models' own defaults (LMDeploy's api_server's).
- a path: a `generation_config.json` file, or a directory holding one.

Explicit request fields always win; a model default only fills a field the request left out (or sent as null).

`GenerationConfig` is the offline pipeline's per-call settings (LMDeploy's class of that name), whose defaults
come from the same table.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from lmserve.sampling_params import SamplingParams

# Field names as the request models and SamplingParams spell them.
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")

# llama.cpp's GGUF keys (gguf.Keys.General.SAMPLING_*) -> our field names.
_GGUF_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_p": "top_p",
              "general.sampling.top_k": "top_k", "general.sampling.min_p": "min_p",
              "general.sampling.penalty_repeat": "repetition_penalty"}

# GGUFs without sampling metadata: the settings the model card's usage example recommends.
# SmolLM2 (HuggingFaceTB/SmolLM2-{135M,360M,1.7B}-Instruct): `model.generate(..., temperature=0.2, top_p=0.9,
# do_sample=True)`. At the protocol's 0.7 (and the OpenAI default 1.0) the 135M model often drifts into French or
# repeats itself on a plain "What is the capital of France?" (docs/benchmarks.md, "First answers").
MODEL_CARD_DEFAULTS: dict[str, dict[str, float]] = {
    "smollm2": {"temperature": 0.2, "top_p": 0.9},
}

# The one default rule: a field the request sets wins; else the model's generation defaults (above); else the
# default of the API family the request came through, as that family's reference server has it. The request
# models and the offline GenerationConfig read their defaults from here and nowhere else. (SamplingParams itself
# keeps vLLM's SamplingParams defaults, temperature 1.0, for code that builds one directly.)
API_DEFAULTS: dict[str, dict[str, float]] = {
    # LMDeploy api_server's /v1/chat/completions and /v1/completions (its ChatCompletionRequest, CompletionRequest)
    "openai": {"temperature": 0.7, "top_p": 1.0, "top_k": 40},
    # LMDeploy's /generate (GenerateReqInput)
    "generate": {"temperature": 1.0, "top_p": 1.0, "top_k": 0},
    # LMDeploy's /v1/chat/interactive (GenerateRequest) and its console client `lmdeploy serve api_client`
    "interactive": {"temperature": 0.8, "top_p": 0.8, "top_k": 40},
    # LMDeploy's offline GenerationConfig (the temperature applies with do_sample=True)
    "offline": {"temperature": 0.8, "top_p": 1.0, "top_k": 0},
}


def _clean(raw: dict) -> dict:
    out = {}
    for name in SAMPLING_FIELDS:
        value = raw.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[name] = int(value) if name == "top_k" else float(value)
    return out


def _read_json_file(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"generation_config: cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"generation_config: {path} does not hold a JSON object")
    return data


def _from_gguf(model_path: str) -> tuple[dict, str]:
    from lmserve.model.gguf import gguf_metadata as _gguf_metadata, gguf_reader as _gguf_reader
    meta = _gguf_metadata(_gguf_reader(model_path))
    embedded = _clean({name: meta[key] for key, name in _GGUF_KEYS.items() if key in meta})
    if embedded:
        return embedded, "the GGUF's general.sampling metadata"
    basename = str(meta.get("general.basename") or "").lower()
    if basename in MODEL_CARD_DEFAULTS:
        return dict(MODEL_CARD_DEFAULTS[basename]), f"the {basename} model card"
    return {}, "none (the GGUF carries no sampling defaults)"


def load_generation_defaults(model_path: str, spec: str = "auto") -> tuple[dict, str]:
    """(defaults, where they came from) for `--generation-config spec` on the model at `model_path`."""
    if spec == "none":
        return {}, "none (--generation-config none)"
    if spec != "auto":
        path = os.path.expanduser(spec)
        if os.path.isdir(path):
            path = os.path.join(path, "generation_config.json")
        if not os.path.isfile(path):
            raise ValueError(f"generation_config: {spec!r} is not auto, none, a generation_config.json file "
                             "or a directory holding one")
        return _clean(_read_json_file(path)), path
    from lmserve.model.loader import is_gguf
    if is_gguf(model_path):
        return _from_gguf(model_path)
    path = os.path.join(model_path, "generation_config.json")
    if not os.path.isfile(path):
        return {}, "none (the model has no generation_config.json)"
    return _clean(_read_json_file(path)), path


def describe(defaults: dict, source: str) -> str:
    if not defaults:
        return f"generation defaults: {source}; requests get the API's own defaults"
    shown = ", ".join(f"{k}={v}" for k, v in defaults.items())
    return f"generation defaults from {source}: {shown} (fields a request sets win; --generation-config none: off)"


@dataclass
class GenerationConfig:
    """LMDeploy's GenerationConfig field names, mapped onto SamplingParams."""
    n: int = 1
    max_new_tokens: int = 512
    do_sample: bool = False
    top_p: float = API_DEFAULTS["offline"]["top_p"]
    top_k: int = API_DEFAULTS["offline"]["top_k"]
    min_p: float = 0.0
    temperature: float = API_DEFAULTS["offline"]["temperature"]
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    random_seed: int | None = None
    stop_words: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    min_new_tokens: int = 0
    skip_special_tokens: bool = True
    logprobs: int | None = None
    include_stop_str_in_output: bool = False

    def to_sampling_params(self) -> SamplingParams:
        return SamplingParams(
            n=self.n, max_tokens=self.max_new_tokens, min_tokens=self.min_new_tokens,
            temperature=self.temperature if self.do_sample else 0.0, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            seed=self.random_seed, stop=list(self.stop_words), stop_token_ids=list(self.stop_token_ids),
            ignore_eos=self.ignore_eos, logprobs=self.logprobs, skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output)
