"""The engine's one input check (engine/request_checks.py) driven with every bad input the API tests send, and
the proof that a served request (generation or pooling) runs it exactly once."""
from __future__ import annotations

import asyncio
import time

import pytest

from lmserve.engine import request_checks
from lmserve.engine.request_checks import RequestLimits, check_request
from lmserve.outputs import InvalidRequestError
from lmserve.sampling_params import SamplingParams, SamplingParamsError

LIMITS = RequestLimits(task="generate", vocab_size=100, max_model_len=32)


@pytest.mark.parametrize("limits, ids, params, param, code", [
    (RequestLimits("embed", 100, 32), [1, 2], SamplingParams(), "model", "wrong_model_task"),
    (RequestLimits("score", 100, 32), [1, 2], SamplingParams(), "model", "wrong_model_task"),
    (LIMITS, [], SamplingParams(), "prompt", None),
    (LIMITS, [1, 100], SamplingParams(), "prompt", None),
    (LIMITS, [-1], SamplingParams(), "prompt", None),
    (LIMITS, [1] * 32, SamplingParams(max_tokens=None), "prompt", "context_length_exceeded"),
    (LIMITS, [1] * 20, SamplingParams(max_tokens=13), "max_tokens", None),
    (LIMITS, [1], SamplingParams(logit_bias={100: 1.0}), "logit_bias", None),
    (LIMITS, [1], SamplingParams(stop_token_ids=[100]), "stop_token_ids", None),
    (LIMITS, [1] * 33, None, "input", "context_length_exceeded"),
    (LIMITS, [], None, "prompt", None),
])
def test_every_bad_input_is_one_error_naming_the_field(limits, ids, params, param, code):
    with pytest.raises(InvalidRequestError) as info:
        check_request(limits, ids, params)
    assert info.value.param == param and info.value.code == code and str(info.value)


def test_good_inputs_pass_and_sampling_errors_are_the_same_type():
    check_request(LIMITS, [1] * 20, SamplingParams(max_tokens=12, logit_bias={99: 1.0}, stop_token_ids=[0]))
    check_request(LIMITS, [1] * 32, None)
    assert issubclass(SamplingParamsError, InvalidRequestError)


def test_a_served_request_is_checked_once(monkeypatch, tmp_path, tiny_models):
    """AsyncEngine checks on the caller's thread; the engine thread queues without checking again."""
    from lmserve.config import CacheConfig, EngineConfig, ModelConfig
    from lmserve.engine.async_engine import AsyncEngine, EngineSleepingError
    from lmserve.engine import llm_engine

    calls = []
    monkeypatch.setattr(llm_engine, "check_request", lambda *a: calls.append(a) or request_checks.check_request(*a))
    engine = AsyncEngine.from_config(EngineConfig(model=ModelConfig(model=tiny_models["llama"], dtype="float32"),
                                                  cache=CacheConfig(num_blocks=64)))

    async def run():
        await engine.start()
        try:
            outs = [o async for o in engine.generate("r1", [1, 2, 3], SamplingParams(max_tokens=2))]
            with pytest.raises(InvalidRequestError):
                [o async for o in engine.generate("r2", [], SamplingParams(max_tokens=2))]
            assert len(calls) == 2
            # pooling: every input checked once, all before any is queued; the bad one's position is reported
            vectors = await engine.encode_all([[1, 2], [3]])
            assert len(vectors) == 2 and len(calls) == 4
            with pytest.raises(InvalidRequestError) as info:
                await engine.encode_all([[1], [], [2]])
            assert info.value.index == 1 and len(calls) == 6
            # a sleeping engine refuses new work in one place, before any input check
            engine.is_sleeping = True
            with pytest.raises(EngineSleepingError):
                [o async for o in engine.generate("r3", [1], SamplingParams(max_tokens=2))]
            with pytest.raises(EngineSleepingError):
                await engine.encode_all([[1]])
            engine.is_sleeping = False
            return outs
        finally:
            await engine.shutdown()

    outs = asyncio.run(run())
    assert outs[-1].finished and len(calls) == 6


def test_engine_steps_do_not_read_memory_residency(tiny_models, monkeypatch):
    """The async engine's per-step stats snapshot leaves memory out; a /metrics scrape reads it (once)."""
    from lmserve.config import CacheConfig, EngineConfig, ModelConfig
    from lmserve.engine import weights
    from lmserve.engine.async_engine import AsyncEngine

    reads = []
    real = weights.memory_stats
    monkeypatch.setattr("lmserve.engine.async_engine.memory_stats", lambda r: reads.append(1) or real(r))
    engine = AsyncEngine.from_config(EngineConfig(model=ModelConfig(model=tiny_models["llama"], dtype="float32"),
                                                  cache=CacheConfig(num_blocks=64)))

    async def run():
        await engine.start()
        try:
            outs = [o async for o in engine.generate("r", [1, 2, 3], SamplingParams(max_tokens=8, ignore_eos=True))]
            assert outs[-1].finished
            assert engine.get_stats().memory == {} and not reads
            assert engine.get_stats(memory=True).memory["kv_cache"] > 0 and len(reads) == 1
        finally:
            await engine.shutdown()

    asyncio.run(run())


def test_the_heap_is_trimmed_once_after_a_burst_when_idle(monkeypatch, tiny_models):
    """After work, a second without any gives freed memory back to the OS (trim_heap): once per idle spell, never
    while requests run."""
    from lmserve.config import CacheConfig, EngineConfig, ModelConfig
    from lmserve.engine.async_engine import AsyncEngine

    trims = []
    monkeypatch.setattr("lmserve.engine.async_engine.trim_heap", lambda: trims.append(time.monotonic()))
    engine = AsyncEngine.from_config(EngineConfig(model=ModelConfig(model=tiny_models["llama"], dtype="float32"),
                                                  cache=CacheConfig(num_blocks=64)))

    async def run():
        await engine.start()
        try:
            await asyncio.sleep(1.3)
            assert trims == []                       # idle since start: nothing freed by requests
            outs = [o async for o in engine.generate("r", [1, 2, 3], SamplingParams(max_tokens=8, ignore_eos=True))]
            done = time.monotonic()
            assert outs[-1].finished and trims == []
            await asyncio.sleep(3.5)
            assert len(trims) == 1 and trims[0] - done >= 0.9     # once, after a second of idleness
        finally:
            await engine.shutdown()

    asyncio.run(run())
