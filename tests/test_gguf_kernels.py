"""ops.gguf_matmul / ops.gguf_dequantize on GGUF blocks: every quant type x batch sizes x each ISA path this CPU
has (the scalar reference, AVX2, AVX512-VNNI) x float and int8 activations, against dequantize-then-matmul in float64.

Tolerances, as bounds on |y - y64| relative to s = |x| @ |W|.T (the size of the terms summed, so cancellation
cannot make a correct result look wrong):
- float activations: 1e-5 * s (float32 accumulation of exact float32 weights);
- int8 activations: against float64 of the activations as the int8 path sees them (linear.quantize_activations):
  1e-5 * s; and against the exact float result: the quantization bound sum_j |w_j| * dx_j / 2 (each activation
  moves by at most half a step dx = amax / 127 of its group of 32) plus 1e-5 * s.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from lmserve import ops
from lmserve.ops import cpu_isa, cpu_kernels, gguf_iq, linear
from lmserve.ops.gguf_blocks import QUANTS, GGUFWeight
from lmserve.ops.linear import DOT_MAX_ROWS, FLOAT16, QTYPES, quantize_activations

lib = cpu_kernels.load()
pytestmark = pytest.mark.skipif(lib is None, reason="C++ kernels could not be built here")

# the levels with kernels of their own (avx512vnni: the int8 GEMM; its float paths are AVX2's)
ISAS = [level for level in ("scalar", "avx2", "avx512vnni", "amx") if cpu_isa.supports(level, cpu_isa.detected())]
SCALE_OFFSETS = {"Q4_1": [0, 2], "Q5_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "Q3_K": [108],
                 "Q2_K": [80, 82], "IQ1_M": [], "MXFP4": []}


def random_weight(qtype: str, n: int, k: int, seed: int, pad: int = 0) -> GGUFWeight:
    """Random valid blocks (random bytes, small finite fp16 scales); pad > 0 leaves extra bytes after each row,
    as a view into a larger buffer (rows not contiguous with each other)."""
    be, bs, _ = QUANTS[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n * k // be, bs), dtype=np.uint8)
    if qtype in FLOAT16:        # finite values over a wide range of exponents, signs, subnormals included
        v = torch.from_numpy(rng.standard_normal(n * k).astype(np.float32) * 2.0 ** rng.integers(-30, 8, n * k))
        raw = v.to(torch.float16 if qtype == "F16" else torch.bfloat16).view(torch.uint8).numpy().reshape(-1, bs)
    for off in SCALE_OFFSETS.get(qtype, [0] if qtype not in FLOAT16 else []):
        raw[:, off:off + 2] = rng.uniform(0.001, 0.05, raw.shape[0]).astype(np.float16).view(np.uint8).reshape(-1, 2)
    if qtype == "IQ1_M":        # its fp16 d is the top nibbles of its 4 scale words
        d = rng.uniform(0.001, 0.05, raw.shape[0]).astype(np.float16).view(np.uint16).astype(np.int64)
        words = raw[:, 48:56].copy().view(np.uint16).astype(np.int64)
        words = (words & 0x0FFF) | (((d[:, None] >> np.array([0, 4, 8, 12])) & 15) << 12)
        raw[:, 48:56] = words.astype(np.uint16).view(np.uint8)
    if qtype == "MXFP4":        # its scale is 2^(e - 128) from its first byte
        raw[:, 0] = rng.integers(117, 128, raw.shape[0])
    data = torch.from_numpy(raw.reshape(n, -1))
    if pad:
        data = torch.cat([data, torch.zeros(n, pad, dtype=torch.uint8)], 1)[:, :-pad]
    return GGUFWeight(qtype, data, (n, k))


def exps(w: GGUFWeight) -> torch.Tensor:
    """An MXFP4 weight's exponent bytes, [N, K / 32], as a view to write to."""
    return w.data.unfold(1, 17, 17)[..., 0]


