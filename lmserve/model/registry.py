"""Architecture name -> model class. Adding an architecture is one file plus one line here."""
from __future__ import annotations

import importlib
import json
import os

from torch import nn

# Architecture -> "module:Class", imported on first use: a text model's start-up does not pay for importing every
# vision model (and the transformers image utilities they pull in: ~4 s of a ~8 s warm start).
_REGISTRY: dict[str, str] = {
    "llama": "llama:LlamaForCausalLM",
    "qwen2": "llama:LlamaForCausalLM",     # + q/k/v bias (ArchConfig.attention_bias)
    "mistral": "llama:LlamaForCausalLM",   # + sliding window (ArchConfig.sliding_window, applied in the attention mask)
    "qwen3": "qwen3:Qwen3ForCausalLM",     # + q/k RMSNorm per head
    "qwen3_moe": "qwen3_moe:Qwen3MoeForCausalLM",
    "mixtral": "mixtral:MixtralForCausalLM",
    "qwen2_moe": "qwen2_moe:Qwen2MoeForCausalLM",
    "gemma3": "gemma3:Gemma3ForCausalLM",
    "phi3": "phi3:Phi3ForCausalLM",
    # vision-language models: a vision tower + projector feeding one of the decoders above (model/vlm_config.py)
    "llava": "llava:LlavaForCausalLM",
    "llava_next": "llava_next:LlavaNextForCausalLM",   # + anyres tiles, unpadding, image_newline
    "idefics3": "idefics3:Idefics3ForCausalLM",
    "smolvlm": "idefics3:Idefics3ForCausalLM",    # SmolVLM: the Idefics3 layout
    "qwen2_vl": "qwen2_vl:Qwen2VLForCausalLM",    # Qwen2 decoder + M-RoPE, dynamic-resolution ViT
    "qwen2_5_vl": "qwen2_vl:Qwen2VLForCausalLM",  # + window attention, RMSNorm and SwiGLU in the ViT
    "gemma3_vl": "gemma3_vl:Gemma3VLForCausalLM",  # model_type gemma3 with a vision_config: SigLIP + pooled projector
    "qwen3_vl": "qwen3_vl:Qwen3VLForCausalLM",    # Qwen3 decoder + interleaved M-RoPE + DeepStack, learned ViT positions
}

# Encoders (bidirectional, no KV cache): served for embeddings only, by engine/encoder_runner.py
_ENCODERS: dict[str, str] = {
    "bert": "bert:BertModel",
    "roberta": "bert:BertModel",          # + positions from padding_idx + 1 (EncoderConfig.position_offset)
    "xlm-roberta": "bert:BertModel",
}


def _load(spec: str) -> type[nn.Module]:
    module, _, cls = spec.partition(":")
    return getattr(importlib.import_module(f"lmserve.model.{module}"), cls)


TASKS = ("auto", "generate", "embed", "score")


def get_model_class(architecture: str) -> type[nn.Module]:
    try:
        spec = _REGISTRY[architecture]
    except KeyError:
        raise ValueError(f"architecture {architecture!r} is not supported; supported: {sorted(_REGISTRY)}") from None
    return _load(spec)


def get_encoder_class(architecture: str) -> type[nn.Module]:
    try:
        spec = _ENCODERS[architecture]
    except KeyError:
        raise ValueError(f"encoder architecture {architecture!r} is not supported; supported: "
                         f"{sorted(_ENCODERS)}") from None
    return _load(spec)


def is_encoder(model_path: str) -> bool:
    """True for an HF directory whose config.json names an encoder architecture (GGUF files are decoders)."""
    config = os.path.join(model_path, "config.json")
    if not os.path.isfile(config):
        return False
    with open(config) as f:
        return json.load(f).get("model_type") in _ENCODERS


def resolve_task(task: str, model_path: str) -> str:
    """"auto" -> "score" for a cross-encoder (*ForSequenceClassification), "embed" for another encoder
    checkpoint, else "generate". An encoder cannot generate; only a cross-encoder scores pairs by itself."""
    from lmserve.model.classifier import is_cross_encoder
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}")
    encoder = is_encoder(model_path)
    cross = encoder and is_cross_encoder(model_path)
    if task == "score" and not cross:
        raise ValueError(f"task: {model_path} is not a cross-encoder (BertForSequenceClassification / "
                         "XLMRobertaForSequenceClassification); embedding models score by cosine under --task embed")
    if task in ("auto", "score") and cross:
        return "score"
    if task == "embed" and cross:
        raise ValueError(f"task: {model_path} is a cross-encoder; it scores pairs (--task score), it does not embed")
    if task == "generate" and encoder:
        raise ValueError(f"task: {model_path} is an encoder (embedding) model; it cannot generate (use --task embed)")
    return "embed" if task == "embed" or encoder else "generate"
