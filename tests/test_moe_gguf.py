"""MoE GGUF files served with the experts in the file's blocks, one GGUF matmul per expert that got tokens, against
transformers holding the same Q8_0-rounded weights (rounded by gguf-py, not by lmserve):
- Qwen3-MoE (llama.cpp's `qwen3moe`: each projection of all experts stacked in one 3-D tensor, `ffn_gate_exps` /
  `ffn_up_exps` / `ffn_down_exps`, the router `ffn_gate_inp`);
- Mixtral (llama.cpp's `llama` with experts, Q/K rows permuted as its converter writes them), with stacked experts
  and with one tensor per expert (`ffn_gate.3`), the layout of files written before April 2024.
"""
from __future__ import annotations

import os
import sys

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from arch_models import make_arch_model
from test_archs import hf_greedy
from lmserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from lmserve.engine.llm_engine import LLMEngine
from lmserve.model.loader import load_arch_config
from lmserve.model.moe import Experts
from lmserve.ops.linear_method import GGUFLinear
from lmserve.sampling_params import SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.synthetic_gguf import _copy_tokenizer, default_tokenizer_source  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):",
           "Once upon a time, in a small village by the sea, there lived an old fisherman who", "1, 2, 3, 4,"]
NEW_TOKENS = 16
_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate": "ffn_gate_inp",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
          "mlp.shared_expert.gate_proj": "ffn_gate_shexp", "mlp.shared_expert.up_proj": "ffn_up_shexp",
          "mlp.shared_expert.down_proj": "ffn_down_shexp", "mlp.shared_expert_gate": "ffn_gate_inp_shexp"}


def q8(x: np.ndarray) -> np.ndarray:
    return gguf.quants.dequantize(gguf.quants.quantize(x, QT.Q8_0), QT.Q8_0)


# file kind -> (transformers model_type, llama.cpp architecture, one tensor per expert)
KINDS = {"qwen3moe": ("qwen3_moe", "qwen3moe", False), "qwen2moe": ("qwen2_moe", "qwen2moe", False),
         "mixtral": ("mixtral", "llama", False),
         "mixtral-per-expert": ("mixtral", "llama", True)}


