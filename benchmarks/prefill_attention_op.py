"""The causal prefill-attention kernel (csrc/cpu/prefill_attention.cpp) against torch's SDPA on random float32
tensors, op alone, alternating in one process (not a test; figures go to docs/benchmarks.md).

    python benchmarks/prefill_attention_op.py [--threads 2] [--rounds 4]

Cases are (cached positions, new query positions): whole prompts (start 0: SDPA's is_causal path) and later chunks
or prefix-cache hits (start > 0: SDPA under the explicit causal mask the engine builds for them).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from lmserve.ops import cpu_kernels

SHAPES = {"SmolLM2-135M": (9, 3, 64), "Llama-3.2-1B": (32, 8, 64), "Llama-3.2-3B": (24, 8, 128),
          "Llama-3.1-8B": (32, 8, 128)}
CASES = ((0, 512), (512, 512), (1536, 512), (3584, 512), (0, 2048), (2000, 48))


def sdpa(q, k, v, scale, start):
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    gqa = q.shape[2] != k.shape[2]
    if start == 0:
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=gqa)
    mask = torch.arange(start + q.shape[1])[None] <= torch.arange(start, start + q.shape[1])[:, None]
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask[None, None], scale=scale, enable_gqa=gqa)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lib = cpu_kernels.load()
    print("| shape (heads / KV heads / head_dim) | cached | new | kernel ms | SDPA ms | speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (heads, kv_heads, hd) in SHAPES.items():
        for start, n in CASES:
            g = torch.Generator().manual_seed(start + n)
            q = torch.randn(1, n, heads, hd, generator=g)
            k, v = (torch.randn(1, start + n, kv_heads, hd, generator=g) for _ in range(2))
            out = torch.empty_like(q)
            slots = torch.arange(start + n)[None]          # the cache holds the sequence's rows in order
            fns = {"kernel": lambda: lib.causal_prefill_attention(out, q, k[0], v[0], slots, hd ** -0.5, start),
                   "sdpa": lambda: sdpa(q, k, v, hd ** -0.5, start)}
            best = {}
            for f in fns.values():
                f()
            for _ in range(args.rounds):
                for mode, f in fns.items():
                    t0 = time.perf_counter()
                    f()
                    best[mode] = min(best.get(mode, 1e9), time.perf_counter() - t0)
            print(f"| {name} ({heads} / {kv_heads} / {hd}) | {start} | {n} | {best['kernel'] * 1e3:.2f} | "
                  f"{best['sdpa'] * 1e3:.2f} | {best['sdpa'] / best['kernel']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
