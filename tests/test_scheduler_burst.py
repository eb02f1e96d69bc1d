"""Scheduler policy under bursts of prompts (prefill priority while the decode batch is small). Pure Python."""
from __future__ import annotations

import random

import pytest

from lmserve.config import SchedulerConfig
from lmserve.engine.block_manager import BlockManager
from lmserve.engine.scheduler import Scheduler
from lmserve.engine.sequence import Sequence
from lmserve.sampling_params import SamplingParams

BS = 16
_ids = iter(range(10**9))


def make_seq(num_tokens: int, max_tokens: int = 64) -> Sequence:
    start = next(_ids) * 1000    # distinct prompts: no prefix-cache hits between them
    return Sequence(next(_ids), f"r{start}", list(range(start, start + num_tokens)),
                    SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def make(budget=512, burst=None, max_decodes=4, num_blocks=2048, max_num_seqs=256) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                             max_burst_batched_tokens=burst, burst_max_decodes=max_decodes)
    return Scheduler(config, BlockManager(num_blocks, BS, True))


def run_step(sched: Scheduler):
    out = sched.schedule()
    samplers = [s.seq for s in out.scheduled if s.samples]
    sched.update_after_step(out)
    for seq in samplers:
        seq.append_token(7)
        if seq.check_stop_token():
            sched.finish(seq)
    return out


def start_decoders(sched: Scheduler, n: int) -> list[Sequence]:
    seqs = [make_seq(8, max_tokens=1000) for _ in range(n)]
    for s in seqs:
        sched.add(s)
    while any(s.num_output_tokens == 0 for s in seqs):
        run_step(sched)
    return seqs


def steps_to_first_tokens(sched: Scheduler, burst: list[Sequence], decoders: list[Sequence]) -> list:
    """Run until every prompt of the burst has its first token; check on the way that every decoder is in every
    step. -> the step outputs."""
    steps = []
    while any(s.num_output_tokens == 0 for s in burst):
        out = run_step(sched)
        got = {s.seq.seq_id for s in out.scheduled}
        assert all(d.seq_id in got for d in decoders), "a decode was skipped"
        steps.append(out)
        assert len(steps) < 100
    return steps


def test_burst_is_prefilled_in_one_step_while_few_decode():
    sched = make()                                   # 512 per step, 2048 in a burst
    decoders = start_decoders(sched, 1)
    burst = [make_seq(128) for _ in range(16)]       # 16 x 128 = 2048 prompt tokens
    for s in burst:
        sched.add(s)
    steps = steps_to_first_tokens(sched, burst, decoders)
    # the old policy (512 per step, decodes counted in it) needed 5 steps, the last prompt waiting for all of them
    assert len(steps) == 1
    assert steps[0].num_batched_tokens == 2048 + 1


def test_large_decode_batch_keeps_the_base_budget():
    sched = make(max_decodes=4)
    decoders = start_decoders(sched, 8)              # more than burst_max_decodes: their ITL is protected
    burst = [make_seq(128) for _ in range(16)]
    for s in burst:
        sched.add(s)
    steps = steps_to_first_tokens(sched, burst, decoders)
    assert all(out.num_batched_tokens <= 512 for out in steps)
    assert len(steps) <= -(-2048 // (512 - 8 - 16)) + 1


def test_policy_off_is_the_plain_token_budget():
    sched = make(burst=512)
    decoders = start_decoders(sched, 1)
    burst = [make_seq(128) for _ in range(16)]
    for s in burst:
        sched.add(s)
    steps = steps_to_first_tokens(sched, burst, decoders)
    assert all(out.num_batched_tokens <= 512 for out in steps) and len(steps) == 5


def test_burst_larger_than_the_burst_budget_is_chunked_in_arrival_order():
    sched = make()
    burst = [make_seq(128) for _ in range(40)]       # 5120 tokens: more than one burst step
    for s in burst:
        sched.add(s)
    steps = steps_to_first_tokens(sched, burst, [])
    assert steps[0].num_batched_tokens == 2048       # nobody decodes yet: the burst budget
    # the first 16 decode from step 2 on (> burst_max_decodes): the base budget bounds their inter-token gap
    assert all(out.num_batched_tokens <= 512 for out in steps[1:])
    first = [s.first_scheduled_time for s in burst]
    assert first == sorted(first)                    # FCFS: nobody jumps the queue


def test_config_rejects_a_burst_budget_below_the_base():
    with pytest.raises(ValueError, match="max_burst_batched_tokens"):
        SchedulerConfig(max_num_batched_tokens=512, max_burst_batched_tokens=256)
    assert SchedulerConfig(max_num_batched_tokens=256).burst_budget == 1024


@pytest.mark.parametrize("seed", range(4))
def test_random_arrivals_no_starvation_and_bounded_steps(seed):
    """Random arrivals: every step fits its budget (the base one whenever more than burst_max_decodes sequences
    decode), no running decode is ever skipped, and every request finishes."""
    rng = random.Random(seed)
    sched = make(budget=64, max_decodes=2, num_blocks=400, max_num_seqs=12)
    seqs = []
    for step in range(3000):
        if step < 300 and rng.random() < 0.2:
            for _ in range(rng.choice([1, 1, 1, 6])):      # sometimes a burst
                s = make_seq(rng.randrange(1, 60), max_tokens=rng.randrange(1, 20))
                seqs.append(s)
                sched.add(s)
        if not sched.num_unfinished:
            if step >= 300:
                break
            continue
        decoding = [s for s in sched.running if s.num_computed_tokens >= s.num_prompt_tokens]
        out = run_step(sched)
        limit = 256 + len(decoding) if len(decoding) <= 2 else 64
        assert out.num_batched_tokens <= limit
        if not out.preempted:
            got = {s.seq.seq_id for s in out.scheduled}
            assert all(d.seq_id in got for d in decoding)
    assert sched.num_unfinished == 0 and all(s.is_finished for s in seqs)
