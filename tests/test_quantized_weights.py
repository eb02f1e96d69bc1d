"""Issue 20: GGUF weights stay quantized (memory ~ the file), one LinearMethod per layer, KV pool sizing.

Synthetic GGUFs come from benchmarks/synthetic_gguf.py (random but valid blocks, SmolLM2's vocabulary).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lmserve.config import CacheConfig, EngineConfig, ModelConfig
from lmserve.engine.llm_engine import LLMEngine
from lmserve.ops.linear_method import GGUFLinear
from lmserve.sampling_params import SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.synthetic_gguf import write_synthetic_gguf  # noqa: E402

# 8 layers so that llama.cpp's Q4_K_M rule gives some layers Q6_K attn_v / ffn_down next to Q4_K q/k
SMALL = dict(arch="llama", hidden=256, layers=8, ffn=512, heads=4, kv_heads=2, tied=False, bias=False,
             theta=10000.0)
# ~0.25 GiB as Q4_K_M, 1.5 GiB dequantized: large enough that a float copy could not hide in the allowance
MEDIUM = dict(arch="llama", hidden=1024, layers=20, ffn=4096, heads=16, kv_heads=4, tied=False, bias=False,
              theta=10000.0)


@pytest.fixture(scope="module")
def q4_k_m_path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("gguf") / "small-q4_k_m.gguf")
    write_synthetic_gguf(path, SMALL, "Q4_K_M", context_length=1024)
    return path


def _engine(path, weights="quantized", **model_kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=ModelConfig(model=path, dtype="float32", kernels="torch", weights=weights,
                                                    **model_kw),
                                  cache=CacheConfig(num_blocks=32)))


def test_quantized_layers_are_views_of_the_mapped_file(q4_k_m_path):
    import gc
    import weakref

    from lmserve.model.gguf import gguf_reader
    # the parsed metadata start-up shares (a 262k vocabulary is ~280 MiB of numpy objects) is freed once the engine
    # is built: nothing the model serves from keeps the reader alive
    r = gguf_reader(q4_k_m_path)
    reader, mm = weakref.ref(r), r.data      # the engine loads from this reader: the same mapping
    del r
    engine = _engine(q4_k_m_path)
    gc.collect()
    assert reader() is None
    runner = engine.runner
    model = runner.model
    methods = {name: m.linear_method for name, m in model.named_modules() if hasattr(m, "linear_method")}
    # every matrix (7 per layer, embedding, head) is GGUF blocks
    assert len(methods) == 4 * SMALL["layers"] + 2
    assert all(isinstance(m, GGUFLinear) for m in methods.values()), \
        {n: type(m).__name__ for n, m in methods.items()}
    # mixed types inside one fused layer, as in real Q4_K_M files (layer 0 is a "more bits" layer)
    assert [p.qtype for p in methods["model.layers.0.self_attn.qkv_proj"].parts] == ["Q4_K", "Q4_K", "Q6_K"]
    assert [p.qtype for p in methods["model.layers.2.self_attn.qkv_proj"].parts] == ["Q4_K"] * 3
    assert methods["lm_head"].parts[0].qtype == "Q6_K"
    # no float copy of any quantized matrix: the matrices are meta tensors, and the only real float tensors are
    # vectors (norms) and the rotary tables
    big = [(n, tuple(t.shape)) for n, t in [*model.named_parameters(), *model.named_buffers()]
           if not t.is_meta and t.dim() == 2 and "rotary" not in n]
    assert big == []
    assert all(p.is_meta for n, p in model.named_parameters() if n.endswith("proj.weight"))
    # the blocks are the file's bytes in place (no copy), except the un-permuted Q/K rows
    import numpy as np
    lo = mm.ctypes.data
    hi = lo + mm.nbytes
    for name, m in methods.items():
        for i, part in enumerate(m.parts):
            in_file = lo <= part.data.data_ptr() < hi
            assert in_file == (not (name.endswith("qkv_proj") and i < 2)), (name, i)
            assert part.data.dtype == torch.uint8 and not part.data.is_floating_point()
    assert isinstance(mm, np.ndarray)
    mem = runner.weight_memory
    assert mem["gguf"] == sum(m.nbytes for m in methods.values())
    assert mem["float"] < (1 << 20)
    out = engine.generate(["Hello there"], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4


def test_quantized_matches_float_weights_on_the_synthetic_file(q4_k_m_path):
    """In --dtype float32 the quantized path multiplies float activations with the same dequantized values as
    --weights float; only summation order may differ, so logits agree to ~1e-5 relative."""
    ids = torch.tensor([1, 50, 700, 3000, 12000])
    logits = []
    for weights in ("quantized", "float"):
        runner = _engine(q4_k_m_path, weights=weights).runner
        from lmserve.engine.model_runner import StepBatch
        n = len(ids)
        b = StepBatch(input_ids=ids.tolist(), positions=list(range(n)), slot_mapping=list(range(16, 16 + n)),
                      prefill=[(0, n, 0, [1])], logit_rows=list(range(n)))
        logits.append(runner.forward(b)[1])
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)


# hidden 320: rows of 320 values are not whole 256-value blocks, so an IQ4_XS file holds those matrices as IQ4_NL
ODD = dict(SMALL, hidden=320, heads=5, kv_heads=1)


# the types each file must hold (the head's included): its mix as benchmarks/synthetic_gguf.py writes it
FILE_TYPES = {"Q3_K_M": {"Q3_K", "Q4_K", "Q6_K"}, "IQ4_XS": {"IQ4_XS", "Q6_K"}, "Q2_K": {"Q2_K", "Q3_K", "Q6_K"},
              "IQ4_XS+IQ4_NL": {"IQ4_XS", "IQ4_NL", "Q8_0"}, "IQ2_XXS": {"IQ2_XXS", "Q4_K", "Q5_K"},
              "IQ2_XS": {"IQ2_XS", "Q4_K", "Q5_K"}, "IQ2_M": {"IQ2_S", "IQ3_S", "Q5_K"},
              "IQ3_XXS": {"IQ3_XXS", "Q4_K", "Q5_K"}, "IQ3_M": {"IQ3_S", "IQ4_XS", "Q4_K", "Q6_K"},
              "IQ1_S": {"IQ1_S", "IQ2_XXS", "Q2_K", "Q4_K", "Q5_K"},
              "IQ1_M": {"IQ1_M", "IQ2_XXS", "IQ3_S", "Q2_K", "Q4_K", "Q5_K"}}


@pytest.mark.parametrize("quant", list(FILE_TYPES))
def test_q3_k_iq4_xs_and_q2_k_files_run_on_the_kernels(quant, tmp_path):
    """Q3_K (with Q4_K / Q6_K, as in Q3_K_M files), IQ4_XS (with IQ4_NL where rows are not whole 256-blocks),
    Q2_K (with Q3_K) and the i-quant grid types (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S in their
    files' mixes)
    stay quantized and run on the C++ kernels: logits of a prefill and
    of decode steps equal --weights float's to float rounding (exact float activations)."""
    path = str(tmp_path / f"small-{quant}.gguf")
    write_synthetic_gguf(path, ODD if "IQ4_NL" in quant else SMALL, quant.split("+")[0], context_length=1024)
    outs = {}
    for weights in ("quantized", "float"):
        engine = LLMEngine(EngineConfig(model=ModelConfig(model=path, dtype="float32", weights=weights),
                                        cache=CacheConfig(num_blocks=32, enable_prefix_caching=False)))
        if weights == "quantized":
            types = {p.qtype for m in engine.runner.model.modules() for p in getattr(
                getattr(m, "linear_method", None), "parts", [])}
            assert types == FILE_TYPES[quant] and engine.runner.kernel is not None
        outs[weights] = engine.generate([[1, 50, 700, 3000, 12000]], SamplingParams(
            max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=5))[0].outputs[0]
    assert outs["quantized"].token_ids == outs["float"].token_ids
    for a, b in zip(outs["quantized"].logprobs, outs["float"].logprobs):
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
        torch.testing.assert_close(torch.tensor([v for _, v in a.top]), torch.tensor([v for _, v in b.top]),
                                   rtol=0, atol=1e-3)


@pytest.mark.parametrize("quant", ["F16", "BF16"])
def test_16_bit_files_stay_16_bit(quant, tmp_path):
    """F16 / BF16 GGUF matrices are served in place (views of the mapped file, no float32 copy, no packed copy):
    the weights take the file's size, and the tokens and logprobs equal --weights float's (float activations on
    every path, also where the quantized types take int8 activations, as with --dtype auto here)."""
    path = str(tmp_path / f"small-{quant}.gguf")
    write_synthetic_gguf(path, SMALL, quant, context_length=1024)
    outs = {}
    for weights, dtype in (("quantized", "auto"), ("quantized", "float32"), ("float", "float32")):
        engine = LLMEngine(EngineConfig(model=ModelConfig(model=path, dtype=dtype, weights=weights),
                                        cache=CacheConfig(num_blocks=32, enable_prefix_caching=False)))
        if weights == "quantized":
            model = engine.runner.model
            methods = [m.linear_method for m in model.modules() if hasattr(m, "linear_method")]
            assert len(methods) == 4 * SMALL["layers"] + 2
            # --dtype auto on an AVX512-BF16 CPU: F16 matrices become BF16 at load (the bf16 path would round them
            # so on every read; ops.gguf_repack), a private copy of the same size
            kind = "BF16" if dtype == "auto" and engine.runner.kernel.gguf_bf16_dot() else quant
            assert all(isinstance(m, GGUFLinear) and {p.qtype for p in m.parts} == {kind} for m in methods)
            assert all(p.owned == (kind != quant) for m in methods for p in m.parts)
            assert not any(not t.is_meta and t.dim() == 2 and t.numel() > 4096 for t in model.parameters())
            mem = engine.runner.weight_memory
            assert mem["float"] < (1 << 20) and mem["packed"] == 0
            assert mem["gguf"] > 0.95 * os.path.getsize(path) - (1 << 20)
        outs[weights, dtype] = engine.generate([[1, 50, 700, 3000, 12000]], SamplingParams(
            max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=5))[0].outputs[0]
    ref, exact = outs["float", "float32"], outs["quantized", "float32"]
    assert exact.token_ids == ref.token_ids
    for a, b in zip(exact.logprobs, ref.logprobs):
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
        torch.testing.assert_close(torch.tensor([v for _, v in a.top]), torch.tensor([v for _, v in b.top]),
                                   rtol=0, atol=1e-3)
    # --dtype auto: on CPUs with native bf16 the 16-bit matmuls take bf16 activations and the KV cache is bf16
    # (random weights leave near-ties, so only the first step, where both saw the same tokens, is compared)
    first, want = dict(outs["quantized", "auto"].logprobs[0].top), dict(ref.logprobs[0].top)
    common = first.keys() & want.keys()
    assert len(common) >= 3
    assert max(abs(first[t] - want[t]) for t in common) < 0.05


@pytest.mark.slow
def test_smollm2_greedy_tokens_quantized_vs_float(smollm2_path):
    """First 16 greedy tokens identical on three prompts: same weights, float activations (--dtype float32), only
    the summation order differs (the reference dequantizes rows in chunks), far below SmolLM2's top-2 logit gaps
    on these prompts."""
    prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    tokens = {}
    for weights in ("quantized", "float"):
        engine = _engine(smollm2_path, weights=weights)
        tokens[weights] = [o.outputs[0].token_ids for o in engine.generate(prompts, params)]
        del engine
    assert tokens["quantized"] == tokens["float"]


def test_smollm2_default_path_repacked_vs_file_layout(smollm2_path):
    """The served default on SmolLM2 (int8 activations, its Q4_1 matrices repacked in 8-row groups) scores a text
    as closely to the exact float path as the same int8 activations on the file's layout do. Not token-equal as on
    Gemma 3 (tests/test_gemma3_gguf.py): over SmolLM2's 30 layers, the last-bit differences of another summation
    order flip the int8 rounding of later activations, and the two int8 paths differ from each other about as much
    as each differs from float (measured: mean |d logprob| 0.06-0.08, max 0.2-0.4 over a 27-token text)."""
    from int8_paths import distances_to_float, score_paths
    scores, qtypes = score_paths(smollm2_path)
    assert "Q4_1x8" in qtypes["auto"] and "Q4_1" not in qtypes["auto"] and "Q4_1" in qtypes["none"]
    repacked, file_layout = distances_to_float(scores)
    assert repacked.mean() < 1.5 * file_layout.mean() + 0.02 and repacked.max() < 0.6, (repacked, file_layout)


_RSS_SCRIPT = r"""
import json, sys, psutil
from lmserve.config import CacheConfig, EngineConfig, ModelConfig
from lmserve.engine.llm_engine import LLMEngine
from lmserve.sampling_params import SamplingParams
path, weights = sys.argv[1], sys.argv[2]
engine = LLMEngine(EngineConfig(model=ModelConfig(model=path, dtype="float32", kernels="torch", weights=weights),
                                cache=CacheConfig(kv_cache_memory=64 << 20)))
engine.generate(["Hello"], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
stats = engine.get_stats().memory
print(json.dumps({"rss": psutil.Process().memory_info().rss, **stats}))
"""

# what a process holds besides weights and KV cache: the interpreter, torch, tokenizer, GGUF metadata parsing
ALLOWANCE = 900 << 20


@pytest.mark.slow
def test_rss_after_load_is_about_the_file(tmp_path):
    path = str(tmp_path / "medium-q4_k_m.gguf")
    size = write_synthetic_gguf(path, MEDIUM, "Q4_K_M", context_length=1024)
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, path, "quantized"], capture_output=True, text=True,
                         timeout=600, env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr[-3000:]
    mem = json.loads(out.stdout.strip().splitlines()[-1])
    assert mem["kv_cache"] <= 64 << 20
    assert mem["weights_gguf"] <= size
    assert mem["weights_float"] < 8 << 20          # norms only
    assert mem["rss"] <= size * 1.3 + mem["kv_cache"] + ALLOWANCE, (mem, size)
    # float32 weights alone would exceed that bound: the test can fail
    from lmserve.engine.weights import _float_bytes
    assert _float_bytes(path, torch.float32) > size * 1.3 + ALLOWANCE


