// Q5_0 and Q5_1 repacked in groups of 8 rows (types Q5_0X8 / Q5_1X8, lmserve/ops/gguf_x8.py repack_q5_0x8 /
// repack_q5_1x8): the int8 GEMM for every M on them (AVX2, and AVX512-VNNI chosen at run time, bit for bit the
// same), the scalar reference, the repack and rows back in file order. The design is gguf_q4_0x8.cpp's ("reduce,
// then scale"; gguf_x8.h). Gemma 3 Q4_K_M files keep most of their matrices in Q5_0. Q5_1 is Q5_0 plus a minimum
// per block (template flag MIN), as Q4_1 is Q4_0's.
//
// Layout (the same bytes as the 8 rows' Q5_0 blocks): per block b, 176 bytes: the 8 rows' fp16 scales d[c] (16),
// their 32-bit high-bit words qh[c] (32), then for t = 0..3 and c = 0..7 the 4 bytes qs_c[4t..4t+3] (128). A
// 32-byte load at t is 8 lanes, one per output column: low nibbles are values 4t..4t+3, high nibbles
// 16+4t..16+4t+3; their fifth bits are bits 4t.. and 16+4t.. of the lane's qh word.
//
// Per output (m, c), in block order: idot = sum_j q_j x_j - 16 sum_j x_j (exact int32; q_j = nibble | bit << 4 is
// the stored value + 16), acc = float(idot) * (d[c] * dx[m, b]) + acc. Every path performs exactly these
// operations per output. AVX2: a maddubs pair is <= 2 * 31 * 127, and 4 of them summed in int16 <= 31496 < 32767.
//
// Q5_1 (MIN): the 8 rows' fp16 minimums m[c] follow the scales (192 bytes per group block: qh at 32, quants at 64);
// values are unsigned (no offset), and after the FMA above acc = m[c] * (dx[m, b] * float(sum_j x_j)) + acc.
#include <cmath>
#include "gguf_blocks.h"
#include "gguf_x8.h"

namespace gguf {
namespace {
// per block: the file block's header bytes (d, and m for Q5_1), the group block's size, its qh and quants' offsets
template <bool MIN> constexpr int kHead = MIN ? 4 : 2;
template <bool MIN> constexpr int kBlock = kHead<MIN> + 20;                 // 22 / 24
template <bool MIN> constexpr int kGroupBlockBytes = 8 * kBlock<MIN>;       // 176 / 192
template <bool MIN> constexpr int kQh = 8 * kHead<MIN>;                     // 16 / 32
template <bool MIN> constexpr int kQs = kQh<MIN> + 32;                      // 48 / 64

template <bool MIN>
inline void gather_block(const uint8_t* w, int64_t ws, int64_t n, int64_t b, uint8_t* out) {
  const uint8_t* g = w + (n / 8) * 8 * ws + b * kGroupBlockBytes<MIN>;
  const int c = static_cast<int>(n % 8);
  std::memcpy(out, g + 2 * c, 2);
  if (MIN) std::memcpy(out + 2, g + 16 + 2 * c, 2);
  std::memcpy(out + kHead<MIN>, g + kQh<MIN> + 4 * c, 4);
  for (int t = 0; t < 4; ++t) std::memcpy(out + kHead<MIN> + 4 + 4 * t, g + kQs<MIN> + t * 32 + c * 4, 4);
}

template <bool MIN>
void pack(const uint8_t* src, int64_t ws, int64_t gr, int64_t nb, uint8_t* dst) {
  const uint8_t* rows = src + gr * 8 * ws;
  uint8_t* g = dst + gr * 8 * ws;
  for (int64_t b = 0; b < nb; ++b, g += kGroupBlockBytes<MIN>)
    for (int c = 0; c < 8; ++c) {
      const uint8_t* blk = rows + c * ws + b * kBlock<MIN>;
      std::memcpy(g + 2 * c, blk, 2);
      if (MIN) std::memcpy(g + 16 + 2 * c, blk + 2, 2);
      std::memcpy(g + kQh<MIN> + 4 * c, blk + kHead<MIN>, 4);
      for (int t = 0; t < 4; ++t) std::memcpy(g + kQs<MIN> + t * 32 + c * 4, blk + kHead<MIN> + 4 + 4 * t, 4);
    }
}

template <bool MIN>
void scalar(const DotArgs& p, int64_t n0, int64_t n1) {
  const int64_t nb = p.K / 32;
  uint8_t blk[24];
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < p.M; ++m) {
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        gather_block<MIN>(p.w, p.ws, n, b, blk);
        uint32_t qh;
        std::memcpy(&qh, blk + kHead<MIN>, 4);
        const uint8_t* qs = blk + kHead<MIN> + 4;
        const int8_t* qx = p.a->q.data() + m * p.K + b * 32;
        const int64_t gi = m * nb + b;
        int32_t idot = 0;
        for (int j = 0; j < 16; ++j) {
          idot += ((qs[j] & 15) | ((qh >> j) & 1) << 4) * qx[j];
          idot += ((qs[j] >> 4) | ((qh >> (16 + j)) & 1) << 4) * qx[16 + j];
        }
        if (!MIN) idot -= 16 * p.a->qsum[gi];
        acc = std::fma(static_cast<float>(idot), f16(blk) * p.a->dx[gi], acc);
        if (MIN) acc = std::fma(f16(blk + 2), p.a->dx[gi] * static_cast<float>(p.a->qsum[gi]), acc);
      }
      p.out[m * p.N + n] = acc;
    }
}
}  // namespace