def permute(x: np.ndarray, heads: int) -> np.ndarray:
    """HF's Q/K rows -> llama.cpp's order for llama files (its converter's reordering; lmserve's unpermute undoes
    it)."""
    return x.reshape(heads, 2, -1, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _quantized(w, gname: str, x: np.ndarray) -> None:
    w.add_tensor(gname, gguf.quants.quantize(np.ascontiguousarray(x), QT.Q8_0), raw_dtype=QT.Q8_0)


def _experts(w, i: str, kind: str, x: np.ndarray, per_expert: bool) -> None:
    """transformers' fused experts ([experts, 2 * inter, hidden] gate/up, or down) as the file's expert tensors."""
    parts = [("ffn_gate", x[:, :x.shape[1] // 2]), ("ffn_up", x[:, x.shape[1] // 2:])] \
        if kind == "gate_up_proj" else [("ffn_down", x)]
    for proj, part in parts:
        if per_expert:
            for e in range(part.shape[0]):
                _quantized(w, f"blk.{i}.{proj}.{e}.weight", part[e])
        else:
            _quantized(w, f"blk.{i}.{proj}_exps.weight", part)


@pytest.fixture(scope="module", params=list(KINDS))
def moe(request, tmp_path_factory):
    """(GGUF path, transformers model with the file's weights, kind). Qwen3-MoE: layer 0 sparse (8 experts, top 2),
    layer 1 dense; Mixtral: both layers sparse (8 experts, top 2)."""
    import transformers
    model_type, arch, per_expert = KINDS[request.param]
    src = make_arch_model(model_type, str(tmp_path_factory.mktemp("src")),
                          **({"intermediate_size": 64} if model_type == "mixtral" else {"moe_intermediate_size": 64}))
    cfg = load_arch_config(src)
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    path = str(tmp_path_factory.mktemp("gguf") / f"{request.param}-q8_0.gguf")
    w = gguf.GGUFWriter(path, arch)
    _copy_tokenizer(w, default_tokenizer_source())
    # llama.cpp's llama files give each expert's size as feed_forward_length, its qwen3moe files as expert_...
    ffn = [("feed_forward_length", cfg.moe_intermediate_size)] if arch == "llama" else \
        [("feed_forward_length", cfg.intermediate_size), ("expert_feed_forward_length", cfg.moe_intermediate_size)]
    if arch == "qwen2moe":
        ffn.append(("expert_shared_feed_forward_length", cfg.shared_expert_intermediate_size))
    for key, value in (("block_count", cfg.num_hidden_layers), ("context_length", cfg.max_position_embeddings),
                       ("embedding_length", cfg.hidden_size), ("attention.head_count", cfg.num_attention_heads),
                       ("attention.key_length", cfg.head_dim), ("attention.value_length", cfg.head_dim),
                       ("attention.head_count_kv", cfg.num_key_value_heads), ("expert_count", cfg.num_experts),
                       ("expert_used_count", cfg.num_experts_per_tok), *ffn):
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.rope.freq_base", cfg.rope_theta)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    rounded = {}
    for name, t in hf.state_dict().items():
        x = t.numpy()
        if name.startswith("model.layers."):
            _, _, i, *mod, kind = name.split(".")
            mod = ".".join(mod)
            if mod == "mlp.experts":
                _experts(w, i, kind, x, per_expert)
                rounded[name] = q8(np.ascontiguousarray(x))
                continue
            gname = f"blk.{i}.{_NAMES[mod]}.{kind}"
            if mod == "mlp.shared_expert_gate":          # llama.cpp's qwen2moe files: a [hidden] vector, F32
                w.add_tensor(gname, np.ascontiguousarray(x[0]))
                continue
            if arch == "llama" and mod in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = cfg.num_attention_heads if mod == "self_attn.q_proj" else cfg.num_key_value_heads
                _quantized(w, gname, permute(x, heads))
                rounded[name] = q8(x)
                continue
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]
        if x.ndim == 2 and not gname.endswith("ffn_gate_inp.weight"):       # the router stays F32 (llama.cpp's)
            _quantized(w, gname, x)
            rounded[name] = q8(x)
        else:
            w.add_tensor(gname, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    hf.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in rounded.items()}, strict=False)
    return path, hf, request.param


def _engine(path: str, **model_kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=ModelConfig(model=path, **model_kw),
                                  cache=CacheConfig(block_size=8, num_blocks=128),
                                  scheduler=SchedulerConfig(max_num_batched_tokens=24)))


def test_moe_metadata(moe):
    cfg = load_arch_config(moe[0])
    assert cfg.num_experts == 8 and cfg.num_experts_per_tok == 2 and cfg.moe_intermediate_size == 64
    assert cfg.norm_topk_prob == (moe[2] != "qwen2moe")     # llama.cpp never renormalises qwen2moe's
    if moe[2] == "qwen3moe":
        assert cfg.architecture == "qwen3_moe" and cfg.dense_layers == (1,) and cfg.qk_norm
    elif moe[2] == "qwen2moe":
        assert cfg.architecture == "qwen2_moe" and cfg.dense_layers == (1,) and cfg.attention_bias
        assert cfg.shared_expert_intermediate_size == 96 and cfg.intermediate_size != 96
    else:
        assert cfg.architecture == "mixtral" and cfg.dense_layers == () and not cfg.qk_norm


@pytest.mark.parametrize("weights", ["quantized", "float"])
def test_moe_gguf_greedy_matches_transformers(moe, weights):
    """Experts in their Q8_0 blocks with float32 activations (and --weights float): greedy tokens equal
    transformers', logprobs within 1e-3; no float copy of an expert exists."""
    path, hf, _ = moe
    engine = _engine(path, dtype="float32", weights=weights)
    experts = engine.runner.model.model.layers[0].mlp.experts
    assert isinstance(experts, Experts)
    if weights == "quantized":
        assert experts.methods is not None and len(experts.methods) == 8
        assert all(isinstance(m, GGUFLinear) and m.parts[0].qtype == "Q8_0" for pair in experts.methods for m in pair)
        assert experts.gate_up_proj.is_meta and experts.down_proj.is_meta
        if moe[2] == "qwen2moe":      # the shared expert (its own size) on its blocks too, gate and up in one
            shared = engine.runner.model.model.layers[0].mlp.shared_expert
            assert isinstance(shared.gate_up_proj.linear_method, GGUFLinear)
        mem = engine.runner.weight_memory
        assert mem["float"] < (1 << 20), mem      # norms, the router, rotary tables
    else:
        assert experts.methods is None and not experts.gate_up_proj.is_meta
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    outs = engine.generate(ids, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1))
    for p, out in zip(ids, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, p, NEW_TOKENS)
    full = ids[2] + outs[2].outputs[0].token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([full])).logits[0].float(), dim=-1)
    for i, lp in enumerate(outs[2].outputs[0].logprobs):
        assert abs(lp.logprob - ref[len(ids[2]) - 1 + i, lp.token_id].item()) < 1e-3


