"""Speculative decoding: n-gram prompt lookup proposals and exact verification.

The flow, per engine step (no separate phase: verification rides in the same forward as other sequences' work):
1. `SpecDecoder.propose(sched)` runs after the scheduler. For each decoding sequence it looks for the latest earlier
   occurrence of its last n tokens (n from prompt_lookup_max down to prompt_lookup_min) and proposes the k tokens
   that followed (no draft model: input-grounded text such as edits, summaries and RAG answers repeats its input).
   The drafts ride on the ScheduledSeq (`spec_token_ids`), which then computes 1 + k tokens.
2. The model runner computes [last token, d1..dk] like a prompt chunk and hands the k + 1 logits rows to `verify`.
3. `verify` keeps the output distribution exact. Greedy: accept d_i while it is the argmax. Sampled: the proposal is
   deterministic (q = one-hot at d_i), so the standard rule min(1, p/q) accepts d_i with probability p(d_i), and a
   rejection samples from the residual max(p - q, 0), i.e. p with d_i removed. After k acceptances a bonus token is
   sampled from the last row. Emitted tokens: accepted drafts + one more, so every step makes >= 1 token.
4. The engine appends the tokens one by one (stop tokens and stop strings end the run early) and moves
   num_computed_tokens over the accepted drafts, whose KV is already in the cache. A rejected draft's KV slot is
   overwritten by the next step, and only blocks covered by num_computed_tokens are hashed for the prefix cache.

Adaptive k (per sequence, `seq.spec_k`): a verification step costs more with every draft row (the quantized kernel
reads the weights once per group of rows), and n-gram drafts are either right for a long run (copying the input)
or wrong from the start (past the edit). So the draft length shrinks to one more than the drafts accepted when the
last verification rejected one, and doubles (up to num_speculative_tokens) when all were accepted: a copying run
pays for full-length drafts, a diverging one verifies a single cheap guess until it copies again.

Auto-off: with more than `disable_by_batch_size` decoding sequences a step proposes nothing; the batch is then
compute-bound and verifying guesses would cost more than it saves. Requests whose sampling depends on their own
output so far (penalties, min_tokens), on a private random stream (seed) or on a grammar are never speculated.
The draft-model path (`--speculative-draft-model`) is designed in at `propose` but not implemented.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lmserve.config import SpeculativeConfig
from lmserve.engine.block_manager import BlockManager
from lmserve.engine.sampler import SamplingMetadata, apply_logits_processors, compute_logprobs, processed_probs
from lmserve.engine.scheduler import SchedulerOutput
from lmserve.engine.sequence import Sequence
from lmserve.outputs import TokenLogprob

def ngram_propose(token_ids: list[int], k: int, max_n: int, min_n: int) -> list[int]:
    """The k tokens after the latest earlier occurrence of token_ids' last n tokens (longest n first)."""
    num = len(token_ids)
    for n in range(min(max_n, num - 1), min_n - 1, -1):
        tail = token_ids[num - n:]
        first = tail[0]
        # the latest earlier start, scanning backwards; a match must leave at least one token after it
        i = num - n - 1
        while i >= 0:
            if token_ids[i] == first and token_ids[i:i + n] == tail:
                return token_ids[i + n:i + n + k]
            i -= 1
    return []


def can_speculate(seq: Sequence) -> bool:
    p = seq.params
    return (seq.generator is None and not seq.pooling and not seq.wants_prompt_logprobs
            and seq.num_output_tokens >= p.min_tokens
            and p.repetition_penalty == 1.0 and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0
            and getattr(seq, "guided", None) is None)   # grammar masks (structured output) are not applied here


@dataclass
class VerifyResult:
    token_ids: list[int]                        # accepted drafts + one more (correction or bonus)
    logprobs: list[TokenLogprob] | None         # raw logprobs of each, when the request asked
    num_accepted: int


