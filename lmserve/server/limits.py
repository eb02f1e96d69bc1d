"""Bounds on one request (the `ServerConfig.max_*` fields and their flags), checked at the edge before any work
is queued, and the checks on client text that must happen before a tokenizer sees it.

Why at the edge: the engine thread turns `n` into n sequences in one command, so an unbounded `n` is memory and
time the engine spends where no abort can reach it; a huge prompt is tokenizer time. Each bound is a 400 that
names the field and the flag that sets it.
"""
from __future__ import annotations

from collections.abc import Sized
from typing import Any

from lmserve.config import ServerConfig
from lmserve.server.errors import APIError


def _over(param: str, value: int, limit: int, flag: str, what: str) -> APIError:
    return APIError(400, f"{param}: {value} {what} is more than this server allows ({limit}; {flag})",
                    param=param, code="limit_exceeded")


def check_limits(config: ServerConfig, *, n: int | None = None, best_of: int | None = None,
                 logprobs: int | None = None, logprobs_param: str = "logprobs", stop: Any = None,
                 stop_token_ids: Sized | None = None, logit_bias: Sized | None = None) -> None:
    if n is not None and n > config.max_n:
        raise _over("n", n, config.max_n, "--max-n", "completions")
    if best_of is not None and best_of > config.max_n:
        raise _over("best_of", best_of, config.max_n, "--max-n", "candidates")
    if logprobs is not None and logprobs > config.max_logprobs:
        raise _over(logprobs_param, logprobs, config.max_logprobs, "--max-logprobs", "log probabilities")
    if isinstance(stop, list) and len(stop) > config.max_stop_sequences:
        raise _over("stop", len(stop), config.max_stop_sequences, "--max-stop-sequences", "stop strings")
    if stop_token_ids is not None and len(stop_token_ids) > config.max_stop_sequences:
        raise _over("stop_token_ids", len(stop_token_ids), config.max_stop_sequences, "--max-stop-sequences",
                    "stop token ids")
    if logit_bias is not None and len(logit_bias) > config.max_logit_bias:
        raise _over("logit_bias", len(logit_bias), config.max_logit_bias, "--max-logit-bias", "entries")


def check_num_prompts(config: ServerConfig, num: int, param: str) -> None:
    if num > config.max_prompts:
        raise _over(param, num, config.max_prompts, "--max-prompts", "prompts")


def check_text(text: str, param: str) -> None:
    """A lone UTF-16 surrogate ("\\ud800" in JSON) is valid JSON but not Unicode text: tokenizers and UTF-8
    encoders raise on it, so it is refused here, naming the field."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise APIError(400, f"{param} holds a lone UTF-16 surrogate ({text[exc.start]!r} at character "
                            f"{exc.start}), which is not valid Unicode text", param=param,
                       code="invalid_text") from None
