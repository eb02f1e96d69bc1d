"""lmserve's PEP 517 build backend: setuptools' own, plus the CPU kernels compiled into the package.

`pip install lmserve` / `pip install -e .` builds a wheel (or an editable wheel) with this backend. Before handing
over to setuptools it compiles the C++ CPU kernels into lmserve/_kernels/<name>/ (lmserve.ops.cpu_kernels.prebuild),
so that a server's first start imports them instead of compiling for a minute. The compile needs the torch the
package will run with, and pip builds in an isolated environment that has no torch: the build runs in a child of
the same interpreter without pip's overlay on PYTHONPATH, i.e. in the environment being installed into (README:
torch is installed first). Where that torch, a compiler or ninja is missing, or LMSERVE_BUILD_KERNELS=0, the
install goes on without the build and the first start compiles as before; an install never fails for it.
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


def _prebuild_kernels() -> None:
    if os.environ.get("LMSERVE_BUILD_KERNELS", "1") == "0":
        return
    # PATH stays: pip puts its build environment's scripts (ninja, a build requirement) first on it
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD, ROOT], env=env, cwd=ROOT, timeout=3600,
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
