// F16 / BF16 weights times bfloat16 activations with AVX512-BF16 (vdpbf16ps), for every M: the non-exact mode's
// path for 16-bit matrices on CPUs with native bf16 (where the quantized types take int8 activations), chosen at
// run time from the AVX2-baseline build: this file alone is compiled for AVX-512 + BF16 (the target pragma below),
// and nothing in it runs unless the CPU has both (cpu_isa.cpp bf16_dot()).
//
// The activations are rounded to bf16 once per call (round to nearest even); BF16 weights are used as they lie,
// F16 weights are rounded to bf16 as they are read (the precision --dtype bfloat16 gives float models' matmuls).
// Each output (m, n) is one 16-lane fp32 accumulator, acc = dpbf16(acc, x[k..k+31], w[k..k+31]) over k in order,
// then one fixed-order reduction: the same operations whichever tile the output falls in, so a row's result does
// not depend on M (batch invariance). vdpbf16ps does twice the multiply-adds of an fp32 FMA per instruction; on
// prefill-sized M this path runs ~2.8x the exact float tile GEMM (docs/benchmarks.md).
#include "gguf_kernels.h"

#ifdef LMSERVE_GGUF_AVX2
#include <immintrin.h>
#include <algorithm>
#include <vector>
#include <ATen/Parallel.h>
#include "gguf_blocks.h"

// after every include: only this file's own functions are compiled for AVX-512 (see gguf_gemm_avx512.cpp)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")

namespace gguf {
namespace {

inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh&>(v); }
inline __m512i as_i(__m512bh v) { return reinterpret_cast<__m512i&>(v); }

// 32 values of a weight row (BF16 as they are, F16 rounded to bf16), as 16 bf16 pairs
template <int QT>
inline __m512bh wload(const uint8_t* w) {
  if constexpr (QT == BF16) {
    return as_bh(_mm512_loadu_si512(w));
  } else {
    const __m512 lo = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
    const __m512 hi = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32)));
    return _mm512_cvtne2ps_pbh(hi, lo);     // b's values go to the low half
  }
}

// outputs [m0, m0 + RM) x the RN weight rows w[j] (bf16, K values each)
template <int QT, int RM, int RN>
void tile(const DotArgs& p, const uint16_t* xb, int64_t m0, const uint8_t* const* w, int64_t n) {
  const int64_t K = p.K;
  __m512 acc[RM][RN];
  for (int m = 0; m < RM; ++m)
    for (int j = 0; j < RN; ++j) acc[m][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m512bh xv[RM];
    for (int m = 0; m < RM; ++m) xv[m] = as_bh(_mm512_loadu_si512(xb + (m0 + m) * K + k));
    for (int j = 0; j < RN; ++j) {
      const __m512bh wv = wload<QT>(w[j] + 2 * k);
      for (int m = 0; m < RM; ++m) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], xv[m], wv);
    }
  }
  for (int m = 0; m < RM; ++m)
    for (int j = 0; j < RN; ++j) p.out[(m0 + m) * p.N + n + j] = _mm512_reduce_add_ps(acc[m][j]);
}

// tiles of 4 activation rows x 6 weight rows (24 accumulators + 4 + 1 of the 32 registers), blocks of 128
// activation rows; measured on Zen 4 at the 1B model's GEMMs against 4 x 4, 6 x 4 and blocks of 32-256 rows (all
// within ~10%; 4 x 6 ahead at K = 8192): ~0.85-0.9x oneDNN's packed bf16 GEMM, which needs a packed copy
constexpr int kRM = 4, kRN = 6;
constexpr int64_t kMB = 128;

template <int QT, int RN>
void rows(const DotArgs& p, const uint16_t* xb, int64_t m0, int64_t m1, const uint8_t* const* w, int64_t n) {
  int64_t m = m0;
  for (; m + kRM <= m1; m += kRM) tile<QT, kRM, RN>(p, xb, m, w, n);
  for (; m < m1; ++m) tile<QT, 1, RN>(p, xb, m, w, n);
}

template <int QT>
void run(const DotArgs& p, int64_t n0, int64_t n1) {
  // blocks of kMB activation rows (their bf16 rows stay cache-resident while every kRN-row weight tile of this
  // thread's range passes); F16 tiles of a GEMM are rounded to bf16 once per block into a panel, not per row tile
  const uint16_t* xb = p.a->xb.data();
  const bool panel = QT == F16 && p.M > kRM;
  std::vector<uint16_t> buf(panel ? kRN * p.K : 0);
  for (int64_t mb = 0; mb < p.M; mb += kMB) {
    const int64_t me = std::min(p.M, mb + kMB);
    for (int64_t n = n0; n < n1; n += kRN) {
      const int rn = static_cast<int>(std::min<int64_t>(kRN, n1 - n));
      const uint8_t* w[kRN];
      for (int j = 0; j < rn; ++j) w[j] = p.w + (n + j) * p.ws;
      if (panel) {     // the same rounding wload<F16> does, once
        for (int j = 0; j < rn; ++j) {
          for (int64_t k = 0; k < p.K; k += 32)
            _mm512_storeu_si512(buf.data() + j * p.K + k, as_i(wload<F16>(w[j] + 2 * k)));
          w[j] = reinterpret_cast<const uint8_t*>(buf.data() + j * p.K);
        }
        if (rn == kRN) rows<BF16, kRN>(p, xb, mb, me, w, n);
        else for (int j = 0; j < rn; ++j) rows<BF16, 1>(p, xb, mb, me, w + j, n + j);
      } else if (rn == kRN) {
        rows<QT, kRN>(p, xb, mb, me, w, n);
      } else {
        for (int j = 0; j < rn; ++j) rows<QT, 1>(p, xb, mb, me, w + j, n + j);
      }
    }
  }
}

}  // namespace

void act_bf16(Act& a, const float* x, int64_t M, int64_t K) {
  a.xb.resize(M * K);
  uint16_t* out = a.xb.data();
  at::parallel_for(0, M * K / 32, 256, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + 32 * c + 16), _mm512_loadu_ps(x + 32 * c));
      _mm512_storeu_si512(out + 32 * c, as_i(v));
    }
  });
}

void bf16_avx512(const DotArgs& p, int64_t n0, int64_t n1) {
  if (p.qt == F16) run<F16>(p, n0, n1);
  else if (p.qt == BF16) run<BF16>(p, n0, n1);
}

}  // namespace gguf

#pragma GCC pop_options
#endif  // LMSERVE_GGUF_AVX2
