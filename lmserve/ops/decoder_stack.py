"""decoder_stack: a decode step's whole layer stack in one kernel call (csrc/cpu/decoder.cpp).

A batch-1 decode step calls ~9 kernels per layer; from Python each call also pays ~10 us of module calls, op-table
dispatch, checks and allocations, which at 1B is ~10% of the step and at 135M over a third (docs/benchmarks.md).
The C++ stack calls the same kernel functions in the same order as the model's modules, so its result is
bit-identical to theirs. There is no PyTorch reference arm: where no kernel runs, `decoder_stack` returns None
and the model's own layers (whose ops have references) are the path; they are also what tests compare it with.

The spec is plain data (model/fused_decode.py reads it off the modules): ops do not know model classes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lmserve.ops.base import CustomOp, cpu_lib, register
from lmserve.ops.gguf_blocks import GGUFWeight
from lmserve.ops.linear import DOT_MAX_ROWS, _QTYPE_ID

# the ops the stack runs: it stands in for them only where every one of them has its CPU kernel
STACK_OPS = ("rms_norm", "add_rms_norm", "rms_norm_heads", "rope_write_kv", "decode_attention", "gguf_matmul",
             "silu_mul")


@dataclass
class LinearSpec:
    parts: list[GGUFWeight]          # stacked along the outputs, as GGUFLinear holds them
    int8: bool
    bias: torch.Tensor | None = None


@dataclass
class MoeSpec:
    router: torch.Tensor             # [experts, hidden] float32: the router's plain float weight
    experts: list[tuple[LinearSpec, LinearSpec]]      # per expert (gate_up, down)
    top_k: int
    norm_topk: bool
    # Qwen2-MoE's shared expert: (gate_up, down, gate [1, hidden] float32), added scaled by sigmoid(x @ gate^T)
    shared: tuple[LinearSpec, LinearSpec, torch.Tensor] | None = None

    def linears(self) -> list[LinearSpec]:
        return [lin for pair in self.experts for lin in pair] + ([] if self.shared is None else list(self.shared[:2]))


@dataclass
class LayerSpec:
    input_norm: torch.Tensor
    ffn_norm: torch.Tensor           # the norm before the MLP (Llama: post_attention_layernorm)
    qkv: LinearSpec
    o: LinearSpec
    gate_up: LinearSpec | None       # None where the MLP is `moe`
    down: LinearSpec | None
    act: str                         # "silu" or "gelu_pytorch_tanh"
    rope: int                        # index of the layer's cos/sin table
    scale: float
    sliding: bool                    # the step's sliding window applies
    post_attn_norm: torch.Tensor | None = None     # Gemma 3
    post_ffn_norm: torch.Tensor | None = None      # Gemma 3
    q_norm: torch.Tensor | None = None             # Qwen3, Gemma 3
    k_norm: torch.Tensor | None = None
    qk_eps: float = 0.0
    moe: MoeSpec | None = None                     # Qwen3-MoE's sparse layers (silu experts)


@dataclass
class StackSpec:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    final_norm: torch.Tensor
    layers: list[LayerSpec]


_ACTS = {"silu": 0, "gelu_pytorch_tanh": 1}


def supported(linear: LinearSpec) -> bool:
    return all(p.qtype in _QTYPE_ID for p in linear.parts)


def _linear_args(lin: LinearSpec) -> tuple[list[torch.Tensor], list[int]]:
    return [p.data for p in lin.parts], [_QTYPE_ID[p.qtype] for p in lin.parts]


@register
class DecoderStackOp(CustomOp):
    """decoder_stack(spec: StackSpec) -> stack or None; `stack.forward(x, cos_list, sin_list, slot_mapping,
    block_tables, context_lens, block_size, window, k_caches, v_caches)` -> final normed hidden [S, hidden]."""
    name = "decoder_stack"

    def forward_native(self, spec: StackSpec):
        return None

    def forward_cpu(self, spec: StackSpec):
        stack = cpu_lib().DecoderStack(spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.eps,
                                       spec.final_norm.detach(), DOT_MAX_ROWS)
        def detach(t):
            return None if t is None else t.detach()
        for s in spec.layers:
            mlp = [s.gate_up, s.down] if s.moe is None else s.moe.linears()
            linears = [s.qkv, s.o, *mlp]
            int8 = {lin.int8 for lin in linears}
            if len(int8) != 1 or any(lin.bias is not None for lin in linears[1:]):
                return None     # the kernel takes one activation precision per layer and a bias on q/k/v only
            (qkv, qkv_t), (o, o_t) = _linear_args(s.qkv), _linear_args(s.o)
            (gu, gu_t), (down, down_t) = ([], []), ([], [])
            if s.moe is None:
                (gu, gu_t), (down, down_t) = _linear_args(s.gate_up), _linear_args(s.down)
            stack.add_layer(s.input_norm.detach(), s.ffn_norm.detach(), detach(s.post_attn_norm),
                            detach(s.post_ffn_norm), detach(s.q_norm), detach(s.k_norm), s.qk_eps, qkv, qkv_t,
                            detach(s.qkv.bias), o, o_t, gu, gu_t, down, down_t, int8.pop(), _ACTS[s.act], s.rope,
                            s.scale, s.sliding)
            if s.moe is not None:
                stack.set_moe(*_moe_args(s.moe))
                if s.moe.shared is not None:
                    stack.set_moe_shared(*_shared_args(s.moe))
        return stack


def _moe_args(spec: MoeSpec) -> tuple:
    gate_ups = [_linear_args(gate_up) for gate_up, _ in spec.experts]
    downs = [_linear_args(down) for _, down in spec.experts]
    return (spec.router.detach().contiguous(), [w for w, _ in gate_ups], [t for _, t in gate_ups],
            [w for w, _ in downs], [t for _, t in downs], spec.top_k, spec.norm_topk)


def _shared_args(spec: MoeSpec) -> tuple:
    gate_up, down, gate = spec.shared
    return (gate.detach().contiguous(), *_linear_args(gate_up), *_linear_args(down))


@register
class MoeMlpOp(CustomOp):
    """moe_mlp(spec: MoeSpec) -> a callable x [T, hidden] -> [T, hidden] running the sparse block in one kernel call
    (csrc/cpu/moe.cpp, the decode stack's MoE layer), or None: SparseMoeBlock's own loop over experts runs.

    From Python a prefill step of a 128-expert model makes two GGUF matmul calls per expert that got tokens, each its
    own parallel region; the kernel runs all experts' gate/up in one region and their down in another, with the
    module's steps, order and kernels, so bit-identical to it."""
    name = "moe_mlp"

    def forward_native(self, spec: MoeSpec):
        return None

    def forward_cpu(self, spec: MoeSpec):
        int8 = {lin.int8 for lin in spec.linears()}
        if len(int8) != 1 or not all(supported(lin) and lin.bias is None for lin in spec.linears()):
            return None
        kernel = cpu_lib().MoeMlp(*_moe_args(spec), int8.pop())
        if spec.shared is not None:
            kernel.set_shared(*_shared_args(spec))
        return lambda x: kernel.forward(x.contiguous(), DOT_MAX_ROWS)
