// MoeMlp (moe.cpp): a sparse mixture-of-experts MLP (Qwen3-MoE, Mixtral) on GGUF experts, for the decode stack
// and, bound on its own, for every other step of such a model (prefill, mixed batches).
#pragma once
#include "ops.h"
#include <vector>

struct MoeMlp {
  at::Tensor router;                                  // [experts, hidden] float32, multiplied as F.linear does
  std::vector<std::vector<at::Tensor>> gate_up, down; // per expert: its GGUF parts (gate and up stacked)
  std::vector<std::vector<int64_t>> gate_up_types, down_types;
  int64_t top_k;
  bool norm_topk;                                     // renormalise the top-k probabilities to sum to 1
  bool int8;
  // checked: a contiguous float32 router [experts, hidden], per expert gate/up parts of 2 I rows and down parts of
  // `hidden` rows, 1 <= top_k <= experts
  static MoeMlp make(at::Tensor router, std::vector<std::vector<at::Tensor>> gate_up,
                     std::vector<std::vector<int64_t>> gate_up_types, std::vector<std::vector<at::Tensor>> down,
                     std::vector<std::vector<int64_t>> down_types, int64_t top_k, bool norm_topk, bool int8);
  // Qwen2-MoE: an always-on shared expert (silu gate/up, down) added to every row, scaled by sigmoid(x @ gate^T);
  // shared_gate undefined: none
  std::vector<at::Tensor> shared_gate_up, shared_down;
  std::vector<int64_t> shared_gate_up_types, shared_down_types;
  at::Tensor shared_gate;                             // [1, hidden] float32, multiplied as F.linear does
  void set_shared(at::Tensor gate, std::vector<at::Tensor> gate_up, std::vector<int64_t> gate_up_types,
                  std::vector<at::Tensor> down, std::vector<int64_t> down_types);
  // x [S, hidden] -> [S, hidden], bit-identical to lmserve/model/moe.py SparseMoeBlock (qwen2_moe.py's
  // SharedExpertMoeBlock with a shared expert) on the same kernels
  at::Tensor forward(const at::Tensor& x, int64_t max_dot_rows) const;
};
