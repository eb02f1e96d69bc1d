// Decode-size matmuls on GGUF blocks with AVX2 (the portable x86-64 baseline: AVX2 + FMA + F16C).
//
// int8 path (llama.cpp's approach, not its code): each 32-value sub-block of a weight row is unpacked in registers
// to 32 int8 values; the integer dot with the quantized activations is maddubs (u8 x s8 pairs -> i16) + madd (-> 8
// x i32). Signed types (Q4_0, Q5_0, Q8_0, Q6_K) move the weight's sign onto the activation first (|w| x sign(x, w)).
// No sum can saturate: |w| <= 128 and |qx| <= 127, so a pair is at most 2 * 128 * 127 < 32767.
// The 8 int32 lanes hold lanes 0-3 = values 0-15 and 4-7 = values 16-31, so Q6_K's scale per 16 is one vector.
// float path (exact): each block is dequantized to float32 exactly as the reference, then FMA'd into 8-wide
// accumulators. Both paths read each weight block once per R <= 4 activation rows.
#include "gguf_kernels.h"

#ifdef LMSERVE_GGUF_AVX2
#include <immintrin.h>
#include <algorithm>
#include "gguf_blocks.h"

namespace gguf {
namespace {

#define ALWAYS_INLINE inline __attribute__((always_inline))

ALWAYS_INLINE __m256i nibbles16(const uint8_t* p) {   // 16 bytes -> [16 low nibbles | 16 high nibbles]
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i m = _mm_set1_epi8(15);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
}

ALWAYS_INLINE __m256i high_bits32(const uint8_t* p) {  // bit j of a little-endian 32-bit word -> byte j: 16 or 0
  uint32_t word;
  std::memcpy(&word, p, 4);
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(static_cast<int>(word)),
      _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
  const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(16));
}

ALWAYS_INLINE __m256i load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// Sub-block s (32 values) of a block: q (signed unless kHasMin), the scales of values 0-15 and 16-31, the min
template <int QT>
ALWAYS_INLINE void sub_block(const uint8_t* b, int s, __m256i& q, float& s0, float& s1, float& mn) {
  if constexpr (QT == Q4_0 || QT == Q4_1) {
    q = nibbles16(b + (QT == Q4_0 ? 2 : 4));
    if (QT == Q4_0) q = _mm256_sub_epi8(q, _mm256_set1_epi8(8));
    s0 = s1 = f16(b);
    mn = QT == Q4_1 ? f16(b + 2) : 0.f;
  } else if constexpr (QT == Q5_0 || QT == Q5_1) {
    constexpr int h = QT == Q5_0 ? 2 : 4;
    q = _mm256_or_si256(nibbles16(b + h + 4), high_bits32(b + h));
    if (QT == Q5_0) q = _mm256_sub_epi8(q, _mm256_set1_epi8(16));
    s0 = s1 = f16(b);
    mn = QT == Q5_1 ? f16(b + 2) : 0.f;
  } else if constexpr (QT == Q8_0) {
    q = load32(b + 2);
    s0 = s1 = f16(b);
    mn = 0.f;
  } else if constexpr (QT == Q4_K || QT == Q5_K) {
    const __m256i v = load32(b + (QT == Q4_K ? 16 : 48) + (s / 2) * 32);
    q = _mm256_and_si256((s & 1) ? _mm256_srli_epi16(v, 4) : v, _mm256_set1_epi8(15));
    if (QT == Q5_K) {
      const __m256i bit = _mm256_set1_epi8(static_cast<char>(1 << s));
      const __m256i hb = _mm256_cmpeq_epi8(_mm256_and_si256(load32(b + 16), bit), bit);
      q = _mm256_or_si256(q, _mm256_and_si256(hb, _mm256_set1_epi8(16)));
    }
    int sci, mni;
    scale_min_k4(b + 4, s, sci, mni);
    s0 = s1 = f16(b) * static_cast<float>(sci);
    mn = -(f16(b + 2) * static_cast<float>(mni));
  } else {  // Q6_K
    const int h = s / 4, i = s % 4;
    const __m256i ql = load32(b + h * 64 + (i & 1) * 32);
    const __m256i lo = _mm256_and_si256(i >= 2 ? _mm256_srli_epi16(ql, 4) : ql, _mm256_set1_epi8(15));
    const __m256i qh = _mm256_and_si256(_mm256_srl_epi16(load32(b + 128 + h * 32), _mm_cvtsi32_si128(2 * i)),
                                        _mm256_set1_epi8(3));
    q = _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(qh, 4)), _mm256_set1_epi8(32));
    const float d = f16(b + 208);
    const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
    s0 = d * static_cast<float>(scales[2 * s]);
    s1 = d * static_cast<float>(scales[2 * s + 1]);
    mn = 0.f;
  }
}

