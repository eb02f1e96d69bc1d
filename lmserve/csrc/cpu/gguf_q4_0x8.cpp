// Q4_0 and Q4_1 repacked in groups of 8 rows (types Q4_0X8 / Q4_1X8, lmserve/ops/gguf_x8.py repack_q4_0x8 /
// repack_q4_1x8): the int8 GEMM for every M on them (AVX2, and AVX512-VNNI chosen at run time, bit for bit the
// same), the scalar reference, and rows back in file order (embedding lookups). Q4_1 is Q4_0 plus a minimum per
// block (template flag MIN).
//
// Layout (the same bytes as the 8 rows' Q4_0 blocks, so the same size): rows 8r..8r+7 hold, for each block b in
// order, 144 bytes: the 8 rows' fp16 scales d[c], then for t = 0..3 and c = 0..7 the 4 bytes qs_c[4t..4t+3]. A
// 32-byte load at t is 8 lanes, one per output column: its low nibbles are values 4t..4t+3 of each column's block,
// its high nibbles values 16+4t..16+4t+3 (llama.cpp's repack.cpp interleaves Q4_0 for the same reason; this is
// not its layout or code).
//
// Why: the row-major kernels (gguf_gemm_avx2.cpp) reduce a 32-value dot to 8 lanes of partial sums and pay a
// convert, a multiply and an FMA per 8 values. Here a lane is a column, so the integer dot of a whole block ends in
// one lane and the float work is one convert + multiply + FMA per block and column ("reduce, then scale").
//
// Per output (m, c), in block order b = 0, 1, ...: idot = sum_j q_j x_j - 8 sum_j x_j (exact int32; the stored
// q_j = value + 8), acc = float(idot) * (d[c] * dx[m, b]) + acc (one FMA, a single accumulator). Every path (any
// M, any tile, AVX2 or AVX512-VNNI) performs exactly these operations per output, so results are batch- and
// CPU-kind-invariant. AVX2: maddubs pairs are <= 2 * 15 * 127, and 8 of them summed in int16 <= 30480 < 32767.
//
// Q4_1 (MIN): the 8 rows' fp16 minimums m[c] follow the scales (a group block is 160 bytes, the quants start at
// 32); values are q_j unsigned, so idot = sum_j q_j x_j with no offset, and after the FMA above
// acc = m[c] * (dx[m, b] * float(sum_j x_j)) + acc (one more FMA).
#include "gguf_kernels.h"

#include <cmath>
#include "gguf_blocks.h"
#include "gguf_x8.h"

namespace gguf {
namespace {
// per block: the file block's header bytes (d, and m for Q4_1), the group block's bytes, its quants' offset
template <bool MIN> constexpr int kHead = MIN ? 4 : 2;
template <bool MIN> constexpr int kGroupBlockBytes = 8 * (kHead<MIN> + 16);   // 144 / 160
template <bool MIN> constexpr int kQs = 8 * kHead<MIN>;                        // 16 / 32

// block b of row n of a repacked matrix -> its file bytes
template <bool MIN>
inline void gather_block(const uint8_t* w, int64_t ws, int64_t n, int64_t b, uint8_t* out) {
  const uint8_t* g = w + (n / 8) * 8 * ws + b * kGroupBlockBytes<MIN>;
  const int c = static_cast<int>(n % 8);
  std::memcpy(out, g + 2 * c, 2);
  if (MIN) std::memcpy(out + 2, g + 16 + 2 * c, 2);
  for (int t = 0; t < 4; ++t) std::memcpy(out + kHead<MIN> + 4 * t, g + kQs<MIN> + t * 32 + c * 4, 4);
}

template <bool MIN>
void pack(const uint8_t* src, int64_t ws, int64_t gr, int64_t nb, uint8_t* dst) {
  const uint8_t* rows = src + gr * 8 * ws;
  uint8_t* g = dst + gr * 8 * ws;
  for (int64_t b = 0; b < nb; ++b, g += kGroupBlockBytes<MIN>)
    for (int c = 0; c < 8; ++c) {
      const uint8_t* blk = rows + c * ws + b * (kHead<MIN> + 16);
      std::memcpy(g + 2 * c, blk, 2);
      if (MIN) std::memcpy(g + 16 + 2 * c, blk + 2, 2);
      for (int t = 0; t < 4; ++t) std::memcpy(g + kQs<MIN> + t * 32 + c * 4, blk + kHead<MIN> + 4 * t, 4);
    }
}

// the reference: the same per-output operations in plain scalar code
template <bool MIN>
void scalar(const DotArgs& p, int64_t n0, int64_t n1) {
  const int64_t nb = p.K / 32;
  uint8_t blk[20];
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < p.M; ++m) {
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        gather_block<MIN>(p.w, p.ws, n, b, blk);
        const uint8_t* qs = blk + kHead<MIN>;
        const int8_t* qx = p.a->q.data() + m * p.K + b * 32;
        const int64_t gi = m * nb + b;
        int32_t idot = 0;
        for (int j = 0; j < 16; ++j) idot += (qs[j] & 15) * qx[j] + (qs[j] >> 4) * qx[16 + j];
        if (!MIN) idot -= 8 * p.a->qsum[gi];
        acc = std::fma(static_cast<float>(idot), f16(blk) * p.a->dx[gi], acc);
        if (MIN) acc = std::fma(f16(blk + 2), p.a->dx[gi] * static_cast<float>(p.a->qsum[gi]), acc);
      }
      p.out[m * p.N + n] = acc;
    }
}
}  // namespace

