// Fused elementwise ops: rms_norm, add_rms_norm, rms_norm_heads, rope_write_kv, silu_mul.
#include "ops.h"
#include "vec.h"

// ---- fused elementwise ops: one call instead of several small PyTorch ops per layer ------------------------
// Rounding follows the PyTorch reference op by op (-ffp-contract=off), except reductions, whose order differs.
// 1 / rms(x) with eps, the factor every rms-norm here scales by
static inline float rms_inv(const float* x, int64_t H, float eps) {
  float ss = 0.f;
  #pragma omp simd reduction(+:ss)
  for (int64_t j = 0; j < H; ++j) ss += x[j] * x[j];
  return 1.f / std::sqrt(ss / (float)H + eps);
}

static inline void rms_row(float* __restrict o, const float* __restrict x, const float* __restrict w, int64_t H,
                           float eps) {
  const float r = rms_inv(x, H, eps);
  #pragma omp simd
  for (int64_t j = 0; j < H; ++j) o[j] = (x[j] * r) * w[j];
}

// out = rms_norm(x) * w; x, out: [T, H]
void rms_norm(at::Tensor out, at::Tensor x, at::Tensor w, double eps) {
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous() && w.is_contiguous() && x.scalar_type() == at::kFloat);
  const int64_t T = x.size(0), H = x.size(1);
  float* op = out.data_ptr<float>(); const float* xp = x.data_ptr<float>(); const float* wp = w.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) rms_row(op + t * H, xp + t * H, wp, H, (float)eps);
  });
}

// residual += x; x = rms_norm(residual) * w  (both in place)
void add_rms_norm(at::Tensor x, at::Tensor residual, at::Tensor w, double eps) {
  TORCH_CHECK(x.is_contiguous() && residual.is_contiguous() && w.is_contiguous() && x.scalar_type() == at::kFloat);
  const int64_t T = x.size(0), H = x.size(1);
  float* xp = x.data_ptr<float>(); float* rp = residual.data_ptr<float>(); const float* wp = w.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      float* __restrict r = rp + t * H; const float* __restrict xi = xp + t * H;
      #pragma omp simd
      for (int64_t j = 0; j < H; ++j) r[j] = xi[j] + r[j];
      rms_row(xp + t * H, r, wp, H, (float)eps);
    }
  });
}

// in place on qkv [T, (nh + 2 * nkv) * hd]: each q head rms-normed with q_w [hd], each k head with k_w (Qwen3,
// Gemma 3); v untouched. The same arithmetic as rms_row, in one call instead of slicing, copying and writing back.
void rms_norm_heads(at::Tensor qkv, at::Tensor q_w, at::Tensor k_w, int64_t nh, int64_t nkv, int64_t hd,
                    double eps) {
  TORCH_CHECK(qkv.is_contiguous() && q_w.is_contiguous() && k_w.is_contiguous() &&
              qkv.scalar_type() == at::kFloat && q_w.numel() == hd && k_w.numel() == hd);
  const int64_t T = qkv.size(0), W = qkv.size(1);
  TORCH_CHECK(W == (nh + 2 * nkv) * hd, "rms_norm_heads: qkv width mismatch");
  float* p = qkv.data_ptr<float>(); const float* qw = q_w.data_ptr<float>(); const float* kw = k_w.data_ptr<float>();
  const float e = (float)eps;
  at::parallel_for(0, T, 16, [&](int64_t b, int64_t end) {
    for (int64_t t = b; t < end; ++t)
      for (int64_t h = 0; h < nh + nkv; ++h) {
        float* x = p + t * W + h * hd;
        const float* w = h < nh ? qw : kw;
        const float r = rms_inv(x, hd, e);
        #pragma omp simd
        for (int64_t j = 0; j < hd; ++j) x[j] = (x[j] * r) * w[j];
      }
  });
}

// The first 2 * half of a head's hd values rotated, the rest (partial rotary: Phi-4-mini rotates 96 of 128) copied
template <typename T>
static inline void rotate_half(T* __restrict dst, const float* __restrict src, const float* __restrict c,
                               const float* __restrict s, int64_t half, int64_t hd) {
  #pragma omp simd
  for (int64_t j = 0; j < half; ++j) {
    const float x1 = src[j], x2 = src[j + half];
    dst[j] = T(x1 * c[j] - x2 * s[j]);
    dst[j + half] = T(x2 * c[j] + x1 * s[j]);
  }
  for (int64_t j = 2 * half; j < hd; ++j) dst[j] = T(src[j]);
}

