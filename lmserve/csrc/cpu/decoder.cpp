// DecoderStack: a decode step's whole layer stack (Llama / Qwen2 / Qwen3 / Qwen3-MoE / Mistral / Phi-3 / Gemma 3
// layers on GGUF weights) in one call from Python.
//
// Why: at batch 1 a layer is ~9 kernel calls of a few microseconds to a few hundred; from Python each costs
// ~10 us more of module calls, op-table dispatch, argument checks and tensor allocations (a 1B model's step
// spent ~2 ms of 21 there, SmolLM2's ~3 of 8; docs/benchmarks.md). This file calls the same kernel functions
// in the same order on the same inputs as the modules do (lmserve/model/llama.py, gemma3.py), so its output is
// bit-identical to theirs; lmserve/model/fused_decode.py builds it from a loaded model and decides when it runs.
#include "ops.h"
#include "decoder.h"
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/mul.h>

at::Tensor DecoderStack::linear(const Linear& l, const at::Tensor& x) const {
  auto out = at::empty({x.size(0), l.n}, x.options());
  gguf_matmul_parts(out, x, l.w, l.qtypes, l.int8, max_dot_rows_);
  if (l.bias) out.add_(*l.bias);
  return out;
}

at::Tensor DecoderStack::norm(const at::Tensor& x, const at::Tensor& w) const {
  auto out = at::empty_like(x);
  rms_norm(out, x, w, eps_);
  return out;
}

DecoderStack::Linear DecoderStack::make_linear(std::vector<at::Tensor> w, std::vector<int64_t> qtypes,
                                               c10::optional<at::Tensor> bias, bool int8) {
  TORCH_CHECK(w.size() == qtypes.size(), "DecoderStack: one type per weight part");
  int64_t n = 0;
  for (const auto& p : w) n += p.size(0);
  return Linear{std::move(w), std::move(qtypes), std::move(bias), int8, n};
}

DecoderStack::DecoderStack(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps,
                           at::Tensor final_norm, int64_t max_dot_rows)
    : nh_(num_heads), nkv_(num_kv_heads), hd_(head_dim), eps_(eps), final_norm_(std::move(final_norm)),
      max_dot_rows_(max_dot_rows) {}

void DecoderStack::add_layer(at::Tensor input_norm, at::Tensor ffn_norm, c10::optional<at::Tensor> post_attn_norm,
                             c10::optional<at::Tensor> post_ffn_norm, c10::optional<at::Tensor> q_norm,
                             c10::optional<at::Tensor> k_norm, double qk_eps,
                             std::vector<at::Tensor> qkv, std::vector<int64_t> qkv_types,
                             c10::optional<at::Tensor> qkv_bias, std::vector<at::Tensor> o,
                             std::vector<int64_t> o_types, std::vector<at::Tensor> gate_up,
                             std::vector<int64_t> gate_up_types, std::vector<at::Tensor> down,
                             std::vector<int64_t> down_types, bool int8, int64_t act, int64_t rope, double scale,
                             bool sliding) {
  TORCH_CHECK(act == 0 || act == 1, "DecoderStack: act is 0 (silu) or 1 (gelu tanh)");
  TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "DecoderStack: q and k norms come together");
  Layer l{std::move(input_norm), std::move(ffn_norm), std::move(post_attn_norm), std::move(post_ffn_norm),
          std::move(q_norm), std::move(k_norm), qk_eps,
          make_linear(std::move(qkv), std::move(qkv_types), std::move(qkv_bias), int8),
          make_linear(std::move(o), std::move(o_types), c10::nullopt, int8),
          make_linear(std::move(gate_up), std::move(gate_up_types), c10::nullopt, int8),
          make_linear(std::move(down), std::move(down_types), c10::nullopt, int8), act, rope, scale, sliding,
          nullptr};
  TORCH_CHECK(l.qkv.n == (nh_ + 2 * nkv_) * hd_ && l.o.n == final_norm_.numel() && !l.qkv.w.empty() &&
              !l.o.w.empty(), "DecoderStack: projection sizes do not match the heads and hidden size");
  layers_.push_back(std::move(l));
}

