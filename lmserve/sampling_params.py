"""SamplingParams: per-request generation settings, validated with errors that name the offending field."""
from __future__ import annotations

import math
import numbers
import struct
from dataclasses import dataclass, field

from lmserve.outputs import InvalidRequestError

MAX_LOGPROBS = 20
# NOTE: temperatures below this are greedy (dividing by ~0 overflows); the same threshold as vLLM
SAMPLING_EPS = 1e-5
# int64, as vLLM takes it: torch.Generator.manual_seed(seed + i) must fit [-2**63, 2**64) for every choice i
SEED_RANGE = (-(1 << 63), (1 << 63) - 1)
_INT_FIELDS = ("n", "max_tokens", "min_tokens", "top_k", "logprobs", "prompt_logprobs")
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


def as_float32(x: float) -> float:
    """x as the engine's float32 tensors hold it: rounded, and +-inf past float32's range."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def _f32_note(value, held: float) -> str:
    return "" if held == value else f" (as float32, which the engine computes in, it is {held!r})"


class SamplingParamsError(InvalidRequestError):
    """A bad generation setting. `param` names the field so the API can report it (OpenAI's error.param)."""

    def __init__(self, param: str, message: str):
        super().__init__(message, param)


@dataclass(frozen=True)
class GuidedDecodingParams:
    """A grammar the output must follow (exactly one of json / json_object / regex / choice / grammar).

    `param` is the request field it came from, so a bad schema is reported against that field. With
    `start_after` the constraint starts once that text has been generated (the answer after a reasoning block).
    """
    json: str | None = None               # a JSON schema, as JSON text
    json_object: bool = False             # any JSON object
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None            # EBNF (GBNF-style, as xgrammar reads it)
    param: str = "response_format"
    start_after: str | None = None

    def __post_init__(self):
        kinds = sum(x is not None for x in (self.json, self.regex, self.choice, self.grammar)) + self.json_object
        if kinds != 1:
            raise SamplingParamsError(self.param, f"{self.param}: give exactly one guided decoding constraint")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise SamplingParamsError(self.param, f"{self.param} must be a non-empty list of non-empty strings")

    @property
    def key(self) -> tuple:
        """What the compiled grammar depends on (start_after and param do not change it)."""
        return (self.json, self.json_object, self.regex, self.choice, self.grammar)


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16          # None = up to the session length
    min_tokens: int = 0                   # LMDeploy's min_new_tokens
    temperature: float = 1.0              # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                        # 0 or -1 = disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None           # None = off; k >= 0 = sampled token's logprob + k top alternatives
    prompt_logprobs: int | None = None    # None = off; k >= 0 = each prompt token's logprob + k alternatives
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    guided: GuidedDecodingParams | None = None   # constrained decoding (engine/guided.py)
    priority: int = 0                     # --scheduling-policy priority: lower is served first (vLLM's sense)
    # the LoRA adapter (engine/lora_manager.LoraRequest) the request's `model` named; None = the base model
    lora: object | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        def bad(param: str, msg: str):
            raise SamplingParamsError(param, msg)

        # NOTE: every range is checked on the value the engine will hold (float32), not on the float64 the
        # client sent: top_p=1e-300 is > 0 but becomes 0.0 in a tensor, and temperature=1e300 becomes inf
        # (issue 25). The same rule serves every door: OpenAI, LMDeploy, /generate, interactive, pipeline.
        held: dict[str, float] = {}
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, numbers.Real):
                bad(name, f"{name} must be a number, got {value!r}")
            held[name] = as_float32(value)
            if not math.isfinite(held[name]):
                bad(name, f"{name} must be a finite number{_f32_note(value, held[name])}, got {value}")
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, numbers.Integral):
                bad(name, f"{name} must be an integer, got {value!r}")
        if not all(isinstance(t, numbers.Integral) for t in self.stop_token_ids):
            bad("stop_token_ids", "stop_token_ids must be a list of integer token ids")
        if not isinstance(self.n, int) or self.n < 1:
            bad("n", f"n must be at least 1, got {self.n}")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad("max_tokens", f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            bad("min_tokens", f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        if held["temperature"] < 0:
            bad("temperature", f"temperature must be >= 0, got {self.temperature}")
        if not 0 < held["top_p"] <= 1:
            bad("top_p", f"top_p must be in (0, 1]{_f32_note(self.top_p, held['top_p'])}, got {self.top_p}")
        if self.top_k < 0:
            bad("top_k", f"top_k must be -1 (disabled) or >= 0, got {self.top_k}")
        if not 0 <= held["min_p"] <= 1:
            bad("min_p", f"min_p must be in [0, 1], got {self.min_p}")
        if held["repetition_penalty"] <= 0:
            bad("repetition_penalty", f"repetition_penalty must be > 0"
                f"{_f32_note(self.repetition_penalty, held['repetition_penalty'])}, got {self.repetition_penalty}")
        if not -2 <= self.presence_penalty <= 2:
            bad("presence_penalty", f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2 <= self.frequency_penalty <= 2:
            bad("frequency_penalty", f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= MAX_LOGPROBS:
                bad(name, f"{name} must be between 0 and {MAX_LOGPROBS}, got {v}")
        if self.logit_bias:
            for tok, bias in self.logit_bias.items():
                if not isinstance(bias, numbers.Real) or not -100 <= bias <= 100:
                    # NOTE: also false for NaN; in range here means in range in float32 too
                    bad("logit_bias", f"logit_bias values must be in [-100, 100], got {bias} for token {tok}")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            bad("priority", f"priority must be an integer, got {self.priority!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", "seed must be an integer")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            bad("seed", f"seed must be a 64-bit signed integer, in [-2**63, 2**63 - 1], got {self.seed}")

    def validate_vocab(self, vocab_size: int) -> None:
        """Checks that need the model: token ids inside the vocabulary."""
        for tok in (self.logit_bias or {}):
            if not isinstance(tok, numbers.Integral) or not 0 <= tok < vocab_size:
                raise SamplingParamsError("logit_bias", f"logit_bias token id {tok} is outside [0, {vocab_size})")
        for tok in self.stop_token_ids:
            if not 0 <= tok < vocab_size:
                raise SamplingParamsError("stop_token_ids", f"stop token id {tok} is outside [0, {vocab_size})")

    @property
    def is_greedy(self) -> bool:
        """The one definition, used by the sampler and the speculative verifier: the argmax, no randomness."""
        return self.temperature < SAMPLING_EPS or self.top_k == 1
