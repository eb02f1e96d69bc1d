"""GGUF weights in the file's own block format: the contract between the loader (model/) and the kernels (ops/).

A quantized matrix is never expanded to float: `GGUFWeight` holds its rows of GGUF blocks as they lie in the file
(a view of the memory-mapped file, or a repacked copy of the same size), and the ops (`ops.gguf_matmul`,
`ops.gguf_dequantize`) read those blocks. The torch dequantizers below are the reference (the test oracle and
the `--weights float` loader); layouts follow gguf-py's quants.py and llama.cpp's ggml-quants.c.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmserve.ops import gguf_iq, gguf_x8


@dataclass
class GGUFWeight:
    """An [N, K] weight (HF orientation: N output features, K input features) kept as GGUF blocks.

    data: uint8 [N, row_bytes], row n = the K / block_elems blocks of output feature n, in file order (K is a
    multiple of the type's block size). It may be a read-only view of the mmap'd file: never write to it.
    """
    qtype: str              # GGUF type name: "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q3_K",
    #                         "IQ4_XS", "Q2_K", "IQ4_NL", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S",
    #                         "IQ1_S", "IQ1_M", "MXFP4";
    #                         "F16", "BF16" (16-bit float matrices, 64 bytes per 32 values);
    #                         "Q4_0x8", "Q4_Kx8", "Q6_Kx8", "Q5_0x8", "Q4_1x8", "Q3_Kx8", "Q2_Kx8", "IQ4_XSx8",
    #                         "Q5_Kx8", "Q8_0x8", "Q5_1x8", "MXFP4x8", "IQ4_NLx8":
    #                         repacked in 8-row groups (repack, ops/gguf_x8.py)
    data: torch.Tensor      # uint8 [N, row_bytes]
    shape: tuple[int, int]  # (N, K)
    owned: bool = False     # a private copy made at load (repacked / converted), not the file's pages

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """float32 [len(rows) or N, K] (the reference; the fast path is ops.gguf_dequantize)."""
        if self.qtype in REPACKED:
            return unpack(self).dequantize(rows)
        data = self.data if rows is None else self.data[rows]
        _, type_size, fn = QUANTS[self.qtype]
        return fn(data.reshape(-1, type_size)).reshape(data.shape[0], self.shape[1])


# ---- the 8-row layouts (ops/gguf_x8.py) ------------------------------------------------------------------------
REPACKED = {name: name[:-2] for name in gguf_x8.UNPACK}    # repacked type -> the file type it holds


def can_repack(w: GGUFWeight) -> bool:
    """Whether ops.gguf_repack may rewrite w: the 8-row layouts, or F16 -> BF16 (which the op does only where the
    kernels would round F16 to bf16 on every read anyway: the non-exact path on AVX512-BF16 CPUs)."""
    return (w.qtype in gguf_x8.REPACK and w.shape[0] % 8 == 0) or w.qtype == "F16"


def repack(w: GGUFWeight) -> GGUFWeight:
    """w in the int8 kernels' 8-row groups (same size); can_repack(w) must hold."""
    return GGUFWeight(w.qtype + "x8", gguf_x8.REPACK[w.qtype](w.data, *w.shape), w.shape, owned=True)


def unpack(w: GGUFWeight) -> GGUFWeight:
    """A repacked weight back in the file's layout."""
    return GGUFWeight(REPACKED[w.qtype], gguf_x8.UNPACK[w.qtype](w.data, *w.shape), w.shape)


# ---- dequantization (layouts: gguf/quants.py and llama.cpp ggml-quants.c) --------------------------------------
def f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()   # [n_blocks, 1]


def bits(qs: torch.Tensor, groups: int, shifts: tuple[int, ...], mask: int) -> torch.Tensor:
    """[n, groups * k] bytes -> [n, groups * len(shifts), k]: per group, (qs >> shift) & mask for each shift.

    NOTE: one elementwise op per shift into a preallocated output; broadcasting a tensor of shifts over uint8
    takes a slow path in torch (15x slower on the SmolLM2 load).
    """
    n = qs.shape[0]
    qs = qs.reshape(n, groups, -1)
    out = torch.empty(n, groups, len(shifts), qs.shape[-1], dtype=torch.uint8)
    for i, shift in enumerate(shifts):
        torch.bitwise_and(qs >> shift if shift else qs, mask, out=out[:, :, i])
    return out.view(n, groups * len(shifts), -1)


def nibbles(qs: torch.Tensor, groups: int) -> torch.Tensor:
    """Low nibbles then high nibbles of each group: [n, groups * k] -> [n, 2 * groups, k]."""
    return bits(qs, groups, (0, 4), 0x0F)


def k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins, each [n, 8, 1] float32."""
    d, m, m_d = scales.reshape(-1, 3, 4).unbind(1)
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float().unsqueeze(-1), mn.float().unsqueeze(-1)


def _dq_q8_0(b):
    return b[:, 2:].view(torch.int8).float().mul_(f16(b, 0))


def _dq_q4_0(b):
    q = nibbles(b[:, 2:], 1).view(b.shape[0], 32).float().sub_(8)
    return q.mul_(f16(b, 0))


def _dq_q4_1(b):
    q = nibbles(b[:, 4:], 1).view(b.shape[0], 32).float()
    return q.mul_(f16(b, 0)).add_(f16(b, 2))


def _dq_q5_0(b):
    n = b.shape[0]
    qh = bits(b[:, 2:6], 1, tuple(range(8)), 1).transpose(1, 2).reshape(n, 32)   # bit j of the 32-bit qh
    q = nibbles(b[:, 6:], 1).view(n, 32).bitwise_or_(qh.bitwise_left_shift_(4))
    return q.float().sub_(16).mul_(f16(b, 0))


def _dq_q5_1(b):
    n = b.shape[0]
    qh = bits(b[:, 4:8], 1, tuple(range(8)), 1).transpose(1, 2).reshape(n, 32)
    q = nibbles(b[:, 8:], 1).view(n, 32).bitwise_or_(qh.bitwise_left_shift_(4))
    return q.float().mul_(f16(b, 0)).add_(f16(b, 2))


def _dq_q4_k(b):
    n = b.shape[0]
    sc, mn = k_scales(b[:, 4:16])
    d, dm = f16(b, 0).unsqueeze(-1) * sc, f16(b, 2).unsqueeze(-1) * mn    # [n, 8, 1]
    return nibbles(b[:, 16:], 4).float().mul_(d).sub_(dm).view(n, 256)


def _dq_q5_k(b):
    n = b.shape[0]
    sc, mn = k_scales(b[:, 4:16])
    d, dm = f16(b, 0).unsqueeze(-1) * sc, f16(b, 2).unsqueeze(-1) * mn
    qh = bits(b[:, 16:48], 1, tuple(range(8)), 1)                           # [n, 8, 32]: bit 4 of each q
    q = nibbles(b[:, 48:], 4).bitwise_or_(qh.bitwise_left_shift_(4))
    return q.float().mul_(d).sub_(dm).view(n, 256)


def _dq_q6_k(b):
    n = b.shape[0]
    d = (f16(b, 208) * b[:, 192:208].view(torch.int8).float()).view(n, 16, 1)
    ql = nibbles(b[:, :128], 2).view(n, 8, 32)
    qh = bits(b[:, 128:192], 2, (0, 2, 4, 6), 3).view(n, 8, 32)
    q = ql.bitwise_or_(qh.bitwise_left_shift_(4)).view(torch.int8).float().sub_(32)
    return q.view(n, 16, 16).mul_(d).view(n, 256)


def _dq_q3_k(b):
    n = b.shape[0]
    sc = b[:, 96:108]
    lo = nibbles(sc[:, :8], 1).view(n, 16)                              # scale i: low 4 bits
    hi = bits(sc[:, 8:12], 1, (0, 2, 4, 6), 3).view(n, 16)              # scale i: bits 4-5 from byte 8 + i % 4
    d = f16(b, 108) * (lo.bitwise_or_(hi.bitwise_left_shift_(4)).float().sub_(32))    # [n, 16]
    q = bits(b[:, 32:96], 2, (0, 2, 4, 6), 3).view(n, 8, 32)            # value 128h + 32j + l
    hm = bits(b[:, :32], 1, tuple(range(8)), 1).view(n, 8, 32)          # bit 4h + j of hmask[l]
    q = q.view(torch.int8).float().sub_(hm.float().neg_().add_(1).mul_(4))   # - 4 where the bit is clear
    return q.view(n, 16, 16).mul_(d.unsqueeze(-1)).view(n, 256)


def _dq_q2_k(b):
    n = b.shape[0]
    sc = b[:, :16]
    d = f16(b, 80) * (sc & 15).float()                                  # [n, 16]: scale and offset per 16 values
    m = f16(b, 82) * (sc >> 4).float()
    q = bits(b[:, 16:80], 2, (0, 2, 4, 6), 3).view(n, 16, 16).float()  # value 128h + 32j + l
    return q.mul_(d.unsqueeze(-1)).sub_(m.unsqueeze(-1)).view(n, 256)


IQ4_NL = torch.tensor([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                      dtype=torch.float32)


def _dq_iq4_xs(b):
    n = b.shape[0]
    sh = b[:, 2:4].contiguous().view(torch.int16).int() & 0xFFFF                  # [n, 1]
    lo = nibbles(b[:, 4:8], 1).view(n, 2, 4).transpose(1, 2).reshape(n, 8)        # scale s: nibble s % 2 of byte s // 2
    hi = (sh >> torch.arange(0, 16, 2)) & 3                                        # bits 4-5 of scale s
    d = f16(b, 0) * (lo.int() | (hi << 4)).sub_(32).float()                        # [n, 8]
    q = IQ4_NL[nibbles(b[:, 8:], 8).view(n, 8, 32).long()]                        # sub-block s: 16 low, 16 high
    return q.mul_(d.unsqueeze(-1)).view(n, 256)


def _dq_iq4_nl(b):
    q = IQ4_NL[nibbles(b[:, 2:], 1).view(b.shape[0], 32).long()]                  # 16 low nibbles, 16 high
    return q.mul_(f16(b, 0))


# MXFP4 (OCP microscaling FP4): E2M1 values doubled, and half the block's E8M0 power of two as the scale
MXFP4 = torch.tensor([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=torch.float32)


def _dq_mxfp4(b):
    e = b[:, :1].int()
    bits = torch.where(e < 2, 0x00200000 << e, (e - 1) << 23)                    # 2^(e - 128), subnormal below 2
    q = MXFP4[nibbles(b[:, 1:], 1).view(b.shape[0], 32).long()]                   # 16 low nibbles, 16 high
    return q.mul_(bits.view(torch.float32))


def _dq_f16(b):
    return b.contiguous().view(torch.float16).float()


def _dq_bf16(b):
    return b.contiguous().view(torch.bfloat16).float()


# type name -> (elements per block, bytes per block, dequantizer of [n_blocks, bytes] uint8 -> [n_blocks, elems]).
# F16 / BF16 matrices are served in place the same way, as "blocks" of 32 values with no scale.
QUANTS = {
    "Q8_0": (32, 34, _dq_q8_0), "Q4_0": (32, 18, _dq_q4_0), "Q4_1": (32, 20, _dq_q4_1),
    "Q5_0": (32, 22, _dq_q5_0), "Q5_1": (32, 24, _dq_q5_1),
    "Q4_K": (256, 144, _dq_q4_k), "Q5_K": (256, 176, _dq_q5_k), "Q6_K": (256, 210, _dq_q6_k),
    "Q3_K": (256, 110, _dq_q3_k), "IQ4_XS": (256, 136, _dq_iq4_xs), "Q2_K": (256, 84, _dq_q2_k),
    "F16": (32, 64, _dq_f16), "BF16": (32, 64, _dq_bf16), "IQ4_NL": (32, 18, _dq_iq4_nl),
    "MXFP4": (32, 17, _dq_mxfp4),
    **gguf_iq.QUANTS,
}
SUPPORTED_GGML_TYPES = ("F32", *QUANTS)


def dequantize(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw GGUF tensor bytes (any numpy dtype/shape) -> float32 tensor of `shape` (row-major, HF order)."""
    data = torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8).reshape(-1).copy())
    if type_name == "F32":
        out = data.view(torch.float32)
    elif type_name == "F16":
        out = data.view(torch.float16).float()
    elif type_name == "BF16":
        out = data.view(torch.bfloat16).float()
    elif type_name in QUANTS:
        _, type_size, fn = QUANTS[type_name]
        out = fn(data.view(-1, type_size))
    else:
        raise NotImplementedError(
            f"GGUF tensor type {type_name} is not supported; supported: {', '.join(SUPPORTED_GGML_TYPES)}")
    return out.reshape(shape)
