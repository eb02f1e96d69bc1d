"""The engine's input checks: run once per request, at the engine's edge (LLMEngine.check_request, which both
AsyncEngine.generate and the offline LLMEngine.add_request call). Each failure is one InvalidRequestError naming
the field; the server turns it into a 400 (server/state.py open_generation), the offline pipeline raises it.

SamplingParams checks its own ranges when it is built (sampling_params.py); what needs the model (vocabulary size,
session length, task) is checked here.
"""
from __future__ import annotations

from dataclasses import dataclass

from lmserve.outputs import InvalidRequestError
from lmserve.sampling_params import SamplingParams

# Both phrasings are kept: clients and tests match on "embedding model" and on "embeddings only".
_TASK_NAMES = {"embed": ("an embedding model", "embeddings only"), "score": ("a cross-encoder", "scores only")}


@dataclass(frozen=True)
class RequestLimits:
    """What a request is checked against: the model's task, vocabulary size and session length."""
    task: str
    vocab_size: int
    max_model_len: int


def check_request(limits: RequestLimits, prompt_ids: list[int], params: SamplingParams | None) -> None:
    """A generation request (params given) or a pooling input (params None). Raises InvalidRequestError."""
    if params is not None and limits.task != "generate":
        kind, serves = _TASK_NAMES.get(limits.task, (limits.task, limits.task))
        raise InvalidRequestError(f"the model is {kind}: this engine serves {serves} "
                                  f"(task {limits.task!r}); it does not generate",
                                  param="model", code="wrong_model_task")
    what = "the prompt" if params is not None else "the input"
    if not prompt_ids:
        raise InvalidRequestError(f"{what} is empty", param="prompt")
    vocab = limits.vocab_size
    bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise InvalidRequestError(f"{what} holds token id {bad}, outside the vocabulary [0, {vocab})",
                                  param="prompt")
    num, max_len = len(prompt_ids), limits.max_model_len
    if params is None:
        if num > max_len:
            raise InvalidRequestError(f"the input has {num} tokens, more than the session length {max_len}",
                                      param="input", code="context_length_exceeded")
        return
    if num + 1 > max_len:
        raise InvalidRequestError(f"the prompt has {num} tokens, which leaves no room for output in the session "
                                  f"length of {max_len} tokens (--session-len)", param="prompt",
                                  code="context_length_exceeded")
    max_tokens = params.max_tokens or 1
    if num + max_tokens > max_len:
        raise InvalidRequestError(f"this model's maximum context length is {max_len} tokens; the request needs "
                                  f"{num} prompt tokens + {max_tokens} completion tokens", param="max_tokens")
    params.validate_vocab(vocab)
