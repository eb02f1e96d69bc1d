// The int8 GEMM on weights repacked in groups of 8 rows (gguf_x8.h) on AMX-INT8 tiles (Intel Sapphire Rapids and
// later), for calls of >= 16-48 rows (Kind::min_rows, per type): prefill, large batches. Chosen at run time
// (cpu_isa.cpp: level amx, granted by the kernel's arch_prctl); smaller calls and the last M % 16 rows stay on the
// AVX512-VNNI tiles.
//
// Bit for bit the VNNI tiles' results: each of those computes, per output (m, c) and 32-value sub-block g in order,
// an exact int32 dot idot and then the same float operations, acc = float(idot) * (s[c] * dx[m, g]) + acc (and
// acc = mn[c] * sx[m, g] + acc for types with a minimum). Here idot comes from a tile dot product of signed bytes
// (tdpbssd) on the weights unpacked to their signed values (an offset such as Q4_0's 8 already subtracted: the
// same integer as the VNNI tiles' sum minus their offset term), times the integer sub-block scale where a type has
// one (IQ4_XS), or sa * dA + sb * dB over 16-value halves (Q6_K, Q3_K, Q2_K: two tile dots of K = 16); the float
// epilogue is the VNNI tiles' operations in their order (Q2_K's offset term ma * xA + mb * xB formed in float from
// the halves' activation sums, exactly). So results do not depend on the CPU kind or the batch.
//
// Per thread: columns in chunks of 16 (two groups), up to 8 chunks whose weights are unpacked at once into panels
// (per sub-block 512 bytes in the tile's VNNI layout: row k4 holds values 4k4..4k4+3 of each of the 16 columns;
// the chunk's float scales per sub-block), ~512 KB in all, reused by every 16-row tile of the call; a row tile
// keeps its 16 x 16 float sums in registers over all sub-blocks, four tile dots in flight (row_tile). The
// activations are copied once per call, for every thread, into tile order (amx_pack_act). The panels and the
// per-type unpackers are gguf_amx_panels.cpp's.
#include "gguf_kernels.h"

#ifdef LMSERVE_GGUF_AVX2
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstring>
#include <vector>
#include "gguf_amx.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,amx-tile,amx-int8")
#include <immintrin.h>