def test_kv_cache_memory_sets_the_pool(q4_k_m_path):
    engine = LLMEngine(EngineConfig(model=ModelConfig(model=q4_k_m_path, dtype="float32", kernels="torch",
                                                      weights="quantized"),
                                    cache=CacheConfig(kv_cache_memory=3 << 20)))
    runner = engine.runner
    assert runner.num_blocks == (3 << 20) // runner._kv_block_bytes()
    assert engine.get_stats().memory["kv_cache"] == runner.num_blocks * runner._kv_block_bytes()
    with pytest.raises(MemoryError, match=r"--kv-cache-memory .* GiB is more than the .* GiB of memory available"):
        LLMEngine(EngineConfig(model=ModelConfig(model=q4_k_m_path, dtype="float32", kernels="torch"),
                               cache=CacheConfig(kv_cache_memory=1 << 50)))


def test_parse_bytes_and_weights_flag():
    import argparse
    from lmserve.cli.engine_args import add_engine_args, build_engine_config, parse_bytes
    assert parse_bytes("2GiB") == 2 << 30 and parse_bytes("512MB") == 512 * 10**6 and parse_bytes("4096") == 4096
    for bad in ("2 parsecs", "-1", "GiB"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_bytes(bad)
    p = argparse.ArgumentParser()
    add_engine_args(p)
    cfg = build_engine_config(p.parse_args(["--kv-cache-memory", "1GiB", "--weights", "float"]))
    assert cfg.cache.kv_cache_memory == 1 << 30 and cfg.model.weights == "float"
    assert build_engine_config(p.parse_args([])).model.weights == "auto"
    with pytest.raises(ValueError, match="weights must be"):
        ModelConfig(weights="int4")


def test_a_model_that_cannot_fit_is_refused_with_the_numbers(q4_k_m_path, monkeypatch):
    from types import SimpleNamespace
    from lmserve.engine import weights
    monkeypatch.setattr(weights.psutil, "virtual_memory", lambda: SimpleNamespace(available=1 << 20))
    for mode, how in (("quantized", "memory-mapped"), ("float", "--weights float")):
        with pytest.raises(MemoryError, match=rf"weights need \d+\.\d\d GiB \(.*{how}.*\) and 0\.00 GiB"):
            _engine(q4_k_m_path, weights=mode)
