"""Optional C++ kernels for the CPU path, compiled on first use with torch.utils.cpp_extension.

Decode attention over the paged cache is the one place where pure PyTorch wastes most of its time on CPU:
it must gather every sequence's K/V into a padded tensor (a full copy of the context, per layer, per step)
before a batched SDPA. The kernel below reads K/V in place through the block table, one (sequence, kv-head)
pair per task, with an exact (not online) softmax. If compilation fails (no compiler, no ninja), callers fall
back to the pure-PyTorch references in lmserve/ops (forward_native), which stay the test oracle.
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

#ifdef LMSERVE_AVX512
// expf for 16 lanes (Cephes polynomial, ~1 ulp): libm's scalar expf is what made softmax and SiLU slow
static inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-88.3762626647949f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}
#endif

// K/V caches hold float32 or (with --matmul-dtype bfloat16) bfloat16; reads widen to float32
static inline float to_f(float x) { return x; }
static inline float to_f(c10::BFloat16 x) { return static_cast<float>(x); }
#ifdef LMSERVE_AVX512
static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16(const c10::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
#endif

// in place: x[0:n] = exp(x - max(x)) / sum
static inline void softmax_inplace(float* x, int64_t n) {
#ifdef LMSERVE_AVX512
  __m512 vmax = _mm512_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(x + j));
  float mx = _mm512_reduce_max_ps(vmax);
  for (int64_t i = j; i < n; ++i) mx = std::max(mx, x[i]);
  const __m512 vm = _mm512_set1_ps(mx);
  __m512 vsum = _mm512_setzero_ps();
  for (j = 0; j < n; j += 16) {
    const __mmask16 k = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + j), vm));
    _mm512_mask_storeu_ps(x + j, k, e);
    vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(k, e));
  }
  const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(vsum));
  for (j = 0; j < n; j += 16) {
    const __mmask16 k = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1);
    _mm512_mask_storeu_ps(x + j, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + j), inv));
  }
#else
  float mx = -INFINITY;
  for (int64_t j = 0; j < n; ++j) mx = std::max(mx, x[j]);
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) { x[j] = std::exp(x[j] - mx); sum += x[j]; }
  const float inv = 1.f / sum;
  for (int64_t j = 0; j < n; ++j) x[j] *= inv;
#endif
}

// Calls fn(row, j) for positions start + j < ctx of one head, where row points at that position's K or V row
// (base = cache + h * head_dim). Positions are walked block by block, so there is no division per position.
// With Prefetch, the next block's rows are fetched while this block is computed: blocks are scattered, so the
// hardware prefetcher loses the stream at every block edge.
template <bool Prefetch, typename T, typename F>
static inline void walk_rows(const T* base, const int64_t* bt, int64_t start, int64_t ctx, int64_t block_size,
                             int64_t row_stride, int64_t row_bytes, F&& fn) {
  int64_t idx = 0;
  for (int64_t pos = start; pos < ctx;) {
    const int64_t blk = pos / block_size, off = pos % block_size;
    const int64_t count = std::min(block_size - off, ctx - pos);
    const T* row = base + (bt[blk] * block_size + off) * row_stride;
    const T* next = Prefetch && (blk + 1) * block_size < ctx ? base + bt[blk + 1] * block_size * row_stride : nullptr;
    for (int64_t t = 0; t < count; ++t, row += row_stride, ++idx) {
      if (Prefetch && next != nullptr)
        for (int64_t b = 0; b < row_bytes; b += 64)
          __builtin_prefetch(reinterpret_cast<const char*>(next + (off + t) * row_stride) + b, 0, 3);
      fn(row, idx);
    }
    pos += count;
  }
}

// q: [num_seqs, num_heads, head_dim] float32; caches: [num_slots, num_kv_heads, head_dim] float32 or bfloat16
// block_tables: [num_seqs, max_blocks] int64; context_lens: [num_seqs] int64; out like q.
// One task per (sequence, kv head): scores for its `group` query heads, exact softmax, weighted sum of V.
template <int D, typename T>
static void decode_task(float* __restrict oh, const float* __restrict qh, const T* kp, const T* vp,
                        const int64_t* bt, int64_t ctx, int64_t start, int64_t block_size, int64_t num_kv_heads,
                        int64_t h, int64_t group, int64_t head_dim, float scale, std::vector<float>& scores,
                        std::vector<float>& acc) {
  const int64_t hd = D > 0 ? D : head_dim;
  const int64_t n = ctx - start;
  scores.resize(group * n);
  acc.assign(group * hd, 0.f);
  const int64_t row_stride = num_kv_heads * hd;
  // pass 1: scores
  walk_rows<false>(kp + h * hd, bt, start, ctx, block_size, row_stride, 0, [&](const T* kr, int64_t j) {
    for (int64_t g = 0; g < group; ++g) {
      const float* __restrict qr = qh + g * hd;
      float dot = 0.f;
      #pragma omp simd reduction(+:dot)
      for (int64_t d = 0; d < hd; ++d) dot += qr[d] * to_f(kr[d]);
      scores[g * n + j] = dot * scale;
    }
  });
  for (int64_t g = 0; g < group; ++g) softmax_inplace(scores.data() + g * n, n);
  // pass 2: weighted sum of V
  walk_rows<false>(vp + h * hd, bt, start, ctx, block_size, row_stride, 0, [&](const T* vr, int64_t j) {
    for (int64_t g = 0; g < group; ++g) {
      const float p = scores[g * n + j];
      float* __restrict a = acc.data() + g * hd;
      #pragma omp simd
      for (int64_t d = 0; d < hd; ++d) a[d] += p * to_f(vr[d]);
    }
  });
  std::copy(acc.begin(), acc.end(), oh);
}


#ifdef LMSERVE_AVX512
// Sums of 16 vectors at once: lane j of the result = sum of the lanes of v[j]. A shuffle tree (4 levels, ~3
// instructions per vector instead of a full horizontal reduction each); its lane order is fixed up by one
// permutation, found once by running the tree on known inputs.
static inline __m512 hsum16_tree(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44), _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88), _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44), _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88), _mm512_shuffle_ps(c[0], c[1], 0xDD));
}

static __m512i hsum16_order() {
  alignas(64) __m512 v[16];
  for (int j = 0; j < 16; ++j) v[j] = _mm512_set1_ps((float)j / 16.f);   // lane sum = j
  alignas(64) float r[16];
  _mm512_store_ps(r, hsum16_tree(v));
  alignas(64) int32_t idx[16];
  for (int i = 0; i < 16; ++i) idx[(int)std::lround(r[i])] = i;
  return _mm512_load_si512(idx);
}

static inline __m512 hsum16(const __m512* v) {
  static const __m512i order = hsum16_order();
  return _mm512_permutexvar_ps(order, hsum16_tree(v));
}

// decode_task for head_dim = 16 * NV and G query heads per kv head, with explicit AVX-512: dot products leave
// 16-lane partials that hsum16 reduces 16 positions at a time; V is accumulated in G x NV registers.
template <int G, int NV, typename T>
static void decode_task_avx(float* __restrict oh, const float* __restrict qh, const T* kp, const T* vp,
                            const int64_t* bt, int64_t ctx, int64_t start, int64_t block_size, int64_t num_kv_heads,
                            int64_t h, float scale, std::vector<float>& scores) {
  constexpr int64_t hd = 16 * NV;
  const int64_t n = ctx - start, npad = (n + 15) / 16 * 16;
  scores.resize(G * npad);
  const int64_t row_stride = num_kv_heads * hd;
  __m512 qv[G][NV];
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < NV; ++i) qv[g][i] = _mm512_loadu_ps(qh + g * hd + 16 * i);
  alignas(64) __m512 part[G][16];
  const __m512 vscale = _mm512_set1_ps(scale);
  int cnt = 0;
  int64_t base = 0;
  const int64_t row_bytes = hd * (int64_t)sizeof(T);
  walk_rows<true>(kp + h * hd, bt, start, ctx, block_size, row_stride, row_bytes, [&](const T* kr, int64_t) {
    __m512 kv[NV];
    for (int i = 0; i < NV; ++i) kv[i] = load16(kr + 16 * i);
    for (int g = 0; g < G; ++g) {
      __m512 p = _mm512_mul_ps(qv[g][0], kv[0]);
      for (int i = 1; i < NV; ++i) p = _mm512_fmadd_ps(qv[g][i], kv[i], p);
      part[g][cnt] = p;
    }
    if (++cnt == 16) {
      for (int g = 0; g < G; ++g) _mm512_storeu_ps(scores.data() + g * npad + base, _mm512_mul_ps(hsum16(part[g]), vscale));
      base += 16;
      cnt = 0;
    }
  });
  if (cnt > 0) {
    for (int g = 0; g < G; ++g) {
      for (int j = cnt; j < 16; ++j) part[g][j] = _mm512_setzero_ps();
      _mm512_storeu_ps(scores.data() + g * npad + base, _mm512_mul_ps(hsum16(part[g]), vscale));
    }
  }
  for (int g = 0; g < G; ++g) softmax_inplace(scores.data() + g * npad, n);
  __m512 acc[G][NV];
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < NV; ++i) acc[g][i] = _mm512_setzero_ps();
  walk_rows<true>(vp + h * hd, bt, start, ctx, block_size, row_stride, row_bytes, [&](const T* vr, int64_t j) {
    __m512 vv[NV];
    for (int i = 0; i < NV; ++i) vv[i] = load16(vr + 16 * i);
    for (int g = 0; g < G; ++g) {
      const __m512 p = _mm512_set1_ps(scores[g * npad + j]);
      for (int i = 0; i < NV; ++i) acc[g][i] = _mm512_fmadd_ps(p, vv[i], acc[g][i]);
    }
  });
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < NV; ++i) _mm512_storeu_ps(oh + g * hd + 16 * i, acc[g][i]);
}

// true if an AVX-512 specialisation handled this task
template <typename T>
static inline bool decode_task_fast(float* oh, const float* qh, const T* kp, const T* vp, const int64_t* bt,
                                    int64_t ctx, int64_t start, int64_t block_size, int64_t num_kv_heads, int64_t h,
                                    int64_t group, int64_t head_dim, float scale, std::vector<float>& scores) {
#define LMSERVE_TASK(G, NV) decode_task_avx<G, NV, T>(oh, qh, kp, vp, bt, ctx, start, block_size, num_kv_heads, h, scale, scores); return true
  if (head_dim == 64) {
    switch (group) {
      case 1: LMSERVE_TASK(1, 4); case 2: LMSERVE_TASK(2, 4); case 3: LMSERVE_TASK(3, 4); case 4: LMSERVE_TASK(4, 4);
      case 5: LMSERVE_TASK(5, 4); case 6: LMSERVE_TASK(6, 4); case 7: LMSERVE_TASK(7, 4); case 8: LMSERVE_TASK(8, 4);
    }
  } else if (head_dim == 128) {
    switch (group) {
      case 1: LMSERVE_TASK(1, 8); case 2: LMSERVE_TASK(2, 8); case 3: LMSERVE_TASK(3, 8); case 4: LMSERVE_TASK(4, 8);
    }
  }
#undef LMSERVE_TASK
  return false;
}
#endif

template <typename T>
static void paged_decode_attention_impl(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                        torch::Tensor block_tables, torch::Tensor context_lens, int64_t block_size,
                                        double scale, int64_t window) {
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t num_kv_heads = k_cache.size(1);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t max_blocks = block_tables.size(1);
  const float* qp = q.data_ptr<float>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
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
#ifdef LMSERVE_AVX512
      if (decode_task_fast(oh, qh, kp, vp, sbt, ctx, start, block_size, num_kv_heads, h, group, head_dim, fscale, scores))
        continue;
#endif
      if (head_dim == 64)
        decode_task<64, T>(oh, qh, kp, vp, sbt, ctx, start, block_size, num_kv_heads, h, group, head_dim, fscale, scores, acc);
      else if (head_dim == 128)
        decode_task<128, T>(oh, qh, kp, vp, sbt, ctx, start, block_size, num_kv_heads, h, group, head_dim, fscale, scores, acc);
      else
        decode_task<0, T>(oh, qh, kp, vp, sbt, ctx, start, block_size, num_kv_heads, h, group, head_dim, fscale, scores, acc);
    }
  });
}

void paged_decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                            torch::Tensor block_tables, torch::Tensor context_lens, int64_t block_size,
                            double scale, int64_t window) {
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous() && out.is_contiguous());
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k_cache.scalar_type() == v_cache.scalar_type());
  if (k_cache.scalar_type() == torch::kBFloat16)
    paged_decode_attention_impl<c10::BFloat16>(out, q, k_cache, v_cache, block_tables, context_lens, block_size, scale, window);
  else {
    TORCH_CHECK(k_cache.scalar_type() == torch::kFloat32, "paged_decode_attention: cache must be float32 or bfloat16");
    paged_decode_attention_impl<float>(out, q, k_cache, v_cache, block_tables, context_lens, block_size, scale, window);
  }
}

// out[M, N] = x[M, K] @ W^T with W kept in 32-element groups, w = d * q + m (see quant.py for the formats).
// S = scales per group: 1, or 2 when each half of 16 has its own d and m (Q6_K's 16-element sub-blocks).
// Each group is expanded to float32 in registers exactly as the loader dequantizes it, then accumulated into
// 32-wide accumulators for R rows at a time (kept in registers); one horizontal sum per output element.
// Memory traffic is the quantized size of W, once per R rows.
template <bool Q4, int S>
static inline void expand_group(float* __restrict w, const void* qv, int64_t g, const float* db, const float* mb) {
  const float d0 = db[0], m0 = mb[0], d1 = db[S - 1], m1 = mb[S - 1];
  if (Q4) {
    const uint8_t* __restrict qb = static_cast<const uint8_t*>(qv) + g * 16;
    #pragma omp simd
    for (int j = 0; j < 16; ++j) w[j] = (float)(qb[j] & 15) * d0 + m0;
    #pragma omp simd
    for (int j = 0; j < 16; ++j) w[j + 16] = (float)(qb[j] >> 4) * d1 + m1;
  } else {
    const int8_t* __restrict qb = static_cast<const int8_t*>(qv) + g * 32;
    #pragma omp simd
    for (int j = 0; j < 16; ++j) w[j] = (float)qb[j] * d0 + m0;
    #pragma omp simd
    for (int j = 16; j < 32; ++j) w[j] = (float)qb[j] * d1 + m1;
  }
}

template <bool Q4, int S, int R>
static void qmatmul_rows(float* out, const float* x, const void* qv, const float* d, const float* m,
                         int64_t N, int64_t nb, int64_t n0, int64_t n1) {
  const int64_t K = nb * 32;
#ifdef LMSERVE_AVX512
  // NOTE: q * d then + m as two roundings (not one FMA) so each weight equals the loader's float32 value.
  // Q4: the group's 16 possible weights d * k + m (k = 0..15) form one register; vpermps picks them by the
  // nibble (it reads only the low 4 bits of each index lane, so the high nibble needs just a shift).
  const __m512 ks = _mm512_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f, 8.f, 9.f, 10.f, 11.f, 12.f, 13.f, 14.f, 15.f);
  for (int64_t n = n0; n < n1; ++n) {
    __m512 acc0[R], acc1[R];
    for (int r = 0; r < R; ++r) { acc0[r] = _mm512_setzero_ps(); acc1[r] = _mm512_setzero_ps(); }
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t g = n * nb + b;
      const __m512 vd0 = _mm512_set1_ps(d[g * S]), vm0 = _mm512_set1_ps(m[g * S]);
      const __m512 vd1 = _mm512_set1_ps(d[g * S + S - 1]), vm1 = _mm512_set1_ps(m[g * S + S - 1]);
      __m512 w0, w1;
      if (Q4) {
        const __m512 table0 = _mm512_add_ps(_mm512_mul_ps(ks, vd0), vm0);
        const __m512 table1 = S == 1 ? table0 : _mm512_add_ps(_mm512_mul_ps(ks, vd1), vm1);
        const __m512i idx = _mm512_cvtepu8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint8_t*>(qv) + g * 16)));
        w0 = _mm512_permutexvar_ps(idx, table0);
        w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(idx, 4), table1);
      } else {
        const int8_t* qb = static_cast<const int8_t*>(qv) + g * 32;
        const __m512i q0 = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qb)));
        const __m512i q1 = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qb + 16)));
        w0 = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(q0), vd0), vm0);
        w1 = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(q1), vd1), vm1);
      }
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
      expand_group<Q4, S>(w, qv, g, d + g * S, m + g * S);
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

template <bool Q4, int S>
static void qmatmul_impl(float* out, const float* x, const void* qv, const float* d, const float* m,
                         int64_t M, int64_t N, int64_t nb) {
  const int64_t K = nb * 32;
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    int64_t i = 0;
    for (; i + 4 <= M; i += 4) qmatmul_rows<Q4, S, 4>(out + i * N, x + i * K, qv, d, m, N, nb, n0, n1);
    for (; i + 2 <= M; i += 2) qmatmul_rows<Q4, S, 2>(out + i * N, x + i * K, qv, d, m, N, nb, n0, n1);
    for (; i < M; ++i) qmatmul_rows<Q4, S, 1>(out + i * N, x + i * K, qv, d, m, N, nb, n0, n1);
  });
}

template <bool Q4>
static void qmatmul_dispatch(float* out, const float* x, const void* qv, const float* d, const float* m,
                             int64_t M, int64_t N, int64_t nb, int64_t S) {
  if (S == 2) qmatmul_impl<Q4, 2>(out, x, qv, d, m, M, N, nb);
  else qmatmul_impl<Q4, 1>(out, x, qv, d, m, M, N, nb);
}


// ---- fused elementwise ops: one call instead of several small PyTorch ops per layer ------------------------
// Rounding follows the PyTorch reference op by op (-ffp-contract=off), except reductions, whose order differs.
static inline void rms_row(float* __restrict o, const float* __restrict x, const float* __restrict w, int64_t H,
                           float eps) {
  float ss = 0.f;
  #pragma omp simd reduction(+:ss)
  for (int64_t j = 0; j < H; ++j) ss += x[j] * x[j];
  const float r = 1.f / std::sqrt(ss / (float)H + eps);
  #pragma omp simd
  for (int64_t j = 0; j < H; ++j) o[j] = (x[j] * r) * w[j];
}

// out = rms_norm(x) * w; x, out: [T, H]
void rms_norm(torch::Tensor out, torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous() && w.is_contiguous() && x.scalar_type() == torch::kFloat32);
  const int64_t T = x.size(0), H = x.size(1);
  float* op = out.data_ptr<float>(); const float* xp = x.data_ptr<float>(); const float* wp = w.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) rms_row(op + t * H, xp + t * H, wp, H, (float)eps);
  });
}

// residual += x; x = rms_norm(residual) * w  (both in place)
void add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor w, double eps) {
  TORCH_CHECK(x.is_contiguous() && residual.is_contiguous() && w.is_contiguous() && x.scalar_type() == torch::kFloat32);
  const int64_t T = x.size(0), H = x.size(1);
  float* xp = x.data_ptr<float>(); float* rp = residual.data_ptr<float>(); const float* wp = w.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      float* __restrict r = rp + t * H; const float* __restrict xi = xp + t * H;
      #pragma omp simd
      for (int64_t j = 0; j < H; ++j) r[j] = xi[j] + r[j];
      rms_row(xp + t * H, r, wp, H, (float)eps);
    }
  });
}

template <typename T>
static inline void rotate_half(T* __restrict dst, const float* __restrict src, const float* __restrict c,
                               const float* __restrict s, int64_t half) {
  #pragma omp simd
  for (int64_t j = 0; j < half; ++j) {
    const float x1 = src[j], x2 = src[j + half];
    dst[j] = T(x1 * c[j] - x2 * s[j]);
    dst[j + half] = T(x2 * c[j] + x1 * s[j]);
  }
}

// qkv: [T, (nh + 2 * nkv) * hd]; cos, sin: [T, hd / 2]. Writes RoPE(q) to q_out [T, nh, hd], RoPE(k) and v to
// the cache slots given by slot_mapping [T] (caches [num_slots, nkv, hd]).
template <typename KV>
static void rope_write_kv_impl(torch::Tensor q_out, torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin,
                               torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slot_mapping,
                               int64_t nh, int64_t nkv, int64_t hd) {
  TORCH_CHECK(qkv.is_contiguous() && q_out.is_contiguous() && cos.is_contiguous() && sin.is_contiguous());
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && qkv.scalar_type() == torch::kFloat32);
  TORCH_CHECK(slot_mapping.scalar_type() == torch::kInt64);
  const int64_t T = qkv.size(0), W = qkv.size(1), half = hd / 2;
  TORCH_CHECK(W == (nh + 2 * nkv) * hd, "rope_write_kv: qkv width mismatch");
  const float* qp = qkv.data_ptr<float>(); const float* cp = cos.data_ptr<float>(); const float* sp = sin.data_ptr<float>();
  float* qo = q_out.data_ptr<float>(); KV* kc = k_cache.data_ptr<KV>(); KV* vc = v_cache.data_ptr<KV>();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  at::parallel_for(0, T, 8, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const float* row = qp + t * W; const float* c = cp + t * half; const float* s = sp + t * half;
      for (int64_t h = 0; h < nh; ++h) rotate_half<float>(qo + (t * nh + h) * hd, row + h * hd, c, s, half);
      const int64_t slot = slots[t];
      for (int64_t h = 0; h < nkv; ++h) rotate_half<KV>(kc + (slot * nkv + h) * hd, row + (nh + h) * hd, c, s, half);
      KV* vdst = vc + slot * nkv * hd;
      for (int64_t j = 0; j < nkv * hd; ++j) vdst[j] = KV(row[(nh + nkv) * hd + j]);
    }
  });
}

void rope_write_kv(torch::Tensor q_out, torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin,
                   torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slot_mapping,
                   int64_t nh, int64_t nkv, int64_t hd) {
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type());
  if (k_cache.scalar_type() == torch::kBFloat16)
    rope_write_kv_impl<c10::BFloat16>(q_out, qkv, cos, sin, k_cache, v_cache, slot_mapping, nh, nkv, hd);
  else {
    TORCH_CHECK(k_cache.scalar_type() == torch::kFloat32, "rope_write_kv: cache must be float32 or bfloat16");
    rope_write_kv_impl<float>(q_out, qkv, cos, sin, k_cache, v_cache, slot_mapping, nh, nkv, hd);
  }
}

// out [T, I] = silu(gate_up[:, :I]) * gate_up[:, I:]
void silu_mul(torch::Tensor out, torch::Tensor gate_up) {
  TORCH_CHECK(out.is_contiguous() && gate_up.is_contiguous() && gate_up.scalar_type() == torch::kFloat32);
  const int64_t T = out.size(0), I = out.size(1);
  float* op = out.data_ptr<float>(); const float* gp = gate_up.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const float* __restrict g = gp + t * 2 * I; const float* __restrict u = g + I; float* __restrict o = op + t * I;
      int64_t j = 0;
#ifdef LMSERVE_AVX512
      const __m512 one = _mm512_set1_ps(1.f);
      for (; j + 16 <= I; j += 16) {
        const __m512 x = _mm512_loadu_ps(g + j);
        const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), x));
        _mm512_storeu_ps(o + j, _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(one, e)), _mm512_loadu_ps(u + j)));
      }
#endif
      for (; j < I; ++j) o[j] = (g[j] / (1.f + std::exp(-g[j]))) * u[j];
    }
  });
}

void quant_matmul(torch::Tensor out, torch::Tensor x, torch::Tensor q, torch::Tensor d, torch::Tensor m) {
  TORCH_CHECK(x.is_contiguous() && q.is_contiguous() && d.is_contiguous() && m.is_contiguous() && out.is_contiguous());
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && d.scalar_type() == torch::kFloat32);
  const int64_t M = x.size(0), N = q.size(0), nb = q.size(1);
  TORCH_CHECK(x.size(1) == nb * 32, "quant_matmul: K mismatch");
  const int64_t S = d.size(1) / nb;
  TORCH_CHECK((S == 1 || S == 2) && d.size(1) == nb * S && m.sizes() == d.sizes() && d.size(0) == N,
              "quant_matmul: d and m must be [N, K/32] or [N, K/16]");
  if (q.scalar_type() == torch::kUInt8) {
    qmatmul_dispatch<true>(out.data_ptr<float>(), x.data_ptr<float>(), q.data_ptr(), d.data_ptr<float>(),
                           m.data_ptr<float>(), M, N, nb, S);
  } else {
    TORCH_CHECK(q.scalar_type() == torch::kInt8);
    qmatmul_dispatch<false>(out.data_ptr<float>(), x.data_ptr<float>(), q.data_ptr(), d.data_ptr<float>(),
                            m.data_ptr<float>(), M, N, nb, S);
  }
}

// NOTE: the GIL is released inside every kernel so the server's event loop (another thread of this process)
// can run while the engine thread computes.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("paged_decode_attention", &paged_decode_attention, nogil);
  m.def("quant_matmul", &quant_matmul, nogil);
  m.def("rms_norm", &rms_norm, nogil);
  m.def("add_rms_norm", &add_rms_norm, nogil);
  m.def("rope_write_kv", &rope_write_kv, nogil);
  m.def("silu_mul", &silu_mul, nogil);
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
                    name=_build_name(), cpp_sources=[_SOURCE], functions=None,
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