namespace gguf {
namespace {
using namespace amx;

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tiles 0-3: sums (16 x 16 int32); 4, 5: activations (16 rows x kb bytes); 6, 7: weights (kb / 4 rows x 64 bytes)
void configure(int kb) {
  TileConfig c;
  for (int t = 0; t < 4; ++t) c.rows[t] = 16, c.colsb[t] = 64;
  for (int t = 4; t < 6; ++t) c.rows[t] = 16, c.colsb[t] = kb;
  for (int t = 6; t < 8; ++t) c.rows[t] = kb / 4, c.colsb[t] = 64;
  _tile_loadconfig(&c);
}

// Tile registers are not renamed: a sum tile is busy from its zeroing to its store, so four of them are kept in
// flight, and a sub-block's dot product is issued four sub-blocks before its sums are stored and scaled. GCC's tile
// intrinsics take the tile number as a literal, hence the macros, expanded once per tile.
// ap: the row tile's activations packed [sub-block][16 rows][32 bytes]; bp: the panel's weights [sub-block][512]
#define AMX_ISSUE(C, A, B)                            \
  do {                                                \
    _tile_zero(C);                                    \
    _tile_loadd(A, ap + 512 * g + off, 32);           \
    _tile_loadd(B, bp + 512 * g + 16 * off, 64);      \
    _tile_dpbssd(C, A, B);                            \
  } while (0)

// sub-block g (off = 0), or for HALVES its half off / 16 (off = 0, 16), into sum tile t
inline void issue(int t, const int8_t* ap, const int8_t* bp, int64_t g, int off) {
  switch (t) {
    case 0: AMX_ISSUE(0, 4, 6); break;
    case 1: AMX_ISSUE(1, 5, 7); break;
    case 2: AMX_ISSUE(2, 4, 6); break;
    default: AMX_ISSUE(3, 5, 7); break;
  }
}
#undef AMX_ISSUE

inline void drain(int t, int32_t* c) {
  switch (t) {
    case 0: _tile_stored(0, c, 64); break;
    case 1: _tile_stored(1, c, 64); break;
    case 2: _tile_stored(2, c, 64); break;
    default: _tile_stored(3, c, 64); break;
  }
}

// rows m0..m0 + 15 x the panel's 16 columns (from col0); stores the lanes in [n0, n1)
template <Epi E>
void row_tile(const DotArgs& p, const Panel& P, const int8_t* ap, int64_t m0, int64_t col0, int64_t n0, int64_t n1) {
  constexpr bool kHalves = E == HALVES || E == HALVES_MIN;
  const int64_t ng = p.K / 32;
  const float* dx = p.a->dx.data() + m0 * ng;
  const float* sx = p.a->sx.data() + m0 * ng;
  const int32_t* hs = p.a->hs.data() + m0 * ng * 2;
  const int8_t* bp = P.b.data();
  alignas(64) int32_t c0[256], c1[256];
  __m512 acc[16];
  for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
  auto epilogue = [&](const int32_t* c, const int32_t* c2, int64_t g) {
    const __m512 s = _mm512_loadu_ps(P.s.data() + 16 * g);
    const __m512 mn = _mm512_loadu_ps(P.mn.data() + 16 * g);
    // the integer scales as floats: |scale x dot| < 2^24 (gguf_q6_kx8.cpp, gguf_q3_kx8.cpp, gguf_iq4_xsx8.cpp), so
    // the products and their sum are exact in float and equal float(idot) of the int32 arithmetic
    const __m512 fa = _mm512_cvtepi32_ps(_mm512_loadu_si512(P.isc.data() + 32 * g));
    const __m512 fb = _mm512_cvtepi32_ps(_mm512_loadu_si512(P.isc.data() + 32 * g + 16));
    // Q2_K: the offsets / 32 times the halves' sums a.hs = -32 x give -(ma xA + mb xB), every product and sum an
    // integer below 2^24, so exactly -float(mdot), and acc + (-m) * y is the VNNI tiles' fnmadd(m, y, acc) to the bit
    const __m512 oa = _mm512_loadu_ps(P.mo.data() + 32 * g), ob = _mm512_loadu_ps(P.mo.data() + 32 * g + 16);
    for (int r = 0; r < 16; ++r) {
      __m512 v = _mm512_cvtepi32_ps(_mm512_load_si512(c + 16 * r));
      if (E == ISC) v = _mm512_mul_ps(v, fa);
      if (kHalves) v = _mm512_fmadd_ps(v, fa, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c2 + 16 * r)), fb));
      const __m512 dxr = _mm512_set1_ps(dx[r * ng + g]);
      acc[r] = _mm512_fmadd_ps(v, _mm512_mul_ps(s, dxr), acc[r]);
      if (E == MIN) acc[r] = _mm512_fmadd_ps(mn, _mm512_set1_ps(sx[r * ng + g]), acc[r]);
      if (E == HALVES_MIN) {
        const int32_t* h = hs + (r * ng + g) * 2;
        const __m512 neg = _mm512_fmadd_ps(oa, _mm512_set1_ps(static_cast<float>(h[0])),
                                           _mm512_mul_ps(ob, _mm512_set1_ps(static_cast<float>(h[1]))));
        acc[r] = _mm512_fmadd_ps(neg, _mm512_mul_ps(mn, dxr), acc[r]);
      }
    }
  };
  if constexpr (kHalves) {   // a sub-block's two halves in tiles 2s, 2s + 1: two sub-blocks in flight
    auto both = [&](int64_t g) {
      issue(2 * (g & 1), ap, bp, g, 0);
      issue(2 * (g & 1) + 1, ap, bp, g, 16);
    };
    both(0);
    for (int64_t g = 0; g < ng; ++g) {
      if (g + 1 < ng) both(g + 1);
      drain(2 * (g & 1), c0);
      drain(2 * (g & 1) + 1, c1);
      epilogue(c0, c1, g);
    }
  } else {
    constexpr int64_t D = 4;
    for (int64_t g = 0; g < std::min(D, ng); ++g) issue(g & 3, ap, bp, g, 0);
    for (int64_t g = 0; g < ng; ++g) {
      drain(g & 3, c0);
      if (g + D < ng) issue(g & 3, ap, bp, g + D, 0);
      epilogue(c0, nullptr, g);
    }
  }
  // the lanes of columns in [n0, n1): a column split may cut a chunk (gguf_x8.h store)
  const int64_t lo = std::max<int64_t>(n0 - col0, 0), hi = std::min<int64_t>(n1 - col0, 16);
  const __mmask16 keep = static_cast<__mmask16>(((1u << hi) - 1) & ~((1u << lo) - 1));
  for (int r = 0; r < 16; ++r) _mm512_mask_storeu_ps(p.out + (m0 + r) * p.N + col0, keep, acc[r]);
}