void q5_0x8_pack(const uint8_t* src, int64_t ws, int64_t gr, int64_t nb, uint8_t* dst) {
  pack<false>(src, ws, gr, nb, dst);
}
void q5_1x8_pack(const uint8_t* src, int64_t ws, int64_t gr, int64_t nb, uint8_t* dst) {
  pack<true>(src, ws, gr, nb, dst);
}
void q5_0x8_rows(const uint8_t* w, int64_t ws, int64_t n, int64_t nb, float* out) {
  x8::file_rows<Q5_0>(gather_block<false>, w, ws, n, nb, out);
}
void q5_1x8_rows(const uint8_t* w, int64_t ws, int64_t n, int64_t nb, float* out) {
  x8::file_rows<Q5_1>(gather_block<true>, w, ws, n, nb, out);
}
void q5_0x8_scalar(const DotArgs& p, int64_t n0, int64_t n1) { scalar<false>(p, n0, n1); }
void q5_1x8_scalar(const DotArgs& p, int64_t n0, int64_t n1) { scalar<true>(p, n0, n1); }

}  // namespace gguf

#ifdef LMSERVE_GGUF_AVX2
#include <immintrin.h>

namespace gguf {
namespace {
using x8::load_i32;

// The fifth bits of chunk t: byte i of lane c tests bit 4t + i (lo) or 16 + 4t + i (hi) of qh[c]. A shuffle puts the
// qh byte holding those 4 bits in all 4 bytes of the lane (shuffles stay inside 128-bit halves: 4 lanes each), and
// each byte then tests its own bit. idx: [8] = lo t = 0..3, hi t = 0..3; bit: [2] = even t, odd t.
struct HighBits {
  __m256i idx[8], bit[2];
  HighBits() {
    const __m256i base = _mm256_setr_epi8(0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12,
                                          0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12);
    for (int h = 0; h < 2; ++h)
      for (int t = 0; t < 4; ++t)
        idx[h * 4 + t] = _mm256_add_epi8(base, _mm256_set1_epi8(static_cast<char>(2 * h + t / 2)));
    bit[0] = _mm256_set1_epi32(0x08040201);
    bit[1] = _mm256_set1_epi32(static_cast<int>(0x80402010u));
  }
  // 16 where the bit is set, else 0
  __m256i get(__m256i qh, int h, int t) const {
    const __m256i b = bit[t & 1];
    const __m256i r = _mm256_and_si256(_mm256_shuffle_epi8(qh, idx[h * 4 + t]), b);
    return _mm256_and_si256(_mm256_cmpeq_epi8(r, b), _mm256_set1_epi8(16));
  }
};

template <int RM, bool MIN, bool PF>
void tile_avx2(const DotArgs& p, int64_t m0, int64_t gr, int64_t n0, int64_t n1, const HighBits& hb) {
  const int64_t K = p.K, nb = K / 32;
  const uint8_t* g = p.w + gr * 8 * p.ws;
  const x8::Ahead<PF> ahead(p, g, 1);
  const __m256i lo_mask = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  __m256 acc[RM];
  for (int m = 0; m < RM; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = g + b * kGroupBlockBytes<MIN>;
    ahead.lines(b, kGroupBlockBytes<MIN>, 0, 8);
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + kQh<MIN>));
    __m256i slo[RM], shi[RM];   // 4 maddubs each: int16 stays exact (header)
    for (int m = 0; m < RM; ++m) slo[m] = shi[m] = _mm256_setzero_si256();
    #pragma GCC unroll 4
    for (int t = 0; t < 4; ++t) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + kQs<MIN> + t * 32));
      const __m256i lo = _mm256_or_si256(_mm256_and_si256(v, lo_mask), hb.get(qh, 0, t));
      const __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), lo_mask), hb.get(qh, 1, t));
      for (int m = 0; m < RM; ++m) {
        const int8_t* qx = p.a->q.data() + (m0 + m) * K + b * 32;
        slo[m] = _mm256_add_epi16(slo[m], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(load_i32(qx + 4 * t))));
        shi[m] = _mm256_add_epi16(shi[m], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(load_i32(qx + 16 + 4 * t))));
        x8::pin(slo[m]);
        x8::pin(shi[m]);
      }
    }
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
    for (int m = 0; m < RM; ++m) {
      const int64_t gi = (m0 + m) * nb + b;
      const __m256i s = _mm256_add_epi32(_mm256_madd_epi16(slo[m], ones), _mm256_madd_epi16(shi[m], ones));
      const __m256i idot = MIN ? s : _mm256_sub_epi32(s, _mm256_set1_epi32(16 * p.a->qsum[gi]));
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(idot), _mm256_mul_ps(d, _mm256_set1_ps(p.a->dx[gi])), acc[m]);
      if (MIN) {
        const __m256 mn = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 16)));
        acc[m] = _mm256_fmadd_ps(mn, _mm256_set1_ps(p.a->dx[gi] * static_cast<float>(p.a->qsum[gi])), acc[m]);
      }
    }
  }
  x8::store_tile<RM>(p, m0, gr, acc, n0, n1);
}

