// MoeMlp (moe.cpp): a sparse mixture-of-experts MLP (Qwen3-MoE) on GGUF experts, for the decode stack.
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
  // x [S, hidden] -> [S, hidden], bit-identical to lmserve/model/moe.py SparseMoeBlock on the same kernels
  at::Tensor forward(const at::Tensor& x, int64_t max_dot_rows) const;
};
