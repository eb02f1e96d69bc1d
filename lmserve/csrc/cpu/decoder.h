// DecoderStack (decoder.cpp): a decode step's layer stack on GGUF weights in one call.
#pragma once
#include "ops.h"
#include "moe.h"
#include <memory>
#include <vector>

class DecoderStack {
 public:
  DecoderStack(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps, at::Tensor final_norm,
               int64_t max_dot_rows);
  // one decoder layer, in order; optional norms are Gemma 3's (post_attn_norm, post_ffn_norm) and Qwen3's / Gemma
  // 3's per-head q/k norms; act 0 = silu, 1 = gelu (tanh); rope = index of its cos/sin table in forward's lists
  void add_layer(at::Tensor input_norm, at::Tensor ffn_norm, c10::optional<at::Tensor> post_attn_norm,
                 c10::optional<at::Tensor> post_ffn_norm, c10::optional<at::Tensor> q_norm,
                 c10::optional<at::Tensor> k_norm, double qk_eps, std::vector<at::Tensor> qkv,
                 std::vector<int64_t> qkv_types, c10::optional<at::Tensor> qkv_bias, std::vector<at::Tensor> o,
                 std::vector<int64_t> o_types, std::vector<at::Tensor> gate_up, std::vector<int64_t> gate_up_types,
                 std::vector<at::Tensor> down, std::vector<int64_t> down_types, bool int8, int64_t act,
                 int64_t rope, double scale, bool sliding);
  // the last added layer's MLP is this sparse MoE (its gate_up / down lists were left empty): the router's float
  // weight and each expert's GGUF parts; the activation is silu
  void set_moe(at::Tensor router, std::vector<std::vector<at::Tensor>> gate_up,
               std::vector<std::vector<int64_t>> gate_up_types, std::vector<std::vector<at::Tensor>> down,
               std::vector<std::vector<int64_t>> down_types, int64_t top_k, bool norm_topk);
  // the last layer's MoE MLP also has a shared expert (MoeMlp::set_shared)
  void set_moe_shared(at::Tensor gate, std::vector<at::Tensor> gate_up, std::vector<int64_t> gate_up_types,
                      std::vector<at::Tensor> down, std::vector<int64_t> down_types);
  // x: the embedded tokens [S, hidden] float32, one per sequence (modified in place) -> final normed hidden
  at::Tensor forward(at::Tensor x, std::vector<at::Tensor> cos, std::vector<at::Tensor> sin,
                     at::Tensor slot_mapping, at::Tensor block_tables, at::Tensor context_lens,
                     int64_t block_size, int64_t window, std::vector<at::Tensor> k_caches,
                     std::vector<at::Tensor> v_caches) const;
  int64_t num_layers() const { return (int64_t)layers_.size(); }

 private:
  struct Linear {
    std::vector<at::Tensor> w;        // GGUF parts stacked along the outputs
    std::vector<int64_t> qtypes;
    c10::optional<at::Tensor> bias;
    bool int8;
    int64_t n;                        // output features
  };
  struct Layer {
    at::Tensor input_norm, ffn_norm;
    c10::optional<at::Tensor> post_attn_norm, post_ffn_norm, q_norm, k_norm;
    double qk_eps;
    Linear qkv, o, gate_up, down;           // gate_up / down: none (n == 0) where the MLP is `moe`
    int64_t act, rope;
    double scale;
    bool sliding;
    std::shared_ptr<MoeMlp> moe;
  };
  static Linear make_linear(std::vector<at::Tensor> w, std::vector<int64_t> qtypes,
                            c10::optional<at::Tensor> bias, bool int8);
  at::Tensor linear(const Linear& l, const at::Tensor& x) const;
  at::Tensor norm(const at::Tensor& x, const at::Tensor& w) const;

  int64_t nh_, nkv_, hd_;
  double eps_;
  at::Tensor final_norm_;
  int64_t max_dot_rows_;
  std::vector<Layer> layers_;
};
