// The int8 GEMM on weights repacked in groups of 8 rows (gguf_x8.h) on AMX-INT8 tiles (Intel Sapphire Rapids and
// later), for calls of >= 32 / 64 rows (Kind::min_rows): prefill. Chosen at run time (cpu_isa.cpp: level amx,
// granted by the kernel's arch_prctl); decode sizes and the last M % 16 rows stay on the AVX512-VNNI tiles.
//
// Bit for bit the VNNI tiles' results: each of those computes, per output (m, c) and 32-value sub-block g in order,
// an exact int32 dot idot and then the same float operations, acc = float(idot) * (s[c] * dx[m, g]) + acc (and
// acc = mn[c] * sx[m, g] + acc for types with a minimum). Here idot comes from a tile dot product of signed bytes
// (tdpbssd) on the weights unpacked to their signed values (an offset such as Q4_0's 8 already subtracted: the
// same integer as the VNNI tiles' sum minus their offset term), times the integer sub-block scale where a type has
// one (IQ4_XS), or sa * dA + sb * dB over 16-value halves (Q6_K: two tile dots of K = 16); the float epilogue is
// the VNNI tiles' operations in their order. So results do not depend on the CPU kind or the batch.
//
// Per thread: columns in chunks of 16 (two groups), up to 8 chunks whose weights are unpacked at once into panels
// (per sub-block 512 bytes in the tile's VNNI layout: row k4 holds values 4k4..4k4+3 of each of the 16 columns;
// the chunk's float scales per sub-block), ~512 KB in all, reused by every 16-row tile of the call; a row tile
// keeps its 16 x 16 float sums in registers over all sub-blocks, four tile dots in flight (row_tile). The
// activations are copied once per call into tile order (16 rows x 32 bytes per sub-block, contiguous).
#include "gguf_kernels.h"

#ifdef LMSERVE_GGUF_AVX2
#include <algorithm>
#include <cstring>
#include <vector>
#include "gguf_blocks.h"
#include "gguf_x8.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,amx-tile,amx-int8")
#include <immintrin.h>
#include "gguf_x8_avx512.h"

namespace gguf {
namespace {

enum Epi { PLAIN, MIN, ISC, HALVES };   // the epilogue: none, a minimum, an integer scale, two halves' scales

// 16 columns of a call's weights, unpacked: per 32-value sub-block g, b[g]: 8 rows x 64 bytes (row k4, column c:
// values 4k4..4k4+3); s, mn: [g][16] floats; isc: [g][16] (ISC) or [g][2][16] (HALVES) int32
struct Panel {
  std::vector<int8_t> b;
  std::vector<float> s, mn;
  std::vector<int32_t> isc;
  void resize(int64_t nsub) {
    b.resize(nsub * 512);
    s.resize(nsub * 16);
    mn.resize(nsub * 16);
    isc.resize(nsub * 32);
  }
};

// the byte addresses of groups gr and gr + 1 (gr itself where gr + 1 is past the matrix: its lanes are not stored)
inline void pair(const DotArgs& p, int64_t gr, const uint8_t*& ga, const uint8_t*& gb) {
  ga = p.w + gr * 8 * p.ws;
  gb = (gr + 1) * 8 < p.N ? ga + 8 * p.ws : ga;
}

inline void put(int8_t* dst, __m512i v) { _mm512_storeu_si512(dst, v); }

// Q4_0 / Q4_1 (gguf_q4_0x8.cpp layout: 144 / 160 bytes per block; d, (m), then t = 0..3 of 8 rows x 4 bytes)
template <bool HAS_MIN>
void unpack_q4_0(const DotArgs& p, int64_t gr, Panel& P) {
  constexpr int kBlk = HAS_MIN ? 160 : 144, kQ = HAS_MIN ? 32 : 16;
  const uint8_t *ga, *gb;
  pair(p, gr, ga, gb);
  const __m512i m15 = _mm512_set1_epi8(15), off = _mm512_set1_epi8(HAS_MIN ? 0 : 8);
  for (int64_t g = 0; g < p.K / 32; ++g) {
    const uint8_t *ba = ga + g * kBlk, *bb = gb + g * kBlk;
    int8_t* B = P.b.data() + g * 512;
    for (int t = 0; t < 4; ++t) {
      const __m512i v = x8::load2<2>(ba, bb, kQ + 32 * t);
      put(B + 64 * t, _mm512_sub_epi8(_mm512_and_si512(v, m15), off));
      put(B + 64 * (4 + t), _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(v, 4), m15), off));
    }
    _mm512_storeu_ps(P.s.data() + 16 * g, x8::scales2<2>(ba, bb));
    if (HAS_MIN) _mm512_storeu_ps(P.mn.data() + 16 * g, x8::scales2<2>(ba + 16, bb + 16));
  }
}

