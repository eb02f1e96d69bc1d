"""Tiny random-weight Hugging Face models of the architectures beyond llama/qwen2/mistral, for tests against
transformers: saved with transformers itself, the SmolLM2 tokenizer, and every weight random (norms too)."""
from __future__ import annotations

import os

import torch

# per architecture: (transformers config class name, config overrides on top of BASE)
ARCHS = {
    "qwen3": ("Qwen3Config", dict(head_dim=32)),
    "llama3": ("LlamaConfig", dict(vocab_size=128256, tie_word_embeddings=True, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64))),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=32, sliding_window=12, query_pre_attn_scalar=24,
                                        num_hidden_layers=3, layer_types=["sliding_attention", "full_attention",
                                                                          "sliding_attention"])),
    "mixtral": ("MixtralConfig", dict(num_local_experts=8, num_experts_per_tok=2)),
    # the shared expert's size differs from the dense layer's, as in Qwen2-57B-A14B
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
                                         shared_expert_intermediate_size=96, norm_topk_prob=False,
                                         decoder_sparse_step=1, mlp_only_layers=[1])),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
                                         norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1])),
    "phi3": ("Phi3Config", dict(pad_token_id=2, max_position_embeddings=256, original_max_position_embeddings=64,
                                rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                                                     short_factor=[1.0 + 0.1 * i for i in range(8)],
                                                     long_factor=[2.0 + 0.5 * i for i in range(8)],
                                                     original_max_position_embeddings=64))),
    # Phi-4-mini style: RoPE on half of each head (partial_rotary_factor), the rest passes through
    "phi3_partial_rotary": ("Phi3Config", dict(
        pad_token_id=2, max_position_embeddings=256, original_max_position_embeddings=64,
        rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.5,
                             short_factor=[1.0 + 0.1 * i for i in range(4)], long_factor=[2.0 + 0.5 * i for i in range(4)],
                             original_max_position_embeddings=64))),
}
BASE = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5, initializer_range=0.1,
            bos_token_id=1, eos_token_id=2, pad_token_id=2)


def make_arch_model(arch: str, path: str, seed: int = 0, **overrides) -> str:
    import transformers

    from lmserve.model.gguf_export import make_portable as _make_portable
    from lmserve.model.loader import default_model_path
    from lmserve.tokenizer import load_tokenizer
    cls_name, arch_kwargs = ARCHS[arch]
    kwargs = {**BASE, **arch_kwargs, **overrides}
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                # gemma stores (weight - 1); either way a model that ignores the norm weights fails
                p.copy_((0 if arch == "gemma3" else 1) + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn_like(p))
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    load_tokenizer(default_model_path()).hf.save_pretrained(path)
    _make_portable(path)
    return path
