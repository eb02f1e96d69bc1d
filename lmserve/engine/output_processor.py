"""Output processing: one step's model output -> per-sequence state. Every per-token decision lives here.

`Scheduler.update_from_output` calls `process_output` after the model ran: computed-token counts advance, pooled
hidden states accumulate (and a pooling sequence finishes once its prompt is in), prompt logprobs are recorded,
speculative tokens are accepted one by one, sampled tokens are appended, and stop strings / stop tokens finish a
sequence. Pure Python (tensors are only carried along, never built): the engine turns the touched sequences into
RequestOutputs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lmserve.engine.sequence import Sequence
from lmserve.outputs import FinishReason, TokenLogprob

if TYPE_CHECKING:
    from lmserve.engine.scheduler import Scheduler, SchedulerOutput


@dataclass
class StepUpdate:
    seqs: list[Sequence] = field(default_factory=list)   # sequences with new output this step, in batch order
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0


def process_output(scheduler: "Scheduler", sched: "SchedulerOutput", out) -> StepUpdate:
    """Apply a RunnerOutput (engine/model_runner.py) to the scheduled sequences."""
    scheduler.update_after_step(sched)
    update = StepUpdate()
    for s in sched.scheduled:
        seq = s.seq
        if s.num_new_tokens - len(s.spec_token_ids) > 1 or seq.num_output_tokens == 0:
            update.num_prefill_tokens += s.num_new_tokens
        else:
            update.num_decode_tokens += s.num_new_tokens
        if seq.is_finished:     # NOTE: cannot happen today (aborts run between steps); kept as a guard
            continue
        if seq.pooling:
            part = out.pooled[seq.seq_id]
            seq.pooled_sum = part if seq.pooled_sum is None else seq.pooled_sum + part
            if seq.num_computed_tokens >= seq.num_prompt_tokens:
                scheduler.finish(seq, FinishReason.STOP)
                update.seqs.append(seq)
            continue
        touched = False
        new_prompt_lps = out.prompt_logprobs.get(seq.seq_id)
        if new_prompt_lps:
            # NOTE: after a preemption the prompt is recomputed; only append entries not yet recorded
            have = len(seq.prompt_logprobs)
            first = seq.num_computed_tokens - s.num_new_tokens + 1
            seq.prompt_logprobs.extend(new_prompt_lps[max(0, have - first):])
            touched = True
        verified = out.verified.get(seq.seq_id)
        if verified is not None:
            if scheduler.spec is not None:
                scheduler.spec.record(seq, len(s.spec_token_ids), verified)
            lps = verified.logprobs or [None] * len(verified.token_ids)
            for i, (token, lp) in enumerate(zip(verified.token_ids, lps)):
                if i:   # the previous token was an accepted draft: its KV is already in the cache
                    seq.num_computed_tokens += 1
                if append_token(scheduler, seq, token, lp):
                    break
            scheduler.block_manager.cache_full_blocks(seq)
            touched = True
        else:
            token = out.sampled_token_ids.get(seq.seq_id)
            if token is not None:
                append_token(scheduler, seq, token, out.logprobs.get(seq.seq_id))
                touched = True
        if touched:
            update.seqs.append(seq)
    return update


def append_token(scheduler: "Scheduler", seq: Sequence, token: int, logprob: TokenLogprob | None) -> bool:
    """Append one generated token; check stop strings and stop tokens. True when seq finished."""
    if seq.first_token_time is None:
        seq.first_token_time = time.monotonic()
        scheduler.num_prompt_tokens_total += seq.num_prompt_tokens
    scheduler.num_generation_tokens_total += 1
    seq.append_token(token, logprob)
    stop_str = seq.detokenizer.update([token])
    if seq.guided is not None:
        seq.guided.accept(token, seq.detokenizer.output_text)
    if stop_str is not None:
        seq.finish_reason, seq.stop_reason = FinishReason.STOP, stop_str
    elif seq.check_stop_token():
        seq.detokenizer.finish()
    else:
        return False
    if scheduler.on_finish is not None:
        scheduler.on_finish(seq)     # before the blocks are freed: the engine may pin them (sessions, disagg)
    scheduler.finish(seq)
    return True
