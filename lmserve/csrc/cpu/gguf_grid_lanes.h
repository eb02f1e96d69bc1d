// The i-quant grid types (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S; gguf_blocks.h) x int8 activations,
// for every M, read from the file's own blocks. A lane of a register is an output column, as in the repacked
// layouts (gguf_x8.h): a sub-block's integer dot over its 32 values (IQ2_XS / IQ2_S / IQ1_M: each half of 16,
// which has a scale of its own) ends in one lane and is scaled once (below, kUnit: acc = float(dot x mult) *
// (du * dx) + acc). The row-at-a-time form the other in-place types use (gguf_avx2.h int8_blocked) spends a convert,
// a multiply and an FMA per lane of 4 values, which held these types' prefill to ~115 GOP/s a core; this form
// reaches 160-210.
// Their values are table lookups (gguf_avx2.h grid_sub), so decoding dominates: calls of 3 or more rows decode each
// group of 8 weight rows once per 64 activation rows into a panel in that lane order (predecode, tile); calls of 1-2
// rows decode each row in file order and move the sums into lanes instead (tile_rows). Both compute the same exact
// integer sums and the same float operations per output, so a row's outputs do not depend on M (batch invariance).
//
// Included by gguf_gemm_avx2.cpp (Avx2Dot: maddubs on |w| and sign(x, w), exact: |w| <= 62) and, after its AVX-512
// target pragma, by gguf_gemm_avx512.cpp (VnniDot: vpdpbusd on w ^ 0x80, seeded with -128 x the activations' sums;
// in tile_rows on |x| and sign(w, x)): the same integer sums again, so both give the same bits. Everything here
// has internal linkage: each file compiles its own copy for its ISA.
#pragma once
#include <algorithm>
#include <cstdlib>
#include "gguf_avx2.h"
#include "gguf_x8.h"

namespace gguf {
namespace grid {
namespace {

// Every grid type's scale is d x unit x (2 ls + 1) (gguf_blocks.h grid_scale: IQ2 d (ls + 0.5) / 4, IQ3_XXS
// d (ls + 0.5) / 2, IQ3_S d (2 ls + 1), IQ1 d (2 ls + 1) / 8), so a sub-block's integer dot is multiplied by its
// odd multiplier 2 ls + 1 in integers (IQ2_XS / IQ2_S / IQ1_M: each half's by its own, then added; |sum| < 2^23,
// exact in the float convert) and scaled in float once, by d x unit x dx: acc = float(dot x mult) * (du * dx) + acc.
template <int QT>
constexpr float kUnit = QT == IQ3_S ? 1.f : QT == IQ3_XXS ? 0.25f : 0.125f;   // IQ2 and IQ1 types: 1/8

// one sub-block of a group of 8 rows: w[k] holds values 4k..4k+3 of column c at bytes 4c..4c+3; k[h][c]: the
// multiplier of column c's values 16h..16h+15 (types with one scale per 32: k[0]); du[c]: its block's d x unit
struct Sub {
  int8_t w[8][32];
  int32_t k[2][8];
  float du[8];
  float pad[8];
};

// the multipliers 2 ls + 1 of a block's 8 sub-blocks (lane s; per-16 types: values 0-15 in lo, 16-31 in hi)
template <int QT>
ALWAYS_INLINE void grid_mults8(const uint8_t* b, __m256i& lo, __m256i& hi) {
  __m256i ls;
  if constexpr (QT == IQ2_XXS || QT == IQ3_XXS) {
    __m256i w;   // the 8 sub-blocks' u32 of signs and scale
    if constexpr (QT == IQ3_XXS) {
      w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 66));
    } else {     // every second u32 of b + 2 .. b + 66
      const __m256 a0 = _mm256_loadu_ps(reinterpret_cast<const float*>(b + 2));
      const __m256 a1 = _mm256_loadu_ps(reinterpret_cast<const float*>(b + 34));
      w = _mm256_permute4x64_epi64(_mm256_castps_si256(_mm256_shuffle_ps(a0, a1, 0xDD)), 0xD8);
    }
    ls = _mm256_srli_epi32(w, 28);
  } else if constexpr (QT == IQ3_S) {
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    ls = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(u32(b + 106))), shifts),
                          _mm256_set1_epi32(15));
  } else if constexpr (QT == IQ1_S) {   // bits 12-14 of each sub-block's u16
    const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 34)));
    ls = _mm256_and_si256(_mm256_srli_epi32(v, 12), _mm256_set1_epi32(7));
  } else if constexpr (QT == IQ1_M) {   // 4 scales per u16: sub-block s's two halves in word s / 2
    const __m128i w4 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 48));
    const __m256i v = _mm256_cvtepu16_epi32(_mm_unpacklo_epi16(w4, w4));   // word s / 2 in lane s
    const __m256i sh = _mm256_setr_epi32(0, 6, 0, 6, 0, 6, 0, 6);
    ls = _mm256_and_si256(_mm256_srlv_epi32(v, sh), _mm256_set1_epi32(7));
    const __m256i h = _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_add_epi32(sh, _mm256_set1_epi32(3))),
                                       _mm256_set1_epi32(7));
    hi = _mm256_add_epi32(_mm256_slli_epi32(h, 1), _mm256_set1_epi32(1));
  } else {       // IQ2_XS, IQ2_S: a byte per sub-block, low nibble for values 0-15
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + (QT == IQ2_XS ? 66 : 74)));
    const __m256i v = _mm256_cvtepu8_epi32(bytes);
    ls = _mm256_and_si256(v, _mm256_set1_epi32(15));
    hi = _mm256_add_epi32(_mm256_slli_epi32(_mm256_srli_epi32(v, 4), 1), _mm256_set1_epi32(1));
  }
  lo = _mm256_add_epi32(_mm256_slli_epi32(ls, 1), _mm256_set1_epi32(1));
}

