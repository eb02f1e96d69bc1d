// Q6_K repacked in groups of 8 rows (type Q6_KX8, lmserve/ops/gguf_x8.py repack_q6_kx8): the int8 GEMM for
// every M on it (AVX2, and AVX512-VNNI chosen at run time, bit for bit the same), the scalar reference, the repack
// and rows back in file order. The design is gguf_q4_0x8.cpp's ("reduce, then scale"; gguf_x8.h).
//
// Layout (the 8 rows' Q6_K super-blocks, 1680 bytes per super-block b as in the file, the bits in another order): the
// 8 rows' d (fp16, 16 bytes); their 16 int8 scales as [scale][row] (128); then for each 16-value half h = 0..15 of
// the super-block three 32-byte chunks j = 0..2 of [row][4 bytes] (1536). Byte k of row c in chunk j holds value
// 4j + k of the half (the 6-bit stored value, bits 0-5) and bits 2j, 2j+1 of value 12 + k (bits 6-7). So one
// 32-byte load and one AND give 4 values of every row of the group, and the fourth quad is three masks and shifts
// away: about half the instructions of unpacking the file's ql/qh nibbles and 2-bit fields, for the same bytes.
//
// Per output (m, c), for each 32-value sub-block g in order, with its two 16-value halves A, B (scales sa, sb):
//   dA = sum_A (q - 32) x, dB likewise (q = the stored 6-bit value), idot = sa * dA + sb * dB (exact int32:
//   |idot| <= 2 * 128 * 16 * 32 * 127 < 2^24), acc = float(idot) * (d[c] * dx[g]) + acc
// Every path performs exactly these operations. AVX2: two maddubs (<= 2 * 63 * 127 each) summed in int16 <= 32004.
#include <cmath>
#include "gguf_blocks.h"
#include "gguf_x8.h"

namespace gguf {
namespace {
constexpr int kGroupBlockBytes = 1680;   // 8 rows x 210 bytes
constexpr int kScales = 16, kQ = 144;    // offsets in a group's super-block

// a file block's 256 stored 6-bit values (0..63) <-> its ql / qh bytes (decode_block's bit order)
inline void file_values(const uint8_t* blk, uint8_t* v) {
  for (int i = 0; i < 256; ++i) {
    const int h = i / 128, quarter = (i % 128) / 32, l = i % 32;
    const uint8_t ql = blk[h * 64 + (quarter & 1) * 32 + l], qh = blk[128 + h * 32 + l];
    v[i] = static_cast<uint8_t>((quarter >= 2 ? ql >> 4 : ql & 15) | ((qh >> (2 * quarter)) & 3) << 4);
  }
}

inline void values_to_file(const uint8_t* v, uint8_t* blk) {
  std::memset(blk, 0, 192);
  for (int i = 0; i < 256; ++i) {
    const int h = i / 128, quarter = (i % 128) / 32, l = i % 32;
    blk[h * 64 + (quarter & 1) * 32 + l] |= static_cast<uint8_t>((v[i] & 15) << (quarter >= 2 ? 4 : 0));
    blk[128 + h * 32 + l] |= static_cast<uint8_t>((v[i] >> 4) << (2 * quarter));
  }
}

// byte k of row c's chunk j of half h <-> the half's values (see the layout above)
inline uint8_t chunk_byte(const uint8_t* half, int j, int k) {
  return static_cast<uint8_t>(half[4 * j + k] | ((half[12 + k] >> (2 * j)) & 3) << 6);
}

inline void gather_block(const uint8_t* w, int64_t ws, int64_t n, int64_t b, uint8_t* out) {
  const uint8_t* g = w + (n / 8) * 8 * ws + b * kGroupBlockBytes;
  const int c = static_cast<int>(n % 8);
  std::memcpy(out + 208, g + 2 * c, 2);
  for (int s = 0; s < 16; ++s) out[192 + s] = g[kScales + s * 8 + c];
  uint8_t v[256];
  for (int h = 0; h < 16; ++h)
    for (int k = 0; k < 4; ++k) {
      uint8_t top = 0;
      for (int j = 0; j < 3; ++j) {
        const uint8_t byte = g[kQ + (h * 3 + j) * 32 + c * 4 + k];
        v[h * 16 + 4 * j + k] = byte & 63;
        top = static_cast<uint8_t>(top | (byte >> 6) << (2 * j));
      }
      v[h * 16 + 12 + k] = top;
    }
  values_to_file(v, out);
}

}  // namespace

void q6_kx8_pack(const uint8_t* src, int64_t ws, int64_t gr, int64_t nb, uint8_t* dst) {
  const uint8_t* rows = src + gr * 8 * ws;
  uint8_t* g = dst + gr * 8 * ws;
  uint8_t v[256];
  for (int64_t b = 0; b < nb; ++b, g += kGroupBlockBytes)
    for (int c = 0; c < 8; ++c) {
      const uint8_t* blk = rows + c * ws + b * 210;
      std::memcpy(g + 2 * c, blk + 208, 2);
      for (int s = 0; s < 16; ++s) g[kScales + s * 8 + c] = blk[192 + s];
      file_values(blk, v);
      for (int h = 0; h < 16; ++h)
        for (int j = 0; j < 3; ++j)
          for (int k = 0; k < 4; ++k) g[kQ + (h * 3 + j) * 32 + c * 4 + k] = chunk_byte(v + 16 * h, j, k);
    }
}

void q6_kx8_rows(const uint8_t* w, int64_t ws, int64_t n, int64_t nb, float* out) {
  x8::file_rows<Q6_K>(gather_block, w, ws, n, nb, out);
}

void q6_kx8_scalar(const DotArgs& p, int64_t n0, int64_t n1) {
  const int64_t nb = p.K / 256, ng = p.K / 32;
  uint8_t blk[210];
  Decoded o;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < p.M; ++m) {
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        gather_block(p.w, p.ws, n, b, blk);
        decode_block(Q6_K, blk, o);     // o.q = stored value - 32
        const float d = f16(blk + 208);
        const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
        for (int s = 0; s < 8; ++s) {
          const int64_t g = m * ng + b * 8 + s;
          const int8_t* qx = p.a->q.data() + g * 32;
          int32_t da = 0, db = 0;
          for (int l = 0; l < 16; ++l) {
            da += o.q[s * 32 + l] * qx[l];
            db += o.q[s * 32 + 16 + l] * qx[16 + l];
          }
          const int32_t idot = sc[2 * s] * da + sc[2 * s + 1] * db;
          acc = std::fma(static_cast<float>(idot), d * p.a->dx[g], acc);
        }
      }
      p.out[m * p.N + n] = acc;
    }
}

}  // namespace gguf

