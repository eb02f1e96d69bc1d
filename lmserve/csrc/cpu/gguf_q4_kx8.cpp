// Q4_K and Q5_K repacked in groups of 8 rows (types Q4_KX8, Q5_KX8; lmserve/ops/gguf_x8.py repack_q4_kx8,
// repack_q5_kx8): the int8 GEMM for every M on them (AVX2, and AVX512-VNNI chosen at run time, bit for bit the
// same), the scalar reference, and rows back in file order. The design is gguf_q4_0x8.cpp's ("reduce, then
// scale"; gguf_x8.h). Q5_K is Q4_K with a fifth bit per value, so one template serves both.
//
// Layout (the 8 rows' super-blocks, the same bytes in another order): per super-block b, 1152 bytes: the 8
// rows' d (fp16, 16 bytes), their dmin (16 bytes), their 12 packed scale bytes as 3 words x 8 rows (96: word k
// of each row, so one 8-lane load holds it for every row and the 6-bit fields decode in lanes), then for sub-block pair
// j = 0..3 and t = 0..7, each row's 4 quant bytes 32j+4t..32j+4t+3 (32 bytes: low nibbles are values 4t..4t+3 of
// sub-block 2j, high nibbles those of sub-block 2j+1). Q5_K adds 256 bytes (1408 = 8 x 176): per sub-block s = 0..7
// each row's 4 bytes, bit t of byte k the fifth bit of value 4t+k of sub-block s, so one shift and one AND put
// chunk t's fifth bits of all 8 rows at bit 4 of its bytes.
//
// Per output (m, c), for each 32-value sub-block g in order (activation scale dx[g], sx[g] = dx[g] * sum qx):
//   idot = sum q x (exact int32; q 0..15, Q5_K 0..31), acc = float(idot) * (scale[c] * dx[g]) + acc,
//   acc = min[c] * sx[g] + acc
// with scale = d * sc and min = -(dmin * mn) as the reference dequantizer rounds them; every path performs exactly
// these operations. AVX2: 8 maddubs (<= 2 * 15 * 127 each) summed in int16 stay <= 30480; Q5_K's (<= 2 * 31 * 127)
// are widened to int32 every 4 (<= 31496).
#include <cmath>
#include <vector>
#include "gguf_blocks.h"
#include "gguf_x8.h"
#ifdef LMSERVE_GGUF_AVX2
#include <immintrin.h>
#endif