def multiplied(x: torch.Tensor, w: GGUFWeight, w64: torch.Tensor, int8: bool):
    """What the kernel multiplies, in float64: (activations, weights). int8 calls quantize the activations for the
    block types; F16 / BF16 weights take float activations, or, on CPUs with AVX512-BF16, both sides rounded to
    bfloat16 (lib.gguf_bf16_dot())."""
    if w.qtype in FLOAT16:
        if int8 and lib.gguf_bf16_dot():
            return x.bfloat16().double(), w64.bfloat16().double()
        return x.double(), w64
    return (quantize_activations(x) if int8 else x).double(), w64


@pytest.fixture
def isa_level():
    """Run the kernels at a forced ISA level; restores the process's level afterwards."""
    before = lib.gguf_isa()

    def force(level: str) -> None:
        lib.gguf_set_isa(list(cpu_isa.LEVELS).index(level))

    yield force
    lib.gguf_set_isa(before)


def cpu_table():
    return ops.select("cpu", torch.float32, lib=lib)


def odd_k(qtype: str) -> int:
    return QUANTS[qtype][0] * 3   # 96 or 768: whole blocks, but not a multiple of 64 / 256-wide tiles of sub-blocks


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("isa", ISAS)
def test_gguf_matmul_matches_float64(qtype, isa, isa_level):
    isa_level(isa)
    n, k = 70, odd_k(qtype)                                  # n: a 64-row GEMM tile plus a tail, 16-row chunks + 6
    w = random_weight(qtype, n, k, seed=len(qtype), pad=5)
    w64 = w.dequantize().double()
    table = cpu_table()
    for rows in (1, 3, 16, 64, 300):
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
        for int8 in (False, True):
            with ops.use(table):
                y = ops.gguf_matmul(x, w, None, int8).double()
            seen, wseen = multiplied(x, w, w64, int8)
            s = seen.abs() @ wseen.abs().T
            err = (y - seen @ wseen.T).abs()
            assert (err <= 1e-5 * s + 1e-30).all(), (qtype, isa, rows, int8, (err / s).max().item())
            if int8 and qtype in FLOAT16:     # bf16 rounding of both sides: 2^-8 relative each
                assert ((y - x.double() @ w64.T).abs() <= 2 ** -7 * (x.double().abs() @ w64.abs().T) + 1e-30).all()
            elif int8:
                dx = x.reshape(rows, -1, 32).abs().amax(-1).repeat_interleave(32, 1) / 127   # [rows, k]
                bound = (dx.double() / 2) @ w64.abs().T + 1e-5 * (x.double().abs() @ w64.abs().T)
                assert ((y - x.double() @ w64.T).abs() <= bound).all(), (qtype, isa, rows)


@pytest.mark.parametrize("isa", ISAS)
def test_stacked_parts_are_one_matmul(isa, isa_level):
    """A fused layer (q/k/v, gate/up) passes its parts as a list, of mixed types as in Q4_K_M files: one call, the
    activations quantized once, each part's rows in its own columns; the same result as the parts one by one."""
    isa_level(isa)
    k = 512
    parts = [random_weight("Q4_0", 40, k, seed=1), random_weight("Q6_K", 9, k, seed=2),
             random_weight("Q4_K", 23, k, seed=3, pad=7)]
    w64 = torch.cat([p.dequantize() for p in parts]).double()
    for rows in (1, 3, DOT_MAX_ROWS + 5):
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
        for int8 in (False, True):
            with ops.use(cpu_table()):
                y = ops.gguf_matmul(x, parts, None, int8)
                one_by_one = torch.cat([ops.gguf_matmul(x, p, None, int8) for p in parts], 1)
            ref = ops.gguf_matmul(x, parts, None, int8)                   # no table active: the reference
            assert y.shape == (rows, w64.shape[0])
            torch.testing.assert_close(y, one_by_one, rtol=0, atol=0)
            seen = quantize_activations(x) if int8 else x
            s = seen.double().abs() @ w64.abs().T
            assert ((y.double() - seen.double() @ w64.T).abs() <= 1e-5 * s).all(), (isa, rows, int8)
            assert ((ref.double() - y.double()).abs() <= 2e-5 * s).all(), (isa, rows, int8)


