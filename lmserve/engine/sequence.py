"""Sequence: all per-request state in one object. Derived values are properties, never copies."""
from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

from lmserve.outputs import FinishReason, TokenLogprob
from lmserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch

    from lmserve.engine.detokenizer import IncrementalDetokenizer
    from lmserve.engine.guided import GuidedState


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class Sequence:
    """One generated completion. A request with n > 1 has n sequences sharing `request_id` (index 0..n-1)."""

    def __init__(
        self,
        seq_id: int,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        index: int = 0,
        arrival_time: float | None = None,
        eos_token_ids: frozenset[int] = frozenset(),
        max_model_len: int | None = None,
    ):
        self.seq_id = seq_id
        self.request_id = request_id
        self.index = index
        self.params = params
        self.prompt_token_ids: list[int] = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        # NOTE: token_ids is prompt + output; kept as one list so the hot path never concatenates.
        self.token_ids: list[int] = list(prompt_token_ids)
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0       # tokens whose KV is in the cache
        self.num_cached_tokens = 0         # prompt tokens served from the prefix cache at first schedule
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of this sequence's full blocks, in order
        self.num_preemptions = 0
        self.finish_reason: FinishReason | None = None
        self.stop_reason: str | int | None = None
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[TokenLogprob | None] | None = (
            [None] if params.prompt_logprobs is not None else None)
        self.generator: torch.Generator | None = None   # set by the engine when params.seed is given
        self.detokenizer: IncrementalDetokenizer | None = None
        self.guided: GuidedState | None = None            # grammar matcher when params.guided is set
        self.spec_k: int | None = None     # speculative draft length for the next step (engine/spec_decode.py)
        # NOTE: a child of an n > 1 request waits until its first sibling has computed the prompt, so it
        # reuses those KV blocks through the prefix cache instead of computing the prompt again.
        self.wait_for: Sequence | None = None
        # pooling (embedding) requests compute the prompt only and sum its final hidden states
        self.pooling = False
        self.pooled_sum: torch.Tensor | None = None
        # NOTE: an encoder attends both ways, so its prompt cannot be split into chunks: scheduled whole or not
        self.needs_whole_prompt = False
        self.session_id: int | None = None
        self.mm_items: list = []    # images in the prompt (engine/mm_items.py), shared by a request's sequences
        # M-RoPE models (engine/mrope.py): the prompt's 3 position streams and the offset of later positions
        self.mrope_positions: list[list[int]] | None = None
        self.mrope_delta = 0
        self.arrival_time = arrival_time if arrival_time is not None else time.monotonic()
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finished_time: float | None = None

    # ---- derived values -------------------------------------------------------------------------------
    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def priority(self) -> int:
        return self.params.priority

    @property
    def cache_salt(self) -> tuple | None:
        """Where the chain of prefix-cache block hashes starts: the LoRA adapter, so adapters never share KV."""
        lora = self.params.lora
        return None if lora is None else ("lora", lora.lora_id)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None and self.num_output_tokens == 0

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request_id!r}, status={self.status.name}, "
                f"tokens={self.num_tokens}, computed={self.num_computed_tokens}, blocks={len(self.block_table)})")

    # ---- mutation -------------------------------------------------------------------------------------
    def append_token(self, token_id: int, logprob: TokenLogprob | None = None) -> None:
        self.output_token_ids.append(token_id)
        self.token_ids.append(token_id)
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)

    def check_stop_token(self) -> bool:
        """Stop conditions on token ids (stop strings are the detokenizer's job). Sets finish_reason."""
        params = self.params
        n_out = len(self.output_token_ids)
        if n_out == 0:
            return False
        last = self.output_token_ids[-1]
        if n_out >= params.min_tokens:
            if not params.ignore_eos and last in self.eos_token_ids:
                self.finish_reason, self.stop_reason = FinishReason.STOP, None
                return True
            if last in params.stop_token_ids:
                self.finish_reason, self.stop_reason = FinishReason.STOP, last
                return True
        if params.max_tokens is not None and n_out >= params.max_tokens:
            self.finish_reason = FinishReason.LENGTH
            return True
        if self.max_model_len is not None and len(self.token_ids) >= self.max_model_len:
            self.finish_reason = FinishReason.LENGTH
            return True
        return False
