"""The CPU process's memory policy: a prefill's large activation buffers stay in the heap between steps (glibc's
malloc), and the KV pool sits on small pages.

Why: glibc serves an allocation above its mmap threshold (128 KB, raised on free up to 32 MB) with a fresh mmap and
unmaps it on free, and trims the heap's free top above 2x that threshold. A 512-token prefill of a 1B model makes
[512, 16384] float32 gate/up outputs (32 MB) and their SiLU products in every layer: each one a new mapping whose
pages the kernel zeroes on first touch (2 MB huge pages under THP_MEM_ALLOC_ENABLE). On a Sapphire Rapids VM that
zeroing was 3% of the prefill's profile, and keeping the freed buffers made the whole prefill 5-7% faster on the
AVX2 paths (docs/benchmarks.md). llama.cpp allocates its compute buffers once, for the same reason.

The cost: up to `trim` bytes of freed heap stay resident after a long prompt (the peak it already reached). The
user's own glibc settings win: with MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ or GLIBC_TUNABLES in the
environment nothing is changed.

The KV pool is one tensor per layer for K and one for V, allocated empty so that its pages are touched only as blocks
fill. Under THP_MEM_ALLOC_ENABLE (lmserve/__init__.py) each of those tensors would take a 2 MB huge page at its first
touch (the null block zeroed at start, the first block a request writes), 4 MB per layer before a single request.
SmolLM2's 30 layers on a Zen 4 VM: RSS 0.45 GiB after start and 0.59 after a benchmark run (llama-server: 0.53);
with 4 KB pages under the pool, 0.40 and 0.52-0.54 (docs/benchmarks.md). `small_pages` asks for 4 KB pages on such
a tensor (MADV_NOHUGEPAGE), so RSS grows with the blocks used; the weights keep their huge pages.
"""
from __future__ import annotations

import ctypes
import logging
import os

from lmserve.model import pages

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3      # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 128 << 20
TRIM_THRESHOLD = 256 << 20
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
_done = False


def keep_freed_buffers(mmap_threshold: int = MMAP_THRESHOLD, trim: int = TRIM_THRESHOLD) -> bool:
    """Raise glibc's mmap and trim thresholds once per process; False where it does not apply (not glibc, or the
    user set them)."""
    global _done
    if _done:
        return True
    if any(k in os.environ for k in _USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(None)      # the process's own symbols: its C library's malloc is the one to tune
        libc.gnu_get_libc_version     # glibc only: musl and others have no such symbol, and their malloc differs
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1 and mallopt(M_TRIM_THRESHOLD, trim) == 1
    _done = ok
    if ok:
        logger.debug("glibc malloc: mmap threshold %d MiB, trim threshold %d MiB", mmap_threshold >> 20, trim >> 20)
    return ok


def small_pages(t) -> bool:
    """Ask Linux for 4 KB pages under a CPU tensor's storage (MADV_NOHUGEPAGE), before it is first touched; False
    where that does not apply (another device, no Linux madvise, a storage of less than a page)."""
    if t.device.type != "cpu":
        return False
    storage = t.untyped_storage()
    return pages.advise(storage.data_ptr(), storage.nbytes(), pages.MADV_NOHUGEPAGE)