@pytest.mark.parametrize("qtype", QTYPES)
def test_cpu_arm_agrees_with_the_reference_and_bias_and_bf16(qtype, monkeypatch):
    monkeypatch.setattr(linear, "_CHUNK_ELEMS", 5000)     # the reference dequantizes a few rows at a time
    n, k = 37, odd_k(qtype)
    w = random_weight(qtype, n, k, seed=3)
    bias = torch.randn(n)
    for rows in (1, 5, DOT_MAX_ROWS + 1):
        x = torch.randn(rows, k)
        for int8 in (False, True):
            ref = ops.gguf_matmul(x, w, bias, int8)                      # no table active: the reference
            with ops.use(cpu_table()):
                got = ops.gguf_matmul(x, w, bias, int8)
            s = x.abs() @ w.dequantize().abs().T + bias.abs()
            # the reference multiplies 16-bit weights in float: the kernel's bf16 path is within bf16 rounding
            tol = 2 ** -7 if int8 and qtype in FLOAT16 and lib.gguf_bf16_dot() else 2e-5
            assert ((got - ref).abs() <= tol * s).all(), (qtype, rows, int8)
    xb = torch.randn(4, k).bfloat16()
    with ops.use(cpu_table()):
        yb = ops.gguf_matmul(xb, w)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), ops.gguf_matmul(xb, w).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not lib.gguf_bf16_dot(), reason="no AVX512-BF16 path here")
def test_f16_rewritten_as_bf16_gives_the_same_bits():
    """ops.gguf_repack turns F16 into BF16 where int8 calls take the bf16 path: the values that path reads from
    F16 on every call, so the same results bit for bit (and exact float calls keep F16 as it is elsewhere)."""
    w = random_weight("F16", 40, 320, seed=8, pad=6)
    with ops.use(cpu_table()):
        b = ops.gguf_repack(w)
        assert b.qtype == "BF16" and b.owned and b.data.shape == (40, 640)
        for rows in (1, 5, 70):
            x = torch.randn(rows, 320, generator=torch.Generator().manual_seed(rows))
            assert torch.equal(ops.gguf_matmul(x, b, None, True), ops.gguf_matmul(x, w, None, True))
    assert ops.gguf_repack(w) is w           # the reference multiplies F16 in float: nothing to rewrite


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("isa", ISAS)
def test_gguf_dequantize_is_bit_identical(qtype, isa, isa_level):
    isa_level(isa)
    w = random_weight(qtype, 21, odd_k(qtype), seed=7, pad=3)
    if qtype == "MXFP4":        # every exponent byte, the subnormal scales (0, 1) and infinities (255) included
        exps(w)[:] = torch.arange(exps(w).numel()).view(21, -1).remainder(256)
    ref = w.dequantize()
    rows = torch.tensor([20, 0, 5, 5])
    with ops.use(cpu_table()):
        assert torch.equal(ops.gguf_dequantize(w), ref)
        assert torch.equal(ops.gguf_dequantize(w, rows), ref[rows])


@pytest.mark.parametrize("qtype", list(gguf_iq.QUANTS) + ["MXFP4"])
def test_grid_types_dequantize_as_gguf_py_does(qtype):
    """The i-quant grid types and MXFP4 against an independent reference, gguf-py's numpy dequantizer, bit for
    bit: random blocks reach every grid entry, sign code, offset and scale (MXFP4: every exponent byte, the
    subnormal scales of 0 and 1 included; the kernels are checked against this reference above)."""
    from gguf import quants
    w = random_weight(qtype, 64, 2048, seed=3)
    if qtype == "MXFP4":
        exps(w)[:] = torch.arange(exps(w).numel()).view(64, -1).remainder(256)
    ref = quants.dequantize(w.data.numpy().reshape(-1), getattr(quants.GGMLQuantizationType, qtype)).reshape(64, 2048)
    assert np.array_equal(w.dequantize().numpy().view(np.uint32), ref.astype(np.float32).view(np.uint32))