// qkv: [T, (nh + 2 * nkv) * hd]; cos, sin: [T, rot / 2], rot <= hd. Writes RoPE(q) to q_out [T, nh, hd], RoPE(k)
// and v to the cache slots given by slot_mapping [T] (caches [num_slots, nkv, hd]).
template <typename KV>
static void rope_write_kv_impl(at::Tensor q_out, at::Tensor qkv, at::Tensor cos, at::Tensor sin,
                               at::Tensor k_cache, at::Tensor v_cache, at::Tensor slot_mapping,
                               int64_t nh, int64_t nkv, int64_t hd) {
  TORCH_CHECK(qkv.is_contiguous() && q_out.is_contiguous() && cos.is_contiguous() && sin.is_contiguous());
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && qkv.scalar_type() == at::kFloat);
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong);
  const int64_t T = qkv.size(0), W = qkv.size(1), half = cos.size(-1);
  TORCH_CHECK(W == (nh + 2 * nkv) * hd, "rope_write_kv: qkv width mismatch");
  TORCH_CHECK(2 * half <= hd && cos.numel() == T * half && sin.numel() == T * half, "rope_write_kv: table shape");
  const float* qp = qkv.data_ptr<float>(); const float* cp = cos.data_ptr<float>(); const float* sp = sin.data_ptr<float>();
  float* qo = q_out.data_ptr<float>(); KV* kc = k_cache.data_ptr<KV>(); KV* vc = v_cache.data_ptr<KV>();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  at::parallel_for(0, T, 8, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const float* row = qp + t * W; const float* c = cp + t * half; const float* s = sp + t * half;
      for (int64_t h = 0; h < nh; ++h) rotate_half<float>(qo + (t * nh + h) * hd, row + h * hd, c, s, half, hd);
      const int64_t slot = slots[t];
      for (int64_t h = 0; h < nkv; ++h)
        rotate_half<KV>(kc + (slot * nkv + h) * hd, row + (nh + h) * hd, c, s, half, hd);
      KV* vdst = vc + slot * nkv * hd;
      for (int64_t j = 0; j < nkv * hd; ++j) vdst[j] = KV(row[(nh + nkv) * hd + j]);
    }
  });
}

void rope_write_kv(at::Tensor q_out, at::Tensor qkv, at::Tensor cos, at::Tensor sin,
                   at::Tensor k_cache, at::Tensor v_cache, at::Tensor slot_mapping,
                   int64_t nh, int64_t nkv, int64_t hd) {
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type());
  if (k_cache.scalar_type() == at::kBFloat16)
    rope_write_kv_impl<c10::BFloat16>(q_out, qkv, cos, sin, k_cache, v_cache, slot_mapping, nh, nkv, hd);
  else {
    TORCH_CHECK(k_cache.scalar_type() == at::kFloat, "rope_write_kv: cache must be float32 or bfloat16");
    rope_write_kv_impl<float>(q_out, qkv, cos, sin, k_cache, v_cache, slot_mapping, nh, nkv, hd);
  }
}

// out [T, I] = silu(gate_up[:, :I]) * gate_up[:, I:]
void silu_mul(at::Tensor out, at::Tensor gate_up) {
  TORCH_CHECK(out.is_contiguous() && gate_up.is_contiguous() && gate_up.scalar_type() == at::kFloat);
  const int64_t T = out.size(0), I = out.size(1);
  float* op = out.data_ptr<float>(); const float* gp = gate_up.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const float* __restrict g = gp + t * 2 * I; const float* __restrict u = g + I; float* __restrict o = op + t * I;
      int64_t j = 0;
#ifdef LMSERVE_AVX2
      const __m256 one = _mm256_set1_ps(1.f);
      for (; j + 8 <= I; j += 8) {
        const __m256 x = _mm256_loadu_ps(g + j);
        const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), x));
        _mm256_storeu_ps(o + j, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + j)));
      }
#endif
      for (; j < I; ++j) o[j] = (g[j] / (1.f + std::exp(-g[j]))) * u[j];
    }
  });
}