namespace gguf {
namespace {
template <int QT>
constexpr bool kQ5 = QT == Q5_K;
template <int QT>
constexpr int kGroupBlockBytes = 8 * kBlockBytes[QT];   // 1152 (Q4_K), 1408 (Q5_K)
constexpr int kQs = 128, kQh = 1152;                     // offsets in a group's super-block
template <int QT>
constexpr int kFileQs = kQ5<QT> ? 48 : 16;               // offset of qs in a file block (Q5_K: after its 32 qh)

// super-block b of row n of a repacked matrix -> its file bytes
template <int QT>
inline void gather_block(const uint8_t* w, int64_t ws, int64_t n, int64_t b, uint8_t* out) {
  const uint8_t* g = w + (n / 8) * 8 * ws + b * kGroupBlockBytes<QT>;
  const int c = static_cast<int>(n % 8);
  std::memcpy(out, g + 2 * c, 2);
  std::memcpy(out + 2, g + 16 + 2 * c, 2);
  for (int k = 0; k < 3; ++k) std::memcpy(out + 4 + 4 * k, g + 32 + 32 * k + 4 * c, 4);
  for (int i = 0; i < 32; ++i) std::memcpy(out + kFileQs<QT> + 4 * i, g + kQs + i * 32 + c * 4, 4);
  if constexpr (kQ5<QT>) {   // file qh byte l: bit s = the fifth bit of value l of sub-block s
    std::memset(out + 16, 0, 32);
    for (int s = 0; s < 8; ++s)
      for (int l = 0; l < 32; ++l)
        out[16 + l] |= static_cast<uint8_t>(((g[kQh + s * 32 + c * 4 + l % 4] >> (l / 4)) & 1) << s);
  }
}

template <int QT>
void pack(const uint8_t* src, int64_t ws, int64_t gr, int64_t nb, uint8_t* dst) {
  const uint8_t* rows = src + gr * 8 * ws;
  uint8_t* g = dst + gr * 8 * ws;
  for (int64_t b = 0; b < nb; ++b, g += kGroupBlockBytes<QT>)
    for (int c = 0; c < 8; ++c) {
      const uint8_t* blk = rows + c * ws + b * kBlockBytes[QT];
      std::memcpy(g + 2 * c, blk, 2);
      std::memcpy(g + 16 + 2 * c, blk + 2, 2);
      for (int k = 0; k < 3; ++k) std::memcpy(g + 32 + 32 * k + 4 * c, blk + 4 + 4 * k, 4);
      for (int i = 0; i < 32; ++i) std::memcpy(g + kQs + i * 32 + c * 4, blk + kFileQs<QT> + 4 * i, 4);
      if constexpr (kQ5<QT>) {
        for (int s = 0; s < 8; ++s)
          for (int k = 0; k < 4; ++k) {
            uint8_t v = 0;
            for (int t = 0; t < 8; ++t) v |= static_cast<uint8_t>(((blk[16 + 4 * t + k] >> s) & 1) << t);
            g[kQh + s * 32 + c * 4 + k] = v;
          }
      }
    }
}

// one group's super-block: each sub-block's scale and min per column (lanes), as the reference rounds them
struct Scales {
  alignas(32) float sc[8][8];   // [sub-block][column]
  alignas(32) float mn[8][8];
};

inline void decode_scales(const uint8_t* g, Scales& o) {
#ifdef LMSERVE_GGUF_AVX2
  // the 6-bit fields of scale_min_k4, 8 rows at once: words w0 (bytes 0-3), w1 (4-7), w2 (8-11) of each row
  const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g + 32));
  const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g + 64));
  const __m256i w2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g + 96));
  const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g)));
  const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g + 16)));
  const __m256i m6 = _mm256_set1_epi32(63), m4 = _mm256_set1_epi32(15), m2 = _mm256_set1_epi32(3);
  const __m256 neg = _mm256_set1_ps(-0.f);
  for (int i = 0; i < 4; ++i) {
    const __m128i sh = _mm_cvtsi32_si128(8 * i), sh6 = _mm_cvtsi32_si128(8 * i + 6), sh4 = _mm_cvtsi32_si128(8 * i + 4);
    const __m256i sc_lo = _mm256_and_si256(_mm256_srl_epi32(w0, sh), m6);        // sub-block i
    const __m256i mn_lo = _mm256_and_si256(_mm256_srl_epi32(w1, sh), m6);
    const __m256i sc_hi = _mm256_or_si256(_mm256_and_si256(_mm256_srl_epi32(w2, sh), m4),     // sub-block i + 4
                                          _mm256_slli_epi32(_mm256_and_si256(_mm256_srl_epi32(w0, sh6), m2), 4));
    const __m256i mn_hi = _mm256_or_si256(_mm256_and_si256(_mm256_srl_epi32(w2, sh4), m4),
                                          _mm256_slli_epi32(_mm256_and_si256(_mm256_srl_epi32(w1, sh6), m2), 4));
    _mm256_store_ps(o.sc[i], _mm256_mul_ps(d, _mm256_cvtepi32_ps(sc_lo)));
    _mm256_store_ps(o.sc[i + 4], _mm256_mul_ps(d, _mm256_cvtepi32_ps(sc_hi)));
    _mm256_store_ps(o.mn[i], _mm256_xor_ps(neg, _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(mn_lo))));
    _mm256_store_ps(o.mn[i + 4], _mm256_xor_ps(neg, _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(mn_hi))));
  }
