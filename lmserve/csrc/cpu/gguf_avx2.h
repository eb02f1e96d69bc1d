// AVX2 building blocks shared by the GGUF kernels (gguf_dot_avx2.cpp: float dots and dequantization;
// gguf_gemm_avx2.cpp: the int8 GEMM and the float tile GEMM). Only included where LMSERVE_GGUF_AVX2 is set.
#pragma once
#include <immintrin.h>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include "gguf_blocks.h"
#include "gguf_kernels.h"

namespace gguf {
namespace avx2 {

#define ALWAYS_INLINE inline __attribute__((always_inline))

// log2 of the offset RAW values carry (Q4_0: 8, Q5_0: 16, Q6_K: 32, Q3_K: 4); -1: none
constexpr int kOffsetShift[NUM_QTYPES] = {3, -1, 4, -1, -1, -1, -1, 5, 2, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                          -1, -1};

ALWAYS_INLINE __m256i nibbles16(const uint8_t* p) {   // 16 bytes -> [16 low nibbles | 16 high nibbles]
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(15));
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

// 32 sign bits (bit j: value j negative) applied to 32 int8 values
ALWAYS_INLINE __m256i apply_signs32(__m256i q, uint32_t word) {
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(static_cast<int>(word)),
      _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
  const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
  const __m256i neg = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
  return _mm256_sub_epi8(_mm256_xor_si256(q, neg), neg);
}

// four 7-bit sign codes (bits 0-27 of aux) -> 32 sign bits
ALWAYS_INLINE uint32_t ksigns4(uint32_t aux) {
  return kIQ2Signs[aux & 127] | (kIQ2Signs[(aux >> 7) & 127] << 8) | (kIQ2Signs[(aux >> 14) & 127] << 16) |
         (static_cast<uint32_t>(kIQ2Signs[(aux >> 21) & 127]) << 24);
}

// sub-block s of a grid-type block (gguf_blocks.h grid_values): 4 entries of 8 values or 8 of 4, then the signs
template <int QT>
ALWAYS_INLINE __m256i grid_sub(const uint8_t* b, int s) {
  using ll = long long;
  if constexpr (QT == IQ2_XXS) {
    const uint8_t* g = b + 2 + 8 * s;
    const __m256i q = _mm256_setr_epi64x(static_cast<ll>(kIQ2XXSGrid[g[0]]), static_cast<ll>(kIQ2XXSGrid[g[1]]),
                                         static_cast<ll>(kIQ2XXSGrid[g[2]]), static_cast<ll>(kIQ2XXSGrid[g[3]]));
    return apply_signs32(q, ksigns4(u32(g + 4)));
  } else if constexpr (QT == IQ2_XS) {
    uint16_t v[4];
    std::memcpy(v, b + 2 + 8 * s, 8);
    const __m256i q =
        _mm256_setr_epi64x(static_cast<ll>(kIQ2XSGrid[v[0] & 511]), static_cast<ll>(kIQ2XSGrid[v[1] & 511]),
                           static_cast<ll>(kIQ2XSGrid[v[2] & 511]), static_cast<ll>(kIQ2XSGrid[v[3] & 511]));
    return apply_signs32(q, kIQ2Signs[v[0] >> 9] | (kIQ2Signs[v[1] >> 9] << 8) | (kIQ2Signs[v[2] >> 9] << 16) |
                                (static_cast<uint32_t>(kIQ2Signs[v[3] >> 9]) << 24));
  } else if constexpr (QT == IQ2_S) {
    const uint8_t* qs = b + 2 + 4 * s;
    const int qh = b[66 + s];
    const __m256i q = _mm256_setr_epi64x(static_cast<ll>(kIQ2SGrid[qs[0] | ((qh << 8) & 0x300)]),
                                         static_cast<ll>(kIQ2SGrid[qs[1] | ((qh << 6) & 0x300)]),
                                         static_cast<ll>(kIQ2SGrid[qs[2] | ((qh << 4) & 0x300)]),
                                         static_cast<ll>(kIQ2SGrid[qs[3] | ((qh << 2) & 0x300)]));
    return apply_signs32(q, u32(b + 34 + 4 * s));
  } else if constexpr (QT == IQ3_XXS) {
    const uint8_t* g = b + 2 + 8 * s;
    const __m256i q = _mm256_setr_epi32(
        static_cast<int>(kIQ3XXSGrid[g[0]]), static_cast<int>(kIQ3XXSGrid[g[1]]), static_cast<int>(kIQ3XXSGrid[g[2]]),
        static_cast<int>(kIQ3XXSGrid[g[3]]), static_cast<int>(kIQ3XXSGrid[g[4]]), static_cast<int>(kIQ3XXSGrid[g[5]]),
        static_cast<int>(kIQ3XXSGrid[g[6]]), static_cast<int>(kIQ3XXSGrid[g[7]]));
    return apply_signs32(q, ksigns4(u32(b + 66 + 4 * s)));
  } else if constexpr (kIQ1(QT)) {   // 8 x grid value, plus each group's offset (+-1: bytes 0x01 or 0xFF)
    const uint8_t* qs = b + (QT == IQ1_S ? 2 : 0) + 4 * s;
    const uint32_t qh = u16(b + (QT == IQ1_S ? 34 : 32) + 2 * s);
    constexpr int kHi = QT == IQ1_S ? 3 : 4;   // bits per group in qh: 3 of index (IQ1_M: and its offset's sign)
    auto entry = [&](int g) { return static_cast<ll>(kIQ1Grid8.v[qs[g] | (((qh >> (kHi * g)) & 7) << 8)]); };
    const __m256i q = _mm256_setr_epi64x(entry(0), entry(1), entry(2), entry(3));
    if constexpr (QT == IQ1_S) return _mm256_add_epi8(q, _mm256_set1_epi8(qh >> 15 ? -1 : 1));   // one sign per 32
    const __m256i bit = _mm256_setr_epi64x(0x8, 0x80, 0x800, 0x8000);            // IQ1_M: bit 3 of each nibble
    const __m256i neg = _mm256_cmpeq_epi64(_mm256_and_si256(_mm256_set1_epi64x(qh), bit), bit);
    return _mm256_add_epi8(q, _mm256_or_si256(neg, _mm256_set1_epi8(1)));
  } else {   // IQ3_S: a gather (measured faster than eight loads in gguf_grid_lanes.h on Zen 4)
    const uint8_t* g = b + 2 + 8 * s;
    const __m256i idx = _mm256_or_si256(
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(g))),
        _mm256_and_si256(_mm256_sllv_epi32(_mm256_set1_epi32(b[66 + s]), _mm256_setr_epi32(8, 7, 6, 5, 4, 3, 2, 1)),
                         _mm256_set1_epi32(256)));
    const __m256i q = _mm256_i32gather_epi32(reinterpret_cast<const int*>(kIQ3SGrid), idx, 4);
    return apply_signs32(q, u32(b + 74 + 4 * s));
  }
}

