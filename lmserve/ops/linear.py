"""quant_matmul: x @ W.T with W kept in a GGUF-derived block format (lmserve/model/quant.py's QuantWeight)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lmserve.ops.base import CustomOp, cpu_lib, register


@register
class QuantMatmulOp(CustomOp):
    name = "quant_matmul"

    def forward_native(self, x: torch.Tensor, qweight, bias: torch.Tensor | None = None) -> torch.Tensor:
        # dequantizes on every call: a reference, not a fast path (the runner attaches quantized twins only when
        # this op has a device arm)
        return F.linear(x, qweight.dequantize().to(x.dtype), bias)

    def forward_cpu(self, x: torch.Tensor, qweight, bias: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.empty(x.shape[0], qweight.q.shape[0], dtype=x.dtype, device=x.device)   # [rows, out_features]
        if qweight.int8_dot:     # bf16 modes on VNNI CPUs (model/quant.py for_int8_dot): activations as int8
            cpu_lib().quant_matmul_int8(out, x.contiguous(), qweight.q, qweight.d, qweight.m, qweight.fmt == "q4",
                                        qweight.has_m)
        else:
            cpu_lib().quant_matmul(out, x.contiguous(), qweight.q, qweight.d, qweight.m)
        return out if bias is None else out.add_(bias)