template <Epi E>
void gemm(const DotArgs& p, const Kind& k, int64_t m16, int64_t n0, int64_t n1) {
  constexpr int kMaxChunks = 8;
  constexpr int64_t kPanelBytes = 512 * 1024;
  thread_local Panel panels[kMaxChunks];
  const int64_t nsub = p.K / 32;
  const int nc = static_cast<int>(std::clamp<int64_t>(kPanelBytes / (16 * p.K), 1, kMaxChunks));
  const int64_t g0 = n0 / 8, g1 = (n1 + 7) / 8;
  configure(E == HALVES || E == HALVES_MIN ? 16 : 32);
  for (int64_t gc = g0; gc < g1; gc += 2 * nc) {
    int cnt = 0;
    for (; cnt < nc && gc + 2 * cnt < g1; ++cnt) {
      panels[cnt].resize(nsub);
      k.unpack(p, gc + 2 * cnt, panels[cnt]);
    }
    for (int64_t m0 = 0; m0 < m16; m0 += 16)
      for (int i = 0; i < cnt; ++i)
        row_tile<E>(p, panels[i], p.a->qtiles.data() + m0 * p.K, m0, (gc + 2 * i) * 8, n0, n1);
  }
  _tile_release();
}

}  // namespace

void amx_pack_act(Act& a, int64_t M, int64_t K) {
  const int64_t nsub = K / 32, m16 = M / 16 * 16;
  a.qtiles.resize(m16 * K);
  at::parallel_for(0, m16 / 16, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t m = t0 * 16; m < t1 * 16; ++m)
      for (int64_t g = 0; g < nsub; ++g)
        std::memcpy(a.qtiles.data() + ((m / 16 * nsub + g) * 16 + m % 16) * 32, a.q.data() + m * K + 32 * g, 32);
  });
}

bool amx_x8_takes(int qt, int64_t M) {
  const Kind* k = kind(qt);
  return k != nullptr && M >= k->min_rows;
}

void amx_x8(const DotArgs& p, int64_t n0, int64_t n1, void (*rest)(const DotArgs&, int64_t, int64_t)) {
  const Kind& k = *kind(p.qt);
  const int64_t m16 = p.M / 16 * 16;
  switch (k.epi) {
    case PLAIN: gemm<PLAIN>(p, k, m16, n0, n1); break;
    case MIN: gemm<MIN>(p, k, m16, n0, n1); break;
    case ISC: gemm<ISC>(p, k, m16, n0, n1); break;
    case HALVES: gemm<HALVES>(p, k, m16, n0, n1); break;
    case HALVES_MIN: gemm<HALVES_MIN>(p, k, m16, n0, n1); break;
  }
  if (m16 < p.M) {
    DotArgs r = p;
    r.m_begin = m16;
    rest(r, n0, n1);
  }
}

}  // namespace gguf

#pragma GCC pop_options
#endif  // LMSERVE_GGUF_AVX2
