"""One request must never take the engine down (issue 25): a step that raises is retried without the request
that makes it fail, the others' outputs stay identical to solo runs; a dead engine loop restarts in place.

Faults come from the test-only injector (engine/fault.py): it raises inside the sampler, the model forward, a
kernel call or the scheduler for requests whose prompt contains a marker."""
from __future__ import annotations

import os

import pytest

from lmserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from lmserve.engine.fault import TEST_HOOKS_ENV, FaultInjector, RequestFailedError, parse_fault_spec, recover
from lmserve.engine.llm_engine import LLMEngine
from lmserve.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(900)

SPEC = "sampler:ZQSAMPLE,forward:ZQFORWARD,kernel:ZQKERNEL"
PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "Water boils at", "The quick brown fox",
           "Once upon a time", "def add(a, b):", "Roses are red,", "The sun rises in the"]


def greedy(n: int = 4) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(smollm2_path):
    old = os.environ.get(TEST_HOOKS_ENV)
    os.environ[TEST_HOOKS_ENV] = "1"
    try:
        # small budget: the 8 prompts prefill over several steps, so faults hit mixed prefill/decode batches
        yield LLMEngine(EngineConfig(model=ModelConfig(model=smollm2_path, dtype="float32", kernels="torch"),
                                     cache=CacheConfig(num_blocks=256),
                                     scheduler=SchedulerConfig(max_num_batched_tokens=32),
                                     fault_injection=SPEC))
    finally:
        if old is None:
            os.environ.pop(TEST_HOOKS_ENV, None)
        else:
            os.environ[TEST_HOOKS_ENV] = old


BAD = {1: ("sampler", "ZQSAMPLE"), 4: ("forward", "ZQFORWARD"), 6: ("kernel", "ZQKERNEL")}


@pytest.fixture(scope="module")
def solo(engine) -> dict[str, list[int]]:
    return {p: engine.generate([p], greedy())[0].outputs[0].token_ids
            for i, p in enumerate(PROMPTS) if i not in BAD or i == 0}


def run_all(engine: LLMEngine, prompts: list[str]) -> tuple[dict[str, list[int]], dict[str, RequestFailedError]]:
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, greedy())
    done, errors = {}, {}
    while engine.has_unfinished():
        for out in engine.step():
            if isinstance(out, RequestFailedError):
                errors[out.request_id] = out
            elif out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return done, errors


def test_failing_requests_fail_alone_and_the_others_match_solo_runs(engine, solo):
    """Faults in the sampler, the model forward and a kernel call, each for one request among 8 (bisection)."""
    before = engine.get_stats()
    prompts = [p + (f" {BAD[i][1]}" if i in BAD else "") for i, p in enumerate(PROMPTS)]
    done, errors = run_all(engine, prompts)
    assert sorted(errors) == sorted(f"r{i}" for i in BAD), errors
    for i, (kind, _) in BAD.items():
        assert f"injected {kind} fault" in str(errors[f"r{i}"])
    for i, p in enumerate(PROMPTS):
        if i not in BAD:
            assert done[f"r{i}"] == solo[p], p
    after = engine.get_stats()
    assert after.num_engine_faults_total > before.num_engine_faults_total
    assert after.num_isolated_requests_total == before.num_isolated_requests_total + len(BAD)
    # nothing leaked: every KV block is back, and the next request is served
    assert after.num_running == after.num_waiting == 0 and not engine.requests
    assert after.num_free_blocks == after.num_total_blocks
    assert engine.generate([PROMPTS[0]], greedy())[0].outputs[0].token_ids == solo[PROMPTS[0]]


def test_offline_generate_raises_after_the_others_finish(engine):
    with pytest.raises(RequestFailedError, match="sampler"):
        engine.generate([PROMPTS[0], PROMPTS[1] + " ZQSAMPLE"], greedy())
    assert not engine.requests and engine.get_stats().num_running == 0


def test_recover_frees_the_kv_fails_in_flight_and_keeps_the_queue(engine, solo):
    engine.add_request("running", PROMPTS[0], greedy())
    engine.step()                                    # prefilled: in flight
    engine.add_request("queued", PROMPTS[2], greedy())
    errors = recover(engine, RuntimeError("test"))
    assert [e.request_id for e in errors] == ["running"]
    assert list(engine.requests) == ["queued"]
    stats = engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks and stats.num_engine_restarts_total >= 1
    done, errors = {}, {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert done == {"queued": solo[PROMPTS[2]]}


def test_fault_injection_is_refused_without_the_test_flag(monkeypatch):
    monkeypatch.delenv(TEST_HOOKS_ENV, raising=False)
    with pytest.raises(ValueError, match=TEST_HOOKS_ENV):
        FaultInjector(object(), "sampler:X")
    with pytest.raises(ValueError, match="KIND:MARKER"):
        parse_fault_spec("bogus:X")