ALWAYS_INLINE __m256i idot(__m256i w, __m256i x, bool is_unsigned) {   // 8 x int32: sums of 4 products
  const __m256i ones = _mm256_set1_epi16(1);
  if (is_unsigned) return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones);
  return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)), ones);
}

ALWAYS_INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int QT, int R>
void rows_int8(const DotArgs& p, int64_t m0, int64_t n0, int64_t n1) {
  constexpr int BE = kBlockElems[QT], BB = kBlockBytes[QT], NS = BE / 32;
  constexpr bool U = kHasMin[QT];
  const int64_t K = p.K, nb = K / BE, ng = K / 32;
  const int8_t* qx = p.a->q.data() + m0 * K;
  const float* dx = p.a->dx.data() + m0 * ng;
  const float* sx = p.a->sx.data() + m0 * ng;
  for (int64_t n = n0; n < n1; ++n) {
    __m256 acc[R];
    float mins[R];
    for (int r = 0; r < R; ++r) { acc[r] = _mm256_setzero_ps(); mins[r] = 0.f; }
    const uint8_t* row = p.w + n * p.ws;
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = row + b * BB;
      #pragma GCC unroll 8
      for (int s = 0; s < NS; ++s) {
        __m256i q;
        float s0, s1, mn;
        sub_block<QT>(blk, s, q, s0, s1, mn);
        const __m256 sc = _mm256_set_m128(_mm_set1_ps(s1), _mm_set1_ps(s0));   // lanes 4-7: values 16-31
        const int64_t g = b * NS + s;
        for (int r = 0; r < R; ++r) {
          const __m256i xv = load32(reinterpret_cast<const uint8_t*>(qx + r * K + g * 32));
          const __m256 dot = _mm256_cvtepi32_ps(idot(q, xv, U));
          acc[r] = _mm256_fmadd_ps(dot, _mm256_mul_ps(sc, _mm256_set1_ps(dx[r * ng + g])), acc[r]);
          if (U) mins[r] += mn * sx[r * ng + g];
        }
      }
    }
    for (int r = 0; r < R; ++r) p.out[(m0 + r) * p.N + n] = hsum(acc[r]) + mins[r];
  }
}

// Q4_0 with int8 activations, one weight row at a time (rows are contiguous, so the matrix is read as one sequential
// stream, which measured faster from DRAM than 2 or 4 interleaved rows), blocks in pairs into two accumulators per
// activation row (one would serialize on the FMA latency). The nibbles stay unsigned (0..15), so maddubs takes them
// as they are, and the -8 offset comes off as 8 x the activation's lane sums (Act::ls, computed once per call): the
// same integer dot as the sign trick's, exactly, with three fewer instructions per block and row.
template <int R>
ALWAYS_INLINE void q4_0_block(const uint8_t* blk, const int8_t* qx, const int32_t* ls, const float* dx, int64_t K,
                              int64_t nb, int64_t b, __m256* acc) {
  const __m256i ones = _mm256_set1_epi16(1), m4 = _mm256_set1_epi8(15);
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2));
  const __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), m4);
  const float d = f16(blk);
  for (int r = 0; r < R; ++r) {
    const __m256i xv = load32(reinterpret_cast<const uint8_t*>(qx + r * K + b * 32));
    const __m256i off = _mm256_slli_epi32(load32(reinterpret_cast<const uint8_t*>(ls + (r * nb + b) * 8)), 3);
    const __m256i dot = _mm256_sub_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(q, xv), ones), off);
    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(d * dx[r * nb + b]), acc[r]);
  }
}

template <int R>
void q4_0_int8(const DotArgs& p, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t K = p.K, nb = K / 32;
  const int8_t* qx = p.a->q.data() + m0 * K;
  const float* dx = p.a->dx.data() + m0 * nb;
  const int32_t* ls = p.a->ls.data() + m0 * nb * 8;
  for (int64_t n = n0; n < n1; ++n) {
    __m256 acc0[R], acc1[R];
    for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
    const uint8_t* row = p.w + n * p.ws;
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
      q4_0_block<R>(row + b * 18, qx, ls, dx, K, nb, b, acc0);
      q4_0_block<R>(row + (b + 1) * 18, qx, ls, dx, K, nb, b + 1, acc1);
    }
    if (b < nb) q4_0_block<R>(row + b * 18, qx, ls, dx, K, nb, b, acc0);
    for (int r = 0; r < R; ++r) p.out[(m0 + r) * p.N + n] = hsum(_mm256_add_ps(acc0[r], acc1[r]));
  }
}

// 32 int8 values -> 4 x 8 float32 weights q * scale (+ min): the reference's roundings
template <bool HAS_MIN>
ALWAYS_INLINE void widen(__m256i q, float s0, float s1, float mn, __m256* w) {
  const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
  const __m128i parts[4] = {lo, _mm_unpackhi_epi64(lo, lo), hi, _mm_unpackhi_epi64(hi, hi)};
  const __m256 m = _mm256_set1_ps(mn);
  for (int i = 0; i < 4; ++i) {
    const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[i])), _mm256_set1_ps(i < 2 ? s0 : s1));
    w[i] = HAS_MIN ? _mm256_add_ps(v, m) : v;
  }
}

