"""GGUF -> Hugging Face directory (config.json, model.safetensors, tokenizer files), so peers (vLLM, transformers)
can run weights identical to ours. A tool over the model layer and the tokenizer, used by tests and benchmarks."""
from __future__ import annotations

import os

import torch

from lmserve.model.gguf_export import hf_config, make_portable
from lmserve.model.loader import load_arch_config, load_state_dict
from lmserve.tokenizer import load_tokenizer


def export_hf(gguf_path: str, out_dir: str, dtype: torch.dtype = torch.float32) -> str:
    """GGUF -> HF directory (config.json, model.safetensors of `dtype` without a tied lm_head, tokenizer files)."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    cfg = load_arch_config(gguf_path)
    os.makedirs(out_dir, exist_ok=True)
    hf_config(cfg).save_pretrained(out_dir)
    GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=list(cfg.eos_token_ids)).save_pretrained(out_dir)
    state = {k: v.to(dtype).contiguous() for k, v in load_state_dict(gguf_path).items()}
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    load_tokenizer(gguf_path).hf.save_pretrained(out_dir)
    make_portable(out_dir)
    return out_dir
