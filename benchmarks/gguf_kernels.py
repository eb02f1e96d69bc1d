"""Per-kernel speed of ops.gguf_matmul on random GGUF blocks (not a test; figures go to docs/benchmarks.md).

    PYTHONPATH=$PWD python benchmarks/gguf_kernels.py [--threads 1 2] [--types Q4_0 Q8_0 Q4_K Q6_K Q4_1]

Decode shapes (M = 1 row): GB/s of weight bytes read, next to the machine's read bandwidth measured in the same
run (a sum over a 1 GiB float32 tensor: every byte read once, nothing written). Prefill (M = 512): the int8 GEMM
and the exact float path's tile GEMM next to torch's float32 GEMM on the same shape. --crossover prints the float
dot vs the float tile GEMM by rows (what DOT_MAX_ROWS in lmserve/ops/linear.py is set from).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from lmserve.ops import cpu_isa, cpu_kernels
from lmserve.ops.gguf_blocks import QUANTS, GGUFWeight
from lmserve.ops.linear import QTYPES

SHAPES = {"1B": [(2048, 2048), (8192, 2048), (2048, 8192)], "SmolLM2": [(1536, 576), (576, 1536)]}   # (N, K)


def random_weight(qtype: str, n: int, k: int, seed: int = 0) -> GGUFWeight:
    be, bs, _ = QUANTS[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n * k // be, bs), dtype=np.uint8)
    if qtype in ("F16", "BF16"):     # values, not bytes (random bytes would hold NaNs and subnormals)
        v = torch.from_numpy(0.02 * rng.standard_normal(n * k).astype(np.float32))
        raw = v.to(torch.float16 if qtype == "F16" else torch.bfloat16).view(torch.uint8).numpy().reshape(-1, bs)
        return GGUFWeight(qtype, torch.from_numpy(raw.reshape(n, -1)), (n, k))
    for off in {"Q4_1": [0, 2], "Q5_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}.get(qtype, [0]):
        raw[:, off:off + 2] = rng.uniform(0.001, 0.05, raw.shape[0]).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return GGUFWeight(qtype, torch.from_numpy(raw.reshape(n, -1)), (n, k))


def best_time(fn, min_time: float = 0.3, reps: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_time / reps:
                break
        best = min(best, dt / n)
    return best


def read_bandwidth() -> float:
    big = torch.ones(2**28)      # 1 GiB
    return big.numel() * 4 / best_time(lambda: big.sum(), min_time=2.0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--types", nargs="+", default=["Q4_0", "Q8_0", "Q4_K", "Q6_K", "Q4_1"])
    ap.add_argument("--crossover", action="store_true")
    args = ap.parse_args()
    lib = cpu_kernels.load()
    print(f"ISA level: {cpu_isa.isa()} (detected {cpu_isa.detected()}), build baseline {lib.built_baseline()}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"\n## {threads} thread(s); read bandwidth {read_bandwidth():.1f} GB/s")
        print("| type | model | N x K | int8 GB/s | float GB/s |")
        print("|---|---|---|---|---|")
        for qt in args.types:
            for model, shapes in SHAPES.items():
                for n, k in shapes:
                    if k % QUANTS[qt][0]:
                        continue
                    w = random_weight(qt, n, k)
                    x = torch.randn(1, k)
                    out = torch.empty(1, n)
                    row = []
                    for int8 in (True, False):
                        t = best_time(lambda: lib.gguf_matmul(out, x, w.data, QTYPES.index(qt), int8, 16))
                        row.append(f"{w.nbytes / t / 1e9:.1f}")
                    print(f"| {qt} | {model} | {n} x {k} | {row[0]} | {row[1]} |")
        print("\n| type | M x N x K | int8 GEMM GOP/s | float tile GEMM GFLOP/s | torch fp32 GEMM GFLOP/s |")
        print("|---|---|---|---|---|")
        m, n, k = 512, 2048, 2048
        x = torch.randn(m, k)
        wf = torch.randn(n, k)
        t_ref = best_time(lambda: torch.mm(x, wf.t()), min_time=1.0)
        for qt in args.types:
            w = random_weight(qt, n, k)
            out = torch.empty(m, n)
            rates = [2 * m * n * k / best_time(lambda: lib.gguf_matmul(out, x, w.data, QTYPES.index(qt), i8, 16),
                                               min_time=1.0) / 1e9 for i8 in (True, False)]
            print(f"| {qt} | {m} x {n} x {k} | {rates[0]:.1f} | {rates[1]:.1f} | {2 * m * n * k / t_ref / 1e9:.1f} |")
        if args.crossover:
            print("\n| rows | int8 GEMM ms | dot float ms | float tile GEMM ms |  (Q4_0, 2048 x 2048)")
            w = random_weight("Q4_0", 2048, 2048)
            for rows in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64):
                x = torch.randn(rows, 2048)
                out = torch.empty(rows, 2048)
                ts = [best_time(lambda: lib.gguf_matmul(out, x, w.data, 0, i8, mx)) * 1e3
                      for i8, mx in ((True, 10**6), (False, 10**6), (False, 0))]
                print(f"| {rows} | {ts[0]:.2f} | {ts[1]:.2f} | {ts[2]:.2f} |")


if __name__ == "__main__":
    main()
