"""Rows at which the packed GEMM overtakes the quantized-weight kernel, per row count, on the real model's matmuls.

    python benchmarks/quant_crossover.py [--model GGUF] [--rows 1,2,3,4,5,6,8,10,12,16] [--matmul-dtype bfloat16]

Loads the model once (packed twins in the chosen matmul dtype, quantized twins for every row count), then times
one full pass over all its linear layers plus the output projection (the matmul work of one forward) with each
path at each row count. Paths are interleaved and the minimum of --repeat passes is kept, so a busy neighbour
inflates both alike. Prints ms per forward's matmuls and which path wins.
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--rows", default="1,2,3,4,5,6,8,10,12,16")
    ap.add_argument("--matmul-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    from lmserve import ops
    from lmserve.config import CacheConfig, EngineConfig, ModelConfig
    from lmserve.engine.llm_engine import LLMEngine
    from lmserve.model.layers import Linear, fast_linear
    from lmserve.model.quant import load_gguf_quantized
    engine = LLMEngine(EngineConfig(model=ModelConfig(model=args.model, matmul_dtype=args.matmul_dtype,
                                                      quant_kernel_max_rows=0),
                                    cache=CacheConfig(num_blocks=64)))
    runner = engine.runner
    model = runner.model
    model.attach_quantized(load_gguf_quantized(runner.model_path), 1 << 30)
    linears = [m for m in model.modules() if isinstance(m, Linear) and m.quant is not None]
    int8 = runner._use_int8_dot()    # the bf16 modes' int8-activation path, as the runner would pick it
    if int8:
        for m in linears:
            m.quant = m.quant.for_int8_dot()
        model.logits_quant = model.logits_quant.for_int8_dot()
    head_q, head_f = model.logits_quant, model.logits_fast

    def quant_pass(x_by_k):
        for m in linears:
            ops.quant_matmul(x_by_k[m.in_features], m.quant)
        ops.quant_matmul(x_by_k[model.cfg.hidden_size], head_q)

    def packed_pass(x_by_k):
        for m in linears:
            fast_linear(x_by_k[m.in_features], m.fast_weight)
        fast_linear(x_by_k[model.cfg.hidden_size], head_f)

    print(f"{len(linears)} linear layers + output projection; matmul dtype {args.matmul_dtype}; "
          f"quantized kernel with {'int8' if int8 else 'float32'} activations; {torch.get_num_threads()} threads")
    with torch.inference_mode(), ops.use(runner.ops):
        for rows in (int(r) for r in args.rows.split(",")):
            xs = {k: torch.randn(rows, k) for k in {m.in_features for m in linears} | {model.cfg.hidden_size}}
            best = {"quant": float("inf"), "packed": float("inf")}
            for _ in range(args.repeat):
                for name, fn in (("quant", quant_pass), ("packed", packed_pass)):
                    t0 = time.perf_counter()
                    fn(xs)
                    best[name] = min(best[name], time.perf_counter() - t0)
            win = min(best, key=best.get)
            print(f"rows {rows:3d}: quant {best['quant'] * 1e3:7.2f} ms  packed {best['packed'] * 1e3:7.2f} ms  "
                  f"-> {win} ({max(best.values()) / min(best.values()):.2f}x)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
