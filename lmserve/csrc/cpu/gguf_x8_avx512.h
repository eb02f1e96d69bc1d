// The AVX512 tiles' shared loads and stores on weights repacked in groups of 8 rows (gguf_x8.h): included by every
// gguf_*x8.cpp inside its `#pragma GCC target` AVX512 section, so it needs no flags of its own. NG = 2: groups a and b side by side, 16 lanes; NG = 1: group a alone in the low 8.
#pragma once
#include <immintrin.h>
#include <cstdint>

namespace gguf {
namespace x8 {

// the 32 bytes at `off` of group a's block (and of group b's)
template <int NG>
inline __m512i load2(const uint8_t* a, const uint8_t* b, int64_t off) {
  const __m256i va = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + off));
  if (NG == 1) return _mm512_castsi256_si512(va);
  const __m256i vb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + off));
  return _mm512_inserti64x4(_mm512_castsi256_si512(va), vb, 1);
}

// the 8 rows' fp16 scales at the start of group a's block (and of group b's), as floats
template <int NG>
inline __m512 scales2(const uint8_t* a, const uint8_t* b) {
  const __m128i ha = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a));
  if (NG == 1) return _mm512_cvtph_ps(_mm256_castsi128_si256(ha));
  const __m128i hb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
  return _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(ha), hb, 1));
}

// an AVX512 tile's accumulators (one 16-lane register per row: NG groups' columns) to the output
template <int RM, int NG>
inline void store_tile(const DotArgs& p, int64_t m0, int64_t gr, const __m512 (&acc)[RM], int64_t n0, int64_t n1) {
  if (gr * 8 >= n0 && gr * 8 + 8 * NG <= n1) {   // every column this thread's: one store per row
    for (int m = 0; m < RM; ++m) {
      float* o = p.out + (m0 + m) * p.N + gr * 8;
      if (NG == 2) _mm512_storeu_ps(o, acc[m]);
      else _mm256_storeu_ps(o, _mm512_castps512_ps256(acc[m]));
    }
    return;
  }
  for (int m = 0; m < RM; ++m) {
    alignas(64) float o[16];
    _mm512_store_ps(o, acc[m]);
    store(p, m0 + m, gr, 8 * NG, o, n0, n1);
  }
}

}  // namespace x8
}  // namespace gguf
