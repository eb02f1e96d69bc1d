// IQ4_XS repacked in groups of 8 rows (type IQ4_XSX8, lmserve/ops/gguf_x8.py repack_iq4_xsx8): the int8 GEMM for
// every M on it (AVX2, and AVX512-VNNI chosen at run time, bit for bit the same), the scalar reference, the repack
// and rows back in file order. The design is gguf_q4_0x8.cpp's ("reduce, then scale"; gguf_x8.h).
//
// Layout (the 8 rows' IQ4_XS super-blocks, 1088 bytes per super-block b as in the file, the bytes in another
// order): the 8 rows' d (fp16, 16 bytes); the low 4 bits of the 6-bit scales as [sub-block pair][row] (32: the
// file's scales_l bytes, scale 2i in the low nibble, 2i+1 in the high one); per sub-block s a 16-bit word with
// row c's top 2 bits of scale s at bits 2c..2c+1 (16); then per sub-block s and t = 0..3 each row's 4 index bytes
// 16s+4t..16s+4t+3 (1024: low nibbles index values 4t..4t+3 of the sub-block, high nibbles 16+4t..16+4t+3).
//
// Per output (m, c), for each 32-value sub-block g in order (levels v = kIQ4NL[index], -127..113; scale sc in
// -32..31):
//   idot = sc * sum v x (exact int32: 32 * 127 * 128 * 32 < 2^24), acc = float(idot) * (d[c] * dx[g]) + acc
// Every path performs exactly these operations. AVX2 multiplies |v| by x with v's sign (maddubs pairs <= 2 * 127 *
// 128, widened at once); AVX512-VNNI feeds v + 128 (v ^ 0x80) to vpdpbusd seeded with -128 x the activations' sum.
#include <cmath>
#include "gguf_blocks.h"
#include "gguf_x8.h"

namespace gguf {
namespace {
constexpr int kGroupBlockBytes = 1088;             // 8 rows x 136 bytes
constexpr int kScLo = 16, kScHi = 48, kQ = 64;     // offsets in a group's super-block

inline void gather_block(const uint8_t* w, int64_t ws, int64_t n, int64_t b, uint8_t* out) {
  const uint8_t* g = w + (n / 8) * 8 * ws + b * kGroupBlockBytes;
  const int c = static_cast<int>(n % 8);
  std::memcpy(out, g + 2 * c, 2);
  uint32_t sh = 0;
  for (int s = 0; s < 8; ++s) {
    const uint32_t word = static_cast<uint32_t>(g[kScHi + 2 * s + 1]) << 8 | g[kScHi + 2 * s];
    sh |= (word >> (2 * c) & 3) << (2 * s);
  }
  out[2] = static_cast<uint8_t>(sh & 255);
  out[3] = static_cast<uint8_t>(sh >> 8);
  for (int i = 0; i < 4; ++i) out[4 + i] = g[kScLo + 8 * i + c];
  for (int s = 0; s < 8; ++s)
    for (int t = 0; t < 4; ++t) std::memcpy(out + 8 + 16 * s + 4 * t, g + kQ + (4 * s + t) * 32 + 4 * c, 4);
}

// sub-block s's signed scale of row c (the reference form of what the tiles decode in lanes)
inline int scale_of(const uint8_t* g, int s, int c) {
  const int lo = (g[kScLo + 8 * (s / 2) + c] >> (4 * (s % 2))) & 15;
  const int hi = ((g[kScHi + 2 * s + 1] << 8 | g[kScHi + 2 * s]) >> (2 * c)) & 3;
  return (lo | hi << 4) - 32;
}
}  // namespace

void iq4_xsx8_pack(const uint8_t* src, int64_t ws, int64_t gr, int64_t nb, uint8_t* dst) {
  const uint8_t* rows = src + gr * 8 * ws;
  uint8_t* g = dst + gr * 8 * ws;
  for (int64_t b = 0; b < nb; ++b, g += kGroupBlockBytes) {
    std::memset(g + kScHi, 0, 16);
    for (int c = 0; c < 8; ++c) {
      const uint8_t* blk = rows + c * ws + b * 136;
      std::memcpy(g + 2 * c, blk, 2);
      const int sh = blk[2] | blk[3] << 8;
      for (int s = 0; s < 8; ++s) {
        const int top = ((sh >> (2 * s)) & 3) << (2 * c);
        g[kScHi + 2 * s] |= static_cast<uint8_t>(top & 255);
        g[kScHi + 2 * s + 1] |= static_cast<uint8_t>(top >> 8);
      }
      for (int i = 0; i < 4; ++i) g[kScLo + 8 * i + c] = blk[4 + i];
      for (int s = 0; s < 8; ++s)
        for (int t = 0; t < 4; ++t) std::memcpy(g + kQ + (4 * s + t) * 32 + 4 * c, blk + 8 + 16 * s + 4 * t, 4);
    }
  }
}

void iq4_xsx8_rows(const uint8_t* w, int64_t ws, int64_t n, int64_t nb, float* out) {
  x8::file_rows<IQ4_XS>(gather_block, w, ws, n, nb, out);
}

void iq4_xsx8_scalar(const DotArgs& p, int64_t n0, int64_t n1) {
  const int64_t nb = p.K / 256, ng = p.K / 32;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* grp = p.w + (n / 8) * 8 * p.ws;
    const int c = static_cast<int>(n % 8);
    for (int64_t m = 0; m < p.M; ++m) {
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* g = grp + b * kGroupBlockBytes;
        const float d = f16(g + 2 * c);
        for (int s = 0; s < 8; ++s) {
          const int64_t gi = m * ng + b * 8 + s;
          const int8_t* qx = p.a->q.data() + gi * 32;
          int32_t sum = 0;
          for (int t = 0; t < 4; ++t)
            for (int k = 0; k < 4; ++k) {
              const uint8_t q = g[kQ + (4 * s + t) * 32 + 4 * c + k];
              sum += kIQ4NL[q & 15] * qx[4 * t + k] + kIQ4NL[q >> 4] * qx[16 + 4 * t + k];
            }
          acc = std::fma(static_cast<float>(scale_of(g, s, c) * sum), d * p.a->dx[gi], acc);
        }
      }
      p.out[m * p.N + n] = acc;
    }
  }
}

}  // namespace gguf

