"""Batch invariance of the quantized linear: a row's output does not depend on how many rows share the call, so
chunked prefill mixed with decodes cannot flip a greedy request's tokens (CI once saw
test_proxy_e2e.py::test_streaming_matches_direct diverge under load: decode rows went through int8 dots when
alone and through float tiles when a prefill chunk shared the step).

Kernel level: for each quant type, the rows of a 1-row call equal (torch.equal, bit for bit) the same rows inside
2-, 3-, 7-, 17-, 64- and 300-row calls, with int8 and with float activations, on every ISA path this CPU has. The one
exception, by design: the scalar build's float path above DOT_MAX_ROWS (at::mm on dequantized tiles), which
F16 / BF16 weights take in int8 calls too.
Engine level: a greedy request gives the same tokens and the same logprobs alone and while a long prompt is
prefilled in chunks in the same steps.
"""
from __future__ import annotations

import pytest
import torch

from lmserve import ops
from lmserve.ops import cpu_isa, cpu_kernels
from lmserve.ops.linear import DOT_MAX_ROWS, FLOAT16, QTYPES
from test_gguf_kernels import odd_k, random_weight

lib = cpu_kernels.load()
pytestmark = pytest.mark.skipif(lib is None, reason="C++ kernels could not be built here")

ISAS = [level for level in ("scalar", "avx2", "avx512vnni", "amx") if cpu_isa.supports(level, cpu_isa.detected())]
BATCHES = (2, 3, 7, 17, 64, 300)   # 2: the grid types' 2-row path (gguf_grid_lanes.h tile_rows)


@pytest.fixture
def at_isa():
    before = lib.gguf_isa()
    yield lambda level: lib.gguf_set_isa(list(cpu_isa.LEVELS).index(level))
    lib.gguf_set_isa(before)


def _matmul(x, w, int8):
    with ops.use(ops.select("cpu", torch.float32, lib=lib)):
        return ops.gguf_matmul(x, w, None, int8)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("isa", ISAS)
def test_rows_do_not_depend_on_the_batch(qtype, isa, at_isa):
    at_isa(isa)
    n, k = 37, odd_k(qtype)                       # 37: tails in every tile shape
    w = random_weight(qtype, n, k, seed=11, pad=3)
    x = torch.randn(max(BATCHES), k, generator=torch.Generator().manual_seed(5))
    for int8 in (True, False):
        if isa == "scalar" and (not int8 or qtype in FLOAT16):
            continue                              # at::mm tiles above DOT_MAX_ROWS: not invariant (documented)
        alone = {i: _matmul(x[i:i + 1], w, int8) for i in (0, 1, 5, 6, 16, 33, 63, 64, 150, 299)}
        for m in BATCHES:
            y = _matmul(x[:m].contiguous(), w, int8)
            for i, row in alone.items():
                if i < m:
                    assert torch.equal(y[i:i + 1], row), (qtype, isa, int8, m, i, (y[i] - row[0]).abs().max())


@pytest.mark.parametrize("isa", ISAS)
def test_stacked_mixed_parts_are_batch_invariant(isa, at_isa):
    """A fused layer of mixed types (Q4_K_M's q/k/v; block types next to 16-bit ones, which take float or bf16
    activations in the same int8 call): the parts split across threads differently for each M."""
    at_isa(isa)
    k = 512
    for parts in ([random_weight("Q4_0", 40, k, seed=1), random_weight("Q6_K", 9, k, seed=2),
                   random_weight("Q4_K", 23, k, seed=3, pad=7)],
                  [random_weight("Q4_0", 24, k, seed=4), random_weight("BF16", 9, k, seed=5),
                   random_weight("F16", 23, k, seed=6, pad=6)]):
        if isa == "scalar" and parts[1].qtype in FLOAT16:
            continue                              # the scalar build's float tiles (see the module's docstring)
        _check_parts(parts, isa)


def _check_parts(parts, isa):
    k = parts[0].shape[1]
    x = torch.randn(100, k, generator=torch.Generator().manual_seed(9))
    for int8 in (True, False) if isa != "scalar" else (True,):
        y = _matmul(x, parts, int8)
        assert torch.equal(torch.cat([_matmul(x, p, int8) for p in parts], 1), y)
        for i in (0, 3, 99):
            assert torch.equal(_matmul(x[i:i + 1], parts, int8), y[i:i + 1]), (isa, int8, i)
        if not int8:     # the float dot (<= DOT_MAX_ROWS rows) and the tile GEMM above it agree too
            assert torch.equal(_matmul(x[:DOT_MAX_ROWS], parts, int8), y[:DOT_MAX_ROWS])


@pytest.mark.slow
def test_greedy_request_alone_equals_mixed_with_a_chunked_prefill(smollm2_path):
    """SmolLM2 Q4_1 with the default int8 activations: request A decodes while request B's ~560-token prompt is
    prefilled 64 tokens per step beside it, so A's rows share every matmul with 63 prefill rows; A's tokens and
    logprobs must be those it gets alone."""
    from lmserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from lmserve.engine.llm_engine import LLMEngine
    from lmserve.sampling_params import SamplingParams
    engine = LLMEngine(EngineConfig(
        model=ModelConfig(model=smollm2_path), cache=CacheConfig(num_blocks=160, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_batched_tokens=64, max_burst_batched_tokens=64)))
    prompt_a = "The three most important inventions of the twentieth century were"
    long_b = " ".join(f"item {i} is {i * 7 % 13}." for i in range(90))
    assert len(engine.tokenizer.encode(long_b)) > 500
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=0)

    def run(with_b: bool):
        engine.add_request("a", prompt_a, params)
        if with_b:
            engine.add_request("b", long_b, SamplingParams(max_tokens=1, temperature=0.0))
        done = {}
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0]
        return done["a"].token_ids, [lp.logprob for lp in done["a"].logprobs]

    alone, mixed = run(False), run(True)
    assert mixed[0] == alone[0]
    assert mixed[1] == alone[1]          # exactly: every row is computed the same way whatever shares the step


def test_greedy_request_after_a_prefix_cache_hit_equals_it_cold(smollm2_path):
    """SmolLM2 Q4_1, default int8 activations: the same chat prompt cold (whole prompt, one causal group from
    position 0) and again with its full blocks in the prefix cache (only the rest prefilled, after `start` cached
    positions): same tokens and bit-identical logprobs. Every plain causal group takes the same attention kernel,
    so what was cached cannot flip a near-tie (CI once saw a proxied request answer differently from a direct one:
    whole prompts went through the kernel, prefix-cache hits through SDPA)."""
    from lmserve.config import CacheConfig, EngineConfig, ModelConfig
    from lmserve.engine.llm_engine import LLMEngine
    from lmserve.sampling_params import SamplingParams
    engine = LLMEngine(EngineConfig(model=ModelConfig(model=smollm2_path), cache=CacheConfig(num_blocks=64)))
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "Count to five."}])
    assert len(prompt) > 32
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0)
    cold, warm = (engine.generate([prompt], params)[0] for _ in range(2))
    assert cold.num_cached_tokens == 0 and warm.num_cached_tokens >= 32
    assert warm.outputs[0].token_ids == cold.outputs[0].token_ids
    assert [lp.logprob for lp in warm.outputs[0].logprobs] == [lp.logprob for lp in cold.outputs[0].logprobs]
