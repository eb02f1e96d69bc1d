"""Scheduler: waiting/running queues under a token budget. Pure Python, no torch.

There are no prefill and decode phases: each step gives every scheduled sequence
`min(uncomputed tokens, remaining budget)` tokens, so chunked prefill, prefix-cache hits and
preemption-by-recompute all go through one code path. Running sequences are served first (oldest first);
when blocks run out, the newest running sequence is preempted (its blocks freed, recomputed later). Under
`--scheduling-policy priority` both queues are in (priority, arrival) order instead (engine/priority.py), so
"oldest" reads "most urgent" and "newest" reads "least urgent".

The budget is `max_num_batched_tokens`, which bounds how long a step (so a decoder's inter-token gap) gets.
Prefill priority: while prompts wait and the decode batch is small (<= `burst_max_decodes` sequences), the
budget rises to `max_burst_batched_tokens`, so a burst of prompts is prefilled in fewer steps with fewer decode
rows in between (its last prompt's first token comes sooner) and only those few decoders see the longer step.
Decodes are still in every step and prompts still go in arrival order.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from lmserve.config import SchedulerConfig
from lmserve.engine.block_manager import BlockManager
from lmserve.engine.mm_items import fit_budget
from lmserve.engine.output_processor import StepUpdate, process_output
from lmserve.engine.priority import insert_waiting, order_running
from lmserve.engine.sequence import Sequence, SequenceStatus
from lmserve.outputs import FinishReason


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int          # tokens computed this step, starting at seq.num_computed_tokens (drafts included)
    # speculative drafts computed after the sequence's last token (engine/spec_decode.py); not in seq.token_ids
    spec_token_ids: list[int] = field(default_factory=list)

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the sequence, so the model's last logits give a new token."""
        return self.seq.num_computed_tokens + self.num_new_tokens - len(self.spec_token_ids) == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    num_batched_tokens: int = 0
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions_total = 0
        self.num_prompt_tokens_total = 0         # prompts that produced a first token
        self.num_generation_tokens_total = 0
        self.spec = None        # SpecDecoder, when on: counts each verification (engine/spec_decode.py)
        self.on_finish = None   # called with a sequence that finished generating, before its blocks are freed

    @property
    def num_unfinished(self) -> int:
        """Sequences waiting or running (the scheduler tests drive steps until this is 0)."""
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        insert_waiting(self.waiting, seq, self.config.policy)

    # ---- schedule -----------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.step_budget()
        bm = self.block_manager
        order_running(self.running, self.config.policy)
        # 1. running sequences, oldest first
        scheduled_running: list[Sequence] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = fit_budget(seq, seq.num_computed_tokens, min(seq.num_uncomputed_tokens, budget), budget,
                                 not out.scheduled)   # images: the encoder's work counts too
            if num_new == 0:   # an image it reaches does not fit this step's budget (mm_items.fit_budget)
                i += 1
                continue
            while not bm.allocate(seq, seq.num_computed_tokens + num_new):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:   # it preempted itself: nothing left to free
                break
            out.scheduled.append(ScheduledSeq(seq, num_new))
            scheduled_running.append(seq)
            budget -= num_new
            i += 1
        # 2. waiting sequences, in arrival order; none join in a step that had to preempt
        if not out.preempted:
            self._schedule_waiting(out, budget)
        out.num_batched_tokens = sum(s.num_new_tokens for s in out.scheduled)
        return out

    def step_budget(self) -> int:
        """This step's token budget (module docstring: prefill priority while the decode batch is small)."""
        cfg = self.config
        if cfg.burst_budget <= cfg.max_num_batched_tokens:
            return cfg.max_num_batched_tokens   # the policy is off
        decoding = 0
        prefilling = bool(self.waiting)
        for seq in self.running:
            if seq.num_computed_tokens >= seq.num_prompt_tokens:
                decoding += 1
            else:
                prefilling = True
        if prefilling and decoding <= cfg.burst_max_decodes:
            return cfg.burst_budget + decoding    # the burst budget is for prompt tokens; those few decodes ride along
        return cfg.max_num_batched_tokens

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        bm = self.block_manager
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq.wait_for is not None and not self._prefix_ready(seq):
                skipped.append(self.waiting.popleft())
                continue
            cached: list[int] = []
            if seq.num_computed_tokens == 0 and not (seq.wants_prompt_logprobs or seq.pooling):
                cached = bm.find_cached_prefix(seq)
            num_cached_tokens = len(cached) * bm.block_size
            num_new = fit_budget(seq, num_cached_tokens, min(seq.num_tokens - num_cached_tokens, budget), budget,
                                 not out.scheduled)
            if num_new == 0:
                break
            if seq.needs_whole_prompt and num_new < seq.num_tokens:
                break   # waits for a step with room for all of it (its length is capped at the full budget)
            if not bm.allocate(seq, num_cached_tokens + num_new, cached):
                break   # NOTE: FCFS: a later, smaller request does not jump the queue
            self.waiting.popleft()
            if seq.num_preemptions == 0:
                bm.record_prefix_query(seq.num_prompt_tokens, num_cached_tokens)
                seq.num_cached_tokens = num_cached_tokens
            seq.num_computed_tokens = num_cached_tokens
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))

    @staticmethod
    def _prefix_ready(seq: Sequence) -> bool:
        leader = seq.wait_for
        if leader.is_finished or leader.num_computed_tokens >= leader.num_prompt_tokens:
            seq.wait_for = None
            return True
        return False

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.num_preemptions_total += 1
        insert_waiting(self.waiting, seq, self.config.policy, front=True)

    # ---- update -------------------------------------------------------------------------------------------
    def update_from_output(self, out: SchedulerOutput, runner_output) -> StepUpdate:
        """Apply the model's output to the step's sequences: every per-token decision (engine/output_processor.py)."""
        return process_output(self, out, runner_output)

    def update_after_step(self, out: SchedulerOutput) -> None:
        """Advance computed-token counts and register newly full blocks (the first part of update_from_output)."""
        for s in out.scheduled:
            # NOTE: drafts count once accepted (the engine moves num_computed_tokens over them)
            s.seq.num_computed_tokens += s.num_new_tokens - len(s.spec_token_ids)
            self.block_manager.cache_full_blocks(s.seq)

    def finish(self, seq: Sequence, reason: FinishReason | None = None) -> None:
        """Remove seq from the queues and free its blocks (end of generation, stop string or abort)."""
        if seq.is_finished:
            return
        if reason is not None:
            seq.finish_reason = reason
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finished_time = time.monotonic()
