// Causal prefill attention (no window, no image span: whole prompts from position 0, and the later chunks or the
// uncached rest of prompts whose first `start` positions are already in the cache) on float32, the
// online-softmax ("flash") way: per task, a block of BQ query positions for the G query heads of one KV head
// (R = G * BQ rows sharing every K/V load), walked over key blocks of BK with a running max and sum per row, so
// the T x T scores never exist. The two products are register-tiled FMA loops (4 rows x 16 keys for Q K^T over a
// transposed K block, 2 rows x 32 dims for P V): 1.6-1.8x torch's SDPA at 512 tokens on 2 Zen 4 cores, 1.0-1.3x
// for 512-token chunks after 3584 cached positions (docs/benchmarks.md). Every plain causal group comes here,
// whatever its length and start: a query's sums run over the same absolute key blocks in the same order whether its prompt was prefilled
// whole, in chunks or after a prefix-cache hit, so greedy tokens never depend on how the prompt was split.
#include <memory>

#include "ops.h"
#include "vec.h"

namespace {
// BQ query positions per block; keys per block: 64, or 32 from head_dim 128 up (its K, V and O blocks then stay
// near L1: measured 1.16x -> 1.30x SDPA at 512 tokens for head_dim 128, 1.71x -> 1.64x for 64)
constexpr int64_t BQ = 16;
inline int64_t key_block(int64_t D) { return D >= 128 ? 32 : 64; }

struct Buffers {
  int64_t bk;
  std::vector<float> q, p, o, m, l;
  Buffers(int64_t R, int64_t D) : bk(key_block(D)), q(R * D), p(R * bk), o(R * D), m(R), l(R) {}
};

// K and V of every (sequence, KV head) read once from the paged cache (float32 or bfloat16, widened) through the
// sequence's slots, before any query block runs, and laid out so that every query block reads a key block as
// contiguous floats: K transposed into blocks of [D][BK] (the tail block zero-padded: its keys are masked), kt
// [S][KVH][NB][D][BK]; V head-major, vh [S][KVH][NB * BK][D] (NB = TK / BK rounded up). Read in place, V rows sit
// KVH * D floats apart, a multiple of 4 KiB for 8 KV heads of 128, so a block's rows all fall in the same L1 sets
// (measured, 3B-shaped attention at 2048 tokens: 0.65x SDPA with both read in place, 0.84x with K laid out once,
// 1.13x with V too).
template <typename C>
void layout_kv(const C* k, const C* v, const int64_t* slots, float* kt, float* vh, int64_t S, int64_t TK,
               int64_t KVH, int64_t D, int64_t BK) {
  const int64_t nb = (TK + BK - 1) / BK;
  at::parallel_for(0, S * KVH * nb, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t s = t / (KVH * nb), h = t / nb % KVH, k0 = t % nb * BK;
      float* dst = kt + t * D * BK;
      for (int64_t c = 0; c < BK; ++c) {
        if (k0 + c >= TK) {
          for (int64_t d = 0; d < D; ++d) dst[d * BK + c] = 0.f;
          continue;
        }
        const int64_t row = (slots[s * TK + k0 + c] * KVH + h) * D;
        float* vd = vh + (t * BK + c) * D;
        for (int64_t d = 0; d < D; ++d) {
          dst[d * BK + c] = to_f(k[row + d]);
          vd[d] = to_f(v[row + d]);
        }
      }
    }
  });
}

// p[r][c] = q[r] . kt[:, c] for rows [0, R) and keys [0, nk)
void scores(const float* q, const float* kt, float* p, int64_t R, int64_t D, int64_t nk, int64_t BK) {
#ifdef LMSERVE_AVX2
  if (R % 4 == 0 && nk % 16 == 0) {
    for (int64_t r = 0; r < R; r += 4)
      for (int64_t c = 0; c < nk; c += 16) {
        __m256 a[4][2];
        for (int i = 0; i < 4; ++i) a[i][0] = a[i][1] = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; ++d) {
          const __m256 k0 = _mm256_loadu_ps(kt + d * BK + c), k1 = _mm256_loadu_ps(kt + d * BK + c + 8);
          for (int i = 0; i < 4; ++i) {
            const __m256 qv = _mm256_broadcast_ss(q + (r + i) * D + d);
            a[i][0] = _mm256_fmadd_ps(qv, k0, a[i][0]);
            a[i][1] = _mm256_fmadd_ps(qv, k1, a[i][1]);
          }
        }
        for (int i = 0; i < 4; ++i) {
          _mm256_storeu_ps(p + (r + i) * BK + c, a[i][0]);
          _mm256_storeu_ps(p + (r + i) * BK + c + 8, a[i][1]);
        }
      }
    return;
  }
