// Q3_K repacked in groups of 8 rows (type Q3_KX8, lmserve/ops/gguf_x8.py repack_q3_kx8): the int8 GEMM for every M
// on it (AVX2, and AVX512-VNNI chosen at run time, bit for bit the same), the scalar reference, the repack and rows
// back in file order. The design is gguf_q6_kx8.cpp's ("reduce, then scale"; gguf_x8.h).
//
// In the file a row's value e (0..255) is split over two planes: its low 2 bits in qs (byte 32 (e / 128) + e % 32,
// bits 2 ((e % 128) / 32)) and its third bit in hmask (byte e % 32, bit e / 32), with 16 6-bit scales packed in
// 12 bytes. Unpacking that per row costs more than reading it (a row-major decode was 0.63x llama.cpp's).
// Layout (the 8 rows' Q3_K super-blocks, 880 bytes per super-block b as in the file, the bits in another order):
// the 8 rows' d (fp16, 16 bytes); per 32-value sub-block s = 0..7 its two scales (2s, 2s+1) of the 8 rows in 12
// bytes: byte c = low 4 bits of row c's scale 2s | those of its scale 2s+1 << 4, then a 32-bit word holding
// row c's top 2 bits of scale 2s at bits 2c..2c+1 and of scale 2s+1 at bits 16+2c..17+2c (96); then per sub-block
// s (96 bytes each): for its halves A, B (16 values each) a chunk of [row][4 bytes] where bits 2j..2j+1 of byte k
// are the low bits of value 4j+k of the half, then one chunk of [row][4 bytes] where bit j of byte k is the third
// bit of A's value 4j+k and bit 4+j that of B's. So one load, one shift and one AND per plane give 4 values of every
// row of the group.
//
// Per output (m, c), for each sub-block g in order (stored value u = low | third << 2, 0..7; weight (u - 4) * d *
// scale, scales sa, sb of its halves in -32..31):
//   dA = sum_A (u - 4) x, dB likewise, idot = sa * dA + sb * dB (exact int32: |idot| <= 2 * 32 * 16 * 4 * 128),
//   acc = float(idot) * (d[c] * dx[g]) + acc
// Every path performs exactly these operations. AVX2: four maddubs (<= 2 * 7 * 128 each) summed in int16 <= 7168.
#include <cmath>
#include "gguf_blocks.h"
#include "gguf_x8.h"