#else
  for (int c = 0; c < 8; ++c) {
    uint8_t s12[12];
    for (int k = 0; k < 3; ++k) std::memcpy(s12 + 4 * k, g + 32 + 32 * k + 4 * c, 4);
    const float d = f16(g + 2 * c), dmin = f16(g + 16 + 2 * c);
    for (int s = 0; s < 8; ++s) {
      int sc, mn;
      scale_min_k4(s12, s, sc, mn);
      o.sc[s][c] = d * static_cast<float>(sc);
      o.mn[s][c] = -(dmin * static_cast<float>(mn));
    }
  }
#endif
}

// GEMMs: the scales of every super-block of groups gr.. gr + ng - 1, decoded once per column chunk (gguf_x8.h
// blocked) for all its row tiles. Decode batches decode them in the tile, as each super-block streams in: a
// separate pass over the chunk's headers (128 of every 1152 bytes) measured ~25% slower from DRAM.
struct ScaleCtx {
  std::vector<Scales> s;   // [group][super-block]; empty: the tile decodes them
  int64_t nb = 0;
};
constexpr int64_t kPrepareRows = 16;

template <int QT>
inline void prepare_scales(const DotArgs& p, int64_t gr, int64_t ng, ScaleCtx& ctx) {
  ctx.nb = p.K / 256;
  if (p.M < kPrepareRows) {
    ctx.s.clear();
    return;
  }
  ctx.s.resize(ng * ctx.nb);
  for (int64_t i = 0; i < ng; ++i)
    for (int64_t b = 0; b < ctx.nb; ++b)
      decode_scales(p.w + (gr + i) * 8 * p.ws + b * kGroupBlockBytes<QT>, ctx.s[i * ctx.nb + b]);
}

template <int QT>
void scalar(const DotArgs& p, int64_t n0, int64_t n1) {
  const int64_t nb = p.K / 256, ng = p.K / 32;
  uint8_t blk[kBlockBytes[QT]];
  Scales sc;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < p.M; ++m) {
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        gather_block<QT>(p.w, p.ws, n, b, blk);
        decode_scales(p.w + (n / 8) * 8 * p.ws + b * kGroupBlockBytes<QT>, sc);
        for (int s = 0; s < 8; ++s) {
          const int64_t g = m * ng + b * 8 + s;
          const int8_t* qx = p.a->q.data() + g * 32;
          int32_t idot = 0;
          for (int l = 0; l < 32; ++l) {
            int v = (blk[kFileQs<QT> + 32 * (s / 2) + l] >> (4 * (s & 1))) & 15;
            if constexpr (kQ5<QT>) v |= ((blk[16 + l] >> s) & 1) << 4;
            idot += v * qx[l];
          }
          acc = std::fma(static_cast<float>(idot), sc.sc[s][n % 8] * p.a->dx[g], acc);
          acc = std::fma(sc.mn[s][n % 8], p.a->sx[g], acc);
        }
      }
      p.out[m * p.N + n] = acc;
    }
}
}  // namespace

void q4_kx8_pack(const uint8_t* src, int64_t ws, int64_t gr, int64_t nb, uint8_t* dst) { pack<Q4_K>(src, ws, gr, nb, dst); }
void q5_kx8_pack(const uint8_t* src, int64_t ws, int64_t gr, int64_t nb, uint8_t* dst) { pack<Q5_K>(src, ws, gr, nb, dst); }
void q4_kx8_rows(const uint8_t* w, int64_t ws, int64_t n, int64_t nb, float* out) {
  x8::file_rows<Q4_K>(gather_block<Q4_K>, w, ws, n, nb, out);
}
void q5_kx8_rows(const uint8_t* w, int64_t ws, int64_t n, int64_t nb, float* out) {
  x8::file_rows<Q5_K>(gather_block<Q5_K>, w, ws, n, nb, out);
}
void q4_kx8_scalar(const DotArgs& p, int64_t n0, int64_t n1) { scalar<Q4_K>(p, n0, n1); }
void q5_kx8_scalar(const DotArgs& p, int64_t n0, int64_t n1) { scalar<Q5_K>(p, n0, n1); }

}  // namespace gguf