ALWAYS_INLINE __m256i load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// 8 values of a 16-bit float matrix (F16 / BF16) -> float32, exactly
template <int QT>
ALWAYS_INLINE __m256 load8_16(const uint8_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (QT == F16) return _mm256_cvtph_ps(h);
  else return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// Sub-block s (32 values) of a block: q (signed unless kHasMin), the scales of values 0-15 and 16-31, the min.
// RAW: the signed types with an offset (Q4_0, Q5_0, Q6_K) keep their stored unsigned values (q + kOffset[QT]), so
// maddubs can take them as they are and the int8 GEMM subtracts the offset times the activations' lane sums.
template <int QT, bool RAW = false>
ALWAYS_INLINE void sub_block(const uint8_t* b, int s, __m256i& q, float& s0, float& s1, float& mn) {
  if constexpr (QT == Q4_0 || QT == Q4_1) {
    q = nibbles16(b + (QT == Q4_0 ? 2 : 4));
    if (QT == Q4_0 && !RAW) q = _mm256_sub_epi8(q, _mm256_set1_epi8(8));
    s0 = s1 = f16(b);
    mn = QT == Q4_1 ? f16(b + 2) : 0.f;
  } else if constexpr (QT == Q5_0 || QT == Q5_1) {
    constexpr int h = QT == Q5_0 ? 2 : 4;
    q = _mm256_or_si256(nibbles16(b + h + 4), high_bits32(b + h));
    if (QT == Q5_0 && !RAW) q = _mm256_sub_epi8(q, _mm256_set1_epi8(16));
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
  } else if constexpr (QT == Q3_K) {
    const int h = s / 4, j = s % 4;
    const __m256i lo = _mm256_and_si256(_mm256_srl_epi16(load32(b + 32 + h * 32), _mm_cvtsi32_si128(2 * j)),
                                        _mm256_set1_epi8(3));
    const __m256i bit = _mm256_set1_epi8(static_cast<char>(1 << (4 * h + j)));
    q = _mm256_or_si256(lo, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(load32(b), bit), bit),
                                             _mm256_set1_epi8(4)));
    if (!RAW) q = _mm256_sub_epi8(q, _mm256_set1_epi8(4));
    const float d = f16(b + 108);
    s0 = d * static_cast<float>(scale_q3_k(b + 96, 2 * s));
    s1 = d * static_cast<float>(scale_q3_k(b + 96, 2 * s + 1));
    mn = 0.f;
  } else if constexpr (QT == Q2_K) {   // mn: values 0-15's offset (min_hi: 16-31's)
    const int h = s / 4, j = s % 4;
    q = _mm256_and_si256(_mm256_srl_epi16(load32(b + 16 + h * 32), _mm_cvtsi32_si128(2 * j)), _mm256_set1_epi8(3));
    const float d = f16(b + 80);
    s0 = d * static_cast<float>(b[2 * s] & 15);
    s1 = d * static_cast<float>(b[2 * s + 1] & 15);
    mn = -(f16(b + 82) * static_cast<float>(b[2 * s] >> 4));
  } else if constexpr (QT == IQ4_NL) {
    const __m128i table = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kIQ4NL));
    q = _mm256_shuffle_epi8(_mm256_set_m128i(table, table), nibbles16(b + 2));
    s0 = s1 = f16(b);
    mn = 0.f;
  } else if constexpr (QT == MXFP4) {
    const __m128i table = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kMXFP4));
    q = _mm256_shuffle_epi8(_mm256_set_m128i(table, table), nibbles16(b + 1));
    s0 = s1 = e8m0_half(b[0]);
    mn = 0.f;
  } else if constexpr (QT == IQ4_XS) {
    const __m128i table = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kIQ4NL));
    q = _mm256_shuffle_epi8(_mm256_set_m128i(table, table), nibbles16(b + 8 + 16 * s));
    s0 = s1 = f16(b) * static_cast<float>(scale_iq4_xs(b, s));
    mn = 0.f;
  } else if constexpr (kGrid(QT)) {
    q = grid_sub<QT>(b, s);
    const float d = grid_d<QT>(b);
    s0 = grid_scale<QT>(b, d, s, 0);
    s1 = kScalePer16(QT) ? grid_scale<QT>(b, d, s, 1) : s0;
    mn = 0.f;
  } else {  // Q6_K
    const int h = s / 4, i = s % 4;
    const __m256i ql = load32(b + h * 64 + (i & 1) * 32);
    const __m256i lo = _mm256_and_si256(i >= 2 ? _mm256_srli_epi16(ql, 4) : ql, _mm256_set1_epi8(15));
    const __m256i qh = _mm256_and_si256(_mm256_srl_epi16(load32(b + 128 + h * 32), _mm_cvtsi32_si128(2 * i)),
                                        _mm256_set1_epi8(3));
    q = _mm256_or_si256(lo, _mm256_slli_epi16(qh, 4));
    if (!RAW) q = _mm256_sub_epi8(q, _mm256_set1_epi8(32));
    const float d = f16(b + 208);
    const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
    s0 = d * static_cast<float>(scales[2 * s]);
    s1 = d * static_cast<float>(scales[2 * s + 1]);
    mn = 0.f;
  }
}

