"""engine/cpu_heap.py: after keep_freed_buffers() a freed 32 MB activation-sized buffer is reused from the heap, so
allocating and filling it again costs no page faults; the user's own glibc settings are left alone. Each case runs
in a fresh interpreter: mallopt changes the whole process."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc",
                                reason="glibc's malloc only")

PROBE = r"""
import resource, sys, torch
from lmserve.engine.cpu_heap import keep_freed_buffers
applied = keep_freed_buffers() if sys.argv[1] == "keep" else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():
    x = torch.empty(8 << 20)      # 32 MB, as a 512-token prefill's gate/up output of a 1B model
    x.fill_(1.0)
for _ in range(3):                # glibc settles on the heap chunks it hands out (two alternate at first)
    step()
f0 = faults()
for _ in range(5):
    step()
print(applied, faults() - f0)
"""


def _probe(mode: str, env: dict | None = None) -> tuple[bool, int]:
    env = dict(os.environ, **(env or {}))
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, check=True,
                         timeout=120).stdout.split()
    return out[0] == "True", int(out[1])


def test_freed_activation_buffers_are_reused_without_page_faults():
    applied, faults = _probe("keep", {"THP_MEM_ALLOC_ENABLE": "0"})
    assert applied
    assert faults < 100, faults          # heap pages reused: at most a few faults for the allocator's own pages
    _, faults_default = _probe("default", {"THP_MEM_ALLOC_ENABLE": "0"})
    # glibc's default maps each 32 MB buffer anew and unmaps it on free: 8192 faults per buffer in 4 KB pages, at
    # least 16 where Linux's THP mode is "always" (2 MB pages)
    assert faults_default >= max(5 * 16, 10 * faults), (faults_default, faults)


def test_the_users_own_malloc_settings_win():
    applied, _ = _probe("keep", {"MALLOC_TRIM_THRESHOLD_": str(1 << 20)})
    assert not applied


TOUCH = r"""
import os, sys, torch
import lmserve                    # sets THP_MEM_ALLOC_ENABLE=1 before torch allocates
from lmserve.engine.cpu_heap import small_pages
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
t = torch.empty(64 << 20, dtype=torch.uint8)     # a KV pool's layer tensor: never touched before this point
advised = small_pages(t) if sys.argv[1] == "small" else False
w = torch.zeros(1 << 20, dtype=torch.uint8)
for i in range(8):
    w[i * 4096 + 12345] = 1       # the same Python and torch code paths once, so only t's pages count below
r0 = rss()
for i in range(8):
    t[i * (8 << 20) + 12345] = 1  # one byte in each 8 MB: a block written here and there
print(advised, rss() - r0)
"""


def _touch(mode: str) -> tuple[bool, int]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("THP_MEM_ALLOC_ENABLE", None)
    out = subprocess.run([sys.executable, "-c", TOUCH, mode], capture_output=True, text=True, env=env, check=True,
                         timeout=120).stdout.split()
    return out[0] == "True", int(out[1])


def test_kv_pool_tensors_grow_by_small_pages():
    """small_pages (the KV pool's tensors, engine/model_runner.py): touching 8 scattered bytes adds 8 small pages to
    RSS, not 8 huge pages of 2 MB as torch's THP allocation would."""
    advised, grown = _touch("small")
    assert advised
    assert grown <= 8 * 64 * 1024, grown          # 8 pages of 4 KB (64 KB pages on some arm64 kernels)
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            thp = f.read()
    except OSError:
        thp = "[never]"
    if "[never]" not in thp:      # the control: where THP is on, the same touches without the advice take 2 MB each
        _, grown_default = _touch("default")
        assert grown_default >= 4 * (2 << 20), grown_default
