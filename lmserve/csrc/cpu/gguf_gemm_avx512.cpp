// The int8 GEMM of gguf_gemm_avx2.cpp on AVX512-VNNI, chosen at run time (ISA level avx512vnni) from the same
// AVX2-baseline build: this file alone is compiled for AVX-512 (the target pragma below), and nothing in it runs
// unless the CPU has it (gguf_set_isa refuses the level otherwise).
//
// Bit-identical to the AVX2 kernel, so results do not depend on the CPU kind a build lands on any more than on
// the batch: the AVX2 kernel's two 8-lane accumulators (sub-block g -> acc[g % 2]) are the low and high halves
// of one 16-lane register, and a step takes sub-blocks g, g + 1 (two sub-blocks of a K-quant block, or two
// blocks of a 32-value type) at once. Every lane then sees the same float operations in the same order:
// acc = float(dot) * (scale * dx) + acc; the integer dot is exact either way (vpdpbusd sums the same four
// u8 x s8 products maddubs + madd does, without their 16-bit step, which never saturated: gguf_gemm_avx2.cpp).
// Signed Q8_0 is fed to vpdpbusd as q + 128 (unsigned) and 128 x the activations' lane sums are subtracted, as
// the AVX2 kernel does for Q4_0's stored offset of 8. An odd last block of a 32-value type goes to the low half,
// as the AVX2 kernel sends it to acc[0]. Per 64 weights this issues one dot, one convert, one FMA where AVX2
// issues two of each plus two madds. That 16-lane form serves GEMMs, in 4 x 4 tiles (its 32 registers hold them;
// +20-30% over 4 x 2 at M = 512); decode batches (M < 64) take tile_v256, the AVX2 tile on 8 lanes with vpdpbusd
// (pairing two sub-blocks costs inserts that a single row cannot amortize). vpdpbusd is seeded with minus the
// offset term, so it returns dot - offset in one instruction.
#include "gguf_kernels.h"

#ifdef LMSERVE_GGUF_AVX2
#include <algorithm>
#include <vector>
#include "gguf_avx2.h"
#include "gguf_x8.h"

// after every include: only this file's own functions are compiled for AVX-512 (an inline function of a shared
// header compiled here could otherwise be the copy the linker keeps for the AVX2 code too)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#include "gguf_grid_lanes.h"   // its templates compiled for this file's target (internal linkage)

namespace gguf {
namespace {
using namespace avx2;

inline __m512 halves(float lo, float hi) {   // [lo x 8 | hi x 8]
  return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(lo)), _mm256_set1_ps(hi), 1);
}

// the scale lanes of one sub-block, as the AVX2 kernel builds them (Q6_K: values 16-31 in lanes 4-7)
template <int QT>
inline __m256 scale8(float s0, float s1) {
  return kScalePer16(QT) ? _mm256_set_m128(_mm_set1_ps(s1), _mm_set1_ps(s0)) : _mm256_set1_ps(s0);
}

// One quant type's constants and RM activation rows from m0, as both tile kinds read them. SH: the stored offset
// subtracted via the lane sums (Q4_0 8, Q5_0 16, Q6_K 32; Q8_0 128, fed to vpdpbusd as q ^ 0x80).
template <int QT>
struct Rows {
  static constexpr int BE = kBlockElems[QT], BB = kBlockBytes[QT], NS = BE / 32;
  static constexpr bool U = kHasMin[QT];
  static constexpr int SH = kFullSigned(QT) ? 7 : kOffsetShift[QT];
  static constexpr bool RAW = kOffsetShift[QT] >= 0, OFF = SH >= 0;
  const int64_t K, nb, ng;
  const int8_t* qx;
  const float *dx, *sx;
  const int32_t* ls;
  Rows(const DotArgs& p, int64_t m0)
      : K(p.K), nb(p.K / BE), ng(p.K / 32), qx(p.a->q.data() + m0 * p.K), dx(p.a->dx.data() + m0 * ng),
        sx(p.a->sx.data() + m0 * ng), ls(p.a->ls.data() + m0 * ng * 8) {}
  // sub-block g of row m with the weight's q (Q8_0: already ^ 0x80) on 8 lanes: the exact dot - offset, vpdpbusd
  // seeded with minus the offset term
  inline __m256i dot8(__m256i q, int m, int64_t g) const {
    __m256i seed = _mm256_setzero_si256();
    if constexpr (OFF)
      seed = _mm256_sub_epi32(seed, _mm256_slli_epi32(load32(reinterpret_cast<const uint8_t*>(ls + (m * ng + g) * 8)), SH));
    return _mm256_dpbusd_epi32(seed, q, load32(reinterpret_cast<const uint8_t*>(qx + m * K + g * 32)));
  }
};

