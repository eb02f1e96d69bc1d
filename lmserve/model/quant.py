"""GGUF-quantized weights kept quantized, for the CPU matmul kernels in cpu_kernels.py.

Decoding a token at small batch is memory-bound: float32 weights are 4 bytes each, Q4 blocks ~0.6. So besides
the float32 weights (used by MKL for large batches), linear layers of a GGUF model may keep their original
blocks in one of two kernel formats, both with groups of 32 along the input dimension and w = d * q + m:

  "q4": q = uint8 [N, K/32, 16], element j of a group in the low nibble of byte j, element j+16 in the high one
  "q8": q = int8  [N, K/32, 32]

with d, m float32 [N, K/32], or [N, K/16] when each half-group of 16 has its own scale (Q6_K's sub-blocks).
In the non-exact precision modes (bf16 matmuls) on CPUs with AVX512-VNNI, `for_int8_dot()` gives the twin that
csrc/cpu/quant_dot_vnni.cpp multiplies with int8-quantized activations: "q4" unchanged, "q8" as "q8u" (uint8 q + 128,
the unsigned operand vpdpbusd needs).
Q4_0, Q4_1 and Q4_K map to q4; Q5_0, Q5_1, Q8_0, Q5_K and Q6_K to q8; the decomposition reproduces the loader's float32
dequantization bit for bit (tested), so outputs do not depend on which path ran. Other types (e.g. F16) simply
stay on the float32 path.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmserve.model import gguf


@dataclass
class QuantWeight:
    fmt: str              # "q4" | "q8" | "q8u" (q8 as uint8 q + 128, int8-dot kernel only)
    q: torch.Tensor       # see module docstring
    d: torch.Tensor       # [N, K / 32] float32 ([N, K / 16]: a scale per half-group)
    m: torch.Tensor       # like d
    int8_dot: bool = False  # run on quant_matmul_int8 (activations quantized to int8: not exact)
    has_m: bool = True      # False when every m is 0 (Q4_0, Q5_0, Q8_0, Q6_K): the kernel skips that term

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape[0], self.q.shape[1] * 32

    def dequantize(self) -> torch.Tensor:
        n, nb = self.q.shape[:2]
        if self.fmt == "q4":
            q = torch.cat([self.q & 0x0F, self.q >> 4], dim=-1).float()         # [N, nb, 32]
        elif self.fmt == "q8u":
            q = self.q.float() - 128
        else:
            q = self.q.float()
        s = self.d.shape[1] // nb                                               # scales per group: 1 or 2
        q = q.view(n, nb, s, 32 // s)
        return q.mul_(self.d.view(n, nb, s, 1)).add_(self.m.view(n, nb, s, 1)).view(n, nb * 32)

    def row_slice(self, rows) -> "QuantWeight":
        return QuantWeight(self.fmt, self.q[rows], self.d[rows], self.m[rows], self.int8_dot, self.has_m)

    def for_int8_dot(self) -> "QuantWeight":
        """This weight for the int8-activation VNNI kernel (same values; q8 re-biased to uint8)."""
        q = self.q
        if self.fmt == "q8":
            q = q.view(torch.uint8).bitwise_xor(0x80)       # two's complement q + 128 == q XOR 0x80
        return QuantWeight("q4" if self.fmt == "q4" else "q8u", q.contiguous(), self.d, self.m, True,
                           bool(self.m.any()))


def _widen(p: QuantWeight, fmt: str, scales: int) -> QuantWeight:
    """The same weights in a wider layout (q4 -> q8, one -> two scales per group): exact, the kernel computes
    d * q + m on the same float values."""
    q, d, m = p.q, p.d, p.m
    if p.fmt == "q4" and fmt == "q8":
        q = torch.cat([q & 0x0F, q >> 4], dim=-1).to(torch.int8)
    own = d.shape[1] // q.shape[1]
    if own != scales:
        d, m = d.repeat_interleave(scales // own, dim=1), m.repeat_interleave(scales // own, dim=1)
    return QuantWeight(fmt, q, d, m)


def cat_rows(parts: list[QuantWeight]) -> QuantWeight | None:
    """Fuse row blocks (q/k/v, gate/up) into one weight. NOTE: parts in different layouts (a Q4_K_M file keeps
    q/k in Q4_K and v in Q6_K) are widened to the widest first, so the fused matmul still runs on the kernel."""
    if any(p is None for p in parts):
        return None
    fmt = "q8" if any(p.fmt == "q8" for p in parts) else "q4"
    scales = max(p.d.shape[1] // p.q.shape[1] for p in parts)
    parts = [_widen(p, fmt, scales) for p in parts]
    return QuantWeight(fmt, torch.cat([p.q for p in parts]), torch.cat([p.d for p in parts]),
                       torch.cat([p.m for p in parts]))


def _pack_q4(q: torch.Tensor) -> torch.Tensor:
    """[n_groups, 32] values 0..15 -> [n_groups, 16] bytes (j low, j + 16 high)."""
    return q[:, :16] | (q[:, 16:] << 4)


def _from_blocks(type_name: str, b: torch.Tensor):
    """[n_blocks, bytes] uint8 -> (fmt, q [n_groups, 16 or 32], d [n_groups], m [n_groups]), groups of 32."""
    f16 = gguf.f16
    if type_name == "Q4_1":
        return "q4", b[:, 4:].contiguous(), f16(b, 0)[:, 0], f16(b, 2)[:, 0]
    if type_name == "Q4_0":
        d = f16(b, 0)[:, 0]
        # NOTE: the loader computes (q - 8) * d; d * q + (-8 * d) is not bit-identical, so shift q instead
        # and keep it in int8 form.
        q = gguf.nibbles(b[:, 2:], 1).view(-1, 32).to(torch.int8) - 8
        return "q8", q, d, torch.zeros_like(d)
    if type_name in ("Q5_0", "Q5_1"):
        # 5-bit values: low nibbles + one high bit each from a 32-bit mask; Q5_0 is (q - 16) * d, Q5_1 d * q + m
        n, off = b.shape[0], 2 if type_name == "Q5_0" else 4
        qh = gguf.bits(b[:, off:off + 4], 1, tuple(range(8)), 1).transpose(1, 2).reshape(n, 32)
        q = gguf.nibbles(b[:, off + 4:], 1).view(n, 32).bitwise_or_(qh.bitwise_left_shift_(4)).to(torch.int8)
        d = f16(b, 0)[:, 0]
        if type_name == "Q5_0":
            return "q8", q - 16, d, torch.zeros_like(d)
        return "q8", q, d, f16(b, 2)[:, 0]
    if type_name == "Q8_0":
        d = f16(b, 0)[:, 0]
        return "q8", b[:, 2:].contiguous().view(torch.int8), d, torch.zeros_like(d)
    if type_name in ("Q4_K", "Q5_K"):
        n = b.shape[0]
        sc, mn = gguf.k_scales(b[:, 4:16])                                      # [n, 8, 1]
        d = (f16(b, 0).unsqueeze(-1) * sc).view(n * 8)
        m = -(f16(b, 2).unsqueeze(-1) * mn).view(n * 8)
        if type_name == "Q4_K":
            q = gguf.nibbles(b[:, 16:], 4).reshape(n * 8, 32)
            return "q4", _pack_q4(q), d, m
        qh = gguf.bits(b[:, 16:48], 1, tuple(range(8)), 1)
        q = gguf.nibbles(b[:, 48:], 4).bitwise_or_(qh.bitwise_left_shift_(4)).reshape(n * 8, 32)
        return "q8", q.to(torch.int8), d, m
    if type_name == "Q6_K":
        # 16 sub-blocks of 16 with an int8 scale each: two scales per group of 32, m = 0; q - 32 fits int8
        n = b.shape[0]
        d = (f16(b, 208) * b[:, 192:208].view(torch.int8).float()).view(n * 16)
        ql = gguf.nibbles(b[:, :128], 2).view(n, 8, 32)
        qh = gguf.bits(b[:, 128:192], 2, (0, 2, 4, 6), 3).view(n, 8, 32)
        q = ql.bitwise_or_(qh.bitwise_left_shift_(4)).view(torch.int8).sub_(32).reshape(n * 8, 32)
        return "q8", q, d, torch.zeros_like(d)
    return None


def quantized_tensor(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> QuantWeight | None:
    """Raw GGUF tensor bytes of an [N, K] weight -> QuantWeight, or None for types without a kernel format."""
    if type_name not in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K") or shape[1] % 32:
        return None
    _, type_size, _ = gguf.QUANTS[type_name]
    data = torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8).reshape(-1).copy())
    fmt, q, d, m = _from_blocks(type_name, data.view(-1, type_size))
    n, nb = shape[0], shape[1] // 32
    # NOTE: the -0.0 vs +0.0 of a zero m is irrelevant; m must be float32 like the loader's arithmetic
    return QuantWeight(fmt, q.reshape(n, nb, -1).contiguous(), d.float().reshape(n, -1).contiguous(),
                       m.float().reshape(n, -1).contiguous())


def shard_quantized(quant: dict[str, QuantWeight], cfg) -> dict[str, QuantWeight]:
    """This tensor-parallel rank's slices (model/parallel.py): rows as they are, input columns as whole groups of
    32. A weight whose column split does not fall on a group boundary is left out (it stays on the float path)."""
    from lmserve.model.parallel import shard_spec
    out = {}
    for name, qw in quant.items():
        spec = shard_spec(name, cfg)
        if spec is None:
            out[name] = qw
            continue
        dim, start, size = spec
        if dim == 0:
            end = min(start + size, qw.q.shape[0])
            parts = [t[start:end] for t in (qw.q, qw.d, qw.m)]
            if end - start < size:      # the padded end of a vocabulary split: zero weights
                parts = [torch.cat([t, t.new_zeros(size - (end - start), *t.shape[1:])]) for t in parts]
        elif start % 32 == 0 and size % 32 == 0:
            s = qw.d.shape[1] // qw.q.shape[1]          # scales per group (2 for Q6_K)
            g0, g1 = start // 32, (start + size) // 32
            parts = [qw.q[:, g0:g1], qw.d[:, g0 * s:g1 * s], qw.m[:, g0 * s:g1 * s]]
        else:
            continue
        out[name] = QuantWeight(qw.fmt, *(t.contiguous() for t in parts))
    return out


def load_gguf_quantized(path: str) -> dict[str, QuantWeight]:
    """HF parameter name -> QuantWeight for every 2-D GGUF tensor with a kernel format (Q/K rows unpermuted)."""
    reader = gguf.gguf_reader(path)
    cfg = gguf.gguf_arch_config(reader)
    out = {}
    for t in reader.tensors:
        name = gguf.hf_name(t.name, cfg.architecture)
        if name is None or len(t.shape) != 2:
            continue
        qw = quantized_tensor(t.data, t.tensor_type.name, (int(t.shape[1]), int(t.shape[0])))
        if qw is None:
            continue
        if cfg.architecture in ("llama", "mistral"):
            heads = (cfg.num_attention_heads if ".q_proj." in name else
                     cfg.num_key_value_heads if ".k_proj." in name else None)
            if heads:
                qw = QuantWeight(qw.fmt, gguf.unpermute(qw.q, heads), gguf.unpermute(qw.d, heads),
                                 gguf.unpermute(qw.m, heads))
        out[name] = qw
    return out