namespace gguf {
namespace {
constexpr int kGroupBlockBytes = 880;   // 8 rows x 110 bytes
constexpr int kScales = 16, kQ = 112;   // offsets in a group's super-block

// a file block -> its 256 stored values u (0..7) and 16 raw 6-bit scales (0..63)
inline void file_values(const uint8_t* blk, uint8_t* u, uint8_t* s6) {
  for (int e = 0; e < 256; ++e) {
    const int h = e / 128, j = (e % 128) / 32, l = e % 32;
    u[e] = static_cast<uint8_t>(((blk[32 + 32 * h + l] >> (2 * j)) & 3) | ((blk[l] >> (4 * h + j)) & 1) << 2);
  }
  for (int i = 0; i < 16; ++i) s6[i] = static_cast<uint8_t>(scale_q3_k(blk + 96, i) + 32);
}

inline void values_to_file(const uint8_t* u, const uint8_t* s6, uint8_t* blk) {
  std::memset(blk, 0, 108);
  for (int e = 0; e < 256; ++e) {
    const int h = e / 128, j = (e % 128) / 32, l = e % 32;
    blk[32 + 32 * h + l] |= static_cast<uint8_t>((u[e] & 3) << (2 * j));
    blk[l] |= static_cast<uint8_t>((u[e] >> 2) << (4 * h + j));
  }
  for (int i = 0; i < 16; ++i) {
    blk[96 + i % 8] |= static_cast<uint8_t>((s6[i] & 15) << (i < 8 ? 0 : 4));
    blk[104 + i % 4] |= static_cast<uint8_t>((s6[i] >> 4) << (2 * (i / 4)));
  }
}

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline void gather_block(const uint8_t* w, int64_t ws, int64_t n, int64_t b, uint8_t* out) {
  const uint8_t* g = w + (n / 8) * 8 * ws + b * kGroupBlockBytes;
  const int c = static_cast<int>(n % 8);
  uint8_t u[256], s6[16];
  for (int s = 0; s < 8; ++s) {
    const uint8_t* sc = g + kScales + 12 * s;
    const uint32_t top = load_u32(sc + 8);
    s6[2 * s] = static_cast<uint8_t>((sc[c] & 15) | ((top >> (2 * c)) & 3) << 4);
    s6[2 * s + 1] = static_cast<uint8_t>((sc[c] >> 4) | ((top >> (16 + 2 * c)) & 3) << 4);
    const uint8_t* q = g + kQ + 96 * s;
    for (int hf = 0; hf < 2; ++hf)
      for (int j = 0; j < 4; ++j)
        for (int k = 0; k < 4; ++k) {
          const int low = (q[32 * hf + 4 * c + k] >> (2 * j)) & 3, third = (q[64 + 4 * c + k] >> (4 * hf + j)) & 1;
          u[32 * s + 16 * hf + 4 * j + k] = static_cast<uint8_t>(low | third << 2);
        }
  }
  values_to_file(u, s6, out);
  std::memcpy(out + 108, g + 2 * c, 2);
}
}  // namespace

void q3_kx8_pack(const uint8_t* src, int64_t ws, int64_t gr, int64_t nb, uint8_t* dst) {
  const uint8_t* rows = src + gr * 8 * ws;
  uint8_t* g = dst + gr * 8 * ws;
  uint8_t u[8][256], s6[8][16];
  for (int64_t b = 0; b < nb; ++b, g += kGroupBlockBytes) {
    for (int c = 0; c < 8; ++c) {
      const uint8_t* blk = rows + c * ws + b * 110;
      std::memcpy(g + 2 * c, blk + 108, 2);
      file_values(blk, u[c], s6[c]);
    }
    std::memset(g + kScales, 0, kGroupBlockBytes - kScales);
    for (int s = 0; s < 8; ++s) {
      uint8_t* sc = g + kScales + 12 * s;
      uint32_t top = 0;
      for (int c = 0; c < 8; ++c) {
        sc[c] = static_cast<uint8_t>((s6[c][2 * s] & 15) | (s6[c][2 * s + 1] & 15) << 4);
        top |= static_cast<uint32_t>(s6[c][2 * s] >> 4) << (2 * c) | static_cast<uint32_t>(s6[c][2 * s + 1] >> 4)
                                                                          << (16 + 2 * c);
      }
      std::memcpy(sc + 8, &top, 4);
      uint8_t* q = g + kQ + 96 * s;
      for (int c = 0; c < 8; ++c)
        for (int hf = 0; hf < 2; ++hf)
          for (int j = 0; j < 4; ++j)
            for (int k = 0; k < 4; ++k) {
              const uint8_t v = u[c][32 * s + 16 * hf + 4 * j + k];
              q[32 * hf + 4 * c + k] |= static_cast<uint8_t>((v & 3) << (2 * j));
              q[64 + 4 * c + k] |= static_cast<uint8_t>((v >> 2) << (4 * hf + j));
            }
    }
  }
}

void q3_kx8_rows(const uint8_t* w, int64_t ws, int64_t n, int64_t nb, float* out) {
  x8::file_rows<Q3_K>(gather_block, w, ws, n, nb, out);
}

void q3_kx8_scalar(const DotArgs& p, int64_t n0, int64_t n1) {
  const int64_t nb = p.K / 256, ng = p.K / 32;
  uint8_t blk[110];
  Decoded o;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < p.M; ++m) {
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        gather_block(p.w, p.ws, n, b, blk);
        decode_block(Q3_K, blk, o);     // o.q = u - 4
        const float d = f16(blk + 108);
        for (int s = 0; s < 8; ++s) {
          const int64_t g = m * ng + b * 8 + s;
          const int8_t* qx = p.a->q.data() + g * 32;
          int32_t da = 0, db = 0;
          for (int l = 0; l < 16; ++l) {
            da += o.q[s * 32 + l] * qx[l];
            db += o.q[s * 32 + 16 + l] * qx[16 + l];
          }
          const int32_t idot = scale_q3_k(blk + 96, 2 * s) * da + scale_q3_k(blk + 96, 2 * s + 1) * db;
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

// plane bit b of every byte moved to bit `to` (16-bit shifts: a masked byte's bits never cross into its neighbour)
template <int B, int TO>
inline __m256i bit_to(__m256i v) {
  const __m256i mask = _mm256_set1_epi8(static_cast<char>(1 << TO));
  if constexpr (B > TO) return _mm256_and_si256(_mm256_srli_epi16(v, B - TO), mask);
  else if constexpr (B < TO) return _mm256_and_si256(_mm256_slli_epi16(v, TO - B), mask);
  else return _mm256_and_si256(v, mask);
}

// the values u (0..7) of the four k-quads of half hf of sub-block s for 8 rows
template <int HF>
inline void q3_avx2(const uint8_t* sub, __m256i q[4]) {
  const __m256i low = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sub + 32 * HF));
  const __m256i third = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sub + 64));
  const __m256i m2 = _mm256_set1_epi8(3);
  q[0] = _mm256_or_si256(_mm256_and_si256(low, m2), bit_to<4 * HF, 2>(third));
  q[1] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(low, 2), m2), bit_to<4 * HF + 1, 2>(third));
  q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(low, 4), m2), bit_to<4 * HF + 2, 2>(third));
  q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(low, 6), m2), bit_to<4 * HF + 3, 2>(third));
}

