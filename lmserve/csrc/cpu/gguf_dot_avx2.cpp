// Decode-size matmuls on GGUF blocks with exact float activations, and row dequantization, with AVX2 (the
// portable x86-64 baseline: AVX2 + FMA + F16C). The int8-activation path is gguf_gemm_avx2.cpp, for every M.
//
// Each block is dequantized in registers to float32 exactly as the reference, then FMA'd into one 8-wide
// accumulator per output (lane j sums the products of values k = j mod 8, in order of k), reduced by hsum. The tile
// GEMM (float_gemm_avx2) computes each output in that same order, so a row's result does not depend on how many
// rows share the call. Each weight block is read once per R <= 4 activation rows. F16 / BF16 weights are converted
// 8 at a time (vcvtph2ps, or a shift) and read C rows at once (rows16) in that same per-output order.
#include "gguf_kernels.h"

#ifdef LMSERVE_GGUF_AVX2
#include <algorithm>
#include "gguf_avx2.h"

namespace gguf {
namespace {
using namespace avx2;

template <int QT, int R>
void rows_float(const DotArgs& p, int64_t m0, int64_t n0, int64_t n1) {
  constexpr int BE = kBlockElems[QT], BB = kBlockBytes[QT], NS = BE / 32;
  const int64_t K = p.K, nb = K / BE;
  for (int64_t n = n0; n < n1; ++n) {
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    const uint8_t* row = p.w + n * p.ws;
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = row + b * BB;
      #pragma GCC unroll 8
      for (int s = 0; s < NS; ++s) {
        __m256i q;
        float s0, s1, mn;
        sub_block<QT>(blk, s, q, s0, s1, mn);
        __m256 w[4];
        widen<kHasMin[QT]>(q, s0, s1, mn, min_hi<QT>(blk, s, mn), w);
        for (int r = 0; r < R; ++r) {
          const float* xr = p.x + (m0 + r) * K + b * BE + s * 32;
          for (int i = 0; i < 4; ++i) acc[r] = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(xr + 8 * i), acc[r]);
        }
      }
    }
    for (int r = 0; r < R; ++r) p.out[(m0 + r) * p.N + n] = hsum(acc[r]);
  }
}

// 16-bit float weights (no blocks to unpack): C output rows at a time, each in rows_float's order, so that a single
// activation row still has C independent FMA chains
template <int QT, int R, int C>
void rows16(const DotArgs& p, int64_t m0, int64_t n) {
  const int64_t K = p.K;
  __m256 acc[C][R];
  const uint8_t* row[C];
  for (int c = 0; c < C; ++c) {
    row[c] = p.w + (n + c) * p.ws;
    for (int r = 0; r < R; ++r) acc[c][r] = _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < K; k += 8) {
    __m256 xv[R];
    for (int r = 0; r < R; ++r) xv[r] = _mm256_loadu_ps(p.x + (m0 + r) * K + k);
    for (int c = 0; c < C; ++c) {
      const __m256 w = load8_16<QT>(row[c] + 2 * k);
      for (int r = 0; r < R; ++r) acc[c][r] = _mm256_fmadd_ps(w, xv[r], acc[c][r]);
    }
  }
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) p.out[(m0 + r) * p.N + n + c] = hsum(acc[c][r]);
}

template <int QT, int R>
void rows16_all(const DotArgs& p, int64_t m0, int64_t c0, int64_t c1) {
  constexpr int C = R == 1 ? 4 : 2;
  int64_t n = c0;
  for (; n + C <= c1; n += C) rows16<QT, R, C>(p, m0, n);
  for (; n < c1; ++n) rows16<QT, R, 1>(p, m0, n);
}

template <int QT>
void dequant_type(const uint8_t* row, int64_t nb, float* out) {
  if constexpr (kFloat16(QT)) {
    for (int64_t k = 0; k < nb * 32; k += 8) _mm256_storeu_ps(out + k, load8_16<QT>(row + 2 * k));
  } else {
    constexpr int BE = kBlockElems[QT], BB = kBlockBytes[QT], NS = BE / 32;
    for (int64_t b = 0; b < nb; ++b) {
      #pragma GCC unroll 8
      for (int s = 0; s < NS; ++s) {
        __m256i q;
        float s0, s1, mn;
        sub_block<QT>(row + b * BB, s, q, s0, s1, mn);
        __m256 w[4];
        widen<kHasMin[QT]>(q, s0, s1, mn, min_hi<QT>(row + b * BB, s, mn), w);
        for (int i = 0; i < 4; ++i) _mm256_storeu_ps(out + b * BE + s * 32 + 8 * i, w[i]);
      }
    }
  }
}

template <int QT>
void dot_type(const DotArgs& p, int64_t n0, int64_t n1) {
  // outputs in chunks of 16 rows of W (a few KB, cache-resident) re-read by each group of <= 4 activation rows
  for (int64_t c0 = n0; c0 < n1; c0 += 16) {
    const int64_t c1 = std::min(n1, c0 + 16);
    int64_t m = 0;
    if constexpr (kFloat16(QT)) {
      for (; m + 4 <= p.M; m += 4) rows16_all<QT, 4>(p, m, c0, c1);
      for (; m + 2 <= p.M; m += 2) rows16_all<QT, 2>(p, m, c0, c1);
      for (; m < p.M; ++m) rows16_all<QT, 1>(p, m, c0, c1);
    } else {
      for (; m + 4 <= p.M; m += 4) rows_float<QT, 4>(p, m, c0, c1);
      for (; m + 2 <= p.M; m += 2) rows_float<QT, 2>(p, m, c0, c1);
      for (; m < p.M; ++m) rows_float<QT, 1>(p, m, c0, c1);
    }
  }
}

}  // namespace