template <int QT, int RM, int RN, bool PRE>
void tile_vnni(const DotArgs& p, int64_t m0, int64_t n0) {
  using R = Rows<QT>;
  constexpr int NS = R::NS, SH = R::SH;
  constexpr bool U = R::U, RAW = R::RAW, OFF = R::OFF;
  const R a(p, m0);
  const int64_t K = a.K, nb = a.nb, ng = a.ng;
  const int8_t* qx = a.qx;
  const float *dx = a.dx, *sx = a.sx;
  const int32_t* ls = a.ls;
  __m512 acc[RM][RN];
  float mins[RM][RN];
  const uint8_t* row[RN];
  for (int j = 0; j < RN; ++j) row[j] = p.w + (n0 + j) * p.ws;
  for (int m = 0; m < RM; ++m)
    for (int j = 0; j < RN; ++j) {
      acc[m][j] = _mm512_setzero_ps();
      mins[m][j] = 0.f;
    }
  // sub-blocks g = b * NS + s and g + 1 (s + 1 of the same block, or sub-block 0 of block b1 = b + 1 when NS == 1);
  // inlined into unrolled loops, as the AVX2 kernel's step, so s is a constant and sub_block's branches fold
  auto step = [&](int64_t b, int s, int64_t b1, int s1) __attribute__((always_inline)) {
    const int64_t g = b * NS + s;
    __m512i xv[RM], off[RM];
    __m512 dxv[RM];
    for (int m = 0; m < RM; ++m) {
      xv[m] = _mm512_loadu_si512(qx + m * K + g * 32);
      dxv[m] = halves(dx[m * ng + g], dx[m * ng + g + 1]);
      // the dot's seed: minus the offset term (zero without one), so vpdpbusd leaves dot - offset
      off[m] = OFF ? _mm512_sub_epi32(_mm512_setzero_si512(),
                                      _mm512_slli_epi32(_mm512_loadu_si512(ls + (m * ng + g) * 8), SH))
                   : _mm512_setzero_si512();
    }
    for (int j = 0; j < RN; ++j) {
      __m256i qa, qb;
      float a0, a1, am, am1, c0, c1, cm, cm1;
      load_sub<QT, RAW, PRE>(row[j], b, s, qa, a0, a1, am, am1);
      load_sub<QT, RAW, PRE>(row[j], b1, s1, qb, c0, c1, cm, cm1);
      __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(qa), qb, 1);
      if constexpr (kFullSigned(QT)) q = _mm512_xor_si512(q, _mm512_set1_epi8(static_cast<char>(0x80)));
      const __m512 sc = _mm512_insertf32x8(_mm512_castps256_ps512(scale8<QT>(a0, a1)), scale8<QT>(c0, c1), 1);
      for (int m = 0; m < RM; ++m) {
        const __m512i dot = _mm512_dpbusd_epi32(off[m], q, xv[m]);
        acc[m][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(sc, dxv[m]), acc[m][j]);
        if constexpr (U) {
          mins[m][j] += min_term<QT>(am, am1, sx[m * ng + g], dx[m * ng + g], ls + (m * ng + g) * 8);
          mins[m][j] += min_term<QT>(cm, cm1, sx[m * ng + g + 1], dx[m * ng + g + 1], ls + (m * ng + g + 1) * 8);
        }
      }
    }
  };
  if constexpr (NS == 1) {
    for (int64_t b = 0; b + 2 <= nb; b += 2) step(b, 0, b + 1, 0);
  } else {
    for (int64_t b = 0; b < nb; ++b) {
      #pragma GCC unroll 4
      for (int s = 0; s < NS; s += 2) step(b, s, b, s + 1);
    }
  }
  if (NS == 1 && nb % 2) {   // the odd last block: the low half (the AVX2 kernel's acc[0])
    const int64_t b = nb - 1, g = b;
    for (int j = 0; j < RN; ++j) {
      __m256i q;
      float s0, s1, mn, mn1;
      load_sub<QT, RAW, PRE>(row[j], b, 0, q, s0, s1, mn, mn1);
      if constexpr (kFullSigned(QT)) q = _mm256_xor_si256(q, _mm256_set1_epi8(static_cast<char>(0x80)));
      for (int m = 0; m < RM; ++m) {
        const __m256 lo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a.dot8(q, m, g)),
                                          _mm256_mul_ps(scale8<QT>(s0, s1), _mm256_set1_ps(dx[m * ng + g])),
                                          _mm512_castps512_ps256(acc[m][j]));
        acc[m][j] = _mm512_insertf32x8(acc[m][j], lo, 0);
        if constexpr (U)
          mins[m][j] += min_term<QT>(mn, mn1, sx[m * ng + g], dx[m * ng + g], ls + (m * ng + g) * 8);
      }
    }
  }
  for (int m = 0; m < RM; ++m)
    for (int j = 0; j < RN; ++j) {
      const __m256 t = _mm256_add_ps(_mm512_castps512_ps256(acc[m][j]), _mm512_extractf32x8_ps(acc[m][j], 1));
      const float v = hsum(t);
      p.out[(m0 + m) * p.N + n0 + j] = U ? v + mins[m][j] : v;
    }
}

