"""Matmuls on quantized weights: `gguf_matmul` / `gguf_dequantize` on GGUF blocks (ops/gguf_blocks.py's
GGUFWeight, the loader/kernel contract).

gguf_matmul has two activation precisions, chosen once per model (`int8_activations`) and passed per call:
- float (exact): each weight is the reference dequantizer's float32 value, accumulated in float32;
- int8 (llama.cpp's Q8 x Qn dot products, not exact): each row of x is quantized in groups of 32 to int8 with a
  float32 scale (`quantize_activations`), the block dot products are integer, for every number of rows (decode
  and prefill alike), as the reference below does, so both arms agree to float rounding.

Batch invariance: on the AVX2 kernels (the scalar ones: with int8, or up to DOT_MAX_ROWS rows of float
activations) a row's result is bit-identical whatever the number of rows in the call, so a request's greedy
tokens do not depend on what else shares its engine step (csrc/cpu/gguf_gemm_avx2.cpp says how).
"""
from __future__ import annotations

import torch

from lmserve.ops import cpu_isa
from lmserve.ops.base import CustomOp, cpu_lib, register
from lmserve.ops.gguf_blocks import GGUFWeight, repack

# C++ type ids (csrc/cpu/gguf_blocks.h enum QType): index in this tuple. F16 / BF16: 16-bit float matrices read
# in place (no int8 form: an int8 call multiplies them with the float activations)
QTYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q3_K", "IQ4_XS", "Q2_K", "F16", "BF16",
          "IQ4_NL", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "MXFP4")
FLOAT16 = ("F16", "BF16")
# and the repacked layouts (gguf_x8.py repack_q4_0x8): int8 activations only
_QTYPE_ID = {name: i for i, name in enumerate(QTYPES + ("Q4_0x8", "Q4_Kx8", "Q6_Kx8", "Q5_0x8", "Q4_1x8", "Q3_Kx8",
                                                                    "Q2_Kx8", "IQ4_XSx8", "Q5_Kx8", "Q8_0x8", "Q5_1x8",
                                                                    "MXFP4x8", "IQ4_NLx8"))}