// sub-block s's two signed scales of the 8 rows
inline void scales_avx2(const uint8_t* sc, __m256i& sa, __m256i& sb) {
  const __m256i lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sc)));
  const __m256i top = _mm256_set1_epi32(static_cast<int>(load_u32(sc + 8)));
  const __m256i m4 = _mm256_set1_epi32(15), m2 = _mm256_set1_epi32(3), off = _mm256_set1_epi32(32);
  const __m256i sh = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14), sh16 = _mm256_add_epi32(sh, _mm256_set1_epi32(16));
  sa = _mm256_sub_epi32(_mm256_or_si256(_mm256_and_si256(lo, m4),
                                        _mm256_slli_epi32(_mm256_and_si256(_mm256_srlv_epi32(top, sh), m2), 4)), off);
  sb = _mm256_sub_epi32(_mm256_or_si256(_mm256_srli_epi32(lo, 4),
                                        _mm256_slli_epi32(_mm256_and_si256(_mm256_srlv_epi32(top, sh16), m2), 4)), off);
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
      const uint8_t* sub = blk + kQ + 96 * s;
      __m256i half[2][RM];
      __m256i q[4];
      for (int hf = 0; hf < 2; ++hf) {
        if (hf == 0) q3_avx2<0>(sub, q);
        else q3_avx2<1>(sub, q);
        for (int m = 0; m < RM; ++m) {
          const int8_t* qx = p.a->q.data() + (m0 + m) * K + (b * 8 + s) * 32 + 16 * hf;
          const __m256i p01 = _mm256_add_epi16(_mm256_maddubs_epi16(q[0], _mm256_set1_epi32(load_i32(qx))),
                                               _mm256_maddubs_epi16(q[1], _mm256_set1_epi32(load_i32(qx + 4))));
          const __m256i p23 = _mm256_add_epi16(_mm256_maddubs_epi16(q[2], _mm256_set1_epi32(load_i32(qx + 8))),
                                               _mm256_maddubs_epi16(q[3], _mm256_set1_epi32(load_i32(qx + 12))));
          half[hf][m] = _mm256_madd_epi16(_mm256_add_epi16(p01, p23), ones);
        }
      }
      __m256i sa, sb;
      scales_avx2(blk + kScales + 12 * s, sa, sb);
      for (int m = 0; m < RM; ++m) {
        const int64_t gi = (m0 + m) * ng + b * 8 + s;
        int32_t xa, xb;
        x8::half_sums(*p.a, gi, xa, xb);
        const __m256i da = _mm256_sub_epi32(half[0][m], _mm256_set1_epi32(4 * xa));
        const __m256i db = _mm256_sub_epi32(half[1][m], _mm256_set1_epi32(4 * xb));
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

void q3_kx8_avx2(const DotArgs& p, int64_t n0, int64_t n1) { x8::blocked<x8::PlainTile<Avx2, 1>>(p, n0, n1); }

}  // namespace gguf

// ---- AVX512-VNNI: two groups (16 columns) per register; vpdpbusd seeded with -4 x the half's activation sum ----
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#include "gguf_x8_avx512.h"

namespace gguf {
namespace {

template <int B, int TO>
inline __m512i bit_to512(__m512i v) {
  const __m512i mask = _mm512_set1_epi8(static_cast<char>(1 << TO));
  if constexpr (B > TO) return _mm512_and_si512(_mm512_srli_epi16(v, B - TO), mask);
  else if constexpr (B < TO) return _mm512_and_si512(_mm512_slli_epi16(v, TO - B), mask);
  else return _mm512_and_si512(v, mask);
}

template <int HF, int NG>
inline void q3_vnni(const uint8_t* sa, const uint8_t* sb, __m512i q[4]) {
  const __m512i low = x8::load2<NG>(sa, sb, 32 * HF), third = x8::load2<NG>(sa, sb, 64);
  const __m512i m2 = _mm512_set1_epi8(3);
  q[0] = _mm512_or_si512(_mm512_and_si512(low, m2), bit_to512<4 * HF, 2>(third));
  q[1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(low, 2), m2), bit_to512<4 * HF + 1, 2>(third));
  q[2] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(low, 4), m2), bit_to512<4 * HF + 2, 2>(third));
  q[3] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(low, 6), m2), bit_to512<4 * HF + 3, 2>(third));
}

