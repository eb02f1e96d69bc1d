"""The op layer: every tensor op a model file needs beyond plain matmuls, with one PyTorch reference each and
optional device kernels (CPU C++ today, CUDA later), picked once per model (see base.py).

Model code calls these functions and never sees which implementation runs:

    x = ops.rms_norm(x, self.weight, self.eps)

| op                | call                                                                  | returns / notes                    |
|-------------------|-----------------------------------------------------------------------|------------------------------------|
| rms_norm          | rms_norm(x [T, H], weight [H], eps)                                   | [T, H], new tensor                 |
| add_rms_norm      | add_rms_norm(x [T, H], residual [T, H], weight, eps)                  | (rms_norm(x + residual), x + residual); MAY overwrite x and residual in place |
| rms_norm_heads    | rms_norm_heads(qkv [T, (h+2kvh)d], q_weight [d], k_weight [d], h, kvh, d, eps) | qkv, its q and k heads normed in place |
| silu_mul          | silu_mul(gate_up [T, 2I])                                             | silu(gate) * up, [T, I]            |
| gelu_mul          | gelu_mul(gate_up [T, 2I], approximate="tanh")                         | gelu(gate) * up, [T, I]            |
| apply_rope        | apply_rope(q [T, h, d], k [T, kvh, d], cos, sin [T, 1, d/2])           | (q, k) rotated (HF rotate_half)    |
| write_kv          | write_kv(k_cache, v_cache, k [T, kvh, d], v, slot_mapping [T])        | None; rows cast to the cache dtype |
| rope_write_kv     | rope_write_kv(qkv [T, (h+2kvh)d], cos, sin, k_cache, v_cache, slot_mapping, h, kvh, d) | q [T, h, d] rotated; k rotated and v written to the cache |
| gguf_matmul       | gguf_matmul(x [T, K], w: GGUFWeight [N, K] or a list, bias=None, int8=False) | x @ W.T (+ bias), [T, N]; int8: activations quantized (linear.py) |
| gguf_dequantize   | gguf_dequantize(w: GGUFWeight, rows: LongTensor | None = None)        | float32 [len(rows) or N, K]        |
| gguf_repack       | gguf_repack(w: GGUFWeight Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / Q4_K / Q5_K / Q6_K / Q3_K / Q2_K / IQ4_XS / MXFP4 / IQ4_NL, N % 8 == 0) | the same bytes in 8-row groups (GGUFWeight "Q4_0x8", "Q4_Kx8", "Q6_Kx8", "Q5_0x8", "Q4_1x8", "Q3_Kx8", "Q2_Kx8", "IQ4_XSx8", "Q5_Kx8", "Q8_0x8", "Q5_1x8", "MXFP4x8", "IQ4_NLx8") |
| decode_attention  | decode_attention(q [S, h, d], k_cache, v_cache, decode: DecodeBatch, block_size, scale, sliding_window=None) | [S, h, d] |
| prefill_attention | prefill_attention(q [T, h, d], k_cache, v_cache, group: AttentionGroup, scale) | [S * q_len, h, d], rows of group.token_index |
| decoder_stack     | make_decoder_stack(spec: decoder_stack.StackSpec)                     | a C++ object running a decode step's layers in one call, or None (no kernel: the modules run) |
| moe_mlp           | make_moe_mlp(spec: decoder_stack.MoeSpec)                             | a callable x [T, H] -> [T, H] running a sparse MoE block in one call, or None (the module's loop runs) |

Caches: [num_blocks * block_size, kv_heads, head_dim] in float32 or bfloat16 (reads widen to q's dtype).

Choosing: `table = ops.select(device, dtype, kernels="auto" | "torch")` once at model load; `with ops.use(table):`
around the forward pass (the model runner does both). With no table active the references run.
"""
from __future__ import annotations

from lmserve.ops import activation, attention, decoder_stack, linear, norm, rope  # noqa: F401  (registers the ops)
from lmserve.ops.base import CustomOp, OpTable, current, register, select, use  # noqa: F401


def rms_norm(x, weight, eps):
    return current().rms_norm(x, weight, eps)


def add_rms_norm(x, residual, weight, eps):
    return current().add_rms_norm(x, residual, weight, eps)


def rms_norm_heads(qkv, q_weight, k_weight, num_heads, num_kv_heads, head_dim, eps):
    return current().rms_norm_heads(qkv, q_weight, k_weight, num_heads, num_kv_heads, head_dim, eps)


def silu_mul(gate_up):
    return current().silu_mul(gate_up)


def gelu_mul(gate_up, approximate: str = "tanh"):
    return current().gelu_mul(gate_up, approximate)


def apply_rope(q, k, cos, sin):
    return current().apply_rope(q, k, cos, sin)


def write_kv(k_cache, v_cache, k, v, slot_mapping):
    return current().write_kv(k_cache, v_cache, k, v, slot_mapping)


def rope_write_kv(qkv, cos, sin, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads, head_dim):
    return current().rope_write_kv(qkv, cos, sin, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads, head_dim)


def gguf_matmul(x, w, bias=None, int8=False):
    return current().gguf_matmul(x, w, bias, int8)


def gguf_dequantize(w, rows=None):
    return current().gguf_dequantize(w, rows)


def gguf_repack(w):
    return current().gguf_repack(w)


def decode_attention(q, k_cache, v_cache, decode, block_size, scale, sliding_window=None):
    return current().decode_attention(q, k_cache, v_cache, decode, block_size, scale, sliding_window)


def prefill_attention(q, k_cache, v_cache, group, scale):
    return current().prefill_attention(q, k_cache, v_cache, group, scale)


def make_decoder_stack(spec):
    return current().decoder_stack(spec)


def make_moe_mlp(spec):
    return current().moe_mlp(spec)
