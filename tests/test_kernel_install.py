"""The CPU kernels built at install: the build backend compiles them into the package (lmserve/_kernels/<name>/),
and a start imports that build without compiling, without the cache and without its lock; a build that is not
this process's (another baseline) or does not import is passed over for the cache."""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
import zipfile

import pytest

from lmserve.ops import cpu_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(cpu_kernels.load() is None, reason="the C++ kernels cannot be built here")


def _copy_project(dest):
    """The files a wheel is built from (a checkout or an unpacked sdist), without any build of the kernels."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "_kernels")
    for name in ("lmserve", "build_backend"):
        shutil.copytree(os.path.join(ROOT, name), dest / name, ignore=skip)
    for name in ("pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy(os.path.join(ROOT, name), dest / name)
    return dest


def _seed_build(package_dir, name=None, baseline=None):
    """This machine's library (the one this process loaded) as the package's install build."""
    name = name or cpu_kernels.build_name()
    path = package_dir / "_kernels" / name
    path.mkdir(parents=True)
    shutil.copy(os.path.join(cpu_kernels.loaded_dir(), cpu_kernels.build_name() + ".so"), path / (name + ".so"))
    (path / cpu_kernels.BASELINE_FILE).write_text(baseline or open(
        os.path.join(cpu_kernels.loaded_dir(), cpu_kernels.BASELINE_FILE)).read())
    return path


def _start(project, cache_root) -> subprocess.CompletedProcess:
    """What a server's start does about the kernels, in a fresh process that imports lmserve from `project`, while
    another process holds the cache's build lock (as a long compile would): only the install's build loads in time."""
    # the package from `project`, not the checkout an editable install's finder maps `lmserve` to
    code = ("import importlib.util, logging, sys; logging.basicConfig(level=logging.WARNING, stream=sys.stdout)\n"
            "spec = importlib.util.spec_from_file_location('lmserve', sys.argv[1] + '/lmserve/__init__.py', "
            "submodule_search_locations=[sys.argv[1] + '/lmserve'])\n"
            "sys.modules['lmserve'] = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(sys.modules['lmserve'])\n"
            "from lmserve.ops import cpu_kernels\n"
            "m = cpu_kernels.load(timeout=2)\n"
            "print('LOADED', cpu_kernels.loaded_dir()) if m is not None else print('REFERENCES')\n"
            "print('BASELINE', m.built_baseline()) if m is not None else None\n")
    env = dict(os.environ, LMSERVE_KERNEL_CACHE=str(cache_root))
    env.pop("LMSERVE_KERNEL_PREBUILT", None)
    lock_dir = cache_root / cpu_kernels.build_name()
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(str(lock_dir) + ".flock", "a+") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        return subprocess.run([sys.executable, "-c", code, str(project)], capture_output=True, text=True, env=env,
                              timeout=120)


def test_a_start_imports_the_install_build_without_compiling_or_waiting(tmp_path):
    project = _copy_project(tmp_path / "src")
    built = _seed_build(project / "lmserve")
    proc = _start(project, tmp_path / "cache")
    assert f"LOADED {built}" in proc.stdout, proc.stdout + proc.stderr
    assert f"BASELINE {built.joinpath(cpu_kernels.BASELINE_FILE).read_text()}" in proc.stdout   # it runs
    assert not any((tmp_path / "cache" / cpu_kernels.build_name()).iterdir())   # the cache was never written


def test_an_install_build_for_another_baseline_or_broken_is_passed_over(tmp_path):
    project = _copy_project(tmp_path / "src")
    other = _seed_build(project / "lmserve", baseline="generic")      # e.g. LMSERVE_CPU_ISA changed since install
    proc = _start(project, tmp_path / "cache")
    assert "REFERENCES" in proc.stdout, proc.stdout + proc.stderr      # went to the (locked) cache instead
    shutil.rmtree(other)
    broken = _seed_build(project / "lmserve")
    (broken / (broken.name + ".so")).write_bytes(b"\x7fELF truncated by a full disk")
    proc = _start(project, tmp_path / "cache")
    assert "REFERENCES" in proc.stdout, proc.stdout + proc.stderr
    assert "do not load here" in proc.stdout


def test_the_build_backend_puts_the_kernels_in_the_wheel(tmp_path):
    """PEP 517's build_wheel as pip calls it: in a child interpreter whose PYTHONPATH is pip's isolated overlay
    (no torch in it). The backend's kernel build runs in the environment being installed into, keeps only the
    library and its BASELINE, and removes the builds of older sources. Seeded with this machine's library so that
    the test does not compile for a minute (the compile is cpu_kernels' own, tested in test_kernel_build.py)."""
    pytest.importorskip("setuptools", minversion="68")
    project = _copy_project(tmp_path / "src")
    built = _seed_build(project / "lmserve")
    (built / "build.ninja").write_text("# left by the compile\n")
    old = _seed_build(project / "lmserve", name="lmserve_cpu_avx2_000000000000")
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    # pip's build environment: an overlay with setuptools (and ninja) on PYTHONPATH, the target's site-packages
    # (torch) out of sys.path, as pip's own sitecustomize arranges it
    import setuptools
    site_packages = os.path.dirname(os.path.dirname(setuptools.__file__))
    lib = overlay / "lib"
    lib.mkdir()
    for entry in os.listdir(site_packages):
        if entry.split("-")[0] in ("setuptools", "pkg_resources", "_distutils_hack", "distutils"):
            os.symlink(os.path.join(site_packages, entry), lib / entry)
    (overlay / "sitecustomize.py").write_text(
        "import site, sys\n"
        "sys.path[:] = [p for p in sys.path if not p.rstrip('/').endswith('site-packages')]\n"
        f"site.addsitedir({str(lib)!r})\n")
    code = ("import sys; sys.path.insert(0, 'build_backend')\n"
            "try:\n    import torch\nexcept ImportError:\n    print('ISOLATED')\n"
            "import lmserve_build; print('WHEEL', lmserve_build.build_wheel(sys.argv[1]))")
    env = dict(os.environ, PYTHONPATH=str(overlay))
    env.pop("LMSERVE_BUILD_KERNELS", None)
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "dist")], cwd=project, capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ISOLATED" in proc.stdout
    assert f"CPU kernels built into {built}" in proc.stderr, proc.stderr[-3000:]
    assert not old.exists() and sorted(p.name for p in built.iterdir()) == sorted(
        [built.name + ".so", cpu_kernels.BASELINE_FILE])
    wheel = tmp_path / "dist" / proc.stdout.rsplit("WHEEL ", 1)[1].strip()   # setuptools logs to stdout too
    names = zipfile.ZipFile(wheel).namelist()
    assert f"lmserve/_kernels/{built.name}/{built.name}.so" in names
    assert f"lmserve/_kernels/{built.name}/BASELINE" in names
    assert "lmserve/csrc/cpu/bindings.cpp" in names and not any("000000000000" in n for n in names)


