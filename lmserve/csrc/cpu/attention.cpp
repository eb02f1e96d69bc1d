// Decode attention over the paged KV cache: one new query token per sequence, K/V read in place.
#include "ops.h"
#include "vec.h"

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
#elif defined(LMSERVE_AVX2)
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