template <bool MIN>
struct Avx2Tile {
  static constexpr int kGroups = 1;
  using Ctx = HighBits;
  static void prepare(const DotArgs&, int64_t, int64_t, Ctx&) {}
  template <int RM, bool PF>
  static void run(const DotArgs& p, int64_t m, int64_t gr, int64_t, int64_t n0, int64_t n1, Ctx& hb) {
    tile_avx2<RM, MIN, PF>(p, m, gr, n0, n1, hb);
  }
};

}  // namespace

void q5_0x8_avx2(const DotArgs& p, int64_t n0, int64_t n1) { x8::blocked<Avx2Tile<false>>(p, n0, n1); }
void q5_1x8_avx2(const DotArgs& p, int64_t n0, int64_t n1) { x8::blocked<Avx2Tile<true>>(p, n0, n1); }

}  // namespace gguf

// ---- AVX512-VNNI: two groups (16 columns) per register; a fifth bit adds 16 under a byte mask -------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#include "gguf_x8_avx512.h"

namespace gguf {
namespace {

// HighBits on 4 128-bit quarters: the quarters hold lanes 0-3, 4-7 of group a, then of group b
struct HighBits512 {
  __m512i idx[8], bit[2];
  HighBits512() {
    const HighBits h;
    for (int i = 0; i < 8; ++i) idx[i] = _mm512_broadcast_i64x4(h.idx[i]);
    for (int i = 0; i < 2; ++i) bit[i] = _mm512_broadcast_i64x4(h.bit[i]);
  }
  __m512i add(__m512i q, __m512i qh, int h, int t) const {
    const __mmask64 k = _mm512_test_epi8_mask(_mm512_shuffle_epi8(qh, idx[h * 4 + t]), bit[t & 1]);
    return _mm512_mask_add_epi8(q, k, q, _mm512_set1_epi8(16));
  }
};

template <int RM, int NG, bool MIN, bool PF>
void tile_vnni(const DotArgs& p, int64_t m0, int64_t gr, int64_t n0, int64_t n1, const HighBits512& hb) {
  const int64_t K = p.K, nb = K / 32;
  const uint8_t* ga = p.w + gr * 8 * p.ws;
  const uint8_t* gb = NG == 2 ? ga + 8 * p.ws : ga;
  const x8::Ahead<PF> ahead(p, ga, NG);
  const __m512i lo_mask = _mm512_set1_epi8(15);
  __m512 acc[RM];
  for (int m = 0; m < RM; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* ba = ga + b * kGroupBlockBytes<MIN>;
    ahead.lines(b, kGroupBlockBytes<MIN>, 0, 8);
    const uint8_t* bb = gb + b * kGroupBlockBytes<MIN>;
    const __m512i qh = x8::load2<NG>(ba, bb, kQh<MIN>);
    __m512i s0[RM], s1[RM];
    for (int m = 0; m < RM; ++m) {
      s0[m] = MIN ? _mm512_setzero_si512() : _mm512_set1_epi32(-16 * p.a->qsum[(m0 + m) * nb + b]);
      s1[m] = _mm512_setzero_si512();
    }
    #pragma GCC unroll 4
    for (int t = 0; t < 4; ++t) {
      const __m512i v = x8::load2<NG>(ba, bb, kQs<MIN> + t * 32);
      const __m512i lo = hb.add(_mm512_and_si512(v, lo_mask), qh, 0, t);
      const __m512i hi = hb.add(_mm512_and_si512(_mm512_srli_epi16(v, 4), lo_mask), qh, 1, t);
      for (int m = 0; m < RM; ++m) {
        const int8_t* qx = p.a->q.data() + (m0 + m) * K + b * 32;
        s0[m] = _mm512_dpbusd_epi32(s0[m], lo, _mm512_set1_epi32(load_i32(qx + 4 * t)));
        s1[m] = _mm512_dpbusd_epi32(s1[m], hi, _mm512_set1_epi32(load_i32(qx + 16 + 4 * t)));
      }
    }
    const __m512 d = x8::scales2<NG>(ba, bb);
    for (int m = 0; m < RM; ++m) {
      const int64_t gi = (m0 + m) * nb + b;
      const __m512i idot = _mm512_add_epi32(s0[m], s1[m]);
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(idot), _mm512_mul_ps(d, _mm512_set1_ps(p.a->dx[gi])), acc[m]);
      if (MIN) acc[m] = _mm512_fmadd_ps(x8::scales2<NG>(ba + 16, bb + 16),
                                        _mm512_set1_ps(p.a->dx[gi] * static_cast<float>(p.a->qsum[gi])), acc[m]);
    }
  }
  x8::store_tile<RM, NG>(p, m0, gr, acc, n0, n1);
}

template <bool MIN>
struct VnniTile {
  static constexpr int kGroups = 2, kMaxRows = 8;
  using Ctx = HighBits512;
  static void prepare(const DotArgs&, int64_t, int64_t, Ctx&) {}
  template <int RM, bool PF>
  static void run(const DotArgs& p, int64_t m, int64_t gr, int64_t ng, int64_t n0, int64_t n1, Ctx& hb) {
    if (ng == 2) tile_vnni<RM, 2, MIN, PF>(p, m, gr, n0, n1, hb);
    else tile_vnni<RM, 1, MIN, PF>(p, m, gr, n0, n1, hb);
  }
};

}  // namespace

void q5_0x8_avx512vnni(const DotArgs& p, int64_t n0, int64_t n1) { x8::blocked<VnniTile<false>>(p, n0, n1); }
void q5_1x8_avx512vnni(const DotArgs& p, int64_t n0, int64_t n1) { x8::blocked<VnniTile<true>>(p, n0, n1); }

}  // namespace gguf

#pragma GCC pop_options
#endif  // LMSERVE_GGUF_AVX2
