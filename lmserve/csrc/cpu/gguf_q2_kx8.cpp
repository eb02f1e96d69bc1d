// Q2_K repacked in groups of 8 rows (type Q2_KX8, lmserve/ops/gguf_x8.py repack_q2_kx8): the int8 GEMM for every M
// on it (AVX2, and AVX512-VNNI chosen at run time, bit for bit the same), the scalar reference, the repack and rows
// back in file order. The design is gguf_q6_kx8.cpp's ("reduce, then scale"; gguf_x8.h).
//
// In the file a row's value e (0..255) is 2 bits of qs (byte 32 (e / 128) + e % 32, bits 2 ((e % 128) / 32)), with a
// 4-bit scale and a 4-bit offset per 16 values; unpacking that per row and sub-block (a scale and an offset per
// half) cost more than reading it (a row-major decode was 0.31x llama.cpp's).
// Layout (the 8 rows' Q2_K super-blocks, 672 bytes per super-block b as in the file, the bytes in another order):
// the 8 rows' d (fp16, 16 bytes), their dmin (16), their 16 scale bytes as [16-value half][row] (128: scale in the
// low nibble, offset in the high one, as in the file), then per 16-value half h = 0..15 a chunk of [row][4 bytes]
// (512) where bits 2j..2j+1 of byte k are value 4j+k of the half. One load, one shift and one AND give 4 values of
// every row of the group.
//
// Per output (m, c), for each 32-value sub-block g in order, with halves A, B (values q 0..3, scales sa, sb and
// offsets ma, mb 0..15; xA, xB the sums of the halves' int8 activations):
//   idot = sa * sum_A q x + sb * sum_B q x, mdot = ma * xA + mb * xB (exact int32),
//   acc = float(idot) * (d[c] * dx[g]) + acc, acc = float(mdot) * -(dmin[c] * dx[g]) + acc
// Every path performs exactly these operations. AVX2: four maddubs (<= 2 * 3 * 128 each) summed in int16 <= 3072.
#include <cmath>
#include "gguf_blocks.h"
#include "gguf_x8.h"

