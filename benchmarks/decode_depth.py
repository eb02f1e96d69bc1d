"""Decode speed at a given context depth and batch, in process: `batch` prompts of `depth` tokens are prefilled,
then 64 decode steps of the whole batch are timed (after 4 warm-up steps). The peer figure is llama.cpp's
`llama-bench -p 0 -n 64 -d DEPTH` (batch 1) or `llama-batched-bench -npp DEPTH -ntg 64 -npl BATCH` (its S_TG
column: decode only, the prompts' prefill timed apart). Not a test.

    python benchmarks/decode_depth.py MODEL.gguf --depths 128,4096 [--batch 16]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from engine_vs_hf import make_prompts  # noqa: E402

from lmserve.config import EngineConfig, ModelConfig  # noqa: E402
from lmserve.engine.llm_engine import LLMEngine  # noqa: E402
from lmserve.sampling_params import SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--depths", default="128,4096")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=64)
    args = ap.parse_args()
    engine = LLMEngine(EngineConfig(model=ModelConfig(model=args.model)))
    for depth in (int(d) for d in args.depths.split(",")):
        for i, prompt in enumerate(make_prompts(engine.tokenizer, args.batch, depth)):
            engine.add_request(f"d{depth}-{i}", prompt,
                               SamplingParams(temperature=0, max_tokens=args.steps + 8, ignore_eos=True))
        t0 = time.perf_counter()
        while engine.scheduler.waiting or any(s.num_output_tokens == 0 for s in engine.scheduler.running):
            engine.step()
        prefill_s = time.perf_counter() - t0
        for _ in range(4):
            engine.step()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        step_s = (time.perf_counter() - t0) / args.steps
        engine.abort_all()
        while engine.has_unfinished():
            engine.step()
        print(f"depth {depth}, batch {args.batch}: prefill {args.batch * depth / prefill_s:.1f} tok/s, "
              f"decode {step_s * 1000:.1f} ms/step = {args.batch / step_s:.1f} tok/s", flush=True)


if __name__ == "__main__":
    main()
