"""The int8-activation VNNI kernel (csrc/cpu/quant_dot_vnni.cpp), used only in the non-exact (bf16) modes.

Two references: an exact emulation of its arithmetic (activations quantized per group of 32 to int8, integer dot
products, float64 scaling) that it must match to float32 rounding, so a wrong scale, offset, lane order or tail is
caught; and plain float32 matmul on the dequantized weights, which it must match to int8 activation precision."""
from __future__ import annotations

import pytest
import torch

from lmserve.model import gguf as loader, quant
from lmserve.ops import cpu_kernels
from tests.test_quant import random_blocks

kernel = cpu_kernels.load()
pytestmark = pytest.mark.skipif(kernel is None or not kernel.cpu_has_int8_dot(),
                                reason="no C++ kernel or no AVX512-VNNI on this CPU")


def emulate(x: torch.Tensor, qw: quant.QuantWeight) -> torch.Tensor:
    """What the kernel computes, in float64: x quantized to int8 per group of 32, exact integer dots."""
    rows, k = x.shape
    n, nb = qw.q.shape[:2]
    s = qw.d.shape[1] // nb
    xg = x.view(rows, nb, 32)
    dx = xg.abs().amax(-1, keepdim=True) / 127                                  # float32, as the kernel
    inv = torch.where(dx > 0, 1 / dx, torch.zeros_like(dx))
    qx = torch.round(xg * inv).double()                                          # half to even, as vcvtps2dq
    w = quant.QuantWeight(qw.fmt, qw.q, torch.ones_like(qw.d), torch.zeros_like(qw.m)).dequantize()  # integer q
    w = w.double().view(n, nb, s, 32 // s)
    isum = torch.einsum("rgsj,ngsj->rngs", qx.view(rows, nb, s, 32 // s), w)    # [rows, n, nb, s]
    sx = qx.view(rows, nb, s, 32 // s).sum(-1)                                   # [rows, nb, s]
    d, m = qw.d.double().view(n, nb, s), qw.m.double().view(n, nb, s)
    dxs = dx.double().view(rows, 1, nb, 1)
    return (d * dxs * isum + m * dxs * sx.unsqueeze(1)).sum((2, 3)).float()


def run(x: torch.Tensor, qw: quant.QuantWeight) -> torch.Tensor:
    out = torch.empty(x.shape[0], qw.q.shape[0])
    kernel.quant_matmul_int8(out, x, qw.q, qw.d, qw.m, qw.fmt == "q4", qw.has_m)
    return out


def groups(qw: quant.QuantWeight, nb: int) -> quant.QuantWeight:
    """The first nb groups of 32 of every row: odd K, an odd number of groups (the kernel's masked tail)."""
    s = qw.d.shape[1] // qw.q.shape[1]
    return quant.QuantWeight(qw.fmt, qw.q[:, :nb].contiguous(), qw.d[:, :nb * s].contiguous(),
                             qw.m[:, :nb * s].contiguous())


TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q5_K", "Q6_K"]


@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("rows,n,nb", [(1, 37, 16), (3, 40, 7), (5, 33, 1), (8, 70, 9), (2, 64, 24)])
def test_int8_kernel_matches_emulation_and_float(type_name, rows, n, nb):
    per_block = loader.QUANTS[type_name][0]
    k_full = max(256, -(-nb * 32 // per_block) * per_block)
    raw = random_blocks(type_name, n * k_full // per_block, seed=rows * 7 + nb)
    qw = groups(quant.quantized_tensor(raw, type_name, (n, k_full)), nb)
    twin = qw.for_int8_dot()
    assert twin.int8_dot and twin.q.dtype == torch.uint8
    assert torch.equal(twin.dequantize(), qw.dequantize())                       # same weights, re-biased
    assert twin.has_m == bool(qw.m.any())
    x = torch.randn(rows, nb * 32, generator=torch.Generator().manual_seed(nb))
    x[0, :32] = 0                                                                 # an all-zero group: dx = 0
    out = run(x, twin)
    exact = emulate(x, qw)
    scale = exact.abs().max().item()
    torch.testing.assert_close(out, exact, atol=2e-6 * scale, rtol=1e-5)
    ref = x @ qw.dequantize().t()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 0.02, rel          # int8 activations: ~0.5% typical; a wrong scale or offset is O(1)


def test_int8_kernel_mixed_fused_layout():
    """q/k Q4_K + v Q6_K fused (widened to q8, two scales per group, nonzero m): the Q4_K_M attention case."""
    parts = [quant.quantized_tensor(random_blocks(t, 6, seed=i), t, (6, 256)) for i, t in enumerate(("Q4_K", "Q6_K"))]
    fused = quant.cat_rows(parts)
    assert fused.fmt == "q8" and fused.d.shape[1] == 16
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(run(x, fused.for_int8_dot()), emulate(x, fused), atol=1e-4, rtol=1e-5)


def test_op_dispatches_on_the_twin():
    """ops.quant_matmul runs the int8 kernel only for an int8_dot twin; the plain weight stays exact."""
    from lmserve import ops
    qw = quant.quantized_tensor(random_blocks("Q4_1", 16 * 8, seed=1), "Q4_1", (16, 256))
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(1))
    with ops.use(ops.select("cpu", torch.float32, "auto", lib=kernel)):
        exact = ops.quant_matmul(x, qw)
        fast = ops.quant_matmul(x, qw.for_int8_dot())
    torch.testing.assert_close(fast, emulate(x, qw), atol=1e-4, rtol=1e-5)
    ref = x @ qw.dequantize().t()
    torch.testing.assert_close(exact, ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-4)
    assert not torch.equal(fast, exact)