// group gr's rows (row 8 gr + c; rows past n1, the end of this thread's columns, repeat row n1 - 1: their lanes
// are never stored) -> panel[g] for every sub-block g; XOR: values stored as w ^ 0x80 (VNNI's unsigned operand)
template <int QT, bool XOR>
inline void predecode(const DotArgs& p, int64_t gr, int64_t n1, Sub* panel) {
  constexpr int BB = kBlockBytes[QT];
  const int64_t nb = p.K / 256;
  alignas(32) int8_t q[32];
  alignas(32) int32_t mult[2][8];
  for (int c = 0; c < 8; ++c) {
    const uint8_t* row = p.w + std::min(gr * 8 + c, n1 - 1) * p.ws;
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = row + b * BB;
      const float du = grid_d<QT>(blk) * kUnit<QT>;
      __m256i lo, hi;
      grid_mults8<QT>(blk, lo, hi);
      _mm256_store_si256(reinterpret_cast<__m256i*>(mult[0]), lo);
      if constexpr (kScalePer16(QT)) _mm256_store_si256(reinterpret_cast<__m256i*>(mult[1]), hi);
      for (int s = 0; s < 8; ++s) {
        Sub& S = panel[b * 8 + s];
        __m256i v = avx2::grid_sub<QT>(blk, s);
        if constexpr (XOR) v = _mm256_xor_si256(v, _mm256_set1_epi8(static_cast<char>(0x80)));
        _mm256_store_si256(reinterpret_cast<__m256i*>(q), v);
        for (int k = 0; k < 8; ++k) std::memcpy(&S.w[k][4 * c], q + 4 * k, 4);
        S.k[0][c] = mult[0][s];
        if constexpr (kScalePer16(QT)) S.k[1][c] = mult[1][s];
        S.du[c] = du;
      }
    }
  }
}

// outputs [m0, m0 + RM) x group gr from its panel
template <class D, int QT, int RM>
inline void tile(const DotArgs& p, int64_t m0, int64_t gr, const Sub* panel, int64_t n0, int64_t n1) {
  constexpr int H = kScalePer16(QT) ? 2 : 1, KS = 8 / H;   // scale halves per sub-block, 4-value steps in each
  const int64_t K = p.K, ng = K / 32;
  const int8_t* qx = p.a->q.data() + m0 * K;
  const float* dx = p.a->dx.data() + m0 * ng;
  __m256 acc[RM];
  for (int m = 0; m < RM; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    const Sub& S = panel[g];
    __m256i sum[RM];
    #pragma GCC unroll 2
    for (int h = 0; h < H; ++h) {
      __m256i xi[RM];
      for (int m = 0; m < RM; ++m) xi[m] = D::seed(*p.a, (m0 + m) * ng + g, H, h);
      #pragma GCC unroll 8
      for (int k = h * KS; k < h * KS + KS; ++k) {
        const __m256i w = _mm256_load_si256(reinterpret_cast<const __m256i*>(S.w[k]));
        const __m256i wa = D::prep(w);
        for (int m = 0; m < RM; ++m)
          xi[m] = D::dot(xi[m], w, wa, _mm256_set1_epi32(x8::load_i32(qx + m * K + g * 32 + 4 * k)));
      }
      const __m256i mult = _mm256_load_si256(reinterpret_cast<const __m256i*>(S.k[h]));
      for (int m = 0; m < RM; ++m) {
        const __m256i t = _mm256_mullo_epi32(xi[m], mult);
        sum[m] = h == 0 ? t : _mm256_add_epi32(sum[m], t);
      }
    }
    const __m256 du = _mm256_load_ps(S.du);
    for (int m = 0; m < RM; ++m)
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[m]), _mm256_mul_ps(du, _mm256_set1_ps(dx[m * ng + g])), acc[m]);
  }
  x8::store_tile<RM>(p, m0, gr, acc, n0, n1);
}

