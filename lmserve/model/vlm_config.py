"""Vision-language checkpoints: their config.json nests the decoder under `text_config` (or, in Qwen2-VL's hub
files, keeps the decoder's fields at the top level beside `vision_config`). The decoder's fields become the
ArchConfig as for a text model; the rest (vision_config, projector and image-token settings) rides along as
ArchConfig.vision for the model file."""
from __future__ import annotations

# model_type -> the decoder it wraps (transformers' defaults; Qwen2-VL's text_config says qwen2_vl_text)
VLM_TYPES = {"llava": "llama", "idefics3": "llama", "smolvlm": "llama", "qwen2_vl": "qwen2", "qwen2_5_vl": "qwen2",
             "llava_next": "llama", "qwen3_vl": "qwen3", "gemma3": "gemma3_text"}
# model_types whose name the text-only decoder already takes in the registry -> the VLM's registry name
VLM_ARCHS = {"gemma3": "gemma3_vl"}
# decoders whose RoPE is M-RoPE (3 position streams, model/qwen2_vl.py): the text config names it
MROPE_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def split_vlm_config(cfg: dict) -> tuple[dict, dict | None]:
    """config.json -> (the decoder's config, the vision-language rest or None for a text model)."""
    kind = cfg.get("model_type")
    if kind not in VLM_TYPES or (kind == "gemma3" and "vision_config" not in cfg):   # a text-only Gemma 3 file
        return cfg, None
    if "text_config" in cfg:
        text = dict(cfg["text_config"] or {})
    else:    # the flat layout: every field but vision_config belongs to the decoder
        text = {k: v for k, v in cfg.items() if k != "vision_config"}
    if kind in MROPE_TYPES:
        text["model_type"] = VLM_TYPES[kind]
    text.setdefault("model_type", VLM_TYPES[kind])
    if "tie_word_embeddings" in cfg:
        text.setdefault("tie_word_embeddings", cfg["tie_word_embeddings"])
    vision = {k: v for k, v in cfg.items() if k != "text_config"}
    if kind in MROPE_TYPES:
        # M-RoPE's section split is the model file's business; to the decoder's config it is plain RoPE
        key = "rope_parameters" if text.get("rope_parameters") else "rope_scaling"
        rope = dict(text.get(key) or {})
        vision["mrope_section"] = list(rope.pop("mrope_section", None) or vision.get("mrope_section") or [])
        rope.pop("mrope_interleaved", None)     # Qwen3-VL's flag; its model file always interleaves
        if rope.get("rope_type", rope.get("type")) == "mrope":     # the hub files' name for it
            rope.pop("type", None)
            rope["rope_type"] = "default"
        text[key] = rope or None
    return with_decoder_defaults(text), vision


def with_decoder_defaults(text: dict) -> dict:
    """Hub VLM files written by older transformers keep only the decoder fields that differ from its config class's
    defaults (llava-1.5-7b-hf's text_config has no hidden_size): the missing ones are filled as transformers fills
    them (derived ones such as num_key_value_heads from the file's own fields). RoPE fields stay as written: the
    loader reads both of their namings."""
    from transformers import AutoConfig
    fields = {k: v for k, v in text.items() if k != "model_type"}
    try:
        full = AutoConfig.for_model(text["model_type"], **fields).to_dict()
    except Exception:     # NOTE: a decoder transformers cannot build stays as written (the loader names the gap)
        return text
    return {**{k: v for k, v in full.items() if not k.startswith("rope")}, **text}


def vlm_arch_name(vision: dict) -> str:
    """The registry name of a VLM (model/registry.py): its model_type, unless a text decoder has that name."""
    return VLM_ARCHS.get(vision["model_type"], vision["model_type"])
