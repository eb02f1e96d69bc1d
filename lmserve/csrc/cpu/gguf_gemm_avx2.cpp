// Batch-invariant GEMMs on GGUF blocks with AVX2: the int8-activation path for every M (decode and prefill), and
// the tile GEMM of the exact float path above max_dot_rows.
//
// Batch invariance: a row's outputs are bit-identical whatever M is, because every output (m, n) is computed by
// the same sequence of float operations whichever tile it falls in; tiles only decide which outputs share the
// loads and the weight unpacking. int8 (llama.cpp's design: activations quantized to Q8 blocks for every batch
// size, then integer block dots; not its code): per 32-value sub-block g in order, the exact int32 dot of the
// weight's q with the activation's q (maddubs + madd, 8 lanes), converted to float and FMA'd as
// acc = dot * (scale * dx[g]) + acc into one 8-wide accumulator; types with a min add min * sx[g] to a scalar
// sum in the same order; the output is hsum(acc) (+ that sum). Types stored with an offset (Q4_0, Q5_0, Q6_K)
// keep their unsigned values for maddubs and subtract offset x the activations' lane sums (Act::ls): the same
// exact integer dot as the signed form, with fewer instructions.
// No sum can saturate: |w| <= 128 and |qx| <= 127, so a maddubs pair is at most 2 * 128 * 127 < 32767.
#include "gguf_kernels.h"

#ifdef LMSERVE_GGUF_AVX2
#include <algorithm>
#include <vector>
#include "gguf_avx2.h"
#include "gguf_grid_lanes.h"

namespace gguf {
namespace {
using namespace avx2;

// Tile shapes (measured with a standalone harness, docs/benchmarks.md): accumulators per output (sub-block g goes
// to acc[g % NACC]: two, so one row's FMAs do not wait on each other); GEMM tiles of 4 activation rows x 2 weight
// rows; a single activation row (decode) reads one weight row at a time: one sequential stream from DRAM measured
// ~1.7x faster here than 2 or 4 interleaved rows (gguf_avx2.h int8_blocked).
constexpr int NACC = 2;

// outputs [m0, m0 + RM) x [n0, n0 + RN)
template <int QT, int RM, int RN, bool PRE>
void tile_int8(const DotArgs& p, int64_t m0, int64_t n0) {
  constexpr int BE = kBlockElems[QT], NS = BE / 32, SH = kOffsetShift[QT];
  constexpr bool U = kHasMin[QT], RAW = SH >= 0;
  const int64_t K = p.K, nb = K / BE, ng = K / 32;
  const int8_t* qx = p.a->q.data() + m0 * K;
  const float* dx = p.a->dx.data() + m0 * ng;
  const float* sx = p.a->sx.data() + m0 * ng;
  const int32_t* ls = p.a->ls.data() + m0 * ng * 8;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[NACC][RM][RN];
  float mins[RM][RN];
  const uint8_t* row[RN];
  for (int j = 0; j < RN; ++j) row[j] = p.w + (n0 + j) * p.ws;
  for (int m = 0; m < RM; ++m)
    for (int j = 0; j < RN; ++j) {
      for (int a = 0; a < NACC; ++a) acc[a][m][j] = _mm256_setzero_ps();
      mins[m][j] = 0.f;
    }
  // sub-block s of block b into the accumulators A
  auto step = [&](int64_t b, int s, __m256 (&A)[RM][RN]) __attribute__((always_inline)) {
    const int64_t g = b * NS + s;
    __m256i xv[RM], off[RM];
    __m256 dxv[RM];
    for (int m = 0; m < RM; ++m) {
      xv[m] = load32(reinterpret_cast<const uint8_t*>(qx + m * K + g * 32));
      dxv[m] = _mm256_set1_ps(dx[m * ng + g]);
      if constexpr (RAW)
        off[m] = _mm256_slli_epi32(load32(reinterpret_cast<const uint8_t*>(ls + (m * ng + g) * 8)), SH);
    }
    for (int j = 0; j < RN; ++j) {
      __m256i q;
      float s0, s1, mn, mn1;
      load_sub<QT, RAW, PRE>(row[j], b, s, q, s0, s1, mn, mn1);
      // lanes 4-7: values 16-31 (Q6_K and Q3_K have two scales per 32)
      const __m256 sc = kScalePer16(QT) ? _mm256_set_m128(_mm_set1_ps(s1), _mm_set1_ps(s0)) : _mm256_set1_ps(s0);
      for (int m = 0; m < RM; ++m) {
        __m256i dot;
        if constexpr (RAW) dot = _mm256_sub_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(q, xv[m]), ones), off[m]);
        else dot = idot(q, xv[m], U);
        A[m][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(sc, dxv[m]), A[m][j]);
        if constexpr (U)
          mins[m][j] += min_term<QT>(mn, mn1, sx[m * ng + g], dx[m * ng + g], ls + (m * ng + g) * 8);
      }
    }
  };
  if constexpr (NS % NACC == 0) {
    for (int64_t b = 0; b < nb; ++b) {
      #pragma GCC unroll 8
      for (int s = 0; s < NS; ++s) step(b, s, acc[s % NACC]);
    }
  } else {   // one sub-block per block: blocks alternate; an odd last block (even index) goes to acc[0]
    int64_t b = 0;
    for (; b + NACC <= nb; b += NACC) {
      #pragma GCC unroll 2
      for (int a = 0; a < NACC; ++a) step(b + a, 0, acc[a]);
    }
    for (; b < nb; ++b) step(b, 0, acc[0]);
  }
  for (int m = 0; m < RM; ++m)
    for (int j = 0; j < RN; ++j) {
      __m256 t = acc[0][m][j];
      for (int a = 1; a < NACC; ++a) t = _mm256_add_ps(t, acc[a][m][j]);
      const float v = hsum(t);
      p.out[(m0 + m) * p.N + n0 + j] = U ? v + mins[m][j] : v;
    }
}

