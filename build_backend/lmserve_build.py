"""lmserve's PEP 517 build backend: setuptools' own, plus the CPU kernels compiled into the package.

`pip install lmserve` / `pip install -e .` builds a wheel (or an editable wheel) with this backend. Before handing
over to setuptools it compiles the C++ CPU kernels into lmserve/_kernels/<name>/ (lmserve.ops.cpu_kernels.prebuild),
so that a server's first start imports them instead of compiling for a minute. The compile needs the torch the
package will run with, and pip builds in an isolated environment that has no torch: the build runs in a child of
the same interpreter without pip's overlay on PYTHONPATH, i.e. in the environment being installed into (README:
torch is installed first). uv builds in a virtual environment of its own instead, so under uv the build runs in
the interpreter of the environment uv installs into, found as uv finds it (_uv_target). Where that torch, a
compiler or ninja is missing, or LMSERVE_BUILD_KERNELS=0, the install goes on without the build and the first
start compiles as before; an install never fails for it.
"""
from __future__ import annotations

import os
import subprocess
import sys

from setuptools import build_meta as _setuptools

# every other PEP 517 / 660 hook is setuptools' own
get_requires_for_build_wheel = _setuptools.get_requires_for_build_wheel
get_requires_for_build_sdist = _setuptools.get_requires_for_build_sdist
get_requires_for_build_editable = _setuptools.get_requires_for_build_editable
prepare_metadata_for_build_wheel = _setuptools.prepare_metadata_for_build_wheel
prepare_metadata_for_build_editable = _setuptools.prepare_metadata_for_build_editable
build_sdist = _setuptools.build_sdist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the child imports the kernel module without lmserve/__init__.py, whose imports (pydantic, ...) pip installs
# only after this build
_CHILD = """
import logging, os, sys, types
logging.basicConfig(level=logging.INFO, format="lmserve install: %(message)s", stream=sys.stderr)
root = sys.argv[1]
for name in ("lmserve", "lmserve.ops"):
    pkg = types.ModuleType(name)
    pkg.__path__ = [os.path.join(root, *name.split("."))]
    sys.modules[name] = pkg
from lmserve.ops import cpu_kernels
path = cpu_kernels.prebuild()
if path:
    print("lmserve install: CPU kernels built into", path, file=sys.stderr)
sys.exit(0 if path else 1)
"""


def _venv_python(path: str) -> str | None:
    """The interpreter of a virtual environment (or an interpreter's own path), None if there is none."""
    exe = os.path.join(path, "bin", "python") if os.path.isdir(path) else path
    return exe if os.path.isfile(exe) and os.access(exe, os.X_OK) else None


def _uv_target(pid: int) -> str | None:
    """The interpreter of the environment that the uv process `pid` installs into, or None where `pid` is not uv or
    that cannot be read (not Linux). uv runs a backend in a build environment of its own, with VIRTUAL_ENV pointing
    there, so the target is read from uv itself, in uv's order: `--python` / `-p` when it names a path, the caller's
    VIRTUAL_ENV, else the nearest `.venv` above uv's working directory. A wrong guess costs only the build: a start
    uses a build only when its name (torch, Python ABI, sources, CPU baseline) is the start's own."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = dict(kv.decode(errors="replace").split("=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except (OSError, ValueError):
        return None
    if not argv or os.path.basename(argv[0]) not in ("uv", "uvx"):
        return None
    for arg, nxt in zip(argv, argv[1:] + [""]):
        value = nxt if arg in ("--python", "-p") else arg.split("=", 1)[1] if arg.startswith("--python=") else ""
        exe = _venv_python(os.path.join(cwd, value)) if value else None
        if exe:
            return exe
    if environ.get("VIRTUAL_ENV"):
        return _venv_python(environ["VIRTUAL_ENV"])
    d = cwd
    while True:
        exe = _venv_python(os.path.join(d, ".venv"))
        if exe or os.path.dirname(d) == d:
            return exe
        d = os.path.dirname(d)


def _prebuild_kernels() -> None:
    if os.environ.get("LMSERVE_BUILD_KERNELS", "1") == "0":
        return
    # PATH stays: pip and uv put their build environment's scripts (ninja, a build requirement) first on it
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    python = (_uv_target(os.getppid()) if "UV" in os.environ else None) or sys.executable
    try:
        proc = subprocess.run([python, "-c", _CHILD, ROOT], env=env, cwd=ROOT, timeout=3600,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out = proc.stdout
    except (OSError, subprocess.SubprocessError) as e:
        out = str(e)
        proc = None
    if proc is None or proc.returncode != 0:
        print("lmserve install: the CPU kernels were not built now (the first start builds them):\n"
              + out[-2000:], file=sys.stderr)
    else:
        print(out[-1000:], file=sys.stderr)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _prebuild_kernels()
    return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    _prebuild_kernels()
    return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
