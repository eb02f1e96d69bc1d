"""Pure-logic tests of the block manager and the scheduler: no model, no torch tensors."""
from __future__ import annotations

import random

import pytest

from lmserve.config import SchedulerConfig
from lmserve.engine.block_manager import BlockManager
from lmserve.engine.scheduler import Scheduler
from lmserve.engine.sequence import Sequence
from lmserve.sampling_params import SamplingParams

BS = 4
_ids = iter(range(10**9))


def make_seq(tokens, max_tokens=8, **kw) -> Sequence:
    return Sequence(next(_ids), f"r{next(_ids)}", list(tokens), SamplingParams(max_tokens=max_tokens, **kw))


def make(num_blocks=16, max_num_seqs=8, budget=64, prefix=True, burst=None):
    bm = BlockManager(num_blocks, BS, prefix)
    return bm, Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                                         max_burst_batched_tokens=burst), bm)


def run_step(sched: Scheduler, token=7):
    """Simulate a model step: advance, and append a token to every sequence that reached its end."""
    out = sched.schedule()
    samplers = [s.seq for s in out.scheduled if s.samples]
    sched.update_after_step(out)
    for seq in samplers:
        seq.append_token(token)
        if seq.check_stop_token():
            sched.finish(seq)
    return out


# ---- block manager ----------------------------------------------------------------------------------------
def test_allocate_free_and_null_block_reserved():
    bm = BlockManager(5, BS)
    seq = make_seq(range(10))
    assert bm.allocate(seq, 10)
    assert len(seq.block_table) == 3 and 0 not in seq.block_table
    assert bm.num_free_blocks == 1
    other = make_seq(range(9))
    assert not bm.allocate(other, 9)          # needs 3, 1 free
    assert other.block_table == []            # failed allocation leaves nothing behind
    bm.free(seq)
    assert bm.num_free_blocks == 4 and bm.usage == 0.0


def test_prefix_hit_after_free_and_lazy_eviction():
    bm = BlockManager(6, BS)
    a = make_seq(range(12))
    bm.allocate(a, 12)
    a.num_computed_tokens = 12
    bm.cache_full_blocks(a)
    bm.free(a)
    b = make_seq(list(range(8)) + [99, 98, 97])
    hits = bm.find_cached_prefix(b)
    assert hits == a.block_table[:0] + hits and len(hits) == 2   # two full shared blocks
    # exhaust the free list: the cached blocks are evicted, and then no longer found
    c = make_seq(range(100, 120))
    assert bm.allocate(c, 20)
    assert bm.find_cached_prefix(b) == []


def test_full_hit_leaves_one_token_to_compute():
    bm = BlockManager(8, BS)
    a = make_seq(range(8))
    bm.allocate(a, 8)
    a.num_computed_tokens = 8
    bm.cache_full_blocks(a)
    b = make_seq(range(8))
    assert len(bm.find_cached_prefix(b)) == 1     # not 2: the last token must be computed for logits


def test_shared_blocks_refcounted():
    bm = BlockManager(8, BS)
    a = make_seq(range(9))
    bm.allocate(a, 9)
    a.num_computed_tokens = 9
    bm.cache_full_blocks(a)
    b = make_seq(list(range(8)) + [50, 51])
    hits = bm.find_cached_prefix(b)
    assert bm.allocate(b, 10, hits)
    assert b.block_table[:2] == a.block_table[:2]
    bm.free(a)
    assert all(bm.blocks[x].ref_count == 1 for x in b.block_table[:2])
    bm.free(b)
    assert bm.num_free_blocks == 7


def test_hash_collision_guard_compares_tokens():
    bm = BlockManager(8, BS)
    a = make_seq(range(8))
    bm.allocate(a, 8)
    a.num_computed_tokens = 8
    bm.cache_full_blocks(a)
    # forge: a different sequence whose first-block hash maps to a's block
    b = make_seq([5, 5, 5, 5, 1, 2])
    bm._compute_hashes(b, 1)
    bm.hash_to_block[b.block_hashes[0]] = a.block_table[0]
    assert bm.find_cached_prefix(b) == []


