"""Tiny random-weight vision-language models for tests and benchmarks: `make_random_vlm(arch, path)`.

Each is a transformers model (vision config included) saved with its processor (the SmolLM2 tokenizer plus the
model's image token, and the model's image processor), so tests compare lmserve against transformers' own
`generate` on the same processed inputs."""
from __future__ import annotations

import os

import torch

from lmserve.model.loader import default_model_path

VLM_ARCHS = ("llava",)


def _randomize(model: torch.nn.Module) -> None:
    # NOTE: transformers initializes norms and biases to constants; random ones make a loader that drops them fail
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layer_norm" in name or "layrnorm.weight" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias") or name.endswith("class_embedding"):
                p.copy_(0.2 * torch.randn_like(p))


def _tokenizer(image_token: str):
    from lmserve.tokenizer import load_tokenizer
    tok = load_tokenizer(default_model_path()).hf
    tok.add_special_tokens({"additional_special_tokens": [image_token]})
    return tok


def make_random_vlm(arch: str, path: str, image_size: int = 56, seed: int = 0, **text_overrides) -> str:
    """A tiny random VLM of `arch` saved into `path` with its processor; returns path."""
    import transformers
    if arch not in VLM_ARCHS:
        raise ValueError(f"arch: {arch!r} is not one of {VLM_ARCHS}")
    tok = _tokenizer("<image>")
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
                initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    text.update(text_overrides)
    vision = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  image_size=image_size, patch_size=14, projection_dim=32, initializer_range=0.1)
    config = transformers.LlavaConfig(text_config=transformers.LlamaConfig(**text),
                                      vision_config=transformers.CLIPVisionConfig(**vision),
                                      image_token_id=tok.convert_tokens_to_ids("<image>"),
                                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(config).to(torch.float32)
    _randomize(model)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": image_size},
                                                      crop_size={"height": image_size, "width": image_size})
    processor = transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                                            vision_feature_select_strategy="default", image_token="<image>",
                                            num_additional_image_tokens=1, chat_template=tok.chat_template)
    processor.save_pretrained(path)
    return path