def test_lmserve_build_kernels_0_skips_the_build(tmp_path):
    project = _copy_project(tmp_path / "src")
    code = "import sys; sys.path.insert(0, 'build_backend'); import lmserve_build; lmserve_build._prebuild_kernels()"
    env = dict(os.environ, LMSERVE_BUILD_KERNELS="0")
    proc = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert not (project / "lmserve" / "_kernels").exists()


def _backend():
    sys.path.insert(0, os.path.join(ROOT, "build_backend"))
    try:
        import lmserve_build
    finally:
        sys.path.pop(0)
    return lmserve_build


def _looks_like(name, args, env, cwd):
    """A process whose command line reads `name args...` in /proc (bash's exec -a), with `env` and `cwd`."""
    proc = subprocess.Popen(["bash", "-c", f'exec -a {name} "$0" -c "import time; time.sleep(60)" "$@"',
                             sys.executable, *args], env=env, cwd=cwd)
    for _ in range(100):   # until the exec has happened
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            if f.read().startswith(name.encode() + b"\0"):
                return proc
        time.sleep(0.02)
    raise AssertionError("no exec")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the installer's process from /proc")
def test_under_uv_the_backend_finds_the_environment_uv_installs_into(tmp_path):
    """uv runs the backend in a build environment of its own (VIRTUAL_ENV points there), so the kernel build must
    run in the interpreter of the environment uv installs into, found as uv finds it. Checked against processes
    that read like uv in /proc; a real `uv pip install -e .` is measured in docs/benchmarks.md."""
    backend = _backend()
    venvs = {}
    for name in ("active", "named", "project/.venv"):
        (tmp_path / name / "bin").mkdir(parents=True)
        os.symlink(sys.executable, tmp_path / name / "bin" / "python")
        venvs[name] = str(tmp_path / name / "bin" / "python")
    (tmp_path / "project" / "src").mkdir()
    base = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    cases = [
        (["pip", "install", "-e", "."], dict(base, VIRTUAL_ENV=str(tmp_path / "active")), tmp_path, venvs["active"]),
        (["pip", "install", "--python", "named", "."], dict(base, VIRTUAL_ENV=str(tmp_path / "active")), tmp_path,
         venvs["named"]),
        (["pip", "install", "-p", str(tmp_path / "named" / "bin" / "python"), "."], base, tmp_path, venvs["named"]),
        (["pip", "install", "--python=3.11", "."], base, tmp_path / "project" / "src", venvs["project/.venv"]),
    ]
    for args, env, cwd, want in cases:
        proc = _looks_like("uv", args, env, cwd)
        try:
            assert backend._uv_target(proc.pid) == want, args
        finally:
            proc.kill()
            proc.wait()
    proc = _looks_like("pip", ["install", "."], dict(base, VIRTUAL_ENV=str(tmp_path / "active")), tmp_path)
    try:
        assert backend._uv_target(proc.pid) is None   # not uv: the backend keeps its own interpreter (pip's case)
    finally:
        proc.kill()
        proc.wait()
