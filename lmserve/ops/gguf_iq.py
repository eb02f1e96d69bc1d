"""The grid types of llama.cpp's "i-quants": IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS and IQ3_S, what
IQ1_S / IQ1_M / IQ2_XXS / IQ2_XS / IQ2_S / IQ2_M / IQ3_XXS / IQ3_S / IQ3_M files hold for most of their matrices
(the rest Q2_K, Q4_K, Q6_K, IQ4_XS...).

Each value is one entry of a fixed grid of magnitudes (8 values per entry for IQ2, 4 for IQ3) with a sign bit per
value (IQ2_XXS / IQ2_XS / IQ3_XXS store 7 of every 8 signs: the eighth makes their count even) and a scale per 32
values (IQ2_XS, IQ2_S: per 16). So every one has the form the kernels compute with (csrc/cpu/gguf_blocks.h):
signed int8 values q = grid * sign and a float scale, w = q * scale. The grids are gguf-py's (the format's data, as
llama.cpp ships them); the C++ kernels hold the same tables in csrc/cpu/gguf_iq1_grids.h, gguf_iq2_grids.h and
gguf_iq3_grids.h, which tools/gen_iq_grids.py writes from these.

IQ1_S / IQ1_M (1.56 / 1.75 bits per weight) have no signs: their grid holds -1, 0, 1, and each group of 8 (IQ1_M;
IQ1_S: 32) values adds an offset of +-1/8, w = d (2 ls + 1) (grid +- 1/8). Times 8 that is an integer, so they
take the same form: q = 8 grid +- 1 (one of -9, -7, -1, 1, 7, 9) and scale = d (2 ls + 1) / 8, exact products.

The dequantizers below are the torch reference (layouts: gguf-py quants.py, llama.cpp ggml-quants.c); each
computes float(q) * scale, which equals gguf-py's (scale * grid) * sign bit for bit.
"""
from __future__ import annotations

import functools

import numpy as np
import torch


@functools.cache
def grid(name: str) -> torch.Tensor:
    """int8 [entries, values per entry]: the grid of IQ type `name`."""
    from gguf import quants
    cls = getattr(quants, name)
    cls.init_grid()
    return torch.from_numpy(np.asarray(cls.grid).reshape(cls.grid_shape).astype(np.int8))


@functools.cache
def ksigns() -> torch.Tensor:
    """uint8 [128]: 7 sign bits -> 8 (the eighth sets the parity even), as IQ2_XXS / IQ2_XS / IQ3_XXS store them."""
    i = torch.arange(128)
    parity = torch.zeros_like(i)
    for b in range(7):
        parity ^= (i >> b) & 1
    return (i | (parity << 7)).to(torch.uint8)


def _f16(b: torch.Tensor) -> torch.Tensor:
    return b[:, 0:2].contiguous().view(torch.float16).float()          # [n, 1]


def _u32(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.int32).long() & 0xFFFFFFFF


def _sign_bits(byte: torch.Tensor) -> torch.Tensor:
    """uint8 [...] -> float [..., 8]: -1 where bit j is set, else 1."""
    bit = (byte.long().unsqueeze(-1) >> torch.arange(8)) & 1
    return 1.0 - 2.0 * bit.float()


def _scales_per_16(d: torch.Tensor, sc: torch.Tensor) -> torch.Tensor:
    """IQ2_XS / IQ2_S: 8 bytes of two 4-bit scales (values 0-15, 16-31 of sub-block s) -> [n, 16]."""
    ls = torch.stack([sc & 15, sc >> 4], dim=-1).reshape(sc.shape[0], 16).float()
    return d * (ls + 0.5) * 0.25


def _dq_iq2_xxs(b):   # d; per 32 values: 4 grid indices (bytes), then 4 x 7 sign bits and a 4-bit scale (u32)
    n = b.shape[0]
    words = b[:, 2:66].reshape(n, 8, 8)
    aux = _u32(words[:, :, 4:8]).view(n, 8)
    db = _f16(b) * ((aux >> 28).float() + 0.5) * 0.25                               # [n, 8]
    s = ksigns()[(aux.unsqueeze(-1) >> torch.tensor([0, 7, 14, 21])) & 127]         # [n, 8, 4]
    q = grid("IQ2_XXS")[words[:, :, 0:4].long()].float() * _sign_bits(s)           # [n, 8, 4, 8]
    return q.view(n, 8, 32).mul_(db.unsqueeze(-1)).view(n, 256)


def _dq_iq2_xs(b):    # d; per 8 values a u16: 9-bit grid index, 7 sign bits; 8 bytes of scales (one per 16)
    n = b.shape[0]
    qs = b[:, 2:66].contiguous().view(torch.int16).long() & 0xFFFF                 # [n, 32]
    db = _scales_per_16(_f16(b), b[:, 66:74])
    q = grid("IQ2_XS")[qs & 511].float() * _sign_bits(ksigns()[qs >> 9])            # [n, 32, 8]
    return q.view(n, 16, 16).mul_(db.unsqueeze(-1)).view(n, 256)


