"""The CPU kernel library as source files: each .cpp compiles cleanly with -Wall -Werror, and the first-start
build never hangs start-up (a stale lock left by a killed build is recovered; waiting is bounded)."""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from lmserve.ops import cpu_kernels

CXX = shutil.which("c++") or shutil.which("g++")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
@pytest.mark.parametrize("source", [os.path.basename(s) for s in cpu_kernels.sources()])
def test_each_source_compiles_with_warnings_as_errors(source):
    from torch.utils.cpp_extension import include_paths
    # -isystem: warnings in torch's own headers are not ours to fix
    incs = [a for p in include_paths() + [sysconfig.get_paths()["include"]] for a in ("-isystem", p)]
    cmd = [CXX, "-std=c++17", "-fsyntax-only", "-Wall", "-Werror", *cpu_kernels.cflags(), *incs,
           "-DTORCH_EXTENSION_NAME=lmserve_check", os.path.join(cpu_kernels.SOURCE_DIR, source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


# umbrella headers that each cost 7-28 s of parsing per file (g++ 12, torch 2.13): the first start compiles the
# library, so these are start-up seconds; the sources include <ATen/core/Tensor.h> and the ATen/ops they call
HEAVY_HEADERS = ("torch/extension.h", "torch/types.h", "torch/torch.h", "torch/all.h", "torch/python.h",
                 "ATen/ATen.h", "ATen/Functions.h")


def test_sources_leave_out_torch_umbrella_headers():
    import glob
    import re
    found = []
    for path in glob.glob(os.path.join(cpu_kernels.SOURCE_DIR, "*.[ch]*")):
        with open(path) as f:
            for line in f:
                m = re.match(r'\s*#\s*include\s*[<"]([^>"]+)[>"]', line)
                if m and m.group(1) in HEAVY_HEADERS:
                    found.append(f"{os.path.basename(path)}: {m.group(1)}")
    assert not found, found


def test_sources_ship_in_the_wheel():
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        data = tomllib.load(f)["tool"]["setuptools"]["package-data"]["lmserve"]
    assert "csrc/cpu/*.cpp" in data and "csrc/cpu/*.h" in data


def _load_in_subprocess(cache_root, timeout_s: float, wait_s: float) -> subprocess.CompletedProcess:
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
            "from lmserve.ops import cpu_kernels\n"
            f"m = cpu_kernels.load(timeout={timeout_s})\n"
            "print('LOADED' if m is not None else 'REFERENCES')\n")
    # LMSERVE_KERNEL_PREBUILT=0: these cases are about the cache, not the install's build in the package
    env = dict(os.environ, LMSERVE_KERNEL_CACHE=str(cache_root), PYTHONPATH=ROOT, LMSERVE_KERNEL_PREBUILT="0")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=wait_s)


def _seed_cache(tmp_path):
    """A copy of this machine's finished build (so the test does not compile), or an empty cache."""
    name = cpu_kernels.build_name()
    if cpu_kernels.load() is not None:
        shutil.copytree(cpu_kernels.loaded_dir(), tmp_path / name)
    else:
        (tmp_path / name).mkdir()
    return tmp_path / name


@pytest.mark.slow
def test_stale_lock_from_a_killed_build_is_recovered(tmp_path):
    if cpu_kernels.load() is None:
        pytest.skip("the C++ kernels cannot be built here")
    path = _seed_cache(tmp_path)
    (path / "lock").write_text("")        # what torch's FileBaton leaves when its process is killed mid-build
    # before the fix this waited in FileBaton.wait() forever
    proc = _load_in_subprocess(tmp_path, timeout_s=400, wait_s=450)
    assert "LOADED" in proc.stdout, proc.stdout + proc.stderr
    assert "stale kernel build lock" in proc.stdout + proc.stderr
    assert not (path / "lock").exists()


def test_waiting_for_another_live_builder_is_bounded(tmp_path):
    path = _seed_cache(tmp_path)
    with open(str(path) + ".flock", "a+") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)          # a live process that is (still) compiling
        proc = _load_in_subprocess(tmp_path, timeout_s=2, wait_s=120)
    assert "REFERENCES" in proc.stdout, proc.stdout + proc.stderr
    assert "using the PyTorch references" in proc.stdout + proc.stderr


def _build_kernels_command(cache_root, *args) -> subprocess.CompletedProcess:
    code = ("import sys; from lmserve.cli.commands import main\n"
            "raise SystemExit(main(['build-kernels', *sys.argv[1:]]))")
    env = dict(os.environ, LMSERVE_KERNEL_CACHE=str(cache_root), PYTHONPATH=ROOT, LMSERVE_KERNEL_PREBUILT="0")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)


def test_build_kernels_command_uses_the_cache_the_servers_read(tmp_path):
    """`lmserve build-kernels` (an image build's or an installer's step) runs cpu_kernels.build on the directory a
    server's cpu_kernels.load() reads, and says which; with a live builder holding the lock past --timeout it fails
    with exit status 1 instead of hanging. The cache is seeded with this machine's build so that the suite does not
    compile again (compiling is that same build call's work, timed in docs/benchmarks.md)."""
    if cpu_kernels.load() is None:
        pytest.skip("the C++ kernels cannot be built here")
    path = _seed_cache(tmp_path / "ready")
    proc = _build_kernels_command(tmp_path / "ready", "--timeout", "120")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"CPU kernels ready in {path}" in proc.stdout
    assert "LOADED" in _load_in_subprocess(tmp_path / "ready", timeout_s=60, wait_s=120).stdout

    busy = _seed_cache(tmp_path / "busy")
    with open(str(busy) + ".flock", "a+") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        proc = _build_kernels_command(tmp_path / "busy", "--timeout", "2")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "could not be built here" in proc.stdout


def test_a_cached_library_that_does_not_import_is_rebuilt(tmp_path, monkeypatch, caplog):
    """A .so in the cache is imported as it is (its directory's name is the hash of the build's inputs); one left
    truncated by a build killed while linking is removed with its directory and compiled again, not a failed start."""
    monkeypatch.setenv("LMSERVE_KERNEL_CACHE", str(tmp_path))
    path = cpu_kernels.build_dir()
    name = os.path.basename(path)
    with open(os.path.join(path, cpu_kernels.BASELINE_FILE), "w") as f:
        f.write(cpu_kernels.cpu_isa.baseline())
    with open(os.path.join(path, name + ".so"), "wb") as f:
        f.write(b"\x7fELF cut short")
    with open(os.path.join(path, "attention.o"), "wb") as f:
        f.write(b"an object file of the killed build")
    seen = {}

    def fake_load(sources, **kw):
        seen["files"] = sorted(os.listdir(kw["build_directory"]))
        return type("Lib", (), {"built_baseline": staticmethod(lambda: "avx2"),
                                "gguf_set_isa": staticmethod(lambda level: None)})

    import torch.utils.cpp_extension
    monkeypatch.setattr(torch.utils.cpp_extension, "load", fake_load)
    with caplog.at_level("WARNING"):
        cpu_kernels._compile(path, deadline=float("inf"))
    assert "build is broken; rebuilding" in caplog.text
    assert seen["files"] == []          # compiled from scratch: nothing of the broken build was left