void DecoderStack::set_moe(at::Tensor router, std::vector<std::vector<at::Tensor>> gate_up,
                           std::vector<std::vector<int64_t>> gate_up_types, std::vector<std::vector<at::Tensor>> down,
                           std::vector<std::vector<int64_t>> down_types, int64_t top_k, bool norm_topk) {
  TORCH_CHECK(!layers_.empty() && layers_.back().gate_up.w.empty() && layers_.back().down.w.empty() &&
              layers_.back().act == 0 && !layers_.back().post_ffn_norm,
              "DecoderStack: set_moe follows a layer added without a dense silu MLP or post-MLP norm");
  TORCH_CHECK(router.dim() == 2 && router.size(1) == final_norm_.numel(), "DecoderStack: the router's columns "
              "are not the hidden size");
  layers_.back().moe = std::make_shared<MoeMlp>(MoeMlp::make(std::move(router), std::move(gate_up),
                                                             std::move(gate_up_types), std::move(down),
                                                             std::move(down_types), top_k, norm_topk,
                                                             layers_.back().o.int8));
}

void DecoderStack::set_moe_shared(at::Tensor gate, std::vector<at::Tensor> gate_up,
                                  std::vector<int64_t> gate_up_types, std::vector<at::Tensor> down,
                                  std::vector<int64_t> down_types) {
  TORCH_CHECK(!layers_.empty() && layers_.back().moe, "DecoderStack: set_moe_shared follows set_moe");
  layers_.back().moe->set_shared(std::move(gate), std::move(gate_up), std::move(gate_up_types), std::move(down),
                                 std::move(down_types));
}

at::Tensor DecoderStack::forward(at::Tensor x, std::vector<at::Tensor> cos, std::vector<at::Tensor> sin,
                                 at::Tensor slot_mapping, at::Tensor block_tables,
                                 at::Tensor context_lens, int64_t block_size, int64_t window,
                                 std::vector<at::Tensor> k_caches, std::vector<at::Tensor> v_caches) const {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat,
              "DecoderStack: x must be contiguous float32 [S, hidden]");
  TORCH_CHECK(k_caches.size() == layers_.size() && v_caches.size() == layers_.size() && cos.size() == sin.size(),
              "DecoderStack: one K and V cache per layer");
  const int64_t S = x.size(0);
  at::Tensor residual;
  for (size_t i = 0; i < layers_.size(); ++i) {
    const Layer& l = layers_[i];
    TORCH_CHECK(l.rope < (int64_t)cos.size(), "DecoderStack: no RoPE table ", l.rope);
    // DecoderLayer.forward: x, residual = input_layernorm(x [, residual])
    if (!residual.defined()) {
      residual = x;
      x = norm(x, l.input_norm);
    } else {
      add_rms_norm(x, residual, l.input_norm, eps_);
    }
    // Attention.forward
    auto qkv = linear(l.qkv, x);
    if (l.q_norm) rms_norm_heads(qkv, *l.q_norm, *l.k_norm, nh_, nkv_, hd_, l.qk_eps);
    auto q = at::empty({S, nh_, hd_}, x.options());
    rope_write_kv(q, qkv, cos[l.rope], sin[l.rope], k_caches[i], v_caches[i], slot_mapping, nh_, nkv_, hd_);
    auto o = at::empty_like(q);
    paged_decode_attention(o, q, k_caches[i], v_caches[i], block_tables, context_lens, block_size, l.scale,
                           l.sliding ? window : 0);
    x = linear(l.o, o.view({S, nh_ * hd_}));
    if (l.post_attn_norm) x = norm(x, *l.post_attn_norm);          // Gemma 3
    add_rms_norm(x, residual, l.ffn_norm, eps_);
    if (l.moe) {           // SparseMoeBlock.forward
      x = l.moe->forward(x, max_dot_rows_);
      continue;
    }
    // GatedMLP.forward
    auto gate_up = linear(l.gate_up, x);
    at::Tensor h;
    if (l.act == 0) {
      h = at::empty({S, gate_up.size(1) / 2}, x.options());
      silu_mul(h, gate_up);
    } else {      // ops.gelu_mul's reference: GeluMulOp has no CPU kernel
      auto parts = gate_up.chunk(2, -1);
      h = at::mul(at::gelu(parts[0], "tanh"), parts[1]);
    }
    x = linear(l.down, h);
    if (l.post_ffn_norm) x = norm(x, *l.post_ffn_norm);            // Gemma 3
  }
  add_rms_norm(x, residual, final_norm_, eps_);                       // LlamaModel.norm
  return x;
}