#ifdef LMSERVE_GGUF_AVX2
#include <immintrin.h>

namespace gguf {
namespace {
using x8::load_i32;

// bit t of each byte of h moved to bit 4 (the fifth bits of chunk t; t is a constant once the loop is unrolled)
inline __m256i fifth_bits(__m256i h, int t, __m256i bit4) {
  return _mm256_and_si256(t <= 4 ? _mm256_slli_epi16(h, 4 - t) : _mm256_srli_epi16(h, t - 4), bit4);
}

template <int QT, int RM, bool PF>
void tile_avx2(const DotArgs& p, int64_t m0, int64_t gr, int64_t n0, int64_t n1, const ScaleCtx& ctx) {
  const int64_t K = p.K, nb = ctx.nb, ng = K / 32;
  const uint8_t* g = p.w + gr * 8 * p.ws;
  const x8::Ahead<PF> ahead(p, g, 1);
  const __m256i lo_mask = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1), bit4 = _mm256_set1_epi8(16);
  __m256 acc[RM];
  for (int m = 0; m < RM; ++m) acc[m] = _mm256_setzero_ps();
  Scales own;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = g + b * kGroupBlockBytes<QT>;
    if (ctx.s.empty()) decode_scales(blk, own);
    const Scales& sc = ctx.s.empty() ? own : ctx.s[b];
    for (int j = 0; j < 4; ++j) {
      __m256i s0[RM], s1[RM], w0[RM], w1[RM];   // int16 partial sums; Q5_K: int32 of the first 4 chunks
      for (int m = 0; m < RM; ++m) s0[m] = s1[m] = w0[m] = w1[m] = _mm256_setzero_si256();
      __m256i h0 = _mm256_setzero_si256(), h1 = h0;
      if constexpr (kQ5<QT>) {
        h0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + kQh + 64 * j));
        h1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + kQh + 64 * j + 32));
      }
      #pragma GCC unroll 8
      for (int t = 0; t < 8; ++t) {
        ahead.lines(b, kGroupBlockBytes<QT>, j * 8 + t, 1);
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + kQs + (j * 8 + t) * 32));
        __m256i lo = _mm256_and_si256(v, lo_mask), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), lo_mask);
        if constexpr (kQ5<QT>) {
          lo = _mm256_or_si256(lo, fifth_bits(h0, t, bit4));
          hi = _mm256_or_si256(hi, fifth_bits(h1, t, bit4));
        }
        for (int m = 0; m < RM; ++m) {
          const int8_t* qx = p.a->q.data() + (m0 + m) * K + b * 256 + 64 * j;
          s0[m] = _mm256_add_epi16(s0[m], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(load_i32(qx + 4 * t))));
          s1[m] = _mm256_add_epi16(s1[m], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(load_i32(qx + 32 + 4 * t))));
          x8::pin(s0[m]);
          x8::pin(s1[m]);
        }
        if (kQ5<QT> && t == 3) {
          for (int m = 0; m < RM; ++m) {
            w0[m] = _mm256_madd_epi16(s0[m], ones);
            w1[m] = _mm256_madd_epi16(s1[m], ones);
            s0[m] = s1[m] = _mm256_setzero_si256();
          }
        }
      }
      for (int h = 0; h < 2; ++h) {
        const int s = 2 * j + h;
        const __m256 scv = _mm256_load_ps(sc.sc[s]), mnv = _mm256_load_ps(sc.mn[s]);
        for (int m = 0; m < RM; ++m) {
          const int64_t gi = (m0 + m) * ng + b * 8 + s;
          __m256i idot = _mm256_madd_epi16(h ? s1[m] : s0[m], ones);
          if constexpr (kQ5<QT>) idot = _mm256_add_epi32(idot, h ? w1[m] : w0[m]);
          acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(idot), _mm256_mul_ps(scv, _mm256_set1_ps(p.a->dx[gi])), acc[m]);
          acc[m] = _mm256_fmadd_ps(mnv, _mm256_set1_ps(p.a->sx[gi]), acc[m]);
        }
      }
    }
  }
  x8::store_tile<RM>(p, m0, gr, acc, n0, n1);
}

