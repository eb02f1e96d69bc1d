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
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define LMSERVE_AVX512 1
#endif
#include <cmath>
#include <vector>
#include <algorithm>

// q: [num_seqs, num_heads, head_dim]; caches: [num_slots, num_kv_heads, head_dim] (float32, contiguous)
// block_tables: [num_seqs, max_blocks] int64; context_lens: [num_seqs] int64; out like q.
// One task per (sequence, kv head): scores for its `group` query heads, exact softmax, weighted sum of V.
// Positions are walked block by block, so there is no division per position.
template <int D>
static void decode_task(float* __restrict oh, const float* __restrict qh, const float* kp, const float* vp,
                        const int64_t* bt, int64_t ctx, int64_t start, int64_t block_size, int64_t num_kv_heads,
                        int64_t h, int64_t group, int64_t head_dim, float scale, std::vector<float>& scores,
                        std::vector<float>& acc) {
  const int64_t hd = D > 0 ? D : head_dim;
  const int64_t n = ctx - start;
  scores.resize(group * n);
  acc.assign(group * hd, 0.f);
  const int64_t row_stride = num_kv_heads * hd;
  // pass 1: scores
  for (int64_t pos = start; pos < ctx;) {
    const int64_t blk = pos / block_size, off = pos % block_size;
    const int64_t count = std::min(block_size - off, ctx - pos);
    const float* kr = kp + (bt[blk] * block_size + off) * row_stride + h * hd;
    for (int64_t t = 0; t < count; ++t, kr += row_stride) {
      for (int64_t g = 0; g < group; ++g) {
        const float* __restrict qr = qh + g * hd;
        float dot = 0.f;
        #pragma omp simd reduction(+:dot)
        for (int64_t d = 0; d < hd; ++d) dot += qr[d] * kr[d];
        scores[g * n + (pos - start) + t] = dot * scale;
      }
    }
    pos += count;
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
  // pass 2: weighted sum of V
  for (int64_t pos = start; pos < ctx;) {
    const int64_t blk = pos / block_size, off = pos % block_size;
    const int64_t count = std::min(block_size - off, ctx - pos);
    const float* vr = vp + (bt[blk] * block_size + off) * row_stride + h * hd;
    for (int64_t t = 0; t < count; ++t, vr += row_stride) {
      for (int64_t g = 0; g < group; ++g) {
        const float p = scores[g * n + (pos - start) + t];
        float* __restrict a = acc.data() + g * hd;
        #pragma omp simd
        for (int64_t d = 0; d < hd; ++d) a[d] += p * vr[d];
      }
    }
    pos += count;
  }
  std::copy(acc.begin(), acc.end(), oh);
}

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
    std::vector<float> scores, acc;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / num_kv_heads, h = task % num_kv_heads;
      const int64_t ctx = cl[s];
      const int64_t start = window > 0 ? std::max<int64_t>(0, ctx - window) : 0;
      const float* qh = qp + (s * num_heads + h * group) * head_dim;
      float* oh = op + (s * num_heads + h * group) * head_dim;
      const int64_t* sbt = bt + s * max_blocks;
      if (head_dim == 64)
        decode_task<64>(oh, qh, kp, vp, sbt, ctx, start, block_size, num_kv_heads, h, group, head_dim, fscale, scores, acc);
      else if (head_dim == 128)
        decode_task<128>(oh, qh, kp, vp, sbt, ctx, start, block_size, num_kv_heads, h, group, head_dim, fscale, scores, acc);
      else
        decode_task<0>(oh, qh, kp, vp, sbt, ctx, start, block_size, num_kv_heads, h, group, head_dim, fscale, scores, acc);
    }
  });
}

// out[M, N] = x[M, K] @ W^T with W kept in 32-element groups, w = d * q + m (see quant.py for the formats).
// Each group is expanded to float32 in registers exactly as the loader dequantizes it, then accumulated into
// 32-wide accumulators for R rows at a time (kept in registers); one horizontal sum per output element.
// Memory traffic is the quantized size of W, once per R rows.
template <bool Q4>
static inline void expand_group(float* __restrict w, const void* qv, int64_t g, float db, float mb) {
  if (Q4) {
    const uint8_t* __restrict qb = static_cast<const uint8_t*>(qv) + g * 16;
    #pragma omp simd
    for (int j = 0; j < 16; ++j) w[j] = (float)(qb[j] & 15) * db + mb;
    #pragma omp simd
    for (int j = 0; j < 16; ++j) w[j + 16] = (float)(qb[j] >> 4) * db + mb;
  } else {
    const int8_t* __restrict qb = static_cast<const int8_t*>(qv) + g * 32;
    #pragma omp simd
    for (int j = 0; j < 32; ++j) w[j] = (float)qb[j] * db + mb;
  }
}

