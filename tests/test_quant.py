"""Quantized-weight kernel path: the (q, d, m) decomposition reproduces the loader's float32 weights bit for bit,
and the C++ matmul equals float32 matmul on them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lmserve.model import gguf as loader
from lmserve.model import loader as model_loader, quant
from lmserve.ops import cpu_kernels

kernel = cpu_kernels.load()


def random_blocks(type_name: str, n_blocks: int, seed: int) -> np.ndarray:
    """Random raw blocks with sane float16 scales in the places each layout keeps them."""
    _, size, _ = loader.QUANTS[type_name]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    scale_offsets = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2],
                     "Q6_K": [208]}[type_name]
    for off in scale_offsets:
        raw[:, off:off + 2] = rng.uniform(0.001, 0.05, n_blocks).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"])
def test_decomposition_is_bit_identical_to_loader(type_name):
    per_block = loader.QUANTS[type_name][0]
    n, k = 24, 512
    raw = random_blocks(type_name, n * k // per_block, seed=len(type_name))
    qw = quant.quantized_tensor(raw, type_name, (n, k))
    assert torch.equal(qw.dequantize(), loader.dequantize(raw, type_name, (n, k)))


def test_smollm2_quantized_weights_match_state_dict(smollm2_path):
    qws = quant.load_gguf_quantized(smollm2_path)
    state = model_loader.load_state_dict(smollm2_path)
    assert len(qws) == 211   # 210 Q4_1 linear weights + the Q8_0 embedding
    for name, qw in qws.items():
        assert torch.equal(qw.dequantize(), state[name]), name


def test_unsupported_types_stay_float():
    # (Q6_K used to stay float; it has a kernel format now: two scales per group of 32)
    assert quant.quantized_tensor(np.zeros(210 * 4, np.uint8), "Q6_K", (4, 256)).d.shape == (4, 16)
    assert quant.quantized_tensor(np.zeros(64, np.uint8), "F16", (2, 16)) is None


@pytest.mark.skipif(kernel is None, reason="C++ kernel could not be built here")
@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_quant_matmul_matches_float(type_name, rows):
    per_block = loader.QUANTS[type_name][0]
    n, k = 40, 768
    raw = random_blocks(type_name, n * k // per_block, seed=rows)
    qw = quant.quantized_tensor(raw, type_name, (n, k))
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    out = torch.empty(rows, n)
    kernel.quant_matmul(out, x, qw.q, qw.d, qw.m)
    ref = x @ qw.dequantize().t()
    # summation order differs from MKL's; random K-quant scales give large weights, so compare relative to scale
    torch.testing.assert_close(out, ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-4)


def test_cat_rows_widens_mixed_layouts():
    """A Q4_K_M file fuses q/k (Q4_K: nibbles, one scale per group) with v (Q6_K: int8, two scales): the fused
    weight is widened, still bit-identical, and the kernel computes with it."""
    parts = [quant.quantized_tensor(random_blocks(t, 4, seed=i), t, (4, 256))
             for i, t in enumerate(("Q4_K", "Q5_K", "Q6_K"))]
    fused = quant.cat_rows(parts)
    assert (fused.fmt, fused.d.shape) == ("q8", (12, 16))
    assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))
    assert quant.cat_rows(parts[:1] * 2).fmt == "q4"        # same layouts stay as they are
    if kernel is not None:
        x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0))
        out = torch.empty(3, 12)
        kernel.quant_matmul(out, x, fused.q, fused.d, fused.m)
        ref = x @ fused.dequantize().t()
        torch.testing.assert_close(out, ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("type_name", ["Q5_K", "Q6_K"])
def test_tensor_parallel_column_shard_keeps_each_groups_scales(type_name):
    """down_proj splits its input columns across ranks; a Q6_K weight has two scales per group of 32, so its
    scales must be cut at twice the group index."""
    from types import SimpleNamespace
    n, k = 8, 512
    qw = quant.quantized_tensor(random_blocks(type_name, n * k // 256, seed=5), type_name, (n, k))
    full = qw.dequantize()
    for rank in (0, 1):
        cfg = SimpleNamespace(tp_size=2, tp_rank=rank, intermediate_size=k, head_dim=16)
        shard = quant.shard_quantized({"model.layers.0.mlp.down_proj.weight": qw}, cfg)
        got = shard["model.layers.0.mlp.down_proj.weight"].dequantize()
        assert torch.equal(got, full[:, rank * k // 2:(rank + 1) * k // 2])
