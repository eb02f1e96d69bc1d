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


QWEN_VL_ARCHS = ("qwen2_vl", "qwen2_5_vl")
QWEN_VL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def make_random_qwen_vl(arch: str, path: str, seed: int = 0, max_pixels: int = 28 * 28 * 20,
                        **text_overrides) -> str:
    """Qwen2-VL / Qwen2.5-VL: the Qwen2 decoder with M-RoPE (head_dim 16, mrope_section [2, 3, 3]) and the
    dynamic-resolution ViT (Qwen2.5-VL: windows of 2x2 merged tokens, full attention in blocks 1 and 3), saved with
    transformers' Qwen2-VL processor (min / max pixels small, so images are a few dozen patches)."""
    import transformers
    if arch not in QWEN_VL_ARCHS:
        raise ValueError(f"arch: {arch!r} is not one of {QWEN_VL_ARCHS}")
    tok = _tokenizer(*QWEN_VL_TOKENS)
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
                initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    text.update(text_overrides)
    ids = {f"{k}_token_id": tok.convert_tokens_to_ids(t) for k, t in
           (("image", "<|image_pad|>"), ("video", "<|video_pad|>"), ("vision_start", "<|vision_start|>"),
            ("vision_end", "<|vision_end|>"))}
    torch.manual_seed(seed)
    if arch == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, initializer_range=0.1)
        model = transformers.Qwen2VLForConditionalGeneration(
            transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **ids))
    else:
        vision = dict(depth=4, hidden_size=32, intermediate_size=48, out_hidden_size=64, num_heads=4,
                      window_size=56, fullatt_block_indexes=[1, 3], initializer_range=0.1)
        model = transformers.Qwen2_5_VLForConditionalGeneration(
            transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids))
    model = model.to(torch.float32)
    _randomize(model)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    image_processor = transformers.Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=max_pixels)
    image_processor.save_pretrained(path)    # with the tokenizer: all AutoProcessor needs (config.json names it)
    return path


# LLaVA-NeXT's anyres grid at 1/8 of llava-v1.6's scale (tiles of 42 pixels, 3x3 patches, instead of 336 and 24x24)
LLAVA_NEXT_PINPOINTS = [[42, 84], [84, 42], [84, 84], [126, 42], [42, 126]]


def make_random_llava_next(path: str, tower: str = "clip", seed: int = 0, tile: int = 42,
                           pinpoints: list | None = None, **text_overrides) -> str:
    """LLaVA-NeXT (llava-v1.6's layout): the LLaVA-1.5 tower and projector over the base image and the anyres tiles,
    plus `image_newline`. tower "clip": a CLIP tower with the "default" strategy (class token dropped, as the hub's
    checkpoints); "siglip": a SigLIP tower with "full" (no class token to drop)."""
    import transformers
    tok = _tokenizer("<image>")
    vision = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, image_size=tile,
                  patch_size=14, initializer_range=0.1)
    if tower == "clip":
        vision_config, strategy = transformers.CLIPVisionConfig(projection_dim=32, **vision), "default"
    elif tower == "siglip":
        vision_config, strategy = transformers.SiglipVisionConfig(**vision), "full"
    else:
        raise ValueError(f"tower: {tower!r} is not clip or siglip")
    pinpoints = pinpoints or LLAVA_NEXT_PINPOINTS
    config = transformers.LlavaNextConfig(text_config=_text_config(tok, **text_overrides),
                                          vision_config=vision_config, image_grid_pinpoints=pinpoints,
                                          image_token_id=tok.convert_tokens_to_ids("<image>"),
                                          vision_feature_layer=-2, vision_feature_select_strategy=strategy)
    torch.manual_seed(seed)
    model = transformers.LlavaNextForConditionalGeneration(config).to(torch.float32)
    _randomize(model)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    image_processor = transformers.LlavaNextImageProcessorPil(
        size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints)
    processor = transformers.LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                                                vision_feature_select_strategy=strategy, image_token="<image>",
                                                num_additional_image_tokens=int(tower == "clip"),
                                                chat_template=tok.chat_template)
    processor.save_pretrained(path)
    return path


GEMMA3_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}


def make_random_gemma3_vl(path: str, seed: int = 0, image_size: int = 56, mm_tokens: int = 4,
                          **text_overrides) -> str:
    """Gemma 3 with vision (Gemma3ForConditionalGeneration): a SigLIP tower (56-pixel images, 4x4 patches) whose
    output the projector average-pools to `mm_tokens` tokens per image, and a Gemma 3 decoder with sliding (window
    6) and global layers, so the bidirectional image spans meet both masks. Saved with transformers' Gemma 3
    processor (the SmolLM2 tokenizer plus Gemma's three image tokens; pan-and-scan off, its default)."""
    import transformers
    tok = _tokenizer(*GEMMA3_TOKENS.values())
    tok._set_model_specific_special_tokens(GEMMA3_TOKENS)
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                rms_norm_eps=1e-6, sliding_window=6, layer_types=["sliding_attention", "full_attention",
                                                                  "sliding_attention"],
                query_pre_attn_scalar=16, initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    text.update(text_overrides)
    vision = transformers.SiglipVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=image_size, patch_size=14,
                                             layer_norm_eps=1e-6, vision_use_head=False)
    ids = {k.replace("token", "token_index"): tok.convert_tokens_to_ids(v) for k, v in GEMMA3_TOKENS.items()}
    config = transformers.Gemma3Config(text_config=transformers.Gemma3TextConfig(**text), vision_config=vision,
                                       mm_tokens_per_image=mm_tokens, **ids)
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(config).to(torch.float32)
    _randomize(model)
    with torch.no_grad():    # zeros by default: the image embeddings would all be 0
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.2)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    image_processor = transformers.Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = transformers.Gemma3Processor(image_processor=image_processor, tokenizer=tok,
                                             image_seq_length=mm_tokens, chat_template=tok.chat_template)
    processor.save_pretrained(path)
    return path