// Decode tiles (one weight row, RM activation rows, M < 64) on 8-lane registers: the AVX2 kernel's tile_int8 step for step
// (two accumulators, sub-block g -> acc[g % 2]; blocks alternate for 32-value types; an odd last block to acc[0]),
// with vpdpbusd seeded with -offset x the lane sums in place of maddubs + madd - offset. The int32 dot is the same
// exact integer, so the bits are the same; per sub-block this issues one integer op where AVX2 issues three.
template <int QT, int RM>
void tile_v256(const DotArgs& p, int64_t m0, int64_t n0) {
  using R = Rows<QT>;
  constexpr int NS = R::NS;
  constexpr bool U = R::U;
  const R a(p, m0);
  const int64_t nb = a.nb, ng = a.ng;
  const uint8_t* row = p.w + n0 * p.ws;
  __m256 acc[2][RM];
  float mins[RM];
  for (int m = 0; m < RM; ++m) {
    acc[0][m] = acc[1][m] = _mm256_setzero_ps();
    mins[m] = 0.f;
  }
  auto step = [&](int64_t b, int s, __m256 (&A)[RM]) __attribute__((always_inline)) {
    const int64_t g = b * NS + s;
    __m256i q;
    float s0, s1, mn, mn1;
    load_sub<QT, R::RAW, false>(row, b, s, q, s0, s1, mn, mn1);
    if constexpr (kFullSigned(QT)) q = _mm256_xor_si256(q, _mm256_set1_epi8(static_cast<char>(0x80)));
    const __m256 sc = scale8<QT>(s0, s1);
    for (int m = 0; m < RM; ++m) {
      A[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a.dot8(q, m, g)), _mm256_mul_ps(sc, _mm256_set1_ps(a.dx[m * ng + g])),
                             A[m]);
      if constexpr (U)
        mins[m] += min_term<QT>(mn, mn1, a.sx[m * ng + g], a.dx[m * ng + g], a.ls + (m * ng + g) * 8);
    }
  };
  if constexpr (NS % 2 == 0) {
    for (int64_t b = 0; b < nb; ++b) {
      #pragma GCC unroll 8
      for (int s = 0; s < NS; ++s) step(b, s, acc[s % 2]);
    }
  } else {
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
      step(b, 0, acc[0]);
      step(b + 1, 0, acc[1]);
    }
    for (; b < nb; ++b) step(b, 0, acc[0]);
  }
  for (int m = 0; m < RM; ++m) {
    const float v = hsum(_mm256_add_ps(acc[0][m], acc[1][m]));
    p.out[(m0 + m) * p.N + n0] = U ? v + mins[m] : v;
  }
}

