// The i-quant grid types' blocks (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S; lmserve/ops/gguf_iq.py)
// decoded to the common form of gguf_blocks.h (int8 q, a scale per 16): the scalar reference, and the helpers the AVX2
// decoders (gguf_avx2.h grid_sub) and the lane kernels (gguf_grid_lanes.h) share. Included by gguf_blocks.h after
// its QType constants, f16 and Decoded; not on its own.
#pragma once
#include "gguf_iq1_grids.h"
#include "gguf_iq2_grids.h"
#include "gguf_iq3_grids.h"

namespace gguf {

// the grid types: 8 signs of a group of 8 values (bit j set: value j negative) and the scale of each 16 values
static inline void apply_signs(int8_t* q, uint8_t signs) {
  for (int j = 0; j < 8; ++j) q[j] = static_cast<int8_t>((signs >> j) & 1 ? -q[j] : q[j]);
}

static inline void grid8(int8_t* q, uint64_t entry) { std::memcpy(q, &entry, 8); }
static inline void grid4(int8_t* q, uint32_t entry) { std::memcpy(q, &entry, 4); }

static inline uint32_t u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

static inline uint32_t u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// IQ1_S / IQ1_M: the grid's 2-bit codes (gguf_iq1_grids.h) expanded when compiling to 8 x value, entry i's 8 int8
// packed little-endian (16 KB, as the IQ2 grids)
struct IQ1Grid {
  uint64_t v[2048];
};
constexpr IQ1Grid iq1_expand() {
  IQ1Grid t{};
  for (int i = 0; i < 2048; ++i)
    for (int j = 0; j < 8; ++j)
      t.v[i] |= static_cast<uint64_t>(static_cast<uint8_t>(8 * static_cast<int>((kIQ1SPacked[i] >> (2 * j)) & 3) - 8))
                << (8 * j);
  return t;
}
alignas(64) inline constexpr IQ1Grid kIQ1Grid8 = iq1_expand();

// a grid-type block's fp16 d: its first two bytes, except IQ1_M's, spread over the top nibbles of its 4 scale words
template <int QT>
static inline float grid_d(const uint8_t* b) {
  if constexpr (QT == IQ1_M) {
    const uint16_t h = static_cast<uint16_t>((u16(b + 48) >> 12) | ((u16(b + 50) >> 8) & 0xF0) |
                                             ((u16(b + 52) >> 4) & 0xF00) | (u16(b + 54) & 0xF000));
    return f16(reinterpret_cast<const uint8_t*>(&h));
  }
  return f16(b);
}

// IQ1_S / IQ1_M: the 3-bit scale of sub-block s's half h (IQ1_S: one per 32, in its qh word; IQ1_M: 4 per word)
template <int QT>
static inline int iq1_ls(const uint8_t* b, int s, int h) {
  if constexpr (QT == IQ1_S) return (u16(b + 34 + 2 * s) >> 12) & 7;
  return (u16(b + 48 + 2 * (s / 2)) >> (3 * (2 * (s % 2) + h))) & 7;
}

// IQ1_S / IQ1_M group i (8 values): its 11-bit grid index and its offset's sign (true: -1/8)
template <int QT>
static inline int iq1_index(const uint8_t* b, int i, bool& neg) {
  if constexpr (QT == IQ1_S) {   // d qs[32] qh[8 u16]: qh of the sub-block: 4 x 3 high bits, scale, sign
    const uint32_t qh = u16(b + 34 + 2 * (i / 4));
    neg = (qh >> 15) & 1;
    return b[2 + i] | (((qh >> (3 * (i % 4))) & 7) << 8);
  }
  const int nib = (b[32 + i / 2] >> (4 * (i % 2))) & 15;   // qs[32] qh[16]: a nibble per group: 3 high bits, sign
  neg = nib >> 3;
  return b[i] | ((nib & 7) << 8);
}

// the scale of sub-block s's half h: IQ2_XXS / IQ3_XXS from the u32 of signs and scale, IQ2_XS / IQ2_S per 16
// from a nibble, IQ3_S per 32 from a nibble, IQ1_S / IQ1_M d (2 ls + 1) / 8 (q holds 8 x the value)
template <int QT>
static inline float grid_scale(const uint8_t* b, float d, int s, int h) {
  if constexpr (kIQ1(QT)) return d * static_cast<float>(2 * iq1_ls<QT>(b, s, h) + 1) * 0.125f;
  if constexpr (QT == IQ2_XXS) return d * (static_cast<float>(u32(b + 2 + 8 * s + 4) >> 28) + 0.5f) * 0.25f;
  if constexpr (QT == IQ3_XXS) return d * (static_cast<float>(u32(b + 66 + 4 * s) >> 28) + 0.5f) * 0.5f;
  if constexpr (QT == IQ2_XS || QT == IQ2_S)
    return d * (static_cast<float>((b[(QT == IQ2_XS ? 66 : 74) + s] >> (4 * h)) & 15) + 0.5f) * 0.25f;
  return d * static_cast<float>(1 + 2 * ((b[106 + s / 2] >> (4 * (s % 2))) & 15));   // IQ3_S
}

// sub-block s (32 values) of a grid-type block -> q (signed)
template <int QT>
static inline void grid_values(const uint8_t* b, int s, int8_t* q) {
  if constexpr (QT == IQ2_XXS || QT == IQ3_XXS) {   // 7-bit sign codes in the sub-block's u32
    const uint32_t aux = QT == IQ2_XXS ? u32(b + 2 + 8 * s + 4) : u32(b + 66 + 4 * s);
    for (int g = 0; g < 4; ++g) {
      if constexpr (QT == IQ2_XXS) {
        grid8(q + 8 * g, kIQ2XXSGrid[b[2 + 8 * s + g]]);
      } else {
        grid4(q + 8 * g, kIQ3XXSGrid[b[2 + 8 * s + 2 * g]]);
        grid4(q + 8 * g + 4, kIQ3XXSGrid[b[2 + 8 * s + 2 * g + 1]]);
      }
      apply_signs(q + 8 * g, kIQ2Signs[(aux >> (7 * g)) & 127]);
    }
  } else if constexpr (QT == IQ2_XS) {   // per 8 values a u16: 9-bit index, 7-bit sign code
    for (int g = 0; g < 4; ++g) {
      const int v = b[2 + 2 * (4 * s + g)] | (b[3 + 2 * (4 * s + g)] << 8);
      grid8(q + 8 * g, kIQ2XSGrid[v & 511]);
      apply_signs(q + 8 * g, kIQ2Signs[v >> 9]);
    }
  } else if constexpr (QT == IQ2_S) {    // qs[32] signs[32] qh[8]: index qs | 2 bits of qh << 8
    for (int g = 0; g < 4; ++g) {
      grid8(q + 8 * g, kIQ2SGrid[b[2 + 4 * s + g] | (((b[66 + s] >> (2 * g)) & 3) << 8)]);
      apply_signs(q + 8 * g, b[34 + 4 * s + g]);
    }
  } else if constexpr (kIQ1(QT)) {       // no signs: 8 x grid value, then the offset +-1
    for (int g = 0; g < 4; ++g) {
      bool neg;
      grid8(q + 8 * g, kIQ1Grid8.v[iq1_index<QT>(b, 4 * s + g, neg)]);
      for (int j = 0; j < 8; ++j) q[8 * g + j] = static_cast<int8_t>(q[8 * g + j] + (neg ? -1 : 1));
    }
  } else {                               // IQ3_S: qs[64] qh[8] signs[32]: index qs | 1 bit of qh << 8
    for (int i = 0; i < 8; ++i) grid4(q + 4 * i, kIQ3SGrid[b[2 + 8 * s + i] | (((b[66 + s] >> i) & 1) << 8)]);
    for (int g = 0; g < 4; ++g) apply_signs(q + 8 * g, b[74 + 4 * s + g]);
  }
}

template <int QT>
static inline void decode_grid(const uint8_t* b, Decoded& o) {
  const float d = grid_d<QT>(b);
  for (int s = 0; s < 8; ++s) {
    grid_values<QT>(b, s, o.q + 32 * s);
    o.scale[2 * s] = grid_scale<QT>(b, d, s, 0);
    o.scale[2 * s + 1] = kScalePer16(QT) ? grid_scale<QT>(b, d, s, 1) : o.scale[2 * s];
    o.min[2 * s] = o.min[2 * s + 1] = 0.f;
  }
}

}  // namespace gguf