def test_the_kernels_grid_tables_are_gguf_pys():
    """csrc/cpu/gguf_iq1_grids.h, gguf_iq2_grids.h and gguf_iq3_grids.h are what tools/gen_iq_grids.py writes from gguf-py's grids
    (no hand edits)."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "gen_iq_grids.py")
    spec = importlib.util.spec_from_file_location("gen_iq_grids", path)
    gen_iq_grids = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_iq_grids)
    for name in gen_iq_grids.FILES:
        with open(os.path.join(cpu_kernels.SOURCE_DIR, name)) as f:
            assert f.read() == gen_iq_grids.header(name), name


@pytest.mark.skipif(not cpu_isa.supports("avx512vnni", cpu_isa.detected()), reason="CPU lacks AVX512-VNNI")
@pytest.mark.parametrize("qtype", [q for q in QTYPES if q not in FLOAT16])   # 16-bit: float or bf16, not int8
def test_avx512vnni_int8_equals_avx2_bit_for_bit(qtype, isa_level):
    """The AVX512-VNNI int8 GEMM is the AVX2 one with two sub-blocks per step: the same float operations per lane,
    so the same bits (a model's tokens do not depend on which of the two CPU kinds serves it, nor on the batch
    size where the kernel is chosen by M). K of 1, 3 and 5 blocks: the pairing's odd last block; widths 1-3 of a
    2-wide tile; rows across the 8-, 4- and 2-row decode tiles, the 4-row GEMM tiles and 64-row blocks."""
    table = cpu_table()
    lib.gguf_set_vnni512(1, True)         # every type and M (the default; a test before may have narrowed it)
    _compare_vnni512_with_avx2(qtype, table, isa_level)


def _compare_vnni512_with_avx2(qtype, table, isa_level):
    for nblocks in (1, 3, 5):
        k = QUANTS[qtype][0] * nblocks
        w = random_weight(qtype, 35, k, seed=nblocks, pad=3)
        for rows in (1, 2, 3, 7, 11, 19, 70):
            x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows + nblocks))
            got = {}
            for level in ("avx2", "avx512vnni"):
                isa_level(level)
                assert lib.gguf_isa() == list(cpu_isa.LEVELS).index(level)
                with ops.use(table):
                    got[level] = ops.gguf_matmul(x, w, None, True)
            assert torch.equal(got["avx2"], got["avx512vnni"]), (qtype, nblocks, rows,
                                                                  (got["avx2"] - got["avx512vnni"]).abs().max())


@pytest.mark.skipif(not cpu_isa.supports("avx2", cpu_isa.detected()), reason="CPU lacks AVX2")
def test_env_override_forces_the_avx2_kernels(tmp_path):
    """LMSERVE_CPU_ISA=avx2 (how an AVX2-only host is simulated on a newer CPU) makes a fresh process's library run
    the AVX2 kernels: the level the loaded library reports, and its int8 result equals avx2's here."""
    import os
    import subprocess
    import sys
    w = random_weight("Q4_K", 9, 512, seed=4)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(0))
    torch.save({"data": w.data.clone(), "x": x}, tmp_path / "case.pt")
    code = ("import torch; from lmserve import ops; from lmserve.ops import cpu_kernels; "
            "from lmserve.ops.gguf_blocks import GGUFWeight; lib = cpu_kernels.load(); "
            f"c = torch.load({str(tmp_path / 'case.pt')!r}); w = GGUFWeight('Q4_K', c['data'], (9, 512)); "
            "t = ops.select('cpu', torch.float32, lib=lib)\n"
            "with ops.use(t): y = ops.gguf_matmul(c['x'], w, None, True)\n"
            f"torch.save({{'isa': lib.gguf_isa(), 'y': y}}, {str(tmp_path / 'out.pt')!r})")
    env = dict(os.environ, **{cpu_isa.ENV: "avx2"})
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=600)
    out = torch.load(tmp_path / "out.pt")
    assert out["isa"] == list(cpu_isa.LEVELS).index("avx2")
    before = lib.gguf_isa()
    try:
        lib.gguf_set_isa(out["isa"])
        with ops.use(cpu_table()):
            assert torch.equal(out["y"], ops.gguf_matmul(x, w, None, True))
    finally:
        lib.gguf_set_isa(before)


