// MoeMlp: a sparse MoE MLP's rows in one call, from the decode stack (decoder.cpp) or from SparseMoeBlock.forward
// for the other steps (prefill, mixed batches: ops.moe_mlp).
//
// Why: from Python a Qwen3-MoE layer's MLP is ~25 op calls at batch 1 (router, softmax, top-k, sort, gathers, two
// GGUF matmuls per selected expert, the weighted sum), ~10-15 us each of dispatch around ~30 us of kernel work per
// expert matmul, and each matmul is its own parallel region. Here the routed experts' gate/up matmuls run in one
// parallel region and their down matmuls in another (gguf_matmul_groups), and the bookkeeping is plain loops. The
// steps are lmserve/model/moe.py's, in its order and with the same kernels, so the result is bit-identical to it:
// the router through at::linear (the module's F.linear on a float32 weight), ATen's softmax and top-k, pairs
// ordered by expert as a stable sort does, each expert's rows in one matmul (a row's result does not depend on
// the others'), the products summed per token in pair order as index_add_ does.
#include "moe.h"
#include <ATen/ops/add.h>
#include <ATen/ops/div.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/softmax.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/topk.h>
#include <ATen/ops/zeros.h>

MoeMlp MoeMlp::make(at::Tensor router, std::vector<std::vector<at::Tensor>> gate_up,
                    std::vector<std::vector<int64_t>> gate_up_types, std::vector<std::vector<at::Tensor>> down,
                    std::vector<std::vector<int64_t>> down_types, int64_t top_k, bool norm_topk, bool int8) {
  TORCH_CHECK(router.dim() == 2 && router.scalar_type() == at::kFloat && router.is_contiguous(),
              "MoeMlp: the router is a contiguous float32 [experts, hidden]");
  const int64_t E = router.size(0), H = router.size(1);
  TORCH_CHECK((int64_t)gate_up.size() == E && (int64_t)down.size() == E && (int64_t)gate_up_types.size() == E &&
              (int64_t)down_types.size() == E && top_k >= 1 && top_k <= E, "MoeMlp: one gate_up and down per "
              "expert, 1 <= top_k <= experts");
  auto rows = [](const std::vector<at::Tensor>& parts) {
    int64_t n = 0;
    for (const auto& p : parts) n += p.size(0);
    return n;
  };
  for (int64_t e = 0; e < E; ++e) {      // every expert [2 I, H] and [H, I], as the kernels will read them
    TORCH_CHECK(!gate_up[e].empty() && !down[e].empty() && gate_up[e].size() == gate_up_types[e].size() &&
                down[e].size() == down_types[e].size() && rows(down[e]) == H && rows(gate_up[e]) % 2 == 0 &&
                rows(gate_up[e]) == rows(gate_up[0]), "MoeMlp: expert ", e, "'s projections do not match");
  }
  return MoeMlp{std::move(router), std::move(gate_up), std::move(down), std::move(gate_up_types),
                std::move(down_types), top_k, norm_topk, int8};
}

void MoeMlp::set_shared(at::Tensor gate, std::vector<at::Tensor> gate_up, std::vector<int64_t> gate_up_types,
                        std::vector<at::Tensor> down, std::vector<int64_t> down_types) {
  const int64_t H = router.size(1);
  int64_t I2 = 0, N = 0;
  for (const auto& p : gate_up) I2 += p.size(0);
  for (const auto& p : down) N += p.size(0);
  TORCH_CHECK(gate.dim() == 2 && gate.size(0) == 1 && gate.size(1) == H && gate.scalar_type() == at::kFloat &&
              gate.is_contiguous() && !gate_up.empty() && !down.empty() && I2 % 2 == 0 && N == H &&
              gate_up.size() == gate_up_types.size() && down.size() == down_types.size(),
              "MoeMlp: the shared expert is a float32 [1, hidden] gate, gate/up parts of 2 I rows, down of hidden");
  shared_gate = std::move(gate);
  shared_gate_up = std::move(gate_up);
  shared_gate_up_types = std::move(gate_up_types);
  shared_down = std::move(down);
  shared_down_types = std::move(down_types);
}

