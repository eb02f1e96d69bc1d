"""Vision-language checkpoints: their config.json nests the decoder under `text_config`. The decoder's fields
become the ArchConfig as for a text model; the rest (vision_config, projector and image-token settings) rides
along as ArchConfig.vision for the model file."""
from __future__ import annotations

# model_type -> the decoder it wraps when text_config does not say (transformers' defaults)
VLM_TYPES = {"llava": "llama", "idefics3": "llama", "smolvlm": "llama"}


def split_vlm_config(cfg: dict) -> tuple[dict, dict | None]:
    """config.json -> (the decoder's config, the vision-language rest or None for a text model)."""
    if cfg.get("model_type") not in VLM_TYPES:
        return cfg, None
    text = dict(cfg.get("text_config") or {})
    text.setdefault("model_type", VLM_TYPES[cfg["model_type"]])
    if "tie_word_embeddings" in cfg:
        text.setdefault("tie_word_embeddings", cfg["tie_word_embeddings"])
    vision = {k: v for k, v in cfg.items() if k != "text_config"}
    return text, vision
