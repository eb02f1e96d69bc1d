"""Optional C++ kernels for the CPU path, compiled on first use with torch.utils.cpp_extension.

Decode attention over the paged cache is the one place where pure PyTorch wastes most of its time on CPU:
it must gather every sequence's K/V into a padded tensor (a full copy of the context, per layer, per step)
before a batched SDPA. The kernel below reads K/V in place through the block table, one (sequence, kv-head)
pair per task, with an exact (not online) softmax. If compilation fails (no compiler, no ninja), callers fall
back to the pure-PyTorch reference in attention.py, which stays the test oracle.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading

import torch

logger = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>
#include <algorithm>

// q: [num_seqs, num_heads, head_dim]; caches: [num_slots, num_kv_heads, head_dim] (float32, contiguous)
// block_tables: [num_seqs, max_blocks] int64; context_lens: [num_seqs] int64; out like q.
void paged_decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                            torch::Tensor block_tables, torch::Tensor context_lens, int64_t block_size,
                            double scale, int64_t window) {
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous() && out.is_contiguous());
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k_cache.scalar_type() == torch::kFloat32);
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t num_kv_heads = k_cache.size(1);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t max_blocks = block_tables.size(1);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* cl = context_lens.data_ptr<int64_t>();
  const float fscale = (float)scale;
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> acc;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / num_kv_heads, h = task % num_kv_heads;
      const int64_t ctx = cl[s];
      const int64_t start = window > 0 ? std::max<int64_t>(0, ctx - window) : 0;
      const int64_t n = ctx - start;
      scores.assign(group * n, 0.f);
      acc.assign(group * head_dim, 0.f);
      const float* qh = qp + (s * num_heads + h * group) * head_dim;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t pos = start + j;
        const int64_t slot = bt[s * max_blocks + pos / block_size] * block_size + pos % block_size;
        const float* kr = kp + (slot * num_kv_heads + h) * head_dim;
        for (int64_t g = 0; g < group; ++g) {
          const float* qr = qh + g * head_dim;
          float dot = 0.f;
          #pragma omp simd reduction(+:dot)
          for (int64_t d = 0; d < head_dim; ++d) dot += qr[d] * kr[d];
          scores[g * n + j] = dot * fscale;
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* sc = scores.data() + g * n;
        float mx = -INFINITY;
        for (int64_t j = 0; j < n; ++j) mx = std::max(mx, sc[j]);
        float sum = 0.f;
        for (int64_t j = 0; j < n; ++j) { sc[j] = std::exp(sc[j] - mx); sum += sc[j]; }
        const float inv = 1.f / sum;
        for (int64_t j = 0; j < n; ++j) sc[j] *= inv;
      }
      for (int64_t j = 0; j < n; ++j) {
        const int64_t pos = start + j;
        const int64_t slot = bt[s * max_blocks + pos / block_size] * block_size + pos % block_size;
        const float* vr = vp + (slot * num_kv_heads + h) * head_dim;
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * n + j];
          float* a = acc.data() + g * head_dim;
          #pragma omp simd
          for (int64_t d = 0; d < head_dim; ++d) a[d] += p * vr[d];
        }
      }
      float* oh = op + (s * num_heads + h * group) * head_dim;
      std::copy(acc.begin(), acc.end(), oh);
    }
  });
}

// out[M, N] = x[M, K] @ W^T with W kept in 32-element groups, w = d * q + m (see quant.py for the formats).
// Each group is expanded to float32 in registers exactly as the loader dequantizes it, then accumulated into
// 32-wide per-row accumulators; one horizontal sum per output element. Memory traffic is the quantized size.
template <bool Q4>
static void qmatmul_impl(float* out, const float* x, const void* qv, const float* d, const float* m,
                         int64_t M, int64_t N, int64_t nb) {
  const int64_t K = nb * 32;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> acc(M * 32);
    alignas(64) float w[32];
    for (int64_t n = n0; n < n1; ++n) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t b = 0; b < nb; ++b) {
        const float db = d[n * nb + b], mb = m[n * nb + b];
        if (Q4) {
          const uint8_t* qb = static_cast<const uint8_t*>(qv) + (n * nb + b) * 16;
          #pragma omp simd
          for (int j = 0; j < 16; ++j) {
            w[j] = (float)(qb[j] & 15) * db + mb;
            w[j + 16] = (float)(qb[j] >> 4) * db + mb;
          }
        } else {
          const int8_t* qb = static_cast<const int8_t*>(qv) + (n * nb + b) * 32;
          #pragma omp simd
          for (int j = 0; j < 32; ++j) w[j] = (float)qb[j] * db + mb;
        }
        for (int64_t i = 0; i < M; ++i) {
          const float* xr = x + i * K + b * 32;
          float* a = acc.data() + i * 32;
          #pragma omp simd
          for (int j = 0; j < 32; ++j) a[j] += xr[j] * w[j];
        }
      }
      for (int64_t i = 0; i < M; ++i) {
        float sum = 0.f;
        const float* a = acc.data() + i * 32;
        for (int j = 0; j < 32; ++j) sum += a[j];
        out[i * N + n] = sum;
      }
    }
  });
}

void quant_matmul(torch::Tensor out, torch::Tensor x, torch::Tensor q, torch::Tensor d, torch::Tensor m) {
  TORCH_CHECK(x.is_contiguous() && q.is_contiguous() && d.is_contiguous() && m.is_contiguous() && out.is_contiguous());
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && d.scalar_type() == torch::kFloat32);
  const int64_t M = x.size(0), N = q.size(0), nb = q.size(1);
  TORCH_CHECK(x.size(1) == nb * 32, "quant_matmul: K mismatch");
  if (q.scalar_type() == torch::kUInt8) {
    qmatmul_impl<true>(out.data_ptr<float>(), x.data_ptr<float>(), q.data_ptr(), d.data_ptr<float>(),
                       m.data_ptr<float>(), M, N, nb);
  } else {
    TORCH_CHECK(q.scalar_type() == torch::kInt8);
    qmatmul_impl<false>(out.data_ptr<float>(), x.data_ptr<float>(), q.data_ptr(), d.data_ptr<float>(),
                        m.data_ptr<float>(), M, N, nb);
  }
}
"""

_lock = threading.Lock()
_module = None
_failed = False


def _build_name() -> str:
    # NOTE: -march=native code is specific to this CPU; key the build on the CPU model and the torch version.
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu += next((line for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    key = hashlib.sha1((_SOURCE + cpu + torch.__version__).encode()).hexdigest()[:12]
    return f"lmserve_cpu_attn_{key}"


def load() -> object | None:
    """The compiled module, or None if it cannot be built here (then callers use the PyTorch reference)."""
    global _module, _failed
    if _module is not None or _failed:
        return _module
    with _lock:
        if _module is None and not _failed:
            try:
                from torch.utils.cpp_extension import load_inline
                _module = load_inline(
                    name=_build_name(), cpp_sources=[_SOURCE], functions=["paged_decode_attention", "quant_matmul"],
                    extra_cflags=["-O3", "-march=native", "-fopenmp-simd"], verbose=False,
                    build_directory=_build_dir())
            except Exception as e:  # noqa: BLE001 - any build failure means "use the reference path"
                logger.warning("C++ CPU attention kernel unavailable (%s); using the PyTorch reference", e)
                _failed = True
    return _module


def _build_dir() -> str:
    path = os.path.join(os.path.expanduser("~"), ".cache", "lmserve", "kernels", _build_name())
    os.makedirs(path, exist_ok=True)
    return path