#ifdef LMSERVE_GGUF_AVX2
#include <immintrin.h>

namespace gguf {
namespace {
using x8::load_i32;

inline uint32_t load_u16(const uint8_t* p) { return static_cast<uint32_t>(p[0] | p[1] << 8); }

// sub-block s's signed scales of the 8 rows
inline __m256i scales_avx2(const uint8_t* g, int s) {
  __m256i lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(g + kScLo + 8 * (s / 2))));
  lo = s % 2 ? _mm256_srli_epi32(lo, 4) : _mm256_and_si256(lo, _mm256_set1_epi32(15));
  const __m256i word = _mm256_set1_epi32(static_cast<int>(load_u16(g + kScHi + 2 * s)));
  const __m256i hi = _mm256_and_si256(_mm256_srlv_epi32(word, _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)),
                                      _mm256_set1_epi32(3));
  return _mm256_sub_epi32(_mm256_or_si256(lo, _mm256_slli_epi32(hi, 4)), _mm256_set1_epi32(32));
}

template <int RM, bool PF>
void tile_avx2(const DotArgs& p, int64_t m0, int64_t gr, int64_t n0, int64_t n1) {
  const int64_t K = p.K, nb = K / 256, ng = K / 32;
  const uint8_t* g = p.w + gr * 8 * p.ws;
  const x8::Ahead<PF> ahead(p, g, 1);
  const __m256i ones = _mm256_set1_epi16(1), m4 = _mm256_set1_epi8(15);
  const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kIQ4NL)));
  __m256 acc[RM];
  for (int m = 0; m < RM; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = g + b * kGroupBlockBytes;
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
    for (int s = 0; s < 8; ++s) {
      ahead.lines(b, kGroupBlockBytes, s, 4);
      __m256i sum[RM];
      for (int m = 0; m < RM; ++m) sum[m] = _mm256_setzero_si256();
      for (int t = 0; t < 4; ++t) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + kQ + (4 * s + t) * 32));
        const __m256i lo = _mm256_shuffle_epi8(table, _mm256_and_si256(v, m4));
        const __m256i hi = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(v, 4), m4));
        const __m256i alo = _mm256_abs_epi8(lo), ahi = _mm256_abs_epi8(hi);
        for (int m = 0; m < RM; ++m) {
          const int8_t* qx = p.a->q.data() + (m0 + m) * K + (b * 8 + s) * 32;
          const __m256i xlo = _mm256_sign_epi8(_mm256_set1_epi32(load_i32(qx + 4 * t)), lo);
          const __m256i xhi = _mm256_sign_epi8(_mm256_set1_epi32(load_i32(qx + 16 + 4 * t)), hi);
          sum[m] = _mm256_add_epi32(sum[m], _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(alo, xlo), ones),
                                                             _mm256_madd_epi16(_mm256_maddubs_epi16(ahi, xhi), ones)));
          x8::pin(sum[m]);
        }
      }
      const __m256i sc = scales_avx2(blk, s);
      for (int m = 0; m < RM; ++m) {
        const int64_t gi = (m0 + m) * ng + b * 8 + s;
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_mullo_epi32(sc, sum[m])),
                                 _mm256_mul_ps(d, _mm256_set1_ps(p.a->dx[gi])), acc[m]);
      }
    }
  }
  x8::store_tile<RM>(p, m0, gr, acc, n0, n1);
}

struct Avx2 {
  template <int RM, int, bool PF>
  static void tile(const DotArgs& p, int64_t m, int64_t gr, int64_t n0, int64_t n1) {
    tile_avx2<RM, PF>(p, m, gr, n0, n1);
  }
};

}  // namespace

