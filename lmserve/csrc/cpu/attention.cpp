// Decode attention over the paged KV cache: one new query token per sequence, K/V read in place.
#include "ops.h"
#include "vec.h"

// in place: x[0:n] = exp(x - max(x)) / sum
static inline void softmax_inplace(float* x, int64_t n) {
#ifdef LMSERVE_AVX2
  float mx = -INFINITY;
  for (int64_t j = 0; j < n; ++j) mx = std::max(mx, x[j]);
  const __m256 vm = _mm256_set1_ps(mx);
  __m256 vsum = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + j), vm));
    _mm256_storeu_ps(x + j, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  float sum = hsum256(vsum);
  for (; j < n; ++j) { x[j] = std::exp(x[j] - mx); sum += x[j]; }
  const float inv = 1.f / sum;
  #pragma omp simd
  for (j = 0; j < n; ++j) x[j] *= inv;
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
static inline __attribute__((always_inline)) void walk_rows(const T* base, const int64_t* bt, int64_t start, int64_t ctx, int64_t block_size,
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


#ifdef LMSERVE_AVX2
// lane j = the sum of v[j]'s 8 lanes: 8 positions' dot products reduced at once (9 instructions instead of ~5 each)
static inline __m256 hsum8(const __m256* v) {
  const __m256 a0 = _mm256_hadd_ps(v[0], v[1]), a1 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 a2 = _mm256_hadd_ps(v[4], v[5]), a3 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 b0 = _mm256_hadd_ps(a0, a1), b1 = _mm256_hadd_ps(a2, a3);   // [v0..v3 low halves' sums | high]
  return _mm256_add_ps(_mm256_permute2f128_ps(b0, b1, 0x20), _mm256_permute2f128_ps(b0, b1, 0x31));
}

static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load8(const c10::BFloat16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

constexpr int v_chunk(int G, int NV) {
  int c = NV;
  while (c > 1 && G * c > 12) c /= 2;
  return c;
}

// decode_task for head_dim = 8 * NV and G query heads per kv head: a K row is loaded once for the G heads, the
// dot products leave 8-lane partials that hsum8 reduces 8 positions at a time; V is summed in register-sized
// column chunks.
template <int G, int NV, typename T>
static void decode_task_avx2(float* __restrict oh, const float* __restrict qh, const T* kp, const T* vp,
                             const int64_t* bt, int64_t ctx, int64_t start, int64_t block_size, int64_t num_kv_heads,
                             int64_t h, float scale, std::vector<float>& scores) {
  constexpr int64_t hd = 8 * NV;
  const int64_t n = ctx - start, npad = (n + 7) / 8 * 8;
  scores.resize(G * npad);
  const int64_t row_stride = num_kv_heads * hd, row_bytes = hd * (int64_t)sizeof(T);
  __m256 part[G][8];
  const __m256 vscale = _mm256_set1_ps(scale);
  int cnt = 0;
  int64_t base = 0;
  walk_rows<true>(kp + h * hd, bt, start, ctx, block_size, row_stride, row_bytes, [&](const T* kr, int64_t) {
    for (int g = 0; g < G; ++g) {
      __m256 p = _mm256_mul_ps(_mm256_loadu_ps(qh + g * hd), load8(kr));
      for (int i = 1; i < NV; ++i) p = _mm256_fmadd_ps(_mm256_loadu_ps(qh + g * hd + 8 * i), load8(kr + 8 * i), p);
      part[g][cnt] = p;
    }
    if (++cnt == 8) {
      for (int g = 0; g < G; ++g) _mm256_storeu_ps(scores.data() + g * npad + base, _mm256_mul_ps(hsum8(part[g]), vscale));
      base += 8;
      cnt = 0;
    }
  });
  if (cnt > 0)
    for (int g = 0; g < G; ++g) {
      for (int j = cnt; j < 8; ++j) part[g][j] = _mm256_setzero_ps();
      _mm256_storeu_ps(scores.data() + g * npad + base, _mm256_mul_ps(hsum8(part[g]), vscale));
    }
  for (int g = 0; g < G; ++g) softmax_inplace(scores.data() + g * npad, n);
  // V in column chunks of C registers per head (G x C accumulators stay in registers; each chunk walks the rows
  // again, from L1/L2)
  constexpr int C = v_chunk(G, NV);
  for (int c0 = 0; c0 < NV; c0 += C) {
    __m256 acc[G][C];
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < C; ++i) acc[g][i] = _mm256_setzero_ps();
    walk_rows<true>(vp + h * hd + 8 * c0, bt, start, ctx, block_size, row_stride, 8 * C * (int64_t)sizeof(T),
                    [&](const T* vr, int64_t j) {
      for (int i = 0; i < C; ++i) {
        const __m256 v = load8(vr + 8 * i);
        for (int g = 0; g < G; ++g) acc[g][i] = _mm256_fmadd_ps(_mm256_set1_ps(scores[g * npad + j]), v, acc[g][i]);
      }
    });
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < C; ++i) _mm256_storeu_ps(oh + g * hd + 8 * (c0 + i), acc[g][i]);
  }
}

// true if a specialisation handled this task (head_dim 64, 128 or 256; up to 8, 4, 4 query heads per kv head)
template <typename T>
static inline bool decode_task_fast(float* oh, const float* qh, const T* kp, const T* vp, const int64_t* bt,
                                    int64_t ctx, int64_t start, int64_t block_size, int64_t num_kv_heads, int64_t h,
                                    int64_t group, int64_t head_dim, float scale, std::vector<float>& scores) {
#define LMSERVE_TASK(G, NV) decode_task_avx2<G, NV, T>(oh, qh, kp, vp, bt, ctx, start, block_size, num_kv_heads, h, scale, scores); return true
  if (head_dim == 64) {
    switch (group) {
      case 1: LMSERVE_TASK(1, 8); case 2: LMSERVE_TASK(2, 8); case 3: LMSERVE_TASK(3, 8); case 4: LMSERVE_TASK(4, 8);
      case 5: LMSERVE_TASK(5, 8); case 6: LMSERVE_TASK(6, 8); case 7: LMSERVE_TASK(7, 8); case 8: LMSERVE_TASK(8, 8);
    }
  } else if (head_dim == 128) {
    switch (group) {
      case 1: LMSERVE_TASK(1, 16); case 2: LMSERVE_TASK(2, 16); case 3: LMSERVE_TASK(3, 16); case 4: LMSERVE_TASK(4, 16);
    }
  } else if (head_dim == 256) {
    switch (group) {
      case 1: LMSERVE_TASK(1, 32); case 2: LMSERVE_TASK(2, 32); case 3: LMSERVE_TASK(3, 32); case 4: LMSERVE_TASK(4, 32);
    }
  }
#undef LMSERVE_TASK
  return false;
}
#endif

template <typename T>
static void paged_decode_attention_impl(at::Tensor out, at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                                        at::Tensor block_tables, at::Tensor context_lens, int64_t block_size,
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
#ifdef LMSERVE_AVX2
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

void paged_decode_attention(at::Tensor out, at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                            at::Tensor block_tables, at::Tensor context_lens, int64_t block_size,
                            double scale, int64_t window) {
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous() && out.is_contiguous());
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_cache.scalar_type() == v_cache.scalar_type());
  if (k_cache.scalar_type() == at::kBFloat16)
    paged_decode_attention_impl<c10::BFloat16>(out, q, k_cache, v_cache, block_tables, context_lens, block_size, scale, window);
  else {
    TORCH_CHECK(k_cache.scalar_type() == at::kFloat, "paged_decode_attention: cache must be float32 or bfloat16");
    paged_decode_attention_impl<float>(out, q, k_cache, v_cache, block_tables, context_lens, block_size, scale, window);
  }
}
