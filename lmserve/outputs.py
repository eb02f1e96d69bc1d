"""The engine -> API boundary: plain Python data, no tensors.

Outputs are cumulative (text and token ids so far), so a slow consumer can skip intermediate ones and
compute deltas from what it last saw.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


class InvalidRequestError(ValueError):
    """A request the engine refuses before queueing it (engine/request_checks.py). `param` names the request field
    (OpenAI's error.param); `code` is a machine-readable reason, or None. The server maps it to a 400."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class FinishReason(str, enum.Enum):
    STOP = "stop"       # EOS, a stop token id or a stop string
    LENGTH = "length"   # max_tokens or the session length
    ABORT = "abort"     # aborted by the client, a disconnect or the server


@dataclass
class TokenLogprob:
    """One position: the chosen token's logprob and the top alternatives (token_id, logprob), best first."""
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None   # aligned with token_ids when requested
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None         # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    # prompt_logprobs[0] is None (the first token has no context); then one entry per prompt token
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None


@dataclass
class EmbeddingOutput:
    request_id: str
    prompt_token_ids: list[int]
    embedding: list[float]