// Q5_0 / Q5_1 (gguf_q5_0x8.cpp layout: 176 / 192 bytes; d, (m), qh words, then t = 0..3 of 8 rows x 4 bytes): the
// fifth bit of value j of a column is bit j of its qh word
template <bool HAS_MIN>
void unpack_q5_0(const DotArgs& p, int64_t gr, Panel& P) {
  constexpr int kBlk = HAS_MIN ? 192 : 176, kQh = HAS_MIN ? 32 : 16, kQ = kQh + 32;
  const uint8_t *ga, *gb;
  pair(p, gr, ga, gb);
  const __m512i m15 = _mm512_set1_epi8(15), b4 = _mm512_set1_epi8(16), off = _mm512_set1_epi8(HAS_MIN ? 0 : 16);
  const __m512i lanes = _mm512_set4_epi32(0x0c0c0c0c, 0x08080808, 0x04040404, 0);   // byte 0 of each 32-bit lane
  for (int64_t g = 0; g < p.K / 32; ++g) {
    const uint8_t *ba = ga + g * kBlk, *bb = gb + g * kBlk;
    int8_t* B = P.b.data() + g * 512;
    const __m512i qh = x8::load2<2>(ba, bb, kQh);
    for (int h = 0; h < 2; ++h)
      for (int t = 0; t < 4; ++t) {
        // byte i of a lane <- the qh byte holding bit 16h + 4t + i; test that bit
        const int byte = 2 * h + t / 2, sh = 4 * (t % 2);
        const __m512i spread = _mm512_shuffle_epi8(qh, _mm512_add_epi8(lanes, _mm512_set1_epi8(static_cast<char>(byte))));
        const __mmask64 hi = _mm512_test_epi8_mask(spread, _mm512_set1_epi32(static_cast<int>(0x08040201u << sh)));
        const __m512i v = x8::load2<2>(ba, bb, kQ + 32 * t);
        const __m512i nib = h ? _mm512_and_si512(_mm512_srli_epi16(v, 4), m15) : _mm512_and_si512(v, m15);
        put(B + 64 * (4 * h + t), _mm512_sub_epi8(_mm512_or_si512(nib, _mm512_maskz_mov_epi8(hi, b4)), off));
      }
    _mm512_storeu_ps(P.s.data() + 16 * g, x8::scales2<2>(ba, bb));
    if (HAS_MIN) _mm512_storeu_ps(P.mn.data() + 16 * g, x8::scales2<2>(ba + 16, bb + 16));
  }
}

// Q8_0 (gguf_q8_0x8.cpp layout: 272 bytes per block; d, then t = 0..7 of 8 rows x 4 bytes): already signed bytes
void unpack_q8_0(const DotArgs& p, int64_t gr, Panel& P) {
  const uint8_t *ga, *gb;
  pair(p, gr, ga, gb);
  for (int64_t g = 0; g < p.K / 32; ++g) {
    const uint8_t *ba = ga + g * 272, *bb = gb + g * 272;
    for (int t = 0; t < 8; ++t) put(P.b.data() + g * 512 + 64 * t, x8::load2<2>(ba, bb, 16 + 32 * t));
    _mm512_storeu_ps(P.s.data() + 16 * g, x8::scales2<2>(ba, bb));
  }
}

// Q4_K / Q5_K (gguf_q4_kx8.cpp layout: per super-block d, dmin, scales, then for pair j and t = 0..7 32 bytes whose
// low nibbles are sub-block 2j's values 4t.., high nibbles 2j + 1's; Q5_K's fifth bits at 1152): unsigned values,
// float scale and minimum per sub-block as the VNNI tiles decode them
template <bool Q5>
void unpack_q4_k(const DotArgs& p, int64_t gr, Panel& P) {
  constexpr int kBlk = Q5 ? 1408 : 1152;
  const uint8_t *ga, *gb;
  pair(p, gr, ga, gb);
  const __m512i m15 = _mm512_set1_epi8(15), bit4 = _mm512_set1_epi8(16);
  alignas(64) float sc[2][8][8], mn[2][8][8];
  for (int64_t b = 0; b < p.K / 256; ++b) {
    const uint8_t *ba = ga + b * kBlk, *bb = gb + b * kBlk;
    q4_kx8_scales(ba, sc[0], mn[0]);
    q4_kx8_scales(bb, sc[1], mn[1]);
    for (int s = 0; s < 8; ++s)
      for (int c = 0; c < 16; ++c) {
        P.s[(b * 8 + s) * 16 + c] = sc[c / 8][s][c % 8];
        P.mn[(b * 8 + s) * 16 + c] = mn[c / 8][s][c % 8];
      }
    for (int j = 0; j < 4; ++j) {
      __m512i h0 = _mm512_setzero_si512(), h1 = h0;
      if (Q5) {
        h0 = x8::load2<2>(ba, bb, 1152 + 64 * j);
        h1 = x8::load2<2>(ba, bb, 1152 + 64 * j + 32);
      }
      int8_t* B0 = P.b.data() + (b * 8 + 2 * j) * 512;
      for (int t = 0; t < 8; ++t) {
        const __m512i v = x8::load2<2>(ba, bb, 128 + (j * 8 + t) * 32);
        __m512i lo = _mm512_and_si512(v, m15), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m15);
        if (Q5) {
          auto fifth = [&](__m512i h) {
            return _mm512_and_si512(t <= 4 ? _mm512_slli_epi16(h, 4 - t) : _mm512_srli_epi16(h, t - 4), bit4);
          };
          lo = _mm512_or_si512(lo, fifth(h0));
          hi = _mm512_or_si512(hi, fifth(h1));
        }
        put(B0 + 64 * t, lo);
        put(B0 + 512 + 64 * t, hi);
      }
    }
  }
}

