"""FusedDecode: a decode step's layers in one kernel call (ops.make_decoder_stack, csrc/cpu/decoder.cpp).

Built once per loaded model by the model runner, for the decoders whose layers are exactly Llama's (Llama, Qwen2,
Mistral, Phi-3 / Phi-4-mini with their partial rotary and LongRoPE tables), Qwen3's or Gemma 3's with every
projection on GGUF blocks, and only where all the ops the layers call run their CPU kernels; otherwise `build`
returns None and the modules run as always. It reads the layers' weights into a plain spec (ops do not know model
classes) and runs steps in which every row is a decode row. The result is bit-identical to the modules'
(tests/test_fused_decode.py), which stay the reference and the path for prefill, LoRA, tensor parallelism and the
other architectures.
"""
from __future__ import annotations

import torch

from lmserve import ops
from lmserve.model.attention import AttentionMetadata
from lmserve.model.gemma3 import Gemma3DecoderLayer, Gemma3ForCausalLM
from lmserve.model.layers import GatedMLP, Linear, RowParallelLinear
from lmserve.model.llama import Attention, DecoderLayer, LlamaForCausalLM
from lmserve.model.phi3 import Phi3ForCausalLM
from lmserve.model.qwen3 import QKNormAttention, Qwen3DecoderLayer, Qwen3ForCausalLM
from lmserve.ops.decoder_stack import STACK_OPS, LayerSpec, LinearSpec, StackSpec, supported
from lmserve.ops.linear_method import GGUFLinear

_MODELS = (LlamaForCausalLM, Qwen3ForCausalLM, Gemma3ForCausalLM, Phi3ForCausalLM)
_LAYERS = (DecoderLayer, Qwen3DecoderLayer, Gemma3DecoderLayer)
_ATTENTIONS = (Attention, QKNormAttention)


def _linear(module) -> LinearSpec | None:
    method = module.linear_method
    if type(module) not in (Linear, RowParallelLinear) or type(method) is not GGUFLinear or module.lora is not None:
        return None
    spec = LinearSpec(list(method.parts), method.int8, module.bias)
    return spec if supported(spec) else None


def _layer(model, layer) -> LayerSpec | None:
    attn, mlp = layer.self_attn, layer.mlp
    if type(layer) not in _LAYERS or type(attn) not in _ATTENTIONS or type(mlp) is not GatedMLP or \
            mlp.act_name not in ("silu", "gelu_pytorch_tanh"):
        return None
    linears = [_linear(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
    if any(lin is None for lin in linears):
        return None
    gemma = isinstance(layer, Gemma3DecoderLayer)
    qk = isinstance(attn, QKNormAttention)
    return LayerSpec(
        input_norm=layer.input_layernorm.weight,
        ffn_norm=(layer.pre_feedforward_layernorm if gemma else layer.post_attention_layernorm).weight,
        qkv=linears[0], o=linears[1], gate_up=linears[2], down=linears[3], act=mlp.act_name,
        rope=model.layer_rope(layer), scale=attn.scale, sliding=not attn.is_full_attention,
        post_attn_norm=layer.post_attention_layernorm.weight if gemma else None,
        post_ffn_norm=layer.post_feedforward_layernorm.weight if gemma else None,
        q_norm=attn.q_norm.weight if qk else None, k_norm=attn.k_norm.weight if qk else None,
        qk_eps=attn.q_norm.eps if qk else 0.0)


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