template <int QT>
struct Avx2Tile {
  static constexpr int kGroups = 1;
  using Ctx = ScaleCtx;
  static void prepare(const DotArgs& p, int64_t gr, int64_t ng, Ctx& ctx) { prepare_scales<QT>(p, gr, ng, ctx); }
  template <int RM, bool PF>
  static void run(const DotArgs& p, int64_t m, int64_t gr, int64_t, int64_t n0, int64_t n1, Ctx& ctx) {
    tile_avx2<QT, RM, PF>(p, m, gr, n0, n1, ctx);
  }
};

}  // namespace

void q4_kx8_avx2(const DotArgs& p, int64_t n0, int64_t n1) { x8::blocked<Avx2Tile<Q4_K>>(p, n0, n1); }
void q5_kx8_avx2(const DotArgs& p, int64_t n0, int64_t n1) { x8::blocked<Avx2Tile<Q5_K>>(p, n0, n1); }
void q4_kx8_scales(const uint8_t* g, float (*sc)[8], float (*mn)[8]) {
  Scales s;
  decode_scales(g, s);
  std::memcpy(sc, s.sc, sizeof(s.sc));
  std::memcpy(mn, s.mn, sizeof(s.mn));
}

}  // namespace gguf

// ---- AVX512-VNNI: two groups (16 columns) per register, vpdpbusd in place of maddubs + add + madd -----------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#include "gguf_x8_avx512.h"

namespace gguf {
namespace {

inline __m512 two(const float* a, const float* b) {
  return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_load_ps(a)), _mm256_load_ps(b), 1);
}

inline __m512i fifth_bits(__m512i h, int t, __m512i bit4) {
  return _mm512_and_si512(t <= 4 ? _mm512_slli_epi16(h, 4 - t) : _mm512_srli_epi16(h, t - 4), bit4);
}

