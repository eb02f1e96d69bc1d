"""Phi-3 / Phi-4-mini GGUF files (llama.cpp's `phi3` layout: q/k/v fused in attn_qkv, gate/up fused in ffn_up,
LongRoPE's factors as tensors, RoPE on part of each head) against transformers' Phi3ForCausalLM holding the same
weights, dequantized by gguf-py (not by lmserve's loader).

The file is synthetic (benchmarks/synthetic_gguf.py, a Q4_K_M mix: Q5_K attn_qkv, Q4_K / Q6_K elsewhere) with an
original context of 32 positions, so greedy decoding crosses from LongRoPE's short factors to its long ones.
Prompts stay inside the original context: transformers picks one factor set per forward from its longest position,
lmserve per position (model/layers.py), and the two agree whenever a prefill does not cross the boundary.
"""
from __future__ import annotations

import os
import sys

import gguf
import numpy as np
import pytest
import torch

from test_archs import hf_greedy
from lmserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from lmserve.engine.llm_engine import LLMEngine
from lmserve.model.loader import load_arch_config
from lmserve.ops.linear_method import GGUFLinear
from lmserve.sampling_params import SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.synthetic_gguf import write_synthetic_gguf  # noqa: E402

SHAPE = dict(arch="phi3", hidden=256, layers=2, ffn=512, heads=4, kv_heads=2, tied=True, bias=False,
             theta=10000.0, rotary=0.5, original_context=32)
CONTEXT = 256
PROMPTS = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,"]
NEW_TOKENS = 28          # the longest prompt plus these runs past position 32
_HF_NAMES = {"attn_norm": "input_layernorm", "attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
             "ffn_norm": "post_attention_layernorm", "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj"}


@pytest.fixture(scope="module")
def phi3_path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("phi3") / "phi3-q4_k_m.gguf")
    write_synthetic_gguf(path, SHAPE, "Q4_K_M", context_length=CONTEXT)
    return path


def _file_tensors(path: str) -> dict[str, np.ndarray]:
    reader = gguf.GGUFReader(path)
    return {t.name: np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
            for t in reader.tensors}


def hf_phi3(path: str, window: int | None = None):
    import transformers
    t = _file_tensors(path)
    rotary = int(SHAPE["hidden"] // SHAPE["heads"] * SHAPE["rotary"])
    assert t["rope_factors_long.weight"].shape == (rotary // 2,)
    config = transformers.Phi3Config(
        vocab_size=t["token_embd.weight"].shape[0], hidden_size=SHAPE["hidden"], intermediate_size=SHAPE["ffn"],
        num_hidden_layers=SHAPE["layers"], num_attention_heads=SHAPE["heads"],
        num_key_value_heads=SHAPE["kv_heads"], max_position_embeddings=CONTEXT,
        original_max_position_embeddings=SHAPE["original_context"], rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="longrope", rope_theta=SHAPE["theta"], partial_rotary_factor=SHAPE["rotary"],
                             short_factor=t["rope_factors_short.weight"].tolist(),
                             long_factor=t["rope_factors_long.weight"].tolist(),
                             original_max_position_embeddings=SHAPE["original_context"]),
        sliding_window=window, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    state = {"model.embed_tokens.weight": t["token_embd.weight"], "model.norm.weight": t["output_norm.weight"]}
    for name, value in t.items():
        if name.startswith("blk."):
            _, i, kind, _ = name.split(".")
            state[f"model.layers.{i}.{_HF_NAMES[kind]}.weight"] = value
    model = transformers.Phi3ForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model.float()


def _engine(path: str, **model_kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=ModelConfig(model=path, **model_kw),
                                  cache=CacheConfig(block_size=8, num_blocks=64),
                                  scheduler=SchedulerConfig(max_num_batched_tokens=16)))     # chunked prefills


def test_phi3_metadata_becomes_the_checkpoints_config(phi3_path):
    cfg = load_arch_config(phi3_path)
    t = _file_tensors(phi3_path)
    assert cfg.architecture == "phi3" and cfg.tie_word_embeddings and cfg.sliding_window is None
    assert cfg.partial_rotary_factor == 0.5 and cfg.head_dim == 64 and cfg.max_position_embeddings == CONTEXT
    rs = cfg.rope_scaling
    assert rs["rope_type"] == "longrope" and rs["original_max_position_embeddings"] == 32
    assert rs["short_factor"] == t["rope_factors_short.weight"].tolist()
    assert rs["long_factor"] == t["rope_factors_long.weight"].tolist() and rs["long_factor"][-1] > 30
    assert "attention_factor" not in rs         # the converter's value is HF's default, which lmserve computes


@pytest.mark.parametrize("weights,window", [("float", None), ("quantized", None), ("quantized", 12)])
def test_phi3_gguf_greedy_matches_transformers(phi3_path, weights, window, tmp_path):
    """--weights float (exact float32) and the quantized kernels with float32 activations: greedy tokens equal
    transformers' through the LongRoPE boundary, logprobs within 1e-3. window: Phi-3-mini's files say
    sliding_window 2047 (Phi-4's 0: none); llama.cpp ignores it, transformers (the reference the same checkpoint's
    safetensors are served to here) applies it to every layer, and so does lmserve."""
    if window is not None:
        phi3_path = str(tmp_path / "phi3-swa.gguf")
        write_synthetic_gguf(phi3_path, dict(SHAPE, sliding_window=window), "Q4_K_M", context_length=CONTEXT)
        assert load_arch_config(phi3_path).layer_window(1) == window
    hf = hf_phi3(phi3_path, window)
    engine = _engine(phi3_path, dtype="float32", weights=weights)
    if weights == "quantized":
        methods = {n: m.linear_method for n, m in engine.runner.model.named_modules() if hasattr(m, "linear_method")}
        qkv, gate_up = methods["model.layers.0.self_attn.qkv_proj"], methods["model.layers.0.mlp.gate_up_proj"]
        assert isinstance(qkv, GGUFLinear) and [p.qtype for p in qkv.parts] == ["Q5_K"]
        assert isinstance(gate_up, GGUFLinear) and [p.qtype for p in gate_up.parts] == ["Q4_K"]
        assert all(p.is_meta for n, p in engine.runner.model.named_parameters() if n.endswith("proj.weight"))
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    assert max(map(len, ids)) < 32 < max(map(len, ids)) + NEW_TOKENS
    outs = engine.generate(ids, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1))
    for p, out in zip(ids, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, p, NEW_TOKENS)
    # logprobs of the first prompt's tokens inside the original context, scored by one transformers forward
    full = ids[0] + outs[0].outputs[0].token_ids
    n = 32 - len(ids[0])
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([full[:32]])).logits[0].float(), dim=-1)
    for i, lp in enumerate(outs[0].outputs[0].logprobs[:n]):
        assert abs(lp.logprob - ref[len(ids[0]) - 1 + i, lp.token_id].item()) < 1e-3


def test_phi3_gguf_default_path_serves_repacked(phi3_path):
    """The default configuration (auto precision, int8 activations, 8-row repacked layouts) on the fused
    projections: every matrix repacked, and the same first tokens as the exact path within the int8 rounding."""
    engine = _engine(phi3_path)
    types = {p.qtype for m in engine.runner.model.modules() for p in getattr(
        getattr(m, "linear_method", None), "parts", [])}
    assert {"Q5_Kx8", "Q4_Kx8", "Q6_Kx8"} <= types and not {"Q5_K", "Q4_K", "Q6_K"} & types, types
    out = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 4 for o in out)
