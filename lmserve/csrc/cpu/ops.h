// Entry points of the CPU kernel library (bound in bindings.cpp, called by lmserve/ops forward_cpu arms).
// Every tensor is contiguous; activations are float32; K/V caches float32 or bfloat16.
#pragma once
// NOTE: the ATen tensor type and the few ops used, not <torch/types.h> or <ATen/ATen.h> (every op, ~9 s of parsing
// per file): the first start compiles this library, so its build time is start-up time
#include <ATen/core/Tensor.h>
#include <string>
#include <vector>

// attention.cpp
void paged_decode_attention(at::Tensor out, at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                            at::Tensor block_tables, at::Tensor context_lens, int64_t block_size,
                            double scale, int64_t window);
// prefill_attention.cpp: causal attention of whole prompts; q, out [S, T, H, D], k, v [S, T, KVH, D], float32
void causal_prefill_attention(at::Tensor out, at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                              at::Tensor kv_slots, double scale, int64_t start);
// elementwise.cpp
void rms_norm(at::Tensor out, at::Tensor x, at::Tensor w, double eps);
void add_rms_norm(at::Tensor x, at::Tensor residual, at::Tensor w, double eps);
void rms_norm_heads(at::Tensor qkv, at::Tensor q_w, at::Tensor k_w, int64_t nh, int64_t nkv, int64_t hd,
                    double eps);
void rope_write_kv(at::Tensor q_out, at::Tensor qkv, at::Tensor cos, at::Tensor sin,
                   at::Tensor k_cache, at::Tensor v_cache, at::Tensor slot_mapping, int64_t nh,
                   int64_t nkv, int64_t hd);
void silu_mul(at::Tensor out, at::Tensor gate_up);
// gguf_matmul.cpp: GGUF blocks in place (lmserve/ops/linear.py); qtype = index in linear.py QTYPES
void gguf_matmul(at::Tensor out, at::Tensor x, at::Tensor w, int64_t qtype, bool int8,
                 int64_t max_dot_rows);
// several weights stacked along the outputs (fused q/k/v, gate/up), one input: out = [x @ W0.T | x @ W1.T | ...]
void gguf_matmul_parts(at::Tensor out, at::Tensor x, std::vector<at::Tensor> ws, std::vector<int64_t> qtypes,
                       bool int8, int64_t max_dot_rows);
// several inputs, each with its own weight parts (a MoE layer's experts, each on the rows routed to it), in one
// parallel region; each group's results are bit-identical to its own gguf_matmul_parts call
struct MatmulGroup {
  at::Tensor out;                           // [M, N]: the parts' outputs side by side
  at::Tensor x;                             // [M, K]
  const std::vector<at::Tensor>* ws;        // stacked along the outputs
  const std::vector<int64_t>* qtypes;
};
void gguf_matmul_groups(const std::vector<MatmulGroup>& groups, bool int8, int64_t max_dot_rows);
void gguf_dequantize(at::Tensor out, at::Tensor w, int64_t qtype, at::Tensor rows, bool use_rows);
// Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / Q4_K / Q5_K / Q6_K / Q3_K / Q2_K / IQ4_XS [N, row_bytes] -> their 8-row groups
// (lmserve/ops/gguf_x8.py is the reference)
void gguf_repack(at::Tensor out, at::Tensor w, int64_t qtype);
int64_t gguf_isa();                      // the ISA level the kernels run at (cpu_isa.py LEVELS index)
bool gguf_bf16_dot();                    // F16 / BF16 weights take bf16 activations in int8 calls (AVX512-BF16)
int64_t gguf_set_isa(int64_t level);     // raises if this CPU or build cannot run it
void gguf_set_vnni512(int64_t min_rows, bool all_types);   // where the AVX512-VNNI int8 kernels run (default 1 row, every type)
std::string built_baseline();            // "avx2" or "generic": what the library was compiled for
