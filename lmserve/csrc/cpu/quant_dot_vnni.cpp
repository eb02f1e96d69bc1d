// Quantized matmul with int8 activations and VNNI integer dot products (llama.cpp's approach), for the non-exact
// precision modes only (--dtype auto resolving to bf16, --matmul-dtype bfloat16); --dtype float32 keeps
// quant_matmul.cpp, which is bit-exact to the loader's float32 weights.
//
// Each activation row is quantized once per call to int8 in groups of 32 (x ~ dx * qx, dx = amax / 127). Weights
// are unsigned bytes: "q4" nibbles (0..15) or "q8u" (int8 q + 128), w = d * (q - o) + m with o = 0 or 128. Then
//   sum_j w_j x_j = d * dx * (sum_j q_j qx_j - o * sum_j qx_j) + m * dx * sum_j qx_j
// The integer part is exact (vpdpbusd: u8 x s8, four products per int32 lane, no saturation); the o-correction is
// folded into the accumulator's start value, so it costs nothing in the inner loop.
//
// NOTE: compiled with target attributes and called only after a run-time CPU check (cpu_has_int8_dot), so this
// translation unit never puts AVX-512 code on a path a CPU without it could reach, whatever -march the build used.
#include "ops.h"
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <vector>

#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))

bool cpu_has_int8_dot() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni");
}

namespace {

// The quantized activations, laid out per pair of groups (64 values = one 512-bit vector).
struct QAct {
  int64_t np;                 // pairs of groups per row (nb rounded up to even, halved)
  int64_t ms;                 // m-term entries per row: nb * S
  std::vector<int8_t> qx;     // [M, np * 64]; the padding group of an odd nb is zero
  std::vector<float> xs;      // [M, np * 16]: dx of the group each int32 lane of the dot belongs to
  std::vector<int32_t> base;  // [M, np * 16]: -o * (sum of the lane's 4 qx): the accumulator's start value
  std::vector<float> msx;     // [M, nb * S]: dx * (sum of qx over the group, or over each half when S == 2)
};

VNNI_TARGET void quantize_rows(QAct& a, const float* x, int64_t M, int64_t nb, int S, bool offset) {
  const int64_t K = nb * 32;
  a.np = (nb + 1) / 2;
  a.ms = nb * S;
  a.qx.assign(M * a.np * 64, 0);
  a.xs.assign(M * a.np * 16, 0.f);
  a.base.assign(M * a.np * 16, 0);
  a.msx.assign(M * a.ms, 0.f);
  const __m512 sign = _mm512_set1_ps(-0.f);
  const __m512i c128 = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t r = 0; r < M; ++r) {
    for (int64_t g = 0; g < nb; ++g) {
      const float* xg = x + r * K + g * 32;
      const __m512 x0 = _mm512_loadu_ps(xg), x1 = _mm512_loadu_ps(xg + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, x0), _mm512_andnot_ps(sign, x1)));
      const float dx = amax / 127.f;
      const __m512 inv = _mm512_set1_ps(dx > 0.f ? 1.f / dx : 0.f);
      // rounds to nearest even (the default MXCSR mode); |x * inv| <= 127, so the int8 narrowing never saturates
      const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, inv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, inv));
      int8_t* dst = a.qx.data() + r * a.np * 64 + g * 32;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtepi32_epi8(q0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16), _mm512_cvtepi32_epi8(q1));
      const float s0 = static_cast<float>(_mm512_reduce_add_epi32(q0)), s1 = static_cast<float>(_mm512_reduce_add_epi32(q1));
      float* msx = a.msx.data() + r * a.ms + g * S;
      if (S == 2) { msx[0] = dx * s0; msx[1] = dx * s1; } else { msx[0] = dx * (s0 + s1); }
      float* xs = a.xs.data() + r * a.np * 16 + g * 8;
      for (int l = 0; l < 8; ++l) xs[l] = dx;
    }
    if (offset) {
      for (int64_t p = 0; p < a.np; ++p) {
        const __m512i qa = _mm512_loadu_si512(a.qx.data() + (r * a.np + p) * 64);
        const __m512i sum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c128, qa);     // 128 * (4 qx) per lane
        _mm512_storeu_si512(a.base.data() + (r * a.np + p) * 16, _mm512_sub_epi32(_mm512_setzero_si512(), sum));
      }
    }
  }
}

// One pair of groups (64 weights) of output row n times R activation rows, into acc[0..R).
template <bool Q4, int S, int R>
VNNI_TARGET inline __attribute__((always_inline)) void pair_dot(__m512* acc, const QAct& a, int64_t r0,
                                                                 const uint8_t* q, const float* d, int64_t g,
                                                                 int64_t p, bool tail) {
  // lane -> scale index: S == 1: two groups of 8 lanes; S == 2: four half-groups of 4 lanes
  const __m512i sidx = S == 1 ? _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1)
                              : _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  __m512i w;
  if (Q4) {
    // 16 bytes per group: element j in the low nibble of byte j, j + 16 in the high one
    const __m256i lo4 = _mm256_set1_epi8(0x0F);
    const __m256i b = _mm256_maskz_loadu_epi8(tail ? 0xFFFFu : 0xFFFFFFFFu, q + g * 16);
    const __m256i lo = _mm256_and_si256(b, lo4), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), lo4);
    // 128-bit chunks [g0 lo, g1 lo, g0 hi, g1 hi] -> [g0 lo, g0 hi, g1 lo, g1 hi]: element order
    w = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    w = _mm512_shuffle_i64x2(w, w, _MM_SHUFFLE(3, 1, 2, 0));
  } else {
    w = _mm512_maskz_loadu_epi8(tail ? 0xFFFFFFFFull : ~0ull, q + g * 32);
  }
  const __m512 dv = _mm512_permutexvar_ps(
      sidx, _mm512_maskz_loadu_ps(S == 1 ? (tail ? 1 : 3) : (tail ? 3 : 15), d + g * S));
  for (int r = 0; r < R; ++r) {
    const int64_t ap = (r0 + r) * a.np + p;
    const __m512i qa = _mm512_loadu_si512(a.qx.data() + ap * 64);
    const __m512i start = Q4 ? _mm512_setzero_si512() : _mm512_loadu_si512(a.base.data() + ap * 16);
    const __m512i dot = _mm512_dpbusd_epi32(start, w, qa);
    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dv, _mm512_loadu_ps(a.xs.data() + ap * 16)),
                             acc[r]);
  }
}

