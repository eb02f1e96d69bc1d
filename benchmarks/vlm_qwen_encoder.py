"""Qwen2.5-VL's vision encoder: images/s and TTFT with images, lmserve vs transformers, same random weights.

    python benchmarks/vlm_qwen_encoder.py [--image-size 448] [--layers 32] [--out DIR]

The ViT has Qwen2.5-VL's shape (hidden 1280, SwiGLU MLP 3420, 16 heads, patch 14, 112-pixel windows, full attention
in every 8th block: 7, 15, 23, 31 of 32; `--layers` keeps the blocks below it). At 448x448 an image is 32x32
patches = 256 image tokens after the 2x2 merger. It sits in a Qwen2.5-VL checkpoint with a tiny 2-layer decoder
(hidden 64, so the merger's last layer is 5120 -> 64 instead of -> 2048 / 3584), so TTFT is the ViT's time plus a
short prefill. lmserve with `kernels="torch"`. Each side runs in its own process, one after the other: encoder
images/s at batch 1 and 4, then TTFT (max_tokens 1) of one request with 1 and with 4 images.
"""
from __future__ import annotations

import os
import sys

import torch

from vlm_bench_common import hf_generate_one, images, lmserve_engine, main, measure

HERE = os.path.dirname(os.path.abspath(__file__))
IMG = "<|vision_start|><|image_pad|><|vision_end|>"


def build(path: str, layers: int) -> None:
    import transformers
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    from vlm_builders import QWEN_VL_TOKENS, _randomize, _tokenizer
    tok = _tokenizer(*QWEN_VL_TOKENS)
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192, rms_norm_eps=1e-5,
                bos_token_id=1, eos_token_id=2, pad_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=layers, hidden_size=1280, intermediate_size=3420, out_hidden_size=64, num_heads=16,
                  window_size=112, fullatt_block_indexes=[i for i in (7, 15, 23, 31) if i < layers] or [layers - 1])
    ids = {f"{k}_token_id": tok.convert_tokens_to_ids(t) for k, t in
           (("image", "<|image_pad|>"), ("video", "<|video_pad|>"), ("vision_start", "<|vision_start|>"),
            ("vision_end", "<|vision_end|>"))}
    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration(
        transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)).to(torch.float32)
    _randomize(model)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    transformers.Qwen2VLImageProcessorPil().save_pretrained(path)


def run_side(side: str, path: str, size: int) -> dict:
    import transformers

    from lmserve.engine.mm_qwen import load_qwen_processor
    torch.set_num_threads(int(os.environ.get("THREADS", os.cpu_count())))
    proc = load_qwen_processor(path, "qwen2_5_vl")
    prompt = {n: "Describe " + " and ".join([IMG] * n) + "." for n in (1, 4)}
    res: dict = {"side": side, "threads": torch.get_num_threads()}

    def pixels(n):
        out = proc.image_processor(images(n, size), return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]
    if side == "lmserve":
        from lmserve import SamplingParams
        engine = lmserve_engine(path)
        model = engine.runner.model

        def encode(n):
            pv, grids = pixels(n)
            per = [int(g.prod()) for g in grids]
            with torch.inference_mode():
                model.encode_images([{"pixel_values": p, "image_grid_thw": tuple(g.tolist())}
                                     for p, g in zip(pv.split(per), grids)])

        def ttft(n):
            engine.generate(prompt[n], SamplingParams(max_tokens=1), images=images(n, size))
    else:
        model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval()

        def encode(n):
            pv, grids = pixels(n)
            with torch.inference_mode():
                model.get_image_features(pixel_values=pv, image_grid_thw=grids)

        def ttft(n):
            hf_generate_one(model, proc, prompt[n], images(n, size))
    return measure(res, encode, ttft)


if __name__ == "__main__":
    main(__file__, 32, lambda a: f"qwen2_5_vl-vit-{a.layers}l", lambda p, a: build(p, a.layers), run_side)