#ifdef LMSERVE_GGUF_AVX2
#include <immintrin.h>

namespace gguf {
namespace {
using x8::load_i32;

// the 6-bit values (unsigned, 0..63) of the four k-quads of half h for 8 rows
inline void q6_avx2(const uint8_t* blk, int h, __m256i q[4]) {
  const uint8_t* c = blk + kQ + h * 96;
  const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c));
  const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 32));
  const __m256i b2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 64));
  const __m256i m6 = _mm256_set1_epi8(63), top = _mm256_set1_epi8(static_cast<char>(0xC0));
  q[0] = _mm256_and_si256(b0, m6);
  q[1] = _mm256_and_si256(b1, m6);
  q[2] = _mm256_and_si256(b2, m6);
  // bits 6-7 of each byte moved down within it (16-bit shifts of masked bytes carry nothing across bytes)
  q[3] = _mm256_or_si256(_mm256_or_si256(_mm256_srli_epi16(_mm256_and_si256(b0, top), 6),
                                         _mm256_srli_epi16(_mm256_and_si256(b1, top), 4)),
                         _mm256_srli_epi16(_mm256_and_si256(b2, top), 2));
}

template <int RM, bool PF>
void tile_avx2(const DotArgs& p, int64_t m0, int64_t gr, int64_t n0, int64_t n1) {
  const int64_t K = p.K, nb = K / 256, ng = K / 32;
  const uint8_t* g = p.w + gr * 8 * p.ws;
  const x8::Ahead<PF> ahead(p, g, 1);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[RM];
  for (int m = 0; m < RM; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = g + b * kGroupBlockBytes;
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
    #pragma GCC unroll 2
    for (int s = 0; s < 8; ++s) {
      ahead.lines(b, kGroupBlockBytes, s, 4);
      __m256i half[2][RM];
      for (int hf = 0; hf < 2; ++hf) {
        __m256i q[4];
        q6_avx2(blk, 2 * s + hf, q);
        for (int m = 0; m < RM; ++m) {
          const int8_t* qx = p.a->q.data() + (m0 + m) * K + (b * 8 + s) * 32 + 16 * hf;
          const __m256i p01 = _mm256_add_epi16(_mm256_maddubs_epi16(q[0], _mm256_set1_epi32(load_i32(qx))),
                                               _mm256_maddubs_epi16(q[1], _mm256_set1_epi32(load_i32(qx + 4))));
          const __m256i p23 = _mm256_add_epi16(_mm256_maddubs_epi16(q[2], _mm256_set1_epi32(load_i32(qx + 8))),
                                               _mm256_maddubs_epi16(q[3], _mm256_set1_epi32(load_i32(qx + 12))));
          half[hf][m] = _mm256_add_epi32(_mm256_madd_epi16(p01, ones), _mm256_madd_epi16(p23, ones));
        }
      }
      const __m256i sa = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + kScales + 16 * s)));
      const __m256i sb = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + kScales + 16 * s + 8)));
      for (int m = 0; m < RM; ++m) {
        const int64_t gi = (m0 + m) * ng + b * 8 + s;
        const __m256i da = _mm256_add_epi32(half[0][m], _mm256_set1_epi32(p.a->hs[gi * 2]));
        const __m256i db = _mm256_add_epi32(half[1][m], _mm256_set1_epi32(p.a->hs[gi * 2 + 1]));
        const __m256i idot = _mm256_add_epi32(_mm256_mullo_epi32(sa, da), _mm256_mullo_epi32(sb, db));
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(idot), _mm256_mul_ps(d, _mm256_set1_ps(p.a->dx[gi])), acc[m]);
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