# ---- scheduler ----------------------------------------------------------------------------------------------
def test_chunked_prefill_respects_budget_and_decodes_keep_running():
    bm, sched = make(num_blocks=64, budget=8, burst=8)   # prefill priority off: chunking alone is tested here
    short = make_seq(range(3), max_tokens=50)
    sched.add(short)
    run_step(sched)                                  # short prefilled and sampled
    long = make_seq(range(100, 130), max_tokens=5)
    sched.add(long)
    for _ in range(4):
        out = sched.schedule()
        assert out.num_batched_tokens <= 8
        got = {s.seq.seq_id: s.num_new_tokens for s in out.scheduled}
        assert got[short.seq_id] == 1                # the decode is never stalled by the long prefill
        samplers = [s.seq for s in out.scheduled if s.samples]
        sched.update_after_step(out)
        for seq in samplers:
            seq.append_token(1)
    assert long.num_computed_tokens == 28 and long.num_output_tokens == 0


def test_preemption_recompute_everyone_finishes():
    bm, sched = make(num_blocks=9, max_num_seqs=8, budget=32)   # 8 usable blocks = 32 tokens
    seqs = [make_seq(range(i * 10, i * 10 + 6), max_tokens=6) for i in range(4)]
    for s in seqs:
        sched.add(s)
    steps = 0
    preempted = 0
    while sched.num_unfinished and steps < 500:
        preempted += len(run_step(sched).preempted)
        steps += 1
    assert sched.num_unfinished == 0
    assert all(s.num_output_tokens == 6 for s in seqs)
    assert preempted > 0 and sched.num_preemptions_total == preempted
    assert bm.num_free_blocks == 8


def test_max_num_seqs_limits_running():
    bm, sched = make(num_blocks=64, max_num_seqs=2)
    for i in range(4):
        sched.add(make_seq(range(i, i + 3)))
    out = sched.schedule()
    assert len(out.scheduled) == 2 and len(sched.waiting) == 2


def test_prefix_counters_and_cache_hit_in_scheduler():
    bm, sched = make(num_blocks=64)
    first = make_seq(list(range(12)) + [1], max_tokens=1)
    sched.add(first)
    while sched.num_unfinished:
        run_step(sched)
    second = make_seq(list(range(12)) + [2], max_tokens=1)
    sched.add(second)
    out = sched.schedule()
    assert second.num_cached_tokens == 12 and out.scheduled[0].num_new_tokens == 1
    assert bm.prefix_cache_queries == 26 and bm.prefix_cache_hits == 12


def test_prefix_caching_disabled_never_hits():
    bm, sched = make(num_blocks=64, prefix=False)
    for tail in (1, 2):
        seq = make_seq(list(range(12)) + [tail], max_tokens=1)
        sched.add(seq)
        while sched.num_unfinished:
            run_step(sched)
    assert bm.prefix_cache_hits == 0


def test_abort_frees_blocks_any_time():
    bm, sched = make(num_blocks=32)
    seqs = [make_seq(range(i, i + 9), max_tokens=20) for i in range(3)]
    for s in seqs:
        sched.add(s)
    run_step(sched)
    sched.finish(seqs[1])
    sched.finish(seqs[2])   # running
    while sched.num_unfinished:
        run_step(sched)
    assert bm.num_free_blocks == bm.num_usable_blocks


@pytest.mark.parametrize("seed", range(5))
def test_random_workload_invariants(seed):
    rng = random.Random(seed)
    bm, sched = make(num_blocks=20, max_num_seqs=6, budget=16)
    seqs = []
    for step in range(400):
        if rng.random() < 0.3 and len(seqs) < 30:
            shared = list(range(8)) if rng.random() < 0.5 else []
            s = make_seq(shared + [rng.randrange(1000) for _ in range(rng.randrange(1, 12))],
                         max_tokens=rng.randrange(1, 10))
            seqs.append(s)
            sched.add(s)
        if rng.random() < 0.05 and sched.running:
            sched.finish(rng.choice(sched.running))
        run_step(sched, token=rng.randrange(1000))
        # invariants: ref counts match block tables; free list and in-use blocks partition the pool
        refs = {}
        for s in sched.running:
            for b in s.block_table:
                refs[b] = refs.get(b, 0) + 1
        for b in range(1, bm.num_blocks):
            assert bm.blocks[b].ref_count == refs.get(b, 0)
            assert (b in bm.free_blocks) == (refs.get(b, 0) == 0)
    while sched.num_unfinished:
        run_step(sched)
    assert bm.num_free_blocks == bm.num_usable_blocks