void iq4_xsx8_avx2(const DotArgs& p, int64_t n0, int64_t n1) { x8::blocked<x8::PlainTile<Avx2, 1>>(p, n0, n1); }

}  // namespace gguf

// ---- AVX512-VNNI: two groups (16 columns) per register; vpdpbusd on v + 128 seeded with -128 x sum x ----
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#include "gguf_x8_avx512.h"

namespace gguf {
namespace {

inline __m512i scales_vnni(const uint8_t* a, const uint8_t* b, int s) {
  __m512i lo = _mm512_cvtepu8_epi32(_mm_unpacklo_epi64(
      _mm_loadl_epi64(reinterpret_cast<const __m128i*>(a + kScLo + 8 * (s / 2))),
      _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + kScLo + 8 * (s / 2)))));
  lo = s % 2 ? _mm512_srli_epi32(lo, 4) : _mm512_and_si512(lo, _mm512_set1_epi32(15));
  const __m256i wa = _mm256_set1_epi32(static_cast<int>(load_u16(a + kScHi + 2 * s)));
  const __m256i wb = _mm256_set1_epi32(static_cast<int>(load_u16(b + kScHi + 2 * s)));
  const __m512i words = _mm512_inserti64x4(_mm512_castsi256_si512(wa), wb, 1);
  const __m512i hi = _mm512_and_si512(
      _mm512_srlv_epi32(words, _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 0, 2, 4, 6, 8, 10, 12, 14)),
      _mm512_set1_epi32(3));
  return _mm512_sub_epi32(_mm512_or_si512(lo, _mm512_slli_epi32(hi, 4)), _mm512_set1_epi32(32));
}

template <int RM, int NG, bool PF>
void tile_vnni(const DotArgs& p, int64_t m0, int64_t gr, int64_t n0, int64_t n1) {
  const int64_t K = p.K, nb = K / 256, ng = K / 32;
  const uint8_t* ga = p.w + gr * 8 * p.ws;
  const uint8_t* gb = NG == 2 ? ga + 8 * p.ws : ga;
  const x8::Ahead<PF> ahead(p, ga, NG);
  const __m512i m4 = _mm512_set1_epi8(15), flip = _mm512_set1_epi8(static_cast<char>(0x80));
  // the levels + 128 (unsigned), in each 128-bit lane for vpshufb
  const __m128i nl = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kIQ4NL));
  const __m512i table = _mm512_xor_si512(_mm512_broadcast_i32x4(nl), flip);
  __m512 acc[RM];
  for (int m = 0; m < RM; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* ba = ga + b * kGroupBlockBytes;
    const uint8_t* bb = gb + b * kGroupBlockBytes;
    const __m512 dv = x8::scales2<NG>(ba, bb);
    for (int s = 0; s < 8; ++s) {
      ahead.lines(b, kGroupBlockBytes, s, 4);
      __m512i sum[RM];
      for (int m = 0; m < RM; ++m)
        sum[m] = _mm512_set1_epi32(-128 * p.a->qsum[(m0 + m) * ng + b * 8 + s]);
      for (int t = 0; t < 4; ++t) {
        const __m512i v = x8::load2<NG>(ba, bb, kQ + (4 * s + t) * 32);
        const __m512i lo = _mm512_shuffle_epi8(table, _mm512_and_si512(v, m4));
        const __m512i hi = _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16(v, 4), m4));
        for (int m = 0; m < RM; ++m) {
          const int8_t* qx = p.a->q.data() + (m0 + m) * K + (b * 8 + s) * 32;
          sum[m] = _mm512_dpbusd_epi32(sum[m], lo, _mm512_set1_epi32(load_i32(qx + 4 * t)));
          sum[m] = _mm512_dpbusd_epi32(sum[m], hi, _mm512_set1_epi32(load_i32(qx + 16 + 4 * t)));
        }
      }
      const __m512i sc = scales_vnni(ba, bb, s);
      for (int m = 0; m < RM; ++m) {
        const int64_t gi = (m0 + m) * ng + b * 8 + s;
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_mullo_epi32(sc, sum[m])),
                                 _mm512_mul_ps(dv, _mm512_set1_ps(p.a->dx[gi])), acc[m]);
      }
    }
  }
  x8::store_tile<RM, NG>(p, m0, gr, acc, n0, n1);
}

struct Vnni {
  template <int RM, int NG, bool PF>
  static void tile(const DotArgs& p, int64_t m, int64_t gr, int64_t n0, int64_t n1) {
    tile_vnni<RM, NG, PF>(p, m, gr, n0, n1);
  }
};

}  // namespace

void iq4_xsx8_avx512vnni(const DotArgs& p, int64_t n0, int64_t n1) {
  x8::blocked<x8::PlainTile<Vnni, 2, 8>>(p, n0, n1);
}

}  // namespace gguf

#pragma GCC pop_options
#endif  // LMSERVE_GGUF_AVX2
