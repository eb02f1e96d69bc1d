"""FusedDecode: a decode step's layers in one kernel call (ops.make_decoder_stack, csrc/cpu/decoder.cpp).

Built once per loaded model by the model runner, for the decoders whose layers are exactly Llama's (Llama, Qwen2,
Mistral, Phi-3 / Phi-4-mini with their partial rotary and LongRoPE tables), Qwen3's, Qwen3-MoE's, Mixtral's and
Qwen2-MoE's (experts on GGUF blocks, a float router) or Gemma 3's with every projection on GGUF blocks, and only
where all the ops the layers call run their CPU kernels; otherwise `build` returns None and the modules run as
always. It reads the layers' weights into a plain spec (ops do not know model classes) and runs steps in which every
row is a decode row. The result is bit-identical to the modules' (tests/test_fused_decode.py), which stay the
reference and the path for prefill, LoRA, tensor parallelism and the other architectures.
"""
from __future__ import annotations

import torch

from lmserve import ops
from lmserve.model.attention import AttentionMetadata
from lmserve.model.gemma3 import Gemma3DecoderLayer, Gemma3ForCausalLM
from lmserve.model.layers import GatedMLP, Linear, RowParallelLinear
from lmserve.model.llama import Attention, DecoderLayer, LlamaForCausalLM
from lmserve.model.mixtral import MixtralDecoderLayer, MixtralForCausalLM
from lmserve.model.moe import SparseMoeBlock
from lmserve.model.phi3 import Phi3ForCausalLM
from lmserve.model.qwen2_moe import Qwen2MoeDecoderLayer, Qwen2MoeForCausalLM, SharedExpertMoeBlock
from lmserve.model.qwen3 import QKNormAttention, Qwen3DecoderLayer, Qwen3ForCausalLM
from lmserve.model.qwen3_moe import Qwen3MoeDecoderLayer, Qwen3MoeForCausalLM
from lmserve.ops.decoder_stack import STACK_OPS, LayerSpec, LinearSpec, MoeSpec, StackSpec, supported
from lmserve.ops.linear_method import FloatLinear, GGUFLinear

_MODELS = (LlamaForCausalLM, Qwen3ForCausalLM, Gemma3ForCausalLM, Phi3ForCausalLM, Qwen3MoeForCausalLM,
           MixtralForCausalLM, Qwen2MoeForCausalLM)
_LAYERS = (DecoderLayer, Qwen3DecoderLayer, Gemma3DecoderLayer, Qwen3MoeDecoderLayer, MixtralDecoderLayer,
           Qwen2MoeDecoderLayer)
_ATTENTIONS = (Attention, QKNormAttention)


def _gguf(method, bias=None) -> LinearSpec | None:
    spec = LinearSpec(list(method.parts), method.int8, bias) if type(method) is GGUFLinear else None
    return spec if spec is not None and supported(spec) else None


def _linear(module) -> LinearSpec | None:
    if type(module) not in (Linear, RowParallelLinear) or module.lora is not None:
        return None
    return _gguf(module.linear_method, module.bias)


def _float_gate(gate) -> bool:
    """A plain float32 F.linear without bias or adapter (the kernel multiplies it as F.linear does)."""
    return type(gate) is Linear and gate.lora is None and gate.bias is None and \
        type(gate.linear_method) is FloatLinear and gate.weight.dtype == torch.float32


def _moe(block: SparseMoeBlock) -> MoeSpec | None:
    """The sparse block on GGUF experts with a float32 router (and Qwen2-MoE's shared expert on GGUF blocks)."""
    experts = block.experts
    if not _float_gate(block.gate) or experts.methods is None or experts.act is not ops.silu_mul:
        return None
    pairs = [(_gguf(gate_up), _gguf(down)) for gate_up, down in experts.methods]
    if any(a is None or b is None for a, b in pairs):
        return None
    shared = None
    if type(block) is SharedExpertMoeBlock:
        mlp = block.shared_expert
        shared = (_linear(mlp.gate_up_proj), _linear(mlp.down_proj), block.shared_expert_gate.weight)
        if type(mlp) is not GatedMLP or mlp.act_name != "silu" or None in shared[:2] or \
                not _float_gate(block.shared_expert_gate):
            return None
    elif type(block) is not SparseMoeBlock:
        return None
    return MoeSpec(block.gate.weight, pairs, block.top_k, block.norm_topk_prob, shared)