#endif
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < nk; ++c) {
      float s = 0.f;
      for (int64_t d = 0; d < D; ++d) s += q[r * D + d] * kt[d * BK + c];
      p[r * BK + c] = s;
    }
}

// o[r] += sum_c p[r][c] v[c] for rows [0, R), keys [0, nk); v rows `vs` floats apart
void weighted_sum(const float* p, const float* v, int64_t vs, float* o, int64_t R, int64_t D, int64_t nk,
                  int64_t BK) {
#ifdef LMSERVE_AVX2
  if (R % 2 == 0 && D % 32 == 0) {
    for (int64_t r = 0; r < R; r += 2)
      for (int64_t d = 0; d < D; d += 32) {
        __m256 a[2][4];
        for (int i = 0; i < 2; ++i)
          for (int j = 0; j < 4; ++j) a[i][j] = _mm256_loadu_ps(o + (r + i) * D + d + 8 * j);
        for (int64_t c = 0; c < nk; ++c) {
          const float* vr = v + c * vs + d;
          const __m256 p0 = _mm256_broadcast_ss(p + r * BK + c), p1 = _mm256_broadcast_ss(p + (r + 1) * BK + c);
          for (int j = 0; j < 4; ++j) {
            const __m256 vv = _mm256_loadu_ps(vr + 8 * j);
            a[0][j] = _mm256_fmadd_ps(p0, vv, a[0][j]);
            a[1][j] = _mm256_fmadd_ps(p1, vv, a[1][j]);
          }
        }
        for (int i = 0; i < 2; ++i)
          for (int j = 0; j < 4; ++j) _mm256_storeu_ps(o + (r + i) * D + d + 8 * j, a[i][j]);
      }
    return;
  }
#endif
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < nk; ++c) {
      const float w = p[r * BK + c];
      for (int64_t d = 0; d < D; ++d) o[r * D + d] += w * v[c * vs + d];
    }
}

// softmax bookkeeping of one key block: p[r][c] = exp(p[r][c] - m_new) (0 where query r may not see key k0 + c),
// o[r] and l[r] rescaled by exp(m_old - m_new), l[r] += the row's sum
void online_softmax(float* p, float* o, float* m, float* l, int64_t R, int64_t D, int64_t nk, int64_t BK,
                    int64_t G, int64_t q0, int64_t k0) {
  for (int64_t r = 0; r < R; ++r) {
    float* pr = p + r * BK;
    const int64_t visible = std::min(nk, q0 + r / G - k0 + 1);   // causal: keys <= the row's position
    float mx = m[r];
    int64_t c = 0;
#ifdef LMSERVE_AVX2
    __m256 vmx = _mm256_set1_ps(mx);
    for (; c + 8 <= visible; c += 8) vmx = _mm256_max_ps(vmx, _mm256_loadu_ps(pr + c));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(vmx), _mm256_extractf128_ps(vmx, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    mx = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
#endif
    for (; c < visible; ++c) mx = std::max(mx, pr[c]);
    const float alpha = m[r] == -INFINITY ? 0.f : std::exp(m[r] - mx);
    float sum = 0.f;
    c = 0;
#ifdef LMSERVE_AVX2
    const __m256 vm = _mm256_set1_ps(mx);
    __m256 vs = _mm256_setzero_ps();
    for (; c + 8 <= visible; c += 8) {
      const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(pr + c), vm));
      _mm256_storeu_ps(pr + c, e);
      vs = _mm256_add_ps(vs, e);
    }
    sum = hsum256(vs);
#endif
    for (; c < visible; ++c) {
      pr[c] = std::exp(pr[c] - mx);
      sum += pr[c];
    }
    for (c = std::max<int64_t>(visible, 0); c < nk; ++c) pr[c] = 0.f;
    if (alpha != 1.f)
      for (int64_t d = 0; d < D; ++d) o[r * D + d] *= alpha;
    l[r] = l[r] * alpha + sum;
    m[r] = mx;
  }
}

