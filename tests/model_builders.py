"""Tiny random-weight Hugging Face models for tests (and benchmarks): `make_random_model(arch, path)`.

Kept out of the runtime package: serving never builds models. Import it as `from model_builders import
make_random_model` in tests (pytest puts tests/ on sys.path)."""
from __future__ import annotations

import os

import torch

from lmserve.model.arch_config import SUPPORTED_ARCHS
from lmserve.model.gguf_export import make_portable
from lmserve.model.loader import default_model_path


def make_random_model(arch: str, path: str, **overrides) -> str:
    """A tiny random-weight HF model (SmolLM2 tokenizer and chat template, vocab 49152) saved into `path`.

    Overrides go to the transformers config (e.g. num_hidden_layers=3, tie_word_embeddings=True); `seed` picks
    the weights, `save_dtype` the checkpoint's dtype (float32 unless given, e.g. torch.bfloat16). Norm weights and biases, which transformers initializes to constants, are randomized too so
    that a loader or model that ignores them fails tests.
    """
    import transformers

    from lmserve.tokenizer import load_tokenizer
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"arch: {arch!r} is not one of {SUPPORTED_ARCHS}")
    seed = overrides.pop("seed", 0)
    save_dtype = overrides.pop("save_dtype", torch.float32)
    kwargs = dict(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
        # NOTE: a larger init than HF's 0.02 so attention is far from uniform and logits have clear top-1 gaps.
        initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        tie_word_embeddings=arch == "qwen2",
    )
    if arch == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mistral": transformers.MistralConfig}[arch]
    config = cls(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn_like(p))
    os.makedirs(path, exist_ok=True)
    model.to(save_dtype).save_pretrained(path)
    load_tokenizer(default_model_path()).hf.save_pretrained(path)
    make_portable(path)
    return path