// 8 rows' lane dots of one sub-block (v[c]: 8 lanes of 4 values' products, lanes 0-3 the values 0-15) -> the sums
// per column c in lane c: of the whole sub-block (lo), or of each half (lo: 0-15, hi: 16-31). Exact integer adds.
ALWAYS_INLINE void reduce8(const __m256i* v, __m256i& lo, __m256i& hi, bool halves) {
  // per 128-bit lane: [c0, c1, c2, c3] sums of lanes 0-3 (low) and of lanes 4-7 (high), then columns 4-7
  const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
  const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
  lo = _mm256_permute2x128_si256(a, b, 0x20);
  hi = _mm256_permute2x128_si256(a, b, 0x31);
  if (!halves) lo = _mm256_add_epi32(lo, hi);
}

// 8 registers of 8 dwords transposed: q[c] dword k -> w[k] lane c
ALWAYS_INLINE void transpose8(const __m256i* q, __m256i* w) {
  __m256i t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_epi32(q[2 * i], q[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_epi32(q[2 * i], q[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i] = _mm256_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm256_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm256_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm256_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int k = 0; k < 4; ++k) {
    w[k] = _mm256_permute2x128_si256(u[k], u[k + 4], 0x20);
    w[k + 4] = _mm256_permute2x128_si256(u[k], u[k + 4], 0x31);
  }
}

// A call of 1-2 rows (a decode step) would read a panel once: instead each of the group's 8 rows is decoded whole,
// in file order (one sequential stream, as the row-at-a-time loop that measured fastest), its sub-blocks dotted
// with the activations on 8 lanes (D::row_dot, exact), summed (reduce8: lane s = sub-block s of a block) and
// multiplied into `sums`; then a transpose per block puts column c in lane c. The same exact integer sums as tile(),
// then the same float steps.
struct RowScratch {
  int32_t* sums;   // [RM][nb blocks][8 rows][8 sub-blocks]: dot x multiplier
  float* du;       // [nb][8 rows]: d x unit
};

template <class D, int QT, int RM>
inline void tile_rows(const DotArgs& p, int64_t m0, int64_t gr, int64_t n0, int64_t n1, const RowScratch& w) {
  constexpr int BB = kBlockBytes[QT], H = kScalePer16(QT) ? 2 : 1;
  const int64_t K = p.K, ng = K / 32, nb = K / 256;
  const int8_t* qx = p.a->q.data() + m0 * K;
  const float* dx = p.a->dx.data() + m0 * ng;
  auto sums = [&](int m, int64_t b, int c) { return w.sums + ((m * nb + b) * 8 + c) * 8; };
  for (int c = 0; c < 8; ++c) {
    const uint8_t* row = p.w + std::min(gr * 8 + c, n1 - 1) * p.ws;
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = row + b * BB;
      w.du[b * 8 + c] = grid_d<QT>(blk) * kUnit<QT>;
      __m256i v[RM][8];
      #pragma GCC unroll 8
      for (int s = 0; s < 8; ++s) {
        const __m256i q = avx2::grid_sub<QT>(blk, s);
        const __m256i wa = D::row_prep(q);
        for (int m = 0; m < RM; ++m) {
          const int64_t g = b * 8 + s;
          const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + m * K + g * 32));
          v[m][s] = D::row_dot(q, wa, x);
        }
      }
      __m256i klo, khi;
      grid_mults8<QT>(blk, klo, khi);
      for (int m = 0; m < RM; ++m) {
        __m256i lo, hi;
        reduce8(v[m], lo, hi, H == 2);
        lo = _mm256_mullo_epi32(lo, klo);
        if constexpr (H == 2) lo = _mm256_add_epi32(lo, _mm256_mullo_epi32(hi, khi));
        _mm256_store_si256(reinterpret_cast<__m256i*>(sums(m, b, c)), lo);
      }
    }
  }
  __m256 acc[RM];
  for (int m = 0; m < RM; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const __m256 du = _mm256_loadu_ps(w.du + b * 8);
    for (int m = 0; m < RM; ++m) {
      __m256i r[8], t[8];
      for (int c = 0; c < 8; ++c) r[c] = _mm256_load_si256(reinterpret_cast<const __m256i*>(sums(m, b, c)));
      transpose8(r, t);
      for (int s = 0; s < 8; ++s)
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t[s]), _mm256_mul_ps(du, _mm256_set1_ps(dx[m * ng + b * 8 + s])),
                                 acc[m]);
    }
  }
  x8::store_tile<RM>(p, m0, gr, acc, n0, n1);
}

