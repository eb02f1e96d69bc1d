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
