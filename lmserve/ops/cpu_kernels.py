"""The CPU kernel library (lmserve/csrc/cpu/*.cpp), compiled on first use with torch.utils.cpp_extension.load.

Decode attention over the paged cache is the one place where pure PyTorch wastes most of its time on CPU: it
must gather every sequence's K/V into a padded tensor (a full copy of the context, per layer, per step) before a
batched SDPA; csrc/cpu/attention.cpp reads K/V in place through the block table. The other kernels fuse small
elementwise ops and keep GGUF weights quantized. If the build fails (no compiler, no ninja) or takes longer than
the start-up bound, callers use the pure-PyTorch references in lmserve/ops (forward_native), the test oracle.

Builds are cached under ~/.cache/lmserve/kernels (LMSERVE_KERNEL_CACHE overrides), one directory per hash of the
sources, the compiler flags, the build baseline, the torch version and the Python ABI. The baseline is portable
(cpu_isa.py: AVX2 + FMA + F16C on x86-64, plain code elsewhere; never -march=native), so one build serves every x86
CPU kind and faster ISA variants are picked at run time; the CPU model is not in the key. A directory's .so is
imported directly (no ninja run: the name says it is up to date); one that does not import is rebuilt. A build
records its baseline (BASELINE_FILE) and is never imported where the CPU lacks it: it is rebuilt instead.

NOTE: a process killed while compiling leaves torch's `lock` file behind, and torch then waits for it forever
(FileBaton.wait). So every build here first takes an flock on `<dir>.flock`, which the kernel releases when its
holder dies; whoever holds it knows any `lock` file is stale and removes it. The holder writes its pid and start
time into that file, and a process that must wait logs them at once (ops/build_lock.py). Waiting is
bounded too (`timeout`), and so is the build itself: it runs in a thread, and start-up goes on with the
references if it has not finished in time (the next start finds the finished build).

Installing the package builds the library once more, into the package itself (lmserve/_kernels/<name>/, the
build backend in build_backend/ calls prebuild()), so that a first start compiles nothing. A start imports that
build when its name is this process's build_name() (same sources, flags, baseline, torch and Python) and it
imports; anything else (sources edited in a checkout, another torch) falls through to the cache above.
LMSERVE_KERNEL_PREBUILT=0 ignores it.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
import time

import torch

from lmserve.ops import cpu_isa

logger = logging.getLogger(__name__)

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_DIR = os.path.join(PACKAGE_DIR, "csrc", "cpu")
# NOTE: -ffp-contract=off keeps `q * d + m` two roundings, as the loader computes it (explicit FMA intrinsics are
# unaffected). The ISA flags come from the baseline (cflags()).
CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]
BASELINE_FILE = "BASELINE"
PREBUILT_DIR = os.path.join(PACKAGE_DIR, "_kernels")   # written at install (prebuild()); ignored by git
LDFLAGS = ["-fopenmp"]
DEFAULT_TIMEOUT_S = 600.0

_lock = threading.Lock()
_module = None
_module_dir: str | None = None   # where the loaded library came from (the cache or the package's prebuilt)
_failed = False


def sources() -> list[str]:
    return sorted(glob.glob(os.path.join(SOURCE_DIR, "*.cpp")))


def cflags(baseline: str | None = None) -> list[str]:
    """Compiler flags for a baseline (default: the one this CPU, as LMSERVE_CPU_ISA may lower it, can run)."""
    return CFLAGS + cpu_isa.BASELINES[baseline or cpu_isa.baseline()]


def build_name() -> str:
    baseline = cpu_isa.baseline()
    h = hashlib.sha1()
    for path in sorted(glob.glob(os.path.join(SOURCE_DIR, "*"))):
        with open(path, "rb") as f:
            h.update(os.path.basename(path).encode() + f.read())
    # the Python ABI too: a library built for one CPython minor version must not be imported by another
    h.update((" ".join(cflags(baseline) + LDFLAGS) + platform.machine() + torch.__version__
              + sys.implementation.cache_tag).encode())
    return f"lmserve_cpu_{baseline}_{h.hexdigest()[:12]}"


def _check_baseline(path: str) -> None:
    """Before anything imports a library from `path`: a build for a baseline this CPU lacks (a cache copied from
    another machine, or LMSERVE_CPU_ISA lowered) is removed, so it is rebuilt rather than run into SIGILL."""
    try:
        with open(os.path.join(path, BASELINE_FILE)) as f:
            built = f.read().strip()
    except OSError:
        built = None
    if built is None and not glob.glob(os.path.join(path, "*.so")):
        return
    want = cpu_isa.baseline()
    if built != want:
        logger.warning("kernel cache %s was built for baseline %s but this CPU runs %s (%s=%s); rebuilding", path,
                       built or "unknown", want, cpu_isa.ENV, os.environ.get(cpu_isa.ENV, ""))
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path, exist_ok=True)


def _apply_isa(module) -> None:
    """Tell the library which ISA level to run at (cpu_isa.isa(), capped by its build)."""
    level = cpu_isa.isa()
    if module.built_baseline() == "generic":
        level = "scalar"
    try:
        module.gguf_set_isa(list(cpu_isa.LEVELS).index(level))
    except RuntimeError as e:   # the flags say AMX but the OS does not grant the tile state (Linux < 5.16)
        if level != "amx":
            raise
        logger.warning("AMX tiles unavailable (%s); the int8 kernels run at avx512vnni", e)
        module.gguf_set_isa(list(cpu_isa.LEVELS).index("avx512vnni"))


def _import_library(path: str):
    """The library built in `path`, imported as torch's load() imports it, without running ninja: the directory's
    name is the hash of everything that goes into the build, so a .so there is up to date by construction."""
    import importlib.util
    name = os.path.basename(path.rstrip(os.sep))
    spec = importlib.util.spec_from_file_location(name, os.path.join(path, name + ".so"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_prebuilt(path: str):
    """The package's own build in `path` (made at install) if it is there for this CPU's baseline and imports here,
    else None."""
    if os.environ.get("LMSERVE_KERNEL_PREBUILT", "1") == "0":
        return None
    try:
        with open(os.path.join(path, BASELINE_FILE)) as f:
            if f.read().strip() != cpu_isa.baseline():
                return None
    except OSError:
        return None
    try:
        module = _import_library(path)
        _apply_isa(module)
    except Exception as e:  # noqa: BLE001 - a broken or foreign build: the cache path builds one that works
        logger.warning("the kernels built at install (%s) do not load here (%s); using the kernel cache", path, e)
        return None
    return module


def build_dir() -> str:
    root = os.environ.get("LMSERVE_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lmserve",
                                                                  "kernels")
    path = os.path.join(root, build_name())
    os.makedirs(path, exist_ok=True)
    return path


def _compile(path: str, deadline: float):
    """Build (or load the cached build of) the library in `path`; raises on failure or when the lock times out."""
    from torch.utils.cpp_extension import load

    from lmserve.ops import build_lock
    holder = build_lock.acquire(path + ".flock", deadline)
    if holder is None:
        raise TimeoutError("another process is still compiling the CPU kernels")
    try:
        _check_baseline(path)
        stale = os.path.join(path, "lock")
        if os.path.exists(stale):
            # we hold the flock, so no live lmserve process is building here: a killed build left this behind
            logger.warning("removing a stale kernel build lock %s (a build was interrupted)", stale)
            os.remove(stale)
        if os.path.exists(os.path.join(path, os.path.basename(path) + ".so")):
            try:
                module = _import_library(path)
                _apply_isa(module)
                return module
            except ImportError:
                # a build killed while linking can leave a truncated .so
                logger.warning("cached CPU kernel build is broken; rebuilding from scratch")
                shutil.rmtree(path, ignore_errors=True)
                os.makedirs(path, exist_ok=True)
        logger.warning("compiling CPU kernels (once, ~1 min on 2 cores) into %s ...", path)
        t0 = time.monotonic()
        # copies: torch's load() appends to the flag lists it is given, which would change build_name()
        kw = dict(name=os.path.basename(path), extra_cflags=cflags(), extra_ldflags=list(LDFLAGS),
                  build_directory=path, verbose=False)
        module = load(sources=sources(), **kw)
        logger.warning("compiled CPU kernels in %.1f s", time.monotonic() - t0)
        with open(os.path.join(path, BASELINE_FILE), "w") as f:
            f.write(cpu_isa.baseline())
        _apply_isa(module)
        return module
    finally:
        build_lock.release(holder)


def build(timeout: float = DEFAULT_TIMEOUT_S):
    """Load the package's prebuilt library, or compile / load the cached one, waiting at most `timeout` seconds.
    Returns the module or None (not cached)."""
    global _module_dir
    prebuilt = os.path.join(PREBUILT_DIR, build_name())
    module = _load_prebuilt(prebuilt)
    if module is not None:
        _module_dir = prebuilt
        return module
    deadline = time.monotonic() + timeout
    result: dict = {}

    def run():
        try:
            result["module"] = _compile(build_dir(), deadline)
        except Exception as e:  # noqa: BLE001 - any build failure means "use the references"
            result["error"] = e

    worker = threading.Thread(target=run, name="lmserve-kernel-build", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        logger.warning("CPU kernels still compiling after %.0f s; using the PyTorch references for now "
                       "(the next start will use the finished build)", timeout)
        return None
    if "error" in result:
        logger.warning("C++ CPU kernels unavailable (%s); using the PyTorch references", result["error"])
        return None
    _module_dir = build_dir()
    return result["module"]


def loaded_dir() -> str | None:
    """The directory the library of this process was loaded from (None before a successful build())."""
    return _module_dir


def _remove_all_but(directory: str, keep: set[str]) -> None:
    for entry in set(os.listdir(directory)) - keep:
        full = os.path.join(directory, entry)
        shutil.rmtree(full) if os.path.isdir(full) else os.remove(full)


def prebuild(timeout: float = 1800.0) -> str | None:
    """The installer's step: build the library into the package (PREBUILT_DIR/<name>, only the .so and its
    BASELINE kept) and remove older builds there. Returns the directory, or None if the build failed."""
    path = os.path.join(PREBUILT_DIR, build_name())
    os.makedirs(path, exist_ok=True)
    try:
        _compile(path, time.monotonic() + timeout)
    except Exception as e:  # noqa: BLE001 - an install goes on without it; the first start compiles instead
        logger.warning("could not build the CPU kernels at install (%s); the first start will", e)
        return None
    _remove_all_but(path, {os.path.basename(path) + ".so", BASELINE_FILE})   # objects, ninja files, the lock
    _remove_all_but(PREBUILT_DIR, {os.path.basename(path)})                  # older builds and their flocks
    return path


def load(timeout: float = DEFAULT_TIMEOUT_S):
    """The compiled module, or None if it cannot be built here in time (then callers use the references).

    Tried once per process: the outcome is cached."""
    global _module, _failed
    if _module is not None or _failed:
        return _module
    with _lock:
        if _module is None and not _failed:
            _module = build(timeout)
            _failed = _module is None
    return _module