template <int QT>
struct Int8Tile {
  static constexpr int kGemmRN = 2;
  template <int RM, int RN, bool PRE>
  static void tile(const DotArgs& p, int64_t m, int64_t n) { tile_int8<QT, RM, RN, PRE>(p, m, n); }
  static void predecode(const DotArgs& p, int64_t c0, int64_t c1, PreSub* panel) {
    avx2::predecode<QT, (kOffsetShift[QT] >= 0)>(p, c0, c1, panel);
  }
};

template <int QT>
void int8_type(const DotArgs& p, int64_t n0, int64_t n1) { int8_blocked<Int8Tile<QT>>(p, n0, n1); }

// float outputs [RM rows of x] x [RN dequantized rows of W], each as rows_float (gguf_dot_avx2.cpp) computes it:
// one 8-wide accumulator, acc = w * x + acc over k in steps of 8, then hsum
template <int RM, int RN>
void tile_float(const float* x, const float* w, int64_t K, float* out, int64_t N) {
  __m256 acc[RM][RN];
  for (int m = 0; m < RM; ++m)
    for (int j = 0; j < RN; ++j) acc[m][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    __m256 xv[RM];
    for (int m = 0; m < RM; ++m) xv[m] = _mm256_loadu_ps(x + m * K + k);
    for (int j = 0; j < RN; ++j) {
      const __m256 wv = _mm256_loadu_ps(w + j * K + k);
      for (int m = 0; m < RM; ++m) acc[m][j] = _mm256_fmadd_ps(wv, xv[m], acc[m][j]);
    }
  }
  for (int m = 0; m < RM; ++m)
    for (int j = 0; j < RN; ++j) out[m * N + j] = hsum(acc[m][j]);
}

template <int RM>
void panel_float(const DotArgs& p, int64_t m, const float* panel, int64_t c0, int64_t nc) {
  const float* x = p.x + m * p.K;
  float* out = p.out + m * p.N + c0;
  int64_t j = 0;
  for (; j + 2 <= nc; j += 2) tile_float<RM, 2>(x, panel + j * p.K, p.K, out + j, p.N);
  for (; j < nc; ++j) tile_float<RM, 1>(x, panel + j * p.K, p.K, out + j, p.N);
}

// the grid types' integer steps (gguf_grid_lanes.h): maddubs on |w| <= 62 and sign(x, w), exact
struct Avx2Dot {
  static constexpr bool kXor = false;
  static constexpr int kMaxRows = 4;
  static __m256i seed(const Act&, int64_t, int, int) { return _mm256_setzero_si256(); }
  static __m256i prep(__m256i w) { return _mm256_abs_epi8(w); }
  static __m256i dot(__m256i acc, __m256i w, __m256i wa, __m256i x) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(wa, _mm256_sign_epi8(x, w)),
                                                   _mm256_set1_epi16(1)));
  }
  static __m256i row_prep(__m256i q) { return _mm256_abs_epi8(q); }
  static __m256i row_dot(__m256i q, __m256i qa, __m256i x) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(qa, _mm256_sign_epi8(x, q)), _mm256_set1_epi16(1));
  }
};

}  // namespace

void int8_avx2(const DotArgs& p, int64_t n0, int64_t n1) {
  switch (p.qt) {
    case Q4_0: return int8_type<Q4_0>(p, n0, n1);
    case Q4_1: return int8_type<Q4_1>(p, n0, n1);
    case Q5_0: return int8_type<Q5_0>(p, n0, n1);
    case Q5_1: return int8_type<Q5_1>(p, n0, n1);
    case Q8_0: return int8_type<Q8_0>(p, n0, n1);
    case Q4_K: return int8_type<Q4_K>(p, n0, n1);
    case Q5_K: return int8_type<Q5_K>(p, n0, n1);
    case Q6_K: return int8_type<Q6_K>(p, n0, n1);
    case Q3_K: return int8_type<Q3_K>(p, n0, n1);
    case IQ4_XS: return int8_type<IQ4_XS>(p, n0, n1);
    case Q2_K: return int8_type<Q2_K>(p, n0, n1);
    case IQ4_NL: return int8_type<IQ4_NL>(p, n0, n1);
    case MXFP4: return int8_type<MXFP4>(p, n0, n1);
    case IQ2_XXS: case IQ2_XS: case IQ2_S: case IQ3_XXS: case IQ3_S: case IQ1_S: case IQ1_M:
      return grid::matmul<Avx2Dot>(p, n0, n1);
    default: return;
  }
}

void float_gemm_avx2(const DotArgs& p, int64_t n0, int64_t n1) {
  // panels of C weight rows dequantized exactly (<= 256 KB, L2-resident), each used by every activation row
  const int64_t K = p.K, nb = K / kBlockElems[p.qt];
  const int64_t C = std::max<int64_t>(2, std::min<int64_t>(16, (64 << 10) / K));
  std::vector<float> panel(C * K);
  for (int64_t c0 = n0; c0 < n1; c0 += C) {
    const int64_t nc = std::min(n1 - c0, C);
    for (int64_t r = 0; r < nc; ++r) dequant_avx2(p.qt, p.w + (c0 + r) * p.ws, nb, panel.data() + r * K);
    int64_t m = 0;
    for (; m + 4 <= p.M; m += 4) panel_float<4>(p, m, panel.data(), c0, nc);
    for (; m < p.M; ++m) panel_float<1>(p, m, panel.data(), c0, nc);
  }
}

}  // namespace gguf
#endif  // LMSERVE_GGUF_AVX2
