"""Tiny random-weight vision-language models for tests and benchmarks: `make_random_vlm(arch, path)`.

Each is a transformers model (vision config included) saved with its processor (the SmolLM2 tokenizer plus the
model's image token, and the model's image processor), so tests compare lmserve against transformers' own
`generate` on the same processed inputs."""
from __future__ import annotations

import os

import torch

from lmserve.model.loader import default_model_path

VLM_ARCHS = ("llava", "idefics3")


def _randomize(model: torch.nn.Module) -> None:
    # NOTE: transformers initializes norms and biases to constants; random ones make a loader that drops them fail
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layer_norm" in name or "layrnorm.weight" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias") or name.endswith("class_embedding"):
                p.copy_(0.2 * torch.randn_like(p))


def _tokenizer(*special: str):
    from lmserve.tokenizer import load_tokenizer
    tok = load_tokenizer(default_model_path()).hf
    tok.add_special_tokens({"additional_special_tokens": list(special)})
    return tok


IDEFICS3_TOKENS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
                   *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)))


def make_random_vlm(arch: str, path: str, image_size: int = 56, seed: int = 0, **text_overrides) -> str:
    """A tiny random VLM of `arch` saved into `path` with its processor; returns path."""
    import transformers
    if arch not in VLM_ARCHS:
        raise ValueError(f"arch: {arch!r} is not one of {VLM_ARCHS}")
    if arch == "idefics3":
        return _make_idefics3(path, image_size, seed, **text_overrides)
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


def _text_config(tok, **overrides):
    import transformers
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
                initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    text.update(overrides)
    return transformers.LlamaConfig(**text)


def _make_idefics3(path: str, tile: int, seed: int, **text_overrides) -> str:
    """SmolVLM's layout: a SigLIP tower over image tiles (the image split into up to 2x2 tiles of `tile` pixels plus
    a downscaled global view), pixel shuffle (scale 2), one linear projection."""
    import transformers
    tok = _tokenizer(*IDEFICS3_TOKENS)
    vision = transformers.Idefics3VisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                               num_attention_heads=4, image_size=tile, patch_size=14,
                                               initializer_range=0.1)
    config = transformers.Idefics3Config(text_config=_text_config(tok, **text_overrides), vision_config=vision,
                                         scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = transformers.Idefics3ForConditionalGeneration(config).to(torch.float32)
    _randomize(model)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    image_processor = transformers.Idefics3ImageProcessor(size={"longest_edge": 2 * tile},
                                                          max_image_size={"longest_edge": tile})
    seq_len = (tile // 14) ** 2 // 4
    processor = transformers.Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=seq_len,
                                               chat_template=tok.chat_template)
    processor.save_pretrained(path)
    return path