# Float activations: above this many rows the matmul is compute-bound and dequantizes panels of W for a tile GEMM
# (crossover measured with benchmarks/gguf_kernels.py --crossover, docs/benchmarks.md). int8 runs one GEMM for all.
DOT_MAX_ROWS = 16
QUANT_ACTIVATIONS = ("auto", "int8", "float")


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """float32 [M, K] -> what the int8 path sees: per group of 32, q = round(x / dx) in int8, dx = amax / 127;
    returns q * dx. (Round half to even, as the kernel's cvtps; x * (1 / dx) as the kernel computes it.)"""
    m, k = x.shape
    g = x.reshape(m, k // 32, 32)
    dx = g.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(dx > 0, 1 / dx, torch.zeros_like(dx))
    return torch.round(g * inv).mul_(dx).reshape(m, k)


def int8_activations(setting: str, dtype_flag: str) -> bool:
    """The activation precision of gguf_matmul for a model: setting is --quant-activations (auto|int8|float),
    dtype_flag the --dtype the user gave. auto: int8 where the CPU kernels have an integer dot path (AVX2
    maddubs or better), except in the exact mode (--dtype float32 given explicitly)."""
    if setting not in QUANT_ACTIVATIONS:
        raise ValueError(f"quant_activations must be one of {', '.join(QUANT_ACTIVATIONS)}, not {setting!r}")
    if setting != "auto":
        return setting == "int8"
    if dtype_flag == "float32":
        return False
    return cpu_isa.isa() != "scalar"


_CHUNK_ELEMS = 1 << 22    # float elements the references dequantize at a time


def _row_chunks(w: GGUFWeight):
    """(first row, GGUFWeight of the next rows) pieces of w, each at most _CHUNK_ELEMS floats once dequantized."""
    n, k = w.shape
    step = max(1, _CHUNK_ELEMS // k)
    for n0 in range(0, n, step):
        n1 = min(n, n0 + step)
        yield n0, GGUFWeight(w.qtype, w.data[n0:n1], (n1 - n0, k))


def _parts(w: GGUFWeight | list[GGUFWeight]) -> list[GGUFWeight]:
    return list(w) if isinstance(w, (list, tuple)) else [w]


def _check(x: torch.Tensor, parts: list[GGUFWeight]) -> None:
    for w in parts:
        n, k = w.shape
        if x.dim() != 2 or x.shape[1] != k:
            raise ValueError(f"gguf_matmul: x must be [M, {k}], got {list(x.shape)}")
        if w.qtype not in _QTYPE_ID:
            raise ValueError(f"gguf_matmul: no kernel for GGUF type {w.qtype}; supported: {', '.join(QTYPES)}")


@register
class GGUFMatmulOp(CustomOp):
    """gguf_matmul(x [M, K] float32 or bf16, w: GGUFWeight [N, K] or a list of them stacked along the outputs
    (fused q/k/v, gate/up; their types may differ), bias=None, int8=False) -> x @ W.T, [M, N]."""
    name = "gguf_matmul"

    def forward_native(self, x: torch.Tensor, w: GGUFWeight | list[GGUFWeight], bias: torch.Tensor | None = None,
                       int8: bool = False) -> torch.Tensor:
        parts = _parts(w)
        _check(x, parts)
        xf = x.float()
        xq = quantize_activations(xf) if int8 else xf
        out = torch.empty(x.shape[0], sum(p.shape[0] for p in parts), dtype=torch.float32, device=x.device)
        first = 0
        for w in parts:
            xw = xf if w.qtype in FLOAT16 else xq
            for n0, part in _row_chunks(w):     # bounded scratch, never a float copy of the whole matrix
                out[:, first + n0:first + n0 + part.shape[0]] = xw @ part.dequantize().to(x.device).t()
            first += w.shape[0]
        if bias is not None:
            out.add_(bias.float())
        return out.to(x.dtype)

    def forward_cpu(self, x: torch.Tensor, w: GGUFWeight | list[GGUFWeight], bias: torch.Tensor | None = None,
                    int8: bool = False) -> torch.Tensor:
        parts = _parts(w)
        _check(x, parts)
        xf = x.float().contiguous()
        out = torch.empty(x.shape[0], sum(p.shape[0] for p in parts), dtype=torch.float32)
        # one call for all parts: the activations are quantized once and one thread team covers every part's rows
        cpu_lib().gguf_matmul_parts(out, xf, [p.data for p in parts], [_QTYPE_ID[p.qtype] for p in parts], int8,
                                    DOT_MAX_ROWS)
        if bias is not None:
            out.add_(bias)
        return out if x.dtype == torch.float32 else out.to(x.dtype)


@register
class GGUFRepackOp(CustomOp):
    """gguf_repack(w: GGUFWeight Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / Q4_K / Q5_K / Q6_K / Q3_K / Q2_K / IQ4_XS / MXFP4 /
    IQ4_NL, N a multiple of 8) -> the same weight in the int8 kernels' 8-row groups (gguf_x8.py is the reference; the kernel
    does it in parallel, ~0.1 s for a 1B model).
    F16: as BF16 where the int8 (non-exact) calls' bf16 path would round it so anyway, else unchanged."""
    name = "gguf_repack"

    def forward_native(self, w: GGUFWeight) -> GGUFWeight:
        return w if w.qtype == "F16" else repack(w)     # the reference multiplies F16 in float: kept

    def forward_cpu(self, w: GGUFWeight) -> GGUFWeight:
        if w.qtype == "F16":
            # the bf16 path rounds F16 weights to bf16 (round to nearest even) on every read; rounding them once
            # here gives the same values, so the same results, without the per-token conversion (same size)
            if not cpu_lib().gguf_bf16_dot():
                return w
            n, k = w.shape
            half = w.data.contiguous().view(torch.float16)
            return GGUFWeight("BF16", half.to(torch.bfloat16).view(torch.uint8).view(n, 2 * k), w.shape, owned=True)
        data = w.data.contiguous()
        out = torch.empty_like(data)
        cpu_lib().gguf_repack(out, data, _QTYPE_ID[w.qtype])
        return GGUFWeight(w.qtype + "x8", out, w.shape, owned=True)


@register
class GGUFDequantizeOp(CustomOp):
    """gguf_dequantize(w: GGUFWeight, rows: LongTensor | None = None) -> float32 [len(rows) or N, K]
    (embedding lookups, --weights float)."""
    name = "gguf_dequantize"

    def forward_native(self, w: GGUFWeight, rows: torch.Tensor | None = None) -> torch.Tensor:
        if rows is not None:
            return w.dequantize(rows.to("cpu"))
        out = torch.empty(w.shape, dtype=torch.float32)
        for n0, part in _row_chunks(w):
            out[n0:n0 + part.shape[0]] = part.dequantize()
        return out

    def forward_cpu(self, w: GGUFWeight, rows: torch.Tensor | None = None) -> torch.Tensor:
        if w.qtype not in _QTYPE_ID:
            return w.dequantize(rows)
        n_out = w.shape[0] if rows is None else rows.numel()
        out = torch.empty(n_out, w.shape[1], dtype=torch.float32)
        idx = torch.empty(0, dtype=torch.long) if rows is None else rows.reshape(-1).long().contiguous()
        cpu_lib().gguf_dequantize(out, w.data, _QTYPE_ID[w.qtype], idx, rows is not None)
        return out