template <int QT, int RM, int NG, bool PF>
void tile_vnni(const DotArgs& p, int64_t m0, int64_t gr, int64_t n0, int64_t n1, const ScaleCtx& ctx) {
  const int64_t K = p.K, nb = ctx.nb, ng = K / 32;
  const uint8_t* ga = p.w + gr * 8 * p.ws;
  const uint8_t* gb = NG == 2 ? ga + 8 * p.ws : ga;
  const __m512i lo_mask = _mm512_set1_epi8(15), bit4 = _mm512_set1_epi8(16);
  __m512 acc[RM];
  for (int m = 0; m < RM; ++m) acc[m] = _mm512_setzero_ps();
  Scales own[NG];
  const x8::Ahead<PF> ahead(p, ga, NG);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* ba = ga + b * kGroupBlockBytes<QT>;
    const uint8_t* bb = gb + b * kGroupBlockBytes<QT>;
    if (ctx.s.empty()) {
      decode_scales(ba, own[0]);
      if (NG == 2) decode_scales(bb, own[NG - 1]);
    }
    const Scales& sa = ctx.s.empty() ? own[0] : ctx.s[b];
    const Scales& sb = ctx.s.empty() ? own[NG - 1] : ctx.s[(NG - 1) * nb + b];
    for (int j = 0; j < 4; ++j) {
      // up to 4 rows: four integer chains per row (even / odd t for each sub-block), added at the end: exact, and a
      // decode row's dots do not wait on one another; 8 rows have 16 chains with one per sub-block, and the
      // registers to amortize each weight load and unpack over twice the rows
      constexpr int C = RM >= 8 ? 1 : 2;
      __m512i s0[C][RM], s1[C][RM];
      for (int i = 0; i < C; ++i)
        for (int m = 0; m < RM; ++m) s0[i][m] = s1[i][m] = _mm512_setzero_si512();
      __m512i h0 = _mm512_setzero_si512(), h1 = h0;
      if constexpr (kQ5<QT>) {
        h0 = x8::load2<NG>(ba, bb, kQh + 64 * j);
        h1 = x8::load2<NG>(ba, bb, kQh + 64 * j + 32);
      }
      #pragma GCC unroll 8
      for (int t = 0; t < 8; ++t) {
        ahead.lines(b, kGroupBlockBytes<QT>, j * 8 + t, 1);
        const __m512i v = x8::load2<NG>(ba, bb, kQs + (j * 8 + t) * 32);
        __m512i lo = _mm512_and_si512(v, lo_mask), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), lo_mask);
        if constexpr (kQ5<QT>) {
          lo = _mm512_or_si512(lo, fifth_bits(h0, t, bit4));
          hi = _mm512_or_si512(hi, fifth_bits(h1, t, bit4));
        }
        for (int m = 0; m < RM; ++m) {
          const int8_t* qx = p.a->q.data() + (m0 + m) * K + b * 256 + 64 * j;
          s0[t % C][m] = _mm512_dpbusd_epi32(s0[t % C][m], lo, _mm512_set1_epi32(load_i32(qx + 4 * t)));
          s1[t % C][m] = _mm512_dpbusd_epi32(s1[t % C][m], hi, _mm512_set1_epi32(load_i32(qx + 32 + 4 * t)));
        }
      }
      if constexpr (C == 2)
        for (int m = 0; m < RM; ++m) {
          s0[0][m] = _mm512_add_epi32(s0[0][m], s0[1][m]);
          s1[0][m] = _mm512_add_epi32(s1[0][m], s1[1][m]);
        }
      for (int h = 0; h < 2; ++h) {
        const int s = 2 * j + h;
        const __m512 scv = two(sa.sc[s], sb.sc[s]), mnv = two(sa.mn[s], sb.mn[s]);
        for (int m = 0; m < RM; ++m) {
          const int64_t gi = (m0 + m) * ng + b * 8 + s;
          acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(h ? s1[0][m] : s0[0][m]),
                                   _mm512_mul_ps(scv, _mm512_set1_ps(p.a->dx[gi])), acc[m]);
          acc[m] = _mm512_fmadd_ps(mnv, _mm512_set1_ps(p.a->sx[gi]), acc[m]);
        }
      }
    }
  }
  x8::store_tile<RM, NG>(p, m0, gr, acc, n0, n1);
}

template <int QT>
struct VnniTile {
  static constexpr int kGroups = 2, kMaxRows = 8;
  using Ctx = ScaleCtx;
  static void prepare(const DotArgs& p, int64_t gr, int64_t ng, Ctx& ctx) { prepare_scales<QT>(p, gr, ng, ctx); }
  template <int RM, bool PF>
  static void run(const DotArgs& p, int64_t m, int64_t gr, int64_t ng, int64_t n0, int64_t n1, Ctx& ctx) {
    if (ng == 2) tile_vnni<QT, RM, 2, PF>(p, m, gr, n0, n1, ctx);
    else tile_vnni<QT, RM, 1, PF>(p, m, gr, n0, n1, ctx);
  }
};

}  // namespace

void q4_kx8_avx512vnni(const DotArgs& p, int64_t n0, int64_t n1) { x8::blocked<VnniTile<Q4_K>>(p, n0, n1); }
void q5_kx8_avx512vnni(const DotArgs& p, int64_t n0, int64_t n1) { x8::blocked<VnniTile<Q5_K>>(p, n0, n1); }

}  // namespace gguf

#pragma GCC pop_options
#endif  // LMSERVE_GGUF_AVX2
