// Matmul on GGUF-derived quantized weights (lmserve/model/quant.py formats).
#include "ops.h"
#include "vec.h"

// out[M, N] = x[M, K] @ W^T with W kept in 32-element groups, w = d * q + m (see quant.py for the formats).
// S = scales per group: 1, or 2 when each half of 16 has its own d and m (Q6_K's 16-element sub-blocks).
// Each group is expanded to float32 in registers exactly as the loader dequantizes it, then accumulated into
// 32-wide accumulators for R rows at a time (kept in registers); one horizontal sum per output element.
// Memory traffic is the quantized size of W, once per R rows.
template <bool Q4, int S>
static inline void expand_group(float* __restrict w, const void* qv, int64_t g, const float* db, const float* mb) {
  const float d0 = db[0], m0 = mb[0], d1 = db[S - 1], m1 = mb[S - 1];
  if (Q4) {
    const uint8_t* __restrict qb = static_cast<const uint8_t*>(qv) + g * 16;
    #pragma omp simd
    for (int j = 0; j < 16; ++j) w[j] = (float)(qb[j] & 15) * d0 + m0;
    #pragma omp simd
    for (int j = 0; j < 16; ++j) w[j + 16] = (float)(qb[j] >> 4) * d1 + m1;
  } else {
    const int8_t* __restrict qb = static_cast<const int8_t*>(qv) + g * 32;
    #pragma omp simd
    for (int j = 0; j < 16; ++j) w[j] = (float)qb[j] * d0 + m0;
    #pragma omp simd
    for (int j = 16; j < 32; ++j) w[j] = (float)qb[j] * d1 + m1;
  }
}

template <bool Q4, int S, int R>
static void qmatmul_rows(float* out, const float* x, const void* qv, const float* d, const float* m,
                         int64_t N, int64_t nb, int64_t n0, int64_t n1) {
  const int64_t K = nb * 32;
#ifdef LMSERVE_AVX512
  // NOTE: q * d then + m as two roundings (not one FMA) so each weight equals the loader's float32 value.
  // Q4: the group's 16 possible weights d * k + m (k = 0..15) form one register; vpermps picks them by the
  // nibble (it reads only the low 4 bits of each index lane, so the high nibble needs just a shift).
  const __m512 ks = _mm512_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f, 8.f, 9.f, 10.f, 11.f, 12.f, 13.f, 14.f, 15.f);
  for (int64_t n = n0; n < n1; ++n) {
    __m512 acc0[R], acc1[R];
    for (int r = 0; r < R; ++r) { acc0[r] = _mm512_setzero_ps(); acc1[r] = _mm512_setzero_ps(); }
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t g = n * nb + b;
      const __m512 vd0 = _mm512_set1_ps(d[g * S]), vm0 = _mm512_set1_ps(m[g * S]);
      const __m512 vd1 = _mm512_set1_ps(d[g * S + S - 1]), vm1 = _mm512_set1_ps(m[g * S + S - 1]);
      __m512 w0, w1;
      if (Q4) {
        const __m512 table0 = _mm512_add_ps(_mm512_mul_ps(ks, vd0), vm0);
        const __m512 table1 = S == 1 ? table0 : _mm512_add_ps(_mm512_mul_ps(ks, vd1), vm1);
        const __m512i idx = _mm512_cvtepu8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint8_t*>(qv) + g * 16)));
        w0 = _mm512_permutexvar_ps(idx, table0);
        w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(idx, 4), table1);
      } else {
        const int8_t* qb = static_cast<const int8_t*>(qv) + g * 32;
        const __m512i q0 = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qb)));
        const __m512i q1 = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qb + 16)));
        w0 = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(q0), vd0), vm0);
        w1 = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(q1), vd1), vm1);
      }
      for (int r = 0; r < R; ++r) {
        const float* xr = x + r * K + b * 32;
        acc0[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xr), w0, acc0[r]);
        acc1[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + 16), w1, acc1[r]);
      }
    }
    for (int r = 0; r < R; ++r) out[r * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r], acc1[r]));
  }
#else
  alignas(64) float w[32];
  for (int64_t n = n0; n < n1; ++n) {
    alignas(64) float acc[R][32] = {};
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t g = n * nb + b;
      expand_group<Q4, S>(w, qv, g, d + g * S, m + g * S);
      for (int r = 0; r < R; ++r) {
        const float* __restrict xr = x + r * K + b * 32;
        #pragma omp simd
        for (int j = 0; j < 32; ++j) acc[r][j] += xr[j] * w[j];
      }
    }
    for (int r = 0; r < R; ++r) {
      float sum = 0.f;
      for (int j = 0; j < 32; ++j) sum += acc[r][j];
      out[r * N + n] = sum;
    }
  }
#endif
}

template <bool Q4, int S>
static void qmatmul_impl(float* out, const float* x, const void* qv, const float* d, const float* m,
                         int64_t M, int64_t N, int64_t nb) {
  const int64_t K = nb * 32;
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    int64_t i = 0;
    for (; i + 4 <= M; i += 4) qmatmul_rows<Q4, S, 4>(out + i * N, x + i * K, qv, d, m, N, nb, n0, n1);
    for (; i + 2 <= M; i += 2) qmatmul_rows<Q4, S, 2>(out + i * N, x + i * K, qv, d, m, N, nb, n0, n1);
    for (; i < M; ++i) qmatmul_rows<Q4, S, 1>(out + i * N, x + i * K, qv, d, m, N, nb, n0, n1);
  });
}

template <bool Q4>
static void qmatmul_dispatch(float* out, const float* x, const void* qv, const float* d, const float* m,
                             int64_t M, int64_t N, int64_t nb, int64_t S) {
  if (S == 2) qmatmul_impl<Q4, 2>(out, x, qv, d, m, M, N, nb);
  else qmatmul_impl<Q4, 1>(out, x, qv, d, m, M, N, nb);
}

void quant_matmul(torch::Tensor out, torch::Tensor x, torch::Tensor q, torch::Tensor d, torch::Tensor m) {
  TORCH_CHECK(x.is_contiguous() && q.is_contiguous() && d.is_contiguous() && m.is_contiguous() && out.is_contiguous());
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && d.scalar_type() == torch::kFloat32);
  const int64_t M = x.size(0), N = q.size(0), nb = q.size(1);
  TORCH_CHECK(x.size(1) == nb * 32, "quant_matmul: K mismatch");
  const int64_t S = d.size(1) / nb;
  TORCH_CHECK((S == 1 || S == 2) && d.size(1) == nb * S && m.sizes() == d.sizes() && d.size(0) == N,
              "quant_matmul: d and m must be [N, K/32] or [N, K/16]");
  if (q.scalar_type() == torch::kUInt8) {
    qmatmul_dispatch<true>(out.data_ptr<float>(), x.data_ptr<float>(), q.data_ptr(), d.data_ptr<float>(),
                           m.data_ptr<float>(), M, N, nb, S);
  } else {
    TORCH_CHECK(q.scalar_type() == torch::kInt8);
    qmatmul_dispatch<false>(out.data_ptr<float>(), x.data_ptr<float>(), q.data_ptr(), d.data_ptr<float>(),
                            m.data_ptr<float>(), M, N, nb, S);
  }
}
