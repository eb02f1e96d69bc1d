"""Which oneDNN kernel runs the packed GEMMs on this CPU (e.g. "brg_matmul:avx512_core_amx").

The bf16 fast path is only fast if oneDNN picks its AMX brgemm kernels where the CPU has AMX tiles; a kernel
that refuses AMX tile permission, an old oneDNN or a weight packed in the wrong layout silently falls back to
AVX-512. oneDNN says what it ran only through its verbose log, printed with C stdio to fd 1, so the probe turns
it on for one small packed matmul and reads fd 1 back (once per process, at model load).
"""
from __future__ import annotations

import ctypes
import os
import re
import tempfile
from functools import cache

import torch

_EXEC = re.compile(r"onednn_verbose,(?:v\d+,)?primitive,exec,cpu,(\w+),([^,]+),")


def _flush_c_stdio() -> None:
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass


def parse_verbose(text: str) -> list[tuple[str, str]]:
    """(primitive kind, implementation) for each executed primitive in a oneDNN verbose log."""
    return _EXEC.findall(text)


@cache
def packed_gemm_implementation(dtype: torch.dtype = torch.bfloat16) -> str | None:
    """oneDNN's implementation name for fast_linear on a packed `dtype` weight, or None if it cannot be told
    (no oneDNN, weight not packable, verbose log unavailable)."""
    from lmserve.ops.linear_method import fast_linear, make_fast_weight
    if not torch.backends.mkldnn.is_available():
        return None
    weight = make_fast_weight(torch.randn(512, 256), dtype)   # a model-like shape: tiny ones may dispatch differently
    if weight is None or not weight.is_mkldnn:
        return None
    x = torch.randn(64, 256)
    _flush_c_stdio()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+b") as log:
        try:
            os.dup2(log.fileno(), 1)
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                fast_linear(x, weight)
            _flush_c_stdio()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        log.seek(0)
        text = log.read().decode(errors="replace")
    impls = [impl for kind, impl in parse_verbose(text) if kind in ("inner_product", "matmul")]
    return impls[-1] if impls else None


def uses_amx(implementation: str | None) -> bool:
    return implementation is not None and "amx" in implementation
