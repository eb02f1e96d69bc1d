"""Each decoder architecture beyond llama/qwen2/mistral against transformers on tiny random weights: greedy tokens
identical and logprobs within 1e-3, with chunked prefill (small token budget), prefix caching (a second pass over
the same prompts reuses cached blocks), the C++ decode kernels and the pure-PyTorch reference."""
from __future__ import annotations

import pytest
import torch

from arch_models import make_arch_model
from lmserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from lmserve.engine.llm_engine import LLMEngine
from lmserve.sampling_params import SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "1, 2, 3, 4,",
]
NUM_TOKENS = 16


def make_engine(path: str, backend: str) -> LLMEngine:
    return LLMEngine(EngineConfig(
        # exact mode; the C++ kernels are CPU-only, so "cpp" pins the CPU (a GPU host runs "torch" on its GPU)
        model=ModelConfig(model=path, attention_backend=backend, dtype="float32",
                          device="cpu" if backend == "cpp" else "auto"),
        cache=CacheConfig(block_size=8, num_blocks=256, enable_prefix_caching=True),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=24)))   # 24: prompts prefill in chunks


def hf_greedy(hf, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def check_against_transformers(path: str, backend: str) -> LLMEngine:
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    engine = make_engine(path, backend)
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=2)
    outs = engine.generate(ids, params)
    for p, out in zip(ids, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, p, NUM_TOKENS)
    longest = max(range(len(ids)), key=lambda i: len(ids[i]))
    full = ids[longest] + outs[longest].outputs[0].token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([full])).logits[0].float(), dim=-1)
    for i, lp in enumerate(outs[longest].outputs[0].logprobs):
        assert abs(lp.logprob - ref[len(ids[longest]) - 1 + i, lp.token_id].item()) < 1e-3
    hits = engine.block_manager.prefix_cache_hits
    again = engine.generate(ids, params)                      # prompts now come from the prefix cache
    assert engine.block_manager.prefix_cache_hits > hits
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in outs]
    return engine


@pytest.fixture(scope="module")
def arch_paths(tmp_path_factory):
    cache = {}

    def get(arch: str) -> str:
        if arch not in cache:
            cache[arch] = make_arch_model(arch, str(tmp_path_factory.mktemp(arch)))
        return cache[arch]
    return get


BACKENDS = ["cpp", pytest.param("torch", marks=pytest.mark.slow)]   # torch: the pure-PyTorch reference end to end


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["qwen3", "llama3", "gemma3", "mixtral", "qwen2_moe", "qwen3_moe", "phi3",
                                  "phi3_partial_rotary"])
def test_greedy_and_logprobs_match_transformers(arch, backend, arch_paths):
    check_against_transformers(arch_paths(arch), backend)


# ---- Llama 3.x ----------------------------------------------------------------------------------------------
def test_llama3_rope_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from lmserve.model.layers import RotaryEmbedding, _llama3_inv_freq
    scaling = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)   # Llama 3.2
    cfg = LlamaConfig(hidden_size=2048, num_attention_heads=32, head_dim=64, max_position_embeddings=131072,
                      rope_parameters=dict(rope_theta=500000.0, **scaling))
    inv_freq, scale = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    base = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    # transformers keeps inv_freq in float32, so compare at float32 precision
    torch.testing.assert_close(_llama3_inv_freq(base, scaling).float(), inv_freq.float(), rtol=1e-6, atol=0)
    ours = RotaryEmbedding(64, 4096, 500000.0, scaling)
    pos = torch.tensor([0, 1, 100, 1000])   # (further out, float32 inv_freq rounding in transformers dominates)
    ref = torch.outer(pos.double(), inv_freq.double())
    assert scale == 1.0
    torch.testing.assert_close(ours.cos[pos], ref.cos().float(), atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.sin[pos], ref.sin().float(), atol=1e-4, rtol=0)


def test_llama3_untied_embeddings(arch_paths, tmp_path):
    path = make_arch_model("llama3", str(tmp_path / "untied"), tie_word_embeddings=False, vocab_size=128256)
    engine = check_against_transformers(path, "cpp")
    assert engine.runner.model.lm_head is not None


