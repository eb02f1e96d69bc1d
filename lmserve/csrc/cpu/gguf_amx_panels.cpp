// The AMX GEMM's panels (gguf_amx.h): per repacked type, 16 columns of the matrix unpacked into signed bytes in the
// tile layout (each type's offset subtracted, IQ4_XS levels looked up, fifth bits merged) and its float scales per
// 32-value sub-block, the values the type's AVX512-VNNI tile decodes for itself. Compiled for AVX-512 by the
// `#pragma GCC target` below; only called where the level is amx.
#include "gguf_amx.h"

#ifdef LMSERVE_GGUF_AVX2
#include <cstring>
#include "gguf_blocks.h"
#include "gguf_x8.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#include <immintrin.h>
#include "gguf_x8_avx512.h"

namespace gguf {
namespace amx {
namespace {

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

// Q3_K (gguf_q3_kx8.cpp layout: 880 bytes per super-block; d, per sub-block its two halves' scales, then per
// sub-block 96 bytes of low bits and third bits): values u - 4 and the halves' integer scales, decoded by that
// file's own AVX512-VNNI decoders (q3_kx8_amx_sub)
void unpack_q3_k(const DotArgs& p, int64_t gr, Panel& P) {
  const uint8_t *ga, *gb;
  pair(p, gr, ga, gb);
  for (int64_t b = 0; b < p.K / 256; ++b) {
    const uint8_t *ba = ga + b * 880, *bb = gb + b * 880;
    const __m512 d = x8::scales2<2>(ba, bb);
    for (int s = 0; s < 8; ++s) {
      const int64_t g = b * 8 + s;
      q3_kx8_amx_sub(ba, bb, s, P.b.data() + g * 512, P.isc.data() + g * 32);
      _mm512_storeu_ps(P.s.data() + 16 * g, d);
    }
  }
}

// Q2_K (gguf_q2_kx8.cpp layout: 672 bytes per super-block; d, dmin, scale bytes [16-value half][row] (scale | offset
// << 4), then per half h a chunk of [row][4 bytes] whose bits 2j, 2j + 1 are value 4j + k): values 0..3, the halves'
// integer scales, their offsets / 32 (exact) for the epilogue's offset term
void unpack_q2_k(const DotArgs& p, int64_t gr, Panel& P) {
  const uint8_t *ga, *gb;
  pair(p, gr, ga, gb);
  const __m512i m3 = _mm512_set1_epi8(3);
  for (int64_t b = 0; b < p.K / 256; ++b) {
    const uint8_t *ba = ga + b * 672, *bb = gb + b * 672;
    const __m512 d = x8::scales2<2>(ba, bb), dmin = x8::scales2<2>(ba + 16, bb + 16);
    for (int h = 0; h < 16; ++h) {
      const int64_t g = b * 8 + h / 2;
      for (int c = 0; c < 16; ++c) {
        const uint8_t sm = (c < 8 ? ba : bb)[32 + 8 * h + c % 8];
        P.isc[g * 32 + (h % 2) * 16 + c] = sm & 15;
        P.mo[g * 32 + (h % 2) * 16 + c] = static_cast<float>(sm >> 4) / 32.f;
      }
      const __m512i v = x8::load2<2>(ba, bb, 160 + 32 * h);
      int8_t* B = P.b.data() + g * 512 + (h % 2) * 256;
      for (int j = 0; j < 4; ++j) put(B + 64 * j, _mm512_and_si512(_mm512_srli_epi16(v, 2 * j), m3));
      if (h % 2 == 0) {
        _mm512_storeu_ps(P.s.data() + 16 * g, d);
        _mm512_storeu_ps(P.mn.data() + 16 * g, dmin);
      }
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

}  // namespace

const Kind* kind(int qt) {
  static const Kind q4_0{unpack_q4_0<false>, PLAIN, 32}, q4_1{unpack_q4_0<true>, MIN, 32},
      q5_0{unpack_q5_0<false>, PLAIN, 16}, q5_1{unpack_q5_0<true>, MIN, 32}, q8_0{unpack_q8_0, PLAIN, 32},
      q4_k{unpack_q4_k<false>, MIN, 48}, q5_k{unpack_q4_k<true>, MIN, 32}, q6_k{unpack_q6_k, HALVES, 32},
      q3_k{unpack_q3_k, HALVES, 16}, q2_k{unpack_q2_k, HALVES_MIN, 32}, iq4_xs{unpack_iq4_xs, ISC, 16};
  switch (qt) {
    case Q4_0X8: return &q4_0;
    case Q4_1X8: return &q4_1;
    case Q5_0X8: return &q5_0;
    case Q5_1X8: return &q5_1;
    case Q8_0X8: return &q8_0;
    case Q4_KX8: return &q4_k;
    case Q5_KX8: return &q5_k;
    case Q6_KX8: return &q6_k;
    case Q3_KX8: return &q3_k;
    case Q2_KX8: return &q2_k;
    case IQ4_XSX8: return &iq4_xs;
    default: return nullptr;
  }
}

}  // namespace amx
}  // namespace gguf

#pragma GCC pop_options
#endif  // LMSERVE_GGUF_AVX2
