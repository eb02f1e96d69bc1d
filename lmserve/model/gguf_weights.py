"""GGUF tensors -> GGUFWeight (ops/gguf_blocks.py): quantized matrices as views of the memory-mapped file.

The reader's tensor data is a view of one read-only np.memmap of the file; `torch.from_numpy` keeps that view, so
a matrix costs address space, not memory, until its pages are read (and those pages are the page cache's, shared
by every process serving the file). Copies are made only where the layout must change, never larger than the
blocks themselves: llama-family Q/K rows are un-permuted (a row permutation, ~9% of a llama layer), a
tensor-parallel column slice is this rank's share, a padded vocabulary split adds zero rows.

With repack (int8 activations, --gguf-repack auto), Q4_0, Q4_1, Q4_K, Q6_K and Q5_0 matrices are rewritten once into groups of 8 rows
(ops/gguf_blocks.py repack, ops/gguf_x8.py; the int8 kernels read it 1.5-5x faster, docs/benchmarks.md), and F16 ones into BF16
where the kernels' bf16 path would round them so on every read (ops.gguf_repack): a private copy of the same
size, after which this process's mapped pages of the source are released, so memory stays ~ the file. The repacked
matrices are written once to a cache file and served from its shared mapping (model/repack_cache.py), so they are
shared with other processes serving the file, and later starts skip the repack (--gguf-repack-cache).
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from lmserve.model import pages
from lmserve.model.gguf import hf_name, permuted_qk, unpermute
from lmserve.model.parallel import shard_spec
from lmserve.model.repack_cache import RepackCache
from lmserve import ops
from lmserve.ops.gguf_blocks import QUANTS, GGUFWeight, can_repack

logger = logging.getLogger(__name__)


def mapped_view(t) -> torch.Tensor:
    """uint8 [rows, row_bytes] tensor sharing the mapping of a GGUF tensor (no copy)."""
    raw = t.data.view(np.uint8)
    rows = int(t.shape[-1]) if len(t.shape) > 1 else 1
    return pages.shared_view(raw).view(rows, -1)


def gguf_weight(t, name: str, cfg) -> GGUFWeight | None:
    """This rank's part of a quantized (or F16 / BF16) 2-D GGUF tensor as a GGUFWeight, or None when it must be float
    (F32 or another type without a kernel, not 2-D, or a tensor-parallel column split that cuts through blocks)."""
    qtype = t.tensor_type.name
    if qtype not in QUANTS or len(t.shape) != 2:
        return None
    n, k = int(t.shape[1]), int(t.shape[0])
    elems, type_size, _ = QUANTS[qtype]
    if k % elems:                         # a 16-bit matrix whose rows are not whole groups of 32: float
        return None
    data = mapped_view(t)
    spec = shard_spec(name, cfg)
    if spec is not None:
        dim, start, size = spec
        if dim == 0:
            end = min(start + size, n)
            data = data[start:end]
            if end - start < size:        # the padded end of a vocabulary split: zero rows
                data = torch.cat([data, data.new_zeros(size - (end - start), data.shape[1])])
            n = size
        elif start % elems == 0 and size % elems == 0:
            b0, b1 = start // elems, (start + size) // elems
            data = data.view(n, -1, type_size)[:, b0:b1].reshape(n, -1)     # this rank's blocks (a copy)
            k = size
        else:
            return None
    if permuted_qk(name, cfg):
        data = unpermute(data, n // cfg.head_dim)
    return GGUFWeight(qtype, data, (n, k))


def expert_weights(t, name: str, cfg) -> list[tuple[str, GGUFWeight]]:
    """One projection of all experts stacked in a 3-D GGUF tensor ('...mlp.experts.gate_proj.weight', [experts,
    rows, cols]) -> one GGUFWeight per expert, each a view of its rows in the mapping, named as a per-expert
    checkpoint names it ('...mlp.experts.3.gate_proj.weight'); [] where the blocks cannot serve (tensor parallel,
    a 16-bit matrix whose rows are not whole groups of 32, a type without a kernel)."""
    qtype = t.tensor_type.name
    experts, n, k = (int(d) for d in reversed(t.shape))
    if qtype not in QUANTS or k % QUANTS[qtype][0] or cfg.tp_size != 1:
        return []
    data = mapped_view(t)                                    # [experts, rows * row bytes]
    prefix, proj, _ = name.rsplit(".", 2)                    # '...mlp.experts', 'gate_proj', 'weight'
    return [(f"{prefix}.{e}.{proj}.weight", GGUFWeight(qtype, data[e].view(n, -1), (n, k))) for e in range(experts)]


def gguf_weights(reader, cfg, repack: bool = False, cache: RepackCache | None = None) -> dict[str, GGUFWeight]:
    """HF parameter name -> GGUFWeight for every quantized matrix of the file that can stay quantized; repack:
    the matrices of the 8-row layouts in groups of 8 rows (see the module's docstring), served from `cache`'s
    shared file where it has them (model/repack_cache.py), written there as they are repacked where it has none."""
    cached = cache.load() if repack and cache is not None else {}
    writer = cache.writer(reader.data.nbytes) if repack and cache is not None and not cached else None
    out = {}
    for t in reader.tensors:
        name = hf_name(t.name, cfg.architecture)
        if name is None:
            continue
        for name, w in expert_weights(t, name, cfg) if len(t.shape) == 3 else [(name, None)]:
            if name in cached:
                out[name] = cached[name]
            elif (w := w if w is not None else gguf_weight(t, name, cfg)) is not None:
                w = repacked(w, reader.data) if repack else w
                if writer is None or not writer.add(name, w):    # written: its private copy goes now
                    out[name] = w
    if cached:
        logger.info("repacked weights mapped from %s", cache.bin)
    if writer is not None:
        out.update(writer.commit())
    return out


def repacked(w: GGUFWeight, mapping: np.ndarray) -> GGUFWeight:
    """w rewritten by ops.gguf_repack where it can be (8-row groups, F16 -> BF16), the source's pages of `mapping`
    then released; else w itself."""
    if not can_repack(w):
        return w
    packed = ops.gguf_repack(w)
    if packed is not w:
        release_mapped_pages(mapping, w.data)
    return packed


def release_mapped_pages(mapping: np.ndarray, data: torch.Tensor) -> None:
    """Drop this process's resident pages of `data` when it is a view of `mapping`, a read-only file mapping (the
    GGUF reader's, a safetensors file's) (MADV_DONTNEED on a shared file mapping: a later read faults the file's
    bytes back in; the page cache keeps them). Anything else, a copy in anonymous memory above all (it would
    read back as zeros), is left alone."""
    base, size = mapping.ctypes.data, mapping.nbytes
    start, nbytes = data.data_ptr(), data.numel() * data.element_size()
    if not data.is_contiguous() or start < base or start + nbytes > base + size:
        return
    pages.advise(start, nbytes, pages.MADV_DONTNEED)    # not Linux: the pages stay until the kernel reclaims them
