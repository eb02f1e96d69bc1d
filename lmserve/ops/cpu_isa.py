"""Which x86 instruction-set level the CPU kernels may use here, decided at run time (one build for every CPU kind).

The library is compiled for a portable baseline (BASELINES: x86-64 with AVX2+FMA+F16C, or plain code anywhere
else) and picks faster variants per call from `isa()` (csrc/cpu/cpu_isa.cpp). LMSERVE_CPU_ISA=<level> lowers
the level the process acts on, never raises it: tests force the scalar reference and the AVX2 path with it, and
it simulates a CPU that lacks an ISA (a build for a baseline the CPU lacks is then refused; cpu_kernels.py;
below avx512 the bf16 matmul policy acts as on a CPU without AVX512-BF16: config.cpu_bf16_feature).
"""
from __future__ import annotations

import functools
import logging
import os
import platform

logger = logging.getLogger(__name__)

# from slowest to fastest; each level's /proc/cpuinfo flags (a level needs all of them)
LEVELS = {
    "scalar": (),
    "avx2": ("avx2", "fma", "f16c"),
    "avxvnni": ("avx2", "fma", "f16c", "avx_vnni"),
    "avx512": ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"),
    "avx512vnni": ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"),
    # AMX-INT8 tiles for prefill-sized GEMMs (csrc/cpu/gguf_amx.cpp); the kernel must also grant the tile state
    "amx": ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "amx_tile",
            "amx_int8"),
}
# compiler flags of each build baseline; the library is built for the highest one the CPU (as overridden) has
BASELINES = {"avx2": ["-mavx2", "-mfma", "-mf16c"], "generic": []}
ENV = "LMSERVE_CPU_ISA"


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo names them (empty where there is no /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def detected(flags: frozenset[str] | None = None) -> str:
    """The highest level this CPU supports."""
    flags = cpu_flags() if flags is None else flags
    if platform.machine().lower() not in ("x86_64", "amd64") and flags is cpu_flags():
        return "scalar"
    best = "scalar"
    for level, need in LEVELS.items():
        if all(f in flags for f in need):
            best = level
    return best


def isa() -> str:
    """The level this process acts on: LMSERVE_CPU_ISA if set and supported here, else the detected one."""
    best = detected()
    want = os.environ.get(ENV, "").strip().lower()
    if not want:
        return best
    if want not in LEVELS:
        logger.warning("%s=%s is not one of %s; using %s", ENV, want, ", ".join(LEVELS), best)
        return best
    if not (supports(want, best) or cpu_supports(want)):
        logger.warning("%s=%s: this CPU lacks it (it has %s); using %s", ENV, want, best, best)
        return best
    return want


def supports(level: str, have: str) -> bool:
    """Whether a CPU whose best level is `have` can run code of `level`."""
    return all(f in LEVELS[have] for f in LEVELS[level])


def cpu_supports(level: str) -> bool:
    """Whether this CPU has every flag of `level` (what cpu_isa.cpp checks). The levels are not a chain: an Intel
    CPU with AVX512-VNNI also has AVX-VNNI, an AMD Zen 4 has AVX512-VNNI but not AVX-VNNI, so `supports(level,
    detected())` says no to AVX-VNNI on both."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return level == "scalar"
    return all(f in cpu_flags() for f in LEVELS[level])


def baseline(level: str | None = None) -> str:
    """The build baseline for a CPU acting at `level` (default isa())."""
    level = isa() if level is None else level
    return "avx2" if supports("avx2", level) else "generic"
