// MXFP4 and IQ4_NL repacked in groups of 8 rows (types MXFP4X8 / IQ4_NLX8, lmserve/ops/gguf_x8.py repack_mxfp4x8 /
// repack_q4_0x8): the int8 GEMM for every M on them (AVX2, and AVX512-VNNI chosen at run time, bit for bit the same),
// the scalar reference, the repack (MXFP4's; IQ4_NL's is q4_0x8_pack) and rows back in file order. The design is
// gguf_q4_0x8.cpp's ("reduce, then scale"; gguf_x8.h). MXFP4 is the experts' format of gpt-oss and of
// llama-quantize's MXFP4_MOE files: in a MoE decode step most of the bytes read are these. IQ4_NL is IQ4_XS's levels
// in Q4_0's block (IQ4_NL files, and the matrices of IQ4_XS files whose rows are not whole 256-value blocks).
//
// Layout (the 8 rows' blocks, 136 / 144 bytes per block b as in the file, the bytes in another order): the 8 rows'
// headers (MXFP4: an E8M0 exponent byte e[c]; IQ4_NL: an fp16 d[c], so this is Q4_0x8's layout), then for t = 0..3
// and c = 0..7 row c's 4 index bytes 4t..4t+3 (low nibbles index values 4t..4t+3 of the block, high nibbles
// 16+4t..16+4t+3).
//
// Per output (m, c), in block order (values v = kMXFP4[index], -12..12, or kIQ4NL[index], -127..113; scale
// d = 2^(e - 128) (e8m0_half) or d[c]):
//   idot = sum v x (exact int32), acc = float(idot) * (d[c] * dx[m, b]) + acc
// Every path performs exactly these operations. AVX2 sums the integer dot in one of three forms (tile_avx2);
// AVX512-VNNI feeds v + 128 (v ^ 0x80) to vpdpbusd seeded with -128 x the activations' sum.
#include <cmath>
#include "gguf_blocks.h"
#include "gguf_x8.h"

namespace gguf {
namespace {
// per type: the file block's header bytes, a group's block bytes, the index bytes' offset in it, the levels
template <int QT> constexpr int kHead = QT == MXFP4 ? 1 : 2;
template <int QT> constexpr int kGroupBlockBytes = 8 * (kHead<QT> + 16);    // 136 / 144
template <int QT> constexpr int kQ = 8 * kHead<QT>;
template <int QT> constexpr const int8_t* kLevels = QT == MXFP4 ? kMXFP4 : kIQ4NL;

template <int QT>
inline float scale_of(const uint8_t* g, int c) {
  return QT == MXFP4 ? e8m0_half(g[c]) : f16(g + 2 * c);
}

template <int QT>
inline void gather_block(const uint8_t* w, int64_t ws, int64_t n, int64_t b, uint8_t* out) {
  const uint8_t* g = w + (n / 8) * 8 * ws + b * kGroupBlockBytes<QT>;
  const int c = static_cast<int>(n % 8);
  std::memcpy(out, g + kHead<QT> * c, kHead<QT>);
  for (int t = 0; t < 4; ++t) std::memcpy(out + kHead<QT> + 4 * t, g + kQ<QT> + t * 32 + c * 4, 4);
}

template <int QT>
void pack(const uint8_t* src, int64_t ws, int64_t gr, int64_t nb, uint8_t* dst) {
  const uint8_t* rows = src + gr * 8 * ws;
  uint8_t* g = dst + gr * 8 * ws;
  for (int64_t b = 0; b < nb; ++b, g += kGroupBlockBytes<QT>)
    for (int c = 0; c < 8; ++c) {
      const uint8_t* blk = rows + c * ws + b * (kHead<QT> + 16);
      std::memcpy(g + kHead<QT> * c, blk, kHead<QT>);
      for (int t = 0; t < 4; ++t) std::memcpy(g + kQ<QT> + t * 32 + c * 4, blk + kHead<QT> + 4 * t, 4);
    }
}

template <int QT>
void scalar(const DotArgs& p, int64_t n0, int64_t n1) {
  const int64_t nb = p.K / 32;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* grp = p.w + (n / 8) * 8 * p.ws;
    const int c = static_cast<int>(n % 8);
    for (int64_t m = 0; m < p.M; ++m) {
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* g = grp + b * kGroupBlockBytes<QT>;
        const int64_t gi = m * nb + b;
        const int8_t* qx = p.a->q.data() + gi * 32;
        int32_t idot = 0;
        for (int t = 0; t < 4; ++t)
          for (int k = 0; k < 4; ++k) {
            const uint8_t q = g[kQ<QT> + t * 32 + 4 * c + k];
            idot += kLevels<QT>[q & 15] * qx[4 * t + k] + kLevels<QT>[q >> 4] * qx[16 + 4 * t + k];
          }
        acc = std::fma(static_cast<float>(idot), scale_of<QT>(g, c) * p.a->dx[gi], acc);
      }
      p.out[m * p.N + n] = acc;
    }
  }
}
}  // namespace