// Q6_K (gguf_q6_kx8.cpp layout: per super-block d, int8 scales [16][8 rows], then per half h three 32-byte chunks:
// byte k of chunk j = value 4j + k (bits 0-5) and bits 2j, 2j + 1 of value 12 + k (bits 6-7)); values - 32
void unpack_q6_k(const DotArgs& p, int64_t gr, Panel& P) {
  const uint8_t *ga, *gb;
  pair(p, gr, ga, gb);
  const __m512i m63 = _mm512_set1_epi8(63), m3 = _mm512_set1_epi8(3), off = _mm512_set1_epi8(32);
  for (int64_t b = 0; b < p.K / 256; ++b) {
    const uint8_t *ba = ga + b * 1680, *bb = gb + b * 1680;
    const __m512 d = x8::scales2<2>(ba, bb);
    for (int h = 0; h < 16; ++h) {
      const int64_t g = b * 8 + h / 2;
      for (int c = 0; c < 16; ++c)
        P.isc[g * 32 + (h % 2) * 16 + c] = static_cast<int8_t>((c < 8 ? ba : bb)[16 + h * 8 + c % 8]);
      int8_t* B = P.b.data() + g * 512 + (h % 2) * 256;
      __m512i top = _mm512_setzero_si512();
      for (int j = 0; j < 3; ++j) {
        const __m512i v = x8::load2<2>(ba, bb, 144 + (h * 3 + j) * 32);
        put(B + 64 * j, _mm512_sub_epi8(_mm512_and_si512(v, m63), off));
        top = _mm512_or_si512(top, _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(v, 6), m3), 2 * j));
      }
      put(B + 192, _mm512_sub_epi8(top, off));
      if (h % 2 == 0) _mm512_storeu_ps(P.s.data() + 16 * g, d);
    }
  }
}

// IQ4_XS (gguf_iq4_xsx8.cpp layout: per super-block d, scales' low nibbles [pair][row], high bits per sub-block as
// a 16-bit word (row c at bits 2c), then per sub-block and t = 0..3 of 8 rows x 4 index bytes): levels from
// kIQ4NL, integer scale sc - 32 per sub-block
void unpack_iq4_xs(const DotArgs& p, int64_t gr, Panel& P) {
  const uint8_t *ga, *gb;
  pair(p, gr, ga, gb);
  const __m512i m15 = _mm512_set1_epi8(15);
  const __m512i lut = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kIQ4NL)));
  for (int64_t b = 0; b < p.K / 256; ++b) {
    const uint8_t *ba = ga + b * 1088, *bb = gb + b * 1088;
    const __m512 d = x8::scales2<2>(ba, bb);
    for (int s = 0; s < 8; ++s) {
      const int64_t g = b * 8 + s;
      for (int c = 0; c < 16; ++c) {
        const uint8_t* blk = c < 8 ? ba : bb;
        const int r = c % 8;
        uint16_t hw;
        std::memcpy(&hw, blk + 48 + 2 * s, 2);
        const int lo = (blk[16 + (s / 2) * 8 + r] >> (4 * (s % 2))) & 15;
        P.isc[g * 32 + c] = (lo | ((hw >> (2 * r)) & 3) << 4) - 32;
      }
      _mm512_storeu_ps(P.s.data() + 16 * g, d);
      int8_t* B = P.b.data() + g * 512;
      for (int t = 0; t < 4; ++t) {
        const __m512i v = x8::load2<2>(ba, bb, 64 + (s * 4 + t) * 32);
        put(B + 64 * t, _mm512_shuffle_epi8(lut, _mm512_and_si512(v, m15)));
        put(B + 64 * (4 + t), _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(v, 4), m15)));
      }
    }
  }
}

