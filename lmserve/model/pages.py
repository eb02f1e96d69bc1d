"""Linux page advice (madvise) on the whole pages inside a buffer: the weights' mapped file pages released after a
repack (model/gguf_weights.py) or mapped in one pass (model/repack_cache.py), the KV pool kept off huge pages
(engine/cpu_heap.py)."""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import warnings

import numpy as np
import torch

logger = logging.getLogger(__name__)

MADV_DONTNEED = 4
MADV_NOHUGEPAGE = 15       # asm-generic/mman-common.h
MADV_POPULATE_READ = 22    # Linux 5.14
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@functools.cache
def _madvise():
    """libc's madvise with its signature set, looked up once per process; None where there is none."""
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError, TypeError) as e:     # not a Unix libc
        logger.debug("madvise unavailable: %s", e)
        return None
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return madvise


def advise(start: int, nbytes: int, advice: int) -> bool:
    """madvise(advice) on the pages wholly inside [start, start + nbytes): a partial page at either end is shared
    with a neighbour, which keeps its own. False where nothing was advised (no whole page, no Linux madvise)."""
    lo, hi = -(-start // PAGE) * PAGE, (start + nbytes) // PAGE * PAGE
    madvise = _madvise()
    if hi <= lo or madvise is None:
        return False
    return madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), advice) == 0


def shared_view(arr: np.ndarray) -> torch.Tensor:
    """A tensor over a read-only mapping's bytes (a GGUF's, a safetensors file's, a repack cache entry's), no copy:
    read-only on purpose (the mapping is shared and never written), so torch's warning about it is silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)