void mxfp4x8_pack(const uint8_t* src, int64_t ws, int64_t gr, int64_t nb, uint8_t* dst) {
  pack<MXFP4>(src, ws, gr, nb, dst);
}
void mxfp4x8_rows(const uint8_t* w, int64_t ws, int64_t n, int64_t nb, float* out) {
  x8::file_rows<MXFP4>(gather_block<MXFP4>, w, ws, n, nb, out);
}
void iq4_nlx8_rows(const uint8_t* w, int64_t ws, int64_t n, int64_t nb, float* out) {
  x8::file_rows<IQ4_NL>(gather_block<IQ4_NL>, w, ws, n, nb, out);
}
void mxfp4x8_scalar(const DotArgs& p, int64_t n0, int64_t n1) { scalar<MXFP4>(p, n0, n1); }
void iq4_nlx8_scalar(const DotArgs& p, int64_t n0, int64_t n1) { scalar<IQ4_NL>(p, n0, n1); }

}  // namespace gguf

#ifdef LMSERVE_GGUF_AVX2
#include <immintrin.h>

namespace gguf {
namespace {
using x8::load_i32;

// the 8 rows' scales: IQ4_NL's fp16 d; MXFP4's e8m0_half(e[c]) from the exponent bytes, (e - 1) << 23 or
// 0x00200000 << e below 2
template <int QT>
inline __m256 scales_avx2(const uint8_t* g) {
  if constexpr (QT == IQ4_NL) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g)));
  const __m256i e = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(g)));
  const __m256i normal = _mm256_slli_epi32(_mm256_sub_epi32(e, _mm256_set1_epi32(1)), 23);
  const __m256i sub = _mm256_sllv_epi32(_mm256_set1_epi32(0x00200000), e);
  return _mm256_castsi256_ps(_mm256_blendv_epi8(normal, sub, _mm256_cmpgt_epi32(_mm256_set1_epi32(2), e)));
}

