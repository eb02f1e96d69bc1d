"""GGUF -> Hugging Face config files, so peers (vLLM, transformers) can run weights identical to ours (the whole
export, weights and tokenizer included, is lmserve/hf_export.py: the tokenizer sits above the model layer)."""
from __future__ import annotations

import json
import os

from lmserve.model.arch_config import ArchConfig
from lmserve.model.hf_checkpoint import read_json

_HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


def hf_config(cfg: ArchConfig):
    """ArchConfig -> a transformers config object (used to write config.json for exported models)."""
    import transformers
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mistral": transformers.MistralConfig}[cfg.architecture]
    kwargs = dict(
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size, rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id,
        eos_token_id=list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1 else (cfg.eos_token_ids or [None])[0],
        architectures=[_HF_CLASSES[cfg.architecture]],
    )
    if cfg.rope_scaling:
        kwargs["rope_scaling"] = dict(cfg.rope_scaling)
    if cfg.architecture != "qwen2":
        kwargs.update(head_dim=cfg.head_dim, attention_bias=cfg.attention_bias)
    if cfg.architecture == "mistral":
        kwargs["sliding_window"] = cfg.sliding_window
    return cls(**kwargs)


def make_portable(path: str) -> None:
    """Also write the transformers 4.x spellings, so peers on older stacks (e.g. vLLM) read the same model.

    NOTE: transformers 5 keeps rope_theta/rope_scaling inside `rope_parameters` and names the tokenizer class
    `TokenizersBackend`; 4.x would silently fall back to rope_theta=10000 and fail on the class name.
    """
    def patch(name, fn):
        file = os.path.join(path, name)
        data = read_json(file)
        fn(data)
        with open(file, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)

    def config(c):
        rope = dict(c.get("rope_parameters") or {})
        c.setdefault("rope_theta", rope.pop("rope_theta", 10000.0))
        c.setdefault("rope_scaling", rope if rope.get("rope_type", "default") != "default" else None)
        c.setdefault("torch_dtype", c.get("dtype", "float32"))

    def tokenizer_config(t):
        t["tokenizer_class"] = "PreTrainedTokenizerFast"
        template = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(template):
            with open(template) as f:
                t.setdefault("chat_template", f.read())

    patch("config.json", config)
    patch("tokenizer_config.json", tokenizer_config)