def test_bad_shapes_are_errors_not_crashes():
    w = random_weight("Q4_0", 8, 64, seed=1)
    with ops.use(cpu_table()), pytest.raises(ValueError, match="x must be"):
        ops.gguf_matmul(torch.randn(2, 96), w)
    with pytest.raises(RuntimeError, match="row bytes"):
        lib.gguf_matmul(torch.empty(2, 8), torch.randn(2, 96), w.data, QTYPES.index("Q4_0"), False, 16)
    with pytest.raises(RuntimeError, match="out of range"):
        lib.gguf_dequantize(torch.empty(1, 64), w.data, 0, torch.tensor([8]), True)


def test_isa_levels_the_cpu_lacks_are_refused(isa_level, monkeypatch):
    best = cpu_isa.detected()
    for i, level in enumerate(cpu_isa.LEVELS):
        if cpu_isa.cpu_supports(level):
            assert lib.gguf_set_isa(i) == i
        else:
            with pytest.raises(RuntimeError, match="does not support"):
                lib.gguf_set_isa(i)
    # the environment override lowers the level, never raises it
    monkeypatch.setenv(cpu_isa.ENV, "scalar")
    assert cpu_isa.isa() == "scalar" and cpu_isa.baseline() == "generic"
    monkeypatch.setenv(cpu_isa.ENV, list(cpu_isa.LEVELS)[-1])
    assert cpu_isa.isa() == best


def test_cache_built_for_a_missing_isa_is_rebuilt_not_imported(tmp_path, monkeypatch):
    """A cached build whose baseline this CPU lacks (simulated: LMSERVE_CPU_ISA=scalar against an AVX2 build) is
    removed before anything imports it, and rebuilt with the portable flags."""
    monkeypatch.setenv("LMSERVE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv(cpu_isa.ENV, "scalar")
    path = cpu_kernels.build_dir()
    assert "generic" in path and "avx2" not in path      # the baseline is part of the cache key
    with open(f"{path}/{cpu_kernels.BASELINE_FILE}", "w") as f:
        f.write("avx2")
    with open(f"{path}/{path.rsplit('/', 1)[1]}.so", "wb") as f:
        f.write(b"an AVX2 build: importing it here would be an illegal instruction")
    seen = {}

    def fake_load(sources, **kw):
        seen["files"] = sorted(p.name for p in tmp_path.glob("*/*"))
        seen["cflags"] = kw["extra_cflags"]
        return type("Lib", (), {"built_baseline": staticmethod(lambda: "generic"),
                                "gguf_set_isa": staticmethod(lambda level: seen.setdefault("isa", level))})

    import torch.utils.cpp_extension
    monkeypatch.setattr(torch.utils.cpp_extension, "load", fake_load)
    cpu_kernels._compile(path, deadline=float("inf"))
    assert not any(name.endswith(".so") for name in seen["files"])          # the stale build was gone before
    assert not any(flag.startswith("-mavx") for flag in seen["cflags"])
    assert seen["isa"] == 0                                                  # and the library runs scalar code
    assert open(f"{path}/{cpu_kernels.BASELINE_FILE}").read() == "generic"


def test_activation_precision_rule(monkeypatch):
    from lmserve.cli.engine_args import add_engine_args, build_engine_config
    from lmserve.config import ModelConfig
    from lmserve.ops.linear import int8_activations
    assert int8_activations("auto", "float32") is False          # the exact mode, whatever the CPU
    assert int8_activations("int8", "float32") is True and int8_activations("float", "auto") is False
    assert int8_activations("auto", "auto") is (cpu_isa.isa() != "scalar")
    monkeypatch.setenv(cpu_isa.ENV, "scalar")                     # no integer dot path: float
    assert int8_activations("auto", "auto") is False
    with pytest.raises(ValueError, match="quant_activations"):
        ModelConfig(quant_activations="int4")
    import argparse
    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert build_engine_config(p.parse_args(["--quant-activations", "float"])).model.quant_activations == "float"
