"""Kernel build hygiene: the suite builds into its own cache, and a start that must wait for another process's
build says at once which process holds the lock and since when."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from conftest import KERNEL_CACHE

from lmserve.ops import build_lock, cpu_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_suite_builds_kernels_in_its_own_cache_not_the_users():
    assert os.environ["LMSERVE_KERNEL_CACHE"] == KERNEL_CACHE
    path = cpu_kernels.build_dir()
    assert path.startswith(KERNEL_CACHE + os.sep)
    assert not path.startswith(os.path.join(os.path.expanduser("~"), ".cache"))
    if not os.environ.get("LMSERVE_TEST_KERNEL_CACHE"):
        # in the checkout, persistent across runs, and ignored by git
        assert KERNEL_CACHE == os.path.join(ROOT, ".kernel-cache")
        ignored = subprocess.run(["git", "-C", ROOT, "check-ignore", "-q", KERNEL_CACHE], check=False)
        assert ignored.returncode == 0, ".kernel-cache is not in .gitignore"


def _load_in_subprocess(cache_root, timeout_s: float) -> subprocess.CompletedProcess:
    code = ("import logging, sys; logging.basicConfig(level=logging.WARNING, stream=sys.stdout, "
            "format='%(asctime)s %(message)s')\n"
            "from lmserve.ops import cpu_kernels\n"
            f"m = cpu_kernels.load(timeout={timeout_s})\n"
            "print('LOADED' if m is not None else 'REFERENCES')\n")
    env = dict(os.environ, LMSERVE_KERNEL_CACHE=str(cache_root), PYTHONPATH=ROOT, LMSERVE_KERNEL_PREBUILT="0")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_a_start_waiting_for_another_build_names_the_holder(tmp_path):
    path = tmp_path / cpu_kernels.build_name()
    path.mkdir()
    # this test process plays the builder: it takes the lock as a real build does (and writes its pid)
    holder = build_lock.acquire(str(path) + ".flock", time.monotonic() + 5)
    assert holder is not None
    try:
        t0 = time.monotonic()
        proc = _load_in_subprocess(tmp_path, timeout_s=3)
        waited = time.monotonic() - t0
    finally:
        build_lock.release(holder)
    out = proc.stdout + proc.stderr
    assert "REFERENCES" in proc.stdout, out
    line = next((x for x in out.splitlines() if "waiting for another process" in x), None)
    assert line is not None, out
    assert f"pid {os.getpid()}," in line and "holding it since" in line and "UTC" in line, line
    assert waited < 60, out
    # the lock is free again and says nobody holds it
    assert (tmp_path / (path.name + ".flock")).read_text() == ""


HOLDERS = {
    # an lmserve build: takes the lock through build_lock, which writes its pid
    "lmserve": "from lmserve.ops import build_lock\nf = build_lock.acquire(LOCK, time.monotonic() + 5)\n",
    # a holder that writes nothing (an older lmserve): found in /proc/locks
    "silent": "import fcntl\nf = open(LOCK, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n",
}


@pytest.mark.parametrize("kind", sorted(HOLDERS))
def test_the_wait_is_logged_at_once_and_the_lock_taken_when_freed(tmp_path, caplog, kind):
    if kind == "silent" and not os.path.exists("/proc/locks"):
        pytest.skip("no /proc/locks")
    lock = str(tmp_path / "x.flock")
    code = f"import time\nLOCK = {lock!r}\n" + HOLDERS[kind] + "print('HELD', flush=True); time.sleep(5)\nf.close()"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        assert holder.stdout.readline().strip() == "HELD"
        w0 = time.time()
        with caplog.at_level("WARNING", logger="lmserve.ops.build_lock"):
            f = build_lock.acquire(lock, time.monotonic() + 60)
        assert f is not None
        build_lock.release(f)
    finally:
        holder.wait(30)
    waits = [r for r in caplog.records if "waiting for another process" in r.getMessage()]
    assert len(waits) == 1 and f"pid {holder.pid}," in waits[0].getMessage(), caplog.text
    assert "holding it since" in waits[0].getMessage(), caplog.text
    # "at once": logged after the 1 s grace (3 s allows for a loaded machine), long before the holder let go
    assert waits[0].created - w0 < 3.0, caplog.text
    assert any("finished after" in r.getMessage() for r in caplog.records), caplog.text


def test_a_dead_holders_line_is_not_a_wait(tmp_path, caplog):
    lock = tmp_path / "x.flock"
    lock.write_text('{"pid": 999999, "since": 0, "cmd": "killed mid-build"}')     # flock gone with its process
    with caplog.at_level("WARNING", logger="lmserve.ops.build_lock"):
        f = build_lock.acquire(str(lock), time.monotonic() + 5)
    assert f is not None
    assert not caplog.records, caplog.text
    assert build_lock.read_holder(f)["pid"] == os.getpid()
    build_lock.release(f)
