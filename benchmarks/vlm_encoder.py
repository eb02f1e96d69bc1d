"""Vision encoder images/s and TTFT with images: lmserve vs transformers, same random weights, same run.

    python benchmarks/vlm_encoder.py [--image-size 448] [--layers 27] [--out DIR]

The tower has SigLIP-so400m's shape (hidden 1152, MLP 4304, 16 heads, patch 14; `--layers` defaults to its 27) at
`--image-size` (448: 1024 patches, so 1024 image tokens per image). It sits in a LLaVA-layout checkpoint
(feature layer -1, all patches, MLP projector) with a tiny 2-layer decoder, so TTFT is the tower's time plus a
short prefill (lmserve with `kernels="torch"`: the tower is plain PyTorch either way). Each side runs in its own process, one after the other (only one copy of the weights in memory):
encoder images/s at batch 1 and 4, then TTFT (max_tokens 1) of one request with 1 and with 4 images.
"""
from __future__ import annotations

import os
import sys

import torch

from vlm_bench_common import hf_generate_one, images, lmserve_engine, main, measure

HERE = os.path.dirname(os.path.abspath(__file__))


def build(path: str, image_size: int, layers: int) -> None:
    import transformers
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    from vlm_builders import _randomize, _text_config, _tokenizer
    tok = _tokenizer("<image>")
    vision = transformers.SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=layers,
                                             num_attention_heads=16, image_size=image_size, patch_size=14)
    config = transformers.LlavaConfig(text_config=_text_config(tok, max_position_embeddings=8192), vision_config=vision,
                                      image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                                      vision_feature_select_strategy="full")
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config).to(torch.float32)
    _randomize(model)
    model.save_pretrained(path)
    ip = transformers.SiglipImageProcessor(size={"height": image_size, "width": image_size})
    transformers.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, image_token="<image>",
                                vision_feature_select_strategy="full", num_additional_image_tokens=0,
                                chat_template=tok.chat_template).save_pretrained(path)


def run_side(side: str, path: str, size: int) -> dict:
    import transformers
    torch.set_num_threads(int(os.environ.get("THREADS", os.cpu_count())))
    proc = transformers.AutoProcessor.from_pretrained(path)
    prompt = {n: "Describe " + " and ".join(["<image>"] * n) + "." for n in (1, 4)}
    res: dict = {"side": side, "threads": torch.get_num_threads()}
    if side == "lmserve":
        from lmserve import SamplingParams
        engine = lmserve_engine(path)
        model = engine.runner.model

        def encode(n):
            pv = proc.image_processor(images(n, size), return_tensors="pt")["pixel_values"]
            with torch.inference_mode():
                model.encode_images([{"pixel_values": pv[i:i + 1]} for i in range(n)])

        def ttft(n):
            engine.generate(prompt[n], SamplingParams(max_tokens=1), images=images(n, size))
    else:
        model = transformers.LlavaForConditionalGeneration.from_pretrained(path).eval()

        def encode(n):
            pv = proc.image_processor(images(n, size), return_tensors="pt")["pixel_values"]
            with torch.inference_mode():
                model.get_image_features(pixel_values=pv)

        def ttft(n):
            hf_generate_one(model, proc, prompt[n], images(n, size))
    return measure(res, encode, ttft)


if __name__ == "__main__":
    main(__file__, 27, lambda a: f"llava-siglip-so400m-{a.image_size}-{a.layers}l", lambda p, a: build(p, a.image_size, a.layers), run_side)