namespace gguf {
namespace {
constexpr int kGroupBlockBytes = 672;   // 8 rows x 84 bytes
constexpr int kScales = 32, kQ = 160;   // offsets in a group's super-block

inline void gather_block(const uint8_t* w, int64_t ws, int64_t n, int64_t b, uint8_t* out) {
  const uint8_t* g = w + (n / 8) * 8 * ws + b * kGroupBlockBytes;
  const int c = static_cast<int>(n % 8);
  std::memcpy(out + 80, g + 2 * c, 2);
  std::memcpy(out + 82, g + 16 + 2 * c, 2);
  for (int i = 0; i < 16; ++i) out[i] = g[kScales + 8 * i + c];
  std::memset(out + 16, 0, 64);
  for (int e = 0; e < 256; ++e) {
    const int hf = e / 16, j = (e % 16) / 4, k = e % 4;
    const int v = (g[kQ + 32 * hf + 4 * c + k] >> (2 * j)) & 3;
    out[16 + 32 * (e / 128) + e % 32] |= static_cast<uint8_t>(v << (2 * ((e % 128) / 32)));
  }
}
}  // namespace

void q2_kx8_pack(const uint8_t* src, int64_t ws, int64_t gr, int64_t nb, uint8_t* dst) {
  const uint8_t* rows = src + gr * 8 * ws;
  uint8_t* g = dst + gr * 8 * ws;
  for (int64_t b = 0; b < nb; ++b, g += kGroupBlockBytes) {
    std::memset(g + kQ, 0, kGroupBlockBytes - kQ);
    for (int c = 0; c < 8; ++c) {
      const uint8_t* blk = rows + c * ws + b * 84;
      std::memcpy(g + 2 * c, blk + 80, 2);
      std::memcpy(g + 16 + 2 * c, blk + 82, 2);
      for (int i = 0; i < 16; ++i) g[kScales + 8 * i + c] = blk[i];
      for (int e = 0; e < 256; ++e) {
        const int v = (blk[16 + 32 * (e / 128) + e % 32] >> (2 * ((e % 128) / 32))) & 3;
        const int hf = e / 16, j = (e % 16) / 4, k = e % 4;
        g[kQ + 32 * hf + 4 * c + k] |= static_cast<uint8_t>(v << (2 * j));
      }
    }
  }
}

void q2_kx8_rows(const uint8_t* w, int64_t ws, int64_t n, int64_t nb, float* out) {
  x8::file_rows<Q2_K>(gather_block, w, ws, n, nb, out);
}

void q2_kx8_scalar(const DotArgs& p, int64_t n0, int64_t n1) {
  const int64_t nb = p.K / 256, ng = p.K / 32;
  uint8_t blk[84];
  Decoded o;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < p.M; ++m) {
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        gather_block(p.w, p.ws, n, b, blk);
        decode_block(Q2_K, blk, o);     // o.q = the 2-bit values
        const float d = f16(blk + 80), dmin = f16(blk + 82);
        for (int s = 0; s < 8; ++s) {
          const int64_t g = m * ng + b * 8 + s;
          const int8_t* qx = p.a->q.data() + g * 32;
          int32_t da = 0, db = 0, xa, xb;
          for (int l = 0; l < 16; ++l) {
            da += o.q[s * 32 + l] * qx[l];
            db += o.q[s * 32 + 16 + l] * qx[16 + l];
          }
          x8::half_sums(*p.a, g, xa, xb);
          const int32_t idot = (blk[2 * s] & 15) * da + (blk[2 * s + 1] & 15) * db;
          const int32_t mdot = (blk[2 * s] >> 4) * xa + (blk[2 * s + 1] >> 4) * xb;
          acc = std::fma(static_cast<float>(idot), d * p.a->dx[g], acc);
          acc = std::fma(static_cast<float>(mdot), -(dmin * p.a->dx[g]), acc);
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

template <int RM, bool PF>
void tile_avx2(const DotArgs& p, int64_t m0, int64_t gr, int64_t n0, int64_t n1) {
  const int64_t K = p.K, nb = K / 256, ng = K / 32;
  const uint8_t* g = p.w + gr * 8 * p.ws;
  const x8::Ahead<PF> ahead(p, g, 1);
  const __m256i ones = _mm256_set1_epi16(1), m2 = _mm256_set1_epi8(3), m4 = _mm256_set1_epi32(15);
  __m256 acc[RM];
  for (int m = 0; m < RM; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = g + b * kGroupBlockBytes;
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
    const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 16)));
    #pragma GCC unroll 2
    for (int s = 0; s < 8; ++s) {
      ahead.lines(b, kGroupBlockBytes, s, 4);
      __m256i half[2][RM];
      for (int hf = 0; hf < 2; ++hf) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + kQ + 32 * (2 * s + hf)));
        const __m256i q[4] = {_mm256_and_si256(v, m2), _mm256_and_si256(_mm256_srli_epi16(v, 2), m2),
                              _mm256_and_si256(_mm256_srli_epi16(v, 4), m2),
                              _mm256_and_si256(_mm256_srli_epi16(v, 6), m2)};
        for (int m = 0; m < RM; ++m) {
          const int8_t* qx = p.a->q.data() + (m0 + m) * K + (b * 8 + s) * 32 + 16 * hf;
          const __m256i p01 = _mm256_add_epi16(_mm256_maddubs_epi16(q[0], _mm256_set1_epi32(load_i32(qx))),
                                               _mm256_maddubs_epi16(q[1], _mm256_set1_epi32(load_i32(qx + 4))));
          const __m256i p23 = _mm256_add_epi16(_mm256_maddubs_epi16(q[2], _mm256_set1_epi32(load_i32(qx + 8))),
                                               _mm256_maddubs_epi16(q[3], _mm256_set1_epi32(load_i32(qx + 12))));
          half[hf][m] = _mm256_madd_epi16(_mm256_add_epi16(p01, p23), ones);
        }
      }
      const __m256i ba = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + kScales + 16 * s)));
      const __m256i bb = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + kScales + 16 * s + 8)));
      const __m256i sa = _mm256_and_si256(ba, m4), sb = _mm256_and_si256(bb, m4);
      const __m256i ma = _mm256_srli_epi32(ba, 4), mb = _mm256_srli_epi32(bb, 4);
      for (int m = 0; m < RM; ++m) {
        const int64_t gi = (m0 + m) * ng + b * 8 + s;
        int32_t xa, xb;
        x8::half_sums(*p.a, gi, xa, xb);
        const __m256i idot = _mm256_add_epi32(_mm256_mullo_epi32(sa, half[0][m]), _mm256_mullo_epi32(sb, half[1][m]));
        const __m256i mdot = _mm256_add_epi32(_mm256_mullo_epi32(ma, _mm256_set1_epi32(xa)),
                                              _mm256_mullo_epi32(mb, _mm256_set1_epi32(xb)));
        const __m256 dx = _mm256_set1_ps(p.a->dx[gi]);
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(idot), _mm256_mul_ps(d, dx), acc[m]);
        acc[m] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(mdot), _mm256_mul_ps(dmin, dx), acc[m]);
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