template <int QT, int R>
void rows_float(const DotArgs& p, int64_t m0, int64_t n0, int64_t n1) {
  constexpr int BE = kBlockElems[QT], BB = kBlockBytes[QT], NS = BE / 32;
  const int64_t K = p.K, nb = K / BE;
  for (int64_t n = n0; n < n1; ++n) {
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    const uint8_t* row = p.w + n * p.ws;
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = row + b * BB;
      #pragma GCC unroll 8
      for (int s = 0; s < NS; ++s) {
        __m256i q;
        float s0, s1, mn;
        sub_block<QT>(blk, s, q, s0, s1, mn);
        __m256 w[4];
        widen<kHasMin[QT]>(q, s0, s1, mn, w);
        for (int r = 0; r < R; ++r) {
          const float* xr = p.x + (m0 + r) * K + b * BE + s * 32;
          for (int i = 0; i < 4; ++i) acc[r] = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(xr + 8 * i), acc[r]);
        }
      }
    }
    for (int r = 0; r < R; ++r) p.out[(m0 + r) * p.N + n] = hsum(acc[r]);
  }
}

template <int QT>
void dequant_type(const uint8_t* row, int64_t nb, float* out) {
  constexpr int BE = kBlockElems[QT], BB = kBlockBytes[QT], NS = BE / 32;
  for (int64_t b = 0; b < nb; ++b) {
    #pragma GCC unroll 8
    for (int s = 0; s < NS; ++s) {
      __m256i q;
      float s0, s1, mn;
      sub_block<QT>(row + b * BB, s, q, s0, s1, mn);
      __m256 w[4];
      widen<kHasMin[QT]>(q, s0, s1, mn, w);
      for (int i = 0; i < 4; ++i) _mm256_storeu_ps(out + b * BE + s * 32 + 8 * i, w[i]);
    }
  }
}

template <int QT>
void dot_type(const DotArgs& p, int64_t n0, int64_t n1) {
  // outputs in chunks of 16 rows of W (a few KB, cache-resident) re-read by each group of <= 4 activation rows
  for (int64_t c0 = n0; c0 < n1; c0 += 16) {
    const int64_t c1 = std::min(n1, c0 + 16);
    int64_t m = 0;
    if (p.int8 && QT == Q4_0) {
      for (; m + 2 <= p.M; m += 2) q4_0_int8<2>(p, m, c0, c1);
      for (; m < p.M; ++m) q4_0_int8<1>(p, m, c0, c1);
    } else if (p.int8) {
      for (; m + 4 <= p.M; m += 4) rows_int8<QT, 4>(p, m, c0, c1);
      for (; m + 2 <= p.M; m += 2) rows_int8<QT, 2>(p, m, c0, c1);
      for (; m < p.M; ++m) rows_int8<QT, 1>(p, m, c0, c1);
    } else {
      for (; m + 4 <= p.M; m += 4) rows_float<QT, 4>(p, m, c0, c1);
      for (; m + 2 <= p.M; m += 2) rows_float<QT, 2>(p, m, c0, c1);
      for (; m < p.M; ++m) rows_float<QT, 1>(p, m, c0, c1);
    }
  }
}

}  // namespace

void dequant_avx2(int qt, const uint8_t* row, int64_t nb, float* out) {
  switch (qt) {
    case Q4_0: return dequant_type<Q4_0>(row, nb, out);
    case Q4_1: return dequant_type<Q4_1>(row, nb, out);
    case Q5_0: return dequant_type<Q5_0>(row, nb, out);
    case Q5_1: return dequant_type<Q5_1>(row, nb, out);
    case Q8_0: return dequant_type<Q8_0>(row, nb, out);
    case Q4_K: return dequant_type<Q4_K>(row, nb, out);
    case Q5_K: return dequant_type<Q5_K>(row, nb, out);
    case Q6_K: return dequant_type<Q6_K>(row, nb, out);
    default: return;
  }
}

void dot_avx2(const DotArgs& p, int64_t n0, int64_t n1) {
  switch (p.qt) {
    case Q4_0: return dot_type<Q4_0>(p, n0, n1);
    case Q4_1: return dot_type<Q4_1>(p, n0, n1);
    case Q5_0: return dot_type<Q5_0>(p, n0, n1);
    case Q5_1: return dot_type<Q5_1>(p, n0, n1);
    case Q8_0: return dot_type<Q8_0>(p, n0, n1);
    case Q4_K: return dot_type<Q4_K>(p, n0, n1);
    case Q5_K: return dot_type<Q5_K>(p, n0, n1);
    case Q6_K: return dot_type<Q6_K>(p, n0, n1);
    default: return;
  }
}

}  // namespace gguf
#endif  // LMSERVE_GGUF_AVX2
