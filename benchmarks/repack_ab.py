"""The int8 matmul on GGUF blocks in the file's layout vs repacked in groups of 8 rows (ops.gguf_repack), alternating
in one process so a noisy shared host moves both alike (not a test; figures go to docs/benchmarks.md).

    PYTHONPATH=$PWD python benchmarks/repack_ab.py [--types Q4_0 Q4_K Q6_K Q5_0 Q4_1] [--rows 1 2 16 512] [--isa avx2 best]
        [--weights 16]

Both layouts give results within the int8 path's rounding of each other (tests/test_gguf_repack.py); only time
is compared. Shape: a 1B model's fused gate/up (N 16384, K 2048), weights from cache at small M (~19 MB, L3-sized
on most hosts: the kernel's compute rate, not DRAM's). --weights L cycles through L distinct weights per timed
pass, so they come from DRAM as in a model's decode (16 x 19 MB = 304 MB); times are then per weight.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from lmserve import ops
from lmserve.ops import cpu_isa, cpu_kernels
from lmserve.ops.gguf_blocks import QUANTS, GGUFWeight


def random_weight(qtype: str, n: int, k: int, seed: int = 0) -> GGUFWeight:
    be, bs, _ = QUANTS[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n * k // be, bs), dtype=np.uint8)
    for off in {"Q4_K": [0, 2], "Q6_K": [208]}.get(qtype, [0]):
        raw[:, off:off + 2] = rng.uniform(0.001, 0.05, raw.shape[0]).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return GGUFWeight(qtype, torch.from_numpy(raw.reshape(n, -1)), (n, k))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", nargs="+", default=["Q4_0", "Q4_K", "Q6_K", "Q5_0", "Q4_1"])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 16, 512])
    ap.add_argument("--isa", nargs="+", default=["avx2", "best"])
    ap.add_argument("--shape", type=int, nargs=2, default=[16384, 2048], metavar=("N", "K"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--weights", type=int, default=1, help="distinct weights per pass (>1: DRAM-resident)")
    args = ap.parse_args()
    lib = cpu_kernels.load()
    table = ops.select("cpu", torch.float32, lib=lib)
    best = cpu_isa.detected()
    n, k = args.shape
    per = "per call" if args.weights == 1 else f"per weight, {args.weights} distinct weights per pass (from DRAM)"
    print(f"CPU level {best}; {torch.get_num_threads()} threads; N={n} K={k}; ms {per}, best of {args.rounds} "
          f"alternating rounds")
    print("| type | ISA | rows | file layout ms | repacked ms | speed-up | repacked GOP/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for qtype in args.types:
        files = [random_weight(qtype, n, k, seed=i) for i in range(args.weights)]
        with ops.use(table):
            packed = [ops.gguf_repack(w) for w in files]
        for isa in args.isa:
            level = best if isa == "best" else isa
            if not cpu_isa.supports(level, best):
                continue
            lib.gguf_set_isa(list(cpu_isa.LEVELS).index(level))
            for m in args.rows:
                x = torch.randn(m, k)
                times = {"file": [], "x8": []}
                iters = max(1, 200 // m // args.weights)
                with ops.use(table):
                    for _ in range(args.rounds):
                        for name, ws in (("file", files), ("x8", packed)):
                            for wt in ws:
                                ops.gguf_matmul(x, wt, None, True)
                            t0 = time.perf_counter()
                            for _ in range(iters):
                                for wt in ws:
                                    ops.gguf_matmul(x, wt, None, True)
                            times[name].append((time.perf_counter() - t0) / iters / len(ws))
                a, b = min(times["file"]), min(times["x8"])
                print(f"| {qtype} | {level} | {m} | {a * 1e3:.2f} | {b * 1e3:.2f} | {a / b:.2f}x | "
                      f"{2 * m * n * k / b / 1e9:.0f} |", flush=True)
    lib.gguf_set_isa(list(cpu_isa.LEVELS).index(best))


if __name__ == "__main__":
    main()
