"""Architecture name -> model class. Adding an architecture is one file plus one line here."""
from __future__ import annotations

import json
import os

from torch import nn

from lmserve.model.bert import BertModel
from lmserve.model.gemma3 import Gemma3ForCausalLM
from lmserve.model.gemma3_vl import Gemma3VLForCausalLM
from lmserve.model.idefics3 import Idefics3ForCausalLM
from lmserve.model.llama import LlamaForCausalLM
from lmserve.model.llava import LlavaForCausalLM
from lmserve.model.llava_next import LlavaNextForCausalLM
from lmserve.model.mixtral import MixtralForCausalLM
from lmserve.model.phi3 import Phi3ForCausalLM
from lmserve.model.qwen2_vl import Qwen2VLForCausalLM
from lmserve.model.qwen3 import Qwen3ForCausalLM
from lmserve.model.qwen3_moe import Qwen3MoeForCausalLM
from lmserve.model.qwen3_vl import Qwen3VLForCausalLM

_REGISTRY: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,     # + q/k/v bias (ArchConfig.attention_bias)
    "mistral": LlamaForCausalLM,   # + sliding window (ArchConfig.sliding_window, applied in the attention mask)
    "qwen3": Qwen3ForCausalLM,     # + q/k RMSNorm per head
    "qwen3_moe": Qwen3MoeForCausalLM,
    "mixtral": MixtralForCausalLM,
    "gemma3": Gemma3ForCausalLM,
    "phi3": Phi3ForCausalLM,
    # vision-language models: a vision tower + projector feeding one of the decoders above (model/vlm_config.py)
    "llava": LlavaForCausalLM,
    "llava_next": LlavaNextForCausalLM,   # + anyres tiles, unpadding, image_newline
    "idefics3": Idefics3ForCausalLM,
    "smolvlm": Idefics3ForCausalLM,    # SmolVLM: the Idefics3 layout
    "qwen2_vl": Qwen2VLForCausalLM,    # Qwen2 decoder + M-RoPE, dynamic-resolution ViT
    "qwen2_5_vl": Qwen2VLForCausalLM,  # + window attention, RMSNorm and SwiGLU in the ViT
    "gemma3_vl": Gemma3VLForCausalLM,  # model_type gemma3 with a vision_config: SigLIP + pooled projector
    "qwen3_vl": Qwen3VLForCausalLM,    # Qwen3 decoder + interleaved M-RoPE + DeepStack, learned ViT positions
}

# Encoders (bidirectional, no KV cache): served for embeddings only, by engine/encoder_runner.py
_ENCODERS: dict[str, type[nn.Module]] = {
    "bert": BertModel,
    "roberta": BertModel,          # + positions from padding_idx + 1 (EncoderConfig.position_offset)
    "xlm-roberta": BertModel,
}

TASKS = ("auto", "generate", "embed", "score")


def get_model_class(architecture: str) -> type[nn.Module]:
    try:
        return _REGISTRY[architecture]
    except KeyError:
        raise ValueError(f"architecture {architecture!r} is not supported; supported: {sorted(_REGISTRY)}") from None


def get_encoder_class(architecture: str) -> type[nn.Module]:
    try:
        return _ENCODERS[architecture]
    except KeyError:
        raise ValueError(f"encoder architecture {architecture!r} is not supported; supported: "
                         f"{sorted(_ENCODERS)}") from None


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
