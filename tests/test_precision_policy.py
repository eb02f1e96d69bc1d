"""--dtype auto's precision policy: bfloat16 matmuls + KV cache where the CPU has native bf16, float32 elsewhere."""
from __future__ import annotations

import pytest
import torch

from lmserve import config
from lmserve.cli import build_engine_config, build_parser
from lmserve.config import ModelConfig, resolve_matmul_dtype

CPU = torch.device("cpu")


@pytest.mark.parametrize("feature", ["amx_bf16", "avx512_bf16", None])
def test_decision_rule(monkeypatch, feature):
    monkeypatch.setattr(config, "cpu_bf16_feature", lambda: feature)
    native = "bfloat16" if feature else "float32"
    assert resolve_matmul_dtype("auto", "auto", CPU) == native
    assert resolve_matmul_dtype("auto", "float32", CPU) == "float32"      # the exact mode
    assert resolve_matmul_dtype("auto", "bfloat16", CPU) == "float32"     # a bf16 model has no float32 GEMMs
    assert resolve_matmul_dtype("bfloat16", "float32", CPU) == "bfloat16"  # explicit flag wins
    assert resolve_matmul_dtype("float32", "auto", CPU) == "float32"
    assert resolve_matmul_dtype("auto", "auto", torch.device("meta")) == "float32"   # not a CPU


def test_detects_this_cpu():
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split()
    want = "amx_bf16" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else None
    assert config.cpu_bf16_feature() == want
    assert ModelConfig(device="cpu").matmul_precision == ("bfloat16" if want else "float32")


def test_an_isa_override_below_avx512_means_no_native_bf16(monkeypatch):
    """LMSERVE_CPU_ISA=avx2 simulates an AVX2-only host: float32 matmuls and KV cache there, as on such a CPU."""
    from lmserve.ops import cpu_isa
    if not cpu_isa.supports("avx2", cpu_isa.detected()):
        pytest.skip("no AVX2 here")
    monkeypatch.setenv(cpu_isa.ENV, "avx2")
    config.cpu_bf16_feature.cache_clear()
    try:
        assert config.cpu_bf16_feature() is None
        assert ModelConfig(device="cpu").matmul_precision == "float32"
    finally:
        monkeypatch.delenv(cpu_isa.ENV)
        config.cpu_bf16_feature.cache_clear()


def test_cli_maps_dtype_flags():
    parse = build_parser().parse_args
    auto = build_engine_config(parse(["serve", "api_server"])).model
    exact = build_engine_config(parse(["serve", "api_server", "--dtype", "float32"])).model
    assert (auto.dtype, auto.matmul_dtype) == ("auto", "auto")
    assert exact.matmul_precision == "float32"
    with pytest.raises(ValueError, match="matmul_dtype"):
        ModelConfig(matmul_dtype="int8")