def test_moe_gguf_default_path_repacks_the_experts(moe):
    """The default configuration: each expert's blocks repacked (Q8_0x8), int8 activations; it serves."""
    engine = _engine(moe[0])
    experts = engine.runner.model.model.layers[0].mlp.experts
    assert {m.parts[0].qtype for pair in experts.methods for m in pair} == {"Q8_0x8"}
    out = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 4 for o in out)


@pytest.mark.parametrize("dtype", ["auto", "float32"])
def test_moe_fused_decode_is_bit_identical(moe, dtype):
    """The decode stack runs the sparse layers in C++ (csrc/cpu/moe.cpp: router, top-k, the routed experts in two
    parallel regions): same tokens and logprobs, bit for bit, as the modules, for four sequences decoding together
    (experts shared by several rows, a dense layer after the sparse one, Qwen2-MoE's shared expert), with int8
    activations on the repacked experts (the default) and with float32 ones."""
    from test_fused_decode import assert_same, fused_and_modules
    engine = LLMEngine(EngineConfig(model=ModelConfig(model=moe[0], dtype=dtype),
                                    cache=CacheConfig(block_size=8, num_blocks=128, enable_prefix_caching=False)))
    assert engine.runner.fused is not None
    a, b, calls = fused_and_modules(engine, [engine.tokenizer.encode(p) for p in PROMPTS],
                                    SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=3,
                                                   ignore_eos=True))
    assert calls >= NEW_TOKENS - 1
    assert_same(a, b)