// the offset of values 16-31 of sub-block s (Q2_K's is per 16; the other types': sub_block's mn)
template <int QT>
ALWAYS_INLINE float min_hi(const uint8_t* b, int s, float mn) {
  if constexpr (kMinPer16(QT)) return -(f16(b + 82) * static_cast<float>(b[2 * s + 1] >> 4));
  return mn;
}

// an output's offset term for a sub-block: min * (the activations' sum); sx = dx * sum over the 32, ls: their
// lane sums (4 values each), for Q2_K's two halves (mn: values 0-15's offset, mn1: 16-31's)
template <int QT>
ALWAYS_INLINE float min_term(float mn, float mn1, float sx, float dx, const int32_t* ls) {
  if constexpr (kMinPer16(QT))
    return mn * (dx * static_cast<float>(ls[0] + ls[1] + ls[2] + ls[3])) +
           mn1 * (dx * static_cast<float>(ls[4] + ls[5] + ls[6] + ls[7]));
  return mn * sx;
}

// A sub-block decoded ahead: GEMMs decode a panel of weight rows once per 64 activation rows instead of once per
// tile of 4 (Q2_K / Q3_K / K-quant scales are rebuilt from bits on every decode). It holds sub_block's outputs as
// they are, so no output's operations change (batch invariance).
struct PreSub {
  int8_t q[32];
  float s0, s1, mn, mn1;
};