def verify(logits: torch.Tensor, draft: list[int], seq: Sequence) -> VerifyResult:
    """logits: [k + 1, vocab] raw rows for [last token, d1..dk]. Rejection sampling as in the module docstring."""
    k = len(draft)
    p = seq.params
    raw = logits.float()
    # NOTE: the sampler's own logits processing, row for row (can_speculate leaves only logit_bias to apply)
    md = SamplingMetadata.from_sequences([seq] * (k + 1), raw.shape[-1], raw.device)
    processed = raw.clone()                                                    # [k + 1, vocab]
    apply_logits_processors(processed, md)
    if p.is_greedy:
        target = processed.argmax(dim=-1).tolist()                            # [k + 1]
        num_acc = 0
        while num_acc < k and draft[num_acc] == target[num_acc]:
            num_acc += 1
        tokens = draft[:num_acc] + [target[num_acc]]
    else:
        probs = processed_probs(processed, md)                                 # [k + 1, vocab]
        d = torch.tensor(draft, dtype=torch.long)
        accept_p = probs[torch.arange(k), d] if k else probs.new_zeros(0)      # [k]
        u = torch.rand(k, dtype=torch.float64)
        rejected = (u >= accept_p.double()).nonzero()
        num_acc = int(rejected[0]) if len(rejected) else k
        row = probs[num_acc].double()
        if num_acc < k:
            row[draft[num_acc]] = 0.0     # the residual of a one-hot proposal: p without the rejected token
        # NOTE: the residual is > 0 whenever the draft was rejected with u < 1, since then p(d) < 1
        last = int(torch.multinomial(row / row.sum(), 1))
        tokens = draft[:num_acc] + [last]
    lps = None
    if p.logprobs is not None:
        lps = compute_logprobs(raw[:len(tokens)], tokens, p.logprobs)
    return VerifyResult(tokens, lps, num_acc)


def check_supported(config: SpeculativeConfig) -> None:
    """Fail before the weights load: only prompt lookup is implemented."""
    if config.method not in (None, "ngram"):
        raise ValueError(f"speculative_model: draft-model speculative decoding ({config.model!r}) is not "
                         "implemented yet; use --speculative-algorithm ngram")


class SpecDecoder:
    """Attaches per-sequence proposals to a scheduled step and keeps the acceptance counters for /metrics."""

    def __init__(self, config: SpeculativeConfig, block_manager: BlockManager, max_num_batched_tokens: int):
        check_supported(config)
        self.config = config
        self.block_manager = block_manager
        self.max_num_batched_tokens = max_num_batched_tokens
        self.num_draft_tokens = 0          # proposed
        self.num_accepted_tokens = 0       # of those, accepted
        self.num_emitted_tokens = 0        # tokens made by verification steps (accepted + 1 each)
        self.num_verify_steps = 0          # sequence-steps that verified a proposal

    def propose(self, sched: SchedulerOutput) -> None:
        cfg = self.config
        decoding = [s for s in sched.scheduled if s.num_new_tokens == 1 and s.samples]
        if not decoding:
            return
        if len(decoding) > cfg.disable_by_batch_size:
            return
        room = self.max_num_batched_tokens - sched.num_batched_tokens
        for s in decoding:
            seq = s.seq
            if room <= 0:
                break
            if not can_speculate(seq):
                continue
            k = min(seq.spec_k or cfg.num_speculative_tokens, room, self._max_new(seq) - 1)
            if k <= 0:
                continue
            draft = ngram_propose(seq.token_ids, k, cfg.prompt_lookup_max, cfg.prompt_lookup_min)
            # NOTE: no preemption for a guess: drafts only where free blocks already allow them
            if not draft or not self.block_manager.allocate(seq, seq.num_computed_tokens + 1 + len(draft)):
                continue
            s.spec_token_ids = draft
            s.num_new_tokens += len(draft)
            room -= len(draft)
            sched.num_batched_tokens += len(draft)

    @staticmethod
    def _max_new(seq: Sequence) -> int:
        """Tokens this sequence may still emit (max_tokens, session length)."""
        left = seq.max_model_len - seq.num_tokens if seq.max_model_len is not None else 1 << 30
        if seq.params.max_tokens is not None:
            left = min(left, seq.params.max_tokens - seq.num_output_tokens)
        return left

    def record(self, seq: Sequence, num_draft: int, result: VerifyResult) -> None:
        """Count one verification and set the sequence's next draft length (adaptive k, module docstring)."""
        k_max = self.config.num_speculative_tokens
        if result.num_accepted == num_draft:   # a short draft (the match ran out) says nothing against longer ones
            seq.spec_k = min(2 * max(num_draft, seq.spec_k or k_max), k_max)
        else:
            seq.spec_k = result.num_accepted + 1
        self.num_draft_tokens += num_draft
        self.num_accepted_tokens += result.num_accepted
        self.num_emitted_tokens += len(result.token_ids)
        self.num_verify_steps += 1
