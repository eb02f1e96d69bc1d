"""Pure-decode step time of the engine at several batch sizes: GGUF blocks (the kernels of ops/linear.py) vs float
weights (MKL / packed oneDNN GEMMs).

    python benchmarks/decode_steps.py [--batches 1,4,8,16,64] [--weights quantized,float] [--int8-dot on,off]

For each --weights value, each --int8-dot value (int8 or float activations on quantized weights), each context
depth D (--depths, default 128) and each batch size B: B requests with D-token prompts are prefilled (the prefill's
tokens/s printed too; prefix caching is off, as the prompts of one depth begin with those of a shorter one), then
--steps decode steps are timed. Peers for the same figures: `llama-bench -p 0 -n 64
-d D` (B = 1) and `llama-batched-bench -npp D -ntg 64 -npl B` (its S_PP and S_TG columns).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from engine_vs_hf import make_prompts  # noqa: E402

from lmserve.config import CacheConfig, EngineConfig, ModelConfig  # noqa: E402
from lmserve.engine.llm_engine import LLMEngine  # noqa: E402
from lmserve.sampling_params import SamplingParams  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--batches", default="1,4,8,16,64")
    ap.add_argument("--depths", default="128", help="prompt tokens per request, comma-separated")
    ap.add_argument("--weights", default="quantized,float", help="--weights values to compare")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--matmul-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--int8-dot", default="on", help="on,off: int8 activations on quantized weights (--quant-activations); "
                    "several values run interleaved per batch size")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the engine's choice)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of the whole comparison (interleaved)")
    args = ap.parse_args()
    configs = [(w, i8) for _ in range(args.repeat) for w in args.weights.split(",") for i8 in args.int8_dot.split(",")]
    for weights, int8 in configs:
        engine = LLMEngine(EngineConfig(model=ModelConfig(model=args.model, weights=weights,
                                                          quant_activations="int8" if int8 == "on" else "float",
                                                          matmul_dtype=args.matmul_dtype),
                                        cache=CacheConfig(num_blocks=4096, enable_prefix_caching=False)))
        if args.threads:
            torch.set_num_threads(args.threads)
        for depth, batch in ((int(d), int(b)) for d in args.depths.split(",") for b in args.batches.split(",")):
            for i, p in enumerate(make_prompts(engine.tokenizer, batch, depth)):
                engine.add_request(f"{weights}-{int8}-{depth}-{batch}-{i}", p,
                                   SamplingParams(temperature=0, max_tokens=args.steps + 8, ignore_eos=True))
            t0 = time.perf_counter()
            while engine.scheduler.waiting or any(s.num_output_tokens == 0 for s in engine.scheduler.running):
                engine.step()
            prefill = batch * depth / (time.perf_counter() - t0)
            for _ in range(2):
                engine.step()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                engine.step()
            dt = (time.perf_counter() - t0) / args.steps
            print(f"threads={torch.get_num_threads()} matmul_dtype={args.matmul_dtype} int8_dot={int8:3s} weights={weights:9s} "
                  f"depth={depth:5d} batch={batch:3d}: prefill {prefill:7.1f} tok/s, step {dt * 1000:7.1f} ms "
                  f"{batch / dt:7.1f} tok/s", flush=True)
            engine.abort_all()
            while engine.has_unfinished():
                engine.step()


if __name__ == "__main__":
    main()