// Three forms of the same exact idot. MXFP4 up to 2 rows (decode, where unpacking bounds the tile): v + 12 (0..24)
// by x, the low and high halves' 4 maddubs each summed in int16 (<= 4 * 2 * 24 * 127 = 24384), minus 12 x sum x; no
// abs / sign per 32 values (N 16384 x K 2048 from DRAM, two threads: 1 row 0.70 -> 0.64-0.65 ms, 2 rows 0.88-0.93
// -> 0.83-0.85). MXFP4 from 4 rows: |v| by x with v's sign in one int16 sum per row, which leaves AVX2's 16
// registers enough for 4 rows. IQ4_NL: |v| by x with v's sign, each maddubs (<= 2 * 127 * 127) widened at once.
template <int QT, int RM, bool PF>
void tile_avx2(const DotArgs& p, int64_t m0, int64_t gr, int64_t n0, int64_t n1) {
  constexpr bool kOffset = QT == MXFP4 && RM <= 2, kWide = QT == IQ4_NL;
  constexpr int kBytes = kGroupBlockBytes<QT>;
  const int64_t K = p.K, nb = K / 32;
  const uint8_t* g = p.w + gr * 8 * p.ws;
  const x8::Ahead<PF> ahead(p, g, 1);
  const __m256i ones = _mm256_set1_epi16(1), m4 = _mm256_set1_epi8(15);
  __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kLevels<QT>)));
  if (kOffset) table = _mm256_add_epi8(table, _mm256_set1_epi8(12));
  __m256 acc[RM];
  for (int m = 0; m < RM; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = g + b * kBytes;
    ahead.lines(b, kBytes, 0, 3);
    __m256i s16[RM], h16[RM];
    for (int m = 0; m < RM; ++m) s16[m] = h16[m] = _mm256_setzero_si256();
    #pragma GCC unroll 4
    for (int t = 0; t < 4; ++t) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + kQ<QT> + t * 32));
      const __m256i lo = _mm256_shuffle_epi8(table, _mm256_and_si256(v, m4));
      const __m256i hi = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(v, 4), m4));
      if constexpr (kOffset) {
        for (int m = 0; m < RM; ++m) {
          const int8_t* qx = p.a->q.data() + (m0 + m) * K + b * 32;
          s16[m] = _mm256_add_epi16(s16[m], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(load_i32(qx + 4 * t))));
          h16[m] = _mm256_add_epi16(h16[m], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(load_i32(qx + 16 + 4 * t))));
          x8::pin(s16[m]);
          x8::pin(h16[m]);
        }
      } else {
        const __m256i alo = _mm256_abs_epi8(lo), ahi = _mm256_abs_epi8(hi);
        for (int m = 0; m < RM; ++m) {
          const int8_t* qx = p.a->q.data() + (m0 + m) * K + b * 32;
          const __m256i xlo = _mm256_sign_epi8(_mm256_set1_epi32(load_i32(qx + 4 * t)), lo);
          const __m256i xhi = _mm256_sign_epi8(_mm256_set1_epi32(load_i32(qx + 16 + 4 * t)), hi);
          if constexpr (kWide) {    // s16 holds int32 sums here
            const __m256i plo = _mm256_madd_epi16(_mm256_maddubs_epi16(alo, xlo), ones);
            const __m256i phi = _mm256_madd_epi16(_mm256_maddubs_epi16(ahi, xhi), ones);
            s16[m] = _mm256_add_epi32(s16[m], _mm256_add_epi32(plo, phi));
          } else {
            s16[m] = _mm256_add_epi16(s16[m], _mm256_maddubs_epi16(alo, xlo));
            s16[m] = _mm256_add_epi16(s16[m], _mm256_maddubs_epi16(ahi, xhi));
          }
          x8::pin(s16[m]);
        }
      }
    }
    const __m256 d = scales_avx2<QT>(blk);
    for (int m = 0; m < RM; ++m) {
      const int64_t gi = (m0 + m) * nb + b;
      __m256i idot = kWide ? s16[m] : _mm256_madd_epi16(s16[m], ones);
      if (kOffset)
        idot = _mm256_sub_epi32(_mm256_add_epi32(idot, _mm256_madd_epi16(h16[m], ones)),
                                _mm256_set1_epi32(12 * p.a->qsum[gi]));
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(idot), _mm256_mul_ps(d, _mm256_set1_ps(p.a->dx[gi])), acc[m]);
    }
  }
  x8::store_tile<RM>(p, m0, gr, acc, n0, n1);
}

template <int QT>
struct Avx2 {
  template <int RM, int, bool PF>
  static void tile(const DotArgs& p, int64_t m, int64_t gr, int64_t n0, int64_t n1) {
    tile_avx2<QT, RM, PF>(p, m, gr, n0, n1);
  }
};

}  // namespace

void mxfp4x8_avx2(const DotArgs& p, int64_t n0, int64_t n1) { x8::blocked<x8::PlainTile<Avx2<MXFP4>, 1>>(p, n0, n1); }
void iq4_nlx8_avx2(const DotArgs& p, int64_t n0, int64_t n1) {
  x8::blocked<x8::PlainTile<Avx2<IQ4_NL>, 1>>(p, n0, n1);
}

}  // namespace gguf

// ---- AVX512-VNNI: two groups (16 columns) per register; vpdpbusd on v + 128 seeded with -128 x sum x ----
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#include "gguf_x8_avx512.h"