void q4_0x8_pack(const uint8_t* src, int64_t ws, int64_t gr, int64_t nb, uint8_t* dst) {
  pack<false>(src, ws, gr, nb, dst);
}
void q4_1x8_pack(const uint8_t* src, int64_t ws, int64_t gr, int64_t nb, uint8_t* dst) {
  pack<true>(src, ws, gr, nb, dst);
}
void q4_0x8_rows(const uint8_t* w, int64_t ws, int64_t n, int64_t nb, float* out) {
  x8::file_rows<Q4_0>(gather_block<false>, w, ws, n, nb, out);
}
void q4_1x8_rows(const uint8_t* w, int64_t ws, int64_t n, int64_t nb, float* out) {
  x8::file_rows<Q4_1>(gather_block<true>, w, ws, n, nb, out);
}
void q4_0x8_scalar(const DotArgs& p, int64_t n0, int64_t n1) { scalar<false>(p, n0, n1); }
void q4_1x8_scalar(const DotArgs& p, int64_t n0, int64_t n1) { scalar<true>(p, n0, n1); }

}  // namespace gguf

#ifdef LMSERVE_GGUF_AVX2
#include <immintrin.h>

namespace gguf {
namespace {
using x8::load_i32;

// outputs [m0, m0 + RM) x the 8 columns of group gr; lanes outside [n0, n1) are not stored
template <int RM, bool MIN, bool PF>
void tile_avx2(const DotArgs& p, int64_t m0, int64_t gr, int64_t n0, int64_t n1) {
  const int64_t K = p.K, nb = K / 32;
  const uint8_t* g = p.w + gr * 8 * p.ws;
  const x8::Ahead<PF> ahead(p, g, 1);
  const __m256i lo_mask = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  __m256 acc[RM];
  for (int m = 0; m < RM; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = g + b * kGroupBlockBytes<MIN>;
    ahead.lines(b, kGroupBlockBytes<MIN>, 0, 8);
    __m256i s16[RM];
    for (int m = 0; m < RM; ++m) s16[m] = _mm256_setzero_si256();
    #pragma GCC unroll 4
    for (int t = 0; t < 4; ++t) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + kQs<MIN> + t * 32));
      const __m256i lo = _mm256_and_si256(v, lo_mask), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), lo_mask);
      for (int m = 0; m < RM; ++m) {
        const int8_t* qx = p.a->q.data() + (m0 + m) * K + b * 32;
        s16[m] = _mm256_add_epi16(s16[m], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(load_i32(qx + 4 * t))));
        s16[m] = _mm256_add_epi16(s16[m], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(load_i32(qx + 16 + 4 * t))));
        x8::pin(s16[m]);
      }
    }
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
    for (int m = 0; m < RM; ++m) {
      const int64_t gi = (m0 + m) * nb + b;
      const __m256i idot = MIN ? _mm256_madd_epi16(s16[m], ones)
          : _mm256_sub_epi32(_mm256_madd_epi16(s16[m], ones), _mm256_set1_epi32(8 * p.a->qsum[gi]));
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
  using Ctx = x8::NoCtx;
  static void prepare(const DotArgs&, int64_t, int64_t, Ctx&) {}
  template <int RM, bool PF>
  static void run(const DotArgs& p, int64_t m, int64_t gr, int64_t, int64_t n0, int64_t n1, Ctx&) {
    tile_avx2<RM, MIN, PF>(p, m, gr, n0, n1);
  }
};

}  // namespace

void q4_0x8_avx2(const DotArgs& p, int64_t n0, int64_t n1) { x8::blocked<Avx2Tile<false>>(p, n0, n1); }
void q4_1x8_avx2(const DotArgs& p, int64_t n0, int64_t n1) { x8::blocked<Avx2Tile<true>>(p, n0, n1); }

}  // namespace gguf

// ---- AVX512-VNNI: two groups (16 columns) per register, vpdpbusd in place of maddubs + add + madd -----------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#include "gguf_x8_avx512.h"

namespace gguf {
namespace {

// outputs [m0, m0 + RM) x the 16 columns of groups gr, gr + 1 (NG = 2) or the 8 of group gr (NG = 1, 8 lanes)
template <int RM, int NG, bool MIN, bool PF>
void tile_vnni(const DotArgs& p, int64_t m0, int64_t gr, int64_t n0, int64_t n1) {
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
    // two chains per row (low and high nibbles), seeded with minus the offset term: exact integers either way
    __m512i s0[RM], s1[RM];
    for (int m = 0; m < RM; ++m) {
      s0[m] = MIN ? _mm512_setzero_si512() : _mm512_set1_epi32(-8 * p.a->qsum[(m0 + m) * nb + b]);
      s1[m] = _mm512_setzero_si512();
    }
    #pragma GCC unroll 4
    for (int t = 0; t < 4; ++t) {
      const __m512i v = x8::load2<NG>(ba, bb, kQs<MIN> + t * 32);
      const __m512i lo = _mm512_and_si512(v, lo_mask), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), lo_mask);
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
  using Ctx = x8::NoCtx;
  static void prepare(const DotArgs&, int64_t, int64_t, Ctx&) {}
  template <int RM, bool PF>
  static void run(const DotArgs& p, int64_t m, int64_t gr, int64_t ng, int64_t n0, int64_t n1, Ctx&) {
    if (ng == 2) tile_vnni<RM, 2, MIN, PF>(p, m, gr, n0, n1);
    else tile_vnni<RM, 1, MIN, PF>(p, m, gr, n0, n1);
  }
};

}  // namespace

void q4_0x8_avx512vnni(const DotArgs& p, int64_t n0, int64_t n1) { x8::blocked<VnniTile<false>>(p, n0, n1); }
void q4_1x8_avx512vnni(const DotArgs& p, int64_t n0, int64_t n1) { x8::blocked<VnniTile<true>>(p, n0, n1); }

}  // namespace gguf

#pragma GCC pop_options
#endif  // LMSERVE_GGUF_AVX2