// min_rows: the calls AMX takes. Measured against the AVX512-VNNI tiles on a Sapphire Rapids VM (docs/benchmarks.md):
// at 16 rows every type was slower on AMX (the panels are unpacked for one row tile), at 32 the 32-value types
// gained (Q4_0 1.2x) and the super-block types, whose unpacking decodes scales, were level up to 48 rows
struct Kind {
  void (*unpack)(const DotArgs&, int64_t, Panel&);
  Epi epi;
  int64_t min_rows;
};

const Kind* kind(int qt) {
  static const Kind q4_0{unpack_q4_0<false>, PLAIN, 32}, q4_1{unpack_q4_0<true>, MIN, 32},
      q5_0{unpack_q5_0<false>, PLAIN, 32}, q5_1{unpack_q5_0<true>, MIN, 32}, q8_0{unpack_q8_0, PLAIN, 32},
      q4_k{unpack_q4_k<false>, MIN, 64}, q5_k{unpack_q4_k<true>, MIN, 64}, q6_k{unpack_q6_k, HALVES, 64},
      iq4_xs{unpack_iq4_xs, ISC, 64};
  switch (qt) {
    case Q4_0X8: return &q4_0;
    case Q4_1X8: return &q4_1;
    case Q5_0X8: return &q5_0;
    case Q5_1X8: return &q5_1;
    case Q8_0X8: return &q8_0;
    case Q4_KX8: return &q4_k;
    case Q5_KX8: return &q5_k;
    case Q6_KX8: return &q6_k;
    case IQ4_XSX8: return &iq4_xs;
    default: return nullptr;
  }
}

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
  const int64_t ng = p.K / 32;
  const float* dx = p.a->dx.data() + m0 * ng;
  const float* sx = p.a->sx.data() + m0 * ng;
  const int8_t* bp = P.b.data();
  alignas(64) int32_t c0[256], c1[256];
  __m512 acc[16];
  for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
  auto epilogue = [&](const int32_t* c, const int32_t* c2, int64_t g) {
    const __m512 s = _mm512_loadu_ps(P.s.data() + 16 * g);
    const __m512 mn = _mm512_loadu_ps(P.mn.data() + 16 * g);
    // the integer scales as floats: |scale x dot| < 2^24 (gguf_q6_kx8.cpp, gguf_iq4_xsx8.cpp), so the products
    // and their sum are exact in float and equal float(idot) of the int32 arithmetic, with fewer instructions
    const __m512 fa = _mm512_cvtepi32_ps(_mm512_loadu_si512(P.isc.data() + 32 * g));
    const __m512 fb = _mm512_cvtepi32_ps(_mm512_loadu_si512(P.isc.data() + 32 * g + 16));
    for (int r = 0; r < 16; ++r) {
      __m512 v = _mm512_cvtepi32_ps(_mm512_load_si512(c + 16 * r));
      if (E == ISC) v = _mm512_mul_ps(v, fa);
      if (E == HALVES) v = _mm512_fmadd_ps(v, fa, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c2 + 16 * r)), fb));
      acc[r] = _mm512_fmadd_ps(v, _mm512_mul_ps(s, _mm512_set1_ps(dx[r * ng + g])), acc[r]);
      if (E == MIN) acc[r] = _mm512_fmadd_ps(mn, _mm512_set1_ps(sx[r * ng + g]), acc[r]);
    }
  };
  if constexpr (E == HALVES) {   // a sub-block's two halves in tiles 2s, 2s + 1: two sub-blocks in flight
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
  thread_local std::vector<int8_t> act;
  const int64_t nsub = p.K / 32;
  // the activations of each 16-row tile as [sub-block][row][32 bytes]: a tile load reads 512 contiguous bytes
  act.resize(m16 * p.K);
  for (int64_t m = 0; m < m16; ++m)
    for (int64_t g = 0; g < nsub; ++g)
      std::memcpy(act.data() + ((m / 16 * nsub + g) * 16 + m % 16) * 32, p.a->q.data() + m * p.K + 32 * g, 32);
  const int nc = static_cast<int>(std::clamp<int64_t>(kPanelBytes / (16 * p.K), 1, kMaxChunks));
  const int64_t g0 = n0 / 8, g1 = (n1 + 7) / 8;
  configure(E == HALVES ? 16 : 32);
  for (int64_t gc = g0; gc < g1; gc += 2 * nc) {
    int cnt = 0;
    for (; cnt < nc && gc + 2 * cnt < g1; ++cnt) {
      panels[cnt].resize(nsub);
      k.unpack(p, gc + 2 * cnt, panels[cnt]);
    }
    for (int64_t m0 = 0; m0 < m16; m0 += 16)
      for (int i = 0; i < cnt; ++i) row_tile<E>(p, panels[i], act.data() + m0 * p.K, m0, (gc + 2 * i) * 8, n0, n1);
  }
  _tile_release();
  if (act.capacity() > (8 << 20)) std::vector<int8_t>().swap(act);   // a long prefill's copy is not kept resident
}

}  // namespace

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
