// Q6_K repacked in groups of 8 rows (type Q6_KX8, lmserve/ops/gguf_blocks.py repack_q6_kx8): the int8 GEMM for
// every M on it (AVX2, and AVX512-VNNI chosen at run time, bit for bit the same), the scalar reference, the repack
// and rows back in file order. The design is gguf_q4_0x8.cpp's ("reduce, then scale"; gguf_x8.h).
//
// Layout (the 8 rows' Q6_K super-blocks, the same bytes in another order): per super-block b, 1680 bytes: the 8
// rows' d (fp16, 16 bytes); their 16 int8 scales as [scale][row] (128); ql (128 bytes a row) as [4-byte chunk
// 0..31][row][4] (1024); qh (64 bytes a row) as [chunk 0..15][row][4] (512). One 32-byte load is a chunk of every
// row of the group.
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
constexpr int kScales = 16, kQl = 144, kQh = 1168;   // offsets in a group's super-block

inline void gather_block(const uint8_t* w, int64_t ws, int64_t n, int64_t b, uint8_t* out) {
  const uint8_t* g = w + (n / 8) * 8 * ws + b * kGroupBlockBytes;
  const int c = static_cast<int>(n % 8);
  std::memcpy(out + 208, g + 2 * c, 2);
  for (int s = 0; s < 16; ++s) out[192 + s] = g[kScales + s * 8 + c];
  for (int i = 0; i < 32; ++i) std::memcpy(out + 4 * i, g + kQl + i * 32 + c * 4, 4);
  for (int i = 0; i < 16; ++i) std::memcpy(out + 128 + 4 * i, g + kQh + i * 32 + c * 4, 4);
}

// sums of row m's activations over the two halves of sub-block g (from the 4-value lane sums)
inline void half_sums(const Act& a, int64_t g, int32_t& sa, int32_t& sb) {
  const int32_t* l = a.ls.data() + g * 8;
  sa = l[0] + l[1] + l[2] + l[3];
  sb = l[4] + l[5] + l[6] + l[7];
}
}  // namespace

void q6_kx8_pack(const uint8_t* src, int64_t ws, int64_t gr, int64_t nb, uint8_t* dst) {
  const uint8_t* rows = src + gr * 8 * ws;
  uint8_t* g = dst + gr * 8 * ws;
  for (int64_t b = 0; b < nb; ++b, g += kGroupBlockBytes)
    for (int c = 0; c < 8; ++c) {
      const uint8_t* blk = rows + c * ws + b * 210;
      std::memcpy(g + 2 * c, blk + 208, 2);
      for (int s = 0; s < 16; ++s) g[kScales + s * 8 + c] = blk[192 + s];
      for (int i = 0; i < 32; ++i) std::memcpy(g + kQl + i * 32 + c * 4, blk + 4 * i, 4);
      for (int i = 0; i < 16; ++i) std::memcpy(g + kQh + i * 32 + c * 4, blk + 128 + 4 * i, 4);
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

// the 6-bit values (unsigned, 0..63) of k-quad t of sub-block s for 8 rows: low nibbles from ql, 2 bits from qh
inline __m256i q6_avx2(const uint8_t* blk, int s, int t) {
  const int h = s / 4, i = s % 4;
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + kQl + (h * 16 + (i & 1) * 8 + t) * 32));
  const __m256i vh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + kQh + (h * 8 + t) * 32));
  const __m256i lo = _mm256_and_si256(i >= 2 ? _mm256_srli_epi16(v, 4) : v, _mm256_set1_epi8(15));
  const __m256i hb = _mm256_and_si256(_mm256_srl_epi16(vh, _mm_cvtsi32_si128(2 * i)), _mm256_set1_epi8(3));
  return _mm256_or_si256(lo, _mm256_slli_epi16(hb, 4));
}

template <int RM>
void tile_avx2(const DotArgs& p, int64_t m0, int64_t gr, int64_t n0, int64_t n1) {
  const int64_t K = p.K, nb = K / 256, ng = K / 32;
  const uint8_t* g = p.w + gr * 8 * p.ws;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[RM];
  for (int m = 0; m < RM; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = g + b * kGroupBlockBytes;
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
    #pragma GCC unroll 2
    for (int s = 0; s < 8; ++s) {
      __m256i half[2][RM];
      for (int hf = 0; hf < 2; ++hf) {
        __m256i q[4];
        for (int u = 0; u < 4; ++u) q[u] = q6_avx2(blk, s, 4 * hf + u);
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
        int32_t xa, xb;
        half_sums(*p.a, gi, xa, xb);
        const __m256i da = _mm256_sub_epi32(half[0][m], _mm256_set1_epi32(32 * xa));
        const __m256i db = _mm256_sub_epi32(half[1][m], _mm256_set1_epi32(32 * xb));
        const __m256i idot = _mm256_add_epi32(_mm256_mullo_epi32(sa, da), _mm256_mullo_epi32(sb, db));
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(idot), _mm256_mul_ps(d, _mm256_set1_ps(p.a->dx[gi])), acc[m]);
      }
    }
  }
  for (int m = 0; m < RM; ++m) {
    alignas(32) float o[8];
    _mm256_store_ps(o, acc[m]);
    x8::store(p, m0 + m, gr, 8, o, n0, n1);
  }
}

