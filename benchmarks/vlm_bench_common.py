"""What the vision-encoder benchmarks share: random test images, the timing loop, the lmserve engine both load, and
the driver that runs each side in its own process (only one copy of the weights in memory at a time)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch


def images(n: int, size: int):
    from PIL import Image
    g = torch.Generator().manual_seed(n)
    return [Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy())
            for _ in range(n)]


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def lmserve_engine(path: str):
    """The engine under test: exact float32, the PyTorch ops (the towers are plain PyTorch on both sides)."""
    from lmserve.config import EngineConfig, ModelConfig, SchedulerConfig
    from lmserve.engine.llm_engine import LLMEngine
    return LLMEngine(EngineConfig(model=ModelConfig(model=path, dtype="float32", kernels="torch"),
                                  scheduler=SchedulerConfig(max_num_batched_tokens=8192)))


def hf_generate_one(model, proc, prompt: str, imgs: list) -> None:
    """transformers' side of a TTFT: the processor, then generate with one new token."""
    inp = proc(text=prompt, images=imgs, return_tensors="pt")
    with torch.inference_mode():
        model.generate(**inp, max_new_tokens=1, do_sample=False)


def measure(res: dict, encode, ttft) -> dict:
    """Encoder images/s at batch 1 and 4 (after one warm-up), then TTFT of one request with 1 and with 4 images."""
    encode(1)
    for n in (1, 4):
        res[f"encoder_images_per_s_batch{n}"] = round(n / timed(lambda: encode(n)), 3)
    for n in (1, 4):
        res[f"ttft_s_{n}_images"] = round(timed(lambda: ttft(n)), 2)
    return res


def main(script: str, default_layers: int, model_dir, build, run_side) -> None:
    """`model_dir(args)` names the checkpoint folder, `build(path, args)` writes it once, `run_side(side, path,
    image_size)` measures one side and returns its row; each side's row is printed as one JSON line."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--layers", type=int, default=default_layers)
    ap.add_argument("--out", default="/tmp/lmserve-vlm-bench")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    args = ap.parse_args()
    path = os.path.join(args.out, model_dir(args))
    if args.side:
        print(json.dumps(run_side(args.side, path, args.image_size)))
        return
    if not os.path.isfile(os.path.join(path, "config.json")):
        build(path, args)
    for side in ("lmserve", "transformers"):
        out = subprocess.run([sys.executable, script, "--side", side, "--image-size", str(args.image_size),
                              "--layers", str(args.layers), "--out", args.out], capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        print(out.stdout.strip().splitlines()[-1])