template <bool Q4, int R>
static void qmatmul_rows(float* out, const float* x, const void* qv, const float* d, const float* m,
                         int64_t N, int64_t nb, int64_t n0, int64_t n1) {
  const int64_t K = nb * 32;
#ifdef LMSERVE_AVX512
  // NOTE: q * d then + m as two roundings (not one FMA) so each weight equals the loader's float32 value.
  const __m128i low4 = _mm_set1_epi8(0x0F);
  for (int64_t n = n0; n < n1; ++n) {
    __m512 acc0[R], acc1[R];
    for (int r = 0; r < R; ++r) { acc0[r] = _mm512_setzero_ps(); acc1[r] = _mm512_setzero_ps(); }
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t g = n * nb + b;
      const __m512 vd = _mm512_set1_ps(d[g]), vm = _mm512_set1_ps(m[g]);
      __m512i q0, q1;
      if (Q4) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint8_t*>(qv) + g * 16));
        q0 = _mm512_cvtepu8_epi32(_mm_and_si128(bytes, low4));
        q1 = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), low4));
      } else {
        const int8_t* qb = static_cast<const int8_t*>(qv) + g * 32;
        q0 = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qb)));
        q1 = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qb + 16)));
      }
      const __m512 w0 = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(q0), vd), vm);
      const __m512 w1 = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(q1), vd), vm);
      for (int r = 0; r < R; ++r) {
        const float* xr = x + r * K + b * 32;
        acc0[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xr), w0, acc0[r]);
        acc1[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + 16), w1, acc1[r]);
      }
    }
    for (int r = 0; r < R; ++r) out[r * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r], acc1[r]));
  }
#else
  alignas(64) float w[32];
  for (int64_t n = n0; n < n1; ++n) {
    alignas(64) float acc[R][32] = {};
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t g = n * nb + b;
      expand_group<Q4>(w, qv, g, d[g], m[g]);
      for (int r = 0; r < R; ++r) {
        const float* __restrict xr = x + r * K + b * 32;
        #pragma omp simd
        for (int j = 0; j < 32; ++j) acc[r][j] += xr[j] * w[j];
      }
    }
    for (int r = 0; r < R; ++r) {
      float sum = 0.f;
      for (int j = 0; j < 32; ++j) sum += acc[r][j];
      out[r * N + n] = sum;
    }
  }
#endif
}

template <bool Q4>
static void qmatmul_impl(float* out, const float* x, const void* qv, const float* d, const float* m,
                         int64_t M, int64_t N, int64_t nb) {
  const int64_t K = nb * 32;
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    int64_t i = 0;
    for (; i + 4 <= M; i += 4) qmatmul_rows<Q4, 4>(out + i * N, x + i * K, qv, d, m, N, nb, n0, n1);
    for (; i + 2 <= M; i += 2) qmatmul_rows<Q4, 2>(out + i * N, x + i * K, qv, d, m, N, nb, n0, n1);
    for (; i < M; ++i) qmatmul_rows<Q4, 1>(out + i * N, x + i * K, qv, d, m, N, nb, n0, n1);
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
    # NOTE: -ffp-contract=off keeps `q * d + m` two roundings, as the loader computes it (explicit FMA intrinsics
# are unaffected). -march=native code is specific to this CPU; key the build on the CPU model and the torch version.
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
                    extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"], extra_ldflags=["-fopenmp"], verbose=False,
                    build_directory=_build_dir())
            except Exception as e:  # noqa: BLE001 - any build failure means "use the reference path"
                logger.warning("C++ CPU attention kernel unavailable (%s); using the PyTorch reference", e)
                _failed = True
    return _module


def _build_dir() -> str:
    path = os.path.join(os.path.expanduser("~"), ".cache", "lmserve", "kernels", _build_name())
    os.makedirs(path, exist_ok=True)
    return path