struct Avx2Tile {
  static constexpr int kGroups = 1;
  using Ctx = x8::NoCtx;
  static void prepare(const DotArgs&, int64_t, int64_t, Ctx&) {}
  template <int RM>
  static void run(const DotArgs& p, int64_t m, int64_t gr, int64_t, int64_t n0, int64_t n1, Ctx&) {
    tile_avx2<RM>(p, m, gr, n0, n1);
  }
};

}  // namespace

void q6_kx8_avx2(const DotArgs& p, int64_t n0, int64_t n1) { x8::blocked<Avx2Tile>(p, n0, n1); }

}  // namespace gguf

// ---- AVX512-VNNI: two groups (16 columns) per register; vpdpbusd seeded with -32 x the half's activation sum ----
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#include "gguf_x8_avx512.h"

namespace gguf {
namespace {

template <int RM, int NG>
void tile_vnni(const DotArgs& p, int64_t m0, int64_t gr, int64_t n0, int64_t n1) {
  const int64_t K = p.K, nb = K / 256, ng = K / 32;
  const uint8_t* ga = p.w + gr * 8 * p.ws;
  const uint8_t* gb = NG == 2 ? ga + 8 * p.ws : ga;
  const __m512i m4 = _mm512_set1_epi8(15), m2 = _mm512_set1_epi8(3);
  __m512 acc[RM];
  for (int m = 0; m < RM; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* ba = ga + b * kGroupBlockBytes;
    const uint8_t* bb = gb + b * kGroupBlockBytes;
    const __m512 dv = x8::scales2<NG>(ba, bb);
    for (int s = 0; s < 8; ++s) {
      const int h = s / 4, i = s % 4;
      __m512i half[2][RM];
      int32_t xs[2][RM];
      for (int m = 0; m < RM; ++m) {
        half_sums(*p.a, (m0 + m) * ng + b * 8 + s, xs[0][m], xs[1][m]);
        half[0][m] = _mm512_set1_epi32(-32 * xs[0][m]);
        half[1][m] = _mm512_set1_epi32(-32 * xs[1][m]);
      }
      #pragma GCC unroll 8
      for (int t = 0; t < 8; ++t) {
        const __m512i v = x8::load2<NG>(ba, bb, kQl + (h * 16 + (i & 1) * 8 + t) * 32);
        const __m512i vh = x8::load2<NG>(ba, bb, kQh + (h * 8 + t) * 32);
        const __m512i lo = _mm512_and_si512(i >= 2 ? _mm512_srli_epi16(v, 4) : v, m4);
        const __m512i hb = _mm512_and_si512(_mm512_srl_epi16(vh, _mm_cvtsi32_si128(2 * i)), m2);
        const __m512i q = _mm512_or_si512(lo, _mm512_slli_epi16(hb, 4));
        for (int m = 0; m < RM; ++m) {
          const int8_t* qx = p.a->q.data() + (m0 + m) * K + (b * 8 + s) * 32;
          half[t / 4][m] = _mm512_dpbusd_epi32(half[t / 4][m], q, _mm512_set1_epi32(load_i32(qx + 4 * t)));
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
  for (int m = 0; m < RM; ++m) {
    alignas(64) float o[16];
    _mm512_store_ps(o, acc[m]);
    x8::store(p, m0 + m, gr, 8 * NG, o, n0, n1);
  }
}

struct VnniTile {
  static constexpr int kGroups = 2;
  using Ctx = x8::NoCtx;
  static void prepare(const DotArgs&, int64_t, int64_t, Ctx&) {}
  template <int RM>
  static void run(const DotArgs& p, int64_t m, int64_t gr, int64_t ng, int64_t n0, int64_t n1, Ctx&) {
    if (ng == 2) tile_vnni<RM, 2>(p, m, gr, n0, n1);
    else tile_vnni<RM, 1>(p, m, gr, n0, n1);
  }
};

}  // namespace

void q6_kx8_avx512vnni(const DotArgs& p, int64_t n0, int64_t n1) { x8::blocked<VnniTile>(p, n0, n1); }

}  // namespace gguf

#pragma GCC pop_options
#endif  // LMSERVE_GGUF_AVX2
