// Q8_0 repacked in groups of 8 rows (type Q8_0X8, lmserve/ops/gguf_x8.py repack_q8_0x8): the int8 GEMM for every M
// on it (AVX2, and AVX512-VNNI chosen at run time, bit for bit the same), the scalar reference, the repack and rows
// back in file order. The design is gguf_q4_0x8.cpp's ("reduce, then scale"; gguf_x8.h).
//
// Layout (the 8 rows' Q8_0 blocks, the same bytes in another order): per 32-value block b, 272 bytes: the 8 rows'
// fp16 scales d[c], then for t = 0..7 each row's 4 quant bytes 4t..4t+3 (32 bytes: 8 lanes, one per column).
//
// Per output (m, c), in block order: idot = sum_j q_j x_j (exact int32, q and x int8),
// acc = float(idot) * (d[c] * dx[m, b]) + acc. Every path performs exactly these operations per output.
// AVX2 multiplies |q| by x with q's sign (maddubs wants one unsigned side): pairs <= 2 * 128 * 127 fit int16, but
// two of them need not, so each is widened (madd) at once. AVX512-VNNI multiplies q + 128 (q ^ 0x80, unsigned) and
// starts each block's sum at -128 * sum x.
#include "gguf_kernels.h"

#include <cmath>
#include "gguf_blocks.h"
#include "gguf_x8.h"

namespace gguf {
namespace {
constexpr int kGroupBlockBytes = 272;   // 8 rows x 34 bytes
constexpr int kQs = 16;

inline void gather_block(const uint8_t* w, int64_t ws, int64_t n, int64_t b, uint8_t* out) {
  const uint8_t* g = w + (n / 8) * 8 * ws + b * kGroupBlockBytes;
  const int c = static_cast<int>(n % 8);
  std::memcpy(out, g + 2 * c, 2);
  for (int t = 0; t < 8; ++t) std::memcpy(out + 2 + 4 * t, g + kQs + t * 32 + c * 4, 4);
}
}  // namespace

void q8_0x8_pack(const uint8_t* src, int64_t ws, int64_t gr, int64_t nb, uint8_t* dst) {
  const uint8_t* rows = src + gr * 8 * ws;
  uint8_t* g = dst + gr * 8 * ws;
  for (int64_t b = 0; b < nb; ++b, g += kGroupBlockBytes)
    for (int c = 0; c < 8; ++c) {
      const uint8_t* blk = rows + c * ws + b * 34;
      std::memcpy(g + 2 * c, blk, 2);
      for (int t = 0; t < 8; ++t) std::memcpy(g + kQs + t * 32 + c * 4, blk + 2 + 4 * t, 4);
    }
}

void q8_0x8_rows(const uint8_t* w, int64_t ws, int64_t n, int64_t nb, float* out) {
  x8::file_rows<Q8_0>(gather_block, w, ws, n, nb, out);
}

void q8_0x8_scalar(const DotArgs& p, int64_t n0, int64_t n1) {
  const int64_t nb = p.K / 32;
  uint8_t blk[34];
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < p.M; ++m) {
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        gather_block(p.w, p.ws, n, b, blk);
        const int8_t* q = reinterpret_cast<const int8_t*>(blk + 2);
        const int8_t* qx = p.a->q.data() + m * p.K + b * 32;
        const int64_t gi = m * nb + b;
        int32_t idot = 0;
        for (int j = 0; j < 32; ++j) idot += q[j] * qx[j];
        acc = std::fma(static_cast<float>(idot), f16(blk) * p.a->dx[gi], acc);
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

struct Avx2 {
  template <int RM, int NG, bool PF>
  static void tile(const DotArgs& p, int64_t m0, int64_t gr, int64_t n0, int64_t n1) {
    const int64_t K = p.K, nb = K / 32;
    const uint8_t* g = p.w + gr * 8 * p.ws;
    const x8::Ahead<PF> ahead(p, g, 1);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[RM];
    for (int m = 0; m < RM; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = g + b * kGroupBlockBytes;
      ahead.lines(b, kGroupBlockBytes, 0, 8);
      __m256i s32[RM];
      for (int m = 0; m < RM; ++m) s32[m] = _mm256_setzero_si256();
      #pragma GCC unroll 8
      for (int t = 0; t < 8; ++t) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + kQs + t * 32));
        const __m256i av = _mm256_abs_epi8(v);
        for (int m = 0; m < RM; ++m) {
          const __m256i x = _mm256_set1_epi32(load_i32(p.a->q.data() + (m0 + m) * K + b * 32 + 4 * t));
          s32[m] = _mm256_add_epi32(s32[m], _mm256_madd_epi16(_mm256_maddubs_epi16(av, _mm256_sign_epi8(x, v)), ones));
          x8::pin(s32[m]);
        }
      }
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
      for (int m = 0; m < RM; ++m) {
        const float dx = p.a->dx[(m0 + m) * nb + b];
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32[m]), _mm256_mul_ps(d, _mm256_set1_ps(dx)), acc[m]);
      }
    }
    x8::store_tile<RM>(p, m0, gr, acc, n0, n1);
  }
};

}  // namespace