def _dq_iq2_s(b):     # d qs[32] signs[32] qh[8] scales[8]: index qs | 2 bits of qh << 8, a sign byte per 8 values
    n = b.shape[0]
    qh = (b[:, 66:74].long().unsqueeze(-1) >> torch.tensor([0, 2, 4, 6])) & 3       # [n, 8, 4]
    idx = b[:, 2:34].long() | (qh.view(n, 32) << 8)
    db = _scales_per_16(_f16(b), b[:, 74:82])
    q = grid("IQ2_S")[idx].float() * _sign_bits(b[:, 34:66])                        # [n, 32, 8]
    return q.view(n, 16, 16).mul_(db.unsqueeze(-1)).view(n, 256)


def _dq_iq3_xxs(b):   # d qs[64] (a grid index per 4 values); per 32 values a u32: 4 x 7 sign bits, 4-bit scale
    n = b.shape[0]
    aux = _u32(b[:, 66:98]).view(n, 8)
    db = _f16(b) * ((aux >> 28).float() + 0.5) * 0.5
    s = ksigns()[(aux.unsqueeze(-1) >> torch.tensor([0, 7, 14, 21])) & 127]         # [n, 8, 4]
    q = grid("IQ3_XXS")[b[:, 2:66].long()].float().view(n, 8, 4, 8) * _sign_bits(s)
    return q.view(n, 8, 32).mul_(db.unsqueeze(-1)).view(n, 256)


def _dq_iq3_s(b):     # d qs[64] qh[8] signs[32] scales[4]: index qs | 1 bit of qh << 8, a sign bit per value
    n = b.shape[0]
    qh = (b[:, 66:74].long().unsqueeze(-1) >> torch.arange(8)) & 1                 # [n, 8, 8]
    idx = b[:, 2:66].long() | (qh.view(n, 64) << 8)
    sc = b[:, 106:110]
    ls = torch.stack([sc & 15, sc >> 4], dim=-1).reshape(n, 8).float()
    db = _f16(b) * (ls * 2 + 1)
    q = grid("IQ3_S")[idx].float().view(n, 32, 8) * _sign_bits(b[:, 74:106])
    return q.view(n, 8, 32).mul_(db.unsqueeze(-1)).view(n, 256)


def _iq1_values(idx: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """grid indices [n, G] and their groups' offset signs [n, G] (True: -1/8) -> 8 x (grid + offset) [n, G, 8]"""
    return grid("IQ1_S")[idx].float() * 8 + (1.0 - 2.0 * neg.float()).unsqueeze(-1)


def _dq_iq1_s(b):     # d qs[32] qh[8 u16]: per 32 values a u16: 4 x 3 high index bits, 3-bit scale, offset sign
    n = b.shape[0]
    qh = b[:, 34:50].contiguous().view(torch.int16).long() & 0xFFFF                 # [n, 8]
    hi = (qh.unsqueeze(-1) >> torch.tensor([0, 3, 6, 9])) & 7                       # [n, 8, 4]
    idx = b[:, 2:34].long() | (hi.view(n, 32) << 8)
    neg = ((qh >> 15) & 1).bool().repeat_interleave(4, dim=1)                       # one sign per 4 groups
    db = _f16(b) * (((qh >> 12) & 7) * 2 + 1).float() * 0.125                       # [n, 8]
    return _iq1_values(idx, neg).view(n, 8, 32).mul_(db.unsqueeze(-1)).view(n, 256)


def _iq1_m_d(b: torch.Tensor) -> torch.Tensor:
    """IQ1_M's fp16 d, stored as the top nibbles of its 4 scale words -> float [n, 1]"""
    w = b[:, 48:56].contiguous().view(torch.int16).long() & 0xFFFF                  # [n, 4]
    h = ((w >> 12) << torch.tensor([0, 4, 8, 12])).sum(-1, keepdim=True)
    return h.to(torch.int16).view(torch.float16).float()


def _dq_iq1_m(b):     # qs[32] qh[16] scales[4 u16]: per 8 values a nibble of qh: 3 high index bits, offset sign
    n = b.shape[0]
    nib = torch.stack([b[:, 32:48] & 15, b[:, 32:48] >> 4], dim=-1).view(n, 32).long()
    idx = b[:, 0:32].long() | ((nib & 7) << 8)
    w = b[:, 48:56].contiguous().view(torch.int16).long() & 0xFFFF
    ls = ((w.unsqueeze(-1) >> torch.tensor([0, 3, 6, 9])) & 7).view(n, 16)           # a scale per 16 values
    db = _iq1_m_d(b) * (ls * 2 + 1).float() * 0.125
    return _iq1_values(idx, (nib >> 3).bool()).view(n, 16, 16).mul_(db.unsqueeze(-1)).view(n, 256)


# type name -> (elements per block, bytes per block, dequantizer), as gguf_blocks.QUANTS
QUANTS = {"IQ2_XXS": (256, 66, _dq_iq2_xxs), "IQ2_XS": (256, 74, _dq_iq2_xs), "IQ2_S": (256, 82, _dq_iq2_s),
          "IQ3_XXS": (256, 98, _dq_iq3_xxs), "IQ3_S": (256, 110, _dq_iq3_s),
          "IQ1_S": (256, 50, _dq_iq1_s), "IQ1_M": (256, 56, _dq_iq1_m)}