void q6_kx8_avx2(const DotArgs& p, int64_t n0, int64_t n1) { x8::blocked<x8::PlainTile<Avx2, 1>>(p, n0, n1); }

}  // namespace gguf

// ---- AVX512-VNNI: two groups (16 columns) per register; vpdpbusd seeded with -32 x the half's activation sum ----
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#include "gguf_x8_avx512.h"

namespace gguf {
namespace {

template <int RM, int NG, bool PF>
void tile_vnni(const DotArgs& p, int64_t m0, int64_t gr, int64_t n0, int64_t n1) {
  const int64_t K = p.K, nb = K / 256, ng = K / 32;
  const uint8_t* ga = p.w + gr * 8 * p.ws;
  const uint8_t* gb = NG == 2 ? ga + 8 * p.ws : ga;
  const x8::Ahead<PF> ahead(p, ga, NG);
  const __m512i m6 = _mm512_set1_epi8(63), top = _mm512_set1_epi8(static_cast<char>(0xC0));
  __m512 acc[RM];
  for (int m = 0; m < RM; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* ba = ga + b * kGroupBlockBytes;
    const uint8_t* bb = gb + b * kGroupBlockBytes;
    const __m512 dv = x8::scales2<NG>(ba, bb);
    for (int s = 0; s < 8; ++s) {
      ahead.lines(b, kGroupBlockBytes, s, 4);
      __m512i half[2][RM];
      for (int m = 0; m < RM; ++m) {
        const int32_t* hs = p.a->hs.data() + ((m0 + m) * ng + b * 8 + s) * 2;
        half[0][m] = _mm512_set1_epi32(hs[0]);
        half[1][m] = _mm512_set1_epi32(hs[1]);
      }
      for (int hf = 0; hf < 2; ++hf) {
        const int64_t off = kQ + (2 * s + hf) * 96;
        const __m512i b0 = x8::load2<NG>(ba, bb, off), b1 = x8::load2<NG>(ba, bb, off + 32),
                      b2 = x8::load2<NG>(ba, bb, off + 64);
        const __m512i q[4] = {
            _mm512_and_si512(b0, m6), _mm512_and_si512(b1, m6), _mm512_and_si512(b2, m6),
            _mm512_ternarylogic_epi32(_mm512_srli_epi16(_mm512_and_si512(b0, top), 6),
                                      _mm512_srli_epi16(_mm512_and_si512(b1, top), 4),
                                      _mm512_srli_epi16(_mm512_and_si512(b2, top), 2), 0xFE)};   // a | b | c
        for (int u = 0; u < 4; ++u)
          for (int m = 0; m < RM; ++m) {
            const int8_t* qx = p.a->q.data() + (m0 + m) * K + (b * 8 + s) * 32 + 16 * hf;
            half[hf][m] = _mm512_dpbusd_epi32(half[hf][m], q[u], _mm512_set1_epi32(load_i32(qx + 4 * u)));
          }
      }
      const __m512i sa = _mm512_cvtepi8_epi32(_mm_unpacklo_epi64(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(ba + kScales + 16 * s)),
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bb + kScales + 16 * s))));
      const __m512i sb = _mm512_cvtepi8_epi32(_mm_unpacklo_epi64(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(ba + kScales + 16 * s + 8)),
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bb + kScales + 16 * s + 8))));
      for (int m = 0; m < RM; ++m) {
        const int64_t gi = (m0 + m) * ng + b * 8 + s;
        const __m512i idot = _mm512_add_epi32(_mm512_mullo_epi32(sa, half[0][m]), _mm512_mullo_epi32(sb, half[1][m]));
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(idot), _mm512_mul_ps(dv, _mm512_set1_ps(p.a->dx[gi])), acc[m]);
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

void q6_kx8_avx512vnni(const DotArgs& p, int64_t n0, int64_t n1) {
  x8::blocked<x8::PlainTile<Vnni, 2>>(p, n0, n1);
}

}  // namespace gguf

#pragma GCC pop_options
#endif  // LMSERVE_GGUF_AVX2
