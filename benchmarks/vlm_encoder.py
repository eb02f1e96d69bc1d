"""Vision encoder images/s and TTFT with images: lmserve vs transformers, same random weights, same run.

    python benchmarks/vlm_encoder.py [--image-size 448] [--layers 27] [--out DIR]

The tower has SigLIP-so400m's shape (hidden 1152, MLP 4304, 16 heads, patch 14; `--layers` defaults to its 27) at
`--image-size` (448: 1024 patches, so 1024 image tokens per image). It sits in a LLaVA-layout checkpoint
(feature layer -1, all patches, MLP projector) with a tiny 2-layer decoder, so TTFT is the tower's time plus a
short prefill (lmserve with `kernels="torch"`: the tower is plain PyTorch either way). Each side runs in its own process, one after the other (only one copy of the weights in memory):
encoder images/s at batch 1 and 4, then TTFT (max_tokens 1) of one request with 1 and with 4 images.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

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


def images(n: int, size: int):
    from PIL import Image
    g = torch.Generator().manual_seed(n)
    return [Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy())
            for _ in range(n)]


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_side(side: str, path: str, size: int) -> dict:
    import transformers
    torch.set_num_threads(int(os.environ.get("THREADS", os.cpu_count())))
    proc = transformers.AutoProcessor.from_pretrained(path)
    prompt = {n: "Describe " + " and ".join(["<image>"] * n) + "." for n in (1, 4)}
    res: dict = {"side": side, "threads": torch.get_num_threads()}
    if side == "lmserve":
        from lmserve import SamplingParams
        from lmserve.config import EngineConfig, ModelConfig, SchedulerConfig
        from lmserve.engine.llm_engine import LLMEngine
        engine = LLMEngine(EngineConfig(model=ModelConfig(model=path, dtype="float32", kernels="torch"),
                                        scheduler=SchedulerConfig(max_num_batched_tokens=8192)))
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
            inp = proc(text=prompt[n], images=images(n, size), return_tensors="pt")
            with torch.inference_mode():
                model.generate(**inp, max_new_tokens=1, do_sample=False)
    encode(1)    # warm-up
    for n in (1, 4):
        res[f"encoder_images_per_s_batch{n}"] = round(n / timed(lambda: encode(n)), 3)
    for n in (1, 4):
        res[f"ttft_s_{n}_images"] = round(timed(lambda: ttft(n)), 2)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--layers", type=int, default=27)
    ap.add_argument("--out", default="/tmp/lmserve-vlm-bench")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    args = ap.parse_args()
    path = os.path.join(args.out, f"llava-siglip-so400m-{args.image_size}-{args.layers}l")
    if args.side:
        print(json.dumps(run_side(args.side, path, args.image_size)))
        return
    if not os.path.isfile(os.path.join(path, "config.json")):
        build(path, args.image_size, args.layers)
    for side in ("lmserve", "transformers"):
        out = subprocess.run([sys.executable, __file__, "--side", side, "--image-size", str(args.image_size),
                              "--layers", str(args.layers), "--out", args.out], capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