void dequant_avx2(int qt, const uint8_t* row, int64_t nb, float* out) {
  switch (qt) {
    case Q4_0: return dequant_type<Q4_0>(row, nb, out);
    case Q4_1: return dequant_type<Q4_1>(row, nb, out);
    case Q5_0: return dequant_type<Q5_0>(row, nb, out);
    case Q5_1: return dequant_type<Q5_1>(row, nb, out);
    case Q8_0: return dequant_type<Q8_0>(row, nb, out);
    case Q4_K: return dequant_type<Q4_K>(row, nb, out);
    case Q5_K: return dequant_type<Q5_K>(row, nb, out);
    case Q6_K: return dequant_type<Q6_K>(row, nb, out);
    case Q3_K: return dequant_type<Q3_K>(row, nb, out);
    case IQ4_XS: return dequant_type<IQ4_XS>(row, nb, out);
    case Q2_K: return dequant_type<Q2_K>(row, nb, out);
    case IQ4_NL: return dequant_type<IQ4_NL>(row, nb, out);
    case MXFP4: return dequant_type<MXFP4>(row, nb, out);
    case IQ2_XXS: return dequant_type<IQ2_XXS>(row, nb, out);
    case IQ2_XS: return dequant_type<IQ2_XS>(row, nb, out);
    case IQ2_S: return dequant_type<IQ2_S>(row, nb, out);
    case IQ3_XXS: return dequant_type<IQ3_XXS>(row, nb, out);
    case IQ3_S: return dequant_type<IQ3_S>(row, nb, out);
    case IQ1_S: return dequant_type<IQ1_S>(row, nb, out);
    case IQ1_M: return dequant_type<IQ1_M>(row, nb, out);
    case F16: return dequant_type<F16>(row, nb, out);
    case BF16: return dequant_type<BF16>(row, nb, out);
    default: return;
  }
}

// The scalar quantize_group's values: amax is exact in any order, x * inv is the same product, and vroundps
// rounds half to even as nearbyint does in the default rounding mode.
void quantize_group_avx2(Act& a, const float* x, int64_t g) {
  const float* xg = x + g * 32;
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 v[4], m = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(xg + 8 * i);
    m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[i]));
  }
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  const float d = _mm_cvtss_f32(h) / 127.f;
  const __m256 inv = _mm256_set1_ps(d > 0.f ? 1.f / d : 0.f);
  __m256i q[4];
  for (int i = 0; i < 4; ++i)
    q[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  // int32 -> int8 (|q| <= 127): the packs interleave 128-bit lanes, the permute restores the order
  const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.q.data() + g * 32), _mm256_permutevar8x32_epi32(b, order));
  // sums of values 4l..4l+3: two rounds of hadd give [l0, l2, l4, l6, l1, l3, l5, l7]
  const __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(q[0], q[1]), _mm256_hadd_epi32(q[2], q[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.ls.data() + g * 8), _mm256_permutevar8x32_epi32(s, order));
  a.dx[g] = d;
  group_sums(a, g);
}

void dot_float_avx2(const DotArgs& p, int64_t n0, int64_t n1) {
  switch (p.qt) {
    case Q4_0: return dot_type<Q4_0>(p, n0, n1);
    case Q4_1: return dot_type<Q4_1>(p, n0, n1);
    case Q5_0: return dot_type<Q5_0>(p, n0, n1);
    case Q5_1: return dot_type<Q5_1>(p, n0, n1);
    case Q8_0: return dot_type<Q8_0>(p, n0, n1);
    case Q4_K: return dot_type<Q4_K>(p, n0, n1);
    case Q5_K: return dot_type<Q5_K>(p, n0, n1);
    case Q6_K: return dot_type<Q6_K>(p, n0, n1);
    case Q3_K: return dot_type<Q3_K>(p, n0, n1);
    case IQ4_XS: return dot_type<IQ4_XS>(p, n0, n1);
    case Q2_K: return dot_type<Q2_K>(p, n0, n1);
    case IQ4_NL: return dot_type<IQ4_NL>(p, n0, n1);
    case MXFP4: return dot_type<MXFP4>(p, n0, n1);
    case IQ2_XXS: return dot_type<IQ2_XXS>(p, n0, n1);
    case IQ2_XS: return dot_type<IQ2_XS>(p, n0, n1);
    case IQ2_S: return dot_type<IQ2_S>(p, n0, n1);
    case IQ3_XXS: return dot_type<IQ3_XXS>(p, n0, n1);
    case IQ3_S: return dot_type<IQ3_S>(p, n0, n1);
    case IQ1_S: return dot_type<IQ1_S>(p, n0, n1);
    case IQ1_M: return dot_type<IQ1_M>(p, n0, n1);
    case F16: return dot_type<F16>(p, n0, n1);
    case BF16: return dot_type<BF16>(p, n0, n1);
    default: return;
  }
}

}  // namespace gguf
#endif  // LMSERVE_GGUF_AVX2
