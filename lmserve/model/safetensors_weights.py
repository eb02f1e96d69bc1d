"""bfloat16 / float16 matrices of a Hugging Face safetensors checkpoint -> GGUFWeight views of the mapped files.

A safetensors file is an 8-byte header length, a JSON header (dtype, shape, byte range of each tensor) and the
tensors' bytes, row-major: a 16-bit [N, K] matrix is exactly what the kernels read as type BF16 / F16 (rows of
K / 32 "blocks" of 64 bytes). So such matrices are served in place like a GGUF file's (model/gguf_weights.py):
a read-only np.memmap per file, pages shared with every process serving the checkpoint, no float32 copy.
A tensor-parallel slice is a view too: whole rows, or a column range (rows keep their stride).
"""
from __future__ import annotations

import json
import struct

import numpy as np

from lmserve.model import pages
from lmserve.model.gguf_weights import repacked
from lmserve.model.hf_checkpoint import safetensors_files
from lmserve.model.parallel import shard_spec
from lmserve.ops.gguf_blocks import GGUFWeight

_TYPES = {"BF16": "BF16", "F16": "F16"}     # safetensors dtype -> kernel type


def read_header(path: str) -> tuple[dict, int]:
    """-> (tensor name -> {dtype, shape, data_offsets}, offset of the data section)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def has_16bit_matrices(path: str) -> bool:
    """Whether a checkpoint directory holds 2-D bfloat16 / float16 tensors (what this module can serve)."""
    for file in safetensors_files(path):
        header, _ = read_header(file)
        if any(t["dtype"] in _TYPES and len(t["shape"]) == 2 for t in header.values()):
            return True
    return False


def safetensors_weights(path: str, cfg, repack: bool = False) -> dict[str, GGUFWeight]:
    """HF parameter name -> GGUFWeight (BF16 / F16) for every 2-D 16-bit matrix whose rows are whole groups of 32
    values and whose tensor-parallel slice (if any) is a view; the rest loads as float. repack (the non-exact
    mode, --gguf-repack auto): F16 matrices as BF16 where the kernels would round them so anyway
    (ops.gguf_repack), their mapped pages released."""
    out = {}
    for file in safetensors_files(path):
        header, start = read_header(file)
        mm = None
        for name, t in header.items():
            if t["dtype"] not in _TYPES or len(t["shape"]) != 2 or t["shape"][1] % 32:
                continue
            if mm is None:
                mm = np.memmap(file, dtype=np.uint8, mode="r")
            n, k = t["shape"]
            b0, b1 = t["data_offsets"]
            data = pages.shared_view(mm[start + b0:start + b1]).view(n, 2 * k)
            spec = shard_spec(name, cfg)
            if spec is not None:
                dim, s0, size = spec
                if dim == 0 and s0 + size <= n:
                    data, n = data[s0:s0 + size], size
                elif dim == 1 and s0 % 32 == 0 and size % 32 == 0 and s0 + size <= k:
                    data, k = data[:, 2 * s0:2 * (s0 + size)], size
                else:       # a padded vocabulary split or a cut through a group: float
                    continue
            w = GGUFWeight(_TYPES[t["dtype"]], data, (n, k))
            out[name] = repacked(w, mm) if repack else w
    return out
