"""GGUF block types repacked in groups of 8 rows: the int8 kernels' layouts (csrc/cpu/gguf_*x8.cpp), the same bytes
in another order and never larger than the file's. These are the torch reference of the layouts (the tests' oracle
and the repack where no kernel is built): each function maps a [N, row_bytes] uint8 matrix of N x K weights to
its other layout; gguf_blocks.repack / unpack wrap them for GGUFWeight.
"""
from __future__ import annotations

import torch


# ---- Q4_0 repacked in groups of 8 rows (csrc/cpu/gguf_q4_0x8.cpp says why and how the kernel reads it) ---------
def repack_q4_0x8(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """A Q4_0 [N, K] weight (N a multiple of 8) -> the same bytes in groups of 8 rows: per group and block, the 8
    fp16 scales, then for t = 0..3 each row's 4 quant bytes 4t..4t+3. A new tensor of the file's size."""
    nb = k // 32
    blocks = data.reshape(n // 8, 8, nb, 18)
    scales = blocks[..., :2].permute(0, 2, 1, 3).reshape(n // 8, nb, 16)
    qs = blocks[..., 2:].reshape(n // 8, 8, nb, 4, 4).permute(0, 2, 3, 1, 4).reshape(n // 8, nb, 128)
    return torch.cat([scales, qs], dim=-1).reshape(n, nb * 18)


def unpack_q4_0x8(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """repack_q4_0x8's inverse (the reference dequantizer reads file order)."""
    nb = k // 32
    g = data.reshape(n // 8, nb, 144)
    scales = g[..., :16].reshape(n // 8, nb, 8, 2).permute(0, 2, 1, 3)
    qs = g[..., 16:].reshape(n // 8, nb, 4, 8, 4).permute(0, 3, 1, 2, 4).reshape(n // 8, 8, nb, 16)
    return torch.cat([scales, qs], dim=-1).reshape(n, nb * 18)


# ---- MXFP4 likewise, an exponent byte per row in place of Q4_0's fp16 scale (csrc/cpu/gguf_mxfp4x8.cpp) ---------
def repack_mxfp4x8(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """An MXFP4 [N, K] weight -> groups of 8 rows: per group and block, the 8 exponent bytes, then for t = 0..3
    each row's 4 index bytes 4t..4t+3."""
    nb = k // 32
    blocks = data.reshape(n // 8, 8, nb, 17)
    exps = blocks[..., 0].transpose(1, 2)
    qs = blocks[..., 1:].reshape(n // 8, 8, nb, 4, 4).permute(0, 2, 3, 1, 4).reshape(n // 8, nb, 128)
    return torch.cat([exps, qs], dim=-1).reshape(n, nb * 17)


def unpack_mxfp4x8(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    nb = k // 32
    g = data.reshape(n // 8, nb, 136)
    exps = g[..., :8].transpose(1, 2).unsqueeze(-1)
    qs = g[..., 8:].reshape(n // 8, nb, 4, 8, 4).permute(0, 3, 1, 2, 4).reshape(n // 8, 8, nb, 16)
    return torch.cat([exps, qs], dim=-1).reshape(n, nb * 17)


# ---- Q8_0 likewise, 8 chunks of 4 values per block (csrc/cpu/gguf_q8_0x8.cpp) ------------------------------------
def repack_q8_0x8(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """A Q8_0 [N, K] weight -> groups of 8 rows: per group and block, the 8 fp16 scales, then for t = 0..7 each
    row's 4 quant bytes 4t..4t+3."""
    nb = k // 32
    blocks = data.reshape(n // 8, 8, nb, 34)
    scales = blocks[..., :2].permute(0, 2, 1, 3).reshape(n // 8, nb, 16)
    qs = blocks[..., 2:].reshape(n // 8, 8, nb, 8, 4).permute(0, 2, 3, 1, 4).reshape(n // 8, nb, 256)
    return torch.cat([scales, qs], dim=-1).reshape(n, nb * 34)


def unpack_q8_0x8(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    nb = k // 32
    g = data.reshape(n // 8, nb, 272)
    scales = g[..., :16].reshape(n // 8, nb, 8, 2).permute(0, 2, 1, 3)
    qs = g[..., 16:].reshape(n // 8, nb, 8, 8, 4).permute(0, 3, 1, 2, 4).reshape(n // 8, 8, nb, 32)
    return torch.cat([scales, qs], dim=-1).reshape(n, nb * 34)


# ---- Q4_K likewise (csrc/cpu/gguf_q4_kx8.cpp) ----------------------------------------------------------------
def repack_q4_kx8(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """A Q4_K [N, K] weight -> groups of 8 rows: per group and super-block, the 8 d, the 8 dmin, the 8 x 12 scale
    bytes as 3 words x 8 rows (word k of every row together), then for sub-block pair j and t = 0..7 each row's
    quant bytes 32j+4t..32j+4t+3."""
    nb = k // 256
    blocks = data.reshape(n // 8, 8, nb, 144).permute(0, 2, 1, 3)          # [group, block, row, bytes]
    qs = blocks[..., 16:].reshape(n // 8, nb, 8, 32, 4).permute(0, 1, 3, 2, 4)  # [group, block, j*8+t, row, 4]
    scales = blocks[..., 4:16].reshape(n // 8, nb, 8, 3, 4).transpose(2, 3)        # [group, block, word, row, 4]
    out = torch.cat([blocks[..., 0:2].reshape(n // 8, nb, 16), blocks[..., 2:4].reshape(n // 8, nb, 16),
                     scales.reshape(n // 8, nb, 96), qs.reshape(n // 8, nb, 1024)], dim=-1)
    return out.reshape(n, nb * 144)


def unpack_q4_kx8(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    nb = k // 256
    g = data.reshape(n // 8, nb, 1152)
    d, dmin = g[..., 0:16].reshape(n // 8, nb, 8, 2), g[..., 16:32].reshape(n // 8, nb, 8, 2)
    sc = g[..., 32:128].reshape(n // 8, nb, 3, 8, 4).transpose(2, 3).reshape(n // 8, nb, 8, 12)
    qs = g[..., 128:].reshape(n // 8, nb, 32, 8, 4).permute(0, 1, 3, 2, 4).reshape(n // 8, nb, 8, 128)
    rows = torch.cat([d, dmin, sc, qs], dim=-1).permute(0, 2, 1, 3)            # [group, row, block, 144]
    return rows.reshape(n, nb * 144)


# ---- Q5_K: Q4_Kx8's layout, then the fifth bits per sub-block as [row][4 bytes] (csrc/cpu/gguf_q4_kx8.cpp) -------
def repack_q5_kx8(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """A Q5_K [N, K] weight -> groups of 8 rows: per group and super-block, Q4_Kx8's 1152 bytes (d, dmin, scales,
    quant nibbles), then per sub-block s each row's 4 bytes with bit t of byte k the fifth bit of value 4t+k."""
    nb = k // 256
    blocks = data.reshape(n // 8, 8, nb, 176)
    q4 = torch.cat([blocks[..., :16], blocks[..., 48:]], dim=-1).reshape(n, nb * 144)
    qh = blocks[..., 16:48].permute(0, 2, 1, 3).reshape(n // 8, nb, 8, 8, 4).int()    # [group, block, row, t, k]
    bits = (qh.unsqueeze(-1) >> torch.arange(8)) & 1                                  # [.., row, t, k, s]
    hb = (bits << torch.arange(8).view(8, 1, 1)).sum(-3).permute(0, 1, 4, 2, 3)       # [.., s, row, k]
    out = torch.cat([repack_q4_kx8(q4, n, k).reshape(n // 8, nb, 1152),
                     hb.reshape(n // 8, nb, 256).to(torch.uint8)], dim=-1)
    return out.reshape(n, nb * 176)


def unpack_q5_kx8(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    nb = k // 256
    g = data.reshape(n // 8, nb, 1408)
    q4 = unpack_q4_kx8(g[..., :1152].reshape(n, nb * 1152 // 8), n, k).reshape(n // 8, 8, nb, 144)
    hb = g[..., 1152:].reshape(n // 8, nb, 8, 8, 4).int()                             # [group, block, s, row, k]
    bits = (hb.unsqueeze(-2) >> torch.arange(8).view(8, 1)) & 1                       # [.., s, row, t, k]
    qh = (bits << torch.arange(8).view(8, 1, 1, 1)).sum(2)                            # [group, block, row, t, k]
    qh = qh.permute(0, 2, 1, 3, 4).reshape(n // 8, 8, nb, 32).to(torch.uint8)
    return torch.cat([q4[..., :16], qh, q4[..., 16:]], dim=-1).reshape(n, nb * 176)


# ---- Q6_K likewise, the bits rearranged (csrc/cpu/gguf_q6_kx8.cpp) --------------------------------------------
def _q6_values(qlqh: torch.Tensor) -> torch.Tensor:
    """Q6_K's ql / qh bytes [..., 192] -> the 256 stored 6-bit values [..., 256] (uint8, 0..63), in order."""
    ql = qlqh[..., :128].reshape(*qlqh.shape[:-1], 2, 2, 32)            # [.., 128-half, ql half, l]
    qh = qlqh[..., 128:].reshape(*qlqh.shape[:-1], 2, 1, 32)
    lo = torch.cat([ql & 15, ql >> 4], dim=-2)                          # quarters 0, 1 (low nibbles), 2, 3
    hi = torch.cat([(qh >> (2 * q)) & 3 for q in range(4)], dim=-2)
    return (lo | (hi << 4)).reshape(*qlqh.shape[:-1], 256)


def _q6_file(v: torch.Tensor) -> torch.Tensor:
    """_q6_values' inverse: [..., 256] values -> [..., 192] ql / qh bytes."""
    q = v.reshape(*v.shape[:-1], 2, 4, 32)
    ql = (q[..., :2, :] & 15) | ((q[..., 2:, :] & 15) << 4)
    qh = sum((q[..., i, :] >> 4) << (2 * i) for i in range(4)).to(torch.uint8)
    return torch.cat([ql.reshape(*v.shape[:-1], 128), qh.reshape(*v.shape[:-1], 64)], dim=-1)


def repack_q6_kx8(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """A Q6_K [N, K] weight -> groups of 8 rows: per group and super-block, the 8 d, the 16 scales as [scale][row],
    then per 16-value half three chunks of [row][4 bytes]: byte k of chunk j is value 4j+k (bits 0-5) and bits 2j,
    2j+1 of value 12+k (bits 6-7)."""
    nb = k // 256
    blocks = data.reshape(n // 8, 8, nb, 210).permute(0, 2, 1, 3)          # [group, block, row, bytes]
    v = _q6_values(blocks[..., :192]).reshape(n // 8, nb, 8, 16, 16)         # [.., row, half, value]
    top = v[..., 12:]
    chunks = v[..., :12].reshape(n // 8, nb, 8, 16, 3, 4) | torch.stack(
        [((top >> (2 * j)) & 3) << 6 for j in range(3)], dim=-2)             # [.., row, half, j, k]
    out = torch.cat([blocks[..., 208:210].reshape(n // 8, nb, 16),
                     blocks[..., 192:208].transpose(2, 3).reshape(n // 8, nb, 128),
                     chunks.permute(0, 1, 3, 4, 2, 5).reshape(n // 8, nb, 1536)], dim=-1)
    return out.reshape(n, nb * 210)


def unpack_q6_kx8(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    nb = k // 256
    g = data.reshape(n // 8, nb, 1680)
    d = g[..., :16].reshape(n // 8, nb, 8, 2)
    sc = g[..., 16:144].reshape(n // 8, nb, 16, 8).transpose(2, 3)
    chunks = g[..., 144:].reshape(n // 8, nb, 16, 3, 8, 4).permute(0, 1, 4, 2, 3, 5)   # [.., row, half, j, k]
    top = sum((chunks[..., j, :] >> 6) << (2 * j) for j in range(3)).to(torch.uint8)
    v = torch.cat([(chunks & 63).reshape(n // 8, nb, 8, 16, 12), top], dim=-1).reshape(n // 8, nb, 8, 256)
    rows = torch.cat([_q6_file(v), sc, d], dim=-1).permute(0, 2, 1, 3)
    return rows.reshape(n, nb * 210)


# ---- Q5_0 likewise (csrc/cpu/gguf_q5_0x8.cpp) ----------------------------------------------------------------
def repack_q5_0x8(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """A Q5_0 [N, K] weight -> groups of 8 rows: per group and block, the 8 fp16 scales, the 8 32-bit high-bit
    words, then for t = 0..3 each row's 4 quant bytes 4t..4t+3."""
    nb = k // 32
    blocks = data.reshape(n // 8, 8, nb, 22).permute(0, 2, 1, 3)            # [group, block, row, bytes]
    qs = blocks[..., 6:].reshape(n // 8, nb, 8, 4, 4).transpose(2, 3)
    out = torch.cat([blocks[..., :2].reshape(n // 8, nb, 16), blocks[..., 2:6].reshape(n // 8, nb, 32),
                     qs.reshape(n // 8, nb, 128)], dim=-1)
    return out.reshape(n, nb * 22)


def unpack_q5_0x8(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    nb = k // 32
    g = data.reshape(n // 8, nb, 176)
    d, qh = g[..., :16].reshape(n // 8, nb, 8, 2), g[..., 16:48].reshape(n // 8, nb, 8, 4)
    qs = g[..., 48:].reshape(n // 8, nb, 4, 8, 4).transpose(2, 3).reshape(n // 8, nb, 8, 16)
    rows = torch.cat([d, qh, qs], dim=-1).permute(0, 2, 1, 3)
    return rows.reshape(n, nb * 22)


# ---- Q5_1: Q5_0's layout with the 8 rows' fp16 minimums after their scales (csrc/cpu/gguf_q5_0x8.cpp) -------------
def repack_q5_1x8(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """A Q5_1 [N, K] weight -> groups of 8 rows: per group and block, the 8 fp16 scales, the 8 fp16 minimums, the 8
    32-bit high-bit words, then for t = 0..3 each row's 4 quant bytes 4t..4t+3."""
    nb = k // 32
    blocks = data.reshape(n // 8, 8, nb, 24).permute(0, 2, 1, 3)            # [group, block, row, bytes]
    qs = blocks[..., 8:].reshape(n // 8, nb, 8, 4, 4).transpose(2, 3)
    out = torch.cat([blocks[..., :2].reshape(n // 8, nb, 16), blocks[..., 2:4].reshape(n // 8, nb, 16),
                     blocks[..., 4:8].reshape(n // 8, nb, 32), qs.reshape(n // 8, nb, 128)], dim=-1)
    return out.reshape(n, nb * 24)


def unpack_q5_1x8(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    nb = k // 32
    g = data.reshape(n // 8, nb, 192)
    d, m = g[..., :16].reshape(n // 8, nb, 8, 2), g[..., 16:32].reshape(n // 8, nb, 8, 2)
    qh = g[..., 32:64].reshape(n // 8, nb, 8, 4)
    qs = g[..., 64:].reshape(n // 8, nb, 4, 8, 4).transpose(2, 3).reshape(n // 8, nb, 8, 16)
    rows = torch.cat([d, m, qh, qs], dim=-1).permute(0, 2, 1, 3)
    return rows.reshape(n, nb * 24)


# ---- Q4_1: Q4_0's layout with the 8 rows' fp16 minimums after their scales (csrc/cpu/gguf_q4_0x8.cpp) -------------
def repack_q4_1x8(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """A Q4_1 [N, K] weight -> groups of 8 rows: per group and block, the 8 fp16 scales, the 8 fp16 minimums,
    then for t = 0..3 each row's 4 quant bytes 4t..4t+3."""
    nb = k // 32
    blocks = data.reshape(n // 8, 8, nb, 20).permute(0, 2, 1, 3)            # [group, block, row, bytes]
    qs = blocks[..., 4:].reshape(n // 8, nb, 8, 4, 4).transpose(2, 3)
    out = torch.cat([blocks[..., :2].reshape(n // 8, nb, 16), blocks[..., 2:4].reshape(n // 8, nb, 16),
                     qs.reshape(n // 8, nb, 128)], dim=-1)
    return out.reshape(n, nb * 20)


def unpack_q4_1x8(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    nb = k // 32
    g = data.reshape(n // 8, nb, 160)
    d, m = g[..., :16].reshape(n // 8, nb, 8, 2), g[..., 16:32].reshape(n // 8, nb, 8, 2)
    qs = g[..., 32:].reshape(n // 8, nb, 4, 8, 4).transpose(2, 3).reshape(n // 8, nb, 8, 16)
    rows = torch.cat([d, m, qs], dim=-1).permute(0, 2, 1, 3)
    return rows.reshape(n, nb * 20)


# ---- Q3_K: the planes rearranged per 32-value sub-block (csrc/cpu/gguf_q3_kx8.cpp) ---------------------------
def _q3_values(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q3_K blocks [..., 110] -> (stored values u = low | third << 2 [..., 256] in order, raw 6-bit scales
    [..., 16])."""
    b = blocks.int()
    qs = b[..., 32:96].reshape(*b.shape[:-1], 2, 1, 32)                       # [.., h, 1, l]
    low = (qs >> (2 * torch.arange(4).view(4, 1))) & 3                        # [.., h, j, l]
    third = (b[..., None, :32] >> torch.arange(8).view(8, 1)) & 1             # [.., 4h + j, l]
    u = (low.reshape(*b.shape[:-1], 256) | (third.reshape(*b.shape[:-1], 256) << 2))
    sc = b[..., 96:108]
    lo = torch.cat([sc[..., :8] & 15, sc[..., :8] >> 4], dim=-1)              # scale i: low 4 bits
    hi = (sc[..., None, 8:12] >> (2 * torch.arange(4).view(4, 1))) & 3       # [.., i // 4, i % 4]
    return u, lo | (hi.reshape(*b.shape[:-1], 16) << 4)


def repack_q3_kx8(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """A Q3_K [N, K] weight -> groups of 8 rows: per group and super-block, the 8 d, then per 32-value sub-block s
    its two scales of the 8 rows in 12 bytes (byte c: low 4 bits of row c's scale 2s | those of 2s+1 << 4; then a
    32-bit word with row c's top 2 bits of scale 2s at bits 2c, of 2s+1 at 16+2c), then per sub-block 96 bytes:
    for its halves A, B [row][4 bytes] with the low 2 bits of value 4j+k of the half at bits 2j of byte k, and
    [row][4 bytes] with the third bit of A's value 4j+k at bit j, of B's at bit 4+j."""
    nb = k // 256
    blocks = data.reshape(n // 8, 8, nb, 110).permute(0, 2, 1, 3)             # [group, block, row, bytes]
    u, s6 = _q3_values(blocks)
    s6 = s6.reshape(n // 8, nb, 8, 8, 2).transpose(2, 3)                     # [.., s, row, half]
    scale_lo = (s6[..., 0] & 15) | ((s6[..., 1] & 15) << 4)                 # [.., s, row]
    top = (s6 >> 4).transpose(-1, -2).reshape(n // 8, nb, 8, 2, 2, 4)        # [.., s, half, row // 4, row % 4]
    top = (top << (2 * torch.arange(4))).sum(-1)                            # [.., s, 4 bytes]
    uq = u.reshape(n // 8, nb, 8, 8, 2, 4, 4)                                 # [.., row, s, half, j, k]
    shift = 2 * torch.arange(4).view(4, 1)
    low = ((uq & 3) << shift).sum(-2).permute(0, 1, 3, 4, 2, 5)              # [.., s, half, row, k]
    third = (((uq >> 2) & 1) << (torch.arange(2).view(2, 1, 1) * 4 + torch.arange(4).view(4, 1))).sum((-3, -2))
    q = torch.cat([low.reshape(n // 8, nb, 8, 64), third.permute(0, 1, 3, 2, 4).reshape(n // 8, nb, 8, 32)], -1)
    out = torch.cat([blocks[..., 108:110].reshape(n // 8, nb, 16),
                     torch.cat([scale_lo, top.reshape(n // 8, nb, 8, 4)], -1).reshape(n // 8, nb, 96).to(torch.uint8),
                     q.reshape(n // 8, nb, 768).to(torch.uint8)], dim=-1)
    return out.reshape(n, nb * 110)


def unpack_q3_kx8(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    nb = k // 256
    g = data.reshape(n // 8, nb, 880).int()
    d = g[..., :16].reshape(n // 8, nb, 8, 2)
    sc = g[..., 16:112].reshape(n // 8, nb, 8, 12)                           # [.., s, 12]
    # [.., s, half, row // 4, row % 4]
    top = (sc[..., 8:12].reshape(n // 8, nb, 8, 2, 2, 1) >> (2 * torch.arange(4))) & 3
    lo = torch.stack([sc[..., :8] & 15, sc[..., :8] >> 4], dim=-2)           # [.., s, half, row]
    s6 = (lo | (top.reshape(n // 8, nb, 8, 2, 8) << 4)).permute(0, 1, 4, 2, 3).reshape(n // 8, nb, 8, 16)
    q = g[..., 112:].reshape(n // 8, nb, 8, 3, 8, 4)                        # [.., s, chunk, row, k]
    lowj = torch.stack([(q[..., :2, :, :] >> (2 * j)) & 3 for j in range(4)], dim=4)   # [.., s, half, j, row, k]
    thj = torch.stack([torch.stack([(q[..., 2, :, :] >> (4 * h + j)) & 1 for j in range(4)], dim=3)
                       for h in range(2)], dim=3)                            # [.., s, half, j, row, k]
    u = (lowj | (thj << 2)).permute(0, 1, 5, 2, 3, 4, 6).reshape(n // 8, nb, 8, 256)
    uv = u.reshape(n // 8, nb, 8, 2, 4, 32)                                  # value 128h + 32j + l
    qs = ((uv & 3) << (2 * torch.arange(4).view(4, 1))).sum(-2)             # [.., h, l]
    hmask = ((uv >> 2) << torch.arange(8).view(2, 4, 1)).sum((-3, -2))       # [.., l]
    scales = torch.cat([(s6[..., :8] & 15) | ((s6[..., 8:] & 15) << 4),
                        ((s6 >> 4).reshape(n // 8, nb, 8, 4, 4) << (2 * torch.arange(4).view(4, 1))).sum(-2)], -1)
    rows = torch.cat([hmask, qs.reshape(n // 8, nb, 8, 64), scales, d], dim=-1).permute(0, 2, 1, 3)
    return rows.to(torch.uint8).reshape(n, nb * 110)


# ---- Q2_K: scales as [half][row], per 16-value half [row][4 bytes] of 2-bit values (csrc/cpu/gguf_q2_kx8.cpp) -----
def repack_q2_kx8(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """A Q2_K [N, K] weight -> groups of 8 rows: per group and super-block, the 8 d, the 8 dmin, the 16 scale
    bytes as [half][row], then per 16-value half [row][4 bytes] with value 4j+k of the half at bits 2j of byte k."""
    nb = k // 256
    blocks = data.reshape(n // 8, 8, nb, 84).permute(0, 2, 1, 3)              # [group, block, row, bytes]
    qs = blocks[..., 16:80].reshape(n // 8, nb, 8, 2, 1, 32)
    v = ((qs >> (2 * torch.arange(4).view(4, 1))) & 3).reshape(n // 8, nb, 8, 16, 4, 4)   # [.., row, half, j, k]
    q = (v.int() << (2 * torch.arange(4).view(4, 1))).sum(-2).transpose(2, 3)   # [.., half, row, k]
    out = torch.cat([blocks[..., 80:82].reshape(n // 8, nb, 16), blocks[..., 82:84].reshape(n // 8, nb, 16),
                     blocks[..., :16].transpose(2, 3).reshape(n // 8, nb, 128),
                     q.reshape(n // 8, nb, 512).to(torch.uint8)], dim=-1)
    return out.reshape(n, nb * 84)


def unpack_q2_kx8(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    nb = k // 256
    g = data.reshape(n // 8, nb, 672)
    d, dmin = g[..., :16].reshape(n // 8, nb, 8, 2), g[..., 16:32].reshape(n // 8, nb, 8, 2)
    sc = g[..., 32:160].reshape(n // 8, nb, 16, 8).transpose(2, 3)
    chunks = g[..., 160:].reshape(n // 8, nb, 16, 8, 1, 4).transpose(2, 3)    # [.., row, half, 1, k]
    v = ((chunks >> (2 * torch.arange(4).view(4, 1))) & 3).reshape(n // 8, nb, 8, 2, 4, 32)   # value 128h + 32j + l
    qs = (v.int() << (2 * torch.arange(4).view(4, 1))).sum(-2).reshape(n // 8, nb, 8, 64)
    rows = torch.cat([sc, qs.to(torch.uint8), d, dmin], dim=-1).permute(0, 2, 1, 3)
    return rows.reshape(n, nb * 84)


# ---- IQ4_XS: Q4_0x8's interleave per sub-block, the scales split by bits (csrc/cpu/gguf_iq4_xsx8.cpp) ------------
def repack_iq4_xsx8(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """An IQ4_XS [N, K] weight -> groups of 8 rows: per group and super-block, the 8 d, the 8 rows' scales_l bytes
    as [byte][row], per sub-block s a 16-bit word with row c's top 2 scale bits at bits 2c, then per sub-block and
    t = 0..3 each row's 4 index bytes 16s+4t..16s+4t+3."""
    nb = k // 256
    blocks = data.reshape(n // 8, 8, nb, 136).permute(0, 2, 1, 3)             # [group, block, row, bytes]
    sh = blocks[..., 2].int() | (blocks[..., 3].int() << 8)                    # [.., row]
    top = (sh.unsqueeze(-1) >> (2 * torch.arange(8))) & 3                     # [.., row, s]
    words = (top << (2 * torch.arange(8).view(8, 1))).sum(-2)                 # [.., s]
    words = torch.stack([words & 255, words >> 8], dim=-1).to(torch.uint8)
    qs = blocks[..., 8:].reshape(n // 8, nb, 8, 8, 4, 4).permute(0, 1, 3, 4, 2, 5)   # [.., s, t, row, 4]
    out = torch.cat([blocks[..., :2].reshape(n // 8, nb, 16), blocks[..., 4:8].transpose(2, 3).reshape(n // 8, nb, 32),
                     words.reshape(n // 8, nb, 16), qs.reshape(n // 8, nb, 1024)], dim=-1)
    return out.reshape(n, nb * 136)


def unpack_iq4_xsx8(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    nb = k // 256
    g = data.reshape(n // 8, nb, 1088)
    d = g[..., :16].reshape(n // 8, nb, 8, 2)
    sl = g[..., 16:48].reshape(n // 8, nb, 4, 8).transpose(2, 3)              # [.., row, 4]
    words = g[..., 48:64].reshape(n // 8, nb, 8, 2).int()
    words = words[..., 0] | (words[..., 1] << 8)                              # [.., s]
    top = (words.unsqueeze(-2) >> (2 * torch.arange(8).view(8, 1))) & 3       # [.., row, s]
    sh = (top << (2 * torch.arange(8))).sum(-1)                               # [.., row]
    sh = torch.stack([sh & 255, sh >> 8], dim=-1).to(torch.uint8)
    qs = g[..., 64:].reshape(n // 8, nb, 8, 4, 8, 4).permute(0, 1, 4, 2, 3, 5).reshape(n // 8, nb, 8, 128)
    rows = torch.cat([d, sh, sl, qs], dim=-1).permute(0, 2, 1, 3)
    return rows.reshape(n, nb * 136)


REPACK = {"Q4_0": repack_q4_0x8, "Q4_K": repack_q4_kx8, "Q6_K": repack_q6_kx8, "Q5_0": repack_q5_0x8,
          "Q4_1": repack_q4_1x8, "Q3_K": repack_q3_kx8,
          "Q2_K": repack_q2_kx8, "IQ4_XS": repack_iq4_xsx8, "Q5_K": repack_q5_kx8,
          "Q8_0": repack_q8_0x8, "Q5_1": repack_q5_1x8, "MXFP4": repack_mxfp4x8,
          "IQ4_NL": repack_q4_0x8}     # IQ4_NL's block is Q4_0's bytes (fp16 d, 16 index bytes): the same layout
UNPACK = {"Q4_0x8": unpack_q4_0x8, "Q4_Kx8": unpack_q4_kx8, "Q6_Kx8": unpack_q6_kx8, "Q5_0x8": unpack_q5_0x8,
          "Q4_1x8": unpack_q4_1x8, "Q3_Kx8": unpack_q3_kx8,
          "Q2_Kx8": unpack_q2_kx8, "IQ4_XSx8": unpack_iq4_xsx8, "Q5_Kx8": unpack_q5_kx8,
          "Q8_0x8": unpack_q8_0x8, "Q5_1x8": unpack_q5_1x8, "MXFP4x8": unpack_mxfp4x8,
          "IQ4_NLx8": unpack_q4_0x8}
