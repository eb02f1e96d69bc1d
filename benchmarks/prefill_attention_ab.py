"""Prefill time with the causal prefill-attention kernel (csrc/cpu/prefill_attention.cpp) vs torch's SDPA,
alternating in one process on one loaded model (not a test; figures go to docs/benchmarks.md).

    python benchmarks/prefill_attention_ab.py --model FILE.gguf [--tokens 512] [--rounds 4]

A round prefills a fresh random prompt of --tokens tokens (one output token, so the time is the prefill's) once
with the kernel and once with SDPA (ops/attention.py PREFILL_KERNEL = False turns the kernel off); both give
the same tokens up to float rounding.
"""
from __future__ import annotations

import argparse
import random
import time

from lmserve.config import CacheConfig, EngineConfig, ModelConfig
from lmserve.engine.llm_engine import LLMEngine
from lmserve.ops import attention
from lmserve.sampling_params import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    engine = LLMEngine(EngineConfig(model=ModelConfig(model=args.model), cache=CacheConfig(kv_cache_memory=512 << 20)))
    rng = random.Random(0)
    res: dict[str, list[float]] = {"kernel": [], "sdpa": []}
    try:
        for _ in range(args.rounds):
            for mode in res:
                attention.PREFILL_KERNEL = mode == "kernel"
                prompt = [rng.randrange(100, 20000) for _ in range(args.tokens)]   # fresh: no prefix-cache hit
                t0 = time.perf_counter()
                engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0))
                res[mode].append(args.tokens / (time.perf_counter() - t0))
    finally:
        attention.PREFILL_KERNEL = True
    print(f"prefill tok/s of a {args.tokens}-token prompt, rounds alternate")
    for mode, v in res.items():
        print(f"{mode:7s} " + " ".join(f"{x:.1f}" for x in v) + f"  (best {max(v):.1f})")


if __name__ == "__main__":
    main()