// Calls of 1-2 rows (a decode step's stream or two): tile_rows, each group decoded once per row tile. Calls of 3 or
// more: blocks of 64 activation rows x groups of 8 columns, each group decoded once per block into the panel, then
// row tiles of D::kMaxRows, 4, 2, 1. Measured on Zen 4, 1 thread, IQ3_S 8192 x 2048 (docs/benchmarks.md): 2 rows
// tile_rows 2.3 ms, the panel 2.8; 4 rows 3.2 (two 2-row decodes) vs 3.0; 16 rows 12.9 vs 4.6. Same bits either way.
constexpr int64_t kRowsMax = 2;

template <class D, int QT>
void run(const DotArgs& p, int64_t n0, int64_t n1) {
  const int64_t ng = p.K / 32;
  if (p.M <= kRowsMax) {
    const int64_t nb = p.K / 256;
    RowScratch w{static_cast<int32_t*>(std::aligned_alloc(64, kRowsMax * nb * 64 * sizeof(int32_t))),
                 static_cast<float*>(std::aligned_alloc(64, (nb * 8 * sizeof(float) + 63) / 64 * 64))};
    for (int64_t gr = n0 / 8; gr * 8 < n1; ++gr) {
      if (p.M == 2) tile_rows<D, QT, 2>(p, 0, gr, n0, n1, w);
      else tile_rows<D, QT, 1>(p, 0, gr, n0, n1, w);
    }
    std::free(w.sums);
    std::free(w.du);
    return;
  }
  Sub* panel = static_cast<Sub*>(std::aligned_alloc(64, ng * sizeof(Sub)));
  for (int64_t mb = 0; mb < p.M; mb += 64) {
    const int64_t me = std::min(p.M, mb + 64);
    for (int64_t gr = n0 / 8; gr * 8 < n1; ++gr) {
      predecode<QT, D::kXor>(p, gr, n1, panel);
      int64_t m = mb;
      if constexpr (D::kMaxRows >= 8 && !kScalePer16(QT))   // two halves: 8 rows spill (measured)
        for (; m + 8 <= me; m += 8) tile<D, QT, 8>(p, m, gr, panel, n0, n1);
      for (; m + 4 <= me; m += 4) tile<D, QT, 4>(p, m, gr, panel, n0, n1);
      if (m + 2 <= me) { tile<D, QT, 2>(p, m, gr, panel, n0, n1); m += 2; }
      if (m < me) tile<D, QT, 1>(p, m, gr, panel, n0, n1);
    }
  }
  std::free(panel);
}

template <class D>
void matmul(const DotArgs& p, int64_t n0, int64_t n1) {
  switch (p.qt) {
    case IQ2_XXS: return run<D, IQ2_XXS>(p, n0, n1);
    case IQ2_XS: return run<D, IQ2_XS>(p, n0, n1);
    case IQ2_S: return run<D, IQ2_S>(p, n0, n1);
    case IQ3_XXS: return run<D, IQ3_XXS>(p, n0, n1);
    case IQ3_S: return run<D, IQ3_S>(p, n0, n1);
    case IQ1_S: return run<D, IQ1_S>(p, n0, n1);
    case IQ1_M: return run<D, IQ1_M>(p, n0, n1);
    default: return;
  }
}

}  // namespace
}  // namespace grid
}  // namespace gguf
