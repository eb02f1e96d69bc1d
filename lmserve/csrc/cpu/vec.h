// Shared helpers of the CPU kernels: the 8-lane AVX2 exp and horizontal sum, float32/bfloat16 reads. Included by
// every .cpp.
#pragma once
#include <ATen/Parallel.h>
#include "ops.h"
#include <cmath>
#include <vector>
#include <algorithm>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LMSERVE_AVX2 1
// expf for 8 lanes (Cephes polynomial, ~1 ulp): the portable build (AVX2 + FMA baseline) has no AVX-512, and libm's
// scalar expf made softmax and SiLU its slowest elementwise loops. Inputs clamped to [-87.3, 88.0]: 2^n then
// stays a normal float (exp(-87.3) ~ 1.2e-38 stands in for 0, exp(88) ~ 1.7e38 for overflow).
static inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500E-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

// K/V caches hold float32 or (with --dtype bfloat16) bfloat16; reads widen to float32
static inline float to_f(float x) { return x; }
static inline float to_f(c10::BFloat16 x) { return static_cast<float>(x); }