// sub-block s's two signed scales of the 8 rows of group a (low lanes) and group b (high lanes)
inline void scales_vnni(const uint8_t* sca, const uint8_t* scb, __m512i& sa, __m512i& sb) {
  const __m512i lo = _mm512_cvtepu8_epi32(_mm_unpacklo_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sca)),
                                                             _mm_loadl_epi64(reinterpret_cast<const __m128i*>(scb))));
  const __m512i top = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32(static_cast<int>(load_u32(sca + 8)))),
                                         _mm256_set1_epi32(static_cast<int>(load_u32(scb + 8))), 1);
  const __m512i m4 = _mm512_set1_epi32(15), m2 = _mm512_set1_epi32(3), off = _mm512_set1_epi32(32);
  const __m512i sh = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 0, 2, 4, 6, 8, 10, 12, 14);
  const __m512i sh16 = _mm512_add_epi32(sh, _mm512_set1_epi32(16));
  sa = _mm512_sub_epi32(_mm512_or_si512(_mm512_and_si512(lo, m4),
                                        _mm512_slli_epi32(_mm512_and_si512(_mm512_srlv_epi32(top, sh), m2), 4)), off);
  sb = _mm512_sub_epi32(_mm512_or_si512(_mm512_srli_epi32(lo, 4),
                                        _mm512_slli_epi32(_mm512_and_si512(_mm512_srlv_epi32(top, sh16), m2), 4)), off);
}

template <int RM, int NG, bool PF>
void tile_vnni(const DotArgs& p, int64_t m0, int64_t gr, int64_t n0, int64_t n1) {
  const int64_t K = p.K, nb = K / 256, ng = K / 32;
  const uint8_t* ga = p.w + gr * 8 * p.ws;
  const uint8_t* gb = NG == 2 ? ga + 8 * p.ws : ga;
  const x8::Ahead<PF> ahead(p, ga, NG);
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
        int32_t xa, xb;
        x8::half_sums(*p.a, (m0 + m) * ng + b * 8 + s, xa, xb);
        half[0][m] = _mm512_set1_epi32(-4 * xa);
        half[1][m] = _mm512_set1_epi32(-4 * xb);
      }
      const uint8_t* suba = ba + kQ + 96 * s;
      const uint8_t* subb = bb + kQ + 96 * s;
      for (int hf = 0; hf < 2; ++hf) {
        __m512i q[4];
        if (hf == 0) q3_vnni<0, NG>(suba, subb, q);
        else q3_vnni<1, NG>(suba, subb, q);
        for (int u = 0; u < 4; ++u)
          for (int m = 0; m < RM; ++m) {
            const int8_t* qx = p.a->q.data() + (m0 + m) * K + (b * 8 + s) * 32 + 16 * hf;
            half[hf][m] = _mm512_dpbusd_epi32(half[hf][m], q[u], _mm512_set1_epi32(load_i32(qx + 4 * u)));
          }
      }
      __m512i sa, sb;
      scales_vnni(ba + kScales + 12 * s, bb + kScales + 12 * s, sa, sb);
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

void q3_kx8_avx512vnni(const DotArgs& p, int64_t n0, int64_t n1) {
  x8::blocked<x8::PlainTile<Vnni, 2>>(p, n0, n1);
}

// the values and scales tile_vnni decodes, for the AMX panels: the same decoders, so the same integers
void q3_kx8_amx_sub(const uint8_t* ba, const uint8_t* bb, int s, int8_t* tiles, int32_t* isc) {
  const uint8_t *suba = ba + kQ + 96 * s, *subb = bb + kQ + 96 * s;
  const __m512i four = _mm512_set1_epi8(4);
  __m512i q[4];
  q3_vnni<0, 2>(suba, subb, q);
  for (int u = 0; u < 4; ++u) _mm512_storeu_si512(tiles + 64 * u, _mm512_sub_epi8(q[u], four));
  q3_vnni<1, 2>(suba, subb, q);
  for (int u = 0; u < 4; ++u) _mm512_storeu_si512(tiles + 256 + 64 * u, _mm512_sub_epi8(q[u], four));
  __m512i sa, sb;
  scales_vnni(ba + kScales + 12 * s, bb + kScales + 12 * s, sa, sb);
  _mm512_storeu_si512(isc, sa);
  _mm512_storeu_si512(isc + 16, sb);
}

}  // namespace gguf

#pragma GCC pop_options
#endif  // LMSERVE_GGUF_AVX2