// out[r, n] for R rows and outputs n0..n1; accumulators stay in registers, one horizontal sum per output.
// NOTE: two accumulator sets (even / odd pairs): one chain's FMA latency would otherwise bound a batch-1 row.
template <bool Q4, int S, int R, bool HAS_M>
VNNI_TARGET void dot_rows(float* out, const QAct& a, int64_t r0, const uint8_t* q, const float* d, const float* m,
                          int64_t N, int64_t nb, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    __m512 acc[R], acc2[R];
    for (int r = 0; r < R; ++r) acc[r] = acc2[r] = _mm512_setzero_ps();
    const int64_t g0 = n * nb;
    int64_t p = 0;
    for (; p + 2 <= a.np; p += 2) {
      pair_dot<Q4, S, R>(acc, a, r0, q, d, g0 + 2 * p, p, 2 * p + 1 == nb);
      pair_dot<Q4, S, R>(acc2, a, r0, q, d, g0 + 2 * p + 2, p + 1, 2 * p + 3 == nb);
    }
    if (p < a.np) pair_dot<Q4, S, R>(acc, a, r0, q, d, g0 + 2 * p, p, 2 * p + 1 == nb);
    if (HAS_M) {   // + sum over groups of m * dx * sum(qx)
      const float* mr = m + n * a.ms;
      for (int64_t i = 0; i < a.ms; i += 16) {
        const __mmask16 k = a.ms - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (a.ms - i)) - 1);
        const __m512 mv = _mm512_maskz_loadu_ps(k, mr + i);
        for (int r = 0; r < R; ++r)
          acc2[r] = _mm512_fmadd_ps(mv, _mm512_maskz_loadu_ps(k, a.msx.data() + (r0 + r) * a.ms + i), acc2[r]);
      }
    }
    for (int r = 0; r < R; ++r) out[(r0 + r) * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r], acc2[r]));
  }
}

template <bool Q4, int S, bool HAS_M>
void dot_impl(float* out, const QAct& a, const uint8_t* q, const float* d, const float* m, int64_t M, int64_t N,
              int64_t nb) {
  at::parallel_for(0, N, 32, [&](int64_t n0, int64_t n1) {
    int64_t i = 0;
    for (; i + 4 <= M; i += 4) dot_rows<Q4, S, 4, HAS_M>(out, a, i, q, d, m, N, nb, n0, n1);
    for (; i + 2 <= M; i += 2) dot_rows<Q4, S, 2, HAS_M>(out, a, i, q, d, m, N, nb, n0, n1);
    for (; i < M; ++i) dot_rows<Q4, S, 1, HAS_M>(out, a, i, q, d, m, N, nb, n0, n1);
  });
}

template <bool Q4, int S>
void dot_dispatch_m(float* out, const QAct& a, const uint8_t* q, const float* d, const float* m, int64_t M,
                    int64_t N, int64_t nb, bool has_m) {
  if (has_m) dot_impl<Q4, S, true>(out, a, q, d, m, M, N, nb);
  else dot_impl<Q4, S, false>(out, a, q, d, m, M, N, nb);
}

}  // namespace

void quant_matmul_int8(torch::Tensor out, torch::Tensor x, torch::Tensor q, torch::Tensor d, torch::Tensor m,
                       bool q4, bool has_m) {
  TORCH_CHECK(cpu_has_int8_dot(), "quant_matmul_int8: this CPU has no AVX512-VNNI");
  TORCH_CHECK(x.is_contiguous() && q.is_contiguous() && d.is_contiguous() && m.is_contiguous() && out.is_contiguous());
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && d.scalar_type() == torch::kFloat32 &&
              m.scalar_type() == torch::kFloat32 && q.scalar_type() == torch::kUInt8);
  const int64_t M = x.size(0), N = q.size(0), nb = q.size(1);
  TORCH_CHECK(x.size(1) == nb * 32 && q.size(2) == (q4 ? 16 : 32), "quant_matmul_int8: K or layout mismatch");
  const int64_t S = d.size(1) / nb;
  TORCH_CHECK((S == 1 || S == 2) && d.size(1) == nb * S && m.sizes() == d.sizes() && d.size(0) == N,
              "quant_matmul_int8: d and m must be [N, K/32] or [N, K/16]");
  QAct a;
  quantize_rows(a, x.data_ptr<float>(), M, nb, static_cast<int>(S), !q4);
  float* o = out.data_ptr<float>();
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float *dp = d.data_ptr<float>(), *mp = m.data_ptr<float>();
  if (q4 && S == 1) dot_dispatch_m<true, 1>(o, a, qp, dp, mp, M, N, nb, has_m);
  else if (q4) dot_dispatch_m<true, 2>(o, a, qp, dp, mp, M, N, nb, has_m);
  else if (S == 1) dot_dispatch_m<false, 1>(o, a, qp, dp, mp, M, N, nb, has_m);
  else dot_dispatch_m<false, 2>(o, a, qp, dp, mp, M, N, nb, has_m);
}