// sub-block s of block b of a weight row: from the file's blocks, or (PRE) from a decoded panel row
template <int QT, bool RAW, bool PRE>
ALWAYS_INLINE void load_sub(const uint8_t* row, int64_t b, int s, __m256i& q, float& s0, float& s1, float& mn,
                            float& mn1) {
  if constexpr (PRE) {
    const PreSub& d = reinterpret_cast<const PreSub*>(row)[b * (kBlockElems[QT] / 32) + s];
    q = load32(reinterpret_cast<const uint8_t*>(d.q));
    s0 = d.s0, s1 = d.s1, mn = d.mn, mn1 = d.mn1;
  } else {
    const uint8_t* blk = row + b * kBlockBytes[QT];
    sub_block<QT, RAW>(blk, s, q, s0, s1, mn);
    mn1 = min_hi<QT>(blk, s, mn);
  }
}

// weight rows [c0, c1) decoded into panel (row n - c0 at panel + (n - c0) * K / 32)
template <int QT, bool RAW>
ALWAYS_INLINE void predecode(const DotArgs& p, int64_t c0, int64_t c1, PreSub* panel) {
  constexpr int NS = kBlockElems[QT] / 32;
  const int64_t ng = p.K / 32;
  for (int64_t n = c0; n < c1; ++n)
    for (int64_t g = 0; g < ng; ++g) {
      PreSub& d = panel[(n - c0) * ng + g];
      __m256i q;
      load_sub<QT, RAW, false>(p.w + n * p.ws, g / NS, static_cast<int>(g % NS), q, d.s0, d.s1, d.mn, d.mn1);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d.q), q);
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

// 32 int8 values -> 4 x 8 float32 weights q * scale (+ min): the reference's roundings
template <bool HAS_MIN>
ALWAYS_INLINE void widen(__m256i q, float s0, float s1, float mn, float mn1, __m256* w) {
  const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
  const __m128i parts[4] = {lo, _mm_unpackhi_epi64(lo, lo), hi, _mm_unpackhi_epi64(hi, hi)};
  for (int i = 0; i < 4; ++i) {
    const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[i])), _mm256_set1_ps(i < 2 ? s0 : s1));
    w[i] = HAS_MIN ? _mm256_add_ps(v, _mm256_set1_ps(i < 2 ? mn : mn1)) : v;
  }
}