at::Tensor MoeMlp::forward(const at::Tensor& x, int64_t max_dot_rows) const {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == router.size(1) && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "MoeMlp: x is a contiguous float32 [rows, hidden]");
  const int64_t S = x.size(0), H = x.size(1), E = router.size(0), P = S * top_k;
  // SparseMoeBlock.route
  auto [weights, ids] = at::topk(at::softmax(at::linear(x, router), -1), top_k, -1);
  if (norm_topk) weights = at::div(weights, at::sum(weights, {-1}, true));
  weights = weights.contiguous();
  ids = ids.contiguous();
  const float* wt = weights.data_ptr<float>();
  const int64_t* id = ids.data_ptr<int64_t>();
  // Experts.forward: the (token, expert) pairs in expert order, stable (a counting sort)
  std::vector<int64_t> begin(E + 1, 0), order(P);
  for (int64_t p = 0; p < P; ++p) {
    TORCH_CHECK(id[p] >= 0 && id[p] < E, "MoeMlp: expert id out of range");
    ++begin[id[p] + 1];
  }
  for (int64_t e = 0; e < E; ++e) begin[e + 1] += begin[e];
  std::vector<int64_t> cursor(begin.begin(), begin.end() - 1);
  for (int64_t p = 0; p < P; ++p) order[cursor[id[p]]++] = p;
  auto xs = at::empty({P, H}, x.options());
  const float* xp = x.data_ptr<float>();
  float* xsp = xs.data_ptr<float>();
  for (int64_t i = 0; i < P; ++i) std::copy(xp + order[i] / top_k * H, xp + (order[i] / top_k + 1) * H, xsp + i * H);
  int64_t I2 = 0;             // gate and up rows of an expert
  for (const auto& part : gate_up[0]) I2 += part.size(0);
  auto gu = at::empty({P, I2}, x.options());
  auto h = at::empty({P, I2 / 2}, x.options());
  auto ys = at::empty({P, H}, x.options());
  std::vector<MatmulGroup> up_groups, down_groups;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = begin[e + 1] - begin[e];
    if (n == 0) continue;
    up_groups.push_back(MatmulGroup{gu.narrow(0, begin[e], n), xs.narrow(0, begin[e], n), &gate_up[e],
                                    &gate_up_types[e]});
    down_groups.push_back(MatmulGroup{ys.narrow(0, begin[e], n), h.narrow(0, begin[e], n), &down[e],
                                      &down_types[e]});
  }
  gguf_matmul_groups(up_groups, int8, max_dot_rows);
  silu_mul(h, gu);           // row by row: the same bits as each expert's own call
  gguf_matmul_groups(down_groups, int8, max_dot_rows);
  // ys * weight of its pair, added into its token's row in pair order (zeros_like(x).index_add_(0, token_of, ys))
  auto out = at::zeros({S, H}, x.options());
  float* op = out.data_ptr<float>();
  const float* yp = ys.data_ptr<float>();
  for (int64_t i = 0; i < P; ++i) {
    const float w = wt[order[i]];
    float* o = op + order[i] / top_k * H;
    const float* y = yp + i * H;
    for (int64_t j = 0; j < H; ++j) o[j] += y[j] * w;     // two roundings: the kernels build with -ffp-contract=off
  }
  if (!shared_gate.defined()) return out;
  // SharedExpertMoeBlock.modules_forward: routed + sigmoid(x @ gate^T) * shared_expert(x), its GatedMLP's calls
  int64_t S2 = 0;
  for (const auto& part : shared_gate_up) S2 += part.size(0);
  auto sgu = at::empty({S, S2}, x.options());
  gguf_matmul_parts(sgu, x, shared_gate_up, shared_gate_up_types, int8, max_dot_rows);
  auto sh = at::empty({S, S2 / 2}, x.options());
  silu_mul(sh, sgu);
  auto sy = at::empty({S, H}, x.options());
  gguf_matmul_parts(sy, sh, shared_down, shared_down_types, int8, max_dot_rows);
  return at::add(out, at::mul(at::sigmoid(at::linear(x, shared_gate)), sy));
}