def test_other_moe_gguf_files_are_refused_by_name(tmp_path):
    """Expert tensors in a file of an architecture whose MoE layers lmserve does not build get a clear error, not a
    dense model that silently leaves the experts out."""
    path = str(tmp_path / "qwen2-with-experts.gguf")
    w = gguf.GGUFWriter(path, "qwen2")
    w.add_tensor("blk.0.ffn_gate_exps.weight", np.zeros((2, 8, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(NotImplementedError, match="mixture-of-experts"):
        load_arch_config(path)


# (synthetic shape, file type) -> its overrides (small), each layer's expert types
SYNTHETIC = {
    ("qwen3-30b-a3b", "Q4_K_M"): (dict(head_dim=64, kv_heads=2, expert_ffn=256), [{"Q4_K"}, {"Q4_K", "Q6_K"}]),
    # experts of ffn 384 (not whole 256-blocks): ffn_down_exps falls back to Q4_0 / Q8_0; a shared expert
    ("qwen1.5-moe-a2.7b", "Q4_K_M"): (dict(kv_heads=4, expert_ffn=384, shared_ffn=512),
                                      [{"Q4_K", "Q4_0"}, {"Q4_K", "Q8_0"}]),
    # the i-quant files people run Qwen3-30B-A3B from at 2-3 bits per weight: IQ2_S experts, IQ3_S ffn_down
    ("qwen3-30b-a3b", "IQ2_M"): (dict(head_dim=64, kv_heads=2, expert_ffn=256), [{"IQ2_S", "IQ3_S"}] * 2),
    # and at 1.75 bits per weight, the size the largest MoE models are run from on one machine: IQ1_M experts
    ("qwen3-30b-a3b", "IQ1_M"): (dict(head_dim=64, kv_heads=2, expert_ffn=256), [{"IQ1_M"}] * 2),
    # llama-quantize's MXFP4_MOE (gpt-oss's expert format on another MoE model): MXFP4 experts, Q8_0 elsewhere
    ("qwen3-30b-a3b", "MXFP4_MOE"): (dict(head_dim=64, kv_heads=2, expert_ffn=256), [{"MXFP4"}] * 2),
}


@pytest.mark.parametrize("shape,quant", list(SYNTHETIC))
def test_synthetic_moe_file_runs_on_the_kernels(tmp_path, shape, quant):
    """A Q4_K_M (or IQ2_M) MoE file as llama.cpp mixes it (Q4_K experts, Q6_K ffn_down_exps in the 'more bits'
    layers, 3-D tensors written by benchmarks/synthetic_gguf.py): the experts stay in blocks, and greedy tokens
    and logprobs equal --weights float's with float32 activations."""
    from benchmarks.synthetic_gguf import SHAPES, write_synthetic_gguf
    path = str(tmp_path / f"moe-{quant}.gguf")
    overrides, want = SYNTHETIC[shape, quant]
    write_synthetic_gguf(path, dict(SHAPES[shape], layers=2, hidden=256, heads=4, experts=8, experts_used=2, ffn=512,
                                    **overrides), quant, context_length=512)
    outs = {}
    for weights in ("quantized", "float"):
        engine = _engine(path, dtype="float32", weights=weights)
        if weights == "quantized":
            types = [{m.parts[0].qtype for pair in layer.mlp.experts.methods for m in pair}
                     for layer in engine.runner.model.model.layers]
            assert types == want, types         # layer 1 of 2 is a "more bits" one
            shared = [layer.mlp.shared_expert for layer in engine.runner.model.model.layers
                      if hasattr(layer.mlp, "shared_expert")]
            assert len(shared) == (2 if "shared_ffn" in overrides else 0)
            assert all(isinstance(m.gate_up_proj.linear_method, GGUFLinear) for m in shared)
        outs[weights] = _greedy(engine)
    _assert_same_greedy(outs["quantized"], outs["float"])


def _greedy(engine):
    return engine.generate([[1, 50, 700, 3000, 12000]], SamplingParams(
        max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=3))[0].outputs[0]


def _assert_same_greedy(a, b):
    """The same tokens, and top-3 logprobs within 1e-3."""
    assert a.token_ids == b.token_ids
    for x, y in zip(a.logprobs, b.logprobs):
        torch.testing.assert_close(torch.tensor([v for _, v in x.top]), torch.tensor([v for _, v in y.top]),
                                   rtol=0, atol=1e-3)


def test_mxfp4_experts_are_repacked_with_int8_activations(tmp_path):
    """An MXFP4_MOE file served as by default (int8 activations): its MXFP4 experts are rewritten as MXFP4x8 (the
    same bytes), and the greedy tokens and logprobs equal those of the file layout (--gguf-repack none) to the
    int8 path's rounding (the two layouts sum a block's products in another order)."""
    from benchmarks.synthetic_gguf import SHAPES, write_synthetic_gguf
    path = str(tmp_path / "moe-mxfp4.gguf")
    write_synthetic_gguf(path, dict(SHAPES["qwen3-30b-a3b"], layers=2, hidden=256, heads=4, experts=8, experts_used=2,
                                    ffn=512, head_dim=64, kv_heads=2, expert_ffn=256), "MXFP4_MOE", context_length=512)
    outs = {}
    for repack in ("auto", "none"):
        engine = _engine(path, quant_activations="int8", gguf_repack=repack)
        types = {m.parts[0].qtype for layer in engine.runner.model.model.layers
                 for pair in layer.mlp.experts.methods for m in pair}
        assert types == ({"MXFP4x8"} if repack == "auto" else {"MXFP4"}), types
        outs[repack] = _greedy(engine)
    _assert_same_greedy(outs["auto"], outs["none"])


@pytest.mark.parametrize("dtype", ["auto", "float32"])
def test_moe_block_kernel_is_bit_identical_to_the_module_loop(moe, dtype):
    """The other steps (prefill chunks, mixed batches) run each sparse block in one kernel call (ops.make_moe_mlp,
    csrc/cpu/moe.cpp): for a prefill-sized input (48 tokens, most experts with several, every row count path of the
    GGUF matmul from 1 row up) it equals the module's loop over experts bit for bit, with int8 activations on the
    repacked experts and with float32 ones; under kernels="torch" no block gets one."""
    from lmserve import ops
    from lmserve.model.moe import SparseMoeBlock
    engine = LLMEngine(EngineConfig(model=ModelConfig(model=moe[0], dtype=dtype),
                                    cache=CacheConfig(block_size=8, num_blocks=128)))
    blocks = [m for m in engine.runner.model.modules() if isinstance(m, SparseMoeBlock)]
    assert blocks and all(b.kernel is not None for b in blocks)
    hidden = blocks[0].gate.weight.shape[1]
    x = torch.randn(48, hidden, generator=torch.Generator().manual_seed(0))
    with ops.use(engine.runner.ops), torch.no_grad():
        for block in blocks:
            fused = block(x)
            kernel, block.kernel = block.kernel, None
            try:
                assert torch.equal(fused, block(x))
            finally:
                block.kernel = kernel
    native = LLMEngine(EngineConfig(model=ModelConfig(model=moe[0], dtype="float32", kernels="torch"),
                                    cache=CacheConfig(block_size=8, num_blocks=128)))
    assert all(m.kernel is None for m in native.runner.model.modules() if isinstance(m, SparseMoeBlock))