def _layer(model, layer) -> LayerSpec | None:
    attn, mlp = layer.self_attn, layer.mlp
    if type(layer) not in _LAYERS or type(attn) not in _ATTENTIONS:
        return None
    moe = _moe(mlp) if isinstance(mlp, SparseMoeBlock) else None
    if moe is None and (type(mlp) is not GatedMLP or mlp.act_name not in ("silu", "gelu_pytorch_tanh")):
        return None
    dense = (mlp.gate_up_proj, mlp.down_proj) if moe is None else ()
    linears = [_linear(m) for m in (attn.qkv_proj, attn.o_proj, *dense)]
    if any(lin is None for lin in linears):
        return None
    linears += [None] * (4 - len(linears))
    gemma = isinstance(layer, Gemma3DecoderLayer)
    qk = isinstance(attn, QKNormAttention)
    return LayerSpec(
        input_norm=layer.input_layernorm.weight,
        ffn_norm=(layer.pre_feedforward_layernorm if gemma else layer.post_attention_layernorm).weight,
        qkv=linears[0], o=linears[1], gate_up=linears[2], down=linears[3], act="silu" if moe else mlp.act_name,
        rope=model.layer_rope(layer), scale=attn.scale, sliding=not attn.is_full_attention,
        post_attn_norm=layer.post_attention_layernorm.weight if gemma else None,
        post_ffn_norm=layer.post_feedforward_layernorm.weight if gemma else None,
        q_norm=attn.q_norm.weight if qk else None, k_norm=attn.k_norm.weight if qk else None,
        qk_eps=attn.q_norm.eps if qk else 0.0, moe=moe)


def attach_moe_kernels(model, table: ops.OpTable) -> int:
    """Give every sparse block the decode stack could run (GGUF experts, float32 router and gates) its own one-call
    kernel, for the steps the stack does not take (prefill, mixed batches); -> how many got one."""
    count = 0
    with ops.use(table):
        for block in model.modules():
            if isinstance(block, SparseMoeBlock) and model.cfg.tp_size == 1 and (spec := _moe(block)) is not None:
                block.kernel = ops.make_moe_mlp(spec)
                count += block.kernel is not None
    return count


class FusedDecode:
    def __init__(self, model, stack):
        self.model, self.stack = model, stack

    @staticmethod
    def build(model, table: ops.OpTable) -> "FusedDecode | None":
        """The fused path for this model under this op table, or None where the modules must run."""
        cfg = model.cfg
        if type(model) not in _MODELS or cfg.tp_size != 1 or any(table.is_native(n) for n in STACK_OPS):
            return None
        layers = [_layer(model, layer) for layer in model.model.layers]
        if not layers or any(spec is None for spec in layers):
            return None
        attn = model.model.layers[0].self_attn
        spec = StackSpec(attn.num_heads, attn.num_kv_heads, attn.head_dim, model.model.norm.eps,
                         model.model.norm.weight, layers)
        with ops.use(table):
            stack = ops.make_decoder_stack(spec)
        return None if stack is None else FusedDecode(model, stack)

    @staticmethod
    def applies(meta: AttentionMetadata) -> bool:
        """Every row of the step is one sequence's next token (no prefill, no speculative verification)."""
        return meta.decode is not None and meta.decode.token_rows is None and not meta.groups

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                 kv_caches) -> torch.Tensor:
        """-> final normed hidden states [num_seqs, hidden], as model(input_ids, positions, meta, kv_caches)."""
        x = self.model.embed(input_ids).contiguous()
        ropes = self.model.rope_tables(positions, x.dtype)
        d = meta.decode
        return self.stack.forward(x, [c for c, _ in ropes], [s for _, s in ropes], meta.slot_mapping,
                                  d.block_tables, d.context_lens, meta.block_size, meta.sliding_window or 0,
                                  [k for k, _ in kv_caches], [v for _, v in kv_caches])
