"""LinearMethod: how one linear layer multiplies, picked once per layer at load (vLLM's quant_method idea).

    FloatLinear   the float weight (plain F.linear; --weights float, safetensors models, F16/F32 GGUF matrices)
    PackedLinear  a packed copy of that weight for oneDNN GEMMs (and/or a bfloat16 one with --dtype bfloat16)
    GGUFLinear    the GGUF blocks as they lie in the mmap'd file (ops.gguf_matmul); no float copy exists

A method is called as `method(x, bias)` -> x @ W.T (+ bias) and, for embeddings (and the tied output head, which
shares the embedding's method), `method.embed(ids)` -> rows of W. Model files only ever call these two, so
`Linear.forward` and the logits are one line each whatever the weight's form.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lmserve import ops


class LinearMethod:
    kind = ""

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:  # [T, K] -> [T, N]
        raise NotImplementedError

    def embed(self, ids: torch.Tensor) -> torch.Tensor:    # [T] -> [T, K]
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return 0


class FloatLinear(LinearMethod):
    kind = "float"

    def __init__(self, weight: torch.Tensor):
        self.weight = weight       # the module's Parameter itself (load_weights fills it in place)

    def __call__(self, x, bias=None):
        return F.linear(x, self.weight, bias)

    def embed(self, ids):
        return F.embedding(ids, self.weight)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


class PackedLinear(FloatLinear):
    kind = "packed"

    def __init__(self, weight: torch.Tensor, packed: torch.Tensor):
        super().__init__(weight)
        self.packed = packed       # see make_fast_weight; the plain weight stays for embedding lookups

    def __call__(self, x, bias=None):
        return fast_linear(x, self.packed, bias)


class GGUFLinear(LinearMethod):
    """The layer's weight as GGUF blocks: one GGUFWeight, or several stacked along the outputs (fused q/k/v and
    gate/up, possibly of different types as in Q4_K_M files) in one gguf_matmul call, so nothing is concatenated."""
    kind = "gguf"

    def __init__(self, parts: list, dtype: torch.dtype = torch.float32, int8: bool = False):
        self.parts = parts         # [GGUFWeight], rows in output order
        self.dtype = dtype         # of embedding rows
        self.int8 = int8           # activations quantized to int8 (--quant-activations; not exact)

    @property
    def shape(self) -> tuple[int, int]:
        return sum(p.shape[0] for p in self.parts), self.parts[0].shape[1]

    def __call__(self, x, bias=None):
        out = ops.gguf_matmul(x, self.parts[0] if len(self.parts) == 1 else self.parts, None, self.int8)
        return out if bias is None else out.add_(bias)

    def embed(self, ids):
        assert len(self.parts) == 1, "an embedding is one matrix"
        return ops.gguf_dequantize(self.parts[0], ids).to(self.dtype)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


def fast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (float32) @ weight.T in weight's dtype (float32 or lower); the result comes back as float32."""
    xl = x.to(weight.dtype)
    if weight.is_mkldnn:
        out = torch.ops.mkldnn._linear_pointwise(xl, weight, None, "none", [], "")
    else:
        out = F.linear(xl, weight)
    out = out.to(x.dtype)
    return out if bias is None else out.add_(bias)


def make_fast_weight(weight: torch.Tensor, dtype: torch.dtype, pack: bool = True) -> torch.Tensor | None:
    """A copy of a [out, in] weight for fast_linear, in `dtype`, on CPU pre-packed in oneDNN's blocked layout
    when this torch build offers it: 1.15-1.6x MKL's float32 GEMM rate at decode/prefill sizes (2.6x on the wide
    output projection), 1.2-1.4x for bfloat16 (docs/benchmarks.md). Without packing: a plain lower-precision
    copy, or None when that would merely duplicate the weight. pack=False (--kernels torch): never packed."""
    w = weight.detach().to(dtype).contiguous()
    plain = None if dtype == weight.dtype else w
    if not pack or w.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return plain
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 64)
        probe = torch.randn(3, w.shape[1], dtype=dtype)
        ok = torch.allclose(torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], "").float(),
                            F.linear(probe, w).float(), rtol=1e-2, atol=1e-2)
        return packed if ok else plain
    except (RuntimeError, AttributeError):    # private op missing or unsupported here
        return plain


def packed_method(method: LinearMethod, dtype: torch.dtype, pack: bool = True) -> LinearMethod:
    """A float layer's method with a packed / lower-precision copy when one helps; other methods unchanged."""
    if type(method) is not FloatLinear:
        return method
    fast = make_fast_weight(method.weight, dtype, pack)
    return method if fast is None else PackedLinear(method.weight, fast)


def unpacked_method(method: LinearMethod) -> LinearMethod:
    """Drop a packed copy (stale after a live weight update)."""
    return FloatLinear(method.weight) if isinstance(method, PackedLinear) else method
