"""Decode step time with the AVX2 int8 kernels vs the default dispatch (AVX512-VNNI where it runs), alternating in
one process on one loaded model, so a noisy shared host moves both sides alike.

    python benchmarks/isa_ab.py --model FILE.gguf [--batch 1] [--rounds 4] [--tokens 48]

Both kernels return the same bits (tests/test_gguf_kernels.py), so the tokens are identical; only the time
differs. A step's time: (generate --tokens tokens - generate 1 token) / (tokens - 1), B prompts of 64 tokens.
"""
from __future__ import annotations

import argparse
import time

from lmserve.config import CacheConfig, EngineConfig, ModelConfig
from lmserve.engine.llm_engine import LLMEngine
from lmserve.ops import cpu_isa, cpu_kernels
from lmserve.sampling_params import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args()
    lib = cpu_kernels.load()
    engine = LLMEngine(EngineConfig(model=ModelConfig(model=args.model), cache=CacheConfig(kv_cache_memory=512 << 20)))
    prompts = [[100 + i + j for j in range(64)] for i in range(args.batch)]

    def timed(n: int) -> float:
        t0 = time.perf_counter()
        engine.generate(prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        return time.perf_counter() - t0

    def step_ms() -> float:
        timed(1)
        return (timed(args.tokens) - timed(1)) / (args.tokens - 1) * 1e3

    print(f"ISA level {cpu_isa.isa()}; batch {args.batch}; ms per decode step, rounds alternate")
    res: dict[str, list[float]] = {"avx2": [], "default": []}
    try:
        for _ in range(args.rounds):
            for mode in res:
                lib.gguf_set_vnni512(10**9 if mode == "avx2" else 1, True)
                res[mode].append(step_ms())
    finally:
        lib.gguf_set_vnni512(1, True)
    for mode, v in res.items():
        print(f"{mode:8s} " + " ".join(f"{x:.1f}" for x in v) + f"  (best {min(v):.1f})")


if __name__ == "__main__":
    main()