// query block qb of sequence s, KV head h: rows r = i * G + g (query q0 + i at position start + q0 + i, head
// h * G + g); the sequence has T queries and start + T keys
void block(const float* q, const float* kt, const float* vh, float* out, int64_t T, int64_t start, int64_t H,
           int64_t KVH, int64_t D, float scale, int64_t s, int64_t h, int64_t qb, Buffers& b) {
  const int64_t G = H / KVH, q0 = qb * BQ, nq = std::min(BQ, T - q0), R = nq * G, TK = start + T;
  const int64_t Rp = (R + 3) / 4 * 4;   // rows in whole 4-row tiles; the padding rows are zero queries
  for (int64_t i = 0; i < nq; ++i)
    for (int64_t g = 0; g < G; ++g) {
      const float* src = q + ((s * T + q0 + i) * H + h * G + g) * D;
      float* dst = b.q.data() + (i * G + g) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = src[d] * scale;
    }
  std::fill(b.q.begin() + R * D, b.q.begin() + Rp * D, 0.f);
  std::fill(b.o.begin(), b.o.begin() + Rp * D, 0.f);
  std::fill(b.m.begin(), b.m.begin() + R, -INFINITY);
  std::fill(b.l.begin(), b.l.begin() + R, 0.f);
  const int64_t kend = start + q0 + nq, BK = b.bk, nb = (TK + BK - 1) / BK;   // keys [0, kend): visible to some row
  for (int64_t k0 = 0; k0 < kend; k0 += BK) {
    const int64_t nk = std::min(BK, kend - k0);
    const int64_t nkp = (nk + 15) / 16 * 16;   // scored in whole 16-key tiles; the tail's keys are masked
    const float* ktb = kt + ((s * KVH + h) * nb + k0 / BK) * D * BK;
    scores(b.q.data(), ktb, b.p.data(), Rp, D, nkp, BK);
    online_softmax(b.p.data(), b.o.data(), b.m.data(), b.l.data(), R, D, nk, BK, G, start + q0, k0);
    weighted_sum(b.p.data(), vh + ((s * KVH + h) * nb * BK + k0) * D, D, b.o.data(), (R + 1) / 2 * 2, D, nk, BK);
  }
  for (int64_t i = 0; i < nq; ++i)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t r = i * G + g;
      const float inv = 1.f / b.l[r];
      float* dst = out + ((s * T + q0 + i) * H + h * G + g) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = b.o[r * D + d] * inv;
    }
}
}  // namespace

void causal_prefill_attention(at::Tensor out, at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                              at::Tensor kv_slots, double scale, int64_t start) {
  TORCH_CHECK(q.dim() == 4 && out.sizes() == q.sizes() && k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(),
              "causal_prefill_attention: q, out [S, T, H, D]; k_cache, v_cache [slots, KVH, D]");
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous() &&
              kv_slots.is_contiguous());
  TORCH_CHECK(q.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat &&
              k_cache.scalar_type() == v_cache.scalar_type() && kv_slots.scalar_type() == at::kLong);
  const int64_t S = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3), KVH = k_cache.size(1);
  TORCH_CHECK(start >= 0 && kv_slots.dim() == 2 && kv_slots.size(0) == S && kv_slots.size(1) == start + T &&
              k_cache.size(2) == D && KVH > 0 && H % KVH == 0,
              "causal_prefill_attention: kv_slots [S, start + T]; heads a multiple of the KV heads");
  const int64_t BK = key_block(D), TK = start + T;
  const int64_t kv_floats = S * KVH * ((TK + BK - 1) / BK) * BK * D;
  std::unique_ptr<float[]> kt(new float[kv_floats]), vh(new float[kv_floats]);
  const int64_t* slots = kv_slots.data_ptr<int64_t>();
  if (k_cache.scalar_type() == at::kBFloat16) {
    layout_kv(k_cache.data_ptr<c10::BFloat16>(), v_cache.data_ptr<c10::BFloat16>(), slots, kt.get(), vh.get(), S,
              TK, KVH, D, BK);
  } else {
    TORCH_CHECK(k_cache.scalar_type() == at::kFloat, "causal_prefill_attention: cache float32 or bfloat16");
    layout_kv(k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), slots, kt.get(), vh.get(), S, TK, KVH, D, BK);
  }
  const float* qp = q.data_ptr<float>();
  const float* kp = kt.get();
  const float* vp = vh.get();
  float* op = out.data_ptr<float>();
  const int64_t nqb = (T + BQ - 1) / BQ, pairs = (nqb + 1) / 2;
  // a task takes query blocks j and nqb - 1 - j: causal work grows with the block index, so each task (and each
  // thread's contiguous run of tasks) gets about the same amount
  at::parallel_for(0, S * KVH * pairs, 1, [&](int64_t t0, int64_t t1) {
    Buffers b((H / KVH * BQ + 3) / 4 * 4, D);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t s = t / (KVH * pairs), h = t / pairs % KVH, j = t % pairs;
      block(qp, kp, vp, op, T, start, H, KVH, D, static_cast<float>(scale), s, h, j, b);
      if (nqb - 1 - j != j)
        block(qp, kp, vp, op, T, start, H, KVH, D, static_cast<float>(scale), s, h, nqb - 1 - j, b);
    }
  });
}