# ---- MoE ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_moe_block_grouped_equals_transformers(arch, arch_paths):
    """One MoE layer on a batch where several tokens share an expert and some expert gets none."""
    from transformers import AutoModelForCausalLM

    from lmserve.model.registry import get_model_class
    from lmserve.model.loader import load_arch_config, load_state_dict
    path = arch_paths(arch)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cfg = load_arch_config(path)
    ours = get_model_class(cfg.architecture)(cfg)
    ours.load_weights(load_state_dict(path))
    x = torch.randn(5, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    block, hf_block = ours.model.layers[0].mlp, hf.model.layers[0].mlp
    expert_ids, _ = block.route(x)
    counts = torch.bincount(expert_ids.reshape(-1), minlength=cfg.num_experts)
    assert counts.max() >= 2 and (counts == 0).any()        # shared experts and an idle one in this batch
    with torch.no_grad():
        torch.testing.assert_close(block(x), hf_block(x.unsqueeze(0))[0], atol=1e-5, rtol=1e-5)


# ---- Gemma 3 ----------------------------------------------------------------------------------------------------
def test_gemma3_sliding_window_matters(arch_paths):
    """The tiny Gemma's prompts + outputs cross its 12-token window; attending past it would change the output."""
    from lmserve.model.loader import load_arch_config
    cfg = load_arch_config(arch_paths("gemma3"))
    assert cfg.sliding_window == 12 and cfg.layer_window(0) == 12 and cfg.layer_window(1) is None
    engine = make_engine(arch_paths("gemma3"), "cpp")
    ids = engine.tokenizer.encode(PROMPTS[2])
    assert len(ids) + NUM_TOKENS > 2 * cfg.sliding_window


# ---- Phi-3 ------------------------------------------------------------------------------------------------------
def test_phi3_longrope_tables_match_transformers(arch_paths):
    """Short factors inside the original context, long factors beyond, both scaled by the attention factor."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from lmserve.model.layers import RotaryEmbedding
    from lmserve.model.loader import load_arch_config
    path = arch_paths("phi3")
    cfg, hf_cfg = load_arch_config(path), AutoConfig.from_pretrained(path)
    short, scale = ROPE_INIT_FUNCTIONS["longrope"](hf_cfg, "cpu")
    long, _ = ROPE_INIT_FUNCTIONS["longrope"](hf_cfg, "cpu", seq_len=cfg.max_position_embeddings)
    assert scale > 1.0 and not torch.allclose(short, long)
    ours = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
    for pos, inv_freq in [(10, short), (63, short), (64, long), (200, long)]:
        angle = pos * inv_freq.double()
        torch.testing.assert_close(ours.cos[pos], (angle.cos() * scale).float(), atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.sin[pos], (angle.sin() * scale).float(), atol=1e-5, rtol=0)


# ---- Qwen3 GGUF ---------------------------------------------------------------------------------------------------
def test_qwen3_gguf_matches_transformers_on_the_source(arch_paths, tmp_path):
    """A Qwen3 GGUF as llama.cpp writes one (attn_q_norm / attn_k_norm, key_length, no Q/K permutation) runs like
    the HF model it came from."""
    from transformers import AutoModelForCausalLM

    from lmserve.model.loader import load_arch_config, load_state_dict
    from test_loader import _expected_after_gguf, _write_gguf
    src = arch_paths("qwen3")
    cfg, state = load_arch_config(src), load_state_dict(src)
    path = str(tmp_path / "qwen3.gguf")
    _write_gguf(path, cfg, state)
    got = load_arch_config(path)
    assert got.architecture == "qwen3" and got.qk_norm and got.head_dim == cfg.head_dim
    loaded = load_state_dict(path)
    assert set(loaded) == set(state)
    # transformers on the same (GGUF-rounded) weights
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    hf.load_state_dict({k: _expected_after_gguf(k, v) for k, v in state.items()}, strict=False)
    engine = LLMEngine(EngineConfig(model=ModelConfig(model=path, tokenizer=src, dtype="float32"),
                                    cache=CacheConfig(block_size=8, num_blocks=256),
                                    scheduler=SchedulerConfig(max_num_batched_tokens=24)))
    ids = [engine.tokenizer.encode(p) for p in PROMPTS[:2]]
    outs = engine.generate(ids, SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True))
    for p, out in zip(ids, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, p, NUM_TOKENS)


def test_rope_table_grows_on_demand_with_the_same_rows():
    """The cos/sin table starts at 4096 rows and grows when a step needs a later position, to the same values a
    whole table has (each row is computed on its own), never past the model's context."""
    from lmserve.model.layers import RotaryEmbedding
    rope = RotaryEmbedding(64, 131072, 500000.0, {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    assert rope.cos.shape[0] == 4096
    whole = torch.outer(torch.arange(131072, dtype=torch.float64), rope.inv_freq)
    pos = torch.tensor([3, 4095, 9000, 20000])
    cos, sin = rope.lookup(pos, torch.float32)
    assert 20001 <= rope.cos.shape[0] <= 131072
    assert torch.equal(cos[:, 0], whole[pos].cos().float()) and torch.equal(sin[:, 0], whole[pos].sin().float())
    rope.lookup(torch.tensor([131071]), torch.float32)
    assert rope.cos.shape[0] == 131072
    with pytest.raises(IndexError):
        rope.lookup(torch.tensor([131072]), torch.float32)