template <int QT>
struct VnniTile {
  static constexpr int kGemmRN = 4;
  template <int RM, int RN, bool PRE>
  static void tile(const DotArgs& p, int64_t m, int64_t n) {
    if constexpr (RN == 1 && !PRE) {
      if (p.M < kDecodeRows) return tile_v256<QT, RM>(p, m, n);   // decode batches, as int8_blocked sees them
    }
    tile_vnni<QT, RM, RN, PRE>(p, m, n);
  }
  static void predecode(const DotArgs& p, int64_t c0, int64_t c1, PreSub* panel) {
    avx2::predecode<QT, Rows<QT>::RAW>(p, c0, c1, panel);
  }
};

// the AVX2 kernel's blocking (gguf_avx2.h), so both compute each output in the same tile shape
template <int QT>
void vnni_type(const DotArgs& p, int64_t n0, int64_t n1) { int8_blocked<VnniTile<QT>>(p, n0, n1); }

// the grid types' integer steps (gguf_grid_lanes.h): vpdpbusd on w ^ 0x80, seeded with -128 x the activations'
// sums (of the sub-block or its half in tiles, of each lane's 4 values in row dots): the AVX2 steps' exact sums
struct VnniDot {
  static constexpr bool kXor = true;
  static constexpr int kMaxRows = 8;
  static __m256i seed(const Act& a, int64_t gi, int halves, int h) {   // -128 x the sum of x (hs: -32 x per 16)
    return _mm256_set1_epi32(halves == 1 ? -128 * a.qsum[gi] : 4 * a.hs[gi * 2 + h]);
  }
  static __m256i prep(__m256i w) { return w; }
  static __m256i dot(__m256i acc, __m256i w, __m256i, __m256i x) { return _mm256_dpbusd_epi32(acc, w, x); }
  // a row's sub-block (tile_rows): |x| unsigned times sign(x) w signed, no offset to remove
  static __m256i row_prep(__m256i q) { return q; }
  static __m256i row_dot(__m256i q, __m256i, __m256i x) {
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_abs_epi8(x), _mm256_sign_epi8(q, x));
  }
};

}  // namespace

void int8_avx512vnni(const DotArgs& p, int64_t n0, int64_t n1) {
  switch (p.qt) {
    case Q4_0: return vnni_type<Q4_0>(p, n0, n1);
    case Q4_1: return vnni_type<Q4_1>(p, n0, n1);
    case Q5_0: return vnni_type<Q5_0>(p, n0, n1);
    case Q5_1: return vnni_type<Q5_1>(p, n0, n1);
    case Q8_0: return vnni_type<Q8_0>(p, n0, n1);
    case Q4_K: return vnni_type<Q4_K>(p, n0, n1);
    case Q5_K: return vnni_type<Q5_K>(p, n0, n1);
    case Q6_K: return vnni_type<Q6_K>(p, n0, n1);
    case Q3_K: return vnni_type<Q3_K>(p, n0, n1);
    case IQ4_XS: return vnni_type<IQ4_XS>(p, n0, n1);
    case Q2_K: return vnni_type<Q2_K>(p, n0, n1);
    case IQ4_NL: return vnni_type<IQ4_NL>(p, n0, n1);
    case MXFP4: return vnni_type<MXFP4>(p, n0, n1);
    case IQ2_XXS: case IQ2_XS: case IQ2_S: case IQ3_XXS: case IQ3_S: case IQ1_S: case IQ1_M:
      return grid::matmul<VnniDot>(p, n0, n1);
    default: return;
  }
}

}  // namespace gguf

#pragma GCC pop_options
#endif  // LMSERVE_GGUF_AVX2