void q8_0x8_avx2(const DotArgs& p, int64_t n0, int64_t n1) { x8::blocked<x8::PlainTile<Avx2, 1>>(p, n0, n1); }

}  // namespace gguf

// ---- AVX512-VNNI: two groups (16 columns) per register ---------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#include "gguf_x8_avx512.h"

namespace gguf {
namespace {

struct Vnni {
  template <int RM, int NG, bool PF>
  static void tile(const DotArgs& p, int64_t m0, int64_t gr, int64_t n0, int64_t n1) {
    const int64_t K = p.K, nb = K / 32;
    const uint8_t* ga = p.w + gr * 8 * p.ws;
    const uint8_t* gb = NG == 2 ? ga + 8 * p.ws : ga;
    const x8::Ahead<PF> ahead(p, ga, NG);
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
    __m512 acc[RM];
    for (int m = 0; m < RM; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* ba = ga + b * kGroupBlockBytes;
      ahead.lines(b, kGroupBlockBytes, 0, 8);
      const uint8_t* bb = gb + b * kGroupBlockBytes;
      // two chains per row (even / odd t), one seeded with -128 * sum x: exact integers either way
      __m512i s[2][RM];
      for (int m = 0; m < RM; ++m) {
        s[0][m] = _mm512_set1_epi32(-128 * p.a->qsum[(m0 + m) * nb + b]);
        s[1][m] = _mm512_setzero_si512();
      }
      #pragma GCC unroll 8
      for (int t = 0; t < 8; ++t) {
        const __m512i u = _mm512_xor_si512(x8::load2<NG>(ba, bb, kQs + t * 32), flip);
        for (int m = 0; m < RM; ++m) {
          const int8_t* qx = p.a->q.data() + (m0 + m) * K + b * 32;
          s[t & 1][m] = _mm512_dpbusd_epi32(s[t & 1][m], u, _mm512_set1_epi32(load_i32(qx + 4 * t)));
        }
      }
      const __m512 d = x8::scales2<NG>(ba, bb);
      for (int m = 0; m < RM; ++m) {
        const float dx = p.a->dx[(m0 + m) * nb + b];
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s[0][m], s[1][m])),
                                 _mm512_mul_ps(d, _mm512_set1_ps(dx)), acc[m]);
      }
    }
    x8::store_tile<RM, NG>(p, m0, gr, acc, n0, n1);
  }
};

}  // namespace

void q8_0x8_avx512vnni(const DotArgs& p, int64_t n0, int64_t n1) {
  x8::blocked<x8::PlainTile<Vnni, 2, 8>>(p, n0, n1);
}

}  // namespace gguf

#pragma GCC pop_options
#endif  // LMSERVE_GGUF_AVX2