// The int8 GEMM's blocking, shared by the AVX2 kernel and its AVX512-VNNI twin (so both cover the outputs in the
// same tiles): blocks of 64 activation rows (their int8 form: 64 x K bytes + lane sums, L2-resident) x 16 weight
// rows. GEMMs (M >= 64): tiles of 4 x T::kGemmRN (AVX2 2, its 16 registers; VNNI 4 of its 32), then 2 x 2, single
// rows one weight row at a time. Decode batches (M < 64):
// tiles of 4 x 1, 2 x 1, 1 x 1: one weight row streamed at a time (8-row tiles measured no faster, even in the 32
// registers of AVX-512). Tiles only decide which outputs share loads, never an output's operations (batch
// invariance).
// GEMMs first decode the 16 weight rows into a panel (PreSub) that all the block's tiles read.
// T::tile<RM, RN, PRE>(p, m, n): the outputs [m, m + RM) x [n, n + RN); T::predecode(p, c0, c1, panel).
constexpr int64_t kDecodeRows = 64;   // calls of fewer rows are decode batches (one 64-row block)

template <class T, int RM, int RN, bool PRE>
inline void int8_cols(const DotArgs& p, int64_t m, int64_t c0, int64_t c1) {
  int64_t n = c0;
  for (; n + RN <= c1; n += RN) T::template tile<RM, RN, PRE>(p, m, n);
  for (; n < c1; ++n) T::template tile<RM, 1, PRE>(p, m, n);
}

template <class T>
inline void int8_blocked(const DotArgs& p, int64_t n0, int64_t n1) {
  constexpr int64_t MB = kDecodeRows, NC = 16;
  const int64_t ng = p.K / 32, panel_ws = ng * static_cast<int64_t>(sizeof(PreSub));
  // NOTE: malloc, not a std::vector: no library template instantiated here that the AVX-512 file could compile
  // for its ISA and the linker then keep for the AVX2 code (gguf_gemm_avx512.cpp's include order, same reason)
  PreSub* panel = p.M < kDecodeRows ? nullptr : static_cast<PreSub*>(std::malloc(NC * ng * sizeof(PreSub)));
  for (int64_t mb = 0; mb < p.M; mb += MB) {
    const int64_t me = p.M < mb + MB ? p.M : mb + MB;
    for (int64_t c0 = n0; c0 < n1; c0 += NC) {
      const int64_t c1 = n1 < c0 + NC ? n1 : c0 + NC;
      int64_t m = mb;
      if (p.M < kDecodeRows) {   // decode batches: one weight row per tile, read from the file's blocks
        for (; m + 4 <= me; m += 4) int8_cols<T, 4, 1, false>(p, m, c0, c1);
        if (m + 2 <= me) { int8_cols<T, 2, 1, false>(p, m, c0, c1); m += 2; }
        for (; m < me; ++m) int8_cols<T, 1, 1, false>(p, m, c0, c1);
        continue;
      }
      T::predecode(p, c0, c1, panel);
      DotArgs pp = p;      // row n (c0 <= n < c1) at pp.w + n * pp.ws, as the tiles address rows
      pp.w = reinterpret_cast<const uint8_t*>(reinterpret_cast<uintptr_t>(panel) - c0 * panel_ws);
      pp.ws = panel_ws;
      for (; m + 4 <= me; m += 4) int8_cols<T, 4, T::kGemmRN, true>(pp, m, c0, c1);
      if (m + 2 <= me) { int8_cols<T, 2, 2, true>(pp, m, c0, c1); m += 2; }
      for (; m < me; ++m) int8_cols<T, 1, 1, true>(pp, m, c0, c1);
    }
  }
  std::free(panel);
}

}  // namespace avx2
}  // namespace gguf