namespace gguf {
namespace {

// scales_avx2 for the 16 rows of two groups (NG = 1: the 8 of group a twice)
template <int QT, int NG>
inline __m512 scales_vnni(const uint8_t* a, const uint8_t* b) {
  if constexpr (QT == IQ4_NL) return x8::scales2<NG>(a, b);
  const __m512i e = _mm512_cvtepu8_epi32(_mm_unpacklo_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(a)),
                                                            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b))));
  const __m512i normal = _mm512_slli_epi32(_mm512_sub_epi32(e, _mm512_set1_epi32(1)), 23);
  const __m512i sub = _mm512_sllv_epi32(_mm512_set1_epi32(0x00200000), e);
  return _mm512_castsi512_ps(_mm512_mask_blend_epi32(_mm512_cmplt_epi32_mask(e, _mm512_set1_epi32(2)), normal, sub));
}

template <int QT, int RM, int NG, bool PF>
void tile_vnni(const DotArgs& p, int64_t m0, int64_t gr, int64_t n0, int64_t n1) {
  constexpr int kBytes = kGroupBlockBytes<QT>;
  const int64_t K = p.K, nb = K / 32;
  const uint8_t* ga = p.w + gr * 8 * p.ws;
  const uint8_t* gb = NG == 2 ? ga + 8 * p.ws : ga;
  const x8::Ahead<PF> ahead(p, ga, NG);
  const __m512i m4 = _mm512_set1_epi8(15), flip = _mm512_set1_epi8(static_cast<char>(0x80));
  // the values + 128 (unsigned), in each 128-bit lane for vpshufb
  const __m512i table =
      _mm512_xor_si512(_mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kLevels<QT>))), flip);
  __m512 acc[RM];
  for (int m = 0; m < RM; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* ba = ga + b * kBytes;
    const uint8_t* bb = gb + b * kBytes;
    ahead.lines(b, kBytes, 0, 3);
    __m512i s0[RM], s1[RM];
    for (int m = 0; m < RM; ++m) {
      s0[m] = _mm512_set1_epi32(-128 * p.a->qsum[(m0 + m) * nb + b]);
      s1[m] = _mm512_setzero_si512();
    }
    #pragma GCC unroll 4
    for (int t = 0; t < 4; ++t) {
      const __m512i v = x8::load2<NG>(ba, bb, kQ<QT> + t * 32);
      const __m512i lo = _mm512_shuffle_epi8(table, _mm512_and_si512(v, m4));
      const __m512i hi = _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16(v, 4), m4));
      for (int m = 0; m < RM; ++m) {
        const int8_t* qx = p.a->q.data() + (m0 + m) * K + b * 32;
        s0[m] = _mm512_dpbusd_epi32(s0[m], lo, _mm512_set1_epi32(load_i32(qx + 4 * t)));
        s1[m] = _mm512_dpbusd_epi32(s1[m], hi, _mm512_set1_epi32(load_i32(qx + 16 + 4 * t)));
      }
    }
    const __m512 d = scales_vnni<QT, NG>(ba, bb);
    for (int m = 0; m < RM; ++m) {
      const int64_t gi = (m0 + m) * nb + b;
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0[m], s1[m])),
                               _mm512_mul_ps(d, _mm512_set1_ps(p.a->dx[gi])), acc[m]);
    }
  }
  x8::store_tile<RM, NG>(p, m0, gr, acc, n0, n1);
}

template <int QT>
struct Vnni {
  template <int RM, int NG, bool PF>
  static void tile(const DotArgs& p, int64_t m, int64_t gr, int64_t n0, int64_t n1) {
    tile_vnni<QT, RM, NG, PF>(p, m, gr, n0, n1);
  }
};

}  // namespace

void mxfp4x8_avx512vnni(const DotArgs& p, int64_t n0, int64_t n1) {
  x8::blocked<x8::PlainTile<Vnni<MXFP4>, 2, 8>>(p, n0, n1);
}
void iq4_nlx8_avx512vnni(const DotArgs& p, int64_t n0, int64_t n1) {
  x8::blocked<x8::PlainTile<Vnni<IQ4_NL>, 2, 8>>(p, n0, n1);
}

}  // namespace gguf

#pragma GCC pop_options
#endif  // LMSERVE_GGUF_AVX2
