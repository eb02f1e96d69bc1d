"""Issue 20: bfloat16 / float16 safetensors checkpoints are served in place (model/safetensors_weights.py): every
16-bit matrix is a view of the mapped file, no float32 copy exists, and greedy tokens equal transformers' on the
same weights (in float32, --dtype float32: exact float activations), token for token."""
from __future__ import annotations

import pytest
import torch

from lmserve.config import CacheConfig, EngineConfig, ModelConfig
from lmserve.engine.llm_engine import LLMEngine
from lmserve.ops.linear_method import GGUFLinear
from lmserve.sampling_params import SamplingParams
from model_builders import make_random_model

PROMPTS = [[1, 50, 700, 3000, 12000], [1, 9, 8, 7, 6, 5, 4, 3, 2000]]


def _engine(path: str, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=ModelConfig(model=path, **kw), cache=CacheConfig(num_blocks=32)))


@pytest.mark.parametrize("arch,dtype,qtype", [("llama", torch.bfloat16, "BF16"), ("qwen2", torch.float16, "F16")])
def test_16bit_checkpoint_in_place_matches_transformers(tmp_path, arch, dtype, qtype):
    from transformers import AutoModelForCausalLM
    path = make_random_model(arch, str(tmp_path / arch), save_dtype=dtype, intermediate_size=256)
    engine = _engine(path, dtype="float32")
    runner = engine.runner
    assert runner.quantized
    methods = {n: m.linear_method for n, m in runner.model.named_modules() if hasattr(m, "linear_method")}
    assert all(isinstance(m, GGUFLinear) and {p.qtype for p in m.parts} == {qtype} for m in methods.values()), \
        {n: type(m).__name__ for n, m in methods.items()}
    big = [n for n, t in runner.model.named_parameters() if not t.is_meta and t.dim() == 2]
    assert big == []                                   # no float copy of any matrix
    assert runner.weight_memory["float"] < (1 << 20) and runner.weight_memory["packed"] == 0
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1)
    for ids, out in zip(PROMPTS, engine.generate(PROMPTS, params)):
        t = torch.tensor([ids])
        with torch.no_grad():
            ref = hf.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=12, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        got = out.outputs[0]
        assert got.token_ids == ref
        with torch.no_grad():
            logits = hf(torch.tensor([ids + ref])).logits[0, len(ids) - 1:-1]
        want = torch.log_softmax(logits, -1).gather(1, torch.tensor(ref)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor([lp.logprob for lp in got.logprobs]), want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_checkpoint_default_mode_and_float_opt_out(tmp_path, dtype):
    """--dtype auto serves the same in-place weights (bf16 activations where the CPU has AVX512-BF16, float16
    matrices then rewritten as bf16 at load: the top token's logprob within bf16 rounding); --weights float keeps
    today's float32 weights."""
    path = make_random_model("llama", str(tmp_path / "m"), save_dtype=dtype)
    outs = {}
    for weights in ("auto", "float"):
        engine = _engine(path, weights=weights, dtype="auto")
        assert engine.runner.quantized == (weights == "auto")
        if weights == "auto":
            bf16 = dtype == torch.bfloat16 or engine.runner.kernel.gguf_bf16_dot()
            parts = [p for m in engine.runner.model.modules() for p in getattr(
                getattr(m, "linear_method", None), "parts", [])]
            assert parts and {p.qtype for p in parts} == {"BF16" if bf16 else "F16"}
        outs[weights] = engine.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=1,
                                                                    logprobs=5))[0].outputs[0]
    a, b = dict(outs["auto"].logprobs[0].top), dict(outs["float"].logprobs[0].top)
    common = a.keys() & b.keys()
    assert len(common) >= 3 and max(abs(a[t] - b[t]) for t in common) < 0.05


def test_tensor_parallel_slices_are_views_of_the_mapping(tmp_path):
    """A rank's q/k/v, gate/up rows and o/down columns are views of the mapped file (no copy), holding exactly
    that rank's slice of each matrix."""
    import dataclasses

    from safetensors.torch import load_file

    from lmserve.model.loader import load_arch_config
    from lmserve.model.parallel import shard_spec
    from lmserve.model.safetensors_weights import safetensors_weights
    path = make_random_model("llama", str(tmp_path / "m"), save_dtype=torch.bfloat16, intermediate_size=256)
    full = load_file(f"{path}/model.safetensors")
    for rank in (0, 1):
        cfg = dataclasses.replace(load_arch_config(path), tp_rank=rank, tp_size=2)
        ws = safetensors_weights(path, cfg)
        checked = set()
        for name, w in ws.items():
            spec = shard_spec(name, cfg)
            want = full[name] if spec is None else full[name].narrow(spec[0], spec[1], spec[2])
            assert torch.equal(w.dequantize(), want.float()), name
            if spec is not None:     # a view into the whole matrix's mapped bytes, not a copy of the slice
                assert w.data.untyped_storage().nbytes() > w.nbytes, name
            checked.add(name.split(".")[-2])
        assert {"q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"} <= checked
        o = ws["model.layers.0.self_attn.o_proj.weight"]
        assert o.shape == (64, 32) and o.data.stride() == (128, 1)     # 32 of 64 columns: rows keep their stride


@pytest.mark.slow
def test_16bit_checkpoint_tp2_matches_tp1(tmp_path):
    from lmserve.config import CacheConfig as CC
    path = make_random_model("qwen2", str(tmp_path / "q"), save_dtype=torch.bfloat16, intermediate_size=256)
    params = SamplingParams(max_tokens=16, temperature=0, logprobs=2, ignore_eos=True)
    outs = []
    for tp in (1, 2):
        engine = LLMEngine(EngineConfig(model=ModelConfig(model=path, dtype="float32"), cache=CC(num_blocks=64),
                                        tp=tp))
        try:
            outs.append(engine.generate(PROMPTS, params))
        finally:
            engine.shutdown()
    for a, b in zip(*outs):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert abs(x.logprob - y.logprob) < 1e-4