void q2_kx8_avx2(const DotArgs& p, int64_t n0, int64_t n1) { x8::blocked<x8::PlainTile<Avx2, 1>>(p, n0, n1); }

}  // namespace gguf

// ---- AVX512-VNNI: two groups (16 columns) per register ----
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#include "gguf_x8_avx512.h"

namespace gguf {
namespace {

// the 16-value half's scale bytes (scale | offset << 4) of group a's 8 rows (low lanes) and group b's (high)
inline __m512i scale_bytes(const uint8_t* a, const uint8_t* b, int64_t off) {
  return _mm512_cvtepu8_epi32(_mm_unpacklo_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(a + off)),
                                                 _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + off))));
}

template <int RM, int NG, bool PF>
void tile_vnni(const DotArgs& p, int64_t m0, int64_t gr, int64_t n0, int64_t n1) {
  const int64_t K = p.K, nb = K / 256, ng = K / 32;
  const uint8_t* ga = p.w + gr * 8 * p.ws;
  const uint8_t* gb = NG == 2 ? ga + 8 * p.ws : ga;
  const x8::Ahead<PF> ahead(p, ga, NG);
  const __m512i m2 = _mm512_set1_epi8(3), m4 = _mm512_set1_epi32(15);
  __m512 acc[RM];
  for (int m = 0; m < RM; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* ba = ga + b * kGroupBlockBytes;
    const uint8_t* bb = gb + b * kGroupBlockBytes;
    const __m512 dv = x8::scales2<NG>(ba, bb), dminv = x8::scales2<NG>(ba + 16, bb + 16);
    for (int s = 0; s < 8; ++s) {
      ahead.lines(b, kGroupBlockBytes, s, 4);
      __m512i half[2][RM];
      for (int hf = 0; hf < 2; ++hf) {
        const __m512i v = x8::load2<NG>(ba, bb, kQ + 32 * (2 * s + hf));
        const __m512i q[4] = {_mm512_and_si512(v, m2), _mm512_and_si512(_mm512_srli_epi16(v, 2), m2),
                              _mm512_and_si512(_mm512_srli_epi16(v, 4), m2),
                              _mm512_and_si512(_mm512_srli_epi16(v, 6), m2)};
        for (int m = 0; m < RM; ++m) half[hf][m] = _mm512_setzero_si512();
        for (int u = 0; u < 4; ++u)
          for (int m = 0; m < RM; ++m) {
            const int8_t* qx = p.a->q.data() + (m0 + m) * K + (b * 8 + s) * 32 + 16 * hf;
            half[hf][m] = _mm512_dpbusd_epi32(half[hf][m], q[u], _mm512_set1_epi32(load_i32(qx + 4 * u)));
          }
      }
      const __m512i bsa = scale_bytes(ba, bb, kScales + 16 * s), bsb = scale_bytes(ba, bb, kScales + 16 * s + 8);
      const __m512i sa = _mm512_and_si512(bsa, m4), sb = _mm512_and_si512(bsb, m4);
      const __m512i ma = _mm512_srli_epi32(bsa, 4), mb = _mm512_srli_epi32(bsb, 4);
      for (int m = 0; m < RM; ++m) {
        const int64_t gi = (m0 + m) * ng + b * 8 + s;
        int32_t xa, xb;
        x8::half_sums(*p.a, gi, xa, xb);
        const __m512i idot = _mm512_add_epi32(_mm512_mullo_epi32(sa, half[0][m]), _mm512_mullo_epi32(sb, half[1][m]));
        const __m512i mdot = _mm512_add_epi32(_mm512_mullo_epi32(ma, _mm512_set1_epi32(xa)),
                                              _mm512_mullo_epi32(mb, _mm512_set1_epi32(xb)));
        const __m512 dx = _mm512_set1_ps(p.a->dx[gi]);
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(idot), _mm512_mul_ps(dv, dx), acc[m]);
        acc[m] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(mdot), _mm512_mul_ps(dminv, dx), acc[m]);
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

void q2_kx8_avx512vnni(const DotArgs& p, int64_t n0, int64_t n1) {
  x8::blocked<x8::PlainTile<Vnni, 2>>(p, n0, n1);
}

}  // namespace gguf

#pragma GCC pop_options
#endif  // LMSERVE_GGUF_AVX2
